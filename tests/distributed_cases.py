"""The worker side of tests/distributed/test_distributed.py: a tiny PEFT Llama trained under DDP and FSDP2 by
WORLD gloo processes (this file run as a script: `--worker OUT`), the single-process references
on the concatenated batch, and the launcher.

The cases: DDP over the compiled model (buckets forced small, as a large model has them; a
no_sync-accumulated step; a LoRA grow through DistributedRankController with a different seed
on each rank; loss-decay decisions on rank-dependent losses), DDP over 4-bit NF4 bases, FSDP2 with the frozen base sharded
and replicated, FSDP2 with a bf16 MixedPrecisionPolicy, DDP with Dynamo's graph split left on,
and `bench dist`'s per-process part. Each rank saves what it saw (`rank{r}.pt`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

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
    out["broadcast_buffers"] = [ddp.broadcast_buffers]  # compile_ddp's default
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
    out["broadcast_buffers"].append(controller.ddp.broadcast_buffers)  # kept by the wrapper rebuilt at the rank change
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


def case_ddp_half_gradients(world, rank) -> dict:
    """compile_ddp(gradient_compression="fp16"): the gradients all-reduced in fp16 by torch's
    comm hook (bf16's hook, the same code in another dtype, needs NCCL: refused on a CPU build),
    which a rebuilt wrapper (a rank change) keeps."""
    from unsloth_compile.distributed import compile_ddp, rebuild_ddp

    model = _tiny_model()
    ddp = compile_ddp(model, OPTIONS, bucket_cap_mb=TINY_BUCKET_MB, gradient_compression="fp16")
    opt = _adamw(model)
    out = train(model, ddp, opt, STEPS, world, rank)
    rebuilt = rebuild_ddp(ddp)
    out["hooks"] = [len(ddp._comm_hooks), len(rebuilt._comm_hooks)]
    out["rebuilt_compression"] = rebuilt._unsloth_gradient_compression
    try:
        compile_ddp(_tiny_model(), OPTIONS, gradient_compression="bf16")
        out["bf16_error"] = None
    except ValueError as error:
        out["bf16_error"] = str(error)
    return out


def case_ddp_nf4(world, rank) -> dict:
    """compile_ddp(precision="nf4"): the LoRA bases stored in 4 bits (buffers, which DDP copies
    from rank 0 once and does not broadcast at each step) under DDP with small buckets, on the
    shared schedule (its no_sync-accumulated step included)."""
    from unsloth_compile import nf4
    from unsloth_compile.distributed import compile_ddp, no_sync
    from unsloth_compile.report import collect_reports

    model = _tiny_model()
    with collect_reports() as report:
        ddp = compile_ddp(model, dict(OPTIONS, precision="nf4"), bucket_cap_mb=TINY_BUCKET_MB)
        opt = _adamw(model)
        out = train(model, ddp, opt, STEPS, world, rank, sync_off=lambda: no_sync(ddp))
    out["counters"] = dict(report.counters)
    out["broadcast_buffers"] = ddp.broadcast_buffers
    out["nf4_bases"] = sum(isinstance(m, nf4.Nf4Linear) for m in model.modules())
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
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

    import unsloth_compile.distributed.fsdp as fsdp

    model = _tiny_model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else None
    compile_blocks, block_cudagraphs = fsdp.compile_blocks, []
    fsdp.compile_blocks = lambda *a, **kw: (block_cudagraphs.append(kw.get("cudagraphs")), compile_blocks(*a, **kw))
    try:
        shard_lora_model(model, frozen=frozen, options=OPTIONS, mp_policy=policy)
    finally:
        fsdp.compile_blocks = compile_blocks
    opt = _adamw(model)
    with collect_reports() as report:
        out = train(model, model, opt, STEPS[:1] if mp else STEPS, world, rank, sync_off=lambda: no_sync(model))
        out["counters"] = dict(report.counters)
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["frozen"] = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad and "layers.1.mlp" in n}
    out["kinds"] = {"trainable_dtensor": all(isinstance(p, DTensor) for p in _trainable(model).values()),
                    "frozen_dtensor": [isinstance(p, DTensor) for p in model.parameters() if not p.requires_grad]}
    out["adam"] = _adam_state(opt, model)
    out["block_cudagraphs"] = block_cudagraphs
    for name, call in (("set_rank", lambda: set_rank(model, 8, optimizer=opt)),
                       ("controller", lambda: DistributedRankController(model, opt))):
        try:
            call()
        except ValueError as error:
            out[f"{name}_error"] = str(error)
    return out


def case_fsdp_rank(world, rank, frozen) -> dict:
    """ShardedRankController(policy="manual") on shard_lora_model: the shared schedule, then each
    RANK_STEPS grow (seeded differently on each rank) and one step through the rebuilt model."""
    from torch.distributed.tensor import DTensor

    from unsloth_compile.distributed import ShardedRankController, no_sync, shard_lora_model
    from unsloth_compile.report import collect_reports

    shard = {"frozen": frozen, "options": OPTIONS}
    model = shard_lora_model(_tiny_model(), **shard)
    frozen_before = {n: _full(p) for n, p in model.named_parameters() if not p.requires_grad}
    opt = _adamw(model)
    controller = ShardedRankController(model, opt, "manual", build=_tiny_model, shard=shard,
                                       make_optimizer=lambda params: torch.optim.AdamW(params, lr=LR, eps=1e-4))
    out = train(model, model, opt, STEPS, world, rank, sync_off=lambda: no_sync(model))
    for k, r in enumerate(RANK_STEPS):
        torch.manual_seed(100 + k + 10 * rank)  # a grow draws new rows: different on each rank
        controller.set_rank(r)
        with collect_reports() as report:
            more = train(controller.model, controller.model, controller.optimizer, (1,), world, rank,
                         first_step=len(STEPS) + k)
        out["losses"] += more["losses"]
        out["grads"] += more["grads"]
    new = controller.model
    out["ranks"] = sorted(set(controller.ranks.values()))
    out["new_objects"] = [new is not model, controller.optimizer is not opt]
    out["sharded_again"] = all(isinstance(p, DTensor) for p in _trainable(new).values())
    out["fused_after"] = report.counters.get("lora_linear.fused", 0)
    out["refused_after"] = report.counters.get("lora_linear.refused", 0)
    out["frozen_unchanged"] = all(torch.equal(_full(p), frozen_before[n])
                                  for n, p in new.named_parameters() if not p.requires_grad)
    out["params"] = {n: _full(p) for n, p in _trainable(new).items()}
    out["adam"] = _adam_state(controller.optimizer, new)
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


def case_ddp_cuda(world, rank, cudagraphs: bool) -> dict:
    """GPU only (tests/distributed/test_distributed_gpu.py): compile_ddp on Inductor, one GPU per rank, with
    or without CUDA graphs, on the shared schedule (its no_sync-accumulated step included: the
    first micro-batch's gradients are alive in the graph pool's outputs when the second replays)."""
    from types import SimpleNamespace

    from unsloth_compile.distributed import compile_ddp, no_sync
    from unsloth_compile.report import collect_reports

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = _tiny_model().to(device)
    ddp = compile_ddp(model, {"inner": "inductor", "cudagraphs": cudagraphs, "summary": False},
                      device_ids=[rank], bucket_cap_mb=TINY_BUCKET_MB)
    opt = _adamw(model)

    def forward(**batch):  # the loss copied to the CPU (autograd follows the copy): train() sums there
        return SimpleNamespace(loss=ddp(**{k: v.to(device) for k, v in batch.items()}).loss.cpu())

    with collect_reports() as report:
        out = train(model, forward, opt, STEPS, world, rank, sync_off=lambda: no_sync(ddp))
    out["counters"] = dict(report.counters)
    out["grads"] = [{n: g.cpu() for n, g in step.items()} for step in out["grads"]]
    out["params"] = {n: _full(p).cpu() for n, p in _trainable(model).items()}
    return out


def _count_graph_recordings() -> list:
    """A one-element list counting cudagraph trees' recordings from now on (a test's probe of
    Inductor internals: CUDAGraphTreeManager.record_function is called once per recording)."""
    from torch._inductor import cudagraph_trees

    count = [0]
    original = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        count[0] += 1
        return original(self, *args, **kwargs)

    cudagraph_trees.CUDAGraphTreeManager.record_function = counting
    return count


def case_fsdp_cuda(world, rank, cudagraphs) -> dict:
    """GPU only: shard_lora_model(frozen="replicate") on Inductor, one GPU per rank, with CUDA
    graphs (None: shard_lora_model's default) or without, on the shared schedule; then plain
    steps with the graphs' recordings counted per step (a graph that re-recorded every step,
    as under frozen="shard", would be correct yet slow)."""
    from types import SimpleNamespace

    from unsloth_compile.distributed import no_sync, shard_lora_model
    from unsloth_compile.report import collect_reports

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    model = _tiny_model().to(device)
    options = {"inner": "inductor", "summary": False}
    if cudagraphs is not None:
        options["cudagraphs"] = cudagraphs
    shard_lora_model(model, frozen="replicate", options=options)
    opt = _adamw(model)

    def forward(**batch):
        return SimpleNamespace(loss=model(**{k: v.to(device) for k, v in batch.items()}).loss.cpu())

    recordings = _count_graph_recordings()
    with collect_reports() as report:
        out = train(model, forward, opt, STEPS, world, rank, sync_off=lambda: no_sync(model))
        out["recordings_per_step"] = []
        for step in range(4):
            before = recordings[0]
            train(model, forward, opt, (1,), world, rank, first_step=len(STEPS) + step)
            out["recordings_per_step"].append(recordings[0] - before)
    out["counters"] = dict(report.counters)
    out["grads"] = [{n: g.cpu() for n, g in step.items()} for step in out["grads"]]
    out["params"] = {n: _full(p).cpu() for n, p in _trainable(model).items()}
    return out


def case_fsdp_cuda_rank(world, rank) -> dict:
    """GPU only: ShardedRankController on shard_lora_model(frozen="replicate") on Inductor with
    its default CUDA graphs: the shared schedule, a grow to RANK_STEPS (seeded differently on each
    rank), one step through the rebuilt model (its blocks compiled and recorded anew)."""
    from types import SimpleNamespace

    from unsloth_compile.distributed import ShardedRankController, no_sync, shard_lora_model
    from unsloth_compile.report import collect_reports

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    shard = {"frozen": "replicate", "options": {"inner": "inductor", "summary": False}}
    model = shard_lora_model(_tiny_model().to(device), **shard)
    controller = ShardedRankController(model, _adamw(model), "manual", build=lambda: _tiny_model().to(device),
                                       shard=shard,
                                       make_optimizer=lambda params: torch.optim.AdamW(params, lr=LR, eps=1e-4))

    def forward(**batch):
        return SimpleNamespace(loss=controller.model(**{k: v.to(device) for k, v in batch.items()}).loss.cpu())

    with collect_reports() as report:
        out = train(model, forward, controller.optimizer, STEPS, world, rank, sync_off=lambda: no_sync(model))
        for k, r in enumerate(RANK_STEPS):
            torch.manual_seed(100 + k + 10 * rank)
            controller.set_rank(r)
            more = train(controller.model, forward, controller.optimizer, (1,), world, rank, first_step=len(STEPS) + k)
            out["losses"] += more["losses"]
            out["grads"] += more["grads"]
    out["counters"] = dict(report.counters)
    out["grads"] = [{n: g.cpu() for n, g in step.items()} for step in out["grads"]]
    out["params"] = {n: _full(p).cpu() for n, p in _trainable(controller.model).items()}
    return out


CASES = {"ddp": case_ddp, "ddp-fp16": case_ddp_half_gradients, "fsdp-shard": lambda w, r: case_fsdp(w, r, "shard"),
         "fsdp-replicate": lambda w, r: case_fsdp(w, r, "replicate"),
         "fsdp-mp": lambda w, r: case_fsdp(w, r, "shard", mp=True), "ddp-split": case_ddp_split,
         "fsdp-rank-replicate": lambda w, r: case_fsdp_rank(w, r, "replicate"),
         "fsdp-rank-shard": lambda w, r: case_fsdp_rank(w, r, "shard"),
         "bench": case_bench, "ddp-nf4": case_ddp_nf4}


CUDA_CASES = {"ddp-cuda": lambda w, r: case_ddp_cuda(w, r, False),
              "ddp-cuda-graphs": lambda w, r: case_ddp_cuda(w, r, True),
              "fsdp-cuda": lambda w, r: case_fsdp_cuda(w, r, False),
              "fsdp-cuda-graphs": lambda w, r: case_fsdp_cuda(w, r, None),
              "fsdp-cuda-rank": case_fsdp_cuda_rank}


def run_cases(cases: dict, save_as: str, backend: str = "gloo") -> None:
    """A worker process's body (here and in parallel_cases.py): the gloo group from torchrun's
    environment, each case in turn (Dynamo reset before it, its time printed), this rank's
    results saved to `save_as` formatted with its rank."""
    import torch.distributed as dist

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import unsloth_compile  # noqa: F401

    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, case in cases.items():
        torch._dynamo.reset()
        start = time.perf_counter()
        results[name] = case(world, rank)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    torch.save(results, save_as.format(rank=rank))
    dist.barrier()
    dist.destroy_process_group()


def worker(out_dir: str, cuda: bool = False) -> None:
    if cuda:  # NCCL for DDP's CUDA gradients, gloo for train()'s CPU loss all-reduce
        run_cases(CUDA_CASES, str(Path(out_dir) / "rank{rank}.pt"), backend="cpu:gloo,cuda:nccl")
    else:
        run_cases(CASES, str(Path(out_dir) / "rank{rank}.pt"))


# ----------------------------------------------------------------------------- launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



class Workers:
    """Worker processes started at once (name -> (argv, environment, log file)), each at a lower
    CPU priority: started with the session (tests/conftest.py), they use the cores the
    in-process tests leave idle. `wait` waits for all; when one fails the others are killed
    (they would wait for it in a collective), and a RuntimeError carries each failed job's log
    tail."""

    def __init__(self, jobs: dict, nice: int = 0):
        self.jobs, self.procs = jobs, {}
        for name, (argv, env, log_path) in jobs.items():
            with open(log_path, "w") as log:
                self.procs[name] = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
            if nice:  # set from here: a preexec_fn is unsafe in a parent with threads
                os.setpriority(os.PRIO_PROCESS, self.procs[name].pid, os.getpriority(os.PRIO_PROCESS, 0) + nice)

    def wait(self, timeout: float) -> None:
        """Waits at most `timeout` seconds from this call."""
        deadline = time.monotonic() + timeout
        procs = self.procs
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs.values()):
                break
            time.sleep(0.5)
        codes = {name: p.poll() for name, p in procs.items()}
        self.stop()
        failed = [name for name, code in codes.items() if code != 0]
        if failed:
            raise RuntimeError("\n".join(f"{name} exited {codes[name]}:\n" + self.jobs[name][2].read_text()[-6000:]
                                          for name in failed))

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


class Launch:
    """Started worker processes and how to read their results once they are done."""

    def __init__(self, workers: Workers, load, timeout: float):
        self.workers, self.load, self.timeout = workers, load, timeout

    def results(self):
        self.workers.wait(self.timeout)
        return self.load()


def start(world: int, out: Path, timeout: float = 900, cuda: bool = False, nice: int = 0) -> Launch:
    """Start `world` worker processes (torchrun's environment, no agent: each process saves the
    seconds an extra Python start costs); `.results()` waits for all (at most `timeout` seconds)
    and returns what each rank saved, or raises RuntimeError with every failed rank's log tail."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               UNSLOTH_TEST_OUT=str(out), OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
    argv = [sys.executable, __file__, "--worker-cuda" if cuda else "--worker", str(out)]
    workers = Workers({f"rank {rank}": (argv, dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), out / f"log{rank}.txt")
                       for rank in range(world)}, nice)
    return Launch(workers, lambda: [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)],
                  timeout)


