"""Record of a session-9 measurement (H100, torch 2.11, transformers 5.17): where the host time
of a CUDA-graph decode step goes.  Qwen2-7B attention shape (28 layers, 28 heads, 4 KV heads,
head dim 128) with a small MLP and vocabulary (host work does not depend on them), 8K context,
batch 1; wall and host-until-return time per step, then cProfile of 20 steps per cache.
Run from the repository root: python benchmarks/results/decode_host_profile_session9.py"""
import cProfile, pstats, sys, time, statistics
sys.path.insert(0, "benchmarks"); sys.path.insert(0, ".")
import torch, transformers
import zipvl_compile
import end_to_end as e2e
cfg = transformers.Qwen2Config(vocab_size=1024, hidden_size=3584, intermediate_size=512,
                               num_hidden_layers=28, num_attention_heads=28,
                               num_key_value_heads=4, max_position_embeddings=32768)
cfg._attn_implementation = "sdpa"
torch.manual_seed(0)
with torch.device("cuda"):
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
zipvl_compile.compile_language_model(model, mode="reduce-overhead")
gen = torch.Generator(device="cuda").manual_seed(0)
n, B = 8192, 1
out = {}
for name in sys.argv[1:] or ["DynamicCache bf16", "ZipVLCache 4/2"]:
    torch._dynamo.reset()
    if name.startswith("Dynamic"):
        cache = e2e.dense_cache(cfg, B, n, gen, n + 200)
    else:
        hb, lb = map(int, name.split()[1].split("/"))
        cache = e2e.zipvl_cache(cfg, B, n, gen, hb, lb, n + 200)
    ids = torch.randint(0, 1000, (B, 1), device="cuda")
    def step(pos):
        with torch.no_grad():
            o = model(input_ids=ids, past_key_values=cache,
                      position_ids=torch.full((B, 1), pos, device="cuda"), logits_to_keep=1)
        return o.logits.argmax(-1)
    pos = n
    for _ in range(12):
        step(pos); pos += 1
    walls, hosts = [], []
    for _ in range(30):
        torch.cuda.synchronize()
        t0 = time.perf_counter(); step(pos); t1 = time.perf_counter()
        torch.cuda.synchronize(); t2 = time.perf_counter()
        walls.append(t2 - t0); hosts.append(t1 - t0); pos += 1
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(); ev0.record(); step(pos); ev1.record(); torch.cuda.synchronize(); pos += 1
    out[name] = (statistics.median(walls) * 1e3, statistics.median(hosts) * 1e3,
                 ev0.elapsed_time(ev1), e2e.compiled_graphs())
    pr = cProfile.Profile(); pr.enable()
    for _ in range(20):
        step(pos); pos += 1
    torch.cuda.synchronize()
    pr.disable()
    print("=====", name, flush=True)
    st = pstats.Stats(pr); st.sort_stats("tottime").print_stats(22)
    st.sort_stats("cumtime").print_stats(22)
    cache = None
print("cache | wall ms/step | host ms until return | events ms | graphs")
for k, v in out.items():
    print(f"{k:18s} {v[0]:7.2f} {v[1]:7.2f} {v[2]:7.2f} {v[3]}")
