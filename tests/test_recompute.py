"""GEMMs that rebuild their input in backward: the values and every gradient of the plain
composition (the same ops, with autograd keeping the GEMM's input), rebuilding or keeping
(``keep``), and the whole fused model keeping 40% or less of the bytes eager keeps for
backward, and more with each rebuild switched off (``hifuse.use_rebuilds``), with the same
gradients."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch._subclasses.fake_tensor import FakeTensorMode

import hifuse
import hifuse_kernels
from helpers import DEVICE, triton_device_or_skip
from hifuse_kernels import batch_norm_act as bna
from hifuse_kernels import dwconv_layer_norm as dln
from hifuse_kernels import gated_layer_norm as gln
from hifuse_kernels import layer_norm_cat as lnc
from hifuse_kernels import recompute
from hifuse_kernels import residual_layer_norm as rln

pytestmark = triton_device_or_skip()


def _leaf(*shape, scale=1.0):
    return (scale * torch.randn(*shape, device=DEVICE)).requires_grad_()


def _compare(fused_fn, plain_fn, leaves):
    """Same output and same gradients of every leaf, for a gradient with stride 0 and for a
    dense one."""
    for dense in (False, True):
        outs, grads = [], []
        for fn in (fused_fn, plain_fn):
            out = fn()
            if dense:
                grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
                (out * grad).sum().backward()
            else:
                out.sum().backward()
            outs.append(out.detach())
            grads.append([t.grad.clone() for t in leaves])
            for t in leaves:
                t.grad = None
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _dense(*shape):
    return torch.nn.Linear(shape[0], shape[1], device=DEVICE)


keeps = pytest.mark.parametrize("keep", [False, True], ids=["rebuilt", "kept"])


@keeps
@pytest.mark.parametrize("residual", [False, True])
def test_batch_norm_apply_linear(residual, keep):
    torch.manual_seed(0)
    x = _leaf(2, 6, 3, 5)
    r = _leaf(2, 6, 3, 5) if residual else None
    bn = torch.nn.BatchNorm2d(6, device=DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    lin = _dense(6, 4)
    bns = [bn, copy.deepcopy(bn)]
    leaves = [x, lin.weight, bn.weight, bn.bias] + ([r] if residual else [])

    def fused():
        args = bna.apply_args(x, bns[0], None, residual=r)
        return recompute.linear(recompute.BatchNormApply, args, lin.weight, lin.bias, keep=keep)

    def plain():
        y = bna.batch_norm_act(x, bns[1], None, residual=r)
        return lin(y.permute(0, 2, 3, 1).reshape(-1, 6))

    # the copies share bn's parameters' values but not their tensors: point the copy at them
    bns[1].weight, bns[1].bias = bn.weight, bn.bias
    _compare(fused, plain, leaves)
    torch.testing.assert_close(bns[0].running_mean, bns[1].running_mean)
    torch.testing.assert_close(bns[0].running_var, bns[1].running_var)
    # rebuilt, the input is written by the BatchNorm backward's reducing pass: no apply pass
    applies = []
    apply_op = torch.ops.hifuse.batch_norm_act
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.hifuse, "batch_norm_act", lambda *a: applies.append(1) or apply_op(*a))
        fused().sum().backward()
    assert len(applies) == 1


@keeps
@pytest.mark.parametrize("parts", [2, 3])
def test_layer_norm_cat_linear(parts, keep):
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    torch.manual_seed(0)
    xs = [_leaf(2, 5, 3, 4).contiguous(memory_format=torch.channels_last).detach().requires_grad_() for _ in range(parts)]
    w, b = _leaf(5 * parts, scale=0.5), _leaf(5 * parts, scale=0.5)
    lin = _dense(5 * parts, 3)
    leaves = [*xs, w, b, lin.weight, lin.bias]
    _compare(lambda: recompute.linear(recompute.LayerNormCat, (*xs, w, b, 1e-6, None), lin.weight, lin.bias, keep=keep),
             lambda: lin(lnc.layer_norm_cat(xs, w, b, 1e-6).permute(0, 2, 3, 1)), leaves)
    # the rows path: rebuilt, the normalised rows come from the backward's pass, not a forward
    forward_op, runs = torch.ops.hifuse.layer_norm_cat_rows, []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.hifuse, "layer_norm_cat_rows", lambda *a: runs.append(1) or forward_op(*a))
        recompute.linear(recompute.LayerNormCat, (*xs, w, b, 1e-6, None), lin.weight, lin.bias, keep=keep).sum().backward()
    assert len(runs) == 1


def _gemm_bn_parts(xs, acts, pools):
    """Three 1x1 GEMM + training BatchNorm parts of 5 channels on xs, as the fusion block's,
    the 15-channel LayerNorm and linear after them: (gemms, (BatchNorm, twin) pairs, w, b,
    linear, leaves, a function making the parts with the plain ops and the twins)."""
    gemms = [(_leaf(5, x.shape[-1], scale=0.5), _leaf(5, scale=0.1)) for x in xs]
    bns = [_bn(5) for _ in xs]
    w, b = _leaf(15, scale=0.5), _leaf(15, scale=0.5)
    lin = _dense(15, 3)
    leaves = [*xs, w, b, lin.weight, lin.bias] + [t for pair in gemms for t in pair]
    leaves += [p for bn, _ in bns for p in (bn.weight, bn.bias)]

    def plain_parts():
        return [bna.batch_norm_act(F.linear(x, gw, gb).permute(0, 3, 1, 2), twin, act, pool=p)
                for x, (gw, gb), (_, twin), act, p in zip(xs, gemms, bns, acts, pools)]

    return gemms, bns, w, b, lin, leaves, plain_parts


@keeps
@pytest.mark.parametrize("pool, chain", [(False, False), (True, False), (False, True)])
def test_norm_cat_linear(pool, chain, keep, monkeypatch):
    # parts made by 1x1 GEMMs with their training BatchNorm (one pooled, as Updim's, one with
    # ReLU), one used elsewhere too (as the fusion block's shortcut): neither the GEMM outputs,
    # the parts nor the normalised rows are kept. ``chain``: the second GEMM hands its input on
    # to a later reader, whose gradient of it the GEMM's backward adds to its own. Backward runs
    # each part's GEMM once: the rebuild of the parts and the BatchNorm's backward share it
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    gemm, gemms_run = recompute.LinearBatchNorm.gemm, []

    def counted(*args):
        gemms_run.append(1)
        return gemm(*args)

    monkeypatch.setattr(recompute.LinearBatchNorm, "gemm", staticmethod(counted))
    torch.manual_seed(0)
    side = 6 if pool else 3
    xs = [_leaf(2, side, 8 if pool else 4, 3), _leaf(2, 3, 4, 6), _leaf(2, 3, 4, 5)]
    acts = [None, "relu", None]
    pools = [pool, False, False]
    gemms, bns, w, b, lin, leaves, plain_parts = _gemm_bn_parts(xs, acts, pools)

    def fused():
        parts, sources = [], []
        later = 0
        for k, (x, (gw, gb), (bn, _), act, p) in enumerate(zip(xs, gemms, bns, acts, pools)):
            part, source, *again = recompute.linear_batch_norm(x, gw, gb, bn, act, pool=p, keep=keep,
                                                               chain=chain and k == 1)
            parts.append(part)
            sources.append(source)
            if again:
                assert again[0].data_ptr() == x.data_ptr()
                later = again[0].sin().sum()
        out = recompute.norm_cat_linear(parts, sources, w, b, 1e-6, None, lin.weight, lin.bias, keep=keep)
        return out + parts[0].permute(0, 2, 3, 1).sum(-1, keepdim=True) + later

    def plain():
        parts = plain_parts()
        out = lin(lnc.layer_norm_cat(parts, w, b, 1e-6).permute(0, 2, 3, 1))
        return out + parts[0].permute(0, 2, 3, 1).sum(-1, keepdim=True) + (xs[1].sin().sum() if chain else 0)

    _compare(fused, plain, leaves)
    # two fused steps of three parts: each GEMM in forward, and once more in backward unless kept
    assert len(gemms_run) == 2 * 3 * (1 if keep else 2)
    for bn, twin in bns:
        torch.testing.assert_close(bn.running_mean, twin.running_mean)
        torch.testing.assert_close(bn.running_var, twin.running_var)
        assert bn.num_batches_tracked == twin.num_batches_tracked


def test_norm_cat_linear_applies_deferred_batch_norms_on_load(monkeypatch):
    # parts 1 and 2 as the fusion block's W_l and W_g (no activation), part 0 as Updim (pooled,
    # ReLU, used elsewhere too): with ``defer`` their BatchNorms are applied by the
    # concatenation's LayerNorm as it loads the GEMMs' outputs, in forward and in its
    # backward's rebuild, and its backward pass reduces their backward's sums: no apply and no
    # reducing pass of their own. The same values and gradients as the plain composition
    torch.manual_seed(0)
    calls = {"apply": 0, "backward": 0, "summed": 0}
    for name, key in (("batch_norm_act", "apply"), ("batch_norm_act_backward", "backward"),
                      ("batch_norm_act_backward_summed", "summed")):
        op = getattr(torch.ops.hifuse, name)
        monkeypatch.setattr(torch.ops.hifuse, name,
                            lambda *a, _op=op, _key=key: calls.__setitem__(_key, calls[_key] + 1) or _op(*a))
    xs = [_leaf(2, 6, 8, 3), _leaf(2, 3, 4, 6), _leaf(2, 3, 4, 5)]
    acts, pools, defers = ["relu", None, None], [True, False, False], [False, True, True]
    gemms, bns, w, b, lin, leaves, plain_parts = _gemm_bn_parts(xs, acts, pools)

    def fused():
        parts, sources = [], []
        for x, (gw, gb), (bn, _), act, p, d in zip(xs, gemms, bns, acts, pools, defers):
            part, source = recompute.linear_batch_norm(x, gw, gb, bn, act, pool=p, defer=d)
            assert isinstance(source, recompute.DeferredBatchNorm) == d
            parts.append(part)
            sources.append(source)
        out = recompute.norm_cat_linear(parts, sources, w, b, 1e-6, None, lin.weight, lin.bias)
        return out + parts[0].permute(0, 2, 3, 1).sum(-1, keepdim=True)

    def plain():
        parts = plain_parts()
        out = lin(lnc.layer_norm_cat(parts, w, b, 1e-6).permute(0, 2, 3, 1))
        return out + parts[0].permute(0, 2, 3, 1).sum(-1, keepdim=True)

    _compare(fused, plain, leaves)
    # two fused steps (and two plain ones, whose BatchNorms run through the ops too): the
    # deferred parts never apply their BatchNorm nor reduce its backward's sums themselves
    assert calls == {"apply": 2 * (2 + 3), "backward": 2 * (1 + 3), "summed": 2 * 2}, calls
    for bn, twin in bns:
        torch.testing.assert_close(bn.running_mean, twin.running_mean)
        torch.testing.assert_close(bn.running_var, twin.running_var)
    with pytest.raises(ValueError, match="defer"):
        recompute.linear_batch_norm(xs[0], *gemms[0], bns[0][0], "relu", defer=True)


def test_chained_gemm_adds_into_the_next_readers_gradient(monkeypatch):
    # Where a GEMM can add a float32 tensor in its epilogue (cuBLAS on a GPU; a CPU kernel
    # stands in here, the CPU taken for a CUDA-like device), the chained linear_batch_norm's
    # backward writes x's gradient into the one x's next reader made: the same gradients,
    # bitwise, as the product and an add
    if DEVICE != "cpu" or not recompute._ADDMM_OUT_DTYPE:
        pytest.skip("a CPU stand-in for a GPU's GEMM, in a torch with addmm(out_dtype=)")
    into = []

    def addmm_into(acc, a, b, out_dtype, *, beta=1, alpha=1, out):
        into.append(out.data_ptr())
        return out.copy_(acc + (a @ b).to(out_dtype))

    lib = torch.library.Library("aten", "IMPL")
    lib.impl("addmm.dtype_out", addmm_into, "CPU")
    lib.impl("mm.dtype", lambda a, b, out_dtype: (a @ b).to(out_dtype), "CPU")
    recompute.CUDA_LIKE_DEVICES.add("cpu")
    try:
        torch.manual_seed(0)
        x = _leaf(2, 3, 4, 6)
        gemm = [_leaf(5, 6, scale=0.5), _leaf(5, scale=0.1)]
        bn, _ = _bn(5)
        weights = [torch.randn(2, 5, 3, 4), torch.randn(2, 3, 4, 6)]
        grads = {}
        for adds_into in (False, True):
            monkeypatch.setattr(recompute, "_ADDMM_OUT_DTYPE", adds_into)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                part, _source, again = recompute.linear_batch_norm(x, *gemm, bn, "relu", gemm_dtype=torch.bfloat16,
                                                                   chain=True)
                loss = (part.float() * weights[0]).sum() + (again.sin() * weights[1]).sum()
            loss.backward()
            grads[adds_into] = [t.grad.clone() for t in (x, *gemm, bn.weight, bn.bias)]
            for t in (x, *gemm, bn.weight, bn.bias):
                t.grad = None
        assert len(into) == 1, "the GEMM did not add into the next reader's gradient"
        for a, b in zip(grads[False], grads[True]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        recompute.CUDA_LIKE_DEVICES.discard("cpu")
        lib._destroy()


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [7, 4100])
def test_mm_add_into(rows, acc_dtype):
    # the GEMM adds into acc itself: everywhere for operands of acc's dtype, on a GPU for a
    # float32 acc where the device's check said it can; the sum is the same either way
    torch.manual_seed(0)
    acc = torch.randn(rows, 24, device=DEVICE).to(acc_dtype)
    a, b = torch.randn(rows, 40, device=DEVICE).bfloat16(), torch.randn(40, 24, device=DEVICE).bfloat16()
    want = acc.float() + a.float() @ b.float()
    out = recompute.mm_add_into(acc.clone(), a, b)
    assert out.dtype == acc_dtype
    tol = 1e-4 if acc_dtype == torch.float32 and DEVICE == "cuda" else 2e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    target = acc.clone()
    in_place = acc_dtype == torch.bfloat16 or (DEVICE == "cuda" and recompute._gemm_adds_into(acc.device))
    assert (recompute.mm_add_into(target, a, b).data_ptr() == target.data_ptr()) == in_place


def _bn(c):
    bn = torch.nn.BatchNorm2d(c, device=DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    twin = copy.deepcopy(bn)
    twin.weight, twin.bias = bn.weight, bn.bias  # the twin's statistics, the same parameters
    return bn, twin


def _irmlp_front_inputs(c: int, n: int = 2, h: int = 3, w: int = 5) -> tuple:
    """The fusion block's norm3 sources (the projection's output, g, l, the gates, norm3's
    parameters), the IRMLP's conv1 and conv2 weights, the projection's and bn1's BatchNorms
    (with twins) and the leaves whose gradients the tests compare."""
    torch.manual_seed(0)
    cl = dict(memory_format=torch.channels_last)
    y_proj = _leaf(n, c, h, w)
    g, l = (_leaf(n, c, h, w).detach().contiguous(**cl).requires_grad_() for _ in range(2))
    cg, sg = _leaf(n, c, 1, 1), _leaf(n, 1, h, w)
    w3, b3 = _leaf(3 * c, scale=0.5), _leaf(3 * c, scale=0.5)
    w1, w2 = _leaf(3 * c, 3 * c, 3, 3, scale=0.2), _leaf(12 * c, 3 * c, scale=0.3)
    bn_proj, bn1 = _bn(c), _bn(3 * c)
    leaves = [y_proj, g, l, cg, sg, w3, b3, w1, w2] + [p for bn in (bn_proj[0], bn1[0]) for p in (bn.weight, bn.bias)]
    return y_proj, g, l, cg, sg, w3, b3, w1, w2, bn_proj, bn1, leaves


@pytest.mark.parametrize("keep_x, keep_out, keep_a", [(False, False, False), (False, False, True),
                                                      (True, True, True), (False, True, False)])
def test_irmlp_front_from_gated_layer_norm(keep_x, keep_out, keep_a, monkeypatch):
    # The fusion block's norm3 (whose x is the projection's BatchNorm + GELU) feeding the
    # IRMLP's conv1 and bn1 residual: none of x, norm3's output or conv2's input is kept
    # (or some of them, as the fusion block's rebuild switches decide). Rebuilt, norm3's output
    # is rebuilt once in backward: bn1's rebuild leaves it (and x) for conv1's backward. The
    # fused norm3 applies x's BatchNorm + GELU as it loads the projection's output
    # (hifuse::gated_layer_norm_bn): x is never written
    runs = {"gated_layer_norm": 0, "gated_layer_norm_bn": 0}
    for name in runs:
        op = getattr(torch.ops.hifuse, name)
        monkeypatch.setattr(torch.ops.hifuse, name,
                            lambda *a, _op=op, _name=name: runs.__setitem__(_name, runs[_name] + 1) or _op(*a))
    y_proj, g, l, cg, sg, w3, b3, w1, w2, bn_proj, bn1, leaves = _irmlp_front_inputs(4)

    def fused():
        bn_args = bna.apply_args(y_proj, bn_proj[0], "gelu")
        src = recompute.gated_layer_norm_source(g, cg, l, sg, w3, b3, 1e-6, bn_args)
        if keep_out:
            x = recompute.gated_layer_norm(src, keep=keep_x)
            y = F.conv2d(x, w1, padding=1)
        else:
            x, y, (source, src) = recompute.gated_layer_norm_conv2d(src, w1, (1, 1), 1)
        args = bna.apply_args(y, bn1[0], None, residual=x)
        rebuilt = [] if keep_out else [(source, 1, src)]
        return recompute.linear(recompute.BatchNormApply, args, w2, rebuilt=rebuilt, keep=keep_a)

    def plain():
        x = gln.gated_layer_norm(g, cg, l, sg, bna.batch_norm_act(y_proj, bn_proj[1], "gelu"), w3, b3, 1e-6)
        a = bna.batch_norm_act(F.conv2d(x, w1, padding=1), bn1[1], None, residual=x)
        return F.linear(a.permute(0, 2, 3, 1).reshape(-1, w2.shape[1]), w2)

    _compare(fused, plain, leaves)
    torch.testing.assert_close(bn1[0].running_var, bn1[1].running_var)
    # two steps, each: fused forward, fused backward's rebuild (none when norm3's output is
    # kept), plain forward
    assert runs == {"gated_layer_norm": 2, "gated_layer_norm_bn": 2 * (1 + (0 if keep_out else 1))}, runs


@pytest.mark.parametrize("keep_a", [False, True])
def test_irmlp_front_computes_bn1_residual_on_load(keep_a, monkeypatch):
    # Under autocast norm3's result (float32) has two readers: conv1, which takes it in bf16,
    # and bn1's residual. With ``on_load`` norm3 writes it in bf16 only, and bn1's passes
    # (hifuse::batch_norm_act_gated) compute the float32 residual on load from norm3's sources:
    # every output, gradient and running statistic has the bits of the path that writes it
    calls = []
    op = torch.ops.hifuse.gated_layer_norm_bn
    monkeypatch.setattr(torch.ops.hifuse, "gated_layer_norm_bn", lambda *a: calls.append(a[-2:]) or op(*a))
    y_proj, g, l, cg, sg, w3, b3, w1, w2, bn_proj, bn1, leaves = _irmlp_front_inputs(16)

    def run(on_load, k):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            bn_args = bna.apply_args(y_proj, bn_proj[k], "gelu")
            src = recompute.gated_layer_norm_source(g, cg, l, sg, w3, b3, 1e-6, bn_args)
            x, y, source = recompute.gated_layer_norm_conv2d(src, w1, (1, 1), 1, on_load=on_load)
            if on_load:
                assert isinstance(source, recompute.GatedResidual) and x.dtype == torch.float32
                args = bna.gated_apply_args(y, bn1[k], x, source.x_act, source.gated, out_dtype=torch.bfloat16)
                return recompute.linear(recompute.BatchNormApplyGated, args, w2, keep=keep_a)
            args = bna.apply_args(y, bn1[k], None, residual=x, out_dtype=torch.bfloat16)
            return recompute.linear(recompute.BatchNormApply, args, w2, rebuilt=[(source[0], 1, source[1])],
                                    keep=keep_a)

    results = []
    for k, on_load in enumerate((True, False)):
        calls.clear()
        out = run(on_load, k)
        out.float().mul(torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)).sum().backward()
        results.append([out.detach(), *[t.grad.clone() for t in leaves]])
        for t in leaves:
            t.grad = None
        # norm3 runs once each way: on load it writes conv1's dtype only, else float32 and a copy
        assert calls == [(torch.bfloat16, None) if on_load else (None, torch.bfloat16)] * 2, calls
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    for a, b in zip(bn1[0].buffers(), bn1[1].buffers()):
        assert torch.equal(a, b)


@keeps
@pytest.mark.parametrize("residual", [False, True], ids=["linear", "block"])
def test_dwconv_layer_norm_linear(keep, residual):
    # residual: the local block as one Function, x's residual gradient summed in the conv backward
    torch.manual_seed(0)
    x = _leaf(2, 5, 3, 6)
    cw, cb, lw, lb = _leaf(6, 1, 3, 3), _leaf(6), _leaf(6), _leaf(6)
    lin = _dense(6, 6)
    leaves = [x, cw, cb, lw, lb, lin.weight, lin.bias]
    args = (x, cw, cb, lw, lb, 1e-6, torch.float32)
    if residual:
        _compare(lambda: recompute.dwconv_layer_norm_linear_residual(args, lin.weight, lin.bias, keep=keep),
                 lambda: x + F.gelu(lin(dln.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6))), leaves)
    else:
        _compare(lambda: recompute.linear(recompute.DwconvLayerNorm, args, lin.weight, lin.bias, keep=keep),
                 lambda: lin(dln.dwconv_layer_norm(x, cw, cb, lw, lb, 1e-6)), leaves)


@keeps
@pytest.mark.parametrize("rows", [3, 40])  # fewer rows than channels, and more
def test_linear_pair(rows, keep):
    torch.manual_seed(0)
    x = _leaf(rows, 8)
    first, second = _dense(8, 8), _dense(8, 8)
    leaves = [x, first.weight, first.bias, second.weight, second.bias]
    _compare(lambda: recompute.linear_pair(x, first.weight, first.bias, second.weight, second.bias, keep),
             lambda: second(first(x)), leaves)


# rebuilt, the rows come from the LayerNorm backward's pass (no forward op in backward), with
# and without the GEMM's bias (its gradient from the ones column's GEMM, or none)
@pytest.mark.parametrize("with_y, stream, bias", [
    (False, torch.float32, True), (True, torch.float32, True), (True, torch.bfloat16, True),
    (True, torch.float32, False),
])
@keeps
def test_residual_layer_norm_linear(with_y, stream, bias, keep, monkeypatch):
    torch.manual_seed(0)
    y, s = (_leaf(7, 12).to(stream).detach().requires_grad_() for _ in range(2))
    lw, lb = _leaf(12), _leaf(12)
    lin = torch.nn.Linear(12, 36, bias=bias, device=DEVICE)
    leaves = [s, lw, lb, lin.weight] + ([lin.bias] if bias else []) + ([y] if with_y else [])
    forward_op, runs = torch.ops.hifuse.residual_layer_norm, []
    monkeypatch.setattr(torch.ops.hifuse, "residual_layer_norm", lambda *a: runs.append(1) or forward_op(*a))

    def fused():
        out, qkv = recompute.residual_layer_norm_linear(y if with_y else None, s, lw, lb, 1e-5, torch.float32,
                                                        lin.weight, lin.bias, keep)
        # without y, out is s itself, for s's next reader: its gradient joins the LayerNorm's
        return torch.cat([out.float() * 1.5, qkv], 1)

    def plain():
        if with_y:
            out, normed = rln.gelu_residual_layer_norm(y, s, lw, lb, 1e-5, torch.float32)
            return torch.cat([out.float() * 1.5, lin(normed)], 1)
        return torch.cat([s.float() * 1.5, lin(rln.layer_norm_to(s, lw, lb, 1e-5, torch.float32))], 1)

    _compare(fused, plain, leaves)
    assert len(runs) == 4  # fused and plain forwards, for two gradients: none in the fused backward


def saved_bytes_per_image(model: torch.nn.Module, size: int, fused: bool, rebuilds=None) -> float:
    """Bytes autograd keeps for backward per image in a training forward, parameters and
    buffers left out, each storage once: the difference between batches 4 and 2, halved, so
    per-model tensors cancel. Runs on fake tensors (shapes only, nothing computed); every saved
    tensor is held until counted, so no storage address is reused by another meanwhile. The
    model is copied: a fake forward writes garbage into real running statistics."""
    model = copy.deepcopy(model)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    totals = []
    with mode:
        params = [mode.from_tensor(t) for t in [*model.parameters(), *model.buffers()]]
        kept = {t.untyped_storage()._cdata for t in params}
        for batch in (2, 4):
            saved = []
            with hifuse.use_fused(fused), hifuse.use_rebuilds(**(rebuilds or {})), \
                    saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                model(torch.randn(batch, 3, size, size, device=DEVICE))
            storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}
            totals.append(sum(n for key, n in storages.items() if key not in kept))
    return (totals[1] - totals[0]) / 2


# HiFuse-Tiny, fp32, bytes per image: eager 23.5 MB at 64x64, fused 7.2 MB (30.5%); eager
# 229.7 MB at 224x224, fused 87.3 MB (38.0%)
@pytest.mark.parametrize("size", [64, 224])
def test_fused_training_keeps_at_most_40_percent_of_eager(size):
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    model = hifuse.create_model("hifuse_tiny", num_classes=3).to(DEVICE).train()
    eager = saved_bytes_per_image(model, size, fused=False)
    fused = saved_bytes_per_image(model, size, fused=True)
    assert fused <= 0.40 * eager, (fused / eager, fused, eager)


def _step_grads(model, x):
    net = copy.deepcopy(model)
    with hifuse.use_fused():
        net(x).square().sum().backward()
    return {k: p.grad for k, p in net.named_parameters()}, {k: b.clone() for k, b in net.named_buffers()}


def test_each_rebuild_switched_off_keeps_more_and_changes_nothing():
    """HiFuse-Tiny at 64x64: switching any rebuild off (``hifuse.use_rebuilds``) keeps more
    bytes for backward than rebuilding everything; with all of them off, every gradient and
    running statistic of a fused training step is what it was (the same ops on the same
    tensors; each rebuild alone is compared above), on a narrow HiFuse-Tiny (every block kind,
    a tenth of the interpreter's work)."""
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3).to(DEVICE).train()
    base = saved_bytes_per_image(model, 64, fused=True)
    for name in hifuse.Rebuilds.names():
        kept = saved_bytes_per_image(model, 64, fused=True, rebuilds={name: False})
        assert kept > base, (name, kept, base)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 2, 1, 1), dims=(16, 32, 64, 128),
                                num_heads=(1, 1, 2, 2)).to(DEVICE).train()
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    base_grads, base_buffers = _step_grads(model, x)
    with hifuse.use_rebuilds(False):
        grads, buffers = _step_grads(model, x)
    for k, g in base_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    for k, b in base_buffers.items():
        torch.testing.assert_close(buffers[k], b, rtol=0, atol=0, msg=lambda m: f"{k}: {m}")
