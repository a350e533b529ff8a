"""Saving after a rank change (unsloth_compile/rank/, PEFT config sync): a resized PEFT model
saved with save_pretrained reloads through PeftModel.from_pretrained to the same outputs.
Apart from tests/rank/test_rank.py to keep both files readable."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from helpers import batch_for, peft_wrap, tiny_causal_lm
from unsloth_compile.rank import RankController, set_rank, sync_peft_config
from unsloth_compile.report import collect_reports

OPTIONS = {"inner": "aot_eager"}


@pytest.fixture(autouse=True)
def _dynamo_settings():
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=256):
        yield


def _llama(seed: int = 0, **lora) -> nn.Module:
    """Tiny PEFT Llama; the same seed gives the same base weights, which is what a reload needs."""
    torch.manual_seed(seed)
    return peft_wrap(tiny_causal_lm("llama"), **lora)


def _train_step(model, forward, optimizer) -> None:
    model.train()
    forward(**batch_for("llama", seed=1)).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _reload(path, seed: int = 0) -> nn.Module:
    from peft import PeftModel

    torch.manual_seed(seed)
    return PeftModel.from_pretrained(tiny_causal_lm("llama"), str(path)).eval()


def _logits(forward, model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return forward(**batch_for("llama", seed=2)).logits


def _resize(case: str, model, optimizer):
    """The resizes of each case; returns (r, rank_pattern) expected in adapter_config.json."""
    layer = "model.layers.{}.{}"
    if case == "uniform-grow":
        set_rank(model, 8, optimizer=optimizer)
        return 8, {}
    if case == "uniform-shrink":
        set_rank(model, 2, optimizer=optimizer)
        return 2, {}
    # grow both q_proj, shrink one down_proj, take one k_proj (64 -> 32) to the manual bound 32
    set_rank(model, 8, modules=["*.q_proj"], optimizer=optimizer)
    set_rank(model, 2, modules=["*layers.1.mlp.down_proj"], optimizer=optimizer)
    set_rank(model, 32, modules=["*layers.0.self_attn.k_proj"], optimizer=optimizer)
    return 4, {layer.format(0, "self_attn.q_proj"): 8, layer.format(1, "self_attn.q_proj"): 8,
               layer.format(1, "mlp.down_proj"): 2, layer.format(0, "self_attn.k_proj"): 32}


@pytest.mark.parametrize("case,lora", [
    ("uniform-grow", {}), ("uniform-shrink", {}), ("mixed", {}), ("mixed", {"use_rslora": True}),
    # the user's own patterns: a regex rank_pattern is rewritten by full names, alpha_pattern kept
    ("mixed", {"rank_pattern": {"v_proj": 6}, "alpha_pattern": {"o_proj": 3}})],
    ids=["uniform-grow", "uniform-shrink", "mixed", "mixed-rslora", "mixed-user-patterns"])
def test_save_after_resize_reloads_the_same_model(tmp_path, case, lora):
    model = _llama(**lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    r, pattern = _resize(case, model, optimizer)
    _train_step(model, model, optimizer)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    if "rank_pattern" in lora:  # both v_proj stay at 6: written by their full names
        pattern |= {f"model.layers.{i}.self_attn.v_proj": 6 for i in (0, 1)}
    assert (saved["r"], saved["rank_pattern"]) == (r, pattern)
    assert saved["alpha_pattern"] == lora.get("alpha_pattern", {})
    reloaded = _reload(tmp_path)
    for name, module in model.named_modules():
        if hasattr(module, "scaling") and "default" in getattr(module, "r", {}):
            twin = reloaded.get_submodule(name)
            assert twin.r["default"] == module.r["default"], name
            assert twin.scaling["default"] == module.scaling["default"], name  # bit-identical float
    torch.testing.assert_close(_logits(reloaded, reloaded), _logits(model, model), rtol=0, atol=1e-6)


def test_policy_resize_of_a_compiled_model_reloads(tmp_path):
    """The importance policy gives layers different ranks while the model runs compiled (fused)."""
    model = _llama()
    compiled = torch.compile(model, backend="unsloth", options=OPTIONS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = RankController(compiled, optimizer, policy="importance", importance="svd", window=1,
                                init_rank=4, min_rank=2, max_rank=8)
    with collect_reports() as report:
        for _ in range(2):
            _train_step(model, compiled, optimizer)
            controller.step()
        _train_step(model, compiled, optimizer)
        expected = _logits(compiled, model)
    ranks = set(controller.ranks.values())
    assert len(ranks) > 1 and len(controller.events) >= 1, controller.ranks  # not uniform: rank_pattern
    assert report.refused == [] and report.counters["lora_linear.fused"] == 14 * report.graphs
    compiled.save_pretrained(tmp_path)  # OptimizedModule forwards to the PeftModel
    reloaded = _reload(tmp_path)
    assert reloaded.peft_config["default"].rank_pattern  # non-uniform ranks
    torch.testing.assert_close(_logits(reloaded, reloaded), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model, model), expected, rtol=1e-5, atol=1e-5)


def test_set_rank_on_a_compiled_model_reloads(tmp_path):
    model = _llama()
    compiled = torch.compile(model, backend="unsloth", options=OPTIONS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    _train_step(model, compiled, optimizer)
    set_rank(compiled, 6, modules=["*layers.0.*_proj"], optimizer=optimizer)
    set_rank(compiled, 3, modules=["*layers.1.mlp.*_proj"], optimizer=optimizer)
    with collect_reports() as report:
        _train_step(model, compiled, optimizer)
        expected = _logits(compiled, model)
    assert report.refused == [] and report.counters["lora_linear.fused"] == 14 * report.graphs
    model.save_pretrained(tmp_path)
    reloaded = _reload(tmp_path)
    torch.testing.assert_close(_logits(reloaded, reloaded), expected, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)

    def forward(self, x):
        return self.q(x)


class _Ambiguous(nn.Module):
    """Module names PEFT's suffix-regex keys confuse: `layers.0.q` is a dotted suffix of
    `x.layers.0.q`, and the key `h.1.q` (a '.' matches any character) also matches `h.1_q`."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block()])
        self.x = nn.Module()
        self.x.layers = nn.ModuleList([_Block()])
        self.h = nn.ModuleDict({"1": _Block(), "1_q": nn.Linear(16, 16)})

    def forward(self, x):
        return self.h["1_q"](self.h["1"](self.x.layers[0](self.layers[0](x))))


