"""ZipVLCache: split, storage, memory accounting and decode attention (CPU)."""
import pytest
import torch
import torch.nn.functional as F

import zipvl_compile
from zipvl_compile import ZipVLCache, ZipVLConfig
from zipvl_compile.runtime import decode_attention as da
from zipvl_compile.runtime import kv_pool

BITS = [(16, 16), (8, 8), (8, 4), (4, 4), (4, 2), (4, 0), (2, 2), (16, 0)]


def kept_selection(n, budgets, gen):
    """kept_idx [B, n] in the Selection layout (kept ascending, then the rest) and budgets."""
    rows = []
    for b in budgets:
        perm = torch.randperm(n, generator=gen)
        kept, rest = perm[:b].sort().values, perm[b:].sort().values
        rows.append(torch.cat([kept, rest]))
    return torch.stack(rows), torch.tensor(budgets)


def filled_cache(config, *, B=2, Hkv=2, n=150, d=16, budgets=(75, 40), decode=3, seed=0,
                 dtype=torch.float32, outlier=True, handoff=True):
    """A one-layer ZipVLCache holding an n-token prompt split by a random selection, then
    ``decode`` decoded tokens.  Returns (cache, all K [B, Hkv, n + decode, d], all V, kept
    mask [B, n + decode] of the positions the cache keeps)."""
    gen = torch.Generator().manual_seed(seed)
    L = n + decode
    k = torch.randn(B, Hkv, L, d, generator=gen)
    v = torch.randn(B, Hkv, L, d, generator=gen)
    if outlier:
        k[..., 3] = k[..., 3] * 15 + 10  # an outlier channel, as real keys have
    k, v = k.to(dtype), v.to(dtype)
    cache = ZipVLCache(config)
    cache.update(k[:, :, :n], v[:, :, :n], 0)
    kept_idx, budget = kept_selection(n, list(budgets)[:B], gen)
    if handoff:
        plan = cache.plan(0, k[:, :, :n], kept_idx, budget)
        cache.adopt(0, k[:, :, :n], v[:, :, :n], plan, plan.counts.tolist(), "layers.0.self_attn")
    for t in range(decode):  # append: update() would also dequantize (refused when evicting)
        cache.layers[0].append(k[:, :, n + t:n + t + 1], v[:, :, n + t:n + t + 1])
    kept = torch.ones(B, L, dtype=torch.bool)
    if handoff and config.low_bits == 0:
        m = n - min(n, config.residual_length)
        kept[:, :m] = False
        for b in range(B):
            idx = kept_idx[b, :budget[b]]
            kept[b, idx[idx < m]] = True
    return cache, k, v, kept


def dense(q, k, v, allowed, scale):
    """Exact attention of q [B, H, 1, d] over k, v [B, Hkv, L, d] where allowed [B, L]."""
    H, Hkv = q.shape[1], k.shape[1]
    mask = allowed[:, None, None, :]
    g = H // Hkv
    return F.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1),
        attn_mask=mask, scale=scale)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def padding(B, L, pad):
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
    mask[-1, ..., :pad] = False
    return mask


CFG = dict(group_size=16, residual_length=8)


@pytest.mark.parametrize("hb,lb", BITS)
def test_chunked_kernel_matches_the_reference(hb, lb):
    cache, k, v, _ = filled_cache(ZipVLConfig(high_bits=hb, low_bits=lb, **CFG), seed=hb + lb)
    args = cache.layers[0].kernel_args()
    q = torch.randn(2, 6, 1, 16)  # GQA: 3 query heads per KV head
    mask = padding(2, k.shape[2], 7)
    segs = da.segments(*args)
    ref = da.reference(q, segs, mask, 0.25)
    assert (da.chunked(q, segs, mask, 0.25, chunk=32) - ref).abs().max() < 1e-5
    fused = torch.ops.zipvl.decode_attention(q, mask, 0.25, *args)
    assert (fused - ref).abs().max() < 1e-5


