"""Device-to-device copy: the bandwidth the memory-bound ops are held to.

Each op benchmark reports ``gb_per_s`` (the least bytes its op must move over its time) and
the bytes it moves; ``scripts/summarize.py`` divides both by the best copy figure of the same
run. Sizes span the op benchmarks' tensors (a few MB at stage 4 to about a GB at stage 1,
batch 128); the copy reads and writes each byte once.
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU, run_timed

SIZES_MIB = (16, 64, 256, 1024) if ON_GPU else (4, 16)


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_copy(benchmark, bench_settings, size_mib):
    n = size_mib * 2**20 // 2
    src = torch.randn(n, device=DEVICE, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    median = run_timed(benchmark, lambda: dst.copy_(src), bench_settings["rounds"])
    moved = 2 * src.numel() * src.element_size()  # one launch; its least is all it moves
    benchmark.extra_info.update(impl="copy", size_mib=size_mib, bytes_moved=moved, bytes_min=moved, launches=1,
                                gb_per_s=moved / median / 1e9)
