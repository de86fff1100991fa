"""ZipVLCache inside transformers' generate(): eager, and compiled with the zipvl backend
(random-weight Qwen2-VL and LLaVA, CPU, fp32)."""
import pytest
import torch
from transformers import DynamicCache

import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile import tiny_models as models

BUILDERS = {"qwen2_vl": models.qwen2_vl, "llava": models.llava}
SMALL = dict(group_size=4, residual_length=4)  # tiny prompts: windows that actually fill
SPARSE = dict(ratio=0.5, recent_probes=4, random_probes=4, keep_recent=2)


def padded_batch():
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    return dict(input_ids=ids, attention_mask=mask)


def kv_rows():
    return [r for r in zipvl_compile.stats() if r.phase == "kv-cache"]


@pytest.mark.parametrize("name", BUILDERS)
@torch.no_grad()
def test_16_bit_cache_generates_what_dynamic_cache_does(name):
    model, inputs = BUILDERS[name]()
    expected = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                              past_key_values=DynamicCache())
    cache = ZipVLCache(high_bits=16, low_bits=16, **SMALL)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(out, expected)
    assert cache.get_seq_length() == out.shape[1] - 1
    assert all(layer.hi.slots > 0 for layer in cache.layers)  # groups really were pooled


@torch.no_grad()
def test_eager_default_cache_on_a_padded_batch_and_sampling():
    model, _ = models.llava()
    cache = ZipVLCache(**SMALL)
    out = model.generate(**padded_batch(), max_new_tokens=6, do_sample=True, top_k=5,
                         past_key_values=cache)
    assert out.shape == (2, 30)
    rows = kv_rows()
    assert len(rows) == model.config.text_config.num_hidden_layers
    assert all("no prefill importance" in r.reason and r.path == "kv 4/2" for r in rows)


@torch.no_grad()
def test_beam_search_is_refused_clearly():
    model, inputs = models.llava()
    with pytest.raises(NotImplementedError, match="ZipVLCache"):
        model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False,
                       past_key_values=ZipVLCache(**SMALL))


@torch.no_grad()
def test_compiled_generate_hands_importance_over_and_fuses_decode():
    """One compiled LLaVA language model shared by the checks (compiles dominate the time)."""
    model, inputs = models.llava()
    layers = model.config.text_config.num_hidden_layers
    zipvl_compile.compile_language_model(model, **SPARSE)
    batch = padded_batch()
    expected = {key: model.generate(**x, max_new_tokens=10, do_sample=False,
                                    past_key_values=DynamicCache())
                for key, x in (("single", inputs), ("padded", batch))}

    # 16/16: the split changes nothing numerically, so tokens equal DynamicCache's
    for key, x in (("single", inputs), ("padded", batch)):
        zipvl_compile.reset_stats()
        cache = ZipVLCache(high_bits=16, low_bits=16, **SMALL)
        out = model.generate(**x, max_new_tokens=10, do_sample=False, past_key_values=cache)
        assert torch.equal(out, expected[key]), key
        decode = [r for r in zipvl_compile.stats() if r.phase == "decode"]
        assert len(decode) == layers and all(r.path == "fused-decode" for r in decode)
        rows = kv_rows()
        assert len(rows) == layers
        assert all(r.reason.startswith("importance of layers.") for r in rows)
        prefill = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
        # the cache kept at high precision what each prefill kept (+ the residual window)
        for p, r in zip(prefill, rows):
            assert all(k <= c <= k + SMALL["residual_length"] for k, c in zip(p.kept, r.kept))

    # 4/0: unimportant prompt tokens are evicted; only the fused kernel can read that cache
    zipvl_compile.reset_stats()
    cache = ZipVLCache(high_bits=4, low_bits=0, **SMALL)
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert out.shape == expected["single"].shape
    layer = cache.layers[0]
    assert layer.evicted and layer.lo is None
    assert all(r.kept[0] < r.valid[0] for r in kv_rows())


@torch.no_grad()
def test_graph_capturable_kernel_hands_importance_over():
    """kernel='flex' (what mode='reduce-overhead' runs) on a padded batch: its selection reaches
    the cache through zipvl::deliver_selection (an op kept out of CUDA graphs), and 16/16 still
    gives DynamicCache's tokens."""
    model, _ = models.llava()
    batch = padded_batch()
    zipvl_compile.compile_language_model(model, kernel="flex", **SPARSE)
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False,
                              past_key_values=DynamicCache())
    zipvl_compile.reset_stats()
    cache = ZipVLCache(high_bits=16, low_bits=16, **SMALL)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(out, expected)
    prefill = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
    assert prefill and all(r.path == "sparse" and r.kernel == "flex" for r in prefill)
    rows = kv_rows()
    assert len(rows) == len(prefill)
    assert all(r.reason.startswith("importance of layers.") for r in rows)
    for p, r in zip(prefill, rows):
        assert all(k <= c <= k + SMALL["residual_length"] for k, c in zip(p.kept, r.kept))
