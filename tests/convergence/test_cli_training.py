"""``hifuse train --fused`` against ``--no-fused`` on demo data for a few epochs (narrow model):
every number of metrics.jsonl at every epoch within the float64 rule of ``trajectory`` (the
float64 run is the same command with the model and images in float64; its sensitivity, the
same again with every image moved by 1e-6 relatively). Where the fused kernels are fast (a
GPU): the CPU interpreter would take about a minute per fused step here."""

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

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.convergence,
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.skipif(not CUDA or _triton.unsupported_reason(torch.zeros(1, device="cuda" if CUDA else "cpu")) is not None,
                       reason="needs a CUDA device (the CPU interpreter takes about a minute per fused step here)"),
]
NARROW = ["--depths", "1,2,1,1", "--dims", "16,32,64,128", "--heads", "1,2,4,8", "--img-size", "32", "--workers", "0"]
KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
        "val_balanced_accuracy", "val_auc")


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(data, out, *extra, monkeypatch=None, double=False, noise=None):
    if double:
        build, getitem = models.build, cli_data.ImageDataset.__getitem__

        def item(self, i):
            x, y = getitem(self, i)
            x = x.double()
            if noise is not None:
                g = torch.Generator().manual_seed(noise * 1_000_003 + self.epoch * 10_007 + i)
                x = x * (1 + 1e-6 * torch.randn(x.shape, generator=g, dtype=torch.float64))
            return x, y

        monkeypatch.setattr(models, "build", lambda *a, **k: build(*a, **k).double())
        monkeypatch.setattr(cli_data.ImageDataset, "__getitem__", item)
    try:
        rc, _, err = cli("train", "--data", data, "--out", out, "--epochs", "3", "--batch-size", "8", "--lr", "1e-3",
                         "--amp", "none", *NARROW, *extra)
    finally:
        if monkeypatch is not None:
            monkeypatch.undo()
    assert rc == 0, err
    return records(out)


def test_train_fused_follows_no_fused(tmp_path, monkeypatch):
    data = tmp_path / "demo"
    demo_data.write(data, 32, {"train": 8, "val": 4}, seed=2)
    f64 = train(data, tmp_path / "f64", "--no-fused", monkeypatch=monkeypatch, double=True)
    noisy = [train(data, tmp_path / f"n{s}", "--no-fused", monkeypatch=monkeypatch, double=True, noise=s) for s in (1, 2)]
    eager = train(data, tmp_path / "eager", "--no-fused")
    fused = train(data, tmp_path / "fused", "--fused")
    assert [r["epoch"] for r in fused] == [1, 2, 3]
    bad = []
    for epoch, (a, e, r) in enumerate(zip(fused, eager, f64), start=1):
        for key in KEYS:
            if r[key] is None:
                assert a[key] is None and e[key] is None, key
                continue
            err, eager_err = abs(a[key] - r[key]), abs(e[key] - r[key])
            sens = max(abs(n[epoch - 1][key] - r[key]) for n in noisy)
            if not err <= max(2 * eager_err, sens):
                bad.append(f"epoch {epoch} {key}: fused {a[key]!r}, eager {e[key]!r}, float64 {r[key]!r} (noise {sens:.3g})")
    assert not bad, "\n".join(bad)
