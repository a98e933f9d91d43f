"""The residual epilogues: ``shortcut + gelu(y)`` (IRMLP in eval mode) and the global blocks'
``shortcut + gelu(y)`` with the next LayerNorm (``residual_layer_norm``): eager vs
torch.compile vs the fused op.

Shapes: channels-last maps of each stage (the IRMLP input, 3C channels) and token rows of each
global stage (C channels). The residual stream is fp32 under autocast, y in the GEMM's dtype.
Bandwidth counts the bytes an ideal kernel moves: forward reads y and the stream and writes the
outputs; forward+backward adds the gradients read and written and the inputs read again.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPES, run_timed, skip_unavailable
from hifuse_kernels.gelu_residual import gelu_residual, gelu_residual_ref
from hifuse_kernels.residual_layer_norm import gelu_residual_layer_norm, gelu_residual_layer_norm_ref

STAGES = {"s1": (4, 96), "s2": (8, 192), "s3": (16, 384), "s4": (32, 768)}


def _case(bench_settings, stage, impl, direction):
    """(batch, side, channels, with backward) of a stage at the benchmark size."""
    skip_unavailable(impl, bench_settings)
    div, c = STAGES[stage]
    return max(bench_settings["batch"]), bench_settings["image_size"] // div, c, direction == "fwd_bwd"


def _time(benchmark, bench_settings, fn, inputs, direction, moved, **info):
    """Times fn on inputs (with backward for fwd_bwd) and records ``moved`` bytes as GB/s."""
    grads = []

    def run():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        if direction == "fwd_bwd":
            if not grads:
                grads.extend(torch.randn_like(o) for o in outs)
            torch.autograd.grad(outs, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad], grads)

    median = run_timed(benchmark, run, bench_settings["rounds"])
    benchmark.extra_info.update(direction=direction, bytes=moved, gb_per_s=moved / median / 1e9, **info)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_gelu_residual(benchmark, bench_settings, stage, impl, direction, dtype):
    b, side, c, grad = _case(bench_settings, stage, impl, direction)
    shape = (b, side, side, 3 * c)
    y = torch.randn(shape, device=DEVICE, dtype=DTYPES[dtype], requires_grad=grad)
    s = torch.randn(shape, device=DEVICE, requires_grad=grad)
    fn = {"eager": gelu_residual_ref, "fused": gelu_residual}.get(impl) or torch.compile(gelu_residual_ref, dynamic=False)
    moved = y.numel() * (y.element_size() + 4 + 4)  # y, stream in; fp32 sum out
    moved += y.numel() * (4 + y.element_size() + y.element_size() + 4) if grad else 0  # dout, y in; dy, ds out
    _time(benchmark, bench_settings, fn, (y, s), direction, moved, stage=stage, batch=b, impl=impl, dtype=dtype,
          shape=list(shape))


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
    e = y.element_size()
    moved = y.numel() * (e + 4 + 4 + e)  # y, stream in; fp32 stream and normalised rows out
    moved += y.numel() * (4 + e + e + 4 + e + 4) if grad else 0  # two grads, y, stream in; dy, ds out
    _time(benchmark, bench_settings, fn, (y, s, w, bias, 1e-5, dt), direction, moved, stage=stage, batch=b, impl=impl,
          dtype=dtype, shape=list(rows))
