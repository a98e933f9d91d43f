"""spatial_pool against the eager channel max and mean map: outputs, gradients, ties."""

import pytest
import torch
from helpers import DEVICE, FEATURE_SHAPES, check_grads, feature, triton_device_or_skip

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
