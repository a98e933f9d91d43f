"""Training-mode BatchNorm fused with its activation (and the IRMLP's GELU + residual prologue)."""

import copy

import pytest
import torch

from hifuse_kernels import _triton
from hifuse_kernels import batch_norm_act as bna
from hifuse_kernels.batch_norm_act import batch_norm_act, batch_norm_act_ref, gated_sources

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
# (N, C, H, W): batch 1 and 2, odd sides, 1x1 with batch 2, channel counts around the tile, and
# enough rows (429) for each reduction program to loop over several row blocks with the GPU's tiles
SHAPES = [(2, 40, 9, 7), (1, 96, 5, 3), (4, 288, 1, 1), (3, 1, 4, 5), (1, 65, 11, 13), (3, 70, 13, 11)]


def _bn(c, seed=0, momentum=0.1):
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(1 + 0.1 * torch.randn(c, generator=gen))
        bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
        bn.running_mean.copy_(torch.randn(c, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return bn.to(DEVICE)


def _run_both(shape, act, residual, channels_last=True, momentum=0.1, steps=1):
    bn = _bn(shape[1], momentum=momentum)
    ref_bn = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = (3 * torch.randn(shape, generator=gen) + 5).to(DEVICE)  # a large mean tests stability
        r = torch.randn(shape, generator=gen).to(DEVICE) if residual else None
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        rs = [r.clone().requires_grad_(), r.clone().requires_grad_()] if residual else [None, None]
        out = batch_norm_act(xs[0], bn, act, rs[0])
        ref = batch_norm_act_ref(xs[1], ref_bn, act, rs[1])
    return out, ref, bn, ref_bn, xs, rs


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", [None, "relu", "gelu", "sigmoid"])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_batch_norm_module(tiles, shape, act, residual):
    out, ref, bn, ref_bn, xs, rs = _run_both(shape, act, residual)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_matches(out, ref, bn, ref_bn, xs, rs if residual else None)


def _assert_matches(out, ref, bn, ref_bn, xs, rs=None):
    """Output, the gradients of the input (and residual), weight and bias, and the running
    statistics as eager's."""
    # fp32 statistics of a few values with a large mean: cancellation limits both sides to ~1e-5
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    inputs = [xs[0], *([rs[0]] if rs else []), bn.weight, bn.bias]
    ref_inputs = [xs[1], *([rs[1]] if rs else []), ref_bn.weight, ref_bn.bias]
    for k, (a, r) in enumerate(zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, ref_inputs, grad))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=f"gradient {k}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref_bn, name), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape, block", [((3, 70, 13, 11), 32), ((3, 1, 40, 50), 4)])
def test_combining_kernels_take_the_partials_in_tiles(monkeypatch, device_tiles, shape, block):
    """More programs' partials than a combining program loads at once, the last tile short
    (7 and 14 partial rows in tiles of 2 at 16 channels; 6 in tiles of 4 at one channel): the
    statistics, running statistics and gradients as eager's."""
    monkeypatch.setattr(bna, "COMBINE_BLOCK", block)
    with _triton.modelled_sms(8):
        out, ref, bn, ref_bn, xs, _rs = _run_both(shape, "relu", False)
        _assert_matches(out, ref, bn, ref_bn, xs)


@pytest.mark.parametrize("shape", [(2, 40, 6, 8), (1, 96, 7, 5), (3, 16, 2, 3)])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_pooled_output(tiles, shape, act):
    bn = _bn(shape[1])
    ref_bn = copy.deepcopy(bn)
    x = (3 * torch.randn(shape) + 1).to(DEVICE).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    out = batch_norm_act(xs[0], bn, act, pool=True)
    ref = batch_norm_act_ref(xs[1], ref_bn, act, pool=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [xs[0], bn.weight, bn.bias], grad)
    want = torch.autograd.grad(ref, [xs[1], ref_bn.weight, ref_bn.bias], grad)
    for k, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5, msg=f"gradient {k}")
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)


