"""`bench profile` on real batches: lengths drawn per sequence, padded and packed variants, BERT
batch spellings. Each profile reports its compiles (recompiles with their reasons), the real
tokens of its profiled steps, the timed kernel choices, and (--compile-profile) the compiler's
phases per warm-up step; its files are named after the lengths, layouts and spelling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from unsloth_compile.bench import compile_costs, e2e, profile
from unsloth_compile.bench.__main__ import main

pytestmark = pytest.mark.slow


@pytest.fixture
def one_layer(monkeypatch):
    """The tiny presets with one layer: Dynamo traces half as much, and what is tested stays."""
    for name in ("tiny", "tiny-bert"):
        preset = e2e.PRESETS[name]
        monkeypatch.setitem(e2e.PRESETS, name,
                            dataclasses.replace(preset, config={**preset.config, "num_hidden_layers": 1}))


@pytest.fixture
def fed(monkeypatch) -> dict[str, list[dict]]:
    """The batches of every profiled step, per variant name, as the steps received them."""
    fed: dict[str, list[dict]] = {}
    current = []
    original_variant, original_step = profile.profile_variant, profile.phased_train_step

    def tagged_variant(preset, variant, *args, **kwargs):
        current.append(variant.name)
        return original_variant(preset, variant, *args, **kwargs)

    def recording_step(step_fn, batch, *args):
        fed.setdefault(current[-1], []).append(batch)
        return original_step(step_fn, batch, *args)

    monkeypatch.setattr(profile, "profile_variant", tagged_variant)
    monkeypatch.setattr(profile, "phased_train_step", recording_step)
    return fed


def test_profile_of_varying_lengths_reports_compiles_real_tokens_and_phases(tmp_path, one_layer, fed):
    """Tiny Llama, lengths 8-64, PEFT eager on padded batches and the backend on packed ones, the
    warm-up under --compile-profile: the real tokens are those the profiled steps received, the
    compiles are counted, the files are named after the lengths and layouts, and the roofline
    (whose formulas assume full rows) is skipped with its reason."""
    assert main(["profile", "--preset", "tiny", "--device", "cpu", "--inner", "eager", "--steps", "1",
                 "--warmup", "1", "--lengths", "uniform:8-64", "--variants", "peft-eager,peft+unsloth@packed",
                 "--compile-profile", "--out", str(tmp_path)]) == 0
    name = "profile-tiny-uniform8-64-padded-packed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.md"]  # no roofline
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["lengths"] == "uniform:8-64" and data["real_data"] is True and data["layouts"] == ["padded", "packed"]
    results = {r["variant"]["name"]: r for r in data["results"]}
    assert list(results) == ["peft-eager", "peft+unsloth@packed"]
    for variant, r in results.items():
        assert r["status"] == "ok", r.get("traceback")
        batches = fed[variant]
        assert r["batch_shapes"] == [list(b["input_ids"].shape) for b in batches] and len(batches) == 1
        if r["variant"]["layout"] == "packed":
            assert all(b["input_ids"].shape[0] == 1 and "attention_mask" not in b for b in batches)
            tokens = [b["input_ids"].numel() for b in batches]
        else:
            assert all(b["input_ids"].shape[0] == 2 for b in batches)  # the preset's rows
            tokens = [int(b["attention_mask"].sum()) for b in batches]
            assert sum(tokens) < sum(b["input_ids"].numel() for b in batches)  # pads are not counted
        assert r["real_tokens_per_step"] == tokens
        assert r["real_tokens_per_s"] == pytest.approx(sum(tokens) / (sum(r["step_wall_ms"]) / 1e3), rel=1e-2)
        assert "skipped" in r["roofline_note"] and "roofline" not in r
        assert set(r["timed_choices"]) >= {"made", "earlier", "row_buckets"}
        assert compile_costs.count_made(r["timed_choices"]) == 0  # no CUDA kernel is timed on a CPU
        (warmup,) = r["warmup_steps"]
        assert set(warmup["phases_ms"]) == {p for p, _, _ in compile_costs.COMPILER_FUNCTIONS}
    assert results["peft-eager"]["compiles"] == {"dynamo_graphs": 0, "frames": [], "recompiles": 0}
    compiled = results["peft+unsloth@packed"]
    compiles, (warmup,) = compiled["compiles"], compiled["warmup_steps"]
    assert compiles["dynamo_graphs"] >= warmup["dynamo_graphs"] >= 1 and len(compiles["frames"]) >= 1
    assert compiles["recompiles"] == sum(f["recompile_reason"] is not None for f in compiles["frames"])
    # the first step compiles: Dynamo's frame compile holds the backend, which holds the passes
    phases = warmup["phases_ms"]
    assert phases["dynamo frame compile"] >= phases["unsloth backend"] >= phases["unsloth passes"] > 0
    assert phases["inductor compile_fx"] == 0.0  # inner=eager
    text = (tmp_path / f"{name}.md").read_text()
    assert "### peft+unsloth@packed: compiles, real tokens and timed choices" in text
    assert "unsloth passes |" in text and "inductor compile_fx" not in text  # phases never reached: no column
    assert "roofline: skipped" in text


def test_profile_counts_recompiles_with_their_reasons(tmp_path, one_layer):
    """Without length buckets the second length recompiles the frame (static to dynamic): the
    profile counts it and gives Dynamo's reason."""
    assert main(["profile", "--preset", "tiny", "--device", "cpu", "--inner", "eager", "--steps", "1",
                 "--warmup", "1", "--lengths", "uniform:8-64", "--variants", "peft-eager",
                 "--variant", "nobucket=unsloth:bucket_lengths=false", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile-tiny-uniform8-64.json").read_text())
    r = data["results"][1]
    assert r["status"] == "ok", r.get("traceback")
    recompiled = [f for f in r["compiles"]["frames"] if f["recompile_reason"]]
    assert r["compiles"]["recompiles"] == len(recompiled) >= 1
    assert r["compiles"]["dynamo_graphs"] >= 2 and "phases_ms" not in r["warmup_steps"][0]
    assert "size" in recompiled[0]["recompile_reason"]
    assert f"recompile {recompiled[0]['compile_id']}" in (tmp_path / "profile-tiny-uniform8-64.md").read_text()


def test_profile_of_fixed_batches_keeps_its_name_and_roofline(tmp_path, one_layer):
    """Without real-data options the files keep their names, the roofline is written, and the
    compile costs are reported too."""
    assert main(["profile", "--preset", "tiny", "--device", "cpu", "--inner", "eager", "--steps", "1",
                 "--warmup", "1", "--variants", "peft+unsloth", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile-tiny.json", "profile-tiny.md",
                                                          "roofline-tiny.json", "roofline-tiny.md"]
    (r,) = json.loads((tmp_path / "profile-tiny.json").read_text())["results"]
    assert r["status"] == "ok" and "roofline" in r and r["real_tokens_per_step"] == [2 * 64]
    assert r["compiles"]["dynamo_graphs"] >= 1 and "phases_ms" not in r["warmup_steps"][0]


def test_profile_of_bert_spellings(tmp_path, one_layer):
    """tiny-bert under --spellings minimal,full: one profile each, named after the spelling, whose
    batches hold only what the spelling passes."""
    assert main(["profile", "--preset", "tiny-bert", "--device", "cpu", "--inner", "eager", "--steps", "1",
                 "--warmup", "1", "--variants", "peft-eager,peft+unsloth", "--spellings", "minimal,full",
                 "--out", str(tmp_path)]) == 0
    minimal = json.loads((tmp_path / "profile-tiny-bert-minimal.json").read_text())
    full = json.loads((tmp_path / "profile-tiny-bert.json").read_text())
    assert minimal["spelling"] == "minimal" and minimal["attention_mask"] is False
    assert full["spelling"] == "full" and full["attention_mask"] is True
    for data in (minimal, full):
        assert [r["status"] for r in data["results"]] == ["ok", "ok"], [r.get("traceback") for r in data["results"]]
        assert all(r["real_tokens_per_step"] == [4 * 64] for r in data["results"])
        assert data["results"][1]["compiles"]["dynamo_graphs"] >= 1
    assert not list(tmp_path.glob("roofline-*"))
    with pytest.raises(SystemExit, match="causal LM presets only"):
        main(["profile", "--preset", "tiny-bert", "--device", "cpu", "--lengths", "uniform:8-64",
              "--out", str(tmp_path)])


def test_compiler_phases_are_cumulative_times_of_the_listed_functions():
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    torch.compile(lambda x: x.sin() + 1, backend="eager")(torch.randn(3))
    profiler.disable()
    phases = compile_costs.compiler_phases_ms(profiler)
    assert list(phases) == [p for p, _, _ in compile_costs.COMPILER_FUNCTIONS]
    assert phases["dynamo frame compile"] > 0 and phases["unsloth backend"] == 0.0
