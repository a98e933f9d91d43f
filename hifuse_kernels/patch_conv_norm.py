"""The stems: a k x k / k convolution of the image and the LayerNorm over its output channels, one Triton pass.

Both stems of HiFuse (the local branch's 4x4/4 convolution + LayerNorm, the global patch
embedding) read a 3-channel image and write 96 normalised channels per output pixel. Done as
a patch gather, a GEMM and a LayerNorm they move the image, the gathered patches, the GEMM's
output and the normalised map, and in backward the map's gradient, the GEMM output's
gradient and the rebuilt patches again: about three times what the op must move. Here a
program gathers its pixels' patches straight from the image (any strides), multiplies them
by the weight with tl.dot, and normalises the rows in registers: the image is read once and
the normalised map written once. The image takes no gradient, so backward rebuilds the GEMM's
output from the image in the same way (its K = k*k*C_in is tiny) and writes only per-program
partial sums of the four parameter gradients, added in a fixed order: reruns give identical
bits.

Rounding follows eager under autocast: the image and the weight are rounded to the GEMM's
dtype, the product (with the bias) is rounded to it too before the LayerNorm, which is
computed in float32 and written in ``out_dtype`` (float32 under CUDA's autocast); in
backward the GEMM output's gradient is rounded to the GEMM's dtype before the weight and
bias gradients, as eager's cast of it does.

Layers: reference, kernels, registered ops, autograd, functional entry point. Its users are
the fused ``PatchEmbed`` and the local stem (``hifuse.fused``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _triton
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_K = 256  # k * k * C_in: the patch a program holds
MAX_CHANNELS = 256  # C_out: whole rows in registers
BLOCK_M = 16  # output pixels a program holds at a time
WARPS = 16  # fewer left the backward's (K, N) weight partial and the tiles around it spilling
GEMM_DTYPES = (torch.float16, torch.bfloat16)  # a float32 GEMM's dot spills: the patch GEMM path takes it

__all__ = ["patch_conv_norm", "patch_conv_norm_ref", "unsupported_reason"]


def patch_conv_norm_ref(x_nhwc, weight, bias, ln_weight, ln_bias, eps: float):
    """LayerNorm over channels of the k x k / k convolution of (B, H, W, C) x, as (B, H/k, W/k, C_out)."""
    k = weight.shape[-1]
    y = F.conv2d(x_nhwc.permute(0, 3, 1, 2), weight, bias, stride=k).permute(0, 2, 3, 1)
    return F.layer_norm(y, (y.shape[-1],), ln_weight, ln_bias, eps)


if triton is not None:

    @triton.jit
    def _patches(X, rows, kk, M, HO, WO, CIN, sb, sh, sw, sc, KSIZE: tl.constexpr, K):
        """The (rows, kk) tile of the gathered patches: row r is output pixel (b, ho, wo), column
        kk the patch element (kh, kw, c), read from the image where it lies (zero outside)."""
        wo = rows % WO
        ho = (rows // WO) % HO
        b = rows // (WO * HO)
        c = kk % CIN
        kw = (kk // CIN) % KSIZE
        kh = kk // (CIN * KSIZE)
        offs = (b[:, None] * sb + (ho[:, None] * KSIZE + kh[None, :]) * sh + (wo[:, None] * KSIZE + kw[None, :]) * sw
                + c[None, :] * sc)
        m = (rows < M)[:, None] & (kk < K)[None, :]
        return tl.load(X + offs, mask=m, other=0.0)

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        if UPCAST:  # the interpreter's low-precision dot is wrong: the same products in fp32
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision="ieee" if a.dtype == tl.float32 else "tf32")

    @triton.jit
    def _product(X, WK, BIAS, rows, kk, n, M, HO, WO, CIN, sb, sh, sw, sc, K, N, GEMM: tl.constexpr,
                 HAS_BIAS: tl.constexpr, KSIZE: tl.constexpr, UPCAST: tl.constexpr):
        """The GEMM's output for these rows, rounded to its dtype, then in fp32 (zero outside);
        and the rows' patches in the GEMM's dtype."""
        a = _patches(X, rows, kk, M, HO, WO, CIN, sb, sh, sw, sc, KSIZE, K).to(GEMM)
        wmask = (kk < K)[:, None] & (n < N)[None, :]
        w = tl.load(WK + kk[:, None] * N + n[None, :], mask=wmask, other=0.0).to(GEMM)
        y = _dot(a, w, UPCAST)
        if HAS_BIAS:
            y += tl.load(BIAS + n, mask=n < N, other=0.0).to(GEMM).to(tl.float32)[None, :]
        m = (rows < M)[:, None] & (n < N)[None, :]
        return tl.where(m, y.to(GEMM).to(tl.float32), 0.0), a

    @_triton.kernel
    def _fwd_kernel(X, WK, BIAS, LW, LB, OUT, MEAN, RSTD, M, HO, WO, CIN, sb, sh, sw, sc, K, N, eps,
                    GEMM: tl.constexpr, HAS_BIAS: tl.constexpr, KSIZE: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        kk = tl.arange(0, BLOCK_K)
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        m = (rows < M)[:, None] & nmask[None, :]
        y, _a = _product(X, WK, BIAS, rows, kk, n, M, HO, WO, CIN, sb, sh, sw, sc, K, N, GEMM, HAS_BIAS, KSIZE,
                         UPCAST)
        mean = tl.sum(y, 1) / N
        d = tl.where(m, y - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / N + eps)
        lw = tl.load(LW + n, mask=nmask, other=0.0).to(tl.float32)
        lb = tl.load(LB + n, mask=nmask, other=0.0).to(tl.float32)
        out = tl.fma(d * rstd[:, None], lw[None, :], lb[None, :])
        tl.store(OUT + rows[:, None] * N + n[None, :], out.to(OUT.dtype.element_ty), mask=m)
        tl.store(MEAN + rows, mean, mask=rows < M)
        tl.store(RSTD + rows, rstd, mask=rows < M)

    @_triton.kernel(do_not_specialize=["PROGRAMS"])
    def _bwd_kernel(X, WK, BIAS, LW, GRAD, MEAN, RSTD, PART, M, HO, WO, CIN,
                    sb, sh, sw, sc, K, N, PROGRAMS, GEMM: tl.constexpr, HAS_BIAS: tl.constexpr,
                    KSIZE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """On a fixed grid (``_triton.reduction_programs``): each program loops over row tiles
        pid, pid + PROGRAMS, ... and writes its (K + 3, N) partial: the weight gradient's K rows,
        then the bias's, the LayerNorm weight's and bias's (one sum adds them all up)."""
        pid = tl.program_id(0)
        kk = tl.arange(0, BLOCK_K)
        n = tl.arange(0, BLOCK_N)
        nmask = n < N
        lw = tl.load(LW + n, mask=nmask, other=0.0).to(tl.float32)
        # the weight gradient's partial comes from tl.dot; the three vector partials are summed
        # over each tile's rows as it goes (a tile's dot already costs more than those sums)
        acc_w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_lw = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc_lb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(pid, tl.cdiv(M, BLOCK_M), PROGRAMS):
            rows = (t * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            m = (rows < M)[:, None] & nmask[None, :]
            y, a = _product(X, WK, BIAS, rows, kk, n, M, HO, WO, CIN, sb, sh, sw, sc, K, N, GEMM, HAS_BIAS,
                            KSIZE, UPCAST)
            mean = tl.load(MEAN + rows, mask=rows < M, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
            xhat = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
            g = tl.load(GRAD + rows[:, None] * N + n[None, :], mask=m, other=0.0).to(tl.float32)
            gw = g * lw[None, :]
            dy = rstd[:, None] * (gw - (tl.sum(gw, 1) / N)[:, None] - xhat * (tl.sum(gw * xhat, 1) / N)[:, None])
            dy = tl.where(m, dy, 0.0).to(GEMM)  # the GEMM output's gradient, in its dtype as eager casts it
            acc_w += _dot(tl.trans(a), dy, UPCAST)
            acc_b += tl.sum(dy.to(tl.float32), 0)
            acc_lw += tl.sum(g * xhat, 0)
            acc_lb += tl.sum(g, 0)
        part = PART + pid.to(tl.int64) * (K + 3) * N
        tl.store(part + kk[:, None] * N + n[None, :], acc_w, mask=(kk < K)[:, None] & nmask[None, :])
        tl.store(part + K * N + n, acc_b, mask=nmask)
        tl.store(part + (K + 1) * N + n, acc_lw, mask=nmask)
        tl.store(part + (K + 2) * N + n, acc_lb, mask=nmask)


# --------------------------------------------------------------------------- ops


def _launch(x: torch.Tensor, k: int, n: int, gemm_dtype: torch.dtype) -> dict:
    kdim = k * k * x.shape[-1]
    return dict(GEMM=_TL[gemm_dtype], KSIZE=k, UPCAST=_triton.interpreter_launches() and gemm_dtype != torch.float32,
                BLOCK_M=BLOCK_M, BLOCK_K=max(16, _triton.next_power_of_2(kdim)),
                BLOCK_N=max(16, _triton.next_power_of_2(n)), num_warps=WARPS)


_TL = {} if triton is None else {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _geometry(x: torch.Tensor, k: int):
    b, h, w, c = x.shape
    ho, wo = h // k, w // k
    return b * ho * wo, ho, wo, c, [int(s) for s in x.stride()]


@_triton.define_op("hifuse::patch_conv_norm", mutates_args=())
def _fwd_op(
    x: torch.Tensor, wk: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    k: int, eps: float, gemm_dtype: torch.dtype, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (M, N) in out_dtype, mean, rstd (M,) float32) of (B, H, W, C_in) x (any strides)
    and the (k*k*C_in, N) weight ``wk`` ((kh, kw, c) rows)."""
    m, ho, wo, cin, strides = _geometry(x, k)
    n = wk.shape[1]
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    mean = torch.empty((m,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    launch = _launch(x, k, n, gemm_dtype)
    _triton.wrap_triton(_fwd_kernel)[_triton.grid(triton.cdiv(m, BLOCK_M))](
        x, wk, wk if bias is None else bias, ln_weight, ln_bias, out, mean, rstd, m, ho, wo, cin, *strides,
        wk.shape[0], n, eps, HAS_BIAS=bias is not None, **launch,
    )
    return out, mean, rstd


@_triton.define_op("hifuse::patch_conv_norm_backward", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, x: torch.Tensor, wk: torch.Tensor, bias: torch.Tensor | None, ln_weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, k: int, gemm_dtype: torch.dtype,
) -> torch.Tensor:
    """Gradients of ``wk`` ((K, N) rows), then of the bias, the LayerNorm weight and bias (a
    row each), in float32, as one (K + 3, N) tensor: one sum of the programs' partials."""
    m, ho, wo, cin, strides = _geometry(x, k)
    kdim, n = wk.shape
    launch = _launch(x, k, n, gemm_dtype)
    flags = dict(HAS_BIAS=bias is not None, **launch)
    args = (x, wk, wk if bias is None else bias, ln_weight, grad, mean, rstd)
    programs = _triton.reduction_programs(
        triton.cdiv(m, BLOCK_M), 1, x.device, kernel=_bwd_kernel, launch=flags,
        args=(*args, torch.float32, m, ho, wo, cin, *strides, kdim, n, 2),
    )
    part = torch.empty((programs, kdim + 3, n), device=x.device, dtype=torch.float32)
    _triton.wrap_triton(_bwd_kernel)[_triton.grid(programs)](
        *args, part, m, ho, wo, cin, *strides, kdim, n, programs, **flags,
    )
    return part.sum(0)


@_fwd_op.register_fake
def _(x, wk, bias, ln_weight, ln_bias, k, eps, gemm_dtype, out_dtype):
    m = x.shape[0] * (x.shape[1] // k) * (x.shape[2] // k)
    stat = x.new_empty((m,), dtype=torch.float32)
    return x.new_empty((m, wk.shape[1]), dtype=out_dtype), stat, torch.empty_like(stat)


@_bwd_op.register_fake
def _(grad, x, wk, bias, ln_weight, mean, rstd, k, gemm_dtype):
    return wk.new_empty((wk.shape[0] + 3, wk.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, wk, bias, ln_weight, _ln_bias, k, _eps, gemm_dtype, _out_dtype = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, wk, bias, ln_weight, mean, rstd)
    ctx.k, ctx.gemm_dtype, ctx.ln_bias_dtype = k, gemm_dtype, _ln_bias.dtype
    ctx.set_materialize_grads(False)  # no zero gradients for the statistics


def _backward(ctx, grad, _gm, _gr):
    x, wk, bias, ln_weight, mean, rstd = ctx.saved_tensors
    if grad is None:
        return (None,) * 9
    grads = torch.ops.hifuse.patch_conv_norm_backward(grad.contiguous(), x, wk, bias, ln_weight, mean, rstd, ctx.k,
                                                      ctx.gemm_dtype)
    dwk, (db, dlw, dlb) = grads[:-3], grads[-3:]
    return (None, dwk.to(wk.dtype), None if bias is None else db.to(bias.dtype), dlw.to(ln_weight.dtype),
            dlb.to(ctx.ln_bias_dtype), None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- functional


def unsupported_reason(x_nhwc, weight, bias, ln_weight, ln_bias, gemm_dtype) -> str | None:
    """Why the kernels cannot take this image, convolution (its GEMM in ``gemm_dtype``) and
    LayerNorm, or None."""
    if gemm_dtype not in GEMM_DTYPES:
        return f"the GEMM must run in float16 or bfloat16 (autocast's), got {gemm_dtype}"
    if x_nhwc.dim() != 4 or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2]:
        return "x must be (B, H, W, C) and weight (C_out, C, k, k)"
    if x_nhwc.requires_grad and torch.is_grad_enabled():
        return "the image's gradient is not computed (the stems' input takes none)"
    cout, cin, k, _ = weight.shape
    if cin != x_nhwc.shape[-1] or k * k * cin > MAX_K or cout > MAX_CHANNELS:
        return f"a {k}x{k}x{cin} patch and {cout} channels are outside what a program holds"
    if x_nhwc.shape[1] < k or x_nhwc.shape[2] < k:
        return f"a {x_nhwc.shape[1]}x{x_nhwc.shape[2]} input has no full {k}x{k} window"
    for t in (x_nhwc, weight, ln_weight, ln_bias, *(() if bias is None else (bias,))):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported"
    if ln_weight.shape != (cout,) or ln_bias.shape != (cout,):
        return f"the LayerNorm must have ({cout},) weight and bias"
    return _triton.unsupported_reason(x_nhwc, weight, ln_weight, ln_bias)


def patch_conv_norm(x_nhwc, weight, bias, ln_weight, ln_bias, eps: float, gemm_dtype: torch.dtype,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``layer_norm(conv(x, weight, bias, stride=k))`` of (B, H, W, C_in) x (any strides; no
    gradient) as (B, H/k, W/k, C_out), trailing rows and columns that fill no window dropped.
    ``gemm_dtype``: the convolution's operand dtype (autocast's, float16 or bfloat16);
    ``out_dtype``: the LayerNorm's (default the GEMM's output and the LayerNorm weight
    promoted). Call ``unsupported_reason`` first."""
    cout, cin, k, _ = weight.shape
    out_dtype = out_dtype or torch.promote_types(gemm_dtype, ln_weight.dtype)
    wk = weight.permute(2, 3, 1, 0).reshape(k * k * cin, cout)  # (kh, kw, c) rows, as the kernels gather patches
    out, _mean, _rstd = torch.ops.hifuse.patch_conv_norm(
        x_nhwc, wk, bias, ln_weight, ln_bias, k, float(eps), gemm_dtype, out_dtype
    )
    b, h, w, _ = x_nhwc.shape
    return out.view(b, h // k, w // k, cout)
