"""2:4 semi-structured sparse frozen base for the LoRA linear: the base's two GEMMs on a
compressed weight, and the LoRA term beside them in the adapter dtype.

Math (x: M x K activations, W: N x K frozen weight pruned so that every 4 x 4 tile keeps
exactly 2 entries per row and per column, dY: M x N output gradient):

    Y  = X W^T     = (W X^T)^T        W   (N x K) is 2:4 along K: the sparse operand
    dX = dY W      = (W^T dY^T)^T     W^T (K x N) is 2:4 along N: the sparse operand

The sparse tensor cores take the *first* operand sparse, so both products are computed
transposed, and W^T needs its own compressed copy: the transposable (4 x 4 tile) mask that
unsloth_compile.sparsity.prune draws is what makes W^T 2:4 as well. Both copies hold half the
values plus metadata; the dense masked W is kept beside them (the reference, to_dense, and
what state_dict saves), so no memory is saved: the point is two GEMMs at half the FLOPs.

Layouts of the compressed weight (`compressed`, a list of tensors):
    "dense"       []: no sparse GEMM; X W^T and dY W on the dense masked W (the CPU path, the
                  reference, and a CUDA weight that could not be compressed)
    "cusparselt"  [W_c, WT_c]: torch._cslt_compress of W and of W^T; torch._cslt_sparse_mm
    "cutlass"     [W_packed, W_meta, WT_packed, WT_meta]: torch's CUTLASS format
                  (SparseSemiStructuredTensorCUTLASS.from_dense); torch._sparse_semi_structured_mm
Both are torch's own semi-structured kernels, called the way torch.sparse's
SparseSemiStructuredTensor subclasses call them (torch/sparse/semi_structured.py), on plain
tensors so that the op stays opaque to Dynamo and AOTAutograd. Present in torch 2.1 - 2.13;
checked with hasattr, so a torch without them runs the dense path and says why.

Nothing of the project is imported here but kernels/reference.py, precision.py and knobs.py.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from . import knobs, reference
from .precision import compute_dtype
from .reference import effective_scale, rows
from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile.kernels")

DENSE, CUSPARSELT, CUTLASS = "dense", "cusparselt", "cutlass"
LAYOUTS = (DENSE, CUSPARSELT, CUTLASS)
GPU_DTYPES = (torch.float16, torch.bfloat16)
# N and K multiples of 64: CUTLASS's fp16/bf16 2:4 GEMM takes a sparse operand of rows % 32 and
# columns % 64, and it is used on both W (N x K) and W^T (K x N); cuSPARSELt needs 16.
# torch.sparse.SparseSemiStructuredTensor{CUTLASS,CUSPARSELT}._DTYPE_SHAPE_CONSTRAINTS.
SHAPE_MULTIPLE = 64
# The dense operand's rows (M, tokens) are padded to a multiple of 8 (both backends, fp16/bf16).
DENSE_ROW_MULTIPLE = 8
MIN_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and newer

_warned: set[str] = set()


# ----------------------------------------------------------------------------- what can run


def shape_problem(n: int, k: int) -> Optional[str]:
    """Why an N x K weight cannot run the 2:4 GEMMs, or None."""
    if n % SHAPE_MULTIPLE or k % SHAPE_MULTIPLE or n == 0 or k == 0:
        return (f"shape {n} x {k}: the 2:4 GEMMs need out and in features non-zero multiples of "
                f"{SHAPE_MULTIPLE} (torch's CUTLASS fp16/bf16 kernel, on W and on W^T)")
    return None


def dtype_problem(dtype: torch.dtype, on_cuda: bool) -> Optional[str]:
    """Why a base computing in `dtype` cannot run the 2:4 GEMMs, or None. Off CUDA the dense
    reference stands in, which also takes float32 (CPU tests of fp32 models)."""
    allowed = GPU_DTYPES if on_cuda else GPU_DTYPES + (torch.float32,)
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        where = "on CUDA" if on_cuda else "(the dense reference off CUDA)"
        return f"the base computes in {str(dtype).removeprefix('torch.')}; the 2:4 GEMMs take {names} {where}"
    return None


def layout_problem(device: torch.device) -> tuple[Optional[str], Optional[str]]:
    """(layout, None) for the compressed layout a weight on `device` gets, or (None, reason)."""
    if device.type != "cuda":
        return DENSE, None
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return None, f"CUDA capability {capability} has no sparse tensor cores (needs 8.0 or newer)"
    wanted = knobs.current().sparse24_gemm  # auto | cusparselt | cutlass
    cslt_backend = getattr(torch.backends, "cusparselt", None)
    has_cslt = hasattr(torch, "_cslt_sparse_mm") and cslt_backend is not None and cslt_backend.is_available()
    has_cutlass = (hasattr(torch, "_sparse_semi_structured_mm")
                   and hasattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS"))
    if wanted == CUSPARSELT or (wanted == "auto" and has_cslt):
        return (CUSPARSELT, None) if has_cslt else (None, "cuSPARSELt is not available in this torch build")
    if not has_cutlass:
        return None, "torch has no CUTLASS semi-structured GEMM"
    if capability[0] != 8:  # torch's kernel raises "Supported only on GPUs with compute capability 8.x"
        return None, f"torch's CUTLASS 2:4 GEMM runs on CUDA capability 8.x only, not {capability}; use cuSPARSELt"
    return CUTLASS, None


# ----------------------------------------------------------------------------- compression


def compress(weight: Tensor, layout: str) -> list[Tensor]:
    """The compressed copies of a 2:4 (N, K) weight and of its transpose for `layout`."""
    if layout == DENSE:
        return []
    w = weight.detach().contiguous()
    wt = weight.detach().t().contiguous()
    if layout == CUSPARSELT:
        return [torch._cslt_compress(w), torch._cslt_compress(wt)]
    if layout == CUTLASS:
        cls = torch.sparse.SparseSemiStructuredTensorCUTLASS
        packed, packed_t = cls.from_dense(w), cls.from_dense(wt)
        return [packed.packed, packed.meta, packed_t.packed, packed_t.meta]
    raise UnslothCompileError(f"unsloth_compile.kernels.sparse24: unknown 2:4 layout {layout!r}; choose one of "
                              f"{', '.join(LAYOUTS)}")


def _pad_rows(t2d: Tensor) -> Tensor:
    pad = (-t2d.shape[0]) % DENSE_ROW_MULTIPLE
    return torch.nn.functional.pad(t2d, (0, 0, 0, pad)) if pad else t2d


def _sparse_rows_times(dense2d: Tensor, sparse: list[Tensor], layout: str, r: int) -> Tensor:
    """dense2d (M, C) times S^T, S (r, C) 2:4 given compressed: (M, r), contiguous, computed as
    (S dense2d^T)^T on the sparse tensor cores."""
    m = dense2d.shape[0]
    if m == 0:  # no launch for an empty batch
        return dense2d.new_zeros((0, r))
    padded = _pad_rows(dense2d.contiguous())
    if layout == CUSPARSELT:
        # transpose_result: cuSPARSELt writes (S X^T)^T row-major, no extra copy
        dense = padded.t()
        out = torch._cslt_sparse_mm(sparse[0], dense, transpose_result=True,
                                    alg_id=cusparselt_algorithm(sparse[0], dense))
    else:
        out = torch._sparse_semi_structured_mm(sparse[0], sparse[1], padded.t()).t()
    return out[:m].contiguous()


# cuSPARSELt's algorithm per problem (device, dtype, sparse shape, dense shape): its default,
# algorithm 0, ran the 2:4 GEMMs in about the dense cuBLAS time (docs/bench/design-choices.md#24-sparsity), so each
# problem's first call asks torch._cslt_sparse_mm_search,
# which times cuSPARSELt's algorithms once, and later calls reuse the answer.
_CSLT_ALGORITHMS: dict[tuple, int] = {}


def cusparselt_algorithm(sparse: Tensor, dense: Tensor) -> int:
    """The cuSPARSELt algorithm id for S (compressed) times `dense` (transpose_result=True)."""
    if not knobs.current().sparse24_search or not hasattr(torch, "_cslt_sparse_mm_search"):
        return 0
    if sparse.dtype != torch.bfloat16:
        # With torch 2.11 and cuSPARSELt 0.8 on Hopper the fp16 search failed with an internal error
        # and left the context broken (the next launches hit an illegal instruction), while
        # bf16 searched cleanly: fp16 keeps the default algorithm.
        return 0
    key = (sparse.device, sparse.dtype, tuple(sparse.shape), tuple(dense.shape), tuple(dense.stride()))
    alg = _CSLT_ALGORITHMS.get(key)
    if alg is not None:
        return alg
    if torch.cuda.is_current_stream_capturing():
        return 0  # timing cannot run inside a CUDA graph capture: the default, not remembered
    try:
        alg = int(torch._cslt_sparse_mm_search(sparse, dense, transpose_result=True))
    except RuntimeError as error:  # a torch or cuSPARSELt that cannot search: say so once, use the default
        if "search" not in _warned:
            _warned.add("search")
            log.warning("unsloth_compile: torch._cslt_sparse_mm_search failed (%s); cuSPARSELt's default "
                        "algorithm is used for 2:4 GEMMs", str(error).splitlines()[0])
        alg = 0
    _CSLT_ALGORITHMS[key] = alg
    log.info("unsloth_compile: cuSPARSELt algorithm %d for %s x %s (%s)", alg, tuple(sparse.shape),
             tuple(dense.shape), sparse.dtype)
    return alg


def _usable(compressed: list[Tensor], layout: str, dtype: torch.dtype) -> bool:
    """The sparse GEMM runs: a CUDA layout, compressed in the dtype the base computes in."""
    if layout == DENSE or not compressed:
        return False
    if compressed[0].dtype != dtype:
        key = f"dtype {compressed[0].dtype} {dtype}"
        if key not in _warned:
            _warned.add(key)
            log.warning("unsloth_compile: 2:4 weight compressed in %s but the base computes in %s: dense GEMM",
                        compressed[0].dtype, dtype)
        return False
    return True


def base_forward(x2d: Tensor, weight: Tensor, compressed: list[Tensor], layout: str) -> Tensor:
    """X W^T (M, N) in x's dtype; the dense masked W (cast to x's dtype) when not sparse."""
    if _usable(compressed, layout, x2d.dtype):
        return _sparse_rows_times(x2d, compressed[:len(compressed) // 2], layout, weight.shape[0])
    return x2d @ weight.to(x2d.dtype).t()


def base_grad_input(grad2d: Tensor, weight: Tensor, compressed: list[Tensor], layout: str) -> Tensor:
    """dY W (M, K) in dY's dtype, from W^T's compressed copy."""
    if _usable(compressed, layout, grad2d.dtype):
        return _sparse_rows_times(grad2d, compressed[len(compressed) // 2:], layout, weight.shape[1])
    return grad2d @ weight.to(grad2d.dtype)


# ----------------------------------------------------------------------------- ops' math


def sparse24_linear_forward(x: Tensor, weight: Tensor, compressed: list[Tensor], layout: str,
                            bias: Optional[Tensor]) -> Tensor:
    """x W^T + b in x's dtype (the frozen base alone: Sparse24Linear's forward)."""
    out = base_forward(rows(x), weight, compressed, layout)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def sparse24_linear_backward(grad_out: Tensor, weight: Tensor, compressed: list[Tensor], layout: str,
                             x_dtype: torch.dtype) -> Tensor:
    """dx = dY W of sparse24_linear_forward, in x's dtype."""
    dx = base_grad_input(rows(grad_out).to(x_dtype), weight, compressed, layout)
    return dx.reshape(*grad_out.shape[:-1], weight.shape[1])


