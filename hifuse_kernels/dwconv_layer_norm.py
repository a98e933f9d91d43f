"""Depthwise 3x3 convolution + LayerNorm over channels, channels-last, in one Triton pass.

The local block's eager path convolves (cuDNN, NCHW), permutes to channels-last and runs a
LayerNorm: three passes over the activation plus a permute copy, and two saved tensors.
Here one program takes a tile of consecutive positions (over rows and images) with all C
channels: it sums the
nine shifted, zero-padded neighbours times the per-channel taps (plus bias), normalises over
C and writes the normalised result, in the dtype of the GEMM that consumes it (under
autocast the cast autocast would make happens in the store). Only per-position mean and
rstd are saved.

Backward is one pass: walking down bands of image rows, a program recomputes the
convolution for the LayerNorm's input, keeps the gradient of the convolution output for three
rows at a time in a small buffer of its own (cache-resident, not a round trip through
memory), and gathers from it, for every position, the nine neighbours of that gradient for the
input gradient, accumulating the tap, conv-bias and LayerNorm weight/bias gradients into
per-program partial sums. The partials are added in a fixed order afterwards: no atomics,
identical bits on every run.

Layers: reference, kernels, registered ops, autograd, functional entry point. The module
using it is the fused ``LocalBlock`` (``hifuse.fused.local_branch``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _configs, _triton
from ._triton import ONES_PAD, tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024
BLOCK_P = 8  # positions per forward program at most (fewer for many channels: _block_p)

__all__ = ["dwconv_layer_norm", "dwconv_layer_norm_ref", "unsupported_reason"]


def dwconv_layer_norm_ref(x, conv_weight, conv_bias, ln_weight, ln_bias, eps: float = 1e-6):
    """LayerNorm_C(dwconv3x3(x)) on channels-last (N, H, W, C) input, (N, H, W, C) output."""
    c = x.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), conv_weight, conv_bias, padding=1, groups=c)
    return F.layer_norm(y.permute(0, 2, 3, 1), (c,), ln_weight, ln_bias, eps)


if triton is not None:
    from ._triton import ones_column

    @triton.jit
    def _positions(t, P, H, W, BLOCK_P: tl.constexpr):
        """Tile t's positions pos (of all N * H * W, as int64; row h, column w) and their mask."""
        pos = t * BLOCK_P + tl.arange(0, BLOCK_P)  # int32 (P < 2**31): 64-bit division spilled
        w = pos % W
        h = pos // W % H
        return h, w, pos.to(tl.int64), pos < P

    @triton.jit
    def _tile(P, H, W, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's positions (as ``_positions``) and channels c."""
        h, w, pos, pmask = _positions(tl.program_id(0), P, H, W, BLOCK_P)
        return h, w, tl.arange(0, BLOCK_C), pos, pmask

    @triton.jit
    def _neighbour(h, w, pmask, dy: tl.constexpr, dx: tl.constexpr, H, W, C):
        """Offset in elements from each position to its neighbour (h + dy, w + dx), one scalar
        for the tile, and whether that neighbour is inside the image."""
        hh = h + dy
        ww = w + dx
        return (dy * W + dx) * C, pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)

    @triton.jit
    def _conv_tile(X, CW, CB, pos, h, w, pmask, c, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Depthwise 3x3 conv at positions pos, channels c, fp32."""
        cmask = c < C
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc += tl.load(CB + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
        here = pos[:, None] * C + c[None, :]
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                off, ok = _neighbour(h, w, pmask, dy - 1, dx - 1, H, W, C)
                v = tl.load(X + here + off, mask=ok[:, None] & cmask[None, :], other=0.0)
                tap = tl.load(CW + c * 9 + dy * 3 + dx, mask=cmask, other=0.0).to(tl.float32)
                acc += v.to(tl.float32) * tap[None, :]
        return acc

    @_triton.kernel
    def _fwd_kernel(X, CW, CB, LW, LB, OUT, MEAN, RSTD, P, H, W, C, eps,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, PAD: tl.constexpr = 0):
        """PAD > 0: the output rows are C + PAD wide, column C ones and the rest zeros, so that a
        weight-gradient GEMM over them also gives the bias gradient."""
        h, w, c, pos, pmask = _tile(P, H, W, BLOCK_P, BLOCK_C)
        cmask = c < C
        y = _conv_tile(X, CW, CB, pos, h, w, pmask, c, H, W, C, BLOCK_P, BLOCK_C)
        y = tl.where(cmask[None, :], y, 0.0)
        mean = tl.sum(y, 1) / C
        d = tl.where(cmask[None, :], y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / C + eps)
        lw = tl.load(LW + c, mask=cmask, other=0.0).to(tl.float32)
        lb = tl.load(LB + c, mask=cmask, other=0.0).to(tl.float32)
        out = tl.fma(d * rstd[:, None], lw[None, :], lb[None, :])
        at = OUT + pos[:, None] * (C + PAD)
        tl.store(at + c[None, :], out.to(OUT.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])
        if PAD > 0:
            ones_column(at, C, pmask, PAD)
        tl.store(MEAN + pos, mean, mask=pmask)
        tl.store(RSTD + pos, rstd, mask=pmask)

    @triton.jit
    def _tap_grad(X, here, dy, h, w, pmask, cmask, ky: tl.constexpr, kx: tl.constexpr, H, W, C):
        """Tap (ky, kx)'s gradient terms over a tile: dy times the input each position read
        through it (summed over the positions by the caller, once)."""
        off, ok = _neighbour(h, w, pmask, ky - 1, kx - 1, H, W, C)
        xv = tl.load(X + here + off, mask=ok[:, None] & cmask[None, :], other=0.0)
        return dy * xv.to(tl.float32)

    @triton.jit
    def _slot_grad(SLOTS, h, w, q, pmask, c, cmask, ky: tl.constexpr, kx: tl.constexpr, H, W, SW, C):
        """The conv output's gradient at (h + 1 - ky, w + 1 - kx), which read the input at
        (h, w) through tap (ky, kx), from its row's slot (SW positions wide, (h, w) at slot
        column q); zero outside the image."""
        hh = h + 1 - ky
        ww = w + 1 - kx
        ok = pmask & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        at = SLOTS + ((hh + 3) % 3) * SW * C + (q + 1 - kx)[:, None] * C + c[None, :]
        return tl.load(at, mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _lanes(w0, n, span, W, BLOCK_P: tl.constexpr, IMGS: tl.constexpr):
        """Lanes q = w0 .. w0 + BLOCK_P of a backward unit's row of ``span`` positions (images
        n, n + 1, ... side by side): q, each lane's column and image, and which are in the row."""
        q = w0 + tl.arange(0, BLOCK_P)
        if IMGS == 1:
            return q, q, n, q < span
        else:
            return q, q % W, n + q // W, q < span

    @triton.jit
    def _add_row(row, start, acc, c, cmask, stride: tl.constexpr, first):
        """Adds acc summed over its positions to row[start + c * stride] (``first``: stores it)."""
        at = row + start + c * stride
        tl.store(at, tl.load(at, mask=cmask & (first == 0), other=0.0) + tl.sum(acc, 0), mask=cmask)

    # The backward runs on a fixed grid of PROGRAMS programs (``_triton.reduction_programs``),
    # each looping over units u = pid, pid + PROGRAMS, ...: a band of BAND rows of one image
    # (of IMGS images side by side, under the interpreter, which pays per operation).
    # A unit walks its rows top to bottom, one row of the conv output's gradient ahead: it
    # computes the gradient of row r + 1 (all channels: the LayerNorm's backward needs whole
    # rows) into one of three row slots of its own (3 W C values: they stay in cache), then
    # gathers rows r - 1 .. r + 1 of the slots for the input gradient of row r (a transposed
    # depthwise conv) and takes row r's tap gradients. The rows just above and below the band
    # are computed again by the neighbouring units, about 2 / BAND more work, instead of the
    # whole gradient written to memory and read back.
    @_triton.kernel(do_not_specialize=["PROGRAMS", "BAND"])
    def _bwd_kernel(X, CW, CB, LW, LB, GRAD, MEAN, RSTD, DS, DX, OUT, SLOTS, PART, N, H, W, C, BAND, PROGRAMS,
                    HAS_DS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    REBUILD: tl.constexpr = False, PAD: tl.constexpr = 0, IMGS: tl.constexpr = 1):
        """x's gradient (plus DS: the gradient x gets from elsewhere, summed here rather than
        by a separate pass), and per program the partial tap, conv bias and LayerNorm
        weight/bias gradients, in its row of 12 C of PART. With REBUILD the
        forward's output is written to OUT as ``_fwd_kernel`` computes it (the same bits; rows
        C + PAD wide)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        cmask = c < C
        SW = IMGS * W  # a slot row's positions
        slots = SLOTS + pid.to(tl.int64) * (3 * SW * C)
        part = PART + pid.to(tl.int64) * (12 * C)
        # the taps' and conv bias's partials: zeroed here, then added to after a barrier, or (at
        # 1024 channels without REBUILD) stored by the program's first row: whichever of the two
        # compiles without spilling for the variant (ptxas picks the register budget itself;
        # check_triton_compile.py, triton 3.6 and 3.8)
        ZEROED: tl.constexpr = (BLOCK_C < 1024) or REBUILD
        if ZEROED:
            for k in tl.static_range(10):
                tl.store(part + k * C + c, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=cmask)
        # the LayerNorm's gradient terms, accumulated as tiles and reduced over the positions once at the end
        acc_gx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        bands = tl.cdiv(H, BAND)
        for u in range(pid, tl.cdiv(N, IMGS) * bands, PROGRAMS):
            n = u // bands * IMGS
            # a row's positions: lane q is column q % W of image n + q // W
            if IMGS == 1:
                span = W
            else:
                span = tl.minimum(N - n, IMGS) * W
            r0 = (u % bands) * BAND
            r1 = tl.minimum(r0 + BAND, H)
            for hr in range(r0 - 1, r1 + 1):
                if (hr >= 0) & (hr < H):  # the conv output's gradient, row hr (a halo row: some other unit's)
                    owned = (hr >= r0) & (hr < r1)
                    for w0 in range(0, span, BLOCK_P):
                        q, w, img, pmask = _lanes(w0, n, span, W, BLOCK_P, IMGS)
                        pos = ((img * H + hr) * W + w).to(tl.int64)  # int32 (positions < 2**31), then widened
                        m2 = pmask[:, None] & cmask[None, :]
                        y = _conv_tile(X, CW, CB, pos, hr, w, pmask, c, H, W, C, BLOCK_P, BLOCK_C)
                        mean = tl.load(MEAN + pos, mask=pmask, other=0.0)
                        rstd = tl.load(RSTD + pos, mask=pmask, other=0.0)
                        xhat = tl.where(m2, (y - mean[:, None]) * rstd[:, None], 0.0)
                        here = pos[:, None] * C + c[None, :]
                        g = tl.load(GRAD + here, mask=m2, other=0.0).to(tl.float32)
                        lw = tl.load(LW + c, mask=cmask, other=0.0).to(tl.float32)
                        gw = g * lw[None, :]
                        a = tl.sum(gw, 1) / C
                        b = tl.sum(gw * xhat, 1) / C
                        dy = tl.where(m2, rstd[:, None] * (gw - a[:, None] - xhat * b[:, None]), 0.0)
                        # in the slot's dtype (the incoming gradient's: bf16 under autocast, as eager's)
                        tl.store(slots + (hr % 3) * SW * C + q[:, None] * C + c[None, :],
                                 dy.to(SLOTS.dtype.element_ty), mask=m2)
                        if owned:
                            acc_gx += g * xhat
                            acc_g += g
                            if REBUILD:  # (y - mean) * rstd * lw + lb, as _fwd_kernel forms it
                                lb = tl.load(LB + c, mask=cmask, other=0.0).to(tl.float32)
                                rebuilt = tl.fma(xhat, lw[None, :], lb[None, :]).to(OUT.dtype.element_ty)
                                tl.store(OUT + here + (pos * PAD)[:, None], rebuilt, mask=m2)
                                if PAD > 0:
                                    ones_column(OUT + (pos * (C + PAD))[:, None], C, pmask, PAD)
                tl.debug_barrier()  # row hr's stores to its slot are seen by every thread
                h = hr - 1
                if h >= r0:  # x's gradient and the tap gradients, row h
                    first = (u == pid) & (h == r0) & (not ZEROED)  # the program's first row
                    for w0 in range(0, span, BLOCK_P):
                        q, w, img, pmask = _lanes(w0, n, span, W, BLOCK_P, IMGS)
                        m2 = pmask[:, None] & cmask[None, :]
                        here = ((img * H + h) * W + w).to(tl.int64)[:, None] * C + c[None, :]
                        dx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
                        if HAS_DS:
                            dx += tl.load(DS + here, mask=m2, other=0.0).to(tl.float32)
                        for ky in tl.static_range(3):
                            for kx in tl.static_range(3):
                                tap = tl.load(CW + c * 9 + ky * 3 + kx, mask=cmask, other=0.0).to(tl.float32)
                                dx += _slot_grad(slots, h, w, q, pmask, c, cmask, ky, kx, H, W, SW, C) * tap[None, :]
                        tl.store(DX + here, dx.to(DX.dtype.element_ty), mask=m2)
                    # a second walk over the row for the tap gradients: fewer values live at once
                    zero = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
                    g00, g01, g02, g10, g11, g12, g20, g21, g22 = zero, zero, zero, zero, zero, zero, zero, zero, zero
                    gb = zero
                    for w0 in range(0, span, BLOCK_P):
                        q, w, img, pmask = _lanes(w0, n, span, W, BLOCK_P, IMGS)
                        here = ((img * H + h) * W + w).to(tl.int64)[:, None] * C + c[None, :]
                        dy = _slot_grad(slots, h, w, q, pmask, c, cmask, 1, 1, H, W, SW, C)
                        gb += dy
                        g00 += _tap_grad(X, here, dy, h, w, pmask, cmask, 0, 0, H, W, C)
                        g01 += _tap_grad(X, here, dy, h, w, pmask, cmask, 0, 1, H, W, C)
                        g02 += _tap_grad(X, here, dy, h, w, pmask, cmask, 0, 2, H, W, C)
                        g10 += _tap_grad(X, here, dy, h, w, pmask, cmask, 1, 0, H, W, C)
                        g11 += _tap_grad(X, here, dy, h, w, pmask, cmask, 1, 1, H, W, C)
                        g12 += _tap_grad(X, here, dy, h, w, pmask, cmask, 1, 2, H, W, C)
                        g20 += _tap_grad(X, here, dy, h, w, pmask, cmask, 2, 0, H, W, C)
                        g21 += _tap_grad(X, here, dy, h, w, pmask, cmask, 2, 1, H, W, C)
                        g22 += _tap_grad(X, here, dy, h, w, pmask, cmask, 2, 2, H, W, C)
                    # the row's tap and conv bias gradients into the program's partials (the taps as
                    # the weight lays them out, (C, 3, 3)): ten tiles held through a row, not the loop
                    _add_row(part, 0, g00, c, cmask, 9, first)
                    _add_row(part, 1, g01, c, cmask, 9, first)
                    _add_row(part, 2, g02, c, cmask, 9, first)
                    _add_row(part, 3, g10, c, cmask, 9, first)
                    _add_row(part, 4, g11, c, cmask, 9, first)
                    _add_row(part, 5, g12, c, cmask, 9, first)
                    _add_row(part, 6, g20, c, cmask, 9, first)
                    _add_row(part, 7, g21, c, cmask, 9, first)
                    _add_row(part, 8, g22, c, cmask, 9, first)
                    _add_row(part, 9 * C, gb, c, cmask, 1, first)
                    tl.debug_barrier()  # row h's reads are done before a slot they read is written again
        tl.store(part + 10 * C + c, tl.sum(acc_gx, 0), mask=cmask)
        tl.store(part + 11 * C + c, tl.sum(acc_g, 0), mask=cmask)


def _block_p(positions: int, c: int) -> int:
    if _triton.wide():
        return min(_triton.next_power_of_2(positions), _triton.wide_rows(_triton.block_channels(c)))
    # the forward's (BLOCK_P x BLOCK_C) tile: 1024 values, 2048 at 512 channels, 2 to 4 a thread
    # on _launch_tile's warps
    block_c = _triton.block_channels(c)
    return max(1, min(BLOCK_P, (2048 if block_c == 512 else 1024) // block_c))


def _launch_tile(positions: int, c: int) -> dict:
    """The tile of a launch over ``positions`` positions of c channels."""
    block_p = _block_p(positions, c)
    block_c = _triton.block_channels(c)
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, num_warps=max(4, min(16, block_p * block_c // 64)))


def backward_tile(width: int, c: int) -> dict:
    """The backward's tile: one position by all c channels, one value a thread (two at 1024
    channels: 16 warps at most), on the fewest warps: tiles that spill under neither triton
    3.6 nor 3.8 (``check_triton_compile.py``)."""
    block_c = _triton.block_channels(c)
    if _triton.wide():
        return dict(BLOCK_P=min(_triton.next_power_of_2(width), _triton.wide_rows(block_c)), BLOCK_C=block_c,
                    num_warps=4)
    return dict(BLOCK_P=1, BLOCK_C=block_c, num_warps=max(4, min(16, block_c // 32)))


BACKWARD_REGS = 128
SLOT_BYTES = 16 << 20  # the backward programs' row slots at most, together (a third of an H100's L2)
# slot elements of all images side by side (the interpreter's units) past which 32-bit offsets fail
SIDE_BY_SIDE_LIMIT = 2**31


def band_rows(n: int, h: int, programs: int) -> int:
    """Rows of an image a backward unit takes, for ``programs`` programs: the band that
    finishes first by a count of rows, each wave of units taking its band's rows twice (the
    gradient pass and the input-gradient pass) and two halo rows (the largest band of the
    fastest: whole images when they fill the GPU, thin bands for a few images)."""
    def cost(band):
        return -(-n * -(-h // band) // programs) * (2 * band + 2), -band

    return min(range(1, h + 1), key=cost)


def _launch_config(x, name: str) -> dict:
    """The tile of launch ``name`` ("forward" or "backward") over x, whole rows of C channels a
    program: the default, or the launch table's for this device and shape."""
    n, h, w, c = x.shape
    if _triton.wide():  # the backward's units: all images side by side (see _bwd_op)
        return backward_tile(n * w, c) if name == "backward" else _launch_tile(n * h * w, c)
    tile = backward_tile(w, c) if name == "backward" else _launch_tile(n * h * w, c)

    def problem(config):
        if config["BLOCK_C"] != tile["BLOCK_C"]:
            return f"BLOCK_C={config['BLOCK_C']} must be {tile['BLOCK_C']} (whole rows)"
        return _configs.power_of_two_problem(config, "BLOCK_P", "BLOCK_C", high=4096)

    if name == "backward":
        tile = dict(tile, band=0)  # rows a unit takes; 0: the launcher's choice (``band_rows``)
    return _configs.launch_config(f"dwconv_layer_norm.{name}", f"{_configs.dtype_name(x.dtype)}/c{c}", tile,
                                  x.device, problem)


