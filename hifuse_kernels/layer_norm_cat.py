"""Channels-first LayerNorm over a concatenation along C, without building it, native.

The fusion block normalises torch.cat([a, b(, c)], 1) (norm1, norm2): eager writes the
concatenation, then runs the five-kernel channels-first LayerNorm on it. This op reads
the parts where they are and writes the normalised concatenation once; its backward
returns one gradient per part, so no gradient of the concatenation is split either.
It runs the kernels of ``hifuse::layer_norm_cf`` (csrc/layer_norm_cf.cpp, .cu), for which
a plain tensor is a one-part concatenation, so the two ops give identical results.

Layers: reference, capability check, registered op (schema in C++; fake and autograd here),
functional entry point. Its user is the fused ``HFFBlock`` (``hifuse.fused.fusion_block``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ext
from .layer_norm_cf import _argument_problem
from .reference import layer_norm_cf_ref

OP = "layer_norm_cat"
MAX_PARTS = 3

__all__ = ["layer_norm_cat", "layer_norm_cat_ref", "unsupported_reason"]


def layer_norm_cat_ref(parts: Sequence[torch.Tensor], weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """What the eager fusion block computes: the channels-first LayerNorm of torch.cat(parts, 1)."""
    return layer_norm_cf_ref(torch.cat(list(parts), 1), weight, bias, eps)


def _parts_problem(parts, weight, bias) -> tuple[type[Exception], str] | None:
    if not isinstance(parts, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in parts):
        return TypeError, "parts must be a list of tensors"
    if not 1 <= len(parts) <= MAX_PARTS:
        return ValueError, f"takes 1 to {MAX_PARTS} parts, got {len(parts)}"
    first = parts[0]
    for t in parts:
        if t.dim() != 4:
            return ValueError, f"every part must be 4-D (N, C, H, W), got shape {tuple(t.shape)}"
        if (t.shape[0], t.shape[2], t.shape[3]) != (first.shape[0], first.shape[2], first.shape[3]):
            return ValueError, f"parts must share N, H and W, got {tuple(first.shape)} and {tuple(t.shape)}"
        if t.dtype != first.dtype:
            return TypeError, f"parts must share a dtype, got {first.dtype} and {t.dtype}"
        if t.device != first.device:
            return ValueError, f"parts must be on one device, got {first.device} and {t.device}"
        if t.shape[1] == 0:
            return ValueError, "a part has no channels"
    whole = torch.empty((0, sum(t.shape[1] for t in parts), 1, 1), dtype=first.dtype, device=first.device)
    return _argument_problem(whole, weight, bias)


def unsupported_reason(parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why the native op cannot take these inputs, or None when it can."""
    if not parts or not isinstance(parts[0], torch.Tensor):
        return "parts must be a non-empty list of tensors"
    reason = _ext.unsupported_device_reason(OP, parts[0].device.type)
    if reason is not None:
        return reason
    problem = _parts_problem(parts, weight, weight if bias is None else bias)
    return None if problem is None else problem[1]


def _format(parts) -> torch.memory_format:
    cl = any(not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last) for t in parts)
    return torch.channels_last if cl else torch.contiguous_format


def out_dtype_of(parts, weight, out_dtype: torch.dtype | None) -> torch.dtype:
    """The op's out_dtype argument: the eager formula's promote(parts, weight) when None."""
    return torch.promote_types(parts[0].dtype, weight.dtype) if out_dtype is None else out_dtype


def _fake_forward(parts, weight, bias, eps, out_dtype):
    first = parts[0]
    shape = (first.shape[0], sum(t.shape[1] for t in parts), first.shape[2], first.shape[3])
    out = first.new_empty(shape, dtype=out_dtype).contiguous(
        memory_format=_format(parts)
    )
    stat = first.new_empty((first.shape[0], first.shape[2], first.shape[3]), dtype=_ext.stat_dtype(first))
    return out, stat, torch.empty_like(stat)


def _fake_backward(grad_out, parts, weight, mean, rstd):
    fmt = _format(parts)
    return [torch.empty_like(t, memory_format=fmt) for t in parts], torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    parts, weight, _bias, _eps, _out_dtype = inputs
    out, mean, rstd = output
    ctx.num_parts = len(parts)
    ctx.out_dtype = out.dtype
    ctx.save_for_backward(*parts, weight, mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    # mean and rstd are saved statistics, not differentiable outputs: their grads are ignored.
    saved = ctx.saved_tensors
    parts, (weight, mean, rstd) = list(saved[: ctx.num_parts]), saved[ctx.num_parts :]
    if grad_out is None:
        first = parts[0]
        shape = (first.shape[0], sum(t.shape[1] for t in parts), first.shape[2], first.shape[3])
        grad_out = first.new_zeros(shape, dtype=ctx.out_dtype)
    dparts, dw, db = torch.ops.hifuse.layer_norm_cat_backward(grad_out, parts, weight, mean, rstd)
    return list(dparts), dw, db, None, None


_ext.register_python_parts(OP, _fake_forward, _fake_backward, _backward, _setup_context)


def layer_norm_cat(
    parts: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    check: bool = True,
) -> torch.Tensor:
    """LayerNorm over dim 1 of torch.cat(parts, 1), for 1 to 3 (N, C_k, H, W) parts.

    The parts may be NCHW or channels-last; the result is channels-last when a part is.
    Its dtype is promote(parts, weight), as in the eager formula, or ``out_dtype`` (the
    parts' dtype or float32): the fused fusion block asks for the dtype of the GEMM that
    consumes the result, so no cast pass follows. ``check`` False skips the argument checks,
    for callers that made them once already.

    Raises:
        ImportError: the compiled extension is missing.
        TypeError: arguments that are not tensors, or unsupported dtypes.
        ValueError: mismatched shapes or devices, or a wrong number of parts.
    """
    if check:
        _ext.require(OP)
        problem = _parts_problem(parts, weight, bias)
        if problem is not None:
            raise problem[0](f"layer_norm_cat: {problem[1]}")
        if out_dtype is not None and out_dtype not in (parts[0].dtype, torch.float32):
            raise TypeError(f"layer_norm_cat: out_dtype must be the parts' dtype or float32, got {out_dtype}")
    out, _mean, _rstd = torch.ops.hifuse.layer_norm_cat(list(parts), weight, bias, float(eps),
                                                        out_dtype_of(parts, weight, out_dtype))
    return out
