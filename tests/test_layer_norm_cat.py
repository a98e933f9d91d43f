"""hifuse::layer_norm_cat (LayerNorm over a concatenation never built) against the eager formula."""

import pytest
import torch
from torch.library import opcheck

import hifuse_kernels
from hifuse_kernels._triton import ONES_PAD
from hifuse_kernels.layer_norm_cat import layer_norm_cat, layer_norm_cat_ref, rows_path
from hifuse_kernels.layer_norm_cf import layer_norm_cf
from helpers import DEVICE, DEVICES, other_device, triton_device_or_skip

pytestmark = pytest.mark.skipif(not hifuse_kernels.native_available(), reason="native extension not built")

# (N, H, W) and the parts' channels: the fusion blocks' norm2 (C, C) and norm1 (C, C, C),
# uneven splits, a single part, odd and prime sides, 1x1, batch 1
CASES = [
    ((1, 7, 5), (96, 96)),
    ((2, 3, 13), (24, 24, 24)),
    ((1, 1, 1), (8, 3, 5)),
    ((3, 5, 2), (1, 30)),
    ((2, 4, 3), (77,)),
    ((1, 2, 3), (768, 768, 768)),
]
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _inputs(nhw, widths, dtype, fmts, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n, h, w = nhw
    parts = [
        (torch.randn(n, c, h, w, generator=g, dtype=dtype) * (k + 1) + k).to(device, memory_format=FORMATS[f])
        for k, (c, f) in enumerate(zip(widths, fmts))
    ]
    total = sum(widths)
    weight = (1 + 0.1 * torch.randn(total, generator=g, dtype=dtype)).to(device)
    bias = (0.1 * torch.randn(total, generator=g, dtype=dtype)).to(device)
    return [t.requires_grad_() for t in parts], weight.requires_grad_(), bias.requires_grad_()


def _grads(fn, parts, weight, bias, grad):
    out = fn(parts, weight, bias, 1e-6)
    return (out, *torch.autograd.grad(out, (*parts, weight, bias), grad))


@pytest.mark.parametrize("nhw, widths", CASES)
@pytest.mark.parametrize("fmt", ["nchw", "nhwc", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_cpu(nhw, widths, fmt, dtype):
    fmts = [("nhwc" if k % 2 else "nchw") if fmt == "mixed" else fmt for k in range(len(widths))]
    parts, w, b = _inputs(nhw, widths, dtype, fmts)
    grad = torch.randn(nhw[0], sum(widths), *nhw[1:], dtype=dtype)
    got = _grads(layer_norm_cat, parts, w, b, grad)
    ref = _grads(layer_norm_cat_ref, parts, w, b, grad)
    names = ["out"] + [f"dpart{k}" for k in range(len(parts))] + ["dweight", "dbias"]
    for name, a, r in zip(names, got, ref):
        torch.testing.assert_close(a, r, **TOL[dtype], msg=name)
    if "nhwc" in fmts and min(nhw[1:]) > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_same_as_layer_norm_cf_of_the_concatenation():
    # the native path (NCHW parts) runs layer_norm_cf's kernels
    parts, w, b = _inputs((2, 5, 3), (96, 96, 96), torch.float32, ["nchw"] * 3)
    assert not rows_path(parts, w, b)
    whole = torch.cat([t.detach() for t in parts], 1).requires_grad_()
    grad = torch.randn(whole.shape)
    got = _grads(layer_norm_cat, parts, w, b, grad)
    one = _grads(lambda p, *a: layer_norm_cf(p[0], *a), [whole], w, b, grad)
    assert torch.equal(got[0], one[0])
    assert torch.equal(torch.cat(got[1:4], 1), one[1])
    assert torch.equal(got[4], one[2]) and torch.equal(got[5], one[3])


@pytest.mark.parametrize("fmt", FORMATS)
def test_out_dtype(fmt):
    # bf16 parts (as under autocast): the result in bf16 is the fp32 result rounded once
    parts, w, b = _inputs((2, 3, 5), (8, 4, 6), torch.float32, [fmt] * 3)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in parts]
    out = layer_norm_cat(low, w, b, out_dtype=torch.bfloat16)
    ref = layer_norm_cat_ref([t.float() for t in low], w, b)  # the eager formula in bf16 would round its statistics
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=1e-2, atol=1e-2)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    got = torch.autograd.grad(out, (*low, w, b), grad)
    want = torch.autograd.grad(ref, (*low, w, b), grad.float())
    for k, (a, r) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2, msg=f"gradient {k}")
    with pytest.raises(TypeError, match="out_dtype"):
        layer_norm_cat(parts, w, b, out_dtype=torch.bfloat16)
    opcheck(torch.ops.hifuse.layer_norm_cat.default, ([t.detach() for t in low], w.detach(), b.detach(), 1e-6, torch.bfloat16))


