"""Patch merging of the global branch: 2x2 gather (odd sides zero-padded) + LayerNorm(4C), native.

Eager pads the (B, H, W, C) grid, takes four strided slices, concatenates them into a
(B, L/4, 4C) tensor and normalises it: three copies before the norm. The native op
(csrc/patch_merge.cpp, .cu) gathers each output row straight from the tokens and writes
it normalised; backward scatters the row gradient back to the tokens. The reduction GEMM
stays a Linear.

Layers: reference, capability check, registered op (schema in C++; fake and autograd here, registered with a zero
FLOP formula by `_ext.register_python_parts`), functional entry point. The module using it is
the fused ``PatchMerging`` (``hifuse.fused.global_branch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _ext

OP = "patch_merge_norm"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = ["patch_merge_norm", "patch_merge_norm_ref", "unsupported_reason"]


def patch_merge_norm_ref(x, h: int, w: int, weight, bias, eps: float = 1e-5):
    """What the eager PatchMerging computes before its reduction Linear: (B, ceil(h/2)*ceil(w/2), 4C)."""
    b, _length, c = x.shape
    x = x.view(b, h, w, c)
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return F.layer_norm(x.view(b, -1, 4 * c), (4 * c,), weight, bias, eps)


def _argument_problem(x, h, w, weight, bias):
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, bias)):
        return TypeError, "x, weight and bias must be tensors"
    if x.dim() != 3:
        return ValueError, f"x must be (B, H*W, C), got shape {tuple(x.shape)}"
    if h <= 0 or w <= 0 or x.shape[1] != h * w:
        return ValueError, f"x has {x.shape[1]} tokens, not H*W = {h}*{w}"
    c4 = 4 * x.shape[2]
    if weight.shape != (c4,) or bias.shape != (c4,):
        return ValueError, f"weight and bias must be ({c4},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"unsupported dtypes x={x.dtype}, weight={weight.dtype}"
    if weight.device != x.device or bias.device != x.device:
        return ValueError, "x, weight and bias must be on one device"
    return None


def unsupported_reason(x, h, w, weight, bias) -> str | None:
    """Why the native op cannot take these inputs, or None when it can."""
    reason = _ext.unsupported_device_reason(OP, x.device.type)
    if reason is not None:
        return reason
    problem = _argument_problem(x, h, w, weight, bias)
    return None if problem is None else problem[1]


def _fake_forward(x, h, w, weight, bias, eps, out_dtype=None):
    b, _length, c = x.shape
    rows = ((h + 1) // 2) * ((w + 1) // 2)
    stat = x.new_empty((b, rows), dtype=_ext.stat_dtype(x))
    return x.new_empty((b, rows, 4 * c), dtype=out_dtype or x.dtype), stat, torch.empty_like(stat)


def _fake_backward(grad_out, x, h, w, weight, mean, rstd, grad_after=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, h, w, weight, _bias, _eps, _out_dtype = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.grid = (h, w)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(mean.shape + (4 * x.shape[-1],))
    dx, dw, db = torch.ops.hifuse.patch_merge_norm_backward(grad_out, x, *ctx.grid, weight, mean, rstd)
    return dx, None, None, dw, db, None, None


_ext.register_python_parts(OP, _fake_forward, _fake_backward, _backward, _setup_context)


class _HandOn(torch.autograd.Function):
    """The op, also returning x (its storage, no copy) for x's next reader: backward adds that
    reader's gradient of x in the kernel that writes x's, where autograd would sum the two in
    a pass of their own."""

    @staticmethod
    def forward(ctx, x, h, w, weight, bias, eps, out_dtype):
        out, mean, rstd = torch.ops.hifuse.patch_merge_norm(x, h, w, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.grid = (h, w)
        ctx.set_materialize_grads(False)
        return out, x.detach()

    @staticmethod
    def backward(ctx, grad_out, grad_after):
        if grad_out is None:
            return grad_after, None, None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.hifuse.patch_merge_norm_backward(grad_out, x, *ctx.grid, weight, mean, rstd, grad_after)
        return dx, None, None, dw, db, None, None


def patch_merge_norm(x: torch.Tensor, h: int, w: int, weight: torch.Tensor, bias: torch.Tensor,
                     eps: float = 1e-5, out_dtype: torch.dtype | None = None, check: bool = True,
                     chain: bool = False):
    """2x2 patch gather (zero-padded odd sides) of (B, h*w, C) tokens and LayerNorm over the 4C.

    The result is in x's dtype, or ``out_dtype`` (x's, or bfloat16/float16 for float32 x):
    PatchMerging asks for its reduction GEMM's dtype under autocast, so no cast pass follows.
    ``check`` False skips the argument checks, for callers that made them once already.
    ``chain``: (the result, x for its next reader), whose gradient of x the backward kernel
    adds to its own.

    Raises:
        ImportError: the compiled extension is missing.
        TypeError, ValueError: unsupported dtypes, mismatched shapes or devices.
    """
    if check:
        _ext.require(OP)
        problem = _argument_problem(x, h, w, weight, bias)
        if problem is not None:
            raise problem[0](f"patch_merge_norm: {problem[1]}")
        if out_dtype not in (None, x.dtype) and not (x.dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float16)):
            raise TypeError(f"patch_merge_norm: out_dtype must be x's dtype, or bfloat16/float16 for float32 x; got {out_dtype}")
    if chain:
        return _HandOn.apply(x, int(h), int(w), weight, bias, float(eps), out_dtype)
    out, _mean, _rstd = torch.ops.hifuse.patch_merge_norm(x, int(h), int(w), weight, bias, float(eps), out_dtype)
    return out