@pytest.mark.parametrize("lb", [16, 0])
def test_reference_at_16_bits_is_exact_attention_over_the_kept_tokens(lb):
    cache, k, v, kept = filled_cache(ZipVLConfig(high_bits=16, low_bits=lb, **CFG))
    q = torch.randn(2, 4, 1, 16)
    mask = padding(2, k.shape[2], 5)
    out = da.reference(q, da.segments(*cache.layers[0].kernel_args()), mask, 0.3)
    expected = dense(q, k, v, kept & mask[:, 0, 0], 0.3)
    assert (out - expected).abs().max() < 1e-5
    assert (lb == 0) == (not kept.all())  # eviction really dropped tokens


# Relative error of decode attention vs exact attention over the same (kept) tokens, on
# Gaussian K/V (no sparsity: the worst case for the low-bit half) with an outlier key channel,
# seeds 7-11 measured 2026-11-22 (CPU, fp32): max 16/16 0, 8/8 0.0061, 8/4 0.081, 4/4 0.104,
# 4/2 0.490, 4/0 0.141, 2/2 0.592.  Bounds: 1.25x the max.
ERROR_BOUNDS = {(16, 16): 1e-6, (8, 8): 0.0077, (8, 4): 0.102, (4, 4): 0.13, (4, 2): 0.61,
                (4, 0): 0.18, (2, 2): 0.74, (16, 0): 1e-6}


@pytest.mark.parametrize("seed", [7, 9])
@pytest.mark.parametrize("hb,lb", BITS)
def test_quantization_error_is_bounded(hb, lb, seed):
    cache, k, v, kept = filled_cache(ZipVLConfig(high_bits=hb, low_bits=lb, **CFG), n=300,
                                     budgets=(150, 150), seed=seed)
    torch.manual_seed(seed)
    q = torch.randn(2, 4, 1, 16)
    out = torch.ops.zipvl.decode_attention(q, None, 0.25, *cache.layers[0].kernel_args())
    assert rel(out, dense(q, k, v, kept, 0.25)) < ERROR_BOUNDS[(hb, lb)]


def test_position_ordered_kv_at_16_bits_reproduces_the_inputs():
    cache, k, v, _ = filled_cache(ZipVLConfig(high_bits=16, low_bits=16, **CFG), decode=20)
    keys, values = torch.ops.zipvl.cache_kv(*cache.layers[0].kernel_args())
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert cache.get_seq_length() == k.shape[2]
    # 20 decoded tokens passed the residual window (8) + group (16): one group was quantized
    assert cache.layers[0].res_k.shape[2] < 8 + 16


def test_position_ordered_kv_refuses_evicted_tokens():
    cache, *_ = filled_cache(ZipVLConfig(high_bits=4, low_bits=0, **CFG))
    with pytest.raises(RuntimeError, match="evicted"):
        torch.ops.zipvl.cache_kv(*cache.layers[0].kernel_args())


def test_without_handoff_every_prompt_token_is_high_bit_and_reported():
    cache, k, v, _ = filled_cache(ZipVLConfig(**CFG), handoff=False)
    layer = cache.layers[0]
    assert layer.lo is None and not layer.evicted
    assert int((layer.hi.pos >= 0).sum()) == 2 * (150 - 8)
    row = [r for r in zipvl_compile.stats() if r.phase == "kv-cache"]
    assert len(row) == 1 and "no prefill importance" in row[0].reason


def test_split_follows_the_handed_over_selection():
    cache, k, v, kept = filled_cache(ZipVLConfig(high_bits=4, low_bits=2, **CFG),
                                     budgets=(75, 40), decode=1)
    layer = cache.layers[0]
    hi = [set(layer.hi.pos[b][layer.hi.pos[b] >= 0].tolist()) for b in range(2)]
    lo = [set(layer.lo.pos[b][layer.lo.pos[b] >= 0].tolist()) for b in range(2)]
    m = 150 - 8
    for b in range(2):
        assert hi[b].isdisjoint(lo[b]) and hi[b] | lo[b] == set(range(m))
    assert layer.hi.slots % 16 == 0 and layer.lo.slots % 16 == 0
    row = [r for r in zipvl_compile.stats() if r.phase == "kv-cache"][0]
    assert row.kept == [len(hi[0]) + 8, len(hi[1]) + 8] and row.valid == [150, 150]
    assert "importance of layers.0.self_attn" in row.reason


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _owned_bytes(cache):
    layer = cache.layers[0]
    tensors = [layer.res_k, layer.res_v]
    for pool in (layer.hi, layer.lo):
        if pool is not None:
            tensors += [t for t in pool.tensors() if t is not None]
    return _storage_bytes(tensors)