def test_expanded_gradient_and_determinism():
    parts, w, b = _inputs((2, 5, 7), (16, 8), torch.float64, ["nchw", "nchw"])
    layer_norm_cat(parts, w, b).sum().backward()
    got = [t.grad.clone() for t in (*parts, w, b)]
    for t in (*parts, w, b):
        t.grad = None
    layer_norm_cat_ref(parts, w, b).sum().backward()
    for a, t in zip(got, (*parts, w, b)):
        torch.testing.assert_close(a, t.grad, **TOL[torch.float64])
    grad = torch.randn(2, 24, 5, 7)
    parts, w, b = _inputs((2, 5, 7), (16, 8), torch.float32, ["nhwc", "nhwc"])
    first, second = _grads(layer_norm_cat, parts, w, b, grad), _grads(layer_norm_cat, parts, w, b, grad)
    assert all(torch.equal(a, c) for a, c in zip(first, second))


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    parts, w, b = _inputs((2, 3, 5), (8, 4, 6), torch.float32, [fmt] * 3)
    opcheck(torch.ops.hifuse.layer_norm_cat.default, (parts, w, b, 1e-6, torch.float32))
    parts = [t.detach() for t in parts]
    mean_rstd = torch.ops.hifuse.layer_norm_cat(parts, w.detach(), b.detach(), 1e-6, torch.float32)[1:]
    opcheck(torch.ops.hifuse.layer_norm_cat_backward.default, (torch.randn(2, 18, 3, 5), parts, w.detach(), *mean_rstd),
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compiles_without_graph_breaks():
    parts, w, b = _inputs((2, 3, 5), (8, 4), torch.float32, ["nhwc", "nhwc"])
    ref = layer_norm_cat_ref(parts, w, b)
    out = torch.compile(layer_norm_cat, fullgraph=True, backend="aot_eager")(parts, w, b)
    out.sum().backward()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert all(t.grad is not None for t in parts)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_errors(device):
    parts, w, b = _inputs((2, 3, 3), (4, 4), torch.float32, ["nchw", "nchw"], device)
    ones = lambda n: torch.ones(n, device=device)  # noqa: E731
    with pytest.raises(ValueError, match="one device"):
        layer_norm_cat([parts[0], parts[1].detach().to(other_device(device))], w, b)
    with pytest.raises(ValueError, match="one device"):
        layer_norm_cat(parts, w.detach().to(other_device(device)), b)
    with pytest.raises(ValueError, match="share N, H and W"):
        layer_norm_cat([parts[0], parts[1][:, :, :2]], w, b)
    with pytest.raises(ValueError, match="1 to 3 parts"):
        layer_norm_cat(parts * 2, ones(16), 0 * ones(16))
    with pytest.raises(ValueError, match="C = 8"):
        layer_norm_cat(parts, ones(7), 0 * ones(7))
    with pytest.raises(TypeError, match="share a dtype"):
        layer_norm_cat([parts[0], parts[1].double()], w, b)
    with pytest.raises(TypeError, match="list of tensors"):
        layer_norm_cat(parts[0], w, b)
    with pytest.raises(ValueError, match="4-D"):
        layer_norm_cat([parts[0][0]], ones(4), 0 * ones(4))


@pytest.mark.native_errors
@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_checks(device):
    if not hifuse_kernels._ext.has_kernel("layer_norm_cat", device):
        pytest.skip(f"no {device} kernel")
    op = torch.ops.hifuse.layer_norm_cat
    x = torch.randn(2, 4, 3, 3, device=device)
    ones = lambda n: torch.ones(n, device=device)  # noqa: E731
    with pytest.raises(RuntimeError, match="share N, H and W"):
        op([x, x[:, :, :2]], ones(8), 0 * ones(8), 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="C = 8"):
        op([x, x], ones(4), 0 * ones(4), 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="out_dtype must be the inputs' dtype or float32"):
        op([x, x], ones(8), 0 * ones(8), 1e-6, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("nhw, widths", CASES + [((128, 56, 56), (96, 96, 96)), ((128, 7, 7), (768, 768))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_cuda(nhw, widths, dtype):
    if not hifuse_kernels._ext.has_kernel("layer_norm_cat", "cuda"):
        pytest.skip("extension built without CUDA ops")
    parts64, w64, b64 = _inputs(nhw, widths, torch.float64, ["nhwc"] * len(widths), "cuda")
    grad64 = torch.randn(nhw[0], sum(widths), *nhw[1:], dtype=torch.float64, device="cuda")
    ref = _grads(layer_norm_cat_ref, parts64, w64, b64, grad64)

    def cast(t):
        return t.detach().to(dtype).requires_grad_()

    parts, w, b = [cast(t) for t in parts64], cast(w64), cast(b64)
    got = _grads(layer_norm_cat, parts, w, b, grad64.to(dtype))
    pt = _grads(layer_norm_cat_ref, parts, w, b, grad64.to(dtype))
    for k, (a, p, r) in enumerate(zip(got, pt, ref)):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, r.abs().max().item()), f"output {k}: {err:.3g} vs eager {pt_err:.3g}"


def test_no_optional_argument_beside_a_tensor_list():
    """An optional argument left None in an op that takes a Tensor[] breaks the op's autograd
    under torch 2.11 (the backward's structure no longer matches the inputs'): such ops take
    every argument explicitly."""
    if not hifuse_kernels.native_available():
        pytest.skip(hifuse_kernels.native_load_error())
    schemas = [s for s in torch._C._jit_get_all_schemas() if s.name.startswith("hifuse::")]
    assert any(s.name == "hifuse::layer_norm_cat" for s in schemas)
    for schema in schemas:
        types = [str(a.type) for a in schema.arguments]
        if "List[Tensor]" in types or "Tensor[]" in types:
            optional = [a.name for a in schema.arguments if str(a.type).endswith("?") or "Optional" in str(a.type)]
            assert not optional, (schema, optional)


@triton_device_or_skip()
@pytest.mark.parametrize("nhw, widths", [((1, 7, 5), (96, 96)), ((2, 3, 13), (24, 24, 24)), ((1, 1, 3), (40,)),
                                         ((2, 3, 3), (128, 128, 128))])
def test_triton_rows_path(nhw, widths):
    """Equal-width channels-last parts take the Triton kernels (``rows_path``): outputs and
    gradients as the eager formula's, channels-last, and a backward that repeats bit for bit."""
    parts, w, b = _inputs(nhw, widths, torch.float32, ["nhwc"] * len(widths), device=DEVICE)
    assert rows_path(parts, w, b)
    grad = torch.randn(nhw[0], sum(widths), *nhw[1:]).to(DEVICE, memory_format=torch.channels_last)
    got = _grads(layer_norm_cat, parts, w, b, grad)
    ref = _grads(layer_norm_cat_ref, parts, w, b, grad)
    for k, (a, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, r, **TOL[torch.float32], msg=f"output {k}")
    if min(nhw[1:]) > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
    again = _grads(layer_norm_cat, parts, w, b, grad)
    assert all(torch.equal(a, r) for a, r in zip(got, again))


@triton_device_or_skip()
def test_triton_rows_path_bf16():
    # bf16 parts written in bf16: the fp32 LayerNorm of the parts, rounded once
    parts, w, b = _inputs((2, 4, 5), (32, 32, 32), torch.float32, ["nhwc"] * 3, device=DEVICE)
    low = [t.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for t in parts]
    assert rows_path(low, w, b)
    out = layer_norm_cat(low, w, b, out_dtype=torch.bfloat16)
    ref = layer_norm_cat_ref([t.float() for t in low], w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2 ** -8, atol=1e-5)


@triton_device_or_skip()
@pytest.mark.parametrize("nhw, widths", [((1, 7, 5), (96, 96)), ((2, 3, 13), (24, 24, 24)), ((1, 1, 3), (40,)),
                                         ((2, 3, 3), (128, 128, 128))])
def test_triton_rows_backward_rebuilds_the_output(nhw, widths):
    """``backward_rebuilding``: the backward's pass also writes the forward's output, the same
    bits; the gradients those of ``backward``."""
    from hifuse_kernels import layer_norm_cat as lnc

    parts, w, b = _inputs(nhw, widths, torch.float32, ["nhwc"] * len(widths), device=DEVICE)
    parts = [t.detach().to(torch.bfloat16).contiguous(memory_format=torch.channels_last) for t in parts]
    w, b = w.detach(), b.detach()
    assert lnc.rebuilds_in_backward(parts, w, b)
    out, stats = lnc.forward(parts, w, b, 1e-6, torch.bfloat16)
    grad = torch.randn(out.shape).to(DEVICE, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    rows = grad.permute(0, 2, 3, 1).reshape(-1, sum(widths))
    rebuilt, (dparts, dw, db) = lnc.backward_rebuilding(rows, parts, w, b, stats, torch.bfloat16)
    assert torch.equal(rebuilt, out.permute(0, 2, 3, 1).reshape(-1, sum(widths)))
    plain = lnc.backward(grad, parts, w, b, stats)
    for a, r in zip([*dparts, dw, db], [*plain[0], plain[1], plain[2]]):
        assert torch.equal(a, r)
    # ones: the same rows, then a ones column and zeros to ONES_PAD; the gradients unchanged
    padded, (dparts, dw, db) = lnc.backward_rebuilding(rows, parts, w, b, stats, torch.bfloat16, ones=True)
    assert padded.shape == (rows.shape[0], sum(widths) + ONES_PAD)
    assert torch.equal(padded[:, :sum(widths)], rebuilt)
    pad = torch.zeros(rows.shape[0], ONES_PAD, dtype=torch.bfloat16, device=DEVICE)
    pad[:, 0] = 1
    assert torch.equal(padded[:, sum(widths):], pad)
    for a, r in zip([*dparts, dw, db], [*plain[0], plain[1], plain[2]]):
        assert torch.equal(a, r)


@triton_device_or_skip()
@pytest.mark.parametrize("nhw, widths", [((1, 3, 5), (64, 64, 64)), ((1, 1, 3), (1024, 1024)), ((2, 2, 3), (96, 96))])
def test_triton_rows_ones_column_with_the_gpus_tiles(device_tiles, nhw, widths):
    """``ones`` with the GPU's tiles: where a row's channel block has no spare lanes (widths a
    power of two) the same tile takes half the rows, or at one row a store of its own writes the
    column; the rows and the parts' gradients as without it, the parameters' summed in another
    order where the tile changed."""
    from hifuse_kernels import layer_norm_cat as lnc

    parts, w, b = _inputs(nhw, widths, torch.float32, ["nhwc"] * len(widths), device=DEVICE)
    w, b = w.detach(), b.detach()
    parts = [t.detach() for t in parts]
    out, stats = lnc.forward(parts, w, b, 1e-6, torch.float32)
    rows = torch.randn(out.permute(0, 2, 3, 1).reshape(-1, sum(widths)).shape).to(DEVICE)
    rebuilt, grads = lnc.backward_rebuilding(rows, parts, w, b, stats, torch.float32)
    padded, grads_ones = lnc.backward_rebuilding(rows, parts, w, b, stats, torch.float32, ones=True)
    assert torch.equal(padded[:, :sum(widths)], rebuilt)
    pad = torch.zeros(rows.shape[0], ONES_PAD, device=DEVICE)
    pad[:, 0] = 1
    assert torch.equal(padded[:, sum(widths):], pad)
    for a, r in zip(grads_ones[0], grads[0]):
        assert torch.equal(a, r)
    for a, r in zip(grads_ones[1:], grads[1:]):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def _bn_inputs(nhw, widths, mask, dtype, seed=1):
    """Parts as BatchNorm inputs y where ``mask`` says (each with its mean, invstd, weight and
    bias), and the parts themselves: ``hifuse::batch_norm_act``'s output of y there."""
    g = torch.Generator().manual_seed(seed)
    n, h, w = nhw
    c = widths[0]
    ys, parts, bn, raw = [], [], [], []
    for k in range(len(widths)):
        y = torch.randn(n, h, w, c, generator=g).to(DEVICE, dtype).permute(0, 3, 1, 2)
        ys.append(y)
        if mask >> k & 1:
            stats = [torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g),
                     torch.randn(c, generator=g)]
            stats = [t.to(DEVICE) for t in stats]
            rows = y.permute(0, 2, 3, 1).reshape(-1, c)
            out = torch.ops.hifuse.batch_norm_act(rows, None, *stats, 0, h, w, False, None)
            parts.append(out.view(n, h, w, c).permute(0, 3, 1, 2))
            bn += stats
            raw.append((rows, *stats))
        else:
            parts.append(y)
    return ys, parts, bn, raw


@triton_device_or_skip()
@pytest.mark.parametrize("nhw, widths, mask, dtype", [
    ((1, 7, 5), (96, 96), 3, torch.bfloat16), ((2, 3, 13), (24, 24, 24), 6, torch.float32),
    ((1, 1, 3), (40,), 1, torch.bfloat16), ((2, 5, 3), (17, 17, 17), 5, torch.float32),
    ((1, 4, 4), (100, 100, 100), 7, torch.bfloat16),
])
def test_triton_rows_batch_norm_on_load(nhw, widths, mask, dtype):
    """``forward_bn`` and ``backward_bn_rebuilding``: parts given as BatchNorm inputs and
    applied on load give the bits of the parts applied first (``hifuse::batch_norm_act``), in
    the output, the statistics, the rebuilt output and every gradient; the BatchNorm sums their
    pass reduces are those ``hifuse::batch_norm_act_backward`` reduces, and its apply pass
    given them (``batch_norm_act_backward_summed``) writes the same dy."""
    from hifuse_kernels import layer_norm_cat as lnc

    ys, parts, bn, raw = _bn_inputs(nhw, widths, mask, dtype)
    _, w, b = _inputs(nhw, widths, torch.float32, ["nhwc"] * len(widths), device=DEVICE)
    w, b = w.detach(), b.detach()
    assert lnc.rows_path(ys, w, b)
    out, stats = lnc.forward(parts, w, b, 1e-6, dtype)
    got, got_stats = lnc.forward_bn(ys, bn, mask, w, b, 1e-6, dtype)
    assert torch.equal(got, out) and all(torch.equal(a, r) for a, r in zip(got_stats, stats))
    rows = torch.randn(out.permute(0, 2, 3, 1).reshape(-1, sum(widths)).shape).to(DEVICE, dtype)
    rebuilt, grads = lnc.backward_rebuilding(rows, parts, w, b, stats, dtype)
    rebuilt_bn, grads_bn, sums = lnc.backward_bn_rebuilding(rows, ys, bn, mask, w, b, stats, dtype)
    assert torch.equal(rebuilt_bn, rebuilt)
    for a, r in zip([*grads_bn[0], *grads_bn[1:]], [*grads[0], *grads[1:]]):
        assert torch.equal(a, r)
    # with a ones column after the rebuilt rows: the rest as is
    padded, grads_bn, sums_ones = lnc.backward_bn_rebuilding(rows, ys, bn, mask, w, b, stats, dtype, ones=True)
    assert torch.equal(padded[:, :sum(widths)], rebuilt) and torch.equal(sums_ones, sums)
    assert torch.equal(padded[:, sum(widths)], torch.ones_like(padded[:, 0]))
    assert not padded[:, sum(widths) + 1:].any() and padded.shape[1] == sum(widths) + ONES_PAD
    for a, r in zip([*grads_bn[0], *grads_bn[1:]], [*grads[0], *grads[1:]]):
        assert torch.equal(a, r)
    # without the BatchNorm sums (under torch.compile, where nothing hands them on): the rest as is
    rebuilt_bn, grads_bn, no_sums = lnc.backward_bn_rebuilding(rows, ys, bn, mask, w, b, stats, dtype, sums=False)
    assert torch.equal(rebuilt_bn, rebuilt) and no_sums.numel() == 0
    for a, r in zip([*grads_bn[0], *grads_bn[1:]], [*grads[0], *grads[1:]]):
        assert torch.equal(a, r)
    c = widths[0]
    assert sums.shape == (2, len(raw) * c) and sums.dtype == torch.float32
    j = 0
    for k, dpart in enumerate(grads[0]):
        if not mask >> k & 1:
            continue
        y, mean, invstd, bw, bb = raw[j]
        dz = dpart.permute(0, 2, 3, 1).reshape(-1, c)
        dy, _, dbw, dbb, _ = torch.ops.hifuse.batch_norm_act_backward(dz, y, None, mean, invstd, bw, bb, 0, *nhw[1:],
                                                                      False)
        sum_dz, sum_dzxh = sums[0, j * c:(j + 1) * c], sums[1, j * c:(j + 1) * c]
        # the same terms summed in float32 tiles, then float64 (the BatchNorm's in float64): equal
        # to rounding
        torch.testing.assert_close(sum_dz, dbb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sum_dzxh, dbw, rtol=1e-5, atol=1e-5)
        dy_given = torch.ops.hifuse.batch_norm_act_backward_summed(dz, y, mean, invstd, bw, bb, dbb, dbw, 0, *nhw[1:],
                                                                   False)
        assert torch.equal(dy_given, dy)
        j += 1


@triton_device_or_skip()
def test_triton_rows_batch_norm_opcheck_and_errors():
    ys, _, bn, _ = _bn_inputs((1, 3, 4), (24, 24, 24), 6, torch.float32)
    _, w, b = _inputs((1, 3, 4), (24, 24, 24), torch.float32, ["nhwc"] * 3, device=DEVICE)
    w, b = w.detach(), b.detach()
    rows = [t.permute(0, 2, 3, 1).reshape(-1, 24) for t in ys]
    opcheck(torch.ops.hifuse.layer_norm_cat_rows_bn.default, (rows, bn, 6, w, b, 1e-6, torch.float32))
    out, mean, rstd = torch.ops.hifuse.layer_norm_cat_rows_bn(rows, bn, 6, w, b, 1e-6, torch.float32)
    grad = torch.randn(out.shape, device=DEVICE)
    for sums, ones in ((True, False), (False, False), (True, True)):
        opcheck(torch.ops.hifuse.layer_norm_cat_rows_bn_backward.default,
                (grad, rows, bn, 6, w, mean, rstd, b, torch.float32, sums, ones))
    for ones in (False, True):
        opcheck(torch.ops.hifuse.layer_norm_cat_rows_backward_rebuild.default,
                (grad, rows, w, mean, rstd, b, torch.float32, ones))
    with pytest.raises(ValueError, match="bit mask"):
        torch.ops.hifuse.layer_norm_cat_rows_bn(rows, bn, 8, w, b, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="four tensors"):
        torch.ops.hifuse.layer_norm_cat_rows_bn(rows, bn[:4], 6, w, b, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="vector"):
        torch.ops.hifuse.layer_norm_cat_rows_bn(rows, [bn[0][:5], *bn[1:]], 6, w, b, 1e-6, torch.float32)
    with pytest.raises(ValueError, match="float32"):
        torch.ops.hifuse.layer_norm_cat_rows_bn(rows, [bn[0].double(), *bn[1:]], 6, w, b, 1e-6, torch.float32)
    y = rows[1]
    with pytest.raises(ValueError, match="sum_dz"):
        torch.ops.hifuse.batch_norm_act_backward_summed(y, y, *bn[:4], bn[0][:3], bn[1], 0, 3, 4, False)
