"""HiFuse (Huo et al., BSPC 2024), module for module as the published code builds it.

The eager modules here are the numerical reference of every fused kernel. Module
names, registration order and state_dict layout follow the published model, so its
checkpoints load with ``strict=True``. A module with a fused path asks ``hifuse.config``
at the top of its forward whether it runs fused and hands over in one line; the fused
forwards live in ``hifuse.fused``. This file holds eager code only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hifuse_kernels.reference import relative_position_index, shift_mask, window_merge, window_partition

from . import config
from .layers import DropPath, LayerNormCF, trunc_normal_

__all__ = [
    "HiFuse",
    "PatchEmbed",
    "PatchMerging",
    "WindowAttention",
    "GlobalBlock",
    "GlobalStage",
    "LocalBlock",
    "LocalStage",
    "LocalDownsample",
    "ConvBN",
    "IRMLP",
    "HFFBlock",
    "check_input_size",
    "checkpointed",
]

WINDOW = 7
SIZE_MULTIPLE = 32

# The published evaluation preprocessing, which the command line applies too (it reads these):
# short side resized to 1.143x the crop side (256 for 224), centre crop, Normalize(0.5, 0.5).
EVAL_RESIZE = 1.143
INTERPOLATION = "bilinear"  # torchvision's Resize default, which the published code uses
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def check_input_size(height: int, width: int) -> None:
    """HiFuse needs sides that are multiples of 32 (four halvings after a stride-4 stem)."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or height <= 0 or width <= 0:
        raise ValueError(
            f"HiFuse input must have height and width that are positive multiples of "
            f"{SIZE_MULTIPLE} (got {height}x{width}): the local and global branches only "
            f"produce matching grids at those sizes"
        )


@contextmanager
def _as_in_forward(module: nn.Module, parts: config.FusedParts, rebuilds: config.Rebuilds):
    """A checkpoint's recomputation in backward runs as its forward ran: with the same fused
    parts and rebuilds (a ``with hifuse.use_fused()`` block may have ended since; otherwise
    it saves other tensors than the forward did), and BatchNorm running statistics put back
    afterwards (the batch is counted once)."""
    kept = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    # HIFUSE_FUSED, where set, decided the forward and decides this too
    fused = nullcontext() if os.environ.get(config.ENV_VAR) is not None else config.use_fused(**asdict(parts))
    try:
        with fused, config.use_rebuilds(**asdict(rebuilds)):
            yield
    finally:
        with torch.no_grad():
            for b, value in kept:
                b.copy_(value)


def checkpointed(module: nn.Module, *args):
    """``module(*args)`` under activation checkpointing: only the inputs are kept, and the forward
    runs again in backward, fused or eager as it ran (the fused ops' saved tensors go through
    the checkpoint like any others)."""
    if torch.compiler.is_compiling():
        # traced: the graph holds the recomputation, with the settings it was traced with
        return checkpoint(module, *args, use_reentrant=False)
    parts, rebuilds = config.fused_parts(), config.rebuilds()
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _as_in_forward(module, parts, rebuilds)))


# --------------------------------------------------------------------------- global branch


class PatchEmbed(nn.Module):
    """4x4/4 conv to tokens, then LayerNorm; pads right/bottom to a multiple of 4."""

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            x = F.pad(x, (0, (p - w % p) % p, 0, (p - h % p) % p))
        if config.runs_fused(self, x):
            return config.forward_fused(self, x)
        x = self.proj(x)
        _, _, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, h, w


