"""Where does the fp8 LoRA op's time go? Each GPU kernel of one forward + backward of
torch.ops.unsloth.lora_linear_fp8 (and of the bf16 frozen base beside it), from torch.profiler,
at the kernel benchmark's Llama shapes (M = 8192, r = 16, fp32 adapters, bf16 activations).

    python scripts/profile_fp8_op.py [--out DIR] [--layers ...]

Prints, per layer and variant, one step's kernels in launch order with their GPU times and
the step's total; writes profile_fp8_op.json. The op runs as `bench kernel`'s ours-fp8, -triton
and -cublas (the knob main_gemm forced; the thin GEMMs' timed choices settle in the warm-up).
Not a test, not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import unsloth_compile  # noqa: F401  registers torch.ops.unsloth
from unsloth_compile.bench.kernel import LAYERS, SCALE, _inputs
from unsloth_compile.kernels import knobs
from unsloth_compile.kernels.fp8 import quantize_weight

STEPS = 5


def kernels_per_step(run) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """({kernel: GPU us per step}, [(kernel, us) of one step, in launch order])."""
    for _ in range(3):  # warm-up: compiles, autotunes and settles the timed choices
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            run()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    launches = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name[:90]] += event.device_time / STEPS
            launches.append((event.name[:60], event.device_time))
    return dict(times), launches[: len(launches) // STEPS]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--layers", nargs="*", default=list(LAYERS), choices=list(LAYERS))
    args = parser.parse_args()
    rows = []
    for layer in args.layers:
        K, N = LAYERS[layer]
        x, W, A, B, dy = _inputs(8192, K, N, 16, "cuda")
        Wq, ws = quantize_weight(W)

        def fp8_step():
            out = torch.ops.unsloth.lora_linear_fp8(x, Wq, ws, None, A, B, None, None, None, SCALE, None, x.dtype,
                                                    "auto")[0]
            return torch.autograd.grad(out, [x, A, B], dy)

        def base_step():
            out = torch.nn.functional.linear(x, W)
            return torch.autograd.grad(out, [x], dy)

        for name, run, knob in (("base-bf16", base_step, None), ("ours-fp8", fp8_step, None),
                                ("ours-fp8-triton", fp8_step, "triton"), ("ours-fp8-cublas", fp8_step, "cublas")):
            with knobs.patch(**({"main_gemm": knob} if knob else {})):
                times, launches = kernels_per_step(run)
            total = sum(times.values())
            print(f"{layer} {name}: {total:.1f} us of GPU time per step; one step in launch order:", flush=True)
            for kernel, us in launches:
                print(f"    {us:8.1f} us  {kernel}", flush=True)
            rows.append(dict(layer=layer, K=K, N=N, variant=name, total_us=total, kernels=times, launches=launches))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile_fp8_op.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
