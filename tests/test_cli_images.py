"""Images as real datasets ship them, decoded by what they are (or refused by name), and the
one preprocessing every command shares: 16-bit and 12-bit-in-16 grayscale, 16-bit TIFF, EXIF
orientation, CMYK JPEG, float and signed images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from PIL import Image  # noqa: E402

from hifuse.cli import data as cli_data  # noqa: E402
from hifuse.cli import preprocess  # noqa: E402
from hifuse.cli.preprocess import ImageError, Preprocess, decode  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def ramp(bits: int, size=(48, 32)) -> np.ndarray:
    """A horizontal ramp over the whole range of ``bits``, as uint16."""
    w, h = size
    row = np.rint(np.linspace(0, 2**bits - 1, w)).astype(np.uint16)
    return np.tile(row, (h, 1))


def with_sbit(png: Path, bits: int) -> None:
    """Adds a grayscale sBIT chunk (significant bits) after IHDR, as 12-bit exporters do."""
    raw = png.read_bytes()
    chunk = b"sBIT" + bytes([bits])
    data = struct.pack(">I", 1) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF)
    at = 8 + 8 + 13 + 4  # signature, IHDR header, IHDR data, CRC
    png.write_bytes(raw[:at] + data + raw[at:])


def gray(image) -> np.ndarray:
    a = np.asarray(image)
    assert a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    return a[..., 0].astype(int)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "ct.png"
    Image.fromarray(ramp(16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.9  # what PIL's convert alone would feed: white
    g = gray(decode(path))
    expected = np.rint(ramp(16).astype(float) * 255 / 65535)
    assert np.abs(g - expected).max() == 0
    assert g.min() == 0 and g.max() == 255 and len(np.unique(g)) > 40  # not saturated


def test_12_bit_png_with_sbit_uses_its_depth(tmp_path):
    path = tmp_path / "ct12.png"
    Image.fromarray(ramp(12)).save(path)
    with_sbit(path, 12)
    assert preprocess.png_significant_bits(path) == 12
    g = gray(decode(path))
    assert g.min() == 0 and g.max() == 255
    np.testing.assert_array_equal(g, np.rint(ramp(12).astype(float) * 255 / 4095))


def test_12_bit_png_without_sbit_is_read_as_16_bit_and_flagged(tmp_path):
    path = tmp_path / "ct12.png"
    Image.fromarray(ramp(12)).save(path)
    g = gray(decode(path))
    assert g.max() == 16  # 4095 of 65535: dark, never white
    assert gray(decode(path, bit_depth=12)).max() == 255
    assert preprocess.decode_checked(path)[1] and not preprocess.decode_checked(path, bit_depth=12)[1]
    samples = cli_data.Samples([path], [0], ["a"])
    with pytest.warns(UserWarning, match="--bit-depth 12"):
        cli_data.check_images(samples, strict=False, workers=1, what="train")
    with pytest.raises(ImageError, match="--bit-depth"):
        decode(path, bit_depth=10)  # values above 1023


def test_16_bit_tiff(tmp_path):
    path = tmp_path / "scan.tif"
    Image.fromarray(ramp(16)).save(path)
    g = gray(decode(path))
    assert g.min() == 0 and g.max() == 255 and len(np.unique(g)) > 40


def test_float_and_signed_images_are_refused(tmp_path):
    Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match="floating-point"):
        decode(tmp_path / "f.tif")
    Image.fromarray(np.arange(-32, 32, dtype=np.int32).reshape(8, 8)).save(tmp_path / "hu.tif")
    with pytest.raises(ImageError, match="signed"):
        decode(tmp_path / "hu.tif")


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # a white band on the left of the stored pixels
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 clockwise to display
    im.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    shown = np.asarray(decode(tmp_path / "phone.jpg"))
    assert shown.shape[:2] == (40, 20)
    assert shown[:8].mean() > 200 and shown[-8:].mean() < 50  # the band is now on top


def test_cmyk_jpeg_and_palette_and_16_bit_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    r, g, b = np.asarray(decode(tmp_path / "cmyk.jpg")).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60
    Image.new("RGB", (16, 16), (10, 200, 30)).convert("P").save(tmp_path / "palette.png")
    pal = np.asarray(decode(tmp_path / "palette.png"))
    assert pal.shape == (16, 16, 3) and np.abs(pal[0, 0].astype(int) - (10, 200, 30)).max() < 40


def test_dataset_check_refuses_float_images_by_name(tmp_path):
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "f.tif")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    samples = cli_data.Samples([tmp_path / "f.tif", tmp_path / "ok.png"], [0, 0], ["a"])
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable(.|\n)*f\.tif(.|\n)*floating-point"):
        kept = cli_data.check_images(samples, strict=False, workers=1, what="evaluation")
    assert kept.paths == [tmp_path / "ok.png"]


def test_the_recipe_round_trips_and_old_runs_keep_theirs():
    p = Preprocess(img_size=96, bit_depth=12)
    assert Preprocess.from_dict(p.to_dict()) == p
    assert preprocess.from_settings({"img_size": 64}) == Preprocess(img_size=64)
    assert preprocess.resolve(None, None, None) == Preprocess()
    with pytest.warns(UserWarning, match="differs from the run's 64"):
        assert preprocess.resolve({"img_size": 64}, 128, None).img_size == 128


def test_crop_box_is_the_region_the_transform_keeps():
    """The outline explain draws: the crop of Resize + CenterCrop, in the image's pixels."""
    p = Preprocess(img_size=64)
    a = np.zeros((90, 150, 3), np.uint8)
    left, top, right, bottom = (round(v) for v in preprocess.crop_box((150, 90), p))
    a[top:bottom, left:right] = 255
    x = preprocess.eval_transform(p)(Image.fromarray(a))
    assert float(x[:, 2:-2, 2:-2].min()) > 0.9  # the crop lies inside the marked region (edges blend in resizing)
    a[top + 4 : bottom - 4, left + 4 : right - 4] = 0
    assert float(preprocess.eval_transform(p)(Image.fromarray(a))[:, 8:-8, 8:-8].max()) < -0.9  # and fills it
    assert (right - left) == pytest.approx(90 * 64 / int(64 * 1.143), abs=1)


def test_images_decode_the_same_in_every_command(tmp_path):
    """Train's validation, evaluate, predict and explain read a 16-bit image alike."""
    from hifuse.cli import explain, predict

    path = tmp_path / "ct.png"
    Image.fromarray(ramp(16, (70, 70))).save(path)
    p = Preprocess(img_size=32)
    ds = cli_data.ImageDataset(cli_data.Samples([path], [0], ["a"]), preprocess.eval_transform(p))
    x = ds[0][0]
    assert float(x.min()) < -0.8 and float(x.max()) > 0.8  # the full range, centre-cropped
    torch.manual_seed(0)
    import hifuse

    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                num_heads=(1, 2, 4, 8)).eval()
    probs, errors = predict.predict(model, [path], p, 4, "cpu")
    _image, _cam, _k, probs_explain = explain.explain_image(model, path, p, None, "cpu")
    with torch.no_grad():
        direct = model(x[None]).softmax(1)[0]
    assert not errors
    torch.testing.assert_close(probs[0], direct)
    torch.testing.assert_close(probs_explain, direct)
