"""Image datasets of the command line: class folders or a label CSV, checked up front.

Every image is decoded once before training (in threads), so an unreadable or truncated file
is reported by name at the start, not as a crash in the middle of an epoch. Labels are class
names; indices always follow one class list (the run's), so a split or a checkpoint whose
folders sort differently is mapped by name, never by position.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import preprocess
from .errors import CliError

logger = logging.getLogger("hifuse")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class Samples:
    """Image paths with their class indices, the class names and, where known, each image's
    group (lesion or patient) for a grouped split."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    groups: list[str] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: list[int]) -> "Samples":
        groups = [self.groups[i] for i in index] if self.groups is not None else None
        return Samples([self.paths[i] for i in index], [self.labels[i] for i in index], self.classes, groups)

    def counts(self) -> list[int]:
        c = Counter(self.labels)
        return [c.get(i, 0) for i in range(len(self.classes))]

    def missing_classes(self) -> list[str]:
        return [name for name, n in zip(self.classes, self.counts()) if n == 0]

    def relabel(self, classes: list[str], source: str = "the data") -> "Samples":
        """The same images with indices into ``classes`` (mapped by name); ``source`` names
        where they come from when one of their classes is not in ``classes``."""
        unknown = sorted(set(self.classes[i] for i in set(self.labels)) - set(classes))
        if unknown:
            raise CliError(f"{source} has classes the training labels lack: {', '.join(unknown)}")
        index = {name: classes.index(name) for name in self.classes if name in classes}
        return Samples(self.paths, [index[self.classes[i]] for i in self.labels], list(classes), self.groups)


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
    return Samples(paths, labels, list(classes))


# ----------------------------------------------------------------------------- label CSVs


@dataclass
class CsvForm:
    """How a label CSV is read: which column names the image, which holds the class (else
    one-hot columns), which groups images (lesion, patient)."""

    id_column: str | None = None
    label_column: str | None = None
    group_column: str | None = None
    keep_empty_classes: bool = False


def csv_form(args) -> CsvForm:
    return CsvForm(getattr(args, "id_column", None), getattr(args, "label_column", None),
                   getattr(args, "group_column", None), bool(getattr(args, "keep_empty_classes", False)))


def _column(header: list[str], name: str, option: str, path: Path) -> int:
    if name not in header:
        raise CliError(f"{path} has no column {name!r} ({option}); its columns: {', '.join(header)}")
    return header.index(name)


