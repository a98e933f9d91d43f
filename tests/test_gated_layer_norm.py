"""gated_layer_norm (norm3 with the gates applied on load) against eager, and the gating ops together."""

import pytest
import torch
from helpers import (
    DEVICE,
    FEATURE_SHAPES,
    check_grads,
    gated_inputs,
    triton_device_or_skip,
)

from hifuse_kernels import _triton
from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref
from hifuse_kernels.gated_layer_norm import gated_layer_norm, gated_layer_norm_ref
from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref

pytestmark = triton_device_or_skip()
SHAPES = FEATURE_SHAPES


def gated_inputs_(shape, seed=0):
    return gated_inputs(shape, seed, device=DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
def test_gated_layer_norm(tiles, shape):
    inputs = gated_inputs_(shape)
    out = gated_layer_norm(*inputs)
    assert out.is_contiguous(memory_format=torch.channels_last)
    check_grads(out, gated_layer_norm_ref(*inputs), inputs)


def test_gated_layer_norm_expanded_gradient_and_determinism():
    inputs = gated_inputs_((2, 96, 5, 7))
    gated_layer_norm(*inputs).sum().backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    gated_layer_norm_ref(*inputs).sum().backward()
    for k, (a, t) in enumerate(zip(got, inputs)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4, msg=f"gradient {k}")
    grad = torch.randn(2, 288, 5, 7, device=DEVICE)
    first = torch.autograd.grad(gated_layer_norm(*inputs), inputs, grad)
    second = torch.autograd.grad(gated_layer_norm(*inputs), inputs, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_gated_layer_norm_ops_out_dtype_and_second_gradient():
    """The op writes a requested dtype (the rounded result, for a GEMM), or the result and its
    rounded copy, and its backward sums a
    second gradient of the output (another use of it, in another dtype) on load."""
    from hifuse_kernels.gated_layer_norm import op_args

    g, cg, l, sg, x, w, b = [t.detach() for t in gated_inputs_((2, 96, 5, 7))]
    args = op_args(g, cg, l, sg, x, w, b, 1e-6)
    out, mean, rstd, none = torch.ops.hifuse.gated_layer_norm(*args)
    assert none.numel() == 0
    low = torch.ops.hifuse.gated_layer_norm(*args, torch.bfloat16)[0]
    assert low.dtype == torch.bfloat16 and torch.equal(low, out.to(torch.bfloat16))
    again, _, _, twin = torch.ops.hifuse.gated_layer_norm(*args, None, torch.bfloat16)
    assert torch.equal(again, out) and twin.dtype == torch.bfloat16 and torch.equal(twin, low)
    grad, other = torch.randn_like(out), torch.randn_like(out).to(torch.bfloat16)
    rest = (*args[:6], mean, rstd)
    summed = torch.ops.hifuse.gated_layer_norm_backward(grad, *rest, other)
    added = torch.ops.hifuse.gated_layer_norm_backward(grad + other.float(), *rest)
    for a, b in zip(summed, added):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gated_layer_norm_rounded_copy_carries_its_gradient():
    """A graph that uses the op's rounded copy ``low`` gets its gradient into the inputs'."""
    from hifuse_kernels.gated_layer_norm import op_args

    inputs = gated_inputs_((2, 96, 5, 7))
    args = op_args(*inputs, 1e-6)
    out, _mean, _rstd, low = torch.ops.hifuse.gated_layer_norm(*args, None, torch.float32)
    ref = torch.ops.hifuse.gated_layer_norm(*args)[0]
    grad, grad_low = torch.randn_like(out), torch.randn_like(out)
    got = torch.autograd.grad((out, low), inputs, (grad, grad_low))
    want = torch.autograd.grad(ref, inputs, grad + grad_low)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    low = torch.ops.hifuse.gated_layer_norm(*op_args(*inputs, 1e-6), None, torch.float32)[3]
    ref = torch.ops.hifuse.gated_layer_norm(*op_args(*inputs, 1e-6))[0]
    only_low = torch.autograd.grad(low, inputs, grad_low)
    want_low = torch.autograd.grad(ref, inputs, grad_low)
    for a, b in zip(only_low, want_low):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gated_layer_norm_mixed_dtypes_promote_like_eager():
    inputs = gated_inputs_((1, 16, 3, 3))
    inputs[4] = inputs[4].detach().to(torch.bfloat16).requires_grad_()  # X in bf16, as under autocast
    out = gated_layer_norm(*inputs)
    ref = gated_layer_norm_ref(*inputs)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got, want = torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)
    for k, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == r.dtype
        tol = dict(rtol=2e-2, atol=2e-2) if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, r, **tol, msg=f"gradient {k}")


