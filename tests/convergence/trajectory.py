"""Training trajectories of HiFuse, and the float64 rule they are judged by.

``NARROW`` keeps every module kind of the published model: shifted and unshifted window
blocks (stage 2 has two), padded window grids (32x32 inputs: 8x8 and 4x4 grids under 7x7
windows), all four fusion blocks and training-mode BatchNorms. A run trains with AdamW (no
decay on norms and biases) under the paper's schedule (linear warm-up, cosine) on a seeded
synthetic dataset it can learn: four classes of oriented stripes at a class-dependent
frequency, with noise (not the demo data).

The rule (STYLE.md): a quantity is within the rule when its distance from the float64 eager
run is at most twice the float32 (or autocast) eager run's, or at most how far the float64
run itself moves when every input moves by 1e-6 relatively, whichever is larger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import hifuse

NOISE = 1e-6
CLASSES = 4


@dataclass(frozen=True)
class Config:
    model: dict = field(default_factory=lambda: dict(depths=(1, 2, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8)))
    variant: str = "hifuse_tiny"
    side: int = 32
    batch: int = 8
    steps: int = 30
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup: int = 3
    device: str = "cpu"


NARROW = Config()
# the GPU variant: the published HiFuse-Tiny at the paper's input size
TINY_224 = Config(model={}, side=224, batch=32, steps=300, lr=1e-4, min_lr=1e-6, warmup=20, device="cuda")


def images(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, side, side) float64 images and their labels: stripes whose angle and frequency
    tell the class, at a random phase and colour, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=g)]
    axis = torch.arange(cfg.side, dtype=torch.float64)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    out = []
    for y in labels.tolist():
        angle = math.pi * y / CLASSES
        freq = 2 * math.pi * (2 + y) * max(1, cfg.side // 64) / cfg.side  # cycles per image
        phase = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi
        wave = torch.sin(freq * (xs * math.cos(angle) + ys * math.sin(angle)) + phase)
        colour = 0.5 + 0.5 * torch.rand(3, 1, 1, generator=g, dtype=torch.float64)
        out.append(colour * wave + 0.3 * torch.randn(3, cfg.side, cfg.side, generator=g, dtype=torch.float64))
    return torch.stack(out), labels


def lr_factor(cfg: Config):
    """The paper's schedule over cfg.steps (``hifuse train``'s, one step an epoch): linear
    warm-up, then cosine down to min_lr."""
    from hifuse.cli.train import schedule

    return schedule({"epochs": cfg.steps, "warmup_epochs": cfg.warmup, "lr": cfg.lr, "min_lr": cfg.min_lr}, 1)


@dataclass
class Run:
    losses: list[float]
    state: dict[str, torch.Tensor]  # parameters and buffers after the last step (floats in float64, CPU)
    logits: torch.Tensor  # held-out batch, eval mode, float64


def fused_setting(parts):
    """None: eager; "all": every part; a part's name: that part alone."""
    if parts is None:
        return hifuse.use_fused(False)
    if parts == "all":
        return hifuse.use_fused(True)
    return hifuse.use_fused(**{name: name == parts for name in hifuse.FusedParts.names()})


def train(cfg: Config, dtype: torch.dtype, parts=None, noise_seed: int | None = None, compile: str | None = None,
          autocast: torch.dtype | None = None) -> Run:
    """cfg.steps AdamW steps from the seeded initial weights, parameters in ``dtype`` (under
    ``autocast`` if given), with ``parts`` fused (see ``fused_setting``), the model compiled
    with backend ``compile`` if given; with ``noise_seed`` every input moves by NOISE relatively."""
    torch.manual_seed(0)
    model = hifuse.create_model(cfg.variant, num_classes=CLASSES, **cfg.model).to(cfg.device, dtype).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    pool = max(cfg.batch, cfg.steps * cfg.batch // 2)  # every image seen about twice
    x_all, y_all = images(cfg, pool, seed=1)
    held_x, _ = images(cfg, 16, seed=2)
    noise = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None

    def jitter(x: torch.Tensor) -> torch.Tensor:
        if noise is not None:
            x = x * (1 + NOISE * torch.randn(x.shape, generator=noise, dtype=torch.float64))
        return x.to(cfg.device, dtype)

    net = torch.compile(model, backend=compile, fullgraph=True) if compile else model
    amp = dict(device_type=torch.device(cfg.device).type, dtype=autocast or torch.float32, enabled=autocast is not None)
    losses = []
    with fused_setting(parts):
        for step in range(cfg.steps):
            index = torch.arange(step * cfg.batch, (step + 1) * cfg.batch) % pool
            x, y = jitter(x_all[index]), y_all[index].to(cfg.device)
            with torch.autocast(**amp):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        model.eval()
        with torch.no_grad(), torch.autocast(**amp):
            logits = net(jitter(held_x)).double().cpu()
    state = {k: v.detach().cpu().double() if v.is_floating_point() else v.detach().cpu().clone()
             for k, v in model.state_dict().items()}
    return Run([float(v) for v in losses], state, logits)


@dataclass
class Reference:
    f64: Run
    eager: Run  # float32, or autocast
    sensitivity: dict  # quantity -> how far float64 moves under NOISE (max over two draws)


def reference(cfg: Config, autocast: torch.dtype | None = None) -> Reference:
    f64 = train(cfg, torch.float64)
    noisy = [train(cfg, torch.float64, noise_seed=s) for s in (11, 12)]
    sens = {"losses": [max(abs(n.losses[i] - f64.losses[i]) for n in noisy) for i in range(cfg.steps)],
            "logits": max(float((n.logits - f64.logits).abs().max()) for n in noisy)}
    for k, v in f64.state.items():
        if v.is_floating_point():
            sens[k] = max(float((n.state[k] - v).abs().max()) for n in noisy)
    return Reference(f64, train(cfg, torch.float32, autocast=autocast), sens)


def violations(run: Run, ref: Reference) -> list[str]:
    """Every quantity of ``run`` outside the rule, as a line that says by how much."""
    bad = []

    def judge(name: str, err: float, eager_err: float, sens: float) -> None:
        allowed = max(2 * eager_err, sens)
        if not err <= allowed:  # NaN fails
            bad.append(f"{name}: off float64 by {err:.3g}, allowed {allowed:.3g} "
                       f"(eager {eager_err:.3g}, float64 under 1e-6 input noise {sens:.3g})")

    for i, (a, e, r) in enumerate(zip(run.losses, ref.eager.losses, ref.f64.losses)):
        judge(f"loss at step {i + 1}", abs(a - r), abs(e - r), ref.sensitivity["losses"][i])
    judge("held-out logits", float((run.logits - ref.f64.logits).abs().max()),
          float((ref.eager.logits - ref.f64.logits).abs().max()), ref.sensitivity["logits"])
    for k, r in ref.f64.state.items():
        a, e = run.state[k], ref.eager.state[k]
        if not r.is_floating_point():
            if not torch.equal(a, r):
                bad.append(f"{k}: {a.tolist()} != float64's {r.tolist()}")
            continue
        judge(k, float((a - r).abs().max()), float((e - r).abs().max()), ref.sensitivity[k])
    return bad

