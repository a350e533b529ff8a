"""End to end: train steps of a random-init model under each variant, one run, one table.

    python -m unsloth_compile.bench e2e --preset llama-1b      # on a GPU
    python -m unsloth_compile.bench e2e --preset tiny          # CPU smoke run, seconds

Per variant: median step time over the timed steps (warm-up, which includes compilation,
excluded; each step synchronised, so the host's lead-in to its first kernel counts), tokens/s
(or samples/s), as many steps again without a per-step synchronise (total time / steps: what
a loop that reads its loss only now and then gets, the host running ahead), peak memory, the
loss after all steps, and ratios to PEFT eager. The targets of DESIGN.md are printed against
the measured ratios. Every variant runs in isolation (memory freed, `torch._dynamo.reset()`
between) and a variant that fails is reported as failed with its error. Results are rewritten
after every variant, so a run that is cut short still leaves the variants it finished; the
command exits with status 1 when any variant failed. Every run also reports the wall time of
all its synchronised steps (compiles included) and how many graphs were compiled.

Real length distributions (causal LM presets):

    python -m unsloth_compile.bench e2e --preset llama-1b --lengths uniform:256-2048 \
        --layouts padded --variants peft-eager,peft+inductor,peft+unsloth,peft+unsloth@packed

`--lengths` (bench/lengths.py) draws each sequence's length, `--layouts` / a NAME@packed variant
choose the batches' form (bench/batch_layouts.py): padded rows with an attention mask, or
sequences packed into rows and flattened as transformers' DataCollatorWithFlattening does.
Then the table reports real (non-pad) tokens/s and the median step time over the steps after
the warm-up, the wall time of all steps and ratios to PEFT eager on padded batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

from . import lengths as length_specs
from .e2e_results import add_ratios, check_targets, render_markdown, write_outputs
from .flops import e2e_mfu
from .batch_layouts import LAYOUTS, SequenceStream, make_real_batches, real_tokens
from .batch_spellings import SPELLINGS, parse_spellings, spell_batch
from .lengths import LengthSpec, parse_lengths
from .model_options import apply_model_options
from .variants import (BACKEND_KINDS, MemoryMeter, Variant, compile_for, environment, make_optimizer, resolve_device,
                       resolve_inner, run_isolated, select_variants, synchronize, train_step)
from ..errors import UnslothCompileError

FIXED_LENGTHS = LengthSpec("fixed")

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BERT_TARGETS = ("query", "key", "value", "dense")


@dataclasses.dataclass(frozen=True)
class Target:
    description: str
    metric: str  # "throughput" or "peak_mem"
    variant: str  # role of the measured variant
    baseline: str  # role it is divided by
    op: str  # ">=" or "<="
    threshold: float


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "llama" (causal LM, tokens/s) or "bert-qa" (question answering, samples/s)
    config: dict
    batch: int
    seq: int
    lora_targets: tuple
    modules_to_save: tuple = ()
    rank: int = 16
    alpha: int = 32
    steps: int = 10  # timed steps
    warmup: int = 3  # untimed steps (compilation happens here)
    targets: tuple = ()
    note: str = ""

    @property
    def unit(self) -> str:
        return "tokens/s" if self.family == "llama" else "samples/s"

    def items_per_step(self) -> int:
        return self.batch * self.seq if self.family == "llama" else self.batch


# DESIGN.md's llama-1b figures: >= 87,000 tokens/s against PEFT eager 36.7k and Inductor 52.4k
_LLAMA_1B_TARGETS = (
    Target("tokens/s >= 2.4x PEFT eager", "throughput", "unsloth", "peft-eager", ">=", 2.4),
    Target("tokens/s >= 1.65x PEFT + torch.compile", "throughput", "unsloth", "peft-compile", ">=", 1.65),
    Target("peak memory <= 0.6x PEFT eager", "peak_mem", "unsloth", "peft-eager", "<=", 0.6),
)
# >= 600 samples/s against full fine-tuning's 513 (DESIGN.md), memory no more than PEFT eager's
_BERT_TARGETS = (
    Target("LoRA samples/s >= 1.17x full fine-tuning (600 vs 513)", "throughput", "unsloth", "full", ">=", 1.17),
    Target("peak memory <= PEFT eager", "peak_mem", "unsloth", "peft-eager", "<=", 1.0),
    Target("(PEFT eager LoRA samples/s vs full fine-tuning, for reference)", "throughput", "peft-eager", "full",
           ">=", 1.5),
)
# The floor for every model, not only the two presets: never slower than PEFT eager,
# never more memory. The shapes where a LoRA backend is likeliest to lose: small sites (narrow
# and deep: per-op overhead dominates), long sequences (attention dominates), a big vocabulary
# (the head and the loss dominate).
_NEVER_WORSE_TARGETS = (
    Target("tokens/s >= PEFT eager (never slower)", "throughput", "unsloth", "peft-eager", ">=", 1.0),
    Target("peak memory <= PEFT eager", "peak_mem", "unsloth", "peft-eager", "<=", 1.0),
)
# DESIGN.md's real-data figures (llama-1b shapes, lengths uniform 256-2048, 4 rows), judged on
# any causal LM preset run with a length distribution (for form only on the others)
_REAL_DATA_TARGETS = (
    Target("real tokens/s >= 1.8x PEFT eager, padded batches", "throughput", "unsloth", "peft-eager", ">=", 1.8),
    Target("real tokens/s >= 2.5x PEFT eager (padded), packed batches", "throughput", "unsloth@packed", "peft-eager",
           ">=", 2.5),
    Target("wall time of all steps, compiles included, <= 1/1.5 of PEFT eager's (padded, same sequences)", "wall",
           "unsloth", "peft-eager", "<=", 1 / 1.5),
    Target("every step after the warm-up no slower than PEFT eager's on the same batch (padded)", "worst_step",
           "unsloth", "peft-eager", "<=", 1.0),
)
_LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096)
# Llama-3.1-8B's shapes (NeMo Automodel's single-GPU LoRA benchmark runs them at 2 x 4096 tokens)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
_BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)

PRESETS = {p.name: p for p in (
    Preset("llama-1b", "llama", _LLAMA_1B, batch=4, seq=2048, lora_targets=LLAMA_TARGETS,
           targets=_LLAMA_1B_TARGETS, note="Llama-3.2-1B shapes, random init"),
    Preset("llama-8b", "llama", LLAMA_8B, batch=2, seq=4096, lora_targets=LLAMA_TARGETS,
           targets=_NEVER_WORSE_TARGETS, note="Llama-3.1-8B shapes, untied head, random init"),
    Preset("bert-large", "bert-qa", _BERT_LARGE, batch=32, seq=384, lora_targets=BERT_TARGETS,
           modules_to_save=("qa_outputs",), targets=_BERT_TARGETS, note="BERT-large QA shapes, random init"),
    Preset("llama-narrow-deep", "llama",
           dict(hidden_size=256, intermediate_size=704, num_hidden_layers=32, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=1024),
           batch=8, seq=512, lora_targets=LLAMA_TARGETS, targets=_NEVER_WORSE_TARGETS,
           note="hidden 256, 32 layers: 224 small LoRA sites (K, N 128-704), random init"),
    Preset("llama-long", "llama", dict(_LLAMA_1B, num_hidden_layers=4, max_position_embeddings=16384),
           batch=1, seq=16384, lora_targets=LLAMA_TARGETS, targets=_NEVER_WORSE_TARGETS,
           note="llama-1b's layers, 4 of them, one 16,384-token sequence: attention-bound, random init"),
    Preset("llama-big-vocab", "llama",
           dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=256000, tie_word_embeddings=False, max_position_embeddings=2048),
           batch=4, seq=1024, lora_targets=LLAMA_TARGETS, targets=_NEVER_WORSE_TARGETS,
           note="hidden 1024, 8 layers, a 256,000-token untied head: head- and loss-bound, random init"),
    Preset("tiny", "llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
           batch=2, seq=64, lora_targets=LLAMA_TARGETS, steps=4, warmup=2, targets=_LLAMA_1B_TARGETS,
           note="2-layer Llama for CPU smoke runs; llama-1b targets shown for form only"),
    Preset("tiny-bert", "bert-qa", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128),
           batch=4, seq=64, lora_targets=BERT_TARGETS, modules_to_save=("qa_outputs",), steps=4, warmup=2,
           targets=_BERT_TARGETS, note="2-layer BERT QA for CPU smoke runs; bert-large targets shown for form only"),
)}


def default_variants(inner: str) -> list[Variant]:
    """Full fine-tuning, PEFT eager, PEFT under plain torch.compile and under the backend; with
    Inductor, one more variant of each compiled kind per non-default compile mode (the role-less
    ones are shown, not held to targets)."""
    compiled = "inductor" if inner == "inductor" else "aot_eager"
    variants = [Variant("full-ft", "full", role="full"),
                Variant("peft-eager", "eager", role="peft-eager"),
                Variant(f"peft+{compiled}", compiled, role="peft-compile"),
                Variant("peft+unsloth", "unsloth", {"inner": inner}, role="unsloth")]
    if inner == "inductor":
        for mode, tag in COMPILE_MODES:
            variants.append(Variant(f"peft+inductor-{tag}", "inductor", {"mode": mode}))
            variants.append(Variant(f"peft+unsloth-{tag}", "unsloth", {"inner": inner, "mode": mode}))
    return variants


# torch.compile modes other than the default, with the short tag of their variant names
COMPILE_MODES = (("reduce-overhead", "ro"), ("max-autotune-no-cudagraphs", "ma"))


# ----------------------------------------------------------------------------- model and data


def build_model(preset: Preset, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BertConfig, BertForQuestionAnswering, LlamaConfig

    with torch.device(device):  # initialise on the device: a 1.2B model is slow to init on a CPU
        if preset.family == "llama":
            return AutoModelForCausalLM.from_config(LlamaConfig(**preset.config), dtype=dtype)
        return BertForQuestionAnswering._from_config(BertConfig(**preset.config), dtype=dtype)


def add_lora(model: torch.nn.Module, preset: Preset) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=preset.rank, lora_alpha=preset.alpha, lora_dropout=0.0,
                        target_modules=list(preset.lora_targets), modules_to_save=list(preset.modules_to_save) or None)
    return get_peft_model(model, config)  # adapters in fp32 on a bf16 base: PEFT's default


def freeze_to_norms(model: torch.nn.Module) -> int:
    """The `floor` variant's model: every parameter frozen except the norms' (RMSNorm, LayerNorm
    weights and biases), so that the backward runs dX through every frozen linear, attention and
    the head, as under LoRA, while the optimizer has (almost) nothing to do. Returns the number
    of trainable parameters; a model without norm modules is refused."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("Norm")]
    if not norms:
        raise UnslothCompileError(f"unsloth_compile.bench: floor: {type(model).__name__} has no *Norm module whose "
                                  "weights could train alone")
    model.requires_grad_(False)
    for module in norms:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare_model(model: torch.nn.Module, variant: Variant, preset: Preset) -> torch.nn.Module:
    """The variant's trainable model: its model options applied (bench/model_options.py: 4-bit
    bases, gradient checkpointing), then PEFT LoRA on it, or (floor) only the norms trainable, or
    (full) every parameter. On packed batches the model keeps no KV cache: transformers reads
    restarting position_ids as sequence boundaries only when there is none, and use_cache=True
    (Llama's default) makes one even in training, so packed sequences would attend to each other."""
    if variant.layout == "packed":
        model.config.use_cache = False
    apply_model_options(model, variant.options, keep_dense=preset.modules_to_save)
    if variant.lora:
        return add_lora(model, preset)
    if variant.kind == "floor":
        freeze_to_norms(model)
    return model


