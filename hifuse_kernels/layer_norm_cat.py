"""Channels-first LayerNorm over a concatenation along C, without building it, native.

The fusion block normalises torch.cat([a, b(, c)], 1) (norm1, norm2): eager writes the
concatenation, then runs the five-kernel channels-first LayerNorm on it. This op reads
the parts where they are and writes the normalised concatenation once; its backward
returns one gradient per part, so no gradient of the concatenation is split either.
It runs the kernels of ``hifuse::layer_norm_cf`` (csrc/layer_norm_cf.cpp, .cu), for which
a plain tensor is a one-part concatenation, so the two ops give identical results.

The fusion block's parts (equal widths, channels-last, 16/32-bit floats) take Triton kernels
instead (``hifuse::layer_norm_cat_rows``): a program holds whole rows of every part, so each
row is read once in wide vector loads and normalised from registers, and the backward writes
each part's gradient and per-program weight and bias partials in one pass (added in a fixed
order: reruns give identical bits). ``forward`` and ``backward`` pick the path from the
parts, the same for a tensor's forward and its backward.

A part may also come as the input y of a training BatchNorm without activation (the fusion
block's W_l and W_g), applied on load as ``batch_norm_act`` applies it (the same bits), so the
part is never written (``hifuse::layer_norm_cat_rows_bn``); the backward
(``..._bn_backward``) then also reduces that BatchNorm's backward sums from the part's
gradient it writes and the y it reads anyway, leaving the BatchNorm only its apply pass.

Layers: reference, capability check, registered ops (native: schema in C++, fake and
autograd here; Triton: kernels and ops here), functional entry points. Its user is the
fused ``HFFBlock`` (``hifuse.fused.fusion_block``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _ext, _triton
from . import batch_norm_act as bna
from ._features import nhwc
from ._triton import ONES_PAD, tl, triton
from .layer_norm_cf import _argument_problem
from .reference import layer_norm_cf_ref

OP = "layer_norm_cat"
MAX_PARTS = 3
ROWS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS_MAX_CHANNELS = 1024  # channels of one part in the Triton path
# Rows of the backward's tiles: it holds six tiles of partial sums across its loop besides its
# loads; rows for six tiles keep it at most 64 registers without spills (sm_90, triton 3.8).
BWD_TILES = 6

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


# --------------------------------------------------------------------------- Triton rows path

if triton is not None:
    from ._triton import ones_column, three_part_norm_grads
    from .batch_norm_act import _affine, _affined, _grad_terms

    @triton.jit
    def _load_parts(A, B, D, offs, m, PARTS: tl.constexpr):
        """One tile of rows of each part in fp32 (zero where a part is absent or masked)."""
        a = tl.load(A + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + offs, mask=m & (PARTS > 1), other=0.0).to(tl.float32)
        d = tl.load(D + offs, mask=m & (PARTS > 2), other=0.0).to(tl.float32)
        return a, b, d

    @triton.jit
    def _bn_params(MEAN, INVSTD, BN_W, BN_B, c, cmask, ON: tl.constexpr):
        """A part's BatchNorm apply as ``batch_norm_act._apply_kernel`` forms it: the mean, the
        scale invstd * weight and the shift (zeros where the part has none)."""
        if ON:
            mean, scale, shift = _affine(MEAN, INVSTD, BN_W, BN_B, c, cmask)
        else:
            mean = tl.zeros(c.shape, dtype=tl.float32)
            scale = mean
            shift = mean
        return mean, scale, shift

    @triton.jit
    def _bn_invstd(INVSTD, c, cmask, ON: tl.constexpr):
        if ON:
            invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
        else:
            invstd = tl.zeros(c.shape, dtype=tl.float32)
        return invstd

    @triton.jit
    def _bn_sums(dz, y, mean, invstd, m, sum_dz, sum_dzxh, ON: tl.constexpr):
        """A part's BatchNorm backward sums: dz, the part's gradient as written, and x_hat from
        its input y as ``batch_norm_act._bwd_reduce_kernel`` forms them; float32 tiles (float64
        ones doubled the kernel's registers), added over the rows in float64 at the end."""
        if ON:  # no activation: w and b are not read
            xhat, dz = _grad_terms(dz.to(tl.float32), y, mean, invstd, mean, mean, m, 0)
            sum_dz += dz
            sum_dzxh += dz * xhat
        return sum_dz, sum_dzxh

    @triton.jit
    def _bn_apply(v, mean, scale, shift, m, dtype: tl.constexpr, ON: tl.constexpr):
        """The part's value from its BatchNorm input v: the apply's output in the apply's dtype
        (the same bits as its store), back in fp32; zero where masked."""
        if ON:
            z = _affined(v, mean, scale, shift)
            v = tl.where(m, z.to(dtype).to(tl.float32), 0.0)
        return v

    @_triton.kernel
    def _rows_fwd_kernel(A, B, D, W, BIAS, OUT, MEAN, RSTD, BN_MA, BN_IA, BN_WA, BN_BA, BN_MB, BN_IB, BN_WB, BN_BB,
                         BN_MD, BN_ID, BN_WD, BN_BD, M, C, eps, PARTS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BN: tl.constexpr = 0):
        """BN: a bit mask of the parts given as a BatchNorm's input (its mean, invstd, weight
        and bias in BN_M*, BN_I*, BN_W*, BN_B*), applied on load as ``batch_norm_act`` applies
        it (the same values), so the part itself is never written."""
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        rmask = rows < M
        m = rmask[:, None] & cmask[None, :]
        a, b, d = _load_parts(A, B, D, rows[:, None] * C + c[None, :], m, PARTS)
        if BN != 0:
            mn, sc, sh = _bn_params(BN_MA, BN_IA, BN_WA, BN_BA, c, cmask, (BN & 1) != 0)
            a = _bn_apply(a, mn, sc, sh, m, A.dtype.element_ty, (BN & 1) != 0)
            mn, sc, sh = _bn_params(BN_MB, BN_IB, BN_WB, BN_BB, c, cmask, (BN & 2) != 0)
            b = _bn_apply(b, mn, sc, sh, m, B.dtype.element_ty, (BN & 2) != 0)
            mn, sc, sh = _bn_params(BN_MD, BN_ID, BN_WD, BN_BD, c, cmask, (BN & 4) != 0)
            d = _bn_apply(d, mn, sc, sh, m, D.dtype.element_ty, (BN & 4) != 0)
        total = PARTS * C
        mean = (tl.sum(a, 1) + tl.sum(b, 1) + tl.sum(d, 1)) / total
        a = tl.where(m, a - mean[:, None], 0.0)
        b = tl.where(m & (PARTS > 1), b - mean[:, None], 0.0)
        d = tl.where(m & (PARTS > 2), d - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(a * a, 1) + tl.sum(b * b, 1) + tl.sum(d * d, 1)) / total + eps)
        out = rows[:, None] * total + c[None, :]
        for k in tl.static_range(PARTS):
            v = a if k == 0 else (b if k == 1 else d)
            w = tl.load(W + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            bb = tl.load(BIAS + k * C + c, mask=cmask, other=0.0).to(tl.float32)
            y = tl.fma(v * rstd[:, None], w[None, :], bb[None, :])
            tl.store(OUT + out + k * C, y.to(OUT.dtype.element_ty), mask=m)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _rows_bwd_kernel(GRAD, A, B, D, W, MEAN, RSTD, DA, DB, DD, PART_W, PART_B, BIAS, OUT,
                         BN_MA, BN_IA, BN_WA, BN_BA, BN_MB, BN_IB, BN_WB, BN_BB, BN_MD, BN_ID, BN_WD, BN_BD,
                         BN_SUMS, M, C, PROGRAMS, PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                         REBUILD: tl.constexpr = False, BN: tl.constexpr = 0, SUMS: tl.constexpr = True,
                         PAD: tl.constexpr = 0, ONES_APART: tl.constexpr = False):
        """On a fixed grid (``_triton.reduction_programs``): each program loops over row tiles
        pid, pid + PROGRAMS, ... and writes one row of weight and bias partials, accumulated as
        tiles and reduced over the rows once at the end. With REBUILD it also writes the
        forward's output to OUT as ``_rows_fwd_kernel`` computes it (the same bits), for a
        weight-gradient GEMM that reads it next: the pass that would rebuild it reads what this
        one reads. BN: parts given as BatchNorm inputs, as in ``_rows_fwd_kernel``: their
        gradients are the BatchNorm outputs', and the program writes the BatchNorm backward's
        partial sums of each (the reducing pass ``batch_norm_act`` would make over them), with
        SUMS, to BN_SUMS (sum of dz / of dz * x_hat, program, BatchNorm parts x C), float64.
        PAD > 0 (REBUILD): OUT's rows are PARTS x C + PAD wide, column PARTS x C ones and the rest
        zeros, written by the last part's spare channel lanes (BLOCK_C at least C + PAD), or with
        ONES_APART by a store of their own (``_triton.ones_column``; more registers)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        total = PARTS * C
        w_a = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        w_b = tl.load(W + C + c, mask=cmask & (PARTS > 1), other=0.0).to(tl.float32)
        w_d = tl.load(W + 2 * C + c, mask=cmask & (PARTS > 2), other=0.0).to(tl.float32)
        if REBUILD:
            b_a = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
            b_b = tl.load(BIAS + C + c, mask=cmask & (PARTS > 1), other=0.0).to(tl.float32)
            b_d = tl.load(BIAS + 2 * C + c, mask=cmask & (PARTS > 2), other=0.0).to(tl.float32)
        if BN != 0:
            mn_a, sc_a, sh_a = _bn_params(BN_MA, BN_IA, BN_WA, BN_BA, c, cmask, (BN & 1) != 0)
            mn_b, sc_b, sh_b = _bn_params(BN_MB, BN_IB, BN_WB, BN_BB, c, cmask, (BN & 2) != 0)
            mn_d, sc_d, sh_d = _bn_params(BN_MD, BN_ID, BN_WD, BN_BD, c, cmask, (BN & 4) != 0)
            is_a = _bn_invstd(BN_IA, c, cmask, (BN & 1) != 0)
            is_b = _bn_invstd(BN_IB, c, cmask, (BN & 2) != 0)
            is_d = _bn_invstd(BN_ID, c, cmask, (BN & 4) != 0)
            bn_dz_a = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            bn_dzxh_a = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            bn_dz_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            bn_dzxh_b = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            bn_dz_d = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            bn_dzxh_d = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_wa = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_wb = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_wd = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_ba = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_bb = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc_bd = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for t in range(pid, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = rows < M
            m = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * C + c[None, :]
            a, b, d = _load_parts(A, B, D, offs, m, PARTS)
            if BN != 0:
                ya, yb, yd = a, b, d
                a = _bn_apply(a, mn_a, sc_a, sh_a, m, A.dtype.element_ty, (BN & 1) != 0)
                b = _bn_apply(b, mn_b, sc_b, sh_b, m, B.dtype.element_ty, (BN & 2) != 0)
                d = _bn_apply(d, mn_d, sc_d, sh_d, m, D.dtype.element_ty, (BN & 4) != 0)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            ha = tl.where(m, (a - mean[:, None]) * rstd[:, None], 0.0)
            hb = tl.where(m & (PARTS > 1), (b - mean[:, None]) * rstd[:, None], 0.0)
            hd = tl.where(m & (PARTS > 2), (d - mean[:, None]) * rstd[:, None], 0.0)
            out = rows[:, None] * total + c[None, :]
            if REBUILD:  # (x - mean) * rstd * w + bias, as _rows_fwd_kernel forms it
                for k in tl.static_range(PARTS):
                    h = ha if k == 0 else (hb if k == 1 else hd)
                    w = w_a if k == 0 else (w_b if k == 1 else w_d)
                    bb = b_a if k == 0 else (b_b if k == 1 else b_d)
                    v = tl.fma(h, w[None, :], bb[None, :])
                    if PAD > 0 and k == PARTS - 1 and not ONES_APART:
                        # the ones column and its zeros from the channel block's spare lanes (zero
                        # there): the launcher makes BLOCK_C hold C + PAD
                        v = tl.where((c == C)[None, :], 1.0, v)
                        mk = rmask[:, None] & (c < C + PAD)[None, :]
                    else:
                        mk = m
                    tl.store(OUT + out + (rows * PAD)[:, None] + k * C, v.to(OUT.dtype.element_ty), mask=mk)
            if REBUILD and PAD > 0 and ONES_APART:
                ones_column(OUT + (rows * (total + PAD))[:, None], total, rmask, PAD)
            dya, dyb, dyd = _load_parts(GRAD + out, GRAD + out + C, GRAD + out + 2 * C, 0, m, PARTS)
            ga = dya * w_a[None, :]
            gb = dyb * w_b[None, :]
            gd = dyd * w_d[None, :]
            za, zb, zd = three_part_norm_grads(ga, gb, gd, ha, hb, hd, rstd, total)
            za = za.to(DA.dtype.element_ty)
            zb = zb.to(DB.dtype.element_ty)
            zd = zd.to(DD.dtype.element_ty)
            tl.store(DA + offs, za, mask=m)
            if PARTS > 1:
                tl.store(DB + offs, zb, mask=m)
            if PARTS > 2:
                tl.store(DD + offs, zd, mask=m)
            if BN != 0 and SUMS:
                bn_dz_a, bn_dzxh_a = _bn_sums(za, ya, mn_a, is_a, m, bn_dz_a, bn_dzxh_a, (BN & 1) != 0)
                bn_dz_b, bn_dzxh_b = _bn_sums(zb, yb, mn_b, is_b, m, bn_dz_b, bn_dzxh_b, (BN & 2) != 0)
                bn_dz_d, bn_dzxh_d = _bn_sums(zd, yd, mn_d, is_d, m, bn_dz_d, bn_dzxh_d, (BN & 4) != 0)
            acc_wa += dya * ha
            acc_wb += dyb * hb
            acc_wd += dyd * hd
            acc_ba += dya
            acc_bb += dyb
            acc_bd += dyd
        part = pid.to(tl.int64) * total + c
        tl.store(PART_W + part, tl.sum(acc_wa, 0), mask=cmask)
        tl.store(PART_B + part, tl.sum(acc_ba, 0), mask=cmask)
        if PARTS > 1:
            tl.store(PART_W + part + C, tl.sum(acc_wb, 0), mask=cmask)
            tl.store(PART_B + part + C, tl.sum(acc_bb, 0), mask=cmask)
        if PARTS > 2:
            tl.store(PART_W + part + 2 * C, tl.sum(acc_wd, 0), mask=cmask)
            tl.store(PART_B + part + 2 * C, tl.sum(acc_bd, 0), mask=cmask)
        # BN_SUMS[s, pid, j * C:(j + 1) * C], j the part's place among the BatchNorm parts
        n_bn: tl.constexpr = (BN & 1) + (BN >> 1 & 1) + (BN >> 2 & 1) if SUMS else 0
        sums = pid.to(tl.int64) * (n_bn * C) + c
        # the grid's size, not PROGRAMS.to(): torch 2.11's write analysis passes PROGRAMS as a
        # plain int, which has no .to, and then counts every argument as written
        step = tl.num_programs(0).to(tl.int64) * (n_bn * C)
        if (BN & 1) != 0 and SUMS:
            tl.store(BN_SUMS + sums, tl.sum(bn_dz_a.to(tl.float64), 0), mask=cmask)
            tl.store(BN_SUMS + step + sums, tl.sum(bn_dzxh_a.to(tl.float64), 0), mask=cmask)
        if (BN & 2) != 0 and SUMS:
            at = sums + (BN & 1) * C
            tl.store(BN_SUMS + at, tl.sum(bn_dz_b.to(tl.float64), 0), mask=cmask)
            tl.store(BN_SUMS + step + at, tl.sum(bn_dzxh_b.to(tl.float64), 0), mask=cmask)
        if (BN & 4) != 0 and SUMS:
            at = sums + ((BN & 1) + (BN >> 1 & 1)) * C
            tl.store(BN_SUMS + at, tl.sum(bn_dz_d.to(tl.float64), 0), mask=cmask)
            tl.store(BN_SUMS + step + at, tl.sum(bn_dzxh_d.to(tl.float64), 0), mask=cmask)


def _three(rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parts as the kernels' three pointers (an absent part points at the first, unread)."""
    return rows + [rows[0]] * (MAX_PARTS - len(rows))


def _bn_pointers(rows: list[torch.Tensor], bn: list[torch.Tensor], bn_parts: int) -> list[torch.Tensor]:
    """The kernels' twelve BatchNorm pointers (mean, invstd, weight, bias of each part) from
    ``bn``, four for each part in the ``bn_parts`` bit mask, in order; a part without points
    at the first part, unread."""
    out, given = [], iter(bn)
    for k in range(MAX_PARTS):
        out += [next(given) for _ in range(4)] if bn_parts >> k & 1 else [rows[0]] * 4
    return out


def bn_count(bn_parts: int) -> int:
    """The parts a bit mask of at most MAX_PARTS names (bit counting torch.compile traces:
    ``bin`` it does not, under torch 2.11)."""
    return sum(bn_parts >> k & 1 for k in range(MAX_PARTS))


def _bn_problem(rows: list[torch.Tensor], bn: list[torch.Tensor], bn_parts: int) -> str | None:
    if not 0 <= bn_parts < 1 << len(rows):
        return f"bn_parts must be a bit mask of the {len(rows)} parts, got {bn_parts}"
    if len(bn) != 4 * bn_count(bn_parts):
        return f"bn takes four tensors (mean, invstd, weight, bias) per part in bn_parts, got {len(bn)}"
    for i in range(0, len(bn), 4):
        problem = bna.affine_problem(*bn[i:i + 4], rows[0].shape[1], rows[0].device, "BatchNorm ")
        if problem is not None:
            return problem
    return None


def _rows_forward_impl(rows, bn, bn_parts, weight, bias, eps, out_dtype):
    m, c = rows[0].shape
    out = torch.empty((m, len(rows) * c), device=rows[0].device, dtype=out_dtype)
    mean = torch.empty((m,), device=rows[0].device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    block_m = _triton.rows_per_program(c, len(rows))
    _triton.wrap_triton(_rows_fwd_kernel)[_triton.grid(triton.cdiv(m, block_m))](
        *_three(rows), weight, bias, out, mean, rstd, *_bn_pointers(rows, bn, bn_parts), m, c, eps,
        PARTS=len(rows), BLOCK_M=block_m, BN=bn_parts, **_triton.row_tile(c, block_m),
    )
    return out, mean, rstd


@_triton.define_op("hifuse::layer_norm_cat_rows", mutates_args=())
def _rows_op(
    rows: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the concatenation of 1 to 3 (M, C) row-major parts: (out (M, parts x C)
    in out_dtype, mean, rstd (M,) float32)."""
    return _rows_forward_impl(rows, [], 0, weight, bias, eps, out_dtype)


@_triton.define_op("hifuse::layer_norm_cat_rows_bn", mutates_args=())
def _rows_bn_op(
    rows: list[torch.Tensor], bn: list[torch.Tensor], bn_parts: int, weight: torch.Tensor, bias: torch.Tensor,
    eps: float, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_cat_rows`` where the parts in the bit mask ``bn_parts`` are given as the
    input y of a training BatchNorm without activation, ``bn`` holding its (mean, invstd,
    weight, bias) for each, in order: each such part is ``hifuse::batch_norm_act(y, None, mean,
    invstd, weight, bias, 0, ...)``, applied on load (the same values), never written."""
    problem = _bn_problem(rows, bn, bn_parts)
    if problem is not None:
        raise ValueError(f"layer_norm_cat_rows_bn: {problem}")
    return _rows_forward_impl(rows, bn, bn_parts, weight, bias, eps, out_dtype)


def _rows_bwd_launch(c: int) -> dict:
    """Rows, channel block and warps of the backward: two values of each tile a thread (it
    holds about a dozen tiles across its loop)."""
    block_m = _triton.rows_per_program(c, BWD_TILES)
    block_c = _triton.block_channels(c)
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "num_warps": max(4, min(16, block_m * block_c // 64))}


def _rows_backward_impl(grad, rows, weight, mean, rstd, bias, rebuild_dtype, bn=(), bn_parts=0, sums=True,
                        ones=False):
    m, c = rows[0].shape
    rebuild = rebuild_dtype is not None
    pad = ONES_PAD if ones and rebuild else 0
    flags = dict(PARTS=len(rows), REBUILD=rebuild, BN=bn_parts, SUMS=sums, PAD=pad, **_rows_bwd_launch(c))
    if pad and _triton.block_channels(c + pad) > flags["BLOCK_C"]:
        # the last part's spare channel lanes write the ones column: where a row's block has
        # none (c a power of two), the same tile with half the rows and twice the channels, or
        # at one row a store of its own
        if flags["BLOCK_M"] > 1:
            flags["BLOCK_M"] //= 2
            flags["BLOCK_C"] *= 2
        else:
            flags["ONES_APART"] = True
    ptrs = _three(rows)
    bn_ptrs = _bn_pointers(rows, list(bn), bn_parts)
    out = torch.empty((m, len(rows) * c + pad) if rebuild else (0,), device=grad.device,
                      dtype=rebuild_dtype or grad.dtype)
    programs = _triton.reduction_programs(
        triton.cdiv(m, flags["BLOCK_M"]), 1, grad.device, kernel=_rows_bwd_kernel, launch=flags,
        args=(grad, *ptrs, weight, mean, rstd, *[rows[0].dtype] * 3, torch.float32, torch.float32, bias, out,
              *bn_ptrs, torch.float64 if bn_parts else grad.dtype, m, c, 2),
    )
    grads = [torch.empty_like(t) for t in rows]
    part = torch.empty((2, programs, len(rows) * c), device=grad.device, dtype=torch.float32)
    n_bn = bn_count(bn_parts) if sums else 0
    bn_part = torch.empty((2, programs, n_bn * c) if n_bn else (0,), device=grad.device, dtype=torch.float64)
    _triton.wrap_triton(_rows_bwd_kernel)[_triton.grid(programs)](
        grad, *ptrs, weight, mean, rstd, *_three(grads), part[0], part[1], bias, out, *bn_ptrs,
        bn_part if n_bn else grad, m, c, programs, **flags,
    )
    bn_sums = torch.empty((2, n_bn * c), device=grad.device, dtype=torch.float32)
    if n_bn:  # the partials added in a fixed order, as the BatchNorm's backward adds its own
        bna.combine_backward_sums(bn_part[0], bn_part[1], bn_sums[0], bn_sums[1])
    return grads, part.sum(1), out, bn_sums


# Ops that take a Tensor[] take every argument explicitly (torch 2.11, see the tests): the
# backward that rebuilds the output is an op of its own.
@_triton.define_op("hifuse::layer_norm_cat_rows_backward", mutates_args=())
def _rows_backward_op(
    grad: torch.Tensor, rows: list[torch.Tensor], weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The parts' gradients, and the weight's and bias's as one (2, parts x C) float32 tensor
    (one sum of the partials; ``rows_backward`` splits it)."""
    grads, params, _, _ = _rows_backward_impl(grad, rows, weight, mean, rstd, weight, None)
    return grads, params


@_triton.define_op("hifuse::layer_norm_cat_rows_backward_rebuild", mutates_args=())
def _rows_backward_rebuild_op(
    grad: torch.Tensor, rows: list[torch.Tensor], weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    bias: torch.Tensor, out_dtype: torch.dtype, ones: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``layer_norm_cat_rows_backward``'s outputs and the forward's output in ``out_dtype``, the
    same bits, written by the same pass (which needs the LayerNorm's bias for it); ``ones``:
    its rows ``ONES_PAD`` wider, the first extra column ones and the rest zeros, so that the
    weight-gradient GEMM over them also gives the bias gradient."""
    return _rows_backward_impl(grad, rows, weight, mean, rstd, bias, out_dtype, ones=ones)[:3]


@_triton.define_op("hifuse::layer_norm_cat_rows_bn_backward", mutates_args=())
def _rows_bn_backward_op(
    grad: torch.Tensor, rows: list[torch.Tensor], bn: list[torch.Tensor], bn_parts: int, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype, sums: bool,
    ones: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layer_norm_cat_rows_backward_rebuild`` of ``layer_norm_cat_rows_bn``: the gradients
    of the parts given as BatchNorm inputs are those of the BatchNorm outputs (the parts'
    values), and the fourth output holds the sums each such BatchNorm's backward reduces,
    which ``hifuse::batch_norm_act_backward_summed`` takes instead of reducing them again:
    (sum of dz / of dz * x_hat, BatchNorm parts x C) float32, a part's C columns in order
    (``sums`` False: not reduced, (2, 0)); ``ones`` as there."""
    problem = _bn_problem(rows, bn, bn_parts)
    if problem is not None:
        raise ValueError(f"layer_norm_cat_rows_bn_backward: {problem}")
    return _rows_backward_impl(grad, rows, weight, mean, rstd, bias, out_dtype, bn, bn_parts, sums, ones)


def rows_backward(grad, rows, weight, mean, rstd, bias=None, rebuild_dtype=None, ones: bool = False) -> tuple:
    """(the parts' gradients, dweight, dbias) of ``hifuse::layer_norm_cat_rows``, the last two
    in the weight's dtype; with ``rebuild_dtype`` (and ``bias``), and its output, rebuilt by the
    same pass (``hifuse::layer_norm_cat_rows_backward_rebuild``; ``ones``: with a ones column)."""
    if rebuild_dtype is None:
        grads, params = torch.ops.hifuse.layer_norm_cat_rows_backward(grad, rows, weight, mean, rstd)
        out = ()
    else:
        grads, params, out = torch.ops.hifuse.layer_norm_cat_rows_backward_rebuild(grad, rows, weight, mean, rstd,
                                                                                    bias, rebuild_dtype, ones)
        out = (out,)
    params = params.to(weight.dtype)
    return (list(grads), params[0], params[1], *out)


@_rows_op.register_fake
def _(rows, weight, bias, eps, out_dtype):
    m, c = rows[0].shape
    stat = rows[0].new_empty((m,), dtype=torch.float32)
    return rows[0].new_empty((m, len(rows) * c), dtype=out_dtype), stat, torch.empty_like(stat)


@_rows_backward_op.register_fake
def _(grad, rows, weight, mean, rstd):
    return [torch.empty_like(t) for t in rows], weight.new_empty((2, weight.shape[0]), dtype=torch.float32)


@_rows_backward_rebuild_op.register_fake
def _(grad, rows, weight, mean, rstd, bias, out_dtype, ones=False):
    m, c = rows[0].shape
    params = weight.new_empty((2, weight.shape[0]), dtype=torch.float32)
    out = grad.new_empty((m, len(rows) * c + (ONES_PAD if ones else 0)), dtype=out_dtype)
    return [torch.empty_like(t) for t in rows], params, out


@_rows_bn_op.register_fake
def _(rows, bn, bn_parts, weight, bias, eps, out_dtype):
    m, c = rows[0].shape
    stat = rows[0].new_empty((m,), dtype=torch.float32)
    return rows[0].new_empty((m, len(rows) * c), dtype=out_dtype), stat, torch.empty_like(stat)


@_rows_bn_backward_op.register_fake
def _(grad, rows, bn, bn_parts, weight, mean, rstd, bias, out_dtype, sums, ones=False):
    m, c = rows[0].shape
    params = weight.new_empty((2, weight.shape[0]), dtype=torch.float32)
    sums = grad.new_empty((2, bn_count(bn_parts) * c if sums else 0), dtype=torch.float32)
    out = grad.new_empty((m, len(rows) * c + (ONES_PAD if ones else 0)), dtype=out_dtype)
    return [torch.empty_like(t) for t in rows], params, out, sums


def _rows_setup(ctx, inputs, output):
    rows, weight, _bias, _eps, _out_dtype = inputs
    _out, mean, rstd = output
    ctx.num_parts = len(rows)
    ctx.save_for_backward(*rows, weight, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics


def _rows_backward(ctx, grad, _gm, _gr):
    saved = ctx.saved_tensors
    rows, (weight, mean, rstd) = list(saved[: ctx.num_parts]), saved[ctx.num_parts:]
    if grad is None:
        return None, None, None, None, None
    grads, dw, db = rows_backward(grad.contiguous(), rows, weight, mean, rstd)
    return grads, dw, db, None, None


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def rows_path(parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the Triton kernels take these parts: 1 to 3 channels-last parts of one width
    and a 16/32-bit float dtype, with weight and bias, on a device Triton runs on."""
    if triton is None or bias is None or not 1 <= len(parts) <= MAX_PARTS:
        return False
    first = parts[0]
    if first.dim() != 4 or not 0 < first.shape[1] <= ROWS_MAX_CHANNELS or first.dtype not in ROWS_DTYPES:
        return False
    for t in parts:
        if (t.shape != first.shape or t.dtype != first.dtype
                or not t.is_contiguous(memory_format=torch.channels_last)):
            return False
    total = len(parts) * first.shape[1]
    if weight.shape != (total,) or bias.shape != (total,) or not {weight.dtype, bias.dtype} <= set(ROWS_DTYPES):
        return False
    return _triton.unsupported_reason(*parts, weight, bias) is None


def forward(parts, weight, bias, eps: float, out_dtype: torch.dtype):
    """(the LayerNorm of the concatenation, (N, C, H, W) in out_dtype, channels-last where a
    part is; its statistics for ``backward``), by the Triton path where ``rows_path``, else
    the native op."""
    if rows_path(parts, weight, bias):
        n, c, h, w = parts[0].shape
        out, mean, rstd = torch.ops.hifuse.layer_norm_cat_rows([nhwc(t).view(-1, c) for t in parts], weight.contiguous(),
                                                               bias.contiguous(), float(eps), out_dtype)
        return out.view(n, h, w, len(parts) * c).permute(0, 3, 1, 2), (mean, rstd)
    out, mean, rstd = torch.ops.hifuse.layer_norm_cat(list(parts), weight, bias, float(eps), out_dtype)
    return out, (mean, rstd)


def rebuilds_in_backward(parts, weight, bias) -> bool:
    """Whether ``backward_rebuilding`` rebuilds the output in its own pass (the Triton path)."""
    return rows_path(parts, weight, bias)


def backward_rebuilding(grad_rows: torch.Tensor, parts, weight: torch.Tensor, bias: torch.Tensor, stats,
                        out_dtype: torch.dtype, ones: bool = False):
    """(``forward``'s output as (M, parts x C) rows, (the parts' gradients, weight's, bias's))
    for the output's gradient as rows ``grad_rows``: the output rebuilt by the backward's pass
    from what it reads anyway (``rebuilds_in_backward``), the same bits as ``forward``'s
    (``ones``: (M, parts x C + ONES_PAD) rows, a ones column after the output's columns, for a
    weight-gradient GEMM that gives its bias's gradient too)."""
    n, c, h, w = parts[0].shape
    dparts, dw, db, out = rows_backward(grad_rows.contiguous(), [nhwc(t).view(-1, c) for t in parts],
                                        weight.contiguous(), *stats, bias.contiguous(), out_dtype, ones)
    return out, ([t.view(n, h, w, c).permute(0, 3, 1, 2) for t in dparts], dw, db)


def forward_bn(parts, bn, bn_parts: int, weight, bias, eps: float, out_dtype: torch.dtype):
    """``forward`` where the parts in the bit mask ``bn_parts`` are given as the input y of a
    training BatchNorm without activation (``bn``: its mean, invstd, weight and bias for each
    such part, in order), applied on load (``hifuse::layer_norm_cat_rows_bn``); only where
    ``rows_path`` takes the parts."""
    if not rows_path(parts, weight, bias):
        raise ValueError("layer_norm_cat.forward_bn: the parts must be ones the Triton rows path takes (rows_path)")
    n, c, h, w = parts[0].shape
    out, mean, rstd = torch.ops.hifuse.layer_norm_cat_rows_bn(
        [nhwc(t).view(-1, c) for t in parts], list(bn), int(bn_parts), weight.contiguous(), bias.contiguous(),
        float(eps), out_dtype,
    )
    return out.view(n, h, w, len(parts) * c).permute(0, 3, 1, 2), (mean, rstd)


def backward_bn_rebuilding(grad_rows: torch.Tensor, parts, bn, bn_parts: int, weight: torch.Tensor,
                           bias: torch.Tensor, stats, out_dtype: torch.dtype, sums: bool = True,
                           ones: bool = False):
    """``backward_rebuilding`` of ``forward_bn`` (``ones`` as there), and (``sums``) the sums of
    the BatchNorm backward of each part given as a BatchNorm input (whose gradient is the
    BatchNorm output's)."""
    n, c, h, w = parts[0].shape
    dparts, params, out, sums = torch.ops.hifuse.layer_norm_cat_rows_bn_backward(
        grad_rows.contiguous(), [nhwc(t).view(-1, c) for t in parts], list(bn), int(bn_parts), weight.contiguous(),
        *stats, bias.contiguous(), out_dtype, bool(sums), bool(ones),
    )
    params = params.to(weight.dtype)
    return out, ([t.view(n, h, w, c).permute(0, 3, 1, 2) for t in dparts], params[0], params[1]), sums


def backward(grad: torch.Tensor, parts, weight: torch.Tensor, bias: torch.Tensor, stats):
    """(the parts' gradients, weight's, bias's) for ``forward``'s result's gradient ``grad``
    ((N, C, H, W)); ``stats`` as ``forward`` returned them."""
    if rows_path(parts, weight, bias):
        n, c, h, w = parts[0].shape
        rows = grad.permute(0, 2, 3, 1).reshape(n * h * w, -1)
        grads, dw, db = rows_backward(rows.contiguous(), [nhwc(t).view(-1, c) for t in parts], weight.contiguous(),
                                      *stats)
        return [t.view(n, h, w, c).permute(0, 3, 1, 2) for t in grads], dw, db
    dparts, dw, db = torch.ops.hifuse.layer_norm_cat_backward(grad, list(parts), weight, *stats)
    return list(dparts), dw, db


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
        problem = _parts_problem(parts, weight, bias)
        if problem is not None:
            raise problem[0](f"layer_norm_cat: {problem[1]}")
        if not rows_path(parts, weight, bias):
            _ext.require(OP)
        if out_dtype is not None and out_dtype not in (parts[0].dtype, torch.float32):
            raise TypeError(f"layer_norm_cat: out_dtype must be the parts' dtype or float32, got {out_dtype}")
    return forward(parts, weight, bias, eps, out_dtype_of(parts, weight, out_dtype))[0]
