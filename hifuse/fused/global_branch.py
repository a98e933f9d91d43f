"""Fused forwards of the global branch: patch embedding, patch merging, the window-attention
blocks and their stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hifuse_kernels import patch_conv, patch_merge_norm, recompute
from hifuse_kernels import residual_layer_norm as rln
from hifuse_kernels import window_attention as wa

from .. import config
from ..model import GlobalBlock, GlobalStage, PatchEmbed, PatchMerging
from .common import (asked_to_hand_on, autocast_dtype, autocast_norm_dtype, derived, drop_path_inactive, gelu_residual,
                     handed_on, needs_grad, stem_conv_norm)

# --------------------------------------------------------------------------- patch embedding


def patch_embed_check(m: PatchEmbed, x: torch.Tensor) -> str | None:
    return patch_conv.unsupported_reason(x.permute(0, 2, 3, 1), m.proj.weight)


def patch_embed_forward(m: PatchEmbed, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """One GEMM over gathered patches writes the tokens: no conv output to transpose."""
    if type(m.norm) is torch.nn.LayerNorm:
        y = stem_conv_norm(x.permute(0, 2, 3, 1), m.proj.weight, m.proj.bias, m.norm, autocast_norm_dtype(x))
        b, h, w, c = y.shape
        return y.reshape(b, h * w, c), h, w
    y = patch_conv.patch_conv(x.permute(0, 2, 3, 1), m.proj.weight, m.proj.bias, check=False, dtype=autocast_dtype(x))
    b, h, w, c = y.shape
    return m.norm(y.reshape(b, h * w, c)), h, w


# --------------------------------------------------------------------------- patch merging


def patch_merging_check(m: PatchMerging, x: torch.Tensor, h: int, w: int) -> str | None:
    return patch_merge_norm.unsupported_reason(x, h, w, m.norm.weight, m.norm.bias)


def patch_merging_forward(m: PatchMerging, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Gather and LayerNorm(4C) in one native op; under autocast it writes the reduction
    GEMM's dtype, so no cast pass follows. Where ``common.hand_on`` asks, x is handed on
    through the op."""
    autocast = autocast_dtype(x)
    gemm_dtype = autocast if x.dtype == torch.float32 else None
    chain = asked_to_hand_on(m)
    merged = patch_merge_norm.patch_merge_norm(x, h, w, m.norm.weight, m.norm.bias, m.norm.eps, gemm_dtype,
                                               check=False, chain=chain)
    if chain:
        merged, after = merged
        handed_on(after)
    if autocast is None:
        return m.reduction(merged)
    # the weight's cast from the forward's batch, its float32 gradient from the GEMM
    return recompute.linear(recompute.Given, (merged,), m.reduction.weight, m.reduction.bias)


# --------------------------------------------------------------------------- blocks


def gemm_dtype(m: GlobalBlock, x: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x) or torch.promote_types(x.dtype, m.norm1.weight.dtype)


def block_check(m: GlobalBlock, x: torch.Tensor, h: int, w: int) -> str | None:
    """The attention kernel takes any h x w grid; the block also needs the Triton LayerNorm
    and GELU + residual passes, which take what the attention kernel takes."""
    reason = wa._triton.unsupported_reason(x)
    if reason is not None:
        return reason
    dtype = autocast_dtype(x) or x.dtype
    if dtype not in wa.SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (supported: {wa.SUPPORTED_DTYPES})"
    if m.dim // m.num_heads not in wa.HEAD_DIMS:
        return f"head_dim {m.dim // m.num_heads} is not supported (supported: {wa.HEAD_DIMS})"
    if m.window > wa.MAX_WINDOW:
        return f"window {m.window} is larger than {wa.MAX_WINDOW}"
    return rln.unsupported_reason(x, m.norm1.weight)


