"""GEMMs whose input is rebuilt in backward instead of saved.

A linear layer keeps its input for the weight gradient. When that input is a cheap function
of tensors that backward keeps anyway (a LayerNorm or a BatchNorm apply of saved inputs),
keeping it as well stores the same information twice: the IRMLP's bn1 output alone is as
large as the fusion block's norm3 output. Here the GEMM keeps only the producer's
inputs and rebuilds its own input in backward, computed as the forward computed it (the same
values): by the producer's backward pass where that reads the same inputs anyway (the GEMM's
input gradient first, then that pass, then the weight gradient), else by one elementwise pass
before the weight gradient. The large GEMMs are never recomputed; only the fusion block's
small 1x1 input GEMMs are (``linear_batch_norm``).

A producer is a class with two static methods, and optionally two more:
- ``make(*args) -> (a, aux)``: the GEMM input ``a`` and what its backward needs besides
  ``args`` (statistics the producer's op returns), without autograd;
- ``grad(grad_a, aux, *args)``: the gradients of ``args`` (None for non-tensors);
- ``dtype(*args)``: a's dtype, and ``remake_grad(grad_a, aux, *args) -> (a, grads)``: ``make``'s
  a and ``grad``'s gradients from one backward pass, for grad_a as (M, C) rows (``linear``
  then keeps the forward's ``aux``, statistics, to hand it). A producer with ``ONES`` takes
  ``ones=True`` where the GEMM has a bias: its a may then come as rows with a ones column
  after them (``_triton.ones_column``), whose weight-gradient GEMM gives the bias's gradient
  too (no pass of its own over the output's gradient).

A source is a producer used only for ``make``: it rebuilds a tensor that an autograd op made
in forward (gradients go through that op), for consumers that would otherwise keep it.

``linear(producer, args, weight, bias)`` applies the GEMM to ``make``'s result (``rebuilt``:
one of ``args`` comes from a source too; ``Given``: the input itself, kept, for the casts and
float32 gradients below). More functions keep less by the same rule:
- ``linear_pair``: proj then fc1 keeps proj's input only;
- ``dwconv_layer_norm_linear_residual``: the local block, whose stream gradient is summed by
  the convolution's backward kernel;
- ``residual_layer_norm_linear``: the next block's qkv GEMM keeps the residual LayerNorm's
  inputs, not its normalised rows;
- ``linear_batch_norm`` and ``norm_cat_linear``: the fusion block's 1x1 input GEMMs with
  their BatchNorm keep the GEMM input only, and the LayerNorm over their concatenation keeps
  neither the parts nor its rows; with ``defer`` a part is its GEMM's output, whose BatchNorm
  the LayerNorm applies on load (``LayerNormCatBN``), in forward and in backward, where its
  pass also reduces the sums of the BatchNorm's backward;
- ``gated_layer_norm`` and ``gated_layer_norm_conv2d``: norm3, and norm3 with the IRMLP's
  conv1 (and, through ``rebuilt``, its ``bn1``), keep norm3's source, not its input or output;
  under autocast norm3's float32 output is not written at all where ``bn1`` computes it on
  load (``on_load``, ``BatchNormApplyGated``).

Under autocast a GEMM runs in autocast's dtype as ``F.linear`` would. Its weight and bias are
cast once, in forward, and that cast is saved for backward (a copy made per step, never stale
after an optimizer step); backward computes in the dtype of the incoming gradient (the GEMM's)
and writes each gradient in the dtype of what it belongs to: a weight's float32 gradient
straight from the GEMM on a GPU (``torch.mm(..., out_dtype=)``, no cast pass), a bias's from
a float32 sum. Those round once where autocast's casts round twice (bf16, then float32). Dynamo traces these autograd.Functions, so under
torch.compile the GEMMs stay visible to Inductor and the hifuse ops stay opaque nodes.

Layers: producers, autograd, functional entry points. Used by the fused blocks' training
paths (``hifuse.fused``).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import batch_norm_act as bna  # noqa: F401 - registers hifuse::batch_norm_act
from . import dwconv_layer_norm as dln
from . import gated_layer_norm as gln
from . import layer_norm_cat as lnc
from . import residual_layer_norm as rln
from . import weight_casts
from .reference import CUDA_LIKE_DEVICES, autocast_dtype

__all__ = ["BatchNormApply", "BatchNormApplyGated", "DeferredBatchNorm", "DwconvLayerNorm", "GatedLayerNorm",
           "GatedLayerNormRows", "GatedResidual", "Given", "LayerNormCat", "LayerNormCatBN", "LinearBatchNorm",
           "LinearStats",
           "dwconv_layer_norm_linear_residual", "gated_layer_norm", "gated_layer_norm_conv2d",
           "gated_layer_norm_source", "linear", "linear_batch_norm", "linear_pair", "norm_cat_linear",
           "residual_layer_norm_linear"]

# --------------------------------------------------------------------------- producers


class Given:
    """The GEMM's input as given, kept: ``linear(Given, (x,), weight, bias)`` is ``F.linear``
    whose weight and bias casts come from the forward's batch (``weight_casts``) and whose
    float32 gradients come from the GEMMs and a float32 sum, not from cast passes."""

    @staticmethod
    def make(x):
        return x, ()

    @staticmethod
    def grad(grad_a, aux, x):
        return (grad_a,)


class BatchNormApply:
    """hifuse::batch_norm_act's apply with given batch statistics, (M, C) rows out; args as
    the op's: (y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype)."""

    @staticmethod
    def make(*args):
        return torch.ops.hifuse.batch_norm_act(*args), ()

    @staticmethod
    def grads(dy, dr, dw, db) -> tuple:
        """The gradients of the args given those of y, residual (or None), weight and bias:
        mean and invstd are batch statistics, whose gradients are in dy's reduction terms."""
        return dy, dr, None, None, dw, db, None, None, None, None, None

    @staticmethod
    def grad(grad_a, aux, y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype):
        dy, dr, dw, db, _ = torch.ops.hifuse.batch_norm_act_backward(
            grad_a.contiguous(), y, residual, mean, invstd, weight, bias, act, height, width, pool
        )
        return BatchNormApply.grads(dy, dr if residual is not None else None, dw, db)

    @staticmethod
    def dtype(y, residual, *rest):
        """The dtype of ``make``'s result."""
        return bna.result_dtype(y, residual, rest[-1])

    @staticmethod
    def remake_grad(grad_a, aux, y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype):
        """``(make(*args)[0], grad(grad_a, aux, *args))`` for grad_a as (M, C) rows, the result
        written by the backward's reducing pass, which reads what rebuilding it reads (the
        pooled apply: made first)."""
        args = (y, residual, mean, invstd, weight, bias, act, height, width, pool, out_dtype)
        if pool:
            return BatchNormApply.make(*args)[0], BatchNormApply.grad(grad_a, (), *args)
        dy, dr, dw, db, a = torch.ops.hifuse.batch_norm_act_backward(
            grad_a.contiguous(), y, residual, mean, invstd, weight, bias, act, height, width, pool,
            BatchNormApply.dtype(*args),
        )
        return a, BatchNormApply.grads(dy, dr if residual is not None else None, dw, db)


