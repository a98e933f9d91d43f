"""Launches and bytes of PyTorch code, counted from what it launches; and the bytes an op must move.

Shared by the op benchmarks (each op's ``bytes_moved`` against its ``bytes_min``) and
``scripts/step_ledger.py`` (a whole training step). The code runs once with:
- every Triton launch of the hifuse ops (``hifuse_kernels._triton.wrap_triton``) replaced by a
  record of the kernel and its tensor arguments, not run: their outputs hold garbage, which
  code without host syncs does not mind, and on a CPU the fused ops take any size;
- a dispatch mode recording every aten op below autograd and autocast, the hifuse Triton ops'
  own Python implementations run under it so the ops inside them are seen too (composite ops
  there, as ``contiguous`` or ``to``, in their pieces, so the copies they make count); a
  native hifuse op is one kernel.

Counted:
- launches: one per Triton launch, per native hifuse op call, and per aten op that writes
  memory (views, ``empty`` and other allocations, and ops on empty tensors, launch nothing).
  Some aten ops launch more than one kernel on a GPU (a convolution's backward, a large
  reduction): a floor for those;
- bytes: for a Triton kernel every tensor argument once, whole (an upper bound where a kernel
  reads part of one); for an op its tensor inputs and outputs once each (an in-place op reads
  and writes its tensor);
- tile traffic: for the Triton kernels whose module has a ``tile_traffic(kernel, args)``
  (the GEMMs, whose programs load shared tiles again), the bytes its programs move between L2
  and the SMs (``Ledger.tile_bytes``); every other kernel loads each element about once;
- kinds: ``triton`` and ``native`` (the fused kernels), ``gemm`` (cuBLAS and cuDNN: matrix
  products and convolutions), ``optimizer`` and ``glue`` (copies, casts, fills, elementwise
  ops and reductions around them; ``cast`` is the part of it that changes a dtype).

``minimum`` is what an op must move at its shapes whatever its kernels: each input read once,
each output written once (with backward, each output gradient read once and each input
gradient written once), in the dtypes given; what forward keeps for backward, and passes that
rebuild it, are moved, never minimum.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from hifuse_kernels import _triton, reference

KINDS = ("triton", "native", "gemm", "optimizer", "glue")
GEMM_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "convolution", "convolution_backward", "_convolution",
            "cudnn_convolution", "mkldnn_convolution", "_scaled_mm", "addbmm"}
NO_LAUNCH_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                 "lift_fresh", "set_", "resize_", "_reshape_alias", "_unsafe_view", "view", "as_strided",
                 "is_same_size", "_has_compatible_shallow_copy_type", "sym_size", "sym_stride", "sym_numel",
                 "sym_storage_offset", "size", "stride", "dim", "is_contiguous", "_local_scalar_dense",
                 # in-place views (a vector-matrix product squeezes its result): metadata only
                 "squeeze_", "unsqueeze_", "t_", "transpose_", "as_strided_"}


@dataclass
class Ledger:
    launches: collections.Counter = field(default_factory=collections.Counter)  # (kind, where) -> launches
    bytes: collections.Counter = field(default_factory=collections.Counter)  # (kind, where) -> bytes
    names: collections.Counter = field(default_factory=collections.Counter)  # (kind, name) -> launches
    name_bytes: collections.Counter = field(default_factory=collections.Counter)  # (kind, name) -> bytes
    casts: list = field(default_factory=lambda: [0, 0])  # launches, bytes
    # name -> bytes between L2 and the SMs, for the kernels whose module models it
    tile_bytes: collections.Counter = field(default_factory=collections.Counter)
    hifuse_ops: int = 0
    aten_ops: int = 0  # aten calls at dispatch, launching or not (host work)

    def add(self, kind: str, where: str, name: str, nbytes: int, launches: int = 1) -> None:
        self.launches[kind, where] += launches
        self.bytes[kind, where] += nbytes
        self.names[kind, name] += launches
        self.name_bytes[kind, name] += nbytes

    def total(self, what: str, kind: str | None = None, where: str | None = None) -> int:
        """Launches, bytes or (``tile_bytes``, of all kinds and places) tile traffic."""
        if what == "tile_bytes":
            return sum(self.tile_bytes.values())
        counter = self.launches if what == "launches" else self.bytes
        return sum(v for (k, w), v in counter.items() if (kind is None or k == kind) and (where is None or w == where))


def tensors(values) -> list[torch.Tensor]:
    """The tensors in values, lists, tuples and dicts' values opened (a launch's keyword
    arguments too)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, dict):
            out.extend(tensors(v.values()))
        elif isinstance(v, (list, tuple, type({}.values()))):
            out.extend(tensors(v))
    return out


