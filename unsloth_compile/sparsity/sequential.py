"""Sequential calibration for 2:4 pruning (sparsity.prune(..., sequential=True)), as in
SparseGPT's and Wanda's sequential mode: the layers are pruned in the order the forward reaches
them, each measured on the inputs the already-pruned layers before it produce, so that the
error of the earlier layers is seen (and refit against) instead of compounding unseen.

Layers whose forward input is the same tensor (a block's query, key and value) form one group,
measured in one pass and pruned together; a pass over the calibration batches per group, each
forward stopped once the group's last layer has been reached. What a layer is fitted to
(`target`):

    "model"  the dense model's output of that layer, X W0^T with X its input in the dense model:
             the forward also runs with the dense weights swapped back in (a copy of each pruned
             layer's dense weight is held until the end), and the pass sums B = X~^T (X W0^T)
    "layer"  the dense layer applied to the pruned model's inputs, X~ W0^T (SparseGPT's choice)

Cost: per group one partial forward per batch ("layer") or two ("model"); only the group's
statistics are held at once (its Gram matrices, K x K float64 per layer, and for "model" B,
K x N), not every layer's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Container, Iterable, Optional

import torch
from torch import Tensor, nn

from ..errors import UnslothCompileError

TARGETS = ("model", "layer")


def run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def padding_mask(batch, ignore_padding: bool) -> Optional[Tensor]:
    """The batch's attention_mask as bool when padding is to be left out of the statistics."""
    if not ignore_padding:
        return None
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None:
        raise UnslothCompileError("unsloth_compile.sparsity.prune: ignore_padding=True leaves out the tokens a "
                                  "batch's attention_mask marks 0: pass batches as dicts with an attention_mask, or "
                                  "ignore_padding=False")
    return mask.bool()


def token_rows(x: Tensor, mask: Optional[Tensor], path: str) -> Tensor:
    """A layer's input (..., K) as (tokens, K) float64, only the tokens `mask` keeps. An input
    indexed by the mask's leading dimensions only (a pooler's (batch, K), one row per sequence)
    has no padding: every row is kept."""
    lead = tuple(x.shape[:-1])
    if mask is None or (len(lead) < mask.dim() and lead == tuple(mask.shape[:len(lead)])):
        return x.reshape(-1, x.shape[-1]).double()
    if lead != tuple(mask.shape):
        raise UnslothCompileError(f"unsloth_compile.sparsity.prune: ignore_padding=True, but {path}'s input is "
                                  f"{tuple(x.shape)}, which the attention_mask {tuple(mask.shape)} does not index: "
                                  "pass ignore_padding=False")
    return x[mask.to(x.device)].double()


@dataclasses.dataclass
class LayerStats:
    """What calibration measured at one layer's input X~ (float64): ||X~_j||_2 per input feature
    (Wanda), and when asked H = X~^T X~ and, for a target other than X~ W0^T, B = X~^T Y with
    ||Y||_F^2 (`target_energy`)."""
    norms: Tensor
    gram: Optional[Tensor] = None
    cross: Optional[Tensor] = None
    target_energy: Optional[float] = None


class _Reached(Exception):
    """Raised by the hook of a group's last layer: the rest of the forward is not needed."""