def make_batches(preset: Preset, count: int, seed: int, device: torch.device,
                 spelling: str = "full") -> list[dict]:
    """Random token batches. BERT batches are spelled as `spelling` says
    (bench/batch_spellings.py): by default with token_type_ids and an all-ones attention_mask."""
    g = torch.Generator().manual_seed(seed + 1)
    pads = torch.Generator().manual_seed(seed + 2)  # apart, so that every spelling draws the same ids
    vocab = preset.config.get("vocab_size", 30522)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (preset.batch, preset.seq), generator=g)
        if preset.family == "llama":
            batch = {"input_ids": ids, "labels": ids}
        else:
            positions = torch.randint(0, preset.seq, (2, preset.batch), generator=g)
            batch = spell_batch(ids, positions, spelling, pads)
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


# ----------------------------------------------------------------------------- one variant


def make_length_batches(preset: Preset, lengths: LengthSpec, layout: str, count: int, seed: int,
                        device: torch.device) -> list[dict]:
    """`count` batches of `preset.batch` rows whose sequence lengths follow `lengths`, in
    `layout` (bench/batch_layouts.py); one seed, one stream of sequences, for every variant."""
    stream = SequenceStream(lengths, preset.seq, preset.config["vocab_size"], seed)
    return make_real_batches(layout, stream, count, preset.batch, preset.seq, device)


