"""When Triton kernels can run: on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot take these tensors, or None when it can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        return f"tensors are on several devices: {sorted(str(t.device) for t in tensors)}"
    allowed = {"cuda", "cpu"} if interpreting() else {"cuda"}
    if not devices <= allowed:
        hint = "" if interpreting() else " (set TRITON_INTERPRET=1 to run them on CPU tensors)"
        return f"Triton kernels need CUDA tensors{hint}; got {', '.join(sorted(devices))}"
    return None


# Launch shapes of the row kernels (a program holds whole rows of C channels in registers).


def block_channels(c: int) -> int:
    """The power-of-two channel block that holds a row of c channels."""
    return max(16, 1 << (c - 1).bit_length())


def rows_per_program(c: int, tiles: int = 1) -> int:
    """Rows per program: a power of two, at most 16, keeping about 4K fp32 values in each
    program's ``tiles`` loaded row tiles."""
    rows = max(1, min(16, 4096 // (block_channels(c) * tiles)))
    return 1 << (rows.bit_length() - 1)


def row_warps(c: int) -> int:
    return 4 if c <= 256 else 8


def row_tile(c: int) -> dict:
    """BLOCK_C and num_warps of a row kernel launch over c channels."""
    return {"BLOCK_C": block_channels(c), "num_warps": row_warps(c)}
