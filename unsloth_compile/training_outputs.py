"""`unsloth_compile.loss_only(model)`: a training forward that returns the loss without the logits.

A transformers causal LM returns `logits` beside `loss` (`CausalLMOutputWithPast`), so the
graph Dynamo captures outputs the full (batch, seq, vocab) logits, and the fused linear +
cross-entropy pass cannot drop them: it keeps the site and says so. When the training loop
reads only `.loss` (as Trainer does), wrapping the model's forward so that a training call
with labels returns its output without `logits` lets Dynamo drop them from the graph, and the
pass fuse the head with the loss (what Unsloth and Liger obtain by patching each model's
forward; here one wrapper serves every model whose output is a `ModelOutput` or a dict).

    model = unsloth_compile.loss_only(model)         # in place; returns the model
    model = torch.compile(model, backend="unsloth")  # or unsloth_compile.compile(model)
    loss = model(input_ids=ids, labels=labels).loss  # out.logits is None in training

What it changes, and only this: in training mode (`model.training`), a call whose output holds
a loss returns that output without `logits` (the same class, `logits` left None). Eval-mode
calls (Trainer's evaluation and prediction, generate) return the logits as before. Code that
reads `outputs.logits` while training (a metric computed from the training logits) needs them:
do not use `loss_only` there.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Mapping

import torch



def _without_logits(output):
    if not isinstance(output, Mapping) or "logits" not in output or output.get("loss") is None:
        return output
    fields = {k: v for k, v in output.items() if k != "logits"}
    return type(output)(**fields)


_INNER = "_unsloth_loss_only_inner"  # an instance-level forward set before loss_only (a hook's), or None
_MARK = "_unsloth_loss_only"


def _loss_only_forward(self, *args, **kwargs):
    inner = getattr(self, _INNER, None)
    output = inner(*args, **kwargs) if inner is not None else type(self).forward(self, *args, **kwargs)
    return _without_logits(output) if self.training else output


def _installed(model: torch.nn.Module) -> bool:
    forward = model.__dict__.get("forward")
    return getattr(getattr(forward, "__func__", None), _MARK, False)


def loss_only(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model`'s training forward return its loss output without `logits` (in place,
    idempotent; `restore_logits(model)` undoes it)."""
    if _installed(model):
        return model
    setattr(model, _INNER, model.__dict__.get("forward"))
    # A method bound to the model: Dynamo traces it with `self` as the model (sites keep their
    # usual module paths) and copy.deepcopy rebinds it to the copy. A function of its own per
    # model carries the model's signature, which Trainer reads to pick the batch's columns.
    func = types.FunctionType(_loss_only_forward.__code__, _loss_only_forward.__globals__, "forward")
    func.__signature__ = inspect.signature(type(model).forward)
    func.__doc__ = type(model).forward.__doc__
    setattr(func, _MARK, True)
    model.forward = types.MethodType(func, model)
    return model


def restore_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `loss_only(model)`: the forward returns the logits again (a compiled model
    recompiles on its next call)."""
    if _installed(model):
        inner = getattr(model, _INNER)
        del model.forward
        if inner is not None:
            model.forward = inner
        delattr(model, _INNER)
    return model
