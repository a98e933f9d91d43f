"""norm3 of the fusion block with the attention gates applied on load, in Triton.

Eager multiplies g and l by their gates, concatenates [g * channel_gate, l * spatial_gate, X]
and runs the channels-first LayerNorm (norm3) on it. Here the gate multiplications happen
while loading, in a LayerNorm over the virtual concatenation: neither the gated tensors nor
the 3C concatenation is ever written. Backward returns the gradients of g, l, X, both gates
and the affine parameters; the channel-gate, weight and bias gradients are per-program
partial sums added in a fixed order (programs never span two images), so reruns give
identical bits.

Layers: reference, kernels, registered ops, autograd, functional entry point.
"""

from __future__ import annotations

import torch

from . import _triton
from . import batch_norm_act as bna
from ._features import (
    SUPPORTED_DTYPES,
    check_device,
    feature_problem,
    nhwc,
    raise_problem,
)
from ._triton import tl, triton
from .reference import layer_norm_cf_ref

__all__ = ["gated_layer_norm", "gated_layer_norm_ref", "unsupported_reason"]



def gated_layer_norm_ref(g, channel_gate, l, spatial_gate, x, weight, bias, eps: float = 1e-6):
    """norm3 of the eager block: LayerNormCF(cat([g * channel_gate, l * spatial_gate, x], 1)).

    g, l, x: (N, C, H, W); channel_gate: (N, C, 1, 1); spatial_gate: (N, 1, H, W).
    """
    return layer_norm_cf_ref(torch.cat([g * channel_gate, l * spatial_gate, x], 1), weight, bias, eps)


