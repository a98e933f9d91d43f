"""The fused-kernel switch, and the one way a module hands its forward to fused kernels.

The setting is global and read by every module at forward time, so it acts on
models built before the call and never touches parameters or state_dict.

A module's ``forward`` starts with::

    if config.runs_fused(self, x):
        return config.forward_fused(self, x)

The fused-execution layer (``hifuse.fused``) registers, per module class, the part that
switches it, a check that says why the fused path cannot take given inputs, and the fused
forward. The check runs once per module and input signature (shapes, dtypes, devices,
strides, training mode, grad mode, autocast state); the answer is cached, so repeated
forwards of the same shape do no checks beyond a dictionary lookup.

The environment variable ``HIFUSE_FUSED`` overrides whatever the program asked
for: ``1``/``all`` enables every part, ``0``/``none`` disables all of them, and a
comma list (``attention,norm``) enables just those parts. It is read when the
setting is queried, so it can also be set after import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

logger = logging.getLogger("hifuse")

ENV_VAR = "HIFUSE_FUSED"

class _Switches:
    """A frozen dataclass of booleans, one per switch."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def all(cls, value: bool):
        return cls(**{name: value for name in cls.names()})


@dataclass(frozen=True)
class FusedParts(_Switches):
    """Which parts run fused.

    attention: the global branch's blocks (window attention, its LayerNorms, GELU + residual).
    local: the local branch's blocks (dwconv + LayerNorm, GELU + residual).
    patches: the strided patch layers of both branches: the local stem and downsamples, the
        global patch embedding and patch merging.
    fusion: the hierarchical feature fusion blocks.
    norm: the channels-first LayerNorms elsewhere (native ``hifuse::layer_norm_cf``).
    """

    attention: bool = False
    local: bool = False
    patches: bool = False
    fusion: bool = False
    norm: bool = False


# What the program asked for (the environment variables override it): the fused parts and
# the rebuilds.
_requested = {"parts": FusedParts(), "rebuilds": None}
_env_cache: dict[str, tuple[str, _Switches]] = {}  # variable -> (its value, parsed)


def _parse_env(raw: str, cls, var: str):
    """``1``/``all``, ``0``/``none`` or a comma list of ``cls``'s names, as a ``cls``."""
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on", "all"):
        return cls.all(True)
    if text in ("", "0", "false", "no", "off", "none"):
        return cls.all(False)
    wanted = {p.strip() for p in text.split(",") if p.strip()}
    unknown = wanted - set(cls.names())
    if unknown:
        raise ValueError(
            f"{var}={raw!r}: unknown name(s) {sorted(unknown)}; use 0, 1 or a comma "
            f"list of {', '.join(cls.names())}"
        )
    return cls(**{name: name in wanted for name in cls.names()})


def _from_env(var: str, cls):
    """The ``cls`` the environment variable ``var`` sets, or None where it is unset."""
    raw = os.environ.get(var)
    if raw is None:
        return None
    cached = _env_cache.get(var)
    if cached is None or cached[0] != raw:
        cached = _env_cache[var] = (raw, _parse_env(raw, cls, var))
    return cached[1]


def _env_override() -> FusedParts | None:
    return _from_env(ENV_VAR, FusedParts)


def _active_parts() -> FusedParts:
    env = _env_override()
    return env if env is not None else _requested["parts"]


def fused_parts() -> FusedParts:
    """The parts that run fused now (the environment variable taken into account)."""
    return _active_parts()


def is_fused(part: str) -> bool:
    """Whether ``part`` (one of ``FusedParts.names()``) is switched on."""
    return getattr(_active_parts(), part)


def any_fused() -> bool:
    """Whether any part is switched on."""
    parts = fused_parts()
    return any(getattr(parts, p) for p in FusedParts.names())


class _Request:
    """Sets ``_requested[key]`` when made; as a context manager, puts back the previous value."""

    key: str

    def _request(self, value) -> None:
        self._previous = _requested[self.key]
        _requested[self.key] = value

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _requested[self.key] = self._previous

    def __repr__(self) -> str:
        return f"{type(self).__name__}({_requested[self.key]})"


