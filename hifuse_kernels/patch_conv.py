"""Non-overlapping k x k / k convolutions as one GEMM over gathered patches, channels-last.

The stems of both branches (4x4/4) and the local downsample layers (2x2/2) are
convolutions whose windows never overlap, so each output pixel is a dot product of one
contiguous k*k*C patch with the weight. On channels-last data the patch gather is one
copy with contiguous runs of C (into the GEMM's dtype under autocast: the gather is the
cast), and the GEMM writes (B, H/k, W/k, Cout) directly: no NCHW <-> NHWC copies. The
LayerNorm around it is a one-pass last-dim LayerNorm, not the five elementwise kernels of
the channels-first LayerNorm formula.

Plain PyTorch ops (gather, ``F.linear``, ``F.layer_norm``), so autograd, FLOP counting
(``mm``/``addmm``: the same FLOPs as the convolution) and torch.compile come for free.
Their users are the fused ``PatchEmbed`` and ``LocalDownsample`` (``hifuse.fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["patch_conv", "patch_conv_ref", "patch_linear", "unsupported_reason"]


def patch_conv_ref(x_nhwc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The convolution as nn.Conv2d computes it, in and out as (B, H, W, C)."""
    k = weight.shape[-1]
    out = F.conv2d(x_nhwc.permute(0, 3, 1, 2), weight, bias, stride=k)
    return out.permute(0, 2, 3, 1)


def unsupported_reason(x_nhwc: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why patch_conv cannot take these inputs, or None when it can."""
    if not isinstance(x_nhwc, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return "x and weight must be tensors"
    if x_nhwc.dim() != 4:
        return f"x must be 4-D (B, H, W, C), got shape {tuple(x_nhwc.shape)}"
    if weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        return f"weight must be (Cout, C, k, k), got {tuple(weight.shape)}"
    if weight.shape[1] != x_nhwc.shape[-1]:
        return f"weight takes {weight.shape[1]} channels, x has {x_nhwc.shape[-1]}"
    if not x_nhwc.is_floating_point():
        return f"x must be floating point, got {x_nhwc.dtype}"
    if x_nhwc.device != weight.device:
        return f"x is on {x_nhwc.device}, weight on {weight.device}"
    return None


def patch_conv(
    x_nhwc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, check: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """k x k, stride k convolution of (B, H, W, C) with a (Cout, C, k, k) weight -> (B, H/k, W/k, Cout).

    Trailing rows and columns that do not fill a window are dropped, as nn.Conv2d drops
    them. Any strides are accepted (an NCHW image passed as ``x.permute(0, 2, 3, 1)`` too).
    ``check`` False skips the argument checks, for callers that made them once already.
    ``dtype``: the GEMM's operand dtype (autocast's), into which the patches are gathered, so
    the gather and the cast autocast would make are one pass.

    Raises:
        TypeError, ValueError: bad arguments (see ``unsupported_reason``).
    """
    if check:
        reason = unsupported_reason(x_nhwc, weight)
        if reason is not None:
            raise (TypeError if "tensor" in reason or "floating" in reason else ValueError)(f"patch_conv: {reason}")
    b, h, w, c = x_nhwc.shape
    cout, _, k, _ = weight.shape
    ho, wo = h // k, w // k
    if check and (ho == 0 or wo == 0):
        raise ValueError(f"patch_conv: a {h}x{w} input has no full {k}x{k} window")
    x = x_nhwc[:, : ho * k, : wo * k]
    # (B, Ho, k, Wo, k, C) -> (B, Ho, Wo, k, k, C): each patch is (kh, kw, C) with C contiguous.
    patches = x.reshape(b, ho, k, wo, k, c).permute(0, 1, 3, 2, 4, 5)
    if dtype is not None and dtype != patches.dtype:
        patches = patches.to(dtype, memory_format=torch.contiguous_format)
    return patch_linear(patches.reshape(b, ho, wo, k * k * c), weight, bias)


def patch_rows(weight: torch.Tensor) -> torch.Tensor:
    """The (C_out, C_in, k, k) weight as the GEMM's (C_out, k*k*C_in) rows, each (kh, kw, C_in):
    a view of a channels-last weight, else a copy."""
    cout, c, k, _ = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(cout, k * k * c)


def patch_linear(patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GEMM of ``patch_conv`` on patches already gathered as (B, H/k, W/k, k*k*C), each
    (kh, kw, C) with C contiguous."""
    return F.linear(patches, patch_rows(weight), bias)