@_triton.define_op("hifuse::dwconv_layer_norm", mutates_args=())
def _fwd_op(
    x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor, ln_weight: torch.Tensor,
    ln_bias: torch.Tensor, eps: float, out_dtype: torch.dtype, ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, rstd); ``ones``: out is (N, H, W, C + ONES_PAD), column C ones and the rest
    zeros (``_triton.ones_column``)."""
    n, h, w, c = x.shape
    pad = ONES_PAD if ones else 0
    out = torch.empty((n, h, w, c + pad), device=x.device, dtype=out_dtype)
    mean = torch.empty(n, h, w, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    tile = _launch_config(x, "forward")
    grid = _triton.grid(triton.cdiv(n * h * w, tile["BLOCK_P"]))
    _triton.wrap_triton(_fwd_kernel)[grid](
        x, conv_weight, conv_bias, ln_weight, ln_bias, out, mean, rstd, n * h * w, h, w, c, eps, PAD=pad, **tile
    )
    return out, mean, rstd


@_triton.define_op("hifuse::dwconv_layer_norm_backward", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, x: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor,
    ln_weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, grad_x: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None, rebuild_dtype: torch.dtype | None = None, ones: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x's gradient (plus ``grad_x``, x's shape: a gradient x receives from another use), the
    parameters' gradients in float32 as two vectors: the conv weight's (C, 3, 3) and bias's
    (10 C), the LayerNorm weight's and bias's (2 C), in one (12 C) vector that ``backward``
    splits: the kernel's programs write a row of partials each, summed once; and with
    ``rebuild_dtype`` (else empty) the forward's output in that dtype (``ones``: with the ones
    column), the same bits, written by the kernel's gradient pass (``ln_bias``: the LayerNorm's,
    which it needs)."""
    n, h, w, c = x.shape
    rebuild = rebuild_dtype is not None
    if rebuild and ln_bias is None:
        raise ValueError("dwconv_layer_norm_backward: rebuilding the output takes the LayerNorm's bias")
    pad = ONES_PAD if ones and rebuild else 0
    out = torch.empty((n, h, w, c + pad) if rebuild else (0,), device=x.device, dtype=rebuild_dtype or x.dtype)
    ln_bias = ln_weight if ln_bias is None else ln_bias
    tile = _launch_config(x, "backward")
    band = tile.pop("band", 0)  # 0: chosen here
    tile = dict(tile, HAS_DS=grad_x is not None, REBUILD=rebuild, PAD=pad)
    args = (x, conv_weight, conv_bias, ln_weight, ln_bias, grad, mean, rstd, x.dtype, x.dtype, out, grad.dtype,
            torch.float32, n, h, w, c, 2, 2)
    # where the compiled kernel's registers are not known (modelling a GPU on a CPU): the most
    # the tiles take under triton 3.6 and 3.8 (check_triton_compile.py)
    resident = dict(kernel=_bwd_kernel, launch=tile, args=args, regs=BACKWARD_REGS)
    imgs = 1
    if _triton.wide():
        # whole images, all side by side in one program (the interpreter pays per operation, not
        # per program) while the slots' offsets fit in 32 bits, else a program each
        imgs = n if 3 * n * w * c < SIDE_BY_SIDE_LIMIT else 1
        band, progs = h, n // imgs
        tile["IMGS"] = imgs
    else:
        # as many programs as the SMs hold, but no more than keep their slots within SLOT_BYTES,
        # which stay in the GPU's L2 cache beside the streams read and written
        most = min(_triton.reduction_programs(n * h, 1, x.device, **resident),
                   max(1, SLOT_BYTES // (3 * w * c * grad.element_size())))
        band = band or band_rows(n, h, most)
        progs = min(n * triton.cdiv(h, band), most)
    # each program's three rows of the conv output's gradient, in the incoming gradient's dtype
    # (bf16 under autocast, as eager's)
    slots = torch.empty(progs, 3, imgs * w, c, device=x.device, dtype=grad.dtype)
    part = torch.empty(progs, 12 * c, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    _triton.wrap_triton(_bwd_kernel)[_triton.grid(progs)](
        x, conv_weight, conv_bias, ln_weight, ln_bias, grad, mean, rstd, dx if grad_x is None else grad_x.contiguous(),
        dx, out, slots, part, n, h, w, c, band, progs, **tile,
    )
    return dx, part.sum(0), out


def backward(grad, x, conv_weight, conv_bias, ln_weight, mean, rstd, grad_x=None, ln_bias=None, rebuild_dtype=None,
             ones: bool = False) -> tuple:
    """The five gradients (x's, then the conv weight's and bias's, the LayerNorm weight's and
    bias's, each in its tensor's dtype) of ``hifuse::dwconv_layer_norm``; with ``rebuild_dtype``,
    and its output (see the op)."""
    dx, params, out = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, conv_weight, conv_bias, ln_weight, mean,
                                                                  rstd, grad_x, ln_bias, rebuild_dtype, ones)
    c = x.shape[-1]
    grads = (dx, params[: 9 * c].view(conv_weight.shape).to(conv_weight.dtype),
             params[9 * c: 10 * c].to(conv_bias.dtype), params[10 * c: 11 * c].to(ln_weight.dtype),
             params[11 * c:].to(ln_weight.dtype))
    return grads + ((out,) if rebuild_dtype is not None else ())


@_fwd_op.register_fake
def _(x, conv_weight, conv_bias, ln_weight, ln_bias, eps, out_dtype, ones=False):
    stat = x.new_empty(x.shape[:3], dtype=torch.float32)
    out = x.new_empty((*x.shape[:3], x.shape[3] + (ONES_PAD if ones else 0)), dtype=out_dtype)
    return out, stat, torch.empty_like(stat)


@_bwd_op.register_fake
def _(grad, x, conv_weight, conv_bias, ln_weight, mean, rstd, grad_x=None, ln_bias=None, rebuild_dtype=None,
      ones=False):
    c = x.shape[-1]
    rows = (*x.shape[:3], c + (ONES_PAD if ones else 0)) if rebuild_dtype is not None else (0,)
    out = x.new_empty(rows, dtype=rebuild_dtype or x.dtype)
    return torch.empty_like(x), x.new_empty(12 * c, dtype=torch.float32), out


def _setup_context(ctx, inputs, output):
    x, conv_weight, conv_bias, ln_weight, _ln_bias, _eps, _out_dtype, *_ones = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, conv_weight, conv_bias, ln_weight, mean, rstd)
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics


def _backward(ctx, grad, _gm, _gr):
    x, conv_weight, conv_bias, ln_weight, mean, rstd = ctx.saved_tensors
    # the ones column takes no gradient
    grad = torch.zeros_like(x) if grad is None else grad[..., : x.shape[-1]].contiguous()
    return (*backward(grad, x, conv_weight, conv_bias, ln_weight, mean, rstd), None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _flops(x_shape, *_args, out_shape=None, **_kwargs) -> int:
    n, h, w, c = x_shape
    return 2 * 9 * n * h * w * c  # the depthwise convolution, as FlopCounterMode counts eager's


def _backward_flops(grad_shape, x_shape, w_shape, bias_shape, *_args, out_shape=None, **_kwargs) -> int:
    # Counted by torch's own convolution_backward formula, so fused and eager totals agree
    # (that formula's weight-gradient term does not divide by the groups).
    from torch.utils.flop_counter import conv_backward_flop

    n, h, w, c = x_shape
    nchw = (n, c, h, w)
    return conv_backward_flop(
        nchw, nchw, w_shape, bias_shape, [1, 1], [1, 1], [1, 1], False, [0, 0], c, [True, True, True],
        out_val=[nchw, w_shape, bias_shape],
    )


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.hifuse.dwconv_layer_norm)(_flops)
    register_flop_formula(torch.ops.hifuse.dwconv_layer_norm_backward)(_backward_flops)


_register_flops()


def _argument_problem(x, conv_weight, conv_bias, ln_weight, ln_bias):
    tensors = (x, conv_weight, conv_bias, ln_weight, ln_bias)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return TypeError, "all arguments but eps must be tensors"
    if x.dim() != 4:
        return ValueError, f"x must be channels-last (N, H, W, C), got shape {tuple(x.shape)}"
    c = x.shape[-1]
    if c > MAX_CHANNELS:
        return ValueError, f"C = {c} channels is more than the {MAX_CHANNELS} supported"
    if x.numel() // max(c, 1) >= 2**31:
        return ValueError, f"x has {x.numel() // c} positions (N * H * W); the kernels take fewer than 2**31"
    if x.shape[2] * c >= 2**28:
        return ValueError, f"an image row of x has {x.shape[2] * c} values (W * C); the kernels take fewer than 2**28"
    if conv_weight.shape != (c, 1, 3, 3):
        return ValueError, f"conv_weight must be ({c}, 1, 3, 3), got {tuple(conv_weight.shape)}"
    if any(t.shape != (c,) for t in (conv_bias, ln_weight, ln_bias)):
        return ValueError, f"conv_bias, ln_weight and ln_bias must be ({c},)"
    if x.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"x must be float32, float16 or bfloat16, got {x.dtype}"
    if len({t.device for t in tensors}) > 1:
        return ValueError, "all tensors must be on one device"
    return None


def unsupported_reason(x, conv_weight, conv_bias, ln_weight, ln_bias) -> str | None:
    reason = _triton.unsupported_reason(x)
    if reason is not None:
        return reason
    problem = _argument_problem(x, conv_weight, conv_bias, ln_weight, ln_bias)
    return None if problem is None else problem[1]


def dwconv_layer_norm(
    x, conv_weight, conv_bias, ln_weight, ln_bias, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
    check: bool = True,
) -> torch.Tensor:
    """LayerNorm over C of a depthwise 3x3 convolution (zero padding 1), channels-last.

    Args:
        x: (N, H, W, C) input (any strides; made contiguous).
        conv_weight: (C, 1, 3, 3) taps; conv_bias: (C,).
        ln_weight, ln_bias: (C,) LayerNorm affine parameters.
        out_dtype: the result's dtype (default x's); the fused local block asks for the
            dtype its pwconv GEMM takes, so no cast pass follows.
        check: False skips the argument checks, for callers that made them once already.
    Returns:
        (N, H, W, C) in ``out_dtype``.
    """
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if check:
        problem = _argument_problem(x, conv_weight, conv_bias, ln_weight, ln_bias)
        if problem is not None:
            raise problem[0](f"dwconv_layer_norm: {problem[1]}")
        if out_dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dwconv_layer_norm: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
        reason = _triton.unsupported_reason(x)
        if reason is not None:
            raise RuntimeError(f"dwconv_layer_norm: {reason}")
    out, _mean, _rstd = torch.ops.hifuse.dwconv_layer_norm(
        x.contiguous(), conv_weight.contiguous(), conv_bias, ln_weight, ln_bias, float(eps), out_dtype
    )
    return out
