"""Reference formulas shared by the model and the fused ops' references.

Written as the published HiFuse code computes them. The eager model (``hifuse.model``)
imports them from here, and each op's ``*_ref`` is built from them, so an op is tested
against exactly what the model would compute. Plain PyTorch: no Triton, no native library.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
import torch.nn.functional as F

__all__ = [
    "activation",
    "layer_norm_cf_ref",
    "relative_position_index",
    "shift_mask",
    "window_merge",
    "window_partition",
]


def activation(name: str | None):
    """The elementwise function a fused op names: None (identity), "relu", "gelu" (exact) or
    "sigmoid"."""
    functions = {None: _identity, "relu": F.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid}
    if name not in functions:
        raise ValueError(f"activation must be one of {list(functions)}, got {name!r}")
    return functions[name]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def layer_norm_cf_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Channels-first LayerNorm over C of (N, C, H, W), written as the published model writes it."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


def relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """index[i, j] = (hi - hj + w - 1) * (2w - 1) + (wi - wj + w - 1) for tokens i, j of a window.
    Made on ``device`` (no host copy: it may be made inside a compiled or captured graph)."""
    steps = torch.arange(window, device=device)
    coords = torch.stack(torch.meshgrid(steps, steps, indexing="ij"))
    coords = coords.flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


_cache: dict[tuple, torch.Tensor] = {}


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives GEMMs on t's device now, or None outside autocast. Fused
    kernels whose result only feeds a GEMM write it in this dtype (the cast autocast would
    make, done in their store), and the rebuilt GEMMs cast their weights to it once."""
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


# Devices that behave as CUDA does where CPU differs: autocast runs LayerNorm in float32 (CPU's
# keeps the input's dtype), and a GEMM of 16-bit operands writes float32 (``mm_to``). The step
# ledger adds "cpu" while it counts a GPU's step on a CPU.
CUDA_LIKE_DEVICES = {"cuda"}


def autocast_norm_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype ``F.layer_norm`` writes under autocast for a GEMM output made from t (on t's
    device, in autocast's GEMM dtype), or None outside autocast."""
    gemm = autocast_dtype(t)
    if gemm is None:
        return None
    return torch.float32 if t.device.type in CUDA_LIKE_DEVICES else gemm


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream: work is then recorded,
    not run, so a tensor made now holds its values only once the graph replays."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _tracing() -> bool:
    # torch.compile, or a dispatch mode (fake tensors): the cache's real tensors must not
    # enter the trace, nor the trace's tensors the cache
    return torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def cached(make, *key) -> torch.Tensor:
    """``make(*key)``, kept in a process-wide cache. Not used while tracing or under a dispatch
    mode; while a CUDA graph is captured an entry is read but none is added (a tensor made
    then is empty until a replay)."""
    if _tracing():
        return make(*key)
    hit = _cache.get((make, *key))
    if hit is None:
        hit = make(*key)
        if not capturing():
            _cache[(make, *key)] = hit
    return hit


def shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """(windows, window**2, window**2) mask: -100 between tokens of different shift regions.

    Float32 as in the published code (it promotes the scores it is added to).
    Cached per (padded size, window, shift, device); built in the graph under torch.compile.
    """
    return cached(_make_shift_mask, hp, wp, window, shift, device)


def _make_shift_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
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
    return torch.zeros_like(diff).masked_fill_(diff != 0, -100.0)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window, window, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """The inverse of ``window_partition``."""
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)
