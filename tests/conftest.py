import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Set before any
# kernel is defined: triton reads it when a kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist the workers share the cores: each takes its share of torch's threads
# (and passes it to the processes its tests start), instead of all of them each.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _threads = max(1, (os.cpu_count() or 1) // _workers)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

sys.path.insert(0, str(Path(__file__).parent))


def _round_bf16_to_nearest() -> None:
    """The Triton interpreter casts float32 to bfloat16 by dropping the low bits, where the
    GPU rounds to nearest even (``cvt.rn.bf16.f32``): without this, every bfloat16 result of
    a kernel tested on a CPU carries up to twice the GPU's rounding error."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    convert = interpreter._convert_float

    def round_to_nearest(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode is None:
            values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32)).to(torch.bfloat16)
            return values.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(input))
        return convert(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = round_to_nearest


def _patch_language_once_per_launch() -> None:
    """The interpreter patches triton.language again on every call of a ``@triton.jit`` helper
    inside a kernel, though the launch running it has patched the same modules already: a fifth
    of a fused training step's time in the interpreter. Here a helper whose modules the running
    launch has patched is called without patching them again. Speed only: the same code runs on
    the same patched modules (a fused step of the convergence tests' model gives the same bits)."""
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter

        launch = interpreter.GridExecutor.__call__
        call = interpreter.InterpretedFunction.__call__
        error = interpreter.InterpreterError
    except (ImportError, AttributeError):
        return
    running: list[set] = []  # the lang modules each launch in progress has patched
    langs: dict = {}

    def lang_modules(fn) -> frozenset:
        if fn not in langs:
            langs[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                  if inspect.ismodule(v) and v in (tl, tl.core))
        return langs[fn]

    def launch_patching_once(self, *args, **kwargs):
        running.append(set(lang_modules(self.fn)))
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    def call_patching_once(self, *args, **kwargs):
        if not running:
            return call(self, *args, **kwargs)
        if not lang_modules(self.fn) <= running[-1]:
            # a helper of triton.language itself (tl.sum) reads triton.language.core: patched
            # now, and left patched, as the interpreter leaves a helper's patches
            running[-1] |= lang_modules(self.fn)
            return call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise error(repr(e)) from e

    interpreter.GridExecutor.__call__ = launch_patching_once
    interpreter.InterpretedFunction.__call__ = call_patching_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest()
    _patch_language_once_per_launch()

from hifuse import config  # noqa: E402


@pytest.fixture(autouse=True)
def eager_by_default(monkeypatch):
    """Every test starts eager, rebuilding everything, with no environment override, and
    leaves it that way."""
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    monkeypatch.delenv(config.REBUILD_VAR, raising=False)
    config.set_parts(config.FusedParts())
    config.use_rebuilds()
    yield
    config.set_parts(config.FusedParts())
    config.use_rebuilds()


@pytest.fixture(params=["device", "wide"])
def tiles(request):
    """Runs a test with the GPU's launch tiles and, where the kernels run in the interpreter,
    with its wide ones (``_triton.wide``), which the other tests there take."""
    from hifuse_kernels import _triton

    if request.param == "wide" and not _triton.interpreting():
        pytest.skip("wide tiles are the interpreter's")
    with _triton.device_tiles(request.param == "device"):
        yield request.param


@pytest.fixture
def device_tiles():
    """The GPU's launch tiles, in the interpreter too (for tests of their loops)."""
    from hifuse_kernels import _triton

    with _triton.device_tiles():
        yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fused and eager paths may reach different libraries (a 1x1 convolution as a cuBLAS GEMM
# instead of cuDNN): TF32 in one of them would show as differences of 1e-3. Tests compare
# in true fp32; the benchmarks keep PyTorch's defaults.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_report_header(config):
    from hifuse_kernels import _triton

    problem = _triton.INTERPRETER_PROBLEM
    return f"hifuse: the Triton kernels cannot run: {problem}" if problem else None
