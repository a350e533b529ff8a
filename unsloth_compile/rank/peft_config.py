"""PEFT's LoraConfig after a rank change: what `save_pretrained` writes must rebuild the resized
layers on `PeftModel.from_pretrained`.

PEFT saves the adapter weights as they are, and the shapes to build on reload from the config:
`r`, and `rank_pattern` / `alpha_pattern` (key -> value) whose keys it matches as regexes
against each module name or any dotted suffix of it, taking the first key that matches
(peft 0.21 `get_pattern_key`: `re.match(rf"(.*\\.)?({key})$", name)`), with the keys in the order
of the saved JSON, which `save_pretrained` writes sorted. unsloth_compile.rank keeps
`lora_alpha` fixed on a resize and sets scaling = alpha / r (alpha / sqrt(r) under rsLoRA), the
formula PEFT applies on reload, so the ranks decide everything; `alpha_pattern` is only rewritten
where the user's own no longer gives a layer its alpha. A layer whose scaling carries a PEFT
`set_scale` multiplier is reported: PEFT never saves it.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Optional, Sequence

from torch import nn


def _pattern_key_matcher():
    """PEFT's rule for which rank_pattern / alpha_pattern key a module name takes (the first key
    that, as a regex, matches the whole name or a dotted suffix of it; else the name itself), from
    the installed PEFT so that what we check is what `from_pretrained` will do."""
    try:
        from peft.utils.other import get_pattern_key
        return get_pattern_key
    except ImportError:  # moved in some PEFT version: peft 0.21's rule
        return lambda keys, name: next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), name)


def _resolve(pattern: dict, name: str, default: Any, match) -> Any:
    """The value a reloaded config gives `name`: save_pretrained writes the keys sorted."""
    return pattern.get(match(sorted(pattern), name), default)


def _full_name_pattern(values: dict[str, Any], default: Any, match) -> Optional[dict[str, Any]]:
    """A rank_pattern / alpha_pattern under which PEFT gives every module of `values` its value,
    whatever the order of its keys (save_pretrained writes them sorted; PEFT takes the first key
    that matches): full module names (as PEFT's own EVA and conversion code write them) for the
    modules whose value is not `default`. PEFT matches a key as a regex against the name or any
    dotted suffix of it, so a key that would also catch another module with another value
    (`layers.0.q` inside `x.layers.0.q`, or `h.1.q` catching `h.1_q`) is written anchored and
    escaped, `^layers\\.0\\.q`, which matches its own module only. None if that still fails."""
    pattern = {n: v for n, v in values.items() if v != default}

    def catches(key: str, name: str) -> bool:
        return match([key], name) == key

    for key in list(pattern):
        if any(catches(key, n) and v != pattern[key] for n, v in values.items()):
            pattern[f"^{re.escape(key)}"] = pattern.pop(key)
    for name, value in values.items():
        hits = {v for k, v in pattern.items() if catches(k, name)}
        if hits != {value} and (hits or value != default):
            return None
    return pattern


def _peft_roots(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """(root, {adapter name: config}) for each PEFT injection in `model`: a tuner (the LoraModel
    under a PeftModel) matched target names in `tuner.model`; transformers' PEFT integration
    (`model.add_adapter` / `load_adapter`) in the transformers model itself."""
    try:
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError:
        return []
    roots = []
    for m in model.modules():
        if isinstance(m, BaseTuner) and isinstance(getattr(m, "peft_config", None), dict):
            roots.append((m.model, m.peft_config))
        elif getattr(m, "_hf_peft_config_loaded", False) and isinstance(getattr(m, "peft_config", None), dict):
            roots.append((m, m.peft_config))
    return roots


def _sync_adapter_config(root: nn.Module, config: Any, adapter: str) -> None:
    """Write the ranks of `adapter`'s layers under `root` into its LoraConfig (see sync_peft_config)."""
    from peft.tuners.lora import LoraLayer  # a root exists only where PEFT is installed

    layers = {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "r", {})}
    if not layers:
        return
    match = _pattern_key_matcher()
    ranks = {n: int(m.r[adapter]) for n, m in layers.items()}
    alphas = {n: m.lora_alpha[adapter] for n, m in layers.items()}
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    # the most common rank becomes `r` (all of them when uniform: rank_pattern is then empty)
    r = max(counts, key=lambda v: (counts[v], v == config.r, -v))
    rank_pattern = _full_name_pattern(ranks, r, match)
    # a resize keeps every lora_alpha (the scale follows alpha / r): the user's alpha_pattern stays
    # unless it no longer gives a layer its alpha
    alpha_pattern = dict(config.alpha_pattern or {})
    if any(_resolve(alpha_pattern, n, config.lora_alpha, match) != a for n, a in alphas.items()):
        alpha_pattern = _full_name_pattern(alphas, config.lora_alpha, match)
    if rank_pattern is None or alpha_pattern is None:
        warnings.warn(f"unsloth_compile.rank: no rank_pattern/alpha_pattern of full module names gives every "
                      f"layer of adapter {adapter!r} its rank under PEFT's suffix-regex matching (module names "
                      f"that differ only where another has a '.'); its LoraConfig is left as it was, so "
                      f"save_pretrained writes ranks that do not reload. Rename the modules or save the "
                      f"state dict yourself.", stacklevel=4)
        return
    config.r, config.rank_pattern, config.alpha_pattern = r, rank_pattern, alpha_pattern
    _check_saved_scaling(layers, ranks, alphas, config, adapter)


