"""2:4 structured sparsity of the frozen bases: pruning and conversion, once, before training;
separate from the runtime rewrite (passes/lora/sparse24_linear.py).

    report = unsloth_compile.sparsity.prune(model)                      # magnitude
    report = unsloth_compile.sparsity.prune(model, "wanda", calibration=batches)
    report = unsloth_compile.sparsity.prune(model, "wanda", calibration=batches, reconstruct=True)
    report = unsloth_compile.sparsity.prune(model, "sparsegpt", calibration=batches, reconstruct=True,
                                            sequential=True, ignore_padding=True)
    print(report)             # per layer: kept-weight energy, or why it was left dense
    model = torch.compile(model, backend="unsloth", options={"sparsity": "2:4"})
    unsloth_compile.sparsity.revert(model)   # back to nn.Linear / Conv1D with the pruned weight

`prune` draws a transposable 2:4 mask for the frozen base of every LoRA layer (4 x 4 tiles, 2
kept per row and per column: mask.py), so that both X W^T and backward's dY W run on
the sparse tensor cores, zeroes the rest of the weight in place and (convert=True) swaps the
base for a `Sparse24Linear`. Scores: "magnitude" |W|; "wanda" |W| * ||X_j||_2, the norm of
each input feature over calibration batches run through the model (forward hooks on the
bases). The report gives each layer's kept-weight energy (sum of kept w^2 / sum of w^2).
reconstruct=True then refits the kept weights of each layer by least squares so that it
reproduces the dense layer's outputs on the calibration inputs (reconstruct.py; the
same pass also sums each base's H = X^T X, K x K float64 per layer, from the dense model's
activations); the mask is unchanged and the report adds each layer's relative output error on
the calibration inputs, masked against reconstructed. "sparsegpt" chooses the mask by OBS
saliency w^2 / [H^-1]_jj column group by column group, updating the free weights as it goes
(obs.py); reconstruct=True then refits its mask exactly. sequential=True prunes the
layers in forward order, each measured on the inputs of the model pruned so far and fitted to
the dense model's outputs of that layer (sequential.py). ignore_padding=True leaves
the tokens the batches' attention_mask marks 0 out of every statistic.

`Sparse24Linear` keeps the dense masked weight (a frozen parameter: the CPU path, the
reference, what state_dict saves) and, on CUDA, compressed copies of W and W^T
(kernels/sparse24.py); its forward is one `torch.ops.unsloth.sparse24_linear` call, sparse on
CUDA in eager too. The dense weight is validated 2:4 in both orientations when the module is
built (and after load_state_dict), so the compiler, which only sees fake tensors, needs no
check of the values: it recognises the op. Layers whose shape the 2:4 GEMMs cannot take,
trainable weights and non-linear modules are neither pruned nor converted, and are listed in
the report with the reason. No memory is saved: the compressed copies sit beside the dense
weight (docs/bench/design-choices.md#24-sparsity).
Revert before merging adapters (merge_and_unload writes into the dense weight only).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  registers torch.ops.unsloth.sparse24_linear
from ..dense_linear import (conversion_problem, conversion_targets, dense_weight, frozen_dense, is_conv1d,
                            revert_layers, swap_layers)
from ..dense_linear import lora_base_layers  # noqa: F401  part of this module's API
from ..kernels import sparse24
from .mask import kept_energy, sparsity_problem, transposable_mask
from .obs import obs_prune
from .reconstruct import dense_refit, relative_error_to
from .reconstruct import reconstruct as reconstruct_kept
from .sequential import (TARGETS, LayerStats, eval_no_grad, forward_groups, group_stats, padding_mask,
                                  require_reached, run_batch, stats_bytes, token_rows)
from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile.sparsity")

METHODS = ("magnitude", "wanda", "sparsegpt")


def unsupported(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be pruned 2:4 and run sparse, or None."""
    return conversion_problem(module, "2:4 pruning", lambda dtype: dtype.itemsize >= 2, sparse24.shape_problem)


