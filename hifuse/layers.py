"""Small building blocks shared by the HiFuse modules."""

from __future__ import annotations

import torch
from torch import nn

from hifuse_kernels.reference import layer_norm_cf_ref

from . import config

trunc_normal_ = nn.init.trunc_normal_


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class LayerNormCF(nn.Module):
    """Channels-first LayerNorm: mean and biased variance over C of (N, C, H, W)
    (the published ``LayerNorm`` with ``data_format="channels_first"``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"LayerNormCF({self.dim}) expects (N, {self.dim}, H, W), got {tuple(x.shape)}")
        if config.runs_fused(self, x):
            return config.forward_fused(self, x)
        return layer_norm_cf_ref(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
