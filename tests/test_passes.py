"""Site discovery and classification.  The rewritten graphs run eagerly (``inductor=False``), so
these tests need no Inductor compile; ``test_compiled.py`` covers the compiled path."""
import logging
import operator

import pytest
import torch
import torch.nn.functional as F

import zipvl_compile
from conftest import planted_qkv, recording
from toy import ToyDecoder, index_built_mask_sdpa, padding_mask
from zipvl_compile import ZipVLConfig, reference
from zipvl_compile.backend import resolve_kernel

CFG = ZipVLConfig(tau=0.9, recent_probes=8, random_probes=8, keep_recent=4)


def eager_backend(**fields):
    return zipvl_compile.backend(CFG, inductor=False, **fields)


def compile_fn(fn, **fields):
    be = eager_backend(**fields)
    return torch.compile(fn, backend=be, dynamic=False), be


def only_site(be):
    assert len(be.decisions) == 1
    return be.decisions[0]


def test_causal_sdpa_is_rewritten_and_matches_reference():
    (q, k, v), _ = planted_qkv()
    f, be = compile_fn(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    out = f(q, k, v)
    assert only_site(be).sparse
    torch.testing.assert_close(out, reference.zipvl_attention(q, k, v, CFG)[0])


@pytest.mark.parametrize("call,reason", [
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "non-causal attention without"),
    (lambda q, k, v: F.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True),
     "decode step"),
    (lambda q, k, v: F.scaled_dot_product_attention(q[:, :, :50], k, v, is_causal=True,
                                                    enable_gqa=True), "lengths differ"),
    (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1,
                                                    enable_gqa=True), "dropout_p"),
    (lambda q, k, v: F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=torch.ones(q.shape[0], q.shape[1], q.shape[2], q.shape[2],
                             dtype=torch.bool).tril()), "per-head"),
])
def test_unsupported_sites_stay_dense_with_a_reason(call, reason):
    (q, k, v), _ = planted_qkv()
    if "non-causal" in reason:
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.manual_seed(0)
    f, be = compile_fn(call)
    torch.manual_seed(0)
    expected = call(q, k, v)
    torch.manual_seed(0)
    out = f(q, k, v)
    site = only_site(be)
    assert not site.sparse and reason in site.reason
    if "dropout" not in reason:
        assert torch.equal(out, expected)  # the untouched dense path
    rec = [r for r in zipvl_compile.stats() if r.path == "dense" and reason in r.reason]
    assert rec, zipvl_compile.format_stats()


def test_bidirectional_mask_falls_back_to_dense_at_run_time(caplog):
    (q, k, v), _ = planted_qkv(B=1, n=60)
    mask = torch.ones(60, 60, dtype=torch.bool).tril()
    mask[10:30, 10:30] = True  # image span attends both ways (Gemma3 / PaliGemma style)
    f, be = compile_fn(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True))
    zipvl_compile.reset_stats()
    with caplog.at_level(logging.INFO, logger="zipvl_compile"):
        out = f(q, k, v, mask)
        f(q, k, v, mask)
    assert only_site(be).sparse  # decided at run time, not at compile time
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, expected)
    (rec,) = zipvl_compile.stats()
    assert rec.path == "dense" and "non-causal mask at run time" in rec.reason
    assert sum("non-causal mask at run time" in m for m in caplog.messages) == 1  # logged once


def test_graph_capturable_kernel_refuses_masks_with_a_reason():
    (q, k, v), _ = planted_qkv(B=1, n=40)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    f, be = compile_fn(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True), kernel="flex")
    f(q, k, v, mask)
    assert "kernel='sdpa'" in only_site(be).reason


