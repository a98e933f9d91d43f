"""FLOP counting with PyTorch's own FlopCounterMode (2 FLOPs per multiply-add)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_flops(
    model: nn.Module,
    input_size: tuple[int, ...] = (3, 224, 224),
    by_operator: bool = False,
    backward: bool = False,
) -> int | dict[str, int]:
    """FLOPs of one forward (optionally forward+backward) pass.

    Args:
        model: any module taking one image batch.
        input_size: (C, H, W) for one image, or (B, C, H, W).
        by_operator: return {operator name: FLOPs} instead of the total.
        backward: count the backward of ``output.sum()`` too.

    FlopCounterMode counts matrix products and convolutions; normalisations and
    elementwise work count zero, in eager and fused mode alike. The model runs in eval mode
    for the count (same FLOPs), so BatchNorm running statistics are left untouched.
    """
    if len(input_size) == 3:
        input_size = (1, *input_size)
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (C, H, W) or (B, C, H, W), got {input_size}")
    param = next(model.parameters())
    x = torch.zeros(input_size, device=param.device, dtype=param.dtype)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    model.eval()
    try:
        with counter, torch.set_grad_enabled(backward):
            out = model(x)
            if backward:
                out.sum().backward()
    finally:
        model.train(was_training)
        if backward:
            model.zero_grad(set_to_none=True)
    if not by_operator:
        return counter.get_total_flops()
    totals: dict[str, int] = defaultdict(int)
    for op, flops in counter.get_flop_counts()["Global"].items():
        totals[str(op).split(".")[-1]] += flops
    return dict(totals)
