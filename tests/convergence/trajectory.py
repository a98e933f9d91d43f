"""Training trajectories of HiFuse, and the float64 rule they are judged by.

``NARROW`` keeps every module kind of the published model: shifted and unshifted window
blocks (stage 2 has two), padded window grids (32x32 inputs: 8x8 and 4x4 grids under 7x7
windows), every head dim the kernels take (16, 32, 64), all four fusion blocks and
training-mode BatchNorms. A run trains with AdamW (no decay on norms and biases) under the
paper's schedule (linear warm-up, cosine) on a seeded synthetic dataset it can learn: four
classes of oriented stripes at a class-dependent frequency, with noise (not the demo data).
Stripes are separable and a 224x224 HiFuse-Tiny learns them in four steps, after which losses
of 1e-5 say nothing; ``TINY_224`` (the GPU's bf16 run) takes the ``textures`` task instead:
stained-looking blobs whose classes overlap (the best loss any model can reach is 0.77, the
best accuracy 64%), fresh images every step, so its loss stays near 1 for the whole run.

The rule (STYLE.md's, made fit for trajectories): a quantity is within the rule when its
distance from the float64 eager run is at most twice the largest of the float32 (or
autocast) eager runs' distances, or at most how far the float64 run itself moves when every
input moves by 1e-6 relatively (the larger of two draws), whichever is larger. The eager runs
are 24: one on the inputs as given, 23 on inputs moved by about one float32 rounding step
(1e-7 relatively). One run is not enough: a trajectory passes knife edges (a ReLU input
within 4e-7 of zero, a max, a BatchNorm over eight values at 1x1 resolution) where rounding
picks a side, and AdamW turns the other side's gradient (3% off on one weight, for one ReLU
element) into a step a hundred times larger than rounding's; a correct fused run picks sides
as eager runs do, so the yardstick must hold runs that picked each side. Losses are judged by
their largest distance up to each step, as one step's distance can cross zero by chance.

Measured on 33 float32 eager runs (each judged against others, the way a fused run is):
against a yardstick of 8 runs, 14% of the other runs failed; against 16 to 24 runs, 2 to 4%,
mostly runs that took one knife edge that 2 of the 33 took. A run is therefore judged again
on rounding-moved inputs when it fails (``tests/convergence``): a wrong kernel fails both.

Every run takes one CPU thread: a float32 sum's order changes with the thread count (under
pytest-xdist each worker gets its share of the cores), and with it which side of a knife edge
a run takes.

Under bf16 autocast the same rule holds with bf16 eager runs as the yardstick, the moved ones
on inputs moved by one bf16 rounding step (BF16_ROUNDING): each run rounds every GEMM input to
bf16, so once inputs move, their rounding (and a fused kernel's, which rounds at other places)
is a fresh draw. bf16 runs spread far more than float32 ones (AdamW turns gradients that
rounding moves by 0.4% into steps of the learning rate's size), with heavier tails. Measured
on 32 runs of the narrow model on textures (CPU autocast, 30 steps), each judged against
others: 9 to 12% of correct bf16 runs fail against 8 others, 8% against 10, 4 to 6% against
12, 2% against 16 (mostly the one-channel BatchNorms of the fusion blocks' spatial gates); a
run and its retry both failed in 3 of 150 pairs against 8, in none against 10. The float64
floor never binds there (float64 under 1e-6 input noise moves each quantity at least 16 times
less than bf16 runs do), so the bf16 run skips the float64 noise runs (``noise_seeds=()``).
What such a yardstick lets through is large: against 10 runs, every local LayerNorm output
1.001 times too large passes, 1.3 times fails by one BatchNorm statistic (7% past what is
allowed), twice too large by 15 quantities (the loss from step 2: 0.03 off float64 where 0.02
is allowed); every qkv weight's gradient missing fails only by those weights' root-mean-square
distance (``violations(rms=True)``: a weight's largest distance is its noisiest element's).
Small errors are the float32 runs' to find.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import hifuse

NOISE = 1e-6  # the float64 run's input noise, for its sensitivity
ROUNDING = 1e-7  # the eager float32 runs' input moves: about one float32 rounding step
BF16_ROUNDING = 2 ** -8  # the eager bf16 runs' input moves: about one bf16 rounding step
NOISE_SEEDS = (11, 12)
ROUNDING_SEEDS = tuple(range(101, 124))
RETRY_SEED = 99  # the rounding-moved inputs a failing run is judged on again
CLASSES = 4


@dataclass(frozen=True)
class Config:
    model: dict = field(default_factory=lambda: dict(depths=(1, 2, 1, 1), dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 2)))
    variant: str = "hifuse_tiny"
    side: int = 32
    batch: int = 8
    steps: int = 30
    lr: float = 3e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup: int = 3
    device: str = "cpu"
    task: str = "stripes"  # or "textures" (``textures``: overlapping classes, fresh images every step)
    held_out: int = 16


NARROW = Config()
# the GPU variant: the published HiFuse-Tiny at the paper's input size, on the task it cannot
# solve (100 steps of 16 learn it to a loss near 1.1: measured at 64x64 on a CPU)
TINY_224 = Config(model={}, side=224, batch=16, steps=100, lr=1e-4, min_lr=1e-6, warmup=20, device="cuda",
                  task="textures", held_out=64)


def images(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, side, side) float64 images and their labels, of cfg.task."""
    return textures(cfg, n, seed) if cfg.task == "textures" else stripes(cfg, n, seed)