class Sparse24Linear(nn.Module):
    """y = x W^T + b with W 2:4 in both orientations: `weight` (N, K) dense with the zeros, a
    frozen parameter; on CUDA also its compressed copies (non-persistent buffers `sparse_i`,
    rebuilt after every device move or cast) in layout `layout`."""

    def __init__(self, weight: Tensor, bias: Optional[nn.Parameter], conv1d: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = bias
        self.conv1d = conv1d  # what to_dense restores
        self.layout, self.dense_reason = sparse24.DENSE, None
        self._compressed_names: list[str] = []
        self._compress()

    @classmethod
    def from_dense(cls, module: nn.Module) -> "Sparse24Linear":
        """A pruned nn.Linear (or Conv1D), weight shared; ValueError with the reason when it
        cannot run sparse or its weight is not 2:4 along both dimensions."""
        reason = unsupported(module)
        weight = dense_weight(module)
        if reason is None:
            reason = sparsity_problem(weight)
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.sparsity: cannot convert {type(module).__name__}: {reason}")
        conv1d = is_conv1d(module)
        return cls(weight.detach().contiguous() if conv1d else weight.detach(), module.bias, conv1d)

    def _compress(self) -> None:
        """(Re)build the compressed copies for the weight's device and dtype."""
        for name in self._compressed_names:
            self._buffers.pop(name, None)
        self._compressed_names = []
        layout, reason = sparse24.layout_problem(self.weight.device)
        if layout is not None and layout != sparse24.DENSE:
            reason = sparse24.dtype_problem(self.weight.dtype, on_cuda=True)
        self.layout, self.dense_reason = (sparse24.DENSE, reason) if reason is not None else (layout, None)
        if self.layout == sparse24.DENSE:
            return
        with torch.no_grad():
            for i, t in enumerate(sparse24.compress(self.weight, self.layout)):
                self.register_buffer(f"sparse_{i}", t, persistent=False)
                self._compressed_names.append(f"sparse_{i}")

    def compressed(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._compressed_names]

    def forward(self, x: Tensor) -> Tensor:
        bias, device_type = self.bias, x.device.type
        if torch.is_autocast_enabled(device_type):  # as nn.Linear under autocast: x and b in its dtype
            dtype = torch.get_autocast_dtype(device_type)
            x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        return torch.ops.unsloth.sparse24_linear(x, self.weight, self.compressed(), self.layout, bias, "auto")

    def to_dense(self) -> nn.Module:
        """An nn.Linear (or Conv1D) with the pruned weight, frozen, sharing the bias."""
        return frozen_dense(self.weight.detach(), self.bias, self.conv1d)

    def _apply(self, fn, recurse=True):
        # model.to(...) / .half() must not cast the compressed copies (values and metadata
        # share one tensor in cuSPARSELt's layout): drop them, move the weight, rebuild.
        for name in self._compressed_names:
            self._buffers.pop(name, None)
        self._compressed_names = []
        super()._apply(fn, recurse)
        self._compress()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        reason = sparsity_problem(self.weight)
        if reason is not None:
            raise UnslothCompileError(f"unsloth_compile.sparsity: loading {prefix}weight into a Sparse24Linear: "
                                      f"{reason}")
        self._compress()

    def extra_repr(self) -> str:
        why = f" ({self.dense_reason})" if self.dense_reason else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 transposable, layout={self.layout}{why}")


@dataclasses.dataclass
class SparsityReport:
    method: str  # "magnitude", "wanda", "sparsegpt", or "none" (convert of an already pruned model)
    reconstructed: bool = False  # kept weights refit by least squares on the calibration inputs
    sequential: Optional[str] = None  # the target ("model" or "layer") when pruned layer by layer
    ignore_padding: bool = False  # calibration statistics over the attention mask's tokens only
    energy: dict[str, float] = dataclasses.field(default_factory=dict)  # path -> kept-weight energy
    # path -> relative output error on the calibration inputs, ||X (W - W0)^T|| / ||X W0^T||,
    # of the masked dense weight and of the reconstructed one (reconstructed layers only)
    output_error: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    converted: list[str] = dataclasses.field(default_factory=list)  # paths now Sparse24Linear
    refused: dict[str, str] = dataclasses.field(default_factory=dict)  # path -> why left as it is

    def __str__(self) -> str:
        mean = sum(self.energy.values()) / len(self.energy) if self.energy else float("nan")
        how = self.method + (", OBS updates" if self.method == "sparsegpt" and not self.reconstructed else "")
        how += ", kept weights refit by least squares" if self.reconstructed else ""
        if self.sequential is not None:
            how += f", sequential (fitted to the dense {self.sequential}'s outputs)"
        how += ", padding left out of the calibration" if self.ignore_padding else ""
        lines = [f"unsloth_compile.sparsity: {len(self.energy)} base linear(s) pruned 2:4 ({how}), "
                 f"{len(self.converted)} converted to Sparse24Linear, {len(self.refused)} left as they are; "
                 f"mean kept-weight energy {mean:.4f}"]
        if self.output_error:
            before, after = (sum(e[i] for e in self.output_error.values()) / len(self.output_error) for i in (0, 1))
            lines[0] += f"; mean calibration output error {before:.4f} masked -> {after:.4f} {_FINAL}"
        for path, e in self.energy.items():
            lines.append(f"  {path}: kept energy {e:.4f}{_error_text(self.output_error.get(path))}")
        lines += [f"  {path}: not pruned: {reason}" for path, reason in self.refused.items()]
        return "\n".join(lines)


# what reconstruct=True may hold at once in float64 Gram matrices (K x K per layer: a 1B model's
# bases all at once would not fit a GPU beside the model; docs/bench/design-choices.md#24-sparsity)
GRAM_BUDGET_BYTES = 8 * 2**30


def calibrate(model: nn.Module, modules: dict[str, nn.Module], calibration: Iterable,
              grams: bool = False, ignore_padding: bool = False) -> dict[str, LayerStats]:
    """One pass of the calibration batches through the model (eval mode, no gradients);
    forward pre-hooks on `modules` sum x^2 by column and (grams) x^T x, in float64, over every
    token or (ignore_padding) those the batch's attention_mask keeps. Per path: ||X_j||_2 of
    each input feature j (Wanda's scores) and, when asked, H = X^T X (least squares, OBS)."""
    if grams:
        need = sum(8 * m.weight.shape[-1] ** 2 for m in modules.values())  # one float64 K x K per layer
        if need > GRAM_BUDGET_BYTES:
            raise UnslothCompileError("unsloth_compile.sparsity: reconstruct=True keeps a float64 K x K Gram matrix "
                                      f"per layer, {need / 2**30:.1f} GiB for these {len(modules)} layers (limit "
                                      f"{GRAM_BUDGET_BYTES / 2**30:.0f} GiB, sparsity.pruning.GRAM_BUDGET_BYTES): "
                                      "prune in several calls, each with a select= that picks fewer layers")
    sums: dict[str, Tensor] = {}
    gram_sums: dict[str, Tensor] = {}
    tokens: Optional[Tensor] = None  # the running batch's attention mask (ignore_padding)

    def accumulate(store: dict[str, Tensor], path: str, part: Tensor) -> None:
        store[path] = part if path not in store else store[path] + part

    def hook_for(path: str):
        def hook(_module, args):
            x = token_rows(args[0].detach(), tokens, path)
            accumulate(sums, path, x.pow(2).sum(0))
            if grams:
                accumulate(gram_sums, path, x.t() @ x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(p)) for p, m in modules.items()]
    try:
        with eval_no_grad(model):
            for batch in calibration:
                tokens = padding_mask(batch, ignore_padding)
                run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    require_reached(modules, sums)
    return {p: LayerStats(s.sqrt(), gram_sums.get(p)) for p, s in sums.items()}