def block_forward(m: GlobalBlock, x: torch.Tensor | None, h: int, w: int, tail=None, chain: bool = False):
    """The block with shift, padding, partition, bias, mask and merge in one kernel.

    ``tail`` is (y, shortcut) of the block before, whose output ``shortcut + gelu(y)`` this
    block writes in the pass of its norm1 (x is None then). With ``chain`` the block returns
    its own (y, shortcut) for the next block instead of its output. The normalised rows are
    not kept for backward (``recompute.residual_layer_norm_linear``).
    """
    attn = m.attn
    if tail is None:
        b, length, c = x.shape
        dtype = gemm_dtype(m, x)
        tail_y, stream = None, x.reshape(-1, c).contiguous()
    else:
        (tail_y, stream), c = tail, tail[1].shape[-1]
        b, length = stream.shape[0] // (h * w), h * w
        dtype = gemm_dtype(m, stream)
    norm = m.norm1
    out, qkv = recompute.residual_layer_norm_linear(
        tail_y, stream, norm.weight, norm.bias, norm.eps, dtype, attn.qkv.weight, attn.qkv.bias,
        keep=not config.rebuilding("attention_norm"),
    )
    stream = out  # without a tail, the input itself: its readers' gradients summed in the op's backward
    qkv_bias = attn.qkv.bias
    if qkv_bias is not None and h % m.window == 0 and w % m.window == 0:
        # no padded tokens, which alone carry the bias into the attention: its gradient is the GEMM's
        # alone, not a sum of two
        qkv_bias = qkv_bias.detach()
    y = wa.window_attention(qkv.view(b, h, w, 3 * c), qkv_bias, attn.relative_position_bias_table, m.num_heads,
                            m.window, m.shift, check=False)
    y = y.view(-1, c)
    if needs_grad(m.fc1.weight, attn.proj.weight, attn.proj.bias, m.fc1.bias):
        # the middle tensor is not kept for backward (recompute.linear_pair)
        y = recompute.linear_pair(y, attn.proj.weight, attn.proj.bias, m.fc1.weight, m.fc1.bias,
                                  keep=not config.rebuilding("attention_proj"))
    else:
        # Nothing non-linear between proj and fc1: one GEMM with the product weight.
        # Same value; in low precision it rounds once instead of at proj's output.
        weight, bias = merged_proj_fc1(m)
        y = F.linear(y, weight, bias)
    if chain:
        return y, stream
    return gelu_residual(m, y.view(b, length, c), stream.view(b, length, c), m.act)


def merged_proj_fc1(m: GlobalBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 after proj as one linear map (fc1.W @ proj.W, fc1.W @ proj.b + fc1.b)."""
    proj, fc1 = m.attn.proj, m.fc1

    def compute():
        return fc1.weight @ proj.weight, fc1.weight @ proj.bias + fc1.bias

    return derived(m, "proj_fc1", (proj.weight, proj.bias, fc1.weight, fc1.bias), compute)


# --------------------------------------------------------------------------- stages


def stage_check(m: GlobalStage, x: torch.Tensor, h: int, w: int) -> str | None:
    """A stage runs fused when it can chain its LayerNorms: no stochastic depth active now
    (each block's residual pass then writes the next block's norm1). A stage of one block has
    nothing to chain and runs its block fused. Whether each block runs fused is its own
    decision, taken in the stage's forward."""
    if len(m.blocks) > 1 and not all(drop_path_inactive(block) for block in m.blocks):
        return "stochastic depth is active, so the blocks' residual passes cannot be chained"
    return None


def stage_forward(m: GlobalStage, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
    if m.downsample is not None:
        x = m.downsample(x, h, w)
        h, w = (h + 1) // 2, (w + 1) // 2
    if not all(config.runs_fused(block, x, h, w) for block in m.blocks):
        for block in m.blocks:
            x = block(x, h, w)
        return x, h, w
    # Every block runs fused: each one's residual output is written by the next one's norm1 pass.
    tail = None
    last = len(m.blocks) - 1
    for i, block in enumerate(m.blocks):
        if i < last:
            tail = block_forward(block, x if tail is None else None, h, w, tail, chain=True)
        else:
            x = block_forward(block, x if tail is None else None, h, w, tail)
    return x, h, w


config.register(PatchEmbed, "patches", patch_embed_check, patch_embed_forward)
config.register(PatchMerging, "patches", patch_merging_check, patch_merging_forward)
config.register(GlobalBlock, "attention", block_check, block_forward)
config.register(GlobalStage, "attention", stage_check, stage_forward)
