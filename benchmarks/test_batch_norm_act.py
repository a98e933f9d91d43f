"""Training-mode BatchNorm with its activation (and the IRMLP's GELU + residual prologue):
eager (nn.BatchNorm2d, then the elementwise ops) vs torch.compile vs the fused op.

Shapes: the IRMLP ``bn1`` of each fusion stage (3C channels, GELU + residual prologue) and
the W3/W ConvBN output (C channels, GELU), channels-last, at the largest benchmark batch.
Bytes: inputs read and output written (backward: also the gradient read, the inputs read
again and their gradients written).
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPES, run_timed, skip_unavailable
from hifuse_kernels.batch_norm_act import batch_norm_act, batch_norm_act_ref

STAGES = {"fu1": (4, 96), "fu2": (8, 192), "fu3": (16, 384), "fu4": (32, 768)}
CASES = {"irmlp_bn1": (3, True, None), "convbn_gelu": (1, False, "gelu")}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_batch_norm_act(benchmark, bench_settings, stage, case, impl, direction, dtype):
    skip_unavailable(impl, bench_settings)
    div, c = STAGES[stage]
    mult, residual, act = CASES[case]
    b, side, dt = max(bench_settings["batch"]), bench_settings["image_size"] // div, DTYPES[dtype]
    grad = direction == "fwd_bwd"
    shape = (b, mult * c, side, side)
    x = torch.randn(shape, device=DEVICE, dtype=dt).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    r = None
    if residual:  # the residual stream is fp32 under autocast
        r = torch.randn(shape, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    bn = torch.nn.BatchNorm2d(mult * c).to(DEVICE)
    fn = {"eager": batch_norm_act_ref, "fused": batch_norm_act}.get(impl)
    if impl == "compile":
        fn = torch.compile(batch_norm_act_ref, dynamic=False)
    inputs = [t for t in (x, r, bn.weight, bn.bias) if t is not None]
    dy = []

    def run():
        out = fn(x, bn, act, r)
        if grad:
            if not dy:
                dy.append(torch.randn_like(out))
            torch.autograd.grad(out, inputs, dy[0])

    median = run_timed(benchmark, run, bench_settings["rounds"])
    moved = x.numel() * (x.element_size() + (4 + 4 if residual else x.element_size()))
    moved *= 2 if grad else 1
    benchmark.extra_info.update(stage=stage, case=case, batch=b, impl=impl, direction=direction, dtype=dtype,
                                bytes=moved, gb_per_s=moved / median / 1e9)
