"""The residual epilogues: ``shortcut + gelu(y)`` (IRMLP in eval mode) and the global blocks'
``shortcut + gelu(y)`` with the next LayerNorm (``residual_layer_norm``): eager vs
torch.compile vs the fused op.

Shapes: channels-last maps of each stage (the IRMLP input, 3C channels) and token rows of each
global stage (C channels). The residual stream is fp32 under autocast, y in the GEMM's dtype.
Bytes (``conftest.time_op``): the least is y, the stream (and the LayerNorm's weight and
bias) read and the outputs written; forward+backward adds the outputs' gradients read and the
inputs' written (not the stream's, which is the incoming gradient itself in ``gelu_residual``).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPES, skip_unavailable, time_op
from hifuse_kernels.gelu_residual import gelu_residual, gelu_residual_ref
from hifuse_kernels.residual_layer_norm import gelu_residual_layer_norm, gelu_residual_layer_norm_ref

STAGES = {"s1": (4, 96), "s2": (8, 192), "s3": (16, 384), "s4": (32, 768)}


def _case(bench_settings, stage, impl, direction):
    """(batch, side, channels, with backward) of a stage at the benchmark size."""
    skip_unavailable(impl, bench_settings)
    div, c = STAGES[stage]
    return max(bench_settings["batch"]), bench_settings["image_size"] // div, c, direction == "fwd_bwd"


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_gelu_residual(benchmark, bench_settings, stage, impl, direction, dtype):
    b, side, c, grad = _case(bench_settings, stage, impl, direction)
    shape = (b, side, side, 3 * c)
    y = torch.randn(shape, device=DEVICE, dtype=DTYPES[dtype], requires_grad=grad)
    s = torch.randn(shape, device=DEVICE, requires_grad=grad)
    fn = {"eager": gelu_residual_ref, "fused": gelu_residual}.get(impl) or torch.compile(gelu_residual_ref, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(y, s), [y, s], direction, stage=stage, batch=b, impl=impl,
            dtype=dtype, shape=list(shape))


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_residual_layer_norm(benchmark, bench_settings, stage, impl, direction, dtype):
    b, side, c, grad = _case(bench_settings, stage, impl, direction)
    rows = (b * side * side, c)
    dt = DTYPES[dtype]
    y = torch.randn(rows, device=DEVICE, dtype=dt, requires_grad=grad)
    s = torch.randn(rows, device=DEVICE, requires_grad=grad)
    w = torch.ones(c, device=DEVICE, requires_grad=grad)
    bias = torch.zeros(c, device=DEVICE, requires_grad=grad)
    ref = gelu_residual_layer_norm_ref
    fn = {"eager": ref, "fused": gelu_residual_layer_norm}.get(impl) or torch.compile(ref, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(y, s, w, bias, 1e-5, dt), [y, s, w, bias], direction, stage=stage,
            batch=b, impl=impl, dtype=dtype, shape=list(rows))