class BatchNormApplyGated:
    """hifuse::batch_norm_act_gated: ``BatchNormApply`` of the IRMLP's bn1, whose residual r
    (norm3's result) its passes compute on load from norm3's sources; args (y, residual,
    mean, invstd, weight, bias, act, out_dtype, x_act, *gated), ``residual`` standing for r in
    autograd only (``gated_layer_norm_conv2d``'s, never read): its gradient is r's."""

    @staticmethod
    def make(y, residual, mean, invstd, weight, bias, act, out_dtype, x_act, *gated):
        return torch.ops.hifuse.batch_norm_act_gated(y, *bna.gated_sources(gated, x_act, residual.dtype), mean,
                                                     invstd, weight, bias, act, out_dtype), ()

    @staticmethod
    def _grads(outs, residual, gated):
        dy, dr, dw, db = outs[:4]
        n, c, h, w = residual.shape
        dr = dr.view(n, h, w, c).permute(0, 3, 1, 2)
        return (dy, dr, None, None, dw, db, None, None, None, *[None] * len(gated))

    @staticmethod
    def grad(grad_a, aux, y, residual, mean, invstd, weight, bias, act, out_dtype, x_act, *gated):
        outs = torch.ops.hifuse.batch_norm_act_gated_backward(
            grad_a.contiguous(), y, *bna.gated_sources(gated, x_act, residual.dtype), mean, invstd, weight, bias, act)
        return BatchNormApplyGated._grads(outs, residual, gated)

    @staticmethod
    def dtype(y, residual, mean, invstd, weight, bias, act, out_dtype, *rest):
        return out_dtype or torch.promote_types(y.dtype, residual.dtype)

    @staticmethod
    def remake_grad(grad_a, aux, y, residual, mean, invstd, weight, bias, act, out_dtype, x_act, *gated):
        """``make``'s result, written by the backward's reducing pass, and ``grad``'s gradients."""
        outs = torch.ops.hifuse.batch_norm_act_gated_backward(
            grad_a.contiguous(), y, *bna.gated_sources(gated, x_act, residual.dtype), mean, invstd, weight, bias, act,
            BatchNormApplyGated.dtype(y, residual, mean, invstd, weight, bias, act, out_dtype))
        return outs[4], BatchNormApplyGated._grads(outs, residual, gated)


class LayerNormCat:
    """``layer_norm_cat.forward`` over 1 to 3 NCHW parts, as channels-last pixels (N, H, W, C);
    args: (*parts, weight, bias, eps, out_dtype)."""

    ONES = True

    @staticmethod
    def make(*args):
        parts, (weight, bias, eps, out_dtype) = list(args[:-4]), args[-4:]
        out, stats = lnc.forward(parts, weight, bias, eps, lnc.out_dtype_of(parts, weight, out_dtype))
        return out.permute(0, 2, 3, 1), stats

    @staticmethod
    def grad(grad_a, aux, *args):
        parts, (weight, bias) = list(args[:-4]), args[-4:-2]
        dparts, dw, db = lnc.backward(grad_a.permute(0, 3, 1, 2), parts, weight, bias, aux)
        return (*dparts, dw, db, None, None)

    @staticmethod
    def dtype(*args):
        """The dtype of ``make``'s result."""
        return lnc.out_dtype_of(list(args[:-4]), args[-4], args[-1])

    @staticmethod
    def remake_grad(grad_a, aux, *args, ones: bool = False):
        """``(make(*args)[0], grad(grad_a, aux, *args))`` for grad_a as (M, C) rows and aux the
        forward's statistics: on the Triton path the result is written by the backward's pass,
        which reads what rebuilding it reads (``ones``: as rows with a ones column); on the
        native path it is made first."""
        parts, (weight, bias) = list(args[:-4]), args[-4:-2]
        if lnc.rebuilds_in_backward(parts, weight, bias):
            a, (dparts, dw, db) = lnc.backward_rebuilding(grad_a, parts, weight, bias, aux, LayerNormCat.dtype(*args),
                                                          ones)
            return a, (*dparts, dw, db, None, None)
        a = LayerNormCat.make(*args)[0]
        return a, LayerNormCat.grad(grad_a.view(a.shape), aux, *args)


class LayerNormCatBN:
    """``layer_norm_cat.forward_bn``: ``LayerNormCat`` where the parts in the bit mask
    ``bn_parts`` are given as a training BatchNorm's input y (``LinearStats``) and applied on
    load, never written; args: (bn_parts, shared, *parts, *bn, weight, bias, eps, out_dtype),
    ``bn`` the (mean, invstd, weight, bias) of each such part and ``shared`` their
    ``SharedRebuild`` (or None) each. A part's gradient is its BatchNorm output's, which the
    BatchNorm's backward (``linear_batch_norm(..., defer=True)``) takes, with the sums it would
    reduce, reduced by this backward's pass (handed on in ``shared``). Rebuilds only
    (``remake_grad``): the Triton path."""

    ONES = True

    @staticmethod
    def split(args):
        bn_parts, shared, n_bn = args[0], args[1], 4 * lnc.bn_count(args[0])
        n_parts = len(args) - 6 - n_bn
        parts, bn = list(args[2:2 + n_parts]), list(args[2 + n_parts:2 + n_parts + n_bn])
        return bn_parts, shared, parts, bn, args[-4:]

    @staticmethod
    def make(*args):
        bn_parts, _shared, parts, bn, (weight, bias, eps, _out_dtype) = LayerNormCatBN.split(args)
        out, stats = lnc.forward_bn(parts, bn, bn_parts, weight, bias, eps, LayerNormCatBN.dtype(*args))
        return out.permute(0, 2, 3, 1), stats

    @staticmethod
    def grad(grad_a, aux, *args):
        return LayerNormCatBN.remake_grad(grad_a.reshape(-1, grad_a.shape[-1]), aux, *args)[1]

    @staticmethod
    def dtype(*args):
        _bn_parts, _shared, parts, _bn, (weight, _bias, _eps, out_dtype) = LayerNormCatBN.split(args)
        return lnc.out_dtype_of(parts, weight, out_dtype)

    @staticmethod
    def remake_grad(grad_a, aux, *args, ones: bool = False):
        """``(make(*args)[0], grad(grad_a, aux, *args))`` from one backward pass, for grad_a as
        (M, C) rows and aux the forward's statistics (``ones``: a as rows with a ones column)."""
        bn_parts, shared, parts, bn, (weight, bias, _eps, _out_dtype) = LayerNormCatBN.split(args)
        # no box (torch.compile): the BatchNorms' backward reduces its own sums
        a, (dparts, dw, db), sums = lnc.backward_bn_rebuilding(grad_a, parts, bn, bn_parts, weight, bias, aux,
                                                               LayerNormCatBN.dtype(*args),
                                                               any(box is not None for box in shared), ones)
        c = parts[0].shape[1]
        for j, box in enumerate(shared):
            if box is not None:  # the rebuilt y (LinearStats) and the sums, for the BatchNorm's backward
                box.put(*(box.take() or (None,)), sums[0, j * c:(j + 1) * c], sums[1, j * c:(j + 1) * c])
        # the BatchNorms' parameters take their gradients from the BatchNorms' backward
        return a, (None, None, *dparts, *[None] * len(bn), dw, db, None, None)


class DwconvLayerNorm:
    """hifuse::dwconv_layer_norm on (N, H, W, C) pixels; args as the op's."""

    @staticmethod
    def make(*args):
        out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(*args)
        return out, (mean, rstd)

    @staticmethod
    def grad(grad_a, aux, x, conv_weight, conv_bias, ln_weight, ln_bias, eps, out_dtype):
        return (*dln.backward(grad_a.contiguous(), x, conv_weight, conv_bias, ln_weight, *aux), None, None)


def _as_map(rows, x, pool):
    """(M, C) rows of a 1x1 GEMM of (N, H, W, C_in) x (halved by ``pool``) as (N, C, H, W) channels-last."""
    n, height, width = x.shape[:3]
    if pool:
        height, width = height // 2, width // 2
    return rows.view(n, height, width, -1).permute(0, 3, 1, 2)


class SharedRebuild:
    """Holds what one backward rebuilt (a ``make``) until the backward that runs next and
    needs the same tensors takes them, so they are rebuilt once in backward, not twice.
    ``dtype``: the dtype the taker needs a copy in (None: as made)."""

    __slots__ = ("values", "dtype")

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.values, self.dtype = None, dtype

    def put(self, *values) -> None:
        self.values = values

    def take(self):
        values, self.values = self.values, None
        return values


