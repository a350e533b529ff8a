"""Pipeline parallelism (torch.distributed.pipelining) for LoRA causal LMs, each stage compiled
with the unsloth backend.

    stage, module = pipeline_stage(model, stage_index, num_stages, device, microbatch=(rows, seq))
    schedule = pipeline_schedule(stage, n_microbatches, "1f1b")       # or "gpipe"
    schedule.step(input_ids, target=labels, losses=losses)           # first stage: input_ids; last: target

The decoder layers are split into `num_stages` contiguous runs (`split_layers`); a stage is a
`CausalLMStage` holding this rank's layers, plus the embeddings on the first stage and the final
norm and LM head on the last (the rotary embedding, which has no parameters, on every stage).
It keeps references to the model's own modules, so parameter names stay the model's (below
`layers.{i}`) and PEFT's `save_pretrained` on the whole model still sees the same adapters; the
modules of other stages are moved to the meta device (`free_others`) so that their memory is
returned. The stage is compiled in place (one graph per stage: the LoRA pass sees the layers as
on one GPU). The loss runs outside the compiled stage, as the schedule calls it on the last
stage's output (`causal_lm_loss`, transformers' shifted mean); the schedule scales each
microbatch's gradients by 1 / n_microbatches, so equal-length microbatches without ignored
labels give the whole batch's mean loss and gradients.

Warm-up (`warmup=True`, the default; `warm_up_stage`): the schedule compiles lazily, one stage
after the other. Stage s + 1 traces its forward only when stage s has compiled, run and sent its
first activations, and the backward graphs compile at the first backward, last stage first; the
first step pays the sum of every stage's compile times. `pipeline_stage` therefore runs the
stage forward and backward once on a dummy microbatch of the schedule's shapes (ids on the first
stage, hidden states that require grad on the others, a random gradient on the outputs), so
that every rank compiles at once, before the schedule. It leaves no trace: the parameters'
`.grad` and the RNG states are as they were, and the schedule's calls hit the same graphs (the
same shapes, dtypes, requires_grad and mode: call `module.train()` or `.eval()` before
`pipeline_stage`). The backend's reports of the stage are then published during
`pipeline_stage`: open `collect_reports()` around it to see them.

Layout supported: a transformers causal LM with `model.model.{embed_tokens, layers, norm,
rotary_emb}` and `lm_head` (Llama, Mistral, Qwen2, Gemma, ...), under PEFT or not. Other layouts
are refused with a ValueError naming what is missing.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile")

__all__ = ["CausalLMStage", "split_layers", "pipeline_stage", "pipeline_schedule", "causal_lm_loss", "warm_up_stage",
           "SCHEDULES"]

SCHEDULES = ("gpipe", "1f1b")


def split_layers(n_layers: int, num_stages: int) -> list[range]:
    """Contiguous runs of layer indices, one per stage, sizes differing by at most one (the
    earlier stages take the extra layers: the last stage also runs the LM head)."""
    if not 1 <= num_stages <= n_layers:
        raise UnslothCompileError(f"unsloth_compile.distributed.pipeline: {num_stages} stages for {n_layers} decoder "
                                  "layers; each stage needs at least one layer")
    base, extra = divmod(n_layers, num_stages)
    out, start = [], 0
    for s in range(num_stages):
        size = base + (s < extra)
        out.append(range(start, start + size))
        start += size
    return out


def _causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the causal LM, its decoder `model.model`), through a PEFT wrapper."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(lm, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, n)]
    if decoder is None or missing or not hasattr(lm, "lm_head"):
        what = ", ".join(f"model.{n}" for n in missing) if decoder is not None else "model"
        raise UnslothCompileError(f"unsloth_compile.distributed.pipeline: {type(lm).__name__} is not a Llama-style "
                                  f"causal LM (missing {what or 'lm_head'}); build the stages by hand with "
                                  "torch.distributed.pipelining")
    return lm, decoder


class CausalLMStage(nn.Module):
    """Decoder layers `layer_ids` of a Llama-style causal LM; the first stage embeds `input_ids`,
    the last applies the final norm and the LM head and returns logits; the others take and
    return hidden states."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[int], first: bool, last: bool):
        super().__init__()
        lm, decoder = _causal_lm_parts(model)
        self.config = decoder.config
        self.first, self.last = first, last
        self.embed_tokens = decoder.embed_tokens if first else None
        self.layers = nn.ModuleDict({str(i): decoder.layers[i] for i in layer_ids})
        self.rotary_emb = decoder.rotary_emb
        self.norm = decoder.norm if last else None
        self.lm_head = lm.lm_head if last else None
        # seconds warm_up_stage took; set now so that assigning it later adds no attribute (no guard changes)
        self.warmup_seconds: Optional[float] = None
        from transformers.masking_utils import create_causal_mask
        self._mask_params = frozenset(inspect.signature(create_causal_mask).parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        hidden = self.embed_tokens(x) if self.first else x
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(**_causal_mask_kwargs(self._mask_params, self.config, hidden, position_ids))
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers.values():
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids)
        if self.last:
            hidden = self.lm_head(self.norm(hidden))
        return hidden


