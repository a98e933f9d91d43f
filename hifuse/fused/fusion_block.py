"""Fused forward of the hierarchical feature fusion block (HFFBlock) and its parts.

Concat-free LayerNorms (``layer_norm_cat``: Triton rows or the native op), one-pass gating statistics and
the gate multiplications inside the norm3 LayerNorm (Triton ``channel_pool``,
``spatial_pool``, ``gated_layer_norm``), 1x1 convolutions as channels-last GEMMs whose
BatchNorm is folded in eval mode and, in training, runs with its activation (and Updim's
pooling) as one op (``batch_norm_act``), and the IRMLP's fused path. Tensors stay
channels-last.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hifuse_kernels import batch_norm_act as bna
from hifuse_kernels import channel_gate as cg
from hifuse_kernels import gated_layer_norm as gln
from hifuse_kernels import gelu_linear as gl
from hifuse_kernels import gelu_residual as gr
from hifuse_kernels import layer_norm_cat as lnc
from hifuse_kernels import recompute
from hifuse_kernels.channel_pool import channel_pool
from hifuse_kernels.reference import activation
from hifuse_kernels.spatial_pool import spatial_pool

from .. import config
from ..model import IRMLP, ConvBN, HFFBlock
from .common import (autocast_dtype, batch_norm_affine, conv_channels_last, dense_1x1, derived, drop_path_inactive,
                     fold_batch_norm)


def folds(bn) -> bool:
    """Whether an eval-mode BatchNorm is folded into the convolution before it."""
    return bn is not None and not bn.training and bn.running_var is not None


def batch_statistics(bn) -> bool:
    """Whether a BatchNorm normalises with its batch's statistics (training, or no running
    statistics): then the bias of the convolution before it has a zero gradient."""
    return bn is not None and (bn.training or bn.running_var is None)


def folded_weights(m: ConvBN) -> tuple[torch.Tensor, torch.Tensor]:
    """conv + eval BatchNorm as one convolution's (weight, bias); cached while no gradient
    flows through them (in inference), recomputed when a parameter or statistic changes."""
    conv, bn = m.conv, m.bn
    sources = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if conv.bias is not None:
        sources += (conv.bias,)
    return derived(m, "folded", sources, lambda: fold_batch_norm(conv.weight, conv.bias, bn))


def conv_bn_forward(m: ConvBN, x: torch.Tensor, then: str | None = None, pool: bool = False) -> torch.Tensor:
    """ConvBN followed by activation ``then`` ("gelu", "sigmoid" or None; fused into the
    training BatchNorm) and, with ``pool``, a 2x2/2 average pooling (fused into the training
    BatchNorm). Checked by ``fusion_check``."""
    act = "relu" if m.relu is not None else then
    bn = m.bn
    if folds(bn):
        weight, bias = folded_weights(m)
        x = activation(act)(conv_channels_last(x, weight, bias, m.conv))
        return F.avg_pool2d(x, 2, stride=2) if pool else x
    x = conv_channels_last(x, m.conv.weight, m.conv.bias, m.conv)
    if bn is None:
        return activation(act)(x)
    return bna.batch_norm_act(x, bn, act, pool=pool, check=False)


def conv_bn_sourced(m: ConvBN, x: torch.Tensor, pool: bool = False, keep: bool = False, chain: bool = False,
                    defer: bool = False, twice: bool = False, x_cast: torch.Tensor | None = None):
    """Training-mode dense 1x1 ConvBN (no activation after it), as ``conv_bn_forward`` computes
    it, keeping neither the GEMM's output nor the result (``recompute.linear_batch_norm``;
    ``keep``: the GEMM's output is kept): (the result, the source that rebuilds it for
    ``recompute.norm_cat_linear``); ``chain``: and x for its next reader, x's gradients summed
    in the op's backward; ``defer``: the result is the GEMM's output, which
    ``recompute.norm_cat_linear`` normalises on load; ``twice``: and, last, the result again
    for a second reader, the BatchNorm's backward summing both gradients on load; ``x_cast``: x
    in the GEMM's dtype, written by a pass that read x anyway."""
    out = recompute.linear_batch_norm(
        x.permute(0, 2, 3, 1), m.conv.weight.flatten(1), m.conv.bias, m.bn, "relu" if m.relu is not None else None,
        pool=pool, gemm_dtype=autocast_dtype(x), keep=keep, chain=chain, defer=defer, twice=twice,
        x_cast=None if x_cast is None else x_cast.permute(0, 2, 3, 1),
    )
    if chain:
        return out[0], out[1], out[2].permute(0, 3, 1, 2)
    return out


