"""BatchNorm with statistics over every DDP rank, for process groups torch's SyncBatchNorm does
not serve (CPU tensors over gloo). On CUDA the command line uses torch's own."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SyncStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0, *range(2, x.dim())]
        c = x.shape[1]
        shape = (1, c) + (1,) * (x.dim() - 2)
        local = torch.cat([x.sum(dims), x.new_full((1,), x.numel() / c)])
        dist.all_reduce(local)
        count = local[-1]
        mean = local[:c] / count
        # the variance from the centred values (a second pass and a second reduction), as one
        # process's BatchNorm computes it: E[x^2] - mean^2 in float32 moved the gradients of a
        # two-process step by up to 7% against the same step in one process
        centred = x - mean.view(shape)
        sq = (centred * centred).sum(dims)
        dist.all_reduce(sq)
        var = sq / count
        rstd = torch.rsqrt(var + eps)
        xhat = centred * rstd.view(shape)
        ctx.save_for_backward(xhat, weight, rstd, count)
        return xhat * weight.view(shape) + bias.view(shape), mean, var, count

    @staticmethod
    def backward(ctx, dy, _mean, _var, _count):
        xhat, weight, rstd, count = ctx.saved_tensors
        c = xhat.shape[1]
        dims = [0, *range(2, xhat.dim())]
        shape = (1, c) + (1,) * (xhat.dim() - 2)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        # parameter gradients stay local: DDP averages them over ranks
        total = torch.cat([sum_dy, sum_dy_xhat])
        dist.all_reduce(total)
        dx = (weight * rstd).view(shape) * (
            dy - (total[:c] / count).view(shape) - xhat * (total[c:] / count).view(shape)
        )
        return dx, sum_dy_xhat, sum_dy, None


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics cover the whole DDP batch (any backend)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if not self.affine:
            raise ValueError("GlooSyncBatchNorm needs affine parameters")
        y, mean, var, count = _SyncStats.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                unbiased = var * (count / (count - 1).clamp_min(1))
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        return y


def convert(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d of model replaced by GlooSyncBatchNorm, parameters and buffers kept."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync.to(child.weight.device if child.affine else child.running_mean.device))
        else:
            convert(child)
    return model