def test_unfused_attention_pattern_is_found_and_rewritten():
    model = ToyDecoder(attention="unfused").eval()
    ids = torch.randint(0, 64, (2, 90))
    mask = torch.zeros(2, 1, 90, 90).masked_fill(
        ~torch.ones(90, 90, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    be = eager_backend()
    out = torch.compile(model, backend=be, dynamic=False)(ids, mask)
    assert [d.pattern for d in be.decisions] == ["unfused", "unfused"]
    assert all(d.sparse for d in be.decisions)

    def ref_attn(q, k, v, m, layer):
        return reference.zipvl_attention(q, k, v, CFG, attn_mask=m, salt=layer)[0]

    ref_model = ToyDecoder(attention=ref_attn).eval()
    ref_model.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, ref_model(ids, mask))


def test_unfused_weights_used_elsewhere_stay_dense():
    def attn_with_weights(q, k, v):
        w = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return w @ v, w.mean()

    (q, k, v), _ = planted_qkv(Hkv=4)
    f, be = compile_fn(attn_with_weights)
    out, _ = f(q, k, v)
    assert "used elsewhere" in only_site(be).reason
    torch.testing.assert_close(out, attn_with_weights(q, k, v)[0])


def test_kernel_choice_follows_the_mode():
    assert resolve_kernel("auto", None) == "sdpa"
    assert resolve_kernel("auto", "reduce-overhead") == "flex"
    assert resolve_kernel("sdpa", "reduce-overhead") == "sdpa"


def test_options_configure_the_named_backend_and_are_validated():
    (q, k, v), _ = planted_qkv(B=1, n=30)
    f = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True), backend="zipvl", options={"tau": 7.0})
    with pytest.raises(Exception, match="tau"):
        f(q, k, v)


def _masked_sdpa(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)


def _causal_variants(n):
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    window = causal & ~torch.ones(n, n, dtype=torch.bool).tril(-24)  # sliding window of 24
    additive = torch.zeros(n, n).masked_fill(~causal, torch.finfo(torch.float32).min)
    alibi = additive - 0.05 * (torch.arange(n)[:, None] - torch.arange(n)[None, :]).clamp(min=0)
    return {"sliding window": window, "additive": additive, "bias": alibi}


@pytest.mark.parametrize("variant", ["sliding window", "additive", "bias"])
@pytest.mark.parametrize("sparse_queries", [True, False])
def test_masks_beyond_causal_padding_are_applied_exactly(variant, sparse_queries):
    (q, k, v), _ = planted_qkv(B=2, n=100)
    mask = _causal_variants(100)[variant][None, None]
    f, be = compile_fn(_masked_sdpa, sparse_queries=sparse_queries)
    out = f(q, k, v, mask)
    assert only_site(be).sparse
    cfg = CFG.replace(sparse_queries=sparse_queries)
    expected, sels = reference.zipvl_attention(q, k, v, cfg, attn_mask=mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    (rec,) = zipvl_compile.stats()
    assert rec.path == "sparse" and rec.kept == [s.budget for s in sels]


def test_graph_capturable_kernel_fallbacks_have_reasons():
    (q, k, v), _ = planted_qkv(B=2, n=40)
    causal = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=True, enable_gqa=True)
    f, be = compile_fn(causal, kernel="flex", sparse_queries=False)
    torch.testing.assert_close(f(q, k, v), causal(q, k, v))
    assert "sparse_queries=False needs kernel='sdpa'" in only_site(be).reason


def test_mask_that_does_not_cover_the_sequence_stays_dense():
    (q, k, v), _ = planted_qkv(B=1, n=40)
    key_mask = torch.ones(1, 40, dtype=torch.bool)  # keys only, broadcast over queries
    f, be = compile_fn(_masked_sdpa)
    torch.testing.assert_close(f(q, k, v, key_mask), _masked_sdpa(q, k, v, key_mask))
    assert "does not cover" in only_site(be).reason


def test_a_mask_shared_by_every_layer_is_realized_and_summarized_once_per_graph():
    from zipvl_compile.runtime.prefill import mask_summary_for

    zipvl = eager_backend()
    spy, graphs = recording(zipvl)

    torch.manual_seed(0)
    model = ToyDecoder(layers=3).eval()
    mask, _ = padding_mask([40, 25], 40)
    ids = torch.randint(0, 64, (2, 40))
    f = torch.compile(model, backend=spy, dynamic=False)
    with torch.no_grad():
        f(ids, mask)
    (gm,) = graphs
    summaries = [n for n in gm.graph.nodes if n.target is mask_summary_for]
    assert sum(d.sparse for d in zipvl.decisions) == 3 and len(summaries) == 1
    # the model's mask feeds one copy, which every rewritten layer reads (Inductor would
    # otherwise materialize an index-built mask once per consuming opaque op)
    (realized,) = [n for n in gm.graph.nodes if n.target is torch.ops.zipvl.realize_mask.default]
    assert [u.target for u in realized.args[0].users] == [torch.ops.zipvl.realize_mask.default]
    assert summaries[0].args[0] is realized
    assert sum(u.target is not mask_summary_for for u in realized.users) == 3


