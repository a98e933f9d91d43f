"""``hifuse demo-data``: a small synthetic image-folder dataset the model can learn in minutes.

Four texture classes (horizontal stripes, vertical stripes, checks, spots), each in colours of
its own hue range, with random periods, phases and noise. Colour and texture both tell the
class and survive random crops and horizontal flips, so the paper's augmentation can be used
unchanged and a small model learns them in a few epochs.
"""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

import torch

from .errors import CliError

CLASSES = ("checks", "spots", "stripes_horizontal", "stripes_vertical")


def add_parser(sub) -> None:
    from .options import Formatter

    p = sub.add_parser("demo-data", help="write a small synthetic dataset to try the commands on", formatter_class=Formatter,
                       description="Writes DIR/{train,val,test}/<class>/*.png of four texture classes.")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--train", type=int, default=24, help="training images per class")
    p.add_argument("--val", type=int, default=8, help="validation images per class")
    p.add_argument("--test", type=int, default=8, help="test images per class")
    p.add_argument("--seed", type=int, default=0, help="seeds every image")
    p.set_defaults(run=run)


def texture(kind: str, size: int, rng: random.Random) -> torch.Tensor:
    """(3, size, size) uint8 image of one class."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    hue = CLASSES.index(kind) / len(CLASSES) + rng.uniform(-0.06, 0.06)
    a = torch.tensor(colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0)))
    b = a * rng.uniform(0.1, 0.4)  # the same hue, darker
    period = rng.uniform(size / 12, size / 6)
    phase = rng.uniform(0, period)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    yy, xx = yy + phase, xx + rng.uniform(0, period)
    if kind == "stripes_horizontal":
        mask = (yy / period) % 1 < 0.5
    elif kind == "stripes_vertical":
        mask = (xx / period) % 1 < 0.5
    elif kind == "checks":
        mask = (((yy / period) % 1 < 0.5) ^ ((xx / period) % 1 < 0.5))
    else:
        dy, dx = (yy / period) % 1 - 0.5, (xx / period) % 1 - 0.5
        mask = dy * dy + dx * dx < 0.09
    image = torch.where(mask, a.view(3, 1, 1), b.view(3, 1, 1))
    image = image + 0.08 * torch.randn(3, size, size, generator=g)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def write(root: Path, size: int, counts: dict[str, int], seed: int) -> int:
    from PIL import Image

    rng = random.Random(seed)
    n = 0
    for split, count in counts.items():
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = texture(kind, size, rng).permute(1, 2, 0).numpy()
                Image.fromarray(pixels).save(folder / f"{kind}_{i:04d}.png")
                n += 1
    return n


def run(args) -> int:
    if args.size < 32:
        raise CliError(f"--size must be at least 32 pixels, got {args.size}")
    if args.train < 2 or args.val < 1 or args.test < 0:
        raise CliError("need --train of 2 or more and --val of 1 or more images per class")
    root = Path(args.dir)
    if root.exists() and any(root.iterdir()):
        raise CliError(f"{root} is not empty; choose a new folder")
    n = write(root, args.size, {"train": args.train, "val": args.val, "test": args.test}, args.seed)
    print(f"wrote {n} images of {len(CLASSES)} classes ({', '.join(CLASSES)}) to {root}/{{train,val,test}}")
    return 0
