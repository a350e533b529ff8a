"""An op's arguments kept by an autograd Function for its backward: tensors go through
`ctx.save_for_backward` (so saved-tensor hooks and version checks see them), everything else
rides along on the context as it is.

    tensors, plan = pack_saved({"weight": w, "compressed": [c0, c1], "layout": "cutlass"})
    ctx.save_for_backward(*tensors)
    ...
    kept = unpack_saved(plan, ctx.saved_tensors)   # the same dict, in the same order
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


def pack_saved(kept: dict[str, Any]) -> tuple[list, tuple]:
    """(tensors to save, how to rebuild `kept` from them): tensors and None are saved one each,
    lists of tensors as their elements, anything else rides along as a constant."""
    tensors, plan = [], []
    for name, value in kept.items():
        if value is None or isinstance(value, Tensor):
            tensors.append(value)
            plan.append((name, "tensor", None))
        elif isinstance(value, (list, tuple)) and all(isinstance(t, Tensor) for t in value):
            tensors.extend(value)
            plan.append((name, "list", len(value)))
        else:
            plan.append((name, "constant", value))
    return tensors, tuple(plan)


def unpack_saved(plan: tuple, tensors: list) -> dict[str, Any]:
    """The dict `pack_saved` was given, from its plan and the saved tensors."""
    kept, i = {}, 0
    for name, kind, payload in plan:
        if kind == "tensor":
            kept[name], i = tensors[i], i + 1
        elif kind == "list":
            kept[name], i = list(tensors[i:i + payload]), i + payload
        else:
            kept[name] = payload
    return kept
