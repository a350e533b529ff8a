"""`python -m unsloth_compile.bench`: the e2e table (tiny preset) and the accuracy run, end to
end on CPU in a few steps; well-formed outputs; a failing variant is reported, never dropped."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from unsloth_compile.bench.__main__ import main
from unsloth_compile.bench.variants import Variant, describe_error, parse_variant, run_isolated

pytestmark = pytest.mark.slow

# An option the backend does not know: it raises at the first compile, like any real failure would.
BROKEN = "broken=unsloth:no_such_option=1"


def _md_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows]


def test_e2e_tiny_end_to_end_with_a_failing_variant(tmp_path, capsys):
    # a failed variant: reported in its row and the exit status says so
    assert main(["e2e", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--out", str(tmp_path), "--variant", BROKEN]) == 1
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    assert {"preset", "env", "steps", "warmup", "unit", "mem_kind", "results", "targets"} <= set(data)
    assert {"device", "date", "versions"} <= set(data["env"])
    assert {"torch", "transformers", "peft"} <= set(data["env"]["versions"])
    assert data["mem_kind"] == "cpu_rss_delta_sampled"

    by_name = {r["variant"]["name"]: r for r in data["results"]}
    assert list(by_name) == ["full-ft", "peft-eager", "peft+aot_eager", "peft+unsloth", "broken"]
    for name in ["full-ft", "peft-eager", "peft+aot_eager", "peft+unsloth"]:
        r = by_name[name]
        assert r["status"] == "ok", r.get("traceback")
        assert r["step_time_s"] > 0 and r["throughput"] > 0 and math.isfinite(r["loss_final"])
        # 1 warm-up + 2 synchronised steps, then 2 pipelined steps (no per-step synchronise)
        assert len(r["step_times_s"]) == 2 and len(r["losses"]) == 5
        assert r["pipelined_step_time_s"] > 0 and r["pipelined_throughput"] > 0
    assert by_name["peft-eager"]["throughput_vs_peft_eager"] == pytest.approx(1.0)
    # Same init, same batches, fp32: every LoRA variant trains to the same loss.
    for name in ["peft+aot_eager", "peft+unsloth"]:
        assert by_name[name]["losses"] == pytest.approx(by_name["peft-eager"]["losses"], rel=1e-4)
    fusion = by_name["peft+unsloth"]["fusion"]
    assert fusion["fused"] == 14 and fusion["counters"]["lora_linear.fused"] == 14  # 7 projections x 2 layers

    broken = by_name["broken"]
    assert broken["status"] == "failed" and "no_such_option" in broken["error"] and broken["traceback"]
    assert {t["target"] for t in data["targets"]} >= {"tokens/s >= 2.4x PEFT eager"}

    text = (tmp_path / "e2e-tiny.md").read_text()
    assert "Targets" not in text and "DESIGN.md" not in text  # the thresholds' verdicts live in the JSON
    rows = _md_rows(text)
    variant_rows = {r[0]: r for r in rows if r[0] in by_name}
    assert set(variant_rows) == set(by_name)
    assert variant_rows["broken"][2] == "failed" and "no_such_option" in variant_rows["broken"][-1]
    assert variant_rows["peft+unsloth"][2] == "ok"
    png = (tmp_path / "e2e-tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    captured = capsys.readouterr()
    assert "| broken |" in captured.out  # the table is printed too
    assert "bench e2e: 1 variant run(s) failed" in captured.err and "broken: UnslothCompileError" in captured.err


def test_accuracy_end_to_end_on_cpu(tmp_path):
    """One seed end to end (test_accuracy_summary_over_seeds checks the spread over seeds and
    the per-seed pairing on made-up runs)."""
    assert main(["accuracy", "--steps", "2", "--seeds", "1", "--max-train", "32", "--max-eval", "24",
                 "--batch-size", "8", "--device", "cpu", "--inner", "eager", "--out", str(tmp_path),
                 "--variant", "fce=unsloth:fuse_cross_entropy=true",
                 "--variant", BROKEN]) == 1  # inner=eager: the e2e test covers aot_eager, this one the task
    data = json.loads((tmp_path / "accuracy.json").read_text())
    assert {"env", "args", "seeds", "label_names", "sizes", "runs", "summary"} <= set(data)
    assert len(data["label_names"]) == 14 and data["seeds"] == [0]
    assert data["sizes"] == {"train": 32, "valid": 24, "test": 24}
    assert len(data["runs"]) == 4
    summary = {s["variant"]["name"]: s for s in data["summary"]}
    for name in ["peft-eager", "peft+unsloth"]:
        s = summary[name]
        assert s["seeds_ok"] == 1, [r.get("traceback") for r in data["runs"] if r["status"] != "ok"]
        for metric in ("macro_f1", "accuracy"):
            assert 0 <= s[metric]["min"] <= s[metric]["mean"] <= s[metric]["max"] <= 100
    assert summary["peft-eager"]["verdict"] == "baseline"
    assert summary["peft+unsloth"]["delta_f1_points"] is not None
    unsloth_runs = [r for r in data["runs"] if r["variant"]["name"] == "peft+unsloth"]
    assert all(r["fusion"]["fused"] > 0 for r in unsloth_runs)
    # fuse_cross_entropy=true: training returns no logits, so the classifier + CE is one more fused site
    fce_runs = [r for r in data["runs"] if r["variant"]["name"] == "fce"]
    assert [r["fusion"]["fused"] for r in fce_runs] == [r["fusion"]["fused"] + 1 for r in unsloth_runs]
    assert summary["fce"]["seeds_ok"] == 1
    assert summary["broken"]["seeds_failed"] == 1 and summary["broken"]["verdict"] == "failed"

    rows = _md_rows((tmp_path / "accuracy.md").read_text())
    names = [r[0] for r in rows[1:]]  # after the header row
    assert names == ["peft-eager", "peft+unsloth", "fce", "broken"]
    assert "no_such_option" in rows[-1][-1]


def test_accuracy_summary_over_seeds():
    """bench accuracy's summary of several seeds: the spread of each variant's test scores, the
    difference of the means to PEFT eager and the difference paired by seed (a seed whose
    baseline failed is left out of the pairing), the verdicts, failed seeds counted."""
    from unsloth_compile.bench.accuracy import parse_seeds, render_markdown, summarise

    assert parse_seeds("2") == [0, 1] and parse_seeds("3,5") == [3, 5]
    variants = [Variant("peft-eager", "eager", role="peft-eager"), Variant("peft+unsloth", "unsloth", role="unsloth"),
                Variant("broken", "unsloth")]

    def run(name, seed, f1=None):
        if f1 is None:
            return {"variant": variants_by_name[name].to_json(), "seed": seed, "status": "failed",
                    "error": "RuntimeError: it broke\ndetail"}
        return {"variant": variants_by_name[name].to_json(), "seed": seed, "status": "ok",
                "test": {"macro_f1": f1, "accuracy": f1 + 0.1}, "samples_per_s": 10.0 * (seed + 1)}

    variants_by_name = {v.name: v for v in variants}
    runs = [run("peft-eager", 0, 0.50), run("peft+unsloth", 0, 0.499), run("broken", 0),
            run("peft-eager", 1, 0.70), run("peft+unsloth", 1, 0.705), run("broken", 1),
            run("peft-eager", 2), run("peft+unsloth", 2, 0.90)]
    summary = {s["variant"]["name"]: s for s in summarise(variants, runs)}
    base, lora, broken = summary["peft-eager"], summary["peft+unsloth"], summary["broken"]
    assert (base["seeds_ok"], base["seeds_failed"], lora["seeds_ok"], broken["seeds_failed"]) == (2, 1, 3, 2)
    assert base["macro_f1"]["min"] == pytest.approx(50) and base["macro_f1"]["max"] == pytest.approx(70)
    assert base["macro_f1"]["mean"] == pytest.approx(60) and base["macro_f1"]["std"] == pytest.approx(200 ** 0.5)
    assert lora["accuracy"]["mean"] == pytest.approx((59.9 + 80.5 + 100) / 3)
    assert lora["delta_f1_points"] == pytest.approx((49.9 + 70.5 + 90) / 3 - 60)
    paired = lora["paired_delta_f1_points"]  # seeds 0 and 1 only
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(0.2) and paired["min"] == pytest.approx(-0.1)
    assert base["verdict"] == "baseline" and lora["verdict"].startswith("NOT met") and broken["verdict"] == "failed"
    summary = {s["variant"]["name"]: s for s in summarise(variants, runs[:6])}
    assert summary["peft+unsloth"]["verdict"].startswith("met")  # 0.2 points: within the tolerance

    from unsloth_compile.bench.variants import environment

    data = {"args": {"rank": 8, "steps": 2, "batch_size": 8, "lr": 1e-3}, "env": environment(torch.device("cpu")),
            "sizes": {"train": 1, "valid": 1, "test": 1}, "label_names": ["a"], "model_path": "m",
            "dtype": "torch.float32", "seeds": [0, 1], "runs": runs[:6], "summary": summarise(variants, runs[:6])}
    rows = {r[0]: r for r in _md_rows(render_markdown(data))}
    assert rows["peft+unsloth"][2] == "2/2" and rows["peft+unsloth"][3] == "60.20 ± 14.57 [49.90, 70.50]"
    assert rows["broken"][2] == "0/2" and rows["broken"][-1] == "RuntimeError: it broke"


TWO_LINES = "the first line says why\nthe second line is detail"


def _table_row(path, name: str) -> list[str]:
    return next(r for r in _md_rows(path.read_text()) if r[0] == name)


def test_e2e_exits_nonzero_with_the_errors_first_line_in_its_row(tmp_path, monkeypatch, capsys):
    """Every variant failing (here a monkeypatched failure with a two-line message) used to
    leave the exit status at 0; now it is 1, and each row shows the error's first line."""
    from unsloth_compile.bench import e2e

    def fail(preset, variant, *args, **kwargs):
        raise RuntimeError(TWO_LINES)

    monkeypatch.setattr(e2e, "run_variant", fail)
    assert main(["e2e", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "peft-eager", "--variant", "nonsense=unsloth:nonsense=1",
                 "--out", str(tmp_path)]) == 1
    row = _table_row(tmp_path / "e2e-tiny.md", "peft-eager")
    assert row[2] == "failed" and row[-1] == "RuntimeError: the first line says why"
    assert "second line" not in (tmp_path / "e2e-tiny.md").read_text()
    err = capsys.readouterr().err
    assert "2 variant run(s) failed" in err and "peft-eager: RuntimeError: the first line says why" in err


