"""Spatial pooling of the fusion block: per-position channel maximum and mean of l in one pass.

The eager block reduces l twice over channels (amax, mean) and concatenates the two maps.
Here one pass over channels-last l (N, S, C) writes the (N, 2, H, W) map the spatial
attention convolution takes. A position's channel-max gradient is shared evenly among the
channels holding the maximum, as amax does. ``chain``: the op also hands l on to its next
reader, whose gradient of l comes back here and is added in the backward kernel, so l's
gradients are summed where they are produced, not by an accumulation pass.

Layers: reference, kernels, registered ops, autograd, functional entry point.
"""

from __future__ import annotations

import torch

from . import _configs, _triton
from ._features import (
    check_device,
    feature_problem,
    nhwc,
    raise_problem,
)
from ._triton import tl, triton

__all__ = ["spatial_pool", "spatial_pool_ref"]


def spatial_pool_ref(l: torch.Tensor) -> torch.Tensor:
    """The (N, 2, H, W) map [channel max, channel mean] of (N, C, H, W), as eager builds it."""
    return torch.cat([l.amax(dim=1, keepdim=True), l.mean(dim=1, keepdim=True)], 1)


if triton is not None:

    @triton.jit
    def _rows(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's rows (positions) and channel lanes, with their masks."""
        p = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        pmask = p < P
        cmask = c < C
        return p, c, pmask, cmask, pmask[:, None] & cmask[None, :]

    @triton.jit
    def _max_nan(v, m):
        """Row maximum over the masked lanes, NaN when a lane holds NaN (as amax; tl.max
        would drop it)."""
        nan = tl.sum(((v != v) & m).to(tl.int32), 1) > 0
        best = tl.max(tl.where(m & (v == v), v, float("-inf")), 1)
        return tl.where(nan, float("nan"), best)

    @_triton.kernel
    def _spatial_pool_kernel(L, OUT, P, S, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, LOW=None,
                             HAS_LOW: tl.constexpr = False):
        """HAS_LOW: also writes l cast to LOW's dtype (for a GEMM that reads it next)."""
        p, c, pmask, cmask, m = _rows(P, C, BLOCK_P, BLOCK_C)
        v = tl.load(L + p[:, None] * C + c[None, :], mask=m, other=0.0)
        if HAS_LOW:
            tl.store(LOW + p[:, None] * C + c[None, :], v.to(LOW.dtype.element_ty), mask=m)
        v = v.to(tl.float32)
        mean = tl.sum(v, 1) / C
        best = _max_nan(v, m)
        out = (p // S) * 2 * S + p % S  # (N, 2, S): channel 0 the max, 1 the mean
        tl.store(OUT + out, best.to(OUT.dtype.element_ty), mask=pmask)
        tl.store(OUT + out + S, mean.to(OUT.dtype.element_ty), mask=pmask)

    @_triton.kernel
    def _spatial_pool_bwd_kernel(L, D_OUT, ACC, DL, P, S, C, d_n, d_k, d_s, HAS_ACC: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """D_OUT, (N, 2, S), is read through its strides (d_n, d_k, d_s): the 7x7 convolution
        hands its input gradient channels-last."""
        p, c, pmask, cmask, m = _rows(P, C, BLOCK_P, BLOCK_C)
        offs = p[:, None] * C + c[None, :]
        v = tl.load(L + offs, mask=m, other=0.0).to(tl.float32)
        best = _max_nan(v, m)
        hit = (v == best[:, None]) & m
        ties = tl.sum(hit.to(tl.float32), 1)
        out = (p // S) * d_n + (p % S) * d_s
        d_max = tl.load(D_OUT + out, mask=pmask, other=0.0).to(tl.float32)
        d_mean = tl.load(D_OUT + out + d_k, mask=pmask, other=0.0).to(tl.float32)
        # a NaN maximum is held by no channel: amax's gradient is then 0/0, NaN, as here
        share = tl.where(best != best, float("nan"), d_max / tl.maximum(ties, 1.0))
        dl = tl.where(hit | (best != best)[:, None], share[:, None], 0.0) + (d_mean / C)[:, None]
        if HAS_ACC:  # l's gradient from its later readers
            dl += tl.load(ACC + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(DL + offs, dl.to(DL.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- ops


def _launch(name: str, l: torch.Tensor) -> dict:
    """BLOCK_P (rows), BLOCK_C (a whole row) and num_warps: the GPU's, or the launch table's
    for this device and shape (its BLOCK_P and num_warps), or a wide tile."""
    c = l.shape[2]
    # the backward holds two tiles (l and the gradient it adds to): rows for two, or triton 3.6
    # spills at 384 channels
    rows = _triton.rows_per_program(c, 2 if name == "backward" else 1)
    default = dict(BLOCK_P=rows, num_warps=_triton.row_warps(c, rows))
    if not _triton.wide():
        default = _configs.launch_config(
            f"spatial_pool.{name}", f"{_configs.dtype_name(l.dtype)}/c{c}", default, l.device,
            lambda config: _configs.power_of_two_problem(config, "BLOCK_P", high=1024),
        )
    return dict(default, BLOCK_C=_triton.block_channels(c))


def _forward_impl(l: torch.Tensor, low_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n, s, c = l.shape
    out = l.new_empty((n, 2, s))
    low = l.new_empty((0,)) if low_dtype is None else torch.empty_like(l, dtype=low_dtype)
    launch = _launch("forward", l)
    _triton.wrap_triton(_spatial_pool_kernel)[(triton.cdiv(n * s, launch["BLOCK_P"]),)](
        l, out, n * s, s, c, **launch, LOW=l if low_dtype is None else low, HAS_LOW=low_dtype is not None,
    )
    return out, low


@_triton.define_op("hifuse::spatial_pool", mutates_args=())
def _spatial_pool_op(l: torch.Tensor) -> torch.Tensor:
    return _forward_impl(l)[0]


@_triton.define_op("hifuse::spatial_pool_cast", mutates_args=())
def _spatial_pool_cast_op(l: torch.Tensor, low_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``hifuse::spatial_pool``'s map and l cast to ``low_dtype``, written by the same pass (for
    a GEMM that reads l next: no cast pass reads it again). No autograd of its own: the chained
    pool (``spatial_pool(..., chain=True, low_dtype=...)``) takes it."""
    if low_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"spatial_pool_cast: low_dtype must be float32, float16 or bfloat16, got {low_dtype}")
    return _forward_impl(l, low_dtype)


@_triton.define_op("hifuse::spatial_pool_backward", mutates_args=())
def _spatial_pool_backward_op(d_out: torch.Tensor, l: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """l's gradient (plus ``acc``, its gradient from other readers, (N, S, C) like l)."""
    n, s, c = l.shape
    dl = torch.empty_like(l)
    launch = _launch("backward", l)
    _triton.wrap_triton(_spatial_pool_bwd_kernel)[(triton.cdiv(n * s, launch["BLOCK_P"]),)](
        l, d_out, l if acc is None else acc, dl, n * s, s, c, *d_out.stride(), HAS_ACC=acc is not None, **launch
    )
    return dl


@_spatial_pool_op.register_fake
def _(l):
    n, s, _c = l.shape
    return l.new_empty((n, 2, s))


@_spatial_pool_cast_op.register_fake
def _(l, low_dtype):
    n, s, _c = l.shape
    return l.new_empty((n, 2, s)), torch.empty_like(l, dtype=low_dtype)


@_spatial_pool_backward_op.register_fake
def _(d_out, l, acc=None):
    return torch.empty_like(l)


def _spatial_pool_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _spatial_pool_backward(ctx, d_out):
    (l,) = ctx.saved_tensors
    return torch.ops.hifuse.spatial_pool_backward(d_out, l)


_spatial_pool_op.register_autograd(_spatial_pool_backward, setup_context=_spatial_pool_setup)


class _SpatialPoolChain(torch.autograd.Function):
    """The pooled map and l itself (its storage, no copy) for l's next reader, whose gradient
    of l the backward kernel adds to the pool's; with ``low_dtype``, and l cast to it (written
    by the pool's pass; a copy for a GEMM, which takes no gradient through it: the GEMM's
    gradient of l comes back as the next reader's)."""

    @staticmethod
    def forward(ctx, l, low_dtype):
        ctx.save_for_backward(l)
        ctx.set_materialize_grads(False)
        if low_dtype is None:
            return torch.ops.hifuse.spatial_pool(l), l.detach()
        pooled, low = torch.ops.hifuse.spatial_pool_cast(l, low_dtype)
        ctx.mark_non_differentiable(low)
        return pooled, l.detach(), low

    @staticmethod
    def backward(ctx, d_out, d_after, *_d_low):
        (l,) = ctx.saved_tensors
        if d_out is None:
            return d_after, None
        return torch.ops.hifuse.spatial_pool_backward(d_out, l, None if d_after is None else d_after.contiguous()), None


# --------------------------------------------------------------------------- functional


def spatial_pool(l: torch.Tensor, check: bool = True, chain: bool = False, low_dtype: torch.dtype | None = None):
    """(N, 2, H, W) map of the channel maximum and mean of (N, C, H, W) l, in one pass.
    ``chain``: (map, l as its next reader takes it), l's gradient from that reader summed
    with the pool's in the backward kernel; with ``low_dtype`` (and ``chain``), then l cast to
    it, channels-last, written by the same pass and taking no gradient (for a GEMM that reads
    l next, whose gradient of l is its next reader's)."""
    if check:  # False: the caller made the checks once already
        raise_problem("spatial_pool", feature_problem("l", l))
        check_device("spatial_pool", l)
    n, c, h, w = l.shape
    if not chain:
        if low_dtype is not None:
            raise ValueError("spatial_pool: low_dtype takes chain")
        return torch.ops.hifuse.spatial_pool(nhwc(l)).view(n, 2, h, w)
    pooled, rows, *low = _SpatialPoolChain.apply(nhwc(l), low_dtype)
    out = (pooled.view(n, 2, h, w), rows.view(n, h, w, c).permute(0, 3, 1, 2))
    return (*out, low[0].view(n, h, w, c).permute(0, 3, 1, 2)) if low else out
