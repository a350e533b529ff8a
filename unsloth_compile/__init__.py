"""unsloth_compile: a torch.compile backend that fuses LoRA fine-tuning patterns.

    model = torch.compile(model, backend="unsloth")
    model = unsloth_compile.compile(model, **options)    # the same, in place, options checked first
"""

from .source_layout import map_source_subpackages

map_source_subpackages(__name__, __file__)  # passes/ and kernels/ of a source tree, before anything imports them

from .moved_modules import install_moved_modules  # noqa: E402

install_moved_modules()  # the module paths from before the feature folders, as deprecated aliases

from . import ops  # noqa: F401,E402  registers torch.ops.unsloth.*
from .config import Config
from .errors import UnslothCompileError
from .backend import unsloth
from .report import Report, Site
from .explain import explain
from .passes.lora.lora_linear import fuse_lora_linears
from .integration import compile  # noqa: A004  unsloth_compile.compile(model): in place, options validated first
from .training_outputs import loss_only, restore_logits  # training forward without logits: the fused cross-entropy fires
from . import fp8, nf4, sparsity  # noqa: F401  so that unsloth_compile.fp8 / .nf4 / .sparsity work after the package import

__all__ = ["Config", "unsloth", "compile", "explain", "Report", "Site", "fuse_lora_linears", "UnslothCompileCallback",
           "loss_only", "restore_logits", "UnslothCompileError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # UnslothCompileCallback subclasses transformers.TrainerCallback: imported on first use
    if name == "UnslothCompileCallback":
        from . import integration

        return integration.UnslothCompileCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
