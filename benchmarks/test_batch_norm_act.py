"""Training-mode BatchNorm with its activation (and the IRMLP's GELU + residual prologue):
eager (nn.BatchNorm2d, then the elementwise ops) vs torch.compile vs the fused op.

Shapes: the IRMLP ``bn1`` of each fusion stage (3C channels, GELU + residual prologue) and
the W3/W ConvBN output (C channels, GELU), channels-last, at the largest benchmark batch.
Bytes (``conftest.time_op``): the least is the inputs, weight and bias read, the output
written and the running statistics updated (backward: also the output's gradient read and
the inputs', weight's and bias's written); the statistics pass over the input is moved, not
least.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPES, skip_unavailable, time_op
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
    time_op(benchmark, bench_settings, lambda: fn(x, bn, act, r), inputs, direction, updated=list(bn.buffers()),
            stage=stage, case=case, batch=b, impl=impl, dtype=dtype)
