"""evaluate, predict, explain, export, info and --help as a new user meets them: classes mapped
by name or refused, the run's preprocessing by default, the field's metrics and files,
unreadable images, checkpoints of other tools, closed pipes, pictures, deployment exports."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from cli_helpers import cli, demo, env, one_line_error, trained  # noqa: E402,F401
from helpers import DEVICE, triton_device_or_skip  # noqa: E402
from hifuse import config  # noqa: E402
from hifuse.cli import parser  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def bare_copy(trained: Path, tmp_path: Path) -> Path:
    """The run's weights alone, as a user copies them (no classes.json or settings.json)."""
    (tmp_path / "bare").mkdir(exist_ok=True)
    shutil.copy(trained / "best_model.pth", tmp_path / "bare" / "model.pth")
    return tmp_path / "bare" / "model.pth"


def metrics(path: Path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def evaluate(checkpoint: Path, data: Path, out: Path, *extra) -> dict:
    """``hifuse evaluate`` that must succeed; its metrics.json."""
    rc, _, err = cli("evaluate", "--data", data, "--checkpoint", checkpoint, "--workers", "0", "--out", out, *extra)
    assert rc == 0, err
    return metrics(out)


def test_classes_without_names_are_refused_and_mapped_by_name_when_given(trained, demo, tmp_path):
    run = evaluate(trained / "best_model.pth", demo, tmp_path / "run")
    bare = bare_copy(trained, tmp_path)
    one_line_error(cli("evaluate", "--data", demo, "--checkpoint", bare, "--img-size", "64", "--workers", "0"),
                   "no class names", "--classes")
    # the same images in folders that sort in another order than training's classes: by name
    order = json.loads((trained / "classes.json").read_text())
    renamed = tmp_path / "renamed"
    for i, name in enumerate(order):
        shutil.copytree(demo / "test" / name, renamed / f"{len(order) - i}_{name}")
    mapping = ",".join(f"{len(order) - i}_{name}" for i, name in enumerate(order))
    named = evaluate(bare, renamed, tmp_path / "named", "--img-size", "64", "--classes", mapping)
    assert named["accuracy"] == run["accuracy"] > 0.9
    # with names known (classes.json beside it), folders that sort differently map by name
    shutil.copy(trained / "classes.json", tmp_path / "bare" / "classes.json")
    shuffled = tmp_path / "shuffled"
    for name in order:
        shutil.copytree(demo / "test" / name, shuffled / name)
    (tmp_path / "bare" / "classes.json").write_text(json.dumps(order))
    assert evaluate(bare, shuffled, tmp_path / "byname", "--img-size", "64")["confusion"] == run["confusion"]


def test_the_runs_image_size_is_the_default(trained, demo, tmp_path):
    res = evaluate(trained / "best_model.pth", demo, tmp_path / "e")
    assert res["preprocess"]["img_size"] == 64  # the run's, not 224
    with pytest.warns(UserWarning, match="--img-size 96 differs from the run's 64"):
        rc, _, err = cli("predict", demo / "test" / "spots", "--checkpoint", trained / "best_model.pth", "--img-size", "96")
    assert rc == 0, err
    # a run saved before the recipe was: settings.json with img_size alone
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(trained / "best_model.pth", old / "best_model.pth")
    shutil.copy(trained / "classes.json", old / "classes.json")
    (old / "settings.json").write_text(json.dumps({"img_size": 64}))
    assert evaluate(old / "best_model.pth", demo, tmp_path / "o")["confusion"] == res["confusion"]


def test_evaluate_writes_the_fields_metrics(trained, demo, tmp_path):
    rc, out, err = cli("evaluate", "--data", demo, "--checkpoint", trained / "best_model.pth", "--workers", "0",
                       "--out", tmp_path / "e")
    assert rc == 0, err
    assert "balanced accuracy" in out and "specificity" in out
    res = metrics(tmp_path / "e")
    classes = list(res["per_class"])
    with open(tmp_path / "e" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == res["images"] == 32
    truth = torch.tensor([classes.index(r["true"]) for r in rows])
    probs = torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    assert all(r["predicted"] == classes[int(p.argmax())] for r, p in zip(rows, probs))
    recall = [res["per_class"][c]["recall"] for c in classes]
    assert res["balanced_accuracy"] == pytest.approx(sum(recall) / len(recall))
    for i, c in enumerate(classes):
        m = res["per_class"][c]
        assert m["sensitivity"] == m["recall"]
        negatives = truth != i
        predicted_other = probs.argmax(1) != i
        assert m["specificity"] == pytest.approx(float((negatives & predicted_other).sum() / negatives.sum()))
        # one-vs-rest AUC: the chance a positive outranks a negative (ties half)
        pos, neg = probs[truth == i, i], probs[truth != i, i]
        auc = float(((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean())
        assert m["auc"] == pytest.approx(auc, abs=1e-4)
        assert sum(res["confusion_normalized"][i]) == pytest.approx(1.0, abs=1e-5)
    assert res["auc"] == pytest.approx(sum(res["per_class"][c]["auc"] for c in classes) / len(classes))
    for name in ("confusion_matrix.png", "roc.png"):
        with Image.open(tmp_path / "e" / name) as im:
            assert im.size[0] > 300


def test_predict_reports_an_unreadable_image_and_predicts_the_others(trained, demo, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(demo / "test" / "spots", folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.warns(UserWarning, match=r"cannot read 1 of 9 images(.|\n)*broken\.png"):
        rc, out, err = cli("predict", folder, "--checkpoint", trained / "best_model.pth", "--format", "json", "--workers", "0")
    assert rc == 0, err
    rows = json.loads(out)
    assert len(rows) == 9 and sum("error" in r for r in rows) == 1
    assert all(r["top"][0]["class"] == "spots" for r in rows if "error" not in r)
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "broken.png").write_bytes(b"nope")
    one_line_error(cli("predict", tmp_path / "only", "--checkpoint", trained / "best_model.pth"), "cannot read any")


def test_checkpoint_files_that_used_to_raise(trained, demo, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    one_line_error(cli("predict", demo / "test", "--checkpoint", tmp_path / "empty.pth"), "empty")
    data = (trained / "best_model.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    one_line_error(cli("predict", demo / "test", "--checkpoint", tmp_path / "cut.pth"), "cannot read checkpoint")
    one_line_error(cli("predict", demo / "test", "--checkpoint", tmp_path), "is a folder")
    # torchvision's reference scripts save {"model", "optimizer", ..., "args": argparse.Namespace}
    state = torch.load(trained / "best_model.pth", weights_only=True)
    ref = tmp_path / "tv" / "checkpoint.pth"
    ref.parent.mkdir()
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, ref)
    one_line_error(cli("predict", demo / "test", "--checkpoint", ref), "--trust-checkpoint", "argparse.Namespace")
    with pytest.warns(UserWarning, match="--trust-checkpoint"):
        rc, out, err = cli("predict", demo / "test" / "spots", "--checkpoint", ref, "--trust-checkpoint", "--img-size", "64",
                           "--classes", ",".join(json.loads((trained / "classes.json").read_text())))
    assert rc == 0, err and "spots" in out


def test_output_into_a_closed_pipe_is_a_quiet_exit(trained, demo):
    command = (f"{sys.executable} -m hifuse predict {demo / 'test'} --checkpoint {trained / 'best_model.pth'} "
               "--workers 0 | head -n 1")
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env(), capture_output=True, text=True, timeout=300)
    assert result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_explain_output_names_and_batch_mode(trained, demo, tmp_path):
    image = next((demo / "test" / "spots").iterdir())
    rc, out, err = cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "cam")
    assert rc == 0, err
    with Image.open(tmp_path / "cam.png") as im:
        assert im.format == "PNG"
    rc, out, err = cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "cam2", "--format", "jpeg")
    assert rc == 0, err
    with Image.open(tmp_path / "cam2.jpg") as im:
        assert im.format == "JPEG"
    one_line_error(cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "cam.txt"), ".txt")
    one_line_error(cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "c.png", "--format",
                       "jpeg"), "--format")
    rc, out, err = cli("explain", demo / "test", "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "cams")
    assert rc == 0, err
    written = sorted(p.relative_to(tmp_path / "cams") for p in (tmp_path / "cams").rglob("*.png"))
    assert len(written) == 32 and Path("spots") / "spots_0000_cam.png" in written


def test_evaluate_out_naming_a_file(trained, demo, tmp_path):
    (tmp_path / "f").write_text("")
    one_line_error(cli("evaluate", "--data", demo, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "f"),
                   "is a file")


def test_export_pt2_and_onnx_equal_eager_at_another_batch(trained, tmp_path):
    from hifuse.cli import models

    loaded = models.load_for_inference(trained / "best_model.pth", None, torch.device("cpu"))
    x = torch.randn(3, 3, 64, 64)  # exported with batch 2
    with torch.no_grad():
        ref = loaded.model(x)
    rc, out, err = cli("export", "--checkpoint", trained / "best_model.pth", "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert rc == 0, err
    program = torch.export.load(str(tmp_path / "m.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref, rtol=1e-5, atol=1e-5)
    side = json.loads((tmp_path / "m.pt2.json").read_text())
    assert side["classes"] == json.loads((trained / "classes.json").read_text()) and side["preprocess"]["img_size"] == 64
    one_line_error(cli("export", "--checkpoint", trained / "best_model.pth", "--format", "onnx", "--out", tmp_path / "m.pt2"),
                   ".onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    rc, out, err = cli("export", "--checkpoint", trained / "best_model.pth", "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert rc == 0, err
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)


def test_export_without_its_extra_names_it(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    one_line_error(cli("export", "--checkpoint", trained / "best_model.pth", "--format", "onnx", "--out", tmp_path / "m.onnx"),
                   "hifuse-kernels[export]")


def test_info_lists_versions_parts_and_ops():
    rc, out, err = cli("info")
    assert rc == 0, err
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    for needle in ("torch", "triton", "native library", f"fused parts on {device}", "attention", "fusion",
                   "hifuse::layer_norm_cf"):
        assert needle in out, out
    assert "hifuse::window_attention" in out


def part_lines(text: str) -> dict[str, str]:
    """The fused-parts table of ``hifuse info``: part -> its status text. Fails on any other
    line inside the table (a log line, say)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fused parts on"))
    table = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        part, _, status = line.strip().partition(" ")
        assert line.startswith("  ") and part in config.FusedParts.names(), f"{line!r} inside the table:\n{text}"
        table[part] = status.strip()
    assert set(table) == set(config.FusedParts.names()), text
    return table


def test_info_on_a_cpu_without_triton_says_what_runs_eager_and_logs_nothing_into_the_report():
    # a user's CPU machine: no TRITON_INTERPRET (env() drops the suite's), stdout and stderr as a terminal shows them
    result = subprocess.run([sys.executable, "-m", "hifuse", "info", "--device", "cpu"], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert result.returncode == 0, result.stdout
    assert "runs eager" not in result.stdout, result.stdout  # the fallback log lines
    table = part_lines(result.stdout)
    # the global blocks need Triton kernels; their stages' fused forward hands them to eager
    for part in ("attention", "local", "fusion"):
        assert table[part].startswith("no: "), table
        assert "Triton kernels need CUDA tensors" in table[part] or "triton is not installed" in table[part], table
    assert re.search(r"^  hifuse::window_attention +no: ", result.stdout, re.M), result.stdout


def test_info_is_yes_only_where_every_module_of_a_part_runs_fused(monkeypatch, caplog):
    from hifuse.cli import info
    from hifuse.model import PatchMerging, create_model

    def small():  # a new model each time: decisions are cached per module
        return create_model("hifuse_tiny", num_classes=2, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                            num_heads=(1, 2, 4, 8)).eval()

    x = torch.randn(1, 3, 32, 32)
    # the patch layers run as native or PyTorch ops wherever the library loads: all fused
    assert info.probe(small(), x)["patches"] == ("yes", "")
    # one of the three patch mergings refused: partly, naming it
    model = small()
    first = next(m for m in model.modules() if isinstance(m, PatchMerging))
    route = config._routes[PatchMerging]
    monkeypatch.setitem(config._routes, PatchMerging, config.Route(
        "patches", lambda m, *args: "refused by the test" if m is first else route.check(m, *args), route.forward))
    logged = set(config._logged)
    with caplog.at_level(logging.WARNING, logger="hifuse"):
        assert info.probe(model, x)["patches"] == ("partly", "PatchMerging eager (1 of 3): refused by the test")
    # the probe logs nothing, and leaves the once-per-reason log of later forwards as it was
    assert not caplog.records and config._logged == logged


@triton_device_or_skip()
def test_info_names_the_attention_modules_that_run_eager():
    from hifuse.cli import info
    from hifuse.model import create_model

    # the last stage's head_dim 128 has no kernel: its blocks run eager, and so does its stage
    model = create_model("hifuse_tiny", num_classes=2, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                         num_heads=(1, 2, 4, 1)).to(DEVICE).eval()
    found = info.probe(model, torch.randn(1, 3, 32, 32, device=DEVICE))
    assert found["local"] == ("yes", "")
    status, why = found["attention"]
    assert status == "partly", found
    assert "GlobalBlock eager (1 of 4): head_dim 128" in why and "GlobalStage eager (1 of 4): head_dim 128" in why, why


def test_help_shows_every_default_and_explains_every_option():
    _, commands = parser()
    for name, p in commands.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help line"
        text = p.format_help()
        assert "(default:" in text or name == "info", name
    assert "(default: 32)" in commands["predict"].format_help()


def test_version_aliases_and_unknown_options():
    with pytest.raises(SystemExit) as e:
        cli("--version")
    assert e.value.code == 0
    result = subprocess.run([sys.executable, "-m", "hifuse", "train", "--out", "x", "--learning-rate", "1"], env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "usage: hifuse train" in result.stderr and "--learning-rate" in result.stderr
    _, commands = parser()
    b = commands["benchmark"].parse_args(["--batch", "4"])
    assert b.batch == 4 and commands["benchmark"].parse_args(["--batch-size", "5"]).batch == 5
    assert commands["train"].parse_args(["--weights", "w.pth"]).init == "w.pth"
    p = commands["predict"].parse_args(["x.png", "--checkpoint", "c", "--amp", "bf16", "--workers", "2", "--batch-size", "8"])
    assert (p.amp, p.workers, p.batch_size) == ("bf16", 2, 8)


def test_cuda_device_always_has_an_index(monkeypatch):
    """A plain "cuda" (the default on a GPU machine) becomes the current device's index:
    torch.cuda.set_device refuses a device without one, which stopped every command there."""
    from hifuse.cli import models
    from hifuse.cli.errors import CliError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert models.device_of(None) == torch.device("cuda", 1)
    assert models.device_of("cuda") == torch.device("cuda", 1)
    assert models.device_of("cuda:0") == torch.device("cuda", 0)
    assert models.device_of("cpu") == torch.device("cpu")
    with pytest.raises(CliError, match="has 2 CUDA devices"):
        models.device_of("cuda:2")
    # what train's set-up does with it
    from torch._utils import _get_device_index

    assert _get_device_index(models.device_of(None)) == 1
