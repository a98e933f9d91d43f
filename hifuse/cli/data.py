"""Image datasets of the command line: class folders or an ISIC-style CSV, checked up front.

Every image is decoded once before training (in threads), so an unreadable or truncated file
is reported by name at the start, not as a crash in the middle of an epoch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CliError

logger = logging.getLogger("hifuse")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The published recipe: eval images are resized to 1.143x the crop side, then centre-cropped.
EVAL_RESIZE = 1.143


@dataclass
class Samples:
    """Image paths with their class indices, and the class names."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: list[int]) -> "Samples":
        return Samples([self.paths[i] for i in index], [self.labels[i] for i in index], self.classes)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def scan_folder(root: Path, classes: list[str] | None = None, allow_empty: bool = False) -> Samples:
    """``root/<class>/*`` images; class names from the folders unless given (a second split
    must have the first split's classes, and may lack images of some)."""
    if not root.is_dir():
        raise CliError(f"no such folder: {root}")
    found = class_folders(root)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise CliError(f"{root} has classes the training split lacks: {', '.join(unknown)}")
    paths, labels, empty = [], [], []
    for index, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if is_image(p)) if folder.is_dir() else []
        if not files:
            empty.append(name)
        paths += files
        labels += [index] * len(files)
    if empty and not allow_empty:
        raise CliError(f"class without images in {root}: {', '.join(empty)}")
    if not paths:
        raise CliError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Samples(paths, labels, classes)