@pytest.mark.parametrize("lb,bound", [(2, 0.22), (0, 0.15)])
def test_memory_at_defaults_with_half_the_tokens_important(lb, bound):
    """Qwen2-7B's KV shape (4 KV heads, head dim 128), a 16K-token prompt, bf16.  The fixed
    residual window (128 tokens unquantized) weighs more on shorter prompts."""
    n = 16384
    cache, *_ = filled_cache(ZipVLConfig(low_bits=lb), B=1, Hkv=4, n=n, d=128,
                             budgets=(n // 2,), decode=1, dtype=torch.bfloat16, outlier=False)
    assert cache.memory_bytes() == _owned_bytes(cache)
    assert cache.dense_bytes() == 1 * 4 * (n + 1) * 128 * 2 * 2  # B Hkv L d (K, V) bf16
    assert cache.memory_bytes() / cache.dense_bytes() <= bound


def test_group_size_must_fit_the_head_dim():
    cache = ZipVLCache(group_size=12)
    with pytest.raises(ValueError, match="group_size"):
        cache.update(torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), 0)


def test_beam_search_is_refused():
    cache, *_ = filled_cache(ZipVLConfig(**CFG))
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))


def test_slot_layout_pads_groups_with_members_of_the_same_sequence():
    member = torch.tensor([[True, False, True, True, False], [False, False, False, False, True]])
    gather, pos = kv_pool.slot_positions(member, [3, 1], 4)
    assert pos.tolist() == [[0, 2, 3, -1], [4, -1, -1, -1]]
    assert gather.tolist() == [[0, 2, 3, 3], [4, 4, 4, 4]]


def test_a_slower_decode_kernel_is_recorded_on_its_site_once(caplog):
    """What ``zipvl::decode_attention`` does when the Triton kernels cannot take its inputs on
    CUDA: the site's stats record names the kernel it ran and why, logged once."""
    from zipvl_compile.runtime import stats

    uid = stats.register(stats.SiteRecord(site="layers.0.self_attn", phase="decode",
                                          path="fused-decode", kernel="zipvl::decode_attention"))
    with caplog.at_level("WARNING", logger="zipvl_compile"):
        for _ in range(3):
            stats.note_slow_kernel(uid, "chunked PyTorch", "no Triton kernel: head dim 8")
    rec = [r for r in zipvl_compile.stats() if r.site == "layers.0.self_attn"][-1]
    assert (rec.path, rec.kernel, rec.reason) == ("fused-decode", "chunked PyTorch",
                                                  "no Triton kernel: head dim 8")
    assert sum("chunked PyTorch" in m for m in caplog.messages) == 1


def test_the_prompt_copy_is_held_only_until_a_selection_or_the_first_decode_step():
    """``mark_prompt`` hands the cache an unquantized copy of the prompt; a hand-over replaces
    it by the pools at once (a prefill never holds every layer's prompt in full precision),
    and without one the first decode step splits it uniformly."""
    n, d = 96, 16
    k, v = torch.randn(2, 2, n + 1, d), torch.randn(2, 2, n + 1, d)
    prompt_bytes = 2 * k[:, :, :n].numel() * 4
    for handoff in (True, False):
        cache = ZipVLCache(ZipVLConfig(**CFG))
        cache.update(k[:, :, :n], v[:, :, :n], 0)
        assert cache.memory_bytes() == prompt_bytes and cache.get_seq_length() == n
        if handoff:
            kept_idx, budget = kept_selection(n, [40, 20], torch.Generator().manual_seed(0))
            plan = cache.plan(0, k[:, :, :n], kept_idx, budget)
            cache.adopt(0, k[:, :, :n], v[:, :, :n], plan, plan.counts.tolist(), "layers.0")
            assert not cache.prompts
            assert cache.memory_bytes() == _storage_bytes(cache.adopted[0].tensors())
        cache.update(k[:, :, n:], v[:, :, n:], 0)
        assert not cache.prompts and cache.memory_bytes() == _owned_bytes(cache)
        assert cache.get_seq_length() == n + 1


