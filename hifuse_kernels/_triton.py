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
