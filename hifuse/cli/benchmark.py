"""``hifuse benchmark``: images per second of eager, fused and compiled HiFuse on this machine."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from . import bench, models, options
from .errors import CliError


def add_parser(sub) -> None:
    p = sub.add_parser("benchmark", help="images per second of eager, fused and compiled HiFuse here",
                       formatter_class=options.Formatter,
                       description="Times the whole model with the functions the benchmark suite uses.")
    p.add_argument("--model", default="hifuse_tiny", help="hifuse_tiny, hifuse_small or hifuse_base")
    p.add_argument("--irmlp", default="full", choices=["full", "depthwise"], help="IRMLP conv1 (full: published)")
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=32, help="images per call")
    p.add_argument("--img-size", type=int, default=224, help="input side (a multiple of 32)")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], help="autocast dtype (default: bf16 on a GPU, none on CPU)")
    p.add_argument("--train", action="store_true", help="time training steps (forward, backward, AdamW), not inference")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--providers", default="eager,fused,compile", help=f"comma list of {', '.join(bench.PROVIDERS)}")
    p.add_argument("--rounds", type=int, default=10, help="timed calls per provider (the median is shown)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="also profile one call per provider (torch.profiler) and write the 25 kernels with the "
                        "most time (--profile-rows), their share and call count, to "
                        "DIR/profile_<provider>_<train|infer>_b<batch>.txt")
    p.add_argument("--profile-rows", type=int, default=25, help="kernels (on a CPU: ops) listed per --profile table")
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
    if args.batch <= 0 or args.rounds <= 0 or args.warmup < 0 or args.profile_rows <= 0:
        raise CliError("--batch, --rounds and --profile-rows must be positive, --warmup not negative")
    if args.train and args.batch * (args.img_size // 32) ** 2 < 2:
        # the last fusion block's BatchNorms see batch x (size/32)^2 values per channel
        raise CliError("--train needs batch x (img-size/32)^2 of at least 2 (BatchNorm statistics); "
                       f"got batch {args.batch} at {args.img_size}")
    device = models.device_of(args.device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    dtype = {"none": "fp32"}.get(amp, amp)
    fmt = "channels_last" if args.channels_last else "contiguous"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"
    header = (f"{args.model}, {'train step' if args.train else 'inference'}, batch {args.batch}, "
              f"{args.img_size}x{args.img_size}, {dtype}, {fmt}; {name}, torch {torch.__version__}")
    print(header)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
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
            table = bench.profile_table(fn, device, args.profile_rows) if args.profile is not None else None
        print(f"{provider:<14} {median * 1e3:10.2f} {args.batch / median:10.1f}  {first:.1f} s", flush=True)
        if table is not None:
            path = args.profile / f"profile_{provider}_{'train' if args.train else 'infer'}_b{args.batch}.txt"
            path.write_text(f"{header}\n{provider}: median {median * 1e3:.2f} ms per call\n\n{table}\n")
            print(f"  profile: {path}", flush=True)
    return 0
