"""Token selection (steps 1-6) against a brute force built from the full attention matrix."""
import math

import pytest
import torch

from conftest import planted_qkv
from toy import padding_mask
from zipvl_compile import ZipVLConfig, reference
from zipvl_compile.runtime import masks, selection
from zipvl_compile.runtime.probes import probe_positions


def run_select(q, k, cfg, mask=None, salt=0):
    return selection.select(
        q, k, attn_mask=None if mask is None else masks.as_4d(mask, q.shape[0], q.shape[2]),
        scale=q.shape[-1] ** -0.5, tau=cfg.tau, ratio=cfg.ratio,
        recent_probes=cfg.recent_probes, random_probes=cfg.random_probes,
        keep_recent=cfg.keep_recent, min_keep=cfg.min_keep, seed=cfg.seed, salt=salt,
        keep_all=cfg.keeps_everything)


def brute_force(q, k, cfg, mask=None, salt=0):
    """Budget and kept set per sequence from the full [H, n, n] attention matrix (float64)."""
    B, H, n, d = q.shape
    g = H // k.shape[1]
    ok = torch.ones(n, n, dtype=torch.bool).tril().expand(B, n, n) if mask is None else mask[:, 0]
    valid = ok.diagonal(dim1=-2, dim2=-1)
    logits = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) / math.sqrt(d)
    full = torch.softmax(logits.masked_fill(~ok[:, None], float("-inf")), -1).nan_to_num(0)
    probes, probe_ok = probe_positions(valid, cfg.recent_probes, cfg.random_probes, cfg.seed, salt)
    out = []
    for b in range(B):
        P = probes[b][probe_ok[b]]
        acc = full[b][:, P].sum((0, 1))
        nv = int(valid[b].sum())
        if cfg.keeps_everything:
            p = nv
        elif cfg.ratio is not None:
            p = math.ceil(cfg.ratio * nv)
        else:
            csum = acc.sort(descending=True).values.cumsum(0)
            p = int((csum < cfg.tau * H * len(P)).sum()) + 1
        p = min(max(p, min(max(cfg.min_keep, cfg.keep_recent), nv)), nv)
        norm = acc / (H * ok[b][P].sum(0).clamp(min=1))
        pos = valid[b].nonzero().flatten()
        recent = set(pos[-cfg.keep_recent:].tolist())
        ranked = sorted(pos.tolist(), key=lambda j: (j not in recent, -norm[j].item(), j))
        out.append((p, sorted(ranked[:p])))
    return out


def kept_sets(sel):
    return [(int(p), sorted(sel.kept_idx[b, :p].tolist())) for b, p in enumerate(sel.budget)]