def test_bad_input():
    g, cg, l, sg, x, w, b = gated_inputs_((1, 16, 3, 3))
    with pytest.raises(ValueError, match="one shape"):
        gated_layer_norm(g, cg, l[:, :, :2], sg, x, w, b)
    with pytest.raises(ValueError, match="channel_gate must be"):
        gated_layer_norm(g, cg[:, :8], l, sg, x, w, b)
    with pytest.raises(ValueError, match="spatial_gate must be"):
        gated_layer_norm(g, cg, l, sg[:, :, :2], x, w, b)
    with pytest.raises(ValueError, match=r"\(48,\)"):
        gated_layer_norm(g, cg, l, sg, x, w[:10], b)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        gated_layer_norm(g.double(), cg, l, sg, x, w, b)
    with pytest.raises(ValueError, match="more than the 1024"):
        channel_pool(torch.zeros(1, 1100, 1, 1, device=DEVICE))
    with pytest.raises(ValueError, match="4-D"):
        spatial_pool(g[0])


def test_launch_grid_refuses_what_cuda_refuses():
    assert _triton.grid(2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match="limit of 65535 programs on axis y"):
        _triton.grid(1, 65536)
    with pytest.raises(ValueError, match="axis x"):
        _triton.grid(2**31)


def test_gating_ops_launch_image_size_on_one_axis(device_tiles, monkeypatch):
    # CUDA caps grid axes y and z at 65535 programs; position blocks on axis y failed on
    # inputs past about 2900x2900 pixels. With y and z capped at the pooling's 8 chunks, the
    # 27 position blocks of each image here must still launch.
    monkeypatch.setattr(_triton, "GRID_LIMITS", (2**31 - 1, 8, 8))
    inputs = gated_inputs_((2, 16, 20, 21))
    grad = torch.randn(2, 48, 20, 21, device=DEVICE)
    check = dict(rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(gated_layer_norm(*inputs), inputs, grad)
    want = torch.autograd.grad(gated_layer_norm_ref(*inputs), inputs, grad)
    for k, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, **check, msg=f"gated_layer_norm gradient {k}")
    g, l = inputs[0], inputs[2]
    for op, ref, x in ((channel_pool, channel_pool_ref, g), (spatial_pool, spatial_pool_ref, l)):
        outs, refs = op(x), ref(x)
        outs, refs = (outs, refs) if isinstance(outs, tuple) else ((outs,), (refs,))
        grads = [torch.randn_like(r) for r in refs]
        torch.testing.assert_close(outs, refs, **check)
        torch.testing.assert_close(torch.autograd.grad(outs, x, grads), torch.autograd.grad(refs, x, grads), **check)


def test_ops_compile_without_graph_breaks():
    inputs = gated_inputs_((1, 16, 3, 5))

    def gate(g, cg, l, sg, x, w, b):
        avg, best = channel_pool(g)
        return gated_layer_norm(g, cg * avg.sigmoid(), l, sg * spatial_pool(l)[:, :1], x, w, b)

    ref = gate(*inputs)
    out = torch.compile(gate, fullgraph=True, backend="aot_eager")(*inputs)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert inputs[0].grad is not None


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 96, 56, 56), (128, 768, 7, 7)])
def test_low_precision_cuda(dtype, shape):
    inputs = gated_inputs_(shape)
    grad = torch.randn(shape[0], 3 * shape[1], *shape[2:], device=DEVICE)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = gated_layer_norm_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    low = [t.detach().to(dtype).requires_grad_() for t in inputs]
    pt = gated_layer_norm_ref(*low)
    pt_grads = torch.autograd.grad(pt, low, grad.to(dtype))
    out = gated_layer_norm(*low)
    grads = torch.autograd.grad(out, low, grad.to(dtype))
    for k, (a, p, r) in enumerate(zip((out, *grads), (pt, *pt_grads), (ref, *ref_grads))):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, r.abs().max().item()), f"output {k}: {err:.3g} vs eager {pt_err:.3g}"


