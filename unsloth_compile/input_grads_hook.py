"""The input-gradient hook of gradient checkpointing, kept out of the compiled graph.

transformers' `gradient_checkpointing_enable` / `activation_checkpointing_enable` (and PEFT's
`prepare_model_for_kbit_training`) register a forward hook on the input embeddings,
`make_inputs_require_grads`, that calls `output.requires_grad_(True)`. Reentrant checkpointing
needs it: a reentrant segment computes gradients only when one of its inputs requires them, and
with frozen embeddings none would. Under torch.compile, `requires_grad_()` on an intermediate
that leaves the graph is a graph break: the model is cut at its embeddings, the causal mask
reaches the layers' graph as an input (its attention rewrites no longer apply), and the loss is
computed in another graph than the head (the fused cross-entropy no longer applies).

Non-reentrant checkpointing, transformers' default since 5.0, needs no such input: a segment's
outputs require gradients whenever a parameter inside does (the adapters). Where every
checkpointed layer of the model is non-reentrant (or none is checkpointed), each such hook is
made to do nothing while Dynamo traces, and to run as before outside a compiled graph (eager
calls, evaluation in eager, the model after `torch.compiler.reset()`): the hook stays registered
and transformers' `disable_input_require_grads` still removes it. Where a layer is reentrant (or
its checkpoint function does not say), the hook is kept and the report says why.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .report import Report, Site

PATTERN = "input_grads_hook"
# transformers' enable_input_require_grads and PEFT's prepare_model_for_kbit_training name their hooks so
HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")


def input_grad_hooks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
    """(module path, module, hook id) of every input-gradient forward hook in `model`."""
    found = []
    for path, module in model.named_modules():
        for hook_id, hook in module._forward_hooks.items():
            original = getattr(hook, "__wrapped__", hook)
            if getattr(original, "__name__", None) in HOOK_NAMES:
                found.append((path, module, hook_id))
    return found


def checkpoint_kinds(model: torch.nn.Module) -> set[str]:
    """How the model's checkpointed layers checkpoint: "non-reentrant", "reentrant" or
    "unknown" (a checkpoint function that does not say), from transformers' per-layer
    `_gradient_checkpointing_func` (a functools.partial of torch.utils.checkpoint.checkpoint)."""
    kinds = set()
    for module in model.modules():
        if not getattr(module, "gradient_checkpointing", False):
            continue
        func = getattr(module, "_gradient_checkpointing_func", None)
        reentrant = func.keywords.get("use_reentrant") if isinstance(func, functools.partial) else None
        kinds.add("unknown" if reentrant is None else "reentrant" if reentrant else "non-reentrant")
    return kinds


def skipped_while_compiling(hook: Callable) -> Callable:
    """`hook`, doing nothing while Dynamo traces."""

    @functools.wraps(hook)
    def run(module: torch.nn.Module, args: Any, output: Any) -> Any:
        if torch.compiler.is_compiling():
            return None
        return hook(module, args, output)

    run._unsloth_skipped_while_compiling = True
    return run


def keep_out_of_graph(model: torch.nn.Module) -> Report:
    """Make `model`'s input-gradient hooks do nothing while compiling, where its checkpointing
    allows (module docstring); the report has one site per hook, rewritten or kept with the reason."""
    report = Report()
    hooks = input_grad_hooks(model)
    if not hooks:
        return report
    kinds = checkpoint_kinds(model)
    unsafe = kinds - {"non-reentrant"}
    for path, module, hook_id in hooks:
        hook = module._forward_hooks[hook_id]
        where = path or "(model)"
        if unsafe:
            report.add(Site(module=where, pattern=PATTERN, decision="kept", reason=(
                f" the model has {' and '.join(sorted(unsafe))} checkpointed layers, which need inputs that "
                "require grad; under compile it cuts the graph at the embeddings (pass "
                "gradient_checkpointing_kwargs={'use_reentrant': False} to keep one graph)")))
            continue
        if not getattr(hook, "_unsloth_skipped_while_compiling", False):
            module._forward_hooks[hook_id] = skipped_while_compiling(hook)
        report.add(Site(module=where, pattern=PATTERN, decision="rewritten", reason=(
            "make_inputs_require_grads does nothing while compiling: "
            + ("non-reentrant checkpointing needs no input that requires grad" if kinds
               else "no layer is checkpointed"))))
        report.counters[f"{PATTERN}.skipped_while_compiling"] += 1
    return report
