"""channel_pool against adaptive average and max pooling: outputs, gradients, ties."""

import pytest
import torch
from helpers import DEVICE, FEATURE_SHAPES, assert_pool_writes_the_cast, feature, triton_device_or_skip

from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref

pytestmark = triton_device_or_skip()
SHAPES = FEATURE_SHAPES


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_pool(tiles, shape, channels_last):
    g = feature(shape, 0, channels_last, device=DEVICE)
    avg, best = channel_pool(g)
    ravg, rbest = channel_pool_ref(g)
    torch.testing.assert_close(avg, ravg)
    assert torch.equal(best, rbest)
    da, dm = torch.randn_like(avg), torch.randn_like(best)
    got = torch.autograd.grad((avg, best), g, (da, dm))[0]
    ref = torch.autograd.grad((ravg, rbest), g, (da, dm))[0]
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (1, 8, 20, 21)])  # the second spans several position chunks
def test_ties_follow_eager(tiles, shape):
    # ReLU-like data: many equal maxima per channel and per position
    g = torch.randn(shape, device=DEVICE).clamp(max=0.0).round().requires_grad_()
    avg, best = channel_pool(g)
    ravg, rbest = channel_pool_ref(g)
    got = torch.autograd.grad((avg, best), g, (torch.ones_like(avg), torch.ones_like(best)))[0]
    ref = torch.autograd.grad((ravg, rbest), g, (torch.ones_like(avg), torch.ones_like(best)))[0]
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("used", ["both", "pools", "next"])
def test_chain_sums_the_next_readers_gradient(channels_last, used):
    """``chain``: g handed on is g, and g's gradient is the pools' plus its next reader's,
    summed in the backward kernel; either may be absent."""
    g = feature((2, 12, 5, 7), 4, channels_last, device=DEVICE)
    avg, best, again = channel_pool(g, chain=True)
    assert torch.equal(again, g)
    w = torch.randn_like(g)

    def loss(a, b, x):
        pools = (a.square().sum() + 3 * b.sum()) if used != "next" else 0
        return pools + ((x * w).sin().sum() if used != "pools" else 0)

    got = torch.autograd.grad(loss(avg, best, again), g)[0]
    ref = torch.autograd.grad(loss(*channel_pool_ref(g), g), g)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chain_writes_the_cast(tiles, dtype):
    """``low_dtype``: g cast by the pooling's pass (``helpers.assert_pool_writes_the_cast``)."""
    g = feature((2, 12, 5, 7), 6, True, device=DEVICE)
    assert_pool_writes_the_cast(channel_pool, torch.ops.hifuse.channel_pool_cast, g, dtype, torch.int32, stacked=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_chunks_combine_non_finite_as_eager(device_tiles, value):
    """Over several position chunks: a NaN or infinity in a later chunk than the finite
    maximum, and a channel that is -inf throughout; the combined maximum, its position
    (through the gradient) and the average are eager's."""
    g = torch.randn(1, 4, 20, 21, device=DEVICE)
    g[0, 0, 0, 5] = 50.0  # first chunk
    g[0, 0, 15, 3] = value  # a later chunk
    g[0, 1, 16, 0] = value
    g[0, 2] = float("-inf")
    g.requires_grad_()
    avg, best = channel_pool(g)
    ravg, rbest = channel_pool_ref(g)
    torch.testing.assert_close(avg, ravg, equal_nan=True)
    torch.testing.assert_close(best, rbest, equal_nan=True)
    ones = (torch.ones_like(avg), torch.ones_like(best))
    got = torch.autograd.grad((avg, best), g, ones)[0]
    ref = torch.autograd.grad((ravg, rbest), g, ones)[0]
    torch.testing.assert_close(got, ref, equal_nan=True)