def stripes(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stripes whose angle and frequency tell the class, at a random phase and colour, plus
    noise (on the CPU). Separable: a model learns them to a loss near zero."""
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


TEXTURE_STEP = 0.5  # the class means of an image's latent, this far apart
TEXTURE_SPREAD = 0.35  # each image's latent: its class mean plus this much Gaussian spread
STAIN = (0.45, 0.25, 0.6)  # the blobs' mean colour (purple, like haematoxylin)
SHIFT = (0.25, 0.0, -0.2)  # how the latent moves it (towards red)


def textures(cfg: Config, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blobs like stained nuclei on a pale background: smoothed Gaussian noise thresholded at a
    random level, plus pixel noise. The class sets the mean of one latent per image, the
    latent sets the blobs' size and colour; each image's latent is drawn around its class
    mean, so neighbouring classes overlap (even knowing the latent exactly, the best accuracy
    is 64% and the best loss 0.77) and no model drives the loss to zero. The fields and the
    noise are drawn on cfg.device (fast on a GPU at 224x224), the labels and per-image values
    on the CPU."""
    g = torch.Generator().manual_seed(seed)
    on = torch.Generator(cfg.device).manual_seed(seed)
    kw = dict(dtype=torch.float64, device=cfg.device)
    labels = (torch.arange(n) % CLASSES)[torch.randperm(n, generator=g)]
    latent = TEXTURE_STEP * (labels.double() - (CLASSES - 1) / 2) + TEXTURE_SPREAD * torch.randn(
        n, generator=g, dtype=torch.float64)
    size = (cfg.side / 16 * torch.exp(latent)).to(cfg.device)  # the smoothing's sigma in pixels
    level = (0.5 * torch.randn(n, 1, 1, generator=g, dtype=torch.float64)).to(cfg.device)
    stain = (torch.tensor(STAIN, dtype=torch.float64) + latent[:, None] * torch.tensor(SHIFT, dtype=torch.float64)
             + 0.05 * torch.randn(n, 3, generator=g, dtype=torch.float64))[:, :, None, None].to(cfg.device)
    paper = (0.9 + 0.05 * torch.randn(n, 3, 1, 1, generator=g, dtype=torch.float64)).to(cfg.device)
    freq2 = torch.fft.fftfreq(cfg.side, **kw)[:, None] ** 2 + torch.fft.rfftfreq(cfg.side, **kw)[None, :] ** 2
    smooth = torch.exp(-2 * math.pi ** 2 * size[:, None, None] ** 2 * freq2)  # a Gaussian blur, in Fourier space
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, cfg.side, cfg.side, generator=on, **kw)) * smooth,
                             s=(cfg.side, cfg.side))
    field = (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)
    blobs = torch.sigmoid(3 * (field - level))[:, None]
    noise = 0.2 * torch.randn(n, 3, cfg.side, cfg.side, generator=on, **kw)
    return paper + (stain - paper) * blobs + noise, labels


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
    labels: torch.Tensor | None = None  # the held-out batch's

    def accuracy(self) -> float:
        return float((self.logits.argmax(1) == self.labels).double().mean())


