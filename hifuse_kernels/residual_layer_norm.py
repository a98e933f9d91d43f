"""The global blocks' residual output and the next block's LayerNorm in one Triton pass.

A global block ends with ``out = x + gelu(y)``; the next block starts with
``norm1(out)``, which under autocast writes an fp32 result that its qkv GEMM then casts
to bf16. Here one pass over the rows writes ``out`` (the residual stream) and the
normalised rows directly in the GEMM's dtype: the stream is not read back, and neither
the fp32 normalised copy nor the cast exists. Without the ``gelu(y)`` prologue the same
kernel is a LayerNorm that writes the dtype its consumer wants (the first block of a stage),
and can write its rows in the order of a k x k / k patch GEMM's input (the local
downsamples: no gather copy after it, none of the gradient before its backward).

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
from ._triton import ONES_PAD, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024
# The backward holds several tiles and its loop's partial sums: rows for eight tiles keep it
# within the registers triton 3.6 gives 8-warp programs (64), where four spilled at 256 channels.
BWD_TILES = 8
# Rebuilding the normalised rows as well holds more: rows for ten tiles (8 B spilled at 256
# channels with eight, triton 3.6).
REBUILD_TILES = 10

__all__ = ["gelu_residual_layer_norm", "gelu_residual_layer_norm_ref", "layer_norm_to", "unsupported_reason"]


def gelu_residual_layer_norm_ref(y, shortcut, weight, bias, eps: float, norm_dtype: torch.dtype):
    """(shortcut + gelu(y), LayerNorm of that in norm_dtype), as eager computes them."""
    out = shortcut + F.gelu(y)
    return out, F.layer_norm(out, (out.shape[-1],), weight, bias, eps).to(norm_dtype)


if triton is not None:
    from ._triton import gelu, gelu_grad, ones_column

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
    def _normed_rows(rows, M, H, WIDTH, PATCH: tl.constexpr):
        """Where row r of the (B, H, W) rows goes in the normalised output, and whether it goes
        at all: its place in the (B, H/k, W/k, k, k) patches of a k x k / k convolution (k =
        PATCH), which drops the last rows and columns that fill no window."""
        w = rows % WIDTH
        h = (rows // WIDTH) % H
        b = rows // (WIDTH * H)
        ho, wo = H // PATCH, WIDTH // PATCH
        keep = (rows < M) & (h < ho * PATCH) & (w < wo * PATCH)
        out = ((b * ho + h // PATCH) * wo + w // PATCH) * (PATCH * PATCH) + (h % PATCH) * PATCH + w % PATCH
        return out, keep

    @triton.jit
    def _stream(Y, S, offs, m, PROLOGUE: tl.constexpr):
        """The residual stream of a tile in fp32: shortcut + gelu(y), or x itself."""
        x = tl.load(S + offs, mask=m, other=0.0).to(tl.float32)
        if PROLOGUE:
            x += gelu(tl.load(Y + offs, mask=m, other=0.0).to(tl.float32))
        return x

    @_triton.kernel
    def _fwd_kernel(Y, S, W, B, OUT, NORMED, MEAN, RSTD, M, C, H, WIDTH, eps,
                    PROLOGUE: tl.constexpr, PATCH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                    PAD: tl.constexpr = 0):
        """PAD > 0 (PATCH 1): the normalised rows are C + PAD wide, column C ones and the rest
        zeros, so that a weight-gradient GEMM over them also gives the bias gradient."""
        rows, c, cmask, m, offs = _rows(M, C, BLOCK_M, BLOCK_C)
        x = _stream(Y, S, offs, m, PROLOGUE)
        if PROLOGUE:
            tl.store(OUT + offs, x.to(OUT.dtype.element_ty), mask=m)
        mean = tl.sum(x, 1) / C
        d = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        normed = tl.fma(d * rstd[:, None], w[None, :], b[None, :]).to(NORMED.dtype.element_ty)
        if PAD > 0:
            at = NORMED + rows[:, None] * (C + PAD)
            tl.store(at + c[None, :], normed, mask=m)
            ones_column(at, C, rows < M, PAD)
        elif PATCH == 1:
            tl.store(NORMED + offs, normed, mask=m)
        else:
            out, keep = _normed_rows(rows, M, H, WIDTH, PATCH)
            tl.store(NORMED + out[:, None] * C + c[None, :], normed, mask=keep[:, None] & cmask[None, :])
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _bwd_kernel(DOUT, DNORMED, Y, S, W, MEAN, RSTD, DY, DS, PART_W, PART_B, B, NORMED, M, C, H, WIDTH, PROGRAMS,
                    PROLOGUE: tl.constexpr, HAS_DOUT: tl.constexpr, PATCH: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_C: tl.constexpr, REBUILD: tl.constexpr = False, PAD: tl.constexpr = 0):
        """On a fixed grid (``_triton.reduction_programs``): each program loops over row tiles
        pid, pid + PROGRAMS, ... and writes one row of weight and bias partials, accumulated
        as tiles and reduced over the rows once at the end (not across the tile per iteration).
        With REBUILD (PATCH 1) it also writes the normalised rows to NORMED as ``_fwd_kernel``
        computes them (the same bits; PAD as there), for a weight-gradient GEMM that reads them
        next: the pass that would rebuild them reads what this one reads."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        acc_w = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        if REBUILD:
            w_n = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
            b_n = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        for t in range(pid, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows, _c, _cmask, m, offs = _rows_at(t, M, C, BLOCK_M, BLOCK_C)
            x = _stream(Y, S, offs, m, PROLOGUE)
            mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
            xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
            if PATCH == 1:
                g = tl.load(DNORMED + offs, mask=m, other=0.0).to(tl.float32)
            else:  # read where the patches put the row; a dropped row's gradient is zero
                out, keep = _normed_rows(rows, M, H, WIDTH, PATCH)
                g = tl.load(DNORMED + out[:, None] * C + _c[None, :], mask=keep[:, None] & _cmask[None, :],
                            other=0.0).to(tl.float32)
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
            if REBUILD:  # (x - mean) * rstd * w + b, as _fwd_kernel forms it (rows C + PAD wide)
                normed = tl.fma(xhat, w_n[None, :], b_n[None, :]).to(NORMED.dtype.element_ty)
                tl.store(NORMED + offs + (rows * PAD)[:, None], normed, mask=m)
                if PAD > 0:
                    ones_column(NORMED + (rows * (C + PAD))[:, None], C, rows < M, PAD)
        part = pid.to(tl.int64) * C + c
        tl.store(PART_W + part, tl.sum(acc_w, 0), mask=cmask)
        tl.store(PART_B + part, tl.sum(acc_b, 0), mask=cmask)



def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _normed_count(m: int, patch: int, height: int, width: int) -> int:
    """Rows of the normalised output: m, or those that fill a patch window."""
    if patch == 1:
        return m
    return (m // (height * width)) * (height // patch * patch) * (width // patch * patch)


@_triton.define_op("hifuse::residual_layer_norm", mutates_args=())
def _fwd_op(
    y: torch.Tensor | None, shortcut: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    norm_dtype: torch.dtype, patch: int = 1, height: int = 1, width: int = 1, ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, normed, mean, rstd). ``patch`` > 1 (no prologue; shortcut (B*height*width, C)
    rows): normed holds the rows in the order of the (B, height/k, width/k, k, k) patches of a
    k x k / k convolution (as ``patch_conv`` gathers them), the rows no window takes left out.
    ``ones`` (patch 1): normed is (M, C + ONES_PAD), column C ones and the rest zeros (see
    ``_triton.ones_column``)."""
    if ones and patch != 1:
        raise ValueError("residual_layer_norm: ones takes patch 1")
    m, c = shortcut.shape
    prologue = y is not None
    out = _empty(shortcut)
    if prologue:
        out = torch.empty((m, c), device=shortcut.device, dtype=torch.promote_types(y.dtype, shortcut.dtype))
    pad = ONES_PAD if ones else 0
    normed = torch.empty((_normed_count(m, patch, height, width), c + pad), device=shortcut.device, dtype=norm_dtype)
    mean = torch.empty((m,), device=shortcut.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m = _triton.rows_per_program(c)
    _triton.wrap_triton(_fwd_kernel)[(triton.cdiv(m, block_m),)](
        y if prologue else shortcut, shortcut, weight, bias, out, normed, mean, rstd, m, c, height, width, eps,
        PROLOGUE=prologue, PATCH=patch, BLOCK_M=block_m, PAD=pad, **_triton.row_tile(c, block_m),
    )
    return out, normed, mean, rstd


@_triton.define_op("hifuse::residual_layer_norm_backward", mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor | None, grad_normed: torch.Tensor, y: torch.Tensor | None, shortcut: torch.Tensor,
    weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, patch: int = 1, height: int = 1, width: int = 1,
    bias: torch.Tensor | None = None, rebuild_dtype: torch.dtype | None = None, ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y's and the stream's gradients, the weight's and bias's as one (2, C) float32 tensor
    (one sum of the partials; ``backward`` splits it), and with ``rebuild_dtype`` (patch 1; else
    empty) the forward's normalised rows in that dtype (``ones``: with the ones column), the
    same bits, written by this pass (``bias``: the LayerNorm's, which they need)."""
    m, c = shortcut.shape
    prologue = y is not None
    rebuild = rebuild_dtype is not None
    if rebuild and (patch != 1 or bias is None):
        raise ValueError("residual_layer_norm_backward: rebuilding the rows takes patch 1 and the bias")
    block_m = _triton.rows_per_program(c, REBUILD_TILES if rebuild else BWD_TILES)
    tile = _triton.row_tile(c, block_m)
    pad = ONES_PAD if ones and rebuild else 0
    flags = dict(PROLOGUE=prologue, HAS_DOUT=grad_out is not None, PATCH=patch, BLOCK_M=block_m, REBUILD=rebuild,
                 PAD=pad, **tile)
    dy_dtype = y.dtype if prologue else shortcut.dtype
    normed = torch.empty((m, c + pad) if rebuild else (0,), device=shortcut.device, dtype=rebuild_dtype or weight.dtype)
    bias = weight if bias is None else bias
    programs = _triton.reduction_programs(triton.cdiv(m, block_m), 1, shortcut.device, kernel=_bwd_kernel, launch=flags,
                                          args=(grad_normed if grad_out is None else grad_out, grad_normed,
                                                y if prologue else shortcut, shortcut, weight, mean, rstd, dy_dtype,
                                                shortcut.dtype, torch.float32, torch.float32, bias, normed, m, c,
                                                height, width, 2))
    ds = torch.empty_like(shortcut)
    dy = torch.empty_like(y) if prologue else _empty(shortcut)
    part = torch.empty((2, programs, c), device=shortcut.device, dtype=torch.float32)
    _triton.wrap_triton(_bwd_kernel)[(programs,)](
        grad_normed if grad_out is None else grad_out, grad_normed, y if prologue else shortcut, shortcut, weight,
        mean, rstd, dy, ds, part[0], part[1], bias, normed, m, c, height, width, programs,
        **flags,
    )
    return dy, ds, part.sum(1), normed


def backward(grad_out, grad_normed, y, shortcut, weight, mean, rstd, patch: int = 1, height: int = 1,
             width: int = 1, bias=None, rebuild_dtype=None, ones: bool = False) -> tuple:
    """(dy, dstream, dweight, dbias) of ``hifuse::residual_layer_norm``, the last two in the
    weight's dtype; with ``rebuild_dtype``, and the normalised rows (see the op)."""
    dy, ds, params, normed = torch.ops.hifuse.residual_layer_norm_backward(
        grad_out, grad_normed, y, shortcut, weight, mean, rstd, patch, height, width, bias, rebuild_dtype, ones)
    params = params.to(weight.dtype)
    return (dy, ds, params[0], params[1]) + ((normed,) if rebuild_dtype is not None else ())


@_fwd_op.register_fake
def _(y, shortcut, weight, bias, eps, norm_dtype, patch=1, height=1, width=1, ones=False):
    m, c = shortcut.shape
    out = _empty(shortcut) if y is None else shortcut.new_empty((m, c), dtype=torch.promote_types(y.dtype, shortcut.dtype))
    stat = shortcut.new_empty((m,), dtype=torch.float32)
    rows = _normed_count(m, patch, height, width)
    normed = shortcut.new_empty((rows, c + (ONES_PAD if ones else 0)), dtype=norm_dtype)
    return out, normed, stat, torch.empty_like(stat)


@_bwd_op.register_fake
def _(grad_out, grad_normed, y, shortcut, weight, mean, rstd, patch=1, height=1, width=1, bias=None,
      rebuild_dtype=None, ones=False):
    dy = torch.empty_like(y) if y is not None else _empty(shortcut)
    m, c = shortcut.shape
    rows = (m, c + (ONES_PAD if ones else 0)) if rebuild_dtype is not None else (0,)
    normed = shortcut.new_empty(rows, dtype=rebuild_dtype or weight.dtype)
    return dy, torch.empty_like(shortcut), weight.new_empty((2, weight.shape[0]), dtype=torch.float32), normed


def _setup_context(ctx, inputs, output):
    y, shortcut, weight, _bias, _eps, _norm_dtype, *geometry = inputs
    _out, normed, mean, rstd = output
    ctx.save_for_backward(y, shortcut, weight, mean, rstd)
    ctx.has_y = y is not None
    ctx.normed = (normed.shape[:-1] + shortcut.shape[-1:], normed.dtype)
    ctx.padded = normed.shape[-1] != shortcut.shape[-1]  # the ones column: no gradient
    ctx.geometry = tuple(geometry[:3])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _backward(ctx, grad_out, grad_normed, _gm, _gr):
    y, shortcut, weight, mean, rstd = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros(ctx.normed[0], device=shortcut.device, dtype=ctx.normed[1])
    elif ctx.padded:
        grad_normed = grad_normed[:, : shortcut.shape[-1]]
    if not ctx.has_y:
        grad_out = None
    dy, ds, dw, db = backward(None if grad_out is None else grad_out.contiguous(), grad_normed.contiguous(), y,
                              shortcut, weight, mean, rstd, *ctx.geometry)
    return (dy if ctx.has_y else None), ds, dw, db, None, None, *[None] * (len(ctx.geometry) + 1)


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


class _LayerNormHandOn(torch.autograd.Function):
    """The op without prologue, also returning its input (its storage, no copy) for the
    input's next reader: backward adds that reader's gradient of it on load, where autograd
    would sum the two gradients in a pass of their own."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, dtype, *geometry):
        _out, normed, mean, rstd = torch.ops.hifuse.residual_layer_norm(None, x, weight, bias, eps, dtype, *geometry)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.geometry = geometry
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        return normed, x.detach()

    @staticmethod
    def backward(ctx, grad_normed, grad_after):
        if grad_normed is None:
            return grad_after, None, None, None, None, *[None] * len(ctx.geometry)
        x, weight, mean, rstd = ctx.saved_tensors
        _dy, dx, dw, db = backward(None if grad_after is None else grad_after.contiguous(), grad_normed.contiguous(),
                                   None, x, weight, mean, rstd, *ctx.geometry)
        return dx, dw, db, None, None, *[None] * len(ctx.geometry)


def layer_norm_to(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dtype: torch.dtype, check: bool = True,
    patch: int = 1, chain: bool = False,
):
    """``F.layer_norm`` over the last dim, computed in fp32 and written in ``dtype`` (``check``:
    as in ``gelu_residual_layer_norm``). ``patch`` k > 1: x is (B, H, W, C) and the result
    comes as the (B, H/k, W/k, k*k*C) patches a k x k / k convolution reads (``patch_conv``'s
    gather, never written apart). ``chain``: (that, x for its next reader), whose gradient of
    x the LayerNorm backward adds on load."""
    if check:
        _check(x, weight)
        if patch > 1 and (x.dim() != 4 or x.shape[1] < patch or x.shape[2] < patch):
            raise ValueError(f"residual_layer_norm: patches of {patch} need (B, H, W, C) x of at least that size")
    c = x.shape[-1]
    geometry = () if patch == 1 else (int(patch), int(x.shape[1]), int(x.shape[2]))
    rows = x.reshape(-1, c).contiguous()
    if chain:
        normed, after = _LayerNormHandOn.apply(rows, weight, bias, float(eps), dtype, *geometry)
    else:
        _out, normed, _mean, _rstd = torch.ops.hifuse.residual_layer_norm(None, rows, weight, bias, float(eps), dtype,
                                                                          *geometry)
    if patch == 1:
        normed = normed.view(x.shape)
    else:
        b, h, w, _ = x.shape
        normed = normed.view(b, h // patch, w // patch, patch * patch * c)
    return (normed, after.view(x.shape)) if chain else normed
