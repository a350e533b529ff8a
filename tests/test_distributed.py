"""Multi-process training with the backend (unsloth_compile/distributed.py), on CPU with gloo.

One launch of WORLD processes (this file run as a script: `--worker OUT`) trains a tiny PEFT
Llama under each wrapper: DDP over the compiled model (with buckets forced small, as a large
model would have them), FSDP2 with the frozen base sharded and replicated, FSDP2 with a bf16
MixedPrecisionPolicy, and DDP with Dynamo's graph splitting left on. Each rank saves what it
saw; the tests compare it with a single-process eager run on the concatenated batch (the same
schedule: plain steps, a step accumulated over two micro-batches with no_sync, rank changes),
and the ranks with each other. Processes are started once per module (importing torch and
transformers costs seconds per process here).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

# processes per launch; UNSLOTH_TEST_WORLD=4 runs the same checks on 4 (CI runs 2: each process
# costs seconds of imports here)
WORLD = int(os.environ.get("UNSLOTH_TEST_WORLD", "2"))
SEQ = 11  # tokens per row: not a multiple of anything
LR = 1e-2
# the steps every case runs: micro-batches per step (2: the first under no_sync)
STEPS = (1, 1, 2)
# DDP case only, after STEPS: the LoRA rank set before one more step (a grow: new random rows,
# drawn with a different seed on each rank)
RANK_STEPS = (8,)
OPTIONS = {"inner": "aot_eager", "summary": False}
TINY_BUCKET_MB = 0.002  # a few adapters per gradient bucket: several buckets in the tiny model


# ----------------------------------------------------------------------------- shared schedule


def _tiny_model(dtype=torch.float32):
    import helpers

    torch.manual_seed(0)
    return helpers.peft_wrap(helpers.tiny_causal_lm("llama", dtype))


def _batch(step: int, world: int, rank, micro: int = 1) -> dict:
    """This rank's rows of step `step`: one per micro-batch (a single row: every forward has the
    same shape, no recompilation), `world * micro` rows in the whole batch (rank None: all)."""
    import helpers

    full = helpers.batch_for("llama", batch=world * micro, seq=SEQ, seed=step)
    return full if rank is None else {k: v.chunk(world)[rank] for k, v in full.items()}


def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def train(model, forward, opt, steps, world: int, rank, sync_off=None, first_step: int = 0) -> dict:
    """`steps` optimizer steps (each a count of micro-batches) on this rank's rows (rank None:
    one process on the rows of all `world` ranks); the loss recorded is the mean over ranks,
    the gradients are whole tensors."""
    import torch.distributed as dist

    out = {"losses": [], "grads": []}
    for i, micro in enumerate(steps):
        batch = _batch(first_step + i, world, rank, micro)
        total = torch.zeros(())
        for j in range(micro):
            part = {k: v.chunk(micro)[j] for k, v in batch.items()}
            ctx = sync_off() if (sync_off is not None and j < micro - 1) else contextlib.nullcontext()
            with ctx:
                loss = forward(**part).loss / micro
                loss.backward()
            total += loss.detach().float()
        if rank is not None and world > 1:
            dist.all_reduce(total)
            total /= world
        out["losses"].append(float(total))
        out["grads"].append({n: _full(p.grad) for n, p in _trainable(model).items()})
        opt.step()
        opt.zero_grad()
    return out


def _adamw(model) -> torch.optim.AdamW:
    """AdamW with eps above float noise: its first steps move every element by about lr * sign(g),
    so an element whose gradient is ~1e-9 would move by +-lr on rounding alone (a 4-process
    run differed by 4% at the third step with eps=1e-8, eager DDP as much as compiled)."""
    return torch.optim.AdamW(_trainable(model).values(), lr=LR, eps=1e-4)


def _adam_state(opt, model) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: _full(v) for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0}
            for p, s in opt.state.items()}


# ----------------------------------------------------------------------------- worker cases


def case_ddp(world, rank) -> dict:
    """DDP with small buckets (several reducer buckets; Dynamo's DDP split would cut LoRA sites),
    then a manual grow and shrink through DistributedRankController with rank-dependent seeds."""
    from unsloth_compile.distributed import DistributedRankController, compile_ddp, no_sync
    from unsloth_compile.report import collect_reports

    torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 1024  # read by DDP's reducer and Dynamo's DDPOptimizer
    model = _tiny_model()
    ddp = compile_ddp(model, OPTIONS, bucket_cap_mb=TINY_BUCKET_MB)
    opt = _adamw(model)
    controller = DistributedRankController(ddp, opt, policy="manual")
    with collect_reports() as report:
        out = train(model, lambda **b: controller.ddp(**b), opt, STEPS, world, rank,
                    sync_off=lambda: no_sync(controller.ddp))
        out["counters"] = dict(report.counters)
    out["buckets"] = len(controller.ddp.bucket_num_param_list) if hasattr(controller.ddp, "bucket_num_param_list") \
        else None
    for k, r in enumerate(RANK_STEPS):
        torch.manual_seed(100 + k + 10 * rank)  # a grow draws new rows: different on each rank
        old = controller.ddp
        controller.set_rank(r)
        assert controller.ddp is not old
        more = train(model, lambda **b: controller.ddp(**b), opt, (1,), world, rank, first_step=len(STEPS) + k)
        out["losses"] += more["losses"]
        out["grads"] += more["grads"]
    try:
        old(**_batch(0, world, rank))
    except RuntimeError as error:
        out["stale_error"] = str(error)
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam"] = _adam_state(opt, model)
    out["loss_decay_ranks"] = _loss_decay_decisions(controller, rank)
    out["params_after_decisions"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam_after_decisions"] = _adam_state(opt, model)
    return out


def _loss_decay_decisions(controller, rank) -> list:
    """Rank 0 sees a falling loss (alone it would grow), rank 1 a rising one: every rank must take
    the decision of the mean (shrink), then grow on a common fall (new rows: rank-dependent RNG)."""
    from unsloth_compile.rank import LossDecayPolicy

    controller.policy, controller.window = LossDecayPolicy(0.95), 1
    controller.global_rank, controller.min_rank, controller.max_rank = 2, 1, 8
    decisions = []
    for loss in ([4.0, 4.0], [1.0, 8.0], [1.0, 1.0]):  # means: 4, 4.5 (rise: shrink), 1 (fall: grow)
        controller.step(loss[rank % 2])
        decisions.append(sorted(set(controller.ranks.values())))
    return decisions


def case_fsdp(world, rank, frozen, mp=False) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from unsloth_compile.distributed import DistributedRankController, no_sync, shard_lora_model
    from unsloth_compile.rank import set_rank
    from unsloth_compile.report import collect_reports

    model = _tiny_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else None
    shard_lora_model(model, frozen=frozen, options=OPTIONS, mp_policy=policy)
    opt = _adamw(model)
    with collect_reports() as report:
        out = train(model, model, opt, STEPS[:1] if mp else STEPS, world, rank, sync_off=lambda: no_sync(model))
        out["counters"] = dict(report.counters)
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["frozen"] = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad and "layers.1.mlp" in n}
    out["kinds"] = {"trainable_dtensor": all(isinstance(p, DTensor) for p in _trainable(model).values()),
                    "frozen_dtensor": [isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad]}
    out["adam"] = _adam_state(opt, model)
    for name, call in (("set_rank", lambda: set_rank(model, 8, optimizer=opt)),
                       ("controller", lambda: DistributedRankController(model, opt))):
        try:
            call()
        except ValueError as error:
            out[f"{name}_error"] = str(error)
    return out


def case_ddp_split(world, rank) -> dict:
    import warnings

    from unsloth_compile.distributed import compile_ddp
    from unsloth_compile.report import collect_reports

    model = _tiny_model()
    # forward only, no AOTAutograd: the passes' decisions are all this case looks at
    ddp = compile_ddp(model, dict(OPTIONS, inner="eager"), split_graphs=True, bucket_cap_mb=TINY_BUCKET_MB)
    with collect_reports() as report, warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        ddp(**_batch(0, world, rank))
    return {"counters": dict(report.counters), "graphs": report.graphs,
            "warnings": [str(w.message) for w in caught if "unsloth_compile" in str(w.message)]}


BENCH_ARGV = ["--preset", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--batch", "1", "--seq", "16",
              "--variants", "single,fsdp-shard", "--inner", "eager"]


def case_bench(world, rank) -> dict:
    """`bench dist`'s per-process part on this process group (the launcher is the only piece not run)."""
    from unsloth_compile.bench import distributed as bench

    out = Path(os.environ["UNSLOTH_TEST_OUT"]) / "bench"
    out.mkdir(exist_ok=True)
    bench.run_all(bench.config(BENCH_ARGV + ["--nproc", str(world)]), str(out))
    return {"dir": str(out)}


CASES = {"ddp": case_ddp, "fsdp-shard": lambda w, r: case_fsdp(w, r, "shard"),
         "fsdp-replicate": lambda w, r: case_fsdp(w, r, "replicate"),
         "fsdp-mp": lambda w, r: case_fsdp(w, r, "shard", mp=True), "ddp-split": case_ddp_split,
         "bench": case_bench}


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import unsloth_compile  # noqa: F401

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in CASES.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        results[name] = case(world, rank)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, timeout: float = 600) -> list[dict]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               UNSLOTH_TEST_OUT=str(out),
               OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    procs = []
    for rank in range(world):
        log = open(out / f"log{rank}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(out)],
                                       env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"rank {rank} exited {code}:\n" + (out / f"log{rank}.txt").read_text()[-6000:])
    if failed:
        for proc, _ in procs:
            proc.kill()
        pytest.fail("\n".join(failed))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ----------------------------------------------------------------------------- references