def is_real_data(lengths: LengthSpec, variant: Variant) -> bool:
    """Whether `variant` trains on batches of their own sizes (lengths drawn, or packed)."""
    return lengths.kind != "fixed" or variant.layout != "padded"


def variant_batches(preset: Preset, variant: Variant, lengths: LengthSpec, spelling: str, count: int, seed: int,
                    device: torch.device) -> list[dict]:
    """The `count` batches `variant` trains on: drawn from `lengths` in the variant's layout
    where the run feeds real data, else the preset's fixed-shape batches spelled as `spelling`.
    Every variant of a run gets the same batches of its layout."""
    if is_real_data(lengths, variant):
        return make_length_batches(preset, lengths, variant.layout, count, seed, device)
    return make_batches(preset, count, seed, device, spelling=spelling)


def dynamo_graphs() -> int:
    """Graphs Dynamo has handed to a backend in this process (each frame compiled, recompiles
    and the pieces around a graph break included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_variant(preset: Preset, variant: Variant, device: torch.device, dtype: torch.dtype, steps: int,
                warmup: int, seed: int, lr: float, spelling: str = "full",
                lengths: LengthSpec = FIXED_LENGTHS) -> dict:
    from ..report import collect_reports

    meter = MemoryMeter(device)
    torch.manual_seed(seed)
    model = prepare_model(build_model(preset, device, dtype), variant, preset)
    if variant.options.get("fuse_cross_entropy") is True and preset.family == "llama":
        from ..training_outputs import loss_only

        loss_only(model)  # the step reads only .loss: without logits in the output the CE pass fuses
    model.train()
    step_fn = compile_for(model, variant)
    optimizer = make_optimizer(model.parameters(), lr, device)
    real_data = is_real_data(lengths, variant)
    batches = variant_batches(preset, variant, lengths, spelling, warmup + steps, seed, device)
    if real_data:  # every batch of its own size: a pipelined pass would time other batches, so none runs
        pipelined_batches = []
    else:
        # the pipelined pass: as many fresh batches as timed ones, no synchronise in between
        pipelined_batches = make_batches(preset, warmup + steps, seed + 1, device, spelling=spelling)[warmup:]
    tokens = [real_tokens(batch) for batch in batches]
    meter.exclude_preparation()  # after compile_for: unsloth_compile.compile converts bases before it returns
    graphs_before = dynamo_graphs()
    with collect_reports() as report:
        losses, times, ends = _synchronised_steps(step_fn, batches, optimizer, device, meter)
        pipelined_s = None
        if pipelined_batches:
            synchronize(device)
            t0 = time.perf_counter()
            pipelined_losses = [train_step(step_fn, batch, optimizer).detach() for batch in pipelined_batches]
            synchronize(device)
            pipelined_s = (time.perf_counter() - t0) / len(pipelined_batches)
            losses += [loss.item() for loss in pipelined_losses]
            meter.sample()
    timed = sorted(times[warmup:])
    median = timed[len(timed) // 2]
    steady_tokens_per_s = sum(tokens[warmup:]) / sum(times[warmup:])
    result = {"layout": variant.layout, "step_time_s": median, "step_times_s": times[warmup:],
              "warmup_s": ends[warmup - 1] if warmup else 0.0,
              "throughput": steady_tokens_per_s if real_data else preset.items_per_step() / median,
              "pipelined_step_time_s": pipelined_s,
              "pipelined_throughput": pipelined_s and preset.items_per_step() / pipelined_s,
              "steps_run": len(batches), "all_step_times_s": times, "wall_s_all_steps": ends[-1],
              "real_tokens_per_step": tokens, "real_tokens_total": sum(tokens),
              "steady_real_tokens_per_s": steady_tokens_per_s, "steady_step_time_s": median,
              "compiles": {"dynamo_graphs": dynamo_graphs() - graphs_before,
                           "backend_graphs": report.graphs if variant.kind in BACKEND_KINDS else None},
              "peak_mem_bytes": meter.peak_bytes(),
              "peak_reserved_bytes": meter.peak_reserved_bytes(), "mem_kind": meter.kind,
              "peak_mem_over": meter.SCOPE, "loss_final": losses[-1],
              "losses": losses, "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if variant.kind in BACKEND_KINDS:
        result["fusion"] = {"graphs": report.graphs, "fused": len(report.fused), "refused": len(report.refused),
                            "counters": dict(report.counters),
                            "refusal_reasons": dict(report.refusal_reasons())}
    return result


def _synchronised_steps(step_fn, batches: list[dict], optimizer, device: torch.device,
                        meter: MemoryMeter) -> tuple[list[float], list[float], list[float]]:
    """Each batch one synchronised step: the losses, each step's time, and the wall time from
    the first step's start to each step's end (compiles, loss reads and all in between)."""
    losses, times, ends = [], [], []
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        synchronize(device)
        t0 = time.perf_counter()
        loss = train_step(step_fn, batch, optimizer)
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        meter.sample()
        ends.append(time.perf_counter() - start)
    return losses, times, ends


# ----------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, help="timed steps (default: the preset's)")
    p.add_argument("--warmup", type=int, help="warm-up steps before the timed ones, compilation included; left out "
                                              "of the median and tokens/s, counted in the wall time of all steps "
                                              "(default: the preset's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="weights' dtype; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--inner", default="auto", choices=["auto", "inductor", "aot_eager", "eager"],
                   help="the unsloth backend's inner compiler and the torch.compile baseline's backend; "
                        "auto: inductor on CUDA, aot_eager on CPU (Inductor's C++ compile dominates there)")
    p.add_argument("--variants", help="comma list of default variants to run (default: all); a name ending in "
                                       "@padded or @packed runs on that layout only (peft+unsloth@packed)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KIND[:k=v,...]",
                   help="an extra variant, e.g. nofold=unsloth:fold_residual=false (repeatable); NAME@packed "
                        "runs it on packed batches only")
    add_batch_arguments(p, "e2e")
    p.add_argument("--attention-mask", default="both", choices=["yes", "no", "both"],
                   help="BERT presets: batches with an all-ones attention_mask, without, or one run of each "
                        "(the second written as e2e-NAME-nomask.*); the same as --spellings full / types / "
                        "full,types; causal LM presets ignore it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="docs/bench", help="output folder (JSON, markdown, PNG)")
    p.add_argument("--rows", type=int, help="sequences per step (default: the preset's); the run's files are "
                                            "named NAME-ROWSxSEQ when this or --seq is given")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")


def add_batch_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The options that choose what the batches hold: --lengths, --layouts and (BERT) --spellings,
    shared by `bench e2e` and `bench profile` (`command`: the prefix of their output files)."""
    p.add_argument("--lengths", default="fixed", type=_lengths_arg, help=length_specs.HELP)
    p.add_argument("--layouts", default="padded", type=_layouts_arg,
                   help="comma list of batch layouts every variant runs on (a variant named NAME@LAYOUT runs "
                        "on its own only): padded (batch rows, each batch right-padded to its longest, "
                        "attention_mask) and packed (sequences placed first-fit into rows of at most seq tokens, "
                        "batch rows per step flattened into one by DataCollatorWithFlattening: position_ids "
                        "restart, no mask); causal LM presets only for packed. A variant on another layout than "
                        "padded is named NAME@LAYOUT")
    p.add_argument("--spellings", type=_spellings_arg,
                   help=f"BERT presets: comma list of the ways to spell each batch, one table each, written as "
                        f"{command}-NAME-SPELLING.* (full as {command}-NAME.*, types as {command}-NAME-nomask.*): "
                        + ", ".join(SPELLINGS) + " (bench/batch_spellings.py); overrides the attention-mask option")


