"""Small building blocks shared by the HiFuse modules."""

from __future__ import annotations

import torch
from torch import nn

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


def activation(name: str | None):
    """The elementwise function a fused op names: None (identity), "relu" or "gelu" (exact)."""
    functions = {None: lambda t: t, "relu": torch.nn.functional.relu, "gelu": torch.nn.functional.gelu}
    if name not in functions:
        raise ValueError(f"activation must be one of {list(functions)}, got {name!r}")
    return functions[name]


def layer_norm_2d_eager(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the channels of (N, C, H, W), written as the published model writes it."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


class LayerNorm2d(nn.Module):
    """Channels-first LayerNorm (mean and biased variance over C of (N, C, H, W)).

    Runs the native ``hifuse::layer_norm_cf`` op when ``use_fused(norm=True)`` and the op
    can run on the input; otherwise the eager formula.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"LayerNorm2d({self.dim}) expects (N, {self.dim}, H, W), got {tuple(x.shape)}")
        if config.is_fused("norm"):
            from hifuse_kernels import layer_norm_cf

            reason = layer_norm_cf.unsupported_reason(x, self.weight, self.bias)
            if reason is None:
                return layer_norm_cf.layer_norm_cf(x, self.weight, self.bias, self.eps)
            config.log_fallback("norm", reason)
        return layer_norm_2d_eager(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
