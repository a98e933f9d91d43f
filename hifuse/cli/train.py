"""``hifuse train``: the paper's recipe on an image folder, on one device or many (torchrun).

Reproducible by construction: the shuffling order and each image's augmentation depend only on
(seed, epoch, index), and every epoch starts from RNG states seeded by (seed, epoch), so a run
resumed from ``last.pth`` ends with the weights of an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .. import config, graphs
from . import data as data_
from . import metrics as metrics_
from . import models, options, preprocess
from .bench import no_decay_groups
from .errors import CliError

RUN_FILES = ("last.pth", "best_model.pth", "metrics.jsonl", "classes.json", "settings.json", "tensorboard")
# what defines a run; the rest (workers, device, ...) may change on --resume
RUN_SETTINGS = (
    "data", "images", "labels", "val_split", "val_labels", "val_images", "id_column", "label_column",
    "group_column", "keep_empty_classes", "model", "irmlp", "depths", "dims", "heads", "img_size", "bit_depth",
    "epochs", "batch_size", "lr", "min_lr", "weight_decay", "warmup_epochs", "amp", "fused", "compile",
    "channels_last", "seed", "init", "select", "sync_bn", "strict", "class_weights", "sampler", "label_smoothing",
    "drop_path", "cuda_graphs",
)
# settings added since runs were first saved, with the value older runs had
LATER_SETTINGS = dict(
    val_labels=None, val_images=None, id_column=None, label_column=None, group_column=None,
    keep_empty_classes=False, bit_depth=None, class_weights="none", sampler="shuffle", label_smoothing=0.0,
    drop_path=0.0, cuda_graphs=False,
)
# may change on --resume: where the data is now, and how fast it runs (same numbers)
RESUME_APPLIES = ("data", "images", "labels", "val_labels", "val_images", "fused", "compile", "channels_last", "strict",
                  "cuda_graphs")
PATHS = ("data", "images", "labels", "val_labels", "val_images", "init")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train HiFuse on an image folder or a label CSV", formatter_class=options.Formatter,
                       description="Train HiFuse with the paper's recipe (AdamW, warm-up + cosine, 224x224).")
    p.add_argument("--data", help="DIR with train/<class>/* and val/<class>/* (or class folders and --val-split)")
    options.add_csv(p, group=True)
    p.add_argument("--val-split", type=float, help="fraction of train kept for validation (seeded, per class; per group with --group-column)")
    p.add_argument("--val-labels", help="label CSV of the validation images (the CSV form), instead of --val-split")
    p.add_argument("--val-images", help="image folder of --val-labels (default: --images)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, TensorBoard logs (with --resume LAST_PTH: its folder)")
    p.add_argument("--model", default="hifuse_tiny", help="hifuse_tiny, hifuse_small or hifuse_base")
    p.add_argument("--irmlp", default="full", choices=["full", "depthwise"], help="IRMLP conv1 (full: published)")
    p.add_argument("--depths", type=_ints, help="architecture override: blocks per stage, e.g. 1,1,1,1")
    p.add_argument("--dims", type=_ints, help="architecture override: channels per stage, e.g. 32,64,128,256")
    p.add_argument("--heads", type=_ints, help="architecture override: attention heads per stage")
    p.add_argument("--img-size", type=int, default=224, help="input side (a multiple of 32)")
    p.add_argument("--bit-depth", type=int, help="bits of 16-bit-container images, e.g. 12 (default: the file's)")
    p.add_argument("--epochs", type=int, default=100, help="epochs in all (with --resume: a larger number extends the run)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and process")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (none on norms and biases)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="epochs of linear warm-up")
    p.add_argument("--class-weights", default="none", metavar="none|balanced|FILE",
                   help="cross-entropy class weights: none, balanced (n / (classes x count)) or a JSON file {class: weight}")
    p.add_argument("--sampler", choices=["shuffle", "balanced"], default="shuffle",
                   help="balanced: draw each class equally often (with replacement; seeded, DDP and resume exact)")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth of both branches (linear decay over blocks)")
    p.add_argument("--amp", choices=options.AMP, help="autocast dtype (default: bf16 on a GPU, none on CPU)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused kernels (default: on with a GPU; on CPU they are for testing, not speed)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="record the training step (forward, loss, backward, AdamW) as one CUDA graph and replay it: "
                        "no host work per launch (GPU only; bf16 or no autocast; one process; not with --compile); "
                        "a last partial batch runs uncaptured")
    p.add_argument("--workers", type=int, default=data_.default_workers(), help="data loading processes")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, shuffling, augmentation and weights")
    p.add_argument("--init", "--weights", dest="init", help="weights to start from (the classifier is left new: fine-tuning)")
    p.add_argument("--trust-checkpoint", action="store_true", help="--init may hold Python objects besides tensors (trusted files only)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="LAST_PTH",
                   help="continue the run in --out (or the one whose last.pth is named)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--select", choices=["acc", "balanced_acc", "f1", "auc"], default="acc",
                   help="validation metric choosing best_model.pth")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes (DDP)")
    p.add_argument("--strict", action="store_true", help="unreadable images are an error, not skipped")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when present; under torchrun the local rank's GPU)")
    p.set_defaults(run=run)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise CliError(f"expected four comma-separated integers, got {text!r}") from None
    if len(values) != 4 or min(values) <= 0:
        raise CliError(f"expected four positive comma-separated integers, got {text!r}")
    return values


# ----------------------------------------------------------------------------- set-up


class Dist:
    """This process's place in a torchrun job (or a job of one)."""

    def __init__(self, device_choice: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and device_choice is None and torch.cuda.is_available():
            device_choice = f"cuda:{local}"
        self.device = models.device_of(device_choice)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_all(seed: int, epoch: int) -> None:
    s = seed * 100_003 + epoch
    random.seed(s)
    torch.manual_seed(s)
    try:
        import numpy as np

        np.random.seed(s % 2**32)
    except ImportError:
        pass


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses an output that is a file, or holds a run that is neither resumed nor replaced."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file; name a folder for the run")
    if resume:
        if not (out / "last.pth").is_file():
            raise CliError(f"--resume: {out} holds no last.pth to continue from")
        return
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise CliError(f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue it or --overwrite to replace it")


def make_out(out: Path, resume: bool) -> None:
    """Clears a replaced run and creates the folder; called once everything is checked, so a
    start that fails on bad arguments leaves nothing behind."""
    if not resume:
        for name in RUN_FILES:
            target = out / name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def optimizer_for(model: torch.nn.Module, s: dict) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (parameters of one dimension); one fused
    kernel a step on a GPU; with --cuda-graphs capturable, its learning rate a device tensor."""
    opt = torch.optim.AdamW(no_decay_groups(model, s["weight_decay"]), lr=s["lr"], betas=(0.9, 0.999),
                            fused=next(model.parameters()).is_cuda)
    return graphs.make_capturable(opt) if s.get("cuda_graphs") else opt


def schedule(s: dict, steps_per_epoch: int):
    """Learning rate factor per step: linear warm-up, then cosine from lr to min_lr. A run
    extended on --resume (``s["extended"]``) keeps its curve up to the resumed epoch and from
    there runs the cosine from that point's value down to min_lr over the new end."""
    floor = s["min_lr"] / s["lr"]
    extended = s.get("extended", [])
    warmup_epochs = s["warmup_epochs"]

    def base(epochs: int):
        total = max(1, epochs * steps_per_epoch)
        warmup = min(total, round(warmup_epochs * steps_per_epoch))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return factor, warmup

    factor, warmup = base(extended[0]["from_epochs"] if extended else s["epochs"])
    for e in extended:
        at, total = e["at_epoch"] * steps_per_epoch, max(1, e["to_epochs"] * steps_per_epoch)
        if at <= warmup:  # still warming up: the plain schedule of the new length
            factor = base(e["to_epochs"])[0]
            continue
        factor = _stretched(factor, at, total, floor)
    return factor


def _stretched(before, at: int, total: int, floor: float):
    start = before(at)

    def factor(step: int) -> float:
        if step < at:
            return before(step)
        progress = (step - at) / max(1, total - at)
        return floor + (start - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Shard(torch.utils.data.Sampler):
    """Validation indices of one rank (rank, rank + world, ...): no padding, so metrics summed
    over ranks count every image once."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.index = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def settings_of(args) -> dict:
    s = {k: getattr(args, k) for k in RUN_SETTINGS}
    for k in PATHS:
        if s[k]:
            s[k] = str(Path(s[k]).resolve())
    return s


def check_settings(s: dict) -> None:
    preprocess.check_img_size(s["img_size"])
    preprocess.check_bit_depth(s["bit_depth"])
    for name in ("epochs", "batch_size"):
        if s[name] <= 0:
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {s[name]}")
    if s["lr"] <= 0 or s["min_lr"] < 0 or s["min_lr"] > s["lr"]:
        raise CliError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got lr {s['lr']}, min-lr {s['min_lr']})")
    if s["warmup_epochs"] < 0:
        raise CliError("--warmup-epochs must not be negative")
    if not 0 <= s["label_smoothing"] < 1:
        raise CliError(f"--label-smoothing must be within [0, 1), got {s['label_smoothing']}")
    if not 0 <= s["drop_path"] < 1:
        raise CliError(f"--drop-path must be within [0, 1), got {s['drop_path']}")
    if s["group_column"] and s["val_split"] is None:
        raise CliError("--group-column groups images for --val-split; give --val-split too")


def _check_cuda_graphs(s: dict, d: Dist) -> None:
    """What --cuda-graphs cannot record, refused before anything is written."""
    if d.device.type != "cuda":
        raise CliError(f"--cuda-graphs needs a GPU (the device is {d.device})")
    if s["amp"] == "fp16":
        raise CliError("--cuda-graphs takes --amp bf16 or none: fp16 needs a GradScaler, which reads its scale on the host")
    if d.world > 1:
        raise CliError("--cuda-graphs runs on one process (DistributedDataParallel's reduction is not recorded)")
    if s["compile"]:
        raise CliError("--cuda-graphs and --compile: choose one (torch.compile records its own graphs)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resumed_settings(saved: dict, args, done: int) -> tuple[dict, list[str]]:
    """The run's settings with what --resume may change from the command line applied; the
    lines saying what changed. Anything else given that differs is refused, all at once."""
    import warnings

    s = {**LATER_SETTINGS, **saved}
    given = getattr(args, "given", set())
    wanted = settings_of(args)
    notes, refused = [], []
    for k in sorted(given & set(RUN_SETTINGS)):
        new, old = wanted[k], s.get(k)
        if new == old:
            continue
        if k in RESUME_APPLIES:
            notes.append(f"{_flag(k)} {new} (was {old})")
            s[k] = new
        elif k == "batch_size":
            warnings.warn(f"--resume with --batch-size {new} (the run used {old}): steps per epoch change, the learning-rate "
                          "schedule goes on from the same point in epochs, and the result differs from an uninterrupted run",
                          stacklevel=2)
            notes.append(f"--batch-size {new} (was {old})")
            s[k] = new
        elif k == "epochs":
            if new < old:
                refused.append(f"--epochs {new} (the run has {old}; --resume can only extend it)")
                continue
            notes.append(f"--epochs {new} (was {old}): the cosine schedule is stretched from epoch {done + 1} on")
            s["extended"] = [*s.get("extended", []), {"at_epoch": done, "from_epochs": old, "to_epochs": new}]
            s[k] = new
        else:
            refused.append(f"{_flag(k)} {new} (the run's: {old})")
    if refused:
        raise CliError("--resume keeps the run's settings; these differ: " + "; ".join(refused) +
                       ". Start a new run (another --out, or --overwrite) to change them")
    if notes:
        s["resumed"] = [*s.get("resumed", []), {"at_epoch": done, "changed": notes}]
    return s, notes


# ----------------------------------------------------------------------------- the run


def run(args) -> int:
    out = _out_folder(args)
    d = Dist(args.device)
    try:
        return _run(args, out, d)
    finally:
        d.close()


def _out_folder(args) -> Path:
    """--out, or with --resume LAST_PTH the folder that holds it."""
    if isinstance(args.resume, str):
        named = Path(args.resume)
        if named.is_dir():
            named = named / "last.pth"
        if not named.is_file():
            raise CliError(f"--resume {args.resume}: no such file")
        if named.name != "last.pth":
            raise CliError(f"--resume {args.resume}: name a run's last.pth (a training checkpoint), not {named.name}")
        if args.out and Path(args.out).resolve() != named.parent.resolve():
            raise CliError(f"--resume {named} continues the run in {named.parent}, not --out {args.out}")
        return named.parent
    if not args.out:
        raise CliError("give --out RUN_DIR (or --resume RUN_DIR/last.pth)")
    return Path(args.out)


def _run(args, out: Path, d: Dist) -> int:
    resume = bool(args.resume)
    check_out(out, resume, args.overwrite)
    state, notes = None, []
    if resume:
        state = torch.load(out / "last.pth", map_location="cpu", weights_only=False)
        s, notes = resumed_settings(state["settings"], args, state["epoch"] + 1)
    else:
        s = settings_of(args)
    check_settings(s)
    if s["amp"] is None:
        s["amp"] = "bf16" if d.device.type == "cuda" else "none"
    if s["fused"] is None:
        s["fused"] = d.device.type == "cuda"
    if s["cuda_graphs"]:
        _check_cuda_graphs(s, d)
    pre = preprocess.Preprocess(img_size=s["img_size"], bit_depth=s["bit_depth"])
    s["preprocess"] = pre.to_dict()

    # everything that can refuse the command runs before a file is written
    ns = _Namespace(s, workers=args.workers)
    train_samples, val_samples = data_.load_splits(ns)
    train_samples = data_.check_images(train_samples, s["strict"], args.workers, "train", pre.bit_depth)
    val_samples = data_.check_images(val_samples, s["strict"], args.workers, "val", pre.bit_depth)
    classes = train_samples.classes
    if state is not None and state["classes"] != classes:
        raise CliError(f"--resume: the data's classes {classes} differ from the run's {state['classes']}")
    weights = data_.class_weights(s["class_weights"], train_samples)
    if weights is not None:
        s["class_weight_values"] = dict(zip(classes, weights.tolist()))
    seed_all(s["seed"], 0)
    model = models.build(s, len(classes))
    if s["init"] and state is None:
        models.load_init(model, s["init"], getattr(args, "trust_checkpoint", False))
    if state is not None:
        model.load_state_dict(state["model"])
    if d.main:
        make_out(out, resume)
        (out / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        (out / "settings.json").write_text(json.dumps(s, indent=1) + "\n")
    if d.world > 1:
        dist.barrier()

    if s["sync_bn"] and d.world > 1:
        if d.device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            from .sync_batch_norm import convert

            model = convert(model)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    model = model.to(d.device, memory_format=fmt)
    config.use_fused(bool(s["fused"]))

    net = model
    if d.world > 1:
        # static graph: the same modules every step, some parameters never used (the published
        # model's unused global head, fu1's Updim); DDP then reduces every gradient bucket
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None, static_graph=True
        )
    if s["compile"]:
        net = torch.compile(net)

    train_set = data_.ImageDataset(train_samples, preprocess.train_transform(pre), seed=s["seed"], bit_depth=pre.bit_depth)
    val_set = data_.ImageDataset(val_samples, preprocess.eval_transform(pre), bit_depth=pre.bit_depth)
    if s["sampler"] == "balanced":
        sampler = data_.BalancedSampler(train_samples.labels, s["seed"], d.rank, d.world)
    else:
        sampler = torch.utils.data.DistributedSampler(train_set, d.world, d.rank, shuffle=True, seed=s["seed"])
    loader_args = dict(num_workers=args.workers, pin_memory=d.device.type == "cuda", persistent_workers=False)
    per_rank = len(sampler)
    train_loader = torch.utils.data.DataLoader(
        train_set, s["batch_size"], sampler=sampler, drop_last=per_rank % s["batch_size"] == 1, **loader_args
    )
    val_loader = torch.utils.data.DataLoader(val_set, s["batch_size"], sampler=Shard(len(val_set), d.rank, d.world), **loader_args)

    opt = optimizer_for(model, s)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(s, len(train_loader)))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s["amp"])
    scaler = torch.amp.GradScaler(d.device.type, enabled=s["amp"] == "fp16")
    start, best = 0, None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        # the saved flags and learning rates come back with the state: make them this run's
        (graphs.make_capturable if s["cuda_graphs"] else graphs.make_uncapturable)(opt, sched)
        scaler.load_state_dict(state["scaler"])
        start, best = state["epoch"] + 1, state["best"]
        sched.last_epoch = start * len(train_loader)  # the same point in epochs under a new batch size
        _restore_rng(state["rng"])
        if d.main:
            _truncate_metrics(out / "metrics.jsonl", start)
            for note in notes:
                print(f"hifuse train: --resume applies {note}")
        if start >= s["epochs"]:
            if d.main:
                print(f"hifuse train: {out} finished all {s['epochs']} epochs already (a larger --epochs extends it)")
            return 0
    if weights is not None:
        weights = weights.to(d.device)

    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events of epochs past the checkpoint (a run killed after logging them) are purged
        writer = SummaryWriter(out / "tensorboard", purge_step=start + 1 if state is not None else None)
        print(
            f"hifuse train: {models.variant_name(model_arch(model))} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
            f"{len(classes)} classes, {len(train_set)} train / {len(val_set)} val images, {d.world} process(es) on {d.device}, "
            f"amp {s['amp']}, fused {'on' if s['fused'] else 'off'}" + (f", resuming at epoch {start + 1}" if start else "")
        )
    autocast = dict(device_type=d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def loss_fn(logits, y):
        return torch.nn.functional.cross_entropy(logits, y, weight=weights, label_smoothing=s["label_smoothing"])

    if s["cuda_graphs"]:
        # recorded at the first batch; a last partial batch runs uncaptured, with the same result
        step = graphs.TrainStep(model, opt, loss_fn, amp=amp_dtype)
    else:
        def step(x, y):
            with torch.autocast(**autocast):
                logits = net(x)
                loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            return loss.detach(), logits.detach()

    for epoch in range(start, s["epochs"]):
        seed_all(s["seed"], epoch)
        sampler.set_epoch(epoch)
        train_set.epoch = epoch
        t0 = time.perf_counter()
        train_loss, train_acc = _train_epoch(net, step, train_loader, opt, sched, fmt, d, epoch, s["epochs"])
        val = _validate(net, val_loader, classes, autocast, fmt, d)
        seconds = time.perf_counter() - t0
        score = metrics_.selection_score(val, s["select"])
        improved = best is None or score > best
        if improved:
            best = score
        if d.main:
            record = {
                "epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val["loss"],
                "val_accuracy": val["accuracy"], "val_precision": val["precision"], "val_recall": val["recall"],
                "val_f1": val["f1"], "val_balanced_accuracy": val["balanced_accuracy"], "val_auc": val["auc"],
                "val_per_class": val["per_class"], "lr": float(opt.param_groups[0]["lr"]), "seconds": seconds, "best": improved,
            }
            _report(record, val, writer, epoch, s["epochs"])
            if improved:
                _save_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "best_model.pth")
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            checkpoint = {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch, "best": best, "rng": rng_states(),
                "settings": s, "classes": classes,
            }
            _save_atomic(checkpoint, out / "last.pth")
        if d.world > 1:
            dist.barrier()
    if writer is not None:
        writer.close()
        print(f"hifuse train: done; best val {s['select']} {best:.4f}, weights in {out / 'best_model.pth'}")
    return 0


class _Namespace:
    def __init__(self, s: dict, **extra) -> None:
        self.__dict__.update(s)
        self.__dict__.update(extra)


def model_arch(model) -> dict:
    return models.architecture(model.state_dict())


def _restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop records of an epoch that was in progress when the run stopped (written before its
    checkpoint); the resumed run writes them again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] <= epochs_done]
        path.write_text("".join(line + "\n" for line in kept))


def _save_atomic(obj, path: Path) -> None:
    """Written beside the target and renamed over it: a killed run never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _train_epoch(net, step, loader, opt, sched, fmt, d: Dist, epoch: int, epochs: int):
    """One epoch of ``step(x, y) -> (loss, logits)`` calls; mean loss and accuracy over ranks."""
    from tqdm import tqdm

    net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
    correct = torch.zeros((), dtype=torch.int64, device=d.device)
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", disable=not d.main, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(bar):
        x = x.to(d.device, non_blocking=True).contiguous(memory_format=fmt)
        y = y.to(d.device, non_blocking=True)
        loss, logits = step(x, y)
        sched.step()
        loss_sum += loss.double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if d.main and (i % 10 == 0 or i == len(loader) - 1):
            # one host sync every ten steps, for the bar
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{float(opt.param_groups[0]['lr']):.2e}",
                            img_s=f"{seen * d.world / (time.perf_counter() - t0):.1f}")
    total_loss, total_correct, total_seen = d.sum([float(loss_sum), float(correct), float(seen)])
    return total_loss / max(1, total_seen), total_correct / max(1, total_seen)


@torch.no_grad()
def _validate(net, loader, classes, autocast, fmt, d: Dist) -> dict:
    net.eval()
    m, loss_sum, seen = metrics_.run_over(net, loader, len(classes), d.device, autocast, fmt)
    res = metrics_.result(m, classes)  # torchmetrics reduces over ranks
    total, count = d.sum([loss_sum, seen])
    res["loss"] = total / max(1, count)
    return res


def _report(record: dict, val: dict, writer, epoch: int, epochs: int) -> None:
    print(
        f"epoch {epoch + 1}/{epochs}  train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  |  "
        f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} precision {record['val_precision']:.4f} "
        f"recall {record['val_recall']:.4f} f1 {record['val_f1']:.4f} balanced acc {record['val_balanced_accuracy']:.4f} "
        f"auc {'-' if record['val_auc'] is None else format(record['val_auc'], '.4f')}  |  lr {record['lr']:.2e}  "
        f"{record['seconds']:.1f} s" + ("  (best)" if record["best"] else ""),
        flush=True,
    )
    print(metrics_.table(val), flush=True)
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1",
                "val_balanced_accuracy", "val_auc", "lr"):
        if record[key] is not None:
            group, _, name = key.partition("_")
            writer.add_scalar(f"{group}/{name}" if name else key, record[key], epoch + 1)
    writer.flush()
