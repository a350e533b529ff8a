"""Tensor parallelism for LoRA models, compiled with the unsloth backend, and the data-parallel
gradient average across the replicas of a DP x TP or DP x PP mesh.

    plan = lora_tp_plan(model)                  # Llama-style blocks: q/k/v/gate/up column-wise, o/down row-wise
    tensor_parallel(model, mesh["tp"])          # parallelize_module with that plan, then compile in place
    all_reduce_gradients(model, mesh["dp"].get_group())   # after backward: the replicas' mean

The plan shards each PEFT LoRA layer as a whole, consistently with its base
(`LoraColwiseParallel`, `LoraRowwiseParallel`):

    column-wise   W: Shard(0)   A: Replicate   B: Shard(0)     x replicated, y sharded by output
    row-wise      W: Shard(1)   A: Shard(1)    B: Replicate    x sharded by input, y partial sums

so that on each rank `x_l W_l^T + s (x_l A_l^T) B_l^T` is this rank's part of the layer: its
output columns (column-wise), or its partial sum (row-wise). The parameters become DTensors,
Dynamo hands the backend a graph over DTensors, and the LoRA pass fuses it as on one GPU; the
fused op then runs on the local shards through the sharding strategies of dtensor_sharding.py,
which also says what the pass refuses. Pipeline parallelism is in pipeline.py.

Two opt-in options shard what stays whole on every rank otherwise (the activations between the
blocks, the embedding, the LM head and its logits):

    tensor_parallel(model, mesh["tp"], sequence_parallel=True, vocab_parallel_head=True)
    with loss_parallel():                       # torch.distributed.tensor.parallel, for the head's loss
        model(input_ids=ids, labels=ids).loss.backward()

sequence_parallel (Megatron's SP): the residual stream is a DTensor sharded on the sequence;
the norms run on each rank's tokens (SequenceParallel), the embedding's and the row-wise
projections' outputs are reduce-scattered to it (instead of all-reduced), attention and the
MLP all-gather their input once (GatherSequence), so the column-wise projections still read a
replicated x. With regather_in_backward=True as well, that gather is checkpointed: the LoRA
projections' backward (x for A's gradient) reads it gathered again from the sequence shard, as
Megatron's SP does, instead of every rank keeping it whole. vocab_parallel_head: the head
column-wise, the logits sharded on the vocabulary, cross_entropy reduced over the shards under
loss_parallel().
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from .dtensor_sharding import register_lora_sharding
from ..training_outputs import loss_only
from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile")

__all__ = ["LoraColwiseParallel", "LoraRowwiseParallel", "GatherSequence", "lora_tp_plan", "tensor_parallel",
           "all_reduce_gradients", "COLWISE", "ROWWISE", "SEQUENCE_NORMS"]

# Llama-style projection names (transformers' Llama, Mistral, Qwen2, Gemma, ...): Megatron's
# pairing, so that attention and the MLP each need one all-reduce in forward and one in backward.
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


# ----------------------------------------------------------------------------- parallel styles


def _lora_layer_or_reason(module: nn.Module) -> tuple[bool, Optional[str]]:
    """(is a PEFT LoRA layer, why it cannot be sharded or None)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT: only plain linears
        return False, None
    if not isinstance(module, LoraLayer):
        return False, None
    base = module.get_base_layer()
    if type(base) is not nn.Linear:
        return True, f"its base is a {type(base).__name__}, not an nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return True, "fan_in_fan_out (Conv1D-style) weights"
    if any(len(getattr(module, name, {})) for name in ("lora_embedding_A", "lora_magnitude_vector")):
        return True, "DoRA or embedding adapters"
    if len(getattr(module, "lora_variant", {}) or {}):
        return True, f"PEFT LoRA variants ({', '.join(sorted(module.lora_variant))})"
    return True, None


def _distribute(module: nn.Module, mesh, placements: dict) -> None:
    """Replace each parameter named in `placements` by a DTensor parameter of that placement."""
    from torch.distributed.tensor import distribute_tensor

    for name, placement in placements.items():
        param = getattr(module, name, None)
        if param is None:
            continue
        module.register_parameter(name, nn.Parameter(distribute_tensor(param.data, mesh, [placement]),
                                                     requires_grad=param.requires_grad))