INERT = 1e-12  # a parameter whose float64 gradient is below this share of the largest is inert
_inert: dict[str, frozenset[str]] = {}


def inert_parameters(cfg: Config) -> frozenset[str]:
    """The parameters whose exact gradient is zero: biases that a BatchNorm or LayerNorm
    right after them cancels (22 of them in HiFuse's fusion blocks), found by their float64
    gradient on the first batch (about 1e-18; the others' are 1e-7 or more). AdamW turns a
    rounding-noise gradient into a step of up to a tenth of the learning rate, so in float32
    they wander at random, differently in every run, while float64 leaves them in place: no
    run can follow float64 on them, and their wandering moves the BatchNorm statistics."""
    key = repr(cfg)
    if key not in _inert:
        torch.manual_seed(0)
        model = hifuse.create_model(cfg.variant, num_classes=CLASSES, **cfg.model).to(cfg.device, torch.float64)
        x, y = images(cfg, cfg.batch, seed=1)
        with hifuse.use_fused(False):
            F.cross_entropy(model.train()(x.to(cfg.device)), y.to(cfg.device)).backward()
        grads = {k: float(p.grad.abs().max()) for k, p in model.named_parameters() if p.grad is not None}
        top = max(grads.values())
        _inert[key] = frozenset(k for k, g in grads.items() if g <= INERT * top)
    return _inert[key]


def fused_setting(parts):
    """None: eager; "all": every part; a part's name: that part alone."""
    if parts is None:
        return hifuse.use_fused(False)
    if parts == "all":
        return hifuse.use_fused(True)
    return hifuse.use_fused(**{name: name == parts for name in hifuse.FusedParts.names()})


