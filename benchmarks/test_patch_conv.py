"""Local stem and downsample layers and the global patch embedding: eager vs compile vs fused.

Each layer runs on its input in HiFuse-Tiny at the benchmark image size and the largest
benchmark batch, under autocast. Eager takes NCHW input as the published layers do; the
fused path takes the same tensor channels-last (what the fused local blocks hand it; the
image itself stays NCHW). Bytes (``conftest.time_op``): the least is the input and the
parameters read and the output written, in the dtypes eager gives them under autocast
(backward: also the output's gradient read and the input's and parameters' written); the
casts autocast makes are moved, not least.
"""

from __future__ import annotations

import pytest
import torch

import hifuse
from conftest import DEVICE, DTYPES, time_op
from hifuse.model import LocalDownsample, PatchEmbed

# name: (module builder, input channels, input side as a fraction of the image side)
LAYERS = {
    "local_stem": (lambda: LocalDownsample(3, 96, 4, norm_first=False), 3, 1),
    "local_down1": (lambda: LocalDownsample(96, 192, 2, norm_first=True), 96, 4),
    "local_down2": (lambda: LocalDownsample(192, 384, 2, norm_first=True), 192, 8),
    "local_down3": (lambda: LocalDownsample(384, 768, 2, norm_first=True), 384, 16),
    "patch_embed": (lambda: PatchEmbed(4, 3, 96), 3, 1),
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_stem_layer(benchmark, bench_settings, layer, impl, direction, dtype):
    if impl == "compile" and not bench_settings["compile_ops"]:
        pytest.skip("op compile baselines need --compile-ops")
    build, c, div = LAYERS[layer]
    torch.manual_seed(0)
    module = build().to(DEVICE)
    batch = max(bench_settings["batch"])
    side = bench_settings["image_size"] // div
    grad_on = direction == "fwd_bwd"
    x = torch.randn(batch, c, side, side, device=DEVICE)
    if impl == "fused" and c > 3:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(grad_on and c > 3)  # the stems' input, the image, takes no gradient in the model
    call = torch.compile(module, dynamic=False) if impl == "compile" else module
    autocast = torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def run():
        with autocast, hifuse.use_fused(impl == "fused", attention=False, fusion=False, norm=False):
            return call(x)

    time_op(benchmark, bench_settings, run, [x, *module.parameters()], direction, layer=layer, batch=batch, impl=impl,
            dtype=dtype)