def read_label_csv(images: Path, labels_csv: Path, form: CsvForm | None = None) -> Samples:
    """A label CSV over an image folder. The image column is ``--id-column`` (default: the
    first); the class is ``--label-column`` (names; HAM10000's ``dx``), a column named
    ``label``, or one-hot columns (ISIC 2018/2019's ``image,MEL,NV,...``). One-hot classes with
    no image (ISIC 2019's all-zero ``UNK``) are dropped with a warning unless kept."""
    form = form or CsvForm()
    if not images.is_dir():
        raise CliError(f"no such folder: {images}")
    if not labels_csv.is_file():
        raise CliError(f"no such file: {labels_csv}")
    with open(labels_csv, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise CliError(f"{labels_csv}: expected a header and rows of 'image,<classes...>' or 'image,label'")
    header = [h.strip() for h in rows[0]]
    body = [(line, r) for line, r in enumerate(rows[1:], start=2) if any(c.strip() for c in r)]
    id_at = _column(header, form.id_column, "--id-column", labels_csv) if form.id_column else 0
    group_at = _column(header, form.group_column, "--group-column", labels_csv) if form.group_column else None
    label_at = None
    if form.label_column:
        label_at = _column(header, form.label_column, "--label-column", labels_csv)
    elif "label" in (h.lower() for h in header):
        label_at = [h.lower() for h in header].index("label")

    def cell(r: list[str], at: int, line: int) -> str:
        if at >= len(r):
            raise CliError(f"{labels_csv}:{line}: the row has {len(r)} columns, the header {len(header)}")
        return r[at].strip()

    if label_at is not None:
        names = []
        for line, r in body:
            name = cell(r, label_at, line)
            if not name:
                raise CliError(f"{labels_csv}:{line}: empty class in column {header[label_at]!r}")
            names.append(name)
        classes = sorted(set(names))
    else:
        onehot = [i for i in range(len(header)) if i not in (id_at, group_at)]
        classes = [header[i] for i in onehot]
        names = []
        for line, r in body:
            try:
                values = [float(cell(r, i, line)) for i in onehot]
            except ValueError:
                raise CliError(
                    f"{labels_csv}:{line}: class columns must be 0/1 values (a column of class names? "
                    "pass --label-column NAME, and --id-column NAME for the image column)"
                ) from None
            if sum(v > 0.5 for v in values) != 1:
                raise CliError(f"{labels_csv}:{line}: expected exactly one class set to 1")
            names.append(classes[max(range(len(values)), key=values.__getitem__)])
    by_stem: dict[str, Path] = {}
    for p in sorted(images.rglob("*")):
        if is_image(p):
            by_stem.setdefault(p.stem, p)
            by_stem.setdefault(p.name, p)
    paths, labels, groups, missing, seen = [], [], [], [], {}
    for (line, r), name in zip(body, names):
        image = cell(r, id_at, line)
        if image in seen:
            raise CliError(f"{labels_csv}:{line}: image {image} is listed twice (also on line {seen[image]})")
        seen[image] = line
        path = by_stem.get(image)
        if path is None:
            missing.append(image)
            continue
        paths.append(path)
        labels.append(classes.index(name))
        if group_at is not None:
            groups.append(cell(r, group_at, line) or f"{image} (no group)")
    if missing:
        raise CliError(
            f"{len(missing)} images named in {labels_csv} are not in {images} (first: {', '.join(missing[:3])})"
        )
    samples = Samples(paths, labels, classes, groups if group_at is not None else None)
    empty = samples.missing_classes()
    if empty and not form.keep_empty_classes:
        warnings.warn(f"{labels_csv}: dropping classes without images: {', '.join(empty)} (--keep-empty-classes keeps them)",
                      stacklevel=2)
        samples = samples.relabel([c for c in classes if c not in empty])
    return samples


def read_csv_form(args, other: str | None) -> Samples:
    """The label-CSV form of evaluate and predict, every class kept (a split may lack some);
    ``other`` names the other form's input when the user gave it too."""
    if other:
        raise CliError(f"give {other} or --images and --labels, not both")
    if not (args.images and args.labels):
        raise CliError("--images and --labels go together (the label-CSV form)")
    form = csv_form(args)
    form.keep_empty_classes = True
    return read_label_csv(Path(args.images), Path(args.labels), form)


# ----------------------------------------------------------------------------- splits


def split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """A seeded split per class (stratified): ``fraction`` of each class goes to validation.
    With groups (``--group-column``), whole groups go to one side: a lesion or patient is never
    on both, and groups are stratified by their most common class."""
    if not 0 < fraction < 1:
        raise CliError(f"--val-split must be between 0 and 1, got {fraction}")
    rng = random.Random(seed)
    if samples.groups is None:
        units = [[i] for i in range(len(samples))]
    else:
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(samples.groups):
            by_group.setdefault(g, []).append(i)
        units = [by_group[g] for g in sorted(by_group)]
    major = [Counter(samples.labels[i] for i in u).most_common(1)[0][0] for u in units]
    train, val = [], []
    for c in range(len(samples.classes)):
        mine = [u for u, m in zip(units, major) if m == c]
        rng.shuffle(mine)
        cut = max(1, round(len(mine) * fraction)) if len(mine) > 1 else 0
        val += [i for u in mine[:cut] for i in u]
        train += [i for u in mine[cut:] for i in u]
    return samples.subset(sorted(train)), samples.subset(sorted(val))


def warn_missing(samples: Samples, what: str) -> None:
    missing = samples.missing_classes()
    if missing:
        warnings.warn(f"{what} has no images of {', '.join(missing)}: their recall and AUC cannot be measured there",
                      stacklevel=2)


def load_splits(args) -> tuple[Samples, Samples]:
    """Training and validation samples: --data (folders), or --images/--labels (CSV) with
    --val-split or --val-labels."""
    form = csv_form(args)
    val_labels = getattr(args, "val_labels", None)
    if args.images or args.labels:
        if not (args.images and args.labels):
            raise CliError("--images and --labels go together (the label-CSV form)")
        samples = read_label_csv(Path(args.images), Path(args.labels), form)
        if val_labels:
            if args.val_split is not None:
                raise CliError("--val-labels and --val-split both choose the validation images: give one")
            val = read_label_csv(Path(getattr(args, "val_images", None) or args.images), Path(val_labels),
                                 CsvForm(form.id_column, form.label_column, None, True))
            train, val = samples, val.relabel(samples.classes, "--val-labels")
        elif args.val_split is None:
            raise CliError("the CSV form needs --val-split (the fraction of images kept for validation) or --val-labels CSV")
        else:
            train, val = split(samples, args.val_split, args.seed)
        _check_disjoint(train, val)
        warn_missing(val, "the validation split")
        return train, val
    if val_labels:
        raise CliError("--val-labels goes with the CSV form (--images and --labels)")
    if not args.data:
        raise CliError("give --data DIR (DIR/train/<class>/..., DIR/val/<class>/...) or --images and --labels")
    root = Path(args.data)
    if not root.is_dir():
        raise CliError(f"no such folder: {root}")
    train_root = root / "train" if (root / "train").is_dir() else root
    has_val = (root / "val").is_dir()
    if args.val_split is not None:
        if has_val:
            raise CliError(f"{root} has a val folder and --val-split was given: drop --val-split to validate on "
                           f"{root / 'val'}, or move that folder away to split {train_root}")
        train, val = split(scan_folder(train_root), args.val_split, args.seed)
    else:
        train = scan_folder(train_root)
        if not has_val:
            raise CliError(f"{root} has no val folder: add {root}/val/<class>/... or pass --val-split 0.2")
        val = scan_folder(root / "val", train.classes, allow_empty=True)
    warn_missing(val, "the validation split")
    return train, val


def _check_disjoint(train: Samples, val: Samples) -> None:
    both = set(train.paths) & set(val.paths)
    if both:
        raise CliError(f"{len(both)} images are in both the training and validation labels (first: {sorted(both)[0]})")


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


# ----------------------------------------------------------------------------- images


def _decode_problem(path: Path, bit_depth: int | None) -> tuple[str | None, bool]:
    """Why the image cannot be read (None when it can), and whether it looks 12-bit in 16."""
    try:
        return None, preprocess.decode_checked(path, bit_depth)[1]
    except Exception as e:  # PIL raises many types for bad files
        return f"{type(e).__name__}: {e}", False


def check_images(samples: Samples, strict: bool, workers: int, what: str, bit_depth: int | None = None) -> Samples:
    """Decode every image once; unreadable ones are listed and skipped (an error if strict)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        found = list(pool.map(lambda p: _decode_problem(p, bit_depth), samples.paths))
    problems = [why for why, _low in found]
    dim = [p for p, (_why, low) in zip(samples.paths, found) if low]
    if dim:
        warnings.warn(f"{len(dim)} images in {what} are 16-bit with no value above 4095 (first: {dim[0]}); "
                      "if they are 12-bit, pass --bit-depth 12 to read them at full contrast", stacklevel=2)
    bad = [(p, why) for p, why in zip(samples.paths, problems) if why]
    if not bad:
        return samples
    listing = "\n".join(f"  {p}: {why}" for p, why in bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
    if strict:
        raise CliError(f"{len(bad)} unreadable images in {what} (--strict):\n{listing}")
    warnings.warn(f"skipping {len(bad)} unreadable images in {what}:\n{listing}", stacklevel=2)
    keep = [i for i, why in enumerate(problems) if not why]
    kept = samples.subset(keep)
    if what == "train" and kept.missing_classes():
        raise CliError(f"class without readable images in {what}: {', '.join(kept.missing_classes())}")
    return kept


class ImageDataset(torch.utils.data.Dataset):
    """Samples as (image tensor, label). With a seed, each image's random augmentation depends
    only on (seed, epoch, index): the same whatever the worker count, rank count or resume."""

    def __init__(self, samples: Samples, transform, seed: int | None = None, bit_depth: int | None = None) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.bit_depth = bit_depth
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image = preprocess.decode(self.samples.paths[i], self.bit_depth)
        if self.seed is None:
            x = self.transform(image)
        else:
            digest = hashlib.blake2b(f"{self.seed}/{self.epoch}/{i}".encode(), digest_size=8).digest()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
                x = self.transform(image)
        return x, self.samples.labels[i]


class BalancedSampler(torch.utils.data.Sampler):
    """``--sampler balanced``: each epoch draws as many images as the split holds, with
    replacement, each class equally likely (torch's WeightedRandomSampler), from a generator
    seeded by (seed, epoch); rank r takes draws r, r + world, ... So the order depends only on
    seed and epoch: the same under any worker count, on resume, and split over DDP ranks."""

    def __init__(self, labels: list[int], seed: int, rank: int = 0, world: int = 1) -> None:
        counts = Counter(labels)
        self.weights = torch.tensor([1.0 / counts[y] for y in labels], dtype=torch.float64)
        self.seed, self.rank, self.world = seed, rank, world
        self.per_rank = -(-len(labels) // world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        draws = list(torch.utils.data.WeightedRandomSampler(self.weights, self.per_rank * self.world, generator=g))
        return iter(draws[self.rank :: self.world])

    def __len__(self) -> int:
        return self.per_rank


def class_weights(spec: str | None, samples: Samples) -> torch.Tensor | None:
    """``--class-weights``: none, balanced (n / (classes x count), sklearn's rule) or a JSON
    file mapping class name to weight."""
    if spec in (None, "none"):
        return None
    counts = samples.counts()
    if spec == "balanced":
        n = sum(counts)
        return torch.tensor([n / (len(counts) * c) if c else 0.0 for c in counts], dtype=torch.float32)
    import json

    path = Path(spec)
    if not path.is_file():
        raise CliError(f"--class-weights: expected none, balanced or a JSON file; no such file: {path}")
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CliError(f"--class-weights {path} is not JSON: {e}") from None
    if not isinstance(table, dict) or set(table) != set(samples.classes):
        raise CliError(f"--class-weights {path} must map every class ({', '.join(samples.classes)}) to a weight")
    try:
        values = [float(table[c]) for c in samples.classes]
    except (TypeError, ValueError):
        raise CliError(f"--class-weights {path}: weights must be numbers") from None
    if min(values) < 0 or max(values) <= 0:
        raise CliError(f"--class-weights {path}: weights must be non-negative, one at least positive")
    return torch.tensor(values, dtype=torch.float32)


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


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)