def _lora_partition(base_placements: dict, a_placements: dict, b_placements: dict):
    """A distribute_module partition_fn over a PEFT LoRA layer's submodules."""
    def partition(name: str, module: nn.Module, mesh) -> None:
        if name == "base_layer":
            _distribute(module, mesh, base_placements)
        elif name.startswith("lora_A."):
            _distribute(module, mesh, a_placements)
        elif name.startswith("lora_B."):
            _distribute(module, mesh, b_placements)
    return partition


def _check_lora_layer(module: nn.Module, style: str) -> bool:
    is_lora, reason = _lora_layer_or_reason(module)
    if reason is not None:
        raise UnslothCompileError(f"unsloth_compile.distributed.tensor_parallel.{style}: cannot shard "
                                  f"{type(module).__name__}: {reason}. Leave it out of the plan (it then stays whole "
                                  "on every rank) or merge it first")
    return is_lora


def _colwise_base():
    from torch.distributed.tensor.parallel import ColwiseParallel
    return ColwiseParallel


def _rowwise_base():
    from torch.distributed.tensor.parallel import RowwiseParallel
    return RowwiseParallel


def _parallel_style_base():
    from torch.distributed.tensor.parallel import ParallelStyle
    return ParallelStyle


class LoraColwiseParallel(_colwise_base()):
    """`ColwiseParallel` for a PEFT LoRA linear (or a plain nn.Linear): the base weight and bias
    and B (and B's bias) sharded by output rows, A replicated. Input replicated, output sharded
    on the last dimension (local tensor, as ColwiseParallel returns it by default)."""

    layout = "column-wise"

    def lora_placements(self) -> tuple[dict, dict, dict]:
        """Placements of the base linear's, A's and B's parameters, by parameter name."""
        from torch.distributed.tensor import Replicate, Shard

        return {"weight": Shard(0), "bias": Shard(0)}, {"weight": Replicate()}, {"weight": Shard(0), "bias": Shard(0)}

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not _check_lora_layer(module, type(self).__name__):
            return super()._apply(module, device_mesh)
        return _distribute_lora_layer(self, module, device_mesh)


class LoraRowwiseParallel(_rowwise_base()):
    """`RowwiseParallel` for a PEFT LoRA linear (or a plain nn.Linear): the base weight and A
    sharded by input columns, B (and both biases) replicated. Input sharded on the last
    dimension, output all-reduced to a replicated local tensor."""

    layout = "row-wise"

    def lora_placements(self) -> tuple[dict, dict, dict]:
        from torch.distributed.tensor import Replicate, Shard

        return {"weight": Shard(1), "bias": Replicate()}, {"weight": Shard(1)}, {"weight": Replicate(),
                                                                                "bias": Replicate()}

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not _check_lora_layer(module, type(self).__name__):
            return super()._apply(module, device_mesh)
        from torch.distributed.tensor import Shard

        self.desired_input_layouts = (Shard(-1),)
        return _distribute_lora_layer(self, module, device_mesh)


def _distribute_lora_layer(style, module: nn.Module, device_mesh) -> nn.Module:
    """distribute_module over a whole PEFT LoRA layer with the style's placements and hooks."""
    from torch.distributed.tensor import distribute_module

    module._unsloth_tensor_parallel = style.layout  # what unsloth_compile.rank refuses to resize
    return distribute_module(
        module, device_mesh, _lora_partition(*style.lora_placements()),
        functools.partial(style._prepare_input_fn, style.input_layouts, style.desired_input_layouts),
        functools.partial(style._prepare_output_fn, style.output_layouts, style.use_local_output))


