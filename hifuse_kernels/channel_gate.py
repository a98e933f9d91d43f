"""The fusion block's channel gate: ``sigmoid(se(max) + se(avg))``, se a 1x1 convolution to C/r
channels, a ReLU and a 1x1 convolution back to C (no biases), over g's channel poolings.

Eager runs se once per pooling, or once over the two stacked, as the fused block does: under
autocast a cast of each weight, two GEMMs, the ReLU, the halves' add and the sigmoid forward
(seven launches or more on (N, C) maps), and as many in backward. Here one kernel does the
forward and two the backward: the gradients of the poolings and of the hidden layer, then the
weights', summed over the batch in a fixed order (bitwise-repeatable). Values are rounded
where eager rounds them: each convolution's output, the ReLU's, the add's and the sigmoid's
in the GEMMs' dtype, the weights' gradients in it before their parameters' dtype.

Layers: reference, kernels, registered ops, autograd, functional entry point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _triton
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N = 16  # images a program takes (tl.dot's least)
TILE = 512  # weight values a step
WARPS = 4

__all__ = ["channel_gate", "channel_gate_ref", "unsupported_reason"]


def channel_gate_ref(avg: torch.Tensor, best: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The gate as eager computes it from (N, C, 1, 1) poolings and the (C/r, C, 1, 1) and
    (C, C/r, 1, 1) convolution weights."""

    def se(x):
        return F.conv2d(F.relu(F.conv2d(x, w1)), w2)

    return torch.sigmoid(se(best) + se(avg))


