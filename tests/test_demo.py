"""README quick start's demo (examples/vlm_demo.py) runs end to end on the shipped model."""
import importlib.util
from pathlib import Path

import torch

DEMO = Path(__file__).resolve().parents[1] / "examples" / "vlm_demo.py"


def test_demo_answers_with_and_without_zipvl(capsys):
    spec = importlib.util.spec_from_file_location("vlm_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    with torch.no_grad():
        results = demo.main(["--n", "4"])
    names = list(dict.fromkeys(r.setting for r in results))
    assert names == ["dense", "zipvl tau=0.975", "zipvl tau=0.975 + ZipVLCache 4/2"]
    by = {(r.setting, r.level): r for r in results}
    assert all(by[("dense", lv)].n == 4 for lv in ("easy", "medium", "hard"))
    assert by[("dense", "easy")].accuracy == 1.0  # the shipped weights answer easy questions
    assert all(0 < r.mean_kept < 1 and len(r.kept) == 4 for r in results if r.setting != "dense")
    assert all(r.kv_fraction < 0.5 for r in results if r.setting.endswith("4/2"))
    printed = capsys.readouterr().out
    assert "kept ratio per layer" in printed and "first hard question" in printed
