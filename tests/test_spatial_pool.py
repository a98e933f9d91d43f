"""spatial_pool against the eager channel max and mean map: outputs, gradients, ties."""

import pytest
import torch
from helpers import DEVICE, FEATURE_SHAPES, assert_pool_writes_the_cast, check_grads, feature, triton_device_or_skip

from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref

pytestmark = triton_device_or_skip()
SHAPES = FEATURE_SHAPES


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_spatial_pool(tiles, shape, channels_last):
    l = feature(shape, 1, channels_last, device=DEVICE)
    check_grads(spatial_pool(l), spatial_pool_ref(l), [l])


@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (1, 8, 20, 21)])
def test_ties_follow_eager(tiles, shape):
    # ReLU-like data: many equal maxima per position, sharing the gradient as amax does
    g = torch.randn(shape, device=DEVICE).clamp(max=0.0).round().requires_grad_()
    check_grads(spatial_pool(g), spatial_pool_ref(g), [g])


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("used", ["both", "map", "next"])
def test_chain_sums_the_next_readers_gradient(channels_last, used):
    """``chain``: l handed on is l, and l's gradient is the pool's plus its next reader's,
    summed in the backward kernel; either may be absent."""
    l = feature((2, 12, 5, 7), 3, channels_last, device=DEVICE)
    pooled, again = spatial_pool(l, chain=True)
    assert torch.equal(again, l)
    if channels_last:  # handed on, not copied
        assert again.data_ptr() == l.data_ptr()
    torch.testing.assert_close(pooled, spatial_pool_ref(l))
    w = torch.randn_like(l)

    def loss(p, x):
        return (p.square().sum() if used != "next" else 0) + ((x * w).sin().sum() if used != "map" else 0)

    got = torch.autograd.grad(loss(pooled, again), l)[0]
    ref = torch.autograd.grad(loss(spatial_pool_ref(l), l), l)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chain_writes_the_cast(tiles, dtype):
    """``low_dtype``: l cast by the pooling's pass (``helpers.assert_pool_writes_the_cast``)."""
    l = feature((2, 12, 5, 7), 5, True, device=DEVICE)
    assert_pool_writes_the_cast(spatial_pool, torch.ops.hifuse.spatial_pool_cast, l, dtype, torch.float64)


def test_backward_reads_a_strided_gradient():
    """The map's gradient as the 7x7 convolution hands it (channels-last), read through its
    strides: the same as a contiguous one."""
    l = feature((2, 12, 5, 7), 6, True, device=DEVICE)
    out = spatial_pool(l)
    grad = torch.randn(out.shape, device=DEVICE)
    strided = grad.contiguous(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    got = torch.autograd.grad(out, l, strided, retain_graph=True)[0]
    ref = torch.autograd.grad(out, l, grad)[0]
    assert torch.equal(got, ref)
