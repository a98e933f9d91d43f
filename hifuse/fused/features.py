"""The model's feature loop, fused: each stage's output, read by the next stage's downsample
(local) or patch merging (global) and by its fusion block, is handed from the first reader to
the second, so that the first one's backward kernel adds the fusion block's gradient of it
instead of autograd summing the two in a pass of their own. The same modules run, in the same
order, as ``HiFuse._features``."""

from __future__ import annotations

import torch

from .. import config
from ..model import HiFuse
from .common import hand_on


def features_check(m: HiFuse, x: torch.Tensor) -> str | None:
    """Nothing against it: the loop runs each module as the model's own loop does (which takes
    over under activation checkpointing, decided by the model at each forward)."""
    return None


def features_forward(m: HiFuse, x: torch.Tensor) -> torch.Tensor:
    tokens, h, w = m.patch_embed(x)
    globals_ = []
    for stage in m.global_stages:
        if globals_ and stage.downsample is not None:
            # the fusion block reads the previous stage's output as the patch merging hands it on
            (out, h_out, w_out), after = hand_on(stage.downsample, lambda: stage(tokens, h, w))
            if after is not None:
                globals_[-1] = _as_map(after, h, w)
            tokens, h, w = out, h_out, w_out
        else:
            tokens, h, w = stage(tokens, h, w)
        globals_.append(_as_map(tokens, h, w))

    locals_ = []
    y = x
    for down, stage in zip(m.downsample_layers, m.stages):
        if locals_:
            # the fusion block reads the previous stage's output as the downsample hands it on
            y, after = hand_on(down, lambda: down(y))
            if after is not None:
                locals_[-1] = after
        else:
            y = down(y)
        y = stage(y)
        locals_.append(y)

    f = None
    for block, l, g in zip(m.fusion_blocks, locals_, globals_):
        f = block(l, g, f)
    return f


def _as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).view(b, c, h, w)


config.register(HiFuse, "patches", features_check, features_forward)