class use_fused(_Request):
    """Switch fused kernels on or off for all HiFuse models.

    Works as a plain call (the setting stays until changed) and as a context
    manager (the previous setting comes back on exit)::

        hifuse.use_fused()                          # everything fused
        hifuse.use_fused(attention=False)           # all but the attention blocks
        with hifuse.use_fused(False): ...           # eager inside the block

    Args:
        enabled: master switch; False turns every part off.
        attention, local, patches, fusion, norm: per-part switches (used when enabled);
            see ``FusedParts``.
    """

    key = "parts"

    def __init__(
        self,
        enabled: bool = True,
        *,
        attention: bool = True,
        local: bool = True,
        patches: bool = True,
        fusion: bool = True,
        norm: bool = True,
    ) -> None:
        parts = FusedParts(attention=attention, local=local, patches=patches, fusion=fusion, norm=norm)
        self._request(parts if enabled else FusedParts.all(False))
        if _env_override() is not None:
            logger.info("%s is set: it overrides use_fused(%s)", ENV_VAR, _requested["parts"])


def set_parts(parts: FusedParts) -> None:
    """Set the requested parts directly (the environment variable still overrides)."""
    _requested["parts"] = replace(parts)


# --------------------------------------------------------------------------- rebuilds

REBUILD_VAR = "HIFUSE_REBUILD"


@dataclass(frozen=True)
class Rebuilds(_Switches):
    """Which tensors a fused training step rebuilds in backward instead of keeping
    (``hifuse_kernels.recompute``). Each rebuild saves memory; some cost a pass in backward,
    others are written by a backward pass that reads their inputs anyway. Values are the same
    either way, gradients too but for rounding in a few parameter sums.

    attention_norm: the global blocks' norm1 rows (the qkv GEMM's input).
    attention_proj: the output of the global blocks' proj (fc1's input).
    local_norm: the local blocks' dwconv + LayerNorm maps (pwconv's input).
    fusion_norm: the fusion blocks' W_l/W_g/Updim GEMM outputs, their BatchNorm results and
        the normalised concatenation before W/W3.
    norm3: the fusion blocks' gated norm3 input (W/W3's BatchNorm + GELU) and output (the
        IRMLP's input).
    irmlp: the IRMLP's bn1 output (conv2's input; the GELU of its expansion, conv3's input,
        is never written: conv3 takes it on its loads).
    """

    attention_norm: bool = True
    attention_proj: bool = True
    local_norm: bool = True
    fusion_norm: bool = True
    norm3: bool = True
    irmlp: bool = True


_requested["rebuilds"] = Rebuilds()


def rebuilds() -> Rebuilds:
    """The rebuilds in force now (``HIFUSE_REBUILD`` taken into account)."""
    env = _from_env(REBUILD_VAR, Rebuilds)
    return env if env is not None else _requested["rebuilds"]


def rebuilding(name: str) -> bool:
    """Whether the fused training step rebuilds ``name`` (one of ``Rebuilds.names()``)."""
    return getattr(rebuilds(), name)


class use_rebuilds(_Request):
    """Which tensors fused training rebuilds in backward instead of keeping; all by default.

    A plain call or a context manager, as ``use_fused``::

        hifuse.use_rebuilds(False)                  # keep everything: more memory, less work
        hifuse.use_rebuilds(irmlp=False)            # keep the IRMLP's inputs only

    ``HIFUSE_REBUILD`` (``1``, ``0`` or a comma list of ``Rebuilds.names()``) overrides it.
    Set it before ``torch.compile`` traces a model.
    """

    key = "rebuilds"

    def __init__(self, enabled: bool = True, **names: bool) -> None:
        unknown = set(names) - set(Rebuilds.names())
        if unknown:
            raise TypeError(f"use_rebuilds: unknown name(s) {sorted(unknown)}; choose from {', '.join(Rebuilds.names())}")
        self._request(Rebuilds(**names) if enabled else Rebuilds.all(False))


_logged: set[tuple[str, str]] = set()
_quiet = [0]  # depth of quiet_fallbacks blocks


@contextlib.contextmanager
def quiet_fallbacks():
    """No fallback is logged inside (and none counts as logged for later): for probes such
    as ``hifuse info`` that report the reasons themselves."""
    _quiet[0] += 1
    try:
        yield
    finally:
        _quiet[0] -= 1


def log_fallback(part: str, reason: str) -> None:
    """Log once per (part, reason) that a fused part runs eager instead."""
    if torch.compiler.is_compiling() or _quiet[0]:
        return
    key = (part, reason)
    if key not in _logged:
        _logged.add(key)
        logger.warning("hifuse: fused %s runs eager: %s", part, reason)


