"""spatial_pool against the eager channel max and mean map: outputs, gradients, ties."""

import pytest
import torch

from helpers import check_grads, feature
from hifuse_kernels import _triton
from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
# (N, C, H, W): batch 1, odd and prime sides, 1x1, every stage width
SHAPES = [(1, 96, 7, 5), (2, 192, 3, 13), (1, 768, 1, 1), (2, 384, 2, 3), (3, 20, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_spatial_pool(shape, channels_last):
    l = feature(shape, 1, channels_last, device=DEVICE)
    check_grads(spatial_pool(l), spatial_pool_ref(l), [l])


@pytest.mark.parametrize("shape", [(2, 24, 5, 3), (1, 8, 20, 21)])
def test_ties_follow_eager(shape):
    # ReLU-like data: many equal maxima per position, sharing the gradient as amax does
    g = torch.randn(shape, device=DEVICE).clamp(max=0.0).round().requires_grad_()
    check_grads(spatial_pool(g), spatial_pool_ref(g), [g])
