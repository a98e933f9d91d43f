"""Fusion block: gated norm3, concat LayerNorm, gating statistics, the channel gate and the
four blocks of HiFuse-Tiny, eager vs torch.compile vs fused.

Shapes are the four fusion stages (56x56x96 .. 7x7x768 at 224x224, scaled with the
benchmark image size) at the largest benchmark batch, channels-last activations.
Bytes (``conftest.time_op``): the least is the parts, gates and parameters read and the
outputs written (backward: also the outputs' gradients read and the inputs' written).
"""

from __future__ import annotations

import pytest
import torch

import hifuse
import hifuse_kernels
from conftest import DEVICE, DTYPES, run_timed, time_op
from hifuse.model import HFFBlock
from hifuse_kernels import _triton
from hifuse_kernels.channel_gate import channel_gate, channel_gate_ref
from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref
from hifuse_kernels.gated_layer_norm import gated_layer_norm, gated_layer_norm_ref
from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref
from hifuse_kernels.layer_norm_cat import layer_norm_cat, layer_norm_cat_ref

STAGES = {"fu1": (4, 96), "fu2": (8, 192), "fu3": (16, 384), "fu4": (32, 768)}


def _skip(impl, settings):
    if impl == "fused":
        reason = _triton.unsupported_reason(torch.zeros(1, device=DEVICE))
        if reason is None and not hifuse_kernels.native_available():
            reason = hifuse_kernels.native_load_error()
        return reason
    if impl == "compile" and not settings["compile_ops"]:
        return "op compile baselines need --compile-ops"
    return None


def _op_case(settings, stage, impl):
    """(batch, channels, side) of a fusion stage at the benchmark size; skips impls that
    cannot run here."""
    reason = _skip(impl, settings)
    if reason:
        pytest.skip(reason)
    div, c = STAGES[stage]
    return max(settings["batch"]), c, settings["image_size"] // div


def _pick(impl, ref, fused):
    """The function an impl times: the reference, the fused op, or the compiled reference."""
    return {"eager": ref, "fused": fused}.get(impl) or torch.compile(ref, dynamic=False)


def _feature(b, c, side, dtype, grad):
    t = torch.randn(b, c, side, side, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_gated_layer_norm(benchmark, bench_settings, stage, impl, direction, dtype):
    b, c, side = _op_case(bench_settings, stage, impl)
    dt = DTYPES[dtype]
    grad = direction == "fwd_bwd"
    g, l, x = (_feature(b, c, side, dt, grad) for _ in range(3))
    cg = torch.rand(b, c, 1, 1, device=DEVICE, dtype=dt, requires_grad=grad)
    sg = torch.rand(b, 1, side, side, device=DEVICE, dtype=dt, requires_grad=grad)
    w = torch.ones(3 * c, device=DEVICE, dtype=dt, requires_grad=grad)
    bias = torch.zeros(3 * c, device=DEVICE, dtype=dt, requires_grad=grad)
    fn = _pick(impl, gated_layer_norm_ref, gated_layer_norm)
    inputs = [g, cg, l, sg, x, w, bias]
    time_op(benchmark, bench_settings, lambda: fn(*inputs), inputs, direction, stage=stage, batch=b, impl=impl,
            dtype=dtype)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_layer_norm_cat(benchmark, bench_settings, stage, parts, impl, direction, dtype):
    b, c, side = _op_case(bench_settings, stage, impl)
    dt = DTYPES[dtype]
    grad = direction == "fwd_bwd"
    xs = [_feature(b, c, side, dt, grad) for _ in range(parts)]
    w = torch.ones(parts * c, device=DEVICE, dtype=dt, requires_grad=grad)
    bias = torch.zeros(parts * c, device=DEVICE, dtype=dt, requires_grad=grad)
    fn = _pick(impl, layer_norm_cat_ref, layer_norm_cat)
    time_op(benchmark, bench_settings, lambda: fn(xs, w, bias), [*xs, w, bias], direction, stage=stage, parts=parts,
            batch=b, impl=impl, dtype=dtype)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("which", ["channel_pool", "spatial_pool"])
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_gate_pooling(benchmark, bench_settings, stage, which, impl, direction, dtype):
    b, c, side = _op_case(bench_settings, stage, impl)
    x = _feature(b, c, side, DTYPES[dtype], direction == "fwd_bwd")
    # the fused block takes both channel poolings as one stacked tensor (the SE MLP's batch)
    ops = {"channel_pool": (channel_pool_ref, lambda t: channel_pool(t, stacked=True)),
           "spatial_pool": (spatial_pool_ref, spatial_pool)}
    fn = _pick(impl, *ops[which])
    time_op(benchmark, bench_settings, lambda: fn(x), [x], direction, stage=stage, op=which, batch=b, impl=impl,
            dtype=dtype)


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_channel_gate(benchmark, bench_settings, stage, impl, direction, dtype):
    """sigmoid(se(max) + se(avg)) of a stage's poolings, the SE MLP's weights (r = 16) in the
    benchmark's dtype."""
    b, c, _side = _op_case(bench_settings, stage, impl)
    dt, grad = DTYPES[dtype], direction == "fwd_bwd"
    avg, best = (torch.randn(b, c, 1, 1, device=DEVICE, dtype=dt, requires_grad=grad) for _ in range(2))
    w1 = (torch.randn(c // 16, c, 1, 1, device=DEVICE) / c**0.5).to(dt).requires_grad_(grad)
    w2 = (torch.randn(c, c // 16, 1, 1, device=DEVICE) / (c // 16) ** 0.5).to(dt).requires_grad_(grad)
    fn = _pick(impl, channel_gate_ref, channel_gate)
    inputs = [avg, best, w1, w2]
    time_op(benchmark, bench_settings, lambda: fn(*inputs), inputs, direction, stage=stage, batch=b, impl=impl,
            dtype=dtype)


@pytest.mark.parametrize("impl", ["eager", "compile", "fused"])
@pytest.mark.parametrize("direction", ["fwd", "fwd_bwd"])
def test_fusion_blocks_tiny(benchmark, bench_settings, impl, direction, dtype):
    """The 4 fusion blocks of HiFuse-Tiny, each on its stage's inputs, in training mode under autocast."""
    reason = _skip(impl, bench_settings) if impl != "compile" else None
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    b, size = max(bench_settings["batch"]), bench_settings["image_size"]
    grad = direction == "fwd_bwd"
    blocks, inputs = [], []
    for i, (div, c) in enumerate(STAGES.values()):
        block = HFFBlock(c).to(DEVICE)
        blocks.append(torch.compile(block, dynamic=False) if impl == "compile" else block)
        side = size // div
        ins = [_feature(b, c, side, torch.float32, grad), _feature(b, c, side, torch.float32, grad)]
        if i:
            ins.append(_feature(b, c // 2, 2 * side, torch.float32, grad))
        inputs.append(ins)
    autocast = torch.autocast(DEVICE.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def run():
        with autocast, hifuse.use_fused(impl == "fused", attention=False, local=False, patches=False, norm=False):
            outs = [blk(*ins) for blk, ins in zip(blocks, inputs)]
        if grad:
            torch.autograd.backward([o.float().sum() for o in outs])

    median = run_timed(benchmark, run, bench_settings["rounds"])
    benchmark.extra_info.update(batch=b, impl=impl, direction=direction, dtype=dtype, blocks=len(blocks),
                                median_ms=median * 1e3)

