"""Tune the Triton kernels' launch configurations on this device and write them to the table.

For every launch that reads the table (``hifuse_kernels._configs``) at the shapes of a
HiFuse-Tiny training step (bf16 autocast, batch 128, 224 x 224 by default), this enumerates
candidate configurations (tiles, warps, stages; for ``gelu_linear``, also whether its Triton
kernels, with the backward in one pass or two, or a GELU pass and torch's GEMMs compute it),
compiles them in parallel over the machine's cores, times each with CUDA events (median of a
few), checks that each gives the default's results (within float tolerance where it reduces
in another order), and writes the winners into the table for this device (name, compute
capability, SM count). A candidate
must beat the default by --min-gain to be written; where none does, the class gets no entry
and keeps the default. The whole run keeps to --budget-s: compiles get most of it, and
candidates not compiled in time are not timed.

    python scripts/sweep_configs.py [--batch 128] [--image-size 224] [--dtype bf16]
                                    [--budget-s 300] [--jobs N] [--out hifuse_kernels/configs.json]

Without a GPU it runs the same steps under the Triton interpreter (nothing to compile; the
timings say nothing about a GPU) and needs --out: ``--smoke`` takes tiny shapes and two
candidates a class, as the tests run it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined

import triton  # noqa: E402

import hifuse  # noqa: E402
from hifuse_kernels import _configs, _triton  # noqa: E402
from hifuse_kernels import batch_norm_act as bna  # noqa: E402
from hifuse_kernels import window_attention as wa  # noqa: E402

# Candidate values of each tunable, per launch; num_stages only where a kernel loops.
SPACES = {
    "window_attention.forward": dict(BM=(16, 32, 64), num_warps=(2, 4, 8), num_stages=(1, 2, 3)),
    "window_attention.backward": dict(BM=(16, 32, 64), BK=(16, 32, 64), num_warps=(4, 8),
                                      programs=(512, 1024, 2048, 4096), num_stages=(1, 2)),
    "batch_norm_act.stats": dict(BLOCK_M=(32, 64, 128), BLOCK_C=(32, 64, 128), num_warps=(4, 8, 16),
                                 num_stages=(1, 2, 3)),
    "batch_norm_act.apply": dict(BLOCK_M=(32, 64, 128), BLOCK_C=(32, 64, 128), num_warps=(4, 8, 16)),
    "batch_norm_act.apply_pool": dict(BLOCK_M=(8, 16, 32, 64), BLOCK_C=(32, 64, 128), num_warps=(4, 8, 16)),
    "batch_norm_act.backward": dict(BLOCK_M=(16, 32, 64), BLOCK_C=(32, 64, 128), num_warps=(4, 8, 16),
                                    num_stages=(1, 2, 3)),
    "gelu_residual.forward": dict(BLOCK=(512, 1024, 2048, 4096), num_warps=(2, 4, 8)),
    "gelu_residual.backward": dict(BLOCK=(512, 1024, 2048, 4096), num_warps=(2, 4, 8)),
    "channel_pool.forward": dict(BLOCK_S=(16, 32, 64), BLOCK_C=(32, 64, 128), chunks=(4, 8, 16),
                                 num_warps=(2, 4, 8)),
    "channel_pool.backward": dict(BLOCK_S=(16, 32, 64), BLOCK_C=(32, 64, 128), num_warps=(2, 4, 8)),
    "spatial_pool.forward": dict(BLOCK_P=(1, 2, 4, 8, 16, 32), num_warps=(2, 4, 8, 16)),
    "spatial_pool.backward": dict(BLOCK_P=(1, 2, 4, 8, 16, 32), num_warps=(2, 4, 8, 16)),
    "gelu_linear.forward": dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128), BLOCK_K=(32, 64), num_warps=(4, 8),
                                num_stages=(2, 3, 4)),
    "gelu_linear.input": dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64), BLOCK_K=(32, 64, 128), num_warps=(4, 8, 16),
                              num_stages=(2, 3)),
    # BLOCK_N: the one valid value, the power of two covering N (one pass keeps every column)
    "gelu_linear.backward": dict(BLOCK_M=(16, 32, 64, 128), BLOCK_N=(128, 256, 512, 1024), BLOCK_K=(16, 32, 64),
                                 num_warps=(4, 8), num_stages=(2, 3, 4)),
    "gelu_linear.weight": dict(BLOCK_M=(32, 64, 128), BLOCK_N=(32, 64, 128), BLOCK_K=(32, 64, 128), num_warps=(4, 8),
                               num_stages=(2, 3)),
    # how gelu_linear computes: 1, its Triton kernels; 2, a GELU pass and torch's GEMMs (cuBLAS);
    # 3, its Triton kernels with the backward in one pass past 256 columns
    "gelu_linear.route": dict(gemm=(1, 2, 3)),
    "dwconv_layer_norm.forward": dict(BLOCK_P=(1, 2, 4, 8, 16), num_warps=(4, 8, 16)),
    # 2 warps: two values a thread at 128 channels (72 registers, and more programs an SM)
    "dwconv_layer_norm.backward": dict(BLOCK_P=(1, 2, 4, 8), num_warps=(2, 4, 8, 16), band=(1, 2, 4, 7, 14, 28)),
}
# Candidate keys that are not tiles: the smoke run picks its second candidate by tile size.
NOT_TILES = {"num_warps", "num_stages", "programs", "chunks", "band", "gemm"}
# Choices of how an op computes rather than how a kernel launches: timed after the op's
# launches, with their winners for the same shape class; where another way than the default
# wins, those winners are not written (no launch reads them).
ROUTES = {"gelu_linear.route"}


def route_contexts(kernels) -> list[dict]:
    """Each route among ``kernels`` (those a call consulted) forced to each of its other ways:
    a dry run under each finds the launches that only that way makes (the first value in
    ``SPACES`` is the default)."""
    return [{route: {key: value}} for route in sorted(ROUTES & set(kernels)) for key, values in SPACES[route].items()
            for value in values[1:]]


# --------------------------------------------------------------------------- the shapes


def stages(image_size: int) -> list[dict]:
    """Per stage of HiFuse-Tiny: channels, resolution, heads, window and the shifts of its
    global blocks."""
    model = hifuse.create_model("hifuse_tiny")
    out, r = [], image_size // 4
    for i, stage in enumerate(model.global_stages):
        blocks = list(stage.blocks)
        out.append(dict(c=model.dims[i], r=r, heads=blocks[0].num_heads, window=blocks[0].window,
                        shifts=tuple(sorted({b.shift for b in blocks})), first=i == 0))
        r = (r + 1) // 2
    return out


def cases(args, device: torch.device) -> list[tuple[str, callable]]:
    """(label, setup) of each op call of a training step's kernels; ``setup()`` makes the
    inputs and returns the calls (zero-argument functions returning the op's outputs)."""
    act = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    f32 = torch.float32
    b = args.batch

    def randn(*shape, dtype=f32, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    def attention(st):
        c, r, heads, window = st["c"], st["r"], st["heads"], st["window"]
        qkv, bias = randn(b, r, r, 3 * c, dtype=act), randn(3 * c, dtype=act, scale=0.1)
        table = randn((2 * window - 1) ** 2, heads, scale=0.5)
        dense = wa._dense_bias(table, window, act)
        tokens = wa._token_slots(window, wa._window_slots(window, act), device)
        calls = []
        for shift in st["shifts"]:
            def fwd(s=shift):
                out, lse = torch.ops.hifuse.window_attention(qkv, bias, table, dense, heads, window, s)
                return out, lse[..., tokens]  # the padding slots' entries are never written

            out, lse = torch.ops.hifuse.window_attention(qkv, bias, table, dense, heads, window, shift)
            grad = torch.randn_like(out)
            calls.append(fwd)
            calls.append(lambda s=shift, out=out, lse=lse, grad=grad: torch.ops.hifuse.window_attention_backward(
                grad, qkv, bias, table, dense, out, lse, heads, window, s))
        return calls

    def batch_norm(m, c, residual=False, pool_hw=None, act_code=0):
        def setup():
            y = randn(m, c, dtype=act)
            r = randn(m, c) if residual else None
            w, bias = randn(c, scale=0.1) + 1, randn(c, scale=0.1)
            h = w_ = pool_hw or 1
            stats = lambda: torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, None, None, None, 0.0)  # noqa: E731
            mean, invstd, _var = stats()
            out_dtype = act if residual else None
            apply = lambda: torch.ops.hifuse.batch_norm_act(  # noqa: E731
                y, r, mean, invstd, w, bias, act_code, h, w_, pool_hw is not None, out_dtype)
            grad = torch.randn_like(apply())
            backward = lambda: torch.ops.hifuse.batch_norm_act_backward(  # noqa: E731
                grad, y, r, mean, invstd, w, bias, act_code, h, w_, pool_hw is not None)
            return [stats, apply, backward]
        return setup

    def batch_norm_gated(st):
        # the IRMLP's bn1 in the fused model: gelu(y) + r over 3C channels, r norm3's result
        # computed on load from its sources (g and l float32 at the first block, as the model
        # hands them; x the W/W3 GEMM's output with its BatchNorm applied on load)
        def setup():
            n, s, cp = b, st["r"] ** 2, st["c"]
            src = f32 if st["first"] else act
            parts = [randn(n, s, cp, dtype=src), randn(n, cp).sigmoid(), randn(n, s, cp, dtype=src),
                     randn(n, s).sigmoid().to(act), randn(n, s, cp, dtype=act), randn(n, s, scale=0.1),
                     randn(n, s, scale=0.1).abs() + 1, randn(3 * cp, scale=0.1) + 1, randn(3 * cp, scale=0.1),
                     randn(cp, scale=0.1), randn(cp, scale=0.1).abs() + 1, randn(cp, scale=0.1) + 1,
                     randn(cp, scale=0.1)]
            sources = (*parts, bna.ACTIVATIONS["gelu"], f32)
            y = randn(n * s, 3 * cp, dtype=act)
            w, bias = randn(3 * cp, scale=0.1) + 1, randn(3 * cp, scale=0.1)
            stats = lambda: torch.ops.hifuse.batch_norm_stats_gated(  # noqa: E731
                y, *sources, 1e-5, None, None, None, 0.0)
            mean, invstd, _var = stats()
            apply = lambda: torch.ops.hifuse.batch_norm_act_gated(  # noqa: E731
                y, *sources, mean, invstd, w, bias, 0, act)
            grad = torch.randn_like(apply())
            backward = lambda: torch.ops.hifuse.batch_norm_act_gated_backward(  # noqa: E731
                grad, y, *sources, mean, invstd, w, bias, 0, act)
            return [stats, apply, backward]
        return setup

    def elementwise(st):
        y, s = randn(b, st["r"], st["r"], st["c"], dtype=act), randn(b, st["r"], st["r"], st["c"])
        grad = randn(b, st["r"], st["r"], st["c"], dtype=torch.promote_types(act, f32))
        return [lambda: torch.ops.hifuse.gelu_residual(y, s), lambda: torch.ops.hifuse.gelu_backward(grad, y)]

    def pools(st):
        n, s, c = b, st["r"] ** 2, st["c"]
        g, l = randn(n, s, c), randn(n, s, c)
        _pooled, arg = torch.ops.hifuse.channel_pool(g)
        d_avg, d_max, d_out = randn(n, c), randn(n, c), randn(n, 2, s)
        return [lambda: torch.ops.hifuse.channel_pool(g),
                lambda: torch.ops.hifuse.channel_pool_backward(d_avg, d_max, arg, g),
                lambda: torch.ops.hifuse.spatial_pool(l), lambda: torch.ops.hifuse.spatial_pool_backward(d_out, l)]

    def irmlp_conv3(st):
        # the fusion block's IRMLP: conv3 takes the GELU of a 12C expansion down to C channels
        # (2C in a smoke run: the interpreter's GEMMs are slow)
        rows, c, k = b * st["r"] ** 2, st["c"], (2 if args.smoke else 12) * st["c"]
        h, w = randn(rows, k, dtype=act), randn(c, k, scale=k**-0.5)
        grad = randn(rows, c, dtype=act)
        return [lambda: torch.ops.hifuse.gelu_linear(h, w, None),
                lambda: torch.ops.hifuse.gelu_linear_backward(grad, h, w, False)]

    def local(st):
        # the local block: dwconv + LayerNorm of the fp32 stream, written in the GEMM's dtype
        c = st["c"]
        x, cw = randn(b, st["r"], st["r"], c), randn(c, 1, 3, 3, scale=0.3)
        cb, lw, lb = randn(c, scale=0.1), randn(c, scale=0.1) + 1, randn(c, scale=0.1)
        _out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, act)
        grad = randn(b, st["r"], st["r"], c, dtype=act)
        return [lambda: torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, act),
                lambda: torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd, x)]

    out = []
    for i, st in enumerate(stages(args.image_size)):
        if i not in args.stages:
            continue
        c, rows = st["c"], b * st["r"] ** 2
        out.append((f"window attention, stage {i + 1}", lambda st=st: attention(st)))
        # the fusion block's training BatchNorms: W_l, W_g, W/W3 and conv3's (C channels), the
        # IRMLP's bn1 (3C, with the GELU + residual prologue), the spatial gate's (1 channel),
        # and from the second block on Updim's (pooled, at twice the resolution)
        out.append((f"BatchNorm {c}, stage {i + 1}", batch_norm(rows, c, act_code=2)))
        out.append((f"BatchNorm {3 * c} + residual, stage {i + 1}", batch_norm(rows, 3 * c, residual=True)))
        out.append((f"BatchNorm {3 * c} + residual computed on load, stage {i + 1}", batch_norm_gated(st)))
        out.append((f"BatchNorm 1, stage {i + 1}", batch_norm(rows, 1)))
        if not st["first"]:
            out.append((f"BatchNorm {c} pooled, stage {i + 1}",
                        batch_norm(4 * rows, c, pool_hw=2 * st["r"], act_code=1)))
        out.append((f"GELU + residual, stage {i + 1}", lambda st=st: elementwise(st)))
        out.append((f"channel and spatial pools, stage {i + 1}", lambda st=st: pools(st)))
        out.append((f"IRMLP conv3 (GELU on load), stage {i + 1}", lambda st=st: irmlp_conv3(st)))
        out.append((f"dwconv + LayerNorm, stage {i + 1}", lambda st=st: local(st)))
    return out


