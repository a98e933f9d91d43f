"""Channel pooling of the fusion block: per-channel average and maximum of g in one pass.

The eager fusion block pools g twice (adaptive average and max pooling) before the shared
SE MLP. Here one pass over channels-last g (N, S, C) gives both, with the first position of
each maximum kept for backward (ties go to the first position, as adaptive_max_pool2d does).
Positions are split into chunks so that small N * C still fills the GPU; the partials are
combined in a fixed order by a small second kernel, so reruns give identical bits.
``chain``: the op also hands g on to its next reader, whose gradient of g the backward kernel
adds to the pool's (no accumulation pass).

Layers: reference, kernels, registered ops, autograd, functional entry point.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _configs, _triton
from ._features import (
    check_device,
    feature_problem,
    nhwc,
    raise_problem,
)
from ._triton import tl, triton

BLOCK_S = 32  # positions per step of the channel pooling loop
POOL_CHUNKS = 8  # position chunks per image and channel block
WARPS = 4  # Triton's default
# The pooling keeps a sum, a maximum and its position for each of its tile's 32 x 64 lanes: on 8
# warps 8 lanes a thread (about 80 registers; 4 warps took up to 143 where a launch's pointers
# are not known to be aligned).
POOL_WARPS = 8

__all__ = ["channel_pool", "channel_pool_ref"]


def channel_pool_ref(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(average, maximum) over positions of (N, C, H, W), each (N, C, 1, 1), as eager pools."""
    return F.adaptive_avg_pool2d(g, 1), F.adaptive_max_pool2d(g, 1)