def test_the_graph_kernel_takes_an_index_built_causal_padding_mask():
    """kernel='flex' (graph-capturable) handles key padding once the mask is recognized: each
    sequence's budget covers only its valid tokens; a realized mask still stays dense there."""
    (q, k, v), _ = planted_qkv(B=2, n=60)
    mask, valid = padding_mask([60, 41], 60)
    f, be = compile_fn(index_built_mask_sdpa, kernel="flex")
    out = f(q, k, v, valid)
    assert only_site(be).sparse
    ref, _ = reference.zipvl_attention(q, k, v, CFG, attn_mask=mask)
    rows = valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[rows], ref[rows], rtol=1e-5, atol=1e-5)
    assert zipvl_compile.stats()[-1].valid == [60, 41]
    g, be = compile_fn(_masked_sdpa, kernel="flex")
    g(q, k, v, mask)
    assert "masked attention needs kernel='sdpa'" in only_site(be).reason


@pytest.mark.parametrize("q_offset,wider", [(0, 0), (1, 0), (0, 5)])
def test_an_index_built_causal_padding_mask_is_never_materialized(q_offset, wider):
    """Causal & key padding built from index vectors is recognized in the graph: the sites read
    the padding and the [B, 1, n, n] mask is dead code; also from a padding ``wider`` than the
    prompt (the expression reads its first n columns).  Shifted query positions (a mask that
    looks one token ahead) are not matched: that mask is realized, checked at run time and
    stays dense, exactly."""
    from zipvl_compile.runtime.prefill import key_padding_summary

    (q, k, v), _ = planted_qkv(B=2, n=60)
    _, valid = padding_mask([60, 41], 60)
    zipvl = eager_backend()
    spy, graphs = recording(zipvl)

    f = torch.compile(lambda q, k, v, pad: index_built_mask_sdpa(q, k, v, pad, q_offset),
                      backend=spy, dynamic=False)
    out = f(q, k, v, torch.cat([valid, torch.zeros(2, wider, dtype=torch.bool)], 1))
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes]
    realized = torch.ops.zipvl.realize_mask.default in targets
    if q_offset == 0:
        assert key_padding_summary in targets and not realized
        assert not any(n.target is operator.le for n in gm.graph.nodes)  # the mask is gone
        mask, _ = padding_mask([60, 41], 60)
        ref, _ = reference.zipvl_attention(q, k, v, CFG, attn_mask=mask)
        rows = valid[:, None, :, None].expand_as(ref)
        torch.testing.assert_close(out[rows], ref[rows], rtol=1e-5, atol=1e-5)
        assert only_site(zipvl).sparse
    else:
        assert realized and key_padding_summary not in targets
        torch.testing.assert_close(out, index_built_mask_sdpa(q, k, v, valid, q_offset))
        row = zipvl_compile.stats()[-1]  # the site's run-time record
        assert row.site == only_site(zipvl).name
        assert row.path == "dense" and "non-causal" in row.reason


def test_a_short_prompt_under_an_index_built_mask_gets_the_exact_mask_back():
    """Below ``min_tokens`` the site runs dense SDPA: with the index-built mask replaced by its
    padding, the dense call rebuilds causal & valid keys and matches the model's own call."""
    (q, k, v), _ = planted_qkv(B=2, n=60)
    _, valid = padding_mask([60, 41], 60)
    f, be = compile_fn(index_built_mask_sdpa, min_tokens=100)
    out = f(q, k, v, valid)
    ref = index_built_mask_sdpa(q, k, v, valid)
    rows = valid[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[rows], ref[rows])
    assert only_site(be).sparse  # rewritten; the dense fallback is decided in the traced call
    assert "shorter than min_tokens" in zipvl_compile.stats()[-1].reason


