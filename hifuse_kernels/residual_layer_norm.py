"""The global blocks' residual output and the next block's LayerNorm in one Triton pass.

A global block ends with ``out = x + gelu(y)``; the next block starts with
``norm1(out)``, which under autocast writes an fp32 result that its qkv GEMM then casts
to bf16. Here one pass over the rows writes ``out`` (the residual stream) and the
normalised rows directly in the GEMM's dtype: the stream is not read back, and neither
the fp32 normalised copy nor the cast exists. Without the ``gelu(y)`` prologue the same
kernel is a LayerNorm that writes the dtype its consumer wants (the first block of a stage).

The normalised values are those of the eager path: the LayerNorm is computed in fp32 on
the fp32 stream and rounded once, to the dtype autocast would have cast it to.

Backward takes the gradients of both outputs: the LayerNorm backward is added to the
stream's gradient, then multiplied by gelu'(y) for y. Weight and bias gradients are
per-program partial sums added in a fixed order.

Layers: reference, kernels, registered ops, autograd, functional entry points. Used by
the fused ``GlobalStage`` and ``GlobalBlock`` (``hifuse.fused.global_branch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _triton
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024
# The backward holds several tiles and its loop's partial sums: rows for eight tiles keep it
# within the registers triton 3.6 gives 8-warp programs (64), where four spilled at 256 channels.
BWD_TILES = 8

__all__ = ["gelu_residual_layer_norm", "gelu_residual_layer_norm_ref", "layer_norm_to", "unsupported_reason"]


def gelu_residual_layer_norm_ref(y, shortcut, weight, bias, eps: float, norm_dtype: torch.dtype):
    """(shortcut + gelu(y), LayerNorm of that in norm_dtype), as eager computes them."""
    out = shortcut + F.gelu(y)
    return out, F.layer_norm(out, (out.shape[-1],), weight, bias, eps).to(norm_dtype)


if triton is not None:
    from ._triton import gelu, gelu_grad

    @triton.jit
    def _rows(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        return _rows_at(tl.program_id(0), M, C, BLOCK_M, BLOCK_C)

    @triton.jit
    def _rows_at(t, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Row tile t: its rows (int64), channels, masks and element offsets."""
        rows = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        m = (rows < M)[:, None] & cmask[None, :]
        return rows, c, cmask, m, rows[:, None] * C + c[None, :]

    @triton.jit
    def _stream(Y, S, offs, m, PROLOGUE: tl.constexpr):
        """The residual stream of a tile in fp32: shortcut + gelu(y), or x itself."""
        x = tl.load(S + offs, mask=m, other=0.0).to(tl.float32)
        if PROLOGUE:
            x += gelu(tl.load(Y + offs, mask=m, other=0.0).to(tl.float32))
        return x

    @triton.jit
    def _fwd_kernel(Y, S, W, B, OUT, NORMED, MEAN, RSTD, M, C, eps,
                    PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows, c, cmask, m, offs = _rows(M, C, BLOCK_M, BLOCK_C)
        x = _stream(Y, S, offs, m, PROLOGUE)
        if PROLOGUE:
            tl.store(OUT + offs, x.to(OUT.dtype.element_ty), mask=m)
        mean = tl.sum(x, 1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        tl.store(NORMED + offs, (d * rstd[:, None] * w[None, :] + b[None, :]).to(NORMED.dtype.element_ty), mask=m)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)

    @triton.jit(do_not_specialize=["PROGRAMS"])
    def _bwd_kernel(DOUT, DNORMED, Y, S, W, MEAN, RSTD, DY, DS, PART_W, PART_B, M, C, PROGRAMS,
                    PROLOGUE: tl.constexpr, HAS_DOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """On a fixed grid (``_triton.reduction_programs``): each program loops over row tiles
        pid, pid + PROGRAMS, ... and writes one row of weight and bias partials, accumulated
        as tiles and reduced over the rows once at the end (not across the tile per iteration)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        acc_w = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for t in range(pid, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows, _c, _cmask, m, offs = _rows_at(t, M, C, BLOCK_M, BLOCK_C)
            x = _stream(Y, S, offs, m, PROLOGUE)
            mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
            xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            g = tl.load(DNORMED + offs, mask=m, other=0.0).to(tl.float32)
            gw = g * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            a = tl.sum(gw, 1) / C
            bb = tl.sum(gw * xhat, 1) / C
            dx = rstd[:, None] * (gw - a[:, None] - xhat * bb[:, None])
            if HAS_DOUT:
                dx += tl.load(DOUT + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(DS + offs, dx.to(DS.dtype.element_ty), mask=m)
            if PROLOGUE:
                y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
                tl.store(DY + offs, (dx * gelu_grad(y)).to(DY.dtype.element_ty), mask=m)
            acc_w += g * xhat
            acc_b += g
        part = pid.to(tl.int64) * C + c
        tl.store(PART_W + part, tl.sum(acc_w, 0), mask=cmask)
        tl.store(PART_B + part, tl.sum(acc_b, 0), mask=cmask)



def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


@_triton.define_op("hifuse::residual_layer_norm", mutates_args=())
def _fwd_op(
    y: torch.Tensor | None, shortcut: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    norm_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, c = shortcut.shape
    prologue = y is not None
    out = _empty(shortcut)
    if prologue:
        out = torch.empty((m, c), device=shortcut.device, dtype=torch.promote_types(y.dtype, shortcut.dtype))
    normed = torch.empty((m, c), device=shortcut.device, dtype=norm_dtype)
    mean = torch.empty((m,), device=shortcut.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m = _triton.rows_per_program(c)
    _triton.wrap_triton(_fwd_kernel)[(triton.cdiv(m, block_m),)](
        y if prologue else shortcut, shortcut, weight, bias, out, normed, mean, rstd, m, c, eps,
        PROLOGUE=prologue, BLOCK_M=block_m, **_triton.row_tile(c, block_m),
    )
    return out, normed, mean, rstd


@_triton.define_op("hifuse::residual_layer_norm_backward", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor | None, grad_normed: torch.Tensor, y: torch.Tensor | None, shortcut: torch.Tensor,
    weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    m, c = shortcut.shape
    prologue = y is not None
    block_m = _triton.rows_per_program(c, BWD_TILES)
    tile = _triton.row_tile(c, block_m)
    flags = dict(PROLOGUE=prologue, HAS_DOUT=grad_out is not None, BLOCK_M=block_m, **tile)
    dy_dtype = y.dtype if prologue else shortcut.dtype
    programs = _triton.reduction_programs(triton.cdiv(m, block_m), 1, shortcut.device, kernel=_bwd_kernel, launch=flags,
                                          args=(grad_normed if grad_out is None else grad_out, grad_normed,
                                                y if prologue else shortcut, shortcut, weight, mean, rstd, dy_dtype,
                                                shortcut.dtype, torch.float32, torch.float32, m, c, 2))
    ds = torch.empty_like(shortcut)
    dy = torch.empty_like(y) if prologue else _empty(shortcut)
    part_w = torch.empty((programs, c), device=shortcut.device, dtype=torch.float32)
    part_b = torch.empty_like(part_w)
    _triton.wrap_triton(_bwd_kernel)[(programs,)](
        grad_normed if grad_out is None else grad_out, grad_normed, y if prologue else shortcut, shortcut, weight,
        mean, rstd, dy, ds, part_w, part_b, m, c, programs,
        **flags,
    )
    return dy, ds, part_w.sum(0).to(weight.dtype), part_b.sum(0).to(weight.dtype)


@_fwd_op.register_fake
def _(y, shortcut, weight, bias, eps, norm_dtype):
    m, c = shortcut.shape
    out = _empty(shortcut) if y is None else shortcut.new_empty((m, c), dtype=torch.promote_types(y.dtype, shortcut.dtype))
    stat = shortcut.new_empty((m,), dtype=torch.float32)
    return out, shortcut.new_empty((m, c), dtype=norm_dtype), stat, torch.empty_like(stat)


@_bwd_op.register_fake
def _(grad_out, grad_normed, y, shortcut, weight, mean, rstd):
    dy = torch.empty_like(y) if y is not None else _empty(shortcut)
    return dy, torch.empty_like(shortcut), torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    y, shortcut, weight, _bias, _eps, _norm_dtype = inputs
    _out, normed, mean, rstd = output
    ctx.save_for_backward(y, shortcut, weight, mean, rstd)
    ctx.has_y = y is not None
    ctx.normed_dtype = normed.dtype
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_out, grad_normed, _gm, _gr):
    y, shortcut, weight, mean, rstd = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros(shortcut.shape, device=shortcut.device, dtype=ctx.normed_dtype)
    if not ctx.has_y:
        grad_out = None
    dy, ds, dw, db = torch.ops.hifuse.residual_layer_norm_backward(
        None if grad_out is None else grad_out.contiguous(), grad_normed.contiguous(), y, shortcut, weight, mean, rstd
    )
    return (dy if ctx.has_y else None), ds, dw, db, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> str | None:
    """Why the kernels cannot take a (..., C) stream x (and y) with LayerNorm weight, or None."""
    for t in (x, *others):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported"
        if t.shape != x.shape:
            return f"shapes {tuple(x.shape)} and {tuple(t.shape)} differ"
    c = x.shape[-1]
    if c > MAX_CHANNELS:
        return f"C = {c} is more than the {MAX_CHANNELS} supported"
    if weight.shape != (c,) or weight.dtype not in SUPPORTED_DTYPES:
        return f"LayerNorm weight must be ({c},) in a supported dtype"
    return _triton.unsupported_reason(x, weight, *others)


def _check(x, weight, *others) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (x, weight, *others)):
        raise TypeError("residual_layer_norm: arguments must be tensors")
    reason = unsupported_reason(x, weight, *others)
    if reason is not None:
        raise ValueError(f"residual_layer_norm: {reason}")


def gelu_residual_layer_norm(
    y: torch.Tensor, shortcut: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    norm_dtype: torch.dtype, check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = shortcut + gelu(y)`` and ``layer_norm(out)`` in ``norm_dtype``, one pass.

    y and shortcut are (..., C) of one shape; out has dtype promote(y, shortcut). ``check``
    False skips the argument checks, for callers that made them once already.
    """
    if check:
        _check(shortcut, weight, y)
    shape = shortcut.shape
    c = shape[-1]
    out, normed, _mean, _rstd = torch.ops.hifuse.residual_layer_norm(
        y.reshape(-1, c).contiguous(), shortcut.reshape(-1, c).contiguous(), weight, bias, float(eps), norm_dtype
    )
    return out.view(shape), normed.view(shape)


def layer_norm_to(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype, check: bool = True
) -> torch.Tensor:
    """``F.layer_norm`` over the last dim, computed in fp32 and written in ``dtype`` (``check``:
    as in ``gelu_residual_layer_norm``)."""
    if check:
        _check(x, weight)
    c = x.shape[-1]
    _out, normed, _mean, _rstd = torch.ops.hifuse.residual_layer_norm(
        None, x.reshape(-1, c).contiguous(), weight, bias, float(eps), dtype
    )
    return normed.view(x.shape)
