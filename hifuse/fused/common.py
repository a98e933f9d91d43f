"""Helpers the fused forwards share: the GEMM dtype under autocast, tensors derived from
weights (computed when the weights change, not per forward), BatchNorm folding, 1x1
convolutions as channels-last GEMMs, and the GELU + residual tail."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hifuse_kernels import gelu_residual as gr
from hifuse_kernels import patch_conv
from hifuse_kernels import patch_conv_norm as pcn
from hifuse_kernels.reference import autocast_dtype, autocast_norm_dtype, capturing  # noqa: F401 - for the fused forwards
from hifuse_kernels import residual_layer_norm as rln


def derived(module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], compute):
    """``compute()`` (a tensor or tuple of tensors made from ``sources``, in the sources' own
    precision, without autograd) cached on ``module``.

    Recomputed when a source changes (an in-place update bumps its version; a new tensor
    has a new storage). Under torch.compile the cache is read as it is and the graph holds
    no recomputation; ``prepare`` (which ``HiFuse.eval()`` runs) fills it beforehand. Where
    gradients flow into the sources, ``compute()`` runs in the graph every time, uncached.
    While a CUDA graph is captured, an entry that matches is read (the graph keeps reading
    it: capture again after changing weights), and a missing or stale one is computed in the
    graph and not cached (it holds nothing until a replay).
    """
    if needs_grad(*sources):
        return compute()
    if torch.compiler.is_compiling():
        # read only: Dynamo before torch 2.13 cannot trace __dict__.setdefault
        store = getattr(module, "_hifuse_derived", None)
        cached = None if store is None else store.get(name)
        if cached is not None:
            return cached[1]
        return _compute(sources, compute)
    store = module.__dict__.setdefault("_hifuse_derived", {})
    cached = store.get(name)
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    if cached is None or cached[0] != key:
        if capturing():  # made in the graph, and never cached: it is empty until a replay
            return _compute(sources, compute)
        store[name] = cached = (key, _compute(sources, compute))
    return cached[1]


def _compute(sources, compute):
    device = sources[0].device.type
    with torch.no_grad(), torch.autocast(device, enabled=False):
        return compute()


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd tracks a computation on these tensors now."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def batch_norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with eval-mode ``bn(x) == x * scale + shift`` per channel."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a convolution followed by an eval-mode BatchNorm, as one convolution."""
    scale, shift = batch_norm_affine(bn)
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def dense_1x1(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is one GEMM over the channels-last pixels."""
    return conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1)


def conv_channels_last(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (its padding and groups) with the given weight; a dense 1x1 convolution runs
    as one GEMM on the channels-last pixels and returns an NCHW view of channels-last memory."""
    if dense_1x1(conv):
        y = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)
        return y.permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def drop_path_inactive(module: nn.Module) -> bool:
    """Whether ``module.drop_path`` is the identity now (none configured, or eval mode)."""
    return isinstance(module.drop_path, nn.Identity) or not module.training


def gelu_residual(module: nn.Module, y: torch.Tensor, shortcut: torch.Tensor, act: nn.Module) -> torch.Tensor:
    """``shortcut + module.drop_path(act(y))`` (``act`` a GELU): one Triton pass when drop path
    is inactive."""
    if drop_path_inactive(module):
        return gr.gelu_residual(y, shortcut, check=False)
    return shortcut + module.drop_path(act(y))


def stem_conv_norm(x_nhwc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, norm: nn.Module,
                   out_dtype: torch.dtype | None) -> torch.Tensor:
    """A stem: the k x k / k convolution of the image (B, H, W, C) and the LayerNorm over its
    channels, (B, H/k, W/k, C_out) in ``out_dtype`` (what the eager stem's LayerNorm writes
    under autocast; None outside it). One Triton pass each way where its kernels take it
    (``patch_conv_norm``: the image read once, neither patches nor the GEMM's output written),
    else the patch GEMM and a LayerNorm pass (``stem_layer_norm``)."""
    gemm = autocast_dtype(x_nhwc)
    if pcn.unsupported_reason(x_nhwc, weight, bias, norm.weight, norm.bias, gemm) is None:
        return pcn.patch_conv_norm(x_nhwc, weight, bias, norm.weight, norm.bias, norm.eps, gemm, out_dtype)
    return stem_layer_norm(patch_conv.patch_conv(x_nhwc, weight, bias, check=False, dtype=gemm), norm, out_dtype)


def stem_layer_norm(y: torch.Tensor, norm: nn.Module, out_dtype: torch.dtype | None) -> torch.Tensor:
    """``F.layer_norm`` over the last dim of a stem's GEMM output y, in ``out_dtype`` where
    given. Under autocast one Triton pass reads y in the GEMM's dtype and writes out_dtype
    without a float32 copy of y, and its backward writes y's gradient in y's dtype (no cast
    pass)."""
    if out_dtype is None or rln.unsupported_reason(y, norm.weight) is not None:
        out = F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps)
        return out if out_dtype is None else out.to(out_dtype)
    return rln.layer_norm_to(y, norm.weight, norm.bias, norm.eps, out_dtype, check=False)


# Modules asked to hand their input on for a later reader (``hand_on``), innermost last: an
# entry is the module until its fused forward puts its input there, as that reader takes it.
_handing_on: list = []


def hand_on(m: nn.Module, call):
    """``(call(), m's input as m's fused forward handed it on, or None)``, where ``call`` runs m
    once, as a module (its hooks run). A fused forward that can returns its input through its
    own op, whose backward adds the later reader's gradient of it to its own (no pass of
    autograd's to sum the two)."""
    _handing_on.append(m)
    try:
        out = call()
    finally:
        after = _handing_on.pop()
    return out, (None if after is m else after)


def asked_to_hand_on(m: nn.Module) -> bool:
    """Whether m's fused forward, running now, is to hand its input on (``handed_on``)."""
    return len(_handing_on) > 0 and _handing_on[-1] is m  # torch 2.11's dynamo traces no bool(list)


def handed_on(x: torch.Tensor) -> None:
    _handing_on[-1] = x