def launch(world: int, out: Path, timeout: float = 900, cuda: bool = False) -> list[dict]:
    """start(...).results(): the processes started and waited for."""
    return start(world, out, timeout, cuda).results()


# ----------------------------------------------------------------------------- references


def reference(world: int, dtype=torch.float32, device=None) -> dict:
    """One process, eager, the whole batch of every step, the same schedule (and rank 0's seeds).
    `device`: where the model lives, as in the case compared with it. A grow draws its new rows
    from the generator of the adapters' device, and CPU and CUDA generators give different rows
    for one seed, so a CUDA case needs a CUDA reference; results come back on the CPU."""
    from types import SimpleNamespace

    from unsloth_compile.rank import set_rank

    model = _tiny_model(dtype)
    for p in _trainable(model).values():
        p.data = p.data.float()  # PEFT's fp32 adapters on a low-precision base
    forward = model
    if device is not None:
        model = model.to(device)

        def forward(**batch):
            return SimpleNamespace(loss=model(**{k: v.to(device) for k, v in batch.items()}).loss.cpu())
    opt = _adamw(model)
    out = train(model, forward, opt, STEPS, world, None)
    out["params_before_rank"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam_before_rank"] = _adam_state(opt, model)
    for k, r in enumerate(RANK_STEPS):
        torch.manual_seed(100 + k)
        set_rank(model, r, optimizer=opt)
        more = train(model, forward, opt, (1,), world, None, first_step=len(STEPS) + k)
        out["losses"] += more["losses"]
        out["grads"] += more["grads"]
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    out["adam"] = _adam_state(opt, model)
    return _to_cpu(out) if device is not None else out


def reference_nf4(world: int) -> dict:
    """The yardstick of the 4-bit DDP case: one process, eager, its LoRA bases converted to
    Nf4Linear as compile(precision="nf4") converts them, the whole batch of every step."""
    from unsloth_compile import nf4

    model = _tiny_model()
    nf4.convert(model)
    opt = _adamw(model)
    out = train(model, model, opt, STEPS, world, None)
    out["params"] = {n: _full(p) for n, p in _trainable(model).items()}
    return out


def _to_cpu(value):
    if torch.is_tensor(value):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def reference_bf16(world: int) -> dict:
    """The yardstick of the mixed-precision case: one process, every parameter in bf16 (what
    MixedPrecisionPolicy(param_dtype=bf16) computes with), the first step."""
    model = _tiny_model(torch.bfloat16)
    opt = torch.optim.SGD(_trainable(model).values(), lr=0.0)
    return train(model, model, opt, STEPS[:1], world, None)



if __name__ == "__main__" and sys.argv[1:2] in (["--worker"], ["--worker-cuda"]):
    worker(sys.argv[2], cuda=sys.argv[1] == "--worker-cuda")
