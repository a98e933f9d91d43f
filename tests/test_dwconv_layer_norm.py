"""Fused depthwise 3x3 conv + LayerNorm and the fused local block, against eager."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hifuse
from helpers import assert_autocast_within_eager_error, assert_model_matches_eager, recorded_launches
from hifuse.model import LocalBlock
from hifuse_kernels import _triton
from hifuse_kernels.dwconv_layer_norm import dwconv_layer_norm, dwconv_layer_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
NAMES = ("x", "conv_weight", "conv_bias", "ln_weight", "ln_bias")


def _inputs(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    ts = [
        torch.randn(shape, generator=g),
        0.3 * torch.randn(c, 1, 3, 3, generator=g),
        0.1 * torch.randn(c, generator=g),
        1 + 0.1 * torch.randn(c, generator=g),
        0.1 * torch.randn(c, generator=g),
    ]
    return [t.to(DEVICE, dtype if i == 0 else torch.float32).requires_grad_() for i, t in enumerate(ts)]


# (N, H, W, C): batch 1, odd and prime sides, 1x1, every stage width
@pytest.mark.parametrize("shape", [(1, 5, 7, 96), (2, 9, 13, 192), (1, 1, 1, 96), (1, 3, 3, 768), (1, 7, 2, 384), (3, 11, 3, 100)])
def test_matches_reference(tiles, shape):
    inputs = _inputs(shape)
    out = dwconv_layer_norm(*inputs)
    ref = dwconv_layer_norm_ref(*inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    for name, a, r in zip(NAMES, torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=5e-5, msg=name)


def test_out_dtype_is_the_cast_result():
    inputs = _inputs((2, 5, 7, 96))
    out = dwconv_layer_norm(*inputs, out_dtype=torch.bfloat16)
    ref = dwconv_layer_norm_ref(*inputs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    grad = torch.randn(ref.shape, device=DEVICE)
    got = torch.autograd.grad(out, inputs, grad.to(torch.bfloat16))
    want = torch.autograd.grad(ref, inputs, grad.to(torch.bfloat16).float())
    # the conv output's gradient is kept in the incoming gradient's dtype (bf16, as eager's under
    # autocast): held to the error of rounding it so
    rounded = _ref_rounding_conv_grad(inputs, torch.bfloat16)
    eager = torch.autograd.grad(rounded, inputs, grad.to(torch.bfloat16).float())
    for k, (a, e, r) in enumerate(zip(got, eager, want)):
        err = (e - r).abs().max().item()
        assert (a - r).abs().max().item() <= 2 * err + 1e-5, NAMES[k]
    with pytest.raises(TypeError, match="out_dtype"):
        dwconv_layer_norm(*inputs, out_dtype=torch.float64)


def _ref_rounding_conv_grad(inputs, dtype):
    """The reference with the conv output's gradient rounded to ``dtype``."""
    x, cw, cb, lw, lb = inputs
    c = x.shape[-1]
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), cw, cb, padding=1, groups=c).permute(0, 2, 3, 1)
    y.register_hook(lambda g: g.to(dtype).to(g.dtype))
    return torch.nn.functional.layer_norm(y, (c,), lw, lb, 1e-6)


def test_ones_column(tiles):
    """``ones``: the same rows, then a ones column and zeros to ONES_PAD; the statistics and
    the gradients through the padded output unchanged."""
    from hifuse_kernels.dwconv_layer_norm import ONES_PAD

    inputs = _inputs((2, 5, 7, 96))
    x, cw, cb, lw, lb = inputs
    plain = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, torch.bfloat16)
    padded = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, torch.bfloat16, True)
    assert padded[0].shape == (2, 5, 7, 96 + ONES_PAD)
    assert torch.equal(padded[0][..., :96], plain[0])
    tail = torch.zeros(2, 5, 7, ONES_PAD, dtype=torch.bfloat16, device=x.device)
    tail[..., 0] = 1
    assert torch.equal(padded[0][..., 96:], tail)
    assert torch.equal(padded[1], plain[1]) and torch.equal(padded[2], plain[2])
    grad = torch.randn(padded[0].shape, device=x.device).to(torch.bfloat16)
    got = torch.autograd.grad(padded[0], inputs, grad)
    ref = torch.autograd.grad(plain[0], inputs, grad[..., :96])
    for a, r in zip(got, ref):
        assert torch.equal(a, r)