def lora_tp_plan(model: nn.Module, colwise: tuple[str, ...] = COLWISE, rowwise: tuple[str, ...] = ROWWISE, *,
                 sequence_parallel: bool = False, vocab_parallel_head: bool = False,
                 regather_in_backward: bool = False) -> dict[str, Any]:
    """The tensor-parallel plan of a Llama-style model, for `parallelize_module`: every module
    whose last name is in `colwise` (q/k/v/gate/up) column-wise, in `rowwise` (o/down) row-wise,
    PEFT LoRA layers included (their A and B sharded with the base). By default embeddings,
    norms and the LM head are left whole on every rank. Raises ValueError when nothing matches.

    sequence_parallel: the residual stream between the blocks is sharded on the sequence
    (Megatron SP): the norms run on each rank's tokens, the embedding's output and the row-wise
    projections' outputs are reduce-scattered to sequence shards instead of all-reduced, and each
    block that holds column-wise projections (attention, MLP) all-gathers its input once.
    vocab_parallel_head: the LM head column-wise, its logits sharded on the vocabulary (a
    DTensor); run forward and backward under `torch.distributed.tensor.parallel.loss_parallel()`
    so that cross_entropy reduces over the shards instead of gathering the logits.
    regather_in_backward (with sequence_parallel): the blocks keep their input's sequence shard
    for backward and all-gather it again there (Megatron's SP), instead of keeping the gathered
    input on every rank; one more all-gather per block in backward."""
    from torch.distributed.tensor import Shard

    if regather_in_backward and not sequence_parallel:
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel.lora_tp_plan: "
                                  "regather_in_backward=True needs sequence_parallel=True (without it the blocks' "
                                  "input is not gathered)")

    plan: dict[str, Any] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in colwise:
            plan[name] = LoraColwiseParallel()
        elif leaf in rowwise:
            # under SP, reduce-scattered to the sequence shards the residual add reads, kept a DTensor
            plan[name] = (LoraRowwiseParallel(output_layouts=Shard(1), use_local_output=False) if sequence_parallel
                          else LoraRowwiseParallel())
    if not plan:
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel.lora_tp_plan: no module named one of "
                                  f"{colwise + rowwise}; pass colwise=/rowwise= with your model's projection names")
    if sequence_parallel or vocab_parallel_head:
        plan.update(_embedding_and_head_plan(model, sequence_parallel, vocab_parallel_head))
    if sequence_parallel:
        plan.update(_sequence_parallel_plan(model, plan, regather_in_backward))
    return plan


# Norms on the residual stream (Llama, Mistral, Qwen2; Gemma's feed-forward pair), run on sequence
# shards under SP. Norms inside attention (Qwen3's q_norm/k_norm) read gathered heads: not these.
SEQUENCE_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm", "norm")


class GatherSequence(_parallel_style_base()):
    """Before a block whose column-wise projections read its input (attention, the MLP): its
    `hidden_states` (first positional argument or keyword), a DTensor sharded on the sequence,
    all-gathered once, so that all of its projections read the same gathered tensor (q/k/v: one
    all-gather forward and one reduce-scatter backward, not three). The projections then see a
    replicated DTensor input, the column-wise layout the fused op runs. regather_in_backward:
    the gather checkpointed, so that backward keeps the shard and gathers it again."""

    def __init__(self, *, regather_in_backward: bool = False):
        super().__init__()
        self.regather_in_backward = regather_in_backward

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_pre_hook(functools.partial(_gather_hidden_states, self.regather_in_backward),
                                         with_kwargs=True)
        return module


def _all_gather_sequence(hidden):
    from torch.distributed.tensor import Replicate

    return hidden.redistribute(placements=[Replicate()] * hidden.device_mesh.ndim)


def _gather_hidden_states(regather_in_backward: bool, module: nn.Module, args: tuple, kwargs: dict):
    from torch.distributed.tensor import DTensor

    def gathered(hidden):
        if not isinstance(hidden, DTensor):
            raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel: under sequence_parallel, "
                                      f"{type(module).__name__} expects its hidden_states as a DTensor sharded on the "
                                      f"sequence, from a norm named one of {SEQUENCE_NORMS}, got a "
                                      f"{type(hidden).__name__}; leave sequence_parallel off for this model")
        if regather_in_backward:
            # Checkpointing the all-gather alone: autograd (and, compiled, the partitioner, for
            # which the region's collectives are user-annotated recompute) keeps the sequence
            # shard and gathers again in backward, instead of the projections keeping the
            # gathered x for their LoRA A's gradient.
            # No RNG in an all-gather: nothing to stash and restore.
            return torch.utils.checkpoint.checkpoint(_all_gather_sequence, hidden, use_reentrant=False,
                                                     preserve_rng_state=False)
        return _all_gather_sequence(hidden)

    if args:
        return (gathered(args[0]), *args[1:]), kwargs
    if "hidden_states" not in kwargs:
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel: under sequence_parallel, "
                                  f"{type(module).__name__} is called without a positional input or hidden_states=: "
                                  "nothing to gather; leave sequence_parallel off for this model")
    return args, {**kwargs, "hidden_states": gathered(kwargs["hidden_states"])}


