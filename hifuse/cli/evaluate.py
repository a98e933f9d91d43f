"""``hifuse evaluate``: the field's metrics of a checkpoint on an image folder or a label CSV."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import torch

from .. import config
from . import data as data_
from . import metrics as metrics_
from . import models, options, preprocess
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="metrics of a checkpoint on DIR/<split>/<class>/* or a label CSV",
                       formatter_class=options.Formatter,
                       description="Accuracy, balanced accuracy, macro precision/recall/F1, ROC-AUC, per-class "
                                   "sensitivity/specificity, the confusion matrix, ROC curves and every image's prediction.")
    p.add_argument("--data", help="DIR holding <split>/<class>/* (or class folders directly)")
    options.add_csv(p)
    p.add_argument("--split", help="sub-folder of DIR to evaluate (default: test, else val, else DIR itself)")
    p.add_argument("--out", help="folder for metrics.json, predictions.csv and the plots (default: eval-<split> beside the checkpoint)")
    options.add_inference(p)
    p.add_argument("--strict", action="store_true", help="unreadable images are an error, not skipped")
    p.set_defaults(run=run)


def class_list(loaded: models.Loaded, found: list[str], where: str, checkpoint: str) -> list[str]:
    """The checkpoint's class names, checked against the data's. Labels are mapped by name;
    where the names are unknown, the data's names cannot be matched to the model's outputs."""
    fine_tune = f"to train it on these classes, fine-tune with: hifuse train --init {checkpoint} ..."
    classes = loaded.classes
    if classes is None:
        n = loaded.model.num_classes
        if len(found) != n:
            raise CliError(f"{checkpoint} has {n} classes but {where} has {len(found)}; {fine_tune}")
        raise CliError(
            f"{checkpoint} has no class names (no classes.json beside it), so {where}'s classes ({', '.join(found)}) "
            f"cannot be matched to its {n} outputs: pass --classes with the names in the checkpoint's order "
            f"(a JSON list or NAME,NAME,...; for example --classes {','.join(found)} if it was trained on them in that order)"
        )
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise CliError(
            f"{checkpoint} was trained for {len(classes)} classes ({', '.join(classes)}); {where} has "
            f"others ({', '.join(unknown)}); {fine_tune}"
        )
    return classes


def samples_of(args, loaded: models.Loaded) -> tuple[data_.Samples, str]:
    """The images to evaluate with indices into the checkpoint's classes, and the split's name."""
    if args.images or args.labels:
        samples = data_.read_csv_form(args, "--data DIR" if args.data else None)
        found = [samples.classes[i] for i in sorted(set(samples.labels))]
        classes = class_list(loaded, found, str(args.labels), args.checkpoint)
        return samples.relabel(classes), Path(args.labels).stem
    if not args.data:
        raise CliError("give --data DIR or --images DIR --labels CSV")
    root = data_.eval_root(args.data, args.split)
    classes = class_list(loaded, data_.class_folders(root), str(root), args.checkpoint)
    return data_.scan_folder(root, classes, allow_empty=True), root.name


def run(args) -> int:
    device = models.device_of(args.device)
    loaded = models.load_for_inference(args.checkpoint, args.classes, device, args.trust_checkpoint)
    pre = preprocess.resolve(loaded.settings, args.img_size, args.bit_depth)
    samples, split = samples_of(args, loaded)
    out = Path(args.out) if args.out else loaded.path.resolve().parent / f"eval-{split}"
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; name a folder")
    samples = data_.check_images(samples, args.strict, args.workers, "evaluation", pre.bit_depth)
    data_.warn_missing(samples, f"the {split} split")
    classes = samples.classes
    loader = torch.utils.data.DataLoader(
        data_.ImageDataset(samples, preprocess.eval_transform(pre), bit_depth=pre.bit_depth), args.batch_size,
        num_workers=args.workers,
    )
    with config.use_fused(args.fused), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*samples in target.*")
        m, _loss, _seen, probs = metrics_.run_over(loaded.model, loader, len(classes), device,
                                                  options.autocast(args.amp, device), keep=True, curves=True)
    res = metrics_.result(m, classes)
    print(metrics_.table(res))
    out.mkdir(parents=True, exist_ok=True)
    title = f"{loaded.run_name} on {split} ({pre.describe()})"
    metrics_.confusion_png(res, out / "confusion_matrix.png", title)
    wrote = ["metrics.json", "predictions.csv", "confusion_matrix.png"]
    if metrics_.roc_png(res, out / "roc.png", title):
        wrote.append("roc.png")
    res.pop("_roc", None)
    res.update(checkpoint=str(loaded.path.resolve()), split=split, preprocess=pre.to_dict(),
               data=str(Path(args.data or args.images).resolve()))
    if args.labels:
        res["labels"] = str(Path(args.labels).resolve())
    (out / "metrics.json").write_text(json.dumps(res, indent=1) + "\n")
    write_predictions(out / "predictions.csv", samples, probs)
    print(f"wrote {', '.join(wrote)} to {out}")
    return 0


def write_predictions(path: Path, samples: data_.Samples, probs: torch.Tensor) -> None:
    """One row per image: its path, true and predicted class, and every class's probability."""
    classes = samples.classes
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "true", "predicted", "correct", *(f"p_{c}" for c in classes)])
        for p, y, row in zip(samples.paths, samples.labels, probs.tolist()):
            guess = max(range(len(row)), key=row.__getitem__)
            w.writerow([str(p), classes[y], classes[guess], int(guess == y), *(f"{v:.6f}" for v in row)])
