"""Whole-model training steps and inference calls as the benchmarks time them; shared by
``benchmarks/test_model.py`` and ``hifuse benchmark``.

Providers: ``eager``; ``fused`` (``use_fused()``); ``compile`` and ``fused_compile``
(``torch.compile`` of the eager or fused model); ``fused_cudagraphs`` (the fused model under
``torch.compile(mode="reduce-overhead")``: Inductor plus CUDA graphs, which replay the whole
step without host work; on a CPU the same as ``fused_compile``); ``eager_graph`` and
``fused_graph`` (the whole step recorded as one CUDA graph without Inductor: training through
``hifuse.TrainStep``, inference a forward recorded by hand; GPU only, recorded in seconds).

Every training step uses the same optimizer: AdamW, fused on a GPU (one kernel a step), and
capturable with a tensor learning rate under the graph providers.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .. import config
from .. import graphs
from ..model import create_model

PROVIDERS = ("eager", "fused", "compile", "fused_compile", "fused_cudagraphs", "eager_graph", "fused_graph")
GRAPH_PROVIDERS = ("eager_graph", "fused_graph")
# What a fused training step rebuilds in backward (``config.use_rebuilds`` arguments): all of
# it, none of it, all but one, or all but the two whose keeping saves the most bytes a step
# (benchmarks/results/step_ledger.md)
REBUILD_SETTINGS = {"rebuild_all": {}, "keep_all": dict.fromkeys(config.Rebuilds.names(), False),
                    **{f"keep_{name}": {name: False} for name in config.Rebuilds.names()},
                    "keep_fusion_norm_irmlp": dict(fusion_norm=False, irmlp=False)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def no_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def model_call(
    variant: str, irmlp: str, batch: int, size: int, dtype: str, memory_format: str, provider: str,
    train: bool, device: torch.device, num_classes: int = 7,
) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, AdamW) or one inference call, as a
    function of no arguments. Run it under ``fused_setting(provider)``."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose from {PROVIDERS}")
    graphed = provider in GRAPH_PROVIDERS
    if graphed and device.type != "cuda":
        raise ValueError(f"provider {provider} records a CUDA graph: it needs a GPU (the device is {device})")
    torch.manual_seed(0)
    fmt = FORMATS[memory_format]
    model = create_model(variant, num_classes=num_classes, irmlp=irmlp).to(device, memory_format=fmt).train(train)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    if provider == "fused_cudagraphs":
        run = torch.compile(model, mode="reduce-overhead", dynamic=False)
    elif provider.endswith("compile"):
        run = torch.compile(model, dynamic=False)
    else:
        run = model
    autocast = dict(device_type=device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    if not train:
        def infer():
            with torch.no_grad(), torch.autocast(**autocast):
                run(x)

        return _recorded_inference(model, x, autocast, provider) if graphed else infer

    on_gpu = device.type == "cuda"
    lr = torch.tensor(1e-4, device=device) if graphed else 1e-4
    opt = torch.optim.AdamW(no_decay_groups(model, 0.01), lr=lr, fused=on_gpu, capturable=graphed)
    if graphed:
        graphed_step = graphs.TrainStep(model, opt, amp=DTYPES[dtype] if dtype != "fp32" else None, strict=True)
        return lambda: graphed_step(x, y)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()

    return step


def _recorded_inference(model, x, autocast: dict, provider: str) -> Callable[[], None]:
    """One inference call recorded as a CUDA graph on its first call (warm-up calls on a side
    stream first: kernels compiled, per-shape decisions and folded weights made), replayed
    after. The autocast cache is off so that the graph records its weight casts."""
    state = {}

    def forward():
        with torch.no_grad(), torch.autocast(**autocast, cache_enabled=False), fused_setting(provider):
            model(x)

    def call():
        if "graph" not in state:
            graphs.warm_up(forward, graphs.WARMUP, x.device)
            state["graph"] = graphs.CudaGraph()
            state["graph"].capture(forward)
        state["graph"].replay()

    return call


def fused_setting(provider: str):
    """The use_fused() setting of a provider (context manager)."""
    return config.use_fused(provider.startswith("fused"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_table(fn: Callable[[], None], device: torch.device, rows: int = 25) -> str:
    """torch.profiler table of one call of fn (warmed up already): the ``rows`` kernels (on a
    CPU: ops) with the most self time, with their share of the call and their call count."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=90)


def median_seconds(fn: Callable[[], None], device: torch.device, rounds: int, warmup: int) -> float:
    """Median wall time of fn, each call synchronised, after warm-up calls (compilation)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
