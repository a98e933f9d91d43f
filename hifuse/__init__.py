"""HiFuse: hierarchical multi-scale feature fusion network, with fused kernels."""

from .checkpoint import CheckpointMismatchError, load_checkpoint
from .config import FusedParts, fused_parts, is_fused, use_fused
from .flops import count_flops
from .model import HFFBlock, HiFuse, VARIANTS, create_model

__all__ = [
    "CheckpointMismatchError",
    "FusedParts",
    "HFFBlock",
    "HiFuse",
    "VARIANTS",
    "count_flops",
    "create_model",
    "fused_parts",
    "is_fused",
    "load_checkpoint",
    "use_fused",
]

__version__ = "0.1.0"

# Register the fused ops (and their FLOP formulas) now, not at a model's first fused forward.
import hifuse_kernels  # noqa: E402,F401
