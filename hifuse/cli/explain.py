"""``hifuse explain``: Grad-CAM of a class over an image, on the last fusion block's output.

The model sees what ``predict`` sees (the same decoding and evaluation transform), so the
probability shown is the one ``predict`` prints. The picture puts the whole image, with the
region the model saw outlined, beside that region with the heat map over it, a colour bar, and
the class with its probability.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import config
from . import data as data_
from . import models, options, preprocess
from .errors import CliError

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
EXTENSION = {"png": ".png", "jpeg": ".jpg"}


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heat map of the predicted (or named) class",
                       formatter_class=options.Formatter,
                       description="Grad-CAM (Selvaraju et al.) on the last fusion block, drawn over the image. "
                                   "IMAGE may be a folder: then --out is a folder and every image gets a picture.")
    p.add_argument("image", help="an image, or a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="picture to write (.png, .jpg), or a folder for a folder of images")
    p.add_argument("--format", choices=["png", "jpeg"], help="picture format (default: from --out's extension, else png)")
    p.add_argument("--class", dest="class_name", help="class to explain (default: the predicted one)")
    p.add_argument("--alpha", type=float, default=0.45, help="heat-map opacity")
    options.add_inference(p, batch=False)
    p.set_defaults(run=run)


def grad_cam(model, x: torch.Tensor, target: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(cam in [0, 1] at the input's resolution, the class explained, the class probabilities).

    The map is relu(sum_c w_c A_c) over the last fusion block's channels A_c, each weighted by
    the mean gradient of the class logit over its pixels."""
    saved = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        saved["a"] = output

    handle = model.fusion_blocks[-1].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(x)
            target = int(logits.argmax(1)) if target is None else target
            model.zero_grad(set_to_none=True)
            logits[0, target].backward()
    finally:
        handle.remove()
    a = saved["a"]
    weights = a.grad.mean((2, 3), keepdim=True)
    cam = torch.relu((weights * a).sum(1, keepdim=True)).detach().float()  # float32 under autocast too
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam, target, logits.detach().float().softmax(1)[0]


def explain_image(model, path: Path, pre: preprocess.Preprocess, target: int | None, device):
    """(the decoded image, cam over the model's crop, class explained, probabilities)."""
    image = preprocess.decode(path, pre.bit_depth)
    x = preprocess.eval_transform(pre)(image)[None].to(device)
    cam, target, probs = grad_cam(model, x, target)
    return image, cam.cpu(), target, probs.cpu()


def draw(image, cam: torch.Tensor, pre: preprocess.Preprocess, alpha: float, title: str, path: Path, fmt: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle
    from PIL import Image

    left, top, right, bottom = preprocess.crop_box(image.size, pre)
    box = tuple(round(v) for v in (max(0, left), max(0, top), min(image.width, right), min(image.height, bottom)))
    region = np.asarray(image.crop(box), dtype=np.float32) / 255.0
    heat = np.asarray(Image.fromarray((cam.numpy() * 255).astype(np.uint8)).resize(
        (region.shape[1], region.shape[0]), Image.BILINEAR), dtype=np.float32) / 255.0

    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2), dpi=100, gridspec_kw=dict(width_ratios=[1, 1.08]))
    axes[0].imshow(np.asarray(image))
    axes[0].add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="white", linewidth=1.5,
                                linestyle="--"))
    axes[0].set_title(f"input {image.width}x{image.height} (dashed: what the model sees)", fontsize=9)
    axes[1].imshow(region)
    shown = axes[1].imshow(heat, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM, last fusion block", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label="relevance")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format=fmt)
    plt.close(fig)


def output_format(out: Path, fmt: str | None) -> tuple[Path, str]:
    """The file to write and its format: --format, else the extension; a missing extension gets
    the format's."""
    ext = out.suffix.lower()
    if ext and ext not in FORMATS:
        raise CliError(f"--out {out}: unknown picture extension {ext!r}; use .png or .jpg (or name a folder)")
    if fmt is None:
        fmt = FORMATS.get(ext, "png")
    elif ext and FORMATS[ext] != fmt:
        raise CliError(f"--out {out} has extension {ext} but --format is {fmt}")
    return (out if ext else out.with_name(out.name + EXTENSION[fmt])), fmt


def run(args) -> int:
    if not 0 <= args.alpha <= 1:
        raise CliError(f"--alpha must be within [0, 1], got {args.alpha}")
    source, out = Path(args.image), Path(args.out)
    if not source.exists():
        raise CliError(f"no such image: {source}")
    device = models.device_of(args.device)
    loaded = models.load_for_inference(args.checkpoint, args.classes, device, args.trust_checkpoint)
    pre = preprocess.resolve(loaded.settings, args.img_size, args.bit_depth)
    classes = loaded.names
    target = None
    if args.class_name is not None:
        if args.class_name not in classes:
            raise CliError(f"--class {args.class_name!r} is not one of {', '.join(classes)}")
        target = classes.index(args.class_name)
    fmt = args.format or "png"
    if source.is_dir():
        if out.exists() and not out.is_dir():
            raise CliError(f"--out {out} is a file; for a folder of images name a folder")
        files = data_.image_files([str(source)])
        jobs = [(f, out / f.relative_to(source).with_name(f.stem + "_cam" + EXTENSION[fmt])) for f in files]
    else:
        if out.is_dir():
            target_path = out / (source.stem + "_cam" + EXTENSION[fmt])
        else:
            target_path, fmt = output_format(out, args.format)
        jobs = [(source, target_path)]
    failed = []
    for path, dest in jobs:
        try:
            with config.use_fused(args.fused), torch.autocast(**options.autocast(args.amp, device)):
                image, cam, k, probs = explain_image(loaded.model, path, pre, target, device)
        except Exception as e:  # PIL's many error types
            if len(jobs) == 1:
                raise CliError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
            failed.append(path)
            print(f"{path}: cannot read: {type(e).__name__}: {e}")
            continue
        title = f"{path.name}: {classes[k]} (probability {float(probs[k]):.4f})"
        draw(image, cam, pre, args.alpha, title, dest, fmt)
        print(f"{path}: {classes[k]} (probability {float(probs[k]):.4f}); Grad-CAM written to {dest}")
    if failed and len(failed) == len(jobs):
        raise CliError(f"cannot read any of the {len(jobs)} images")
    return 0
