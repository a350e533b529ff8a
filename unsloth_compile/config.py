"""The backend's configuration: one frozen dataclass, validated once, hashable.

`torch.compile(model, backend="unsloth", options={...})` forwards `options` (a dict) and
`mode` here. Every option is an enum or a bool; an unknown option or a bad value raises a
`ValueError` that names the valid ones, so a typo never silently turns a feature off.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Mapping, Optional

from .errors import UnslothCompileError


class Inner(str, enum.Enum):
    """What compiles the graph after our passes have rewritten it."""

    INDUCTOR = "inductor"  # the default: Inductor compiles everything we did not rewrite
    AOT_EAGER = "aot_eager"  # AOTAutograd tracing, eager kernels: fast to compile, for CPU tests
    EAGER = "eager"  # run the rewritten FX graph as is: for debugging a pass


class KernelChoice(str, enum.Enum):
    """Which implementation `torch.ops.unsloth.*` dispatches to on CUDA."""

    AUTO = "auto"  # Triton kernels on CUDA when Triton is importable, the reference otherwise
    TRITON = "triton"  # Triton kernels, error if unavailable
    REFERENCE = "reference"  # plain torch (kernels/reference.py) everywhere


class Precision(str, enum.Enum):
    """What the frozen base GEMMs of a fused LoRA linear compute in."""

    DEFAULT = "default"  # the base weight's own dtype (bf16, fp16, fp32)
    FP8 = "fp8"  # float8 e4m3 with rowwise scales (CUDA capability >= 8.9; emulated on CPU)
    NF4 = "nf4"  # 4-bit NF4 weights (QLoRA), dequantised inside the GEMM; stored by unsloth_compile.compile


class Fp8Layers(str, enum.Enum):
    """Which frozen linears unsloth_compile.compile stores in fp8 under precision="fp8"."""

    LORA = "lora"  # the frozen base of every LoRA layer
    ALL = "all"  # every frozen nn.Linear / Conv1D: the LoRA bases and the rest (a causal LM's lm_head)


class Nf4Layers(str, enum.Enum):
    """Which frozen linears unsloth_compile.compile stores in NF4 under precision="nf4"."""

    LORA = "lora"  # the frozen base of every LoRA layer
    ALL = "all"  # every frozen nn.Linear / Conv1D: the LoRA bases and the rest (a causal LM's lm_head)


class Sparsity(str, enum.Enum):
    """Whether fused LoRA linears run a 2:4-pruned frozen base on the sparse tensor cores."""

    NONE = "none"  # dense GEMMs (a base pruned by unsloth_compile.sparsity.prune keeps its zeros)
    SEMI_2_4 = "2:4"  # X W^T and dY W on the compressed 2:4 weight (Sparse24Linear bases only)


class AttentionKernel(str, enum.Enum):
    """Which fused kernel a compiled SDPA call tries first (the others follow in torch's order)."""

    AUTO = "auto"  # torch's own choice, as eager makes it
    FLASH = "flash"
    EFFICIENT = "efficient"
    CUDNN = "cudnn"


class PackedAttention(str, enum.Enum):
    """How causal attention over packed rows (position_ids restarting, no mask) is kept within
    each sequence."""

    AUTO = "auto"  # the varlen kernels where they run the inputs (CUDA, fp16/bf16), the mask elsewhere
    VARLEN = "varlen"  # torch.ops.unsloth.packed_attention everywhere (its reference off CUDA)
    MASK = "mask"  # the block-diagonal causal mask in the graph, on SDPA's fused masked kernel
    OFF = "off"  # leave the calls as transformers makes them


def _positive_int(name: str, value: Any) -> int:
    """An int option: an int >= 1, or its decimal string (as the bench's command line gives it)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnslothCompileError(f"unsloth_compile: option {name}={value!r} must be a positive integer")
    return value


class CompressMode(str, enum.Enum):
    """What backward reads of the tensors saved for it by LoRA ops and FFN blocks
    (passes/compress/compress_saved.py): the forward values stay exact either way."""

    NONE = "none"  # saved as computed
    FP8 = "fp8"  # e4m3 codes with one fp32 scale per row (COAT-style)
    INT8 = "int8"  # int8 codes with one fp32 absmax scale per row
    LOWRANK = "lowrank"  # the LoRA op's input projected to k columns; dA from it (CompAct-style)


class LowrankProjection(str, enum.Enum):
    """The k columns compress_activations="lowrank" projects a LoRA input X onto (kernels/compress.py)."""

    # orthonormal, X's approximate top-k row space from a range finder with one power
    # iteration per step: biased, dA relative error 0.23-0.48 on MiniLM (k=128) against 1.7-3.5
    RANGE = "range"
    RANDOM = "random"  # +-1/sqrt(k) entries drawn per step: unbiased, error ~ sqrt(K / k)


class CompileRegions(str, enum.Enum):
    """What unsloth_compile.compile hands to Dynamo as one compiled region (unsloth_compile/regions.py)."""

    MODEL = "model"  # the whole model, one graph (per graph break)
    # each repeated block (a decoder layer) as a region whose compiled code all blocks of its class
    # share, and the rest of the model compiled around them: a first step that traces and
    # lowers one layer instead of all of them
    LAYERS = "layers"


_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Config:
    inner: Inner = Inner.INDUCTOR
    fuse_lora: bool = True  # rewrite LoRA linears into torch.ops.unsloth.lora_linear
    fold_residual: bool = True  # fold a residual add right after a LoRA linear into the op
    kernels: KernelChoice = KernelChoice.AUTO
    # fp8: every fused LoRA linear runs its base X W^T and dY W in float8 e4m3 (faster GEMMs
    # than bf16 cuBLAS on cards with fp8 tensor cores: docs/bench/design-choices.md#fp8-gemms).
    # A base converted by unsloth_compile.fp8.convert is stored in fp8 (half the memory) and
    # always runs so; with this option a dense base is quantised on each call instead (no
    # memory saved).
    precision: Precision = Precision.DEFAULT
    # with precision="fp8", what unsloth_compile.compile converts: "all" adds the frozen linears
    # outside LoRA layers (a large lm_head gains most: docs/bench/design-choices.md#fp8-gemms).
    # The backend alone converts nothing (unsloth_compile.fp8.convert(model,
    # select=unsloth_compile.fp8.frozen_linears) does it before torch.compile).
    fp8_layers: Fp8Layers = Fp8Layers.LORA
    # with precision="nf4", what unsloth_compile.compile stores in 4 bits (docs/nf4.md): "all" adds
    # the frozen linears outside LoRA layers. A base that is a bitsandbytes Linear4bit is taken
    # over as it is stored, whatever the precision; the backend alone converts nothing
    # (unsloth_compile.nf4.convert does it before torch.compile)
    nf4_layers: Nf4Layers = Nf4Layers.LORA
    # 2:4: LoRA linears whose base unsloth_compile.sparsity.prune converted run X W^T and dY W
    # on the compressed weight (cuSPARSELt or CUTLASS; cuSPARSELt beats dense cuBLAS at the
    # Llama shapes: docs/bench/design-choices.md#24-sparsity); other sites are reported refused
    sparsity: Sparsity = Sparsity.NONE
    # rewrite attention masks that would push a compiled SDPA call off the fused kernels
    # (an all-True mask built under tracing, a mask broadcast along its last dimension)
    attention: bool = True
    # the fused attention kernel compiled SDPA calls try first; "auto" keeps torch's choice
    attention_kernel: AttentionKernel = AttentionKernel.AUTO
    # an SDPA call whose k and v were repeated to the query's heads (transformers' repeat_kv,
    # which it applies under tracing where eager passes enable_gqa=True) takes them at their
    # own heads with enable_gqa=True, as eager does: backward keeps k and v at the kv heads
    # (less memory at the same step time: docs/bench/design-choices.md#attention)
    attention_gqa: bool = True
    # sequences packed into one row (position_ids restart at each sequence, no attention_mask:
    # DataCollatorWithFlattening, TRL padding_free) attend only within their sequence: a causal
    # SDPA call becomes torch.ops.unsloth.packed_attention (flash-attention's varlen kernels, no
    # work across sequences) or gets the block-diagonal causal mask computed from position_ids
    # in the graph. True and False mean "auto" and "off".
    attention_packed: PackedAttention = PackedAttention.AUTO
    # rewrite LM head + cross_entropy into torch.ops.unsloth.linear_cross_entropy, chunked over
    # rows so the full-vocabulary logits never exist (where the model does not return them:
    # see unsloth_compile.loss_only)
    fuse_cross_entropy: bool = True
    # budget for one chunk's fp32 logits in that op, in MiB (rows per chunk = budget / (4 V));
    # the op's peak is a few such chunks
    cross_entropy_chunk_mib: int = 256
    # where the model returns the logits (the fused head + loss cannot run), compute the loss of
    # `cross_entropy(logits.float(), ...)` with torch.ops.unsloth.logits_cross_entropy: upcast in
    # the kernel; backward keeps the half-precision logits and the rows' logsumexp instead of
    # fp32 log-probabilities (half the bytes; no fp32 rows x V tensor at all). Off: under
    # Inductor, which fuses the upcast and the log-softmax itself, it saved neither time nor
    # memory (docs/bench/design-choices.md#memory-options)
    cross_entropy_on_logits: bool = False
    # CUDA graphs (Inductor's cudagraph trees) for the compiled graphs when inner="inductor".
    # None (default): on for a graph whose inputs are on CUDA with static shapes, off for a
    # graph Dynamo made dynamic, bucketed lengths included (a recording per shape met costs a
    # memory pool and several replays' worth of host time, docs/real-data.md) and
    # with compress_activations="lowrank" (a host-drawn projection a replay would freeze).
    # True: on wherever Inductor allows; False: off. Why on: without them a LoRA model's step
    # is host-bound, its Python as long as its GPU work (docs/bench/design-choices.md#cuda-graphs)
    cudagraphs: Optional[bool] = None
    # unsloth_compile.compile and the Trainer callback pad each training batch's token axis up to
    # a length bucket (8 per power of two) and cut the per-token outputs back
    # (unsloth_compile/length_buckets.py): batches whose length changes every step then run
    # through one dynamic graph, compiled once, with every length a multiple of 16.
    # No effect on torch.compile(model, backend="unsloth"), which cannot pad its inputs.
    bucket_lengths: bool = True
    # unsloth_compile.compile and the Trainer callback: "model" compiles the model as one graph;
    # "layers" compiles each repeated block once for all blocks of its class and the rest of the
    # model around them (unsloth_compile/regions.py). Not for torch.compile(model,
    # backend="unsloth"), which is handed the whole model: refused there.
    compile_regions: CompileRegions = CompileRegions.MODEL
    # compress what LoRA ops and FFN blocks save for backward (lossy for the gradients only;
    # needs inner "aot_eager" or "inductor", where AOTAutograd partitions forward and backward)
    compress_activations: CompressMode = CompressMode.NONE
    # k, the columns the LoRA input is projected to with compress_activations="lowrank"
    # (the design's 768 -> 128); the input's last dimension must be larger
    compress_lowrank_k: int = 128
    # what the LoRA input is projected onto with compress_activations="lowrank": "range"
    # (data-aware, per step) or "random" (CompAct's random projection)
    compress_lowrank_projection: LowrankProjection = LowrankProjection.RANGE
    # let backward recompute each FFN's product act(gate) * up (the down projection's input)
    # from the gate and up it keeps anyway, instead of saving it: one M x F tensor less per
    # FFN for one elementwise pass in backward (less memory at the same step time:
    # docs/bench/design-choices.md#memory-options). None (default): on wherever AOTAutograd
    # partitions forward and backward (inner "aot_eager" or "inductor"); always on with
    # compress_activations (the gate and up are then compressed, the product would be the one
    # exact M x F tensor left)
    recompute_ffn_products: Optional[bool] = None
    report: bool = True  # log the per-site report (logger "unsloth_compile") at INFO
    # one line per model (logger "unsloth_compile.summary", shown even when logging is not
    # configured), a UserWarning when nothing was fused: what happened, without asking
    summary: bool = True
    mode: str = "default"  # torch.compile's mode, forwarded to Inductor

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "attention_packed" and isinstance(value, bool):
                value = PackedAttention.AUTO if value else PackedAttention.OFF
            if isinstance(field.default, enum.Enum):
                enum_type = type(field.default)
                try:
                    object.__setattr__(self, field.name, enum_type(value))
                except ValueError:
                    valid = ", ".join(repr(v.value) for v in enum_type)
                    raise UnslothCompileError(
                        f"unsloth_compile: option {field.name}={value!r} is not valid; "
                        f"choose one of {valid}"
                    ) from None
            elif field.name == "cudagraphs" and value is not None and not isinstance(value, bool):
                raise UnslothCompileError(f"unsloth_compile: option cudagraphs={value!r} must be None, True or False")
            elif isinstance(field.default, bool) and not isinstance(value, bool):
                raise UnslothCompileError(
                    f"unsloth_compile: option {field.name}={value!r} must be True or False"
                )
            elif isinstance(field.default, int) and not isinstance(field.default, bool):
                object.__setattr__(self, field.name, _positive_int(field.name, value))
        self._check_compression()
        self._check_fp8_layers()
        self._check_sparsity()
        if self.mode not in _MODES:
            raise UnslothCompileError(
                f"unsloth_compile: mode={self.mode!r} is not valid; choose one of "
                + ", ".join(repr(m) for m in _MODES)
            )

    @property
    def recomputes_ffn_products(self) -> bool:
        """recompute_ffn_products as it applies: None means on where AOTAutograd partitions."""
        if self.recompute_ffn_products is None:
            return self.inner is not Inner.EAGER
        return self.recompute_ffn_products

    def _check_compression(self) -> None:
        if self.recompute_ffn_products is True and self.inner is Inner.EAGER:
            raise UnslothCompileError(
                "unsloth_compile: recompute_ffn_products=True needs AOTAutograd's forward/backward "
                "partition, which inner='eager' does not run; use inner='aot_eager' or 'inductor'"
            )
        if self.compress_activations is not CompressMode.NONE and self.inner is Inner.EAGER:
            raise UnslothCompileError(
                f"unsloth_compile: compress_activations={self.compress_activations.value!r} needs "
                "AOTAutograd's forward/backward partition, which inner='eager' does not run; use "
                "inner='aot_eager' or 'inductor'"
            )
        if self.compress_activations is CompressMode.LOWRANK and (
                self.cudagraphs is True or self.mode in ("reduce-overhead", "max-autotune")):
            raise UnslothCompileError(
                "unsloth_compile: compress_activations='lowrank' draws its random projection (or the "
                "range finder's Omega) from a new host seed at each step, which a CUDA graph replay "
                "would freeze into one; use "
                "cudagraphs=False and a mode without CUDA graphs, or another compress_activations"
            )

    def _check_fp8_layers(self) -> None:
        if self.fp8_layers is Fp8Layers.ALL and self.precision is not Precision.FP8:
            raise UnslothCompileError(
                f"unsloth_compile: fp8_layers='all' says which layers precision='fp8' stores in fp8, "
                f"but precision={self.precision.value!r}; add precision='fp8' or drop fp8_layers"
            )
        if self.nf4_layers is Nf4Layers.ALL and self.precision is not Precision.NF4:
            raise UnslothCompileError(
                f"unsloth_compile: nf4_layers='all' says which layers precision='nf4' stores in 4 bits, "
                f"but precision={self.precision.value!r}; add precision='nf4' or drop nf4_layers"
            )

    def _check_sparsity(self) -> None:
        if self.sparsity is Sparsity.SEMI_2_4 and self.precision is not Precision.DEFAULT:
            raise UnslothCompileError(
                f"unsloth_compile: sparsity='2:4' with precision={self.precision.value!r} is not supported: "
                "the 2:4 op computes in the base's dtype (cuSPARSELt's e4m3 sparse GEMMs are not wired "
                "in); use one of the two"
            )

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "mode"]

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, mode: str | None = None) -> "Config":
        options = dict(options or {})
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise UnslothCompileError(
                f"unsloth_compile: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are {', '.join(cls.option_names())}"
            )
        return cls(mode=mode or "default", **options)