def _check_saved_scaling(layers: dict, ranks: dict, alphas: dict, config: Any, adapter: str) -> None:
    """PEFT rebuilds scaling as lora_alpha / r (/ sqrt(r) under rsLoRA), the formula scale_for
    uses; a layer whose scaling differs carries a set_scale/scale_layer multiplier, which PEFT
    does not save (with or without a resize)."""
    norm = math.sqrt if config.use_rslora else float
    off = [n for n, m in layers.items() if alphas[n] / norm(ranks[n]) != m.scaling[adapter]]
    if off:
        warnings.warn(f"unsloth_compile.rank: adapter {adapter!r}: the scaling of {off[:3]}"
                      f"{' and others' if len(off) > 3 else ''} is not lora_alpha / r (a PEFT set_scale or "
                      f"scale_layer multiplier); PEFT does not save it, so a reloaded model scales these layers "
                      f"by lora_alpha / r. Undo the multiplier before saving to silence this.", stacklevel=4)


def sync_peft_config(model: nn.Module, adapter_name: Optional[str] = None) -> None:
    """Write the current ranks of PEFT LoRA layers into their LoraConfig (`r` when every layer of
    an adapter shares one rank, else the most common rank as `r` and `rank_pattern` by full
    module name; `alpha_pattern` only where it no longer gives a layer its lora_alpha), so that
    `save_pretrained` + `PeftModel.from_pretrained` rebuild the same shapes and scaling.
    `set_rank` and `RankController` call it after every resize; call it yourself after changing
    ranks by other means. `model`: the PeftModel (or a model containing it, compiled or not)."""
    for root, configs in _peft_roots(model):
        for adapter, config in configs.items():
            if adapter_name in (None, adapter) and hasattr(config, "rank_pattern") and hasattr(config, "lora_alpha"):
                _sync_adapter_config(root, config, adapter)


def sync_after_resize(model: nn.Module, plans: Sequence[Any]) -> None:
    """Sync the LoraConfig of every adapter that `plans` (rank.Resize) resized; warn for PEFT
    layers resized under a module that does not reach their PEFT config (their checkpoint would
    keep the old ranks)."""
    pending = {(id(p.adapter.module), p.adapter.adapter): p.adapter.name for p in plans if p.adapter.adapter}
    for root, configs in _peft_roots(model) if pending else ():
        ids = {id(m) for m in root.modules()}
        for adapter in {a for m, a in pending if m in ids}:
            config = configs.get(adapter)
            if hasattr(config, "rank_pattern") and hasattr(config, "lora_alpha"):
                _sync_adapter_config(root, config, adapter)
                pending = {k: v for k, v in pending.items() if k[1] != adapter or k[0] not in ids}
    if pending:
        warnings.warn(f"unsloth_compile.rank: resized PEFT layers {sorted(pending.values())[:3]} are not under a "
                      f"PeftModel (or transformers PEFT model) reachable from the module given, so their "
                      f"LoraConfig still holds the old rank and save_pretrained would write a checkpoint that "
                      f"does not reload. Pass the PeftModel, or call unsloth_compile.rank.sync_peft_config"
                      f"(peft_model) before saving.", stacklevel=3)
