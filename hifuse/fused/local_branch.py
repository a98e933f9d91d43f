"""Fused forwards of the local branch: the dwconv + LayerNorm blocks, the stem and
downsamples, and the channels-first LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hifuse_kernels import dwconv_layer_norm as dln
from hifuse_kernels import layer_norm_cf, patch_conv, recompute
from hifuse_kernels import residual_layer_norm as rln

from .. import config
from ..layers import LayerNormCF
from ..model import LocalBlock, LocalDownsample
from .common import asked_to_hand_on, autocast_dtype, drop_path_inactive, gelu_residual, handed_on, stem_conv_norm


def local_block_check(m: LocalBlock, x: torch.Tensor) -> str | None:
    if x.dim() != 4:
        return f"x must be 4-D, got {x.dim()}-D"
    return dln.unsupported_reason(x.permute(0, 2, 3, 1), m.dwconv.weight, m.dwconv.bias, m.norm.weight, m.norm.bias)


def local_block_forward(m: LocalBlock, x: torch.Tensor) -> torch.Tensor:
    """dwconv + LayerNorm in one kernel, then pwconv and GELU + residual in one pass.

    Works channels-last throughout: the result is an NCHW-shaped view of channels-last
    memory, so the next block's permutes are free. Without active stochastic depth the block
    is one autograd op whose stream gradient is summed inside the convolution's backward.
    """
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    # the normalised map is rebuilt in backward from x, which the block keeps anyway
    args = (nhwc, m.dwconv.weight.contiguous(), m.dwconv.bias, m.norm.weight, m.norm.bias,
            float(m.norm.eps), autocast_dtype(x) or x.dtype)
    keep = not config.rebuilding("local_norm")
    if drop_path_inactive(m):
        out = recompute.dwconv_layer_norm_linear_residual(args, m.pwconv.weight, m.pwconv.bias, keep=keep)
    else:
        y = recompute.linear(recompute.DwconvLayerNorm, args, m.pwconv.weight, m.pwconv.bias, keep=keep)
        out = gelu_residual(m, y, nhwc, m.act)
    return out.permute(0, 3, 1, 2)


def downsample_check(m: LocalDownsample, x: torch.Tensor) -> str | None:
    if x.dim() != 4 or x.shape[1] != m.conv.in_channels:
        return f"x must be (B, {m.conv.in_channels}, H, W), got {tuple(x.shape)}"
    nhwc = x.permute(0, 2, 3, 1)
    reason = patch_conv.unsupported_reason(nhwc, m.conv.weight)
    if reason is None and m.norm_first and autocast_dtype(x) is not None:
        reason = rln.unsupported_reason(nhwc, m.norm.weight)
    return reason


def downsample_forward(m: LocalDownsample, x: torch.Tensor) -> torch.Tensor:
    """Channels-last: the LayerNorm is a last-dim LayerNorm and the convolution one GEMM over
    gathered patches; the result is an NCHW-shaped view of channels-last memory, which the
    local blocks take without copies. Under autocast the LayerNorm before the GEMM writes
    the GEMM's dtype, in the patches' order: no gather copy and no cast pass follow it (nor
    precede its backward), and where ``common.hand_on`` asks, x is handed on through it."""
    nhwc = x.permute(0, 2, 3, 1)
    norm = m.norm
    gemm_dtype = autocast_dtype(x)
    if not m.norm_first:  # the stem; its channels-first LayerNorm formula writes float32 under autocast
        out_dtype = None if gemm_dtype is None else torch.promote_types(torch.float32, norm.weight.dtype)
        out = stem_conv_norm(nhwc, m.conv.weight, m.conv.bias, norm, out_dtype)
    elif gemm_dtype is not None:
        chain = asked_to_hand_on(m)
        patches = rln.layer_norm_to(nhwc, norm.weight, norm.bias, norm.eps, gemm_dtype, check=False,
                                    patch=m.conv.kernel_size[0], chain=chain)
        if chain:
            patches, after = patches
            handed_on(after.permute(0, 3, 1, 2))
        # the weight's cast from the forward's batch, its float32 gradient from the GEMM
        out = recompute.linear(recompute.Given, (patches,), patch_conv.patch_rows(m.conv.weight), m.conv.bias)
    else:
        nhwc = F.layer_norm(nhwc, (norm.dim,), norm.weight, norm.bias, norm.eps)
        out = patch_conv.patch_conv(nhwc, m.conv.weight, m.conv.bias, check=False)
    return out.permute(0, 3, 1, 2)


def layer_norm_cf_check(m: LayerNormCF, x: torch.Tensor) -> str | None:
    return layer_norm_cf.unsupported_reason(x, m.weight, m.bias)


def layer_norm_cf_forward(m: LayerNormCF, x: torch.Tensor) -> torch.Tensor:
    return layer_norm_cf.layer_norm_cf(x, m.weight, m.bias, m.eps, check=False)


config.register(LocalBlock, "local", local_block_check, local_block_forward)
config.register(LocalDownsample, "patches", downsample_check, downsample_forward)
config.register(LayerNormCF, "norm", layer_norm_cf_check, layer_norm_cf_forward)