def conv_bn_recomputed(m: ConvBN, producer, args, then: str | None = None, keep: bool = False) -> torch.Tensor:
    """Training-mode 1x1 ConvBN (then activation ``then``) on ``producer.make(*args)``, channels-last
    pixels that backward rebuilds instead of keeping (``hifuse_kernels.recompute``; ``keep``:
    keeps them)."""
    act = "relu" if m.relu is not None else then
    y = recompute.linear(producer, args, m.conv.weight.flatten(1), m.conv.bias, keep=keep,
                         bias_cancels=batch_statistics(m.bn)).permute(0, 3, 1, 2)
    return bna.batch_norm_act(y, m.bn, act, check=False)


def irmlp_forward(m: IRMLP, x: torch.Tensor | None, src: tuple | None = None,
                  shortcut: torch.Tensor | None = None) -> torch.Tensor:
    """conv1 on channels-last memory; in training GELU, residual and ``bn1`` in one op (the
    sum is never written, and the result comes in conv2's GEMM dtype under autocast), not
    kept for backward but rebuilt there from what its producer keeps. In eval mode GELU +
    residual in one pass, ``bn1`` folded into conv2 (an affine map before a linear one) and
    conv3's BatchNorm into conv3. The 1x1 convolutions are GEMMs; conv3 takes the expansion's
    GELU on its loads (``gelu_conv_bn``). ``src``: x is ``recompute.GatedLayerNorm.make(*src)[0]``
    (the fusion block's norm3), and in training neither conv1 nor ``bn1`` keeps x either: both
    rerun that elementwise op in backward (x is None then: norm3 and conv1 run as one op);
    under autocast, in eager autograd, x is written only in conv1's dtype, and ``bn1``'s passes
    compute the float32 x on load from norm3's sources (``recompute.BatchNormApplyGated``).
    The ``irmlp`` rebuild (``config.Rebuilds``) decides whether conv2's input is rebuilt.
    ``shortcut``: the result plus it (``gelu_conv_bn``)."""
    keep = not config.rebuilding("irmlp")
    conv1 = m.conv1.conv
    source = None
    if src is not None:
        x, y, source = recompute.gated_layer_norm_conv2d(src, conv1.weight, conv1.padding, conv1.groups,
                                                         on_load=not folds(m.bn1))
    else:
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, conv1.weight, None, padding=conv1.padding, groups=conv1.groups)
    if isinstance(source, recompute.GatedResidual):  # bn1's passes compute x on load: it is never written
        n, _, h, w = x.shape
        args = bna.gated_apply_args(y, m.bn1, x, source.x_act, source.gated, out_dtype=autocast_dtype(x))
        expanded = recompute.linear(recompute.BatchNormApplyGated, args, m.conv2.conv.weight.flatten(1), keep=keep)
        return gelu_conv_bn(m.conv3, expanded.view(n, h, w, -1), shortcut)
    if not folds(m.bn1):
        n, _, h, w = x.shape
        args = bna.apply_args(y, m.bn1, None, residual=x, out_dtype=autocast_dtype(x))
        # the residual (apply_args' second) is x as rows
        rebuilt = () if src is None else [(source[0], 1, source[1])]
        expanded = recompute.linear(recompute.BatchNormApply, args, m.conv2.conv.weight.flatten(1), rebuilt=rebuilt,
                                    keep=keep)
        return gelu_conv_bn(m.conv3, expanded.view(n, h, w, -1), shortcut)
    out = gr.gelu_residual(y.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), check=False).permute(0, 3, 1, 2)
    weight, bias = bn1_into_conv2(m)
    out = conv_channels_last(out, weight, bias, m.conv2.conv)
    return gelu_conv_bn(m.conv3, out.permute(0, 2, 3, 1), shortcut)


