"""Patch merging gather + LayerNorm: eager (pad, slices, cat, LayerNorm) vs compile vs native op.

Shapes: the three patch mergings of HiFuse-Tiny at 224x224 (56x56x96, 28x28x192, 14x14x384)
at the largest benchmark batch. Bytes: x read and the (B, L/4, 4C) output written (backward:
also the gradient read and the input gradient written).
"""

from __future__ import annotations

import pytest
import torch

import hifuse_kernels
from conftest import DEVICE, DTYPES, run_timed
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
    dy = None

    def run():
        nonlocal dy
        out = fn(x, side, side, weight, bias)
        if grad_on:
            dy = torch.randn_like(out) if dy is None else dy
            torch.autograd.grad(out, (x, weight, bias), dy)

    median = run_timed(benchmark, run, bench_settings["rounds"])
    moved = 2 * x.numel() * x.element_size() * (2 if grad_on else 1)
    benchmark.extra_info.update(merge=merge, batch=batch, impl=impl, direction=direction, dtype=dtype,
                                bytes=moved, gb_per_s=moved / median / 1e9)