def prune(model: nn.Module, method: str = "magnitude", calibration: Optional[Iterable] = None,
          select: Optional[Callable[[str, nn.Module], bool]] = None, convert: bool = True,
          reconstruct: bool = False, sequential: bool = False, target: Optional[str] = None,
          ignore_padding: bool = False) -> SparsityReport:
    """Prune the frozen base of every LoRA layer (or what `select(path, module)` picks) to a
    transposable 2:4 mask, in place, and (convert) swap each for a Sparse24Linear.
    method: "magnitude", "wanda", or "sparsegpt" (OBS saliency and updates, obs.py).
    reconstruct: refit the kept weights by least squares on the calibration inputs (same mask).
    sequential: prune layer by layer in forward order, each calibrated on the inputs the pruned
    layers before it give (sequential.py); target: what each layer is fitted to,
    "model" (the dense model's output of that layer, the default) or "layer" (the dense layer
    on the pruned inputs). ignore_padding: calibration statistics only over the tokens each
    batch's attention_mask keeps (batches are dicts with one). Deterministic: the same weights (and calibration) give the same
    masks and weights."""
    target = _check_prune_arguments(method, calibration, reconstruct, sequential, target, ignore_padding)
    report = SparsityReport(method, reconstructed=reconstruct, sequential=target if sequential else None,
                            ignore_padding=ignore_padding)
    todo = []
    for parent, attr, path in conversion_targets(model, select):
        module = getattr(parent, attr)
        if isinstance(module, Sparse24Linear):
            report.refused[path] = "already a Sparse24Linear (pruned before)"
        elif (reason := unsupported(module)) is not None:
            report.refused[path] = reason
        else:
            todo.append((parent, attr, path, module))
    modules = {path: module for _, _, path, module in todo}
    grams = reconstruct or method == "sparsegpt"
    if sequential and todo:
        _prune_sequentially(model, modules, list(calibration), method, grams, target, report)
    else:
        measured = {}
        if (method != "magnitude" or reconstruct) and todo:
            measured = calibrate(model, modules, calibration, grams=grams, ignore_padding=ignore_padding)
        for path, module in modules.items():
            _prune_layer(dense_weight(module), path, method, measured.get(path), reconstruct, report)
    for parent, attr, path, module in todo:
        if convert:
            setattr(parent, attr, Sparse24Linear.from_dense(module))
            report.converted.append(path)
    log.info("%s", report)
    return report


