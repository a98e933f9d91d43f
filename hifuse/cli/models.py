"""Building models for the command line, and reading checkpoints back without being told the
architecture: it is read off the state_dict's shapes."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..model import VARIANTS, HiFuse, create_model
from .errors import CliError

DEFAULT_HEADS = (3, 6, 12, 24)
DEFAULT_DIMS = (96, 192, 384, 768)


def build(settings: dict, num_classes: int) -> HiFuse:
    """The model a run's settings describe (--model, --irmlp, --drop-path and the architecture
    overrides)."""
    overrides = {k: tuple(settings[k]) for k in ("depths", "dims") if settings.get(k)}
    if settings.get("heads"):
        overrides["num_heads"] = tuple(settings["heads"])
    if settings.get("drop_path"):
        overrides["drop_path_rate"] = overrides["local_drop_path_rate"] = settings["drop_path"]
    try:
        return create_model(settings["model"], num_classes=num_classes, irmlp=settings["irmlp"], **overrides)
    except ValueError as e:
        raise CliError(str(e)) from None


def architecture(state: dict[str, torch.Tensor]) -> dict:
    """HiFuse constructor arguments that give a model of this state_dict's shapes."""
    try:
        dims = [state["downsample_layers.0.0.weight"].shape[0]]
        dims += [state[f"downsample_layers.{i}.1.weight"].shape[0] for i in (1, 2, 3)]
        depths = []
        for i in range(4):
            blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.(\d+)\.dwconv\.weight$", k))}
            depths.append(len(blocks))
        heads = [state[f"layers{i + 1}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(4)]
        table = state["layers1.blocks.0.attn.relative_position_bias_table"].shape[0]
        depthwise = state["fu1.residual.conv1.conv.weight"].shape[1] == 1
        head = state.get("conv_head.weight")  # absent where the model had num_classes=0 (features only)
        return dict(
            num_classes=0 if head is None else head.shape[0],
            in_chans=state["downsample_layers.0.0.weight"].shape[1],
            dims=tuple(dims), depths=tuple(depths), num_heads=tuple(heads),
            window=(round(table**0.5) + 1) // 2, irmlp="depthwise" if depthwise else "full",
        )
    except (KeyError, IndexError) as e:
        raise CliError(f"the checkpoint is not a HiFuse state_dict (no {e})") from None


def variant_name(arch: dict) -> str:
    """The published variant these shapes are, or "custom"."""
    if arch["dims"] == DEFAULT_DIMS and arch["num_heads"] == DEFAULT_HEADS and arch["window"] == 7:
        for name, kwargs in VARIANTS.items():
            if tuple(kwargs["depths"]) == arch["depths"]:
                return name
    return "custom"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _untrusted_objects(e: Exception) -> str | None:
    """The Python object a weights-only load refused, if that is why it failed."""
    m = re.search(r"(?:Unsupported global|unsupported GLOBAL)[^\w]*(?:GLOBAL )?([\w.]+)", str(e))
    return m.group(1) if m else None


def load_file(path: str | Path, trust: bool = False):
    """torch.load of a checkpoint, weights only unless ``trust`` (which warns: the file's pickled
    objects run code)."""
    import warnings

    path = Path(path)
    if path.is_dir():
        raise CliError(f"{path} is a folder; name a checkpoint file such as {path / 'best_model.pth'}")
    if not path.is_file():
        raise CliError(f"no such checkpoint: {path}")
    if path.stat().st_size == 0:
        raise CliError(f"cannot read checkpoint {path}: the file is empty")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        objects = _untrusted_objects(e)
        if objects is None:
            raise CliError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line(e)}") from None
        if not trust:
            raise CliError(
                f"{path} holds Python objects besides tensors ({objects}; a torchvision reference-script checkpoint "
                "keeps its argparse.Namespace): if you trust the file, pass --trust-checkpoint to load it, which runs "
                "code the file names"
            ) from None
    warnings.warn(f"loading {path} with --trust-checkpoint: its pickled Python objects were run", stacklevel=2)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CliError(f"cannot read checkpoint {path}: {type(e).__name__}: {first_line(e)}") from None


def read_state(path: str | Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """The model state_dict in a checkpoint file: a bare state_dict (best_model.pth, the
    published format), a training checkpoint (last.pth), ``{"net": ...}`` or ``{"model": ...}``
    (torchvision's reference scripts)."""
    return _state_of(load_file(path, trust), path)


def _state_of(raw, path) -> dict[str, torch.Tensor]:
    try:
        return ckpt.extract_state_dict(raw)
    except ckpt.CheckpointMismatchError as e:
        raise CliError(f"{path}: {e}") from None


@dataclass
class Loaded:
    """A checkpoint ready for inference, with what its run knew: class names, preprocessing."""

    model: HiFuse
    classes: list[str] | None
    settings: dict | None
    path: Path

    @property
    def names(self) -> list[str]:
        """The class names, or class_0, class_1, ... where the run's are unknown."""
        return self.classes or [f"class_{i}" for i in range(self.model.num_classes)]

    @property
    def run_name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}" if self.path.parent.name else self.path.name


def run_context(path: Path, raw=None) -> tuple[list[str] | None, dict | None]:
    """Class names and settings saved with a checkpoint: inside a training checkpoint, else the
    run folder's classes.json and settings.json beside it."""
    classes = settings = None
    if isinstance(raw, dict):
        classes = raw.get("classes") if isinstance(raw.get("classes"), list) else None
        settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else None
    if classes is None:
        classes = read_classes(path.with_name("classes.json"), required=False)
    if settings is None and path.with_name("settings.json").is_file():
        try:
            settings = json.loads(path.with_name("settings.json").read_text())
        except json.JSONDecodeError as e:
            raise CliError(f"{path.with_name('settings.json')} is not JSON: {e}") from None
    return classes, settings


def load_for_inference(path: str | Path, classes_option: str | None, device: torch.device, trust: bool = False) -> Loaded:
    """A model in eval mode with the checkpoint's weights, its class names (``--classes``, else
    the run's) and the run's settings."""
    path = Path(path)
    raw = load_file(path, trust)
    state = _state_of(raw, path)
    model = HiFuse(**architecture(state))
    if model.num_classes == 0:
        raise CliError(f"{path} has no classifier (saved from a num_classes=0 model, which gives features): "
                       "predict, evaluate, explain and export need one")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CliError(f"{path} does not fit a HiFuse model: {first_line(e)}") from None
    saved_classes, settings = run_context(path, raw if isinstance(raw, dict) and "settings" in raw else None)
    classes = parse_classes(classes_option) if classes_option else saved_classes
    if classes is not None and len(classes) != model.num_classes:
        where = "--classes" if classes_option else "the run's class list"
        raise CliError(f"{path} has {model.num_classes} classes but {where} names {len(classes)}")
    return Loaded(model.to(device).eval(), classes, settings, path)


def parse_classes(option: str) -> list[str]:
    """--classes: a JSON list file, or names separated by commas."""
    if Path(option).is_file() or option.endswith(".json"):
        return read_classes(option, required=True)
    names = [c.strip() for c in option.split(",")]
    if len(names) < 2 or not all(names) or len(set(names)) != len(names):
        raise CliError(f"--classes: expected a JSON file or two or more distinct names separated by commas, got {option!r}")
    return names


def read_classes(path: str | Path, required: bool) -> list[str] | None:
    path = Path(path)
    if not path.is_file():
        if required:
            raise CliError(f"no such file: {path}")
        return None
    try:
        classes = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"{path} is not JSON: {e}") from None
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CliError(f"{path} must hold a JSON list of class names")
    if len(set(classes)) != len(classes):
        raise CliError(f"{path} names a class twice")
    return classes


def load_init(model: HiFuse, path: str, trust: bool = False) -> None:
    """--init: weights for fine-tuning; the classifier is the model's own."""
    state = read_state(path, trust)
    try:
        ckpt.load_state(model, state, drop_head=True, source=path)
    except ckpt.CheckpointMismatchError as e:
        title, first = (line.strip() for line in str(e).splitlines()[1:3])
        raise CliError(f"--init {path} does not fit --model: {title} first {first}") from None


def device_of(choice: str | None) -> torch.device:
    if choice:
        try:
            device = torch.device(choice)
        except RuntimeError as e:
            raise CliError(f"--device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CliError("--device cuda: no CUDA device here")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        return device
    # An index always: torch.cuda.set_device and the checkpoints' map_location need one.
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise CliError(f"--device {device}: this machine has {count} CUDA device{'s' if count != 1 else ''}")
    return torch.device("cuda", index)
