"""One line to compile a model with the unsloth backend, and a `transformers.Trainer` callback.

    model = unsloth_compile.compile(model)                           # in place, returns model
    trainer = Trainer(model=model, ..., callbacks=[UnslothCompileCallback()])   # or TRL's SFTTrainer

Why in place: `torch.compile(model)` returns an `OptimizedModule` wrapper whose `forward` takes
`(*args, **kwargs)`; `Trainer` reads that signature to keep dataset columns, keeps none ("The
batch received was empty ... args,kwargs"). `nn.Module.compile` compiles the module's `__call__`
and leaves its class, `forward` signature, `state_dict` keys and `save_pretrained` as they were.
`TrainingArguments(torch_compile_backend="unsloth")` cannot work either: accelerate accepts only
the backends of its `DynamoBackend` enum.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Mapping, Optional

import torch

from .backend import unsloth
from .checkpoint_tracing import ignore_transformers_warning_once
from .config import CompileRegions, Config, Fp8Layers, KernelChoice, Nf4Layers, Precision
from .input_grads_hook import keep_out_of_graph
from .length_buckets import LengthBuckets
from .regions import compile_layers
from .report import publish
from .summary import SummaryLedger
from .trl_support import compile_target, find_fused_lm_head, keeps_lm_head_dense
from .errors import UnslothCompileError


def _merge_options(options: Optional[Mapping[str, Any]], option_kwargs: Mapping[str, Any],
                   mode: Optional[str]) -> dict:
    """options and keyword options as one dict, validated: the ValueError comes now, not wrapped
    in BackendCompilerFailed after Dynamo has traced the model at the first call."""
    merged = dict(options or {})
    twice = sorted(merged.keys() & option_kwargs.keys())
    if twice:
        raise UnslothCompileError(f"unsloth_compile: option(s) {', '.join(map(repr, twice))} given both in options= "
                                  "and as keyword arguments; give each once")
    merged.update(option_kwargs)
    Config.from_options(merged, mode)
    return merged


def compile(model: torch.nn.Module, options: Optional[Mapping[str, Any]] = None, *, mode: Optional[str] = None,
            fullgraph: bool = False, dynamic: Optional[bool] = None, **option_kwargs: Any) -> torch.nn.Module:
    """Compile `model` in place with the unsloth backend (`model.compile(...)`) and return it.

    Options come as a dict, as keywords, or both (`compile(model, inner="aot_eager")`); they are
    validated here, before anything is traced. Unlike `torch.compile`, `mode` and `options` may
    be given together. `fullgraph` and `dynamic` are `torch.compile`'s. A model that is already
    `torch.compile`'s wrapper is unwrapped: its module is compiled in place and returned. The
    one-line summary keeps running totals for this model alone. With precision="fp8" the LoRA
    layers' frozen bases (with fp8_layers="all": every frozen linear) are first stored in fp8
    (`unsloth_compile.fp8.convert`), in place; with precision="nf4" (nf4_layers likewise) stored in
    4-bit NF4 (`unsloth_compile.nf4.convert`), and bitsandbytes Linear4bit layers are taken over as
    they are stored whatever the precision (the summary line says so). A model whose forward a TRL trainer replaced by
    its fused LM head has its backbone compiled and the head left to run as in eager
    (`unsloth_compile.trl_support`); compile such a model after building the trainer, or use the
    callback. With compile_regions="layers", each repeated block (decoder layer) is compiled once
    for all blocks of its class and the rest of the model around them (`unsloth_compile.regions`).
    """
    options = _merge_options(options, option_kwargs, mode)
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = model._orig_mod
    if not isinstance(model, torch.nn.Module):
        raise UnslothCompileError(f"unsloth_compile.compile: expected a torch.nn.Module, got {type(model).__name__}; "
                                  "for a function use torch.compile(fn, backend='unsloth')")
    cfg = Config.from_options(options, mode)
    trl_head = find_fused_lm_head(model)
    _store_nf4(model, cfg, trl_head)
    if cfg.precision is Precision.FP8:  # in place, as the compile: the bf16 bases are freed
        from .fp8 import convert, frozen_linears

        select = frozen_linears if cfg.fp8_layers is Fp8Layers.ALL else None
        if select is not None and trl_head is not None:
            select = keeps_lm_head_dense(trl_head, select)
        convert(model, select=select, allow_emulation=cfg.kernels is KernelChoice.REFERENCE)
    # before the first trace, where transformers was imported after unsloth_compile: graph breaks otherwise
    ignore_transformers_warning_once()
    publish(keep_out_of_graph(model), log_it=cfg.report)
    target = compile_target(model, trl_head, report_it=cfg.report, summary=cfg.summary)
    backend_options = {k: v for k, v in options.items() if k != "compile_regions"}  # said here, not per graph
    backend = functools.partial(unsloth, options=backend_options, mode=mode, ledger=SummaryLedger())
    compiled_call = None
    if cfg.compile_regions is CompileRegions.LAYERS:  # None where the model has no repeated block (said)
        compiled_call = compile_layers(target, backend, fullgraph=fullgraph, dynamic=dynamic, report_it=cfg.report,
                                       summary=cfg.summary)
    if compiled_call is None:  # what nn.Module.compile does
        compiled_call = torch.compile(target._call_impl, backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    # the length buckets around the compiled call, outside the graph
    target._compiled_call_impl = LengthBuckets(target, compiled_call) if cfg.bucket_lengths else compiled_call
    return model


def _store_nf4(model: torch.nn.Module, cfg: Config, trl_head) -> None:
    """The 4-bit conversion of compile: in place, the bf16 bases freed; the report at INFO, its
    first line on the summary logger."""
    from .nf4 import compile_select, convert

    select = compile_select(model, cfg.precision is Precision.NF4, cfg.nf4_layers is Nf4Layers.ALL)
    if select is None:
        return
    if trl_head is not None:
        select = keeps_lm_head_dense(trl_head, select)
    report = convert(model, select=select)
    logging.getLogger("unsloth_compile").info("%s", report)
    if cfg.summary:
        logging.getLogger("unsloth_compile.summary").info("%s", str(report).splitlines()[0])


def _make_compile_callback():
    from transformers import TrainerCallback

    class UnslothCompileCallback(TrainerCallback):
        """Compiles the Trainer's model in place with the unsloth backend when training begins.

        `UnslothCompileCallback(options=None, mode=None, fullgraph=False, dynamic=None, **options)`
        takes what `unsloth_compile.compile` takes, validated when the callback is built. Works with
        any `transformers.Trainer` subclass (TRL's `SFTTrainer`, ...): it only uses `on_train_begin`
        and the model the Trainer hands to callbacks (its own model, not accelerate's wrapper).
        Leave `TrainingArguments.torch_compile` off: that would compile a second time, with Inductor.
        """

        def __init__(self, options: Optional[Mapping[str, Any]] = None, *, mode: Optional[str] = None,
                     fullgraph: bool = False, dynamic: Optional[bool] = None, **option_kwargs: Any):
            self.options = _merge_options(options, option_kwargs, mode)
            self.compile_kwargs = {"mode": mode, "fullgraph": fullgraph, "dynamic": dynamic}
            self._compiled: weakref.WeakSet = weakref.WeakSet()  # a second train() keeps its graphs

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is None:
                raise UnslothCompileError("unsloth_compile.UnslothCompileCallback: the Trainer passed model=None to "
                                          "on_train_begin; give the Trainer its model")
            if model not in self._compiled:
                self._compiled.add(compile(model, self.options, **self.compile_kwargs))

    return UnslothCompileCallback


def __getattr__(name: str) -> Any:
    # UnslothCompileCallback subclasses transformers.TrainerCallback: built on first use so that
    # importing unsloth_compile does not import transformers
    if name == "UnslothCompileCallback":
        cls = _make_compile_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
