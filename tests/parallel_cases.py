"""The worker side of tests/distributed/test_parallel.py: a tiny PEFT Llama trained with tensor parallelism
(DTensor), pipeline parallelism (torch.distributed.pipelining) and their combinations with data
parallelism, by gloo processes (this file run as a script: `--worker OUT`); the single-process
reference; the launcher, which starts the 2-process and the 4-process groups at once.

Every case runs the same schedule: STEPS AdamW steps on the same BATCH rows per step (seq SEQ),
each rank reading its share (DP: rows split by replica; PP: the replica's rows split into
microbatches), and records the losses, the whole gradients of the LoRA parameters it holds and
the backend's counters. Each rank saves what it saw (`{group}-rank{r}.pt`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

STEPS = 2
BATCH = 4  # rows per step, whole batch
SEQ = 11  # tokens per row: not a multiple of anything
LR = 1e-2
OPTIONS = {"inner": "aot_eager", "summary": False}
GROUPS = {"pair": 2, "quad": 4}  # process groups launched, and their sizes


def tiny_model(tied: bool = False):
    """The tiny PEFT Llama; `tied`: its LM head tied to the embedding (as llama-1b's)."""
    import helpers

    torch.manual_seed(0)
    model = helpers.tiny_causal_lm("llama")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    return helpers.peft_wrap(model)


def batch(step: int) -> dict:
    import helpers

    return helpers.batch_for("llama", batch=BATCH, seq=SEQ, seed=step)


def rows(b: dict, part: int, parts: int) -> dict:
    return {k: v.chunk(parts)[part] for k, v in b.items()}


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float().clone()


def adamw(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(params), lr=LR, eps=1e-4)  # eps: see distributed_cases._adamw


def reference(tied: bool = False) -> dict:
    """One eager process on the whole batch of every step."""
    model = tiny_model(tied)
    opt = adamw(trainable(model).values())
    out = {"losses": [], "grads": []}
    for step in range(STEPS):
        loss = model(**batch(step)).loss
        loss.backward()
        out["losses"].append(float(loss.detach()))
        out["grads"].append({n: full(p.grad) for n, p in trainable(model).items()})
        opt.step()
        opt.zero_grad()
    out["params"] = {n: full(p) for n, p in trainable(model).items()}
    return out


# ----------------------------------------------------------------------------- worker cases


class _OpShapes:
    """Records the (W, A, B) shapes the fused op computes with (the reference kernel on CPU)."""

    def __enter__(self):
        from unsloth_compile.kernels import reference as kernel

        self.kernel, self.original, self.seen = kernel, kernel.lora_linear_forward, set()

        def recording(x, weight, bias, lora_A, lora_B, *args):
            self.seen.add((tuple(weight.shape), tuple(lora_A.shape), tuple(lora_B.shape)))
            return self.original(x, weight, bias, lora_A, lora_B, *args)

        kernel.lora_linear_forward = recording
        return self

    def __exit__(self, *exc):
        self.kernel.lora_linear_forward = self.original


def _train_tp(model, tp_mesh, dp_group=None, dp_rank=0, dp_size=1, **tp_options) -> dict:
    """`tp_options`: tensor_parallel's sequence_parallel=, regather_in_backward= and
    vocab_parallel_head= (whose loss, a replicated DTensor, is computed and differentiated under
    loss_parallel())."""
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel

    from unsloth_compile.distributed.tensor_parallel import all_reduce_gradients, tensor_parallel
    from unsloth_compile.report import collect_reports

    tensor_parallel(model, tp_mesh, options=OPTIONS, **tp_options)
    opt = adamw(trainable(model).values())
    out = {"losses": [], "grads": []}
    vocab_parallel = loss_parallel if tp_options.get("vocab_parallel_head") else contextlib.nullcontext
    with collect_reports() as report, _OpShapes() as shapes:
        for step in range(STEPS):
            with vocab_parallel():
                loss = model(**rows(batch(step), dp_rank, dp_size)).loss
                loss.backward()
            loss = full(loss)
            if dp_group is not None:
                all_reduce_gradients(model, dp_group)
                loss = loss.detach().clone()
                torch.distributed.all_reduce(loss, group=dp_group)
                loss /= dp_size
            out["losses"].append(float(loss))
            out["grads"].append({n: full(p.grad) for n, p in trainable(model).items()})
            opt.step()
            opt.zero_grad()
    out["counters"] = dict(report.counters)
    out["layouts"] = sorted({s.details.get("dtensor_layout") for s in report.sites if s.decision == "fused"},
                            key=str)
    out["op_shapes"] = sorted(shapes.seen)
    out["params"] = {n: full(p) for n, p in trainable(model).items()}
    out["cross_entropy_reasons"] = sorted({s.reason for s in report.sites if s.pattern == "linear_cross_entropy"},
                                          key=str)
    return out


def case_tp(world, rank) -> dict:
    """TP over every rank; then a resize, refused; then a plan that shards A by rank, refused
    by the pass and computed unfused (the loss must still be right)."""
    from torch.distributed.device_mesh import init_device_mesh

    from unsloth_compile.rank import set_rank

    model = tiny_model()
    out = _train_tp(model, init_device_mesh("cpu", (world,)))
    try:
        set_rank(model, 8)
    except ValueError as error:
        out["set_rank_error"] = str(error)
    out["refused"] = case_tp_refused(world, rank)
    return out


def _saved_for_backward(model) -> dict:
    """What autograd keeps for backward after one forward of `model` on step 0's batch: bytes,
    each storage once (parameters included), and the shapes of the tensors saved. A first
    forward compiles (the pass's tracing would reach the hooks with fake tensors)."""
    import helpers

    inputs = rows(batch(0), 0, 1)  # as _train_tp passes them: labels not the same tensor as input_ids
    model(**inputs).loss.backward()
    _, saved = helpers.saved_tensors(lambda: model(**inputs).loss.backward())
    return {"bytes": helpers.storage_bytes(saved), "shapes": [tuple(t.shape) for t in saved]}


def case_tp_sp_vocab(world, rank) -> dict:
    """TP with sequence parallelism, its blocks' inputs all-gathered again in backward, and the
    vocab-parallel head, on a model whose head is tied to its embedding (llama-1b's); what
    autograd saves for backward with it and, on a second model, without regathering; then one
    eager step with SP alone, where the tied embedding stays whole (its output sliced), and one
    with SP regathered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from unsloth_compile.distributed.tensor_parallel import tensor_parallel

    mesh = init_device_mesh("cpu", (world,))
    model = tiny_model(tied=True)
    out = _train_tp(model, mesh, sequence_parallel=True, vocab_parallel_head=True, regather_in_backward=True)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    out["still_tied"] = head.weight is embedding.weight
    out["head_placements"] = [str(p) for p in head.weight.placements]
    with loss_parallel():
        out["saved"] = {"regathered": _saved_for_backward(model)}
        torch._dynamo.reset()
        kept_gathered = tensor_parallel(tiny_model(tied=True), mesh, sequence_parallel=True,
                                        vocab_parallel_head=True, options=OPTIONS)
        out["saved"]["kept gathered"] = _saved_for_backward(kept_gathered)
    for name, regather in (("sp_only", False), ("sp_regathered", True)):
        whole = tensor_parallel(tiny_model(tied=True), mesh, sequence_parallel=True, regather_in_backward=regather,
                                compile=False)
        loss = whole(**batch(0)).loss
        loss.backward()
        out[name] = {"loss": float(loss), "grads": {n: full(p.grad) for n, p in trainable(whole).items()},
                     "still_tied": whole.get_output_embeddings().weight is whole.get_input_embeddings().weight}
    return out


def case_tp_refused(world, rank) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    from unsloth_compile.distributed.tensor_parallel import LoraColwiseParallel, lora_tp_plan, tensor_parallel
    from unsloth_compile.report import collect_reports

    class ShardedRank(LoraColwiseParallel):  # A split along its rank: no layout of the fused op
        def lora_placements(self):
            base, _, b = super().lora_placements()
            return base, {"weight": Shard(0)}, b

    torch._dynamo.reset()
    model = tiny_model()
    plan = {k: ShardedRank() if k.endswith("q_proj") else v for k, v in lora_tp_plan(model).items()}
    tensor_parallel(model, init_device_mesh("cpu", (world,)), plan, options=OPTIONS)
    with collect_reports() as report:
        loss = model(**batch(0)).loss
        loss.backward()
    return {"loss": float(loss), "counters": dict(report.counters),
            "reasons": sorted({s.reason for s in report.refused if s.pattern == "lora_linear"}),
            "grads": {n: full(p.grad) for n, p in trainable(model).items()}}


class _Compiles:
    """Compilations while open: Dynamo's frames (counters["frames"]["ok"]) and every compile event
    by trigger (DYNAMO, LAZY_BACKWARD: AOTAutograd's backward compiled at the first backward)."""

    def __enter__(self):
        from torch._dynamo.callback import callback_handler
        from torch._dynamo.utils import counters

        self.counters, self.handler, self.triggers = counters, callback_handler, []
        self.frames_before = counters["frames"]["ok"]
        self.handler.register_end_callback(self._record)
        return self

    def _record(self, args=None):  # torch >= 2.7 passes CallbackArgs
        self.triggers.append(getattr(getattr(args, "callback_trigger", None), "name", "?"))

    def __exit__(self, *exc):
        self.handler.remove_end_callback(self._record)
        self.frames = self.counters["frames"]["ok"] - self.frames_before

    def summary(self) -> dict:
        return {"frames": self.frames, "triggers": sorted(self.triggers)}


def _train_pp(model, schedule, stage_index, num_stages, pp_group=None, dp_group=None, dp_rank=0, dp_size=1,
              microbatches=2) -> dict:
    """pipeline_stage warms the stage up (compiles it) before the schedule: recorded are the
    compilations during pipeline_stage and during the steps, and what the warm-up left behind."""
    from unsloth_compile.distributed.tensor_parallel import all_reduce_gradients
    from unsloth_compile.distributed.pipeline import pipeline_schedule, pipeline_stage
    from unsloth_compile.report import collect_reports

    mb_rows = BATCH // dp_size // microbatches
    rng = torch.get_rng_state()
    with collect_reports() as report:  # the stage compiles inside pipeline_stage (its warm-up)
        with _Compiles() as warm:
            stage, module = pipeline_stage(model, stage_index, num_stages, "cpu", microbatch=(mb_rows, SEQ),
                                           group=pp_group, options=OPTIONS)
    sched = pipeline_schedule(stage, microbatches, schedule)
    opt = adamw(trainable(module).values())
    last = stage_index == num_stages - 1
    out = {"losses": [], "grads": [], "last": last,
           "warmup": {**warm.summary(), "rng_kept": torch.equal(rng, torch.get_rng_state()),
                      "grads_none": all(p.grad is None for p in trainable(module).values()),
                      "seconds": module.warmup_seconds}}
    with collect_reports() as step_report, _Compiles() as steps:
        for step in range(STEPS):
            b = rows(batch(step), dp_rank, dp_size)
            losses = []
            if stage_index == 0:
                sched.step(b["input_ids"], target=b["labels"] if last else None, losses=losses)
            else:
                sched.step(target=b["labels"] if last else None, losses=losses)
            if dp_group is not None:
                all_reduce_gradients(module, dp_group)
            if last:
                loss = torch.stack([x.detach() for x in losses]).mean()
                if dp_group is not None:
                    torch.distributed.all_reduce(loss, group=dp_group)
                    loss /= dp_size
                out["losses"].append(float(loss))
            out["grads"].append({n: full(p.grad) for n, p in trainable(module).items()})
            opt.step()
            opt.zero_grad()
    out["counters"] = dict(report.counters + step_report.counters)
    out["steps_compiled"] = steps.summary()
    out["params"] = {n: full(p) for n, p in trainable(module).items()}
    return out


def case_pp(world, rank, schedule) -> dict:
    return _train_pp(tiny_model(), schedule, rank, world)


def _mesh_2d(names):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=names)


def case_dp_tp(world, rank) -> dict:
    mesh = _mesh_2d(("dp", "tp"))
    return _train_tp(tiny_model(), mesh["tp"], mesh["dp"].get_group(), mesh["dp"].get_local_rank(), 2)


def case_dp_tp_sp(world, rank) -> dict:
    """DP x TP with sequence parallelism: SEQ = 11 tokens, uneven shards (6 and 5)."""
    mesh = _mesh_2d(("dp", "tp"))
    return _train_tp(tiny_model(), mesh["tp"], mesh["dp"].get_group(), mesh["dp"].get_local_rank(), 2,
                     sequence_parallel=True)


def case_dp_pp(world, rank) -> dict:
    mesh = _mesh_2d(("dp", "pp"))
    pp = mesh["pp"]
    return _train_pp(tiny_model(), "1f1b", pp.get_local_rank(), 2, pp.get_group(), mesh["dp"].get_group(),
                     mesh["dp"].get_local_rank(), 2)


CASES = {
    "pair": {"tp": case_tp, "tp-sp-vocab": case_tp_sp_vocab,
             "pp-gpipe": lambda w, r: case_pp(w, r, "gpipe"), "pp-1f1b": lambda w, r: case_pp(w, r, "1f1b")},
    "quad": {"dp-tp": case_dp_tp, "dp-tp-sp": case_dp_tp_sp, "dp-pp": case_dp_pp},
}


def worker(group: str, out_dir: str) -> None:
    from distributed_cases import run_cases

    run_cases(CASES[group], str(Path(out_dir) / f"{group}-rank{{rank}}.pt"))


# ----------------------------------------------------------------------------- launcher


def start(out: Path, timeout: float = 300, nice: int = 0):
    """Start every group of GROUPS at once (torchrun's environment, no agent); `.results()` waits
    for all (at most `timeout` seconds) and returns each group's ranks' results, or kills the
    rest after a failure and raises RuntimeError with the failed ranks' log tails."""
    from distributed_cases import Launch, Workers, _free_port

    jobs = {}
    for group, world in GROUPS.items():
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        for rank in range(world):
            jobs[f"{group} rank {rank}"] = ([sys.executable, __file__, "--worker", group, str(out)],
                                            dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                            out / f"{group}-log{rank}.txt")
    return Launch(Workers(jobs, nice), lambda: {g: [torch.load(out / f"{g}-rank{r}.pt", weights_only=False)
                                                    for r in range(w)] for g, w in GROUPS.items()}, timeout)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2], sys.argv[3])
