"""The cards whose peaks MFU and the roofline are measured against, found by device name.

Dense (not 2:4-sparse) bf16 tensor-core peak and HBM bandwidth from NVIDIA's data sheets.
A card not listed (PCIe and NVL parts, other generations, a CPU) has no known peak: MFU and the
roofline distance are then reported as not available rather than measured against a guess.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Card:
    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s
    bandwidth_tbs: float  # HBM bandwidth, TB/s

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12

    @property
    def bandwidth_bytes(self) -> float:
        return self.bandwidth_tbs * 1e12

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


H100_SXM = Card("H100 SXM", bf16_tflops=989.0, bandwidth_tbs=3.35)
H200 = Card("H200", bf16_tflops=989.0, bandwidth_tbs=4.8)

# (pattern on torch.cuda.get_device_name, card); first match wins. The H100 SXM reports itself as
# "NVIDIA H100 80GB HBM3" (the PCIe part says PCIe, the NVL part NVL: other peaks, not listed).
_CARDS: tuple[tuple[re.Pattern, Card], ...] = (
    (re.compile(r"PCIe|NVL", re.I), None),
    (re.compile(r"H100.*(HBM3|SXM)", re.I), H100_SXM),
    (re.compile(r"H200", re.I), H200),
)


def card_for(device_name: str) -> Optional[Card]:
    """The card of `device_name` (as `bench` records it), or None where its peak is not known."""
    for pattern, card in _CARDS:
        if pattern.search(device_name):
            return card
    return None


UNKNOWN_PEAK = "n/a: no known bf16 peak for this device (H100 SXM and H200 are listed in bench/cards.py)"