@contextlib.contextmanager
def one_thread():
    """Runs on one CPU thread, whatever the machine or pytest-xdist gives the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def train(cfg: Config, dtype: torch.dtype, parts=None, noise_seed: int | None = None, noise: float = NOISE,
          compile: str | None = None, autocast: torch.dtype | None = None, plant=None) -> Run:
    """cfg.steps AdamW steps from the seeded initial weights, parameters in ``dtype`` (under
    ``autocast`` if given), with ``parts`` fused (see ``fused_setting``), the model compiled
    with backend ``compile`` if given; with ``noise_seed`` every input moves by ``noise``
    relatively; ``plant(model)``, if given, is called before training (a test plants an error
    with it). Inert parameters (``inert_parameters``) are not trained."""
    torch.manual_seed(0)
    model = hifuse.create_model(cfg.variant, num_classes=CLASSES, **cfg.model).to(cfg.device, dtype).train()
    if plant is not None:
        plant(model)
    inert = inert_parameters(cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in inert)
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1]
    rest = [p for p in trained if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    if cfg.task == "stripes":
        pool = max(cfg.batch, cfg.steps * cfg.batch // 2)  # every image seen about twice
        x_all, y_all = images(cfg, pool, seed=1)

        def batch(step: int):
            index = torch.arange(step * cfg.batch, (step + 1) * cfg.batch) % pool
            return x_all[index], y_all[index]
    else:  # fresh images every step: no pool to memorise, so the loss stays near the task's floor
        def batch(step: int):
            return images(cfg, cfg.batch, seed=1000 + step)
    held_x, held_y = images(cfg, cfg.held_out, seed=2)
    draws = torch.Generator(cfg.device).manual_seed(noise_seed) if noise_seed is not None else None

    def jitter(x: torch.Tensor) -> torch.Tensor:
        x = x.to(cfg.device)
        if draws is not None:
            x = x * (1 + noise * torch.randn(x.shape, generator=draws, dtype=torch.float64, device=cfg.device))
        return x.to(dtype)

    net = torch.compile(model, backend=compile, fullgraph=True) if compile else model
    amp = dict(device_type=torch.device(cfg.device).type, dtype=autocast or torch.float32, enabled=autocast is not None)
    losses = []
    with fused_setting(parts):
        for step in range(cfg.steps):
            x, y = batch(step)
            x, y = jitter(x), y.to(cfg.device)
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
    return Run([float(v) for v in losses], state, logits, held_y.cpu())


@dataclass
class Reference:
    f64: Run
    eager: list[Run]  # float32 (or autocast): on the inputs as given, then on rounding-moved ones
    sensitivity: dict  # quantity -> how far float64 moves under NOISE (the larger of the draws; 0 without)
    rounding: float = ROUNDING  # how far the eager runs' inputs moved (a failing run is judged again so moved)


def reference(cfg: Config, autocast: torch.dtype | None = None, eager_runs: int = 1 + len(ROUNDING_SEEDS),
              noise_seeds: tuple[int, ...] = NOISE_SEEDS) -> Reference:
    """float64 eager, float64 on inputs moved by NOISE for each of ``noise_seeds``, and
    ``eager_runs`` float32 runs (under ``autocast`` if given): one on the inputs as given, the
    others on inputs moved by one rounding step of the precision that runs (ROUNDING in
    float32, BF16_ROUNDING under bf16 autocast)."""
    rounding = ROUNDING if autocast is None else BF16_ROUNDING
    f64 = train(cfg, torch.float64)
    noisy = [train(cfg, torch.float64, noise_seed=s) for s in noise_seeds]
    sens = {"losses": [max((abs(n.losses[i] - f64.losses[i]) for n in noisy), default=0.0) for i in range(cfg.steps)],
            "logits": max((float((n.logits - f64.logits).abs().max()) for n in noisy), default=0.0)}
    for k, v in f64.state.items():
        if v.is_floating_point():
            sens[k] = max((float((n.state[k] - v).abs().max()) for n in noisy), default=0.0)
    eager = [train(cfg, torch.float32, autocast=autocast)]
    eager += [train(cfg, torch.float32, noise_seed=s, noise=rounding, autocast=autocast)
              for s in ROUNDING_SEEDS[:eager_runs - 1]]
    return Reference(f64, eager, sens, rounding)


def _running_max(values: list[float]) -> list[float]:
    return list(itertools.accumulate(values, max))


def violations(run: Run, ref: Reference, rms: bool = False) -> list[str]:
    """Every quantity of ``run`` outside the rule, as a line that says by how much. With ``rms``
    each tensor of the state is judged by its root-mean-square distance too: in bf16 a weight's
    largest distance is set by its noisiest element, so a whole weight gone wrong (its gradient
    missing) can hide under it, and not under the RMS (measured: the zeroed gradient of every
    qkv weight fails by RMS only)."""
    bad = []

    def judge(name: str, err: float, eager_err: float, sens: float) -> None:
        allowed = max(2 * eager_err, sens)
        if not err <= allowed:  # NaN fails
            bad.append(f"{name}: off float64 by {err:.3g}, allowed {allowed:.3g} "
                       f"(eager {eager_err:.3g}, float64 under 1e-6 input noise {sens:.3g})")

    def loss_errors(r: Run) -> list[float]:
        return _running_max([abs(a - b) for a, b in zip(r.losses, ref.f64.losses)])

    eager_losses = [max(errs) for errs in zip(*map(loss_errors, ref.eager))]
    for i, (err, eager_err, sens) in enumerate(zip(loss_errors(run), eager_losses,
                                                   _running_max(ref.sensitivity["losses"]))):
        judge(f"loss up to step {i + 1}", err, eager_err, sens)

    def distance(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    judge("held-out logits", distance(run.logits, ref.f64.logits),
          max(distance(e.logits, ref.f64.logits) for e in ref.eager), ref.sensitivity["logits"])
    for k, r in ref.f64.state.items():
        a = run.state[k]
        if not r.is_floating_point():
            if not torch.equal(a, r):
                bad.append(f"{k}: {a.tolist()} != float64's {r.tolist()}")
            continue
        judge(k, distance(a, r), max(distance(e.state[k], r) for e in ref.eager), ref.sensitivity[k])
        if rms and r.numel() > 1:
            judge(f"{k} (root mean square)", root_mean_square(a, r),
                  max(root_mean_square(e.state[k], r) for e in ref.eager), ref.sensitivity[k])
    return bad


def root_mean_square(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).square().mean().sqrt())