def _check_prune_arguments(method: str, calibration, reconstruct: bool, sequential: bool,
                           target: Optional[str], ignore_padding: bool) -> str:
    """prune's arguments checked, with the way out; returns the target ("model" by default)."""
    if method not in METHODS:
        raise UnslothCompileError(f"unsloth_compile.sparsity.prune: method={method!r}; choose one of "
                                  f"{', '.join(METHODS)}")
    if target is not None and not sequential:
        raise UnslothCompileError(f"unsloth_compile.sparsity.prune: target={target!r} is what sequential pruning fits "
                                  "each layer to: pass sequential=True with it")
    target = "model" if target is None else target
    if target not in TARGETS:
        raise UnslothCompileError(f"unsloth_compile.sparsity.prune: target={target!r}; choose one of "
                                  f"{', '.join(TARGETS)}")
    if sequential and method == "magnitude" and not reconstruct:
        raise UnslothCompileError("unsloth_compile.sparsity.prune: sequential=True changes what calibration measures, "
                                  "and method='magnitude' without reconstruct=True measures nothing: use "
                                  "method='wanda' or 'sparsegpt', or reconstruct=True")
    if ignore_padding and method == "magnitude" and not reconstruct:
        raise UnslothCompileError("unsloth_compile.sparsity.prune: ignore_padding=True is about the calibration "
                                  "statistics, and method='magnitude' without reconstruct=True uses none")
    for needed, why in ((method == "wanda", "method='wanda' weighs |W| by each input feature's norm on them"),
                        (method == "sparsegpt", "method='sparsegpt' weighs and updates W by their Gram matrix"),
                        (reconstruct, "reconstruct=True refits the kept weights to the dense outputs on them")):
        if needed and calibration is None:
            raise UnslothCompileError(f"unsloth_compile.sparsity.prune: {why}: pass calibration= (batches for the "
                                      "model's forward)")
    return target


