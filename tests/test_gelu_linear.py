"""gelu_linear (a GEMM whose input's GELU is taken on load) against eager."""

import pytest
import torch
from helpers import DEVICE, check_grads, triton_device_or_skip

from hifuse_kernels.gelu_linear import gelu_linear, gelu_linear_ref

pytestmark = triton_device_or_skip()


def _inputs(m, k, n, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(m, k, generator=g)  # both sides of GELU's bend
    w = torch.randn(n, k, generator=g) / k**0.5
    b = 0.1 * torch.randn(n, generator=g) if bias else None
    out = [h.to(DEVICE, dtype), w.to(DEVICE), None if b is None else b.to(DEVICE)]
    return [t if t is None else t.requires_grad_() for t in out]


# (rows, K, N): one row, sizes off every tile, the IRMLP's 12C -> C at Tiny's first width, N past 256
@pytest.mark.parametrize("m, k, n, bias", [(1, 16, 3, True), (37, 48, 10, False), (130, 200, 96, True),
                                           (70, 1152, 96, False), (33, 64, 300, True)])
def test_matches_reference(tiles, m, k, n, bias):
    h, w, b = _inputs(m, k, n, bias)
    inputs = [t for t in (h, w, b) if t is not None]
    check_grads(gelu_linear(h, w, b), gelu_linear_ref(h, w, b), inputs, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_expanded_gradient():
    h, w, b = _inputs(2 * 3 * 5, 32, 24)
    h4 = h.detach().view(2, 3, 5, 32).requires_grad_()
    out = gelu_linear(h4, w, b)
    assert out.shape == (2, 3, 5, 24)
    out.sum().backward()  # a stride-0 gradient
    got = [t.grad.clone() for t in (h4, w, b)]
    for t in (h4, w, b):
        t.grad = None
    gelu_linear_ref(h4, w, b).sum().backward()
    for a, t in zip(got, (h4, w, b)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


def test_backward_deterministic(device_tiles):
    h, w, b = _inputs(300, 96, 40)
    grad = torch.randn(300, 40, device=DEVICE)
    first = torch.autograd.grad(gelu_linear(h, w, b), (h, w, b), grad)
    second = torch.autograd.grad(gelu_linear(h, w, b), (h, w, b), grad)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_rows_past_one_grid_axis(monkeypatch, device_tiles):
    """Rows beyond 65535 tiles of one grid axis (stage 1 at batch 1338 and more): the launches
    take one axis for rows and column tiles together. Launches recorded, not run."""
    from hifuse_kernels import _triton

    grids = []

    class Recorder:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_triton, "wrap_triton", Recorder)
    m = 65536 * 64 + 1
    h = torch.empty(m, 16, dtype=torch.bfloat16, device=DEVICE)
    w = torch.empty(300, 16, device=DEVICE)
    torch.ops.hifuse.gelu_linear(h, w, None)
    torch.ops.hifuse.gelu_linear_backward(torch.empty(m, 300, dtype=torch.bfloat16, device=DEVICE), h, w, False)
    assert len(grids) == 3 and all(len(g) == 1 or g[1] <= 65535 for g in grids), grids


def test_bad_input():
    h, w, b = _inputs(4, 16, 8)
    with pytest.raises(ValueError, match="weight must be"):
        gelu_linear(h, w[:, :8], b)
    with pytest.raises(ValueError, match="bias must be"):
        gelu_linear(h, w, b[:3])
    with pytest.raises(TypeError, match="dtypes"):
        gelu_linear(h.double(), w, b)
    with pytest.raises(TypeError, match="tensors"):
        gelu_linear(h, "w", b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    """Under autocast's dtypes: within twice eager's own error against float64 (the rule the
    suite uses), eager being autocast's GELU then GEMM. (The interpreter's kernels take the
    same rounded operands to an fp32 product: its low-precision dot is wrong.)"""
    m = 4099 if DEVICE == "cuda" else 300
    h, w, b = _inputs(m, 1152, 96, dtype=dtype)
    grad = torch.randn(m, 96, device=DEVICE)
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = gelu_linear_ref(*ref_in)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    with torch.autocast(DEVICE, dtype=dtype):
        eager = gelu_linear_ref(h, w, b)
    eager_grads = torch.autograd.grad(eager, (h, w, b), grad.to(dtype))
    out = gelu_linear(h, w, b)
    assert out.dtype == dtype
    got = torch.autograd.grad(out, (h, w, b), grad.to(dtype))
    err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
    assert err(out, ref) <= 2 * err(eager, ref) + 1e-6
    for name, a, e, r in zip(("h", "weight", "bias"), got, eager_grads, want):
        assert a.dtype == (dtype if name == "h" else torch.float32), name
        assert err(a, r) <= 2 * err(e, r) + 1e-6, name