def test_backward_adds_the_other_gradient_of_x():
    """``grad_x`` (what x receives from another use, e.g. a residual) is summed into dx by the
    backward kernel, as adding it after does (to rounding)."""
    x, cw, cb, lw, lb = [t.detach() for t in _inputs((2, 9, 13, 192))]
    out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, x.dtype)
    grad, other = torch.randn_like(out), torch.randn_like(x)
    plain = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd)
    summed = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd, other)
    torch.testing.assert_close(summed[0], plain[0] + other, rtol=1e-6, atol=1e-6)
    for a, b in zip(summed[1:], plain[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ones", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 96), (1, 3, 11, 100)])
def test_backward_rebuilds_the_output(tiles, shape, ones):
    """``rebuild_dtype``: the backward's gradient pass also writes the forward's output (with the
    ones column), the same bits; the gradients unchanged."""
    x, cw, cb, lw, lb = [t.detach() for t in _inputs(shape)]
    out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, torch.bfloat16, ones)
    grad = torch.randn(x.shape, device=x.device).to(torch.bfloat16)
    plain = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd)
    both = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd, None, lb, torch.bfloat16,
                                                       ones)
    assert plain[2].numel() == 0 and torch.equal(both[2], out)
    assert torch.equal(both[0], plain[0]) and torch.equal(both[1], plain[1])
    with pytest.raises(ValueError, match="takes the LayerNorm's bias"):
        torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd, None, None, torch.bfloat16)


@pytest.mark.parametrize("shape", [(2, 9, 13, 96), (1, 5, 3, 768)])
def test_backward_in_bands_of_rows(shape):
    """The backward's units take bands of rows, computing the conv output's gradient again
    for the rows just above and below: every band gives the input gradient's bits of whole
    images, and the parameters' gradients of the reference."""
    from hifuse_kernels import _configs

    x, cw, cb, lw, lb = [t.detach() for t in _inputs(shape)]
    out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, x.dtype)
    grad, other = torch.randn_like(out), torch.randn_like(x)
    ref_in = [t.clone().requires_grad_() for t in (x, cw, cb, lw, lb)]
    ref = torch.autograd.grad(dwconv_layer_norm_ref(*ref_in), ref_in, grad)
    c, h = shape[-1], shape[1]
    results = {}
    for band in (1, 2, 3, h):
        with _triton.device_tiles(), _configs.forced({"dwconv_layer_norm.backward": {"band": band}}):
            dx, params, _ = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd, other)
        results[band] = dx
        got = (params[: 9 * c].view(c, 1, 3, 3), params[9 * c: 10 * c], params[10 * c: 11 * c], params[11 * c:])
        torch.testing.assert_close(dx, ref[0] + other, rtol=1e-4, atol=5e-5)
        for name, a, r in zip(NAMES[1:], got, ref[1:]):
            torch.testing.assert_close(a, r, rtol=1e-4, atol=5e-5, msg=f"band {band}: {name}")
    for band, dx in results.items():
        assert torch.equal(dx, results[h]), band


@pytest.mark.skipif(not _triton.interpreting(), reason="the interpreter's launches")
def test_interpreter_takes_the_images_side_by_side(monkeypatch):
    """Under the interpreter the backward runs every image in one program, side by side, where
    the slots' offsets fit in 32 bits, else a program an image: the same input gradient."""
    from hifuse_kernels import dwconv_layer_norm as dln

    x, cw, cb, lw, lb = [t.detach() for t in _inputs((3, 5, 6, 96))]
    out, mean, rstd = torch.ops.hifuse.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6, x.dtype)
    grad = torch.randn_like(out)
    ref_in = [t.clone().requires_grad_() for t in (x, cw, cb, lw, lb)]
    ref = torch.autograd.grad(dwconv_layer_norm_ref(*ref_in), ref_in, grad)
    results, grids = [], []
    for limit in (dln.SIDE_BY_SIDE_LIMIT, 1):
        monkeypatch.setattr(dln, "SIDE_BY_SIDE_LIMIT", limit)
        with recorded_launches() as launches:
            dx, params, _ = torch.ops.hifuse.dwconv_layer_norm_backward(grad, x, cw, cb, lw, mean, rstd)
        grids += [kw["grid"] for kw in launches["dwconv_layer_norm._bwd_kernel"]]
        results.append(dx)
        torch.testing.assert_close(dx, ref[0], rtol=1e-4, atol=5e-5)
        torch.testing.assert_close(params[: 9 * 96].view(96, 1, 3, 3), ref[1], rtol=1e-4, atol=5e-5)
    assert [g[0] for g in grids] == [1, 3]
    assert torch.equal(results[0], results[1])


def test_band_rows():
    """Whole images where they fill the programs, thinner bands for fewer images."""
    from hifuse_kernels.dwconv_layer_norm import band_rows

    assert band_rows(128, 56, 132) == 56 and band_rows(128, 7, 132) == 7
    assert band_rows(32, 56, 132) == 14
    assert band_rows(1, 56, 132) == 1 and band_rows(1, 1, 1) == 1


def test_backward_deterministic_and_expanded_gradient():
    inputs = _inputs((2, 9, 13, 192))
    first = torch.autograd.grad(dwconv_layer_norm(*inputs).sum(), inputs)
    second = torch.autograd.grad(dwconv_layer_norm(*inputs).sum(), inputs)
    ref = torch.autograd.grad(dwconv_layer_norm_ref(*inputs).sum(), inputs)
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=5e-5)


