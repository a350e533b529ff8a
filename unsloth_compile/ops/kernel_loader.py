"""Loading a frozen base's CUDA kernel module on first use, and choosing it per call.

A strategy whose CUDA path is a Triton module (base_dense.py, base_nf4.py) imports it only when
a CUDA tensor first reaches the op: importing Triton costs seconds and fails on machines
without it, where the reference path must still run. Per call, `KernelLoader.pick` returns the
module or None (the reference path), by the `impl` the pass baked in from the Config:

    "reference", or a tensor off CUDA      None
    the module does not import              "triton": UnslothCompileError; else None, warned once
    its `supports(...)` refuses the inputs  "triton": UnslothCompileError; else None, warned
                                            once per reason

A failed import is not remembered, so a later call tries again (Triton may initialise then).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from types import ModuleType
from typing import Optional

import torch

from ..errors import UnslothCompileError

log = logging.getLogger("unsloth_compile")


@dataclass
class KernelLoader:
    """One kernel module, the words its messages use, and the reasons already warned about.

    module_name   the module to import, with a `supports(...) -> (ok, reason)` function
    kernels       how the load error names it: "... but the {kernels} cannot be loaded"
    unavailable   the warning when it does not import and impl is "auto" (%s: the reason)
    unsupported   the warning when `supports` refuses and impl is "auto" (%s: the reason)
    """

    module_name: str
    kernels: str
    unavailable: str
    unsupported: str
    _module: Optional[ModuleType] = field(default=None, init=False, repr=False)
    _warned: set[str] = field(default_factory=set, init=False, repr=False)

    def module_or_reason(self) -> tuple[Optional[ModuleType], Optional[str]]:
        """The kernel module, or None and the reason it cannot be used (the import error)."""
        if self._module is None:
            try:
                self._module = importlib.import_module(self.module_name)
            except Exception as error:  # ImportError, or Triton failing to initialise
                return None, f"{type(error).__name__}: {error}"
        return self._module, None

    def pick(self, impl: str, device: torch.device, supports_args: tuple) -> Optional[ModuleType]:
        """The kernel module for a call on `device` whose `supports(*supports_args)` takes it,
        or None for the reference path (see the module docstring for when it raises or warns)."""
        if impl == "reference" or device.type != "cuda":
            return None
        module, reason = self.module_or_reason()
        if module is None:
            if impl == "triton":
                raise UnslothCompileError(
                    f"unsloth_compile: options kernels='triton' but the {self.kernels} cannot be loaded "
                    f"({reason}); install triton or use kernels='auto'/'reference'")
            self._warn_once("import", self.unavailable, reason)
            return None
        ok, why = module.supports(*supports_args)
        if not ok:
            if impl == "triton":
                raise UnslothCompileError(f"unsloth_compile: kernels='triton' cannot run these inputs: {why}; "
                                          f"use kernels='auto' (the reference op runs them)")
            self._warn_once(why, self.unsupported, why)
            return None
        return module

    def _warn_once(self, key: str, message: str, reason: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, reason)