def reference(world: int, dtype=torch.float32) -> dict:
    """One process, eager, the whole batch of every step, the same schedule (and rank 0's seeds)."""
    from unsloth_compile.rank import set_rank

    model = _tiny_model(dtype)
    for p in _trainable(model).values():
        p.data = p.data.float()  # PEFT's fp32 adapters on a low-precision base
    opt = _adamw(model)
    out = train(model, model, opt, STEPS, world, None)
    out["params_before_rank"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam_before_rank"] = _adam_state(opt, model)
    for k, r in enumerate(RANK_STEPS):
        torch.manual_seed(100 + k)
        set_rank(model, r, optimizer=opt)
        more = train(model, model, opt, (1,), world, None, first_step=len(STEPS) + k)
        out["losses"] += more["losses"]
        out["grads"] += more["grads"]
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam"] = _adam_state(opt, model)
    return out


def reference_bf16(world: int) -> dict:
    """The yardstick of the mixed-precision case: one process, every parameter in bf16 (what
    MixedPrecisionPolicy(param_dtype=bf16) computes with), the first step."""
    model = _tiny_model(torch.bfloat16)
    opt = torch.optim.SGD(_trainable(model).values(), lr=0.0)
    return train(model, model, opt, STEPS[:1], world, None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return launch(WORLD, out)


@pytest.fixture(scope="module")
def ref():
    return reference(WORLD)


# ----------------------------------------------------------------------------- tests


def _close(actual: dict, expected: dict, what: str) -> None:
    """Elementwise within 1e-4 of the value or of the tensor's largest element: fp32 rounding of
    a different summation order (gloo's all-reduce, the fused op) after a few steps (measured:
    4e-5 of the largest gradient after the rank change, 5e-6 in eager DDP), far below what a
    missing or doubled contribution of a rank would give."""
    assert actual.keys() == expected.keys(), what
    for name in expected:
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-4 * scale + 1e-8,
                                   msg=lambda m, name=name: f"{what}, {name}: {m}")


def _same_on_every_rank(runs, case: str, key: str) -> None:
    """Bitwise: the ranks hold the same values, not merely close ones."""
    def flat(tree: dict, prefix="") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    first = flat(runs[0][case][key])
    assert first, f"{case} {key}: nothing recorded"
    for rank, run in enumerate(runs[1:], 1):
        other = flat(run[case][key])
        assert other.keys() == first.keys()
        for name, value in other.items():
            assert torch.equal(value, first[name]), f"{case} {key}: {name} differs on rank {rank}"


def _lora_sites() -> int:
    import helpers

    return helpers.count_lora_layers(_tiny_model())  # what one process fuses (tests/test_lora_pass_models.py)


def _check_steps(run: dict, ref: dict, n: int, what: str) -> None:
    assert len(run["losses"]) >= n
    torch.testing.assert_close(torch.tensor(run["losses"][:n]), torch.tensor(ref["losses"][:n]), rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"{what} losses: {m}")
    for step in range(n):
        _close(run["grads"][step], ref["grads"][step], f"{what} step {step} grads")


def test_ddp_matches_one_process_on_the_whole_batch(runs, ref):
    """Compiled model under DDP (several reducer buckets; the accumulated step under no_sync):
    loss, every LoRA gradient, parameters and AdamW state as one eager process; every site
    fused although the buckets are small (Dynamo's DDP split is off); ranks identical."""
    for run in runs:
        ddp = run["ddp"]
        assert ddp["counters"]["lora_linear.fused"] == _lora_sites() == 14
        assert ddp["counters"].get("lora_linear.refused", 0) == 0
        _check_steps(ddp, ref, len(STEPS), "ddp")
    for key in ("params", "adam", "params_after_decisions", "adam_after_decisions"):
        _same_on_every_rank(runs, "ddp", key)


def test_ddp_rank_change_is_identical_on_every_rank(runs, ref):
    """DistributedRankController: a grow with a different seed on each rank gives rank 0's new
    rows everywhere (the rebuilt DDP broadcasts them); the step after it, the parameters and the
    migrated AdamW state equal one process that grew with rank 0's seed. Loss-decay decisions
    are taken on the mean loss: rank 0 alone would have grown, every rank shrinks."""
    ddp = runs[0]["ddp"]
    total = len(STEPS) + len(RANK_STEPS)
    _check_steps(ddp, ref, total, "ddp with rank change")
    assert all(g.shape[0] == 8 for n, g in ddp["grads"][-1].items() if "lora_A" in n)
    _close(ddp["params"], ref["params"], "ddp params after the rank change")
    for name, state in ref["adam"].items():
        _close(ddp["adam"][name], state, f"ddp AdamW state of {name}")
    for run in runs:
        assert run["ddp"]["loss_decay_ranks"] == [[8], [1], [3]]
        assert "replaced after a LoRA rank change" in run["ddp"]["stale_error"]


@pytest.mark.parametrize("frozen", ["shard", "replicate"])
def test_fsdp2_matches_one_process(runs, ref, frozen):
    """FSDP2 with per-block compilation, frozen base sharded or replicated: every site fused,
    loss and LoRA gradients (the accumulated step under set_requires_gradient_sync(False)) and
    parameters after the steps as one eager process; what is a DTensor shard is what the
    choice says; resizing a sharded adapter is refused with the way out."""
    case = f"fsdp-{frozen}"
    initial = {n: p.detach() for n, p in _tiny_model().named_parameters() if not p.requires_grad}
    for run in runs:
        r = run[case]
        assert r["counters"]["lora_linear.fused"] == _lora_sites()
        assert r["counters"].get("lora_linear.refused", 0) == 0
        _check_steps(r, ref, len(STEPS), case)
        _close(r["params"], ref["params_before_rank"], f"{case} params")
        for name, state in ref["adam_before_rank"].items():
            _close(r["adam"][name], state, f"{case} AdamW state of {name}")
        assert r["frozen"] and all(torch.equal(v, initial[n]) for n, v in r["frozen"].items())
        assert r["kinds"]["trainable_dtensor"]
        assert set(r["kinds"]["frozen_dtensor"]) == {frozen == "shard"}
        assert "sharded by FSDP2" in r["set_rank_error"] and "before sharding" in r["set_rank_error"]
        assert "cannot change while FSDP2 shards" in r["controller_error"] and "compile_ddp" in r["controller_error"]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fsdp2_mixed_precision_is_as_close_as_bf16_on_one_process(runs, ref):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) on an fp32 model: every site
    fused (in bf16), loss and gradients no further from the fp32 result than one process
    computing in bf16 is (twice its error, plus bf16's rounding of the 2-rank mean)."""
    yard = reference_bf16(WORLD)
    r = runs[0]["fsdp-mp"]
    assert r["counters"]["lora_linear.fused"] == _lora_sites()
    loss_err = abs(r["losses"][0] - ref["losses"][0])
    assert loss_err <= 2 * abs(yard["losses"][0] - ref["losses"][0]) + 1e-2
    for name, g in ref["grads"][0].items():
        err, base = _rel_err(r["grads"][0][name], g), _rel_err(yard["grads"][0][name], g)
        assert err <= 2 * base + 1e-2, f"{name}: relative error {err:.3g} vs bf16 one-process {base:.3g}"


def test_ddp_graph_split_cuts_lora_sites_and_warns(runs):
    """What compile_ddp avoids: with Dynamo's DDP split on and small buckets, bucket boundaries
    cut LoRA linears (fewer fused, halves refused), and a warning names the cause and the fix."""
    r = runs[0]["ddp-split"]
    assert r["graphs"] > 1
    assert r["counters"]["lora_linear.fused"] < _lora_sites() and r["counters"]["lora_linear.refused"] > 0
    assert len(r["warnings"]) == 1 and "compile_ddp" in r["warnings"][0] and "optimize_ddp" in r["warnings"][0]


def test_bench_dist_on_gloo(runs):
    """`python -m unsloth_compile.bench dist`'s processes on gloo (tiny preset): one row per
    variant, `single` on one process, tokens/s per GPU and scaling efficiency from the slowest
    rank's step times, every site fused, the same first loss (same init, rank 0's batch); a
    variant without results is reported as failed, not dropped."""
    from unsloth_compile.bench import distributed as bench

    cfg = bench.config(BENCH_ARGV + ["--nproc", str(WORLD)])
    data = bench.collect(cfg, runs[0]["bench"]["dir"])
    rows = {r["variant"]: r for r in data["results"]}
    assert list(rows) == ["single", "fsdp-shard"]
    single, fsdp = rows["single"], rows["fsdp-shard"]
    assert single["status"] == fsdp["status"] == "ok", (single.get("error"), fsdp.get("error"))
    assert (single["world"], fsdp["world"]) == (1, WORLD)
    assert len(fsdp["step_times_s"]) == 2 and fsdp["step_time_s"] > 0
    assert fsdp["tokens_per_s_per_gpu"] == pytest.approx(16 / fsdp["step_time_s"])
    assert fsdp["tokens_per_s"] == pytest.approx(WORLD * fsdp["tokens_per_s_per_gpu"])
    assert fsdp["scaling_efficiency"] == pytest.approx(fsdp["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"])
    assert fsdp["target"] == 0.9 and fsdp["verdict"].endswith("(CPU run: not a claim)")
    assert single["fusion"]["fused"] == fsdp["fusion"]["fused"] == 14 and fsdp["fusion"]["refused"] == 0
    assert fsdp["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)
    text = bench.render_markdown(data)
    assert f"| fsdp-shard | {WORLD} | ok |" in text and "| single | 1 | ok |" in text

    cfg["variants"] = ["single", "ddp", "fsdp-shard"]
    data = bench.collect(cfg, runs[0]["bench"]["dir"], error="RuntimeError: rank 1 died")
    ddp = {r["variant"]: r for r in data["results"]}["ddp"]
    assert ddp["status"] == "failed" and ddp["error"] == "RuntimeError: rank 1 died"
    assert f"| ddp | {WORLD} | failed |" in bench.render_markdown(data)


# ----------------------------------------------------------------------------- without processes


def test_example_runs_fsdp_with_accumulation_and_saves_the_adapter(monkeypatch, tmp_path, capsys):
    """examples/train_distributed.py in this process as a 1-process gloo group (torchrun's
    environment): FSDP2 with the base sharded, 2 micro-batches per step, the adapter gathered and
    saved with PEFT, which loads it back."""
    import importlib.util

    from peft import PeftModel

    path = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
    spec = importlib.util.spec_from_file_location("train_distributed", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                           LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)
    save = tmp_path / "adapter"
    assert example.main(["--device", "cpu", "--preset", "tiny", "--mode", "fsdp", "--frozen", "shard", "--steps", "2",
                         "--accumulate", "2", "--batch", "1", "--seq", "16", "--inner", "aot_eager",
                         "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "step 1: loss" in out and "adapters identical on every rank: yes" in out
    import torch.distributed as dist

    assert not dist.is_initialized()
    from unsloth_compile.bench.distributed import DIST_PRESETS
    from unsloth_compile.bench.e2e import build_model

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(build_model(DIST_PRESETS["tiny"], torch.device("cpu"), torch.float32), save)
    trained = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(trained) == 28 and any(float(p.abs().sum()) > 0 for n, p in trained.items() if "lora_B" in n)


def test_clear_errors_without_a_process_group():
    from unsloth_compile.distributed import DistributedRankController, compile_ddp, no_sync, shard_lora_model

    model = _tiny_model()
    with pytest.raises(ValueError, match="frozen='both'.*'replicate'.*'shard'"):
        shard_lora_model(model, frozen="both")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_lora_model(model)
    with pytest.raises(RuntimeError, match="init_process_group"):
        compile_ddp(model)
    with pytest.raises(TypeError, match="expected a DDP or fully_shard model"):
        with no_sync(model):
            pass
    with pytest.raises(TypeError, match="expected the DDP wrapper"):
        DistributedRankController(model)


def test_find_blocks():
    from unsloth_compile.distributed import find_blocks

    model = _tiny_model()
    layers = list(model.base_model.model.model.layers)
    assert find_blocks(model) == layers  # LlamaDecoderLayer is in transformers' _no_split_modules
    assert find_blocks(model, ["base_model.model.model.layers.1"]) == layers[1:]
    with pytest.raises(ValueError, match="no module named 'layers.9'"):
        find_blocks(model, ["layers.9"])
    with pytest.raises(ValueError, match="pass blocks="):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(3, 3)))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
