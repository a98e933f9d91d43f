"""hifuse::gelu_residual against shortcut + gelu(y), forward and backward."""

import pytest
import torch

from hifuse_kernels import _triton
from hifuse_kernels.gelu_residual import gelu_residual, gelu_residual_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)


def _grads(fn, y, s, grad):
    out = fn(y, s)
    return (out, *torch.autograd.grad(out, (y, s), grad))


@pytest.mark.parametrize("shape", [(1, 49, 96), (2, 3136, 96), (3, 7, 1000), (5,)])
def test_matches_reference(tiles, shape):
    y = (3 * torch.randn(shape, device=DEVICE)).requires_grad_()
    s = torch.randn(shape, device=DEVICE, requires_grad=True)
    grad = torch.randn(shape, device=DEVICE)
    for a, r in zip(_grads(gelu_residual, y, s, grad), _grads(gelu_residual_ref, y, s, grad)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_follow_eager():
    # Under autocast fc1 gives bf16 while the residual stream stays fp32.
    torch.manual_seed(0)
    y = torch.randn(2, 49, 96, device=DEVICE).to(torch.bfloat16).requires_grad_()
    s = torch.randn(2, 49, 96, device=DEVICE, requires_grad=True)
    grad = torch.randn(2, 49, 96, device=DEVICE)
    got = _grads(gelu_residual, y, s, grad)
    pt = _grads(gelu_residual_ref, y, s, grad)
    assert [t.dtype for t in got] == [t.dtype for t in pt] == [torch.float32, torch.bfloat16, torch.float32]
    ref = _grads(gelu_residual_ref, y.detach().double().requires_grad_(), s.detach().double().requires_grad_(), grad.double())
    for a, p, r in zip(got, pt, ref):
        err = (a.double() - r).abs()
        if a.dtype == torch.bfloat16 and _triton.interpreting():
            # the interpreter rounds fp32 to bf16 toward zero (a GPU, as eager, to nearest):
            # within one bf16 step (2**-7 relatively) there, half of one on a GPU
            assert (err <= r.abs() * 2**-7 + 1e-6).all()
        else:
            assert err.max() <= 2 * (p.double() - r).abs().max() + 1e-6


def test_expanded_gradient_and_strided_input():
    y = torch.randn(4, 6, 5, device=DEVICE).transpose(1, 2).requires_grad_()
    s = torch.randn(4, 5, 6, device=DEVICE, requires_grad=True)
    gelu_residual(y, s).sum().backward()
    got = (y.grad.clone(), s.grad.clone())
    y.grad = s.grad = None
    gelu_residual_ref(y, s).sum().backward()
    torch.testing.assert_close(got[0], y.grad)
    torch.testing.assert_close(got[1], s.grad)


def test_bad_input():
    y = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="differ"):
        gelu_residual(y, y[:2])
    with pytest.raises(TypeError, match="tensors"):
        gelu_residual(y, 1.0)
    with pytest.raises(RuntimeError, match="not supported"):
        gelu_residual(y.double(), y.double())


def test_compiles_without_graph_breaks():
    y = torch.randn(2, 8, 16, device=DEVICE, requires_grad=True)
    s = torch.randn(2, 8, 16, device=DEVICE, requires_grad=True)
    out = torch.compile(gelu_residual, fullgraph=True, backend="aot_eager")(y, s)
    out.sum().backward()
    torch.testing.assert_close(out, gelu_residual_ref(y, s), rtol=1e-5, atol=1e-5)
    assert y.grad is not None and s.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_cuda(dtype):
    y64 = 3 * torch.randn(128, 3136, 96, device="cuda", dtype=torch.float64)
    s64 = torch.randn_like(y64)
    g64 = torch.randn_like(y64)
    ref = _grads(gelu_residual_ref, y64.requires_grad_(), s64.requires_grad_(), g64)
    y, s = y64.detach().to(dtype).requires_grad_(), s64.detach().to(dtype).requires_grad_()
    got = _grads(gelu_residual, y, s, g64.to(dtype))
    pt = _grads(gelu_residual_ref, y, s, g64.to(dtype))
    for a, p, r in zip(got, pt, ref):
        err = (a.double() - r).abs()
        if a.dtype == torch.bfloat16 and _triton.interpreting():
            # the interpreter rounds fp32 to bf16 toward zero (a GPU, as eager, to nearest):
            # within one bf16 step (2**-7 relatively) there, half of one on a GPU
            assert (err <= r.abs() * 2**-7 + 1e-6).all()
        else:
            assert err.max() <= 2 * (p.double() - r).abs().max() + 1e-6
