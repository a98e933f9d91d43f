"""Loading checkpoints written by the published training code (or by this package)."""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

# Keys whose shape depends on the class count: the classifier and the unused global head
# (absent from a num_classes=0 model, whose two heads are nn.Identity).
HEAD_PREFIXES = ("conv_head.", "head.")


class CheckpointMismatchError(RuntimeError):
    """The checkpoint does not fit the model; the message lists every difference."""


def extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state_dict inside a bare state_dict, ``{"net": ...}`` or ``{"state_dict": ...}``."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(obj).__name__}, not a state_dict")
    for key in ("net", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointMismatchError(f"checkpoint entries that are not tensors: {bad[:10]}")
    return state


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, drop_head: bool = False, map_location: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Load a checkpoint into ``model`` strictly, returning the state_dict that was read.

    Args:
        model: the HiFuse model to fill.
        path: a file saved with ``torch.save``: a bare state_dict, ``{"net": ...}`` (the
            published training script's full checkpoint) or ``{"state_dict": ...}``.
        drop_head: keep the model's own classifier (``conv_head``) and unused global ``head``,
            for fine-tuning on another class count. Into a num_classes=0 model (no heads)
            it loads everything else; without it the checkpoint's heads are unexpected keys,
            as strict loading has it.
        map_location: where tensors are loaded before copying into the model.

    Raises:
        CheckpointMismatchError: listing missing keys, unexpected keys and shape differences.
    """
    raw = torch.load(path, map_location=map_location, weights_only=True)
    return load_state(model, extract_state_dict(raw), drop_head, os.fspath(path))


def load_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], drop_head: bool = False, source: str | os.PathLike = "state_dict"
) -> dict[str, torch.Tensor]:
    """``load_checkpoint`` for a state_dict already read; ``source`` names it in errors."""
    state = dict(state)
    own = model.state_dict()
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
        state.update({k: v for k, v in own.items() if k.startswith(HEAD_PREFIXES)})

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"checkpoint {os.fspath(source)!r} does not fit {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape differences", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        if any(k.startswith(HEAD_PREFIXES) for k in (*missing, *unexpected, *shapes)) and not drop_head:
            lines.append("  (the classifier differs: pass drop_head=True to fine-tune on another class count, "
                         "or to load all but the heads into a num_classes=0 model)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return state
