"""Fused kernels for HiFuse: Triton kernels and native (C++/CUDA) ops in the `hifuse` namespace.

Importing this package needs neither triton nor the compiled extension; an op that needs
what is missing raises an error saying what it is and how to get it. This package imports
torch and triton only: the model (``hifuse``) sits above it.
"""

from . import (
    _ext,
    _triton,
    batch_norm_act,
    channel_gate,
    channel_pool,
    dwconv_layer_norm,
    gated_layer_norm,
    gelu_linear,
    gelu_residual,
    layer_norm_cat,
    layer_norm_cf,
    patch_conv,
    patch_conv_norm,
    patch_merge_norm,
    recompute,
    reference,
    residual_layer_norm,
    spatial_pool,
    window_attention,
)
from ._ext import available as native_available
from ._ext import load_error as native_load_error
from ._triton import unsupported_reason as triton_unsupported_reason

__all__ = [
    "batch_norm_act",
    "channel_gate",
    "channel_pool",
    "dwconv_layer_norm",
    "gated_layer_norm",
    "gelu_linear",
    "gelu_residual",
    "layer_norm_cat",
    "layer_norm_cf",
    "patch_conv",
    "patch_conv_norm",
    "patch_merge_norm",
    "recompute",
    "reference",
    "residual_layer_norm",
    "spatial_pool",
    "window_attention",
    "native_available",
    "native_load_error",
    "triton_unsupported_reason",
]
