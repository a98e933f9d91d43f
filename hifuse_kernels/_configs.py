"""Launch configurations (tiles, warps, stages) of the Triton kernels, tuned per device.

A launcher computes its default configuration as before and asks ``launch_config`` for the
one to use: an entry of the table ``configs.json`` (shipped in this package, written by
``scripts/sweep_configs.py`` on a GPU), keyed by device and shape class, overrides it. A
miss, another device, or a table that cannot be read gives the default unchanged, so the
kernels launch as they always did until a sweep has written entries for this device. An
entry that a launcher would run wrongly (an unknown key, a tile that is not a power of two)
is ignored with a warning.

The table::

    {"format": 1,
     "devices": {"NVIDIA H100 80GB HBM3|9.0|132": {
         "sweep": {...how it was tuned...},
         "kernels": {"window_attention.forward": {"bf16/c96/d32/w7": {"BM": 32, "num_warps": 4}}}}}}

A device key is "name|major.minor|SM count"; under the Triton interpreter it is
"interpreter" (the shipped table has no such entry). A shape class is a short,
batch-independent string each launcher derives from its shape (dtype, channels, head dim,
window). ``HIFUSE_CONFIGS=<file>`` reads that table instead of the shipped one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import _triton

FORMAT = 1
TABLE = Path(__file__).with_name("configs.json")
ENV_VAR = "HIFUSE_CONFIGS"
INTERPRETER = "interpreter"
# Keys an entry may set besides the default's: Triton's software pipelining depth.
EXTRA_KEYS = ("num_stages",)

__all__ = ["ConfigWarning", "device_key", "entry_problem", "forced", "launch_config", "load", "save", "table_path"]


class ConfigWarning(UserWarning):
    """A table entry (or a forced configuration) that was ignored."""


_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype, str(dtype).removeprefix("torch."))


def table_path() -> Path:
    return Path(os.environ.get(ENV_VAR) or TABLE)


@functools.lru_cache(maxsize=None)
def _cuda_key(index: int) -> str:
    props = torch.cuda.get_device_properties(index)
    return f"{props.name}|{props.major}.{props.minor}|{props.multi_processor_count}"


def device_key(device: torch.device) -> str | None:
    """The table's key for the device a launch runs on; None where no table applies."""
    if _triton.interpreting():
        return INTERPRETER
    if device.type != "cuda":
        return None
    return _cuda_key(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"hifuse_kernels: cannot read the launch configuration table {path} ({err}); "
                      "using the default configurations", ConfigWarning, stacklevel=3)
        return {}
    if not isinstance(table, dict) or table.get("format") != FORMAT or not isinstance(table.get("devices"), dict):
        warnings.warn(f"hifuse_kernels: {path} is not a launch configuration table of format {FORMAT}; "
                      "using the default configurations", ConfigWarning, stacklevel=3)
        return {}
    return table["devices"]


def load(path: str | os.PathLike | None = None) -> dict:
    """{device key: {"sweep": ..., "kernels": {kernel: {shape class: entry}}}} of a table
    (default: ``table_path()``); {} when there is none."""
    return _load(str(path or table_path()))


def reload() -> None:
    """Forget what was read and chosen: a table rewritten in place is read again."""
    _load.cache_clear()
    _chosen.clear()


def save(path: str | os.PathLike, device: str, kernels: dict, sweep: dict | None = None) -> None:
    """Write ``kernels`` ({kernel: {shape class: entry, or None to remove it}}) as ``device``'s
    entries of the table at ``path``, over those it has, keeping the other devices'; ``sweep``
    (how they were tuned) replaces the device's, its "results" merged over the old ones."""
    path = Path(path)
    devices = dict(_load(str(path))) if path.exists() else {}
    before = devices.get(device, {})
    merged = {k: dict(v) for k, v in before.get("kernels", {}).items()}
    for kernel, classes in kernels.items():
        for shape_class, entry in classes.items():
            if entry is None:
                merged.get(kernel, {}).pop(shape_class, None)
            else:
                merged.setdefault(kernel, {})[shape_class] = entry
    sweep = dict(sweep or {})
    results = {k: dict(v) for k, v in before.get("sweep", {}).get("results", {}).items()}
    for kernel, classes in sweep.get("results", {}).items():
        results.setdefault(kernel, {}).update(classes)
    if results:
        sweep["results"] = results
    devices[device] = {"sweep": sweep,
                       "kernels": {k: dict(sorted(v.items())) for k, v in sorted(merged.items()) if v}}
    path.write_text(json.dumps({"format": FORMAT, "devices": dict(sorted(devices.items()))}, indent=1) + "\n")
    reload()


