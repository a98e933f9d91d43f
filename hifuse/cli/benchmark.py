"""``hifuse benchmark``: images per second of eager, fused and compiled HiFuse on this machine."""

from __future__ import annotations

import platform
import time

import torch

from . import bench, models
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="images per second of eager, fused and compiled HiFuse here",
                       description="Times the whole model with the functions the benchmark suite uses.")
    p.add_argument("--model", default="hifuse_tiny")
    p.add_argument("--irmlp", default="full", choices=["full", "depthwise"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast dtype (default: bf16 on a GPU, none on CPU)")
    p.add_argument("--train", action="store_true", help="time training steps (forward, backward, AdamW), not inference")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--providers", default="eager,fused,compile", help=f"comma list of {', '.join(bench.PROVIDERS)}")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..model import check_input_size

    try:
        check_input_size(args.img_size, args.img_size)
    except ValueError as e:
        raise CliError(str(e)) from None
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in providers if p not in bench.PROVIDERS]
    if unknown or not providers:
        raise CliError(f"--providers: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(bench.PROVIDERS)}")
    if args.batch <= 0 or args.rounds <= 0 or args.warmup < 0:
        raise CliError("--batch and --rounds must be positive, --warmup not negative")
    device = models.device_of(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    dtype = {"none": "fp32"}.get(amp, amp)
    fmt = "channels_last" if args.channels_last else "contiguous"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    print(f"{args.model}, {'train step' if args.train else 'inference'}, batch {args.batch}, "
          f"{args.img_size}x{args.img_size}, {dtype}, {fmt}; {name}, torch {torch.__version__}")
    print(f"{'provider':<14} {'ms':>10} {'images/s':>10}  first call")
    for provider in providers:
        try:
            fn = bench.model_call(args.model, args.irmlp, args.batch, args.img_size, dtype, fmt, provider, args.train, device)
        except ValueError as e:
            raise CliError(str(e)) from None
        with bench.fused_setting(provider):
            t0 = time.perf_counter()
            fn()
            bench.sync(device)
            first = time.perf_counter() - t0
            median = bench.median_seconds(fn, device, args.rounds, max(0, args.warmup - 1))
        print(f"{provider:<14} {median * 1e3:10.2f} {args.batch / median:10.1f}  {first:.1f} s", flush=True)
    return 0
