"""2:4 sparsity: frozen bases pruned to a transposable 2:4 mask (`prune`), stored compressed
(`Sparse24Linear`), and given back dense (`revert`).

    report = unsloth_compile.sparsity.prune(model, "wanda", calibration=batches)
    model = torch.compile(model, backend="unsloth", options={"sparsity": "2:4"})

pruning.py: `prune`, `convert`, `revert`, `Sparse24Linear`; mask.py: the transposable masks;
obs.py: SparseGPT-style (OBS) mask selection; reconstruct.py: the least-squares refit of the
kept weights; sequential.py: calibration layer by layer. The ops are in
unsloth_compile/ops/base_sparse24.py, the math in kernels/sparse24.py, the pass in
passes/lora/sparse24_linear.py. See docs/sparsity.md.
"""

from .pruning import (GRAM_BUDGET_BYTES, METHODS, TARGETS, Sparse24Linear, SparsityReport, calibrate, convert,
                      lora_base_layers, prune, revert, unsupported)

__all__ = ["GRAM_BUDGET_BYTES", "METHODS", "TARGETS", "Sparse24Linear", "SparsityReport", "calibrate", "convert",
           "lora_base_layers", "prune", "revert", "unsupported"]
