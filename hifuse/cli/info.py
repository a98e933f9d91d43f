"""``hifuse info``: versions, the native library, and what can run fused here (and why not)."""

from __future__ import annotations

import os
from collections import Counter
import platform

import torch

from . import models, options


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, the native library, and which fused parts and ops can run here",
                       formatter_class=options.Formatter,
                       description="What this installation can run: versions, the native library, and for every fused "
                                   "part and op whether it runs on the device, and if not, why.")
    p.add_argument("--device", help="device to check (default: cuda when present)")
    p.set_defaults(run=run)


def versions() -> list[tuple[str, str]]:
    from .. import __version__
    import hifuse_kernels
    from hifuse_kernels import _ext

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.version.cuda or "none (a CPU build of torch)"
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else "none"
    native = hifuse_kernels.native_load_error()
    return [
        ("hifuse", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("CUDA (torch built with)", cuda),
        ("GPUs", gpus),
        ("native library built for torch", _ext.built_for() or "unknown"),
        ("native library", "loaded" if native is None else f"not loaded: {native}"),
    ]


def part_status(device: torch.device) -> dict[str, tuple[str, str]]:
    """Per fused part on ``device``: ("yes", "") where every module of the part runs fused,
    ("partly", which module kinds run eager and why) where some do, ("no", why) where none do;
    from the fused-execution layer's own decisions on a small model's forward."""
    from ..model import create_model

    model = create_model("hifuse_tiny", num_classes=2, depths=(2, 2, 2, 2), dims=(32, 64, 128, 256),
                         num_heads=(1, 2, 4, 8)).to(device).eval()
    return probe(model, torch.randn(1, 3, 64, 64, device=device))


def probe(model: torch.nn.Module, x: torch.Tensor) -> dict[str, tuple[str, str]]:
    """``part_status`` of ``model`` on ``x``."""
    from .. import config

    parts = config.FusedParts.names()

    def forward(**switches) -> None:
        # quiet: the report says why, and log lines would land inside it
        with config.use_fused(True, **switches), config.quiet_fallbacks(), torch.no_grad():
            model(x)

    forward()
    # with every part on, another part's fused ops take some modules (a fused fusion block or
    # local downsample runs its LayerNorm itself): run those with their part alone
    for part in parts:
        if any(p == part and not d for p, d in config.module_decisions(model).values()):
            forward(**{p: p == part for p in parts})
    decisions = config.module_decisions(model)
    # the model's own fused feature loop runs the same modules, handing tensors on: not a
    # module of the part's to report
    decisions.pop(model, None)

    # a module's reasons for running eager (empty: fused), for the modules that ran. A module
    # whose fused forward hands its own part's submodules to eager (a global stage whose
    # blocks run eager) runs eager too, for their reasons.
    part_of = {m: part for m, (part, _) in decisions.items()}
    eager = {m: {r for r in found if r is not None} for m, (_, found) in decisions.items() if found}
    for m in reversed(list(eager)):  # submodules first
        if not eager[m]:
            inner = [eager.get(d, set()) for d in m.modules() if d is not m and part_of.get(d) == part_of[m]]
            eager[m] = set().union(*inner)
    with config.use_fused(True):
        switched = config.fused_parts()  # all, unless HIFUSE_FUSED overrides it
    result = {}
    for part in parts:
        ran = [m for m in eager if part_of[m] == part]
        slow = [m for m in ran if eager[m]]
        if not getattr(switched, part):
            result[part] = ("no", f"{config.ENV_VAR}={os.environ.get(config.ENV_VAR)} switches it off")
        elif not ran:
            result[part] = ("no", "no module of this part ran")
        elif not slow:
            result[part] = ("yes", "")
        elif len(slow) == len(ran):
            result[part] = ("no", "; ".join(sorted(set().union(*(eager[m] for m in slow)))))
        else:
            total = Counter(type(m).__name__ for m in ran)
            count = Counter((type(m).__name__, reason) for m in ran for reason in eager[m])
            result[part] = ("partly", "; ".join(f"{kind} eager ({n} of {total[kind]}): {reason}"
                                                for (kind, reason), n in sorted(count.items())))
    return result


def op_reasons(device: torch.device) -> dict[str, str | None]:
    """Per ``hifuse::`` op: None when it can run on ``device``, else why not."""
    import hifuse_kernels
    from hifuse_kernels import _ext

    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hifuse::"))
    probe = torch.zeros(1, device=device)
    triton_reason = hifuse_kernels.triton_unsupported_reason(probe)
    result = {}
    for name in names:
        op = name.split("::", 1)[1]
        native = any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in ("CPU", "CUDA"))
        if native:
            result[name] = None if _ext.has_kernel(op, device.type) else (
                hifuse_kernels.native_load_error() or f"native op without a {device.type} kernel")
        else:
            result[name] = triton_reason and f"Triton: {triton_reason}"
    if not names:
        result["hifuse::*"] = hifuse_kernels.native_load_error() or "no op registered"
    return result


def run(args) -> int:
    device = models.device_of(args.device)
    rows = versions()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"\nfused parts on {device} (hifuse.use_fused):")
    for part, (status, why) in part_status(device).items():
        print(f"  {part:<10} {status}{': ' + why if why else ''}")
    print(f"\nops on {device}:")
    ops = op_reasons(device)
    width = max(len(k) for k in ops)
    for name, why in ops.items():
        print(f"  {name:<{width}}  {'yes' if why is None else 'no: ' + why}")
    return 0
