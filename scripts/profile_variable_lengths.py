"""Variable-length padded batches (Llama, hidden 2048, vocab 32000, r16 on every projection, 4
rows padded to a length drawn from 256-2048 each step): per-step time of PEFT eager and of the
backend variants named on the command line, dynamo counters, timed choices, and a cProfile and
torch.profiler table of a steady step under $OUT.

    python scripts/profile_variable_lengths.py peft,unsloth,backend,unsloth:bucket_lengths=False 24

unsloth: unsloth_compile.compile(model, options); backend: torch.compile(model, backend="unsloth").
"""
import json, os, sys, time, collections, cProfile, pstats, io
import torch, transformers
from peft import LoraConfig, get_peft_model

OUT = os.environ.get("OUT", "/tmp")
variant_names = sys.argv[1].split(",")
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 24
layers = int(os.environ.get("LAYERS", 8))
torch.manual_seed(0)
g = torch.Generator().manual_seed(1)
lengths = [int(torch.randint(256, 2049, (4,), generator=g).max()) for _ in range(steps)]
row_lengths = [torch.randint(128, L + 1, (4,), generator=g).tolist() for L in lengths]
for rl, L in zip(row_lengths, lengths): rl[0] = L

def batch(i):
    L = lengths[i]
    ids = torch.randint(3, 32000, (4, L), generator=torch.Generator().manual_seed(i))
    mask = torch.zeros(4, L, dtype=torch.long)
    for r, n in enumerate(row_lengths[i]): mask[r, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}

def build():
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).cuda()
    return get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))

results = {}
for name in variant_names:
    torch._dynamo.reset()
    model = build()
    opts = None
    if name.startswith(("unsloth", "backend")):
        import unsloth_compile
        from unsloth_compile.kernels import timed_choice
        opts = {}
        for kv in name.split(":")[1:]:
            k, v = kv.split("=")
            opts[k] = {"False": False, "True": True}.get(v, v)
        # unsloth: the documented entry point (length buckets); backend: torch.compile(backend="unsloth")
        run = (unsloth_compile.compile(model, opts) if name.startswith("unsloth")
               else torch.compile(model, backend="unsloth", options=opts))
    elif name == "inductor":
        run = torch.compile(model)
    else:
        run = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    from torch._dynamo.utils import counters
    counters.clear()
    t_all = time.perf_counter()
    prof = None
    for i in range(steps):
        b = batch(i)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        if i == steps - 2 or (i == 0 and name != "peft"):  # a steady step; the first compile
            prof = cProfile.Profile(); prof.enable()
        loss = run(**b).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i == steps - 2:
            prof.disable()
        if i == 0 and name != "peft":
            prof.disable(); first = io.StringIO()
            pstats.Stats(prof, stream=first).sort_stats("cumulative").print_stats(60)
            print(f"== {name}: where the first step's time went (cProfile, cumulative)\n{first.getvalue()}", flush=True)
        times.append(time.perf_counter() - t0)
        print(f"{name} step {i} L={lengths[i]} {times[-1]*1e3:.1f} ms", flush=True)
    wall = time.perf_counter() - t_all
    s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    open(f"{OUT}/cprofile_{name.replace(':','_').replace('=','-')}.txt", "w").write(s.getvalue())
    # torch profiler of one more step
    b = batch(steps - 1)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        loss = run(**b).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize()
    open(f"{OUT}/torchprof_{name.replace(':','_').replace('=','-')}.txt", "w").write(
        p.key_averages().table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n" +
        p.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    extra = {}
    if name.startswith(("unsloth", "backend")):
        extra = {k: len(v) for k, v in timed_choice.CHOICES.items()}
        extra["picked"] = {kind: {str(key): chosen for key, (chosen, _) in table.items()}
                           for kind, table in timed_choice.CHOICES.items()}
        print(torch._dynamo.utils.compile_times(repr="str"), flush=True)
    real = sum(sum(r) for r in row_lengths[-8:])
    res = dict(wall_s=wall, last8_ms=1e3 * sum(times[-8:]) / 8, first_ms=times[0] * 1e3, times_ms=[t * 1e3 for t in times],
               real_tok_s_last8=real / sum(times[-8:]), counters={k: dict(v) for k, v in counters.items() if k in ("stats", "graph_break", "recompiles", "unsloth")},
               choices=extra, peak_gib=torch.cuda.max_memory_reserved() / 2**30)
    results[name] = res
    print(name, json.dumps({k: v for k, v in res.items() if k != "times_ms"}), flush=True)
    del run, model, opt
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
json.dump(results, open(f"{OUT}/varlen.json", "w"), indent=1)
for n, r in results.items():
    print(f"{n:40s} wall {r['wall_s']:7.1f} s  last8 {r['last8_ms']:8.1f} ms/step  peak {r['peak_gib']:.1f} GiB")
