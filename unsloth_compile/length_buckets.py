"""Length buckets: each training batch's token axis padded up to one of a few lengths before the
compiled model sees it, and the model's per-token outputs cut back to the batch's own length.

Why: a DataLoader with a padding collator hands over batches whose length changes every step.
Each new length would otherwise cost a recompile (static, then dynamic, then again on Inductor's
guards on the length's alignment). With the lengths rounded up to a bucket, one dynamic graph is
compiled at the first padded batch and serves every length after it, with every length a
multiple of 16, and the kernels' timed choices meet a bounded set of problem sizes. The buckets
are 8 per power of two (a bucket is a multiple of 1/16 of the next power of two, at least 16
tokens): the padding adds at most 1/8 of the tokens, and 256 to 2048 tokens fall into 25 buckets.
The dynamic graph runs without CUDA graphs unless `cudagraphs=True` (backend.cudagraphs_decision).

What a bucket adds never changes a result at the batch's own positions (dropout aside: its random
draws follow the padded shape):
- `input_ids` are padded with the model's `pad_token_id` (0 without one), `labels` with -100
  (ignored by the loss; the mean is over the same tokens), `token_type_ids` and `inputs_embeds`
  with zeros;
- `attention_mask` is padded with zeros. Without one, a causal model (every attention module says
  `is_causal`) is padded without a mask: no earlier position attends to a later one. A
  bidirectional model gets the mask a padding collator would have built (ones, then zeros);
- `position_ids` go on counting where a mask hides the padding; without a mask (a packed row,
  whose positions restart) the padding is one more sequence, starting at 0;
- outputs whose second dimension is the padded length (logits, hidden states, start and end
  logits) are sliced back, as views.

An `attention_mask` of all ones (a batch without padding, as a collator spells it) is passed on
as no mask, said once: transformers drops such a mask in eager, but cannot read its values under
tracing and builds an attention bias from it, which keeps SDPA off its unmasked kernels. Seeing
that it is all ones is one reduction read on the host, which waits for the GPU to finish the
work queued before the step; a training loop that reads its loss or checks it for NaN each step
(transformers' Trainer does) waits there anyway.

A batch is passed on as it came, and the reason logged once, when padding it could change a
result: a tensor argument of the batch's length that is not listed above, a positional tensor
argument after `input_ids`, an attention mask that is not (batch, length), a causal
sequence-classification head without `pad_token_id` (it pools the last position), or a call with
a key/value cache. Evaluation-mode calls (generation) are never padded.

Used by `unsloth_compile.compile` and the Trainer callback (option `bucket_lengths`, on by
default); `torch.compile(model, backend="unsloth")` sees only graphs and cannot pad its inputs.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from typing import Any, Callable, Optional

import torch
import torch._inductor.config  # noqa: F401  torch._inductor.config.triton, read below

log = logging.getLogger("unsloth_compile.summary")

MIN_BUCKET = 16  # a multiple of 8: Inductor's alignment guards on the length hold in every bucket
BUCKETS_PER_OCTAVE = 8
CUDA_GRAPH_RECORDINGS_EXPECTED = 64
IGNORE_INDEX = -100  # transformers' and torch's cross-entropy ignore_index

# Keyword arguments whose second dimension is the token axis, and what pads them.
TOKEN_ALIGNED = ("input_ids", "attention_mask", "labels", "shift_labels", "position_ids", "token_type_ids",
                 "inputs_embeds")
# Keyword arguments that mean a cached (generation) call.
CACHE_ARGUMENTS = ("past_key_values", "cache_position", "use_cache")
# 2-D outputs (batch, length) that are per token; other 2-D outputs (a classifier's logits) are not.
PER_TOKEN_2D_OUTPUTS = ("start_logits", "end_logits")


# The padded length of the batch being run, while a call whose batch needed padding runs (None
# otherwise). Graphs compiled inside the call on tensors the wrapper never saw (a region's
# block inputs, built in eager from the padded batch) read it to compile for a dynamic length
# at once, as the whole-model graph does from the marked batch (regions.py).
_DYNAMIC_LENGTH: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("unsloth_dynamic_length",
                                                                                 default=None)


def current_dynamic_length() -> Optional[int]:
    """The token length of the batch now running through a LengthBuckets call, where that batch
    was padded to its bucket (its lengths vary); None outside such a call."""
    return _DYNAMIC_LENGTH.get()


def bucket_length(length: int) -> int:
    """The bucket a batch of `length` tokens is padded to: `length` rounded up to a multiple of
    1/16 of its next power of two, and at least MIN_BUCKET."""
    if length <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(MIN_BUCKET, (1 << (length - 1).bit_length()) // (2 * BUCKETS_PER_OCTAVE))
    return -(-length // step) * step


def is_causal_model(model: torch.nn.Module) -> bool:
    """Whether every attention module of `model` says it is causal (transformers' `is_causal`),
    and there is at least one."""
    flags = [m.is_causal for m in model.modules()
             if isinstance(getattr(m, "is_causal", None), bool) and not isinstance(m, torch.nn.MultiheadAttention)]
    return bool(flags) and all(flags)


def first_parameter(model: torch.nn.Module) -> Optional[str]:
    """The name of the first parameter of the model's forward, looking through wrappers whose
    forward takes `*args` (PEFT's) to the model they wrap; None when unknown."""
    for candidate in (model, getattr(model, "get_base_model", lambda: None)()):
        if candidate is None:
            continue
        try:
            parameters = list(inspect.signature(candidate.forward).parameters.values())
        except (TypeError, ValueError):  # a forward without a signature
            return None
        if parameters and parameters[0].kind is not inspect.Parameter.VAR_POSITIONAL:
            return parameters[0].name
    return None


def _config(model: torch.nn.Module) -> Any:
    return getattr(model, "config", None)


def pools_last_position(model: torch.nn.Module) -> bool:
    """A causal model with a sequence-classification head and no pad_token_id: transformers pools
    its last position, which padding would move."""
    config = _config(model)
    heads = any(type(m).__name__.endswith("ForSequenceClassification") for m in model.modules())
    return heads and getattr(config, "pad_token_id", None) is None


class LengthBuckets:
    """`compiled_call(*args, **kwargs)` with the batch's token axis padded to its bucket (see the
    module docstring); the wrapper `unsloth_compile.compile` installs as the module's compiled call."""

    def __init__(self, model: torch.nn.Module, compiled_call: Callable):
        self.model = model
        self.compiled_call = compiled_call
        self.causal = is_causal_model(model)
        config = _config(model)
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = pad if isinstance(pad, int) else 0
        self.pools_last_position = self.causal and pools_last_position(model)
        self.first_parameter = first_parameter(model)
        # With cudagraphs=True, Inductor warns after 8 recordings of one dynamic graph, advising
        # what the buckets do; a run meets up to 8 buckets per power of two of its lengths.
        triton_config = torch._inductor.config.triton
        limit = triton_config.cudagraph_dynamic_shape_warn_limit
        if limit is not None and limit < CUDA_GRAPH_RECORDINGS_EXPECTED:  # None: the user silenced it
            triton_config.cudagraph_dynamic_shape_warn_limit = CUDA_GRAPH_RECORDINGS_EXPECTED
        self.lengths_seen: set[int] = set()
        self.buckets_seen: set[int] = set()
        self._told: set[str] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        padded = self.pad(args, kwargs)
        if padded is None:
            return self.compiled_call(*args, **kwargs)
        args, kwargs, length, bucket = padded
        if bucket == length:
            return self.compiled_call(*args, **kwargs)
        token = _DYNAMIC_LENGTH.set(bucket)
        try:
            outputs = self.compiled_call(*args, **kwargs)
        finally:
            _DYNAMIC_LENGTH.reset(token)
        return cut_outputs(outputs, length, bucket)

    # -------------------------------------------------------------------------------------------
    def _refuse(self, why: str) -> None:
        if why not in self._told:
            self._told.add(why)
            log.info("unsloth_compile: bucket_lengths: this batch is passed on unpadded: %s", why)
        return None

    def pad(self, args: tuple, kwargs: dict):
        """(args, kwargs, length, bucket) with the token-aligned tensors padded, or None when the
        batch is passed on as it came (the reason logged once)."""
        if not self.model.training:
            return None
        if any(kwargs.get(name) is not None and kwargs.get(name) is not False for name in CACHE_ARGUMENTS):
            return None
        args = list(args)
        if args and isinstance(args[0], torch.Tensor):
            if self.first_parameter != "input_ids":  # not a token model's call: nothing to pad
                return None
            if "input_ids" in kwargs:
                return None  # Python raises the TypeError itself
            kwargs = {**kwargs, "input_ids": args.pop(0)}
        if any(isinstance(a, torch.Tensor) for a in args):
            return self._refuse("a tensor passed by position after input_ids (pass the batch by keyword)")
        lead = kwargs.get("input_ids")
        if lead is None:
            lead = kwargs.get("inputs_embeds")
        if not isinstance(lead, torch.Tensor) or lead.dim() < 2:
            return None
        batch, length = lead.shape[:2]
        for name, value in kwargs.items():
            if (name not in TOKEN_ALIGNED and isinstance(value, torch.Tensor) and value.dim() >= 2
                    and tuple(value.shape[:2]) == (batch, length)):
                return self._refuse(f"argument {name!r} has the batch's length and is not one this wrapper knows "
                                    f"how to pad ({', '.join(TOKEN_ALIGNED)})")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length)):
            return self._refuse("attention_mask is not a (batch, length) padding mask")
        if self.pools_last_position:
            return self._refuse("a causal sequence-classification head without config.pad_token_id pools the last "
                                "position; set pad_token_id")
        if mask is not None and bool(mask.all()):  # one small read on the host per step, see the module docstring
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
            mask = None
            if "all-ones" not in self._told:
                self._told.add("all-ones")
                log.info("unsloth_compile: bucket_lengths: an all-ones attention_mask is passed on as no mask (the "
                         "compiled graph cannot read its values and would keep it as an attention bias)")
        bucket = bucket_length(length)
        self.lengths_seen.add(length)
        if bucket not in self.buckets_seen:
            self.buckets_seen.add(bucket)
            if len(self.buckets_seen) == 2:
                log.info("unsloth_compile: batch lengths vary (%d, then %d tokens): each batch is padded up to a length "
                         "bucket (8 per power of two), so that one compiled graph serves every length",
                         min(self.lengths_seen), max(self.lengths_seen))
        if bucket == length:
            return args, kwargs, length, bucket
        kwargs = dict(kwargs)
        extra = bucket - length
        if mask is None and not self.causal:  # what a padding collator would have passed
            mask = kwargs["attention_mask"] = torch.ones((batch, length), dtype=torch.long, device=lead.device)
        for name in TOKEN_ALIGNED:
            value = kwargs.get(name)
            # labels of another shape ((batch,) classes, (batch, classes) float multi-label) are not per token
            if (isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, length)
                    and not (name.endswith("labels") and value.is_floating_point())):
                kwargs[name] = padded = self._pad_one(name, value, extra, masked=mask is not None)
                # A batch that needed padding says its lengths vary: the first graph is compiled
                # for a dynamic length at once, not for this length and then again.
                torch._dynamo.maybe_mark_dynamic(padded, 1)
        return args, kwargs, length, bucket

    def _pad_one(self, name: str, value: torch.Tensor, extra: int, masked: bool) -> torch.Tensor:
        if name == "position_ids":
            return pad_positions(value, extra, masked=masked)
        fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "shift_labels": IGNORE_INDEX}.get(name, 0)
        if value.dim() == 2:
            return torch.nn.functional.pad(value, (0, extra), value=fill)
        # (batch, length, ...): pad dim 1
        widths = [0, 0] * (value.dim() - 2) + [0, extra]
        return torch.nn.functional.pad(value, widths, value=fill)


