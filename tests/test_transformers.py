"""Real transformers VLM architectures (random weights, CPU, fp32) through the zipvl backend."""
import pytest
import torch

from zipvl_compile import tiny_models as models
import zipvl_compile
from conftest import recording

BUILDERS = {"qwen2_vl": models.qwen2_vl, "llava": models.llava}
SPARSE = dict(ratio=0.5, recent_probes=4, random_probes=4, keep_recent=2)


@pytest.mark.parametrize("name", BUILDERS)
@torch.no_grad()
def test_generate_at_tau_one_equals_eager(name):
    model, inputs = BUILDERS[name]()
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    be = zipvl_compile.compile_language_model(model, tau=1.0)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, expected)
    layers = model.config.text_config.num_hidden_layers
    prefill = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
    decode = [r for r in zipvl_compile.stats() if r.phase == "decode"]
    assert len(prefill) == layers and all(r.path == "sparse" and r.kept_ratio == 1 for r in prefill)
    assert len(decode) == layers and all("decode step" in r.reason for r in decode)
    assert sum(d.sparse for d in be.decisions) == layers


@torch.no_grad()
def test_left_padded_batch_generate_at_tau_one_equals_eager():
    model, _ = models.llava()
    ids = torch.randint(3, 200, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    ids[1, :9] = 0
    expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                              do_sample=False)
    zipvl_compile.compile_language_model(model, tau=1.0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)
    rec = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
    assert rec and all(r.valid == [24, 15] and r.kept == [24, 15] for r in rec)


@pytest.mark.parametrize("name", BUILDERS)
@torch.no_grad()
def test_transformers_causal_padding_mask_is_never_built(name):
    """Under torch.compile transformers builds the prefill mask from index vectors; the pass
    recognizes causal & key padding, so no [B, 1, n, n] mask is materialized or copied
    (no ``zipvl::realize_mask``) and the sparse prefill reads the padding: a left-padded
    batch generates what eager does at tau=1."""
    from zipvl_compile.helpers import find_language_model
    from zipvl_compile.runtime.prefill import key_padding_summary

    model, inputs = BUILDERS[name]()
    one = inputs["input_ids"][0]
    ids = torch.stack([one, torch.cat([torch.zeros(5, dtype=one.dtype), one[:-5]])])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding; the image tokens stay whole
    batch = dict(inputs, input_ids=ids, attention_mask=mask)
    for key in ("pixel_values", "image_grid_thw"):
        if key in batch:
            batch[key] = torch.cat([batch[key]] * 2)
    if "mm_token_type_ids" in batch:
        batch["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    expected = model.generate(**batch, max_new_tokens=4, do_sample=False)
    spy, graphs = recording(zipvl_compile.backend(tau=1.0, inductor=False))
    find_language_model(model).compile(backend=spy)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)
    targets = [n.target for g in graphs for n in g.graph.nodes]
    assert key_padding_summary in targets
    assert torch.ops.zipvl.realize_mask.default not in targets
    n = ids.shape[1]
    rec = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
    assert rec and all(r.path == "sparse" and r.valid == [n, n - 5] for r in rec)


@torch.no_grad()
def test_sparse_generate_rewrites_every_language_layer_qwen2_vl():
    model, inputs = models.qwen2_vl()
    be = zipvl_compile.compile_language_model(model, **SPARSE)
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    n = inputs["input_ids"].shape[1]
    prefill = [r for r in zipvl_compile.stats() if r.phase == "prefill"]
    assert len(prefill) == model.config.text_config.num_hidden_layers
    assert all(r.path == "sparse" and r.kept == [(n + 1) // 2] for r in prefill)
    assert {d.module_type for d in be.decisions} == {"Qwen2VLAttention"}


@torch.no_grad()
def test_full_model_compile_keeps_vision_attention_dense_llava():
    model, inputs = models.llava()
    be = zipvl_compile.backend(**SPARSE)
    model.compile(backend=be)
    model(**inputs)
    sparse = [d for d in be.decisions if d.sparse]
    vision = [d for d in be.decisions if d.module_type == "CLIPAttention"]
    assert len(sparse) == model.config.text_config.num_hidden_layers
    assert all("language_model" in d.name and d.module_type == "LlamaAttention" for d in sparse)
    assert len(vision) == model.config.vision_config.num_hidden_layers
    assert all("non-causal" in d.reason for d in vision)
    table = zipvl_compile.format_stats()
    assert all(d.name in table for d in be.decisions)


@torch.no_grad()
def test_model_compile_by_name_generate_equals_eager_at_tau_one():
    model, inputs = models.llava()
    expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    model.compile(backend="zipvl", options={"tau": 1.0})  # the entry-point name, configured
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, expected)
    prefill = [r for r in zipvl_compile.stats() if r.phase == "prefill" and r.path == "sparse"]
    assert len(prefill) == model.config.text_config.num_hidden_layers
    assert all(r.kept_ratio == 1.0 for r in prefill)
