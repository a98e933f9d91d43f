"""When Triton kernels can run (on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1),
their launch shapes, and the jitted helpers several kernels share.

Importing this module never needs triton: ``triton`` is None when it is missing, and the
kernel modules define their kernels only when it is not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import NamedTuple

import torch
from torch.library import triton_op

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def define_op(name: str, *, mutates_args=()):
    """``triton_op`` for a Triton-backed op, so Inductor sees its kernels; a plain
    ``custom_op`` under the interpreter, whose kernels cannot be traced, and without triton
    (the op then exists, and its entry point says why it cannot run)."""
    define = torch.library.custom_op if interpreting() or triton is None else triton_op
    return define(name, mutates_args=mutates_args)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself under the interpreter, where
    the ops are plain custom ops that nothing traces into (torch before 2.13 refuses the
    interpreter's kernels)."""
    return kernel if interpreting() else torch.library.wrap_triton(kernel)


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot take these tensors, or None when it can."""
    if triton is None:
        return "triton is not installed (pip install triton)"
    devices = {t.device.type for t in tensors}
    if len({t.device for t in tensors}) > 1:
        return f"tensors are on several devices: {sorted(str(t.device) for t in tensors)}"
    allowed = {"cuda", "cpu"} if interpreting() else {"cuda"}
    if not devices <= allowed:
        hint = "" if interpreting() else " (set TRITON_INTERPRET=1 to run them on CPU tensors)"
        return f"Triton kernels need CUDA tensors{hint}; got {', '.join(sorted(devices))}"
    if "cpu" in devices:
        return INTERPRETER_PROBLEM
    return None


def kernel(fn=None, **options):
    """``triton.jit`` for a kernel that is launched, compiled under the name ``<op
    file>_<function>`` (``gelu_linear_fwd_kernel``): a GPU profile names each launch after its
    compiled kernel, and the op files' ``_fwd_kernel``s would share one row there. (Triton 3.6
    keys its cache without the name: a binary cached before keeps the function's name.)"""

    def jit(fn):
        name = f"{fn.__module__.rsplit('.', 1)[-1]}_{fn.__name__.lstrip('_')}"
        return triton.jit(fn, repr=lambda _specialization: name, **options)

    return jit if fn is None else jit(fn)


if triton is not None:

    @kernel
    def _loop_probe_kernel(OUT, N):
        total = 0
        for _ in range(0, N):
            total += 1
        tl.store(OUT, total)


def _interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run our kernels here, or None. The interpreter of
    triton 3.6 turns a loop bound taken from a kernel argument into a Python int in a way
    numpy 2.4 refuses ('only 0-dimensional arrays can be converted to Python scalars'); a
    one-line kernel finds out."""
    if triton is None or not interpreting():
        return None
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception as err:  # noqa: BLE001 - any failure means the kernels cannot run
        import numpy

        return (f"the Triton interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} "
                f"({type(err).__name__}: {err}); install numpy<2.4 or a newer triton")
    if out.item() != 3:
        return f"the Triton interpreter of triton {triton.__version__} runs loops wrongly here"
    return None


# Found once, at import (kernels are defined then too): compiled graphs read a constant.
INTERPRETER_PROBLEM = _interpreter_problem()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_gpu_launches = [False]


@contextlib.contextmanager
def gpu_launches():
    """Inside the block, launches that are recorded, not run (``step_ledger.py``), take the
    GPU's choices where the interpreter would make its own (``interpreter_launches``)."""
    before = _gpu_launches[0]
    _gpu_launches[0] = True
    try:
        yield
    finally:
        _gpu_launches[0] = before


def interpreter_launches() -> bool:
    """Whether launches make the interpreter's choices (its bf16/fp16 ``tl.dot`` is wrong, so
    kernels take the rounded operands to float32 first; it has no registers to spill): under
    the interpreter, but in ``gpu_launches``."""
    return interpreting() and not _gpu_launches[0]