@dataclass(frozen=True)
class Route:
    """How a module class runs fused: the part that switches it, ``check(module, *args)``
    (why the fused path cannot take these inputs, or None) and ``forward(module, *args)``."""

    part: str
    check: Callable[..., str | None]
    forward: Callable


_routes: dict[type, Route] = {}
# module -> {input signature: reason it cannot run fused, or None}
_decisions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# how often a route's check ran (each is one decision, then cached)
checks_run = 0


_preparers: list[Callable] = []


def register_prepare(fn: Callable) -> None:
    """``fn(model)`` runs when a HiFuse model enters eval mode (see ``prepare``)."""
    _preparers.append(fn)


def prepare(model) -> None:
    """Let the fused-execution layer compute what eval-mode forwards derive from the weights,
    when a fused part is switched on (``HiFuse.train(False)`` calls it)."""
    if any_fused():
        for fn in _preparers:
            fn(model)


_scope: list[Callable] = []


def register_scope(fn: Callable) -> None:
    """``fn(model, x)``, a context manager, wraps each forward of a HiFuse model on images x
    while a fused part is on (see ``forward_scope``)."""
    _scope[:] = [fn]


def forward_scope(model, x):
    """What the fused-execution layer holds for one forward of ``model`` (the weight casts its
    GEMMs share); nothing when every part is off, or under torch.compile."""
    if _scope and not torch.compiler.is_compiling() and any_fused():
        return _scope[0](model, x)
    return contextlib.nullcontext()


def register(cls: type, part: str, check: Callable[..., str | None], forward: Callable) -> None:
    """Route ``cls``'s forward to ``forward`` when ``part`` is on and ``check`` finds nothing."""
    if part not in FusedParts.names():
        raise ValueError(f"unknown part {part!r}; parts are {FusedParts.names()}")
    _routes[cls] = Route(part, check, forward)


def _signature(module, args: tuple) -> tuple:
    param = next(module.parameters(), None)  # a module moved or cast after a decision
    key = [module.training, torch.is_grad_enabled(), None if param is None else (param.dtype, param.device)]
    for a in args:
        if isinstance(a, torch.Tensor):
            device = a.device.type
            autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
            key.append((tuple(a.shape), a.stride(), a.dtype, a.device, autocast))
        else:
            key.append(a)
    return tuple(key)


def _decide(route: Route, module, args: tuple) -> str | None:
    global checks_run
    checks_run += 1
    return route.check(module, *args)


def runs_fused(module, *args) -> bool:
    """Whether ``module`` runs its fused forward on ``args`` now: its part is switched on and
    its check (run once per input signature, then cached) finds nothing against it. A
    fallback is logged once per reason."""
    route = _routes.get(type(module))
    if route is None or not is_fused(route.part):
        return False
    if torch.compiler.is_compiling():
        # traced once per compiled graph; dynamo guards on what the check read
        reason = route.check(module, *args)
    else:
        decisions = _decisions.get(module)
        if decisions is None:
            decisions = _decisions[module] = {}
        key = _signature(module, args)
        if key in decisions:
            reason = decisions[key]
        else:
            reason = decisions[key] = _decide(route, module, args)
    if reason is not None:
        log_fallback(route.part, reason)
        return False
    return True


def module_decisions(model) -> dict:
    """Per module of ``model`` that a part switches: (its part, what it decided in the forwards
    run so far: None for an input signature it ran fused, else the reason it did not; empty
    where it has not run)."""
    found = {}
    for m in model.modules():
        route = _routes.get(type(m))
        if route is not None:
            found[m] = (route.part, set(_decisions.get(m, {}).values()))
    return found


def part_decisions(model) -> dict[str, set[str | None]]:
    """Per part, what its modules in ``model`` decided in the forwards run so far: None where
    one ran fused, else the reason it did not."""
    found: dict[str, set[str | None]] = {}
    for part, decisions in module_decisions(model).values():
        if decisions:
            found.setdefault(part, set()).update(decisions)
    return found


def forward_fused(module, *args):
    """The fused forward registered for ``module``'s class (call after ``runs_fused``)."""
    return _routes[type(module)].forward(module, *args)
