"""The roofline's kernel families: a GPU kernel's name -> the kind of work it does.

Finer than `bench profile`'s families (bench/profile.py's FAMILIES, which its by-family table
keeps): attention is split by phase, the elementwise kernels by what they compute. Names are
what the profiler records: cuBLAS / cuDNN / flash-attention kernels, aten's CUDA kernels (eager),
Inductor's generated kernels (`triton_{poi,red,per,tem}_fused_<the aten ops it fused>_<n>`,
whose op list says what it computes) and this package's Triton kernels (kernels/). First match
wins, so the specific patterns come first: an Inductor kernel that fused a norm with its cast is
a norm; one that fused the rotary embedding's neg and cat is RoPE.

Where a name cannot say what it computes, the kernel goes to a family that says so rather than
to a guess: eager's separate `mul` / `add` kernels are pieces of norms, RoPE, SwiGLU and LoRA's
scale alike ("elementwise, not told apart"); cuBLAS runs the frozen GEMMs, the LM head and, where
the backend timed it faster, LoRA's thin products ("GEMMs" holds them all; the thin products'
own family then holds only the Triton ones).
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class KernelFamily:
    name: str
    pattern: re.Pattern
    matches: str  # in words: which kernels
    work: tuple[str, ...]  # the work items (bench/roofline.py's step_work keys) its kernels do


def _family(name: str, pattern: str, matches: str, work: tuple[str, ...] = ()) -> KernelFamily:
    return KernelFamily(name, re.compile(pattern, re.I), matches, work)


# Inductor's pointwise / reduction kernels (triton_poi_, _red_, _per_) name the aten ops they
# fused; an attention op in that list is the elementwise work around an attention kernel that
# ran outside Inductor, so those names are kept out of the attention families
_NOT_INDUCTOR_POINTWISE = r"^(?!triton_(poi|red|per)_)"
_ATTENTION = r"(flash|fmha|attention|attn|cudnn_?sdpa|sdpa|_efficient_)"
_BACKWARD = r"(bwd|bprop|backward|cutlassB|dot_do_o|convert_dq)"
_FORWARD = r"(fwd|fprop|cutlassF|forward)"
# An Inductor kernel that only moves or casts: every fused op a view, a layout change or a copy
_COPY_OPS = (r"_to_copy|_unsafe_view|clone|view|transpose|permute|expand|slice|unsqueeze|squeeze|copy|cat|"
             r"constant_pad_nd|select|split|t|zeros|full|new_zeros|empty|fill|alias|as_strided|unbind|detach|stack")
_INDUCTOR_COPY = rf"^triton_(poi|red|per)_fused_(_?({_COPY_OPS})_)+\d+$"



def _attention_phase(phase: str) -> str:
    return rf"{_NOT_INDUCTOR_POINTWISE}(.*{_ATTENTION}.*{phase}|.*{phase}.*{_ATTENTION})"


KERNEL_FAMILIES: tuple[KernelFamily, ...] = (
    _family("attention backward", _attention_phase(_BACKWARD),
            "flash / cuDNN / memory-efficient / flex attention kernels named for the backward",
            ("attention_backward",)),
    _family("attention forward", _attention_phase(_FORWARD) + r"|^triton_tem_fused_flex_attention_\d+$",
            "the same named for the forward (flex attention's forward template has no phase in its name)",
            ("attention_forward",)),
    _family("attention, phase not in the name", rf"{_NOT_INDUCTOR_POINTWISE}.*{_ATTENTION}|_safe_softmax",
            "attention kernels whose name gives no phase (and Inductor's softmax of a math-path attention)"),
    _family("optimizer", r"multi_tensor|adam|foreach", "AdamW's fused / foreach kernels", ("optimizer",)),
    _family("LoRA thin products", r"_rows_times_thin|_thin_t_times_rows|_rows_thin_pair|lowrank",
            "this package's Triton thin GEMMs (X A^T, dY B with dB, G^T X)", ("lora",)),
    _family("GEMMs: frozen linears and LM head",
            r"_lora_gemm|_nf4_(forward|backward)_kernel|gemm|xmma|nvjet|cutlass|cublas|sm90_|sm80_|ampere_|magma|"
            r"^triton_tem_fused_(add)?mm|^triton_tem_fused_bmm",
            "cuBLAS / CUTLASS GEMMs, Inductor's GEMM templates, this package's LoRA GEMM (the base product "
            "with the low-rank epilogue: X W^T + s H B^T, dY W + s G A); also LoRA's thin products where "
            "cuBLAS ran them (not told apart by name)", ("linears", "lm_head")),
    _family("cross-entropy", r"log_?softmax|nll_loss|logsumexp|cross_entropy|^_forward_kernel$|^_backward_kernel$",
            "log-softmax / NLL kernels (eager, Inductor) and this package's Triton cross-entropy", ("cross_entropy",)),
    _family("norms", r"rsqrt|layer_norm|rms_?norm|RowwiseMoments|_norm_|(mean|sum)_.*pow|pow_.*(mean|sum)",
            "RMSNorm / LayerNorm kernels; Inductor's fused ones hold their casts and residual adds", ("norms",)),
    _family("RoPE", r"rotary|rope|neg.*cat|cat.*neg|neg_kernel|_cos_|_sin_",
            "the rotary embedding: Inductor's fused neg + cat (rotate_half), eager's neg; cos / sin tables",
            ("rope",)),
    _family("SwiGLU", r"silu|sigmoid|swiglu|gelu", "the gated MLP's activation and product, forward and backward",
            ("swiglu",)),
    _family("embedding", r"embedding|indexSelect|index_select", "the token embedding's gather", ("embedding",)),
    _family("casts and copies", rf"{_INDUCTOR_COPY}|^(?!triton_).*(memcpy|memset|copy|CatArray|transpose|fill|clone|"
            r"cast|convert|quantize)",
            "dtype casts (the fp32 adapters to bf16 and back), copies, memsets, fp8 / NF4 (de)quantisation"),
    _family("elementwise, not told apart", r"^triton_|elementwise|reduce|vectorized|Functor",
            "other Inductor and aten elementwise / reduction kernels: residual adds, scales, eager's pieces of "
            "norms, RoPE and SwiGLU"),
)
OTHER = KernelFamily("other", re.compile(""), "kernels no pattern above matched", ())


def kernel_family(kernel_name: str) -> KernelFamily:
    for family in KERNEL_FAMILIES:
        if family.pattern.search(kernel_name):
            return family
    return OTHER