def _lengths_arg(text: str) -> LengthSpec:
    try:
        return parse_lengths(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _spellings_arg(text: str) -> list[str]:
    try:
        return parse_spellings(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _layouts_arg(text: str) -> list[str]:
    layouts = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in layouts if t not in LAYOUTS]
    if unknown or not layouts:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(LAYOUTS)}")
    return list(dict.fromkeys(layouts))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# The comparison that matters most runs first, so that a run cut short (a time limit, a crash
# of the process) still holds it; the table keeps the order of the variants as given.
_RUN_FIRST = {"peft-eager": 0, "unsloth": 1, "unsloth@packed": 2, "peft-compile": 3, "full": 4}


_MASK_SPELLINGS = {"yes": ["full"], "no": ["types"], "both": ["full", "types"]}
_SPELLING_SUFFIX = {"full": "", "types": "-nomask"}


def run(args) -> list[dict]:
    """One table per batch spelling asked for (BERT presets), else one."""
    return [run_one(args, spelling=spelling)
            for spelling in spellings_to_run(args, _MASK_SPELLINGS[args.attention_mask])]


def resized(preset: Preset, rows: Optional[int], seq: Optional[int]) -> Preset:
    """`preset` with `rows` sequences of `seq` tokens per step where given; its name then says
    the shape (llama-8b-2x2048), so that its files do not overwrite the preset's own."""
    if rows is None and seq is None:
        return preset
    rows, seq = rows or preset.batch, seq or preset.seq
    if rows < 1 or seq < 1:
        raise SystemExit(f"--rows and --seq must be at least 1 (got {rows}, {seq})")
    limit = preset.config.get("max_position_embeddings")
    if limit is not None and seq > limit:
        raise SystemExit(f"--seq {seq}: {preset.name} takes at most {limit} positions")
    return dataclasses.replace(preset, name=f"{preset.name}-{rows}x{seq}", batch=rows, seq=seq)


