"""Channels-first LayerNorm as one native op (C++ on CPU, CUDA on GPU).

The eager model normalises (N, C, H, W) over C with five elementwise kernels and
keeps their intermediates for backward. The native op reads x once for the
statistics and once to write the output, saves only per-position mean and rstd
(fp32, or fp64 for fp64 input) and computes the input, weight and bias gradients
in one backward op. NCHW and channels-last inputs are both taken as they are.
The output dtype is promote(x, weight), as in the eager formula.

Layers: reference, capability check, registered op (schema in csrc/layer_norm_cf.cpp,
fake and autograd here), functional entry point. The module using it is
``hifuse.layers.LayerNormCF`` (through ``hifuse.fused.local_branch``).
"""

from __future__ import annotations

import torch

from . import _ext
from .reference import layer_norm_cf_ref

OP = "layer_norm_cf"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

__all__ = ["layer_norm_cf", "layer_norm_cf_ref", "unsupported_reason"]


def _argument_problem(x, weight, bias) -> tuple[type[Exception], str] | None:
    """The error bad arguments deserve, or None. Checked in Python so that bad input
    never reaches the C++ checks, which are only the last line of defence."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a tensor, got {type(t).__name__}"
    if x.dim() != 4:
        return ValueError, f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}"
    c = x.shape[1]
    if weight.shape != (c,) or bias.shape != (c,):
        return ValueError, (
            f"weight and bias must be 1-D with C = {c} entries, got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"x must be float32, float64, float16 or bfloat16, got {x.dtype}"
    if weight.dtype != bias.dtype or weight.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"weight and bias must share a floating dtype, got {weight.dtype} and {bias.dtype}"
    out = torch.promote_types(x.dtype, weight.dtype)
    if out not in (x.dtype, torch.float32):
        return TypeError, f"x of {x.dtype} with weight of {weight.dtype} (result {out}) is not supported"
    if weight.device != x.device or bias.device != x.device:
        return ValueError, f"x, weight and bias must be on one device, got {x.device}, {weight.device}, {bias.device}"
    return None


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why the native op cannot take these inputs, or None when it can."""
    reason = _ext.unsupported_device_reason(OP, x.device.type)
    if reason is not None:
        return reason
    problem = _argument_problem(x, weight, weight if bias is None else bias)
    return None if problem is None else problem[1]


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _fake_forward(x, weight, bias, eps):
    torch._check(x.dim() == 4, lambda: f"hifuse::layer_norm_cf: x must be 4-D, got {x.dim()}-D")
    out = torch.empty_like(
        x, dtype=torch.promote_types(x.dtype, weight.dtype), memory_format=_memory_format(x)
    )
    stat = x.new_empty((x.shape[0], x.shape[2], x.shape[3]), dtype=_ext.stat_dtype(x))
    return out, stat, torch.empty_like(stat)


def _fake_backward(grad_out, x, weight, mean, rstd):
    dx = torch.empty_like(x, memory_format=_memory_format(x))
    return dx, torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    # mean and rstd are saved statistics, not differentiable outputs: their grads are ignored.
    x, weight, mean, rstd = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))
    dx, dw, db = torch.ops.hifuse.layer_norm_cf_backward(grad_out, x, weight, mean, rstd)
    return dx, dw, db, None


_ext.register_python_parts(OP, _fake_forward, _fake_backward, _backward, _setup_context)


def layer_norm_cf(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6, check: bool = True
) -> torch.Tensor:
    """LayerNorm over dim 1 of an (N, C, H, W) tensor (NCHW or channels-last memory).

    ``check`` False skips the argument checks, for callers that made them once already.

    Raises:
        ImportError: the compiled extension is missing.
        TypeError: arguments that are not tensors, or unsupported dtypes.
        ValueError: mismatched shapes or devices.
    """
    if check:
        _ext.require(OP)
        problem = _argument_problem(x, weight, bias)
        if problem is not None:
            raise problem[0](f"layer_norm_cf: {problem[1]}")
    out, _mean, _rstd = torch.ops.hifuse.layer_norm_cf(x, weight, bias, float(eps))
    return out