def _causal_mask_kwargs(mask_params: frozenset, config, hidden: torch.Tensor,
                        position_ids: torch.Tensor) -> dict:
    """Keyword arguments of transformers' create_causal_mask for a cache-less forward. Its
    parameter names changed across transformers 5.x (`cache` / `past_key_values`,
    `inputs_embeds` / `input_embeds`, a required `cache_position` in older releases), and the
    GPU image and the CPU machine run different releases, so the names come from its signature
    (`mask_params`, read once outside the compiled forward)."""
    kwargs = {"config": config, "attention_mask": None, "position_ids": position_ids}
    kwargs["inputs_embeds" if "inputs_embeds" in mask_params else "input_embeds"] = hidden
    for cache_name in ("cache", "past_key_values"):
        if cache_name in mask_params:
            kwargs[cache_name] = None
    if "cache_position" in mask_params:
        kwargs["cache_position"] = position_ids[0]
    return kwargs


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """transformers' causal LM loss: token t predicts label t + 1, mean over the labels that are
    not `ignore_index`, computed in fp32."""
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten().to(logits.device),
                           ignore_index=ignore_index)


def _free(modules: Sequence[nn.Module]) -> None:
    for module in modules:
        module.to("meta")


def warm_up_stage(module: nn.Module, example: torch.Tensor) -> float:
    """Compile `module`'s forward and backward now: one forward on `example` (a microbatch of the
    shape, dtype, device and requires_grad the schedule will feed; its values do not matter) and
    a backward from a random gradient of the output's shape (not a loss: the last stage's logits
    get one too). Leaves no trace: the trainable parameters' `.grad` are restored (set aside
    during the run, so an existing gradient is not added to) and the RNG states of the CPU and of
    `example`'s device are restored (LoRA dropout draws from them). Returns the seconds taken."""
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    device = example.device
    start = time.perf_counter()
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type), \
                torch.enable_grad():
            out = module(example)
            torch.autograd.backward(out, torch.randn_like(out))
            del out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad
    return time.perf_counter() - start


def _dummy_input(meta: torch.Tensor, device: Any, vocab_size: int) -> torch.Tensor:
    """A tensor like `meta` (a meta-device input_args entry) on `device`, with its requires_grad;
    drawn from its own generator (the global RNG streams are left alone)."""
    g = torch.Generator().manual_seed(0)
    if meta.is_floating_point():
        x = torch.randn(meta.shape, dtype=meta.dtype, generator=g)
    else:
        x = torch.randint(0, vocab_size, meta.shape, dtype=meta.dtype, generator=g)
    return x.to(device).requires_grad_(meta.requires_grad)


