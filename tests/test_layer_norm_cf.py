"""hifuse::layer_norm_cf against the eager channels-first LayerNorm, forward and backward."""

import pytest
import torch
from torch.library import opcheck

import hifuse
import hifuse_kernels
from hifuse.layers import LayerNormCF
from hifuse_kernels.layer_norm_cf import layer_norm_cf, layer_norm_cf_ref
from helpers import DEVICES, other_device

pytestmark = pytest.mark.skipif(not hifuse_kernels.native_available(), reason="native extension not built")

SHAPES = [  # (N, C, H, W): batch 1, odd and prime sides, 1x1, the model's widths
    (1, 96, 7, 5),
    (2, 192, 13, 3),
    (1, 288, 1, 1),
    (3, 384, 5, 11),
    (1, 1152, 3, 2),
    (2, 2304, 2, 3),
]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _inputs(shape, dtype, fmt, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3 + 1).to(device, memory_format=FORMATS[fmt])
    weight = (1 + 0.1 * torch.randn(c, generator=g, dtype=dtype)).to(device)
    bias = (0.1 * torch.randn(c, generator=g, dtype=dtype)).to(device)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()


def _grads(fn, x, weight, bias, grad):
    out = fn(x, weight, bias, 1e-6)
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_cpu(shape, fmt, dtype):
    x, w, b = _inputs(shape, dtype, fmt)
    grad = torch.randn(shape, dtype=dtype)
    got = _grads(layer_norm_cf, x, w, b, grad)
    ref = _grads(layer_norm_cf_ref, x, w, b, grad)
    for name, a, r in zip(("out", "dx", "dweight", "dbias"), got, ref):
        torch.testing.assert_close(a, r, **TOL[dtype], msg=name)
    assert got[0].is_contiguous(memory_format=FORMATS[fmt])
    assert got[1].is_contiguous(memory_format=FORMATS[fmt])


def test_expanded_and_strided_gradients():
    x, w, b = _inputs((2, 96, 5, 7), torch.float64, "nchw")
    # out.sum().backward() hands the op a stride-0 gradient
    layer_norm_cf(x, w, b).sum().backward()
    got = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    layer_norm_cf_ref(x, w, b, 1e-6).sum().backward()
    for a, t in zip(got, (x, w, b)):
        torch.testing.assert_close(a, t.grad, **TOL[torch.float64])
    # a transposed (non-contiguous) gradient
    grad = torch.randn(2, 96, 7, 5, dtype=torch.float64).transpose(2, 3)
    got = _grads(layer_norm_cf, x, w, b, grad)
    ref = _grads(layer_norm_cf_ref, x, w, b, grad)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, **TOL[torch.float64])


