"""The LoRA layers whose rank can change: `find_lora_adapters` and `LoraAdapter`, one adapter of
one layer with its A, B, rank and scale, and the bounds of its rank.

Supported LoRA layers (anything else raises UnslothCompileError, a ValueError):
- PEFT `LoraLayer`s with `nn.Linear` adapters (Linear, Conv1D bases), no variant (DoRA, ...):
  `lora_A[a].weight`, `lora_B[a].weight`, `in/out_features`, `r[a]` and `scaling[a]` are updated.
- hand-written modules that follow this protocol (computing `base(x) + B(A(drop(x))) * scale`):
      lora_A     nn.Parameter of shape (r, in_features), or nn.Linear(in_features, r, bias=False)
      lora_B     nn.Parameter of shape (out_features, r), or nn.Linear(r, out_features)
      scale      float; set to alpha / r (alpha / sqrt(r) when use_rslora) after a resize
      alpha      optional float; when absent it is recorded as scale * r at the first resize
      use_rslora optional bool (default False); r: optional int, kept equal to the rank

Bounds: any resize takes a rank in [1, min(in, out)]; the policies stop at `rank_limit`, a fifth
of the smaller side.
"""

from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatchcase
from typing import Iterable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import UnslothCompileError

ModuleSpec = Union[str, nn.Module]


