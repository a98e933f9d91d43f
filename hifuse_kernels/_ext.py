"""Loading the compiled native ops (hifuse_kernels/_C*.so), with reasons when they are missing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

BUILD_HINT = (
    "build it from the project folder with `pip install .` (or `pip install --no-build-isolation -e .` "
    "for development; a CUDA toolkit is needed for the CUDA ops: set CUDA_HOME to it)"
)


def library_path() -> Path | None:
    found = sorted(Path(__file__).parent.glob("_C*.so"))
    return found[0] if found else None


def built_for() -> str | None:
    """The torch version the library was built against (None when unknown)."""
    info = Path(__file__).with_name("_C.build.json")
    try:
        return json.loads(info.read_text())["torch"]
    except (OSError, ValueError, KeyError):
        return None


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    path = library_path()
    if path is None:
        return f"the compiled hifuse extension (hifuse_kernels/_C*.so) is missing; {BUILD_HINT}"
    built = built_for()
    if built is not None and built != torch.__version__:
        # loading it could crash the process: torch's C++ ABI changes between releases
        return (
            f"the compiled hifuse extension was built against torch {built}, but this is torch "
            f"{torch.__version__}; rebuild it for this torch: {BUILD_HINT}"
        )
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as err:
        return f"the compiled hifuse extension {path.name} does not load ({err}); rebuild it: {BUILD_HINT}"
    return None


@torch.compiler.assume_constant_result
def load_error() -> str | None:
    """None when the native library is loaded, else why it is not (fixed for the process)."""
    return _load()


def available() -> bool:
    return load_error() is None


def require(op: str) -> None:
    """Raise ImportError naming what is missing when native op ``op`` cannot be used."""
    error = load_error()
    if error is not None:
        raise ImportError(f"hifuse::{op} is a native op: {error}")


def has_kernel(op: str, device_type: str) -> bool:
    """Whether native op hifuse::op has an implementation for device_type ('cpu', 'cuda')."""
    if not available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"hifuse::{op}", key)


@torch.compiler.assume_constant_result
def unsupported_device_reason(op: str, device_type: str) -> str | None:
    """Why hifuse::op cannot run on device_type ('cpu', 'cuda'), or None when it can.

    Fixed for the life of the process, so torch.compile takes it as a constant.
    """
    error = load_error()
    if error is not None:
        return error
    if not has_kernel(op, device_type):
        return f"hifuse::{op} has no {device_type} implementation in this build"
    return None


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the native LayerNorms' saved statistics: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_flops(*_args, **_kwargs) -> int:
    # FlopCounterMode counts only matrix products and convolutions; eager's norms, gathers
    # and elementwise work count zero, and so do the native ops that replace them.
    return 0


def register_python_parts(op: str, fake, fake_backward, backward, setup_context) -> None:
    """Fake kernels, autograd and a zero FLOP formula for hifuse::op and hifuse::op_backward,
    whose schemas and kernels the compiled library defines. No-op when it is not loaded."""
    if not available():
        return
    from torch.utils.flop_counter import register_flop_formula

    torch.library.register_fake(f"hifuse::{op}")(fake)
    torch.library.register_fake(f"hifuse::{op}_backward")(fake_backward)
    torch.library.register_autograd(f"hifuse::{op}", backward, setup_context=setup_context)
    register_flop_formula([getattr(torch.ops.hifuse, op), getattr(torch.ops.hifuse, f"{op}_backward")])(_no_flops)
