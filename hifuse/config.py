"""The fused-kernel switch: which parts of HiFuse run on fused kernels.

The setting is global and read by every module at forward time, so it acts on
models built before the call and never touches parameters or state_dict.

The environment variable ``HIFUSE_FUSED`` overrides whatever the program asked
for: ``1``/``all`` enables every part, ``0``/``none`` disables all of them, and a
comma list (``attention,norm``) enables just those parts. It is read when the
setting is queried, so it can also be set after import.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields, replace

import torch

logger = logging.getLogger("hifuse")

ENV_VAR = "HIFUSE_FUSED"

# Parts that have fused kernels in this version; the others accept the switch and run eager.
IMPLEMENTED = frozenset({"attention", "local", "fusion", "norm"})


@dataclass(frozen=True)
class FusedParts:
    attention: bool = False  # global-branch window attention blocks
    local: bool = False  # local branch: dwconv+LN blocks, stems, patch merging
    fusion: bool = False  # hierarchical feature fusion blocks
    norm: bool = False  # native LayerNorm ops (channels-first LayerNorms)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def all(cls, value: bool) -> "FusedParts":
        return cls(**{name: value for name in cls.names()})


_requested = FusedParts()
_env_cache: tuple[str | None, FusedParts | None] = (None, None)


def _parse_env(raw: str) -> FusedParts:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on", "all"):
        return FusedParts.all(True)
    if text in ("", "0", "false", "no", "off", "none"):
        return FusedParts.all(False)
    wanted = {p.strip() for p in text.split(",") if p.strip()}
    unknown = wanted - set(FusedParts.names())
    if unknown:
        raise ValueError(
            f"{ENV_VAR}={raw!r}: unknown part(s) {sorted(unknown)}; use 0, 1 or a comma "
            f"list of {', '.join(FusedParts.names())}"
        )
    return FusedParts(**{name: name in wanted for name in FusedParts.names()})


def _env_override() -> FusedParts | None:
    global _env_cache
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    if raw != _env_cache[0]:
        _env_cache = (raw, _parse_env(raw))
    return _env_cache[1]


def _active_parts() -> FusedParts:
    env = _env_override()
    return env if env is not None else _requested


def fused_parts() -> FusedParts:
    """The parts that run fused now (the environment variable taken into account)."""
    return _active_parts()


def is_fused(part: str) -> bool:
    """Whether ``part`` (one of ``FusedParts.names()``) is switched on."""
    return getattr(_active_parts(), part)


class use_fused:
    """Switch fused kernels on or off for all HiFuse models.

    Works as a plain call (the setting stays until changed) and as a context
    manager (the previous setting comes back on exit)::

        hifuse.use_fused()                          # everything fused
        hifuse.use_fused(attention=False)           # all but the attention blocks
        with hifuse.use_fused(False): ...           # eager inside the block

    Args:
        enabled: master switch; False turns every part off.
        attention, local, fusion, norm: per-part switches (used when enabled).
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        attention: bool = True,
        local: bool = True,
        fusion: bool = True,
        norm: bool = True,
    ) -> None:
        global _requested
        self._previous = _requested
        parts = FusedParts(attention=attention, local=local, fusion=fusion, norm=norm)
        _requested = parts if enabled else FusedParts.all(False)
        if _env_override() is not None:
            logger.info("%s is set: it overrides use_fused(%s)", ENV_VAR, _requested)
        pending = [p for p in FusedParts.names() if getattr(_requested, p) and p not in IMPLEMENTED]
        if pending:
            logger.info("hifuse: no fused kernels yet for %s; those parts run eager", ", ".join(pending))

    def __enter__(self) -> "use_fused":
        return self

    def __exit__(self, *exc) -> None:
        global _requested
        _requested = self._previous

    def __repr__(self) -> str:
        return f"use_fused({_requested})"


def set_parts(parts: FusedParts) -> None:
    """Set the requested parts directly (the environment variable still overrides)."""
    global _requested
    _requested = replace(parts)


_logged: set[tuple[str, str]] = set()


def log_fallback(part: str, reason: str) -> None:
    """Log once per (part, reason) that a fused part runs eager instead."""
    if torch.compiler.is_compiling():
        return
    key = (part, reason)
    if key not in _logged:
        _logged.add(key)
        logger.warning("hifuse: fused %s runs eager: %s", part, reason)


def run_fused(part: str, module, *args):
    """``module.forward_fused(*args)`` when ``part`` is switched on and
    ``module.fused_unsupported_reason(*args)`` finds nothing against it; otherwise None
    (after logging the reason once), and the module runs its eager code."""
    if not is_fused(part):
        return None
    reason = module.fused_unsupported_reason(*args)
    if reason is not None:
        log_fallback(part, reason)
        return None
    return module.forward_fused(*args)