def nbytes(ts) -> int:
    """Bytes of these tensors, each once (the same tensor passed twice counts once)."""
    seen, total = set(), 0
    for t in ts:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _nowhere() -> str:
    return "op"


class CountOps(TorchDispatchMode):
    """Records every aten op below autograd and autocast into ``ledger``, charged to
    ``where()``; hifuse ops' Python implementations run with this mode on, so the ops inside
    them are seen too."""

    def __init__(self, ledger: Ledger, where=_nowhere) -> None:
        super().__init__()
        self.ledger, self.where = ledger, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "hifuse":
            self.ledger.hifuse_ops += 1
            opdef = OPDEFS.get(f"hifuse::{name}")
            if opdef is not None:  # a Triton op: run its implementation here, counted
                with self:
                    return opdef._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)  # a native op: one kernel
            self.ledger.add("native", self.where(), name, nbytes(tensors([args, kwargs, out])))
            return out
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # reached only inside a hifuse op (below autograd, composite ops come here whole):
            # run its pieces under the mode, or a copy in ``contiguous`` or ``to`` goes unseen
            with self:
                return func.decompose(*args, **kwargs)
        self.ledger.aten_ops += 1
        out = func(*args, **kwargs)
        if name in NO_LAUNCH_OPS or _is_view(func) or not (tensors([out]) or func._schema.is_mutable):
            return out
        moved = nbytes(tensors([args, kwargs])) + nbytes(tensors([out]))
        if moved == 0:  # no element: ATen launches nothing (a zero gradient of an empty output)
            return out
        if name == "_foreach_copy_":  # the batched weight casts: glue, in multi-tensor launches
            kind, launches = "glue", multi_tensor_launches(args[0])
            cast = any(d.dtype != s.dtype for d, s in zip(args[0], args[1]))
        else:
            kind = ("gemm" if name in GEMM_OPS else "optimizer" if "adam" in name or name.startswith("_foreach")
                    else "glue")
            launches, cast = 1, name in ("_to_copy", "copy_") and _changes_dtype(args, out)
        self.ledger.add(kind, self.where(), name, moved, launches)
        if cast:
            self.ledger.casts[0] += launches
            self.ledger.casts[1] += moved
        return out


def multi_tensor_launches(tensors, depth: int = 2) -> int:
    """Kernels ATen's multi-tensor apply launches over these tensors (``depth`` lists): one
    each time a launch's tensor slots or blocks of 65536 elements fill up (110/64/48/36/30
    tensors for 1-5 lists, 320 blocks), as in ``MultiTensorApply.cuh``."""
    max_tensors, max_blocks, chunk = (110, 64, 48, 36, 30)[depth - 1], 320, 65536
    launches = slots = blocks = 0
    for t in tensors:
        n = t.numel()
        if n == 0:
            continue
        slots += 1
        chunks = -(-n // chunk)
        for c in range(chunks):
            blocks += 1
            last = c == chunks - 1
            if blocks == max_blocks or (last and slots == max_tensors):
                launches += 1
                blocks = 0
                slots = 0 if last else 1  # a tensor cut mid-way starts the next launch
    return launches + (1 if blocks else 0)


def _is_view(func) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _changes_dtype(args, out) -> bool:
    src = tensors([args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]])
    dst = tensors([out])
    return bool(src and dst and src[0].dtype != dst[0].dtype)


class RecordLaunches:
    """Stands for ``wrap_triton(kernel)``: ``[grid](...)`` records the launch into ``ledger``,
    charged to ``where()``, and runs nothing; ``on_launch(kernel, args, kwargs)``, if given,
    sees each launch too."""

    def __init__(self, ledger: Ledger, where=_nowhere, on_launch=None) -> None:
        self.ledger, self.where, self.on_launch = ledger, where, on_launch

    def __call__(self, kernel):
        name = getattr(kernel, "__name__", repr(kernel))
        module = getattr(getattr(kernel, "fn", None), "__module__", "") or ""
        label = f"{module.rsplit('.', 1)[-1]}.{name}" if module else name

        class Launch:
            def __getitem__(_self, grid):
                def launch(*args, **kwargs) -> None:
                    self.ledger.add("triton", self.where(), label, nbytes(tensors([args, kwargs.values()])))
                    model = getattr(sys.modules.get(module), "tile_traffic", None)
                    if model is not None:
                        self.ledger.tile_bytes[label] += model(name, {**dict(zip(kernel.arg_names, args)), **kwargs})
                    if self.on_launch is not None:
                        self.on_launch(kernel, args, kwargs)

                return launch

        return Launch()


