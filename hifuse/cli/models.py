"""Building models for the command line, and reading checkpoints back without being told the
architecture: it is read off the state_dict's shapes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..model import VARIANTS, HiFuse, create_model
from .errors import CliError

DEFAULT_HEADS = (3, 6, 12, 24)
DEFAULT_DIMS = (96, 192, 384, 768)


def build(settings: dict, num_classes: int) -> HiFuse:
    """The model a run's settings describe (--model, --irmlp and the architecture overrides)."""
    overrides = {k: tuple(settings[k]) for k in ("depths", "dims") if settings.get(k)}
    if settings.get("heads"):
        overrides["num_heads"] = tuple(settings["heads"])
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
        return dict(
            num_classes=state["conv_head.weight"].shape[0],
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


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict in a checkpoint file: a bare state_dict (best_model.pth, the
    published format), a training checkpoint (last.pth) or ``{"net": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"no such checkpoint: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CliError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    try:
        return ckpt.extract_state_dict(raw)
    except ckpt.CheckpointMismatchError as e:
        raise CliError(f"{path}: {e}") from None


def load_for_inference(path: str | Path, classes_file: str | None, device: torch.device) -> tuple[HiFuse, list[str] | None]:
    """A model in eval mode with the checkpoint's weights, and its class names: from
    ``classes_file``, else ``classes.json`` beside the checkpoint, else None."""
    state = read_state(path)
    model = HiFuse(**architecture(state))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CliError(f"{path} does not fit a HiFuse model: {str(e).splitlines()[0]}") from None
    classes = read_classes(classes_file or Path(path).with_name("classes.json"), required=classes_file is not None)
    if classes is not None and len(classes) != model.num_classes:
        raise CliError(f"{path} has {model.num_classes} classes but the class list names {len(classes)}")
    return model.to(device).eval(), classes


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
    return classes


def load_init(model: HiFuse, path: str) -> None:
    """--init: weights for fine-tuning; the classifier is the model's own."""
    read_state(path)  # a clear message for a missing or unreadable file
    try:
        ckpt.load_checkpoint(model, path, drop_head=True)
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
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
