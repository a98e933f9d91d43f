"""Benchmark options, parametrisation and the timing helper shared by every benchmark.

Sizes follow the machine: on a GPU the published setting (224x224, batch 32 and 128,
bf16 autocast); on a CPU-only machine small sizes that finish in minutes. Every option
can be set on the command line; compile baselines run only with --compile.

Each op benchmark (``time_op``) records the bytes its op moves and the least it must move
(``byte_model``). With --count-only nothing is timed: op benchmarks count those bytes, their
Triton launches recorded and not run, so the fused ops count at the GPU's sizes on a CPU
(TRITON_INTERPRET=1, the GPU's launch tiles, CUDA autocast's float32 ops); the other
benchmarks skip.
"""

from __future__ import annotations

import platform

import pytest
import torch

import byte_model
from hifuse.cli.bench import DTYPES, FORMATS, fused_setting  # noqa: F401  (shared with hifuse benchmark)

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def pytest_addoption(parser):
    group = parser.getgroup("hifuse")
    add = group.addoption
    add("--variant", default="hifuse_tiny", help="model variant (hifuse_tiny, hifuse_small, hifuse_base)")
    add("--irmlp", default="full", help="IRMLP conv1: full (published) or depthwise")
    add("--batch", default=None, help="comma list of batch sizes (GPU: 32,128; CPU: 2)")
    add("--image-size", type=int, default=None, help="image side (GPU: 224; CPU: 64)")
    add("--dtype", default=None, help="comma list of fp32, bf16, fp16 (autocast) (GPU: bf16,fp32; CPU: fp32)")
    add("--memory-format", default=None, help="comma list of contiguous, channels_last (GPU: both; CPU: contiguous)")
    add("--providers", default=None, help="comma list of eager, fused, eager_graph, fused_graph (the whole step as one "
        "CUDA graph; GPU only) (GPU: all four; CPU: eager,fused; compile ones need --compile)")
    add("--compile", action="store_true", help="also run torch.compile baselines (minutes each on a GPU)")
    add("--compile-ops", action="store_true", help="also run torch.compile baselines of single ops")
    add("--modes", default="train,infer", help="comma list of train, infer")
    add("--rounds", type=int, default=None, help="timed rounds per benchmark (GPU: 20, CPU: 3)")
    add("--count-only", action="store_true", help="count each op's bytes and launches instead of timing it (on a CPU "
        "too at the GPU's sizes, with TRITON_INTERPRET=1); benchmarks of more than an op skip")
    add("--rebuilds", default="", help="comma list of rebuild settings for test_train_step_rebuilds (rebuild_all, "
        "keep_all, keep_<name>; all: every one); none given: that benchmark does not run")


_count_only = [False]  # --count-only, for run_timed


def pytest_configure(config):
    _count_only[0] = config.getoption("--count-only")


def _opt(config, name, gpu_default, cpu_default):
    value = config.getoption(name)
    if value is None:
        value = gpu_default if ON_GPU else cpu_default
    return value


def _csv(value):
    return [v.strip() for v in str(value).split(",") if v.strip()]


def settings(config) -> dict:
    providers = _csv(_opt(config, "--providers", "eager,fused,eager_graph,fused_graph", "eager,fused"))
    if config.getoption("--compile"):
        providers += [p for p in ("compile", "fused_compile", "fused_cudagraphs") if p not in providers]
    return {
        "variant": config.getoption("--variant"),
        "irmlp": config.getoption("--irmlp"),
        "batch": [int(b) for b in _csv(_opt(config, "--batch", "32,128", "2"))],
        "image_size": _opt(config, "--image-size", 224, 64),
        "dtype": _csv(_opt(config, "--dtype", "bf16,fp32", "fp32")),
        "memory_format": _csv(_opt(config, "--memory-format", "contiguous,channels_last", "contiguous")),
        "provider": providers,
        "mode": _csv(config.getoption("--modes")),
        "rounds": _opt(config, "--rounds", 20, 3),
        "compile_ops": config.getoption("--compile-ops"),
        "rebuilds": _rebuilds(config.getoption("--rebuilds")),
        "count_only": config.getoption("--count-only"),
    }


def _rebuilds(value) -> list[str]:
    from hifuse.cli.bench import REBUILD_SETTINGS

    names = _csv(value)
    if names == ["all"]:
        return list(REBUILD_SETTINGS)
    unknown = [n for n in names if n not in REBUILD_SETTINGS]
    if unknown:
        raise pytest.UsageError(f"--rebuilds: unknown {unknown}; choose from all, {', '.join(REBUILD_SETTINGS)}")
    return names


