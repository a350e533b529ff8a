"""The LoRA pass's check of DTensor operands.

Under tensor parallelism Dynamo hands the backend a graph over DTensors. The fused op runs on
them through the sharding strategies registered in unsloth_compile/distributed/dtensor_sharding.py; a site
whose DTensor operands are not already laid out as one of those strategies is refused with the
placements in the reason (DTensor would redistribute them to fit, gathering sharded weights).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .. import fx_match as fm


def site_operands(base, adapters) -> dict:
    """The example values of a LoRA site's operands, by the op's argument names (the pass's
    BaseLinear and Adapters; the first adapter stands for the others, checked alike)."""
    out = {"x": base.x, "weight": base.weight, "bias": base.bias}
    for i, a in enumerate(adapters):
        tag = "" if i == 0 else f"#{i}"
        out.update({f"lora_A{tag}": a.A, f"lora_B{tag}": a.B, f"lora_B_bias{tag}": a.B_bias,
                    f"lora_x{tag}": a.lora_x, f"scale_tensor{tag}": a.scale_tensor})
    return {k: fm.example_value(v) if v is not None else None for k, v in out.items()}


# Row-wise, a replicated bias (RowwiseParallel's) becomes partial sums without communication
# (each rank holds bias / n): accepted where the layout says Partial.
_REPLICATE_OK = ("bias", "lora_B_bias", "residual")


def dtensor_check(base, adapters, cfg=None) -> tuple[Optional[str], Optional[str]]:
    """For the LoRA pass: (layout, reason). Plain operands: (None, None). DTensor operands laid
    out as one of the op's strategies on every mesh dimension: (the layouts, e.g. "column-wise",
    one per mesh dimension joined by " x "; the strategies are then registered), None).
    Otherwise (None, why the site is refused)."""
    if "torch.distributed.tensor" not in sys.modules:  # never imported: no DTensor can exist
        return None, None
    from torch.distributed.tensor import DTensor, Partial, Replicate

    from ...distributed.dtensor_sharding import layouts, register_lora_sharding  # only where DTensors exist

    tensors = {k: v for k, v in site_operands(base, adapters).items() if isinstance(v, torch.Tensor)}
    dtensors = {k: v for k, v in tensors.items() if isinstance(v, DTensor)}
    if not dtensors:
        return None, None
    if base.weight_scale is not None or base.sparse24 is not None or (
            cfg is not None and getattr(cfg.precision, "value", "default") != "default"):
        return None, "fp8 and 2:4 bases are not fused on DTensor operands (no sharding strategy for their ops)"
    if base.weight_transposed:
        return None, "a Conv1D (transposed-weight) base on DTensor operands is not fused"
    if len(dtensors) != len(tensors):
        plain = sorted(set(tensors) - set(dtensors))
        return None, f"DTensor operands mixed with plain tensors ({', '.join(plain)})"
    if len({v.device_mesh for v in dtensors.values()}) != 1:
        return None, "DTensor operands on different device meshes"
    x = dtensors["x"]
    placements = layouts(x.ndim - 1)

    def fits(layout: dict, name: str, placement) -> bool:
        want = layout[name.split("#")[0]]
        return placement == want or (name.split("#")[0] in _REPLICATE_OK and isinstance(want, Partial)
                                     and isinstance(placement, Replicate))

    found = []
    for dim in range(x.device_mesh.ndim):
        seen = {k: v.placements[dim] for k, v in dtensors.items()}
        match = next((name for name, layout in placements.items() if all(fits(layout, k, p) for k, p in seen.items())),
                     None)
        if match is None:
            shown = ", ".join(f"{k}={p}" for k, p in seen.items())
            return None, (f"DTensor placements on mesh dimension {dim} ({shown}) match none of the fused op's "
                          f"layouts (column-wise, row-wise, replicated): shard LoRA layers with "
                          f"unsloth_compile.distributed.tensor_parallel.lora_tp_plan")
        found.append(match)
    register_lora_sharding()
    return " x ".join(found), None
