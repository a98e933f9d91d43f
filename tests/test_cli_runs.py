"""Resuming and restarting runs: what --resume may change and what it refuses, --resume PATH,
a stretched schedule for a larger --epochs, no files from a start that fails on its arguments,
and a TensorBoard log without duplicate steps after a kill."""

from __future__ import annotations

import json
import math
import shutil

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("tensorboard")

from cli_helpers import SMALL, cli, one_line_error, tiny_data  # noqa: E402
from hifuse.cli.train import schedule  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("runs") / "data", per_class=3)


def train(data, out, *extra):
    return cli("train", "--data", data, "--out", out, "--batch-size", "6", "--lr", "1e-3", *SMALL, *extra)


def test_stretched_schedule_continues_from_the_resumed_point():
    s = {"epochs": 4, "warmup_epochs": 1, "lr": 1e-3, "min_lr": 1e-5}
    before = schedule(s, 10)
    ext = dict(s, epochs=8, extended=[{"at_epoch": 3, "from_epochs": 4, "to_epochs": 8}])
    after = schedule(ext, 10)
    assert [after(i) for i in range(31)] == [before(i) for i in range(31)]  # the past is unchanged
    assert after(30) == before(30) and after(79) == pytest.approx(0.01, abs=1e-3)
    assert all(after(i) > after(i + 1) for i in range(30, 79))
    assert after(40) > before(40)  # slower decay: stretched
    during_warmup = schedule(dict(s, epochs=8, extended=[{"at_epoch": 0, "from_epochs": 4, "to_epochs": 8}]), 10)
    assert during_warmup(50) == pytest.approx(schedule(dict(s, epochs=8), 10)(50))
    assert not math.isnan(after(200))


def test_resume_extends_with_a_larger_epochs(data, tmp_path):
    rc, out, err = train(data, tmp_path / "r", "--epochs", "2")
    assert rc == 0, err
    rc, out, err = cli("train", "--out", tmp_path / "r", "--resume", "--workers", "0")
    assert rc == 0 and "finished all 2 epochs" in out and "--epochs" in out
    rc, out, err = cli("train", "--out", tmp_path / "r", "--resume", "--epochs", "3", "--workers", "0")
    assert rc == 0, err
    assert "--epochs 3 (was 2): the cosine schedule is stretched from epoch 3 on" in out
    settings = json.loads((tmp_path / "r" / "settings.json").read_text())
    assert settings["epochs"] == 3 and settings["extended"] == [{"at_epoch": 2, "from_epochs": 2, "to_epochs": 3}]
    assert settings["resumed"][0]["at_epoch"] == 2
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    one_line_error(cli("train", "--out", tmp_path / "r", "--resume", "--epochs", "2", "--workers", "0"), "can only extend")


def test_resume_refuses_changed_settings_and_applies_the_sound_ones(data, tmp_path):
    rc, out, err = train(data, tmp_path / "r", "--epochs", "1")
    assert rc == 0, err
    one_line_error(cli("train", "--out", tmp_path / "r", "--resume", "--lr", "0.01", "--model", "hifuse_small"),
                   "--lr 0.01 (the run's: 0.001)", "--model hifuse_small", "--overwrite")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    rc, out, err = cli("train", "--out", tmp_path / "r", "--resume", "--epochs", "2", "--data", moved, "--workers", "0")
    assert rc == 0, err
    assert f"--data {moved.resolve()}" in out
    with pytest.warns(UserWarning, match="--batch-size 4 .*the run used 6"):
        rc, out, err = cli("train", "--out", tmp_path / "r", "--resume", "--epochs", "3", "--batch-size", "4",
                           "--workers", "0")
    assert rc == 0, err
    assert json.loads((tmp_path / "r" / "settings.json").read_text())["batch_size"] == 4


def test_resume_path_to_last_pth(data, tmp_path):
    rc, out, err = train(data, tmp_path / "r", "--epochs", "1")
    assert rc == 0, err
    rc, out, err = cli("train", "--resume", tmp_path / "r" / "last.pth", "--epochs", "2", "--workers", "0")
    assert rc == 0, err
    assert "resuming at epoch 2" in out
    one_line_error(cli("train", "--resume", tmp_path / "r" / "best_model.pth"), "last.pth")
    one_line_error(cli("train", "--resume", tmp_path / "r" / "last.pth", "--out", tmp_path / "other"), "not --out")


@pytest.mark.parametrize("bad, needle", [
    (["--heads", "1,2,4,7"], "heads"),
    (["--model", "hifuse_huge"], "hifuse_huge"),
    (["--init", "nowhere.pth"], "nowhere.pth"),
    (["--class-weights", "weights.json"], "weights.json"),
])
def test_a_start_refused_for_its_arguments_leaves_no_files(data, tmp_path, bad, needle):
    out = tmp_path / "run"
    one_line_error(train(data, out, "--epochs", "1", *bad), needle)
    assert not out.exists()
    rc, _, err = train(data, out, "--epochs", "1")  # the corrected command, without --overwrite
    assert rc == 0, err


def test_out_naming_a_file(data, tmp_path):
    (tmp_path / "f").write_text("")
    one_line_error(train(data, tmp_path / "f", "--epochs", "1"), "is a file")


def test_killed_after_logging_leaves_no_duplicate_tensorboard_step(data, tmp_path):
    """A kill between the epoch's log writes and last.pth: the resumed run rewrites the epoch,
    and TensorBoard's purge hides the first copy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "r"
    rc, _, err = train(data, out, "--epochs", "2")
    assert rc == 0, err
    writer = SummaryWriter(out / "tensorboard")  # what the killed epoch 3 had logged
    writer.add_scalar("train/loss", 123.0, 3)
    writer.close()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 3}) + "\n")
    rc, _, err = cli("train", "--out", out, "--resume", "--epochs", "3", "--workers", "0")
    assert rc == 0, err
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3] and losses[-1].value != 123.0
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