def lora_linear_sparse24_forward(x: Tensor, weight: Tensor, compressed: list[Tensor], layout: str,
                                 bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                                 lora_B_bias: Optional[Tensor], lora_x: Optional[Tensor],
                                 residual: Optional[Tensor], scale: float, scale_tensor: Optional[Tensor],
                                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(out, lora_hidden) as reference.lora_linear_forward, the base GEMM on the 2:4 weight.

    On the dense layout it *is* the reference (the dense masked W): CPU results equal the
    dense op's. On the sparse layouts, the composition of the dense op's cuBLAS path
    (kernels/lora/lora_linear_triton.py): the thin GEMMs in the activations' dtype, the low-rank
    term rounded to it once and accumulated onto the sparse product by cuBLAS (beta = 1), no
    (M, N) temporary in the adapter dtype."""
    if not _usable(compressed, layout, x.dtype):
        return reference.lora_linear_forward(x, weight.to(x.dtype), bias, lora_A, lora_B, lora_B_bias, lora_x,
                                             residual, scale, scale_tensor, False, out_dtype)
    lead = x.shape[:-1]
    adapter_in = rows(x if lora_x is None else lora_x)
    compute = compute_dtype(adapter_in.dtype, lora_A.dtype)
    lora_hidden = (adapter_in.to(compute) @ lora_A.t().to(compute)).to(lora_A.dtype)  # (M, r)
    out = base_forward(rows(x), weight, compressed, layout)  # (M, N), fresh: accumulated into
    u, v = lora_hidden.to(out.dtype), lora_B.t().to(out.dtype)
    if scale_tensor is None:
        out.addmm_(u, v, alpha=scale)
    else:  # a tensor scale cannot be alpha without a host sync
        out.addmm_(u * scale_tensor.to(out.dtype) * scale, v)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    if lora_B_bias is not None:
        out.add_((lora_B_bias * effective_scale(scale, scale_tensor)).to(out.dtype))
    out = out.to(out_dtype)
    if residual is not None:
        out = out + rows(residual)
    return out.reshape(*lead, out.shape[-1]), lora_hidden


def lora_linear_sparse24_backward(grad_out: Tensor, x: Tensor, weight: Tensor, compressed: list[Tensor],
                                  layout: str, lora_A: Tensor, lora_B: Tensor, lora_x: Optional[Tensor],
                                  lora_hidden: Tensor, scale: float, scale_tensor: Optional[Tensor]
                                  ) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """(dx, d_lora_x, dA, dB) of lora_linear_sparse24_forward: dY W on W^T's compressed copy,
    the adapter gradients from G = dY B (M, r) as the dense op's cuBLAS path computes them."""
    if not _usable(compressed, layout, x.dtype):
        return reference.lora_linear_backward(
            grad_out, x, weight.to(x.dtype), lora_A, lora_B, lora_x, lora_hidden, scale, scale_tensor, False,
            x.dtype)
    lead, K = x.shape[:-1], x.shape[-1]
    grad2d = rows(grad_out).to(x.dtype)
    s = effective_scale(scale, scale_tensor)
    dx = base_grad_input(grad2d, weight, compressed, layout)  # (M, K), fresh
    g = grad2d @ lora_B.to(x.dtype)  # (M, r), unscaled
    dB = (grad2d.t() @ lora_hidden.to(x.dtype)).to(lora_A.dtype) * s
    adapter_in = rows(x if lora_x is None else lora_x)
    compute = compute_dtype(adapter_in.dtype, lora_A.dtype)
    dA = (g.t().to(compute) @ adapter_in.to(compute)).to(lora_A.dtype) * s
    if lora_x is None:
        if scale_tensor is None:
            dx.addmm_(g, lora_A.to(x.dtype), alpha=scale)
        else:
            dx.addmm_(g * scale_tensor.to(x.dtype) * scale, lora_A.to(x.dtype))
        return dx.reshape(*lead, K), None, dA, dB
    d_lora_x = ((g.to(compute) @ lora_A.to(compute)) * s).to(lora_x.dtype)
    return dx.reshape(*lead, K), d_lora_x.reshape(*lead, K), dA, dB
