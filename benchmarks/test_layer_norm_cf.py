"""The channels-first LayerNorm: eager formula vs torch.compile vs the native op.

Shapes are those of every channels-first LayerNorm in HiFuse-Tiny (local stem and
downsamples, fusion norm1/norm2/norm3) at the benchmark batch and image size.
Bytes (``conftest.time_op``): the least is x, weight and bias read and y written
(forward+backward adds dy read and dx, dweight and dbias written).
"""

from __future__ import annotations

import pytest
import torch

import hifuse_kernels
from conftest import DEVICE, DTYPES, time_op
from hifuse_kernels.layer_norm_cf import layer_norm_cf, layer_norm_cf_ref

PROVIDERS = ("eager", "compile", "native")
# (channels, grid divisor) of each channels-first LayerNorm: stem/downsample 96..384 at
# /4../16, fusion norms 2C or 3C at the stage grid.
NORMS = {
    "stem96": (96, 4), "down96": (96, 4), "down192": (192, 8), "down384": (384, 16),
    "fu1_norm2": (192, 4), "fu1_norm3": (288, 4), "fu2_norm3": (576, 8),
    "fu3_norm3": (1152, 16), "fu4_norm3": (2304, 32),
}


@pytest.fixture(params=list(NORMS))
def shape(request, bench_settings):
    c, div = NORMS[request.param]
    side = bench_settings["image_size"] // div
    return (max(bench_settings["batch"]), c, side, side)


@pytest.mark.parametrize("impl", PROVIDERS)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_layer_norm_cf(benchmark, bench_settings, shape, impl, direction, dtype):
    if impl == "native" and not hifuse_kernels.native_available():
        pytest.skip(hifuse_kernels.native_load_error())
    if impl == "compile" and not bench_settings["compile_ops"]:
        pytest.skip("op compile baselines need --compile-ops")
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE, dtype=DTYPES[dtype], requires_grad=direction == "fwd_bwd")
    w = torch.ones(shape[1], device=DEVICE, requires_grad=direction == "fwd_bwd")
    b = torch.zeros(shape[1], device=DEVICE, requires_grad=direction == "fwd_bwd")
    fn = {"eager": layer_norm_cf_ref, "native": layer_norm_cf}.get(impl)
    if impl == "compile":
        fn = torch.compile(layer_norm_cf_ref, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(x, w, b, 1e-6), [x, w, b], direction, shape=list(shape), impl=impl,
            dtype=dtype)
