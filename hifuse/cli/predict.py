"""``hifuse predict``: the top classes of each image."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from pathlib import Path

import torch

from .. import config
from . import data as data_
from . import models, options, preprocess
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="top classes and probabilities of images", formatter_class=options.Formatter,
                       description="Classify images (files or folders, searched recursively, or the images of a label CSV).")
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_DIR", help="images, or folders searched recursively")
    options.add_csv(p)
    p.add_argument("--topk", type=int, default=3, help="classes shown per image")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="output format")
    options.add_inference(p)
    p.set_defaults(run=run)


class _Images(torch.utils.data.Dataset):
    """Files through the evaluation transform; an unreadable one yields its error instead."""

    def __init__(self, files, transform, bit_depth) -> None:
        self.files, self.transform, self.bit_depth = files, transform, bit_depth

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            return i, self.transform(preprocess.decode(self.files[i], self.bit_depth)), ""
        except Exception as e:  # PIL's many error types
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, why) for i, x, why in items if x is None]
    return ([i for i, _ in good], torch.stack([x for _, x in good]) if good else None, bad)


def predict(model, files, pre: preprocess.Preprocess, batch_size: int, device, autocast: dict | None = None,
            workers: int = 0) -> tuple[torch.Tensor, dict[int, str]]:
    """Class probabilities (float32, CPU; NaN rows for unreadable files) of each file, with the
    evaluation transform, and the unreadable files' errors by index."""
    loader = torch.utils.data.DataLoader(_Images(files, preprocess.eval_transform(pre), pre.bit_depth), batch_size,
                                         num_workers=workers, collate_fn=_collate)
    probs = torch.full((len(files), model.num_classes), float("nan"))
    errors: dict[int, str] = {}
    autocast = autocast or dict(device_type=torch.device(device).type, enabled=False)
    with torch.no_grad():
        for index, x, bad in loader:
            errors.update(bad)
            if x is not None:
                with torch.autocast(**autocast):
                    logits = model(x.to(device))
                probs[index] = logits.float().softmax(1).cpu()
    return probs, errors


def inputs_of(args) -> tuple[list[Path], dict[Path, str]]:
    """The files to classify, and their true classes where a label CSV names them."""
    if args.images or args.labels:
        s = data_.read_csv_form(args, "images on the command line" if args.inputs else None)
        return s.paths, {p: s.classes[y] for p, y in zip(s.paths, s.labels)}
    if not args.inputs:
        raise CliError("name images or folders to classify, or --images DIR --labels CSV")
    return data_.image_files(args.inputs), {}


def run(args) -> int:
    if args.topk <= 0:
        raise CliError(f"--topk must be positive, got {args.topk}")
    if args.batch_size <= 0:
        raise CliError(f"--batch-size must be positive, got {args.batch_size}")
    device = models.device_of(args.device)
    loaded = models.load_for_inference(args.checkpoint, args.classes, device, args.trust_checkpoint)
    pre = preprocess.resolve(loaded.settings, args.img_size, args.bit_depth)
    classes = loaded.names
    files, truth = inputs_of(args)
    unknown = sorted(set(truth.values()) - set(classes))
    if unknown and loaded.classes is not None:
        raise CliError(f"{args.labels} names classes the checkpoint lacks: {', '.join(unknown)}")
    with config.use_fused(args.fused):
        probs, errors = predict(loaded.model, files, pre, args.batch_size, device, options.autocast(args.amp, device),
                                args.workers)
    if errors:
        listing = "\n".join(f"  {files[i]}: {why}" for i, why in sorted(errors.items())[:20])
        if len(errors) == len(files):
            raise CliError(f"cannot read any of the {len(files)} images:\n{listing}")
        warnings.warn(f"cannot read {len(errors)} of {len(files)} images; the others are predicted:\n{listing}", stacklevel=2)
    k = min(args.topk, len(classes))
    rows = []
    for i, path in enumerate(files):
        row = {"image": str(path)}
        if truth:
            row["true"] = truth[path]
        if i in errors:
            row.update(top=[], error=errors[i])
        else:
            top = probs[i].topk(k)
            row["top"] = [{"class": classes[j], "probability": float(p)} for p, j in zip(top.values.tolist(), top.indices.tolist())]
        rows.append(row)
    write(rows, args.format, k, bool(truth))
    return 0


def write(rows: list[dict], fmt: str, k: int, with_truth: bool) -> None:
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["image"] + (["true"] if with_truth else []) +
                   [f"{kind}{r + 1}" for r in range(k) for kind in ("class", "probability")] + ["error"])
        for row in rows:
            guesses = [v for t in row["top"] for v in (t["class"], f"{t['probability']:.6f}")] or [""] * (2 * k)
            w.writerow([row["image"]] + ([row["true"]] if with_truth else []) + guesses + [row.get("error", "")])
    else:
        width = max(len("image"), *(len(r["image"]) for r in rows))
        for row in rows:
            guesses = "  ".join(f"{t['class']} {t['probability']:.4f}" for t in row["top"]) or f"unreadable: {row['error']}"
            truth = f"  (true: {row['true']})" if with_truth else ""
            print(f"{row['image']:<{width}}  {guesses}{truth}")
