"""One call per kernel family on a tensor past 2**31 elements (GPU only).

Offsets past 2**31 need 64-bit index arithmetic; a kernel that computes them in 32 bits reads
or writes the wrong place only there. Each test builds stage-1 HiFuse tensors in bf16 at a
batch of a few thousand images, runs the fused op on all of them, and compares the last
image (the one whose offsets pass 2**31) with the eager reference run on that image alone
(every op here treats images independently, except the BatchNorm, whose reference runs on
the whole batch). Backward is checked the same way, with the gradient zero except on the
last image. Skipped where the GPU has too little free memory.

One more test runs the gating ops on a single very large image, whose position blocks pass
what one axis of a CUDA launch grid holds (65535).
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import hifuse_kernels
from hifuse_kernels.batch_norm_act import batch_norm_act, batch_norm_act_ref, gated_sources
from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref
from hifuse_kernels.dwconv_layer_norm import dwconv_layer_norm, dwconv_layer_norm_ref
from hifuse_kernels.gated_layer_norm import gated_layer_norm, gated_layer_norm_ref
from hifuse_kernels.gelu_residual import gelu_residual, gelu_residual_ref
from hifuse_kernels.layer_norm_cat import layer_norm_cat, layer_norm_cat_ref
from hifuse_kernels.layer_norm_cf import layer_norm_cf
from hifuse_kernels.patch_conv_norm import patch_conv_norm
from hifuse_kernels.reference import layer_norm_cf_ref
from hifuse_kernels.residual_layer_norm import gelu_residual_layer_norm, gelu_residual_layer_norm_ref
from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref
from hifuse_kernels.window_attention import window_attention, window_attention_ref

pytestmark = pytest.mark.gpu
LIMIT = 2**31
SIDE, C = 56, 96  # stage 1 of HiFuse-Tiny at 224x224
BF16 = dict(rtol=2e-2, atol=2e-2)


@pytest.fixture(autouse=True)
def _release():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _images(per_image: int) -> int:
    """Images whose tensor of ``per_image`` elements each passes 2**31 elements."""
    return LIMIT // per_image + 2


def _need(gib: float) -> None:
    free, _total = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")


def _randn(*shape, dtype=torch.bfloat16, channels_last=False):
    t = torch.empty(shape, device="cuda", dtype=dtype).normal_()
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _small(*shape, scale=0.5):
    return (scale * torch.randn(*shape, device="cuda")).requires_grad_()


def _last_image_grad(out):
    grad = torch.zeros_like(out)
    grad[-1] = torch.randn_like(out[-1])
    return grad


def test_window_attention_past_2_31():
    n = _images(SIDE * SIDE * 3 * C)
    _need(20)
    qkv = _randn(n, SIDE, SIDE, 3 * C).requires_grad_()
    bias, table = _small(3 * C), _small(169, 3)
    out = window_attention(qkv, bias, table, 3, 7, 3)
    grad = _last_image_grad(out)
    got = torch.autograd.grad(out, (qkv, bias, table), grad)
    one = qkv.detach()[-1:].float().requires_grad_()
    ref = window_attention_ref(one, bias, table, 3, 7, 3)
    want = torch.autograd.grad(ref, (one, bias, table), grad[-1:].float())
    torch.testing.assert_close(out[-1].float(), ref[0], **BF16)
    torch.testing.assert_close(got[0][-1].float(), want[0][0], **BF16)
    torch.testing.assert_close(got[1].float(), want[1], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(got[2].float(), want[2], rtol=2e-2, atol=5e-2)


def test_dwconv_layer_norm_past_2_31():
    n = _images(SIDE * SIDE * C)
    _need(24)
    x = _randn(n, SIDE, SIDE, C).requires_grad_()
    cw, cb, lw, lb = _small(C, 1, 3, 3), _small(C), _small(C), _small(C)
    out = dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6)
    grad = _last_image_grad(out)
    got = torch.autograd.grad(out, (x, cw, cb, lw, lb), grad)
    one = x.detach()[-1:].float().requires_grad_()
    ref = dwconv_layer_norm_ref(one, cw, cb, lw, lb, 1e-6)
    want = torch.autograd.grad(ref, (one, cw, cb, lw, lb), grad[-1:].float())
    torch.testing.assert_close(out[-1].float(), ref[0], **BF16)
    torch.testing.assert_close(got[0][-1].float(), want[0][0], **BF16)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=5e-2)


def test_gated_layer_norm_past_2_31():
    n = _images(SIDE * SIDE * 3 * C)
    _need(24)
    g, l, x = (_randn(n, C, SIDE, SIDE, channels_last=True) for _ in range(3))
    cg = torch.rand(n, C, 1, 1, device="cuda", dtype=torch.bfloat16)
    sg = torch.rand(n, 1, SIDE, SIDE, device="cuda", dtype=torch.bfloat16)
    w, b = _small(3 * C), _small(3 * C)
    out = gated_layer_norm(g, cg, l, sg, x, w, b, 1e-6)
    ref = gated_layer_norm_ref(*(t[-1:].float() for t in (g, cg, l, sg, x)), w, b, 1e-6)
    torch.testing.assert_close(out[-1].float(), ref[0].detach(), **BF16)


def test_pools_past_2_31():
    n = _images(SIDE * SIDE * C)
    _need(12)
    t = _randn(n, C, SIDE, SIDE, channels_last=True)
    avg, best = channel_pool(t)
    ref_avg, ref_best = channel_pool_ref(t[-1:].float())
    torch.testing.assert_close(avg[-1].float(), ref_avg[0], **BF16)
    torch.testing.assert_close(best[-1].float(), ref_best[0], rtol=0, atol=0)
    pooled = spatial_pool(t)
    torch.testing.assert_close(pooled[-1].float(), spatial_pool_ref(t[-1:].float())[0], **BF16)


def test_gating_ops_on_a_large_image():
    # stage 1 of a 6144x6144 image: more position blocks than a CUDA grid's axis y holds (65535)
    side = 1536
    _need(24)
    g, l, x = (_randn(1, C, side, side, channels_last=True) for _ in range(3))
    # one maximum per channel of g, above every normal sample: in bf16 a tie for it is
    # likely among 2.4M positions, and a tie would leave the max pooling's gradient open
    g[0, torch.arange(C), torch.randint(side, (C,)), torch.randint(side, (C,))] = 8.0
    g, l, x = (t.requires_grad_() for t in (g, l, x))
    cg = torch.rand(1, C, 1, 1, device="cuda", dtype=torch.bfloat16)
    sg = torch.rand(1, 1, side, side, device="cuda", dtype=torch.bfloat16)
    w, b = _small(3 * C), _small(3 * C)
    out = gated_layer_norm(g, cg, l, sg, x, w, b, 1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (g, l, x), grad)
    ref_in = [t.detach().float().requires_grad_() for t in (g, l, x)]
    ref = gated_layer_norm_ref(ref_in[0], cg.float(), ref_in[1], sg.float(), ref_in[2], w, b, 1e-6)
    want = torch.autograd.grad(ref, ref_in, grad.float())
    torch.testing.assert_close(out.float(), ref.detach(), **BF16)
    for a, r in zip(got, want):
        torch.testing.assert_close(a.float(), r, **BF16)
    del out, grad, got, ref, want
    avg, best = channel_pool(g)
    d_avg, d_max = torch.randn_like(avg), torch.randn_like(best)
    dg = torch.autograd.grad((avg, best), g, (d_avg, d_max))[0]
    ref_avg, ref_best = channel_pool_ref(ref_in[0])
    want = torch.autograd.grad((ref_avg, ref_best), ref_in[0], (d_avg.float(), d_max.float()))[0]
    torch.testing.assert_close(best.float(), ref_best.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dg.float(), want, **BF16)


def test_batch_norm_act_past_2_31():
    n = _images(SIDE * SIDE * C)
    _need(40)
    x = _randn(n, C, SIDE, SIDE, channels_last=True)
    bn = torch.nn.BatchNorm2d(C).cuda().train()
    twin = copy.deepcopy(bn)
    out = batch_norm_act(x, bn, "gelu")
    ref = batch_norm_act_ref(x.float(), twin, "gelu")
    torch.testing.assert_close(out[-1].float(), ref[-1].detach(), **BF16)
    torch.testing.assert_close(bn.running_mean, twin.running_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bn.running_var, twin.running_var, rtol=1e-3, atol=1e-4)


def test_gated_batch_norm_past_2_31():
    """bn1 computing norm3's result on load over more than 2**31 elements of it: the statistics
    and the apply give the bits of the plain ops given the result (the last image compared)."""
    n = _images(SIDE * SIDE * 3 * C)
    _need(40)
    s = SIDE * SIDE
    g, l, x = (_randn(n, s, C) for _ in range(3))
    cg, sg = torch.rand(n, C, device="cuda") + 0.5, (torch.rand(n, s, device="cuda") + 0.5).to(torch.bfloat16)
    x_bn = [torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda"),
            torch.randn(C, device="cuda")]
    w, b = torch.randn(3 * C, device="cuda"), torch.randn(3 * C, device="cuda")
    r, mu, rstd, _ = torch.ops.hifuse.gated_layer_norm_bn(g, cg, l, sg, x, *x_bn, 2, w, b, 1e-6)
    y = _randn(n * s, 3 * C)
    src = gated_sources([g, cg, l, sg, x, mu, rstd, w, b, *x_bn], 2, r.dtype)
    r = r.view(n * s, 3 * C)
    stats = torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, None, None, None, 0.1)
    assert all(torch.equal(a, e) for a, e in zip(
        torch.ops.hifuse.batch_norm_stats_gated(y, *src, 1e-5, None, None, None, 0.1), stats))
    params = (stats[0], stats[1], torch.ones(3 * C, device="cuda"), torch.zeros(3 * C, device="cuda"), 0)
    want = torch.ops.hifuse.batch_norm_act(y[-s:], r[-s:], *params, SIDE, SIDE, False, torch.bfloat16)
    got = torch.ops.hifuse.batch_norm_act_gated(y, *src, *params, torch.bfloat16)
    assert torch.equal(got[-s:], want)


def test_residual_epilogues_past_2_31():
    rows = LIMIT // C + 2
    _need(40)
    y = _randn(rows, C).requires_grad_()
    s = _randn(rows, C, dtype=torch.float32)
    out = gelu_residual(y, s)
    torch.testing.assert_close(out[-1], gelu_residual_ref(y.detach()[-1:].float(), s[-1:])[0], **BF16)
    grad = _last_image_grad(out)
    (dy,) = torch.autograd.grad(out, (y,), grad)
    one = y.detach()[-1:].float().requires_grad_()
    (want,) = torch.autograd.grad(gelu_residual_ref(one, s[-1:]), (one,), grad[-1:])
    torch.testing.assert_close(dy[-1].float(), want[0], **BF16)
    del out, grad, dy
    w, b = _small(C), _small(C)
    stream, normed = gelu_residual_layer_norm(y.detach(), s, w, b, 1e-5, torch.bfloat16)
    ref_stream, ref_normed = gelu_residual_layer_norm_ref(y.detach()[-1:].float(), s[-1:], w, b, 1e-5, torch.float32)
    torch.testing.assert_close(stream[-1], ref_stream[0].detach(), **BF16)
    torch.testing.assert_close(normed[-1].float(), ref_normed[0].detach(), **BF16)


def test_stem_patch_conv_norm_past_2_31():
    # the stems: a 224x224 image's 56x56 x 96 map (bf16 GEMM, float32 out), past 2**31 elements
    n = _images(SIDE * SIDE * C)
    _need(24)
    x = _randn(n, 3, 4 * SIDE, 4 * SIDE, dtype=torch.float32).permute(0, 2, 3, 1)
    weight, cbias, w, b = _small(C, 3, 4, 4), _small(C), _small(C), _small(C)
    out = patch_conv_norm(x, weight, cbias, w, b, 1e-6, torch.bfloat16, torch.float32)
    y = torch.nn.functional.conv2d(x[-1:].permute(0, 3, 1, 2).bfloat16(), weight.bfloat16(), cbias.bfloat16(),
                                   stride=4)
    ref = torch.nn.functional.layer_norm(y.float().permute(0, 2, 3, 1), (C,), w, b, 1e-6)
    torch.testing.assert_close(out[-1], ref[0].detach(), **BF16)
    grad = _last_image_grad(out)
    got = torch.autograd.grad(out, (weight, cbias, w, b), grad)
    want = torch.autograd.grad(ref, (weight, cbias, w, b), grad[-1:])
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


@pytest.mark.skipif(not hifuse_kernels.native_available(), reason="native extension not built")
def test_layer_norms_past_2_31():
    # layer_norm_cat on channels-last parts of one width takes the Triton kernels; layer_norm_cf
    # the native ones (which layer_norm_cat runs on other parts)
    n = _images(SIDE * SIDE * 2 * C)
    _need(30)
    a, b = (_randn(n, C, SIDE, SIDE, channels_last=True) for _ in range(2))
    w, bias = _small(2 * C), _small(2 * C)
    out = layer_norm_cat([a, b], w, bias, 1e-6)
    ref = layer_norm_cat_ref([a[-1:].float(), b[-1:].float()], w, bias, 1e-6)
    torch.testing.assert_close(out[-1].float(), ref[0].detach(), **BF16)
    del out, ref
    x = torch.cat([a, b], 1)
    out = layer_norm_cf(x, w, bias, 1e-6)
    torch.testing.assert_close(out[-1].float(), layer_norm_cf_ref(x[-1:].float(), w, bias, 1e-6)[0].detach(), **BF16)