def pytest_generate_tests(metafunc):
    s = settings(metafunc.config)
    for name in ("batch", "dtype", "memory_format", "provider", "mode", "rebuilds"):
        if name in metafunc.fixturenames:
            values = s[name]
            if name == "provider":
                allowed = getattr(metafunc.function, "providers", None)
                values = [v for v in values if allowed is None or v in allowed]
            metafunc.parametrize(name, values)


@pytest.fixture(scope="session")
def bench_settings(request) -> dict:
    return settings(request.config)


def versions() -> dict:
    info = {
        "device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["hifuse"] = versions()


def skip_unavailable(impl: str, settings: dict) -> None:
    """Skip a fused Triton op where Triton cannot run here, and an op's torch.compile baseline
    unless --compile-ops asked for it."""
    if impl == "fused":
        from hifuse_kernels import _triton

        reason = _triton.unsupported_reason(torch.zeros(1, device=DEVICE))
        if reason:
            pytest.skip(reason)
    if impl == "compile" and not settings["compile_ops"]:
        pytest.skip("op compile baselines need --compile-ops")


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def run_timed(benchmark, fn, rounds: int, warmup: int = 3):
    """Time fn (which must finish its GPU work) with pytest-benchmark; returns median seconds."""
    if _count_only[0]:
        pytest.skip("--count-only counts single ops")

    def call():
        fn()
        sync()

    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(versions())
    benchmark.extra_info["median_ms"] = median * 1e3
    if ON_GPU:
        benchmark.extra_info["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return median


def time_op(benchmark, settings, call, inputs, direction, reads=None, updated=(), **info) -> float | None:
    """Time ``call()`` (the op; with direction fwd_bwd also the gradients of those of
    ``inputs`` that require grad, from a fixed random gradient of each output that requires
    grad) and record in extra_info, besides ``info``:
    - ``bytes_moved`` and ``launches``: counted from its launches, in one more call, and
      ``moved_by``: launches and bytes of each kernel or aten op it launched;
    - ``tile_bytes``: of each GEMM kernel it launched, the bytes its programs move between L2
      and the SMs (``byte_model``'s tile traffic), where its module models it;
    - ``bytes_min``: the least it must move (``byte_model.minimum``): ``reads`` (default
      ``inputs``; given where the impl is timed on other tensors than the op's, as the
      attention baselines on windows) and ``updated`` (buffers it updates in place), its
      outputs and, with backward, their gradients and those of ``reads``; ``bytes_read_min``:
      ``reads`` alone, what a backward pass must read again besides the outputs' gradients;
    - ``gb_per_s``: bytes_min over the median time.
    Returns the median seconds. Under --count-only it is counted, not timed, and returns None
    (``counted_only`` in extra_info: what pytest-benchmark times then is the counting)."""
    output_grads = []  # made at the first call, then the same in every call

    def run():
        outs = byte_model.tensors([call()])
        if direction != "fwd_bwd":
            return outs, ()
        wanted = [o for o in outs if o.requires_grad]
        if not output_grads:
            output_grads.extend(torch.randn_like(o) for o in wanted)
        return outs, torch.autograd.grad(wanted, [t for t in inputs if t.requires_grad], output_grads)

    if settings["count_only"]:
        result = []
        benchmark.pedantic(lambda: result.append(byte_model.count(run, warm_up=True, as_gpu=not ON_GPU)), rounds=1,
                           iterations=1)
        ledger, (outs, input_grads) = result[0]
        median = None
        benchmark.extra_info.update(versions(), counted_only=True)
    else:
        median = run_timed(benchmark, run, settings["rounds"])
        ledger, (outs, input_grads) = byte_model.count(run)
    reads = inputs if reads is None else reads
    minimum = byte_model.minimum(reads, outs, updated, output_grads if direction == "fwd_bwd" else None, input_grads)
    info.update(direction=direction, bytes_moved=ledger.total("bytes"), bytes_min=minimum,
                bytes_read_min=byte_model.size(reads),
                launches=ledger.total("launches"),
                moved_by={name: [n, ledger.name_bytes[kind, name]] for (kind, name), n in ledger.names.items()})
    if ledger.tile_bytes:
        info["tile_bytes"] = dict(ledger.tile_bytes)
    if median is not None:
        info["gb_per_s"] = minimum / median / 1e9
    benchmark.extra_info.update(info)
    return median
