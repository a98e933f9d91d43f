"""hifuse::patch_merge_norm against the eager patch merging gather + LayerNorm."""

import pytest
import torch
from torch.library import opcheck

import hifuse
import hifuse_kernels
from hifuse.model import PatchMerging
from hifuse_kernels.patch_merge_norm import patch_merge_norm, patch_merge_norm_ref
from helpers import DEVICES, other_device

pytestmark = pytest.mark.skipif(not hifuse_kernels.native_available(), reason="native extension not built")
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}
# (B, H, W, C): odd sides (padding), batch 1, 1x1, the model's widths
SHAPES = [(2, 56, 56, 96), (1, 7, 7, 384), (2, 9, 5, 192), (1, 1, 1, 96), (3, 4, 3, 16), (1, 13, 2, 8)]


def _inputs(b, h, w, c, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, h * w, c, generator=g, dtype=dtype).to(device).requires_grad_()
    weight = (1 + 0.1 * torch.randn(4 * c, generator=g, dtype=dtype)).to(device).requires_grad_()
    bias = (0.1 * torch.randn(4 * c, generator=g, dtype=dtype)).to(device).requires_grad_()
    return x, weight, bias


def _grads(fn, x, h, w, weight, bias, grad):
    out = fn(x, h, w, weight, bias)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