def pipeline_stage(model: nn.Module, stage_index: int, num_stages: int, device: Any, *,
                   microbatch: tuple[int, int], group: Any = None, compile: bool = True,
                   options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None,
                   free_others: bool = True, dtype: Optional[torch.dtype] = None, warmup: bool = True):
    """(PipelineStage, CausalLMStage) for this rank: the stage's module built from `model`
    (split_layers), compiled in place with the unsloth backend when `compile`. `microbatch`:
    (rows, sequence length) of one microbatch, from which the shapes exchanged between stages
    are given to PipelineStage (no shape inference run through the compiled module). `group`:
    the pipeline's process group (a DeviceMesh's `mesh["pp"].get_group()`; None: the world).
    `dtype`: of the hidden states between stages (default: the embedding's). `warmup` (with
    `compile`): compile forward and backward now, on a dummy microbatch (warm_up_stage), so that
    the ranks compile in parallel rather than one after the other inside the first step; the
    time taken is `module.warmup_seconds`."""
    from torch.distributed.pipelining import PipelineStage

    lm, decoder = _causal_lm_parts(model)
    if num_stages > 1 and lm.lm_head.weight is decoder.embed_tokens.weight:
        raise UnslothCompileError("unsloth_compile.distributed.pipeline: the LM head is tied to the input embeddings "
                                  "(tie_word_embeddings), which would live on the first and the last stage; untie "
                                  "them (model.lm_head.weight = nn.Parameter(model.lm_head.weight.clone())) before "
                                  "splitting")
    runs = split_layers(len(decoder.layers), num_stages)
    first, last = stage_index == 0, stage_index == num_stages - 1
    module = CausalLMStage(model, runs[stage_index], first, last)
    if free_others:
        owned = {id(m) for m in module.modules()}
        _free([m for i, m in enumerate(decoder.layers) if i not in runs[stage_index]]
              + [m for m in (decoder.embed_tokens, decoder.norm, lm.lm_head) if id(m) not in owned])
    rows, seq = microbatch
    dtype = dtype or decoder.embed_tokens.weight.dtype
    # requires_grad: the received activations need a gradient to send back
    hidden = torch.empty(rows, seq, decoder.config.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    ids = torch.empty(rows, seq, dtype=torch.long, device="meta")
    logits = torch.empty(rows, seq, lm.config.vocab_size, dtype=dtype, device="meta")
    if compile:
        from ..integration import compile as compile_in_place

        # stages take fixed-shape microbatches from the schedule: no length buckets
        compile_in_place(module, {"cudagraphs": False, "bucket_lengths": False, **dict(options or {})}, mode=mode)
        if warmup:
            example = _dummy_input(ids if first else hidden, device, lm.config.vocab_size)
            module.warmup_seconds = warm_up_stage(module, example)
            log.info("unsloth_compile.distributed.pipeline: stage %d: compiled forward+backward in %.1f s", stage_index,
                     module.warmup_seconds)
    stage = PipelineStage(module, stage_index, num_stages, torch.device(device), input_args=(ids if first else hidden,),
                          output_args=logits if last else hidden, group=group)
    log.info("unsloth_compile.distributed.pipeline: stage %d of %d, layers %s%s", stage_index, num_stages,
             list(runs[stage_index]), ", compiled" if compile else "")
    return stage, module


def pipeline_schedule(stage: Any, n_microbatches: int, schedule: str = "1f1b", loss_fn: Any = causal_lm_loss):
    """A torch.distributed.pipelining schedule over `stage`: "gpipe" (every forward, then every
    backward) or "1f1b" (one forward one backward in steady state: at most num_stages
    microbatches' activations alive per stage). Gradients are scaled by 1 / n_microbatches."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    classes = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule not in classes:
        raise UnslothCompileError(f"unsloth_compile.distributed.pipeline: schedule={schedule!r}; choose one of "
                                  f"{SCHEDULES}")
    if n_microbatches < 1:
        raise UnslothCompileError(f"unsloth_compile.distributed.pipeline: n_microbatches={n_microbatches}; need at "
                                  "least 1")
    return classes[schedule](stage, n_microbatches, loss_fn=loss_fn)
