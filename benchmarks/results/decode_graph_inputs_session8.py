"""Record of a session-8 measurement (CPU, torch 2.13, transformers 5.23): the number of graph
inputs and outputs of one compiled decode step of a 4-layer Qwen2 with transformers'
StaticCache and with ZipVLCache(max_cache_len) in its fixed buffers.  Printed: static [(66, 1)],
zipvl [(134, 1)].  Run: python benchmarks/results/decode_graph_inputs_session8.py"""
import torch, time
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache
import zipvl_compile
from zipvl_compile import ZipVLCache
from zipvl_compile.runtime import kv_split
from zipvl_compile.backend import ZipVLBackend

L = 4
cfg = Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=L,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg).eval()
n, B = 512, 1
d = 64
seen = []
inner = ZipVLBackend(inductor=False)
def be(gm, ex):
    seen.append((len(ex), len([n for n in gm.graph.nodes if n.op == "output"][0].args[0])))
    return inner(gm, ex)

def zcache(max_len):
    cache = ZipVLCache(high_bits=4, low_bits=2, max_cache_len=max_len, group_size=64, residual_length=32)
    c = cache.config
    from zipvl_compile.cache import ZipVLLayer
    for i in range(L):
        k = torch.randn(B, 2, n, d); v = torch.randn(B, 2, n, d)
        perm = torch.randperm(n)[None]
        kept = torch.cat([perm[:, :n // 2].sort(-1).values, perm[:, n // 2:].sort(-1).values], 1)
        plan = kv_split.plan(n, kept, torch.full((B,), n // 2), c.residual_length)
        split = kv_split.split_by_importance(k, v, plan, plan.counts.tolist(), high_bits=4, low_bits=2, group_size=64, vgroup=64)
        layer = ZipVLLayer(cache, i); layer.lazy_initialization(k, v); cache.layers.append(layer)
        cache.install_static(i, split.hi, split.lo, split.res_k, split.res_v, n, split.evicted)
    return cache

def scache(max_len):
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    for i in range(L):
        cache.update(torch.randn(B, 2, n, d), torch.randn(B, 2, n, d), i)
    return cache

for name, make in (("static", scache), ("zipvl", zcache)):
    torch._dynamo.reset(); seen.clear()
    cache = make(n + 40)
    f = torch.compile(model, backend=be)
    ids = torch.randint(0, 256, (B, 1))
    with torch.no_grad():
        for i in range(6):
            f(input_ids=ids, past_key_values=cache, position_ids=torch.full((B, 1), n + i), logits_to_keep=1)
    print(name, "graphs (inputs, outputs):", seen)