def power_of_two_problem(config: dict, *names: str, low: int = 1, high: int | None = None) -> str | None:
    """Why ``config[name]`` is not a power of two in [low, high] for one of ``names``, or None."""
    for name in names:
        v = config[name]
        if v & (v - 1) or v < low or (high is not None and v > high):
            bound = f" in [{low}, {high}]" if high is not None else (f" >= {low}" if low > 1 else "")
            return f"{name}={v} must be a power of two{bound}"
    return None


def entry_problem(entry, default: dict, check: Callable[[dict], str | None] | None = None) -> str | None:
    """Why a launcher with ``default`` and ``check`` would ignore ``entry``, or None."""
    if not isinstance(entry, dict):
        return f"an entry must be a JSON object, got {type(entry).__name__}"
    unknown = sorted(set(entry) - set(default) - set(EXTRA_KEYS))
    if unknown:
        return f"unknown keys {unknown} (this launch takes {sorted(set(default) | set(EXTRA_KEYS))})"
    for name, v in entry.items():
        if type(v) is not int or v < 1:
            return f"{name}={v!r} must be a positive integer"
    config = {**default, **entry}
    problem = power_of_two_problem(config, "num_warps", high=32) if "num_warps" in config else None
    if problem is None and config.get("num_stages", 1) > 8:
        problem = f"num_stages={config['num_stages']} must be at most 8"
    return problem if problem is not None or check is None else check(config)


# (table, device, kernel, shape class, default) -> the configuration chosen
_chosen: dict[tuple, dict] = {}
# kernel -> entry forced over the table, whatever the device (the sweep's candidates)
_forced: dict[str, dict] = {}


def _choose(entry, default: dict, check, where: str) -> dict:
    problem = entry_problem(entry, default, check)
    if problem is not None:
        warnings.warn(f"hifuse_kernels: ignoring the launch configuration {entry} of {where}: {problem}; "
                      f"launching with the default {default}", ConfigWarning, stacklevel=4)
        return default
    return {**default, **entry}


def _entry(devices: dict, keys: tuple, path: str):
    """devices[key]["kernels"][kernel][shape class], or None; a level that is not a JSON
    object is warned of and taken for a miss."""
    node = devices
    for depth, k in enumerate(keys):
        if not isinstance(node, dict):
            warnings.warn(f"hifuse_kernels: {path}: {'/'.join(keys[:depth])} is not a JSON object; using the "
                          "default launch configuration", ConfigWarning, stacklevel=4)
            return None
        node = node.get(k)
        if node is None:
            return None
    return node


def launch_config(kernel: str, shape_class: str, default: dict, device: torch.device,
                  check: Callable[[dict], str | None] | None = None) -> dict:
    """The launch configuration of ``kernel`` for this shape class on ``device``: the table's
    entry over ``default``, or ``default`` itself. ``check`` says why a full configuration
    would launch wrongly (None when it would not); such an entry is ignored with a warning.
    Answers are cached: the launch path pays a dictionary lookup."""
    if _forced:
        entry = _forced.get(kernel)
        if entry is not None:
            return _choose(entry, default, check, f"{kernel} [{shape_class}] (forced)")
    key = device_key(device)
    if key is None:
        return default
    path = os.environ.get(ENV_VAR) or str(TABLE)
    cache_key = (path, key, kernel, shape_class, tuple(default.items()))
    config = _chosen.get(cache_key)
    if config is None:
        entry = _entry(_load(path), (key, "kernels", kernel, shape_class), path)
        config = default if entry is None else _choose(entry, default, check, f"{kernel} [{shape_class}] in {path}")
        _chosen[cache_key] = config
    return config


@contextlib.contextmanager
def forced(configs: dict[str, dict]):
    """Launch the kernels named in ``configs`` with those entries (over their defaults) inside
    the block, whatever the table says; an empty entry launches the default."""
    before = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(before)