class LinearBatchNorm:
    """A training BatchNorm apply (``hifuse::batch_norm_act``, no residual) of a 1x1 GEMM's
    output, as an (N, C, H, W) channels-last map; args: (x, weight, bias, mean, invstd,
    bn_weight, bn_bias, act, height, width, pool, out_dtype, gemm_dtype, shared), x the GEMM's
    (N, H, W, C_in) input. The GEMM output itself is never kept: ``make`` runs the GEMM again
    (in ``gemm_dtype``, as autocast ran it) and leaves it in ``shared`` (a ``SharedRebuild``, or
    None) for the BatchNorm's backward. Only a source (``linear_batch_norm`` is its autograd)."""

    @staticmethod
    def gemm(x, weight, bias, gemm_dtype):
        if gemm_dtype is not None:
            x, weight = x.to(gemm_dtype), weight.to(gemm_dtype)
            bias = None if bias is None else bias.to(gemm_dtype)
        return F.linear(x, weight, bias).reshape(-1, weight.shape[0])

    @staticmethod
    def make(x, weight, bias, mean, invstd, bn_weight, bn_bias, act, height, width, pool, out_dtype, gemm_dtype,
             shared=None):
        y = LinearBatchNorm.gemm(x, weight, bias, gemm_dtype)
        rows = torch.ops.hifuse.batch_norm_act(y, None, mean, invstd, bn_weight, bn_bias, act, height, width, pool,
                                               out_dtype)
        if shared is not None:
            shared.put(y)
        return _as_map(rows, x, pool), (y,)


class LinearStats:
    """The 1x1 GEMM output y of a ``linear_batch_norm(..., defer=True)`` as an (N, C, H, W)
    channels-last map, for a ``LayerNormCatBN`` part; args: (x, weight, bias, gemm_dtype,
    shared), as ``LinearBatchNorm``'s (``shared`` takes y for the BatchNorm's backward). Only a
    source."""

    @staticmethod
    def make(x, weight, bias, gemm_dtype, shared=None):
        y = LinearBatchNorm.gemm(x, weight, bias, gemm_dtype)
        if shared is not None:
            shared.put(y)
        return _as_map(y, x, False), (y,)


class DeferredBatchNorm(NamedTuple):
    """What ``linear_batch_norm(..., defer=True)`` returns in place of a ``LinearBatchNorm``
    source: the ``LinearStats`` source of y, and the BatchNorm's (mean, invstd, weight, bias)
    that its reader applies."""

    source: tuple
    bn: tuple


class GatedLayerNormRows:
    """hifuse::gated_layer_norm's result as (N*H*W, 3C) rows (what ``batch_norm_act.apply_args``
    makes of it), from a source ``(N, H, W, *gated_layer_norm.op_args(..., x=None, ...),
    *bn_args)``: the op's arguments with its x given as the ``hifuse::batch_norm_act`` apply
    that made it (the W/W3 projection's BatchNorm + GELU), so neither x nor the result has to
    be kept; where it can, ``hifuse::gated_layer_norm_bn`` applies it on load and x is never
    written (``on_load``). Only a source: gradients go through ``recompute.gated_layer_norm``."""

    @staticmethod
    def on_load(n, h, w, *src):
        """``hifuse::gated_layer_norm_bn``'s arguments but its dtypes (x's BatchNorm applied on
        load), or None where its apply is not one that op takes (a residual, a pooling, another
        dtype)."""
        y, residual, mean, invstd, bn_weight, bn_bias, act, _height, _width, pool, out_dtype = src[8:]
        if residual is not None or pool or out_dtype not in (None, y.dtype) or bn_weight is None or bn_bias is None:
            return None
        g, channel_gate, l, spatial_gate, _x, weight, bias, eps = src[:8]
        return (g, channel_gate, l, spatial_gate, y.view(g.shape), mean, invstd, bn_weight, bn_bias, act, weight, bias,
                eps)

    @staticmethod
    def op_args(n, h, w, *src, x=None):
        """The op's arguments; its x ``x`` where given, else None where the op applies x's
        BatchNorm on load (``on_load``), else made by the BatchNorm apply."""
        args = list(src[:8])
        if x is None and GatedLayerNormRows.on_load(n, h, w, *src) is None:
            x = torch.ops.hifuse.batch_norm_act(*src[8:]).view(n, h * w, -1)
        args[4] = x
        return args

    @staticmethod
    def run(src, args, out_dtype=None, low_dtype=None):
        """hifuse::gated_layer_norm of ``op_args``'s ``args`` (hifuse::gated_layer_norm_bn where
        x is None: its BatchNorm applied on load)."""
        if args[4] is None:
            return torch.ops.hifuse.gated_layer_norm_bn(*GatedLayerNormRows.on_load(*src), out_dtype, low_dtype)
        return torch.ops.hifuse.gated_layer_norm(*args, out_dtype, low_dtype)

    @staticmethod
    def run_dtype(*src) -> torch.dtype:
        """The dtype of ``run``'s result without ``out_dtype`` (eager's formula's)."""
        g, channel_gate, l, spatial_gate, x, weight = src[3:9]
        if x is None:  # the BatchNorm apply's
            bn = src[11:]
            x = bna.result_dtype(bn[0], bn[1], bn[-1])
        return gln.result_dtype(g, channel_gate, l, spatial_gate, x, weight)

    @staticmethod
    def make(*src):
        out, mean, rstd, _ = GatedLayerNormRows.run(src, GatedLayerNormRows.op_args(*src))
        return out.view(-1, out.shape[-1]), (mean, rstd)

    @staticmethod
    def grads(src, args, mean, rstd, grad, grad2=None) -> tuple:
        """The gradients of ``src`` (through the op and the BatchNorm apply that makes its x)
        for the result's gradient ``grad`` (plus ``grad2``, summed on load), args the op's."""
        g, channel_gate, l, spatial_gate, x, weight = args[:6]
        if x is None:  # x's BatchNorm applied on load: the gradient of x is its output's
            y, *x_bn, act = GatedLayerNormRows.on_load(*src)[4:10]
            # that pass also reduces the BatchNorm backward's sums: its apply pass is left
            dg, dcg, dl, dsg, dx, dw, db, sums = gln.backward_bn(grad, g, channel_gate, l, spatial_gate, y, x_bn, act,
                                                                 weight, mean, rstd, grad2, sums=True)
            rows, _residual, bn_mean, bn_invstd, bn_weight, bn_bias, act, height, width, pool, _ = src[11:]
            dy, dbw, dbb = summed_batch_norm_backward(dx.view(-1, dx.shape[-1]), rows, bn_mean, bn_invstd,
                                                      bn_weight, bn_bias, sums, act, height, width, pool)
            return (None, None, None, dg, dcg, dl, dsg, None, dw, db, None, *BatchNormApply.grads(dy, None, dbw, dbb))
        dg, dcg, dl, dsg, dx, dw, db = gln.backward(grad, g, channel_gate, l, spatial_gate, x, weight, mean, rstd, grad2)
        dbn = BatchNormApply.grad(dx.view(-1, dx.shape[-1]), (), *src[11:])
        return (None, None, None, dg, dcg, dl, dsg, None, dw, db, None, *dbn)


class GatedLayerNormRowsShared:
    """``GatedLayerNormRows`` from a source ``(shared, *src)``: also leaves in ``shared`` (a
    ``SharedRebuild``) the x it rebuilt and the result in ``shared.dtype`` (written by the same
    pass), for the backward of ``gated_layer_norm_conv2d``, which needs both next."""

    @staticmethod
    def make(shared, *src):
        args = GatedLayerNormRows.op_args(*src)
        out, mean, rstd, low = GatedLayerNormRows.run(src, args, None, shared.dtype)
        shared.put(args[4], out if shared.dtype is None else low)
        return out.view(-1, out.shape[-1]), (mean, rstd)


class GatedLayerNorm:
    """The same result as (N, 3C, H, W) channels-last."""

    @staticmethod
    def make(*src):
        n, h, w = src[:3]
        rows, stats = GatedLayerNormRows.make(*src)
        return rows.view(n, h, w, -1).permute(0, 3, 1, 2), stats


# --------------------------------------------------------------------------- autograd