if triton is not None:
    from ._triton import centred, image_block, three_part_norm_grads
    from .batch_norm_act import _act, _affine, _affined, _grad_terms

    @triton.jit
    def _gated_parts(G, CG, L, SG, X, XM, XI, XW, XB, n, p, c, m, cmask, C, X_BN: tl.constexpr,
                     X_ACT: tl.constexpr):
        """The three parts of one tile of rows, gated, in fp32 (zero outside the masks). X_BN:
        X holds the input y of a training BatchNorm (mean, invstd, weight, bias in XM, XI, XW,
        XB) and activation X_ACT (``batch_norm_act``'s codes), applied on load as
        ``batch_norm_act._apply_kernel`` applies it (the same values)."""
        rows = p[:, None] * C + c[None, :]
        cg = tl.load(CG + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        sg = tl.load(SG + p).to(tl.float32)  # p is clamped to a valid row by the caller
        g = tl.load(G + rows, mask=m, other=0.0).to(tl.float32)
        lv = tl.load(L + rows, mask=m, other=0.0).to(tl.float32)
        xv = tl.load(X + rows, mask=m, other=0.0).to(tl.float32)
        if X_BN:
            mean, scale, shift = _affine(XM, XI, XW, XB, c, cmask)
            z = _affined(xv, mean, scale, shift)
            xv = tl.where(m, _act(z, X_ACT).to(X.dtype.element_ty).to(tl.float32), 0.0)
        return g, cg, lv, sg, xv

    @_triton.kernel
    def _gated_ln_kernel(G, CG, L, SG, X, W, B, OUT, OUT2, MEAN, RSTD, XM, XI, XW, XB, S, C, eps,
                         HAS_OUT2: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                         X_BN: tl.constexpr = False, X_ACT: tl.constexpr = 0):
        """With HAS_OUT2 the result is written twice, the second time in OUT2's dtype (for a
        GEMM that takes it rounded; one store where a cast pass reads it back). X_BN: x given as
        a BatchNorm's input (``_gated_parts``)."""
        n, s = image_block(S, BLOCK_P)  # a program's rows all belong to image n
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        smask = s < S
        m = smask[:, None] & cmask[None, :]
        p = n * S + s.to(tl.int64)
        g, cg, lv, sg, xv = _gated_parts(G, CG, L, SG, X, XM, XI, XW, XB, n, tl.where(smask, p, 0), c, m, cmask, C,
                                         X_BN, X_ACT)
        za = g * cg[None, :]
        zb = lv * sg[:, None]
        mean = (tl.sum(za, 1) + tl.sum(zb, 1) + tl.sum(xv, 1)) / (3 * C)
        da = tl.where(m, centred(g, cg[None, :], mean[:, None]), 0.0)
        db = tl.where(m, centred(lv, sg[:, None], mean[:, None]), 0.0)
        dx = tl.where(m, xv - mean[:, None], 0.0)
        var = (tl.sum(da * da, 1) + tl.sum(db * db, 1) + tl.sum(dx * dx, 1)) / (3 * C)
        rstd = 1.0 / tl.sqrt(var + eps)
        out = p[:, None] * (3 * C) + c[None, :]
        for k in tl.static_range(3):
            d = da if k == 0 else (db if k == 1 else dx)
            w = tl.load(W + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            b = tl.load(B + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            y = tl.fma(d * rstd[:, None], w[None, :], b[None, :])
            tl.store(OUT + out + k * C, y.to(OUT.dtype.element_ty), mask=m)
            if HAS_OUT2:
                tl.store(OUT2 + out + k * C, y.to(OUT.dtype.element_ty).to(OUT2.dtype.element_ty), mask=m)
        tl.store(MEAN + p, mean, mask=smask)
        tl.store(RSTD + p, rstd, mask=smask)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _gated_ln_bwd_kernel(GRAD, GRAD2, G, CG, L, SG, X, W, MEAN, RSTD, DG, DL, DSG, DX,
                             PART_CG, PART_W, PART_B, XM, XI, XW, XB, S, C, PROGRAMS, HAS_GRAD2: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, X_BN: tl.constexpr = False,
                             X_ACT: tl.constexpr = 0, BN_SUMS=None, SUMS: tl.constexpr = False):
        """PROGRAMS programs per image (``_triton.reduction_programs``), each looping over the
        image's row blocks j, j + PROGRAMS, ... and writing one row of channel-gate, weight and
        bias partials: the channel gate's gradient is per image, so a program stays in one. The
        seven partials are accumulated as tiles and reduced over the rows once at the end. With
        HAS_GRAD2 the output's gradient is GRAD + GRAD2 (two uses of it, summed on load). X_BN:
        x given as a BatchNorm's input, as in ``_gated_ln_kernel``; DX is the gradient of x, the
        BatchNorm's output, and with SUMS the program also writes the partial sums that
        BatchNorm's backward reduces (``batch_norm_act._bwd_reduce_kernel``'s terms over DX as
        written, added in float32 tiles, then over the rows in float64) to BN_SUMS (sum of dz /
        of dz * x_hat, program, C)."""
        prog = tl.program_id(0).to(tl.int64)
        n = prog // PROGRAMS
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        acc_cg = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_wa = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_wb = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_wx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_ba = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_bb = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_bx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        if SUMS:
            bn_dz = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            bn_dzxh = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for j in range(tl.program_id(0) % PROGRAMS, tl.cdiv(S, BLOCK_P), PROGRAMS):
            s = j * BLOCK_P + tl.arange(0, BLOCK_P)
            smask = s < S
            m = smask[:, None] & cmask[None, :]
            p = tl.where(smask, n * S + s.to(tl.int64), 0)
            g, cg, lv, sg, xv = _gated_parts(G, CG, L, SG, X, XM, XI, XW, XB, n, p, c, m, cmask, C, X_BN, X_ACT)
            mean = tl.load(MEAN + p, mask=smask, other=0.0)
            rstd = tl.load(RSTD + p, mask=smask, other=0.0)
            out = p[:, None] * (3 * C) + c[None, :]
            # zhat and w * dy of the three parts
            ha = tl.where(m, centred(g, cg[None, :], mean[:, None]) * rstd[:, None], 0.0)
            hb = tl.where(m, centred(lv, sg[:, None], mean[:, None]) * rstd[:, None], 0.0)
            hx = tl.where(m, (xv - mean[:, None]) * rstd[:, None], 0.0)
            dya = tl.load(GRAD + out, mask=m, other=0.0).to(tl.float32)
            dyb = tl.load(GRAD + out + C, mask=m, other=0.0).to(tl.float32)
            dyx = tl.load(GRAD + out + 2 * C, mask=m, other=0.0).to(tl.float32)
            if HAS_GRAD2:
                dya += tl.load(GRAD2 + out, mask=m, other=0.0).to(tl.float32)
                dyb += tl.load(GRAD2 + out + C, mask=m, other=0.0).to(tl.float32)
                dyx += tl.load(GRAD2 + out + 2 * C, mask=m, other=0.0).to(tl.float32)
            ga = dya * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            gb = dyb * tl.load(W + C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            gx = dyx * tl.load(W + 2 * C + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
            za, zb, zx = three_part_norm_grads(ga, gb, gx, ha, hb, hx, rstd, 3 * C)
            za = tl.where(m, za, 0.0)
            zb = tl.where(m, zb, 0.0)
            zx = tl.where(m, zx, 0.0)
            rows = p[:, None] * C + c[None, :]
            tl.store(DG + rows, (za * cg[None, :]).to(DG.dtype.element_ty), mask=m)
            tl.store(DL + rows, (zb * sg[:, None]).to(DL.dtype.element_ty), mask=m)
            zx = zx.to(DX.dtype.element_ty)
            tl.store(DX + rows, zx, mask=m)
            if SUMS:  # as the BatchNorm's backward recomputes them from y and DX
                yv = tl.load(X + rows, mask=m, other=0.0).to(tl.float32)
                xhat, dz = _grad_terms(zx.to(tl.float32), yv, tl.load(XM + c, mask=cmask, other=0.0),
                                       tl.load(XI + c, mask=cmask, other=0.0),
                                       tl.load(XW + c, mask=cmask, other=0.0).to(tl.float32),
                                       tl.load(XB + c, mask=cmask, other=0.0).to(tl.float32), m, X_ACT)
                bn_dz += dz
                bn_dzxh += dz * xhat
            tl.store(DSG + p, tl.sum(zb * lv, 1).to(DSG.dtype.element_ty), mask=smask)
            acc_cg += za * g
            acc_wa += dya * ha
            acc_wb += dyb * hb
            acc_wx += dyx * hx
            acc_ba += dya
            acc_bb += dyb
            acc_bx += dyx
        tl.store(PART_CG + prog * C + c, tl.sum(acc_cg, 0), mask=cmask)
        parts = prog * 3 * C + c
        tl.store(PART_W + parts, tl.sum(acc_wa, 0), mask=cmask)
        tl.store(PART_W + parts + C, tl.sum(acc_wb, 0), mask=cmask)
        tl.store(PART_W + parts + 2 * C, tl.sum(acc_wx, 0), mask=cmask)
        tl.store(PART_B + parts, tl.sum(acc_ba, 0), mask=cmask)
        tl.store(PART_B + parts + C, tl.sum(acc_bb, 0), mask=cmask)
        tl.store(PART_B + parts + 2 * C, tl.sum(acc_bx, 0), mask=cmask)
        if SUMS:
            at = prog * C + c
            tl.store(BN_SUMS + at, tl.sum(bn_dz.to(tl.float64), 0), mask=cmask)
            tl.store(BN_SUMS + tl.num_programs(0).to(tl.int64) * C + at, tl.sum(bn_dzxh.to(tl.float64), 0),
                     mask=cmask)


# --------------------------------------------------------------------------- ops


def result_dtype(*tensors) -> torch.dtype:
    """The dtype of the op's result by eager's formula: its tensors' (or dtypes') promoted."""
    dtypes = [t if isinstance(t, torch.dtype) else t.dtype for t in tensors]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _forward_impl(g, channel_gate, l, spatial_gate, x, weight, bias, eps, out_dtype, low_dtype, x_bn=(), x_act=0):
    n, s, c = g.shape
    out = torch.empty((n, s, 3 * c), device=g.device,
                      dtype=out_dtype or result_dtype(g, channel_gate, l, spatial_gate, x, weight))
    low = out.new_empty((0,)) if low_dtype is None else torch.empty_like(out, dtype=low_dtype)
    mean = torch.empty((n, s), device=g.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    rows = _triton.rows_per_program(c, 3)
    _triton.wrap_triton(_gated_ln_kernel)[_triton.grid(n * triton.cdiv(s, rows))](
        g, channel_gate, l, spatial_gate, x, weight, bias, out, out if low_dtype is None else low, mean, rstd,
        *(x_bn or [x] * 4), s, c, eps, HAS_OUT2=low_dtype is not None, BLOCK_P=rows, X_BN=bool(x_bn), X_ACT=x_act,
        **_triton.row_tile(c, rows),
    )
    return out, mean, rstd, low


@_triton.define_op("hifuse::gated_layer_norm", mutates_args=())
def _gated_ln_op(
    g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor, spatial_gate: torch.Tensor,
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
    low_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd, low). ``out_dtype``: the result's (default the dtype eager's formula
    gives); a rebuild for a GEMM asks for the GEMM's, so no cast pass follows. ``low_dtype``:
    ``low`` is the result once more, cast to it (for a GEMM beside another use of the result);
    empty when None."""
    return _forward_impl(g, channel_gate, l, spatial_gate, x, weight, bias, eps, out_dtype, low_dtype)


def _x_bn_problem(g, y, x_mean, x_invstd, x_weight, x_bias, x_act) -> str | None:
    if y.shape != g.shape or not y.is_contiguous() or y.device != g.device:
        return f"y must be a contiguous tensor of g's shape {tuple(g.shape)} on {g.device}, got {tuple(y.shape)}"
    problem = bna.affine_problem(x_mean, x_invstd, x_weight, x_bias, y.shape[-1], y.device, "x_")
    if problem is not None:
        return problem
    if x_act not in (0, 1, 2):
        return f"x_act must be 0 (none), 1 (ReLU) or 2 (GELU), got {x_act}"
    return None


@_triton.define_op("hifuse::gated_layer_norm_bn", mutates_args=())
def _gated_ln_bn_op(
    g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor, spatial_gate: torch.Tensor, y: torch.Tensor,
    x_mean: torch.Tensor, x_invstd: torch.Tensor, x_weight: torch.Tensor, x_bias: torch.Tensor, x_act: int,
    weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
    low_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hifuse::gated_layer_norm`` with x given as the input y of a training BatchNorm and
    activation: x = ``hifuse::batch_norm_act(y, None, x_mean, x_invstd, x_weight, x_bias,
    x_act, ...)`` in y's dtype, applied on load (the same values), never written."""
    problem = _x_bn_problem(g, y, x_mean, x_invstd, x_weight, x_bias, x_act)
    if problem is not None:
        raise ValueError(f"gated_layer_norm_bn: {problem}")
    return _forward_impl(g, channel_gate, l, spatial_gate, y, weight, bias, eps, out_dtype, low_dtype,
                         [x_mean, x_invstd, x_weight, x_bias], x_act)


def bwd_launch(c: int) -> dict:
    """BLOCK_P, BLOCK_C and num_warps of the backward: it holds its tiles and seven tiles of
    partial sums across its loop, so rows for thirteen tiles, and 16 warps from 512 channels,
    keep it within 128 registers and free of spills under triton 3.6 and 3.8 (rows for six
    took 163 at 96 channels once the partials became tiles; 3.8 spilled at 512 channels on 8
    warps)."""
    rows = _triton.rows_per_program(c, 13)
    tile = _triton.row_tile(c, rows)
    return {"BLOCK_P": rows, "BLOCK_C": tile["BLOCK_C"],
            "num_warps": 16 if tile["BLOCK_C"] >= 512 else tile["num_warps"]}


def _backward_impl(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, grad2, x_bn=(), x_act=0,
                   sums=False):
    n, s, c = g.shape
    tile = bwd_launch(c)
    rows = tile.pop("BLOCK_P")
    blocks = triton.cdiv(s, rows)
    # programs per image: the wave shared among the images
    flags = dict(HAS_GRAD2=grad2 is not None, BLOCK_P=rows, X_BN=bool(x_bn), X_ACT=x_act, SUMS=sums, **tile)
    bn = list(x_bn) or [x] * 4
    programs = max(1, _triton.reduction_programs(n * blocks, 1, g.device, kernel=_gated_ln_bwd_kernel, launch=flags,
                                                 args=(grad, grad if grad2 is None else grad2, g, channel_gate, l,
                                                       spatial_gate, x, weight, mean, rstd, g.dtype, l.dtype,
                                                       torch.float32, x.dtype, *[torch.float32] * 3, *bn, s, c,
                                                       2)) // n)
    programs = min(programs, blocks)
    f32 = dict(device=g.device, dtype=torch.float32)
    dg, dl, dx = torch.empty_like(g), torch.empty_like(l), torch.empty_like(x)
    dsg = torch.empty((n, s), device=g.device, dtype=spatial_gate.dtype)  # written once a position: no cast pass
    part_cg = torch.empty((n, programs, c), **f32)
    part = torch.empty((2, n * programs, 3 * c), **f32)
    bn_part = torch.empty((2, n * programs, c) if sums else (0,), device=g.device, dtype=torch.float64)
    _triton.wrap_triton(_gated_ln_bwd_kernel)[_triton.grid(n * programs)](
        grad, grad if grad2 is None else grad2, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, dg, dl, dsg,
        dx, part_cg, part[0], part[1], *bn, s, c, programs, **flags, BN_SUMS=bn_part if sums else part[0],
    )
    bn_sums = torch.empty((2, c if sums else 0), **f32)
    if sums:  # the partials added in a fixed order, as the BatchNorm's backward adds its own
        bna.combine_backward_sums(bn_part[0], bn_part[1], bn_sums[0], bn_sums[1])
    return dg, part_cg.sum(1).to(channel_gate.dtype), dl, dsg, dx, part.sum(1), bn_sums


@_triton.define_op("hifuse::gated_layer_norm_backward", mutates_args=())
def _gated_ln_backward_op(
    grad: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor,
    spatial_gate: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, grad2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of g, channel_gate, l, spatial_gate, x, and of the weight and bias as one
    (2, 3C) float32 tensor (one sum of the partials; ``backward`` splits it); ``grad2``
    (grad's shape), a second gradient of the output from another use of it, is added to grad
    on load."""
    return _backward_impl(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, grad2)[:6]


@_triton.define_op("hifuse::gated_layer_norm_bn_backward", mutates_args=())
def _gated_ln_bn_backward_op(
    grad: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor,
    spatial_gate: torch.Tensor, y: torch.Tensor, x_mean: torch.Tensor, x_invstd: torch.Tensor,
    x_weight: torch.Tensor, x_bias: torch.Tensor, x_act: int, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, grad2: torch.Tensor | None = None, sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hifuse::gated_layer_norm_backward`` of ``hifuse::gated_layer_norm_bn``: x's gradient
    is that of the BatchNorm's output (for the BatchNorm's backward), and the seventh output,
    with ``sums`` (else (2, 0)), the sums that BatchNorm's backward reduces over it, as
    ``hifuse::batch_norm_act_backward_summed`` takes them ((sum of dz / of dz * x_hat, C)
    float32), reduced by this pass."""
    problem = _x_bn_problem(g, y, x_mean, x_invstd, x_weight, x_bias, x_act)
    if problem is not None:
        raise ValueError(f"gated_layer_norm_bn_backward: {problem}")
    return _backward_impl(grad, g, channel_gate, l, spatial_gate, y, weight, mean, rstd, grad2,
                          [x_mean, x_invstd, x_weight, x_bias], x_act, sums)


def backward(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, grad2=None) -> tuple:
    """(dg, dchannel_gate, dl, dspatial_gate, dx, dweight, dbias) of ``hifuse::gated_layer_norm``,
    the last two in the weight's dtype."""
    *grads, params = torch.ops.hifuse.gated_layer_norm_backward(grad, g, channel_gate, l, spatial_gate, x, weight,
                                                                mean, rstd, grad2)
    params = params.to(weight.dtype)
    return (*grads, params[0], params[1])


def backward_bn(grad, g, channel_gate, l, spatial_gate, y, x_bn, x_act: int, weight, mean, rstd, grad2=None,
                sums: bool = False) -> tuple:
    """``backward`` of ``hifuse::gated_layer_norm_bn`` (``x_bn``: x's BatchNorm mean, invstd,
    weight and bias); the fifth gradient is that of x, the BatchNorm's output; with ``sums``,
    then the (2, C) sums of that BatchNorm's backward (``hifuse::gated_layer_norm_bn_backward``)."""
    *grads, params, bn_sums = torch.ops.hifuse.gated_layer_norm_bn_backward(
        grad, g, channel_gate, l, spatial_gate, y, *x_bn, x_act, weight, mean, rstd, grad2, bool(sums))
    params = params.to(weight.dtype)
    return (*grads, params[0], params[1], *((bn_sums,) if sums else ()))


@_gated_ln_op.register_fake
def _fake_forward(g, channel_gate, l, spatial_gate, x, weight, bias, eps, out_dtype=None, low_dtype=None):
    n, s, c = g.shape
    out = g.new_empty((n, s, 3 * c), dtype=out_dtype or result_dtype(g, channel_gate, l, spatial_gate, x, weight))
    stat = g.new_empty((n, s), dtype=torch.float32)
    low = out.new_empty((0,)) if low_dtype is None else torch.empty_like(out, dtype=low_dtype)
    return out, stat, torch.empty_like(stat), low


@_gated_ln_backward_op.register_fake
def _fake_backward(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, grad2=None):
    return (torch.empty_like(g), torch.empty_like(channel_gate), torch.empty_like(l),
            torch.empty_like(spatial_gate), torch.empty_like(x),
            weight.new_empty((2, weight.shape[0]), dtype=torch.float32))


@_gated_ln_bn_op.register_fake
def _(g, channel_gate, l, spatial_gate, y, x_mean, x_invstd, x_weight, x_bias, x_act, weight, bias, eps,
      out_dtype=None, low_dtype=None):
    return _fake_forward(g, channel_gate, l, spatial_gate, y, weight, bias, eps, out_dtype, low_dtype)


@_gated_ln_bn_backward_op.register_fake
def _(grad, g, channel_gate, l, spatial_gate, y, x_mean, x_invstd, x_weight, x_bias, x_act, weight, mean, rstd,
      grad2=None, sums=False):
    bn_sums = g.new_empty((2, g.shape[-1] if sums else 0), dtype=torch.float32)
    return (*_fake_backward(grad, g, channel_gate, l, spatial_gate, y, weight, mean, rstd, grad2), bn_sums)


def _gated_ln_setup(ctx, inputs, output):
    g, channel_gate, l, spatial_gate, x, weight, _bias, _eps, _out_dtype, _low_dtype = inputs
    _out, mean, rstd, _low = output
    ctx.save_for_backward(g, channel_gate, l, spatial_gate, x, weight, mean, rstd)
    ctx.out_dtype = output[0].dtype
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics or an unused low


def _gated_ln_backward(ctx, grad, _gm, _gr, grad_low):
    """The rounded copy ``low`` is the result too: its gradient is summed with the result's."""
    g, channel_gate, l, spatial_gate, x, weight, mean, rstd = ctx.saved_tensors
    if grad is None:
        grad, grad_low = grad_low, None
    if grad is None:
        grad = g.new_zeros((*g.shape[:2], 3 * g.shape[2]), dtype=ctx.out_dtype)
    dg, dcg, dl, dsg, dx, dw, db = backward(grad.contiguous(), g, channel_gate, l, spatial_gate, x, weight, mean, rstd,
                                            None if grad_low is None else grad_low.contiguous())
    return dg, dcg, dl, dsg, dx, dw, db, None, None, None


_gated_ln_op.register_autograd(_gated_ln_backward, setup_context=_gated_ln_setup)


# --------------------------------------------------------------------------- functional


def _gated_problem(g, channel_gate, l, spatial_gate, x, weight, bias):
    for name, t in (("g", g), ("l", l), ("x", x)):
        problem = feature_problem(name, t)
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
        problem = feature_problem(name, t)
        if problem is not None:
            return problem[1]
    if l.shape != g.shape or x.shape != g.shape:
        return f"l, g and x must have one shape, got {tuple(l.shape)}, {tuple(g.shape)}, {tuple(x.shape)}"
    c = g.shape[1]
    if weight.shape != (3 * c,) or bias.shape != (3 * c,) or weight.dtype not in SUPPORTED_DTYPES:
        return f"norm3 weight and bias must be ({3 * c},) float32, float16 or bfloat16"
    return _triton.unsupported_reason(l, g, x, weight, bias)


def gated_layer_norm(g, channel_gate, l, spatial_gate, x, weight, bias, eps: float = 1e-6, check: bool = True) -> torch.Tensor:
    """LayerNorm over C of cat([g * channel_gate, l * spatial_gate, x], 1), never built.

    Args:
        g, l, x: (N, C, H, W), any strides (channels-last memory is read without copies).
        channel_gate: (N, C, 1, 1); spatial_gate: (N, 1, H, W).
        weight, bias: (3C,).
        check: False skips the argument checks, for callers that made them once already.
    Returns:
        (N, 3C, H, W) with channels-last memory, in the dtype eager's formula gives.
    """
    if check:
        raise_problem("gated_layer_norm", _gated_problem(g, channel_gate, l, spatial_gate, x, weight, bias))
        check_device("gated_layer_norm", g, channel_gate, l, spatial_gate, x, weight, bias)
    n, c, h, w = g.shape
    out = torch.ops.hifuse.gated_layer_norm(*op_args(g, channel_gate, l, spatial_gate, x, weight, bias, eps))[0]
    return out.view(n, h, w, 3 * c).permute(0, 3, 1, 2)


def op_args(g, channel_gate, l, spatial_gate, x, weight, bias, eps: float) -> tuple:
    """The arguments of hifuse::gated_layer_norm for ``gated_layer_norm``'s (unchecked), whose
    (N*H*W, 3C) result is (N, 3C, H, W) channels-last memory; x None stays None (for callers
    that supply it later, ``recompute.GatedLayerNormRows``)."""
    n, c, h, w = g.shape
    return (nhwc(g), channel_gate.reshape(n, c).contiguous(), nhwc(l), spatial_gate.reshape(n, h * w).contiguous(),
            None if x is None else nhwc(x), weight.contiguous(), bias.contiguous(), float(eps))
