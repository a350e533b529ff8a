"""The FLOPs of one training step of a Llama-shaped causal LM, per token, and the MFU they give.

The LoRA count (docs/benchmarks.md#how-mfu-is-counted), per token, with K x N the shape of each
linear (in x out), L layers, d hidden, V vocabulary, S sequence, h query heads of size d_h, r rank:

    frozen linears   4 K N per linear per layer      forward 2 K N + input gradient 2 K N (no
                                                     weight gradient: the weights are frozen)
    LM head          4 d V                           the same; the loss itself is not counted
    LoRA adapters    6 r (K + N) per adapted linear  forward X A^T, H B^T (2 r (K + N)); backward
                                                     the input gradients and both weight gradients
                                                     (4 r (K + N))
    attention        6 S h d_h per layer             forward QK^T and PV over half the S x S square
                                                     (causal): 2 x 2 x (S / 2) x h d_h; backward
                                                     twice the forward

Full fine-tuning adds every linear's weight gradient (2 K N, and 2 d V for the head) and has no
adapters; the `floor` variant (frozen model, norms trained) has neither. Embedding lookups,
norms, RoPE, activations, the loss and the optimizer are not counted (not tensor-core work).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Sequence

from .cards import UNKNOWN_PEAK, Card, card_for

# What trains: "lora" (adapters on frozen linears), "frozen" (nothing but the norms: no adapter,
# no weight gradient of any linear), "full" (every weight)
TRAINING = ("lora", "frozen", "full")


@dataclasses.dataclass(frozen=True)
class DecoderShapes:
    """The sizes of a Llama-shaped decoder (gated MLP, grouped-query attention)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> "DecoderShapes":
        """From a transformers config or a dict of its keyword arguments (a `bench e2e` preset's)."""
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return cls(hidden=hidden, intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or hidden // heads, vocab=get("vocab_size"))

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each linear of one layer: name -> (in features K, out features N)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}


@dataclasses.dataclass(frozen=True)
class FlopsPerToken:
    """One training step's FLOPs divided by its tokens, by the kind of work."""

    linears: float  # every linear of the blocks: forward + input gradient
    lm_head: float  # forward + input gradient
    lora: float  # adapters: forward, input gradients, weight gradients
    attention: float  # QK^T and PV, causal, forward + backward
    weight_gradients: float = 0.0  # full fine-tuning only: every linear's (and the head's)

    @property
    def total(self) -> float:
        return self.linears + self.lm_head + self.lora + self.attention + self.weight_gradients

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def flops_per_token(shapes: DecoderShapes, seq: int, lora_targets: Sequence[str] = (), rank: int = 0,
                    training: str = "lora") -> FlopsPerToken:
    """The count of the module docstring for sequences of `seq` tokens; `lora_targets` name the
    adapted linears (their `projections()` names), each with rank `rank` (training="lora" only)."""
    if training not in TRAINING:
        raise ValueError(f"training={training!r}: one of {', '.join(TRAINING)}")
    projections = shapes.projections()
    unknown = sorted(set(lora_targets) - set(projections))
    if unknown:
        raise ValueError(f"lora_targets {unknown}: not linears of a Llama layer ({', '.join(projections)})")
    layer_kn = sum(k * n for k, n in projections.values())
    head_kn = shapes.hidden * shapes.vocab
    adapted = sum(k + n for name, (k, n) in projections.items() if name in lora_targets)
    return FlopsPerToken(
        linears=4 * layer_kn * shapes.layers,
        lm_head=4 * head_kn,
        lora=6 * rank * adapted * shapes.layers if training == "lora" else 0,
        attention=6 * seq * shapes.heads * shapes.head_dim * shapes.layers,
        weight_gradients=2 * (layer_kn * shapes.layers + head_kn) if training == "full" else 0)


def training_of(variant_kind: str) -> str:
    """What trains under a `bench` variant kind (bench/variants.py's KINDS)."""
    return {"full": "full", "floor": "frozen"}.get(variant_kind, "lora")


def mfu(flops: float, tokens_per_s: Optional[float], card: Optional[Card]) -> dict:
    """`flops_per_token`, `achieved_tflops` and `mfu` (a fraction of the card's dense bf16 peak;
    None, with `mfu_note` saying why, where the peak is not known)."""
    achieved = flops * tokens_per_s / 1e12 if tokens_per_s else None
    fields = {"flops_per_token": flops, "achieved_tflops": achieved,
              "mfu": achieved / card.bf16_tflops if achieved is not None and card is not None else None}
    if card is None:
        fields["mfu_note"] = UNKNOWN_PEAK
    return fields


def e2e_mfu(preset: Any, variant_kind: str, tokens_per_s: Optional[float], device_name: str,
            fixed_lengths: bool = True) -> dict:
    """The MFU fields of one `bench e2e` result (`preset`: its Preset). Causal LM presets only
    (an empty dict otherwise); runs of varying lengths get the fields with None and the reason."""
    if preset.family != "llama":
        return {}
    if not fixed_lengths:
        return {"flops_per_token": None, "achieved_tflops": None, "mfu": None,
                "mfu_note": "n/a: the count is per fixed sequence length; this run's lengths vary"}
    count = flops_per_token(DecoderShapes.from_config(preset.config), preset.seq, preset.lora_targets, preset.rank,
                            training_of(variant_kind))
    return {**mfu(count.total, tokens_per_s, card_for(device_name)), "flops_breakdown": count.to_json()}
