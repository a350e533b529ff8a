"""The bench's model options: how a variant's model is built before PEFT wraps it. They are the
bench's, not backend options (`compile_for` pops them, as it does `prune_*`), and valid for every
LoRA kind:

    checkpointing=true   transformers' gradient checkpointing of every layer, non-reentrant
                         (`model.activation_checkpointing_enable(activation_checkpointing_kwargs=
                         {"use_reentrant": False})`, `gradient_checkpointing_enable` on a
                         transformers without it); also allowed for full and floor
    base=bnb-nf4         every nn.Linear but the output embeddings (and the preset's
                         modules_to_save) becomes a bitsandbytes Linear4bit holding the same
                         weight quantised to NF4 (double-quantised statistics, blocks of 64,
                         computing in the run's dtype), as `BitsAndBytesConfig(load_in_4bit=True,
                         bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` loads a model;
                         PEFT then wraps them by its 4-bit LoRA layer (QLoRA)
    base=bf16            the default: the bases as built, in the run's dtype

The model is built in the run's dtype first and converted layer by layer on its device, each
dense weight freed once quantised; `bench e2e` measures peak memory over the training steps only,
so the dense weights of the build never count.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..errors import UnslothCompileError
from ..nf4 import is_bnb_linear4bit

MODEL_OPTIONS = ("checkpointing", "base")
BASES = ("bf16", "bnb-nf4")
# 4-bit bases are frozen: full fine-tuning would train them, and the floor has no LoRA layer whose
# base the backend would take over
FOUR_BIT_KINDS = ("eager", "inductor", "aot_eager", "unsloth")
# bitsandbytes' QLoRA format, the one the backend takes over as stored (docs/nf4.md)
NF4_BLOCKSIZE = 64


def check_model_options(name: str, kind: str, options: dict) -> None:
    """Refuses a model option's bad value, or one the variant's kind cannot take, with the reason."""
    checkpointing = options.get("checkpointing", False)
    if not isinstance(checkpointing, bool):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {name!r}: checkpointing={checkpointing!r}; "
                                  "true or false")
    base = options.get("base", "bf16")
    if base not in BASES:
        raise UnslothCompileError(f"unsloth_compile.bench: variant {name!r}: base={base!r}; one of {', '.join(BASES)}")
    if base == "bnb-nf4" and kind not in FOUR_BIT_KINDS:
        raise UnslothCompileError(f"unsloth_compile.bench: variant {name!r}: base=bnb-nf4 is for the LoRA kinds "
                                  f"({', '.join(FOUR_BIT_KINDS)}); kind {kind!r} has no frozen LoRA base")


def describe_model_options(options: dict) -> list[str]:
    """The options' words in a variant's description ("bitsandbytes NF4 bases", ...)."""
    words = []
    if options.get("base") == "bnb-nf4":
        words.append("bitsandbytes NF4 bases")
    if options.get("checkpointing") is True:
        words.append("gradient checkpointing")
    return words


def pop_model_options(options: dict) -> dict:
    """The model options taken out of `options` (a variant's options, copied), the rest left."""
    return {key: options.pop(key) for key in MODEL_OPTIONS if key in options}


def apply_model_options(model: torch.nn.Module, options: dict, keep_dense: Iterable[str] = ()) -> torch.nn.Module:
    """The variant's model options applied to `model` (a transformers model, before PEFT wraps it),
    in place. `keep_dense`: names of modules that stay dense under base=bnb-nf4 (modules trained
    in full, whose weights a 4-bit Linear4bit could not train)."""
    if options.get("base") == "bnb-nf4":
        quantise_linears_bnb_nf4(model, keep_dense)
    if options.get("checkpointing") is True:
        enable_checkpointing(model)
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant gradient checkpointing of every layer. Non-reentrant needs no input that
    requires grad, so `enable_input_require_grads` is not called here (transformers may call it
    itself, as it does for a user)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def import_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise UnslothCompileError("unsloth_compile.bench: base=bnb-nf4 needs the bitsandbytes package "
                                  f"(pip install bitsandbytes): {error}") from None
    return bitsandbytes


def quantise_linears_bnb_nf4(model: torch.nn.Module, keep_dense: Iterable[str] = ()) -> int:
    """Every `nn.Linear` of `model` but its output embeddings and the modules named (or ending in
    a name) in `keep_dense` replaced by a bitsandbytes `Linear4bit` holding its weight quantised
    on the weight's device, in place; the dense weight is freed layer by layer. The model is marked
    `is_loaded_in_4bit`, as transformers' quantiser marks it: PEFT reads that to wrap Linear4bit
    bases by its 4-bit LoRA layer. Returns the number of layers replaced."""
    bnb = import_bitsandbytes()
    keep = set(keep_dense)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and module is not head
               and not (name in keep or name.rpartition(".")[2] in keep)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear_to_bnb_nf4(bnb, linear))
    model.is_loaded_in_4bit = True
    return len(targets)


def linear_to_bnb_nf4(bnb, linear: torch.nn.Linear) -> torch.nn.Module:
    """A frozen `Linear4bit` with `linear`'s weight in NF4 (double-quantised statistics, blocks
    of 64) and its bias, computing in the weight's dtype. Built on the meta device, so that no
    fp32 weight of the layer's size is allocated and then dropped; `Params4bit.to(device)`
    quantises."""
    weight = linear.weight
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=weight.dtype, compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4", module=layer).to(weight.device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def check_model_built(model: torch.nn.Module, name: str, options: dict) -> None:
    """Refuses a model built without the variant's model options (they are applied where the
    model is built, `bench e2e`'s and `bench profile`'s `prepare_model`): a caller that builds
    its own model would otherwise measure another model than the variant says."""
    if options.get("checkpointing") is True and not any(getattr(m, "gradient_checkpointing", False)
                                                        for m in model.modules()):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {name!r}: checkpointing=true, but the model has "
                                  "no checkpointed layer; this command does not apply the option")
    if options.get("base") == "bnb-nf4" and not any(is_bnb_linear4bit(m) for m in model.modules()):
        raise UnslothCompileError(f"unsloth_compile.bench: variant {name!r}: base=bnb-nf4, but the model has no "
                                  "bitsandbytes Linear4bit; this command does not apply the option")