def read_label_csv(images: Path, labels_csv: Path) -> Samples:
    """ISIC form: first column the image name, then one-hot class columns (ISIC 2018's
    ``image,MEL,NV,...``) or a single column named ``label`` holding class names."""
    if not images.is_dir():
        raise CliError(f"no such folder: {images}")
    if not labels_csv.is_file():
        raise CliError(f"no such file: {labels_csv}")
    with open(labels_csv, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise CliError(f"{labels_csv}: expected a header and rows of 'image,<classes...>' or 'image,label'")
    header, rows = [h.strip() for h in rows[0]], [r for r in rows[1:] if any(c.strip() for c in r)]
    by_stem = {}
    for p in images.rglob("*"):
        if is_image(p):
            by_stem.setdefault(p.stem, p)
            by_stem.setdefault(p.name, p)
    if header[1].lower() == "label" and len(header) == 2:
        classes = sorted({r[1].strip() for r in rows if len(r) > 1})
        names = [r[1].strip() for r in rows]
    else:
        classes = header[1:]
        names = []
        for line, r in enumerate(rows, start=2):
            try:
                values = [float(v) for v in r[1 : len(header)]]
            except ValueError:
                raise CliError(f"{labels_csv}:{line}: class columns must be 0/1 values") from None
            if len(values) != len(classes) or sum(v > 0.5 for v in values) != 1:
                raise CliError(f"{labels_csv}:{line}: expected exactly one class set to 1")
            names.append(classes[max(range(len(values)), key=values.__getitem__)])
    paths, labels, missing = [], [], []
    for r, name in zip(rows, names):
        path = by_stem.get(r[0].strip())
        if path is None:
            missing.append(r[0].strip())
            continue
        paths.append(path)
        labels.append(classes.index(name))
    if missing:
        raise CliError(
            f"{len(missing)} images named in {labels_csv} are not in {images} (first: {', '.join(missing[:3])})"
        )
    empty = [c for i, c in enumerate(classes) if i not in set(labels)]
    if empty:
        raise CliError(f"class without images in {labels_csv}: {', '.join(empty)}")
    return Samples(paths, labels, classes)


def split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """A seeded split per class (stratified): ``fraction`` of each class goes to validation."""
    if not 0 < fraction < 1:
        raise CliError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    train, val = [], []
    for c in range(len(samples.classes)):
        index = [i for i, label in enumerate(samples.labels) if label == c]
        rng.shuffle(index)
        cut = max(1, round(len(index) * fraction)) if len(index) > 1 else 0
        val += index[:cut]
        train += index[cut:]
    return samples.subset(sorted(train)), samples.subset(sorted(val))


def _decode_problem(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
        return None
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}"


def check_images(samples: Samples, strict: bool, workers: int, what: str) -> Samples:
    """Decode every image once; unreadable ones are listed and skipped (an error if strict)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        problems = list(pool.map(_decode_problem, samples.paths))
    bad = [(p, why) for p, why in zip(samples.paths, problems) if why]
    if not bad:
        return samples
    listing = "\n".join(f"  {p}: {why}" for p, why in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    if strict:
        raise CliError(f"{len(bad)} unreadable images in {what} (--strict):\n{listing}")
    warnings.warn(f"skipping {len(bad)} unreadable images in {what}:\n{listing}", stacklevel=2)
    keep = [i for i, why in enumerate(problems) if not why]
    kept = samples.subset(keep)
    empty = [c for i, c in enumerate(kept.classes) if i not in set(kept.labels)]
    if empty and what == "train":
        raise CliError(f"class without readable images in {what}: {', '.join(empty)}")
    return kept


def load_splits(args) -> tuple[Samples, Samples]:
    """Training and validation samples from --data (folders) or --images/--labels (CSV)."""
    if args.images or args.labels:
        if not (args.images and args.labels):
            raise CliError("--images and --labels go together (the ISIC CSV form)")
        if args.val_split is None:
            raise CliError("the CSV form needs --val-split (the fraction of images kept for validation)")
        return split(read_label_csv(Path(args.images), Path(args.labels)), args.val_split, args.seed)
    if not args.data:
        raise CliError("give --data DIR (DIR/train/<class>/..., DIR/val/<class>/...) or --images and --labels")
    root = Path(args.data)
    if not root.is_dir():
        raise CliError(f"no such folder: {root}")
    train_root = root / "train" if (root / "train").is_dir() else root
    train = scan_folder(train_root)
    if args.val_split is not None:
        return split(train, args.val_split, args.seed)
    if not (root / "val").is_dir():
        raise CliError(f"{root} has no val folder: add {root}/val/<class>/... or pass --val-split 0.2")
    return train, scan_folder(root / "val", train.classes, allow_empty=True)


def eval_root(data: str, split_name: str | None) -> Path:
    """``data/<split>``; without a split ``data/test``, else ``data/val``, else ``data`` itself."""
    root = Path(data)
    if not root.is_dir():
        raise CliError(f"no such folder: {root}")
    if split_name is not None:
        if not (root / split_name).is_dir():
            raise CliError(f"no such folder: {root / split_name}")
        return root / split_name
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return root


def class_folders(root: Path) -> list[str]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise CliError(f"{root} holds no class folders (expected {root}/<class>/<image>)")
    return found


def transforms(img_size: int, train: bool):
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    if train:
        return T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(), *normalize])
    return T.Compose([T.Resize(int(img_size * EVAL_RESIZE)), T.CenterCrop(img_size), *normalize])


def open_rgb(path: Path):
    """The image as RGB (grayscale, palette and RGBA images converted)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class ImageDataset(torch.utils.data.Dataset):
    """Samples as (image tensor, label). With a seed, each image's random augmentation depends
    only on (seed, epoch, index): the same whatever the worker count, rank count or resume."""

    def __init__(self, samples: Samples, transform, seed: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = open_rgb(self.samples.paths[i])
        if self.seed is None:
            x = self.transform(image)
        else:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{i}".encode(), digest_size=8).digest()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
                x = self.transform(image)
        return x, self.samples.labels[i]


def image_files(inputs: list[str]) -> list[Path]:
    """Images named on the command line, folders searched recursively, in a stable order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image(q))
            if not found:
                raise CliError(f"{p} holds no images")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise CliError(f"no such file or folder: {p}")
    return files


def check_img_size(size: int) -> None:
    if size <= 0 or size % 32:
        raise CliError(f"--img-size must be a positive multiple of 32 (HiFuse halves it five times), got {size}")


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)
