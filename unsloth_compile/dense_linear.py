"""The frozen dense layers that fp8/, nf4/ and sparsity/ convert and give back: nn.Linear and
transformers' Conv1D (GPT-2), which stores its weight (in, out) and computes y = x W + b;
which of a model's modules they convert, why one cannot be, the swap (with the dense bytes it
frees) and the swap back."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised by name (transformers is not imported for it)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def dense_weight(module: nn.Module) -> Optional[Tensor]:
    """The (N, K) weight of an nn.Linear or a Conv1D (a transposed view), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_conv1d(module):
        return module.weight.t()
    return None


def conversion_problem(module: nn.Module, storage: str, dtype_fits: Callable[[torch.dtype], bool],
                       shape_problem: Callable[[int, int], Optional[str]]) -> Optional[str]:
    """Why `module`'s weight cannot be stored as `storage` (a frozen nn.Linear or Conv1D of a
    floating dtype that `dtype_fits`, of a shape without `shape_problem`), or None."""
    weight = dense_weight(module)
    if weight is None:
        return f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)"
    if weight.requires_grad:
        return f"the weight is trainable ({storage} is for frozen bases)"
    if not weight.dtype.is_floating_point or not dtype_fits(weight.dtype):
        return f"the weight's dtype is {weight.dtype}"
    return shape_problem(weight.shape[0], weight.shape[1])


def frozen_dense(weight_nk: Tensor, bias: Optional[nn.Parameter], conv1d: bool) -> nn.Module:
    """An nn.Linear (or a Conv1D when `conv1d`) holding the (N, K) weight, frozen, sharing `bias`."""
    out_features, in_features = weight_nk.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(out_features, in_features)
        dense.weight = nn.Parameter(weight_nk.t().contiguous(), requires_grad=False)
    else:
        dense = nn.Linear(in_features, out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(weight_nk, requires_grad=False)
    dense.bias = bias
    return dense


def lora_base_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, LoRA layer) for every PEFT-style LoRA layer: a module with `base_layer` and
    `lora_A` (PEFT's LoraLayer and what mimics it)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(getattr(m, "base_layer", None), nn.Module) and hasattr(m, "lora_A")]


def conversion_targets(model: nn.Module, select: Optional[Callable[[str, nn.Module], bool]]
                       ) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, path) of each module to convert: the base of every LoRA layer, or
    what `select(path, module)` picks."""
    if select is None:
        return [(layer, "base_layer", f"{path}.base_layer" if path else "base_layer")
                for path, layer in lora_base_layers(model)]
    found = []
    for parent_path, parent in model.named_modules():
        for attr, child in parent.named_children():
            path = f"{parent_path}.{attr}" if parent_path else attr
            if select(path, child):
                found.append((parent, attr, path))
    return found


def parameter_paths(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the paths it is reachable by (more than one: tied)."""
    paths: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(name)
    return paths


@dataclasses.dataclass(frozen=True)
class SwappedLayer:
    """One layer `swap_layers` converted: `dense` was at `path`, `stored` stands there now."""

    path: str
    dense: nn.Module
    stored: nn.Module
    tied_to: Optional[str]  # another path of the dense weight (tied embeddings), which keeps it alive


def swap_layers(model: nn.Module, select: Optional[Callable[[str, nn.Module], bool]], stored_type: type,
                problem: Callable[[nn.Module], Optional[str]], to_stored: Callable[[nn.Module], nn.Module],
                refused: dict[str, str], record: Callable[[SwappedLayer], None]) -> None:
    """Swap, in place, each module of `conversion_targets(model, select)` for `to_stored(module)`,
    and `record` each swap. Modules that are `stored_type` already are passed over; one with a
    `problem` stays as it is, the reason entered in `refused` under its path. `record` runs right
    after its swap, so that no dense layer outlives its step of the walk: each dense weight is
    freed before the next is converted, unless something else holds it."""
    holders = parameter_paths(model)  # before any swap: who else holds each weight
    for parent, attr, path in conversion_targets(model, select):
        module = getattr(parent, attr)
        if isinstance(module, stored_type):
            continue
        reason = problem(module)
        if reason is not None:
            refused[path] = reason
            continue
        stored = to_stored(module)
        others = [name for name in holders.get(id(module.weight), []) if name != f"{path}.weight"]
        setattr(parent, attr, stored)
        record(SwappedLayer(path, module, stored, others[0] if others else None))


def count_converted(report: Any, layer: SwappedLayer) -> None:
    """Enter a layer converted from its dense weight in a conversion report (its `converted`,
    `shared` and `dense_bytes`): the weight's bytes count as freed unless another module holds
    the weight too (tied embeddings), which the report lists as shared."""
    if layer.tied_to is not None:
        report.shared[layer.path] = layer.tied_to
    else:
        weight = dense_weight(layer.dense)
        report.dense_bytes += weight.numel() * weight.element_size()
    report.converted.append(layer.path)


def apply_keeping_stored(module: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool,
                         stored: tuple[str, ...], dtype_attr: str) -> nn.Module:
    """`nn.Module._apply(fn)` for a layer that stores its weight in a low-precision format:
    `model.to(bf16)` / `.half()` cast every floating buffer, and the stored codes and their
    scales must keep their dtypes (a scale cast to fp16 could flush to zero; fp8 codes count as
    floating). The buffers named in `stored` only follow device moves; `fn` applied to an empty
    probe of the dense dtype (the attribute `dtype_attr`) says where tensors go and which dense
    dtype the codes stand for from now on."""
    kept = {name: module._buffers.pop(name) for name in stored}
    try:
        nn.Module._apply(module, fn, recurse)
    finally:
        probe = fn(torch.empty(0, dtype=getattr(module, dtype_attr), device=kept[stored[0]].device))
        for name, buffer in kept.items():
            module._buffers[name] = buffer.to(probe.device)
        if probe.dtype.is_floating_point:
            setattr(module, dtype_attr, probe.dtype)
    return module


def revert_layers(model: nn.Module, layer_type: type) -> int:
    """Every `layer_type` module of `model` swapped for its `to_dense()`; returns how many."""
    swaps = [(parent, attr, child) for parent in model.modules() for attr, child in parent.named_children()
             if isinstance(child, layer_type)]
    for parent, attr, child in swaps:
        setattr(parent, attr, child.to_dense())
    return len(swaps)