def rank_limit(in_features: int, out_features: int) -> int:
    """Largest rank the automatic policies give a layer: a fifth of its smaller side (above it an
    adapter stops being cheap next to its base layer). A manual `set_rank` may go up to
    min(in_features, out_features), where B A can still be any matrix of that shape."""
    return max(1, min(in_features, out_features) // 5)


def _is_peft_lora_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False
    return isinstance(module, LoraLayer)


def _follows_protocol(module: nn.Module) -> bool:
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    ok = (isinstance(a, nn.Parameter) or isinstance(a, nn.Linear)) and \
         (isinstance(b, nn.Parameter) or isinstance(b, nn.Linear))
    return ok and isinstance(getattr(module, "scale", None), (int, float)) and \
        not isinstance(getattr(module, "scale"), bool)


@dataclasses.dataclass(eq=False)
class LoraAdapter:
    """One adapter of one LoRA layer: `adapter` is the PEFT adapter name, None for a
    hand-written module that follows the protocol in this module's docstring."""

    name: str
    module: nn.Module
    adapter: Optional[str] = None

    def _slot(self, which: str) -> tuple[nn.Module, str]:
        """(owner, attribute) of the Parameter holding A (r, in) or B (out, r)."""
        if self.adapter is not None:
            return getattr(self.module, which)[self.adapter], "weight"
        holder = getattr(self.module, which)
        return (holder, "weight") if isinstance(holder, nn.Linear) else (self.module, which)

    @property
    def A(self) -> nn.Parameter:
        owner, attr = self._slot("lora_A")
        return getattr(owner, attr)

    @property
    def B(self) -> nn.Parameter:
        owner, attr = self._slot("lora_B")
        return getattr(owner, attr)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def limit(self) -> int:
        """The policies' bound (`rank_limit`)."""
        return rank_limit(self.in_features, self.out_features)

    @property
    def max_rank(self) -> int:
        """The bound of any resize: above min(in, out) extra rank adds nothing to B A."""
        return min(self.in_features, self.out_features)

    @property
    def use_rslora(self) -> bool:
        if self.adapter is not None:
            return bool(getattr(self.module, "use_rslora", {}).get(self.adapter, False))
        return bool(getattr(self.module, "use_rslora", False))

    @property
    def scale(self) -> float:
        if self.adapter is not None:
            return float(self.module.scaling[self.adapter])
        return float(self.module.scale)

    def _rank_norm(self, r: int) -> float:
        return math.sqrt(r) if self.use_rslora else float(r)

    def scale_for(self, r: int) -> float:
        """alpha / r (alpha / sqrt(r) with rsLoRA); computed from alpha each time so that going
        back to a rank gives back the bit-identical float (Dynamo guards on its value)."""
        if self.adapter is not None:
            alpha = float(self.module.lora_alpha[self.adapter])
            # keep a PEFT `set_scale` multiplier; exactly 1.0 in the usual case
            multiplier = self.scale * self._rank_norm(self.rank) / alpha if alpha else 1.0
            if abs(multiplier - 1.0) < 1e-9:
                multiplier = 1.0
            return multiplier * alpha / self._rank_norm(r)
        alpha = getattr(self.module, "alpha", None)
        if alpha is None:
            alpha = self.scale * self._rank_norm(self.rank)
        return float(alpha) / self._rank_norm(r)

    def check(self, sharded_ok: bool = False) -> None:
        """ValueError when this layer is a LoRA form we cannot resize (FSDP2 shards included,
        unless `sharded_ok`: a controller that rebuilds the sharded model to resize it)."""
        A, B = self.A, self.B
        if (layout := getattr(self.module, "_unsloth_tensor_parallel", None)) is not None:
            raise UnslothCompileError(f"unsloth_compile.rank: {self.name}: the adapter is split by tensor parallelism "
                                      f"({layout}: A and B are DTensor shards laid out with the base weight); resizing "
                                      "them is not supported: choose the rank before "
                                      "unsloth_compile.distributed.tensor_parallel.tensor_parallel, or change ranks "
                                      "under DDP (unsloth_compile.distributed)")
        if not sharded_ok and (_is_sharded(A) or _is_sharded(B)):
            raise UnslothCompileError(f"unsloth_compile.rank: {self.name}: the adapter is sharded by FSDP2 (DTensor "
                                      "parameters), and fully_shard's parameter groups cannot take new shapes in "
                                      "place; use unsloth_compile.distributed.ShardedRankController, which rebuilds "
                                      "the sharded model at the new ranks, choose the rank before sharding, or train "
                                      "under DDP")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UnslothCompileError(f"unsloth_compile.rank: {self.name}: lora_A {tuple(A.shape)} and lora_B "
                                      f"{tuple(B.shape)} are not (r, in) and (out, r) matrices")
        if self.adapter is not None:
            variant = getattr(self.module, "lora_variant", {}).get(self.adapter)
            if variant is not None or getattr(self.module, "use_dora", {}).get(self.adapter, False):
                raise UnslothCompileError(f"unsloth_compile.rank: {self.name}: PEFT LoRA variants (DoRA, ...) cannot "
                                          "be resized; leave this layer out of `modules`")

    def replace(self, A: Tensor, B: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
        """Put new A (r', in) and B (out, r') Parameters and the matching scale on the module."""
        r = int(A.shape[0])
        scale = self.scale_for(r)
        if self.adapter is None and getattr(self.module, "alpha", None) is None:
            self.module.alpha = self.scale * self._rank_norm(self.rank)
        new = []
        for which, value, old in (("lora_A", A, self.A), ("lora_B", B, self.B)):
            # contiguous: Dynamo guards on strides too, and the SVD's A' comes out transposed
            param = nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
            mark_static_if_needed(param)
            owner, attr = self._slot(which)
            setattr(owner, attr, param)
            if isinstance(owner, nn.Linear):
                setattr(owner, "out_features" if which == "lora_A" else "in_features", r)
            new.append(param)
        if self.adapter is not None:
            self.module.r[self.adapter] = r
            self.module.scaling[self.adapter] = scale
        else:
            self.module.scale = scale
            if isinstance(getattr(self.module, "r", None), int):
                self.module.r = r
        return new[0], new[1]


def _is_sharded(param: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(param, DTensor)


def mark_static_if_needed(param: Tensor) -> None:
    """One graph per rank even with force_parameter_static_shapes=False (automatic dynamic
    shapes would otherwise make the rank symbolic). Only then: a marked tensor fails the guards
    of a graph compiled on an unmarked one ("_has_dynamo_dim_marking"), one more recompile."""
    if not torch._dynamo.config.force_parameter_static_shapes:
        torch._dynamo.mark_static(param)


def _peft_adapters(name: str, module: nn.Module, adapter_name: Optional[str]) -> list[LoraAdapter]:
    names = [adapter_name] if adapter_name is not None else list(module.active_adapters)
    out = []
    for a in names:
        if a not in module.lora_A or not isinstance(module.lora_A[a], nn.Linear):
            raise UnslothCompileError(f"unsloth_compile.rank: {name} is a PEFT LoRA layer without a Linear adapter "
                                      f"{a!r} (LoRA on embeddings/convolutions cannot be resized)")
        out.append(LoraAdapter((name or "<root>") if len(names) == 1 else f"{name}[{a}]", module, a))
    return out


def find_lora_adapters(model: nn.Module, modules: Optional[Iterable[ModuleSpec]] = None,
                       adapter_name: Optional[str] = None, sharded_ok: bool = False) -> list[LoraAdapter]:
    """The LoRA adapters to resize: every LoRA layer of `model` (modules=None), or the given
    modules (objects, qualified names, or fnmatch patterns of names). ValueError for a module
    that is not a supported LoRA layer or a name that matches nothing."""
    named = list(model.named_modules())
    by_id = {id(m): n for n, m in named}
    if modules is None:
        picked = [(n, m) for n, m in named
                  if (_is_peft_lora_layer(m) and any(isinstance(l, nn.Linear) for l in m.lora_A.values()))
                  or _follows_protocol(m)]
    else:
        picked = []
        for spec in ([modules] if isinstance(modules, (str, nn.Module)) else modules):
            if isinstance(spec, nn.Module):
                if id(spec) not in by_id:
                    raise UnslothCompileError(f"unsloth_compile.rank: module {type(spec).__name__} is not part of the "
                                              "model")
                picked.append((by_id[id(spec)], spec))
                continue
            hits = [(n, m) for n, m in named if n == spec or fnmatchcase(n, spec)]
            if not hits:
                raise UnslothCompileError(f"unsloth_compile.rank: no module of the model is named {spec!r}; pass names "
                                          "from model.named_modules() or fnmatch patterns of them")
            picked.extend(hits)
    adapters, seen = [], set()
    for name, module in picked:
        if id(module) in seen:
            continue
        seen.add(id(module))
        if _is_peft_lora_layer(module):
            adapters.extend(_peft_adapters(name, module, adapter_name))
        elif _follows_protocol(module):
            adapters.append(LoraAdapter(name or "<root>", module))
        else:
            raise UnslothCompileError(f"unsloth_compile.rank: {name or '<root>'} ({type(module).__name__}) is not a "
                                      "LoRA layer: expected a PEFT LoraLayer or a module with lora_A/lora_B "
                                      "(Parameters or nn.Linear) and a float `scale` (see the docstring of "
                                      "unsloth_compile.rank.adapters)")
    for adapter in adapters:
        adapter.check(sharded_ok)
    if not adapters:
        raise UnslothCompileError("unsloth_compile.rank: the model has no LoRA layer to resize; add LoRA adapters "
                                  "(peft.get_peft_model) before building the controller")
    return adapters

