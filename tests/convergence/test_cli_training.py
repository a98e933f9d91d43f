"""``hifuse train --fused`` against ``--no-fused`` on demo data for a few epochs (narrow model):
every number of metrics.jsonl at every epoch within the float64 rule of ``trajectory`` (the
float64 run is the same command with the model and images in float64, its sensitivity the same
again with every image moved by 1e-6 relatively; the eager runs are the float32 command on
the images as given and on images moved by one rounding step, eight in all)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from cli_helpers import cli  # noqa: E402
from hifuse.cli import data as cli_data  # noqa: E402
from hifuse.cli import demo_data, models  # noqa: E402
from hifuse_kernels import _triton  # noqa: E402

from . import trajectory  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.convergence,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(_triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
                       reason=f"the Triton kernels cannot run: {_triton.unsupported_reason(torch.zeros(1, device=DEVICE))}"),
]
NARROW = ["--depths", "1,2,1,1", "--dims", "16,32,64,128", "--heads", "1,1,2,2", "--img-size", "32", "--workers", "0"]
KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
        "val_balanced_accuracy", "val_auc")


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(data, out, *extra, monkeypatch=None, double=False, seed=None, scale=trajectory.NOISE):
    """The command's metrics; with ``double`` in float64, with ``seed`` on images moved by
    ``scale`` relatively."""
    if double or seed is not None:
        build, getitem = models.build, cli_data.ImageDataset.__getitem__
        dtype = torch.float64 if double else torch.float32

        def item(self, i):
            x, y = getitem(self, i)
            x = x.double()
            if seed is not None:
                g = torch.Generator().manual_seed(seed * 1_000_003 + self.epoch * 10_007 + i)
                x = x * (1 + scale * torch.randn(x.shape, generator=g, dtype=torch.float64))
            return x.to(dtype), y

        if double:
            monkeypatch.setattr(models, "build", lambda *a, **k: build(*a, **k).double())
        monkeypatch.setattr(cli_data.ImageDataset, "__getitem__", item)
    try:
        rc, _, err = cli("train", "--data", data, "--out", out, "--epochs", "3", "--batch-size", "8", "--lr", "3e-4",
                         "--amp", "none", *NARROW, *extra)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    assert rc == 0, err
    return records(out)


@trajectory.one_thread()
def test_train_fused_follows_no_fused(tmp_path, monkeypatch):
    data = tmp_path / "demo"
    demo_data.write(data, 32, {"train": 4, "val": 4}, seed=2)  # 16 images: two steps an epoch
    f64 = train(data, tmp_path / "f64", "--no-fused", monkeypatch=monkeypatch, double=True)
    noisy = [train(data, tmp_path / f"n{s}", "--no-fused", monkeypatch=monkeypatch, double=True, seed=s)
             for s in trajectory.NOISE_SEEDS]
    eager = [train(data, tmp_path / "eager", "--no-fused")]
    eager += [train(data, tmp_path / f"e{s}", "--no-fused", monkeypatch=monkeypatch, seed=s, scale=trajectory.ROUNDING)
              for s in trajectory.ROUNDING_SEEDS[:7]]  # six steps pass fewer knife edges than thirty
    fused = train(data, tmp_path / "fused", "--fused")
    assert [r["epoch"] for r in fused] == [1, 2, 3]
    bad = []
    for epoch, (a, r) in enumerate(zip(fused, f64), start=1):
        for key in KEYS:
            if r[key] is None:
                assert a[key] is None and all(e[epoch - 1][key] is None for e in eager), key
                continue
            err = abs(a[key] - r[key])
            eager_err = max(abs(e[epoch - 1][key] - r[key]) for e in eager)
            sens = max(abs(n[epoch - 1][key] - r[key]) for n in noisy)
            if not err <= max(2 * eager_err, sens):
                bad.append(f"epoch {epoch} {key}: fused {a[key]!r}, eager {eager[0][epoch - 1][key]!r} (the farthest "
                           f"{eager_err:.3g} off), float64 {r[key]!r} (under noise {sens:.3g} off)")
    assert not bad, "\n".join(bad)