def spellings_to_run(args, by_mask_option: list[str]) -> list[str]:
    """The batch spellings a run covers: "full" alone for a causal LM preset; for BERT, those of
    --spellings, else `by_mask_option` (what the command's attention-mask option asks for)."""
    if PRESETS[args.preset].family == "llama":
        return ["full"]
    return getattr(args, "spellings", None) or by_mask_option


def spelled_mask(spelling: str):
    """What the results page says of the batch's attention_mask under `spelling`: True (all
    ones), False (none) or "padding"."""
    return {"full": True, "ones-mask": True, "padding-mask": "padding"}.get(spelling, False)


def run_name(preset: Preset, spelling: str, lengths: LengthSpec) -> str:
    """The name a run's files carry: the preset's, then (BERT) the batch spelling and the length
    distribution where they are not the default, so that runs of other batches do not overwrite it."""
    name = preset.name + ("" if preset.family == "llama" else _SPELLING_SUFFIX.get(spelling, "-" + spelling))
    return name + ("" if lengths.kind == "fixed" else "-" + str(lengths).replace(":", ""))


def check_real_data(preset: Preset, lengths: LengthSpec, variants: list[Variant]) -> bool:
    """Whether this run feeds batches of varying lengths or packed ones; refused, with the reason,
    where the preset cannot take them."""
    packed = [v.name for v in variants if v.layout != "padded"]
    if preset.family != "llama" and (lengths.kind != "fixed" or packed):
        raise SystemExit(f"--lengths {lengths} / packed variants {packed}: causal LM presets only "
                         f"({preset.name} is {preset.family})")
    try:
        lengths.check(preset.seq, preset.name)
    except ValueError as error:
        raise SystemExit(f"--lengths: {error}") from None
    return lengths.kind != "fixed" or bool(packed)


