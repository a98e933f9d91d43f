"""HiFuse: hierarchical multi-scale feature fusion network, with fused kernels."""

from .checkpoint import CheckpointMismatchError, load_checkpoint
from .config import FusedParts, Rebuilds, fused_parts, is_fused, use_fused, use_rebuilds
from .flops import count_flops
from .graphs import TrainStep
from .model import HFFBlock, HiFuse, VARIANTS, create_model

__all__ = [
    "CheckpointMismatchError",
    "FusedParts",
    "HFFBlock",
    "HiFuse",
    "Rebuilds",
    "TrainStep",
    "VARIANTS",
    "count_flops",
    "create_model",
    "fused_parts",
    "is_fused",
    "load_checkpoint",
    "prepare",
    "use_fused",
    "use_rebuilds",
]

__version__ = "0.1.0"

# The fused forwards (they register themselves with config), and with them the fused ops.
from . import fused  # noqa: E402
from .fused import prepare  # noqa: E402
