"""ZipVLCache(max_cache_len=...): fixed-shape decode storage for CUDA graphs (CPU)."""
import pytest
import torch

import zipvl_compile
from zipvl_compile import ZipVLCache, ZipVLConfig
from zipvl_compile.runtime import decode_attention as da

from test_kv_cache import BITS, CFG, ERROR_BOUNDS, dense, kept_selection, rel


def static_cache(config, *, n=150, decode=60, capacity=None, B=2, Hkv=2, d=16, seed=0,
                 budgets=(75, 40)):
    """A one-layer cache with ``max_cache_len = n + capacity`` (default: n + decode) holding an
    n-token prompt split by a random selection, then ``decode`` tokens appended one by one.
    Returns (cache, K, V [B, Hkv, n + decode, d], kept [B, n + decode], shapes and addresses of
    the static tensors after every step)."""
    gen = torch.Generator().manual_seed(seed)
    L = n + decode
    k = torch.randn(B, Hkv, L, d, generator=gen)
    v = torch.randn(B, Hkv, L, d, generator=gen)
    k[..., 3] = k[..., 3] * 15 + 10  # an outlier channel
    cache = ZipVLCache(config, max_cache_len=n + (decode if capacity is None else capacity))
    cache.update(k[:, :, :n], v[:, :, :n], 0)
    kept_idx, budget = kept_selection(n, list(budgets)[:B], gen)
    plan = cache.plan(0, k[:, :, :n], kept_idx, budget)
    cache.adopt(0, k[:, :, :n], v[:, :, :n], plan, plan.counts.tolist(), "layers.0.self_attn")
    layouts = []
    for t in range(decode):
        cache.layers[0].append(k[:, :, n + t:n + t + 1], v[:, :, n + t:n + t + 1])
        layouts.append([(x.shape, x.data_ptr()) for x in cache.layers[0].static.tensors()])
    kept = torch.ones(B, L, dtype=torch.bool)
    if config.low_bits == 0:
        m = n - min(n, config.residual_length)
        kept[:, :m] = False
        for b in range(B):
            idx = kept_idx[b, :budget[b]]
            kept[b, idx[idx < m]] = True
    return cache, k, v, kept, layouts


@pytest.mark.parametrize("hb,lb", [(16, 16), (4, 2), (4, 0)])
def test_every_kept_position_is_stored_once_in_buffers_that_never_move(hb, lb):
    config = ZipVLConfig(high_bits=hb, low_bits=lb, **CFG)
    cache, k, v, kept, layouts = static_cache(config)
    assert all(layout == layouts[0] for layout in layouts)  # same shapes and addresses
    st = cache.layers[0].static
    L = k.shape[2]
    assert int(st.length) == L and cache.get_seq_length() == L
    assert cache.get_mask_sizes(1, 0) == (L, 0)  # max_cache_len: prompt + 60
    pools = [st.hi.pos, st.ring_pos] + ([st.lo.pos] if st.lo is not None else [])
    for b in range(2):
        stored = torch.cat([p[b] for p in pools])
        stored = stored[stored >= 0].sort().values
        assert torch.equal(stored, kept[b].nonzero().flatten().to(stored.dtype))
        # the most recent residual_length tokens are unquantized, in the ring
        assert set(range(L - CFG["residual_length"], L)) <= set(st.ring_pos[b].tolist())
    assert int(st.next_slot) > cache.layers[0].static.hi.slots - 60 - 2 * 16  # groups flushed
    assert not cache.capacity_exceeded()
    if hb == lb == 16:
        keys, values = torch.ops.zipvl.cache_kv(*cache.layers[0].kernel_args())
        assert torch.equal(keys, k) and torch.equal(values, v)


@pytest.mark.parametrize("hb,lb", BITS)
def test_decode_attention_over_static_storage_is_as_accurate_as_growing(hb, lb):
    config = ZipVLConfig(high_bits=hb, low_bits=lb, **CFG)
    cache, k, v, kept, _ = static_cache(config, n=300, decode=40, budgets=(150, 150), seed=7)
    args = cache.layers[0].kernel_args()
    torch.manual_seed(7)
    q = torch.randn(2, 4, 1, 16)
    mask = torch.ones(2, 1, 1, k.shape[2], dtype=torch.bool)
    mask[-1, ..., :9] = False  # padding of the second sequence
    out = torch.ops.zipvl.decode_attention(q, mask, 0.25, *args)
    assert (out - da.reference(q, da.segments(*args), mask, 0.25)).abs().max() < 1e-5
    assert rel(out, dense(q, k, v, kept & mask[:, 0, 0], 0.25)) < ERROR_BOUNDS[(hb, lb)]


def test_decoding_past_max_cache_len_is_flagged(caplog):
    config = ZipVLConfig(**CFG)
    cache, *_ = static_cache(config, decode=60, capacity=10)
    with caplog.at_level("ERROR", logger="zipvl_compile"):
        assert cache.capacity_exceeded()
    assert "max_cache_len" in caplog.text


