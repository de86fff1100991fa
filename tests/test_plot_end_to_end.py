"""benchmarks/plot_end_to_end.py: the issue-4 plot from recorded benchmark JSON (CPU)."""
import json

from conftest import load_benchmark



def test_series_keep_measured_rows_only():
    mod = load_benchmark("plot_end_to_end")
    rows = [dict(context=131072, cache="bf16", tokens_per_s=None),
            dict(context=32768, cache="bf16", tokens_per_s=50.0),
            dict(context=131072, cache="4/2", tokens_per_s=80.0),
            dict(context=32768, cache="4/2", tokens_per_s=90.0)]
    assert mod._series(rows, "cache", "tokens_per_s") == {
        "bf16": [(32768, 50.0)], "4/2": [(32768, 90.0), (131072, 80.0)]}


def test_plot_from_recorded_results(tmp_path):
    ttft = tmp_path / "ttft.json"
    ttft.write_text(json.dumps(dict(device="dev", torch="t", rows=[
        dict(context=c, variant=v, ttft_s=t) for c, v, t in
        [(32768, "dense", 1.2), (131072, "dense", 9.5), (32768, "zipvl", 0.9)]])))
    decode = tmp_path / "decode.json"
    decode.write_text(json.dumps(dict(rows=[
        dict(batch=b, context=c, cache=k, tokens_per_s=s) for b, c, k, s in
        [(1, 32768, "bf16", 57.0), (1, 131072, "bf16", None), (8, 32768, "4/2", 580.0)]])))
    out = tmp_path / "e2e.png"
    load_benchmark("plot_end_to_end").main(["--ttft", str(ttft), "--decode", str(decode),
                                             "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
