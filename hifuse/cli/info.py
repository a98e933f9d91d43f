"""``hifuse info``: versions, the native library, and what can run fused here (and why not)."""

from __future__ import annotations

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


def part_reasons(device: torch.device) -> dict[str, str | None]:
    """Per fused part: None when it runs fused on ``device``, else the reasons it does not
    (from the fused-execution layer's own checks on a small model's forward)."""
    from .. import config
    from ..model import create_model

    model = create_model("hifuse_tiny", num_classes=2, depths=(2, 2, 2, 2), dims=(32, 64, 128, 256),
                         num_heads=(1, 2, 4, 8)).to(device).eval()
    x = torch.randn(1, 3, 64, 64, device=device)

    def decisions(**parts) -> dict:
        with config.use_fused(True, **parts), torch.no_grad():
            model(x)
        return config.part_decisions(model)

    found = decisions()
    result = {}
    for part in config.FusedParts.names():
        reasons = found.get(part)
        if reasons is None:
            # with every part on, another part's fused ops may take all of this part's modules
            # (the local blocks' LayerNorms inside dwconv + LayerNorm): ask for this part alone
            others = {p: p == part for p in config.FusedParts.names()}
            reasons = decisions(**others).get(part, {"no module of this part ran"})
            if None in reasons:
                result[part] = None
                continue
        result[part] = None if None in reasons else "; ".join(sorted(r for r in reasons if r))
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
    for part, why in part_reasons(device).items():
        print(f"  {part:<10} {'yes' if why is None else 'no: ' + why}")
    print(f"\nops on {device}:")
    ops = op_reasons(device)
    width = max(len(k) for k in ops)
    for name, why in ops.items():
        print(f"  {name:<{width}}  {'yes' if why is None else 'no: ' + why}")
    return 0
