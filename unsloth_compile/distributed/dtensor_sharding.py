"""DTensor sharding of the fused LoRA op.

Under tensor parallelism (tensor_parallel.py) Dynamo hands the backend a graph over
DTensors: the LoRA pass matches it as on one GPU and emits `unsloth::lora_linear` on DTensor
operands. AOTAutograd then traces through DTensor, which runs each op on the local shards by
the op's sharding strategy: those of `unsloth::lora_linear` and `unsloth::lora_linear_backward`
are registered here (one mesh dimension; DTensor expands them to every dimension):

    layout         x        W      A      B      out    H = x A^T   backward: dX  dA    dB
    column-wise    R        S(0)   R      S(0)   S(-1)  R                     P   P     S(0)
    row-wise       S(-1)    S(1)   S(1)   R      P      P                     S(-1) S(1) P
    replicated     R        R      R      R      R      R                     R   R     R

(R replicated, S(d) sharded along d, P partial sums awaiting an all-reduce.) Each is exact
algebra on the local shards: column-wise, a rank's output columns are x W_l^T + s (x A^T) B_l^T;
row-wise, its partial sum is x_l W_l^T + s (x_l A_l^T) B^T, linear in the partial H. DTensor
adds the collectives the placements call for. The LoRA pass refuses a site whose DTensor
operands are not already laid out as one of these (passes/lora/lora_dtensor.py).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["register_lora_sharding", "layouts", "LAYOUTS"]

LAYOUTS = ("column-wise", "row-wise", "replicated")


_FWD_ARGS = ("x", "weight", "bias", "lora_A", "lora_B", "lora_B_bias", "lora_x", "residual", "scale",
             "scale_tensor", "weight_transposed", "out_dtype", "impl", "dropout_mask", "dropout_scale")
_BWD_ARGS = ("grad_out", "x", "weight", "lora_A", "lora_B", "lora_x", "lora_hidden", "scale", "scale_tensor",
             "weight_transposed", "base_dtype", "impl", "dropout_mask", "dropout_scale")


def layouts(last: int) -> dict:
    """Per operand name, its placement in each strategy (one mesh dimension): column-wise,
    row-wise, all replicated. `last`: x's last dimension."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    R, P, S_last = Replicate(), Partial(), Shard(last)
    col = dict(x=R, weight=Shard(0), bias=Shard(0), lora_A=R, lora_B=Shard(0), lora_B_bias=Shard(0), lora_x=R,
               residual=S_last, scale_tensor=R, dropout_mask=R,
               out=S_last, lora_hidden=R, grad_out=S_last, dx=P, d_lora_x=P, dA=P, dB=Shard(0))
    # Row-wise: the output, H and dB are partial sums; a bias or residual added inside the op is
    # split into partial sums too (Replicate -> Partial), so that the all-reduce adds it once.
    row = dict(x=S_last, weight=Shard(1), bias=P, lora_A=Shard(1), lora_B=R, lora_B_bias=P, lora_x=S_last,
               residual=P, scale_tensor=R, dropout_mask=S_last,
               out=P, lora_hidden=P, grad_out=R, dx=S_last, d_lora_x=S_last, dA=Shard(1), dB=P)
    rep = {k: R for k in col}
    return dict(zip(LAYOUTS, (col, row, rep)))


def _placements(names, args, layout) -> list:
    return [layout[name] if name in layout and args.get(name) is not None else None for name in names]


def _forward_strategies(*args, **kwargs):
    values = dict(zip(_FWD_ARGS, args), **kwargs)
    if values.get("weight_transposed"):
        return []  # Conv1D bases: not sharded by the plan
    last = values["x"].ndim - 1
    out = []
    for layout in layouts(last).values():
        out.append(([layout["out"], layout["lora_hidden"]], _placements(_FWD_ARGS, values, layout)))
    return out


def _backward_strategies(*args, **kwargs):
    values = dict(zip(_BWD_ARGS, args), **kwargs)
    if values.get("weight_transposed"):
        return []
    last = values["x"].ndim - 1
    out = []
    for layout in layouts(last).values():
        # d_lora_x is an empty (0,) tensor unless the adapter read lora_x: replicated then
        d_lora_x = layout["d_lora_x"] if values.get("lora_x") is not None else layouts(last)["replicated"]["dx"]
        out.append(([layout["dx"], d_lora_x, layout["dA"], layout["dB"]], _placements(_BWD_ARGS, values, layout)))
    return out


@functools.cache
def register_lora_sharding() -> None:
    """Teach DTensor to run `unsloth::lora_linear` and its backward on local shards (idempotent)."""
    from torch.distributed.tensor.experimental import register_sharding

    from .. import ops  # noqa: F401  the ops exist

    register_sharding(torch.ops.unsloth.lora_linear.default)(_forward_strategies)
    register_sharding(torch.ops.unsloth.lora_linear_backward.default)(_backward_strategies)
