"""Channel and spatial attention gating of the fusion block, channels-last, in Triton.

The eager fusion block pools g twice (adaptive max and average pooling), reduces l twice
over channels (amax, mean) and concatenates, multiplies g and l by their gates, then
concatenates [g * channel_gate, l * spatial_gate, X] and runs the five-kernel channels-first
LayerNorm (norm3) on it. Here:

- ``channel_pool``: one pass over g (N, S, C) gives the per-channel average and maximum
  (the channel attention input), with the first position of each maximum kept for backward.
- ``spatial_pool``: one pass over l (N, S, C) gives the per-position channel maximum and
  mean as the (N, 2, H, W) map the spatial attention convolution takes.
- ``gated_layer_norm``: the gate multiplications happen while loading, in the LayerNorm
  over the virtual concatenation: neither the gated tensors nor the 3C concatenation is
  ever written. Backward returns the gradients of g, l, X, both gates and the affine
  parameters; the channel-gate, weight and bias gradients are per-program partial sums
  added in a fixed order (programs never span two images), so reruns give identical bits.

The tiny parts in between (the shared SE MLP on (N, C), the 7x7 convolution on the
2-channel map, its BatchNorm and the sigmoids) stay PyTorch ops.

Tie rules follow eager: a channel's max-pool gradient goes to the first position holding the
maximum (as adaptive_max_pool2d does); a position's channel-max gradient is shared evenly
among the channels holding it (as amax does).

Layers: references, kernels, registered ops, autograd, functional entry points. The module
using them is ``hifuse.model.HFFBlock``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

from hifuse.layers import layer_norm_2d_eager

from . import _triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024
BLOCK_S = 32  # positions per step of the channel pooling loop
POOL_CHUNKS = 8  # position chunks per image and channel block in the channel pooling

__all__ = [
    "channel_pool",
    "channel_pool_ref",
    "gated_layer_norm",
    "gated_layer_norm_ref",
    "spatial_pool",
    "spatial_pool_ref",
    "unsupported_reason",
]


def channel_pool_ref(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, maximum) over positions of (N, C, H, W), each (N, C, 1, 1), as eager pools."""
    return F.adaptive_avg_pool2d(g, 1), F.adaptive_max_pool2d(g, 1)


def spatial_pool_ref(l: torch.Tensor) -> torch.Tensor:
    """The (N, 2, H, W) map [channel max, channel mean] of (N, C, H, W), as eager builds it."""
    return torch.cat([l.amax(dim=1, keepdim=True), l.mean(dim=1, keepdim=True)], 1)


def gated_layer_norm_ref(g, channel_gate, l, spatial_gate, x, weight, bias, eps: float = 1e-6):
    """norm3 of the eager block: LayerNorm2d(cat([g * channel_gate, l * spatial_gate, x], 1)).

    g, l, x: (N, C, H, W); channel_gate: (N, C, 1, 1); spatial_gate: (N, 1, H, W).
    """
    return layer_norm_2d_eager(torch.cat([g * channel_gate, l * spatial_gate, x], 1), weight, bias, eps)


