"""The package's module paths from before its feature folders, kept importable for a while.

`import unsloth_compile.parallel` (and every path in `MOVED`) still works: it gives an alias
module that holds the public names of the module(s) the code now lives in, and warns with a
`DeprecationWarning` that names the new path. The aliases are made by an import finder rather
than by files, so that the package's folders hold only the code as it is; the finder comes last
on `sys.meta_path`, so a real module of the same name always wins.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from pathlib import Path

# old path -> the modules its public names live in now (the first is where most of them went)
MOVED: dict[str, tuple[str, ...]] = {
    "unsloth_compile.parallel": ("unsloth_compile.distributed.tensor_parallel",),
    "unsloth_compile.pipeline": ("unsloth_compile.distributed.pipeline",),
    "unsloth_compile.dtensor_sharding": ("unsloth_compile.distributed.dtensor_sharding",
                                         "unsloth_compile.passes.lora.lora_dtensor"),
    "unsloth_compile.rank_peft": ("unsloth_compile.rank.peft_config",),
    "unsloth_compile.sparse24_mask": ("unsloth_compile.sparsity.mask",),
    "unsloth_compile.sparse24_obs": ("unsloth_compile.sparsity.obs",),
    "unsloth_compile.sparse24_reconstruct": ("unsloth_compile.sparsity.reconstruct",),
    "unsloth_compile.sparse24_sequential": ("unsloth_compile.sparsity.sequential",),
    "unsloth_compile.ops_fp8": ("unsloth_compile.ops.base_fp8",),
    "unsloth_compile.ops_sparse": ("unsloth_compile.ops.base_sparse24",),
    "unsloth_compile.ops_cross_entropy": ("unsloth_compile.ops.cross_entropy",),
    "unsloth_compile.ops_compress": ("unsloth_compile.ops.compress",),
    "unsloth_compile.ops_packed_attention": ("unsloth_compile.ops.packed_attention",),
    "unsloth_compile.ops_attention_bias": ("unsloth_compile.ops.attention_bias",),
    "unsloth_compile.passes.lora_linear": ("unsloth_compile.passes.lora.lora_linear",
                                           "unsloth_compile.passes.lora.lora_site"),
    "unsloth_compile.passes.lora_adapter_groups": ("unsloth_compile.passes.lora.lora_adapter_groups",),
    "unsloth_compile.passes.lora_autocast": ("unsloth_compile.passes.lora.lora_autocast",),
    "unsloth_compile.passes.lora_leftovers": ("unsloth_compile.passes.lora.lora_leftovers",),
    "unsloth_compile.passes.fp8_linear": ("unsloth_compile.passes.lora.fp8_linear",),
    "unsloth_compile.passes.sparse24_linear": ("unsloth_compile.passes.lora.sparse24_linear",),
    "unsloth_compile.passes.compress_rewrite": ("unsloth_compile.passes.compress.compress_rewrite",),
    "unsloth_compile.passes.compress_saved": ("unsloth_compile.passes.compress.compress_saved",
                                              "unsloth_compile.compressed_compile"),
}

_IMPORTLIB_DIR = str(Path(importlib.__file__).parent)


def public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [name for name in vars(module) if not name.startswith("_")]


def deprecation_message(old: str) -> str:
    return f"{old} is deprecated and will be removed: import from {' and '.join(MOVED[old])} instead"


def _caller_stacklevel() -> int:
    """The stacklevel, seen from `exec_module`, of the frame that imported the old path, so that
    the warning points at the user's import line (and shows by default where that is __main__).
    `warnings` itself skips the frames of importlib's bootstrap, not `importlib.import_module`."""
    level, frame = 1, sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not ("importlib" in filename and "_bootstrap" in filename):
            level += 1
            if not filename.startswith(_IMPORTLIB_DIR):
                return level
        frame = frame.f_back
    return level


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__
        warnings.warn(deprecation_message(old), DeprecationWarning, stacklevel=_caller_stacklevel())
        for new in reversed(MOVED[old]):  # the first module named in MOVED wins
            source = importlib.import_module(new)
            for name in public_names(source):
                setattr(module, name, getattr(source, name))


def install_moved_modules() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