def pad_positions(positions: torch.Tensor, extra: int, masked: bool) -> torch.Tensor:
    """position_ids padded by `extra`: counting on from each row's last position when an
    attention mask hides the padding; from 0 without one, so that the padding is a sequence of
    its own (in a packed row, where positions restart, that is what keeps it apart). Either way
    no earlier position attends to it. No host sync: the choice depends on the mask alone."""
    tail = torch.arange(extra, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], extra)
    if masked:
        tail = tail + positions[..., -1:] + 1
    return torch.cat([positions, tail], dim=-1)


def cut_outputs(outputs: Any, length: int, bucket: int, name: Optional[str] = None) -> Any:
    """The model's outputs with every per-token tensor sliced back from `bucket` to `length`."""
    if isinstance(outputs, torch.Tensor):
        per_token = outputs.dim() >= 3 or (outputs.dim() == 2 and name in PER_TOKEN_2D_OUTPUTS)
        return outputs[:, :length] if per_token and outputs.shape[1] == bucket else outputs
    if isinstance(outputs, dict):  # transformers' ModelOutput is an OrderedDict; assignment keeps its attributes
        for key in list(outputs.keys()):
            if key != "loss":
                outputs[key] = cut_outputs(outputs[key], length, bucket, key)
        return outputs
    if isinstance(outputs, tuple) and not hasattr(outputs, "_fields"):
        return tuple(cut_outputs(o, length, bucket, name) for o in outputs)
    if isinstance(outputs, list):
        return [cut_outputs(o, length, bucket, name) for o in outputs]
    return outputs
