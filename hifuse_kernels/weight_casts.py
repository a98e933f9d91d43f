"""The weight casts of one forward under autocast, made together in one launch.

A GEMM under autocast reads its fp32 weight and bias cast to bf16/fp16; cast where each GEMM
runs, that is a launch per weight and per bias (about a hundred a HiFuse training step). Inside
``batch(owner, dtype)`` the weights that ``owner``'s previous forward asked for are cast at
the start by one ``torch._foreach_copy_`` (one multi-tensor kernel on a GPU, a few for many
tensors), and ``cast`` hands those out; a weight not cast in advance is cast where it is asked
for and, if it is a parameter (or a view of a whole contiguous or channels-last one), joins
the next forward's batch. The casts live for one forward: an op that needs one in backward saves it, so none goes
stale after an optimizer step, and the gradients still reach the parameters themselves.

Nothing is batched while torch.compile traces (Inductor fuses the casts itself) or under a
dispatch mode; outside ``batch``, ``cast`` is a plain ``Tensor.to``.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from . import reference

__all__ = ["batch", "cast"]

_PLAN = "_hifuse_cast_plan"  # owner.__dict__ entry: (dtype, [weights the last forward cast])
_state = threading.local()  # .active: (dtype, {id: (weight, cast)}, {id: weight asked for}) or None


def cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``: the batch's cast of it where there is one."""
    if weight.dtype == dtype:
        return weight
    active = getattr(_state, "active", None)
    if active is None or active[0] != dtype or reference._tracing():
        return weight.to(dtype)
    _dtype, casts, asked = active
    # a parameter, or a view of a whole one (a 1x1 convolution's weight flattened for its GEMM,
    # a channels-last patch convolution's permuted to its memory order): the batch's cast has
    # the parameter's strides, so the same view of it holds the same values. A part of a
    # parameter is cast where it is asked for (the batch would cast all of it); a tensor made
    # in this forward is not there next time.
    param = weight if weight._base is None else weight._base
    if not isinstance(param, torch.nn.Parameter) or (
            param is not weight and not (_dense(param) and weight.numel() == param.numel()
                                         and weight.storage_offset() == param.storage_offset())):
        return weight.to(dtype)
    asked[id(param)] = param
    entry = casts.get(id(param))
    if entry is not None and entry[0] is param:
        if weight is param:
            return entry[1]
        if entry[1].stride() == param.stride():
            return entry[1].as_strided(weight.shape, weight.stride())
    return weight.to(dtype)


def _dense(t: torch.Tensor) -> bool:
    """Whether t fills its memory without gaps in a layout ``empty_like`` keeps."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


@contextlib.contextmanager
def batch(owner, dtype: torch.dtype):
    """Within the block, ``cast(w, dtype)`` of the weights ``owner``'s previous forward asked
    for returns casts made together on entry. ``owner`` is any object with a ``__dict__`` (the
    model); it keeps the list of weights from forward to forward."""
    if reference._tracing() or getattr(_state, "active", None) is not None:
        yield
        return
    plan = owner.__dict__.get(_PLAN)
    casts = {}
    if plan is not None and plan[0] == dtype:
        weights = [w for w in plan[1] if w.dtype != dtype]
        if weights:
            with torch.no_grad():
                out = [torch.empty_like(w, dtype=dtype) for w in weights]
                torch._foreach_copy_(out, weights)
            casts = {id(w): (w, c) for w, c in zip(weights, out)}
    asked: dict[int, torch.Tensor] = {}
    _state.active = (dtype, casts, asked)
    try:
        yield
    finally:
        _state.active = None
    owner.__dict__[_PLAN] = (dtype, list(asked.values()))