if triton is not None:

    @triton.jit
    def _dot(a, b, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32, exact products (ieee for fp32 operands, as eager's CPU);
        UPCAST (the interpreter, whose low-precision dot is wrong) takes the same rounded
        operands to fp32 first: the same products."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision="ieee")

    @triton.jit
    def _images(N, BLOCK_N: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return n.to(tl.int64), n < N

    @triton.jit
    def _hidden(R, BLOCK_R: tl.constexpr):
        r = tl.arange(0, BLOCK_R)
        return r, r < R

    @_triton.kernel
    def _fwd_kernel(X, W1, W2, H, GATE, N, C, R, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """The gates of BLOCK_N images from X's (2N, C) rows (the averages, then the maxima);
        writes the hidden layer H (2N, R) for backward. H's dtype is the GEMMs'."""
        n, nmask = _images(N, BLOCK_N)
        r, rmask = _hidden(R, BLOCK_R)
        dt = H.dtype.element_ty
        ha = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        hm = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            m = nmask[:, None] & cmask[None, :]
            xa = tl.load(X + n[:, None] * C + c[None, :], mask=m, other=0.0).to(dt)
            xm = tl.load(X + (n + N)[:, None] * C + c[None, :], mask=m, other=0.0).to(dt)
            w1t = tl.load(W1 + r[None, :] * C + c[:, None], mask=cmask[:, None] & rmask[None, :], other=0.0).to(dt)
            ha += _dot(xa, w1t, UPCAST)
            hm += _dot(xm, w1t, UPCAST)
        # ReLU as eager's: NaN stays NaN
        ha = ha.to(dt)
        hm = hm.to(dt)
        ha = tl.where(ha < 0, 0.0, ha).to(dt)
        hm = tl.where(hm < 0, 0.0, hm).to(dt)
        hmask = nmask[:, None] & rmask[None, :]
        tl.store(H + n[:, None] * R + r[None, :], ha, mask=hmask)
        tl.store(H + (n + N)[:, None] * R + r[None, :], hm, mask=hmask)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            w2t = tl.load(W2 + c[None, :] * R + r[:, None], mask=rmask[:, None] & cmask[None, :], other=0.0).to(dt)
            za = _dot(ha, w2t, UPCAST).to(dt)
            zm = _dot(hm, w2t, UPCAST).to(dt)
            s = (zm.to(tl.float32) + za.to(tl.float32)).to(dt).to(tl.float32)
            gate = 1.0 / (1.0 + tl.exp(-s))
            tl.store(GATE + n[:, None] * C + c[None, :], gate.to(GATE.dtype.element_ty),
                     mask=nmask[:, None] & cmask[None, :])

    @_triton.kernel
    def _bwd_kernel(DGATE, GATE, H, W1, W2, DS, DH, DX, N, C, R, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """For BLOCK_N images: the gradient DS (N, C) of the halves' sum (the sigmoid's
        backward; both convolutions' outputs take it), the hidden layer's DH (2N, R), the
        same for both halves but where their ReLU was off, and the poolings' DX (2N, C)."""
        n, nmask = _images(N, BLOCK_N)
        r, rmask = _hidden(R, BLOCK_R)
        dt = H.dtype.element_ty
        acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            m = nmask[:, None] & cmask[None, :]
            at = n[:, None] * C + c[None, :]
            dg = tl.load(DGATE + at, mask=m, other=0.0).to(tl.float32)
            y = tl.load(GATE + at, mask=m, other=0.0).to(tl.float32)
            ds = (dg * (1.0 - y) * y).to(dt)
            tl.store(DS + at, ds, mask=m)
            w2 = tl.load(W2 + c[:, None] * R + r[None, :], mask=cmask[:, None] & rmask[None, :], other=0.0).to(dt)
            acc += _dot(ds, w2, UPCAST)
        dh = acc.to(dt)
        hmask = nmask[:, None] & rmask[None, :]
        ha = tl.load(H + n[:, None] * R + r[None, :], mask=hmask, other=0.0)
        hm = tl.load(H + (n + N)[:, None] * R + r[None, :], mask=hmask, other=0.0)
        # the ReLU's backward as eager's threshold_backward: off where its output is <= 0
        dha = tl.where(ha <= 0, 0.0, dh).to(dt)
        dhm = tl.where(hm <= 0, 0.0, dh).to(dt)
        tl.store(DH + n[:, None] * R + r[None, :], dha, mask=hmask)
        tl.store(DH + (n + N)[:, None] * R + r[None, :], dhm, mask=hmask)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < C
            m = nmask[:, None] & cmask[None, :]
            w1 = tl.load(W1 + r[:, None] * C + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0).to(dt)
            dxa = _dot(dha, w1, UPCAST).to(dt)
            dxm = _dot(dhm, w1, UPCAST).to(dt)
            tl.store(DX + n[:, None] * C + c[None, :], dxa.to(DX.dtype.element_ty), mask=m)
            tl.store(DX + (n + N)[:, None] * C + c[None, :], dxm.to(DX.dtype.element_ty), mask=m)

    @_triton.kernel
    def _bwd_weight_kernel(X, DS, H, DH, DW1, DW2, N, C, R, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        """Both weights' gradients over one block of C: sums over all 2N rows, in order."""
        c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        r, rmask = _hidden(R, BLOCK_R)
        dt = H.dtype.element_ty
        dw1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        dw2 = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            nmask = n < N
            m = nmask[:, None] & cmask[None, :]
            hmask = nmask[:, None] & rmask[None, :]
            ds = tl.load(DS + n[:, None] * C + c[None, :], mask=m, other=0.0)
            for half in tl.static_range(2):
                rows = n + half * N
                h = tl.load(H + rows[:, None] * R + r[None, :], mask=hmask, other=0.0)
                dh = tl.load(DH + rows[:, None] * R + r[None, :], mask=hmask, other=0.0)
                x = tl.load(X + rows[:, None] * C + c[None, :], mask=m, other=0.0).to(dt)
                dw2 += _dot(tl.trans(ds), h, UPCAST)
                dw1 += _dot(tl.trans(dh), x, UPCAST)
        tl.store(DW1 + r[:, None] * C + c[None, :], dw1.to(dt).to(DW1.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])
        tl.store(DW2 + c[:, None] * R + r[None, :], dw2.to(dt).to(DW2.dtype.element_ty),
                 mask=cmask[:, None] & rmask[None, :])


def _launch(n: int, c: int, r: int) -> dict:
    """Tiles of a launch over n images of c channels: every hidden channel in one tile (r is
    C/16 in HiFuse: 6 to 48), and as many channels a step as keep a weight tile to TILE values
    (registers); with wide tiles (the interpreter) the images and channels in as few programs
    and steps as fit."""
    block_r = max(16, _triton.next_power_of_2(r))
    upcast = _triton.interpreter_launches()
    if _triton.wide():
        block_n = max(16, min(_triton.next_power_of_2(n), 256))
        block_c = max(16, min(_triton.next_power_of_2(c), _triton.WIDE_VALUES // max(block_n, block_r)))
        return dict(BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r, UPCAST=upcast, num_warps=WARPS)
    # 64 hidden lanes: the float32 weight gradients' two accumulators took 168 registers on 4 warps
    return dict(BLOCK_N=BLOCK_N, BLOCK_C=max(16, TILE // block_r), BLOCK_R=block_r, UPCAST=upcast,
                num_warps=WARPS if block_r < 64 else 2 * WARPS)


def _gemm_dtype(stats: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return stats.dtype if dtype is None else dtype


@_triton.define_op("hifuse::channel_gate", mutates_args=())
def _channel_gate_op(stats: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate (N, C), hidden layer (2N, R)) of stats (2N, C): the averages, then the maxima."""
    dt = _gemm_dtype(stats, dtype)
    n, (r, c) = stats.shape[0] // 2, w1.shape
    gate = stats.new_empty((n, c), dtype=dt)
    hidden = stats.new_empty((2 * n, r), dtype=dt)
    launch = _launch(n, c, r)
    _triton.wrap_triton(_fwd_kernel)[_triton.grid(triton.cdiv(n, launch["BLOCK_N"]))](stats, w1, w2, hidden, gate,
                                                                                     n, c, r, **launch)
    return gate, hidden


@_triton.define_op("hifuse::channel_gate_backward", mutates_args=())
def _channel_gate_backward_op(grad: torch.Tensor, gate: torch.Tensor, hidden: torch.Tensor, stats: torch.Tensor,
                              w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stats', w1', w2' gradients) given the gate's gradient."""
    n, (r, c) = gate.shape[0], w1.shape
    ds = torch.empty_like(gate)
    dh = torch.empty_like(hidden)
    dx = torch.empty_like(stats)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
    launch = _launch(n, c, r)
    _triton.wrap_triton(_bwd_kernel)[_triton.grid(triton.cdiv(n, launch["BLOCK_N"]))](
        grad, gate, hidden, w1, w2, ds, dh, dx, n, c, r, **launch)
    _triton.wrap_triton(_bwd_weight_kernel)[_triton.grid(triton.cdiv(c, launch["BLOCK_C"]))](
        stats, ds, hidden, dh, dw1, dw2, n, c, r, **launch)
    return dx, dw1, dw2


@_channel_gate_op.register_fake
def _(stats, w1, w2, dtype=None):
    dt = _gemm_dtype(stats, dtype)
    n, (r, c) = stats.shape[0] // 2, w1.shape
    return stats.new_empty((n, c), dtype=dt), stats.new_empty((2 * n, r), dtype=dt)


@_channel_gate_backward_op.register_fake
def _(grad, gate, hidden, stats, w1, w2):
    return torch.empty_like(stats), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    stats, w1, w2, _dtype = inputs
    gate, hidden = output
    ctx.save_for_backward(stats, w1, w2, gate, hidden)
    ctx.mark_non_differentiable(hidden)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the hidden layer


def _backward(ctx, grad, _grad_hidden):
    if grad is None:
        return None, None, None, None
    stats, w1, w2, gate, hidden = ctx.saved_tensors
    dx, dw1, dw2 = torch.ops.hifuse.channel_gate_backward(grad.contiguous(), gate, hidden, stats, w1, w2)
    return dx, dw1, dw2, None


_channel_gate_op.register_autograd(_backward, setup_context=_setup_context)


def _flops(stats_shape, w1_shape, *_args, out_shape=None, **_kwargs) -> int:
    return 2 * 2 * stats_shape[0] * w1_shape[0] * w1_shape[1]  # both convolutions, as FlopCounterMode counts eager's


def _backward_flops(grad_shape, gate_shape, hidden_shape, stats_shape, w1_shape, *_args, out_shape=None,
                    **_kwargs) -> int:
    return 2 * _flops(stats_shape, w1_shape)  # each convolution's input and weight gradients


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.hifuse.channel_gate)(_flops)
    register_flop_formula(torch.ops.hifuse.channel_gate_backward)(_backward_flops)


_register_flops()


def unsupported_reason(stats: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                       dtype: torch.dtype | None = None) -> str | None:
    """Why the op cannot take these (2N, C) poolings and (R, C), (C, R) weights, or None."""
    reason = _triton.unsupported_reason(stats, w1, w2)
    if reason is not None:
        return reason
    dtypes = {stats.dtype, w1.dtype, w2.dtype} | ({dtype} if dtype is not None else set())
    if not dtypes <= set(SUPPORTED_DTYPES):
        return f"dtypes {sorted(map(str, dtypes))} are not all supported ({SUPPORTED_DTYPES})"
    if dtype is None and len(dtypes) > 1:
        return f"without a GEMM dtype the poolings and weights must share one dtype, got {sorted(map(str, dtypes))}"
    if stats.dim() != 2 or stats.shape[0] % 2 or stats.shape[0] == 0:
        return f"the poolings must be (2N, C) rows with N >= 1, got {tuple(stats.shape)}"
    r, c = w1.shape if w1.dim() == 2 else (None, None)
    if w1.dim() != 2 or w2.shape != (c, r) or stats.shape[1] != c:
        return (f"weights must be (R, C) and (C, R) for poolings of C channels, got {tuple(w1.shape)} and "
                f"{tuple(w2.shape)} for {tuple(stats.shape)}")
    if r > 256:
        return f"{r} hidden channels: the kernels hold them in one tile of at most 256"
    return None


def channel_gate(avg: torch.Tensor, best: torch.Tensor | None, w1: torch.Tensor, w2: torch.Tensor,
                 dtype: torch.dtype | None = None, check: bool = True) -> torch.Tensor:
    """``sigmoid(se(best) + se(avg))`` as an (N, C, 1, 1) gate, se the 1x1 convolution ``w1``
    ((R, C) or (R, C, 1, 1)), a ReLU and the 1x1 convolution ``w2`` back: from the (N, C, 1, 1)
    poolings avg and best, or (``best`` None) from ``avg`` holding both stacked, averages
    first, as (2N, C, 1, 1) or (2N, C). ``dtype``: the convolutions' dtype (autocast's, which
    the caller reads: the op runs outside autocast), else the inputs'."""
    if check:
        if not all(isinstance(t, torch.Tensor) for t in (avg, w1, w2, *([] if best is None else [best]))):
            raise TypeError("channel_gate: poolings and weights must be tensors")
        if best is not None and best.shape != avg.shape:
            raise ValueError(f"channel_gate: avg {tuple(avg.shape)} and best {tuple(best.shape)} differ")
    stats = avg.reshape(avg.shape[0], -1) if best is None else torch.cat(
        [avg.reshape(avg.shape[0], -1), best.reshape(best.shape[0], -1)])
    w1, w2 = w1.reshape(w1.shape[0], -1), w2.reshape(w2.shape[0], -1)
    if check:
        reason = unsupported_reason(stats, w1, w2, dtype)
        if reason is not None:
            raise RuntimeError(f"channel_gate: {reason}")
    gate, _hidden = torch.ops.hifuse.channel_gate(stats.contiguous(), w1.contiguous(), w2.contiguous(), dtype)
    return gate.view(*gate.shape, 1, 1)
