"""The global blocks' GELU + residual with the next block's LayerNorm in one pass, and the chained stage."""

import copy

import pytest
import torch
import torch.nn.functional as F

import hifuse
from hifuse.model import GlobalStage
from hifuse_kernels import _triton
from hifuse_kernels import recompute
from hifuse_kernels.residual_layer_norm import gelu_residual_layer_norm, gelu_residual_layer_norm_ref, layer_norm_to

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
SHAPES = [(1, 49, 96), (2, 13, 192), (1, 1, 768), (3, 5, 384), (2, 7, 100)]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[-1]
    ts = [torch.randn(shape, generator=g), 2 * torch.randn(shape, generator=g) + 1,
          1 + 0.1 * torch.randn(c, generator=g), 0.1 * torch.randn(c, generator=g)]
    return [t.to(DEVICE).requires_grad_() for t in ts]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(tiles, shape):
    y, s, w, b = _inputs(shape)
    out, normed = gelu_residual_layer_norm(y, s, w, b, 1e-5, torch.float32)
    ref_out, ref_normed = gelu_residual_layer_norm_ref(y, s, w, b, 1e-5, torch.float32)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
    grads = (torch.randn_like(out), torch.randn_like(normed))
    got = torch.autograd.grad((out, normed), (y, s, w, b), grads)
    want = torch.autograd.grad((ref_out, ref_normed), (y, s, w, b), grads)
    for k, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=f"gradient {k}")


