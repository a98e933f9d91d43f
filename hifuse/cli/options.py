"""Options several commands share, defined once so they read and default alike."""

from __future__ import annotations

import argparse

import torch

from . import data as data_

AMP = ("bf16", "fp16", "none")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default."""


def add_csv(p, group: bool = False) -> None:
    """The label-CSV form: an image folder and a CSV naming each image's class."""
    p.add_argument("--images", help="image folder of the label-CSV form (with --labels)")
    p.add_argument("--labels", help="label CSV: image name, then one-hot class columns, a 'label' column or --label-column")
    p.add_argument("--id-column", help="CSV column naming the image (default: the first), e.g. image_id (HAM10000)")
    p.add_argument("--label-column", help="CSV column holding class names, e.g. dx (HAM10000); default: one-hot columns or 'label'")
    if group:
        p.add_argument("--group-column", help="CSV column grouping images (lesion_id, patient): --val-split keeps a group on one side")
    p.add_argument("--keep-empty-classes", action="store_true",
                   help="keep one-hot classes without images (ISIC 2019's UNK) instead of dropping them with a warning")


def add_inference(p, batch: bool = True) -> None:
    """Reading a checkpoint and preprocessing as its run did."""
    p.add_argument("--checkpoint", required=True, help="best_model.pth, last.pth or a published checkpoint")
    p.add_argument("--classes", help="class names in the checkpoint's order: a JSON list file or NAME,NAME,... "
                                     "(default: classes.json beside the checkpoint)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint that holds Python objects besides tensors (runs code from the file: trusted files only)")
    p.add_argument("--img-size", type=int, help="input side (default: the run's settings.json, else 224)")
    p.add_argument("--bit-depth", type=int, help="bits of 16-bit-container images, e.g. 12 (default: the run's, else the file's)")
    if batch:
        p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
        p.add_argument("--workers", type=int, default=data_.default_workers(), help="data loading processes")
    add_device(p)


def add_device(p) -> None:
    p.add_argument("--amp", choices=AMP, help="autocast dtype (default: bf16 on a GPU, none on CPU)")
    p.add_argument("--fused", action="store_true", help="fused kernels")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present)")


def autocast(amp: str | None, device: torch.device) -> dict:
    amp = amp or ("bf16" if device.type == "cuda" else "none")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
