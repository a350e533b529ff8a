"""Where the backend's compile time goes on variable lengths: each step of the given lengths
(static, dynamic, aligned, new M bucket...) under cProfile, with the cumulative time of the
phases (Inductor, AOTAutograd, Triton autotuning, timed choices, the passes).

    LAYERS=4 python scripts/profile_compile_time.py 1843,2030,2000
"""
import os, sys, time, io, pstats, cProfile
import torch, transformers
from peft import LoraConfig, get_peft_model
import unsloth_compile
from unsloth_compile.kernels import timed_choice

OUT = os.environ.get("OUT", "/tmp")
layers = int(os.environ.get("LAYERS", 8))
cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                               num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
model = get_peft_model(transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).cuda(),
                       LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
run = torch.compile(model, backend="unsloth")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
# static; dynamic (L % 8 != 0); L % 8 == 0 (alignment guard); new M bucket; steady
lengths = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1843, 2030, 2000, 792, 300, 1500]
timings = {}
orig_timer = timed_choice._time_ms
def counting_timer(fn):
    t0 = time.perf_counter(); r = orig_timer(fn); timings.setdefault("fastest_s", 0.0); timings["fastest_s"] += time.perf_counter() - t0; return r
timed_choice.fastest.__defaults__ = (counting_timer,)
for i, L in enumerate(lengths):
    ids = torch.randint(3, 32000, (4, L), device="cuda")
    mask = torch.ones(4, L, dtype=torch.long, device="cuda"); mask[1:, L - L // 3:] = 0
    prof = cProfile.Profile()
    torch.cuda.synchronize(); t0 = time.perf_counter(); timings["fastest_s"] = 0.0
    prof.enable()
    loss = run(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); torch.cuda.synchronize()
    prof.disable()
    dt = time.perf_counter() - t0
    st = pstats.Stats(prof)
    def cum(pattern):
        return sum(v[3] for k, v in st.stats.items() if pattern in f"{k[0]}:{k[2]}")
    keys = {"compile_fx": "compile_fx.py:compile_fx", "fw_compiler_base": "compile_fx.py:fw_compiler_base",
            "bw_compiler": "compile_fx.py:bw_compiler", "autotuner_run": "autotuner.py:run", "do_bench": "testing.py:do_bench",
            "triton_compile": "compiler.py:compile", "fastest": "timed_choice.py:fastest", "run_passes": "pipeline.py:run_passes",
            "aot_module": "aot_autograd.py:aot_module_simplified", "async_compile_wait": "async_compile.py:wait",
            "cudagraph_record": "cudagraph_trees.py:record_function", "codecache_load": "codecache.py:load_by_key_path"}
    parts = {k: round(cum(p), 1) for k, p in keys.items()}
    print(f"step {i} L={L} {dt:.1f} s  timed choices: {sum(len(v) for v in timed_choice.CHOICES.values())}  "
          f"timer {timings['fastest_s']:.1f} s  {parts}", flush=True)
    s = io.StringIO(); st.sort_stats("cumulative").print_stats(70)
    open(f"{OUT}/compile_step{i}.txt", "w").write(s.getvalue())
print(torch._dynamo.utils.compile_times(repr="str"))
