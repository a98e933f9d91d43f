"""Datasets as they come: ISIC 2018/2019 one-hot CSVs (with 2019's all-zero UNK), HAM10000
metadata (``image_id,dx,lesion_id``) with a lesion-grouped split, separate validation CSVs,
validation splits that miss a class, and class imbalance (weights, balanced sampling)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")

from PIL import Image  # noqa: E402

from cli_helpers import SMALL, cli, one_line_error  # noqa: E402
from hifuse.cli import data as cli_data  # noqa: E402
from hifuse.cli.data import CsvForm  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ISIC2019 = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
COLOURS = {"MEL": (200, 30, 30), "NV": (30, 200, 30), "BCC": (30, 30, 200), "bkl": (200, 200, 30), "nv": (30, 200, 30),
           "mel": (200, 30, 30)}


def images(folder: Path, names: list[str], colours: list[tuple]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in zip(names, colours):
        Image.new("RGB", (40, 40), colour).save(folder / f"{name}.jpg")


def isic2019(root: Path, per_class: dict[str, int]) -> Path:
    """ISIC 2019's ground-truth form: image, nine one-hot columns as 0.0/1.0, UNK all zero."""
    rows, names, colours = [",".join(["image", *ISIC2019])], [], []
    i = 0
    for cls, n in per_class.items():
        for _ in range(n):
            name = f"ISIC_{i:07d}"
            rows.append(",".join([name, *("1.0" if c == cls else "0.0" for c in ISIC2019)]))
            names.append(name)
            colours.append(COLOURS.get(cls, (100, 100, 100)))
            i += 1
    images(root / "ISIC_2019_Training_Input", names, colours)
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join(rows) + "\n")
    return root