@torch.no_grad()
def test_a_compiled_prefill_leaves_only_the_quantized_pools():
    """Right after a zipvl prefill (before any decode step) the cache holds the layers' splits
    and no full-precision copy of their prompts: less than a 16-bit cache of the same tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().bfloat16()
    zipvl_compile.compile_language_model(model, inductor=False, ratio=0.5, recent_probes=8,
                                         random_probes=8, keep_recent=4)
    try:
        cache = ZipVLCache(group_size=32, residual_length=32)
        model(input_ids=torch.randint(0, 128, (1, 512)),
              **zipvl_compile.helpers.cache_kwarg(model, cache))
        assert sorted(cache.adopted) == [0, 1] and not cache.prompts
        held = _storage_bytes(t for s in cache.adopted.values() for t in s.tensors())
        assert cache.memory_bytes() == held < 0.5 * cache.dense_bytes()
    finally:
        zipvl_compile.uncompile_language_model(model)


def test_a_layer_whose_prompt_never_reached_the_cache_refuses_to_decode():
    """Neither a hand-over nor a prompt copy (mark_prompt did not run at run time): the first
    decode step raises instead of splitting nothing."""
    cache = ZipVLCache(ZipVLConfig(**CFG))
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    cache.update(k, v, 0)
    cache.prompts.clear()
    with pytest.raises(RuntimeError, match="neither a prefill selection nor the prompt"):
        cache.update(k[:, :, :1], v[:, :, :1], 0)


def test_a_graph_capturable_hand_over_builds_the_pools_one_layer_later():
    """``zipvl::deliver_selection`` (the flex kernel's hand-over) reads nothing on the host but
    for the cache's last layer: a layer's pools are built at the next layer's delivery, or when
    the cache (or ``stats()``) is next read, from the prompt copy the cache holds, equal to the
    pools an immediate hand-over builds.  The last layer's are built at once."""
    from zipvl_compile.runtime import stats

    n, d, layers = 96, 16, 3
    gen = torch.Generator().manual_seed(0)
    kv = [(torch.randn(2, 2, n, d, generator=gen), torch.randn(2, 2, n, d, generator=gen))
          for _ in range(layers)]
    picks = [kept_selection(n, budgets, gen) for budgets in ([40, 20], [10, 70], [30, 30])]
    site = stats.register(stats.SiteRecord(site="layers.0.self_attn", phase="prefill",
                                           path="sparse"))

    def prefill(delivered):
        cache, direct = ZipVLCache(ZipVLConfig(**CFG)), ZipVLCache(ZipVLConfig(**CFG))
        for layer, (k, v) in enumerate(kv):
            for c in (cache, direct):
                c.update(k, v, layer)
        for layer in delivered:
            (k, v), (kept_idx, budget) = kv[layer], picks[layer]
            out = torch.ops.zipvl.deliver_selection(budget, kept_idx, site, cache.token,
                                                    layer, k, v)
            assert torch.equal(out, budget)
            assert (layer in cache.prompts) == (layer < layers - 1)   # the copy, until built
            plan = direct.plan(layer, k, kept_idx, budget)
            direct.adopt(layer, k, v, plan, plan.counts.tolist(), "layers.0.self_attn")
            yield cache, direct

    def same_pools(cache, direct, delivered):
        for layer in delivered:
            got, want = cache.adopted[layer], direct.adopted[layer]
            assert (got.hi_counts, got.lo_counts) == (want.hi_counts, want.lo_counts)
            for a, b in zip(got.tensors(), want.tensors()):
                assert torch.equal(a, b)
        assert cache.memory_bytes() == direct.memory_bytes()

    # every layer delivers: each is built at the next one's delivery, the last at once
    for step, (cache, direct) in enumerate(prefill([0, 1, 2])):
        assert sorted(cache.adopted) == ([0, 1, 2] if step == 2 else list(range(step)))
    same_pools(cache, direct, [0, 1, 2])
    # the last layer delivers nothing (dense): the pending one is built when stats are read
    for step, (cache, direct) in enumerate(prefill([0, 1])):
        assert sorted(cache.adopted) == list(range(step))
    zipvl_compile.stats()
    assert sorted(cache.adopted) == [0, 1] and list(cache.prompts) == [2]
    same_pools(cache, direct, [0, 1])