def summed_batch_norm_backward(grad, y, mean, invstd, weight, bias, sums, act, height, width, pool) -> tuple:
    """(dy, dweight, dbias) of a training BatchNorm's backward whose sums (of dz, of dz * x_hat:
    float32 (C,) each) a pass of its reader reduced: its apply pass
    (hifuse::batch_norm_act_backward_summed); the parameters' gradients are those sums in their
    dtypes (slices of one buffer, as DDP's gradient_as_bucket_view makes gradients: no copies)."""
    dy = torch.ops.hifuse.batch_norm_act_backward_summed(grad, y, mean, invstd, weight, bias, sums[0], sums[1], act,
                                                         height, width, pool)
    return dy, sums[1].to(weight.dtype), sums[0].to(bias.dtype)


def _split(args):
    """Tensors (saved) and the rest (kept on ctx), position by position."""
    tensors = [a if isinstance(a, torch.Tensor) else None for a in args]
    consts = [None if isinstance(a, torch.Tensor) else a for a in args]
    return tensors, consts


def _join(tensors, consts):
    return [t if t is not None else c for t, c in zip(tensors, consts)]


# torch.mm(..., out_dtype=float32) of bf16/fp16 operands: CUDA only, and only in newer torch
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


# torch.addmm(acc, a, b, out_dtype=float32, out=acc): a GEMM adding its float32 product to acc
# in its epilogue (cuBLAS's beta). Whether it works is asked of the device once, with a small
# product checked against the sum it must equal (device index -> answer).
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")
_ADDS_INTO: dict = {}


def _gemm_adds_into(device: torch.device) -> bool:
    if device.type != "cuda":
        return device.type in CUDA_LIKE_DEVICES  # the step ledger's CPU, counting a GPU's step
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ADDS_INTO:
        if torch.cuda.is_current_stream_capturing():
            return False  # the check syncs: a capture takes the add (the warm-up steps ask)
        try:
            gen = torch.Generator(device=device).manual_seed(0)
            a, b = (torch.randn(shape, device=device, generator=gen).to(torch.bfloat16) for shape in ((32, 16), (16, 8)))
            acc = torch.randn((32, 8), device=device, generator=gen)
            want = acc + a.float() @ b.float()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDS_INTO[index] = bool(torch.allclose(acc, want, rtol=1e-4, atol=1e-4))
        except (RuntimeError, TypeError):
            _ADDS_INTO[index] = False
    return _ADDS_INTO[index]


def mm_add_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc + a @ b`` in acc's dtype, for an acc that nothing but the caller holds (a gradient
    another backward of the caller's made for it): written into acc by the GEMM itself (one
    read of acc, not an add pass reading a product and acc and writing their sum, and one
    rounding, not two): for operands of acc's dtype everywhere, for a float32 acc of bf16/fp16
    operands where the device can; elsewhere, and under torch.compile, the product and an add."""
    if acc.dim() == 2 and acc.is_contiguous() and b.dtype == a.dtype and not torch.compiler.is_compiling():
        if acc.dtype == a.dtype:
            return acc.addmm_(a, b)
        if (_ADDMM_OUT_DTYPE and acc.dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
                and _gemm_adds_into(a.device)):
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    return acc + mm_to(a, b, acc.dtype)


def cast_for_gemm(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """weight and bias as a GEMM under autocast takes them (cast once, to be saved for backward)."""
    if dtype is None or weight.dtype == dtype:
        return weight, bias
    return weight_casts.cast(weight, dtype), (None if bias is None else weight_casts.cast(bias, dtype))


def mm_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``: a float32 result of bf16/fp16 operands comes from the GEMM itself
    on a GPU (it accumulates in float32 anyway), elsewhere the product is cast."""
    if (dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE
            and a.device.type in CUDA_LIKE_DEVICES and b.dtype == a.dtype):
        return torch.mm(a, b, out_dtype=dtype)
    return (a @ b).to(dtype)


def _linear_input_grad(grad: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of ``F.linear``'s input as (M, K) rows in ``dtype``, computed in grad's dtype
    (the GEMM's, under autocast); it needs the weight only, so it can come before the input is
    rebuilt."""
    return mm_to(grad.reshape(-1, grad.shape[-1]), weight.to(grad.dtype), dtype)


def _linear_backward(grad, a, weight, bias, weight_dtype=None, bias_dtype=None, a_dtype=None, a_ones=None,
                     a_grad_into=None, a_grad: bool = True):
    """Gradients of ``F.linear(a, weight, bias)`` (weight and bias as the GEMM took them):
    computed in grad's dtype (the GEMM's, under autocast), each in the dtype of what it
    belongs to (``weight_dtype``, ``bias_dtype``: the parameters', where the GEMM took casts;
    ``a_dtype``: the input's, where the GEMM took a cast of it). ``a_ones``: a's rows with a
    ones column after them (a is its first columns); the weight-gradient GEMM over it also
    gives the bias gradient, with no pass of its own over grad. ``a_grad_into``: a gradient of
    a from elsewhere, that only the caller holds, which a's gradient is added to (by the GEMM
    itself where it can: ``mm_add_into``). ``a_grad`` False: a's gradient is not computed (None)."""
    dtype = grad.dtype
    rows = grad.reshape(-1, grad.shape[-1])
    if not a_grad:
        da = None
    elif a_grad_into is not None and a_grad_into.is_contiguous() and a_grad_into.dtype == (a_dtype or a.dtype):
        da = mm_add_into(a_grad_into.view(rows.shape[0], -1), rows, weight.to(dtype)).view(a.shape)
        a_grad_into = None
    else:  # in the input's dtype straight from the GEMM (float32 too)
        da = _linear_input_grad(grad, weight, a_dtype or a.dtype).view(a.shape)
    if a_grad_into is not None:
        da = da + a_grad_into
    if a_ones is not None and bias is not None and a_ones.dtype == dtype:
        k = a.shape[-1]
        # (a | 1)^T grad: dw^T above, colsum(grad) in row k (contiguous, as the bias's gradient)
        both = mm_to(a_ones.t(), rows, weight_dtype or weight.dtype)
        return da, both[:k].t(), both[k].to(bias_dtype or bias.dtype)
    dw = mm_to(rows.t(), a.to(dtype).reshape(-1, a.shape[-1]), weight_dtype or weight.dtype)
    db = rows.sum(0, dtype=bias_dtype or bias.dtype) if bias is not None else None
    return da, dw, db


def _function(producer, sources=()):
    """The autograd.Function of ``linear``; with ``sources``, the producer argument at each
    ``index`` of ``layout`` is not kept either but rebuilt as ``source.make(*src)[0]`` from the
    ``n_src`` inputs that follow the producer's arguments."""

    class Recomputed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, weight, bias, layout, keep, bias_cancels, *flat):
            n_args = len(flat) - sum(n_src for _index, n_src in layout)
            a, aux = producer.make(*flat[:n_args])
            kept = list(flat)
            for index, _n_src in layout:
                kept[index] = None
            tensors, ctx.consts = _split(kept)
            made = (a, *aux) if keep else ()
            # a producer that rebuilds a in its backward's pass takes what make gave besides a
            # (statistics: small) from here
            remade = aux if not keep and hasattr(producer, "remake_grad") else ()
            ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
            weight, bias = cast_for_gemm(weight, bias, autocast_dtype(a))
            ctx.save_for_backward(weight, bias, *made, *remade, *tensors)
            ctx.layout, ctx.n_args, ctx.n_made, ctx.n_remade = layout, n_args, len(made), len(remade)
            ctx.bias_cancels = bias_cancels
            return F.linear(a, weight, bias)

        @staticmethod
        def backward(ctx, grad):
            weight, bias, *tensors = ctx.saved_tensors
            made, tensors = tensors[:ctx.n_made], tensors[ctx.n_made:]
            remade, tensors = tuple(tensors[:ctx.n_remade]), tensors[ctx.n_remade:]
            flat = _join(tensors, ctx.consts)
            args, start = flat[:ctx.n_args], ctx.n_args
            for source, (index, n_src) in zip(sources, ctx.layout):
                args[index] = source.make(*flat[start:start + n_src])[0]
                start += n_src
            rest, tail = (None, None, None), [None] * (len(flat) - ctx.n_args)  # layout, keep, bias_cancels; sources
            summed_bias = None if ctx.bias_cancels else bias
            if not made and hasattr(producer, "remake_grad"):
                # a's gradient first: the producer's backward then rebuilds a in the pass that
                # reads what rebuilding it reads, before the weight gradient takes it
                da = _linear_input_grad(grad, weight, producer.dtype(*args))
                if getattr(producer, "ONES", False) and summed_bias is not None:
                    a, grads = producer.remake_grad(da, remade, *args, ones=True)
                else:
                    a, grads = producer.remake_grad(da, remade, *args)
                k = weight.shape[1]
                # rows with a ones column: the weight-gradient GEMM gives the bias's gradient too
                ones = a.view(-1, a.shape[-1]) if a.shape[-1] != k else None
                _, dw, db = _linear_backward(grad, a[..., :k], weight, summed_bias, *ctx.dtypes, a_ones=ones,
                                             a_grad=False)
                return (dw, _cancelled(bias, dw, ctx) if ctx.bias_cancels else db, *rest, *grads, *tail)
            a, aux = (made[0], tuple(made[1:])) if made else producer.make(*args)
            da, dw, db = _linear_backward(grad, a, weight, summed_bias, *ctx.dtypes)
            return (dw, _cancelled(bias, dw, ctx) if ctx.bias_cancels else db, *rest, *producer.grad(da, aux, *args),
                    *tail)

    name = producer.__name__ + "".join("From" + source.__name__ for source in dict.fromkeys(sources))
    Recomputed.__name__ = Recomputed.__qualname__ = f"{name}Linear"
    return Recomputed


