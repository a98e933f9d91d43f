"""How every command turns an image file into the model's input: one decoder and one recipe.

Decoding goes by what the file is: EXIF orientation applied, 16-bit and other high-bit-depth
grayscale scaled by the image's bit depth (PNG's sBIT, TIFF's BitsPerSample, or --bit-depth),
never clipped; float and signed images are refused by name. The evaluation recipe (resize to
1.143x the side, centre crop, Normalize(0.5, 0.5)) is saved with a run and read back by
evaluate, predict and explain, so a result does not change because a flag was not repeated.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import model as model_
from .errors import CliError

# The published recipe, kept with the model (its pretrained_cfg says the same): eval images are
# resized to 1.143x the crop side, then centre-cropped.
EVAL_RESIZE = model_.EVAL_RESIZE
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImageError(ValueError):
    """An image that cannot be decoded faithfully (the message says why)."""


@dataclass(frozen=True)
class Preprocess:
    """The evaluation transform's parameters, saved in a run's settings.json."""

    img_size: int = 224
    resize: float = EVAL_RESIZE
    crop: str = "center"
    interpolation: str = model_.INTERPOLATION
    mean: tuple = field(default=model_.MEAN)
    std: tuple = field(default=model_.STD)
    bit_depth: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def describe(self) -> str:
        return (f"{self.img_size}px, resize {self.resize}x + {self.crop} crop, {self.interpolation}, "
                f"normalize {list(self.mean)}/{list(self.std)}" + (f", {self.bit_depth}-bit input" if self.bit_depth else ""))


def check_img_size(size: int) -> None:
    if size <= 0 or size % 32:
        raise CliError(f"--img-size must be a positive multiple of 32 (HiFuse halves it five times), got {size}")


def check_bit_depth(depth: int | None) -> None:
    if depth is not None and not 8 <= depth <= 16:
        raise CliError(f"--bit-depth must be between 8 and 16, got {depth}")


def png_significant_bits(path: Path) -> int | None:
    """The sBIT chunk of a grayscale PNG (the bits that carry data, e.g. 12 of 16), if any."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return None
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"sBIT":
                    return max(f.read(length)) or None
                if kind in (b"IDAT", b"IEND"):
                    return None
                f.seek(length + 4, 1)
    except OSError:
        return None


def container_bits(im) -> int:
    """Bits per sample of a high-bit-depth grayscale image's file."""
    if im.mode.startswith("I;16"):
        return 16
    tags = getattr(im, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    return 16 if im.format == "PNG" else 32


def _scale_high_depth(values, depth: int):
    import numpy as np
    from PIL import Image

    if values.size and values.min() < 0:
        raise ImageError("signed pixel values (e.g. CT Hounsfield units); window them to an unsigned range first")
    if depth > 16:
        raise ImageError(f"{depth}-bit pixels; convert the image to 8 or 16 bits first")
    top = 2**depth - 1
    if values.size and values.max() > top:
        raise ImageError(f"values up to {int(values.max())} in a {depth}-bit image; pass the right --bit-depth")
    scaled = np.rint(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")


def decode_checked(path: Path, bit_depth: int | None = None):
    """``decode``, and whether the image is 16-bit, does not state its depth and holds no value
    above 4095 (a likely 12-bit-in-16 export that --bit-depth 12 would read at full contrast)."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        if im.mode == "F":
            raise ImageError("floating-point pixels; convert the image to 8 or 16 bits first")
        high = im.mode in HIGH_DEPTH_MODES
        if high:
            stated = bit_depth or (png_significant_bits(Path(path)) if im.format == "PNG" else None)
            depth = stated or container_bits(im)
        im = ImageOps.exif_transpose(im)  # a copy, without the file's format and tags
        if high:
            values = np.asarray(im)
            low = not stated and depth == 16 and int(values.max(initial=0)) < 4096
            return _scale_high_depth(values, depth), low
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            # transparent pixels show their stored colour; drop the alpha as PIL's convert does
            return im.convert("RGBA").convert("RGB"), False
        return im.convert("RGB"), False


def decode(path: Path, bit_depth: int | None = None):
    """The image as an 8-bit RGB PIL image, decoded by what it is; ImageError where that cannot
    be done faithfully (OSError and friends for unreadable files)."""
    return decode_checked(path, bit_depth)[0]


_INTERPOLATION = ("nearest", "bilinear", "bicubic")


def eval_transform(p: Preprocess):
    """The one evaluation transform: train's validation, evaluate, predict and explain."""
    from torchvision import transforms as T

    if p.crop != "center" or p.interpolation not in _INTERPOLATION:
        raise CliError(f"unknown preprocessing in the run's settings: crop {p.crop!r}, interpolation {p.interpolation!r}")
    mode = T.InterpolationMode(p.interpolation)
    return T.Compose([T.Resize(int(p.img_size * p.resize), interpolation=mode), T.CenterCrop(p.img_size),
                      T.ToTensor(), T.Normalize(list(p.mean), list(p.std))])


def train_transform(p: Preprocess):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(p.img_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(list(p.mean), list(p.std))])


def crop_box(size: tuple[int, int], p: Preprocess) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the original image of the region the model sees."""
    w, h = size
    short = int(p.img_size * p.resize)
    scale = short / min(w, h)
    side = p.img_size / scale
    cx, cy = w / 2, h / 2
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def from_settings(settings: dict | None) -> Preprocess | None:
    """The recipe a run saved (runs from before it was saved: their --img-size and the
    published recipe, the only one then)."""
    if not settings:
        return None
    if isinstance(settings.get("preprocess"), dict):
        return Preprocess.from_dict(settings["preprocess"])
    if isinstance(settings.get("img_size"), int):
        return Preprocess(img_size=settings["img_size"])
    return None


def resolve(settings: dict | None, img_size: int | None, bit_depth: int | None) -> Preprocess:
    """The run's recipe, with the options given on the command line; a value that differs from
    the run's is used, and said."""
    import warnings
    from dataclasses import replace

    saved = from_settings(settings)
    p = saved or Preprocess()
    for name, value in (("img_size", img_size), ("bit_depth", bit_depth)):
        if value is not None and value != getattr(p, name):
            if saved is not None:
                warnings.warn(f"--{name.replace('_', '-')} {value} differs from the run's {getattr(saved, name)} "
                              "(it was trained with that preprocessing)", stacklevel=2)
            p = replace(p, **{name: value})
    check_img_size(p.img_size)
    check_bit_depth(p.bit_depth)
    return p
