"""The fused-execution layer: the fused forward of every HiFuse module that has one.

Importing it registers, per module class, the part of ``use_fused()`` that switches it, the
check of what its kernels can take, and its fused forward (``hifuse.config.register``).
The model's modules reach them through ``config.runs_fused`` / ``config.forward_fused``
only; nothing here changes a module's parameters, names or state_dict.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hifuse_kernels import weight_casts
from hifuse_kernels.reference import autocast_dtype

from .. import config
from ..model import IRMLP, ConvBN, GlobalBlock
from . import features, fusion_block, global_branch, local_branch
from .fusion_block import bn1_into_conv2, folded_weights, folds
from .global_branch import merged_proj_fc1

__all__ = ["features", "fusion_block", "global_branch", "local_branch", "prepare"]


def prepare(model: nn.Module) -> nn.Module:
    """Compute the weight-derived tensors of ``model``'s eval-mode fused paths now (BatchNorms
    folded into their convolutions, the proj x fc1 product), so that no forward computes
    them, also under torch.compile. ``HiFuse.eval()`` calls it; call it again after
    changing weights in place while in eval mode and compiled (eager forwards notice such
    changes by themselves)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GlobalBlock) and not m.training:
                merged_proj_fc1(m)
            elif isinstance(m, ConvBN) and folds(m.bn):
                folded_weights(m)
            elif isinstance(m, IRMLP) and folds(m.bn1):
                bn1_into_conv2(m)
    return model


config.register_prepare(prepare)


def forward_scope(model: nn.Module, x: torch.Tensor):
    """Under autocast, the weights the fused GEMMs cast are cast together once per forward
    (``hifuse_kernels.weight_casts``)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return contextlib.nullcontext()
    return weight_casts.batch(model, dtype)


config.register_scope(forward_scope)
