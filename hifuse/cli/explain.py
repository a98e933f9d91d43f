"""``hifuse explain``: Grad-CAM of a class over an image, on the last fusion block's output."""

from __future__ import annotations

from pathlib import Path

import torch

from . import data as data_
from . import models
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heat map of the predicted (or named) class",
                       description="Grad-CAM (Selvaraju et al.) on the last fusion block, drawn over the image.")
    p.add_argument("image")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="PNG to write, the size of the input image")
    p.add_argument("--class", dest="class_name", help="class to explain (default: the predicted one)")
    p.add_argument("--classes", help="classes.json (default: the one beside the checkpoint)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--alpha", type=float, default=0.45, help="heat-map opacity")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
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
    cam = torch.relu((weights * a).sum(1, keepdim=True)).detach()
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    return cam, target, logits.detach().float().softmax(1)[0]


def run(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image
    from torchvision.transforms import functional as TF

    data_.check_img_size(args.img_size)
    if not 0 <= args.alpha <= 1:
        raise CliError(f"--alpha must be within [0, 1], got {args.alpha}")
    device = models.device_of(args.device)
    model, classes = models.load_for_inference(args.checkpoint, args.classes, device)
    classes = classes or [f"class_{i}" for i in range(model.num_classes)]
    target = None
    if args.class_name is not None:
        if args.class_name not in classes:
            raise CliError(f"--class {args.class_name!r} is not one of {', '.join(classes)}")
        target = classes.index(args.class_name)
    path = Path(args.image)
    if not path.is_file():
        raise CliError(f"no such image: {path}")
    try:
        image = data_.open_rgb(path)
    except Exception as e:
        raise CliError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    # the whole image at the model's size (no crop), so the map lies over all of it
    x = TF.normalize(TF.to_tensor(image.resize((args.img_size, args.img_size), Image.BILINEAR)), [0.5] * 3, [0.5] * 3)
    cam, target, probs = grad_cam(model, x[None].to(device), target)
    cam = Image.fromarray((cam.cpu().numpy() * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    heat = colormaps["jet"](np.asarray(cam, dtype=np.float32) / 255.0)[..., :3]
    base = np.asarray(image, dtype=np.float32) / 255.0
    blended = (1 - args.alpha) * base + args.alpha * heat
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(args.out)
    print(f"{path}: {classes[target]} (probability {float(probs[target]):.4f}); Grad-CAM written to {args.out}")
    return 0