def _named(model: nn.Module, module: Optional[nn.Module], what: str, option: str) -> str:
    """`module`'s name in `model`; ValueError naming `option` when the model has none."""
    names = {id(candidate): name for name, candidate in model.named_modules()}
    if module is not None and id(module) in names:
        return names[id(module)]
    raise UnslothCompileError(f"unsloth_compile.distributed.tensor_parallel.lora_tp_plan: {option}=True needs the "
                              f"model's {what} (get_{what.replace(' ', '_')}s()); this model has none: leave {option} "
                              "off")


def _embedding_and_head_plan(model: nn.Module, sequence_parallel: bool, vocab_parallel_head: bool) -> dict:
    """The embedding's and the LM head's styles. Tied weights (llama-1b) stay tied: sharded
    together on the vocabulary with a vocab-parallel head (tensor_parallel ties them again),
    otherwise both whole."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel)

    option = "sequence_parallel" if sequence_parallel else "vocab_parallel_head"
    embedding, head = (getattr(model, f"get_{side}_embeddings", lambda: None)() for side in ("input", "output"))
    embedding_name = _named(model, embedding, "input embedding", option)
    head_name = _named(model, head, "output embedding", option)
    tied = embedding.weight is head.weight
    between_blocks = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout
    plan: dict[str, Any] = {}
    if vocab_parallel_head:
        plan[head_name] = ColwiseParallel(input_layouts=between_blocks, output_layouts=Shard(-1),
                                          use_local_output=False)
    elif sequence_parallel:  # a whole head on the gathered final hidden states: plain logits
        plan[head_name] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                             use_local_output=True)
    if sequence_parallel and tied and not vocab_parallel_head:
        # the head needs the whole tied weight, so the embedding keeps it and each rank takes its
        # sequence shard of the output (a slice: no communication, no second copy of the weight)
        plan[embedding_name] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                   use_local_output=False)
    elif sequence_parallel or tied:
        # rows sharded on the vocabulary: each rank looks up its tokens, the sums reduce-scattered
        # to sequence shards (SP) or all-reduced
        plan[embedding_name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks,
                                               use_local_output=not sequence_parallel)
    return plan


def _sequence_parallel_plan(model: nn.Module, projections: Mapping[str, Any], regather_in_backward: bool) -> dict:
    """SequenceParallel on the residual stream's norms, GatherSequence on each block holding a
    column-wise projection."""
    from torch.distributed.tensor.parallel import SequenceParallel

    gathering = {name.rsplit(".", 1)[0] for name, style in projections.items()
                 if isinstance(style, LoraColwiseParallel)}
    plan: dict[str, Any] = {name: GatherSequence(regather_in_backward=regather_in_backward) for name in gathering}
    for name, _ in model.named_modules():
        inside_block = any(name.startswith(block + ".") for block in gathering)
        if name.rsplit(".", 1)[-1] in SEQUENCE_NORMS and not inside_block:
            plan[name] = SequenceParallel()
    if not any(isinstance(style, SequenceParallel) for style in plan.values()):
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel.lora_tp_plan: sequence_parallel=True "
                                  f"found no norm named one of {SEQUENCE_NORMS}")
    return plan


def tensor_parallel(model: nn.Module, mesh: Any, plan: Optional[Mapping[str, Any]] = None, *,
                    sequence_parallel: bool = False, vocab_parallel_head: bool = False,
                    regather_in_backward: bool = False, compile: bool = True,
                    options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> nn.Module:
    """Shard `model` in place over the 1-D `mesh` (`parallelize_module` with `plan`, default
    `lora_tp_plan(model, sequence_parallel=..., vocab_parallel_head=..., regather_in_backward=...)`),
    then compile it in place with the unsloth backend. Every rank must hold the same initial weights
    (distribute_tensor scatters rank 0's). Attention heads and key/value heads must divide by the
    mesh size. With vocab_parallel_head, run forward and backward under `loss_parallel()`; the
    model's training forwards then return the loss without the logits (`loss_only`). Build the
    optimizer afterwards."""
    from torch.distributed.tensor.parallel import parallelize_module

    if getattr(mesh, "ndim", 1) != 1:
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel.tensor_parallel: pass the 1-D "
                                  "tensor-parallel mesh (mesh['tp'] of a DP x TP mesh)")
    if plan is not None and (sequence_parallel or vocab_parallel_head or regather_in_backward):
        raise UnslothCompileError("unsloth_compile.distributed.tensor_parallel.tensor_parallel: sequence_parallel=, "
                                  "vocab_parallel_head= and regather_in_backward= build the plan; with plan= pass "
                                  "lora_tp_plan(model, sequence_parallel=..., ...) instead")
    register_lora_sharding()
    _check_heads(model, mesh.size())
    if plan is None:
        plan = lora_tp_plan(model, sequence_parallel=sequence_parallel, vocab_parallel_head=vocab_parallel_head,
                            regather_in_backward=regather_in_backward)
    tied = _tied_embedding(model)
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    parallelize_module(model, mesh, dict(plan))
    # torch's styles wrap what they distribute in a new nn.Parameter, trainable: the frozen
    # embedding, norms and head would get gradients (and optimizer states)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    if tied:
        _tie_again(model)
    if vocab_parallel_head:
        # A compiled forward returning the vocab-sharded logits beside the loss fails in backward
        # when only the loss is differentiated (AOTAutograd: "Expected a DTensor tangent but got a
        # plain Tensor", pytorch#172556): training forwards return the loss without the logits.
        loss_only(model)
    if compile:
        from ..integration import compile as compile_in_place

        # DTensor sharding propagation takes no symbolic lengths, which bucketed batches would bring
        compile_in_place(model, {"cudagraphs": False, "bucket_lengths": False, **dict(options or {})}, mode=mode)
    return model


def _tied_embedding(model: nn.Module) -> bool:
    get_in, get_out = (getattr(model, f"get_{side}_embeddings", None) for side in ("input", "output"))
    if get_in is None or get_out is None or get_in() is None or get_out() is None:
        return False
    return get_in().weight is get_out().weight


def _tie_again(model: nn.Module) -> None:
    """Tie the embedding and the head again where the plan sharded both alike (rows on the
    vocabulary): parallelize_module replaced each one's weight by a DTensor of its own."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    placements = getattr(embedding.weight, "placements", None)
    if placements is not None and placements == getattr(head.weight, "placements", None):
        head.weight = embedding.weight


def _check_heads(model: nn.Module, size: int) -> None:
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value % size:
            raise UnslothCompileError(f"unsloth_compile.distributed.tensor_parallel.tensor_parallel: {key}={value} "
                                      f"does not divide by the tensor-parallel size {size}")


# ----------------------------------------------------------------------------- data parallelism over a mesh


def all_reduce_gradients(model: nn.Module, group: Any) -> int:
    """Data parallelism across the replicas of a DP x TP or DP x PP mesh: replace each trainable
    parameter's gradient by its mean over `group` (`mesh["dp"].get_group()`), after backward and
    before the optimizer step. One all-reduce per dtype of all the gradients flattened together
    (the LoRA gradients are small: tens of MB for a 1B model), as compile_ddp's all-reduce after
    backward. A DTensor gradient (under TP) is reduced through its local tensor: the mean over
    replicas commutes with its tensor-parallel placement (a Partial sum stays one). Returns the
    number of gradients reduced."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    locals_by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            locals_by_dtype.setdefault(grad.dtype, []).append(grad)
    size = dist.get_world_size(group)
    with torch.no_grad():
        for grads in locals_by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat /= size
            for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(reduced)
    return sum(len(g) for g in locals_by_dtype.values())
