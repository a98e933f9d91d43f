"""The whole model: training step (forward, cross-entropy, backward, AdamW) and inference.

Providers: eager, fused (whatever use_fused() enables today), compile and fused_compile
(torch.compile of the eager or fused model; with --compile).
"""

from __future__ import annotations

import functools

import torch

import hifuse
from conftest import DEVICE, DTYPES, FORMATS, fused_setting, run_timed


@functools.lru_cache(maxsize=None)
def flops_per_image(variant: str, irmlp: str, size: int, train: bool) -> int:
    model = hifuse.create_model(variant, num_classes=7, irmlp=irmlp).to(DEVICE)
    return hifuse.count_flops(model, (3, size, size), backward=train)


def _setup(bench_settings, batch, dtype, memory_format, provider, train):
    torch.manual_seed(0)
    model = hifuse.create_model(bench_settings["variant"], num_classes=7, irmlp=bench_settings["irmlp"])
    model = model.to(DEVICE, memory_format=FORMATS[memory_format]).train(train)
    size = bench_settings["image_size"]
    x = torch.randn(batch, 3, size, size, device=DEVICE).to(memory_format=FORMATS[memory_format])
    y = torch.randint(0, 7, (batch,), device=DEVICE)
    run = torch.compile(model, dynamic=False) if provider.endswith("compile") else model
    autocast = torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    return model, run, x, y, autocast


def _record(benchmark, bench_settings, median, batch, dtype, memory_format, provider, train):
    size = bench_settings["image_size"]
    flops = batch * flops_per_image(bench_settings["variant"], bench_settings["irmlp"], size, train)
    benchmark.extra_info.update(
        variant=bench_settings["variant"], irmlp=bench_settings["irmlp"], batch=batch,
        image_size=size, dtype=dtype, memory_format=memory_format, provider=provider,
        mode="train" if train else "infer", flops=flops, tflops_per_s=flops / median / 1e12,
        images_per_s=batch / median,
    )


def test_train_step(benchmark, bench_settings, batch, dtype, memory_format, provider):
    model, run, x, y, autocast = _setup(bench_settings, batch, dtype, memory_format, provider, True)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim > 1 and not n.endswith(".bias"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    with fused_setting(provider):
        median = run_timed(benchmark, step, bench_settings["rounds"])
    _record(benchmark, bench_settings, median, batch, dtype, memory_format, provider, True)


def test_inference(benchmark, bench_settings, batch, dtype, memory_format, provider):
    _model, run, x, _y, autocast = _setup(bench_settings, batch, dtype, memory_format, provider, False)

    def infer():
        with torch.no_grad(), autocast:
            run(x)

    with fused_setting(provider):
        median = run_timed(benchmark, infer, bench_settings["rounds"])
    _record(benchmark, bench_settings, median, batch, dtype, memory_format, provider, False)