def ham10000(root: Path) -> Path:
    """HAM10000's metadata: lesion_id,image_id,dx,... with several images per lesion."""
    rows = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    names, colours = [], []
    n = 0
    for lesion in range(18):
        dx = ["nv", "nv", "mel", "bkl", "nv", "mel"][lesion % 6]
        for _ in range(1 + lesion % 3):
            image = f"ISIC_{n:07d}"
            rows.append(f"HAM_{lesion:07d},{image},{dx},histo,50.0,male,back")
            names.append(image)
            colours.append(COLOURS[dx])
            n += 1
    images(root / "images", names, colours)
    (root / "HAM10000_metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_isic2019_unk_column_is_dropped_with_a_warning_or_kept(tmp_path):
    root = isic2019(tmp_path, {"MEL": 3, "NV": 4, "BCC": 2})
    args = (root / "ISIC_2019_Training_Input", root / "ISIC_2019_Training_GroundTruth.csv")
    with pytest.warns(UserWarning, match=r"dropping classes without images: AK, BKL, DF, VASC, SCC, UNK"):
        s = cli_data.read_label_csv(*args)
    assert s.classes == ["MEL", "NV", "BCC"] and Counter(s.labels) == {0: 3, 1: 4, 2: 2}
    kept = cli_data.read_label_csv(*args, CsvForm(keep_empty_classes=True))
    assert kept.classes == ISIC2019 and kept.missing_classes() == ISIC2019[3:]


def test_ham10000_label_column_and_lesion_grouped_split(tmp_path):
    root = ham10000(tmp_path)
    csv_path, folder = root / "HAM10000_metadata.csv", root / "images"
    with pytest.raises(Exception, match="--label-column"):
        cli_data.read_label_csv(folder, csv_path)  # lesion_id first, text columns: not one-hot
    s = cli_data.read_label_csv(folder, csv_path, CsvForm(id_column="image_id", label_column="dx", group_column="lesion_id"))
    assert s.classes == ["bkl", "mel", "nv"] and len(s) == sum(1 + i % 3 for i in range(18))
    train, val = cli_data.split(s, 0.3, seed=4)
    assert not set(train.groups) & set(val.groups)  # a lesion is on one side only
    assert len(train) + len(val) == len(s) and set(val.labels) == {0, 1, 2}
    for seed in range(10):
        a, b = cli_data.split(s, 0.3, seed)
        assert not set(a.groups) & set(b.groups)
    one_line_error(cli("train", "--images", folder, "--labels", csv_path, "--label-column", "diagnosis", "--val-split", "0.3",
                       "--out", tmp_path / "r", *SMALL), "no column 'diagnosis'", "image_id")


def test_train_on_ham10000_form_end_to_end(tmp_path):
    root = ham10000(tmp_path)
    rc, out, err = cli("train", "--images", root / "images", "--labels", root / "HAM10000_metadata.csv", "--id-column",
                       "image_id", "--label-column", "dx", "--group-column", "lesion_id", "--val-split", "0.3",
                       "--epochs", "1", "--batch-size", "8", "--out", tmp_path / "run", *SMALL)
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["bkl", "mel", "nv"]
    rc, out, err = cli("evaluate", "--images", root / "images", "--labels", root / "HAM10000_metadata.csv", "--id-column",
                       "image_id", "--label-column", "dx", "--checkpoint", tmp_path / "run" / "best_model.pth",
                       "--workers", "0", "--out", tmp_path / "ev")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["images"] == 36
    rc, out, err = cli("predict", "--images", root / "images", "--labels", root / "HAM10000_metadata.csv", "--id-column",
                       "image_id", "--label-column", "dx", "--checkpoint", tmp_path / "run" / "best_model.pth",
                       "--format", "json", "--workers", "0")
    assert rc == 0, err
    rows = json.loads(out)
    assert len(rows) == 36 and {r["true"] for r in rows} == {"bkl", "mel", "nv"}


def test_separate_validation_csv(tmp_path):
    root = isic2019(tmp_path, {"MEL": 4, "NV": 4, "BCC": 4})
    gt = (root / "ISIC_2019_Training_GroundTruth.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(gt[:1] + gt[1:4] + gt[5:8] + gt[9:12]) + "\n")
    (root / "val.csv").write_text("\n".join(gt[:1] + [gt[4], gt[8]]) + "\n")  # no BCC in validation
    args = ["train", "--images", root / "ISIC_2019_Training_Input", "--labels", root / "train.csv", "--epochs", "1",
            "--batch-size", "4", *SMALL]
    with pytest.warns(UserWarning, match="validation split has no images of BCC"):
        rc, out, err = cli(*args, "--val-labels", root / "val.csv", "--out", tmp_path / "run")
    assert rc == 0, err
    assert "9 train / 2 val images" in out
    one_line_error(cli(*args, "--val-labels", root / "val.csv", "--val-split", "0.2", "--out", tmp_path / "r2"),
                   "--val-labels and --val-split")
    (root / "overlap.csv").write_text("\n".join(gt[:1] + gt[1:3]) + "\n")
    one_line_error(cli(*args, "--val-labels", root / "overlap.csv", "--out", tmp_path / "r3"), "both the training and validation")


def test_val_split_beside_a_val_folder_is_refused(tmp_path):
    from cli_helpers import tiny_data

    data = tiny_data(tmp_path / "d", per_class=3)
    one_line_error(cli("train", "--data", data, "--val-split", "0.2", "--out", tmp_path / "r", *SMALL),
                   "has a val folder and --val-split")
    assert not (tmp_path / "r").exists()


def test_val_folder_missing_a_class_warns(tmp_path):
    from cli_helpers import tiny_data

    data = tiny_data(tmp_path / "d", per_class=3)
    for f in (data / "val" / "spots").iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match="validation split has no images of spots"):
        rc, out, err = cli("train", "--data", data, "--epochs", "1", "--batch-size", "6", "--select", "auc",
                           "--out", tmp_path / "r", *SMALL)
    assert rc == 0, err
    record = json.loads((tmp_path / "r" / "metrics.jsonl").read_text())
    assert record["val_per_class"]["spots"]["auc"] is None  # not measurable, not a made-up number
    others = [m["auc"] for name, m in record["val_per_class"].items() if name != "spots"]
    assert record["val_auc"] == pytest.approx(sum(others) / 3) and record["best"]


def test_class_weights():
    s = cli_data.Samples([Path(f"{i}") for i in range(8)], [0] * 6 + [1, 2], ["nv", "mel", "bcc"])
    w = cli_data.class_weights("balanced", s)
    torch.testing.assert_close(w, torch.tensor([8 / 18, 8 / 3, 8 / 3]))
    assert cli_data.class_weights("none", s) is None


def test_class_weights_file(tmp_path):
    s = cli_data.Samples([Path("a"), Path("b")], [0, 1], ["nv", "mel"])
    (tmp_path / "w.json").write_text(json.dumps({"nv": 1, "mel": 4}))
    assert cli_data.class_weights(str(tmp_path / "w.json"), s).tolist() == [1.0, 4.0]
    (tmp_path / "bad.json").write_text(json.dumps({"nv": 1}))
    with pytest.raises(Exception, match="every class"):
        cli_data.class_weights(str(tmp_path / "bad.json"), s)


def test_balanced_sampler_is_seeded_balanced_and_split_over_ranks():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    a = cli_data.BalancedSampler(labels, seed=7)
    a.set_epoch(3)
    draws = list(a)
    assert len(draws) == 100 and draws == list(a)  # the same for the same (seed, epoch)
    counts = Counter(labels[i] for i in draws)
    assert all(20 <= counts[c] <= 50 for c in range(3))  # about a third each (the majority is 90%)
    a.set_epoch(4)
    assert list(a) != draws
    ranks = [cli_data.BalancedSampler(labels, seed=7, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(3)
    merged = [i for pair in zip(*(list(r) for r in ranks)) for i in pair]
    assert merged == draws and all(len(r) == 50 for r in ranks)


def test_imbalance_options_train_and_resume_exactly(tmp_path, monkeypatch):
    """--class-weights, --sampler balanced, --label-smoothing and --drop-path: a run stopped
    in its second epoch and resumed ends with the uninterrupted run's weights."""
    from cli_helpers import model_state, tiny_data
    from hifuse.cli import train

    data = tiny_data(tmp_path / "d", per_class=4)
    for f in sorted((data / "train" / "spots").iterdir())[1:]:
        f.unlink()  # a minority class
    args = ["train", "--data", data, "--epochs", "2", "--class-weights", "balanced", "--sampler", "balanced",
            "--label-smoothing", "0.1", "--drop-path", "0.1", "--select", "balanced_acc", "--batch-size", "4",
            "--lr", "1e-3", *SMALL]
    rc, out, err = cli(*args, "--out", tmp_path / "whole")
    assert rc == 0, err
    settings = json.loads((tmp_path / "whole" / "settings.json").read_text())
    assert settings["class_weight_values"]["spots"] == pytest.approx(13 / 4)

    validate, calls = train._validate, []

    def stop_in_epoch_two(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return validate(*a, **kw)

    monkeypatch.setattr(train, "_validate", stop_in_epoch_two)
    rc, out, err = cli(*args, "--out", tmp_path / "stopped")
    assert rc == 130
    monkeypatch.setattr(train, "_validate", validate)
    rc, out, err = cli("train", "--out", tmp_path / "stopped", "--resume", "--workers", "0")
    assert rc == 0, err
    assert "resuming at epoch 2" in out
    a, b = model_state(tmp_path / "whole" / "last.pth"), model_state(tmp_path / "stopped" / "last.pth")
    for k in a:
        assert torch.equal(a[k], b[k]), k