def test_e2e_invalid_option_fails_loudly(tmp_path):
    """An option the backend refuses: exit 1, the refusal's first line in the variant's row."""
    assert main(["e2e", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "peft-eager", "--variant", "name=unsloth:nonsense=1", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    assert [r["status"] for r in data["results"]] == ["ok", "failed"]
    error = _table_row(tmp_path / "e2e-tiny.md", "name")[-1]
    assert error.startswith("UnslothCompileError: unsloth_compile: unknown option(s) 'nonsense'")


def test_profile_exits_nonzero_with_the_errors_first_line_in_its_row(tmp_path, monkeypatch):
    from unsloth_compile.bench import profile

    def fail(*args, **kwargs):
        raise RuntimeError(TWO_LINES)

    monkeypatch.setattr(profile, "profile_variant", fail)
    assert main(["profile", "--preset", "tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                 "--variants", "peft-eager", "--out", str(tmp_path)]) == 1
    text = (tmp_path / "profile-tiny.md").read_text()
    assert "| peft-eager | FAILED: RuntimeError: the first line says why |" in text and "second line" not in text


def test_dist_exits_nonzero_when_its_processes_fail(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    def crash(*args, **kwargs):
        raise RuntimeError(TWO_LINES)

    monkeypatch.setattr(mp, "start_processes", crash)
    assert main(["dist", "--preset", "tiny", "--device", "cpu", "--nproc", "2", "--variants", "single,ddp",
                 "--out", str(tmp_path)]) == 1
    text = next(tmp_path.glob("dist-*.md")).read_text()
    assert text.count("RuntimeError: the first line says why") == 2 and "second line" not in text


def test_kernel_table_names_a_failed_variants_error():
    from unsloth_compile.bench.kernel import render_markdown

    env = {"device": "H100", "date": "d", "tokens": 8, "versions": {"torch": "t", "triton": "t", "python": "p"}}
    rows = [{"layer": "l", "r": 16, "K": 4, "N": 4, "variant": "base", "ms": 1.0, "gpu_ms": 1.0},
            {"layer": "l", "r": 16, "K": 4, "N": 4, "variant": "ours-bf16", "error": "ValueError: " + TWO_LINES}]
    text = render_markdown({"environment": env, "argv": [], "variants": ["base", "ours-bf16"], "results": rows,
                            "breakdown": []})
    assert "| 1.000 | failed: ValueError: the first line says why |" in text


def test_run_isolated_reports_any_exception_as_failed():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    result = run_isolated(oom, torch.device("cpu"))
    assert result["status"] == "failed"
    assert result["error"].startswith("OutOfMemoryError: CUDA out of memory")


def test_describe_error_names_the_root_cause():
    try:
        try:
            raise ValueError("the real reason")
        except ValueError as inner:
            raise RuntimeError("wrapper said nothing useful") from inner
    except RuntimeError as error:
        assert describe_error(error) == "RuntimeError <- ValueError: the real reason"


def test_parse_variant():
    v = parse_variant("nofold=unsloth:fold_residual=false,kernels=reference", inner="aot_eager")
    assert (v.name, v.kind) == ("nofold", "unsloth")
    assert v.options == {"fold_residual": False, "kernels": "reference", "inner": "aot_eager"}
    assert parse_variant("c=inductor", inner="aot_eager").options == {}
    with pytest.raises(ValueError, match="NAME=KIND"):
        parse_variant("nofold", inner="eager")
    with pytest.raises(ValueError, match="kind 'bogus'"):
        parse_variant("x=bogus", inner="eager")
    with pytest.raises(ValueError, match="only meaningful"):
        Variant("x", "eager", {"fold_residual": False})


def test_kernel_subcommand_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("unsloth_compile.bench.kernel")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "unsloth_compile.bench.kernel", fake)
    import unsloth_compile.bench as bench

    monkeypatch.setattr(bench, "kernel", fake, raising=False)
    assert main(["kernel", "--shape", "llama-1b.mlp.up"]) == 0
    assert seen == [["--shape", "llama-1b.mlp.up"]]


@pytest.mark.gpu
def test_e2e_tiny_on_cuda_reports_cuda_peak_memory(tmp_path):
    assert main(["e2e", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cuda",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    assert data["mem_kind"] == "cuda_max_allocated" and data["dtype"] == "torch.bfloat16"
    assert all(r["status"] == "ok" for r in data["results"]), [r.get("traceback") for r in data["results"]]
    assert all(r["peak_mem_bytes"] > 0 for r in data["results"])
    assert data["results"][-1]["peak_mem_vs_peft_eager"] is not None


def test_profile_families_and_interval_union():
    from unsloth_compile.bench.profile import family_of, union_us

    assert family_of("_lora_gemm_tma_kernel") == "lora"
    assert family_of("_rows_thin_pair_kernel") == "lora"
    assert family_of("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64") == "attention"
    assert family_of("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert family_of("triton_per_fused__safe_softmax_add_exp") == "attention"
    assert family_of("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert family_of("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "gemm"
    assert family_of("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") \
        == "optimizer"
    assert family_of("triton_poi_fused_add_mul_0") == "fused elementwise"
    assert family_of("Memcpy DtoD (Device -> Device)") == "copies"
    assert family_of("some_unknown_kernel") == "other"
    # overlapping and nested intervals count once; disjoint ones add up
    assert union_us([(0, 10), (5, 15), (6, 7), (20, 25)]) == 20
    assert union_us([]) == 0


def test_profile_idle_is_charged_to_the_phase_that_launched_next():
    from unsloth_compile.bench.profile import idle_by_phase, summarise, StepTimes

    # one step 0..100 us: forward runs 0..30 on the CPU, backward 30..60, synchronize 60..100
    phases = [("forward", 0, 30), ("backward", 30, 60), ("synchronize", 60, 100)]
    kernels = [("k_fwd", 5, 20), ("k_fwd2", 10, 25),  # lead-in 5 us (forward); overlap counts once
               ("k_bwd", 40, 70),                      # 15 us idle waiting on backward's launch
               ("k_late", 80, 90),                     # 10 us idle, launched while synchronising
               ("k_other_step", 150, 160)]             # outside the step: ignored
    got = idle_by_phase(kernels, phases, [(0, 100)], longest=2)
    assert got["idle_ms_by_phase"] == {"backward": 0.015, "synchronize": 0.010, "forward": 0.005}
    assert got["host_ms_by_phase"] == {"forward": 0.030, "backward": 0.030, "synchronize": 0.040}
    assert got["longest_idle"] == [
        {"idle_us": 15, "phase": "backward", "after": "k_fwd2", "before": "k_bwd"},
        {"idle_us": 10, "phase": "synchronize", "after": "k_bwd", "before": "k_late"}]
    # the costliest kernels of each family, per step
    summary = summarise([("Memcpy DtoD", 0, 4), ("Memcpy DtoD", 10, 12), ("triton_poi_fused_add_0", 0, 1)],
                        [StepTimes(1.0, 0.5)], per_family=1)
    assert summary["top_kernels_by_family"] == {
        "copies": [{"name": "Memcpy DtoD", "ms_per_step": 0.006, "calls_per_step": 2.0}],
        "fused elementwise": [{"name": "triton_poi_fused_add_0", "ms_per_step": 0.001, "calls_per_step": 1.0}]}


def test_profile_tiny_on_cpu(tmp_path):
    assert main(["profile", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--variants", "peft-eager,peft+unsloth", "--host-profile", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile-tiny.json").read_text())
    by_name = {r["variant"]["name"]: r for r in data["results"]}
    assert list(by_name) == ["peft-eager", "peft+unsloth"]
    for r in by_name.values():
        assert r["status"] == "ok", r.get("traceback")
        assert r["steps"] == 2 and 0 < r["host_ms"] <= r["wall_ms"]
        assert r["gpu_busy_ms"] is None  # no device kernels on CPU
        assert len(r["step_wall_ms"]) == 2
        # the cProfile step: functions sorted by own time, the step's own Python among them
        own = [f["own_ms"] for f in r["host_functions"]]
        assert own == sorted(own, reverse=True) and len(own) > 5
        forward = [f["cumulative_ms"] for f in r["host_functions_forward"]]  # a forward alone
        assert forward == sorted(forward, reverse=True) and len(forward) > 5
    # the compiled variant: Dynamo's graph counters are there, eager has none
    assert by_name["peft+unsloth"]["counters"].get("stats.unique_graphs", 0) >= 1
    assert "stats.unique_graphs" not in by_name["peft-eager"]["counters"]
    text = (tmp_path / "profile-tiny.md").read_text()
    assert "| peft+unsloth |" in text and "host functions of one step under cProfile" in text


def test_e2e_bert_runs_with_and_without_attention_mask(tmp_path):
    assert main(["e2e", "--preset", "tiny-bert", "--steps", "1", "--warmup", "1", "--device", "cpu",
                 "--variants", "peft-eager", "--out", str(tmp_path)]) == 0
    with_mask = json.loads((tmp_path / "e2e-tiny-bert.json").read_text())
    without = json.loads((tmp_path / "e2e-tiny-bert-nomask.json").read_text())
    assert with_mask["attention_mask"] is True and without["attention_mask"] is False
    assert "attention_mask in the batch: no" in (tmp_path / "e2e-tiny-bert-nomask.md").read_text()


def test_floor_variant_trains_only_the_norms_and_is_reported_as_the_floor(tmp_path):
    """`floor`: the frozen model (no adapters) with only its norms trainable, under the backend.
    Its backward still reaches every layer (each layer's norms get a gradient), the e2e table
    gets an "above the floor" section, and `bench accuracy` refuses it (it fine-tunes nothing)."""
    from unsloth_compile.bench.e2e import PRESETS, build_model, freeze_to_norms

    model = build_model(PRESETS["tiny"], torch.device("cpu"), torch.float32)
    trainable = freeze_to_norms(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("norm" in n for n in names) and trainable == sum(
        p.numel() for p in model.parameters() if p.requires_grad)
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="no \\*Norm module"):
        freeze_to_norms(torch.nn.Sequential(torch.nn.Linear(4, 4)))

    assert main(["e2e", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--device", "cpu",
                 "--variants", "peft-eager", "--variant", "floor=floor", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "e2e-tiny.json").read_text())
    floor = next(r for r in data["results"] if r["variant"]["name"] == "floor")
    assert floor["status"] == "ok", floor.get("traceback")
    assert floor["trainable_params"] == trainable and floor["fusion"]["fused"] == 0
    text = (tmp_path / "e2e-tiny.md").read_text()
    assert "## Above the floor (floor:" in text
    above = next(r for r in _md_rows(text) if r[0] == "peft-eager" and len(r) == 4)
    eager = next(r for r in data["results"] if r["variant"]["name"] == "peft-eager")
    assert float(above[2]) == pytest.approx(1e3 * (eager["step_time_s"] - floor["step_time_s"]), abs=0.06)
    with pytest.raises(SystemExit, match="train only the norms"):
        main(["accuracy", "--steps", "1", "--device", "cpu", "--variants", "peft-eager", "--variant", "floor=floor",
              "--out", str(tmp_path)])


def test_compile_mode_variants():
    from unsloth_compile.bench.e2e import default_variants

    names = [v.name for v in default_variants("inductor")]
    assert {"peft+inductor-ro", "peft+unsloth-ro", "peft+unsloth-ma"} <= set(names)
    assert [v.name for v in default_variants("aot_eager")] == ["full-ft", "peft-eager", "peft+aot_eager",
                                                                 "peft+unsloth"]
    v = parse_variant("ro=inductor:mode=reduce-overhead", inner="inductor")
    assert v.options == {"mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="not compiled"):
        Variant("x", "eager", {"mode": "reduce-overhead"})


def test_lossy_variants_are_the_lossy_options_only():
    assert Variant("a", "unsloth", {"precision": "fp8"}).lossy
    assert Variant("b", "unsloth", {"compress_activations": "int8"}).lossy
    assert Variant("c", "unsloth", {"sparsity": "2:4"}).lossy
    assert not Variant("d", "unsloth", {"precision": "default", "compress_activations": "none"}).lossy
    assert not Variant("e", "unsloth", {"fuse_cross_entropy": True}).lossy


def test_sparsity_variant_prunes_by_the_chosen_method():
    """compile_for prunes before compiling: magnitude by default, Wanda with the calibration
    batches the bench passes (its scores follow the inputs: another mask than magnitude's on
    inputs whose feature norms differ), wanda-ls Wanda's mask with refit weights; wanda or *-ls
    without calibration, or prune_method without sparsity, is refused."""
    from helpers import peft_wrap, tiny_causal_lm
    from unsloth_compile.bench.variants import compile_for
    from unsloth_compile.sparsity import Sparse24Linear

    def pruned(method, calibration=None):
        torch.manual_seed(0)
        model = peft_wrap(tiny_causal_lm("llama"))
        variant = parse_variant(f"sp=unsloth:sparsity=2:4,prune_method={method}", inner="aot_eager")
        compile_for(model, variant, calibration=calibration)
        return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}

    g = torch.Generator().manual_seed(1)
    # input ids from a narrow slice of the vocabulary: feature norms far from uniform
    calibration = [{"input_ids": torch.randint(0, 8, (2, 16), generator=g)} for _ in range(2)]
    magnitude, wanda = pruned("magnitude"), pruned("wanda", calibration)
    assert magnitude and magnitude.keys() == wanda.keys()
    assert any(not torch.equal(magnitude[n] != 0, wanda[n] != 0) for n in magnitude)
    for w in wanda.values():  # half of each 4 x 4 tile kept
        assert (w != 0).sum().item() == w.numel() // 2
    with pytest.raises(ValueError, match="needs calibration batches"):
        pruned("wanda")
    # wanda-ls: Wanda's mask, the kept weights refit on the same batches
    refit = pruned("wanda-ls", calibration)
    assert refit.keys() == wanda.keys() and all(torch.equal(refit[n] != 0, wanda[n] != 0) for n in wanda)
    assert any(not torch.equal(refit[n], wanda[n]) for n in wanda)
    for method in ("wanda-ls", "magnitude-ls"):
        with pytest.raises(ValueError, match=f"prune_method={method} needs calibration batches"):
            pruned(method)
    with pytest.raises(ValueError, match="one of magnitude, wanda"):
        pruned("random")
    # sparsegpt-ls, sequential, padding left out, 1 of the 2 batches: as prune() called directly
    from unsloth_compile.sparsity import prune

    padded = [dict(b, attention_mask=torch.ones_like(b["input_ids"])) for b in calibration]
    options = "sparsegpt-ls,prune_sequential=layer,prune_padding=ignore,prune_calibration=1"
    torch.manual_seed(0)
    direct = peft_wrap(tiny_causal_lm("llama"))
    prune(direct, "sparsegpt", calibration=padded[:1], reconstruct=True, sequential=True, target="layer",
          ignore_padding=True)
    obs = pruned(options, padded)
    assert obs.keys() == wanda.keys()
    assert all(torch.equal(obs[n], m.weight) for n, m in direct.named_modules() if isinstance(m, Sparse24Linear))
    for bad, match in (("wanda,prune_sequential=dense", "prune_sequential='dense'; one of off, model, layer"),
                       ("wanda,prune_padding=drop", "prune_padding='drop'; one of include, ignore"),
                       ("wanda,prune_calibration=0", "prune_calibration=0; a count"),
                       ("wanda,prune_calibration=3", "prune_calibration=3, but the bench passes 2")):
        with pytest.raises(ValueError, match=match):
            pruned(bad, calibration)
    with pytest.raises(ValueError, match="prune_method, prune_layers, .* are for sparsity=2:4"):
        compile_for(peft_wrap(tiny_causal_lm("llama")), parse_variant("x=unsloth:prune_method=wanda", inner="aot_eager"))

    # prune_layers: only the matching LoRA bases (q_proj here), the others left dense
    model = peft_wrap(tiny_causal_lm("llama"))
    compile_for(model, parse_variant("sp=unsloth:sparsity=2:4,prune_layers=q_proj", inner="aot_eager"))
    sparse = {n for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    assert sparse and sparse == {n for n in magnitude if ".q_proj." in n} and sparse != set(magnitude)
    with pytest.raises(ValueError, match="matches no LoRA base"):
        compile_for(peft_wrap(tiny_causal_lm("llama")),
                    parse_variant("sp=unsloth:sparsity=2:4,prune_layers=nothing_here", inner="aot_eager"))


@pytest.mark.parametrize("name", ["llama-1b", "llama-narrow-deep", "llama-long", "llama-big-vocab", "bert-large"])
def test_gpu_presets_build_and_carry_their_targets(name):
    """Every GPU preset builds (on the meta device: shapes only), its sequence fits the model,
    each LoRA target names modules that exist, and the presets beyond the two headline ones
    carry the never-slower / never-more-memory targets against PEFT eager."""
    from unsloth_compile.bench.e2e import PRESETS, build_model

    preset = PRESETS[name]
    model = build_model(preset, torch.device("meta"), torch.bfloat16)
    names = [n for n, _ in model.named_modules()]
    for target in preset.lora_targets:
        assert any(n.endswith("." + target) for n in names), (name, target)
    if preset.family == "llama":
        assert preset.seq <= preset.config["max_position_embeddings"]
        assert preset.config["hidden_size"] % preset.config["num_attention_heads"] == 0
    if name not in ("llama-1b", "bert-large"):
        assert {(t.metric, t.baseline, t.op, t.threshold) for t in preset.targets} == {
            ("throughput", "peft-eager", ">=", 1.0), ("peak_mem", "peft-eager", "<=", 1.0)}


def test_e2e_bert_batch_spellings(tmp_path):
    """Each spelling is its own table; the batches hold the same ids and answers, the keys the
    spelling names, and the padding mask keeps answers inside each row's tokens."""
    from unsloth_compile.bench.batch_spellings import SPELLINGS, spell_batch
    from unsloth_compile.bench.e2e import PRESETS, make_batches

    preset = PRESETS["tiny-bert"]
    spelled = {s: make_batches(preset, 2, 0, torch.device("cpu"), spelling=s) for s in SPELLINGS}
    keys = {s: set(b[0]) - {"input_ids", "start_positions", "end_positions"} for s, b in spelled.items()}
    assert keys == {"full": {"token_type_ids", "attention_mask"}, "types": {"token_type_ids"}, "minimal": set(),
                    "ones-mask": {"attention_mask"}, "padding-mask": {"token_type_ids", "attention_mask"}}
    for s in SPELLINGS:
        assert torch.equal(spelled[s][1]["input_ids"], spelled["full"][1]["input_ids"])
    padded = spelled["padding-mask"][0]
    kept = padded["attention_mask"].sum(1)
    assert (kept >= preset.seq // 2).all() and (kept < preset.seq).any()
    assert (padded["start_positions"] < kept).all() and (padded["end_positions"] < kept).all()
    with pytest.raises(ValueError, match="one of"):
        spell_batch(padded["input_ids"], torch.zeros(2, preset.batch, dtype=torch.long), "nomask",
                    torch.Generator())

    from unsloth_compile.bench.__main__ import main

    assert main(["e2e", "--preset", "tiny-bert", "--steps", "1", "--warmup", "1", "--variants", "peft-eager",
                 "--spellings", "minimal,padding-mask", "--out", str(tmp_path)]) == 0
    assert "batch spelling: minimal" in (tmp_path / "e2e-tiny-bert-minimal.md").read_text()
    assert "padding" in (tmp_path / "e2e-tiny-bert-padding-mask.md").read_text()


def test_e2e_rows_and_seq_resize_the_preset_and_name_its_files(tmp_path):
    from unsloth_compile.bench.e2e import PRESETS, resized

    tiny = PRESETS["tiny"]
    assert resized(tiny, None, None) is tiny
    shaped = resized(tiny, 3, 40)
    assert (shaped.name, shaped.batch, shaped.seq, shaped.items_per_step()) == ("tiny-3x40", 3, 40, 120)
    with pytest.raises(SystemExit, match="positions"):
        resized(PRESETS["llama-1b"], None, 8192)
    main(["e2e", "--preset", "tiny", "--device", "cpu", "--inner", "eager", "--variants", "peft-eager",
          "--rows", "3", "--seq", "40", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "e2e-tiny-3x40.json").read_text())
    assert (data["preset"]["batch"], data["preset"]["seq"]) == (3, 40)
    assert data["results"][0]["real_tokens_per_step"] == [120, 120]
