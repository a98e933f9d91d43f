"""HiFuse (Huo et al., BSPC 2024), module for module as the published code builds it.

The eager modules here are the numerical reference of every fused kernel. Module
names, registration order and state_dict layout follow the published model, so its
checkpoints load with ``strict=True``. Each module that has a fused path picks it
at forward time from ``hifuse.config`` and falls back to its eager code (logging
why, once) when the fused kernel cannot run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import config
from .layers import DropPath, LayerNorm2d, activation, trunc_normal_

__all__ = [
    "HiFuse",
    "PatchEmbed",
    "PatchMerging",
    "WindowAttention",
    "GlobalBlock",
    "GlobalStage",
    "LocalBlock",
    "LocalDownsample",
    "ConvBN",
    "IRMLP",
    "HFFBlock",
    "check_input_size",
]

WINDOW = 7
SIZE_MULTIPLE = 32


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives GEMMs on t's device now, or None outside autocast. Fused
    kernels whose result only feeds a GEMM write it in this dtype: the cast autocast would
    make, done in their store instead of in a pass of its own."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def check_input_size(height: int, width: int) -> None:
    """HiFuse needs sides that are multiples of 32 (four halvings after a stride-4 stem)."""
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or height <= 0 or width <= 0:
        raise ValueError(
            f"HiFuse input must have height and width that are positive multiples of "
            f"{SIZE_MULTIPLE} (got {height}x{width}): the local and global branches only "
            f"produce matching grids at those sizes"
        )


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
        if config.is_fused("local"):
            from hifuse_kernels import patch_conv

            nhwc = x.permute(0, 2, 3, 1)
            reason = patch_conv.unsupported_reason(nhwc, self.proj.weight)
            if reason is None:
                # one GEMM over gathered patches writes the tokens: no conv output to transpose
                y = patch_conv.patch_conv(nhwc, self.proj.weight, self.proj.bias)
                b, h, w, c = y.shape
                return self.norm(y.reshape(b, h * w, c)), h, w
            config.log_fallback("local", reason)
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
        if config.is_fused("local"):
            from hifuse_kernels import patch_merge

            reason = patch_merge.unsupported_reason(x, h, w, self.norm.weight, self.norm.bias)
            if reason is None:
                # under autocast the result comes in the reduction GEMM's dtype (no cast pass)
                gemm_dtype = autocast_dtype(x) if x.dtype == torch.float32 else None
                merged = patch_merge.patch_merge_norm(x, h, w, self.norm.weight, self.norm.bias, self.norm.eps, gemm_dtype)
                return self.reduction(merged)
            config.log_fallback("local", reason)
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
        return self.reduction(self.norm(x))


def relative_position_index(window: int) -> torch.Tensor:
    """index[i, j] = (hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1) for tokens i, j of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


_mask_cache: dict[tuple, torch.Tensor] = {}


