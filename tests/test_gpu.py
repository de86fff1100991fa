"""CUDA tests: compiled ZipVL (both kernels) against the reference, per dtype.  Skipped without
CUDA; run on an H100/H200 with ``pytest -m gpu``."""
import pytest
import torch
import torch.nn.functional as F

import zipvl_compile
from conftest import planted_qkv
from toy import padding_mask
from zipvl_compile import ZipVLConfig, reference

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class Attn(torch.nn.Module):
    def forward(self, q, k, v, mask=None):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def rel_err(out, ref, rows=None):
    diff, ref = (out.float() - ref.float()), ref.float()
    if rows is not None:
        diff, ref = diff[rows], ref[rows]
    return (diff.norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel,sparse_queries", [("sdpa", True), ("sdpa", False), ("flex", True)])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_matches_reference_on_cuda(dtype, kernel, sparse_queries, batch):
    torch.manual_seed(0)
    (q, k, v), important = planted_qkv(B=batch, H=8, Hkv=2, n=300, d=64, strength=6.0,
                                       seed=int(torch.randint(0, 1000, ())))
    cfg = ZipVLConfig(ratio=0.01, min_keep=len(important), recent_probes=32, random_probes=32,
                      keep_recent=8, kernel=kernel, sparse_queries=sparse_queries)
    ref, sels = reference.zipvl_attention(q, k, v, cfg)
    assert all(sorted(s.kept.tolist()) == sorted(important) for s in sels)
    f = torch.compile(Attn(), backend=zipvl_compile.backend(cfg), dynamic=False)
    out = f(*(x.cuda().to(dtype) for x in (q, k, v)))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out.cpu(), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_on_cuda(dtype):
    (q, k, v), _ = planted_qkv(B=3, H=4, Hkv=2, n=160, d=64, seed=3)
    mask, valid = padding_mask([160, 100, 37], 160, left=True)
    cfg = ZipVLConfig(tau=0.9, recent_probes=16, random_probes=16, keep_recent=4, kernel="sdpa")
    ref, sels = reference.zipvl_attention(q, k, v, cfg, attn_mask=mask)
    f = torch.compile(Attn(), backend=zipvl_compile.backend(cfg), dynamic=False)
    out = f(*(x.cuda().to(dtype) for x in (q, k, v)), mask.cuda()).cpu()
    rows = valid[:, None, :].expand(3, 4, 160)
    assert rel_err(out, ref, rows) < TOL[dtype]
    got = [r.kept for r in zipvl_compile.stats() if r.path == "sparse"][-1]
    assert got == [s.budget for s in sels]


def test_selection_on_cuda_equals_cpu():
    from zipvl_compile.runtime import selection

    (q, k, _), _ = planted_qkv(B=2, H=8, Hkv=4, n=1000, d=64, seed=5)
    kw = dict(attn_mask=None, scale=0.125, tau=0.95, ratio=None, recent_probes=64,
              random_probes=64, keep_recent=16, min_keep=1, seed=1, salt=2, keep_all=False)
    cpu = selection.select(q, k, **kw)
    gpu = selection.select(q.cuda(), k.cuda(), **kw)
    assert cpu.budget.tolist() == gpu.budget.cpu().tolist()
    for b, p in enumerate(cpu.budget.tolist()):
        assert sorted(cpu.kept_idx[b, :p].tolist()) == sorted(gpu.kept_idx[b, :p].cpu().tolist())


def test_reduce_overhead_mode_captures_the_graph_kernel():
    from toy import ToyDecoder

    torch.manual_seed(0)
    model = ToyDecoder(dim=128, layers=2, heads=4, kv_heads=2).eval()  # flex needs d >= 16
    cfg = ZipVLConfig(tau=0.9, recent_probes=16, random_probes=16, keep_recent=8)

    def attn(q, k, v, mask, layer):
        return reference.zipvl_attention(q, k, v, cfg, attn_mask=mask, salt=layer)[0]

    ref_model = ToyDecoder(dim=128, attention=attn).eval()
    ref_model.load_state_dict(model.state_dict())
    f = torch.compile(model.cuda(), backend=zipvl_compile.backend(cfg), mode="reduce-overhead",
                      dynamic=False)
    with torch.no_grad():
        for step in range(4):  # warm-up, capture, replays with new content
            ids = torch.randint(0, 64, (2, 160))
            out = f(ids.cuda()).clone()
            torch.testing.assert_close(out.cpu(), ref_model(ids), rtol=1e-4, atol=1e-4)
    records = zipvl_compile.stats()
    assert [r.kernel for r in records] == ["flex", "flex"]
    assert all(0 < r.kept_ratio < 1 for r in records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliding_window_mask_on_cuda(dtype):
    (q, k, v), _ = planted_qkv(B=2, H=4, Hkv=2, n=200, d=64, seed=7)
    causal = torch.ones(200, 200, dtype=torch.bool).tril()
    mask = (causal & ~torch.ones(200, 200, dtype=torch.bool).tril(-48))[None, None]
    cfg = ZipVLConfig(tau=0.9, recent_probes=16, random_probes=16, keep_recent=4, kernel="sdpa")
    ref, _ = reference.zipvl_attention(q, k, v, cfg, attn_mask=mask)
    f = torch.compile(Attn(), backend=zipvl_compile.backend(cfg), dynamic=False)
    out = f(*(x.cuda().to(dtype) for x in (q, k, v)), mask.cuda()).cpu()
    assert rel_err(out, ref) < TOL[dtype]