def gelu_conv_bn(m: ConvBN, h: torch.Tensor, shortcut: torch.Tensor | None = None) -> torch.Tensor:
    """ConvBN (a dense 1x1 convolution) of gelu(h), h channels-last pixels (N, H, W, C): the
    GELU is taken on the GEMM's loads (``gelu_linear``), so its output is never written nor
    kept; in training the BatchNorm runs as ``conv_bn_forward``'s. ``shortcut``: the result
    plus it, added by the training BatchNorm's pass where the dtypes agree (the block's
    output: the BatchNorm's is never written)."""
    act = "relu" if m.relu is not None else None
    weight, bias = folded_weights(m) if folds(m.bn) else (m.conv.weight, m.conv.bias)
    y = gl.gelu_linear(h, weight.flatten(1), bias, check=False).permute(0, 3, 1, 2)
    if m.bn is None or folds(m.bn):
        return _plus(shortcut, activation(act)(y))
    if shortcut is not None and shortcut.dtype == y.dtype and shortcut.shape == y.shape:
        return bna.batch_norm_act(y, m.bn, act, check=False, shortcut=shortcut)
    return _plus(shortcut, bna.batch_norm_act(y, m.bn, act, check=False))


def bn1_into_conv2(m: IRMLP) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2(bn1(t)) = conv2 with its input channels scaled, plus conv2 of the shift."""
    w2, bn = m.conv2.conv.weight, m.bn1

    def compute():
        scale, shift = batch_norm_affine(bn)
        return w2 * scale.view(1, -1, 1, 1), w2.flatten(1) @ shift

    return derived(m, "bn1_conv2", (w2, bn.weight, bn.bias, bn.running_mean, bn.running_var), compute)


def fusion_check(m: HFFBlock, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None) -> str | None:
    """Checked on tensors of the shapes and dtypes the block's ops will be given: the 1x1
    convolutions' outputs come in autocast's GEMM dtype (else promote(input, weight))."""
    bns = (m.W_l.bn, m.W_g.bn, m.Updim.bn, m.W.bn, m.W3.bn, m.residual.bn1, m.residual.conv3.bn, m.spatial.bn)
    for bn in bns:
        if type(bn) is not torch.nn.BatchNorm2d:
            # SyncBatchNorm and other subclasses compute their statistics differently
            return f"{type(bn).__name__} is not fused (only nn.BatchNorm2d)"
    for bn in (m.W_l.bn, m.W_g.bn, m.W.bn if f is None else m.W3.bn, m.residual.bn1, m.residual.conv3.bn):
        if not folds(bn) and not bn.affine:
            return "BatchNorm without affine parameters is not fused"
    n, c, h, w = l.shape
    if not folds(m.W_l.bn) and n * h * w < 2:
        return "BatchNorm needs more than one value per channel when training"
    if f is not None and not folds(m.Updim.bn) and min(f.shape[-2:]) < 2:
        return "Updim's pooling needs a map of at least 2x2"
    dtype = autocast_dtype(l) or torch.promote_types(l.dtype, m.W_l.conv.weight.dtype)
    part = torch.empty((n, c, h, w), dtype=dtype, device=l.device)
    norm = m.norm1 if f is not None else m.norm2
    reason = lnc.unsupported_reason([part] * (3 if f is not None else 2), norm.weight, norm.bias)
    if reason is not None:
        return reason
    # The training BatchNorms take what these take: float32/16/bf16 tensors on a Triton device.
    return gln.unsupported_reason(l, g, part, m.norm3.weight, m.norm3.bias)


def fusion_forward(m: HFFBlock, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """The block, fused. In training (batch-statistics BatchNorms, dense 1x1 convolutions), what
    it computes, keeps and rebuilds:

    1. the parts W_l(l), W_g(g) (and Updim(f), 2x2-pooled): 1x1 GEMM + BatchNorm (+ ReLU) each
       (``recompute.linear_batch_norm``); keeps the GEMMs' inputs (l and g cast to bf16 once,
       where they are float32 by the poolings of 3, which then run first),
       not the parts, which backward rebuilds from them (each GEMM run once in backward, its
       output shared by the rebuild and the BatchNorm's backward). W_l's and W_g's BatchNorms
       are applied by 2's LayerNorm as it loads their GEMMs' outputs, in forward and backward
       (``defer``: their parts are never written), and its backward pass reduces their
       backward's sums;
    2. x = GELU(BN(W(norm(cat(parts))))): norm1/norm2 over the concatenation, never built, and
       the projection GEMM (``recompute.norm_cat_linear``), keeping neither the normalised rows
       nor the GEMM's output; x is never written: 4's LayerNorm applies the projection's
       BatchNorm + GELU as it loads the GEMM's output, in forward and backward;
    3. the gates: spatial_pool(l) -> 7x7 conv (PyTorch's, on a one-channel map) + BatchNorm
       and sigmoid (one op in training), and channel_pool(g) -> SE MLP -> sigmoid
       (``channel_gate``: one kernel, two in backward);
    4. norm3 over [g * channel gate, l * spatial gate, x], never written whole
       (``gated_layer_norm``) and never kept: rerun once in backward (with x's BatchNorm
       apply), for bn1's residual and, in the same pass, conv1's input
       (``recompute.gated_layer_norm_conv2d``); under autocast written only as conv1's bf16
       input, each way: bn1's passes compute their float32 residual on load;
    5. the IRMLP (``irmlp_forward``) plus the shortcut (Updim's part, or nothing), added by
       conv3's BatchNorm apply where stochastic depth is inactive.

    l and g are handed from reader to reader (1, then 3, then 4), each reader's backward adding
    its gradient of them to the next one's (the poolings in their kernels, the GEMMs of 1 in
    their epilogues), so no accumulation pass sums them; the fused feature loop
    (``features``) hands them in from the next stage's downsample and patch merging, whose
    backwards add the result. In eval mode the
    BatchNorms fold into their convolutions; other cases run each module as a fused op
    (``conv_bn_forward``, ``layer_norm_cat``, ``gated_layer_norm``). ``config.Rebuilds`` switches
    the rebuilds off (``fusion_norm``, ``norm3``, ``irmlp``)."""
    convs = [m.Updim] if f is not None else []
    convs += [m.W_l, m.W_g]
    inputs = ([f] if f is not None else []) + [l, g]
    norm, proj = (m.norm1, m.W3) if f is not None else (m.norm2, m.W)
    sources = None
    casts = {}  # l and g in their GEMMs' dtype, written by their poolings
    gemm_dtype = autocast_dtype(l)  # the 1x1 GEMMs' and the projection's under autocast
    keep_norm = not config.rebuilding("fusion_norm")
    chain = defer = False
    if not any(folds(c.bn) for c in (*convs, proj)) and all(dense_1x1(c.conv) for c in convs):
        # training: the parts are rebuilt in backward from their GEMMs' inputs. l and g are read
        # in turn by their GEMM, their pooling and norm3 (the pooling first where it writes the
        # GEMM's cast), each handing them on to the next: each reader adds the next one's
        # gradient of l (g) to its own, no accumulation passes.
        chain = True
        defer = not keep_norm and _defers(m, inputs, norm)
        if gemm_dtype is not None and l.dtype != gemm_dtype and g.dtype != gemm_dtype:
            # l and g are cast for their GEMMs (the first stage's, float32 under autocast): by
            # their poolings, which read them anyway, first in the readers' chain
            pooled, l, casts[m.W_l] = spatial_pool(l, check=False, chain=True, low_dtype=gemm_dtype)
            stats, g, casts[m.W_g] = channel_pool(g, check=False, chain=True, stacked=True, low_dtype=gemm_dtype)
            inputs = inputs[:-2] + [l, g]
        # Updim's part is read twice, by the concatenation and as the shortcut: handed out twice,
        # its BatchNorm's backward sums the two gradients
        outs = [conv_bn_sourced(c, t, pool=c is m.Updim, keep=keep_norm, chain=c is not m.Updim,
                                defer=defer and c is not m.Updim and c.relu is None, twice=c is m.Updim,
                                x_cast=casts.get(c))
                for c, t in zip(convs, inputs)]
        parts, sources = [o[0] for o in outs], [o[1] for o in outs]
        l, g = outs[-2][2], outs[-1][2]
        shortcut = outs[0][2] if f is not None else None
    else:
        parts = [conv_bn_forward(c, t, pool=c is m.Updim) for c, t in zip(convs, inputs)]
        shortcut = parts[0] if f is not None else None
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in parts])
    if any(t.dtype != dtype for t in parts):
        if defer:  # _defers took one dtype: a deferred part is no BatchNorm output to promote
            raise RuntimeError("fusion block: parts of several dtypes with deferred BatchNorms")
        parts, sources = [t.to(dtype) for t in parts], None  # promoted copies are kept
    # Written in the dtype the projection GEMM takes under autocast.
    out_dtype = gemm_dtype if gemm_dtype == dtype else None
    bn_args = None  # training: x is the projection BatchNorm's apply, which norm3 makes on load
    if folds(proj.bn):
        normed = lnc.layer_norm_cat(parts, norm.weight, norm.bias, norm.eps, out_dtype, check=False)
        x = conv_bn_forward(proj, normed, then="gelu")
    elif sources is not None:
        y = recompute.norm_cat_linear(parts, sources, norm.weight, norm.bias, norm.eps, out_dtype,
                                      proj.conv.weight.flatten(1), proj.conv.bias, keep=keep_norm,
                                      bias_cancels=batch_statistics(proj.bn))
        bn_args = bna.apply_args(y.permute(0, 3, 1, 2), proj.bn, "relu" if proj.relu is not None else "gelu")
    else:
        # the normalised concatenation is rebuilt in backward from the parts it keeps anyway
        args = (*parts, norm.weight, norm.bias, float(norm.eps), out_dtype)
        x = conv_bn_recomputed(proj, recompute.LayerNormCat, args, then="gelu", keep=keep_norm)

    if chain and not casts:  # (with casts the poolings ran first)
        pooled, l = spatial_pool(l, check=False, chain=True)
        stats, g = channel_pool(g, check=False, chain=True, stacked=True)
    elif not chain:
        pooled = spatial_pool(l, check=False)
        stats = channel_pool(g, check=False, stacked=True)
    spatial_gate = conv_bn_forward(m.spatial, pooled, then="sigmoid")
    channel_gate = se_gate(m, stats)

    # without stochastic depth the IRMLP's last pass adds the shortcut (its result is never written)
    inactive = drop_path_inactive(m)
    added = shortcut if inactive else None

    def tail(out: torch.Tensor) -> torch.Tensor:
        return out if inactive else _plus(shortcut, m.drop_path(out))

    if bn_args is None:
        fused = gln.gated_layer_norm(
            g, channel_gate, l, spatial_gate, x, m.norm3.weight, m.norm3.bias, m.norm3.eps, check=False
        )
        return tail(irmlp_forward(m.residual, fused, shortcut=added))
    # neither norm3's x nor its output is kept: backward rebuilds both from what it keeps anyway
    src = recompute.gated_layer_norm_source(g, channel_gate, l, spatial_gate, m.norm3.weight, m.norm3.bias,
                                            m.norm3.eps, bn_args)
    if config.rebuilding("norm3"):
        return tail(irmlp_forward(m.residual, None, src, shortcut=added))
    x = recompute.gated_layer_norm(src, keep=True)
    return tail(irmlp_forward(m.residual, x, shortcut=added))


def se_gate(m: HFFBlock, stats: torch.Tensor) -> torch.Tensor:
    """The channel gate sigmoid(se(max) + se(avg)) of g's poolings stacked as (2N, C, 1, 1),
    averages first: one kernel forward and two backward (``hifuse_kernels.channel_gate``), where
    the SE MLP is the published one (1x1 convolutions without bias around a ReLU); else the
    shared SE MLP over both poolings as one batch, its two halves added in its dtype, as eager
    adds its two results."""
    se = list(m.se)
    plain = [type(c) is torch.nn.Conv2d and c.bias is None and c.kernel_size == (1, 1) and c.groups == 1
             for c in se[::2]]
    if len(se) == 3 and type(se[1]) is torch.nn.ReLU and all(plain):
        dtype = autocast_dtype(stats)
        w1, w2 = se[0].weight.flatten(1), se[2].weight.flatten(1)
        if cg.unsupported_reason(stats.flatten(1), w1, w2, dtype) is None:
            return cg.channel_gate(stats, None, w1, w2, dtype, check=False)
    n = stats.shape[0] // 2
    avg, best = m.se(stats).view(2, n, *stats.shape[1:]).unbind(0)
    return torch.sigmoid(best + avg)


def _defers(m: HFFBlock, inputs, norm) -> bool:
    """Whether W_l's and W_g's BatchNorms can be applied by the concatenation's LayerNorm as it
    loads their GEMMs' outputs (``recompute.norm_cat_linear``): its Triton path takes parts of
    one dtype, the 1x1 GEMMs' output dtype."""
    dtypes = {autocast_dtype(t) or t.dtype for t in inputs}
    if len(dtypes) != 1:
        return False
    n, _, h, w = inputs[-1].shape
    part = inputs[-1].new_empty((0, m.W_g.conv.out_channels, h, w), dtype=dtypes.pop()).contiguous(
        memory_format=torch.channels_last)
    return lnc.rows_path([part] * len(inputs), norm.weight, norm.bias)


def _plus(shortcut: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    # no shortcut (the first block): x itself, where eager adds 0, a pass that changes nothing
    # but the sign of a zero
    return x if shortcut is None else shortcut + x


config.register(HFFBlock, "fusion", fusion_check, fusion_forward)