def run_one(args, spelling: str) -> dict:
    preset = resized(PRESETS[args.preset], getattr(args, "rows", None), getattr(args, "seq", None))
    device = resolve_device(args.device)
    inner = resolve_inner(args.inner, device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    steps = args.steps if args.steps is not None else preset.steps
    warmup = args.warmup if args.warmup is not None else preset.warmup
    if steps < 1:
        raise SystemExit("--steps must be at least 1")
    lengths = getattr(args, "lengths", FIXED_LENGTHS)
    variants = select_variants(default_variants(inner), args.variants, args.variant, inner,
                               layouts=getattr(args, "layouts", ["padded"]))
    real_data = check_real_data(preset, lengths, variants)
    if lengths.kind != "fixed":
        preset = dataclasses.replace(preset, targets=_REAL_DATA_TARGETS)
    env = environment(device)
    data = {"bench": "e2e", "preset": dataclasses.asdict(preset), "unit": preset.unit, "dtype": str(dtype),
            "inner": inner, "steps": steps, "warmup": warmup, "seed": args.seed, "lr": args.lr, "env": env,
            "mem_kind": MemoryMeter(device).kind, "peak_mem_over": MemoryMeter.SCOPE, "results": [], "targets": [],
            "attention_mask": spelled_mask(spelling) if preset.family != "llama" else None,
            "spelling": spelling if preset.family != "llama" else None,
            "lengths": str(lengths), "lengths_description": lengths.describe(preset.seq), "real_data": real_data,
            "layouts": list(dict.fromkeys(v.layout for v in variants)), "rows": preset.batch,
            "name": run_name(preset, spelling, lengths)}
    out = Path(args.out)
    print(f"e2e {preset.name} on {env['device']}: {len(variants)} variants, {warmup} warm-up + {steps} timed steps")
    for variant in sorted(variants, key=lambda v: _RUN_FIRST.get(v.role, len(_RUN_FIRST))):
        print(f"  {variant.name:<20} {variant.describe()} ...", flush=True)
        result = run_isolated(lambda: run_variant(preset, variant, device, dtype, steps, warmup, args.seed, args.lr,
                                                  spelling, lengths),
                              device)
        result["variant"] = variant.to_json()
        result.update(e2e_mfu(preset, variant.kind, result.get("throughput"), env["device"], not real_data))
        data["results"].append(result)
        data["results"].sort(key=lambda r: [v.name for v in variants].index(r["variant"]["name"]))
        add_ratios(data["results"])
        data["targets"] = check_targets(preset, data["results"], device)
        unit = "real tokens/s (steady)" if real_data else preset.unit
        status = (f"{result['throughput']:,.0f} {unit}, step {1e3 * result['step_time_s']:.1f} ms, "
                  f"{result['wall_s_all_steps']:.1f} s for all {result['steps_run']} steps"
                  if result["status"] == "ok" else f"FAILED: {result['error']}")
        print(f"  {'':<20} -> {status}", flush=True)
        paths = write_outputs(data, out)
    print()
    print(render_markdown(data))
    print("wrote " + ", ".join(paths.values()))
    return data