def test_bad_input():
    x, cw, cb, lw, lb = _inputs((1, 3, 3, 96))
    with pytest.raises(ValueError, match="channels-last"):
        dwconv_layer_norm(x[0], cw, cb, lw, lb)
    with pytest.raises(ValueError, match="conv_weight"):
        dwconv_layer_norm(x, cw[:, :, :2], cb, lw, lb)
    with pytest.raises(ValueError, match="more than"):
        big = _inputs((1, 1, 1, 1100))
        dwconv_layer_norm(*big)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        dwconv_layer_norm(x.double(), cw, cb, lw, lb)
    wide = x[:, :1, :1].expand(1, 1, 2**28 // 96 + 1, 96)  # no memory: refused before any launch
    with pytest.raises(ValueError, match="W \\* C"):
        dwconv_layer_norm(wide, cw, cb, lw, lb)


@pytest.mark.parametrize("channels_last", [False, True])
def test_local_block_matches_eager(channels_last):
    torch.manual_seed(0)
    eager = LocalBlock(96).to(DEVICE)
    with torch.no_grad():
        eager.norm.weight.add_(0.1 * torch.randn(96, device=DEVICE))
        eager.norm.bias.add_(0.1 * torch.randn(96, device=DEVICE))
    fused = LocalBlock(96).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, 96, 9, 7, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = eager(xe)
    with hifuse.use_fused(attention=False, local=True, patches=True, fusion=False, norm=False):
        out = fused(xf)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-4, atol=5e-5)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_local_block_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 96, 7, 5, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert_autocast_within_eager_error(LocalBlock(96).to(DEVICE), [x], attention=False, local=True, patches=True, fusion=False, norm=False)


def test_whole_model_with_local_fused():
    assert_model_matches_eager(DEVICE, attention=False, local=True, patches=True, fusion=False, norm=False)


def test_fused_block_compiles_without_graph_breaks():
    block = LocalBlock(96).to(DEVICE)
    x = torch.randn(1, 96, 5, 6, device=DEVICE, requires_grad=True)
    ref = block(x)
    with hifuse.use_fused(attention=False, local=True, patches=True, fusion=False, norm=False):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert block.dwconv.weight.grad is not None


def test_fused_block_trains_under_inductor():
    """Inductor checks that each op's fake kernel gives the real kernel's strides (the
    depthwise weight gradient once came back with other strides than its fake said)."""
    torch.manual_seed(0)
    block = LocalBlock(16).to(DEVICE)
    x = torch.randn(2, 16, 5, 6, device=DEVICE)
    with hifuse.use_fused(attention=False, local=True, patches=False, fusion=False, norm=False):
        ref = block(x)
        ref.sum().backward()
        want = [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
        out = torch.compile(block, fullgraph=True)(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for p, g in zip(block.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_flops_match_eager():
    model = hifuse.create_model("hifuse_tiny", num_classes=3).to(DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes only: nothing to compute
        eager = hifuse.count_flops(model, (3, 64, 64), backward=True)
        with hifuse.use_fused(attention=False, local=True, patches=True, fusion=False, norm=False):
            fused = hifuse.count_flops(model, (3, 64, 64), backward=True)
    # backward's norm pass rebuilds each block's normalised map (the pwconv's input, not kept)
    # from the convolution it recomputes anyway, with ONES_PAD more columns (a ones column), over
    # which the pwconv's weight-gradient GEMM also gives its bias gradient
    from hifuse_kernels.dwconv_layer_norm import ONES_PAD

    side = [64 // 4 // 2**i for i in range(4)]
    rebuilt = sum(d * 2 * ONES_PAD * s * s * c for d, s, c in zip(model.depths, side, model.dims))
    assert fused == eager + rebuilt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(128, 56, 56, 96), (128, 28, 28, 192), (128, 14, 14, 384), (128, 7, 7, 768)])
def test_low_precision_cuda(dtype, shape):
    inputs = _inputs(shape)
    grad = torch.randn(shape, device=DEVICE)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = dwconv_layer_norm_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad.double())
    low = [inputs[0].detach().to(dtype).requires_grad_()] + [t.detach().to(dtype).requires_grad_() for t in inputs[1:]]
    pt = dwconv_layer_norm_ref(*low)
    pt_grads = torch.autograd.grad(pt, low, grad.to(dtype))
    out = dwconv_layer_norm(*low)
    grads = torch.autograd.grad(out, low, grad.to(dtype))
    for name, a, p, r in zip(("out",) + NAMES, (out, *grads), (pt, *pt_grads), (ref, *ref_grads)):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: {err:.3g} vs eager {pt_err:.3g}"