def test_rank_pattern_keys_are_unambiguous(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    def build():
        torch.manual_seed(0)
        return _Ambiguous()

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "1_q"], init_lora_weights=False)
    model = get_peft_model(build(), config)
    set_rank(model, 8, modules=["*layers.0.q", "*h.1.q"])
    set_rank(model, 2, modules=["*x.layers.0.q"])  # 8, 2, 8 and 4 (h.1_q): no rank is the majority...
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8  # ...the largest count wins: 8
    assert saved["rank_pattern"] == {"x.layers.0.q": 2, "h.1_q": 4}  # names in the model PEFT wrapped
    x = torch.randn(3, 16)
    reloaded = PeftModel.from_pretrained(build(), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-6)


def test_anchored_keys_when_a_short_name_has_the_odd_rank(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    def build():
        torch.manual_seed(0)
        return _Ambiguous()

    model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "1_q"],
                                               init_lora_weights=False))
    set_rank(model, 6, modules=["base_model.model.layers.0.q", "base_model.model.h.1.q"])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    # two 6s, two 4s: the tie keeps the configured r. Plain keys would give x.layers.0.q and h.1_q
    # rank 6 too on reload
    assert saved["r"] == 4 and saved["rank_pattern"] == {r"^layers\.0\.q": 6, r"^h\.1\.q": 6}
    x = torch.randn(3, 16)
    reloaded = PeftModel.from_pretrained(build(), str(tmp_path))
    assert reloaded.base_model.model.x.layers[0].q.r["default"] == 4
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=1e-6)


def test_resize_under_a_submodule_warns_and_sync_peft_config_repairs(tmp_path):
    model = _llama()
    with pytest.warns(UserWarning, match="not under a PeftModel.*sync_peft_config"):
        set_rank(model.base_model.model.model.layers[0], 6)
    assert model.peft_config["default"].r == 4
    sync_peft_config(model)
    assert model.peft_config["default"].r == 4 and len(model.peft_config["default"].rank_pattern) == 7
    model.save_pretrained(tmp_path)
    reloaded = _reload(tmp_path)
    torch.testing.assert_close(_logits(reloaded, reloaded), _logits(model, model), rtol=0, atol=1e-6)


def test_a_scaling_multiplier_is_reported():
    model = _llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.set_scale("default", 0.5)  # PEFT's runtime multiplier: scaling = 0.5 * alpha / r
    with pytest.warns(UserWarning, match="set_scale or scale_layer multiplier"):
        set_rank(model, 6, modules=[layer])
    assert layer.scaling["default"] == 0.5 * 8 / 6
