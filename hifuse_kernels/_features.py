"""Checks and layout shared by the fusion block's gating ops: (N, C, H, W) feature maps that
the kernels read as channels-last rows (N, H*W, C)."""

from __future__ import annotations

import torch

from . import _triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 1024


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, H*W, C); free for channels-last memory."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()


def feature_problem(name: str, t) -> tuple[type[Exception], str] | None:
    if not isinstance(t, torch.Tensor):
        return TypeError, f"{name} must be a tensor, got {type(t).__name__}"
    if t.dim() != 4:
        return ValueError, f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}"
    if t.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"{name} must be float32, float16 or bfloat16, got {t.dtype}"
    if t.shape[1] > MAX_CHANNELS:
        return ValueError, f"{name} has {t.shape[1]} channels, more than the {MAX_CHANNELS} supported"
    return None


def raise_problem(op: str, problem) -> None:
    if problem is not None:
        raise problem[0](f"{op}: {problem[1]}")


def check_device(op: str, *tensors: torch.Tensor) -> None:
    reason = _triton.unsupported_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")
