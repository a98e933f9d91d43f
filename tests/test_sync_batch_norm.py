"""The command line's BatchNorm statistics over gloo ranks, in a group of one process."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hifuse.cli.sync_batch_norm import GlooSyncBatchNorm, _SyncStats


@pytest.fixture
def group(tmp_path):
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of its own")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_statistics_and_gradients_equal_batch_norm_far_from_zero(group):
    """A mean 5000 times the spread: E[x^2] - mean^2 in float32 loses every digit of the
    variance here; the centred second pass keeps them, as one process's BatchNorm does."""
    g = torch.Generator().manual_seed(0)
    x = (300 + 0.06 * torch.randn(3, 5, 7, 6, generator=g)).requires_grad_()
    weight = (1 + 0.1 * torch.randn(5, generator=g)).requires_grad_()
    bias = (0.1 * torch.randn(5, generator=g)).requires_grad_()
    dy = torch.randn(3, 5, 7, 6, generator=g)
    y, mean, var, count = _SyncStats.apply(x, weight, bias, 1e-5)
    grads = torch.autograd.grad(y, (x, weight, bias), dy)

    ref_in = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = F.batch_norm(ref_in[0], None, None, ref_in[1], ref_in[2], training=True, eps=1e-5)
    ref_grads = torch.autograd.grad(ref, ref_in, dy.double())
    x64 = x.detach().double()
    assert count.item() == 3 * 7 * 6
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=2e-3)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-3 * want.abs().max().item())


def test_module_outside_a_group_of_several_is_batch_norm():
    bn = GlooSyncBatchNorm(4).train()
    plain = torch.nn.BatchNorm2d(4).train()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bn(x), plain(x))
    torch.testing.assert_close(bn.running_var, plain.running_var)
