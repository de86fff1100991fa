"""The zipvl backend through Inductor (CPU, fp32) on a toy decoder, against the reference."""
import logging

import pytest
import torch

import zipvl_compile
from toy import ToyDecoder, padding_mask
from zipvl_compile import ZipVLConfig, reference

CFG = ZipVLConfig(tau=0.9, recent_probes=16, random_probes=16, keep_recent=8)


def reference_model(model, cfg):
    def attn(q, k, v, mask, layer):
        return reference.zipvl_attention(q, k, v, cfg, attn_mask=mask, salt=layer)[0]

    ref = ToyDecoder(attention=attn).eval()
    ref.load_state_dict(model.state_dict())
    return ref


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ToyDecoder(layers=2, heads=4, kv_heads=2).eval()


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@torch.no_grad()
def test_compiled_gqa_batch_matches_reference(model, kernel):
    ids = torch.randint(0, 64, (2, 160))
    be = zipvl_compile.backend(CFG, kernel=kernel)
    out = torch.compile(model, backend=be, dynamic=False)(ids)
    torch.testing.assert_close(out, reference_model(model, CFG)(ids), rtol=1e-4, atol=1e-4)
    records = zipvl_compile.stats()
    assert [r.site for r in records] == ["layers.0", "layers.1"]
    assert all(r.path == "sparse" and r.kernel == kernel for r in records)
    assert all(0 < r.kept_ratio < 1 and len(r.kept) == 2 for r in records)


@torch.no_grad()
def test_flex_with_dynamic_shapes_matches_reference(model):
    """The graph-capturable kernel under ``dynamic=True``: symbolic batch size and length, one
    FlexAttention call for the whole batch; every batch and length matches the reference and
    runs sparse."""
    be = zipvl_compile.backend(CFG, kernel="flex")
    f = torch.compile(model, backend=be, dynamic=True)
    ref = reference_model(model, CFG)
    for B, n in ((2, 150), (3, 90)):
        ids = torch.randint(0, 64, (B, n))
        torch.testing.assert_close(f(ids), ref(ids), rtol=1e-4, atol=1e-4)
        records = zipvl_compile.stats()
        assert all(r.path == "sparse" and r.kernel == "flex" and len(r.kept) == B
                   for r in records), records
    assert all(d.sparse for d in be.decisions)