def _prune_sequentially(model: nn.Module, modules: dict[str, nn.Module], calibration: list, method: str,
                        grams: bool, target: str, report: SparsityReport) -> None:
    """Each group of layers (forward order) measured on the inputs of the model pruned so far,
    then pruned; for target "model" each pruned layer's dense weight is held until the end."""
    if not calibration:
        raise UnslothCompileError("unsloth_compile.sparsity.prune: sequential=True needs at least one calibration "
                                  "batch")
    groups = forward_groups(model, modules, calibration[0])
    shapes = {p: tuple(dense_weight(m).shape) for p, m in modules.items()}
    need = max(stats_bytes([shapes[p] for p in group], grams, target) for group in groups)
    if need > GRAM_BUDGET_BYTES:
        raise UnslothCompileError("unsloth_compile.sparsity: sequential pruning holds one group's float64 statistics "
                                  f"at once, {need / 2**30:.1f} GiB for the largest (limit "
                                  f"{GRAM_BUDGET_BYTES / 2**30:.0f} GiB, sparsity.pruning.GRAM_BUDGET_BYTES): use "
                                  "target='layer' (no K x N cross term), or prune the layers of a group in separate "
                                  "calls with select=")
    dense: dict[str, Tensor] = {}
    for group in groups:
        measured = group_stats(model, modules, group, calibration, lambda p: dense_weight(modules[p]), grams,
                               target, dense, report.ignore_padding)
        for path in group:
            if target == "model":
                dense[path] = modules[path].weight.detach().clone()
            _prune_layer(dense_weight(modules[path]), path, method, measured[path], report.reconstructed, report)


def _prune_layer(weight: Tensor, path: str, method: str, stats: Optional[LayerStats], reconstruct: bool,
                 report: SparsityReport) -> None:
    """Mask `weight` in place (a Conv1D's transposed view writes through to its (K, N) weight),
    refit or update its kept entries when `stats` has its Gram matrix, and record what it kept."""
    with torch.no_grad():
        dense = weight.detach().clone()
        score = dense.abs().float()
        if method == "wanda":
            score = score * stats.norms.to(score.device, torch.float32)
        gram = None if stats is None else stats.gram
        if gram is None:
            mask = transposable_mask(score)
            weight.mul_(mask)
        else:
            cross, energy = stats.cross, stats.target_energy
            if cross is None:  # the target is the dense layer on these inputs: B = H W0^T
                w0 = dense.to(gram.device, torch.float64)
                cross, energy = gram @ w0.t(), float(((w0 @ gram) * w0).sum())
            fit = dense_refit(dense, gram, cross) if stats.cross is not None else dense
            if method == "sparsegpt":
                mask, updated = obs_prune(fit, gram)
            else:
                mask, updated = transposable_mask(score), None
            if reconstruct:
                updated = reconstruct_kept(fit, mask, gram)
            masked_error = relative_error_to(dense * mask, gram, cross, energy)
            weight.copy_(dense * mask if updated is None else updated.to(weight.device, weight.dtype))
            report.output_error[path] = (masked_error, relative_error_to(weight, gram, cross, energy))
        report.energy[path] = kept_energy(dense, mask)
    log.info("unsloth_compile.sparsity: %s pruned 2:4 (%s), kept-weight energy %.4f%s", path, method,
             report.energy[path], _error_text(report.output_error.get(path)))


def _error_text(errors: Optional[tuple[float, float]]) -> str:
    """A layer's calibration output errors (masked, reconstructed) for the report and the log."""
    return "" if errors is None else f", calibration output error {errors[0]:.4f} masked -> {errors[1]:.4f} {_FINAL}"


_FINAL = "reconstructed"  # the weight as written: refit, or updated by OBS


def convert(model: nn.Module, select: Optional[Callable[[str, nn.Module], bool]] = None) -> SparsityReport:
    """Swap already pruned bases (a checkpoint saved after prune, say) for Sparse24Linear; a
    weight that is not 2:4 in both orientations is left as it is, with the reason."""
    report = SparsityReport("none")
    swap_layers(model, select, Sparse24Linear,
                lambda module: unsupported(module) or sparsity_problem(dense_weight(module)),
                Sparse24Linear.from_dense, report.refused, lambda layer: report.converted.append(layer.path))
    return report


def revert(model: nn.Module) -> int:
    """Every Sparse24Linear back to a dense layer with its pruned weight; returns how many."""
    return revert_layers(model, Sparse24Linear)