# Built at import: Dynamo traces a Function class made before tracing.
_FUNCTIONS = {(p, ()): _function(p) for p in (Given, BatchNormApply, BatchNormApplyGated, DwconvLayerNorm,
                                                LayerNormCat)}
for _key in ((BatchNormApply, (GatedLayerNormRows,)), (BatchNormApply, (GatedLayerNormRowsShared,)),
             (LayerNormCat, (LinearBatchNorm,) * 2),
             (LayerNormCat, (LinearBatchNorm,) * 3)):
    _FUNCTIONS[_key] = _function(*_key)
for _n in (1, 2, 3):  # every mix of parts applied first and parts whose BatchNorm is deferred
    for _sources in itertools.product((LinearBatchNorm, LinearStats), repeat=_n):
        if LinearStats in _sources:
            _FUNCTIONS[LayerNormCatBN, _sources] = _function(LayerNormCatBN, _sources)


# --------------------------------------------------------------------------- functional


def linear(producer, args, weight: torch.Tensor, bias: torch.Tensor | None = None, rebuilt=(),
           keep: bool = False, bias_cancels: bool = False) -> torch.Tensor:
    """``F.linear(producer.make(*args)[0], weight, bias)``, keeping ``args`` instead of the input
    (``keep``: the input as well, as plain autograd would, so backward does not rebuild it).

    ``rebuilt``: ``(source, index, src)`` triples where ``args[index]`` is
    ``source.make(*src)[0]``: kept as ``src`` only, its gradient still returned to it.
    ``bias_cancels``: the result's one reader is a BatchNorm with batch statistics, whose mean
    takes the bias away: the bias's gradient is zero, written as such (``_cancelled``)."""
    sources = tuple(source for source, _index, _src in rebuilt)
    layout = tuple((index, len(src)) for _source, index, src in rebuilt)
    srcs = [t for _source, _index, src in rebuilt for t in src]
    return _FUNCTIONS[producer, sources].apply(weight, bias, layout, bool(keep), bool(bias_cancels), *args, *srcs)


def _cancelled(bias: torch.Tensor | None, dw: torch.Tensor, ctx) -> torch.Tensor | None:
    """The gradient of a bias that a BatchNorm's batch mean takes away: zero in exact arithmetic
    (the BatchNorm's input gradient sums to zero over its positions). Its column sum in floating
    point is a rounding residue of that cancellation, noise that Adam would normalise into steps
    of the learning rate's size; float64 gives about 1e-16 of the gradients' scale. Zero, in the
    parameter's dtype (``ctx.dtypes[1]``), taken as 0 times the weight gradient's first column
    (``dw``, (out, in)): a channel whose gradient is not finite gets NaN, as eager's sum would."""
    if bias is None:
        return None
    return (dw[:, 0] * 0).to(ctx.dtypes[1])


class _GatedLayerNorm(torch.autograd.Function):
    """hifuse::gated_layer_norm of a ``GatedLayerNormRows`` source, with the BatchNorm apply
    that makes its x: neither x nor the result is kept; backward rebuilds x with the same apply
    (``keep``: x is kept). (One Function for both: Dynamo traces no Function given one tensor
    twice.)"""

    @staticmethod
    def forward(ctx, keep, *src):
        args = GatedLayerNormRows.op_args(*src)
        out, mean, rstd, _ = GatedLayerNormRows.run(src, args)
        tensors, ctx.consts = _split(src)
        ctx.save_for_backward(mean, rstd, args[4] if keep else None, *tensors)
        return out

    @staticmethod
    def backward(ctx, grad):
        mean, rstd, kept_x, *tensors = ctx.saved_tensors
        src = _join(tensors, ctx.consts)
        args = GatedLayerNormRows.op_args(*src, x=kept_x)
        return (None, *GatedLayerNormRows.grads(src, args, mean, rstd, grad.contiguous()))


def gated_layer_norm_source(g, channel_gate, l, spatial_gate, weight, bias, eps: float, bn_args) -> tuple:
    """The ``GatedLayerNormRows`` source of norm3 over (N, C, H, W) g and l whose x is
    ``hifuse::batch_norm_act(*bn_args)`` ((N*H*W, C) rows)."""
    n, _c, h, w = g.shape
    return (n, h, w, *gln.op_args(g, channel_gate, l, spatial_gate, None, weight, bias, eps), *bn_args)


def gated_layer_norm(src, keep: bool = False) -> torch.Tensor:
    """``GatedLayerNorm.make(*src)[0]`` with gradients for g, the gates, l, the LayerNorm's
    parameters and, through the BatchNorm apply that makes x, its input and parameters
    (``keep``: x is kept for backward, not rebuilt, where it is written at all: where norm3
    applies its BatchNorm on load, ``GatedLayerNormRows.on_load``, there is no x to keep)."""
    n, h, w = src[:3]
    return _GatedLayerNorm.apply(bool(keep), *src).view(n, h, w, -1).permute(0, 3, 1, 2)


