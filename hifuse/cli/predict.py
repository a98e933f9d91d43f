"""``hifuse predict``: the top classes of each image."""

from __future__ import annotations

import csv
import json
import sys

import torch

from .. import config
from . import data as data_
from . import models
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="top classes and probabilities of images",
                       description="Classify images (files or folders, searched recursively).")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--classes", help="classes.json (default: the one beside the checkpoint)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--fused", action="store_true", help="fused kernels")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.set_defaults(run=run)


def predict(model, files, img_size: int, batch_size: int, device) -> torch.Tensor:
    """Class probabilities (float32, CPU) of each file, with the evaluation transform."""
    transform = data_.transforms(img_size, False)
    probs = []
    for start in range(0, len(files), batch_size):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                batch.append(transform(data_.open_rgb(path)))
            except Exception as e:  # PIL's many error types
                raise CliError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
        with torch.no_grad():
            probs.append(model(torch.stack(batch).to(device)).float().softmax(1).cpu())
    return torch.cat(probs)


def run(args) -> int:
    data_.check_img_size(args.img_size)
    if args.topk <= 0:
        raise CliError(f"--topk must be positive, got {args.topk}")
    device = models.device_of(args.device)
    model, classes = models.load_for_inference(args.checkpoint, args.classes, device)
    classes = classes or [f"class_{i}" for i in range(model.num_classes)]
    files = data_.image_files(args.inputs)
    with config.use_fused(args.fused):
        probs = predict(model, files, args.img_size, args.batch_size, device)
    k = min(args.topk, len(classes))
    top = probs.topk(k, dim=1)
    rows = [
        {"image": str(path), "top": [{"class": classes[i], "probability": float(p)} for p, i in zip(ps.tolist(), ix.tolist())]}
        for path, ps, ix in zip(files, top.values, top.indices)
    ]
    if args.format == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
    elif args.format == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["image"] + [f"{kind}{r + 1}" for r in range(k) for kind in ("class", "probability")])
        for row in rows:
            w.writerow([row["image"]] + [v for t in row["top"] for v in (t["class"], f"{t['probability']:.6f}")])
    else:
        width = max(len("image"), *(len(r["image"]) for r in rows))
        for row in rows:
            guesses = "  ".join(f"{t['class']} {t['probability']:.4f}" for t in row["top"])
            print(f"{row['image']:<{width}}  {guesses}")
    return 0
