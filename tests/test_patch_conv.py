"""Patch-GEMM convolutions and the channels-last stems, downsample layers and patch embedding."""

import pytest
import torch

import hifuse
from helpers import assert_autocast_within_eager_error
from hifuse.model import LocalDownsample, PatchEmbed
from hifuse_kernels.patch_conv import patch_conv, patch_conv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOCAL_ONLY = dict(attention=False, local=True, patches=True, fusion=False, norm=False)


@pytest.mark.parametrize(
    "b, h, w, c, cout, k",
    [(1, 8, 8, 3, 96, 4), (2, 9, 13, 3, 16, 4), (1, 6, 10, 96, 192, 2), (3, 7, 5, 24, 8, 2), (1, 2, 2, 768, 4, 2)],
)
@pytest.mark.parametrize("channels_last_input", [True, False])
def test_matches_conv(b, h, w, c, cout, k, channels_last_input):
    g = torch.Generator().manual_seed(0)
    if channels_last_input:
        x = torch.randn(b, h, w, c, generator=g, dtype=torch.float64)
    else:  # an NCHW image seen as NHWC
        x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64).permute(0, 2, 3, 1)
    weight = torch.randn(cout, c, k, k, generator=g, dtype=torch.float64)
    bias = torch.randn(cout, generator=g, dtype=torch.float64)
    inputs = [t.to(DEVICE).requires_grad_() for t in (x, weight, bias)]
    out = patch_conv(*inputs)
    ref = patch_conv_ref(*inputs)
    assert out.shape == (b, h // k, w // k, cout)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(a, r)


def test_bad_input():
    x = torch.randn(1, 8, 8, 3)
    with pytest.raises(ValueError, match="takes 4 channels"):
        patch_conv(x, torch.randn(5, 4, 2, 2))
    with pytest.raises(ValueError, match="4-D"):
        patch_conv(x[0], torch.randn(5, 3, 2, 2))
    with pytest.raises(ValueError, match="k, k"):
        patch_conv(x, torch.randn(5, 3, 2, 3))
    with pytest.raises(TypeError, match="floating"):
        patch_conv(x.long(), torch.randn(5, 3, 2, 2))
    with pytest.raises(ValueError, match="no full"):
        patch_conv(x[:, :1], torch.randn(5, 3, 2, 2))


def _compare_modules(eager, x, **kw):
    fused = type(eager)(**kw).to(DEVICE).double()
    fused.load_state_dict(eager.state_dict())
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = eager(xe)
    with hifuse.use_fused(**LOCAL_ONLY):
        out = fused(xf)
    ref_t = ref[0] if isinstance(ref, tuple) else ref
    out_t = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out_t, ref_t)
    grad = torch.randn_like(ref_t)
    ref_t.backward(grad)
    out_t.backward(grad)
    torch.testing.assert_close(xf.grad, xe.grad)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, msg=name)
    return out, ref


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("in_dim, out_dim, stride, norm_first, hw", [(3, 96, 4, False, (12, 20)), (96, 192, 2, True, (6, 10)), (192, 384, 2, True, (7, 5)), (384, 768, 2, True, (2, 2))])
def test_local_downsample_matches_eager(in_dim, out_dim, stride, norm_first, hw, channels_last):
    torch.manual_seed(0)
    kw = dict(in_dim=in_dim, out_dim=out_dim, stride=stride, norm_first=norm_first)
    eager = LocalDownsample(**kw).to(DEVICE).double()
    with torch.no_grad():
        eager.norm.weight.add_(0.1 * torch.randn_like(eager.norm.weight))
        eager.norm.bias.add_(0.1 * torch.randn_like(eager.norm.bias))
    x = torch.randn(2, in_dim, *hw, device=DEVICE, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out, _ = _compare_modules(eager, x, **kw)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("hw", [(16, 24), (18, 13)])
def test_patch_embed_matches_eager(hw):
    torch.manual_seed(0)
    eager = PatchEmbed(4, 3, 96).to(DEVICE).double()
    x = torch.randn(1, 3, *hw, device=DEVICE, dtype=torch.float64)
    out, ref = _compare_modules(eager, x, patch_size=4, in_chans=3, embed_dim=96)
    assert out[1:] == ref[1:]


def test_downsample_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 96, 8, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert_autocast_within_eager_error(LocalDownsample(96, 192, 2, norm_first=True).to(DEVICE), [x], **LOCAL_ONLY)


@pytest.mark.parametrize("stem", ["local", "global"])
def test_stems_under_autocast(stem):
    """The image gathered straight into bf16, the LayerNorm reading the GEMM's bf16 output and
    writing float32 (and its backward the GEMM's bf16 gradient): within eager's error."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 20, device=DEVICE).contiguous(memory_format=torch.channels_last)
    module = LocalDownsample(3, 96, 4, norm_first=False) if stem == "local" else PatchEmbed(4, 3, 96)
    assert_autocast_within_eager_error(module.to(DEVICE), [x], **LOCAL_ONLY)


def test_stem_layer_norm_writes_what_autocast_writes():
    torch.manual_seed(0)
    stem = PatchEmbed(4, 3, 96).to(DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = stem(x)[0]
        with hifuse.use_fused(**LOCAL_ONLY):
            out = stem(x)[0]
    assert out.dtype == ref.dtype  # float32 on CUDA, bf16 on the CPU
    torch.testing.assert_close(out, ref)


def test_state_dict_keys_unchanged():
    model = hifuse.create_model("hifuse_tiny", num_classes=3)
    keys = [k for k in model.state_dict() if k.startswith("downsample_layers.")]
    assert keys[:4] == [
        "downsample_layers.0.0.weight",
        "downsample_layers.0.0.bias",
        "downsample_layers.0.1.weight",
        "downsample_layers.0.1.bias",
    ]
    assert model.downsample_layers[1][0] is model.downsample_layers[1].norm


def test_stems_compile_without_graph_breaks():
    layer = LocalDownsample(96, 192, 2, norm_first=True).to(DEVICE)
    x = torch.randn(1, 96, 6, 4, device=DEVICE, requires_grad=True)
    ref = layer(x)
    with hifuse.use_fused(**LOCAL_ONLY):
        out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert layer.conv.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cuda(dtype):
    torch.manual_seed(0)
    layer = LocalDownsample(96, 192, 2, norm_first=True).to(DEVICE)
    x = torch.randn(32, 96, 56, 56, device=DEVICE).to(memory_format=torch.channels_last)
    ref = layer.double()(x.double())
    layer = layer.to(dtype)
    pt = layer(x.to(dtype))
    with hifuse.use_fused(**LOCAL_ONLY):
        out = layer(x.to(dtype))
    err = (out.double() - ref).abs().max().item()
    pt_err = (pt.double() - ref).abs().max().item()
    assert err <= 2 * pt_err + 1e-5, f"{err:.3g} vs eager {pt_err:.3g}"