def test_non_contiguous_input():
    base = torch.randn(2, 200, 9, 8, dtype=torch.float64)
    x = base[:, ::2, 1:, ::2].detach().requires_grad_()  # neither NCHW- nor NHWC-dense
    w = torch.randn(100, dtype=torch.float64, requires_grad=True)
    b = torch.randn(100, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(x.shape, dtype=torch.float64)
    for a, r in zip(_grads(layer_norm_cf, x, w, b, grad), _grads(layer_norm_cf_ref, x, w, b, grad)):
        torch.testing.assert_close(a, r, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_with_fp32_params_cpu(dtype):
    # Under autocast the module's fp32 parameters meet low-precision activations: eager
    # then returns fp32, and so does the op.
    x32, w, b = _inputs((2, 96, 5, 3), torch.float32, "nchw")
    x = x32.detach().to(dtype).requires_grad_()
    grad = torch.randn(x.shape)
    got = _grads(layer_norm_cf, x, w, b, grad)
    pt = _grads(layer_norm_cf_ref, x, w, b, grad)
    ref = _grads(layer_norm_cf_ref, x.detach().double().requires_grad_(), w.double(), b.double(), grad.double())
    assert got[0].dtype == pt[0].dtype == torch.float32 and got[1].dtype == dtype
    for a, p, r in zip(got, pt, ref):
        assert (a.double() - r).abs().max() <= 2 * (p.double() - r).abs().max() + 1e-5


def test_backward_is_deterministic():
    x, w, b = _inputs((2, 384, 9, 7), torch.float32, "nhwc")
    grad = torch.randn(x.shape)
    first = _grads(layer_norm_cf, x, w, b, grad)
    second = _grads(layer_norm_cf, x, w, b, grad)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    x, w, b = _inputs((2, 96, 3, 5), torch.float32, fmt)
    opcheck(torch.ops.hifuse.layer_norm_cf.default, (x, w, b, 1e-6))
    # The backward op is not differentiable itself (no double backward): check it without grads.
    x, w = x.detach(), w.detach()
    mean_rstd = torch.ops.hifuse.layer_norm_cf(x, w, b.detach(), 1e-6)[1:]
    opcheck(torch.ops.hifuse.layer_norm_cf_backward.default, (torch.randn(x.shape), x, w, *mean_rstd),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors(device):
    x = torch.randn(2, 8, 3, 3, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="must be 4-D"):
        layer_norm_cf(x[0], w, b)
    with pytest.raises(ValueError, match="C = 8"):
        layer_norm_cf(x, torch.ones(7, device=device), b)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        layer_norm_cf(x.int(), w, b)
    with pytest.raises(TypeError, match="is not supported"):
        layer_norm_cf(x, w.double(), b.double())
    with pytest.raises(TypeError, match="share a floating dtype"):
        layer_norm_cf(x, w, b.double())
    with pytest.raises(TypeError, match="must be a tensor"):
        layer_norm_cf([1.0], w, b)
    with pytest.raises(ValueError, match="one device"):
        layer_norm_cf(x, w, b.to(other_device(device)))


@pytest.mark.native_errors
@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_checks(device):
    """The C++ checks behind the Python ones, for callers of torch.ops.hifuse directly."""
    if not hifuse_kernels._ext.has_kernel("layer_norm_cf", device):
        pytest.skip(f"no {device} kernel")
    op = torch.ops.hifuse.layer_norm_cf
    x = torch.randn(2, 8, 3, 3, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op(x[0], w, b, 1e-6)
    with pytest.raises(RuntimeError, match="C = 8"):
        op(x, torch.ones(7, device=device), b, 1e-6)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        op(x.int(), w, b, 1e-6)
    mean, rstd = op(x, w, b, 1e-6)[1:]
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.hifuse.layer_norm_cf_backward(x[:1], x, w, mean, rstd)


def test_module_uses_op_and_compiles_without_graph_breaks():
    torch.manual_seed(0)
    norm = LayerNormCF(96)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    x = torch.randn(2, 96, 5, 7, requires_grad=True)
    eager = norm(x)
    with hifuse.use_fused(norm=True):
        compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=2e-5, atol=2e-5)
    assert x.grad is not None and norm.weight.grad is not None


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES + [(128, 96, 56, 56), (32, 2304, 7, 7)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_cuda(shape, fmt, dtype):
    if not hifuse_kernels._ext.has_kernel("layer_norm_cf", "cuda"):
        pytest.skip("extension built without CUDA ops")
    x64, w64, b64 = _inputs(shape, torch.float64, fmt, "cuda")
    grad64 = torch.randn(shape, dtype=torch.float64, device="cuda")
    ref = _grads(layer_norm_cf_ref, x64, w64, b64, grad64)

    def cast(t):
        return t.detach().to(dtype).requires_grad_()

    x, w, b = cast(x64), cast(w64), cast(b64)
    grad = grad64.to(dtype)
    got = _grads(layer_norm_cf, x, w, b, grad)
    pt = _grads(layer_norm_cf_ref, x, w, b, grad)
    for name, a, p, r in zip(("out", "dx", "dweight", "dbias"), got, pt, ref):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        atol = 1e-5 * max(1.0, r.abs().max().item())
        assert err <= 2 * pt_err + atol, f"{name}: fused {err:.3g} vs eager {pt_err:.3g}"


@pytest.mark.gpu
def test_cuda_backward_deterministic_and_opcheck():
    if not hifuse_kernels._ext.has_kernel("layer_norm_cf", "cuda"):
        pytest.skip("extension built without CUDA ops")
    for fmt in FORMATS:
        x, w, b = _inputs((64, 192, 28, 28), torch.float32, fmt, "cuda")
        grad = torch.randn(x.shape, device="cuda")
        first = _grads(layer_norm_cf, x, w, b, grad)
        second = _grads(layer_norm_cf, x, w, b, grad)
        for a, c in zip(first, second):
            assert torch.equal(a, c)
        small = _inputs((2, 96, 3, 5), torch.float32, fmt, "cuda")
        opcheck(torch.ops.hifuse.layer_norm_cf.default, (*small, 1e-6))