def test_attention_feeding_attention_directly_is_rewritten_in_order():
    """The second site's query is the first site's output: after the first rewrite it must read
    the node that replaced it (an FX graph with a use before its definition fails to run)."""
    (q, k, v), _ = planted_qkv(B=2, H=4, Hkv=4, n=120)

    def two_layers(q, k, v):
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(o, k, v, is_causal=True)

    f, be = compile_fn(two_layers)
    with torch.no_grad():
        out = f(q, k, v)
    assert [d.sparse for d in be.decisions] == [True, True]
    ref = reference.zipvl_attention(q, k, v, CFG, salt=0)[0]
    torch.testing.assert_close(out, reference.zipvl_attention(ref, k, v, CFG, salt=1)[0],
                               rtol=1e-4, atol=1e-4)


def _cache_reader(args, **sdpa):
    def read(q):
        k, v = torch.ops.zipvl.cache_kv(*args)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa)
    return read


def test_decode_over_the_cache_is_fused_or_reports_why_not():
    from test_kv_cache import filled_cache
    from zipvl_compile.runtime import decode_attention as da

    cache, k, _, _ = filled_cache(ZipVLConfig(group_size=16, residual_length=8))
    args = cache.layers[0].kernel_args()
    q = torch.randn(2, 4, 1, 16)
    f, be = compile_fn(_cache_reader(args))
    out = f(q)
    (site,) = be.decisions
    assert site.sparse and site.phase == "decode"
    assert [r.path for r in zipvl_compile.stats() if r.phase == "decode"] == ["fused-decode"]
    torch.testing.assert_close(out, da.reference(q, da.segments(*args), None, 16 ** -0.5))

    L = k.shape[2]
    for sdpa, reason in ((dict(attn_mask=torch.ones(2, 4, 1, L, dtype=torch.bool)),
                          "per-head or per-query attention mask"),
                         (dict(is_causal=True), "is_causal=True with one query")):
        torch._dynamo.reset()
        zipvl_compile.reset_stats()
        f, be = compile_fn(_cache_reader(args, **sdpa))
        torch.testing.assert_close(f(q), _cache_reader(args, **sdpa)(q))
        (site,) = be.decisions
        assert not site.sparse and reason in site.reason
        (rec,) = [r for r in zipvl_compile.stats() if r.phase == "decode"]
        assert rec.path == "dense" and reason in rec.reason and "ZipVLCache" in rec.reason


def test_rewriting_keeps_in_place_writes_whose_result_is_unused():
    """A KV cache's ``buf.index_copy_(...)`` is a call_method whose result nothing reads: the
    dead-code elimination after a rewrite must keep it (FX alone considers it pure)."""
    (q, k, v), _ = planted_qkv()
    cache = torch.zeros(4)

    def step(q, k, v, cache):
        cache.index_copy_(0, torch.tensor([1]), k[0, 0, :1, 0])
        cache.add_(1.0)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    f, be = compile_fn(step)
    f(q, k, v, cache)
    assert only_site(be).sparse
    assert cache.tolist() == [1.0, 1.0 + k[0, 0, 0, 0].item(), 1.0, 1.0]


def test_site_names_when_the_compiled_forward_is_a_star_args_wrapper():
    """transformers >= 5.24 wraps model forwards in ``def wrapper(*args, **kwargs)``
    (``deprecate_kwarg``); Dynamo then roots module paths at ``args[0]``, not ``self``.  Site
    names stay the module paths (what stats() and the cache hand-over report)."""
    import functools

    def star_args(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs)
        return wrapper

    class Wrapped(ToyDecoder):
        @star_args
        def forward(self, ids, mask=None):
            return super().forward(ids, mask)

    model = Wrapped(layers=2).eval()
    be = eager_backend()
    torch.compile(model, backend=be, dynamic=False)(torch.randint(0, 64, (1, 48)))
    assert sorted(d.name for d in be.decisions) == ["layers.0", "layers.1"]
