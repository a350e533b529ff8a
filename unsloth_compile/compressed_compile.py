"""The backend's inner compile with the compress_saved partitioner.

passes/compress/compress_saved.py decides what the forward saves for backward and rewrites the two
graphs (`CompressSavedPartitioner`); it never compiles. This module hands that partitioner to
AOTAutograd (inner="aot_eager") or to Inductor (`custom_partitioner_fn`, inner="inductor") for
the backend.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule

from .config import CompressMode, Config
from .errors import UnslothCompileError
from .passes.compress.compress_saved import PATTERN, CompressSavedPartitioner
from .report import Report, Site


def compressing_aot_eager(partitioner: CompressSavedPartitioner) -> Callable:
    """aot_eager with our partitioner: AOTAutograd with the do-nothing compilers, as torch's
    own aot_eager backend builds it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partitioner,
                        keep_inference_input_mutations=True)



def compile_compressed(gm: GraphModule, example_inputs, cfg: Config, report: Report,
                       inductor_patches: dict) -> Callable:
    """The backend's inner compile when compress_activations or recompute_ffn_products is on:
    aot_eager or Inductor with CompressSavedPartitioner as the partitioner. The caller keeps
    a CUDA-graphed result's outputs across replays, as for any Inductor compile."""
    partitioner = CompressSavedPartitioner(cfg, report)
    if cfg.inner.value == "aot_eager":
        compiled = compressing_aot_eager(partitioner)(gm, example_inputs)
    else:
        import torch._inductor.config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        if not hasattr(inductor_config, "custom_partitioner_fn"):
            raise UnslothCompileError("unsloth_compile: compress_activations / recompute_ffn_products with "
                                      "inner='inductor' needs torch._inductor.config.custom_partitioner_fn (torch >= "
                                      f"2.9), not in torch {torch.__version__}; use inner='aot_eager' or "
                                      "compress_activations='none'")
        compiled = compile_fx(gm, example_inputs,
                              config_patches={**inductor_patches, "custom_partitioner_fn": partitioner})
    if not partitioner.ran and torch.is_grad_enabled() and any(
            getattr(x, "requires_grad", False) for x in example_inputs):
        what = "compression" if cfg.compress_activations is not CompressMode.NONE else "recomputed FFN products"
        report.add(Site("<graph>", PATTERN, "skipped",
                        f"AOTAutograd did not partition this graph: Inductor's cache returned code compiled "
                        f"earlier (with the same {what}), so its sites are not listed; "
                        "TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 lists them"))
    return compiled
