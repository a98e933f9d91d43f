"""The fused feature loop: the same modules as the model's own loop, with each stage's output
handed from the next stage's downsample or patch merging to its fusion block."""

import copy

import torch

import hifuse
from helpers import DEVICE, triton_device_or_skip
from hifuse import config
from hifuse.model import HiFuse
from hifuse_kernels import patch_merge_norm as pmn
from hifuse_kernels import residual_layer_norm as rln

pytestmark = triton_device_or_skip()


def _step(model, x, routed: bool, monkeypatch):
    if not routed:
        monkeypatch.delitem(config._routes, HiFuse)
    try:
        with torch.autocast(DEVICE, dtype=torch.bfloat16), hifuse.use_fused(True):
            loss = model(x).float().square().sum()
        loss.backward()
    finally:
        monkeypatch.undo()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_handed_on_gradients_equal_the_summed_ones(monkeypatch):
    # the downsample's LayerNorm backward (the patch merging's) adds the fusion block's
    # gradient of its input in the kernel, in float32: for a float32 stream (stage 1 on a GPU)
    # the numbers of autograd's float32 sum; for a bf16 one (after it, and on the CPU, whose
    # autocast keeps every stream in bf16) one rounding instead of two
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                num_heads=(1, 1, 2, 2)).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64, device=DEVICE).contiguous(memory_format=torch.channels_last)
    chained = []
    for function in (rln._LayerNormHandOn, pmn._HandOn):
        monkeypatch.setattr(function, "apply", lambda *a, apply=function.apply, name=function.__name__:
                            chained.append(name) or apply(*a))
    got = _step(copy.deepcopy(model), x, True, monkeypatch)
    # the three local downsamples after the stem and the three patch mergings
    assert sorted(chained) == ["_HandOn"] * 3 + ["_LayerNormHandOn"] * 3, chained
    want = _step(copy.deepcopy(model), x, False, monkeypatch)
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
    for a, b in zip(got[1], want[1]):
        assert (a is None) == (b is None)
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=2**-6 * b.abs().max().item())


def test_checkpointing_runs_the_models_own_loop(monkeypatch):
    # also when switched on after a forward that ran the fused loop: the model decides at each
    # forward, not once per input signature
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                num_heads=(1, 1, 2, 2)).to(DEVICE).eval()  # eval: batch 1 trains no BatchNorm
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    loops = []
    route = config._routes[HiFuse]
    monkeypatch.setitem(config._routes, HiFuse, config.Route(
        route.part, route.check, lambda *args: loops.append(1) or route.forward(*args)))
    with hifuse.use_fused(True):
        model(x)
        assert len(loops) == 1
        model.set_grad_checkpointing(True)
        model(x).sum().backward()
        assert len(loops) == 1
        with torch.no_grad():  # nothing to checkpoint
            model(x)
        assert len(loops) == 2
