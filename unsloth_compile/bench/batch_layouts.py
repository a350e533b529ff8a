"""Training batches of sequences of varying length, in the two forms a causal LM trainer feeds:

    padded   `rows` sequences per batch, each batch right-padded to its own longest sequence,
             with `attention_mask` (0 on pads) and labels -100 on pads: what a DataLoader with
             a padding collator delivers
    packed   the same stream of sequences, whole, placed first-fit into rows of at most `seq`
             tokens (the preset's row); `rows` of those rows per batch, flattened into one row by
             transformers' `DataCollatorWithFlattening`: `position_ids` restarting at 0 at each
             sequence, labels -100 at each sequence's first token, no attention mask (what TRL's
             packing with padding-free batches feeds)

Both read one seeded stream: sequence i has the same length and tokens in either form, and
a padded run's batches hold the stream's first sequences in order.
"""

from __future__ import annotations

from typing import Optional

import torch

from .lengths import LengthSampler, LengthSpec
from ..errors import UnslothCompileError

LAYOUTS = ("padded", "packed")
PAD_ID = 0  # random-init models: any id; masked out and never a target
IGNORE = -100  # the label that cross-entropy skips


class SequenceStream:
    """Sequence i: `lengths[i]` random token ids below `vocab`, drawn in index order from one
    seeded generator (sequence i is the same whichever layout asks for it)."""

    def __init__(self, spec: LengthSpec, seq: int, vocab: int, seed: int):
        self.lengths = LengthSampler(spec, seq, seed)
        self.vocab = vocab
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.drawn: list[torch.Tensor] = []

    def __getitem__(self, index: int) -> torch.Tensor:
        while index >= len(self.drawn):
            n = self.lengths[len(self.drawn)]
            self.drawn.append(torch.randint(0, self.vocab, (n,), generator=self.generator))
        return self.drawn[index]


def padded_batch(sequences: list[torch.Tensor], pad_id: int = PAD_ID) -> dict:
    """Right-padded to the longest: input_ids, attention_mask, labels (-100 on pads)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = s
        mask[row, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def flattened_batch(sequences: list[torch.Tensor]) -> dict:
    """transformers' DataCollatorWithFlattening on these sequences: (1, total) input_ids,
    labels and position_ids."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": s.tolist()} for s in sequences])


def pack_first_fit(stream: SequenceStream, max_tokens: int, rows: int) -> list[list[int]]:
    """`rows` rows of stream indices: each sequence, in stream order, goes into the first row
    with room for it, a new row when none has; the stream is read until a sequence would open
    row `rows + 1` (the earlier rows keep what later, shorter sequences filled in)."""
    packed: list[list[int]] = []
    room: list[int] = []
    index = 0
    while True:
        n = len(stream[index])
        if n > max_tokens:
            raise UnslothCompileError(f"unsloth_compile.bench: sequence {index} has {n} tokens, more than a row's "
                                      f"{max_tokens}")
        row = next((r for r, free in enumerate(room) if n <= free), None)
        if row is None:
            if len(packed) == rows:
                return packed
            packed.append([])
            room.append(max_tokens)
            row = len(packed) - 1
        packed[row].append(index)
        room[row] -= n
        index += 1


def make_real_batches(layout: str, stream: SequenceStream, count: int, rows: int, seq: int,
                      device: Optional[torch.device] = None) -> list[dict]:
    """`count` batches of `rows` rows in `layout`, from the start of `stream`."""
    if layout == "padded":
        batches = [padded_batch([stream[b * rows + r] for r in range(rows)]) for b in range(count)]
    elif layout == "packed":
        packed = pack_first_fit(stream, seq, count * rows)
        batches = [flattened_batch([stream[i] for row in packed[b * rows:(b + 1) * rows] for i in row])
                   for b in range(count)]
    else:
        raise UnslothCompileError(f"unsloth_compile.bench: layout {layout!r}: one of {', '.join(LAYOUTS)}")
    return [{k: v.to(device) for k, v in b.items()} for b in batches] if device is not None else batches


def real_tokens(batch: dict) -> int:
    """Tokens of the batch that are not padding."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()