if triton is not None:
    from ._triton import image_block

    @_triton.kernel
    def _channel_pool_kernel(G, SUM, MAX, ARG, S, C, CHUNK, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, LOW=None,
                             HAS_LOW: tl.constexpr = False):
        """Partial sum, maximum and first position of the maximum over one chunk of positions;
        HAS_LOW: also writes g cast to LOW's dtype (for a GEMM that reads it next). Each lane of
        the tile keeps its own sum, maximum and the maximum's first position over the positions
        it loads, reduced across the tile once at the end: reduced every step, the loop was
        three cross-warp reductions (sum, NaN, arg-max) for two loads."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk = tl.program_id(2)
        cmask = c < C
        total = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        best = tl.full((BLOCK_S, BLOCK_C), float("-inf"), dtype=tl.float32)
        where = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.int32)
        start = chunk * CHUNK
        stop = tl.minimum(start + CHUNK, S)
        for s0 in range(start, stop, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = (s < stop)[:, None] & cmask[None, :]
            offs = (n * S + s.to(tl.int64))[:, None] * C + c[None, :]
            v = tl.load(G + offs, mask=m, other=0.0)
            if HAS_LOW:
                tl.store(LOW + offs, v.to(LOW.dtype.element_ty), mask=m)
            v = v.to(tl.float32)
            total += v
            # a lane's positions come in order: a strictly larger value keeps the first
            # position of a maximum; NaN is the maximum once seen (as in eager), so a lane takes
            # its first NaN and keeps it (no comparison with NaN is true)
            take = m & ((v > best) | ((v != v) & (best == best)))
            where = tl.where(take, s[:, None], where)
            best = tl.where(take, v, best)
        lane_nan = best != best
        first_nan = tl.min(tl.where(lane_nan, where, S), 0)
        best = tl.where(lane_nan, float("-inf"), best)
        top = tl.max(best, 0)
        # lanes that took nothing hold -inf at position 0: where every value is -inf the
        # chunk's answer is 0, as it was reduced every step
        at = tl.min(tl.where(best == top[None, :], where, S), 0)
        nan = first_nan < S
        total = tl.sum(total, 0)
        best = tl.where(nan, float("nan"), top)
        where = tl.where(nan, first_nan, at)
        part = (n * tl.num_programs(2) + chunk) * C + c
        tl.store(SUM + part, total, mask=cmask)
        tl.store(MAX + part, best, mask=cmask)
        tl.store(ARG + part, where, mask=cmask)

    @_triton.kernel
    def _channel_pool_combine_kernel(SUM, MAX, ARG, AVG, BEST, OUT_ARG, S, C, CHUNKS, BLOCK_C: tl.constexpr):
        """The chunks' partials combined in chunk order: the average and maximum in g's dtype,
        and the position of the first chunk holding the maximum (a NaN, once seen, is it)."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        total = tl.zeros((BLOCK_C,), dtype=tl.float32)
        best = tl.full((BLOCK_C,), float("-inf"), dtype=tl.float32)
        where = tl.zeros((BLOCK_C,), dtype=tl.int32)
        for k in range(0, CHUNKS):
            part = (n * CHUNKS + k) * C + c
            total += tl.load(SUM + part, mask=cmask, other=0.0)
            v = tl.load(MAX + part, mask=cmask, other=float("-inf"))
            take = (best == best) & ((v > best) | (v != v))
            where = tl.where(take, tl.load(ARG + part, mask=cmask, other=0), where)
            best = tl.where(take, v, best)
        out = n * C + c
        tl.store(AVG + out, (total / S).to(AVG.dtype.element_ty), mask=cmask)
        tl.store(BEST + out, best.to(BEST.dtype.element_ty), mask=cmask)
        tl.store(OUT_ARG + out, where, mask=cmask)

    @_triton.kernel
    def _channel_pool_bwd_kernel(D_AVG, D_MAX, ARG, ACC, DG, S, C, HAS_ACC: tl.constexpr, BLOCK_S: tl.constexpr,
                                 BLOCK_C: tl.constexpr):
        n, s = image_block(S, BLOCK_S)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = c < C
        m = (s < S)[:, None] & cmask[None, :]
        d_avg = tl.load(D_AVG + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        d_max = tl.load(D_MAX + n * C + c, mask=cmask, other=0.0).to(tl.float32)
        arg = tl.load(ARG + n * C + c, mask=cmask, other=-1)
        dg = d_avg[None, :] / S + tl.where(s[:, None] == arg[None, :], d_max[None, :], 0.0)
        offs = (n * S + s.to(tl.int64))[:, None] * C + c[None, :]
        if HAS_ACC:  # g's gradient from its later readers
            dg += tl.load(ACC + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- ops


def _launch(name: str, g: torch.Tensor) -> dict:
    """BLOCK_S (positions) and BLOCK_C (channels) of a program's tile and num_warps (and the
    forward's position chunks): the GPU's, or the launch table's for this device and shape,
    or a wide tile."""
    n, s, c = g.shape
    warps = POOL_WARPS if name == "forward" else WARPS
    if _triton.wide():
        block_c = _triton.block_channels(c)
        return dict(BLOCK_S=min(_triton.next_power_of_2(s), _triton.wide_rows(block_c)), BLOCK_C=block_c,
                    num_warps=warps, **({"chunks": 1} if name == "forward" else {}))
    default = dict(BLOCK_S=BLOCK_S, BLOCK_C=min(64, _triton.block_channels(c)), num_warps=warps)
    if name == "forward":
        default["chunks"] = POOL_CHUNKS
    return _configs.launch_config(
        f"channel_pool.{name}", f"{_configs.dtype_name(g.dtype)}/c{c}/s{s}", default, g.device,
        lambda config: _configs.power_of_two_problem(config, "BLOCK_S", "BLOCK_C", high=1024),
    )


@_triton.define_op("hifuse::channel_pool", mutates_args=())
def _channel_pool_op(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled, arg): pooled (2, N, C) holds the averages, then the maxima (one tensor, so the
    shared SE MLP takes both in one pass); arg the first position of each maximum."""
    return _forward_impl(g)[:2]


@_triton.define_op("hifuse::channel_pool_cast", mutates_args=())
def _channel_pool_cast_op(g: torch.Tensor, low_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hifuse::channel_pool``'s outputs and g cast to ``low_dtype``, written by the same pass
    (for a GEMM that reads g next: no cast pass reads it again). No autograd of its own: the
    chained pool (``channel_pool(..., chain=True, low_dtype=...)``) takes it."""
    if low_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"channel_pool_cast: low_dtype must be float32, float16 or bfloat16, got {low_dtype}")
    return _forward_impl(g, low_dtype)


def _forward_impl(g: torch.Tensor, low_dtype: torch.dtype | None = None):
    n, s, c = g.shape
    launch = dict(_launch("forward", g))
    # Chunks of positions keep enough programs busy at small N * C; partials are combined
    # below in a fixed order (the first chunk holding the maximum gives its position).
    block_s, chunks = launch["BLOCK_S"], launch.pop("chunks")
    chunk = max(block_s, triton.cdiv(triton.cdiv(s, chunks), block_s) * block_s)
    chunks = triton.cdiv(s, chunk)
    f32 = dict(device=g.device, dtype=torch.float32)
    part_sum, part_max = torch.empty((n, chunks, c), **f32), torch.empty((n, chunks, c), **f32)
    part_arg = torch.empty((n, chunks, c), device=g.device, dtype=torch.int32)
    low = g.new_empty((0,)) if low_dtype is None else torch.empty_like(g, dtype=low_dtype)
    _triton.wrap_triton(_channel_pool_kernel)[_triton.grid(n, triton.cdiv(c, launch["BLOCK_C"]), chunks)](
        g, part_sum, part_max, part_arg, s, c, chunk, **launch, LOW=g if low_dtype is None else low,
        HAS_LOW=low_dtype is not None,
    )
    pooled = torch.empty((2, n, c), device=g.device, dtype=g.dtype)
    arg = torch.empty((n, c), device=g.device, dtype=torch.int32)
    _triton.wrap_triton(_channel_pool_combine_kernel)[_triton.grid(n, triton.cdiv(c, launch["BLOCK_C"]))](
        part_sum, part_max, part_arg, pooled[0], pooled[1], arg, s, c, chunks, BLOCK_C=launch["BLOCK_C"],
        num_warps=1,
    )
    return pooled, arg, low


@_triton.define_op("hifuse::channel_pool_backward", mutates_args=())
def _channel_pool_backward_op(
    d_avg: torch.Tensor, d_max: torch.Tensor, arg: torch.Tensor, g: torch.Tensor, acc: torch.Tensor | None = None
) -> torch.Tensor:
    """g's gradient (plus ``acc``, its gradient from other readers, (N, S, C) like g)."""
    n, s, c = g.shape
    dg = torch.empty_like(g)
    launch = _launch("backward", g)
    grid = _triton.grid(n * triton.cdiv(s, launch["BLOCK_S"]), triton.cdiv(c, launch["BLOCK_C"]))
    _triton.wrap_triton(_channel_pool_bwd_kernel)[grid](d_avg, d_max, arg, dg if acc is None else acc, dg, s, c,
                                                        HAS_ACC=acc is not None, **launch)
    return dg


@_channel_pool_op.register_fake
def _(g):
    n, _s, c = g.shape
    return g.new_empty((2, n, c)), g.new_empty((n, c), dtype=torch.int32)


@_channel_pool_cast_op.register_fake
def _(g, low_dtype):
    n, _s, c = g.shape
    return g.new_empty((2, n, c)), g.new_empty((n, c), dtype=torch.int32), torch.empty_like(g, dtype=low_dtype)


@_channel_pool_backward_op.register_fake
def _(d_avg, d_max, arg, g, acc=None):
    return torch.empty_like(g)


def _channel_pool_setup(ctx, inputs, output):
    (g,) = inputs
    ctx.save_for_backward(g, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the argmax


def _pool_grads(g, arg, d_pooled, acc=None):
    """g's gradient for the (2, N, C) pooled gradient (averages', maxima's; may be expanded)."""
    d_avg, d_max = d_pooled[0].contiguous(), d_pooled[1].contiguous()
    return torch.ops.hifuse.channel_pool_backward(d_avg, d_max, arg, g, acc)


def _channel_pool_backward(ctx, d_pooled, _d_arg):
    g, arg = ctx.saved_tensors
    return None if d_pooled is None else _pool_grads(g, arg, d_pooled)


_channel_pool_op.register_autograd(_channel_pool_backward, setup_context=_channel_pool_setup)


class _ChannelPoolChain(torch.autograd.Function):
    """(average, maximum) and g itself (its storage, no copy) for g's next reader, whose
    gradient of g the backward kernel adds to the pool's; with ``low_dtype``, and g cast to it
    (as ``spatial_pool``'s chain)."""

    @staticmethod
    def forward(ctx, g, low_dtype):
        if low_dtype is None:
            pooled, arg = torch.ops.hifuse.channel_pool(g)
            low = ()
        else:
            pooled, arg, low = torch.ops.hifuse.channel_pool_cast(g, low_dtype)
            ctx.mark_non_differentiable(low)
            low = (low,)
        ctx.save_for_backward(g, arg)
        ctx.set_materialize_grads(False)
        return pooled, g.detach(), *low

    @staticmethod
    def backward(ctx, d_pooled, d_after, *_d_low):
        g, arg = ctx.saved_tensors
        if d_pooled is None:
            return d_after, None
        return _pool_grads(g, arg, d_pooled, None if d_after is None else d_after.contiguous()), None


# --------------------------------------------------------------------------- functional


def channel_pool(g: torch.Tensor, check: bool = True, chain: bool = False, stacked: bool = False,
                 low_dtype: torch.dtype | None = None):
    """(average, maximum) over the positions of (N, C, H, W) g, each (N, C, 1, 1), in one pass;
    ``stacked``: one (2N, C, 1, 1) tensor instead, the averages then the maxima.
    ``chain``: and g as its next reader takes it, g's gradient from that reader summed with the
    pool's in the backward kernel; with ``low_dtype`` (and ``chain``), then g cast to it,
    channels-last, written by the same pass and taking no gradient (for a GEMM that reads g
    next, whose gradient of g is its next reader's)."""
    if check:  # False: the caller made the checks once already
        raise_problem("channel_pool", feature_problem("g", g))
        check_device("channel_pool", g)
    n, c, h, w = g.shape
    if low_dtype is not None and not chain:
        raise ValueError("channel_pool: low_dtype takes chain")
    if chain:
        pooled, rows, *low = _ChannelPoolChain.apply(nhwc(g), low_dtype)
    else:
        pooled, _arg = torch.ops.hifuse.channel_pool(nhwc(g))
    out = [pooled.view(2 * n, c, 1, 1)] if stacked else [pooled[0].view(n, c, 1, 1), pooled[1].view(n, c, 1, 1)]
    if chain:
        out.append(rows.view(n, h, w, c).permute(0, 3, 1, 2))
        out += [t.view(n, h, w, c).permute(0, 3, 1, 2) for t in low]
    return out[0] if len(out) == 1 else tuple(out)
