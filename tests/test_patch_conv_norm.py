"""hifuse::patch_conv_norm (the stems' k x k / k convolution + LayerNorm, one Triton pass) against eager."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hifuse
from helpers import DEVICE, assert_autocast_within_eager_error, triton_device_or_skip
from hifuse.model import LocalDownsample, PatchEmbed
from hifuse_kernels.patch_conv_norm import patch_conv_norm, patch_conv_norm_ref, unsupported_reason

pytestmark = triton_device_or_skip()
PATCHES = dict(attention=False, local=False, patches=True, fusion=False, norm=False)


def _params(cout, cin, k, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, k, k, generator=g) * 0.3
    b = torch.randn(cout, generator=g) * 0.1 if bias else None
    lw = 1 + 0.1 * torch.randn(cout, generator=g)
    lb = 0.1 * torch.randn(cout, generator=g)
    return [t if t is None else t.to(DEVICE).requires_grad_() for t in (weight, b, lw, lb)]


def _ref(x, weight, bias, lw, lb, eps, gemm):
    """Eager under autocast: the convolution in ``gemm`` (its output rounded to it), the
    LayerNorm in float32."""
    y = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2).to(gemm), weight.to(gemm),
                                   None if bias is None else bias.to(gemm), stride=weight.shape[-1])
    return torch.nn.functional.layer_norm(y.float().permute(0, 2, 3, 1), (y.shape[1],), lw, lb, eps)


# (B, H, W, C_in), C_out, k: the stems (odd sides drop their last rows), batch 1, a channels-last image
@pytest.mark.parametrize("shape, cout, k, channels_last", [
    ((2, 13, 9, 3), 96, 4, False), ((1, 8, 8, 3), 24, 4, True), ((3, 6, 7, 5), 40, 2, False), ((1, 4, 4, 3), 7, 4, True),
])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_eager(shape, cout, k, channels_last, bias):
    b, h, w, c = shape
    g = torch.Generator().manual_seed(1)
    if channels_last:
        x = torch.randn(b, h, w, c, generator=g).to(DEVICE)
    else:  # an NCHW image seen as NHWC
        x = torch.randn(b, c, h, w, generator=g).to(DEVICE).permute(0, 2, 3, 1)
    weight, bb, lw, lb = params = _params(cout, c, k, bias)
    assert unsupported_reason(x, weight, bb, lw, lb, torch.bfloat16) is None
    out = patch_conv_norm(x, weight, bb, lw, lb, 1e-6, torch.bfloat16, torch.float32)
    ref = _ref(x, weight, bb, lw, lb, 1e-6, torch.bfloat16)
    assert out.shape == (b, h // k, w // k, cout) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    grad = torch.randn(ref.shape, generator=g).to(DEVICE)
    leaves = [t for t in params if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for i, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2 * r.abs().max().item(), msg=f"gradient {i}")
    again = torch.autograd.grad(patch_conv_norm(x, weight, bb, lw, lb, 1e-6, torch.bfloat16, torch.float32), leaves,
                                grad)
    assert all(torch.equal(a, r) for a, r in zip(got, again))  # fixed-order partial sums


def test_float32_reference_formula():
    # the kernels' formula against the float32 reference, within bf16's rounding of the GEMM
    x = torch.randn(2, 8, 12, 3).to(DEVICE)
    weight, bb, lw, lb = _params(32, 3, 4)
    out = patch_conv_norm(x, weight, bb, lw, lb, 1e-6, torch.bfloat16)
    torch.testing.assert_close(out, patch_conv_norm_ref(x, weight, bb, lw, lb, 1e-6), rtol=5e-2, atol=5e-2)


def test_fp16_gemm_rounds_as_eager():
    # the GEMM in fp16 (autocast's other dtype), its output rounded to fp16 before a float32 LayerNorm
    x = torch.randn(2, 8, 12, 3).to(DEVICE)
    weight, bb, lw, lb = _params(32, 3, 4)
    out = patch_conv_norm(x, weight, bb, lw, lb, 1e-6, torch.float16, torch.float32)
    ref = _ref(x, weight, bb, lw, lb, 1e-6, torch.float16)
    torch.testing.assert_close(out, ref, rtol=5e-3, atol=5e-3)
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (weight, bb, lw, lb), grad),
                    torch.autograd.grad(ref, (weight, bb, lw, lb), grad)):
        torch.testing.assert_close(a, r, rtol=5e-3, atol=5e-3 * r.abs().max().item())


def test_unsupported():
    x = torch.randn(1, 8, 8, 3, device=DEVICE)
    weight, bb, lw, lb = _params(24, 3, 4)
    bf16 = torch.bfloat16
    assert "gradient" in unsupported_reason(x.requires_grad_(), weight, bb, lw, lb, bf16)
    assert "outside" in unsupported_reason(x.detach(), torch.randn(300, 3, 4, 4, device=DEVICE), None, lw, lb, bf16)
    assert "no full" in unsupported_reason(x.detach()[:, :3], weight, bb, lw, lb, bf16)
    assert "dtype" in unsupported_reason(x.detach().double(), weight, bb, lw, lb, bf16)
    assert "float16 or bfloat16" in unsupported_reason(x.detach(), weight, bb, lw, lb, torch.float32)


@pytest.mark.parametrize("stem", ["local", "global"])
def test_stems_take_it_under_autocast(stem):
    """The fused stems run it on an image that takes no gradient: within eager's error under
    autocast, and the kernel is what runs."""
    torch.manual_seed(0)
    module = (LocalDownsample(3, 96, 4, norm_first=False) if stem == "local" else PatchEmbed(4, 3, 96)).to(DEVICE)
    x = torch.randn(2, 3, 12, 20, device=DEVICE).contiguous(memory_format=torch.channels_last)
    calls = []
    with torch.autocast(DEVICE, dtype=torch.bfloat16), hifuse.use_fused(**PATCHES), _Count(calls):
        out = module(x)
    assert calls, "the stem did not run hifuse::patch_conv_norm"
    out = out[0] if isinstance(out, tuple) else out
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ref = module(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=3e-2, atol=3e-2)
    assert_autocast_within_eager_error(module, [x], **PATCHES)


class _Count(TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.name().startswith("hifuse::patch_conv_norm"):
            self.calls.append(func.name())
        return func(*args, **(kwargs or {}))