def test_max_cache_len_is_validated():
    for bad in (0, 1, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_cache_len must be"):
            ZipVLCache(max_cache_len=bad)
    cache = ZipVLCache(max_cache_len=10)
    with pytest.raises(ValueError, match="max_cache_len=10 leaves no room"):
        cache.update(torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16), 0)
    assert ZipVLCache().is_compileable is False


@torch.no_grad()
def test_compiled_generate_with_static_storage_compiles_three_graphs_and_matches_dense():
    """16/16 keeps every token exactly: generate() over the static cache through the backend
    (fused decode over the ring and pools) gives DynamicCache's tokens, and a second generate
    of another length compiles nothing new (prefill, the step that makes the storage static,
    the steady step)."""
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    from zipvl_compile import tiny_models

    model, inputs = tiny_models.llava()
    expected = model.generate(**inputs, past_key_values=DynamicCache(), max_new_tokens=24,
                              do_sample=False)
    backend = zipvl_compile.compile_language_model(model, inductor=False, ratio=1.0)
    assert model.generation_config.disable_compile is True
    kw = dict(high_bits=16, low_bits=16, group_size=8, residual_length=4)
    graphs = [counters["stats"]["unique_graphs"]]
    for steps in (12, 24):
        cache = ZipVLCache(max_cache_len=inputs["input_ids"].shape[1] + 24, **kw)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=steps,
                             do_sample=False)
        assert torch.equal(out, expected[:, :out.shape[1]])
        assert all(layer.static is not None for layer in cache.layers)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] - graphs[0] == 3 and graphs[2] == graphs[1]
    fused = [d for d in backend.decisions if d.phase == "decode"]
    assert fused and all(d.sparse for d in fused)
    zipvl_compile.uncompile_language_model(model)
    assert model.generation_config.disable_compile is None


@torch.no_grad()
def test_prompts_of_several_lengths_recompile_each_phase_at_most_once():
    """Prefill, the step that builds the static storage and the steady step compile for the
    first prompt, once more (dynamic) for a second length, and never again."""
    from torch._dynamo.utils import counters

    from zipvl_compile import tiny_models

    model, inputs = tiny_models.llava()
    zipvl_compile.compile_language_model(model, inductor=False, recent_probes=4,
                                         random_probes=4, keep_recent=2)
    new = []
    for extra in (0, 5, 11, 17):
        ids = torch.cat([inputs["input_ids"], torch.arange(30, 30 + extra)[None]], 1)
        before = counters["stats"]["unique_graphs"]
        cache = ZipVLCache(max_cache_len=ids.shape[1] + 20, group_size=8, residual_length=4)
        model.generate(**dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids)),
                       past_key_values=cache, max_new_tokens=20, do_sample=False)
        assert int(cache.layers[0].static.length) == ids.shape[1] + 19
        new.append(counters["stats"]["unique_graphs"] - before)
    assert new == [3, 3, 0, 0]


def test_a_missing_static_installation_is_an_error_not_an_empty_cache():
    cache, *_ = static_cache(ZipVLConfig(**CFG), decode=2)
    layer = cache.layers[0]
    layer.static = None  # as if zipvl::make_static had been skipped
    with pytest.raises(RuntimeError, match="never installed"):
        cache.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), 0)


def test_buffers_installed_directly_are_past_the_prompt():
    """A cache whose fixed buffers are installed directly (``install_static``: how the
    end-to-end benchmark builds a 128K cache without running a prefill) takes the next token as
    a decode step: 16/16 then holds exactly the K/V it was given."""
    from zipvl_compile.cache import ZipVLLayer
    from zipvl_compile.runtime import kv_split

    config = ZipVLConfig(high_bits=16, low_bits=16, **CFG)
    gen = torch.Generator().manual_seed(3)
    B, Hkv, n, d = 2, 2, 70, 16
    k = torch.randn(B, Hkv, n + 1, d, generator=gen)
    v = torch.randn(B, Hkv, n + 1, d, generator=gen)
    cache = ZipVLCache(config, max_cache_len=n + 8)
    kept_idx, budget = kept_selection(n, [35, 20], gen)
    plan = kv_split.plan(n, kept_idx, budget, config.residual_length)
    split = kv_split.split_by_importance(k[:, :, :n], v[:, :, :n], plan, plan.counts.tolist(),
                                         high_bits=16, low_bits=16, group_size=config.group_size,
                                         vgroup=min(config.group_size, d))
    layer = ZipVLLayer(cache, 0)
    layer.lazy_initialization(k, v)
    cache.layers.append(layer)
    cache.install_static(0, split.hi, split.lo, split.res_k, split.res_v, n, split.evicted)
    keys, values = cache.update(k[:, :, n:], v[:, :, n:], 0)
    assert keys.shape[-2] >= n + 1 and int(layer.static.length[0]) == n + 1
    assert torch.equal(keys[:, :, :n + 1], k) and torch.equal(values[:, :, :n + 1], v)
