"""Training-mode BatchNorm fused with what surrounds it, channels-last, in Triton.

In the fusion block every BatchNorm in training mode sits between elementwise work: the
1x1 convolutions' BatchNorm is followed by ReLU (Updim) or GELU (W3, W), and the IRMLP's
``bn1`` normalises ``gelu(conv1(x)) + x``. Eager runs the statistics and the normalisation
(cuDNN, two passes), then each elementwise op as its own pass, and keeps every
intermediate for backward. Here:

- a statistics pass computes, per program, the exact mean and M2 of its tile of rows
  (for ``bn1`` of ``gelu(y) + r``, computed on load: that sum is never written);
- the per-program partials are combined in a fixed order with Chan's formula (no atomics,
  numerically stable for large means), giving the batch mean, biased variance and inverse
  standard deviation; the same kernel updates the running statistics and
  ``num_batches_tracked`` (momentum as given), so a BatchNorm's statistics take two launches
  (eight small ops finished them before);
- an apply pass writes ``act(weight * x_hat + bias)``, only that; for ``Updim`` averaged
  over 2x2 windows on the way (the pooling that follows it), so the full-resolution
  activation is never written.

For ``bn1`` the residual r is the fusion block's norm3 output, float32 under autocast, which
conv1 takes in bf16: the ``_gated`` ops compute r on load from norm3's sources (the gated
l and g and the projection's BatchNorm input, bf16 past the first block) and row statistics,
as norm3's kernel computes it, so r is never written in float32 nor rebuilt in backward.

Backward recomputes x_hat and the activation's derivative from the saved input, reduces
``sum(dz)`` and ``sum(dz * x_hat)`` per program (then in a fixed order), and writes the input
gradient (for the ``gelu(y) + r`` prologue: the gradients of y and r). Running statistics
are updated as ``nn.BatchNorm2d`` updates them (momentum, unbiased variance,
``num_batches_tracked``; a cumulative average, momentum None, by ``update_running``'s ops).

Layers: reference, kernels, registered ops, autograd, functional entry point. Used by the
fusion block's fused ``ConvBN`` and ``IRMLP`` paths (``hifuse.fused.fusion_block``).
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

from . import _configs, _triton
from ._features import nhwc
from ._triton import tl, triton
from .reference import activation

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "sigmoid": 3}  # sigmoid: the spatial gate's
BLOCK_M = 64  # rows (pixels) per program
BLOCK_C = 64  # channels per program
# 8 elements of each tile per thread: 16 per thread took up to 134 registers, which leaves one
# 8-warp program per SM to hide memory latency.
WARPS = 16
# The pooled apply reads four input rows per output row, the backward passes several tensors
# per element: smaller tiles keep them under 128 registers (scripts/check_triton_compile.py).
POOL_BLOCK_M = 16
BWD_BLOCK_M = 32
# The combining kernels read the programs' (PROGRAMS, C) float64 partials, up to about 2000
# rows, from L2. A loop over one row at a time waits a load's latency a row (ptxas unrolls it
# four times); COMBINE_BLOCK partials loaded at once (8 a thread on 8 warps) wait one a tile.
# Their channel blocks are narrower than the passes' (16 float64: a 128-byte line a row), so
# that more programs share the reading.
COMBINE_WARPS = 8
COMBINE_BLOCK = 2048
COMBINE_BLOCK_C = 16
GATED_BLOCK_C = 32  # channels per program where the residual is computed on load (``_launch``)
# and bytes of y a thread loads at once there (four bf16 elements, two fp32): one element a
# thread (16 warps on 16 x 32 tiles) loaded each operand in 2- and 4-byte scalars, two
# programs of the reductions an SM; four load them in 8- and 16-byte vectors, and a bf16 step
# holds 6, 7 and 12 programs an SM of the statistics, backward reduce and backward apply (80,
# 72 and 40 registers under triton 3.8 and 3.6; four fp32 elements spilled in the statistics
# pass under 3.6)
GATED_LOAD_BYTES = 8

__all__ = ["apply_args", "batch_norm_act", "batch_norm_act_ref", "result_dtype", "unsupported_reason"]


def batch_norm_act_ref(x, bn: torch.nn.BatchNorm2d, act: str | None = None, residual=None, pool: bool = False):
    """What eager computes: act(bn(x)), or act(bn(gelu(x) + residual)) with a residual,
    then a 2x2/2 average pooling with ``pool``."""
    if residual is not None:
        x = F.gelu(x) + residual
    x = activation(act)(bn(x))
    return F.avg_pool2d(x, 2, stride=2) if pool else x


if triton is not None:
    from ._triton import centred, gelu, gelu_add, gelu_grad

    # Helpers that take pointers return loaded values only, never offsets or tiles: torch.compile
    # reads the kernels' TTIR to find what they write, and counts every pointer passed to a call
    # whose result reaches a store's address as written (scripts/check_kernel_writes.py).
    @triton.jit
    def _load_input(Y, R, offs, m, PROLOGUE: tl.constexpr):
        """The BatchNorm input of a tile in fp32: y, or gelu(y) + r."""
        v = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
        if PROLOGUE:
            v = gelu_add(v, tl.load(R + offs, mask=m, other=0.0).to(tl.float32))
        return v

    @triton.jit
    def _gated_residual(rows, c, m, cmask, M, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP,
                        BLOCK_C: tl.constexpr, X_BN: tl.constexpr, X_ACT: tl.constexpr):
        """The residual r of a tile, ``hifuse::gated_layer_norm(_bn)``'s result (norm3) over
        rows of S positions an image, in fp32, computed from its sources and row statistics as
        that op's forward computes it (the same bits; ``gated_layer_norm._gated_parts``, and
        the gated parts centred by one fused multiply-add, ``_triton.centred``): the
        tile's channels lie in one of its three parts of CP channels (BLOCK_C divides CP)."""
        k = (tl.program_id(1) * BLOCK_C) // CP
        cc = c - k * CP
        rmask = rows < M
        offs = rows[:, None] * CP + cc[None, :]
        mu = tl.load(LM + rows, mask=rmask, other=0.0)
        if k == 0:
            gate = tl.load(CG + (rows // S)[:, None] * CP + cc[None, :], mask=m, other=0.0).to(tl.float32)
            d = centred(tl.load(G + offs, mask=m, other=0.0).to(tl.float32), gate, mu[:, None])
        elif k == 1:
            gate = tl.load(SG + rows, mask=rmask, other=0.0).to(tl.float32)
            d = centred(tl.load(L + offs, mask=m, other=0.0).to(tl.float32), gate[:, None], mu[:, None])
        else:
            v = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
            if X_BN:
                mean, scale, shift = _affine(XM, XI, XW, XB, cc, cmask)
                v = _act(_affined(v, mean, scale, shift), X_ACT).to(
                    X.dtype.element_ty).to(tl.float32)
            d = v - mu[:, None]
        rstd = tl.load(LR + rows, mask=rmask, other=0.0)
        w = tl.load(LW + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(LB + c, mask=cmask, other=0.0).to(tl.float32)
        r = tl.fma(d * rstd[:, None], w[None, :], b[None, :])
        return tl.where(m, r.to(RD.dtype.element_ty).to(tl.float32), 0.0)

    @triton.jit
    def _tile(M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        return rows, c, cmask, (rows < M)[:, None] & cmask[None, :]

    @triton.jit
    def _affine(MEAN, INVSTD, W, B, c, cmask):
        """The apply's per-channel mean, scale invstd * weight and shift; its output is
        ``_act(_affined(v, mean, scale, shift))``. The ops that apply a BatchNorm on load
        (``layer_norm_cat``, ``gated_layer_norm``) take both from here: the same bits."""
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        scale = tl.load(INVSTD + c, mask=cmask, other=0.0) * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        shift = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        return mean, scale, shift

    @triton.jit
    def _affined(v, mean, scale, shift):
        """(v - mean) * scale + shift of a tile, its channels along axis 1, as one fused
        multiply-add (``_triton.gelu_add``'s reason): every kernel that applies a BatchNorm
        takes it from here, so a reader that applies one on load gets the apply pass's bits."""
        return tl.fma(v - mean[None, :], scale[None, :], shift[None, :])

    @triton.jit
    def _act(z, ACT: tl.constexpr):
        if ACT == 1:
            z = tl.where(z < 0.0, 0.0, z)  # not tl.maximum, which turns NaN into 0
        elif ACT == 2:
            z = gelu(z)
        elif ACT == 3:
            z = tl.sigmoid(z)
        return z

    @triton.jit
    def _act_grad(z, ACT: tl.constexpr):
        if ACT == 1:
            d = tl.where(z > 0.0, 1.0, 0.0)
        elif ACT == 2:
            d = gelu_grad(z)
        elif ACT == 3:
            y = tl.sigmoid(z)
            d = y * (1.0 - y)
        else:
            d = tl.full(z.shape, 1.0, tl.float32)
        return d

    @triton.jit
    def _grad_terms(grad, v, mean, invstd, w, b, m, ACT: tl.constexpr):
        """The backward's terms of a tile of its input v and its output's gradient: x_hat, and
        dz = grad * act'(z), z = x_hat * w + b (zero where masked; w and b unused without ACT).
        The ops that reduce a BatchNorm backward's sums in their own pass take them from here."""
        xhat = (v - mean[None, :]) * invstd[None, :]
        dz = grad * _act_grad(tl.fma(xhat, w[None, :], b[None, :]), ACT)
        return xhat, tl.where(m, dz, 0.0)

    @triton.jit
    def _load_grad(G, G2, rows, c, m, C, H, W, POOL: tl.constexpr, GRAD2: tl.constexpr):
        """The output gradient at full-resolution rows (with GRAD2, G + G2, from one set of
        offsets); with POOL, a quarter of the pooled row's gradient (zero for the odd last row or
        column that pooling drops)."""
        if POOL:
            ho = H // 2
            wo = W // 2
            w = rows % W
            h = (rows // W) % H
            n = rows // (W * H)
            ok = (h < 2 * ho) & (w < 2 * wo)
            q = (n * ho + h // 2) * wo + w // 2
            offs = q[:, None] * C + c[None, :]
            g = tl.load(G + offs, mask=m & ok[:, None], other=0.0).to(tl.float32)
            if GRAD2:
                g += tl.load(G2 + offs, mask=m & ok[:, None], other=0.0).to(tl.float32)
            g = g * 0.25
        else:
            g = tl.load(G + rows[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
            if GRAD2:
                g += tl.load(G2 + rows[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        return g

    # The reductions run on a fixed grid of PROGRAMS programs per channel block (about one wave
    # on the GPU, ``_triton.reduction_programs``): each loops over row blocks pid, pid + PROGRAMS,
    # ... with float64 tile accumulators and reduces them across its rows once, so a call writes
    # PROGRAMS partials, not one per row block. PROGRAMS is not specialised on (its value only
    # steps the loop), so the variant compiled to count the resident programs is the one launched.
    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _stats_kernel(Y, R, MEAN_PART, M2_PART, COUNT_PART, M, C, PROGRAMS,
                      PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      GATED: tl.constexpr = False, G=None, CG=None, L=None, SG=None, X=None, XM=None, XI=None,
                      XW=None, XB=None, LM=None, LR=None, LW=None, LB=None, RD=None, S=1, CP=1,
                      X_BN: tl.constexpr = False, X_ACT: tl.constexpr = 0):
        """Count, mean and M2 of this program's rows, in float64 (as eager's BatchNorm
        accumulates on a CPU): sums of the values shifted by its first block's mean, which
        keeps the sum of squares free of cancellation. GATED: the input is gelu(y) + r, r
        norm3's result computed on load (``_gated_residual``)."""
        pid = tl.program_id(0)
        lanes = tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        rows = pid.to(tl.int64) * BLOCK_M + lanes
        m = (rows < M)[:, None] & cmask[None, :]
        v = _load_input(Y, R, rows[:, None] * C + c[None, :], m, PROLOGUE)
        if GATED:
            r = _gated_residual(rows, c, m, cmask, M, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP,
                                BLOCK_C, X_BN, X_ACT)
            v = gelu_add(v, r)
        v = v.to(tl.float64)
        count = (rows < M).to(tl.float64)
        shift = tl.sum(v, 0) / tl.sum(count, 0)
        d = tl.where(m, v - shift[None, :], 0.0)
        total = d
        squares = d * d
        for b in range(pid + PROGRAMS, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows = (b * BLOCK_M + lanes).to(tl.int64)
            m = (rows < M)[:, None] & cmask[None, :]
            v = _load_input(Y, R, rows[:, None] * C + c[None, :], m, PROLOGUE)
            if GATED:
                r = _gated_residual(rows, c, m, cmask, M, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S,
                                    CP, BLOCK_C, X_BN, X_ACT)
                v = gelu_add(v, r)
            v = v.to(tl.float64)
            d = tl.where(m, v - shift[None, :], 0.0)
            total += d
            squares += d * d
            count += (rows < M).to(tl.float64)
        n = tl.sum(count, 0)
        s = tl.sum(total, 0)
        part = pid.to(tl.int64) * C + c
        tl.store(MEAN_PART + part, shift + s / n, mask=cmask)
        m2 = tl.sum(squares, 0) - s * s / n
        tl.store(M2_PART + part, tl.where(m2 < 0.0, 0.0, m2), mask=cmask)  # not tl.maximum: it drops NaN
        tl.store(COUNT_PART + pid, n, mask=tl.program_id(1) == 0)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _stats_combine_kernel(MEAN_PART, M2_PART, COUNT_PART, MEAN, INVSTD, VAR, RUN_MEAN, RUN_VAR, NBT, C, PROGRAMS,
                              eps, momentum, momentum_rest, UPDATE: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_P: tl.constexpr):
        """The programs' (count, mean, M2) combined: the count and mean as sums over all
        programs, then M2 as the sum of each program's M2 and its count times its mean's squared
        deviation from the whole mean, in float64, BLOCK_P programs' partials loaded at once and
        summed in a fixed order; the mean, biased variance and 1/sqrt(var + eps) written in
        float32; with UPDATE the running mean and unbiased variance moved by the momentum
        (``momentum`` + ``momentum_rest``: a float argument arrives in float32) in float64 and
        rounded once, as eager's CPU update is (its CUDA update rounds each of its float32
        products), and ``num_batches_tracked`` + 1."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        lanes = tl.arange(0, BLOCK_P)
        counts = tl.zeros((BLOCK_P,), dtype=tl.float64)
        sums = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float64)
        for p0 in range(0, PROGRAMS, BLOCK_P):
            p = p0 + lanes
            pmask = p < PROGRAMS
            k = tl.load(COUNT_PART + p, mask=pmask, other=0.0)
            mu = tl.load(MEAN_PART + p.to(tl.int64)[:, None] * C + c[None, :], mask=pmask[:, None] & cmask[None, :],
                         other=0.0)
            counts += k
            sums += k[:, None] * mu
        n = tl.sum(counts, 0)
        mean = tl.sum(sums, 0) / n
        squares = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float64)
        for p0 in range(0, PROGRAMS, BLOCK_P):
            p = p0 + lanes
            pmask = p < PROGRAMS
            m = pmask[:, None] & cmask[None, :]
            offs = p.to(tl.int64)[:, None] * C + c[None, :]
            k = tl.load(COUNT_PART + p, mask=pmask, other=0.0)
            d = tl.load(MEAN_PART + offs, mask=m, other=0.0) - mean[None, :]
            squares += tl.load(M2_PART + offs, mask=m, other=0.0) + k[:, None] * d * d
        m2 = tl.sum(squares, 0)
        mean32 = mean.to(tl.float32)
        var32 = (m2 / n).to(tl.float32)
        tl.store(MEAN + c, mean32, mask=cmask)
        tl.store(VAR + c, var32, mask=cmask)
        tl.store(INVSTD + c, 1.0 / tl.sqrt_rn(var32 + eps), mask=cmask)
        if UPDATE:
            rate = tl.cast(momentum, tl.float64) + tl.cast(momentum_rest, tl.float64)
            keep = 1.0 - rate
            running_mean = tl.load(RUN_MEAN + c, mask=cmask, other=0.0).to(tl.float64)
            running_var = tl.load(RUN_VAR + c, mask=cmask, other=0.0).to(tl.float64)
            tl.store(RUN_MEAN + c, (rate * mean + keep * running_mean).to(RUN_MEAN.dtype.element_ty), mask=cmask)
            tl.store(RUN_VAR + c, (rate * (m2 / (n - 1.0)) + keep * running_var).to(RUN_VAR.dtype.element_ty),
                     mask=cmask)
            tl.store(NBT, tl.load(NBT) + 1, mask=tl.program_id(0) == 0)

    @_triton.kernel
    def _apply_kernel(Y, R, MEAN, INVSTD, W, B, OUT, M, C,
                      PROLOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                      SHORTCUT: tl.constexpr = False, SC=None,
                      GATED: tl.constexpr = False, G=None, CG=None, L=None, SG=None, X=None, XM=None, XI=None,
                      XW=None, XB=None, LM=None, LR=None, LW=None, LB=None, RD=None, S=1, CP=1,
                      X_BN: tl.constexpr = False, X_ACT: tl.constexpr = 0):
        """SHORTCUT: writes SC + act(bn(.)), the sum of the result rounded to OUT's dtype and SC
        (of that dtype), as eager's add after the BatchNorm computes it. GATED as in
        ``_stats_kernel``."""
        rows, c, cmask, m = _tile(M, C, BLOCK_M, BLOCK_C)
        offs = rows[:, None] * C + c[None, :]
        v = _load_input(Y, R, offs, m, PROLOGUE)
        if GATED:
            r = _gated_residual(rows, c, m, cmask, M, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP,
                                BLOCK_C, X_BN, X_ACT)
            v = gelu_add(v, r)
        mean, scale, shift = _affine(MEAN, INVSTD, W, B, c, cmask)
        z = _affined(v, mean, scale, shift)
        out = _act(z, ACT).to(OUT.dtype.element_ty)
        if SHORTCUT:
            out = (out.to(tl.float32) + tl.load(SC + offs, mask=m, other=0.0).to(tl.float32)).to(OUT.dtype.element_ty)
        tl.store(OUT + offs, out, mask=m)

    @_triton.kernel
    def _apply_pool_kernel(Y, R, MEAN, INVSTD, W, B, OUT, Q, C, H, WIDTH,
                           PROLOGUE: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """act(bn(.)) averaged over 2x2 windows: only the pooled rows are written."""
        q, c, cmask, m = _tile(Q, C, BLOCK_M, BLOCK_C)
        ho = H // 2
        wo = WIDTH // 2
        n = q // (ho * wo)
        top = ((n * H + 2 * ((q // wo) % ho)) * WIDTH + 2 * (q % wo)).to(tl.int64)
        mean, scale, shift = _affine(MEAN, INVSTD, W, B, c, cmask)
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(2):
            for j in tl.static_range(2):
                v = _load_input(Y, R, (top + i * WIDTH + j)[:, None] * C + c[None, :], m, PROLOGUE)
                acc += _act(_affined(v, mean, scale, shift), ACT)
        tl.store(OUT + q[:, None] * C + c[None, :], (acc * 0.25).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _bwd_recompute(GR, Y, R, MEAN, INVSTD, W, B, rows, c, cmask, m, offs, M, C, H, WIDTH, PROLOGUE: tl.constexpr,
                       ACT: tl.constexpr, POOL: tl.constexpr, G2, GRAD2: tl.constexpr, BLOCK_C: tl.constexpr,
                       GATED: tl.constexpr, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP,
                       X_BN: tl.constexpr, X_ACT: tl.constexpr):
        """A tile's x_hat, dz = grad * act'(z), weight * invstd and the input, recomputed from the
        saved input; with GRAD2 the output's gradient is GR + G2 (two uses of it, summed on load)."""
        v = _load_input(Y, R, offs, m, PROLOGUE)
        if GATED:
            r = _gated_residual(rows, c, m, cmask, M, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP,
                                BLOCK_C, X_BN, X_ACT)
            v = gelu_add(v, r)
        mean = tl.load(MEAN + c, mask=cmask, other=0.0)
        invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
        grad = _load_grad(GR, G2, rows, c, m, C, H, WIDTH, POOL, GRAD2)
        xhat, dz = _grad_terms(grad, v, mean, invstd, w, b, m, ACT)
        return xhat, dz, w * invstd, v

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _bwd_reduce_kernel(GR, Y, R, MEAN, INVSTD, W, B, SUM_DZ_PART, SUM_DZXH_PART, OUT, M, C, H, WIDTH, PROGRAMS,
                           G2, PROLOGUE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, REBUILD: tl.constexpr = False,
                           GRAD2: tl.constexpr = False,
                           GATED: tl.constexpr = False, G=None, CG=None, L=None, SG=None, X=None, XM=None, XI=None,
                           XW=None, XB=None, LM=None, LR=None, LW=None, LB=None, RD=None, S=1, CP=1,
                           X_BN: tl.constexpr = False, X_ACT: tl.constexpr = 0):
        """With REBUILD (not with POOL) also writes the apply's output to OUT, computed as
        ``_apply_kernel`` computes it (the same bits), for a GEMM's weight gradient that reads
        it next: the pass that would rebuild it reads what this one reads. GRAD2: the output's
        gradient is GR + G2. GATED as in ``_stats_kernel``."""
        pid = tl.program_id(0)
        lanes = tl.arange(0, BLOCK_M)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        # float64 sums: the weight and bias gradients cancel over many rows
        sum_dz = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float64)
        sum_dzxh = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float64)
        if REBUILD:  # the apply's affine map, as _apply_kernel forms it
            mean, scale, shift = _affine(MEAN, INVSTD, W, B, c, cmask)
        for b in range(pid, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows = (b * BLOCK_M + lanes).to(tl.int64)
            m = (rows < M)[:, None] & cmask[None, :]
            offs = rows[:, None] * C + c[None, :]
            xhat, dz, _scale, v = _bwd_recompute(
                GR, Y, R, MEAN, INVSTD, W, B, rows, c, cmask, m, offs, M, C, H, WIDTH, PROLOGUE, ACT, POOL, G2, GRAD2,
                BLOCK_C, GATED, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP, X_BN, X_ACT,
            )
            if REBUILD:
                z = _affined(v, mean, scale, shift)
                tl.store(OUT + offs, _act(z, ACT).to(OUT.dtype.element_ty), mask=m)
            dz64 = dz.to(tl.float64)
            sum_dz += dz64
            sum_dzxh += dz64 * xhat.to(tl.float64)
        part = pid.to(tl.int64) * C + c
        tl.store(SUM_DZ_PART + part, tl.sum(sum_dz, 0), mask=cmask)
        tl.store(SUM_DZXH_PART + part, tl.sum(sum_dzxh, 0), mask=cmask)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _bwd_sums_kernel(SUM_DZ_PART, SUM_DZXH_PART, SUM_DZ, SUM_DZXH, DW, DB, C, PROGRAMS, BLOCK_C: tl.constexpr,
                         BLOCK_P: tl.constexpr, PARAMS: tl.constexpr = True):
        """The programs' partial sums added in a fixed order, BLOCK_P programs' loaded at once:
        the sums the apply pass takes (float32) and with PARAMS the weight and bias gradients
        (in their dtypes)."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        lanes = tl.arange(0, BLOCK_P)
        dz = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float64)
        dzxh = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float64)
        for p0 in range(0, PROGRAMS, BLOCK_P):
            p = p0 + lanes
            m = (p < PROGRAMS)[:, None] & cmask[None, :]
            offs = p.to(tl.int64)[:, None] * C + c[None, :]
            dz += tl.load(SUM_DZ_PART + offs, mask=m, other=0.0)
            dzxh += tl.load(SUM_DZXH_PART + offs, mask=m, other=0.0)
        dz = tl.sum(dz, 0).to(tl.float32)
        dzxh = tl.sum(dzxh, 0).to(tl.float32)
        tl.store(SUM_DZ + c, dz, mask=cmask)
        tl.store(SUM_DZXH + c, dzxh, mask=cmask)
        if PARAMS:
            tl.store(DW + c, dzxh.to(DW.dtype.element_ty), mask=cmask)
            tl.store(DB + c, dz.to(DB.dtype.element_ty), mask=cmask)

    @_triton.kernel
    def _bwd_apply_kernel(GR, Y, R, MEAN, INVSTD, W, B, SUM_DZ, SUM_DZXH, DY, DR, M, C, H, WIDTH, G2,
                          PROLOGUE: tl.constexpr, ACT: tl.constexpr, POOL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GRAD2: tl.constexpr = False,
                          GATED: tl.constexpr = False, G=None, CG=None, L=None, SG=None, X=None, XM=None, XI=None,
                          XW=None, XB=None, LM=None, LR=None, LW=None, LB=None, RD=None, S=1, CP=1,
                          X_BN: tl.constexpr = False, X_ACT: tl.constexpr = 0):
        """dy (and with PROLOGUE or GATED the residual's gradient); GRAD2 and GATED as in
        ``_bwd_reduce_kernel``."""
        rows, c, cmask, m = _tile(M, C, BLOCK_M, BLOCK_C)
        offs = rows[:, None] * C + c[None, :]
        xhat, dz, scale, _v = _bwd_recompute(
            GR, Y, R, MEAN, INVSTD, W, B, rows, c, cmask, m, offs, M, C, H, WIDTH, PROLOGUE, ACT, POOL, G2, GRAD2,
            BLOCK_C, GATED, G, CG, L, SG, X, XM, XI, XW, XB, LM, LR, LW, LB, RD, S, CP, X_BN, X_ACT,
        )
        sum_dz = tl.load(SUM_DZ + c, mask=cmask, other=0.0)
        sum_dzxh = tl.load(SUM_DZXH + c, mask=cmask, other=0.0)
        dv = scale[None, :] * (dz - (sum_dz[None, :] + xhat * sum_dzxh[None, :]) / M)
        if PROLOGUE or GATED:
            tl.store(DR + offs, dv.to(DR.dtype.element_ty), mask=m)
            y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
            dv = dv * gelu_grad(y)
        tl.store(DY + offs, dv.to(DY.dtype.element_ty), mask=m)




def _shape_class(y: torch.Tensor, residual: torch.Tensor | None, pool: bool, gated: dict | None = None) -> str:
    """The launch table's shape class of a BatchNorm over rows y (M, C)."""
    return f"{_configs.dtype_name(y.dtype)}/c{y.shape[1]}" + ("/res" if residual is not None else "") + (
        "/gated" if gated else "") + ("/pool" if pool else "")


def _tile_problem(config: dict) -> str | None:
    return _configs.power_of_two_problem(config, "BLOCK_M", "BLOCK_C", high=1024)


def device_tile(block_m: int, c: int) -> dict:
    """The GPU's tile over c channels: ``block_m`` rows x BLOCK_C channels, or where c is
    narrower (the spatial gate's BatchNorm has one channel) a channel block that fits c and as
    many more rows, up to 1024, so masked lanes do not make up the tile."""
    block_c = min(BLOCK_C, _triton.next_power_of_2(c))
    return dict(BLOCK_M=min(1024, block_m * (BLOCK_C // block_c)), BLOCK_C=block_c)


def _launch(name: str, rows: int, y: torch.Tensor, residual: torch.Tensor | None, pool: bool,
            block_m: int = BLOCK_M, gated: dict | None = None) -> dict:
    """BLOCK_M, BLOCK_C and num_warps of launch ``name`` over ``rows`` rows: the GPU's tile of
    ``block_m`` rows (``device_tile``), or the launch table's for this device and shape, or a
    wide one. ``gated``: the GATED arguments, whose parts of CP channels each tile's channels
    lie in: a table entry's channel block must divide CP; the default's is halved until it
    does, and to at most GATED_BLOCK_C on a GPU, where the statistics pass also takes a quarter
    of its rows and the backward half (computing r on load takes registers: 64 x 64 tiles
    spilled in the statistics pass, and under triton 3.6 32 x 32 ones too, as did 32 x 32 in
    the backward's rebuilding pass), and as many warps as give each thread GATED_LOAD_BYTES of y
    (``gated_tile``)."""
    c = y.shape[1]
    if _triton.wide():
        block_c = _triton.block_channels(c)
        launch = dict(BLOCK_M=min(_triton.next_power_of_2(rows), _triton.wide_rows(block_c)), BLOCK_C=block_c,
                      num_warps=WARPS)
        if gated:
            while gated["CP"] % launch["BLOCK_C"]:
                launch = dict(launch, BLOCK_C=launch["BLOCK_C"] // 2)
        return launch
    default = dict(**device_tile(block_m, c), num_warps=WARPS)
    kernel, shape_class = f"batch_norm_act.{name}", _shape_class(y, residual, pool, gated)
    if not gated:
        return _configs.launch_config(kernel, shape_class, default, y.device, _tile_problem)
    cp = gated["CP"]

    def problem(config):
        if cp % config["BLOCK_C"]:
            return f"BLOCK_C={config['BLOCK_C']} must divide the {cp} channels of each part of the residual"
        return _tile_problem(config)

    return _configs.launch_config(kernel, shape_class, gated_tile(name, default, cp, y.element_size()), y.device,
                                  problem)


def gated_tile(name: str, tile: dict, cp: int, itemsize: int) -> dict:
    """The GPU's default tile of launch ``name`` where r is computed on load from parts of
    ``cp`` channels, from the ungated ``tile``, for y of ``itemsize`` bytes an element (``_launch``)."""
    block_c = tile["BLOCK_C"]
    while cp % block_c or block_c > GATED_BLOCK_C:
        block_c //= 2
    block_m = max(1, tile["BLOCK_M"] // {"stats": 4, "backward": 2}.get(name, 1))
    return dict(BLOCK_M=block_m, BLOCK_C=block_c,
                num_warps=max(1, min(WARPS, block_m * block_c * itemsize // (32 * GATED_LOAD_BYTES))))


def _grid(rows: int, c: int, launch: dict) -> tuple[int, int]:
    return _triton.grid(triton.cdiv(rows, launch["BLOCK_M"]), triton.cdiv(c, launch["BLOCK_C"]))


def result_dtype(y: torch.Tensor, residual: torch.Tensor | None, out_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of hifuse::batch_norm_act's result."""
    if out_dtype is not None:
        return out_dtype
    return y.dtype if residual is None else torch.promote_types(y.dtype, residual.dtype)


@_triton.define_op("hifuse::batch_norm_stats", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _stats_op(
    y: torch.Tensor, residual: torch.Tensor | None, eps: float, running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None, num_batches_tracked: torch.Tensor | None, momentum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch mean, 1/sqrt(var + eps) and biased variance (fp32, (C,)) of y or gelu(y) +
    residual, rows (M, C); with the running tensors given, those updated with ``momentum``."""
    return _stats_impl(y, residual, eps, running_mean, running_var, num_batches_tracked, momentum)


def _stats_impl(y, residual, eps, running_mean, running_var, num_batches_tracked, momentum, gated=None):
    """``gated``: the kernels' GATED arguments (``_gated_args``), residual None."""
    m, c = y.shape
    launch = dict(_launch("stats", m, y, residual, False, gated=gated), PROLOGUE=residual is not None)
    grid = _grid(m, c, launch)
    r = y if residual is None else residual
    gated = gated or {}
    programs = _triton.reduction_programs(grid[0], grid[1], y.device, kernel=_stats_kernel,
                                          args=(y, r, *[torch.float64] * 3, m, c, grid[0]),
                                          launch={**launch, **_kinds(gated)})
    mean_part = torch.empty((programs, c), device=y.device, dtype=torch.float64)
    m2_part = torch.empty_like(mean_part)
    count_part = torch.empty(programs, device=y.device, dtype=torch.float64)
    _triton.wrap_triton(_stats_kernel)[(programs, grid[1])](
        y, r, mean_part, m2_part, count_part, m, c, programs, **launch, **gated
    )
    mean = torch.empty(c, device=y.device, dtype=torch.float32)
    invstd, var = torch.empty_like(mean), torch.empty_like(mean)
    update = running_mean is not None
    blocks, combine = combine_launch(c)
    _triton.wrap_triton(_stats_combine_kernel)[(blocks,)](
        mean_part, m2_part, count_part, mean, invstd, var, running_mean if update else mean,
        running_var if update else var, num_batches_tracked if update else count_part, c, programs, eps,
        *_float32_pair(momentum), UPDATE=update, **combine,
    )
    return mean, invstd, var


def _float32_pair(value: float) -> tuple[float, float]:
    """``value`` as float32 and the float32 rest: their sum in float64 is ``value`` to 2^-48."""
    high = struct.unpack("f", struct.pack("f", value))[0]  # no tensor: no launch, no graph node
    return high, value - high


def _pooled_rows(m: int, height: int, width: int) -> int:
    return m // (height * width) * (height // 2) * (width // 2)


@_triton.define_op("hifuse::batch_norm_act", mutates_args=())
def _apply_op(
    y: torch.Tensor, residual: torch.Tensor | None, mean: torch.Tensor, invstd: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, act: int, height: int, width: int, pool: bool,
    out_dtype: torch.dtype | None, shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(bn(y)) (or act(bn(gelu(y) + residual))) with the given batch statistics, rows (M, C)
    in, (M, C) out (``pool``: averaged over 2x2 windows of the height x width maps); with
    ``shortcut`` (rows of the result's shape and dtype, not with ``pool``) shortcut + that, as
    eager's add after the BatchNorm: the BatchNorm's result is never written."""
    return _apply_impl(y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype, shortcut)


def _apply_impl(y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype, shortcut=None,
                gated=None, r_dtype=None):
    """``gated``: the kernels' GATED arguments (``_gated_args``) of a residual of ``r_dtype``,
    residual None (not with ``pool``)."""
    m, c = y.shape
    r = y if residual is None else residual
    if shortcut is not None:
        problem = _shortcut_problem(y, residual, out_dtype, pool, shortcut)
        if problem is not None:
            raise ValueError(f"batch_norm_act: {problem}")
    flags = dict(PROLOGUE=residual is not None, ACT=act)
    if pool:
        q = _pooled_rows(m, height, width)
        out = torch.empty((q, c), device=y.device, dtype=result_dtype(y, residual, out_dtype))
        launch = _launch("apply_pool", q, y, residual, True, POOL_BLOCK_M)
        _triton.wrap_triton(_apply_pool_kernel)[_grid(q, c, launch)](
            y, r, mean, invstd, weight, bias, out, q, c, height, width, **flags, **launch
        )
        return out
    if gated is None:
        dtype = result_dtype(y, residual, out_dtype)
    else:
        dtype = out_dtype or torch.promote_types(y.dtype, r_dtype)
    out = torch.empty((m, c), device=y.device, dtype=dtype)
    launch = _launch("apply", m, y, residual, False, gated=gated)
    _triton.wrap_triton(_apply_kernel)[_grid(m, c, launch)](
        y, r, mean, invstd, weight, bias, out, m, c, **flags, **launch, SHORTCUT=shortcut is not None,
        SC=y if shortcut is None else shortcut, **(gated or {}),
    )
    return out


def affine_problem(mean, invstd, weight, bias, c: int, device, name: str = "") -> str | None:
    """Why (mean, invstd, weight, bias) cannot be a training BatchNorm's batch statistics and
    parameters for an apply over c channels on ``device`` (what the ops that apply one on load
    take), or None; ``name`` prefixes each in the message."""
    for part, t in (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias)):
        if t.shape != (c,) or not t.is_contiguous() or t.device != device:
            return f"{name}{part} must be a contiguous ({c},) vector on {device}, got {tuple(t.shape)}"
    if mean.dtype != torch.float32 or invstd.dtype != torch.float32:
        return f"{name}mean and {name}invstd must be float32"
    return None


def _shortcut_problem(y, residual, out_dtype, pool, shortcut) -> str | None:
    dtype = result_dtype(y, residual, out_dtype)
    if pool:
        return "a shortcut is not added to a pooled result"
    if shortcut.shape != y.shape or shortcut.dtype != dtype or not shortcut.is_contiguous():
        return (f"shortcut must be contiguous {dtype} rows of shape {tuple(y.shape)}, got {shortcut.dtype} "
                f"{tuple(shortcut.shape)}")
    if shortcut.device != y.device:
        return f"shortcut must be on {y.device}, got {shortcut.device}"
    return None


@_triton.define_op("hifuse::batch_norm_act_backward", mutates_args=())
def _backward_op(
    grad: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None, mean: torch.Tensor,
    invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int, height: int, width: int,
    pool: bool, rebuild_dtype: torch.dtype | None = None, grad2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dresidual, dweight, dbias, rebuilt): rebuilt, with ``rebuild_dtype`` (else empty; not
    with ``pool``): ``hifuse::batch_norm_act``'s result in that dtype, the same bits, written by the
    pass that reduces (for a GEMM's weight gradient that would otherwise rebuild it first).
    ``grad2`` (grad's shape and dtype): a second gradient of the result, from another use of
    it, added to grad on load."""
    return _backward_impl(grad, y, residual, mean, invstd, weight, bias, act, height, width, pool, rebuild_dtype,
                          grad2)


def _backward_impl(grad, y, residual, mean, invstd, weight, bias, act, height, width, pool, rebuild_dtype=None,
                   grad2=None, gated=None, r_dtype=None):
    """``gated``: the kernels' GATED arguments (``_gated_args``) of a residual of ``r_dtype``,
    residual None (not with ``pool``); dresidual then comes as (M, C) rows of that dtype."""
    m, c = y.shape
    r = y if residual is None else residual
    rebuild = rebuild_dtype is not None
    if rebuild and pool:
        raise ValueError("batch_norm_act_backward: the pooled apply is not rebuilt")
    if grad2 is not None and (grad2.shape != grad.shape or grad2.dtype != grad.dtype or not grad2.is_contiguous()
                              or grad2.device != grad.device):
        raise ValueError(f"batch_norm_act_backward: grad2 must be contiguous {grad.dtype} of grad's shape "
                         f"{tuple(grad.shape)} on {grad.device}, got {grad2.dtype} {tuple(grad2.shape)}")
    g2 = grad if grad2 is None else grad2
    flags = dict(PROLOGUE=residual is not None, ACT=act, POOL=pool, **_launch("backward", m, y, residual, pool,
                                                                              BWD_BLOCK_M, gated))
    grid = _grid(m, c, flags)
    gated = gated or {}
    rebuilt = torch.empty((m, c) if rebuild else (0,), device=y.device, dtype=rebuild_dtype or y.dtype)
    programs = _triton.reduction_programs(
        grid[0], grid[1], y.device, kernel=_bwd_reduce_kernel,
        args=(grad, y, r, mean, invstd, weight, bias, torch.float64, torch.float64, rebuilt, m, c, height, width,
              grid[0], g2),
        launch={**flags, "REBUILD": rebuild, "GRAD2": grad2 is not None, **_kinds(gated)},
    )
    sum_dz_part = torch.empty((programs, c), device=y.device, dtype=torch.float64)
    sum_dzxh_part = torch.empty_like(sum_dz_part)
    _triton.wrap_triton(_bwd_reduce_kernel)[(programs, grid[1])](
        grad, y, r, mean, invstd, weight, bias, sum_dz_part, sum_dzxh_part, rebuilt, m, c, height, width, programs,
        g2, **flags, REBUILD=rebuild, GRAD2=grad2 is not None, **gated,
    )
    sum_dz = torch.empty(c, device=y.device, dtype=torch.float32)
    sum_dzxh = torch.empty_like(sum_dz)
    dw, db = torch.empty_like(weight), torch.empty_like(bias)
    blocks, combine = combine_launch(c)
    _triton.wrap_triton(_bwd_sums_kernel)[(blocks,)](
        sum_dz_part, sum_dzxh_part, sum_dz, sum_dzxh, dw, db, c, programs, **combine,
    )
    dy = torch.empty_like(y)
    if gated:
        dr = torch.empty((m, c), device=y.device, dtype=r_dtype)
    else:
        dr = torch.empty_like(r) if residual is not None else torch.empty(0, device=y.device, dtype=y.dtype)
    _triton.wrap_triton(_bwd_apply_kernel)[grid](
        grad, y, r, mean, invstd, weight, bias, sum_dz, sum_dzxh, dy, dr, m, c, height, width, g2, **flags,
        GRAD2=grad2 is not None, **gated,
    )
    return dy, dr, dw, db, rebuilt


def combine_backward_sums(sum_dz_part: torch.Tensor, sum_dzxh_part: torch.Tensor, sum_dz: torch.Tensor,
                          sum_dzxh: torch.Tensor) -> None:
    """Adds (programs, C) float64 partials of the backward's sums over the programs in a fixed
    order into float32 (C,) ``sum_dz`` and ``sum_dzxh``, as the backward adds its own (for a
    pass of another op that reduced them, ``layer_norm_cat_rows_bn_backward``)."""
    programs, c = sum_dz_part.shape
    blocks, combine = combine_launch(c)
    _triton.wrap_triton(_bwd_sums_kernel)[(blocks,)](
        sum_dz_part, sum_dzxh_part, sum_dz, sum_dzxh, sum_dz, sum_dz, c, programs, PARAMS=False, **combine,
    )


def combine_launch(c: int) -> tuple[int, dict]:
    """Programs and launch options of the kernels combining the passes' (programs, C)
    partials."""
    block_c = min(COMBINE_BLOCK_C, _triton.next_power_of_2(c))
    return triton.cdiv(c, block_c), dict(BLOCK_C=block_c, BLOCK_P=COMBINE_BLOCK // block_c,
                                         num_warps=COMBINE_WARPS)


# The IRMLP's bn1 normalises gelu(y) + r, r the fusion block's norm3 output (float32 under
# autocast, 3C channels). Read as a tensor, r is written by norm3, read by the statistics and
# apply passes, rebuilt in backward and read by both backward passes; the GATED ops below
# compute it on load from norm3's sources instead (bf16 where the blocks are) and its row
# statistics, so r is never written.
GATED_SOURCES = ("g", "channel_gate", "l", "spatial_gate", "x", "ln_mean", "ln_rstd", "ln_weight", "ln_bias")


def _gated_args(gated: list[torch.Tensor], x_act: int, r_dtype: torch.dtype) -> dict:
    """The kernels' GATED arguments from ``gated`` (``gated_problem``'s list)."""
    g, channel_gate, l, spatial_gate, x, ln_mean, ln_rstd, ln_weight, ln_bias, *x_bn = gated
    n, s, cp = g.shape
    rd = torch.empty(0, device=g.device, dtype=r_dtype)  # its dtype only: r is rounded to it
    xm, xi, xw, xb = x_bn or [x] * 4
    return dict(GATED=True, G=g, CG=channel_gate, L=l, SG=spatial_gate, X=x, XM=xm, XI=xi, XW=xw, XB=xb, LM=ln_mean,
                LR=ln_rstd, LW=ln_weight, LB=ln_bias, RD=rd, S=s, CP=cp, X_BN=bool(x_bn), X_ACT=x_act)


def _kinds(kwargs: dict) -> dict:
    """Keyword arguments as the compile that counts resident programs takes them (tensors as
    dtypes: its cache is keyed on them)."""
    return {k: v.dtype if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def gated_problem(y: torch.Tensor, gated, x_act: int, r_dtype) -> str | None:
    """Why ``gated`` cannot be the source of the residual of a BatchNorm over rows y, or None
    (the ``_gated`` ops take it as ``gated_sources``):
    ``gated`` is [g, channel_gate, l, spatial_gate, x, ln_mean, ln_rstd, ln_weight, ln_bias]
    as ``hifuse::gated_layer_norm`` takes them (g, l, x contiguous (N, S, C); the gates (N, C)
    and (N, S)), its (N, S) float32 mean and rstd, and, where x is the input of a BatchNorm
    applied on load (``hifuse::gated_layer_norm_bn``), that BatchNorm's mean, invstd, weight
    and bias after them; y's rows are the N * S positions, its channels the 3C of r."""
    if not isinstance(gated, (list, tuple)) or len(gated) not in (9, 13) or not all(
            isinstance(t, torch.Tensor) for t in gated):
        return "gated must be 9 tensors, or 13 with x's BatchNorm (x_mean, x_invstd, x_weight and x_bias)"
    g = gated[0]
    if g.dim() != 3:
        return f"g must be (N, S, C), got {tuple(g.shape)}"
    n, s, cp = g.shape
    shapes = dict(zip(GATED_SOURCES, ((n, s, cp), (n, cp), (n, s, cp), (n, s), (n, s, cp), (n, s), (n, s),
                                      (3 * cp,), (3 * cp,))))
    for name, t in zip(GATED_SOURCES, gated):
        if t.shape != shapes[name]:
            return f"{name} must be {shapes[name]} (g is (N, S, C)), got {tuple(t.shape)}"
        if not t.is_contiguous() or t.device != y.device:
            layout = "" if t.is_contiguous() else "strided, "
            return f"{name} must be contiguous and on {y.device}, got {layout}{t.device}"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
    if gated[5].dtype != torch.float32 or gated[6].dtype != torch.float32:
        return "ln_mean and ln_rstd must be float32"
    if y.shape != (n * s, 3 * cp):
        return f"y must be ({n * s}, {3 * cp}) rows of the sources' positions, got {tuple(y.shape)}"
    if len(gated) == 13:
        problem = affine_problem(*gated[9:], cp, y.device, "x_")
        if problem is not None:
            return problem
    if x_act not in ACTIVATIONS.values():
        return f"x_act must be one of {sorted(ACTIVATIONS.values())}, got {x_act}"
    if r_dtype not in SUPPORTED_DTYPES:
        return f"r_dtype must be float32, float16 or bfloat16, got {r_dtype}"
    return None


def _check_gated(name: str, y, gated, x_act, r_dtype) -> None:
    problem = gated_problem(y, gated, x_act, r_dtype)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")


def gated_sources(gated: list, x_act: int, r_dtype: torch.dtype) -> tuple:
    """The arguments that stand for the residual in the ``_gated`` ops, from ``gated``
    (``gated_problem``'s list): its tensors (x's BatchNorm None where there is none), x_act and
    r_dtype. (One by one, not a Tensor[]: beside a list, optional arguments break an op's
    autograd under torch 2.11.)"""
    return (*gated[:9], *(gated[9:] or [None] * 4), x_act, r_dtype)


def _gated_kernel_args(name: str, y: torch.Tensor, sources: tuple, x_act: int, r_dtype: torch.dtype) -> dict:
    """The kernels' GATED arguments (``_gated_args``) of a ``_gated`` op's 13 residual
    sources (``gated_sources``' tensors), checked (``gated_problem``) in the op's ``name``."""
    tensors, x_bn = list(sources[:9]), list(sources[9:])
    # all four or none (a None left in makes gated_problem refuse a partial BatchNorm)
    gated = tensors if all(t is None for t in x_bn) else tensors + x_bn
    _check_gated(name, y, gated, x_act, r_dtype)
    return _gated_args(gated, x_act, r_dtype)


@_triton.define_op("hifuse::batch_norm_stats_gated",
                   mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def _stats_gated_op(
    y: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor, spatial_gate: torch.Tensor,
    x: torch.Tensor, ln_mean: torch.Tensor, ln_rstd: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    x_mean: torch.Tensor | None, x_invstd: torch.Tensor | None, x_weight: torch.Tensor | None,
    x_bias: torch.Tensor | None, x_act: int, r_dtype: torch.dtype, eps: float, running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None, num_batches_tracked: torch.Tensor | None, momentum: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hifuse::batch_norm_stats`` of gelu(y) + r, r norm3's result in ``r_dtype`` computed
    on load from its sources (``gated_sources``; ``gated_problem``): the same values as with r
    given."""
    gated = _gated_kernel_args("batch_norm_stats_gated", y, (g, channel_gate, l, spatial_gate, x, ln_mean, ln_rstd,
                               ln_weight, ln_bias, x_mean, x_invstd, x_weight, x_bias), x_act, r_dtype)
    return _stats_impl(y, None, eps, running_mean, running_var, num_batches_tracked, momentum, gated)


@_triton.define_op("hifuse::batch_norm_act_gated", mutates_args=())
def _apply_gated_op(
    y: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor, spatial_gate: torch.Tensor,
    x: torch.Tensor, ln_mean: torch.Tensor, ln_rstd: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    x_mean: torch.Tensor | None, x_invstd: torch.Tensor | None, x_weight: torch.Tensor | None,
    x_bias: torch.Tensor | None, x_act: int, r_dtype: torch.dtype, mean: torch.Tensor, invstd: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor, act: int, out_dtype: torch.dtype | None,
) -> torch.Tensor:
    """``hifuse::batch_norm_act`` of gelu(y) + r, r as in ``hifuse::batch_norm_stats_gated``
    (no pooling). No autograd of its own: its backward is ``batch_norm_act_gated_backward``,
    whose residual gradient goes to norm3's backward (``recompute.BatchNormApplyGated``)."""
    gated = _gated_kernel_args("batch_norm_act_gated", y, (g, channel_gate, l, spatial_gate, x, ln_mean, ln_rstd,
                               ln_weight, ln_bias, x_mean, x_invstd, x_weight, x_bias), x_act, r_dtype)
    return _apply_impl(y, None, mean, invstd, weight, bias, act, 1, 1, False, out_dtype, gated=gated, r_dtype=r_dtype)


@_triton.define_op("hifuse::batch_norm_act_gated_backward", mutates_args=())
def _backward_gated_op(
    grad: torch.Tensor, y: torch.Tensor, g: torch.Tensor, channel_gate: torch.Tensor, l: torch.Tensor,
    spatial_gate: torch.Tensor, x: torch.Tensor, ln_mean: torch.Tensor, ln_rstd: torch.Tensor,
    ln_weight: torch.Tensor, ln_bias: torch.Tensor, x_mean: torch.Tensor | None, x_invstd: torch.Tensor | None,
    x_weight: torch.Tensor | None, x_bias: torch.Tensor | None, x_act: int, r_dtype: torch.dtype,
    mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, act: int,
    rebuild_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dr, dweight, dbias, rebuilt) of ``hifuse::batch_norm_act_gated``, as
    ``hifuse::batch_norm_act_backward`` gives them with r given: dr as (M, 3C) rows of
    ``r_dtype``, rebuilt with ``rebuild_dtype`` (else empty)."""
    gated = _gated_kernel_args("batch_norm_act_gated_backward", y, (g, channel_gate, l, spatial_gate, x, ln_mean,
                               ln_rstd, ln_weight, ln_bias, x_mean, x_invstd, x_weight, x_bias), x_act, r_dtype)
    return _backward_impl(grad, y, None, mean, invstd, weight, bias, act, 1, 1, False, rebuild_dtype, None, gated,
                          r_dtype)


@_stats_gated_op.register_fake
def _(y, *args):
    return tuple(y.new_empty((y.shape[1],), dtype=torch.float32) for _ in range(3))


@_apply_gated_op.register_fake
def _(y, *args):
    r_dtype, out_dtype = args[14], args[-1]
    return y.new_empty(y.shape, dtype=out_dtype or torch.promote_types(y.dtype, r_dtype))


@_backward_gated_op.register_fake
def _(grad, y, *args):
    r_dtype = args[14]
    rebuild_dtype = args[20] if len(args) > 20 else None
    rebuilt = y.new_empty(y.shape if rebuild_dtype is not None else (0,), dtype=rebuild_dtype or y.dtype)
    return torch.empty_like(y), y.new_empty(y.shape, dtype=r_dtype), torch.empty_like(args[17]), torch.empty_like(
        args[18]), rebuilt


@_triton.define_op("hifuse::batch_norm_act_backward_summed", mutates_args=())
def _backward_summed_op(
    grad: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor,
    bias: torch.Tensor, sum_dz: torch.Tensor, sum_dzxh: torch.Tensor, act: int, height: int, width: int,
    pool: bool,
) -> torch.Tensor:
    """dy of ``hifuse::batch_norm_act_backward`` (no residual) given its sums,
    ``sum_dz`` = colsum(dz) and ``sum_dzxh`` = colsum(dz * x_hat) in float32, reduced by a pass
    that read grad and y anyway (``layer_norm_cat_rows_bn_backward``): the apply pass alone.
    The weight's and bias's gradients are those sums, in their dtypes."""
    m, c = y.shape
    for name, t in (("sum_dz", sum_dz), ("sum_dzxh", sum_dzxh)):
        if t.shape != (c,) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"batch_norm_act_backward_summed: {name} must be a contiguous float32 ({c},) vector, "
                             f"got {t.dtype} {tuple(t.shape)}")
    flags = dict(PROLOGUE=False, ACT=act, POOL=pool, **_launch("backward", m, y, None, pool, BWD_BLOCK_M))
    grid = _grid(m, c, flags)
    dy = torch.empty_like(y)
    _triton.wrap_triton(_bwd_apply_kernel)[grid](
        grad, y, y, mean, invstd, weight, bias, sum_dz, sum_dzxh, dy, dy, m, c, height, width, grad, **flags,
    )
    return dy


@_backward_summed_op.register_fake
def _(grad, y, mean, invstd, weight, bias, sum_dz, sum_dzxh, act, height, width, pool):
    return torch.empty_like(y)


@_stats_op.register_fake
def _(y, residual, eps, running_mean, running_var, num_batches_tracked, momentum):
    c = y.shape[1]
    return tuple(y.new_empty((c,), dtype=torch.float32) for _ in range(3))


@_apply_op.register_fake
def _(y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype, shortcut=None):
    rows = _pooled_rows(y.shape[0], height, width) if pool else y.shape[0]
    return y.new_empty((rows, y.shape[1]), dtype=result_dtype(y, residual, out_dtype))


@_backward_op.register_fake
def _(grad, y, residual, mean, invstd, weight, bias, act, height, width, pool, rebuild_dtype=None, grad2=None):
    dr = torch.empty_like(residual) if residual is not None else y.new_empty((0,))
    rebuilt = y.new_empty(y.shape if rebuild_dtype is not None else (0,), dtype=rebuild_dtype or y.dtype)
    return torch.empty_like(y), dr, torch.empty_like(weight), torch.empty_like(bias), rebuilt


def _setup_context(ctx, inputs, output):
    y, residual, mean, invstd, weight, bias, act, height, width, pool, _out_dtype_arg, *shortcut = inputs
    ctx.save_for_backward(y, residual, mean, invstd, weight, bias)
    ctx.args = (act, height, width, pool)
    ctx.has_residual = residual is not None
    ctx.has_shortcut = bool(shortcut) and shortcut[0] is not None


def _backward(ctx, grad):
    y, residual, mean, invstd, weight, bias = ctx.saved_tensors
    dy, dr, dw, db, _ = torch.ops.hifuse.batch_norm_act_backward(
        grad.contiguous(), y, residual, mean, invstd, weight, bias, *ctx.args
    )
    # mean and invstd are batch statistics: their gradients flow through the reduction
    # terms of dy above, not through these inputs. The shortcut's is the result's, as it is.
    return (dy, (dr if ctx.has_residual else None), None, None, dw, db, None, None, None, None, None,
            grad if ctx.has_shortcut else None)


_apply_op.register_autograd(_backward, setup_context=_setup_context)


def unsupported_reason(x: torch.Tensor, bn: torch.nn.BatchNorm2d, residual: torch.Tensor | None = None) -> str | None:
    """Why the fused training BatchNorm cannot take x (and residual), or None when it can."""
    if x.dim() != 4 or x.shape[1] != bn.num_features:
        return f"x must be (N, {bn.num_features}, H, W), got {tuple(x.shape)}"
    if residual is not None and residual.shape != x.shape:
        return f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}"
    if x.dtype not in SUPPORTED_DTYPES or (residual is not None and residual.dtype not in SUPPORTED_DTYPES):
        return f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if not bn.affine:
        return "BatchNorm without affine parameters is not fused"
    if x.numel() // x.shape[1] < 2:
        return "BatchNorm needs more than one value per channel when training"
    tensors = (x, bn.weight) if residual is None else (x, residual, bn.weight)
    return _triton.unsupported_reason(*tensors)


def _check(x, bn, act, residual, pool, out_dtype) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"batch_norm_act: act must be one of {list(ACTIVATIONS)}, got {act!r}")
    reason = unsupported_reason(x, bn, residual)
    if reason is not None:
        raise ValueError(f"batch_norm_act: {reason}")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"batch_norm_act: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    h, w = x.shape[-2:]
    if pool and (h < 2 or w < 2):
        raise ValueError(f"batch_norm_act: cannot pool a {h}x{w} map over 2x2 windows")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N*H*W, C) rows; free for channels-last memory."""
    return nhwc(t).flatten(0, 1)


def batch_norm_act(
    x: torch.Tensor,
    bn: torch.nn.BatchNorm2d,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    pool: bool = False,
    out_dtype: torch.dtype | None = None,
    check: bool = True,
    shortcut: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(bn(x))`` (or ``act(bn(gelu(x) + residual))``) with ``bn`` in training mode
    (``shortcut``: plus it, ``shortcut + act(bn(x))``).

    Normalises with the batch statistics and updates ``bn``'s running statistics and
    ``num_batches_tracked`` as ``nn.BatchNorm2d`` does. x is (N, C, H, W), any strides
    (channels-last memory is read without copies); the result is channels-last.

    Args:
        act: None, "relu", "gelu" (exact) or "sigmoid".
        residual: with it, the BatchNorm input is gelu(x) + residual, never materialised.
        pool: average the result over 2x2 windows (stride 2, an odd last row or column
            dropped, as ``F.avg_pool2d``); the full-resolution result is never written.
        out_dtype: the result's dtype (default: x's, promoted with the residual's); the
            IRMLP asks for its conv2 GEMM's dtype, so no cast pass follows.
        check: False skips the argument checks, for callers that made them once already.
        shortcut: (N, C, H, W) of the result's shape and dtype, any strides, added to the
            result in the same pass (as eager's add after it computes it; not with ``pool``).
    """
    n, c, h, w = x.shape
    if check:
        _check(x, bn, act, residual, pool, out_dtype)
        if shortcut is not None:
            if not isinstance(shortcut, torch.Tensor) or shortcut.shape != x.shape:
                raise ValueError(f"batch_norm_act: shortcut must be a tensor of x's shape {tuple(x.shape)}")
            problem = _shortcut_problem(_rows(x), None if residual is None else _rows(residual), out_dtype, pool,
                                        _rows(shortcut))
            if problem is not None:
                raise ValueError(f"batch_norm_act: {problem}")
    args = apply_args(x, bn, act, residual, pool, out_dtype)
    if shortcut is not None:
        args = (*args, _rows(shortcut))
    out = torch.ops.hifuse.batch_norm_act(*args)
    if pool:
        h, w = h // 2, w // 2
    return out.view(n, h, w, c).permute(0, 3, 1, 2)


def running_args(bn: torch.nn.BatchNorm2d) -> tuple:
    """(running_mean, running_var, num_batches_tracked, momentum) for hifuse::batch_norm_stats
    to update in its kernel: all None where ``bn`` keeps no running statistics, or keeps a
    cumulative average (momentum None; ``update_running`` does that one)."""
    if not bn.track_running_stats or bn.running_mean is None or bn.momentum is None:
        return None, None, None, 0.0
    return bn.running_mean, bn.running_var, bn.num_batches_tracked, float(bn.momentum)


def update_running(bn: torch.nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """``bn``'s running statistics and ``num_batches_tracked`` updated with batch statistics
    (biased ``var`` over ``count`` values) as ``nn.BatchNorm2d`` updates them."""
    if not bn.track_running_stats or bn.running_mean is None:
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        # a cumulative average (momentum None) divides by the count on the device: no host sync
        momentum = 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum
        unbiased = var * (count / (count - 1))
        for running, batch in ((bn.running_mean, mean), (bn.running_var, unbiased)):
            batch = batch.to(running.dtype)
            if bn.momentum is None:  # a tensor momentum cannot be an alpha
                running.mul_(1 - momentum).add_(batch * momentum)
            else:
                running.mul_(1 - momentum).add_(batch, alpha=momentum)


def apply_args(
    x: torch.Tensor,
    bn: torch.nn.BatchNorm2d,
    act: str | None = None,
    residual: torch.Tensor | None = None,
    pool: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple:
    """The batch statistics of ``x`` (updating ``bn``'s running statistics as
    ``batch_norm_act`` does) and the arguments of hifuse::batch_norm_act that applies them:
    for callers that apply them later, or again in backward (``recompute.BatchNormApply``).
    Unchecked: ``batch_norm_act``'s checks apply."""
    h, w = x.shape[-2:]
    y = _rows(x)
    r = None if residual is None else _rows(residual)
    mean, invstd = _statistics(bn, y, lambda *running: torch.ops.hifuse.batch_norm_stats(
        y.detach(), None if r is None else r.detach(), float(bn.eps), *running))
    return y, r, mean, invstd, bn.weight, bn.bias, ACTIVATIONS[act], h, w, pool, out_dtype


def _statistics(bn: torch.nn.BatchNorm2d, y: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, invstd) of ``stats(*running_args(bn))``, a statistics op over rows y, and
    ``bn``'s running statistics updated as ``nn.BatchNorm2d`` updates them."""
    running = running_args(bn)
    with torch.no_grad():
        mean, invstd, var = stats(*running)
    if running[0] is None:
        update_running(bn, mean, var, y.shape[0])
    return mean, invstd


def gated_apply_args(x: torch.Tensor, bn: torch.nn.BatchNorm2d, residual: torch.Tensor, x_act: int, gated: list,
                     out_dtype: torch.dtype | None = None) -> tuple:
    """``apply_args`` for ``bn`` of gelu(x) + r, r norm3's result computed on load from
    ``gated`` (``gated_problem``; ``residual``: its (N, C, H, W) stand-in, of r's dtype, which
    carries its gradient): the arguments of ``recompute.BatchNormApplyGated``. Unchecked."""
    y = _rows(x)
    sources = gated_sources([t.detach() for t in gated], x_act, residual.dtype)
    mean, invstd = _statistics(bn, y, lambda *running: torch.ops.hifuse.batch_norm_stats_gated(
        y.detach(), *sources, float(bn.eps), *running))
    return (y, residual, mean, invstd, bn.weight, bn.bias, ACTIVATIONS[None], out_dtype, x_act, *gated)
