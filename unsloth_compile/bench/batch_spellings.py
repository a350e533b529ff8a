"""The ways a user spells the same BERT question-answering batch: which of `token_type_ids`
and `attention_mask` the call passes, and what the mask holds.

    full          input_ids, token_type_ids (zeros), an all-ones attention_mask: what a
                  tokenizer's output holds when every row fills the sequence
    types         input_ids and token_type_ids, no mask
    minimal       input_ids alone (transformers builds zero token types and no mask)
    ones-mask     input_ids and an all-ones attention_mask, no token types
    padding-mask  input_ids, token_type_ids and a padding mask: row i keeps its first n_i
                  tokens (n_i drawn from half the row to all of it), the rest are pads

Every spelling of a batch holds the same input_ids and answer positions, so a model that
reads them alike computes the same loss for all but padding-mask.
"""

from __future__ import annotations

import torch

from ..errors import UnslothCompileError

SPELLINGS = ("full", "types", "minimal", "ones-mask", "padding-mask")


def spell_batch(ids: torch.Tensor, positions: torch.Tensor, spelling: str, generator: torch.Generator) -> dict:
    """A QA batch of `ids` (rows, seq) with answer `positions` (2, rows), spelled as `spelling`."""
    if spelling not in SPELLINGS:
        raise UnslothCompileError(f"unsloth_compile.bench: batch spelling {spelling!r} is not one of "
                                  f"{', '.join(SPELLINGS)}")
    batch = {"input_ids": ids, "start_positions": positions[0], "end_positions": positions[1]}
    if spelling in ("full", "types", "padding-mask"):
        batch["token_type_ids"] = torch.zeros_like(ids)
    if spelling in ("full", "ones-mask"):
        batch["attention_mask"] = torch.ones_like(ids)
    if spelling == "padding-mask":
        rows, seq = ids.shape
        kept = torch.randint(seq // 2, seq + 1, (rows, 1), generator=generator)
        batch["attention_mask"] = (torch.arange(seq).unsqueeze(0) < kept).long()
        # answers inside each row's own tokens, as a collator pads real examples
        batch["start_positions"] = torch.minimum(positions[0], kept[:, 0] - 1)
        batch["end_positions"] = torch.minimum(positions[1], kept[:, 0] - 1)
    return batch


def parse_spellings(text: str) -> list[str]:
    """A comma list of spellings, each known, in order, without repeats."""
    spellings = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in spellings if t not in SPELLINGS]
    if unknown or not spellings:
        raise ValueError(f"{text!r}: a comma list of {', '.join(SPELLINGS)}")
    return list(dict.fromkeys(spellings))
