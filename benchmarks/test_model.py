"""The whole model: training step (forward, cross-entropy, backward, AdamW) and inference.

Providers: eager, fused (whatever use_fused() enables today), compile and fused_compile
(torch.compile of the eager or fused model) and fused_cudagraphs (the fused model under
torch.compile(mode="reduce-overhead")), the compiled ones with --compile; eager_graph and
fused_graph (the whole training step recorded as one CUDA graph by ``hifuse.TrainStep``, the
inference forward recorded by hand; GPU only). ``first_call_s`` in
extra_info is the first call's time (compilation for the compiled providers); under
fused_cudagraphs, ``cudagraph_skips`` counts the graphs Inductor ran without CUDA graphs (it
logs why): anything but 0 means the figure is not that of graph replays.

``test_train_step_rebuilds`` (with ``--rebuilds``) times the fused training step with each
setting of ``hifuse.use_rebuilds``: which tensors backward rebuilds instead of keeping, time
against peak memory.
"""

from __future__ import annotations

import functools
import time

import pytest

from torch._dynamo.utils import counters

import hifuse
from conftest import DEVICE, run_timed, sync
from hifuse import config
from hifuse.cli.bench import GRAPH_PROVIDERS, REBUILD_SETTINGS, fused_setting, model_call


@functools.lru_cache(maxsize=None)
def flops_per_image(variant: str, irmlp: str, size: int, train: bool) -> int:
    model = hifuse.create_model(variant, num_classes=7, irmlp=irmlp).to(DEVICE)
    return hifuse.count_flops(model, (3, size, size), backward=train)


def _record(benchmark, bench_settings, median, batch, dtype, memory_format, provider, train):
    size = bench_settings["image_size"]
    flops = batch * flops_per_image(bench_settings["variant"], bench_settings["irmlp"], size, train)
    benchmark.extra_info.update(
        variant=bench_settings["variant"], irmlp=bench_settings["irmlp"], batch=batch,
        image_size=size, dtype=dtype, memory_format=memory_format, provider=provider,
        mode="train" if train else "infer", flops=flops, tflops_per_s=flops / median / 1e12,
        images_per_s=batch / median,
    )


def _time(benchmark, bench_settings, batch, dtype, memory_format, provider, train):
    s = bench_settings
    if s["count_only"]:
        pytest.skip("--count-only counts single ops")  # before the first call, which would run the model
    if provider in GRAPH_PROVIDERS and DEVICE.type != "cuda":
        pytest.skip(f"{provider} records a CUDA graph: GPU only")
    call = model_call(s["variant"], s["irmlp"], batch, s["image_size"], dtype, memory_format, provider, train, DEVICE)
    counters.clear()
    with fused_setting(provider):
        start = time.perf_counter()
        call()
        sync()
        first = time.perf_counter() - start
        median = run_timed(benchmark, call, s["rounds"])
    benchmark.extra_info["first_call_s"] = first
    if provider == "fused_cudagraphs":
        benchmark.extra_info["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    _record(benchmark, s, median, batch, dtype, memory_format, provider, train)


def test_train_step(benchmark, bench_settings, batch, dtype, memory_format, provider):
    _time(benchmark, bench_settings, batch, dtype, memory_format, provider, True)


def test_inference(benchmark, bench_settings, batch, dtype, memory_format, provider):
    _time(benchmark, bench_settings, batch, dtype, memory_format, provider, False)


def test_train_step_rebuilds(benchmark, bench_settings, batch, dtype, memory_format, rebuilds):
    with config.use_rebuilds(**REBUILD_SETTINGS[rebuilds]):
        _time(benchmark, bench_settings, batch, dtype, memory_format, "fused", True)
    benchmark.extra_info["rebuilds"] = rebuilds