class _GatedLayerNormConv2d(torch.autograd.Function):
    """norm3 (as ``_GatedLayerNorm``) and the IRMLP's conv1 (stride 1, no bias) on its result,
    as one Function returning both, and norm3's row mean and rstd: neither norm3's x nor its
    result is kept. ``gated``: the result is never written but in the convolution's dtype:
    what it returns as the result is an (expanded, empty) stand-in that carries its gradient,
    for a BatchNorm whose passes compute it on load (``BatchNormApplyGated``). Backward rebuilds
    x once (the BatchNorm apply, or none where norm3 applies it on load), the result once in the
    convolution's dtype (for conv1's
    weight gradient; no cast pass), and the gated LayerNorm backward takes conv1's input
    gradient and the result's other gradient (bn1's residual) as two inputs summed on load:
    neither a cast of the first nor an accumulation pass. ``shared``: a ``SharedRebuild`` where
    the result's rebuild for ``bn1`` (``GatedLayerNormRowsShared``, whose backward runs just
    before) leaves x and the result in the convolution's dtype, taken here instead of
    rebuilding them again (None, or left empty: rebuilt here)."""

    @staticmethod
    def forward(ctx, weight, padding, groups, shared, gated, *src):
        n, h, w = src[:3]
        gemm_dtype = autocast_dtype(src[3])
        args = GatedLayerNormRows.op_args(*src)
        if gated:  # the convolution's input only
            low, mean, rstd, _ = GatedLayerNormRows.run(src, args, gemm_dtype)
            dtype = GatedLayerNormRows.run_dtype(*src)
            x = torch.empty((1, 1, 1, 1), device=low.device, dtype=dtype).expand(n, h, w, low.shape[-1]).permute(
                0, 3, 1, 2)
        else:  # the convolution's input written by the same pass, in its dtype: no cast pass
            out, mean, rstd, low = GatedLayerNormRows.run(src, args, None, gemm_dtype)
            x = out.view(n, h, w, -1).permute(0, 3, 1, 2)
        ctx.weight_dtype = weight.dtype
        weight, _ = cast_for_gemm(weight, None, gemm_dtype)
        conv_in = x if gemm_dtype is None else low.view(n, h, w, -1).permute(0, 3, 1, 2)
        y = F.conv2d(conv_in, weight, None, padding=padding, groups=groups)
        tensors, ctx.consts = _split(src)
        ctx.save_for_backward(weight, mean, rstd, *tensors)
        ctx.padding, ctx.groups, ctx.shared = padding, groups, shared
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        return x, y, mean, rstd

    @staticmethod
    def backward(ctx, grad_x, grad_y, _grad_mean, _grad_rstd):
        weight, mean, rstd, *tensors = ctx.saved_tensors
        src = _join(tensors, ctx.consts)
        n, h, w = src[:3]
        taken = None if ctx.shared is None else ctx.shared.take()
        args = GatedLayerNormRows.op_args(*src, x=None if taken is None else taken[0])
        dconv = dw = None
        if grad_y is not None:
            dtype = grad_y.dtype  # the convolution's, under autocast
            if taken is not None and taken[1].dtype == dtype:
                rebuilt = taken[1]
            else:
                rebuilt = GatedLayerNormRows.run(src, args, dtype)[0]
            rebuilt = rebuilt.view(n, h, w, -1).permute(0, 3, 1, 2)
            dconv, dw, _ = torch.ops.aten.convolution_backward(
                grad_y, rebuilt, weight.to(dtype), None, [1, 1], list(ctx.padding), [1, 1], False, [0, 0],
                ctx.groups, [True, True, False],
            )
            dw = dw.to(ctx.weight_dtype)
        if grad_x is None and dconv is None:
            return (None,) * (5 + len(src))
        grads = [t.permute(0, 2, 3, 1).contiguous().view(n, h * w, -1) for t in (grad_x, dconv) if t is not None]
        return (dw, None, None, None, None, *GatedLayerNormRows.grads(src, args, mean, rstd, *grads))


class GatedResidual(NamedTuple):
    """norm3's result as the residual of a BatchNorm that computes it on load: the arguments
    ``x_act`` and ``gated`` of hifuse::batch_norm_act_gated (``BatchNormApplyGated``)."""

    x_act: int
    gated: list


def gated_layer_norm_conv2d(src, weight: torch.Tensor, padding, groups: int, on_load: bool = False) -> tuple:
    """``(x, F.conv2d(x, weight, padding=padding, groups=groups), source)`` with x
    ``GatedLayerNorm.make(*src)[0]``, keeping ``src`` only (gradients as ``gated_layer_norm``'s).
    ``source``: ``(class, src)`` that rebuilds x's rows for another reader (``rebuilt`` of
    ``linear``), leaving them for this op's backward too, which then rebuilds nothing (in eager
    autograd; under torch.compile the graph sees both rebuilds). ``on_load``: x's one reader
    besides the convolution is a BatchNorm that can compute it on load (the IRMLP's bn1):
    where x's dtype is not the convolution's and x's BatchNorm is applied on load by norm3 (in
    eager autograd), x is never written but in the convolution's dtype, and source is a
    ``GatedResidual`` (x an empty stand-in that carries its gradient)."""
    compiling = torch.compiler.is_compiling()
    gemm_dtype = autocast_dtype(src[3])
    args = None if compiling or not on_load or gemm_dtype is None else GatedLayerNormRows.on_load(*src)
    gated = args is not None and GatedLayerNormRows.run_dtype(*src) != gemm_dtype
    shared = None if compiling or gated else SharedRebuild(gemm_dtype)
    x, y, mean, rstd = _GatedLayerNormConv2d.apply(weight, tuple(padding), groups, shared, gated, *src)
    if gated:
        g, channel_gate, l, spatial_gate, y_x, x_mean, x_invstd, x_weight, x_bias, x_act, ln_weight, ln_bias, _ = args
        return x, y, GatedResidual(x_act, [g, channel_gate, l, spatial_gate, y_x, mean, rstd, ln_weight, ln_bias,
                                           x_mean, x_invstd, x_weight, x_bias])
    source = (GatedLayerNormRows, src) if shared is None else (GatedLayerNormRowsShared, (shared, *src))
    return x, y, source


class _DwconvLayerNormLinearResidual(torch.autograd.Function):
    """``x + gelu(F.linear(DwconvLayerNorm.make(*args)[0], weight, bias))`` (the local block)
    as one Function: the GEMM's input is rebuilt in backward (``keep``: kept), and x's two
    gradients, the residual's and the convolution's, are summed by the convolution's backward
    kernel, not by an accumulation pass."""

    @staticmethod
    def forward(ctx, weight, bias, keep, *args):
        x = args[0]
        a, (mean, rstd) = DwconvLayerNorm.make(*args)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        weight, bias = cast_for_gemm(weight, bias, autocast_dtype(a))
        y = F.linear(a, weight, bias)
        tensors, ctx.consts = _split(args)
        ctx.save_for_backward(weight, bias, y, a if keep else None, mean, rstd, *tensors)
        return torch.ops.hifuse.gelu_residual(y, x)

    @staticmethod
    def backward(ctx, grad):
        weight, bias, y, a, mean, rstd, *tensors = ctx.saved_tensors
        args = _join(tensors, ctx.consts)
        grad = grad.contiguous()
        x, conv_weight, conv_bias, ln_weight, ln_bias, _eps, out_dtype = args
        grad_y = torch.ops.hifuse.gelu_backward(grad, y)
        if a is None:
            # a's gradient first: the norm backward then rebuilds a in its pass, which reads what
            # rebuilding it reads, with a ones column when there is a bias (its gradient comes
            # from the weight's GEMM)
            da = _linear_input_grad(grad_y, weight, out_dtype)
            *grads, ones = dln.backward(da.view(*x.shape[:3], -1), x, conv_weight, conv_bias, ln_weight, mean, rstd,
                                        grad, ln_bias, out_dtype, bias is not None)
            c = x.shape[-1]
            _, dw, db = _linear_backward(grad_y, ones[..., :c], weight, bias, *ctx.dtypes,
                                         a_ones=ones.view(-1, ones.shape[-1]), a_grad=False)
        else:
            da, dw, db = _linear_backward(grad_y, a, weight, bias, *ctx.dtypes)
            grads = dln.backward(da.contiguous(), x, conv_weight, conv_bias, ln_weight, mean, rstd, grad)
        return (dw, db, None, *grads, None, None)