class PatchMerging(nn.Module):
    """2x2 neighbourhood gather (odd sides padded), LayerNorm(4C), Linear(4C -> 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"PatchMerging got {length} tokens for a {h}x{w} grid")
        if config.runs_fused(self, x, h, w):
            return config.forward_fused(self, x, h, w)
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous()
        attn = attn + bias.unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(x)


class GlobalBlock(nn.Module):
    """Swin-style block as HiFuse has it: (shifted) window attention, then fc1 + GELU, one residual.

    ``norm2`` is kept for state_dict compatibility; the published forward never uses it.
    """

    def __init__(
        self, dim: int, num_heads: int, window: int = WINDOW, shift: int = 0, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        if not 0 <= shift < window:
            raise ValueError(f"shift {shift} must be in [0, {window})")
        self.dim = dim
        self.num_heads = num_heads
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The block on (B, h*w, C) tokens."""
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"GlobalBlock got {length} tokens for a {h}x{w} grid")
        if config.runs_fused(self, x, h, w):
            return config.forward_fused(self, x, h, w)
        ws = self.window
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_r = (ws - w % ws) % ws
        pad_b = (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
            mask = shift_mask(hp, wp, ws, self.shift, x.device)
        windows = window_partition(x, ws).view(-1, ws * ws, c)
        windows = self.attn(windows, mask)
        x = window_merge(windows.view(-1, ws, ws, c), ws, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_r or pad_b:
            x = x[:, :h, :w, :].contiguous()
        x = self.act(self.fc1(x.view(b, h * w, c)))
        return shortcut + self.drop_path(x)

class GlobalStage(nn.Module):
    """Optional patch merging, then blocks alternating shift 0 and window // 2."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int = WINDOW,
        drop_path: list[float] | None = None,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        drop_path = drop_path or [0.0] * depth
        self.blocks = nn.ModuleList(
            GlobalBlock(dim, num_heads, window, 0 if i % 2 == 0 else window // 2, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        # Checkpointed blocks run one by one, each fused or eager as it decides: the fused
        # stage writes one block's output in the next one's norm1 pass, across two checkpoints.
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if not ckpt and config.runs_fused(self, x, h, w):
            return config.forward_fused(self, x, h, w)
        if self.downsample is not None:
            x = self.downsample(x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        for block in self.blocks:
            x = checkpointed(block, x, h, w) if ckpt else block(x, h, w)
        return x, h, w


# --------------------------------------------------------------------------- local branch


class LocalBlock(nn.Module):
    """ConvNeXt-style block: dwconv 3x3, LayerNorm, Linear, GELU, residual."""

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if config.runs_fused(self, x):
            return config.forward_fused(self, x)
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.act(self.pwconv(self.norm(x))).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)


class LocalStage(nn.Sequential):
    """The local blocks of one stage (children 0, 1, ... as published), checkpointed one by
    one when ``grad_checkpointing`` is set and autograd records."""

    def __init__(self, *blocks: LocalBlock) -> None:
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return super().forward(x)
        for block in self:
            x = checkpointed(block, x)
        return x


class LocalDownsample(nn.Sequential):
    """A stride-k layer of the local branch: the stem (conv 4x4/4, LayerNormCF) or a
    downsample (LayerNormCF, conv 2x2/2).

    An ``nn.Sequential`` with the published children (0 and 1), so checkpoints load as
    they are.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int, norm_first: bool) -> None:
        conv = nn.Conv2d(in_dim, out_dim, stride, stride=stride)
        if norm_first:
            super().__init__(LayerNormCF(in_dim, eps=1e-6), conv)
        else:
            super().__init__(conv, LayerNormCF(out_dim, eps=1e-6))
        self.norm_first = norm_first

    @property
    def conv(self) -> nn.Conv2d:
        return self[1] if self.norm_first else self[0]

    @property
    def norm(self) -> LayerNormCF:
        return self[0] if self.norm_first else self[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if config.runs_fused(self, x):
            return config.forward_fused(self, x)
        return super().forward(x)

# --------------------------------------------------------------------------- fusion path


class ConvBN(nn.Module):
    """Conv2d ('same' padding) with optional BatchNorm and ReLU: the published ``Conv``.

    ``groups`` is honoured here; the published code ignores its ``group`` argument, which
    callers that want the published model reproduce by passing ``groups=1``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int = 3,
        bn: bool = False,
        relu: bool = True,
        bias: bool = True,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.conv = nn.Conv2d(
            in_dim, out_dim, kernel_size, padding=(kernel_size - 1) // 2, bias=bias, groups=groups
        )
        self.bn = nn.BatchNorm2d(out_dim) if bn else None
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_dim:
            raise ValueError(f"ConvBN expects {self.in_dim} channels, got {x.shape[1]}")
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x

class IRMLP(nn.Module):
    """Inverted residual MLP: 3x3 conv + GELU + residual, BN, 1x1 expand x4 + GELU, 1x1 + BN.

    Args:
        depthwise: make conv1 depthwise (the paper's description) instead of the published
            full 3x3 convolution.
    """

    def __init__(self, in_dim: int, out_dim: int, depthwise: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBN(
            in_dim, in_dim, 3, relu=False, bias=False, groups=in_dim if depthwise else 1
        )
        self.conv2 = ConvBN(in_dim, in_dim * 4, 1, relu=False, bias=False)
        self.conv3 = ConvBN(in_dim * 4, out_dim, 1, bn=True, relu=False, bias=False)
        self.gelu = nn.GELU()
        self.bn1 = nn.BatchNorm2d(in_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gelu(self.conv1(x)) + x
        out = self.gelu(self.conv2(self.bn1(out)))
        return self.conv3(out)

class HFFBlock(nn.Module):
    """Hierarchical feature fusion block.

    Takes the local feature ``l``, the global feature ``g`` (both C channels) and the
    previous fusion output ``f`` (C/2 channels at twice the resolution, or None for the
    first block).
    """

    def __init__(
        self, dim: int, reduction: int = 16, depthwise_irmlp: bool = False, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.dim = dim
        self.se = nn.Sequential(
            nn.Conv2d(dim, dim // reduction, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(dim // reduction, dim, 1, bias=False),
        )
        self.spatial = ConvBN(2, 1, 7, bn=True, relu=False, bias=False)
        self.W_l = ConvBN(dim, dim, 1, bn=True, relu=False)
        self.W_g = ConvBN(dim, dim, 1, bn=True, relu=False)
        self.Updim = ConvBN(dim // 2, dim, 1, bn=True, relu=True)
        self.norm1 = LayerNormCF(dim * 3, eps=1e-6)
        self.norm2 = LayerNormCF(dim * 2, eps=1e-6)
        self.norm3 = LayerNormCF(dim * 3, eps=1e-6)
        self.W3 = ConvBN(dim * 3, dim, 1, bn=True, relu=False)
        self.W = ConvBN(dim * 2, dim, 1, bn=True, relu=False)
        self.gelu = nn.GELU()
        self.residual = IRMLP(dim * 3, dim, depthwise=depthwise_irmlp)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def check_inputs(self, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None) -> None:
        c = self.dim
        if l.dim() != 4 or l.shape[1] != c:
            raise ValueError(f"HFFBlock({c}): l must be (B, {c}, H, W), got {tuple(l.shape)}")
        if g.shape != l.shape:
            raise ValueError(f"HFFBlock({c}): g {tuple(g.shape)} must match l {tuple(l.shape)}")
        if f is not None:
            b, _, h, w = l.shape
            want = (b, c // 2, 2 * h, 2 * w)
            if tuple(f.shape) != want:
                raise ValueError(f"HFFBlock({c}): f must be {want}, got {tuple(f.shape)}")

    def forward(self, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        self.check_inputs(l, g, f)
        if config.runs_fused(self, l, g, f):
            return config.forward_fused(self, l, g, f)
        w_local = self.W_l(l)
        w_global = self.W_g(g)
        if f is not None:
            w_f = F.avg_pool2d(self.Updim(f), 2, stride=2)
            shortcut = w_f
            x = self.gelu(self.W3(self.norm1(torch.cat([w_f, w_local, w_global], 1))))
        else:
            shortcut = 0
            x = self.gelu(self.W(self.norm2(torch.cat([w_local, w_global], 1))))

        # spatial attention on the local branch
        stats = torch.cat([l.amax(dim=1, keepdim=True), l.mean(dim=1, keepdim=True)], 1)
        l = torch.sigmoid(self.spatial(stats)) * l

        # channel attention on the global branch
        gate = self.se(F.adaptive_max_pool2d(g, 1)) + self.se(F.adaptive_avg_pool2d(g, 1))
        g = torch.sigmoid(gate) * g

        fuse = self.residual(self.norm3(torch.cat([g, l, x], 1)))
        return shortcut + self.drop_path(fuse)

# --------------------------------------------------------------------------- the model


class HiFuse(nn.Module):
    """HiFuse: a local (ConvNeXt-like) and a global (Swin-like) branch joined by HFF blocks.

    Args:
        num_classes: classifier outputs; 0 for none (the model returns the pooled features).
        depths: blocks per stage (the same for both branches).
        num_heads: attention heads per global stage.
        dims: channels per stage.
        window: attention window.
        irmlp: "full" (published 3x3 conv in the IRMLP) or "depthwise" (the paper's).
        drop_path_rate: stochastic depth of the global branch (linear decay), 0 as published.
        local_drop_path_rate: stochastic depth of the local branch.
        in_chans: input channels.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        dims: tuple[int, ...] = (96, 192, 384, 768),
        window: int = WINDOW,
        irmlp: str = "full",
        drop_path_rate: float = 0.0,
        local_drop_path_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if irmlp not in ("full", "depthwise"):
            raise ValueError(f"irmlp must be 'full' or 'depthwise', got {irmlp!r}")
        if not (len(depths) == len(num_heads) == len(dims) == 4):
            raise ValueError("depths, num_heads and dims need four entries each")
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no classifier) or more, got {num_classes}")
        self.num_classes = num_classes
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.irmlp = irmlp
        self.num_features = dims[-1]
        self.global_pool = "avg"
        self.grad_checkpointing = False
        self.pretrained_cfg = timm_cfg(num_classes, in_chans)

        # local branch
        self.downsample_layers = nn.ModuleList([LocalDownsample(in_chans, dims[0], 4, norm_first=False)])
        for i in range(3):
            self.downsample_layers.append(LocalDownsample(dims[i], dims[i + 1], 2, norm_first=True))
        local_dpr = torch.linspace(0, local_drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(LocalStage(*[LocalBlock(dims[i], local_dpr[start + j]) for j in range(depths[i])]))
            start += depths[i]
        self.conv_norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.conv_head = _classifier(dims[-1], num_classes)

        # global branch
        self.patch_embed = PatchEmbed(4, in_chans, dims[0])
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        start = 0
        for i in range(4):
            stage = GlobalStage(
                dims[i], depths[i], num_heads[i], window, dpr[start : start + depths[i]], downsample=i > 0
            )
            self.add_module(f"layers{i + 1}", stage)
            start += depths[i]
        # unused by the forward, kept so published checkpoints load strictly
        self.norm = nn.LayerNorm(dims[-1])
        self.head = _classifier(dims[-1], num_classes)
        self.apply(_init_branch_weights)

        # fusion path (PyTorch default init, as published)
        for i in range(4):
            self.add_module(f"fu{i + 1}", HFFBlock(dims[i], depthwise_irmlp=irmlp == "depthwise"))

    @property
    def global_stages(self) -> list[GlobalStage]:
        return [self.layers1, self.layers2, self.layers3, self.layers4]

    @property
    def fusion_blocks(self) -> list[HFFBlock]:
        return [self.fu1, self.fu2, self.fu3, self.fu4]

    @property
    def default_cfg(self) -> dict:
        """timm's older name of ``pretrained_cfg``."""
        return self.pretrained_cfg

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last fusion output, (B, dims[-1], H/32, W/32).

        Args:
            x: (B, in_chans, H, W) images, H and W multiples of 32.
        """
        if x.dim() != 4:
            raise ValueError(f"HiFuse expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        check_input_size(x.shape[-2], x.shape[-1])
        with config.forward_scope(self, x):
            return self._features(x)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if not ckpt and config.runs_fused(self, x):
            return config.forward_fused(self, x)
        tokens, h, w = self.patch_embed(x)
        globals_ = []
        for stage in self.global_stages:  # stages checkpoint their own blocks
            tokens, h, w = stage(tokens, h, w)
            b, _, c = tokens.shape
            globals_.append(tokens.transpose(1, 2).view(b, c, h, w))

        locals_ = []
        y = x
        for down, stage in zip(self.downsample_layers, self.stages):
            y = stage(down(y))
            locals_.append(y)

        f = None
        for block, l, g in zip(self.fusion_blocks, locals_, globals_):
            f = checkpointed(block, l, g, f) if ckpt else block(l, g, f)
        return f

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling, ``conv_norm``, then the classifier.

        Args:
            x: ``forward_features``' output.
            pre_logits: stop before the classifier: (B, num_features) pooled features.
        """
        x = self.conv_norm(x.mean([-2, -1]))
        return x if pre_logits else self.conv_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits, or (B, num_features) pooled features where num_classes is 0."""
        return self.forward_head(self.forward_features(x))

    def train(self, mode: bool = True) -> "HiFuse":
        super().train(mode)
        if not mode:
            # weight-derived tensors of the fused eval paths, computed now rather than per forward
            config.prepare(self)
        return self

    def get_classifier(self) -> nn.Module:
        """The classifier ``forward`` applies: ``conv_head`` (``nn.Identity`` without classes)."""
        return self.conv_head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New classifier (and the unused global head, which checkpoints carry) for num_classes.

        Args:
            num_classes: outputs; 0 replaces both by ``nn.Identity``, so the model returns the
                pooled features.
            global_pool: None or "avg" (HiFuse pools by averaging only).
        """
        if global_pool not in (None, "avg"):
            raise ValueError(f"HiFuse pools by averaging only: global_pool must be None or 'avg', got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be 0 (no classifier) or more, got {num_classes}")
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes
        ref = self.conv_norm.weight
        self.conv_head = _classifier(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        self.head = _classifier(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        for m in (self.conv_head, self.head):
            _init_branch_weights(m)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every local, global and fusion block, in forwards that
        autograd records.

        Each block keeps only its inputs and runs its forward again in backward: same outputs
        and gradients, far less memory kept, about one more forward of compute. Blocks run
        fused where ``hifuse.use_fused`` says so, inside their checkpoints; a global stage's
        fused blocks then each write their own output instead of chaining it into the next
        block's LayerNorm pass. BatchNorm running statistics are counted once per forward.

        Args:
            enable: on (True) or off.
        """
        self.grad_checkpointing = enable
        for stage in (*self.stages, *self.global_stages):
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Names (as ``named_parameters`` gives them) of the relative position bias tables,
        which Swin-style recipes exempt from weight decay."""
        return {n for n, _ in self.named_parameters() if n.endswith("relative_position_bias_table")}


def timm_cfg(num_classes: int = 1000, in_chans: int = 3) -> dict:
    """timm's ``pretrained_cfg``: the input and preprocessing HiFuse was trained with (the
    command line's evaluation transform) and the names of its first and last layers.

    Args:
        num_classes: classifier outputs (0: none).
        in_chans: input channels.
    """
    return dict(
        num_classes=num_classes,
        input_size=(in_chans, 224, 224),
        pool_size=(224 // SIZE_MULTIPLE, 224 // SIZE_MULTIPLE),
        fixed_input_size=False,  # any multiple of 32
        interpolation=INTERPOLATION,
        crop_pct=1 / EVAL_RESIZE,  # timm resizes to floor(size / crop_pct): int(size * 1.143)
        crop_mode="center",
        mean=MEAN,
        std=STD,
        first_conv=("downsample_layers.0.0", "patch_embed.proj"),
        # conv_head classifies; head is the unused global head the checkpoints carry
        classifier=("conv_head", "head"),
    )


def _classifier(dim: int, num_classes: int, **factory) -> nn.Module:
    """Linear(dim, num_classes), or nn.Identity for none (timm's num_classes=0)."""
    return nn.Linear(dim, num_classes, **factory) if num_classes else nn.Identity()


def _init_branch_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        trunc_normal_(m.weight, std=0.2)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


VARIANTS: dict[str, dict] = {
    "hifuse_tiny": dict(depths=(2, 2, 2, 2)),
    "hifuse_small": dict(depths=(2, 2, 6, 2)),
    "hifuse_base": dict(depths=(2, 2, 18, 2)),
}


def create_model(name: str, num_classes: int = 1000, irmlp: str = "full", **kwargs) -> HiFuse:
    """Build a HiFuse variant by name.

    Args:
        name: "hifuse_tiny", "hifuse_small" or "hifuse_base".
        num_classes: classifier outputs; 0 for none (``model(x)`` gives pooled features).
        irmlp: "full" (published) or "depthwise" (paper).
        **kwargs: other ``HiFuse`` arguments (drop_path_rate, window, in_chans, ...).
    """
    key = name.lower().replace("-", "_")
    if key not in VARIANTS:
        raise ValueError(f"unknown HiFuse variant {name!r}; choose from {sorted(VARIANTS)}")
    model = HiFuse(num_classes=num_classes, irmlp=irmlp, **{**VARIANTS[key], **kwargs})
    model.pretrained_cfg["architecture"] = key
    return model

