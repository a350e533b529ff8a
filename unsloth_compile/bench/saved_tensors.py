"""`python -m unsloth_compile.bench saved-tensors`: what one training step of a bench preset
keeps for backward, per variant: the tensors that autograd saves during the forward (each
storage once, from a saved-tensors hook, so Inductor's partitioner's choices show), grouped by
dtype and shape, beside the CUDA memory at the end of the forward and the step's peak.

    python -m unsloth_compile.bench saved-tensors --preset llama-1b \\
        --variant ce=unsloth:fuse_cross_entropy=true \\
        --variant ce+fp8=unsloth:fuse_cross_entropy=true,compress_activations=fp8

Variants use the bench's syntax (NAME=KIND[:k=v,...]); `fuse_cross_entropy=true` wraps the
model in `loss_only`, as `bench e2e` does. Runs on CPU for the small presets (`--preset tiny`).
"""

from __future__ import annotations

import argparse
import collections
from typing import Optional

import torch

from .e2e import PRESETS, add_lora, build_model, make_batches
from .variants import (compile_for, free_memory, make_optimizer, parse_variant, resolve_device, resolve_inner,
                       synchronize, train_step)

MIB = 2 ** 20


def saved_storages(step_fn, batch: dict) -> tuple[torch.Tensor, dict]:
    """Runs the forward; returns the loss and {storage pointer: (bytes, dtype, shape)} of what
    autograd saved (the first tensor seen on each storage names it)."""
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage.nbytes(), str(t.dtype).replace("torch.", ""), tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_fn(**batch).loss
    return loss, storages


def probe(preset, spec: str, device: torch.device, dtype: torch.dtype, inner: str, top: int) -> dict:
    """Prints the variant's table; returns {"variant", "total_bytes", "by_dtype", "storages"}."""
    variant = parse_variant(spec, inner)
    torch.manual_seed(0)
    model = add_lora(build_model(preset, device, dtype), preset)
    if variant.options.get("fuse_cross_entropy") is True and preset.family == "llama":
        from .. import loss_only

        loss_only(model)
    model.train()
    step_fn = compile_for(model, variant)
    optimizer = make_optimizer(model.parameters(), 1e-4, device)
    batches = make_batches(preset, 3, 0, device)
    for batch in batches[:2]:  # compile, and a CUDA graph recording where graphs are on
        train_step(step_fn, batch, optimizer)
    synchronize(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    loss, storages = saved_storages(step_fn, batches[2])
    if cuda:
        synchronize(device)
        after_forward = torch.cuda.memory_allocated(device)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    groups: dict = collections.defaultdict(lambda: [0, 0])
    by_dtype: collections.Counter = collections.Counter()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved, but no extra memory
    for ptr in params & storages.keys():
        del storages[ptr]
    for nbytes, dt, shape in storages.values():
        groups[(dt, shape)][0] += 1
        groups[(dt, shape)][1] += nbytes
        by_dtype[dt] += nbytes
    total = sum(by_dtype.values())
    print(f"\n== {variant.name}: {variant.describe()}")
    print(f"saved for backward (parameters left out): {total / MIB:,.1f} MiB in {len(storages)} storages; by dtype (MiB): "
          + ", ".join(f"{k} {v / MIB:,.1f}" for k, v in by_dtype.most_common()))
    if cuda:
        print(f"allocated before the step {before / MIB:,.0f} MiB, at the end of the forward "
              f"{after_forward / MIB:,.0f} MiB (+{(after_forward - before) / MIB:,.0f}); step peak allocated "
              f"{torch.cuda.max_memory_allocated(device) / MIB:,.0f} MiB, reserved "
              f"{torch.cuda.max_memory_reserved(device) / MIB:,.0f} MiB")
    print("| dtype | shape | count | MiB | share |\n|---|---|---|---|---|")
    for (dt, shape), (count, nbytes) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| {dt} | {list(shape)} | {count} | {nbytes / MIB:,.1f} | {nbytes / max(total, 1):.1%} |")
    del model, step_fn, optimizer, loss, batches
    free_memory(device)
    return {"variant": variant.name, "total_bytes": total, "by_dtype": dict(by_dtype), "storages": len(storages)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unsloth_compile.bench saved-tensors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=KIND[:k=v,...]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"])
    parser.add_argument("--top", type=int, default=25, help="(dtype, shape) groups listed per variant")
    args = parser.parse_args(list(argv or []))
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inner = resolve_inner(args.inner, device)
    for spec in args.variant:
        probe(PRESETS[args.preset], spec, device, dtype, inner, args.top)
    return 0
