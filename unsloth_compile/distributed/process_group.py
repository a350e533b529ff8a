"""The process group the multi-GPU recipes need: made from torchrun's environment, checked
before a recipe runs, and where a small tensor for a collective lives.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..errors import UnslothCompileError


def init_from_torchrun(device: str = "auto") -> tuple[torch.device, bool]:
    """This rank's device and, unless the caller made one, the process group: CUDA device
    LOCAL_RANK (as torchrun sets it) with nccl, or the CPU with gloo ("auto": CUDA when
    available). Returns (device, whether the group was created here, for the caller to destroy)."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    where = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(where)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return where, created


def require_process_group(what: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise UnslothCompileError(f"unsloth_compile.distributed.{what}: torch.distributed is not initialised; call "
                                  "torch.distributed.init_process_group (torchrun sets the environment it reads)")


def collective_device() -> torch.device:
    """Where a small tensor for a collective lives: NCCL needs the current CUDA device."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
