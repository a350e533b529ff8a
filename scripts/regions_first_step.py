"""The first step's wall time (compiles included) and the steady step time of
`unsloth_compile.compile(model, compile_regions=...)`, "model" against "layers", on one run.

A Llama with PEFT LoRA on every projection, loss-only forward (as the bench runs it), AdamW,
fixed-length batches. Each variant runs in a fresh process with its own Inductor cache
directory and the FX/AOTAutograd caches off, so that neither reuses the other's compiled code.

    python scripts/regions_first_step.py                   # CPU: hidden 256, 8 layers, inner=inductor
    python scripts/regions_first_step.py --device cuda --hidden 2048 --layers 16 --vocab 128256 --seq 2048 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_variant(args: argparse.Namespace) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    import unsloth_compile
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                                   num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                   num_key_value_heads=max(1, args.hidden // 256), vocab_size=args.vocab)
    model = transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    unsloth_compile.loss_only(model)
    unsloth_compile.compile(model, inner=args.inner, compile_regions=args.variant, report=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = step(0)
    for i in range(args.warmup):
        step(1 + i)
    steady = sorted(step(100 + i) for i in range(args.steps))
    return {"variant": args.variant, "first_step_s": round(first, 2),
            "steady_step_ms_median": round(1000 * steady[len(steady) // 2], 1),
            "steady_step_ms_min": round(1000 * steady[0], 1),
            "dynamo_graphs": int(counters["stats"]["unique_graphs"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inner", default="inductor")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--variants", default="model,layers")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return
    results = []
    for variant in args.variants.split(","):
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix=f"inductor-{variant}-"),
                   TORCHINDUCTOR_FX_GRAPH_CACHE="0", TORCHINDUCTOR_AUTOGRAD_CACHE="0")
        argv = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("variants", "variant")]
        out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], env=env, check=True,
                             capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