# CUDA's launch limits: past them a launch fails on the GPU only (the interpreter has none).
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def grid(*dims: int) -> tuple[int, ...]:
    """A launch grid, refused with a clear error on every device where CUDA would refuse it."""
    for axis, (n, limit) in enumerate(zip(dims, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"launch grid {tuple(dims)} passes CUDA's limit of {limit} programs on axis "
                             f"{'xyz'[axis]}: the tensor is too large for this kernel")
    return tuple(dims)


# Launch shapes. On a GPU a program's tile is sized to stay in registers. The interpreter runs
# a program's operations one at a time in numpy, about 0.1 ms each whatever the tile size, so
# there the tiles go as wide as each kernel allows: the same kernels in far fewer programs
# (a narrow HiFuse training step at batch 2: 16 s with the GPU's tiles, 4 s with wide ones).
# Tests run both.
WIDE_VALUES = 1 << 16  # values of one loaded tile at most, with wide tiles
_wide = [interpreting()]


def wide() -> bool:
    """Whether launches take wide tiles (the default under the interpreter)."""
    return _wide[0]


@contextlib.contextmanager
def device_tiles(on: bool = True):
    """Launch with the GPU's tiles (``on``) or wide ones, inside the block; under the
    interpreter this runs the GPU's launch shapes on CPU."""
    before = _wide[0]
    _wide[0] = not on
    try:
        yield
    finally:
        _wide[0] = before


_modelled_sms = [0]


@contextlib.contextmanager
def modelled_sms(count: int):
    """Inside the block, reductions on a non-CUDA device split their rows among as many
    programs as a GPU of ``count`` SMs would take (``reduction_programs``), the compiled
    kernels' occupancy assumed from their warps: counting launches and bytes on a CPU then
    sees the GPU's partial sums."""
    before = _modelled_sms[0]
    _modelled_sms[0] = count
    try:
        yield
    finally:
        _modelled_sms[0] = before


def wide_rows(cols: int, limit: int = 1024) -> int:
    """Rows of a wide tile of ``cols`` columns: a power of two, at most ``limit``."""
    rows = max(1, min(limit, WIDE_VALUES // cols))
    return 1 << (rows.bit_length() - 1)


def reduction_programs(blocks: int, lanes: int, device: torch.device, warps: int = 16, kernel=None,
                       args: tuple = (), launch: dict | None = None, regs: int | None = None) -> int:
    """Programs along the row axis of a reduction over ``blocks`` row blocks and ``lanes``
    channel blocks, each looping over its share. On a GPU one wave: as many programs as the
    SMs hold at once (one program per block spent the time on scheduling and partials). With
    ``kernel`` given, with the ``args`` (tensors or their dtypes, ints) and ``launch``
    (constexprs, num_warps) it launches with, an SM's share comes from the compiled kernel's
    registers and shared memory (``resident_programs``); without (or where it cannot be
    compiled, as on a CPU), 2048 threads an SM of ``warps``-warp programs are assumed, or as
    many as ``regs`` registers a thread allow where the kernel is known to take that many.
    With wide tiles one block each (the interpreter pays per operation, not per program); with
    the GPU's tiles in the interpreter two, so that tests run the loops, or a GPU's share
    under ``modelled_sms``."""
    if wide():
        return blocks
    if device.type == "cuda" or _modelled_sms[0]:
        cuda = device.type == "cuda"
        per_sm = resident_programs(kernel, args, launch or {}, device) if cuda and kernel is not None else None
        if per_sm is None:
            warps = (launch or {}).get("num_warps", warps)
            per_sm = programs_per_sm(regs, 0, warps) if regs else max(1, 2048 // (32 * warps))
        sms = _sm_count(device.index) if cuda else _modelled_sms[0]
        return max(1, min(blocks, per_sm * sms // lanes))
    return min(blocks, 2)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index).multi_processor_count


# Resident programs per SM, from what a compiled kernel uses and what an SM has.


class SmLimits(NamedTuple):
    registers: int = 65536  # 32-bit registers an SM holds
    threads: int = 2048  # resident threads an SM holds
    shared: int = 233472  # bytes of shared memory an SM holds (Hopper: 228 KB)
    programs: int = 32  # resident thread blocks an SM holds
    reserved_shared: int = 1024  # bytes of shared memory CUDA keeps for each block (sm80 on)
    warp_size: int = 32


# Resident blocks an SM holds where it is not 32 (CUDA's occupancy tables; torch does not say).
_BLOCKS_PER_SM = {(7, 5): 16, (8, 6): 16, (8, 7): 16, (8, 9): 24, (12, 0): 24}
REGISTER_UNIT = 256  # registers are given to each warp in units of 256


def programs_per_sm(regs: int, shared: int, warps: int, limits: SmLimits = SmLimits()) -> int:
    """Programs of ``warps`` warps, each thread using ``regs`` registers and each program
    ``shared`` bytes of shared memory, that one SM holds at once (at least 1): the least of
    what its registers, threads, shared memory and block slots allow."""
    threads = warps * limits.warp_size
    per_warp = -(-max(regs, 1) * limits.warp_size // REGISTER_UNIT) * REGISTER_UNIT
    per_program = shared + limits.reserved_shared
    fits = [limits.threads // threads, limits.registers // (per_warp * warps), limits.programs,
            limits.shared // per_program if per_program else limits.programs]
    return max(1, min(fits))


@functools.lru_cache(maxsize=None)
def sm_limits(index: int) -> SmLimits:
    """What an SM of CUDA device ``index`` holds, as torch reports it (defaults where an older
    torch does not)."""
    props = torch.cuda.get_device_properties(index)
    default = SmLimits()
    return SmLimits(
        registers=getattr(props, "regs_per_multiprocessor", default.registers),
        threads=getattr(props, "max_threads_per_multi_processor", default.threads),
        shared=getattr(props, "shared_memory_per_multiprocessor", default.shared),
        programs=_BLOCKS_PER_SM.get((props.major, props.minor), default.programs),
        reserved_shared=default.reserved_shared if props.major >= 8 else 0,
        warp_size=getattr(props, "warp_size", default.warp_size),
    )


def kernel_resources(compiled) -> tuple[int, int, int]:
    """(registers per thread, shared bytes, warps) of a compiled kernel, as
    ``JITFunction.warmup`` returns it (triton 3.x loads the binary, which reports the
    registers, on first use)."""
    if getattr(compiled, "n_regs", None) is None:
        compiled._init_handles()
    return int(compiled.n_regs), int(compiled.metadata.shared), int(compiled.metadata.num_warps)


def _arg_kind(arg):
    """What of a launch argument decides the compiled variant, for the cache key."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    return arg if arg is None or isinstance(arg, torch.dtype) else type(arg).__name__


def _warmup_arg(arg):
    # warmup takes dtypes for tensors (it never reads them); a symbolic size (torch.compile's
    # tracing) compiles the variant of a plain one
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    return 2 if isinstance(arg, torch.SymInt) else arg


def _keyword_warmup_arg(arg):
    if isinstance(arg, torch.Tensor):
        arg = arg.dtype
    if isinstance(arg, torch.dtype):
        from triton.runtime.jit import MockTensor

        return MockTensor(arg)
    return arg


_resident: dict[tuple, int | None] = {}


def resident_programs(kernel, args: tuple, launch: dict, device: torch.device) -> int | None:
    """Programs of ``kernel``, launched with ``args`` and ``launch``, that one SM of ``device``
    holds at once, from its compiled registers and shared memory; None where that cannot be
    known (the interpreter, a compile that fails: warned once). Compiles the kernel (as its
    launch would) the first time, then cached per kernel, argument dtypes, launch and device."""
    if triton is None or interpreting() or device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index
    key = (kernel, tuple(_arg_kind(a) for a in args), tuple(sorted(launch.items())), index)
    if key not in _resident:
        try:
            with torch.cuda.device(index):
                # triton wraps the dtypes given for positional tensors, not keyword ones
                kwargs = {k: _keyword_warmup_arg(v) for k, v in launch.items()}
                compiled = kernel.warmup(*map(_warmup_arg, args), grid=(1,), **kwargs)
                regs, shared, warps = kernel_resources(compiled)
            _resident[key] = programs_per_sm(regs, shared, warps, sm_limits(index))
        except Exception as err:  # noqa: BLE001 - the count falls back to the assumed one
            warnings.warn(f"hifuse_kernels: cannot read the registers of {getattr(kernel, '__name__', kernel)} "
                          f"({type(err).__name__}: {err}); assuming 2048 threads an SM", RuntimeWarning, stacklevel=3)
            _resident[key] = None
    return _resident[key]


# Launch shapes of the row kernels (a program holds whole rows of C channels in registers).


def block_channels(c: int) -> int:
    """The power-of-two channel block that holds a row of c channels."""
    return max(16, next_power_of_2(c))


def rows_per_program(c: int, tiles: int = 1) -> int:
    """Rows per program: a power of two, at most 16, keeping about 4K fp32 values in each
    program's ``tiles`` loaded row tiles (with wide tiles, up to 1024 rows)."""
    if wide():
        return wide_rows(block_channels(c) * tiles)
    rows = max(1, min(16, 4096 // (block_channels(c) * tiles)))
    return 1 << (rows.bit_length() - 1)


def row_warps(c: int, rows: int) -> int:
    # about 4 values of each loaded (rows x block) tile per thread: the backward kernels hold
    # several tiles, and 8 per thread already spills in places
    return max(4, min(16, rows * block_channels(c) // 128))


def row_tile(c: int, rows: int) -> dict:
    """BLOCK_C and num_warps of a row kernel launch over c channels, ``rows`` rows per program."""
    return {"BLOCK_C": block_channels(c), "num_warps": row_warps(c, rows)}


# Columns after the C of rows written with a ones column (``ones_column``): 8 keep a bf16/fp16
# row 16-byte aligned for the GEMM that reads them.
ONES_PAD = 8


if triton is not None:

    @triton.jit
    def image_block(S, BLOCK: tl.constexpr):
        """(image n, as int64; its positions s) of this program, on a one-axis grid of N x
        position blocks: a second axis would cap an image at 65535 blocks on the GPU."""
        blocks = tl.cdiv(S, BLOCK)
        n = (tl.program_id(0) // blocks).to(tl.int64)
        return n, tl.program_id(0) % blocks * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def gelu(y):
        """Exact (erf) GELU of fp32 y."""
        return 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))

    # A value that two kernels must compute alike (a normalisation's output in a forward and in
    # a backward's rebuild, a BatchNorm applied by its own pass and on load by its reader) has
    # its multiply-adds spelt as tl.fma: a GPU compiler fuses a * b + c only within one basic
    # block, so a kernel that forms it after a branch would round otherwise. (The interpreter
    # rounds twice either way.)

    @triton.jit
    def gelu_add(y, r):
        """gelu(y) + r, its last multiply and the add one explicit fused multiply-add: a GPU
        compiler fuses them only where both sit in one basic block, so kernels that get r
        after a branch would round otherwise than those that load it."""
        return tl.fma(0.5 * y, 1.0 + tl.math.erf(y * 0.7071067811865476), r)

    @triton.jit
    def centred(v, gate, mean):
        """v * gate - mean as one fused multiply-add, as a GPU compiler fuses it where both sit
        in one basic block: spelt out, so that a kernel that computes the product in a branch
        (``batch_norm_act._gated_residual``) rounds as norm3's kernel does."""
        return tl.fma(v, gate, -mean)

    @triton.jit
    def gelu_grad(y):
        """d gelu(y) / dy for fp32 y."""
        cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
        return cdf + y * tl.exp(-0.5 * y * y) * 0.3989422804014327

    @triton.jit
    def ones_column(at, C, rmask, PAD: tl.constexpr):
        """Columns C .. C + PAD of the rows at ``at`` (row starts, rows masked by ``rmask``):
        ones, then zeros, so that a weight-gradient GEMM over the rows also gives the bias
        gradient (colsum of the output gradient) in its column C."""
        j = tl.arange(0, PAD)
        ones = tl.where(rmask[:, None] & (j[None, :] == 0), 1.0, 0.0).to(at.dtype.element_ty)
        tl.store(at + C + j[None, :], ones, mask=rmask[:, None])

    @triton.jit
    def three_part_norm_grads(ga, gb, gc, ha, hb, hc, rstd, total):
        """Input gradients of a LayerNorm over rows held as three parts: each part's w * dy
        (g) and normalised values (h), zero outside the row, and the rows' 1/std; ``total`` the
        row's length."""
        mg = (tl.sum(ga, 1) + tl.sum(gb, 1) + tl.sum(gc, 1)) / total
        mgh = (tl.sum(ga * ha, 1) + tl.sum(gb * hb, 1) + tl.sum(gc * hc, 1)) / total
        r = rstd[:, None]
        return (r * (ga - mg[:, None] - ha * mgh[:, None]), r * (gb - mg[:, None] - hb * mgh[:, None]),
                r * (gc - mg[:, None] - hc * mgh[:, None]))