@torch.no_grad()
def test_padded_batches_left_and_right(model):
    be = zipvl_compile.backend(CFG)
    f = torch.compile(model, backend=be, dynamic=False)
    ref = reference_model(model, CFG)
    ids = torch.randint(0, 64, (3, 140))
    for left in (True, False):  # same shapes: the second call reuses the compiled graph
        mask, valid = padding_mask([140, 100, 45], 140, left=left)
        out, expected = f(ids, mask), ref(ids, mask)
        torch.testing.assert_close(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
        kept = zipvl_compile.stats()[0]
        assert kept.valid == [140, 100, 45] and all(k <= v for k, v in zip(kept.kept, kept.valid))
    assert len(be.decisions) == 2  # one graph, two sites


@torch.no_grad()
def test_all_queries_mode_matches_reference(model):
    cfg = CFG.replace(sparse_queries=False)
    ids = torch.randint(0, 64, (1, 130))
    out = torch.compile(model, backend=zipvl_compile.backend(cfg), dynamic=False)(ids)
    torch.testing.assert_close(out, reference_model(model, cfg)(ids), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_tau_one_reproduces_dense_attention(model):
    ids = torch.randint(0, 64, (2, 120))
    out = torch.compile(model, backend=zipvl_compile.backend(tau=1.0), dynamic=False)(ids)
    torch.testing.assert_close(out, model(ids), rtol=1e-5, atol=1e-5)
    assert all(r.kept_ratio == 1.0 for r in zipvl_compile.stats())


@torch.no_grad()
def test_new_content_never_recompiles_new_length_at_most_once(model):
    calls = []
    be = zipvl_compile.backend(CFG)

    def counting(gm, example_inputs, **kw):
        calls.append(1)
        return be(gm, example_inputs, **kw)

    f = torch.compile(model, backend=counting)
    ref = reference_model(model, CFG)
    for n in (150, 150, 170, 190, 210):
        ids = torch.randint(0, 64, (1, n))
        torch.testing.assert_close(f(ids), ref(ids), rtol=1e-4, atol=1e-4)
        assert zipvl_compile.stats()[0].seq_len == n
    assert len(calls) == 2  # static first graph, then one dynamic graph for all lengths


@torch.no_grad()
def test_unfused_attention_with_additive_padding_mask_compiles():
    torch.manual_seed(1)
    model = ToyDecoder(layers=2, attention="unfused").eval()
    mask, valid = padding_mask([150, 110], 150, left=True, dtype=torch.float32)
    ids = torch.randint(0, 64, (2, 150))
    be = zipvl_compile.backend(CFG)
    out = torch.compile(model, backend=be, dynamic=False)(ids, mask)
    assert [(d.pattern, d.sparse) for d in be.decisions] == [("unfused", True)] * 2
    expected = reference_model(model, CFG)(ids, mask)
    torch.testing.assert_close(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert zipvl_compile.stats()[0].valid == [150, 110]


@torch.no_grad()
def test_prompts_below_min_tokens_stay_dense(model):
    calls = []
    be = zipvl_compile.backend(CFG, min_tokens=200)

    def counting(gm, example_inputs, **kw):
        calls.append(1)
        return be(gm, example_inputs, **kw)

    f = torch.compile(model, backend=counting)
    short = torch.randint(0, 64, (1, 150))
    torch.testing.assert_close(f(short), model(short), rtol=1e-5, atol=1e-5)  # dense
    assert all("min_tokens=200" in r.reason and r.path == "dense" for r in zipvl_compile.stats())
    long = torch.randint(0, 64, (1, 230))
    torch.testing.assert_close(f(long), reference_model(model, CFG)(long), rtol=1e-4, atol=1e-4)
    records = zipvl_compile.stats()
    assert all(r.path == "sparse" and r.seq_len == 230 for r in records), records
    assert len(calls) == 2  # one graph per side of the threshold


@pytest.mark.parametrize("stage", ["scores", "budget", "selection"])
@torch.no_grad()
def test_stop_after_runs_the_stages_then_exact_dense_attention(model, stage, monkeypatch):
    from zipvl_compile.runtime import selection

    ran = []
    for name in ("probe_scores", "budget_from_scores", "kept_order"):
        real = getattr(selection, name)
        monkeypatch.setattr(selection, name,
                            lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))
    be = zipvl_compile.backend(CFG.replace(ratio=0.3, stop_after=stage), inductor=False)
    f = torch.compile(model, backend=be, dynamic=False)
    ids = torch.randint(0, 64, (2, 150))
    mask, valid = padding_mask([150, 90], 150, left=True)
    for m in (None, mask):
        out = f(ids, m)
        expected = model(ids, m)
        torch.testing.assert_close(out[valid] if m is not None else out,
                                   expected[valid] if m is not None else expected,
                                   rtol=1e-5, atol=1e-5)
    stages = {"scores": {"probe_scores"}, "budget": {"probe_scores", "budget_from_scores"},
              "selection": {"probe_scores", "budget_from_scores", "kept_order"}}[stage]
    assert set(ran) == stages
    assert all(r.path == "dense" and f"stops after '{stage}'" in r.reason
               for r in zipvl_compile.stats())


@torch.no_grad()
def test_the_first_dense_layers_keep_dense_attention(model, caplog):
    """dense_layers=1: layers.0 stays exact dense attention (reported with the reason, at info
    level: it was asked for), the other layer is sparse; the output equals a reference model
    whose first layer is dense.  After ``reset_stats()`` the next forward reports both layers
    again, the one decided dense at compile time included."""
    ids = torch.randint(0, 64, (2, 160))
    be = zipvl_compile.backend(CFG, dense_layers=1)
    f = torch.compile(model, backend=be, dynamic=False)
    with caplog.at_level(logging.INFO, logger="zipvl_compile"):
        out = f(ids)
    (logged,) = [r for r in caplog.records if "dense_layers=1" in r.getMessage()]
    assert logged.levelno == logging.INFO
    dense, sparse = be.decisions
    assert (dense.name, dense.sparse) == ("layers.0", False)
    assert dense.reason == "among the first dense_layers=1 layers (config)"
    assert (sparse.name, sparse.sparse) == ("layers.1", True)
    zipvl_compile.reset_stats()
    assert zipvl_compile.stats() == []
    f(ids)
    assert [(r.site, r.path) for r in zipvl_compile.stats()] == [("layers.0", "dense"),
                                                                  ("layers.1", "sparse")]

    def attn(q, k, v, mask, layer):
        if layer == 0:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                    enable_gqa=True)
        return reference.zipvl_attention(q, k, v, CFG, attn_mask=mask, salt=0)[0]

    ref = ToyDecoder(attention=attn).eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, ref(ids), rtol=1e-4, atol=1e-4)
