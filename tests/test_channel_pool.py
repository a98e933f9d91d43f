"""channel_pool against adaptive average and max pooling: outputs, gradients, ties."""

import pytest
import torch

from helpers import feature
from hifuse_kernels import _triton
from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
# (N, C, H, W): batch 1, odd and prime sides, 1x1, every stage width
SHAPES = [(1, 96, 7, 5), (2, 192, 3, 13), (1, 768, 1, 1), (2, 384, 2, 3), (3, 20, 4, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [True, False])
def test_channel_pool(shape, channels_last):
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
def test_ties_follow_eager(shape):
    # ReLU-like data: many equal maxima per channel and per position
    g = torch.randn(shape, device=DEVICE).clamp(max=0.0).round().requires_grad_()
    avg, best = channel_pool(g)
    ravg, rbest = channel_pool_ref(g)
    got = torch.autograd.grad((avg, best), g, (torch.ones_like(avg), torch.ones_like(best)))[0]
    ref = torch.autograd.grad((ravg, rbest), g, (torch.ones_like(avg), torch.ones_like(best)))[0]
    torch.testing.assert_close(got, ref)