@pytest.mark.parametrize("n, s, c, act, dtype", [
    (2, 15, 24, 2, torch.float32), (1, 7, 40, 1, torch.float32), (2, 9, 100, 0, torch.bfloat16),
    (1, 13, 96, 2, torch.bfloat16),
])
def test_batch_norm_of_x_applied_on_load(n, s, c, act, dtype):
    """``hifuse::gated_layer_norm_bn``: x given as a training BatchNorm's input y, applied on
    load, gives the bits of x applied first (``hifuse::batch_norm_act``) in every output, and
    its backward every gradient, x's being the BatchNorm output's."""
    from hifuse_kernels import gated_layer_norm as gln
    from torch.library import opcheck

    g = torch.Generator().manual_seed(0)

    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return t.to(DEVICE)

    gt, lt = rand(n, s, c).to(dtype), rand(n, s, c).to(dtype)
    cg, sg = rand(n, c, positive=True).to(dtype), rand(n, s, positive=True).to(dtype)
    y = rand(n * s, c).to(dtype)
    bn = [rand(c), rand(c, positive=True), rand(c), rand(c)]
    w, b = rand(3 * c), rand(3 * c)
    x = torch.ops.hifuse.batch_norm_act(y, None, *bn, act, s, 1, False, None).view(n, s, c)
    ref = torch.ops.hifuse.gated_layer_norm(gt, cg, lt, sg, x, w, b, 1e-6, None, torch.bfloat16)
    got = torch.ops.hifuse.gated_layer_norm_bn(gt, cg, lt, sg, y.view(n, s, c), *bn, act, w, b, 1e-6, None,
                                               torch.bfloat16)
    assert all(torch.equal(a, r) for a, r in zip(got, ref))
    grad, grad2 = rand(*ref[0].shape).to(ref[0].dtype), rand(*ref[0].shape).to(dtype)
    want = gln.backward(grad, gt, cg, lt, sg, x, w, ref[1], ref[2], grad2)
    have = gln.backward_bn(grad, gt, cg, lt, sg, y.view(n, s, c), bn, act, w, ref[1], ref[2], grad2)
    assert all(torch.equal(a, r) for a, r in zip(have, want))
    # with the BatchNorm backward's sums: the rest as is; the sums those hifuse::batch_norm_act_backward
    # reduces (float32 tiles, then float64, where it adds float64 tiles: equal to rounding), and its
    # apply pass given them writes the same dy
    *have, sums = gln.backward_bn(grad, gt, cg, lt, sg, y.view(n, s, c), bn, act, w, ref[1], ref[2], grad2, sums=True)
    assert all(torch.equal(a, r) for a, r in zip(have, want))
    dx = have[4].view(-1, c)
    dy, _, dbw, dbb, _ = torch.ops.hifuse.batch_norm_act_backward(dx, y, None, *bn, act, s, 1, False)
    assert sums.shape == (2, c) and sums.dtype == torch.float32
    torch.testing.assert_close(sums[0], dbb.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums[1], dbw.float(), rtol=1e-5, atol=1e-5)
    dy_given = torch.ops.hifuse.batch_norm_act_backward_summed(dx, y, *bn, dbb.float(), dbw.float(), act, s, 1, False)
    assert torch.equal(dy_given, dy)
    if dtype == torch.float32 and act == 2:
        opcheck(torch.ops.hifuse.gated_layer_norm_bn_backward.default,
                (grad, gt, cg, lt, sg, y.view(n, s, c), *bn, act, w, ref[1], ref[2], grad2, True))
        args = (gt, cg, lt, sg, y.view(n, s, c), *bn, act, w, b, 1e-6, None, None)
        opcheck(torch.ops.hifuse.gated_layer_norm_bn.default, args)
        opcheck(torch.ops.hifuse.gated_layer_norm_bn_backward.default,
                (grad, gt, cg, lt, sg, y.view(n, s, c), *bn, act, w, ref[1], ref[2], grad2))
        with pytest.raises(ValueError, match="x_act"):
            torch.ops.hifuse.gated_layer_norm_bn(*args[:9], 3, *args[10:])
        with pytest.raises(ValueError, match="x_mean"):
            torch.ops.hifuse.gated_layer_norm_bn(*args[:5], bn[0][:3], *args[6:])
        with pytest.raises(ValueError, match="g's shape"):
            torch.ops.hifuse.gated_layer_norm_bn(*args[:4], y.view(n, s, c).transpose(0, 1), *args[5:])