@contextlib.contextmanager
def launches_recorded(ledger: Ledger, where=_nowhere, on_launch=None):
    """Inside the block, Triton launches are recorded into ``ledger``, not run; the kernels'
    process-wide caches (shift masks, index tables) are read as in a real run, though they stay
    off under a dispatch mode (which is how FakeTensor tracing reaches them)."""
    wrap, tracing = _triton.wrap_triton, reference._tracing
    _triton.wrap_triton = RecordLaunches(ledger, where, on_launch)
    reference._tracing = torch.compiler.is_compiling
    try:
        yield ledger
    finally:
        _triton.wrap_triton, reference._tracing = wrap, tracing


@contextlib.contextmanager
def counted(ledger: Ledger, where=_nowhere, on_launch=None):
    """Inside the block, every launch is recorded into ``ledger``; Triton ones are not run
    (``on_launch``: as ``RecordLaunches``)."""
    with launches_recorded(ledger, where, on_launch), CountOps(ledger, where):
        yield ledger


# ops CUDA's autocast runs in float32 where CPU's leaves them in bf16 (LayerNorm, softmax,
# log-softmax, sum, exp, rsqrt, pow on bf16 inputs): laid over CPU autocast to count on a CPU
# what a GPU would run
_CUDA_FP32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
              torch.Tensor.softmax, torch.Tensor.log_softmax, torch.layer_norm, torch.exp, torch.Tensor.exp,
              torch.rsqrt, torch.Tensor.rsqrt, torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.sum,
              torch.Tensor.sum, torch.logsumexp, torch.Tensor.logsumexp, F.nll_loss}


def _mm_out_dtype(a, b, out_dtype):
    return (a @ b).to(out_dtype)


def _addmm_out_dtype_into(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
    return out.copy_(beta * acc + alpha * (a.to(out_dtype) @ b.to(out_dtype)))


class CudaFloat32Ops(TorchFunctionMode):
    """Under CPU autocast, runs in float32 the ops that CUDA's autocast runs in float32; and
    the fused code takes its CUDA paths on the CPU (``reference.CUDA_LIKE_DEVICES``): a GEMM
    of bf16 operands writing float32 is one ``mm``, and one adding into a float32 tensor one
    ``addmm`` (given CPU kernels here), as on a GPU."""

    def __enter__(self):
        self._had_cpu = "cpu" in reference.CUDA_LIKE_DEVICES
        reference.CUDA_LIKE_DEVICES.add("cpu")
        self._lib = torch.library.Library("aten", "IMPL")
        if hasattr(torch.ops.aten.mm, "dtype"):
            self._lib.impl("mm.dtype", _mm_out_dtype, "CPU")
        if hasattr(torch.ops.aten.addmm, "dtype_out"):
            self._lib.impl("addmm.dtype_out", _addmm_out_dtype_into, "CPU")
        return super().__enter__()

    def __exit__(self, *exc):
        if not self._had_cpu:
            reference.CUDA_LIKE_DEVICES.discard("cpu")
        self._lib._destroy()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            def up(v):
                if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16):
                    return v.float()
                return v
            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def count(fn, warm_up: bool = False, as_gpu: bool = False):
    """(ledger, fn's result) of one call of ``fn`` with every launch counted.

    ``warm_up`` first calls it once uncounted, its Triton launches recorded and not run (lazy
    state, caches). ``as_gpu`` counts on a CPU what a GPU would launch: the GPU's launch tiles
    and CUDA autocast's float32 ops."""
    gpu = contextlib.ExitStack()
    if as_gpu:
        gpu.enter_context(_triton.device_tiles(True))
        gpu.enter_context(CudaFloat32Ops())
    with gpu:
        if warm_up:
            with launches_recorded(Ledger()):
                fn()
        ledger = Ledger()
        with counted(ledger):
            result = fn()
    return ledger, result


def size(ts) -> int:
    """Bytes of these tensors, every one counted."""
    return sum(t.numel() * t.element_size() for t in ts)


def minimum(reads, outputs, updated=(), output_grads=None, input_grads=()) -> int:
    """Bytes an op must move at these shapes and dtypes: each of ``reads`` read once, each of
    ``outputs`` written once, each of ``updated`` (buffers updated in place, as BatchNorm's
    running statistics) read and written once. With backward (``output_grads`` given: the
    gradients it starts from, in the outputs' dtypes), also each of them read once and the
    gradient of each of ``reads`` that requires grad written once, in its dtype, but for an
    input gradient that is an output gradient itself (a residual add passes it through:
    ``input_grads``, those backward returned, tell)."""
    total = size(reads) + size(outputs) + 2 * size(updated)
    if output_grads is not None:
        incoming = {g.data_ptr() for g in output_grads}
        passed = [g for g in input_grads if g is not None and g.data_ptr() in incoming]
        total += size(output_grads) + size(t for t in reads if t.requires_grad) - size(passed)
    return total
