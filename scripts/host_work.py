"""Host work of one HiFuse training step, eager against fused, measured on the CPU.

On the GPU the fused step at batch 32 is bound by host work (Python, dispatch, launches),
not by its kernels. This measures that work without a GPU: the fused ops run on CPU tensors
(TRITON_INTERPRET=1) with every Triton launch replaced by a counter, on a narrow model at a
small size where the CPU's own arithmetic is small. It prints, per training step (bf16
autocast forward, cross-entropy, backward; no optimizer step, which is the same for both):
the median host milliseconds, the Triton launches (not timed here: add their launch cost on
the GPU machine), the hifuse op calls and the aten op calls (nested ones included).

    python scripts/host_work.py [--dims 16] [--heads 1] [--batch 2] [--image-size 32] [--steps 20]

The figures are this CPU's; compare eager with fused in one run.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import hifuse  # noqa: E402
from hifuse_kernels import _triton, window_attention  # noqa: E402

launches: collections.Counter = collections.Counter()


class _CountedLaunch:
    """Stands for ``wrap_triton(kernel)``: ``[grid](...)`` counts the launch, runs nothing."""

    def __init__(self, kernel) -> None:
        self.name = getattr(kernel, "__name__", repr(kernel))

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            launches[self.name] += 1

        return launch


def measure(fused: bool, args) -> dict:
    torch.manual_seed(0)
    d, h = args.dims, args.heads
    model = hifuse.HiFuse(num_classes=7, dims=(d, 2 * d, 4 * d, 8 * d), num_heads=(h, 2 * h, 4 * h, 8 * h))
    x = torch.randn(args.batch, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (args.batch,))

    def step() -> None:
        with hifuse.use_fused(fused), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    launches.clear()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = collections.Counter()
    for event in prof.key_averages():
        for prefix in ("hifuse::", "aten::"):
            if event.key.startswith(prefix):
                counts[prefix] += event.count
    return {
        "host ms": statistics.median(times) * 1e3,
        "triton launches": sum(launches.values()) / (args.steps + 1),
        "hifuse ops": counts["hifuse::"],
        "aten ops": counts["aten::"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", type=int, default=16, help="stage 1 channels (doubling per stage)")
    parser.add_argument("--heads", type=int, default=1, help="stage 1 heads (doubling per stage)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.dims % args.heads or args.dims // args.heads not in window_attention.HEAD_DIMS:
        parser.error(f"dims / heads must be one of the fused attention's head sizes {window_attention.HEAD_DIMS}")
    torch.set_num_threads(args.threads)
    _triton.wrap_triton = _CountedLaunch
    print(f"torch {torch.__version__}, {args.batch}x3x{args.image_size}x{args.image_size}, "
          f"dims {args.dims}.., heads {args.heads}.., bf16 autocast, one training step")
    if _triton.INTERPRETER_PROBLEM is not None:
        sys.exit(f"the fused ops cannot run on CPU tensors here: {_triton.INTERPRETER_PROBLEM}")
    rows = {"eager": measure(False, args), "fused": measure(True, args)}
    if not rows["fused"]["hifuse ops"]:
        sys.exit("the fused step ran no hifuse op: see the fallback reasons logged above")
    keys = list(rows["eager"])
    print(f"{'':8s}" + "".join(f"{k:>18s}" for k in keys))
    for name, row in rows.items():
        print(f"{name:8s}" + "".join(f"{row[k]:18.1f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
