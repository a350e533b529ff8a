"""TRL's fused LM head: which module `unsloth_compile.compile` compiles when a TRL trainer has patched the model.

TRL's trainers (SFT, DPO, KTO, GRPO, RLOO) replace the causal LM's `forward` with one that, called with
`fused_lm_head=True`, runs the backbone and then TRL's chunked log-probability autograd Function: cuBLAS tiles
over the vocabulary folded by TRL's own Triton kernels (on CUDA; TRL before 1.16 launches them on any device).
Traced by Dynamo, that head does not compile reliably: torch.compile passes a user-defined Triton kernel's
Python float arguments as fp64, and TRL before 1.16 mixes them into loop-carried fp32 values ("Loop-carried
variable m has initial type fp32 but is re-assigned to fp64"); the Triton interpreter cannot be traced at all;
and with any TRL the head's Python loops over token and vocabulary chunks unroll into the graph, and its
boolean-mask selection of the scored tokens breaks it. The head reads `lm_head.weight` itself and holds no
LoRA linear, so the backbone is what is compiled: every LoRA linear is in it, and the head runs as in eager,
TRL's kernels launched by TRL.
"""

from __future__ import annotations

import dataclasses
import sys
import types
from typing import Callable, Optional

import torch

from .report import Report, Site, publish
from .summary import log as summary_log
from .errors import UnslothCompileError

PATTERN = "trl_fused_lm_head"
_TRL_FORWARD = "_fused_forward"  # the function trl.trainer.utils.add_fused_lm_head binds as the model's forward


@dataclasses.dataclass(frozen=True)
class FusedLMHead:
    """A causal LM whose forward TRL replaced (`patched`), and its backbone, with their module paths."""

    patched: torch.nn.Module
    backbone: torch.nn.Module
    patched_path: str
    backbone_path: str

    def site(self) -> Site:
        where = self.backbone_path or "the model"
        return Site(module=self.patched_path or "(model)", pattern=PATTERN, decision="refused",
                    reason=f"TRL's fused LM head (chunked log-probabilities, TRL's own Triton kernels) runs outside "
                           f"the compiled graph, as in eager; compiled: {where}, which holds every LoRA linear")

    def report(self) -> Report:
        report = Report()
        report.add(self.site())
        return report


def carries_trl_fused_forward(module: torch.nn.Module) -> bool:
    """Whether `module.forward` is the one `trl.trainer.utils.add_fused_lm_head` installed.

    TRL binds a closure named `_fused_forward` on the instance; `functools.wraps` gives it the
    original forward's name and module, so the code object is what tells it apart."""
    forward = module.__dict__.get("forward")
    if not isinstance(forward, types.MethodType):
        return False
    code = getattr(forward.__func__, "__code__", None)
    trl_utils = sys.modules.get("trl.trainer.utils")
    return (code is not None and trl_utils is not None and code.co_name == _TRL_FORWARD
            and code.co_filename == getattr(trl_utils, "__file__", None))


def find_fused_lm_head(model: torch.nn.Module) -> Optional[FusedLMHead]:
    """The module carrying TRL's fused LM head in `model` (the model itself, or the one a PEFT
    wrapper holds), with the backbone TRL's forward calls (`base_model`); None without one."""
    if "trl.trainer.utils" not in sys.modules:  # TRL not imported: no model carries its head
        return None
    for path, module in model.named_modules():
        if not carries_trl_fused_forward(module):
            continue
        backbone = getattr(module, "base_model", None)  # what TRL's forward runs before the head
        if not isinstance(backbone, torch.nn.Module) or backbone is module:
            raise UnslothCompileError(f"unsloth_compile: {type(module).__name__} carries TRL's fused LM head but has "
                                      f"no separate backbone (its base_model is {type(backbone).__name__}); TRL's head "
                                      "cannot be kept out of the compiled graph")
        backbone_path = next(p for p, m in model.named_modules() if m is backbone)
        return FusedLMHead(patched=module, backbone=backbone, patched_path=path, backbone_path=backbone_path)
    return None


def keeps_lm_head_dense(head: FusedLMHead, select: Callable[[str, torch.nn.Module], bool]
                        ) -> Callable[[str, torch.nn.Module], bool]:
    """fp8 conversion's `select` without the LM head: TRL's head reads `lm_head.weight` itself,
    which an fp8 layer no longer has."""
    lm_head = head.patched.get_output_embeddings()
    dense = {id(lm_head), id(getattr(lm_head, "base_layer", lm_head))}
    return lambda path, module: id(module) not in dense and select(path, module)


def compile_target(model: torch.nn.Module, head: Optional[FusedLMHead], *, report_it: bool,
                   summary: bool) -> torch.nn.Module:
    """The module to compile in place: `model`, or the backbone of TRL's fused LM head, said in
    the report and, unless `summary` is off, in one line on the summary logger.

    The model may have been compiled whole before TRL patched it (`unsloth_compile.compile`,
    then the trainer with the callback); that compile would trace the head, so it is dropped
    (`nn.Module.compile` keeps its compiled call in `_compiled_call_impl`; there is no public way
    to undo it) and the line says so."""
    if head is None:
        return model
    dropped = [m for m in (model, head.patched) if getattr(m, "_compiled_call_impl", None) is not None]
    for module in dropped:
        module._compiled_call_impl = None
    publish(head.report(), log_it=report_it)
    if summary:
        where = head.backbone_path or type(head.backbone).__name__
        undone = " (the earlier compile of the whole model is replaced)" if dropped else ""
        summary_log.info("unsloth_compile: TRL's fused LM head runs outside the compiled graph, as in eager; "
                         "compiling %s, which holds every LoRA linear%s", where, undone)
    return head.backbone
