"""The IRMLP's conv3 on the GELU of its expansion: eager (GELU, then the GEMM) vs compile vs
fused (``hifuse::gelu_linear``, the GELU taken on the GEMM's loads).

Shapes: the four fusion blocks of HiFuse-Tiny at 224x224 (56x56 .. 7x7 pixels, a 12C
expansion down to C channels) at the largest benchmark batch, in the activation dtype, the
weight in float32 as autocast leaves the parameter. Bytes (``conftest.time_op``): the least is
h and the weight read and the output written (backward: also the output's gradient read and
the gradients of h and the weight written); eager also writes and reads the GELU's output.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, DTYPES, skip_unavailable, time_op
from hifuse_kernels.gelu_linear import gelu_linear, gelu_linear_ref

BLOCKS = {"fu1": (56, 96), "fu2": (28, 192), "fu3": (14, 384), "fu4": (7, 768)}


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_gelu_linear(benchmark, bench_settings, block, impl, direction, dtype):
    skip_unavailable(impl, bench_settings)
    side, c = BLOCKS[block]
    batch = max(bench_settings["batch"])
    grad_on = direction == "fwd_bwd"
    act = DTYPES[dtype]
    h = torch.randn(batch * side * side, 12 * c, device=DEVICE, dtype=act, requires_grad=grad_on)
    w = ((12 * c) ** -0.5 * torch.randn(c, 12 * c, device=DEVICE)).requires_grad_(grad_on)

    def eager(h, w):  # what autocast runs: the GEMM in h's dtype, the weight cast
        return gelu_linear_ref(h, w.to(h.dtype))

    fn = {"eager": eager, "fused": gelu_linear}.get(impl)
    if impl == "compile":
        fn = torch.compile(eager, dynamic=False)
    time_op(benchmark, bench_settings, lambda: fn(h, w), [h, w], direction, block=block, batch=batch, impl=impl,
            dtype=dtype)
