"""benchmarks/toyvlm_row_sparsity.py: top-p attention against a per-row brute force (CPU)."""
import pytest
import torch

from conftest import load_benchmark


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_attention_reads_the_smallest_mass_set_of_each_row(top_p):
    mod = load_benchmark("toyvlm_row_sparsity")
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, n, d = 2, 4, 2, 9, 8
    q = torch.randn(B, H, n, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g) * 2.0
    v = torch.randn(B, Hkv, n, d, generator=g)
    out, probs = mod.top_p_attention(q, k, v, d ** -0.5, top_p)
    full_out, full = mod.top_p_attention(q, k, v, d ** -0.5, None)
    assert torch.allclose(full_out, torch.softmax(
        (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * d ** -0.5).masked_fill(
            ~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")), -1)
        @ v.repeat_interleave(2, 1), atol=1e-5)
    sparse_rows = 0
    for b in range(B):
        for h in range(H):
            for i in range(n):
                row = full[b, h, i, :i + 1]
                ranked, order = row.sort(descending=True, stable=True)
                count = int((ranked.cumsum(0) < top_p).sum()) + 1   # smallest prefix >= p
                count = min(count, i + 1)
                keep = torch.zeros(n, dtype=torch.bool)
                keep[order[:count]] = True
                assert torch.equal(probs[b, h, i] > 0, keep)
                expect = torch.where(keep[:i + 1], row, 0.0)
                expect = expect / expect.sum()
                assert torch.allclose(probs[b, h, i, :i + 1], expect, atol=1e-6)
                assert torch.allclose(out[b, h, i],
                                      expect @ v[b, h // 2, :i + 1], atol=1e-5)
                sparse_rows += count < i + 1
    assert sparse_rows > 0      # the bound was reached before the last key in some rows