# --------------------------------------------------------------------------- dry runs


class _Recorder:
    """Stands for ``_triton.wrap_triton`` and ``_triton.resident_programs`` inside the block:
    launches are recorded, not run (the outputs are left empty), and so is the compile that
    counts resident programs."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def wrap(self, kernel):
        recorder = self

        class _Launch:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.launches.append((kernel, args, kwargs))

        return _Launch()

    def resident(self, kernel, args, launch, device):
        self.launches.append((kernel, args, dict(launch)))
        return None

    @contextlib.contextmanager
    def active(self):
        before = _triton.wrap_triton, _triton.resident_programs
        _triton.wrap_triton, _triton.resident_programs = self.wrap, self.resident
        try:
            yield self
        finally:
            _triton.wrap_triton, _triton.resident_programs = before


@contextlib.contextmanager
def consulted(record: list):
    """Records (kernel, shape class, default, check) of every table lookup inside the block."""
    lookup = _configs.launch_config

    def spy(kernel, shape_class, default, device, check=None):
        record.append((kernel, shape_class, dict(default), check))
        return lookup(kernel, shape_class, default, device, check)

    _configs.launch_config = spy
    try:
        yield
    finally:
        _configs.launch_config = lookup


def _int_class(v: int):
    # what of an integer argument Triton compiles a variant for: being 1, dividing by 16
    return ("int", v == 1, v % 16 == 0)


def compile_jobs(launches: list[tuple]) -> dict:
    """{variant key: picklable warmup job} of recorded launches."""
    jobs = {}
    for kernel, args, kwargs in launches:
        spec = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
        key = (kernel.fn.__module__, kernel.fn.__name__,
               tuple(_int_class(a) if type(a) is int else a for a in spec), tuple(sorted(kwargs.items())))
        jobs.setdefault(key, (kernel.fn.__module__, kernel.fn.__name__, spec, kwargs))
    return jobs


def _compile(job) -> tuple[bool, str]:
    """Compiles one variant into Triton's cache (in a worker process): the parent's launch
    of it then loads the binary."""
    module, name, args, kwargs = job
    try:
        getattr(importlib.import_module(module), name).warmup(*args, grid=(1,), **kwargs)
    except Exception as err:  # noqa: BLE001 - a candidate that does not compile is dropped
        return False, f"{module}.{name} {kwargs}: {type(err).__name__}: {err}"
    return True, ""


# --------------------------------------------------------------------------- candidates


def candidates(kernel: str, default: dict, check, limit: int, smoke: bool) -> list[dict]:
    """The default ({}) first, then valid entries of the kernel's space: in a smoke run the one
    with the largest tiles (the interpreter's fastest), else up to ``limit`` - 1 in a fixed
    random order."""
    space = SPACES.get(kernel, {})
    names = [k for k in space if k in default or k in _configs.EXTRA_KEYS]
    found = []
    for values in itertools.product(*(space[k] for k in names)):
        entry = dict(zip(names, values))
        if {**default, **entry} != default and _configs.entry_problem(entry, default, check) is None:
            found.append(entry)
    if smoke:
        def volume(e):
            return [v for k, v in sorted(e.items()) if k not in NOT_TILES]
        found = sorted(found, key=lambda e: (-math.prod(volume(e)), sorted(e.items())))[:1]
    else:
        random.Random(0).shuffle(found)
        found = found[: max(0, limit - 1)]
    return [{}] + found


# --------------------------------------------------------------------------- timing


def run_and_time(calls, reps: int, inner: int, cuda: bool) -> tuple[list, float]:
    """The outputs of a first (untimed) round of ``calls``, and the median milliseconds of
    one round after it."""
    outputs = [call() for call in calls]
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for _ in range(inner):
            for call in calls:
                call()
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    return outputs, statistics.median(times)


def _flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for o in outputs for t in _flat(o)] if isinstance(outputs, (tuple, list)) else []


def mismatch(got, want) -> str | None:
    """Why outputs ``got`` are not ``want``'s, or None: float results may differ by the
    rounding of another summation order (relative to their largest value), others not at all."""
    for a, b in zip(_flat(got), _flat(want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return "integer outputs differ"
            continue
        tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
        scale = b.float().abs().max().item() if b.numel() else 0.0
        err = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
        if not err <= tol * scale + 1e-6:  # also catches NaN
            return f"differs by {err:.3g} (largest value {scale:.3g})"
    return None


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="the GEMMs' dtype (autocast); the residual stream stays float32")
    parser.add_argument("--stages", default="1,2,3,4", help="comma list of the stages whose shapes are swept")
    parser.add_argument("--only", help="comma list of launches (or their op: batch_norm_act) to sweep")
    parser.add_argument("--budget-s", type=float, default=300.0, help="wall-clock budget of the whole sweep")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--candidates", type=int, default=24,
                        help="configurations timed per class, the default's included")
    parser.add_argument("--reps", type=int, default=5, help="timings per candidate (the median is taken)")
    parser.add_argument("--inner", type=int, default=3, help="rounds per timing")
    parser.add_argument("--min-gain", type=float, default=0.03, help="fraction a winner must beat the default by")
    parser.add_argument("--out", type=Path, help=f"table to write (default on a GPU: {_configs.TABLE})")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (batch 1, 32 x 32, the second stage, float32), two candidates a class, "
                             "one timing each: the sweep end to end, as the tests run it")
    args = parser.parse_args(argv)
    start = time.monotonic()
    if args.smoke:
        args.batch, args.image_size, args.stages, args.dtype = 1, 32, "2", "fp32"
        args.reps, args.inner = 1, 1
    try:
        args.stages = {int(s) - 1 for s in args.stages.split(",")}
    except ValueError:
        parser.error(f"--stages must be a comma list of 1..4, got {args.stages!r}")
    cuda = torch.cuda.is_available() and not _triton.interpreting()
    if args.out is None:
        if not cuda:
            parser.error("without a GPU the sweep runs in the Triton interpreter: give --out (its timings do not "
                         "belong in the shipped table)")
        args.out = _configs.TABLE
    if args.batch < 1 or args.image_size < 32:
        parser.error("--batch must be at least 1 and --image-size at least 32")
    device = torch.device("cuda" if cuda else "cpu")
    key = _configs.device_key(device)
    only = None if args.only is None else set(args.only.split(","))
    torch.manual_seed(0)

    def deadline(fraction: float) -> float:
        return start + fraction * args.budget_s

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        stack.enter_context(_triton.device_tiles())  # the GPU's tiles, in the interpreter too
        stack.enter_context(_configs.forced({k: {} for k in SPACES}))  # defaults unless a candidate is forced

        # 1. dry runs: which launches read the table, with which shape class and default
        print(f"sweep_configs: {key}, batch {args.batch}, {args.image_size} x {args.image_size}, {args.dtype}",
              flush=True)
        all_cases = cases(args, device)
        # (kernel, class) -> default, check, calls [(case, index)], context: the routes forced
        # while it is timed (a launch that only another way than the default makes)
        problems: dict[tuple, dict] = {}
        dry: dict[int, list] = {}  # case -> its calls on the inputs of a dry run

        def dry_run(ci: int, k: int, context: dict) -> set:
            """Record the problems of call k of case ci under ``context``; the kernels it consulted."""
            record: list = []
            with _Recorder().active(), consulted(record), _configs.forced(context), warnings.catch_warnings():
                warnings.simplefilter("ignore", _configs.ConfigWarning)  # a way refused at this shape
                dry[ci][k]()
            for kernel, shape_class, default, check in record:
                if only is None or kernel in only or kernel.split(".")[0] in only:
                    p = problems.setdefault((kernel, shape_class),
                                            dict(default=default, check=check, calls=[], context=context))
                    if (ci, k) not in p["calls"]:
                        p["calls"].append((ci, k))
            return {kernel for kernel, *_rest in record}

        for ci, (_label, setup) in enumerate(all_cases):
            with _Recorder().active():
                dry[ci] = setup()
            for k in range(len(dry[ci])):
                for context in route_contexts(dry_run(ci, k, {})):
                    dry_run(ci, k, context)
        for p_key, p in problems.items():
            p["candidates"] = candidates(p_key[0], p["default"], p["check"], args.candidates, args.smoke)
        total = sum(len(p["candidates"]) for p in problems.values())
        print(f"{len(problems)} shape classes, {total} configurations", flush=True)

        # 2. compile every configuration's launches in parallel (defaults first)
        compiled: dict[tuple, set] = {}  # (kernel, class) -> indices of candidates compiled
        if cuda:
            needs: dict[tuple, list] = {}  # (problem, candidate index) -> variant keys
            jobs: dict = {}
            for rank in range(max(len(p["candidates"]) for p in problems.values()) if problems else 0):
                for p_key, p in problems.items():
                    if rank >= len(p["candidates"]):
                        continue
                    recorder = _Recorder()
                    with recorder.active(), _configs.forced({**p["context"], p_key[0]: p["candidates"][rank]}):
                        for ci, k in p["calls"]:
                            dry[ci][k]()
                    found = compile_jobs(recorder.launches)
                    needs[(p_key, rank)] = list(found)
                    for v, job in found.items():
                        jobs.setdefault(v, job)
            done: set = set()
            print(f"compiling {len(jobs)} kernel variants on {args.jobs} processes", flush=True)
            ctx = multiprocessing.get_context("spawn")
            pool = ctx.Pool(max(1, args.jobs))
            try:
                results = pool.imap(_compile, list(jobs.values()))
                for v in list(jobs):
                    try:
                        ok, message = results.next(timeout=max(0.0, deadline(0.6) - time.monotonic()))
                    except multiprocessing.TimeoutError:
                        print("compile budget spent: the rest is not timed", flush=True)
                        break
                    if ok:
                        done.add(v)
                    else:
                        print(f"  does not compile: {message}", flush=True)
            finally:
                pool.terminate()
            for (p_key, rank), variants in needs.items():
                if all(v in done for v in variants):
                    compiled.setdefault(p_key, set()).add(rank)
            print(f"{len(done)} of {len(jobs)} compiled in {time.monotonic() - start:.0f} s", flush=True)
        else:
            print("the interpreter compiles nothing", flush=True)
            compiled = {p_key: set(range(len(p["candidates"]))) for p_key, p in problems.items()}

        # 3. time them, checking each against the default's results
        dry.clear()
        setups = {ci: setup() for ci, (_label, setup) in enumerate(all_cases)
                  if any(ci == c for p in problems.values() for c, _k in p["calls"])}
        entries: dict[str, dict] = {}
        results: dict[str, dict] = {}
        skipped = 0
        for (kernel, shape_class), p in sorted(problems.items(), key=lambda item: item[0][0] in ROUTES):
            ranks = sorted(compiled.get((kernel, shape_class), ()))
            if 0 not in ranks or time.monotonic() > deadline(1.0):
                skipped += 1
                continue
            calls = [setups[ci][k] for ci, k in p["calls"]]
            op = kernel.split(".")[0]
            tuned = {} if kernel not in ROUTES else {
                k: classes[shape_class] for k, classes in entries.items()
                if k.split(".")[0] == op and k not in ROUTES and classes.get(shape_class)}
            timed, reference = [], None
            for rank in ranks:
                if rank and time.monotonic() > deadline(1.0):
                    break
                entry = p["candidates"][rank]
                with _configs.forced({**p["context"], **tuned, kernel: entry}):
                    outputs, ms = run_and_time(calls, args.reps, args.inner, cuda)
                problem = None if reference is None else mismatch(outputs, reference)
                if problem is not None:
                    print(f"  {kernel} [{shape_class}] {entry}: wrong results ({problem}), dropped", flush=True)
                    continue
                reference = reference or outputs
                timed.append((ms, rank))
            base = next(ms for ms, rank in timed if rank == 0)
            best_ms, best = min(timed)
            won = best != 0 and best_ms < base * (1 - args.min_gain)
            entry = p["candidates"][best] if won else {}
            # None takes an entry an earlier sweep wrote off the table
            entries.setdefault(kernel, {})[shape_class] = entry if won else None
            if kernel in ROUTES:
                # the winners of launches the chosen way does not make are not written (a
                # library route makes none of the op's; one pass, no input or weight kernel;
                # the default, no one-pass kernel past 256 columns)
                record = []
                with _Recorder().active(), consulted(record), _configs.forced({**tuned, kernel: entry}):
                    for call in calls:
                        call()
                made = {k for k, *_rest in record}
                for k in tuned:
                    if k not in made:
                        entries[k][shape_class] = None
            results.setdefault(kernel, {})[shape_class] = dict(default_ms=round(base, 4), best_ms=round(best_ms, 4),
                                                               timed=len(timed))
            print(f"{kernel:28s} {shape_class:22s} default {base:8.3f} ms ({p['default']})  "
                  + (f"best {best_ms:8.3f} ms {entry}" if won else f"kept ({len(timed)} timed)"), flush=True)
        if skipped:
            print(f"{skipped} shape classes not timed within the budget", flush=True)

    sweep = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                 triton=triton.__version__, python=platform.python_version(), batch=args.batch,
                 image_size=args.image_size, dtype=args.dtype, min_gain=args.min_gain, results=results)
    _configs.save(args.out, key, entries, sweep)
    print(f"wrote {sum(e is not None for v in entries.values() for e in v.values())} entries for {key} to {args.out} "
          f"in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