class _LinearPair(torch.autograd.Function):
    """``F.linear(F.linear(x, w1, b1), w2, b2)`` keeping x only. The second weight's gradient
    dz^T mid is rebuilt from x: as (dz^T x) w1^T + colsum(dz) b1^T when there are more rows
    than channels (one small extra product), else by rebuilding mid (one GEMM over the few
    rows). Both are the same product in exact arithmetic; in low precision they round at
    another point than the kept middle tensor would (``keep``: mid is kept). The first bias's
    gradient colsum(dz w2) is taken as colsum(dz) w2, from the sum the second bias needs."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, keep):
        ctx.dtypes = [None if t is None else t.dtype for t in (w1, b1, w2, b2)]
        dtype = autocast_dtype(x)
        # the parameters as given too: the float32 products of backward read them, not casts back
        params = (w1, b1, w2)
        w1, b1 = cast_for_gemm(w1, b1, dtype)
        w2, b2 = cast_for_gemm(w2, b2, dtype)
        mid = F.linear(x, w1, b1)
        ctx.save_for_backward(x, w1, b1, w2, b2, mid if keep else None, *params)
        return F.linear(mid, w2, b2)

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, b2, mid, w1_param, b1_param, w2_param = ctx.saved_tensors
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        dtype = grad.dtype
        dz = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        w1_gemm = w1.to(dtype)
        b1_gemm = b1.to(dtype) if b1 is not None else None
        dmid = dz @ w2.to(dtype)
        dx = (dmid @ w1_gemm).view(x.shape).to(x.dtype)
        dw1 = mm_to(dmid.t(), rows, w1_dtype)
        sum_dz = dz.sum(0, dtype=torch.float32)
        if mid is not None:
            dw2 = mm_to(dz.t(), mid.reshape(-1, mid.shape[-1]).to(dtype), w2_dtype)
        elif rows.shape[0] < w2.shape[0]:
            dw2 = mm_to(dz.t(), F.linear(rows, w1_gemm, b1_gemm), w2_dtype)
        else:
            dw2 = mm_to(dz.t(), rows, torch.float32) @ w1_param.float().t()
            if b1 is not None:
                dw2 = torch.addr(dw2, sum_dz, b1_param.float())
        # colsum(dz @ w2) = colsum(dz) @ w2: a vector product, not another pass over dmid
        db1 = (sum_dz @ w2_param.float()).to(b1_dtype) if b1 is not None else None
        db2 = sum_dz.to(b2_dtype) if b2 is not None else None
        return dx, dw1, db1, dw2.to(w2_dtype), db2, None


def dwconv_layer_norm_linear_residual(args, weight: torch.Tensor, bias: torch.Tensor | None,
                                      keep: bool = False) -> torch.Tensor:
    """``x + gelu(F.linear(hifuse::dwconv_layer_norm(*args)[0], weight, bias))`` with x = args[0]
    ((N, H, W, C) contiguous), keeping ``args`` and the GEMM's output, not its input (``keep``:
    that too)."""
    return _DwconvLayerNormLinearResidual.apply(weight, bias, bool(keep), *args)


def linear_pair(x, w1, b1, w2, b2, keep: bool = False) -> torch.Tensor:
    """Two linear layers in a row, keeping only x for backward (``_LinearPair``; ``keep``: and
    the middle tensor)."""
    return _LinearPair.apply(x, w1, b1, w2, b2, bool(keep))


class _ResidualLayerNormLinear(torch.autograd.Function):
    """hifuse::residual_layer_norm's stream and ``F.linear`` of its normalised rows, which are
    not kept: the LayerNorm's backward pass rebuilds them from the inputs it reads anyway, for
    the weight gradient that follows it (``keep``: the rows are kept)."""

    @staticmethod
    def forward(ctx, y, shortcut, ln_weight, ln_bias, eps, norm_dtype, weight, bias, keep):
        out, normed, mean, rstd = torch.ops.hifuse.residual_layer_norm(y, shortcut, ln_weight, ln_bias, eps, norm_dtype)
        if y is None:
            # the stream is the input itself (its storage, no copy) for its next reader, whose
            # gradient of it the LayerNorm backward adds on load: no accumulation pass
            out = shortcut.detach()
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        weight, bias = cast_for_gemm(weight, bias, autocast_dtype(normed))
        ctx.save_for_backward(y, shortcut, ln_weight, ln_bias, mean, rstd, weight, bias, normed if keep else None)
        ctx.norm_dtype = norm_dtype
        ctx.set_materialize_grads(False)  # the stream's gradient is None where nothing reads it
        return out, F.linear(normed, weight, bias)

    @staticmethod
    def backward(ctx, grad_out, grad):
        y, shortcut, ln_weight, ln_bias, mean, rstd, weight, bias, normed = ctx.saved_tensors
        if grad is None:  # the product unused (gradients are not materialised)
            grad = shortcut.new_zeros(shortcut.shape[:-1] + weight.shape[:1], dtype=weight.dtype)
        grad_out = grad_out.contiguous() if grad_out is not None else None
        if normed is None:
            # the rows' gradient first: the LayerNorm backward then rebuilds the rows in its pass,
            # which reads what rebuilding them reads, with a ones column when there is a bias (its
            # gradient comes from the weight's GEMM)
            dnormed = _linear_input_grad(grad, weight, ctx.norm_dtype)
            dy, ds, dlw, dlb, ones = rln.backward(grad_out, dnormed, y, shortcut, ln_weight, mean, rstd, bias=ln_bias,
                                                  rebuild_dtype=ctx.norm_dtype, ones=bias is not None)
            _, dw, db = _linear_backward(grad, ones[:, : shortcut.shape[-1]], weight, bias, *ctx.dtypes, a_ones=ones,
                                         a_grad=False)
        else:
            dnormed, dw, db = _linear_backward(grad, normed, weight, bias, *ctx.dtypes)
            dy, ds, dlw, dlb = rln.backward(grad_out, dnormed.contiguous(), y, shortcut, ln_weight, mean, rstd)
        return (dy if y is not None else None), ds, dlw, dlb, None, None, dw, db, None, None


def residual_layer_norm_linear(y, shortcut, ln_weight, ln_bias, eps: float, norm_dtype, weight, bias,
                               keep: bool = False):
    """(``shortcut + gelu(y)``, ``F.linear(layer_norm(that), weight, bias)``) on (M, C) rows,
    without keeping the normalised rows (``keep``: keeping them); y None: (shortcut itself, the
    linear of ``layer_norm(shortcut)``), the first for shortcut's next reader, whose gradient of
    it backward adds to the LayerNorm's."""
    return _ResidualLayerNormLinear.apply(y, shortcut, ln_weight, ln_bias, float(eps), norm_dtype, weight, bias,
                                          bool(keep))


