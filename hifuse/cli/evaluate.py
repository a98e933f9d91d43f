"""``hifuse evaluate``: the paper's metrics of a checkpoint on an image folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import config
from . import data as data_
from . import metrics as metrics_
from . import models
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on DIR/<split>/<class>/*",
                       description="Accuracy, macro precision/recall/F1, per-class metrics and the confusion matrix.")
    p.add_argument("--data", required=True, help="DIR holding <split>/<class>/* (or class folders directly)")
    p.add_argument("--checkpoint", required=True, help="best_model.pth, last.pth or a published checkpoint")
    p.add_argument("--split", help="sub-folder of DIR to evaluate (default: test, else val, else DIR itself)")
    p.add_argument("--classes", help="classes.json (default: the one beside the checkpoint, else the folders)")
    p.add_argument("--out", help="where metrics.json and confusion_matrix.png go (default: beside the checkpoint, eval-<split>)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=data_.default_workers())
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast dtype (default: bf16 on a GPU, none on CPU)")
    p.add_argument("--fused", action="store_true", help="fused kernels")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error, not skipped")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.set_defaults(run=run)


def run(args) -> int:
    data_.check_img_size(args.img_size)
    device = models.device_of(args.device)
    model, classes = models.load_for_inference(args.checkpoint, args.classes, device)
    root = data_.eval_root(args.data, args.split)
    found = data_.class_folders(root)
    fine_tune = f"to train it on these classes, fine-tune with: hifuse train --init {args.checkpoint} ..."
    if classes is None:
        if len(found) != model.num_classes:
            raise CliError(f"{args.checkpoint} has {model.num_classes} classes but {root} has {len(found)}; {fine_tune}")
        classes = found
    elif set(found) - set(classes):
        raise CliError(
            f"{args.checkpoint} was trained for {len(classes)} classes ({', '.join(classes)}); {root} has "
            f"others ({', '.join(sorted(set(found) - set(classes)))}); {fine_tune}"
        )
    # label indices follow the checkpoint's class order
    samples = data_.scan_folder(root, classes, allow_empty=True)
    samples = data_.check_images(samples, args.strict, args.workers, "evaluation")
    loader = torch.utils.data.DataLoader(
        data_.ImageDataset(samples, data_.transforms(args.img_size, False)), args.batch_size, num_workers=args.workers
    )
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    autocast = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with config.use_fused(args.fused):
        m, _loss, _seen = metrics_.run_over(model, loader, len(classes), device, autocast)
    res = metrics_.result(m, classes)
    print(metrics_.table(res))
    split = root.name
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    res.update(checkpoint=str(Path(args.checkpoint).resolve()), data=str(Path(args.data).resolve()), split=split)
    (out / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
    metrics_.confusion_png(res, out / "confusion_matrix.png", f"{Path(args.checkpoint).name} on {split}")
    print(f"wrote {out / 'metrics.json'} and {out / 'confusion_matrix.png'}")
    return 0
