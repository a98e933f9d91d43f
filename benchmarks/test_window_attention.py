"""Window attention and the global blocks of HiFuse-Tiny, eager vs compile vs SDPA vs Flex vs fused.

Shapes: the four stages of HiFuse-Tiny at 224x224 (grids 56, 28, 14, 7; heads 3, 6, 12, 24)
at the largest benchmark batch (GPU: 128). The attention-only baselines (eager math, SDPA
with bias and mask folded into attn_mask, FlexAttention with a score_mod) take q, k, v
already partitioned into windows, as the published baseline figures do; the fused op takes
the (B, H, W, 3C) qkv projection and includes shift, partition, merge and crop. FLOPs count
q @ k^T and p @ v (backward: twice that). Bytes (``conftest.time_op``): the least is the fused
op's qkv, qkv bias and bias table read and the output written (backward: also the output's
gradient read and the inputs' written), the same for every impl.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hifuse
from conftest import DEVICE, DTYPES, ON_GPU, run_timed, time_op
from hifuse.model import GlobalStage
from hifuse_kernels.reference import relative_position_index, shift_mask
from hifuse_kernels import _triton
from hifuse_kernels.window_attention import window_attention

STAGES = {"stage1": (56, 3), "stage2": (28, 6), "stage3": (14, 12), "stage4": (7, 24)}
WINDOW, SHIFT, N = 7, 3, 49
ATTENTION_IMPLS = ("eager", "sdpa", "flex", "compile", "fused")
BLOCK_IMPLS = ("eager", "compile", "fused")


def _skip_reason(impl: str, settings: dict) -> str | None:
    if impl == "fused":
        return _triton.unsupported_reason(torch.zeros(1, device=DEVICE))
    if impl == "flex" and not ON_GPU:
        return "FlexAttention baseline runs on the GPU only"
    if impl == "compile" and not settings["compile_ops"]:
        return "op compile baselines need --compile-ops"
    return None


def _stage_inputs(stage, batch, dtype, requires_grad):
    side, heads = STAGES[stage]
    c = heads * 32
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, side, side, 3 * c, generator=g).to(DEVICE, DTYPES[dtype])
    bias = torch.randn(3 * c, generator=g).to(DEVICE, DTYPES[dtype])
    table = (0.5 * torch.randn(169, heads, generator=g)).to(DEVICE)
    for t in (qkv, bias, table):
        t.requires_grad_(requires_grad)
    return qkv, bias, table, heads


def _partitioned(qkv, heads):
    b, h, w, c3 = qkv.shape
    x = qkv.detach().view(b, h // WINDOW, WINDOW, w // WINDOW, WINDOW, 3, heads, c3 // 3 // heads)
    x = x.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, heads, N, c3 // 3 // heads).contiguous()
    return [t.requires_grad_(qkv.requires_grad) for t in x.unbind(0)]


def _bias_and_mask(table, side, device):
    index = relative_position_index(WINDOW).to(device)
    bias = table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)
    mask = shift_mask(side, side, WINDOW, SHIFT, torch.device(device))  # (nW, N, N)
    return bias, mask


def _attention_fn(impl, qkv, bias_vec, table, heads):
    side = qkv.shape[1]
    if impl == "fused":
        return (lambda: window_attention(qkv, bias_vec, table, heads, WINDOW, SHIFT)), (qkv, bias_vec, table)
    q, k, v = _partitioned(qkv, heads)
    n_win = (side // WINDOW) ** 2
    scale = q.shape[-1] ** -0.5

    def eager():
        bias, mask = _bias_and_mask(table, side, qkv.device)
        s = (q * scale) @ k.transpose(-2, -1) + bias
        s = (s.view(-1, n_win, heads, N, N) + mask[None, :, None]).view(-1, heads, N, N)
        return s.softmax(-1).to(v.dtype) @ v

    if impl in ("eager", "compile"):
        fn = eager if impl == "eager" else torch.compile(eager, dynamic=False)
        return fn, (q, k, v, table)
    if impl == "sdpa":
        def sdpa():
            bias, mask = _bias_and_mask(table, side, qkv.device)
            m = (bias[None, None] + mask[None, :, None]).view(1, -1, heads, N, N).expand(q.shape[0] // n_win, -1, -1, -1, -1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m.reshape(-1, heads, N, N).to(q.dtype), scale=scale)

        return sdpa, (q, k, v, table)
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def run_flex():
        bias, mask = _bias_and_mask(table, side, qkv.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx] + mask[b % n_win, q_idx, kv_idx]

        return flex(q, k, v, score_mod=score_mod, scale=scale)

    return run_flex, (q, k, v, table)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_window_attention(benchmark, bench_settings, stage, impl, direction, dtype):
    reason = _skip_reason(impl, bench_settings)
    if reason:
        pytest.skip(reason)
    batch = max(bench_settings["batch"])
    qkv, bias_vec, table, heads = _stage_inputs(stage, batch, dtype, direction == "fwd_bwd")
    fn, inputs = _attention_fn(impl, qkv, bias_vec, table, heads)
    b, side, _, c3 = qkv.shape
    flops = 4 * b * side * side * N * (c3 // 3) * (3 if direction == "fwd_bwd" else 1)
    median = time_op(benchmark, bench_settings, fn, list(inputs), direction, reads=[qkv, bias_vec, table], stage=stage,
                     batch=b, heads=heads, impl=impl, dtype=dtype, flops=flops)
    if median is not None:
        benchmark.extra_info["tflops_per_s"] = flops / median / 1e12


def _tiny_stages():
    """The 8 global blocks of HiFuse-Tiny as their 4 stages without patch merging (2 blocks
    each, shift 0 then 3, so the fused path chains each block's norm1 into the block
    before), with the stages' input shapes."""
    torch.manual_seed(0)
    stages = [GlobalStage(heads * 32, 2, heads, WINDOW).to(DEVICE) for _side, heads in STAGES.values()]
    return stages, [(side, heads * 32) for side, heads in STAGES.values()]


@pytest.mark.parametrize("impl", BLOCK_IMPLS)
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_global_blocks_tiny(benchmark, bench_settings, impl, direction, dtype):
    """All 8 global blocks of HiFuse-Tiny, each stage's pair on its input, under autocast."""
    reason = _skip_reason(impl, {**bench_settings, "compile_ops": bench_settings["compile_ops"] or impl != "compile"})
    if reason:
        pytest.skip(reason)
    batch = max(bench_settings["batch"])
    stages, shapes = _tiny_stages()
    xs = [torch.randn(batch, side * side, c, device=DEVICE, requires_grad=direction == "fwd_bwd") for side, c in shapes]
    calls = [torch.compile(s, dynamic=False) if impl == "compile" else s for s in stages]
    autocast = torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def run():
        with autocast, hifuse.use_fused(impl == "fused", local=False, patches=False, fusion=False, norm=False):
            outs = [call(x, side, side)[0] for call, x, (side, _c) in zip(calls, xs, shapes)]
        if direction == "fwd_bwd":
            torch.autograd.backward([o.float().sum() for o in outs])

    median = run_timed(benchmark, run, bench_settings["rounds"])
    benchmark.extra_info.update(batch=batch, impl=impl, direction=direction, dtype=dtype,
                                blocks=sum(len(s.blocks) for s in stages), median_ms=median * 1e3)