@contextlib.contextmanager
def eval_no_grad(model: nn.Module):
    """The model in eval mode without gradients for the block, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _run_until(model: nn.Module, batch, modules: dict[str, nn.Module], last: str,
               seen: Callable[[str, Tensor], None]) -> None:
    """Forward `batch` with `seen(path, x)` on each of `modules`' inputs, stopped after `last`'s."""
    def hook_for(path: str):
        def hook(_module, args):
            seen(path, args[0])  # not detached: forward_groups compares the objects
            if path == last:
                raise _Reached
        return hook

    handles = [m.register_forward_pre_hook(hook_for(p)) for p, m in modules.items()]
    try:
        run_batch(model, batch)
    except _Reached:
        pass
    finally:
        for handle in handles:
            handle.remove()


def forward_groups(model: nn.Module, modules: dict[str, nn.Module], batch) -> list[list[str]]:
    """`modules`' paths in the order the forward first reaches them, consecutive layers that
    take the same input tensor in one group. ValueError when the batch misses one."""
    calls: list[tuple[str, Tensor]] = []
    reached: set[str] = set()

    def seen(path: str, x: Tensor) -> None:
        if path not in reached:
            reached.add(path)
            calls.append((path, x))

    with eval_no_grad(model):
        _run_until(model, batch, modules, last="", seen=seen)
    require_reached(modules, reached)
    groups: list[list[str]] = []
    for i, (path, x) in enumerate(calls):
        if i and x is calls[i - 1][1]:
            groups[-1].append(path)
        else:
            groups.append([path])
    return groups


def require_reached(modules: Iterable[str], reached: Container[str]) -> None:
    """ValueError naming the modules the calibration forward never reached."""
    missing = [p for p in modules if p not in reached]
    if missing:
        raise UnslothCompileError("unsloth_compile.sparsity: the calibration batches never reached "
                                  f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: pass batches the "
                                  "model's forward takes")


@contextlib.contextmanager
def _dense_weights(modules: dict[str, nn.Module], dense: dict[str, Tensor]):
    """The pruned layers' dense weights swapped in (no copy), the pruned ones back after."""
    pruned = {p: modules[p].weight.data for p in dense}
    try:
        for p, w in dense.items():
            modules[p].weight.data = w
        yield
    finally:
        for p, w in pruned.items():
            modules[p].weight.data = w


def group_stats(model: nn.Module, modules: dict[str, nn.Module], group: list[str], calibration: Iterable,
                weights: Callable[[str], Tensor], grams: bool, target: str,
                dense: dict[str, Tensor], ignore_padding: bool = False) -> dict[str, LayerStats]:
    """One pass over the calibration batches measuring `group`'s inputs in the model as pruned so
    far; for target "model" also each batch's dense forward (`dense`: path -> the dense weight
    of each layer pruned so far). `weights(path)`: a layer's (N, K) weight, still dense."""
    members = {p: modules[p] for p in group}
    sums: dict[str, Tensor] = {}
    stats = {p: LayerStats(norms=torch.empty(0)) for p in group}

    def add(old: Optional[Tensor], part: Tensor) -> Tensor:
        return part if old is None else old + part

    with eval_no_grad(model):
        for batch in calibration:
            tokens = padding_mask(batch, ignore_padding)
            outputs: dict[str, Tensor] = {}
            if target == "model" and grams:  # B is for the refit and the error, which need H
                def keep_output(path: str, x: Tensor) -> None:
                    outputs.setdefault(path, token_rows(x, tokens, path) @ weights(path).double().t())
                with _dense_weights(modules, dense):
                    _run_until(model, batch, members, group[-1], keep_output)

            def measure(path: str, x: Tensor) -> None:
                x = token_rows(x, tokens, path)
                sums[path] = add(sums.get(path), x.pow(2).sum(0))
                s = stats[path]
                if grams:
                    s.gram = add(s.gram, x.t() @ x)
                if path in outputs:
                    y = outputs.pop(path)  # one call per forward: a second call is measured only
                    s.cross = add(s.cross, x.t() @ y)
                    s.target_energy = (s.target_energy or 0.0) + float(y.pow(2).sum())
            _run_until(model, batch, members, group[-1], measure)
    for path in group:
        stats[path].norms = sums[path].sqrt()
    return stats


def stats_bytes(weight_shapes: list[tuple[int, int]], grams: bool, target: str) -> int:
    """Float64 bytes of one group's statistics: H (K x K) per layer, and B (K x N) for "model"."""
    if not grams:
        return 0
    return sum(8 * k * k + (8 * k * n if target == "model" else 0) for n, k in weight_shapes)