CFG = ZipVLConfig(tau=0.9, recent_probes=16, random_probes=16, keep_recent=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_structure_matches_brute_force(seed):
    (q, k, _), important = planted_qkv(B=2, H=4, Hkv=2, n=240, d=16, strength=5.0, seed=seed)
    expected = brute_force(q, k, CFG)
    assert kept_sets(run_select(q, k, CFG)) == expected
    assert [(s.budget, s.kept.tolist()) for s in reference.zipvl_attention(q, k, _, CFG)[1]] \
        == expected
    for p, kept in expected:  # only planted tokens are kept, the sink and the window among them
        assert set(kept) <= set(important) and {0, 236, 237, 238, 239} <= set(kept)


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
def test_gaussian_inputs_match_brute_force(tau):
    g = torch.Generator().manual_seed(int(tau * 100))
    q, k = torch.randn(2, 4, 150, 16, generator=g), torch.randn(2, 2, 150, 16, generator=g)
    cfg = CFG.replace(tau=tau)
    assert kept_sets(run_select(q, k, cfg)) == brute_force(q, k, cfg)


@pytest.mark.parametrize("left", [True, False])
def test_padding_gets_its_own_budget_and_is_never_kept(left):
    (q, k, _), _ = planted_qkv(B=3, H=4, Hkv=2, n=120, d=16, seed=4)
    mask, valid = padding_mask([120, 90, 30], 120, left=left)
    sel = run_select(q, k, CFG, mask)
    assert kept_sets(sel) == brute_force(q, k, CFG, mask)
    assert sel.n_valid.tolist() == [120, 90, 30]
    for b, (p, kept) in enumerate(kept_sets(sel)):
        assert p <= int(valid[b].sum()) and valid[b, kept].all()


def test_ratio_fixes_the_budget_and_tau_one_keeps_everything():
    (q, k, _), _ = planted_qkv(B=1, n=101)
    assert int(run_select(q, k, CFG.replace(ratio=0.3)).budget) == math.ceil(0.3 * 101)
    assert int(run_select(q, k, CFG.replace(tau=1.0)).budget) == 101


def test_recent_tokens_always_kept_and_budget_adapts():
    # concentrated attention (strong sinks) needs fewer tokens than diffuse attention
    (q, k, _), _ = planted_qkv(B=1, n=200, strength=8.0, important=[0, 1, 2])
    sharp = run_select(q, k, CFG)
    (q2, k2, _), _ = planted_qkv(B=1, n=200, strength=0.0)
    diffuse = run_select(q2 * 0.1, k2, CFG)
    assert int(sharp.budget) < int(diffuse.budget) / 2
    assert set(range(196, 200)) <= set(sharp.kept_idx[0, :int(sharp.budget)].tolist())


def test_kept_idx_is_a_permutation_with_the_kept_prefix_ascending():
    (q, k, _), _ = planted_qkv(B=2, n=180)
    sel = run_select(q, k, CFG)
    for b, p in enumerate(sel.budget.tolist()):
        row = sel.kept_idx[b].tolist()
        assert sorted(row) == list(range(180)) and row[:p] == sorted(row[:p])


def test_probe_sampler_properties():
    valid = torch.ones(2, 500, dtype=torch.bool)
    valid[1, :100] = False
    probes, ok = probe_positions(valid, 16, 32, seed=0, salt=0)
    assert probes.shape == (2, 48) and ok.all()
    for b in range(2):
        p = probes[b].tolist()
        assert len(set(p)) == 48 and valid[b, p].all()
        assert set(range(484, 500)) <= set(p)  # recent
    again, _ = probe_positions(valid, 16, 32, seed=0, salt=0)
    other, _ = probe_positions(valid, 16, 32, seed=1, salt=0)
    assert torch.equal(probes, again) and not torch.equal(probes, other)
    few = torch.zeros(1, 40, dtype=torch.bool)
    few[0, 30:] = True  # 10 valid tokens: every one is a probe, the rest is flagged
    p, ok = probe_positions(few, 4, 8, seed=0, salt=0)
    assert sorted(p[ok].tolist()) == list(range(30, 40))
    p0, ok0 = probe_positions(valid, 8, 0, seed=0, salt=0)  # random_probes=0: deterministic
    assert p0[0].tolist() == list(range(492, 500)) and ok0.all()


@pytest.mark.parametrize("chunk", [1 << 27, 24])  # one pass; two rows of 12 per step
def test_mask_kind_classification(chunk, monkeypatch):
    monkeypatch.setattr(masks, "CHUNK_ELEMENTS", chunk)
    n = 12
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    assert masks.mask_kind(causal) == masks.STANDARD
    window = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-4)
    assert masks.mask_kind(window) == masks.CAUSAL
    spans = causal.clone()
    spans[..., 3:7, 3:7] = True  # bidirectional image span
    assert masks.mask_kind(spans) == masks.NONCAUSAL
    late = causal.clone()
    late[..., 10, 11] = True  # looks ahead in the last step only
    assert masks.mask_kind(late) == masks.NONCAUSAL
    additive = torch.zeros(1, 1, n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert masks.mask_kind(additive) == masks.STANDARD
    assert masks.mask_kind(additive + 0.5 * causal) == masks.CAUSAL  # a bias