def test_one_output_used_and_expanded_gradients():
    y, s, w, b = _inputs((2, 9, 96))
    _out, normed = gelu_residual_layer_norm(y, s, w, b, 1e-5, torch.float32)
    normed.sum().backward()
    got = [t.grad.clone() for t in (y, s, w, b)]
    for t in (y, s, w, b):
        t.grad = None
    gelu_residual_layer_norm_ref(y, s, w, b, 1e-5, torch.float32)[1].sum().backward()
    for k, (a, t) in enumerate(zip(got, (y, s, w, b))):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-5, msg=f"gradient {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_to(dtype):
    _y, x, w, b = _inputs((3, 7, 192))
    normed = layer_norm_to(x, w, b, 1e-5, dtype)
    ref = F.layer_norm(x, (192,), w, b, 1e-5).to(dtype)
    assert normed.dtype == dtype
    torch.testing.assert_close(normed, ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(normed, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape, k", [((2, 6, 4, 24), 2), ((1, 7, 5, 96), 2), ((2, 9, 8, 16), 4)])
def test_layer_norm_to_patches(shape, k):
    """``patch``: the rows written as a k x k / k convolution's patches (odd sides dropped, as
    the convolution drops them; their rows' gradients zero), the same values as the LayerNorm
    followed by ``patch_conv``'s gather."""
    g = torch.Generator().manual_seed(3)
    b, h, w, c = shape
    x = torch.randn(shape, generator=g).to(DEVICE).requires_grad_()
    lw = (1 + 0.1 * torch.randn(c, generator=g)).to(DEVICE).requires_grad_()
    lb = (0.1 * torch.randn(c, generator=g)).to(DEVICE).requires_grad_()
    got = layer_norm_to(x, lw, lb, 1e-5, torch.float32, patch=k)
    ho, wo = h // k, w // k
    full = F.layer_norm(x, (c,), lw, lb, 1e-5)[:, : ho * k, : wo * k]
    ref = full.reshape(b, ho, k, wo, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, k * k * c)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ref.shape, generator=g).to(DEVICE)
    for a, r in zip(torch.autograd.grad(got, (x, lw, lb), grad), torch.autograd.grad(ref, (x, lw, lb), grad)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_y", [False, True])
def test_ones_column(tiles, with_y):
    """``ones``: the same normalised rows, then a ones column and zeros to ONES_PAD; the rest of
    the outputs unchanged, and a gradient of the padded rows reaches the inputs as the plain
    rows' would."""
    from hifuse_kernels.residual_layer_norm import ONES_PAD

    y, x, w, b = _inputs((2, 5, 96))
    y, x = (y.reshape(-1, 96) if with_y else None), x.reshape(-1, 96)
    plain = torch.ops.hifuse.residual_layer_norm(y, x, w, b, 1e-5, torch.bfloat16)
    padded = torch.ops.hifuse.residual_layer_norm(y, x, w, b, 1e-5, torch.bfloat16, 1, 1, 1, True)
    assert padded[1].shape == (10, 96 + ONES_PAD)
    assert torch.equal(padded[1][:, :96], plain[1])
    tail = torch.zeros(10, ONES_PAD, dtype=torch.bfloat16, device=DEVICE)
    tail[:, 0] = 1
    assert torch.equal(padded[1][:, 96:], tail)
    for a, r in zip((padded[0], *padded[2:]), (plain[0], *plain[2:])):
        assert torch.equal(a, r)
    grad = torch.randn(10, 96 + ONES_PAD, device=DEVICE).to(torch.bfloat16)
    leaves = [t for t in (y, x, w, b) if t is not None]
    got = torch.autograd.grad(padded[1], leaves, grad, allow_unused=True)
    ref = torch.autograd.grad(plain[1], leaves, grad[:, :96], allow_unused=True)
    for a, r in zip(got, ref):
        assert (a is None) == (r is None) and (a is None or torch.equal(a, r))
    with pytest.raises(ValueError, match="ones takes patch 1"):
        torch.ops.hifuse.residual_layer_norm(None, x, w, b, 1e-5, torch.bfloat16, 2, 2, 5, True)


@pytest.mark.parametrize("with_y, ones", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("c", [96, 100])
def test_backward_rebuilds_the_rows(tiles, with_y, ones, c):
    """``rebuild_dtype``: the backward's pass also writes the forward's normalised rows (with
    the ones column), the same bits; the row gradients unchanged, the weight's and bias's to
    rounding (the rebuilding pass takes fewer rows a program, so its partial sums group the rows
    otherwise)."""
    y, x, w, b = (t.detach() for t in _inputs((3, 43, c)))
    y, x = (y.reshape(-1, c) if with_y else None), x.reshape(-1, c)
    _out, normed, mean, rstd = torch.ops.hifuse.residual_layer_norm(y, x, w, b, 1e-5, torch.bfloat16, 1, 1, 1, ones)
    grad_out = torch.randn_like(x) if with_y else None
    grad = torch.randn(x.shape, device=DEVICE).to(torch.bfloat16)
    args = (grad_out, grad, y, x, w, mean, rstd)
    plain = torch.ops.hifuse.residual_layer_norm_backward(*args)
    both = torch.ops.hifuse.residual_layer_norm_backward(*args, 1, 1, 1, b, torch.bfloat16, ones)
    assert plain[3].numel() == 0 and torch.equal(both[3], normed)
    for a, r in zip(both[:2], plain[:2]):
        assert torch.equal(a, r)
    torch.testing.assert_close(both[2], plain[2], rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="takes patch 1 and the bias"):
        torch.ops.hifuse.residual_layer_norm_backward(*args, 1, 1, 1, None, torch.bfloat16)


def test_backward_is_deterministic():
    y, s, w, b = _inputs((4, 49, 96))
    grads = (torch.randn(4, 49, 96, device=DEVICE), torch.randn(4, 49, 96, device=DEVICE))
    runs = [torch.autograd.grad(gelu_residual_layer_norm(y, s, w, b, 1e-5, torch.float32), (y, s, w, b), grads) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs))


def test_bad_input():
    y, s, w, b = _inputs((1, 3, 16))
    with pytest.raises(ValueError, match="differ"):
        gelu_residual_layer_norm(y[:, :2], s, w, b, 1e-5, torch.float32)
    with pytest.raises(ValueError, match="LayerNorm weight"):
        gelu_residual_layer_norm(y, s, w[:8], b, 1e-5, torch.float32)
    with pytest.raises(ValueError, match="not supported"):
        layer_norm_to(s.double(), w, b, 1e-5, torch.float32)
    with pytest.raises(ValueError, match="more than"):
        layer_norm_to(torch.zeros(1, 1100, device=DEVICE), torch.ones(1100, device=DEVICE), torch.zeros(1100, device=DEVICE), 1e-5, torch.float32)


def test_compiles_without_graph_breaks():
    y, s, w, b = _inputs((1, 5, 32))
    fn = torch.compile(lambda *a: gelu_residual_layer_norm(*a, 1e-5, torch.float32), fullgraph=True, backend="aot_eager")
    out, normed = fn(y, s, w, b)
    ref_out, ref_normed = gelu_residual_layer_norm_ref(y, s, w, b, 1e-5, torch.float32)
    torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-5)
    (out.sum() + normed.sum()).backward()
    assert y.grad is not None and w.grad is not None


@pytest.mark.parametrize("downsample, hw", [(False, (7, 7)), (True, (9, 13))])
def test_stage_chains_norms_and_matches_eager(monkeypatch, downsample, hw):
    torch.manual_seed(0)
    eager = GlobalStage(32 if not downsample else 64, 2, 2, downsample=downsample).to(DEVICE)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fused = copy.deepcopy(eager)
    c_in = 32
    x = torch.randn(2, hw[0] * hw[1], c_in, device=DEVICE)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    calls = []
    chained = recompute.residual_layer_norm_linear
    # a block's residual output is written by the next block's norm1 pass: called with its y
    monkeypatch.setattr(recompute, "residual_layer_norm_linear", lambda y, *a, **k: calls.append(y is not None) or chained(y, *a, **k))
    ref, h, w = eager(xe, *hw)
    with hifuse.use_fused(attention=True, local=downsample, patches=downsample, fusion=False, norm=False):
        out, h2, w2 = fused(xf, *hw)
    assert any(calls) and (h, w) == (h2, w2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(xf.grad, xe.grad, rtol=1e-3, atol=1e-4)
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        assert (pe.grad is None) == (pf.grad is None), name
        if pe.grad is not None:
            torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-3, atol=1e-4, msg=name)