if triton is not None:

    @triton.jit
    def _channel_pool_kernel(G, SUM, MAX, ARG, S, C, CHUNK, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        """Partial sum, maximum and first position of the maximum over one chunk of positions."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk = tl.program_id(2)
        cmask = c < C
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        best = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
        where = tl.zeros((BLOCK_C,), dtype=tl.int32)
        start = chunk * CHUNK
        stop = tl.minimum(start + CHUNK, S)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < stop)[:, None] & cmask[None, :]
            v = tl.load(G + (n * S + s.to(tl.int64))[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
            total += tl.sum(v, 0)
            v = tl.where(m, v, float("-inf"))
            tile_best, tile_where = tl.max(v, 0, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best  # strictly: the first position of a maximum wins
            where = tl.where(better, s0 + tile_where, where)
            best = tl.where(better, tile_best, best)
        part = (n * tl.num_programs(2) + chunk) * C + c
        tl.store(SUM + part, total, mask=cmask)
        tl.store(MAX + part, best, mask=cmask)
        tl.store(ARG + part, where, mask=cmask)

    @triton.jit
    def _channel_pool_bwd_kernel(D_AVG, D_MAX, ARG, DG, S, C, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        m = (s < S)[:, None] & cmask[None, :]
        d_avg = tl.load(D_AVG + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        d_max = tl.load(D_MAX + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        arg = tl.load(ARG + n * C + c, mask=cmask, other=-1)
        dg = d_avg[None, :] / S + tl.where(s[:, None] == arg[None, :], d_max[None, :], 0.0)
        tl.store(DG + (n * S + s.to(tl.int64))[:, None] * C + c[None, :], dg.to(DG.dtype.element_ty), mask=m)

    @triton.jit
    def _rows(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's rows (positions) and channel lanes, with their masks."""
        p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        pmask = p < P
        cmask = c < C
        return p, c, pmask, cmask, pmask[:, None] & cmask[None, :]

    @triton.jit
    def _spatial_pool_kernel(L, OUT, P, S, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p, c, pmask, cmask, m = _rows(P, C, BLOCK_P, BLOCK_C)
        v = tl.load(L + p[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(v, 1) / C
        best = tl.max(tl.where(m, v, float("-inf")), 1)
        out = (p // S) * 2 * S + p % S  # (N, 2, S): channel 0 the max, 1 the mean
        tl.store(OUT + out, best.to(OUT.dtype.element_ty), mask=pmask)
        tl.store(OUT + out + S, mean.to(OUT.dtype.element_ty), mask=pmask)

    @triton.jit
    def _spatial_pool_bwd_kernel(L, D_OUT, DL, P, S, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p, c, pmask, cmask, m = _rows(P, C, BLOCK_P, BLOCK_C)
        v = tl.load(L + p[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        v = tl.where(m, v, float("-inf"))
        best = tl.max(v, 1)
        hit = (v == best[:, None]) & m
        ties = tl.sum(hit.to(tl.float32), 1)
        out = (p // S) * 2 * S + p % S
        d_max = tl.load(D_OUT + out, mask=pmask, other=0.0).to(tl.float32)
        d_mean = tl.load(D_OUT + out + S, mask=pmask, other=0.0).to(tl.float32)
        dl = tl.where(hit, (d_max / tl.maximum(ties, 1.0))[:, None], 0.0) + (d_mean / C)[:, None]
        tl.store(DL + p[:, None] * C + c[None, :], dl.to(DL.dtype.element_ty), mask=m)

    @triton.jit
    def _gated_parts(G, CG, L, SG, X, n, p, c, m, cmask, C):
        """The three parts of one tile of rows, gated, in fp32 (zero outside the masks)."""
        rows = p[:, None] * C + c[None, :]
        cg = tl.load(CG + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        sg = tl.load(SG + p).to(tl.float32)  # p is clamped to a valid row by the caller
        g = tl.load(G + rows, mask=m, other=0.0).to(tl.float32)
        lv = tl.load(L + rows, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(X + rows, mask=m, other=0.0).to(tl.float32)
        return g, cg, lv, sg, xv

    @triton.jit
    def _gated_ln_kernel(G, CG, L, SG, X, W, B, OUT, MEAN, RSTD, S, C, eps,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # grid (N, position blocks): a program's rows all belong to image n
        n = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        smask = s < S
        m = smask[:, None] & cmask[None, :]
        p = n * S + s.to(tl.int64)
        g, cg, lv, sg, xv = _gated_parts(G, CG, L, SG, X, n, tl.where(smask, p, 0), c, m, cmask, C)
        za = g * cg[None, :]
        zb = lv * sg[:, None]
        mean = (tl.sum(za, 1) + tl.sum(zb, 1) + tl.sum(xv, 1)) / (3 * C)
        da = tl.where(m, za - mean[:, None], 0.0)
        db = tl.where(m, zb - mean[:, None], 0.0)
        dx = tl.where(m, xv - mean[:, None], 0.0)
        var = (tl.sum(da * da, 1) + tl.sum(db * db, 1) + tl.sum(dx * dx, 1)) / (3 * C)
        rstd = 1.0 / tl.sqrt(var + eps)
        out = p[:, None] * (3 * C) + c[None, :]
        for k in tl.static_range(3):
            d = da if k == 0 else (db if k == 1 else dx)
            w = tl.load(W + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(B + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            y = d * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(OUT + out + k * C, y.to(OUT.dtype.element_ty), mask=m)
        tl.store(MEAN + p, mean, mask=smask)
        tl.store(RSTD + p, rstd, mask=smask)

    @triton.jit
    def _gated_ln_bwd_kernel(GRAD, G, CG, L, SG, X, W, MEAN, RSTD, DG, DL, DSG, DX,
                             PART_CG, PART_W, PART_B, S, C,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        blk = tl.program_id(1)
        prog = n * tl.num_programs(1) + blk
        s = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        smask = s < S
        m = smask[:, None] & cmask[None, :]
        p = tl.where(smask, n * S + s.to(tl.int64), 0)
        g, cg, lv, sg, xv = _gated_parts(G, CG, L, SG, X, n, p, c, m, cmask, C)
        mean = tl.load(MEAN + p, mask=smask, other=0.0)
        rstd = tl.load(RSTD + p, mask=smask, other=0.0)
        out = p[:, None] * (3 * C) + c[None, :]
        # zhat and w * dy of the three parts
        ha = tl.where(m, (g * cg[None, :] - mean[:, None]) * rstd[:, None], 0.0)
        hb = tl.where(m, (lv * sg[:, None] - mean[:, None]) * rstd[:, None], 0.0)
        hx = tl.where(m, (xv - mean[:, None]) * rstd[:, None], 0.0)
        dya = tl.load(GRAD + out, mask=m, other=0.0).to(tl.float32)
        dyb = tl.load(GRAD + out + C, mask=m, other=0.0).to(tl.float32)
        dyx = tl.load(GRAD + out + 2 * C, mask=m, other=0.0).to(tl.float32)
        wa = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        wb = tl.load(W + C + c, mask=cmask, other=0.0).to(tl.float32)
        wx = tl.load(W + 2 * C + c, mask=cmask, other=0.0).to(tl.float32)
        ga, gb, gx = dya * wa[None, :], dyb * wb[None, :], dyx * wx[None, :]
        a = (tl.sum(ga, 1) + tl.sum(gb, 1) + tl.sum(gx, 1)) / (3 * C)
        b = (tl.sum(ga * ha, 1) + tl.sum(gb * hb, 1) + tl.sum(gx * hx, 1)) / (3 * C)
        za = tl.where(m, rstd[:, None] * (ga - a[:, None] - ha * b[:, None]), 0.0)
        zb = tl.where(m, rstd[:, None] * (gb - a[:, None] - hb * b[:, None]), 0.0)
        zx = tl.where(m, rstd[:, None] * (gx - a[:, None] - hx * b[:, None]), 0.0)
        rows = p[:, None] * C + c[None, :]
        tl.store(DG + rows, (za * cg[None, :]).to(DG.dtype.element_ty), mask=m)
        tl.store(DL + rows, (zb * sg[:, None]).to(DL.dtype.element_ty), mask=m)
        tl.store(DX + rows, zx.to(DX.dtype.element_ty), mask=m)
        tl.store(DSG + p, tl.sum(zb * lv, 1), mask=smask)
        tl.store(PART_CG + prog * C + c, tl.sum(za * g, 0), mask=cmask)
        for k in tl.static_range(3):
            h = ha if k == 0 else (hb if k == 1 else hx)
            dy = dya if k == 0 else (dyb if k == 1 else dyx)
            tl.store(PART_W + prog * 3 * C + k * C + c, tl.sum(dy * h, 0), mask=cmask)
            tl.store(PART_B + prog * 3 * C + k * C + c, tl.sum(dy, 0), mask=cmask)


# See window_attention: opaque custom ops under the interpreter, which cannot be traced.
_define_op = torch.library.custom_op if _triton.interpreting() else triton_op


# --------------------------------------------------------------------------- channel pooling


@_define_op("hifuse::channel_pool", mutates_args=())
def _channel_pool_op(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, s, c = g.shape
    block_c = min(64, _triton.block_channels(c))
    # Chunks of positions keep enough programs busy at small N * C; partials are combined
    # below in a fixed order (the first chunk holding the maximum gives its position).
    chunk = max(BLOCK_S, triton.cdiv(triton.cdiv(s, POOL_CHUNKS), BLOCK_S) * BLOCK_S)
    chunks = triton.cdiv(s, chunk)
    f32 = dict(device=g.device, dtype=torch.float32)
    part_sum, part_max = torch.empty((n, chunks, c), **f32), torch.empty((n, chunks, c), **f32)
    part_arg = torch.empty((n, chunks, c), device=g.device, dtype=torch.int32)
    wrap_triton(_channel_pool_kernel)[(n, triton.cdiv(c, block_c), chunks)](
        g, part_sum, part_max, part_arg, s, c, chunk, BLOCK_S=BLOCK_S, BLOCK_C=block_c
    )
    best = part_max.amax(1)
    first = (part_max == best[:, None]).to(torch.int8).argmax(1, keepdim=True)
    arg = part_arg.gather(1, first).squeeze(1)
    return (part_sum.sum(1) / s).to(g.dtype), best.to(g.dtype), arg


@_define_op("hifuse::channel_pool_backward", mutates_args=())
def _channel_pool_backward_op(
    d_avg: torch.Tensor, d_max: torch.Tensor, arg: torch.Tensor, g: torch.Tensor
) -> torch.Tensor:
    n, s, c = g.shape
    dg = torch.empty_like(g)
    block_c = min(64, _triton.block_channels(c))
    wrap_triton(_channel_pool_bwd_kernel)[(n, triton.cdiv(s, BLOCK_S), triton.cdiv(c, block_c))](
        d_avg, d_max, arg, dg, s, c, BLOCK_S=BLOCK_S, BLOCK_C=block_c
    )
    return dg


@_channel_pool_op.register_fake
def _(g):
    n, _s, c = g.shape
    return g.new_empty((n, c)), g.new_empty((n, c)), g.new_empty((n, c), dtype=torch.int32)


@_channel_pool_backward_op.register_fake
def _(d_avg, d_max, arg, g):
    return torch.empty_like(g)


def _channel_pool_setup(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(g, output[2])
    ctx.mark_non_differentiable(output[2])


def _channel_pool_backward(ctx, d_avg, d_max, _d_arg):
    g, arg = ctx.saved_tensors
    d_avg = torch.zeros(arg.shape, device=g.device, dtype=g.dtype) if d_avg is None else d_avg.contiguous()
    d_max = torch.zeros(arg.shape, device=g.device, dtype=g.dtype) if d_max is None else d_max.contiguous()
    return torch.ops.hifuse.channel_pool_backward(d_avg, d_max, arg, g)


_channel_pool_op.register_autograd(_channel_pool_backward, setup_context=_channel_pool_setup)


# --------------------------------------------------------------------------- spatial pooling


@_define_op("hifuse::spatial_pool", mutates_args=())
def _spatial_pool_op(l: torch.Tensor) -> torch.Tensor:
    n, s, c = l.shape
    out = l.new_empty((n, 2, s))
    rows = _triton.rows_per_program(c, 1)
    wrap_triton(_spatial_pool_kernel)[(triton.cdiv(n * s, rows),)](
        l, out, n * s, s, c, BLOCK_P=rows, **_triton.row_tile(c)
    )
    return out


@_define_op("hifuse::spatial_pool_backward", mutates_args=())
def _spatial_pool_backward_op(d_out: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n, s, c = l.shape
    dl = torch.empty_like(l)
    rows = _triton.rows_per_program(c, 1)
    wrap_triton(_spatial_pool_bwd_kernel)[(triton.cdiv(n * s, rows),)](
        l, d_out, dl, n * s, s, c, BLOCK_P=rows, **_triton.row_tile(c)
    )
    return dl


@_spatial_pool_op.register_fake
def _(l):
    n, s, _c = l.shape
    return l.new_empty((n, 2, s))


@_spatial_pool_backward_op.register_fake
def _(d_out, l):
    return torch.empty_like(l)


def _spatial_pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _spatial_pool_backward(ctx, d_out):
    (l,) = ctx.saved_tensors
    return torch.ops.hifuse.spatial_pool_backward(d_out.contiguous(), l)


_spatial_pool_op.register_autograd(_spatial_pool_backward, setup_context=_spatial_pool_setup)


# --------------------------------------------------------------------------- gated LayerNorm


def _gated_out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


@_define_op("hifuse::gated_layer_norm", mutates_args=())
def _gated_ln_op(
    g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor, spatial_gate: torch.Tensor,
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, s, c = g.shape
    out = torch.empty((n, s, 3 * c), device=g.device,
                      dtype=_gated_out_dtype(g, channel_gate, l, spatial_gate, x, weight))
    mean = torch.empty((n, s), device=g.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    rows = _triton.rows_per_program(c, 3)
    wrap_triton(_gated_ln_kernel)[(n, triton.cdiv(s, rows))](
        g, channel_gate, l, spatial_gate, x, weight, bias, out, mean, rstd, s, c, eps,
        BLOCK_P=rows, **_triton.row_tile(c),
    )
    return out, mean, rstd


@_define_op("hifuse::gated_layer_norm_backward", mutates_args=())
def _gated_ln_backward_op(
    grad: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor,
    spatial_gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n, s, c = g.shape
    rows = _triton.rows_per_program(c, 3)
    blocks = triton.cdiv(s, rows)
    f32 = dict(device=g.device, dtype=torch.float32)
    dg, dl, dx = torch.empty_like(g), torch.empty_like(l), torch.empty_like(x)
    dsg = torch.empty((n, s), **f32)
    part_cg = torch.empty((n, blocks, c), **f32)
    part_w, part_b = torch.empty((n * blocks, 3 * c), **f32), torch.empty((n * blocks, 3 * c), **f32)
    wrap_triton(_gated_ln_bwd_kernel)[(n, blocks)](
        grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, dg, dl, dsg, dx,
        part_cg, part_w, part_b, s, c, BLOCK_P=rows, **_triton.row_tile(c),
    )
    return (dg, part_cg.sum(1).to(channel_gate.dtype), dl, dsg.to(spatial_gate.dtype), dx,
            part_w.sum(0).to(weight.dtype), part_b.sum(0).to(weight.dtype))


@_gated_ln_op.register_fake
def _(g, channel_gate, l, spatial_gate, x, weight, bias, eps):
    n, s, c = g.shape
    out = g.new_empty((n, s, 3 * c), dtype=_gated_out_dtype(g, channel_gate, l, spatial_gate, x, weight))
    stat = g.new_empty((n, s), dtype=torch.float32)
    return out, stat, torch.empty_like(stat)


@_gated_ln_backward_op.register_fake
def _(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd):
    return (torch.empty_like(g), torch.empty_like(channel_gate), torch.empty_like(l),
            torch.empty_like(spatial_gate), torch.empty_like(x), torch.empty_like(weight),
            torch.empty_like(weight))


def _gated_ln_setup(ctx, inputs, output):
    g, channel_gate, l, spatial_gate, x, weight, _bias, _eps = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(g, channel_gate, l, spatial_gate, x, weight, mean, rstd)
    ctx.out_dtype = output[0].dtype


def _gated_ln_backward(ctx, grad, _gm, _gr):
    g, channel_gate, l, spatial_gate, x, weight, mean, rstd = ctx.saved_tensors
    if grad is None:
        grad = g.new_zeros((*g.shape[:2], 3 * g.shape[2]), dtype=ctx.out_dtype)
    dg, dcg, dl, dsg, dx, dw, db = torch.ops.hifuse.gated_layer_norm_backward(
        grad.contiguous(), g, channel_gate, l, spatial_gate, x, weight, mean, rstd
    )
    return dg, dcg, dl, dsg, dx, dw, db, None


_gated_ln_op.register_autograd(_gated_ln_backward, setup_context=_gated_ln_setup)


# --------------------------------------------------------------------------- entry points


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, H*W, C); free for channels-last memory."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()


def _feature_problem(name: str, t) -> tuple[type[Exception], str] | None:
    if not isinstance(t, torch.Tensor):
        return TypeError, f"{name} must be a tensor, got {type(t).__name__}"
    if t.dim() != 4:
        return ValueError, f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}"
    if t.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
    if t.shape[1] > MAX_CHANNELS:
        return ValueError, f"{name} has {t.shape[1]} channels, more than the {MAX_CHANNELS} supported"
    return None


def _gated_problem(g, channel_gate, l, spatial_gate, x, weight, bias):
    for name, t in (("g", g), ("l", l), ("x", x)):
        problem = _feature_problem(name, t)
        if problem is not None:
            return problem
    for name, t in (("channel_gate", channel_gate), ("spatial_gate", spatial_gate), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a tensor, got {type(t).__name__}"
        if t.dtype not in SUPPORTED_DTYPES:
            return TypeError, f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
    n, c, h, w = g.shape
    if l.shape != g.shape or x.shape != g.shape:
        return ValueError, f"g, l and x must have one shape, got {tuple(g.shape)}, {tuple(l.shape)}, {tuple(x.shape)}"
    if channel_gate.shape != (n, c, 1, 1):
        return ValueError, f"channel_gate must be {(n, c, 1, 1)}, got {tuple(channel_gate.shape)}"
    if spatial_gate.shape != (n, 1, h, w):
        return ValueError, f"spatial_gate must be {(n, 1, h, w)}, got {tuple(spatial_gate.shape)}"
    if weight.shape != (3 * c,) or bias.shape != (3 * c,):
        return ValueError, f"weight and bias must be ({3 * c},), got {tuple(weight.shape)} and {tuple(bias.shape)}"
    if len({t.device for t in (g, channel_gate, l, spatial_gate, x, weight, bias)}) > 1:
        return ValueError, "all tensors must be on one device"
    return None


def unsupported_reason(l, g, x, weight, bias) -> str | None:
    """Why the gating kernels cannot take a fusion block's l, g, X and norm3 parameters."""
    for name, t in (("l", l), ("g", g), ("x", x)):
        problem = _feature_problem(name, t)
        if problem is not None:
            return problem[1]
    if l.shape != g.shape or x.shape != g.shape:
        return f"l, g and x must have one shape, got {tuple(l.shape)}, {tuple(g.shape)}, {tuple(x.shape)}"
    c = g.shape[1]
    if weight.shape != (3 * c,) or bias.shape != (3 * c,) or weight.dtype not in SUPPORTED_DTYPES:
        return f"norm3 weight and bias must be ({3 * c},) float32, float16 or bfloat16"
    return _triton.unsupported_reason(l, g, x, weight, bias)


def _raise(op: str, problem) -> None:
    if problem is not None:
        raise problem[0](f"{op}: {problem[1]}")


def _check_device(op: str, *tensors: torch.Tensor) -> None:
    reason = _triton.unsupported_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")


def channel_pool(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, maximum) over the positions of (N, C, H, W) g, each (N, C, 1, 1), in one pass."""
    _raise("channel_pool", _feature_problem("g", g))
    _check_device("channel_pool", g)
    n, c = g.shape[:2]
    avg, best, _arg = torch.ops.hifuse.channel_pool(_nhwc(g))
    return avg.view(n, c, 1, 1), best.view(n, c, 1, 1)


def spatial_pool(l: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) map of the channel maximum and mean of (N, C, H, W) l, in one pass."""
    _raise("spatial_pool", _feature_problem("l", l))
    _check_device("spatial_pool", l)
    n, _c, h, w = l.shape
    return torch.ops.hifuse.spatial_pool(_nhwc(l)).view(n, 2, h, w)


def gated_layer_norm(g, channel_gate, l, spatial_gate, x, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over C of cat([g * channel_gate, l * spatial_gate, x], 1), never built.

    Args:
        g, l, x: (N, C, H, W), any strides (channels-last memory is read without copies).
        channel_gate: (N, C, 1, 1); spatial_gate: (N, 1, H, W).
        weight, bias: (3C,).
    Returns:
        (N, 3C, H, W) with channels-last memory, in the dtype eager's formula gives.
    """
    _raise("gated_layer_norm", _gated_problem(g, channel_gate, l, spatial_gate, x, weight, bias))
    _check_device("gated_layer_norm", g, channel_gate, l, spatial_gate, x, weight, bias)
    n, c, h, w = g.shape
    out, _mean, _rstd = torch.ops.hifuse.gated_layer_norm(
        _nhwc(g), channel_gate.reshape(n, c).contiguous(), _nhwc(l), spatial_gate.reshape(n, h * w).contiguous(),
        _nhwc(x), weight.contiguous(), bias.contiguous(), float(eps),
    )
    return out.view(n, h, w, 3 * c).permute(0, 3, 1, 2)
