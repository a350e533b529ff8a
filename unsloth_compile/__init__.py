"""unsloth_compile: a torch.compile backend that fuses LoRA fine-tuning patterns.

    model = torch.compile(model, backend="unsloth")
"""

from . import ops  # noqa: F401  registers torch.ops.unsloth.*
from .config import Config
from .backend import unsloth
from .report import Report, Site, explain
from .passes import fuse_lora_linears

__all__ = ["Config", "unsloth", "explain", "Report", "Site", "fuse_lora_linears"]
__version__ = "0.1.0"