def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(windows, window**2, window**2) mask: -100 between tokens of different shift regions.

    Float32 as in the published code (it promotes the scores it is added to).
    Cached per (padded size, window, shift, device).
    """
    key = (hp, wp, window, shift, device)
    if not torch.compiler.is_compiling():
        cached = _mask_cache.get(key)
        if cached is not None:
            return cached
    labels = torch.zeros(hp, wp, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for rows in cuts:
        for cols in cuts:
            labels[rows, cols] = label
            label += 1
    windows = labels.view(hp // window, window, wp // window, window).transpose(1, 2)
    windows = windows.reshape(-1, window * window)
    diff = windows[:, None, :] - windows[:, :, None]
    mask = torch.zeros_like(diff).masked_fill_(diff != 0, -100.0)
    if not torch.compiler.is_compiling():
        _mask_cache[key] = mask
    return mask


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


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

    def forward(
        self, x: torch.Tensor, h: int, w: int, normed: torch.Tensor | None = None,
        next_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block on (B, h*w, C) tokens.

        ``normed`` and ``next_norm`` are for ``GlobalStage``, which passes them only when it
        has checked that every block of the stage runs fused: ``normed`` is this block's
        ``norm1(x)`` computed by the block before, and with ``next_norm`` the block returns
        (output, next_norm(output)) computed in one pass.
        """
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"GlobalBlock got {length} tokens for a {h}x{w} grid")
        if normed is not None or next_norm is not None:
            return self.forward_fused(x, h, w, normed, next_norm)
        out = config.run_fused("attention", self, x, h, w)
        if out is not None:
            return out
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

    def fused_unsupported_reason(self, x: torch.Tensor, h: int, w: int) -> str | None:
        """Why forward_fused cannot run on x, or None when it can (any h x w grid can)."""
        from hifuse_kernels import window_attention as wa

        reason = wa._triton.unsupported_reason(x)
        if reason is not None:
            return reason
        dtype = autocast_dtype(x) or x.dtype
        if dtype not in wa.SUPPORTED_DTYPES:
            return f"dtype {dtype} is not supported (supported: {wa.SUPPORTED_DTYPES})"
        if self.dim // self.num_heads not in wa.HEAD_DIMS:
            return f"head_dim {self.dim // self.num_heads} is not supported (supported: {wa.HEAD_DIMS})"
        if self.window > wa.MAX_WINDOW:
            return f"window {self.window} is larger than {wa.MAX_WINDOW}"
        return None

    def forward_fused(
        self, x: torch.Tensor, h: int, w: int, normed: torch.Tensor | None = None,
        next_norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The same block with shift, padding, partition, bias, mask and merge in one kernel.

        ``norm1`` writes its result in the dtype the qkv GEMM takes (under autocast, the
        cast autocast would make); see ``forward`` for ``normed`` and ``next_norm``.
        """
        from hifuse_kernels import residual_layer_norm as rln
        from hifuse_kernels.window_attention import window_attention

        b, length, c = x.shape
        attn = self.attn
        gemm_dtype = self._gemm_dtype(x)
        if normed is None:
            norm = self.norm1
            if rln.unsupported_reason(x, norm.weight) is None:
                normed = rln.layer_norm_to(x, norm.weight, norm.bias, norm.eps, gemm_dtype)
            else:
                normed = norm(x)
        qkv = attn.qkv(normed).view(b, h, w, 3 * c)
        y = window_attention(qkv, attn.qkv.bias, attn.relative_position_bias_table, self.num_heads, self.window, self.shift)
        y = y.view(b, length, c)
        if self._needs_grad():
            y = self.fc1(attn.proj(y))
        else:
            # Nothing non-linear between proj and fc1: one GEMM with the product weight.
            # Same value; in low precision it rounds once instead of at proj's output.
            weight, bias = self._merged_proj_fc1()
            y = F.linear(y, weight, bias)
        if next_norm is not None:
            return rln.gelu_residual_layer_norm(y, x, next_norm.weight, next_norm.bias, next_norm.eps, gemm_dtype)
        if self.residual_fusable():
            from hifuse_kernels.gelu_residual import gelu_residual, unsupported_reason

            if unsupported_reason(y, x) is None:
                return gelu_residual(y, x)
        return x + self.drop_path(self.act(y))

    def residual_fusable(self) -> bool:
        """Whether GELU and the residual add may run as one kernel (no stochastic depth now)."""
        return isinstance(self.drop_path, nn.Identity) or not self.training

    def _gemm_dtype(self, x: torch.Tensor) -> torch.dtype:
        return autocast_dtype(x) or torch.promote_types(x.dtype, self.norm1.weight.dtype)

    def _needs_grad(self) -> bool:
        return torch.is_grad_enabled() and (self.fc1.weight.requires_grad or self.attn.proj.weight.requires_grad)

    def _merged_proj_fc1(self) -> tuple[torch.Tensor, torch.Tensor]:
        proj, fc1 = self.attn.proj, self.fc1
        params = (proj.weight, proj.bias, fc1.weight, fc1.bias)
        key = tuple((p.data_ptr(), p._version) for p in params)
        cached = getattr(self, "_merged", None)
        if torch.compiler.is_compiling() or cached is None or cached[0] != key:
            # In the parameters' own precision: the cache outlives any autocast region.
            with torch.no_grad(), torch.autocast(fc1.weight.device.type, enabled=False):
                weight = fc1.weight @ proj.weight
                bias = fc1.weight @ proj.bias + fc1.bias
            if torch.compiler.is_compiling():
                return weight, bias
            self._merged = cached = (key, weight, bias)
        return cached[1], cached[2]


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

    def forward(self, x: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, int, int]:
        if self.downsample is not None:
            x = self.downsample(x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        if not self.chains_norms(x, h, w):
            for block in self.blocks:
                x = block(x, h, w)
            return x, h, w
        # Every block runs fused: each one's residual pass also writes the next one's norm1.
        normed = None
        for i, block in enumerate(self.blocks):
            nxt = self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else None
            out = block(x, h, w, normed=normed, next_norm=nxt)
            x, normed = out if nxt is not None else (out, None)
        return x, h, w

    def chains_norms(self, x: torch.Tensor, h: int, w: int) -> bool:
        """Whether every block runs fused with GELU + residual in one pass, so that each
        block's residual pass can also compute the next block's norm1."""
        from hifuse_kernels import residual_layer_norm as rln

        if not config.is_fused("attention") or len(self.blocks) < 2:
            return False
        for block in self.blocks:
            if block.fused_unsupported_reason(x, h, w) is not None or not block.residual_fusable():
                return False
        return rln.unsupported_reason(x, self.blocks[0].norm1.weight) is None


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
        out = config.run_fused("local", self, x)
        if out is not None:
            return out
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.act(self.pwconv(self.norm(x))).permute(0, 3, 1, 2)
        return shortcut + self.drop_path(x)

    def fused_unsupported_reason(self, x: torch.Tensor) -> str | None:
        """Why forward_fused cannot run on x, or None when it can."""
        from hifuse_kernels import dwconv_layer_norm as dln

        if x.dim() != 4:
            return f"x must be 4-D, got {x.dim()}-D"
        return dln.unsupported_reason(
            x.permute(0, 2, 3, 1), self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias
        )

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """dwconv + LayerNorm in one kernel, then pwconv and GELU + residual in one pass.

        Works channels-last throughout: the result is an NCHW-shaped view of channels-last
        memory, so the next block's permutes are free.
        """
        from hifuse_kernels.dwconv_layer_norm import dwconv_layer_norm
        from hifuse_kernels.gelu_residual import gelu_residual

        nhwc = x.permute(0, 2, 3, 1)
        gemm_dtype = autocast_dtype(x)
        y = dwconv_layer_norm(
            nhwc, self.dwconv.weight, self.dwconv.bias, self.norm.weight, self.norm.bias, self.norm.eps, gemm_dtype
        )
        y = self.pwconv(y)
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            out = gelu_residual(y, nhwc)
        else:
            out = nhwc + self.drop_path(self.act(y))
        return out.permute(0, 3, 1, 2)


class LocalDownsample(nn.Sequential):
    """A stride-k layer of the local branch: the stem (conv 4x4/4, LayerNorm2d) or a
    downsample (LayerNorm2d, conv 2x2/2).

    An ``nn.Sequential`` with the published children (0 and 1), so checkpoints load as
    they are. The fused path works channels-last: the LayerNorm is a last-dim LayerNorm and
    the convolution one GEMM over gathered patches (``hifuse_kernels.patch_conv``); its
    result is an NCHW-shaped view of channels-last memory, which the local blocks take
    without copies.
    """

    def __init__(self, in_dim: int, out_dim: int, stride: int, norm_first: bool) -> None:
        conv = nn.Conv2d(in_dim, out_dim, stride, stride=stride)
        if norm_first:
            super().__init__(LayerNorm2d(in_dim, eps=1e-6), conv)
        else:
            super().__init__(conv, LayerNorm2d(out_dim, eps=1e-6))
        self.norm_first = norm_first

    @property
    def conv(self) -> nn.Conv2d:
        return self[1] if self.norm_first else self[0]

    @property
    def norm(self) -> LayerNorm2d:
        return self[0] if self.norm_first else self[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = config.run_fused("local", self, x)
        if out is not None:
            return out
        return super().forward(x)

    def fused_unsupported_reason(self, x: torch.Tensor) -> str | None:
        from hifuse_kernels import patch_conv

        if x.dim() != 4 or x.shape[1] != self.conv.in_channels:
            return f"x must be (B, {self.conv.in_channels}, H, W), got {tuple(x.shape)}"
        return patch_conv.unsupported_reason(x.permute(0, 2, 3, 1), self.conv.weight)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        from hifuse_kernels.patch_conv import patch_conv

        nhwc = x.permute(0, 2, 3, 1)
        norm = self.norm
        if self.norm_first:
            nhwc = self._norm_for_gemm(nhwc)
        y = patch_conv(nhwc, self.conv.weight, self.conv.bias)
        if not self.norm_first:
            y = F.layer_norm(y, (norm.dim,), norm.weight, norm.bias, norm.eps)
        return y.permute(0, 3, 1, 2)

    def _norm_for_gemm(self, nhwc: torch.Tensor) -> torch.Tensor:
        """The LayerNorm before the patch GEMM, written in the GEMM's dtype under autocast (so
        the patch gather moves half the bytes and no cast pass follows) when Triton can run."""
        from hifuse_kernels import residual_layer_norm as rln

        norm = self.norm
        gemm_dtype = autocast_dtype(nhwc)
        if gemm_dtype is not None and rln.unsupported_reason(nhwc, norm.weight) is None:
            return rln.layer_norm_to(nhwc, norm.weight, norm.bias, norm.eps, gemm_dtype)
        return F.layer_norm(nhwc, (norm.dim,), norm.weight, norm.bias, norm.eps)


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

    def forward_fused(self, x: torch.Tensor, then: str | None = None, pool: bool = False) -> torch.Tensor:
        """The fusion block's fused path, followed by activation ``then`` ("gelu" or None)
        and, with ``pool``, a 2x2/2 average pooling (fused into the training BatchNorm).

        A 1x1 convolution is a GEMM over channels-last pixels. In eval mode the BatchNorm is
        folded into the weight and bias (the folded weight is rounded once instead of
        normalising in a separate pass); in training the BatchNorm (batch statistics,
        running-statistic updates as nn.BatchNorm2d) and the activation run as one Triton
        op (``hifuse_kernels.batch_norm_act``).
        """
        if self.relu is not None and then is not None:
            raise ValueError("ConvBN with its own ReLU takes no further activation")
        act = "relu" if self.relu is not None else then
        weight, bias = self.conv.weight, self.conv.bias
        bn = self.bn
        fold = bn is not None and not bn.training and bn.running_var is not None
        if fold:
            weight, bias = fold_batch_norm(weight, bias, bn)
        x = conv_channels_last(x, weight, bias, self.conv)
        if bn is not None and not fold:
            from hifuse_kernels import batch_norm_act as bna

            if bna.unsupported_reason(x, bn) is None and (not pool or min(x.shape[-2:]) >= 2):
                return bna.batch_norm_act(x, bn, act, pool=pool)
            x = bn(x)
        x = activation(act)(x)
        return F.avg_pool2d(x, 2, stride=2) if pool else x


def batch_norm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with eval-mode ``bn(x) == x * scale + shift`` per channel."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of conv followed by an eval-mode BatchNorm, as one convolution."""
    scale, shift = batch_norm_affine(bn)
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def conv_channels_last(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: nn.Conv2d
) -> torch.Tensor:
    """``conv`` (its padding and groups) with the given weight; a dense 1x1 convolution runs
    as one GEMM on the channels-last pixels and returns an NCHW view of channels-last memory."""
    if conv.kernel_size == (1, 1) and conv.groups == 1 and conv.stride == (1, 1):
        y = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias)
        return y.permute(0, 3, 1, 2)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


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

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 on channels-last memory; in training GELU, residual and ``bn1`` in one op
        (``batch_norm_act``); in eval mode GELU + residual in one pass, ``bn1`` folded into
        conv2 (an affine map before a linear one) and conv3's BatchNorm into conv3; the 1x1
        convolutions are GEMMs over the pixels."""
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x, self.conv1.conv.weight, None, padding=self.conv1.conv.padding, groups=self.conv1.conv.groups)
        w2 = self.conv2.conv.weight
        if self.bn1.training or self.bn1.running_var is None:
            from hifuse_kernels import batch_norm_act as bna

            if bna.unsupported_reason(y, self.bn1, residual=x) is None:
                # gelu(conv1(x)) + x and bn1 in one op: the sum is never written, and the
                # result comes in the dtype conv2's GEMM takes under autocast
                normed = bna.batch_norm_act(y, self.bn1, None, residual=x, out_dtype=autocast_dtype(x))
            else:
                normed = self.bn1(self.gelu(y) + x)
            out = conv_channels_last(normed, w2, None, self.conv2.conv)
        else:
            # conv2(bn1(t)) = conv2 with its input channels scaled, plus conv2 of the shift
            scale, shift = batch_norm_affine(self.bn1)
            out = self._gelu_residual(y, x)
            out = conv_channels_last(out, w2 * scale.view(1, -1, 1, 1), w2.flatten(1) @ shift, self.conv2.conv)
        return self.conv3.forward_fused(self.gelu(out))

    def _gelu_residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        from hifuse_kernels import gelu_residual as gr

        y_nhwc, x_nhwc = y.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1)
        if gr.unsupported_reason(y_nhwc, x_nhwc) is None and y_nhwc.is_contiguous():
            return gr.gelu_residual(y_nhwc, x_nhwc).permute(0, 3, 1, 2)
        return self.gelu(y) + x


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
        self.norm1 = LayerNorm2d(dim * 3, eps=1e-6)
        self.norm2 = LayerNorm2d(dim * 2, eps=1e-6)
        self.norm3 = LayerNorm2d(dim * 3, eps=1e-6)
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
        out = config.run_fused("fusion", self, l, g, f)
        if out is not None:
            return out
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

    def fused_unsupported_reason(self, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None) -> str | None:
        """Why forward_fused cannot run on these inputs, or None when it can."""
        from hifuse_kernels import fusion_gate, layer_norm_cat

        norm = self.norm1 if f is not None else self.norm2
        parts = [l, g] if f is None else [l, l, g]
        reason = layer_norm_cat.unsupported_reason(parts, norm.weight, norm.bias)
        if reason is not None:
            return reason
        return fusion_gate.unsupported_reason(l, g, l, self.norm3.weight, self.norm3.bias)

    def forward_fused(self, l: torch.Tensor, g: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
        """Concat-free LayerNorms (native ``hifuse::layer_norm_cat``), one-pass gating
        statistics and the gate multiplications inside the norm3 LayerNorm (Triton
        ``hifuse_kernels.fusion_gate``), 1x1 convolutions as channels-last GEMMs whose
        BatchNorm is folded in eval mode and, in training, runs with the activation (and
        Updim's pooling) as one op (``hifuse_kernels.batch_norm_act``), and the IRMLP's fused
        path. Tensors stay channels-last."""
        from hifuse_kernels.fusion_gate import channel_pool, gated_layer_norm, spatial_pool
        from hifuse_kernels.layer_norm_cat import layer_norm_cat

        w_local = self.W_l.forward_fused(l)
        w_global = self.W_g.forward_fused(g)
        if f is not None:
            w_f = self.Updim.forward_fused(f, pool=True)
            shortcut = w_f
            parts, norm, proj = [w_f, w_local, w_global], self.norm1, self.W3
        else:
            shortcut = 0
            parts, norm, proj = [w_local, w_global], self.norm2, self.W
        dtype = parts[0].dtype
        for t in parts[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        parts = [t.to(dtype) for t in parts]
        # Written in the dtype the projection GEMM takes under autocast.
        gemm_dtype = autocast_dtype(l)
        normed = layer_norm_cat(parts, norm.weight, norm.bias, norm.eps, gemm_dtype if gemm_dtype == dtype else None)
        x = proj.forward_fused(normed, then="gelu")

        spatial_gate = torch.sigmoid(self.spatial.forward_fused(spatial_pool(l)))
        avg, best = channel_pool(g)
        channel_gate = torch.sigmoid(self.se(best) + self.se(avg))

        fused = gated_layer_norm(g, channel_gate, l, spatial_gate, x, self.norm3.weight, self.norm3.bias, self.norm3.eps)
        return shortcut + self.drop_path(self.residual.forward_fused(fused))


# --------------------------------------------------------------------------- the model


class HiFuse(nn.Module):
    """HiFuse: a local (ConvNeXt-like) and a global (Swin-like) branch joined by HFF blocks.

    Args:
        num_classes: classifier outputs.
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
        self.num_classes = num_classes
        self.dims = tuple(dims)
        self.depths = tuple(depths)
        self.irmlp = irmlp
        self.num_features = dims[-1]

        # local branch
        self.downsample_layers = nn.ModuleList([LocalDownsample(in_chans, dims[0], 4, norm_first=False)])
        for i in range(3):
            self.downsample_layers.append(LocalDownsample(dims[i], dims[i + 1], 2, norm_first=True))
        local_dpr = torch.linspace(0, local_drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start = 0
        for i in range(4):
            self.stages.append(
                nn.Sequential(*[LocalBlock(dims[i], local_dpr[start + j]) for j in range(depths[i])])
            )
            start += depths[i]
        self.conv_norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.conv_head = nn.Linear(dims[-1], num_classes)

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
        self.head = nn.Linear(dims[-1], num_classes)
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

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last fusion output, (B, dims[-1], H/32, W/32)."""
        if x.dim() != 4:
            raise ValueError(f"HiFuse expects (B, C, H, W) images, got shape {tuple(x.shape)}")
        check_input_size(x.shape[-2], x.shape[-1])

        tokens, h, w = self.patch_embed(x)
        globals_ = []
        for stage in self.global_stages:
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
            f = block(l, g, f)
        return f

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.conv_norm(x.mean([-2, -1]))
        return x if pre_logits else self.conv_head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.conv_head

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier (and the unused global head, which checkpoints carry) for num_classes."""
        self.num_classes = num_classes
        ref = self.conv_head.weight
        self.conv_head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        self.head = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        for m in (self.conv_head, self.head):
            _init_branch_weights(m)


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
        num_classes: classifier outputs.
        irmlp: "full" (published) or "depthwise" (paper).
        **kwargs: other ``HiFuse`` arguments (drop_path_rate, window, in_chans, ...).
    """
    key = name.lower().replace("-", "_")
    if key not in VARIANTS:
        raise ValueError(f"unknown HiFuse variant {name!r}; choose from {sorted(VARIANTS)}")
    return HiFuse(num_classes=num_classes, irmlp=irmlp, **{**VARIANTS[key], **kwargs})

