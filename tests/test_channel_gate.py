"""hifuse::channel_gate against eager's sigmoid(se(max) + se(avg)): output, the poolings' and
the weights' gradients, on batch 1 and batches past a program's images, hidden widths short of
a tile; float32, and the GEMMs in bf16 as under autocast."""

import pytest
import torch

from hifuse_kernels import _triton
from hifuse_kernels.channel_gate import channel_gate, channel_gate_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)


def _inputs(n, c, r, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    avg = torch.randn(n, c, 1, 1, generator=gen)
    best = avg + torch.rand(n, c, 1, 1, generator=gen)
    w1 = torch.randn(r, c, 1, 1, generator=gen) / c**0.5
    w2 = torch.randn(c, r, 1, 1, generator=gen) / r**0.5
    grad = torch.randn(n, c, 1, 1, generator=gen)
    return [t.to(device) for t in (avg, best, w1, w2)], grad.to(device)


def _run(fn, tensors, grad, dtype=None):
    """fn's output and gradients; ``dtype``: eager under autocast, the op given it."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    if fn is channel_gate:
        out = fn(*tensors, dtype=dtype)
    else:
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = fn(*tensors)
    return [out, *torch.autograd.grad(out, tensors, grad.to(out.dtype))]


def _errors(got, ref):
    return [(a.double() - r.double()).abs().max().item() for a, r in zip(got, ref)]


SHAPES = [(1, 96, 6), (3, 48, 3), (17, 200, 12), (33, 768, 48)]


@pytest.mark.parametrize("n,c,r", SHAPES)
def test_matches_eager_in_float32(tiles, n, c, r):
    tensors, grad = _inputs(n, c, r)
    f64 = _run(channel_gate_ref, [t.double() for t in tensors], grad.double())
    eager = _run(channel_gate_ref, tensors, grad)
    got = _run(channel_gate, tensors, grad)
    assert [t.dtype for t in got] == [torch.float32] * 5
    for k, (err, eager_err, ref) in enumerate(zip(_errors(got, f64), _errors(eager, f64), f64)):
        assert err <= 2 * eager_err + 4 * torch.finfo(torch.float32).eps * ref.abs().max().item(), (k, err, eager_err)


@pytest.mark.parametrize("n,c,r", SHAPES[:3])
def test_gemms_in_bf16_follow_eager_under_autocast(tiles, n, c, r):
    """The dtypes eager's autocast gives (a bf16 gate; float32 gradients of float32 poolings and
    weights), values within eager's own distance from float64."""
    tensors, grad = _inputs(n, c, r)
    f64 = _run(channel_gate_ref, [t.double() for t in tensors], grad.double())
    eager = _run(channel_gate_ref, tensors, grad, dtype=torch.bfloat16)
    got = _run(channel_gate, tensors, grad, dtype=torch.bfloat16)
    assert [t.dtype for t in got] == [t.dtype for t in eager] == [torch.bfloat16] + [torch.float32] * 4
    # the interpreter rounds float32 to bf16 toward zero (a GPU, as eager, to nearest): one
    # more bf16 step there
    slack = 2 if _triton.interpreting() else 1
    for k, (err, eager_err, ref) in enumerate(zip(_errors(got, f64), _errors(eager, f64), f64)):
        assert err <= 2 * eager_err + slack * 2**-8 * ref.abs().max().item(), (k, err, eager_err)


def test_stacked_poolings_and_repeatable_backward():
    tensors, grad = _inputs(5, 96, 6)
    avg, best, w1, w2 = (t.requires_grad_() for t in tensors)
    one = channel_gate(avg, best, w1, w2)
    stacked = torch.cat([avg, best]).detach().requires_grad_()
    other = channel_gate(stacked, None, w1.flatten(1), w2.flatten(1))
    assert torch.equal(one, other)
    grads = [torch.autograd.grad(channel_gate(stacked, None, w1, w2), (stacked, w1, w2), grad) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_not_a_number_spreads_as_in_eager():
    tensors, grad = _inputs(2, 48, 3)
    tensors[0][1, 5] = float("nan")
    got, ref = channel_gate(*tensors), channel_gate_ref(*tensors)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()


def test_bad_input():
    (avg, best, w1, w2), _ = _inputs(2, 48, 3)
    with pytest.raises(ValueError, match="differ"):
        channel_gate(avg, best[:1], w1, w2)
    with pytest.raises(TypeError, match="tensors"):
        channel_gate(avg, best, w1, 2.0)
    with pytest.raises(RuntimeError, match="weights must be"):
        channel_gate(avg, best, w1, w1)
    with pytest.raises(RuntimeError, match="share one dtype"):
        channel_gate(avg, best, w1.half(), w2)
    with pytest.raises(RuntimeError, match="not all supported"):
        channel_gate(avg.long(), best.long(), w1, w2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="2N, C"):
        channel_gate(avg[:1], None, w1, w2)
    with pytest.raises(RuntimeError, match="at most 256"):
        channel_gate(avg.expand(2, 48, 1, 1), None, torch.zeros(300, 48, device=DEVICE), torch.zeros(48, 300, device=DEVICE))


def test_registered_op():
    (avg, best, w1, w2), _ = _inputs(3, 48, 3)
    stats = torch.cat([avg, best]).flatten(1).requires_grad_()
    args = (stats, w1.flatten(1).requires_grad_(), w2.flatten(1).requires_grad_())
    torch.library.opcheck(torch.ops.hifuse.channel_gate.default, args)
    torch.library.opcheck(torch.ops.hifuse.channel_gate.default, (*args, torch.bfloat16))


def test_compiles_without_graph_breaks():
    tensors, grad = _inputs(3, 48, 3)
    tensors = [t.requires_grad_() for t in tensors]
    out = torch.compile(channel_gate, fullgraph=True, backend="aot_eager")(*tensors)
    out.backward(grad)
    torch.testing.assert_close(out, channel_gate_ref(*tensors), rtol=1e-5, atol=1e-6)
    assert all(t.grad is not None for t in tensors)