class _LinearBatchNorm(torch.autograd.Function):
    """``LinearBatchNorm`` with the batch statistics computed here: keeps the GEMM's input, not
    its output (backward runs the GEMM again; ``keep``: the output is kept), nor the result.
    ``chain``: also returns x itself (its storage, no copy) for x's next reader, whose gradient
    of x backward adds to the GEMM's (one add, not one per reader). ``shared``: a ``SharedRebuild``
    where the rebuild of the result for its reader leaves the GEMM's output, which backward
    takes instead of running the GEMM (None: it runs it). ``twice``: also returns the map once
    more (its storage) for a second reader, whose gradient of it the BatchNorm's backward adds
    on load (no accumulation pass of autograd's). The GEMM's bias has a zero gradient, which
    the batch mean makes it (``_cancelled``)."""

    @staticmethod
    def forward(ctx, x, x_gemm, weight, bias, w_gemm, b_gemm, bn_weight, bn_bias, eps, act, height, width, pool,
                out_dtype, gemm_dtype, keep, chain, defer, twice, shared, running_mean, running_var,
                num_batches_tracked, momentum):
        # x, weight and bias: for their gradients; x_gemm, w_gemm, b_gemm: the GEMM's casts of
        # them (None: no cast; Dynamo traces no Function given one tensor twice)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, x.dtype)
        if w_gemm is not None:
            weight, bias = w_gemm, b_gemm
        alias = x.detach() if chain else None
        if x_gemm is not None:
            x = x_gemm
        y = LinearBatchNorm.gemm(x, weight, bias, gemm_dtype)
        # the running statistics are buffers, not inputs autograd knows: updated in the kernel
        mean, invstd, var = torch.ops.hifuse.batch_norm_stats(y, None, eps, running_mean, running_var,
                                                              num_batches_tracked, momentum)
        if defer:  # y itself: its one reader applies the BatchNorm on load (LayerNormCatBN)
            rows = y
        else:
            rows = torch.ops.hifuse.batch_norm_act(y, None, mean, invstd, bn_weight, bn_bias, act, height, width, pool,
                                                   out_dtype)
        ctx.save_for_backward(x, weight, bias, mean, invstd, bn_weight, bn_bias, y if keep else None)
        ctx.consts = (act, height, width, pool, gemm_dtype)
        ctx.shared, ctx.chain, ctx.twice = shared, chain, twice
        ctx.mark_non_differentiable(mean, invstd, var)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
        result = _as_map(rows, x, pool)
        outputs = (result, mean, invstd, var) + ((alias,) if chain else ()) + ((result.detach(),) if twice else ())
        return outputs

    @staticmethod
    def backward(ctx, grad, _mean, _invstd, _var, *after):
        grad_after = after[0] if ctx.chain else None
        grad2 = after[-1] if ctx.twice else None
        if grad is None:
            grad, grad2 = grad2, None
        if grad is None:  # the map unused (gradients are not materialised)
            if ctx.shared is not None:
                ctx.shared.take()  # a rebuilt GEMM output nobody takes: not held until the graph goes
            return (grad_after, *[None] * 23)
        x, weight, bias, mean, invstd, bn_weight, bn_bias, y = ctx.saved_tensors
        act, height, width, pool, gemm_dtype = ctx.consts
        sums = None
        if y is None and ctx.shared is not None:
            # the rebuilt y, and where its reader reduced them (LayerNormCatBN), the backward's sums
            y, *sums = ctx.shared.take() or (None,)
        if y is None:
            y = LinearBatchNorm.gemm(x, weight, bias, gemm_dtype)
        grad_rows = grad.permute(0, 2, 3, 1).contiguous().view(-1, grad.shape[1])
        if grad2 is not None:
            grad2 = grad2.permute(0, 2, 3, 1).contiguous().view(-1, grad.shape[1])
            if sums or grad2.dtype != grad_rows.dtype:
                grad_rows, grad2 = grad_rows + grad2, None
        if sums:
            dy, dbw, dbb = summed_batch_norm_backward(grad_rows, y, mean, invstd, bn_weight, bn_bias, sums, act, height,
                                                      width, pool)
        else:
            dy, _dr, dbw, dbb, _ = torch.ops.hifuse.batch_norm_act_backward(
                grad_rows, y, None, mean, invstd, bn_weight, bn_bias, act, height, width, pool, None, grad2,
            )
        # grad_after: x's gradient from its next reader, made by that reader's backward for x
        # alone (the chain hands x to one reader), so the GEMM may add into it
        dx, dw, _ = _linear_backward(dy, x, weight, None, *ctx.dtypes, a_grad_into=grad_after)
        # the batch mean takes the GEMM's bias away: its gradient is zero (colsum(dy) cancels)
        return dx, None, dw, _cancelled(bias, dw, ctx), None, None, dbw, dbb, *[None] * 16


def linear_batch_norm(x, weight, bias, bn, act: str | None = None, pool: bool = False, gemm_dtype=None,
                      keep: bool = False, chain: bool = False, defer: bool = False, twice: bool = False,
                      x_cast: torch.Tensor | None = None):
    """Training ``act(bn(F.linear(x, weight, bias)))`` (then a 2x2 average pooling with ``pool``)
    on (N, H, W, C_in) pixels, as an (N, C, H, W) channels-last map, updating ``bn``'s running
    statistics; keeps the GEMM's input only (``keep``: and its output). Returns the map and its
    ``LinearBatchNorm`` source (``chain``: and x for its next reader, whose gradient of x is
    summed with the GEMM's here; ``twice``: and, last, the map again for a second reader, whose
    gradient of it the BatchNorm's backward adds on load). ``x_cast``: x already cast to
    ``gemm_dtype`` by a pass that read it anyway (its values, no gradient), taken instead of a
    cast of its own.

    ``defer`` (no ``act``, ``pool`` or ``keep``): the BatchNorm is not applied; the map is the
    GEMM's output y, whose one reader, ``norm_cat_linear``, applies it on load and hands back
    the gradient of the BatchNorm's output, and the source a ``DeferredBatchNorm``."""
    if defer and (act is not None or pool or keep):
        raise ValueError("linear_batch_norm: defer takes no act, pool or keep")
    n, height, width = x.shape[:3]
    code = bna.ACTIVATIONS[act]
    x_gemm = w_gemm = b_gemm = None
    with torch.no_grad():  # cast once: the GEMM, its backward and the rebuilds of the map read these casts
        if gemm_dtype is not None and weight.dtype != gemm_dtype:
            w_gemm, b_gemm = cast_for_gemm(weight, bias, gemm_dtype)
        if gemm_dtype is not None and x.dtype != gemm_dtype:
            if x_cast is not None and (x_cast.shape != x.shape or x_cast.dtype != gemm_dtype):
                raise ValueError(f"linear_batch_norm: x_cast must be x's shape {tuple(x.shape)} in {gemm_dtype}, "
                                 f"got {x_cast.dtype} {tuple(x_cast.shape)}")
            x_gemm = x.to(gemm_dtype) if x_cast is None else x_cast.detach()
    running = bna.running_args(bn)
    # eager autograd only: under torch.compile the graph sees both GEMMs (and may merge them)
    shared = None if keep or torch.compiler.is_compiling() else SharedRebuild()
    out, mean, invstd, var, *after = _LinearBatchNorm.apply(
        x, x_gemm, weight, bias, w_gemm, b_gemm, bn.weight, bn.bias, float(bn.eps), code, height, width, pool, None,
        gemm_dtype, bool(keep), bool(chain), bool(defer), bool(twice), shared, *running,
    )
    if running[0] is None:
        bna.update_running(bn, mean, var, n * height * width)
    if w_gemm is not None:
        weight, bias = w_gemm, b_gemm
    if x_gemm is not None:
        x = x_gemm
    if defer:
        source = DeferredBatchNorm((x, weight, bias, gemm_dtype, shared), (mean, invstd, bn.weight, bn.bias))
    else:
        source = (x, weight, bias, mean, invstd, bn.weight, bn.bias, code, height, width, pool, None, gemm_dtype, shared)
    return (out, source, *after)


def norm_cat_linear(parts, sources, ln_weight, ln_bias, eps: float, out_dtype, weight, bias=None,
                    keep: bool = False, bias_cancels: bool = False) -> torch.Tensor:
    """``linear(LayerNormCat, (*parts, ln_weight, ln_bias, eps, out_dtype), weight, bias)`` where
    each part is ``LinearBatchNorm.make(*source)[0]`` (``sources``: as ``linear_batch_norm``
    returns them), keeping the sources instead of the parts: neither they nor the normalised
    rows are kept (``keep``: both are, as plain autograd would keep them). A part whose source
    is a ``DeferredBatchNorm`` is its GEMM's output, normalised on load (``LayerNormCatBN``):
    the BatchNorm's output is never written, in forward or in backward. ``bias_cancels``: as
    ``linear``'s."""
    deferred = [isinstance(s, DeferredBatchNorm) for s in sources]
    if not any(deferred):
        args = (*parts, ln_weight, ln_bias, float(eps), out_dtype)
        if keep:
            return linear(LayerNormCat, args, weight, bias, keep=True, bias_cancels=bias_cancels)
        rebuilt = [(LinearBatchNorm, i, source) for i, source in enumerate(sources)]
        return linear(LayerNormCat, args, weight, bias, rebuilt, bias_cancels=bias_cancels)
    if keep:
        raise ValueError("norm_cat_linear: parts with a deferred BatchNorm are rebuilt, not kept")
    bn_parts = sum(1 << i for i, d in enumerate(deferred) if d)
    bn = [t for s in sources if isinstance(s, DeferredBatchNorm) for t in s.bn]
    shared = tuple(s.source[-1] for s in sources if isinstance(s, DeferredBatchNorm))
    args = (bn_parts, shared, *parts, *bn, ln_weight, ln_bias, float(eps), out_dtype)
    rebuilt = [(LinearStats, 2 + i, s.source) if d else (LinearBatchNorm, 2 + i, s)
               for i, (s, d) in enumerate(zip(sources, deferred))]
    return linear(LayerNormCatBN, args, weight, bias, rebuilt, bias_cancels=bias_cancels)
