"""The ``hifuse`` command line on the demo data at 64x64, on the CPU.

Training runs use a narrow model (``--depths 1,1,1,1 --dims 16,32,64,128``) so that a few
epochs take seconds; the code paths are those of the published sizes.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("torchmetrics")
pytest.importorskip("matplotlib")

from PIL import Image  # noqa: E402

from cli_helpers import ROOT, SMALL, cli, demo, env, model_state, one_line_error, run_cli, tiny_data, trained  # noqa: E402,F401
from hifuse.cli import data as cli_data  # noqa: E402
from hifuse.cli import demo_data  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_training_learns_the_demo_data(trained):
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert max(r["val_accuracy"] for r in records) >= 0.75  # chance is 0.25
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert set(records[0]["val_per_class"]) == set(demo_data.CLASSES)
    assert json.loads((trained / "classes.json").read_text()) == sorted(demo_data.CLASSES)
    best = torch.load(trained / "best_model.pth", weights_only=True)  # a bare state_dict
    assert all(isinstance(v, torch.Tensor) for v in best.values()) and "conv_head.weight" in best
    last = torch.load(trained / "last.pth", weights_only=False)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "rng", "settings", "classes"} <= set(last)
    assert last["epoch"] == 3 and last["settings"]["dims"] == [16, 32, 64, 128]
    assert any((trained / "tensorboard").iterdir())


def test_schedule_is_warmup_then_cosine():
    from hifuse.cli.train import schedule

    f = schedule({"epochs": 10, "warmup_epochs": 1, "lr": 1e-4, "min_lr": 1e-6}, steps_per_epoch=5)
    assert [round(f(i), 6) for i in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(5) == pytest.approx(1.0)
    assert f(49) == pytest.approx(0.01, abs=2e-3)
    assert all(f(i) >= f(i + 1) for i in range(5, 49))


def test_no_weight_decay_on_norms_and_biases():
    import hifuse
    from hifuse.cli.train import optimizer_for

    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    opt = optimizer_for(model, {"lr": 1e-4, "weight_decay": 0.01})
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.defaults["betas"] == (0.9, 0.999)


def test_resume_after_kill_ends_with_the_uninterrupted_weights(tmp_path):
    data = tiny_data(tmp_path / "data", per_class=4)
    args = ["train", "--data", data, "--epochs", "3", "--batch-size", "8", "--lr", "1e-3", "--seed", "3", *SMALL]
    whole = run_cli(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hifuse", *map(str, args), "--out", str(out)], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (out / "last.pth").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = torch.load(out / "last.pth", weights_only=False)["epoch"] + 1
    assert 1 <= done < 3, "the run was not stopped mid-way"

    refused = run_cli(*args, "--out", out)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run_cli("train", "--out", out, "--resume", "--workers", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming at epoch {done + 1}" in resumed.stdout
    a, b = model_state(tmp_path / "whole" / "last.pth"), model_state(out / "last.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_evaluate_agrees_with_predict(trained, demo, tmp_path):
    rc, out, err = cli("evaluate", "--data", demo, "--checkpoint", trained / "best_model.pth", "--img-size", "64",
                       "--workers", "0", "--out", tmp_path / "eval")
    assert rc == 0, err
    assert "macro" in out and "accuracy" in out
    res = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert res["split"] == "test" and res["images"] == 32
    with Image.open(tmp_path / "eval" / "confusion_matrix.png") as im:
        assert im.size[0] > 100

    rc, out, err = cli("predict", demo / "test", "--checkpoint", trained / "best_model.pth", "--img-size", "64",
                       "--format", "json", "--topk", "1")
    assert rc == 0, err
    rows = json.loads(out)
    classes = json.loads((trained / "classes.json").read_text())
    truth = torch.tensor([classes.index(Path(r["image"]).parent.name) for r in rows])
    guess = torch.tensor([classes.index(r["top"][0]["class"]) for r in rows])
    n = len(classes)
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((truth, guess), torch.ones_like(truth), accumulate=True)
    assert confusion.tolist() == res["confusion"]
    tp = confusion.diag().double()
    precision = tp / confusion.sum(0).clamp_min(1)
    recall = tp / confusion.sum(1).clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    assert res["accuracy"] == pytest.approx(float((truth == guess).double().mean()))
    assert res["precision"] == pytest.approx(float(precision.mean()))
    assert res["recall"] == pytest.approx(float(recall.mean()))
    assert res["f1"] == pytest.approx(float(f1.mean()))
    for i, name in enumerate(classes):
        assert res["per_class"][name]["f1"] == pytest.approx(float(f1[i]))


def test_predict_formats_and_converts_grayscale_and_rgba(trained, demo, tmp_path):
    source = next((demo / "test" / "spots").iterdir())
    with Image.open(source) as im:
        im.convert("L").save(tmp_path / "gray.png")
        im.convert("RGBA").save(tmp_path / "rgba.png")
    for fmt in ("table", "csv", "json"):
        rc, out, err = cli("predict", tmp_path / "gray.png", tmp_path / "rgba.png", "--checkpoint",
                           trained / "best_model.pth", "--img-size", "64", "--format", fmt, "--topk", "3")
        assert rc == 0, err
        assert "gray.png" in out and "rgba.png" in out
    assert json.loads(out)[1]["top"][0]["class"] == "spots"
    assert len(json.loads(out)[0]["top"]) == 3


def test_explain_draws_the_image_and_the_map_with_predicts_probability(trained, demo, tmp_path):
    image = tmp_path / "wide.png"
    with Image.open(next((demo / "test" / "checks").iterdir())) as im:
        im.resize((80, 48)).save(image)
    rc, out, err = cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "cam.png")
    assert rc == 0, err
    with Image.open(tmp_path / "cam.png") as cam:
        assert cam.size[0] >= 800 and cam.size[1] >= 400  # two readable panels and a colour bar, upscaled
    rc, pred, err = cli("predict", image, "--checkpoint", trained / "best_model.pth", "--format", "json", "--topk", "1")
    assert rc == 0, err
    top = json.loads(pred)[0]["top"][0]
    assert f"{top['class']} (probability {top['probability']:.4f})" in out  # the same preprocessing
    rc, out, err = cli("explain", image, "--checkpoint", trained / "best_model.pth", "--out", tmp_path / "x.png", "--class", "nope")
    assert rc == 2 and "nope" in err


def test_grad_cam_follows_the_evidence():
    """A model whose logit is the mean of channel 0 of the last fusion output: the map is that
    channel, normalised."""
    import hifuse
    from hifuse.cli.explain import grad_cam

    model = hifuse.create_model("hifuse_tiny", num_classes=2, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)).eval()
    x = torch.randn(1, 3, 64, 64)
    cam, target, probs = grad_cam(model, x, None)
    assert cam.shape == (64, 64) and 0 <= float(cam.min()) and float(cam.max()) == pytest.approx(1.0)
    assert target == int(probs.argmax()) and probs.sum() == pytest.approx(1.0)


def test_distributed_step_equals_one_process_on_the_global_batch(tmp_path):
    """Two gloo processes of 4 images each against one process of 8: one step, same weights."""
    data = tiny_data(tmp_path / "data", per_class=2)
    common = ["--data", data, "--epochs", "1", "--lr", "1e-3", "--sync-bn", "--device", "cpu", *SMALL]
    single = run_cli("train", "--out", tmp_path / "one", "--batch-size", "8", *common)
    assert single.returncode == 0, single.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", "-m", "hifuse", "train", "--out", str(tmp_path / "two"), "--batch-size", "4",
         *map(str, common)],
        env=e, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    one = torch.load(tmp_path / "one" / "last.pth", weights_only=False)
    two = torch.load(tmp_path / "two" / "last.pth", weights_only=False)
    # gradients, read from AdamW's first moment after one step (exp_avg = 0.1 g)
    import hifuse
    from hifuse.cli.train import optimizer_for

    model = hifuse.create_model("hifuse_tiny", num_classes=4, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer_for(model, {"lr": 1e-3, "weight_decay": 0.01}).param_groups for p in g["params"]]
    grads_one = {order[i]: s["exp_avg"] / 0.1 for i, s in one["optimizer"]["state"].items()}
    grads_two = {order[i]: s["exp_avg"] / 0.1 for i, s in two["optimizer"]["state"].items()}
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 100
    for k, g in grads_one.items():
        torch.testing.assert_close(grads_two[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"grad {k}: {m}")
    # parameters: equal where the gradient is clear of numerical noise (Adam's first step moves
    # every parameter by lr g / (|g| + eps), about lr sign(g)); buffers (running statistics) too
    a, b = one["model"], two["model"]
    assert a.keys() == b.keys()
    for k in a:
        g = grads_one.get(k)
        if g is None:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        else:
            clear = g.abs() > 1e-5
            torch.testing.assert_close(b[k][clear], a[k][clear], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            assert (b[k] - a[k]).abs().max() <= 2.1e-3, k
    ma = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    mb = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert mb["val_accuracy"] == ma["val_accuracy"]
    assert mb["train_loss"] == pytest.approx(ma["train_loss"], rel=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_missing_and_empty_folders(tmp_path):
    one_line_error(cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r", *SMALL), "no such folder")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("train", "--data", tmp_path / "empty", "--out", tmp_path / "r", *SMALL), "no class folders")
    tiny_data(tmp_path / "d", per_class=2)
    (tmp_path / "d" / "train" / "lonely").mkdir()
    one_line_error(cli("train", "--data", tmp_path / "d", "--out", tmp_path / "r", *SMALL), "class without images", "lonely")
    tiny_data(tmp_path / "noval", per_class=2, val=0)
    shutil.rmtree(tmp_path / "noval" / "val")
    one_line_error(cli("train", "--data", tmp_path / "noval", "--out", tmp_path / "r", *SMALL), "--val-split")
    one_line_error(cli("predict", tmp_path / "nothing.png", "--checkpoint", tmp_path / "c.pth"), "no such")


def test_cuda_graphs_refusals(tmp_path):
    """--cuda-graphs refuses what a graph cannot record, before writing anything."""
    from types import SimpleNamespace

    from hifuse.cli import train
    from hifuse.cli.errors import CliError

    data = tiny_data(tmp_path / "d", per_class=2)
    one_line_error(cli("train", "--data", data, "--out", tmp_path / "r", "--cuda-graphs", *SMALL), "--cuda-graphs needs a GPU")
    assert not (tmp_path / "r").exists()
    gpu = SimpleNamespace(device=torch.device("cuda", 0), world=1)
    ok = {"amp": "bf16", "compile": False}
    train._check_cuda_graphs(ok, gpu)
    for change, needle in [({"amp": "fp16"}, "GradScaler"), ({"compile": True}, "choose one")]:
        with pytest.raises(CliError, match=needle):
            train._check_cuda_graphs({**ok, **change}, gpu)
    with pytest.raises(CliError, match="one process"):
        train._check_cuda_graphs(ok, SimpleNamespace(device=gpu.device, world=2))


def test_image_size_must_be_a_multiple_of_32(tmp_path):
    tiny_data(tmp_path / "d", per_class=2)
    args = ["train", "--data", tmp_path / "d", "--out", tmp_path / "r", "--depths", "1,1,1,1", "--img-size", "100"]
    one_line_error(cli(*args), "multiple of 32")
    one_line_error(cli("benchmark", "--img-size", "100"), "multiples of 32")


def test_unreadable_images_are_skipped_or_refused(tmp_path):
    data = tiny_data(tmp_path / "d", per_class=3)
    folder = data / "train" / "checks"
    (folder / "garbage.png").write_bytes(b"not an image at all")
    good = next(folder.iterdir()).read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    args = ["train", "--data", data, "--epochs", "1", "--batch-size", "4", *SMALL]
    one_line_error(cli(*args, "--out", tmp_path / "strict", "--strict"), "2 unreadable images", "--strict")
    with pytest.warns(UserWarning, match=r"skipping 2 unreadable images(.|\n)*garbage\.png(.|\n)*truncated\.png"):
        rc, out, err = cli(*args, "--out", tmp_path / "lenient")
    assert rc == 0, err
    assert "12 train" in out


def test_checkpoint_for_another_class_count(trained, tmp_path):
    other = tmp_path / "other"
    for name in ("cats", "dogs"):
        (other / name).mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 10, 10)).save(other / name / "a.png")
    one_line_error(cli("evaluate", "--data", other, "--checkpoint", trained / "best_model.pth", "--img-size", "64",
                        "--workers", "0"), "--init")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.pth").write_bytes((trained / "best_model.pth").read_bytes())  # no classes.json beside it
    one_line_error(cli("evaluate", "--data", other, "--checkpoint", bare / "model.pth", "--img-size", "64",
                        "--workers", "0"), "4 classes", "--init")
    # fine-tuning on two classes from the four-class weights is what --init is for
    (other / "train").mkdir()
    for name in ("cats", "dogs"):
        (other / name).rename(other / "train" / name)
    for i in range(3):
        Image.new("RGB", (64, 64), (10, 10, 200)).save(other / "train" / "dogs" / f"b{i}.png")
        Image.new("RGB", (64, 64), (200, 10, 10)).save(other / "train" / "cats" / f"b{i}.png")
    rc, out, err = cli("train", "--data", other, "--val-split", "0.25", "--out", tmp_path / "ft", "--epochs", "1",
                       "--batch-size", "4", "--init", trained / "best_model.pth", *SMALL)
    assert rc == 0, err
    ft = model_state(tmp_path / "ft" / "last.pth")
    assert ft["conv_head.weight"].shape == (2, 128)


def test_output_folder_holding_a_run(trained, demo, tmp_path):
    args = ["train", "--data", demo, "--out", trained, "--epochs", "1", *SMALL]
    one_line_error(cli(*args), "already holds a run", "--resume", "--overwrite")
    one_line_error(cli("train", "--out", tmp_path / "fresh", "--resume"), "no last.pth")


def test_bad_checkpoint_files(tmp_path, demo):
    (tmp_path / "junk.pth").write_bytes(b"\x00" * 64)
    one_line_error(cli("predict", demo / "test", "--checkpoint", tmp_path / "junk.pth"), "cannot read checkpoint")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    one_line_error(cli("predict", demo / "test", "--checkpoint", tmp_path / "other.pth"), "not a HiFuse state_dict")


def test_csv_labels(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = ["image,MEL,NV,BCC"]
    for i in range(9):
        Image.new("RGB", (40, 40), (i * 20, 0, 0)).save(images / f"ISIC_{i:07d}.jpg")
        onehot = ["0.0"] * 3
        onehot[i % 3] = "1.0"
        rows.append(f"ISIC_{i:07d}," + ",".join(onehot))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    s = cli_data.read_label_csv(images, tmp_path / "labels.csv")
    assert s.classes == ["MEL", "NV", "BCC"] and s.labels == [i % 3 for i in range(9)]
    train, val = cli_data.split(s, 1 / 3, seed=0)
    assert len(train) == 6 and len(val) == 3 and sorted(val.labels) == [0, 1, 2]
    (tmp_path / "names.csv").write_text("image,label\n" + "".join(f"ISIC_{i:07d},{'ab'[i % 2]}\n" for i in range(9)))
    assert cli_data.read_label_csv(images, tmp_path / "names.csv").classes == ["a", "b"]
    (tmp_path / "bad.csv").write_text("image,MEL,NV\nISIC_0000000,1,1\n")
    one_line_error(cli("train", "--images", images, "--labels", tmp_path / "bad.csv", "--val-split", "0.2",
                        "--out", tmp_path / "r", *SMALL), "exactly one class")
    one_line_error(cli("train", "--images", images, "--labels", tmp_path / "labels.csv", "--out", tmp_path / "r",
                        *SMALL), "--val-split")


def test_augmentation_depends_only_on_seed_epoch_and_index(demo):
    samples = cli_data.scan_folder(demo / "train")
    from hifuse.cli import preprocess

    ds = cli_data.ImageDataset(samples, preprocess.train_transform(preprocess.Preprocess(img_size=64)), seed=5)
    a = ds[3][0]
    torch.manual_seed(123)
    assert torch.equal(ds[3][0], a)
    ds.epoch = 1
    assert not torch.equal(ds[3][0], a)


def test_benchmark_command():
    rc, out, err = cli("benchmark", "--batch", "1", "--img-size", "32", "--providers", "eager", "--rounds", "1", "--warmup", "0")
    assert rc == 0, err
    assert re.search(r"^eager\s+[\d.]+\s+[\d.]+", out, re.M)
    one_line_error(cli("benchmark", "--providers", "magic"), "magic")
    one_line_error(cli("benchmark", "--train", "--batch", "1", "--img-size", "32"), "at least 2")
    if not torch.cuda.is_available():
        one_line_error(cli("benchmark", "--providers", "fused_graph", "--img-size", "32"), "needs a GPU")


def test_benchmark_profile(tmp_path):
    rc, out, err = cli("benchmark", "--batch", "2", "--img-size", "32", "--providers", "eager", "--rounds", "1",
                       "--warmup", "0", "--train", "--profile", tmp_path / "prof")
    assert rc == 0, err
    text = (tmp_path / "prof" / "profile_eager_train_b2.txt").read_text()
    assert "train step, batch 2" in text and "# of Calls" in text
    # 25 rows of ops between the header's rules and the closing one
    assert "aten::" in text and len([line for line in text.splitlines() if "aten::" in line]) <= 25


def test_readme_train_on_your_images(tmp_path):
    """The README's "Train on your images" commands, run as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Train on your images", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]
    commands = [c for c in commands if not c.startswith("pip install")]  # done by the test set-up
    assert len(commands) >= 5
    for command in commands:
        if command.startswith("torchrun"):
            continue  # the same training as a DDP job: test_distributed_step_equals_one_process...
        result = subprocess.run(command, shell=True, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    assert (tmp_path / "cam.png").is_file()
