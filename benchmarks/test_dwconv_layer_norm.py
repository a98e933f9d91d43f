"""Depthwise 3x3 conv + LayerNorm and the 8 local blocks of HiFuse-Tiny: eager vs compile vs fused.

Shapes: the four local stages at 224x224 (56x56x96 .. 7x7x768) at the largest benchmark
batch. Eager takes NCHW input as the published block does (conv, permute, LayerNorm); the
fused op takes channels-last input. Bytes (``conftest.time_op``): the least is x and the
parameters read and the output written (backward: also the output's gradient read and the
gradients of x and the parameters written).
"""

from __future__ import annotations

import pytest
import torch

import hifuse
from conftest import DEVICE, DTYPES, run_timed, time_op
from hifuse.model import LocalBlock
from hifuse_kernels import _triton
from hifuse_kernels.dwconv_layer_norm import dwconv_layer_norm, dwconv_layer_norm_ref

STAGES = {"stage1": (56, 96), "stage2": (28, 192), "stage3": (14, 384), "stage4": (7, 768)}


def _skip(impl, settings, compile_flag):
    if impl == "fused":
        return _triton.unsupported_reason(torch.zeros(1, device=DEVICE))
    if impl == "compile" and not compile_flag:
        return "compile baselines need --compile-ops"
    return None


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_dwconv_layer_norm(benchmark, bench_settings, stage, impl, direction, dtype):
    reason = _skip(impl, bench_settings, bench_settings["compile_ops"])
    if reason:
        pytest.skip(reason)
    side, c = STAGES[stage]
    batch = max(bench_settings["batch"])
    grad_on = direction == "fwd_bwd"
    x = torch.randn(batch, side, side, c, device=DEVICE, dtype=DTYPES[dtype], requires_grad=grad_on)
    params = [0.3 * torch.randn(c, 1, 3, 3, device=DEVICE), torch.zeros(c, device=DEVICE),
              torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)]
    params = [p.to(DTYPES[dtype]).requires_grad_(grad_on) for p in params]
    fn = {"eager": dwconv_layer_norm_ref, "fused": dwconv_layer_norm}.get(impl)
    if impl == "compile":
        fn = torch.compile(dwconv_layer_norm_ref, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(x, *params), [x, *params], direction, stage=stage, batch=batch,
            impl=impl, dtype=dtype)


@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_local_blocks_tiny(benchmark, bench_settings, impl, direction, dtype):
    """The 8 local blocks of HiFuse-Tiny (2 per stage), each on its stage's input, under autocast."""
    reason = _skip(impl, bench_settings, True)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    batch = max(bench_settings["batch"])
    blocks = [LocalBlock(c).to(DEVICE) for _side, c in STAGES.values() for _ in range(2)]
    xs = [torch.randn(batch, c, side, side, device=DEVICE, requires_grad=direction == "fwd_bwd")
          for side, c in STAGES.values() for _ in range(2)]
    calls = [torch.compile(b, dynamic=False) if impl == "compile" else b for b in blocks]
    autocast = torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def run():
        with autocast, hifuse.use_fused(impl == "fused", attention=False, fusion=False, norm=False):
            outs = [call(x) for call, x in zip(calls, xs)]
        if direction == "fwd_bwd":
            torch.autograd.backward([o.float().sum() for o in outs])

    median = run_timed(benchmark, run, bench_settings["rounds"])
    benchmark.extra_info.update(batch=batch, impl=impl, direction=direction, dtype=dtype, blocks=len(blocks),
                                median_ms=median * 1e3)