def _backward_inputs(shape, residual, seed, grad_dtype):
    """bf16 rows y (and an fp32 residual), a BatchNorm, y's batch statistics and a gradient."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(n * h * w, c, generator=gen).to(DEVICE).to(torch.bfloat16)
    r = torch.randn(n * h * w, c, generator=gen).to(DEVICE) if residual else None
    bn = _bn(c)
    mean, invstd, _var = torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, None, None, None, 0.1)
    grad = torch.randn(n * h * w, c, generator=gen).to(DEVICE).to(grad_dtype)
    return y, r, bn, mean, invstd, grad


@pytest.mark.parametrize("shape", [(3, 70, 13, 11), (1, 96, 5, 3)])
@pytest.mark.parametrize("residual,act", [(False, 1), (True, 0), (False, 2)])
def test_backward_rebuilds_the_apply(tiles, shape, residual, act):
    """``rebuild_dtype``: the reducing pass also writes the apply's result, the bits
    hifuse::batch_norm_act writes; the other outputs unchanged."""
    _n, _c, h, w = shape
    y, r, bn, mean, invstd, grad = _backward_inputs(shape, residual, 3, torch.bfloat16)
    args = (grad, y, r, mean, invstd, bn.weight.detach(), bn.bias.detach(), act, h, w, False)
    plain = torch.ops.hifuse.batch_norm_act_backward(*args)
    both = torch.ops.hifuse.batch_norm_act_backward(*args, torch.bfloat16)
    assert plain[4].numel() == 0
    for a, b in zip(both[:4], plain[:4]):
        assert torch.equal(a, b)
    applied = torch.ops.hifuse.batch_norm_act(y, r, mean, invstd, bn.weight.detach(), bn.bias.detach(), act, h, w,
                                              False, torch.bfloat16)
    assert both[4].dtype == torch.bfloat16 and torch.equal(both[4], applied)
    with pytest.raises(ValueError, match="pooled"):
        torch.ops.hifuse.batch_norm_act_backward(grad, y, r, mean, invstd, bn.weight.detach(), bn.bias.detach(), act,
                                                 h, w, True, torch.bfloat16)


def test_out_dtype_is_the_cast_result():
    out, ref, bn, ref_bn, xs, rs = _run_both((2, 40, 5, 3), None, True)
    bn2 = copy.deepcopy(ref_bn)
    low = batch_norm_act(xs[0], bn2, None, rs[0], out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low, ref.detach().to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(ref).to(torch.bfloat16)
    got = torch.autograd.grad(low, [xs[0], rs[0], bn2.weight], grad)
    want = torch.autograd.grad(ref, [xs[1], rs[1], ref_bn.weight], grad.float())
    for k, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=1e-3, atol=1e-3, msg=f"gradient {k}")
    with pytest.raises(ValueError, match="out_dtype"):
        batch_norm_act(xs[0], bn2, None, out_dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_over_steps(momentum):
    # momentum None is nn.BatchNorm2d's cumulative moving average
    _, _, bn, ref_bn, _, _ = _run_both((2, 24, 5, 3), "relu", False, momentum=momentum, steps=3)
    assert int(bn.num_batches_tracked) == 3
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(bn, name), getattr(ref_bn, name), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_running_statistics_round_once(momentum):
    """The running statistics move in float64 from the batch's float64 mean and M2 and are
    rounded once (as eager's CPU update is): each equals that update made in float64 from the
    same running values, rounded to float32. An update in float32 (four roundings) was a
    float32 step off float64 where eager's CPU update is half of one."""
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(3000, 7, generator=gen) * 3 + 1
    run_mean, run_var = torch.randn(7, generator=gen), 0.5 + torch.rand(7, generator=gen)
    mean, var, count = run_mean.clone(), run_var.clone(), torch.zeros((), dtype=torch.long)
    torch.ops.hifuse.batch_norm_stats(y, None, 1e-5, mean, var, count, momentum)
    y64 = y.double()
    assert torch.equal(mean, (momentum * y64.mean(0) + (1 - momentum) * run_mean.double()).float())
    assert torch.equal(var, (momentum * y64.var(0) + (1 - momentum) * run_var.double()).float())
    assert int(count) == 1


def test_nchw_input_and_expanded_gradient():
    out, ref, bn, ref_bn, xs, _ = _run_both((2, 40, 5, 3), "gelu", False, channels_last=False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.weight.grad, ref_bn.weight.grad, rtol=1e-4, atol=1e-4)


def test_backward_is_deterministic():
    out, _, bn, _, xs, rs = _run_both((2, 96, 9, 7), "gelu", True)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, [xs[0], rs[0], bn.weight, bn.bias], grad, retain_graph=True)
    second = torch.autograd.grad(out, [xs[0], rs[0], bn.weight, bn.bias], grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("shape", [(2, 40, 9, 7), (1, 65, 11, 13), (3, 1, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shortcut_added(tiles, shape, dtype):
    """``shortcut``: the bits of ``shortcut + batch_norm_act(x)`` (the result rounded to its
    dtype, then added, as eager adds), the same running statistics, and gradients: the
    shortcut's the result's, the rest those of the plain op."""
    bn = _bn(shape[1])
    plain_bn = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(shape, generator=gen) + 1).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    s = torch.randn(shape, generator=gen).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ss = [s.clone().requires_grad_(), s.clone().requires_grad_()]
    out = batch_norm_act(xs[0], bn, None, shortcut=ss[0])
    want = ss[1] + batch_norm_act(xs[1], plain_bn, None)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, want)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain_bn, name)), name
    grad = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    got = torch.autograd.grad(out, [xs[0], ss[0], bn.weight, bn.bias], grad)
    ref = torch.autograd.grad(want, [xs[1], ss[1], plain_bn.weight, plain_bn.bias], grad)
    for k, (a, r) in enumerate(zip(got, ref)):
        assert torch.equal(a, r), f"gradient {k}"


