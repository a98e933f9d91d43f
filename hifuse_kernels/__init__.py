"""Fused kernels for HiFuse: Triton kernels and native (C++/CUDA) ops in the `hifuse` namespace.

Importing this package never needs the compiled extension; the ops that need it
raise an ImportError saying what is missing and how to build it.
"""

from . import (
    _ext,
    _triton,
    batch_norm_act,
    dwconv_layer_norm,
    fusion_gate,
    gelu_residual,
    layer_norm_cat,
    layer_norm_cf,
    patch_conv,
    patch_merge,
    residual_layer_norm,
    window_attention,
)
from ._ext import available as native_available
from ._ext import load_error as native_load_error
from ._triton import unsupported_reason as triton_unsupported_reason

__all__ = [
    "batch_norm_act",
    "dwconv_layer_norm",
    "fusion_gate",
    "gelu_residual",
    "layer_norm_cat",
    "layer_norm_cf",
    "patch_conv",
    "patch_merge",
    "residual_layer_norm",
    "window_attention",
    "native_available",
    "native_load_error",
    "triton_unsupported_reason",
]
