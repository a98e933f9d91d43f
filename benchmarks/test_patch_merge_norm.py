"""Patch merging gather + LayerNorm: eager (pad, slices, cat, LayerNorm) vs compile vs native op.

Shapes: the three patch mergings of HiFuse-Tiny at 224x224 (56x56x96, 28x28x192, 14x14x384)
at the largest benchmark batch. Bytes (``conftest.time_op``): the least is x, weight and bias
read and the (B, L/4, 4C) output written (backward: also the output's gradient read and the
gradients of x, weight and bias written).
"""

from __future__ import annotations

import pytest
import torch

import hifuse_kernels
from conftest import DEVICE, DTYPES, time_op
from hifuse_kernels.patch_merge_norm import patch_merge_norm, patch_merge_norm_ref

MERGES = {"merge1": (56, 96), "merge2": (28, 192), "merge3": (14, 384)}


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "native"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_patch_merge_norm(benchmark, bench_settings, merge, impl, direction, dtype):
    if impl == "native" and not hifuse_kernels.native_available():
        pytest.skip(hifuse_kernels.native_load_error())
    if impl == "compile" and not bench_settings["compile_ops"]:
        pytest.skip("op compile baselines need --compile-ops")
    side, c = MERGES[merge]
    batch = max(bench_settings["batch"])
    grad_on = direction == "fwd_bwd"
    x = torch.randn(batch, side * side, c, device=DEVICE, dtype=DTYPES[dtype], requires_grad=grad_on)
    weight = torch.ones(4 * c, device=DEVICE, requires_grad=grad_on)
    bias = torch.zeros(4 * c, device=DEVICE, requires_grad=grad_on)
    fn = {"eager": patch_merge_norm_ref, "native": patch_merge_norm}.get(impl)
    if impl == "compile":
        fn = torch.compile(patch_merge_norm_ref, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(x, side, side, weight, bias), [x, weight, bias], direction,
            merge=merge, batch=batch, impl=impl, dtype=dtype)