@pytest.mark.parametrize("shape, pool, act", [((2, 40, 6, 8), True, 1), ((1, 65, 5, 3), False, 2), ((3, 1, 4, 5), False, 0)])
def test_backward_sums_two_gradients(tiles, shape, pool, act):
    """``grad2``: a second gradient of the result added on load, the bits of the backward of the
    two added in float32 first; a mismatched one is refused."""
    n, c, h, w = shape
    y, _, bn, mean, invstd, _ = _backward_inputs(shape, False, 4, torch.bfloat16)
    rows = n * (h // 2) * (w // 2) if pool else n * h * w
    gen = torch.Generator().manual_seed(5)
    g1, g2 = (torch.randn(rows, c, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    args = (y, None, mean, invstd, bn.weight, bn.bias, act, h, w, pool)
    got = torch.ops.hifuse.batch_norm_act_backward(g1, *args, None, g2)
    want = torch.ops.hifuse.batch_norm_act_backward(g1.float() + g2.float(), *args)
    for k, (a, r) in enumerate(zip(got, want)):
        assert torch.equal(a, r), f"output {k}"
    with pytest.raises(ValueError, match="grad2 must be"):
        torch.ops.hifuse.batch_norm_act_backward(g1, *args, None, g2.float())
    plain = (y, None, mean, invstd, bn.weight.detach(), bn.bias.detach(), act, h, w, pool)
    torch.library.opcheck(torch.ops.hifuse.batch_norm_act_backward.default, (g1, *plain, None, g2))


def test_shortcut_bad_input():
    bn = _bn(8)
    x = torch.randn(2, 8, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="shortcut must be a tensor"):
        batch_norm_act(x, bn, shortcut=x[:, :, :2])
    with pytest.raises(ValueError, match="shortcut must be contiguous torch.float32"):
        batch_norm_act(x, bn, shortcut=x.bfloat16())
    with pytest.raises(ValueError, match="pooled"):
        batch_norm_act(x, bn, "relu", pool=True, shortcut=x)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    mean, invstd, _ = torch.ops.hifuse.batch_norm_stats(rows, None, 1e-5, None, None, None, 0.1)
    args = (rows, None, mean, invstd, bn.weight, bn.bias, 0, 3, 4, False, None)
    with pytest.raises(ValueError, match="shortcut must be contiguous"):
        torch.ops.hifuse.batch_norm_act(*args, rows.t().contiguous().t())
    with pytest.raises(ValueError, match="shortcut must be contiguous"):
        torch.ops.hifuse.batch_norm_act(*args, rows[:5])
    torch.library.opcheck(torch.ops.hifuse.batch_norm_act.default, (*args, torch.randn_like(rows)))


def test_bad_input():
    bn = _bn(8)
    x = torch.randn(2, 8, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="act must be"):
        batch_norm_act(x, bn, "tanh")
    with pytest.raises(ValueError, match=r"\(N, 8, H, W\)"):
        batch_norm_act(x[:, :4], bn)
    with pytest.raises(ValueError, match="must match"):
        batch_norm_act(x, bn, residual=x[:, :, :2])
    with pytest.raises(ValueError, match="more than one value"):
        batch_norm_act(x[:1, :, :1, :1], bn)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        batch_norm_act(x.double(), bn)
    with pytest.raises(ValueError, match="cannot pool"):
        batch_norm_act(x[:, :, :1], bn, pool=True)


def test_compiles_without_graph_breaks():
    bn = _bn(16)
    ref_bn = copy.deepcopy(bn)
    x = torch.randn(2, 16, 3, 5, device=DEVICE, requires_grad=True)
    out = torch.compile(lambda t: batch_norm_act(t, bn, "relu"), fullgraph=True, backend="aot_eager")(x)
    ref = batch_norm_act_ref(x, ref_bn, "relu")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    out.sum().backward()
    assert x.grad is not None and bn.weight.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, residual", [((128, 96, 56, 56), False), ((128, 288, 56, 56), True), ((128, 768, 7, 7), False)])
def test_low_precision_cuda(dtype, shape, residual):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last) if residual else None
    grad = torch.randn(shape, generator=gen).to(DEVICE)

    def run(fn, dt):
        bn = _bn(shape[1]).to(dt)
        ins = [x.to(dt).requires_grad_()] + ([r.to(dt).requires_grad_()] if residual else [])
        out = fn(ins[0], bn, "gelu", ins[1] if residual else None)
        return (out, *torch.autograd.grad(out, [*ins, bn.weight, bn.bias], grad.to(out.dtype)))

    ref = run(batch_norm_act_ref, torch.float64)
    pt = run(batch_norm_act_ref, dtype)
    got = run(batch_norm_act, dtype)
    for k, (a, p, rf) in enumerate(zip(got, pt, ref)):
        err = (a.double() - rf).abs().max().item()
        pt_err = (p.double() - rf).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, rf.abs().max().item()), f"output {k}: {err:.3g} vs eager {pt_err:.3g}"


def _gated_inputs(n, s, c, act, dtype, x_bn, seed=0):
    """norm3's sources (g, l, the gates, x or the BatchNorm input of x), its result r and row
    statistics from hifuse::gated_layer_norm(_bn), and bn1's input y, its BatchNorm and a gradient."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, positive=False):
        t = torch.rand(*shape, generator=gen) + 0.5 if positive else torch.randn(*shape, generator=gen)
        return t.to(DEVICE)

    g, l = rand(n, s, c).to(dtype), rand(n, s, c).to(dtype)
    cg, sg = rand(n, c, positive=True), rand(n, s, positive=True).to(dtype)
    xy = rand(n, s, c).to(dtype)
    w, b = rand(3 * c), rand(3 * c)
    if x_bn:
        bn = [rand(c), rand(c, positive=True), rand(c), rand(c)]
        r, mu, rstd, _ = torch.ops.hifuse.gated_layer_norm_bn(g, cg, l, sg, xy, *bn, act, w, b, 1e-6)
        gated = [g, cg, l, sg, xy, mu, rstd, w, b, *bn]
    else:
        r, mu, rstd, _ = torch.ops.hifuse.gated_layer_norm(g, cg, l, sg, xy, w, b, 1e-6)
        gated = [g, cg, l, sg, xy, mu, rstd, w, b]
    y = (rand(n * s, 3 * c) + 1).to(torch.bfloat16)
    grad = rand(n * s, 3 * c).to(torch.bfloat16)
    return gated, r.view(n * s, 3 * c), y, _bn(3 * c), grad


@pytest.mark.parametrize("n, s, c, act, dtype, x_bn", [
    (2, 15, 24, 2, torch.float32, True), (1, 13, 32, 2, torch.bfloat16, True), (3, 7, 20, 0, torch.bfloat16, False),
    (1, 33, 48, 1, torch.float32, True),
])
def test_gated_residual_matches_the_given_residual(tiles, n, s, c, act, dtype, x_bn):
    """The ``_gated`` ops, which compute the residual r (norm3's result) on load from its
    sources and row statistics, give the bits the plain ops give with r written: statistics
    (and running statistics), the apply, and every backward output with the rebuilt apply."""
    _assert_gated_matches(n, s, c, act, dtype, x_bn, opcheck=tiles == "device" and dtype == torch.float32 and c == 24)


@pytest.mark.gpu
def test_gated_residual_matches_cuda():
    """The same at the first fusion block's size at batch 128 (bf16 projection, float32 g and
    l), compiled for the GPU: the expressions of norm3's kernel give its bits in bn1's."""
    _assert_gated_matches(128, 3136, 96, 2, torch.float32, True)


def _assert_gated_matches(n, s, c, act, dtype, x_bn, opcheck=False):
    gated, r, y, bn, grad = _gated_inputs(n, s, c, act, dtype, x_bn)
    src = gated_sources(gated, act, r.dtype)
    bn2 = copy.deepcopy(bn)
    running = (bn.running_mean, bn.running_var, bn.num_batches_tracked, 0.1)
    want = torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, *running)
    have = torch.ops.hifuse.batch_norm_stats_gated(y, *src, 1e-5, bn2.running_mean, bn2.running_var,
                                                   bn2.num_batches_tracked, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(have, want))
    for a, b in zip(bn2.buffers(), bn.buffers()):
        assert torch.equal(a, b)
    mean, invstd, _ = want
    params = (mean, invstd, bn.weight.detach(), bn.bias.detach(), 0)
    applied = torch.ops.hifuse.batch_norm_act(y, r, *params, s, 1, False, torch.bfloat16)
    got = torch.ops.hifuse.batch_norm_act_gated(y, *src, *params, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, applied)
    promoted = torch.promote_types(y.dtype, r.dtype)
    assert torch.ops.hifuse.batch_norm_act_gated(y, *src, *params, None).dtype == promoted
    dy, dr, dw, db, rebuilt = torch.ops.hifuse.batch_norm_act_backward(grad, y, r, *params, s, 1, False,
                                                                       torch.bfloat16)
    have = torch.ops.hifuse.batch_norm_act_gated_backward(grad, y, *src, *params, torch.bfloat16)
    for a, b in zip(have, (dy, dr, dw, db, rebuilt)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.ops.hifuse.batch_norm_act_gated_backward(grad, y, *src, *params)[4].numel() == 0
    if opcheck:
        check = torch.library.opcheck
        check(torch.ops.hifuse.batch_norm_stats_gated.default, (y, *src, 1e-5, None, None, None, 0.1))
        check(torch.ops.hifuse.batch_norm_act_gated.default, (y, *src, *params, torch.bfloat16))
        check(torch.ops.hifuse.batch_norm_act_gated_backward.default, (grad, y, *src, *params, torch.bfloat16))


def test_gated_residual_bad_input():
    gated, r, y, bn, grad = _gated_inputs(2, 5, 16, 2, torch.float32, True)
    mean, invstd, _ = torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, None, None, None, 0.1)
    params = (mean, invstd, bn.weight.detach(), bn.bias.detach(), 0)
    cases = [
        ([gated[0].transpose(0, 1).contiguous().transpose(0, 1), *gated[1:]], "g must be contiguous"),
        ([*gated[:3], gated[3][:, :2], *gated[4:]], r"spatial_gate must be \(2, 5\)"),
        ([*gated[:5], gated[5].half(), *gated[6:]], "ln_mean and ln_rstd must be float32"),
        ([*gated[:9], gated[9][:3], *gated[10:]], "x_mean must be a contiguous"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            torch.ops.hifuse.batch_norm_act_gated(y, *gated_sources(bad, 2, torch.float32), *params, None)
    for partial in ([*gated[:10], None, None, None], [*gated[:9], None, *gated[10:]]):
        with pytest.raises(ValueError, match="9 tensors, or 13"):
            torch.ops.hifuse.batch_norm_act_gated(y, *partial, 2, torch.float32, *params, None)
    with pytest.raises(ValueError, match=r"y must be \(10, 48\)"):
        torch.ops.hifuse.batch_norm_stats_gated(y[:9], *gated_sources(gated, 2, torch.float32), 1e-5, None, None,
                                                None, 0.1)
    with pytest.raises(ValueError, match="x_act must be one of"):
        torch.ops.hifuse.batch_norm_act_gated_backward(grad, y, *gated_sources(gated, 5, torch.float32), *params)
    with pytest.raises(ValueError, match="r_dtype must be"):
        torch.ops.hifuse.batch_norm_act_gated(y, *gated_sources(gated, 2, torch.int32), *params, None)
