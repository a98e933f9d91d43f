"""The model's feature loop, fused: each local stage's output, read by the next stage's
downsample and by its fusion block, is handed from the first reader to the second, so that
the downsample's LayerNorm backward adds the fusion block's gradient of it on load instead of
autograd summing the two in a pass of their own. The same modules run, in the same order, as
``HiFuse._features``."""

from __future__ import annotations

import torch

from .. import config
from ..model import HiFuse
from . import local_branch


def features_check(m: HiFuse, x: torch.Tensor) -> str | None:
    if m.grad_checkpointing and torch.is_grad_enabled():
        return "activation checkpointing runs the model's own feature loop"
    return None


def features_forward(m: HiFuse, x: torch.Tensor) -> torch.Tensor:
    tokens, h, w = m.patch_embed(x)
    globals_ = []
    for stage in m.global_stages:
        tokens, h, w = stage(tokens, h, w)
        b, _, c = tokens.shape
        globals_.append(tokens.transpose(1, 2).view(b, c, h, w))

    locals_ = []
    y = x
    for down, stage in zip(m.downsample_layers, m.stages):
        if locals_:
            # the fusion block reads the previous stage's output as the downsample hands it on
            y, locals_[-1] = local_branch.hand_on(down, y)
        else:
            y = down(y)
        y = stage(y)
        locals_.append(y)

    f = None
    for block, l, g in zip(m.fusion_blocks, locals_, globals_):
        f = block(l, g, f)
    return f


config.register(HiFuse, "patches", features_check, features_forward)