@pytest.mark.parametrize("b, h, w, c", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(b, h, w, c, dtype):
    x, weight, bias = _inputs(b, h, w, c, dtype)
    grad = torch.randn(b, ((h + 1) // 2) * ((w + 1) // 2), 4 * c, dtype=dtype)
    got = _grads(patch_merge_norm, x, h, w, weight, bias, grad)
    pt = _grads(patch_merge_norm_ref, x, h, w, weight, bias, grad)
    if dtype == torch.float64:
        for name, a, r in zip(("out", "dx", "dweight", "dbias"), got, pt):
            torch.testing.assert_close(a, r, **TOL[dtype], msg=name)
        return
    # fp32: at most twice eager's own error against a float64 run (the op sums in float64)
    ref = _grads(patch_merge_norm_ref, *[t.detach().double().requires_grad_() if i in (0, 3, 4) else t
                                         for i, t in enumerate((x, h, w, weight, bias))], grad.double())
    for name, a, p, r in zip(("out", "dx", "dweight", "dbias"), got, pt, ref):
        err, pt_err = (a.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-6, f"{name}: {err:.3g} vs eager {pt_err:.3g}"


def test_expanded_gradient_and_determinism():
    x, weight, bias = _inputs(2, 9, 5, 32, torch.float64)
    first = torch.autograd.grad(patch_merge_norm(x, 9, 5, weight, bias).sum(), (x, weight, bias))
    second = torch.autograd.grad(patch_merge_norm(x, 9, 5, weight, bias).sum(), (x, weight, bias))
    ref = torch.autograd.grad(patch_merge_norm_ref(x, 9, 5, weight, bias).sum(), (x, weight, bias))
    for a, b, r in zip(first, second, ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, **TOL[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_adds_the_next_readers_gradient(device, dtype):
    # x handed on (its storage): the backward kernel adds x's gradient from the next reader,
    # in float32, rounding once to x's dtype; odd sides, so padding slots take no gradient
    x, weight, bias = _inputs(2, 9, 5, 16, torch.float32, device)
    x = x.detach().to(dtype).requires_grad_()
    out, after = patch_merge_norm(x, 9, 5, weight, bias, chain=True)
    assert after.data_ptr() == x.data_ptr() and after.shape == x.shape
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(t.shape, generator=g).to(device) for t in (out, x)]
    got = torch.autograd.grad((out.float() * grads[0]).sum() + (after.float() * grads[1]).sum(), (x, weight, bias))
    x64 = x.detach().double().requires_grad_()
    ref = patch_merge_norm_ref(x64, 9, 5, weight.double(), bias.double())
    want = torch.autograd.grad((ref * grads[0].double()).sum() + (x64 * grads[1].double()).sum(), (x64, weight, bias))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for a, r in zip(got, want):
        torch.testing.assert_close(a.double(), r.double(), **tol)
    # the next reader alone, or the merge alone, takes a gradient
    _out, after = patch_merge_norm(x, 9, 5, weight, bias, chain=True)
    alone = torch.autograd.grad((after.float() * grads[1]).sum(), x)[0]
    torch.testing.assert_close(alone.float(), grads[1].to(dtype).float())
    out, _after = patch_merge_norm(x, 9, 5, weight, bias, chain=True)
    merge_only = torch.autograd.grad((out.float() * grads[0]).sum(), x)[0]
    out = patch_merge_norm(x, 9, 5, weight, bias)
    torch.testing.assert_close(merge_only, torch.autograd.grad((out.float() * grads[0]).sum(), x)[0], rtol=0, atol=0)


def test_out_dtype_is_the_cast_result():
    torch.manual_seed(0)
    x = torch.randn(2, 35, 24, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(96)).requires_grad_()
    bias = (0.1 * torch.randn(96)).requires_grad_()
    out = patch_merge_norm(x, 5, 7, weight, bias, out_dtype=torch.bfloat16)
    ref = patch_merge_norm_ref(x, 5, 7, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    grad = torch.randn(ref.shape).to(torch.bfloat16)
    got = torch.autograd.grad(out, (x, weight, bias), grad)
    want = torch.autograd.grad(ref, (x, weight, bias), grad.float())
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="out_dtype"):
        patch_merge_norm(x.double(), 5, 7, weight.double(), bias.double(), out_dtype=torch.bfloat16)
    opcheck(torch.ops.hifuse.patch_merge_norm.default, (x.detach(), 5, 7, weight.detach(), bias.detach(), 1e-5, torch.bfloat16))


def test_opcheck():
    x, weight, bias = _inputs(2, 5, 3, 8, torch.float32)
    opcheck(torch.ops.hifuse.patch_merge_norm.default, (x, 5, 3, weight, bias, 1e-5))
    x, weight = x.detach(), weight.detach()
    _out, mean, rstd = torch.ops.hifuse.patch_merge_norm(x, 5, 3, weight, bias.detach(), 1e-5)
    for after in (None, torch.randn(x.shape)):
        opcheck(torch.ops.hifuse.patch_merge_norm_backward.default,
                (torch.randn(2, 6, 32), x, 5, 3, weight, mean, rstd, after),
                test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    x, weight, bias = _inputs(1, 4, 4, 8, torch.float32, device)
    with pytest.raises(ValueError, match="one device"):
        patch_merge_norm(x, 4, 4, weight.detach().to(other_device(device)), bias)
    with pytest.raises(ValueError, match="not H\\*W"):
        patch_merge_norm(x, 4, 5, weight, bias)
    with pytest.raises(ValueError, match="\\(32,\\)"):
        patch_merge_norm(x, 4, 4, weight[:8], bias)
    with pytest.raises(ValueError, match="\\(B, H\\*W, C\\)"):
        patch_merge_norm(x[0], 4, 4, weight, bias)
    with pytest.raises(TypeError, match="unsupported dtypes"):
        patch_merge_norm(x.int(), 4, 4, weight, bias)


@pytest.mark.native_errors
@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_checks(device):
    if not hifuse_kernels._ext.has_kernel("patch_merge_norm", device):
        pytest.skip(f"no {device} kernel")
    x, weight, bias = _inputs(1, 4, 4, 8, torch.float32, device)
    with pytest.raises(RuntimeError, match="tokens, not H\\*W"):
        torch.ops.hifuse.patch_merge_norm(x, 4, 5, weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="4C = 32"):
        torch.ops.hifuse.patch_merge_norm(x, 4, 4, weight[:8], bias, 1e-5)
    x, weight = x.detach(), weight.detach()
    _out, mean, rstd = torch.ops.hifuse.patch_merge_norm(x, 4, 4, weight, bias.detach(), 1e-5)
    grad = torch.randn(1, 4, 32, device=device)
    with pytest.raises(RuntimeError, match="grad_after shape"):
        torch.ops.hifuse.patch_merge_norm_backward(grad, x, 4, 4, weight, mean, rstd, x[:, :8])


@pytest.mark.parametrize("h, w", [(8, 8), (7, 5)])
def test_module_matches_eager(h, w):
    torch.manual_seed(0)
    eager = PatchMerging(48)
    fused = PatchMerging(48)
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(2, h * w, 48)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = eager(xe, h, w)
    with hifuse.use_fused(attention=False, local=True, patches=True, fusion=False, norm=False):
        out = fused(xf, h, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-5, atol=1e-5)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, h, w, c", [(128, 56, 56, 96), (128, 28, 28, 192), (128, 14, 14, 384), (3, 9, 5, 192)])
def test_matches_reference_cuda(dtype, b, h, w, c):
    if not hifuse_kernels._ext.has_kernel("patch_merge_norm", "cuda"):
        pytest.skip("extension built without CUDA ops")
    x64, w64, b64 = _inputs(b, h, w, c, torch.float64, "cuda")
    grad64 = torch.randn(b, ((h + 1) // 2) * ((w + 1) // 2), 4 * c, dtype=torch.float64, device="cuda")
    ref = _grads(patch_merge_norm_ref, x64, h, w, w64, b64, grad64)
    low = [t.detach().to(dtype).requires_grad_() for t in (x64, w64, b64)]
    got = _grads(patch_merge_norm, low[0], h, w, low[1], low[2], grad64.to(dtype))
    pt = _grads(patch_merge_norm_ref, low[0], h, w, low[1], low[2], grad64.to(dtype))
    for name, a, p, r in zip(("out", "dx", "dweight", "dbias"), got, pt, ref):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: {err:.3g} vs eager {pt_err:.3g}"
