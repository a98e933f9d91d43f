"""Fused shifted-window attention against the eager global block, forward and backward.

On CPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest), in fp32.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import hifuse
from helpers import assert_model_matches_eager
from hifuse.model import GlobalBlock
from hifuse_kernels import _triton
from hifuse_kernels.window_attention import window_attention, window_attention_ref

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
TOL = dict(rtol=1e-4, atol=1e-4)

# (batch, H, W, heads, shift): the four HiFuse-Tiny stages (batch 1), padding (H or W not
# multiples of 7), non-square grids, 24 heads.
CASES = [
    (1, 56, 56, 3, 3),
    (1, 28, 28, 6, 0),
    (1, 14, 14, 12, 3),
    (1, 7, 7, 24, 3),
    (2, 10, 12, 3, 3),
    (1, 9, 5, 3, 0),
    (1, 9, 5, 3, 3),
    (2, 16, 23, 2, 3),
    (1, 7, 7, 24, 0),
]


def _op_inputs(b, h, w, heads, seed=0, dtype=torch.float32, head_dim=32, window=7):
    g = torch.Generator().manual_seed(seed)
    c = heads * head_dim
    qkv = torch.randn(b, h, w, 3 * c, generator=g).to(DEVICE, dtype).requires_grad_()
    bias = torch.randn(3 * c, generator=g).to(DEVICE, dtype).requires_grad_()
    table = (0.5 * torch.randn((2 * window - 1) ** 2, heads, generator=g)).to(DEVICE).requires_grad_()
    return qkv, bias, table


def _assert_op_matches_reference(qkv, bias, table, heads, shift, window=7):
    out = window_attention(qkv, bias, table, heads, window, shift)
    ref = window_attention_ref(qkv, bias, table, heads, window, shift)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (qkv, bias, table), grad)
    want = torch.autograd.grad(ref, (qkv, bias, table), grad)
    for name, a, r in zip(("qkv", "qkv_bias", "table"), got, want):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("b, h, w, heads, shift", CASES)
def test_op_matches_reference(tiles, b, h, w, heads, shift):
    _assert_op_matches_reference(*_op_inputs(b, h, w, heads), heads, shift)


# The backward kernels: fp32 takes keys in blocks (or whole windows) and leaves the bias
# table's sums by offset to the op; bf16/fp16 take whole windows and sum by offset in the
# kernel (window rows laid out in slots of a power of two), which the interpreter can run in
# fp32 only (its bf16 dot is broken): (keys a block, offsets summed on chip), all run here.
BACKWARDS = {"key_blocks": (16, False), "whole_windows": (64, False), "offsets_on_chip": (64, True)}


def _backward(monkeypatch, backward):
    import hifuse_kernels.window_attention as wa

    keys, on_chip = BACKWARDS[backward]
    monkeypatch.setattr(wa, "BWD_FP32_KEYS", keys)
    monkeypatch.setattr(wa, "_sums_on_chip", lambda dtype: on_chip)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("head_dim, shift", [(16, 3), (64, 0), (32, 3)])
def test_backward_loops_over_windows(device_tiles, monkeypatch, head_dim, shift, backward):
    # Few backward programs, so each sums the bias gradient over several windows (2 x 3 x 4
    # windows, 5 programs per head: the last one has fewer) at every supported head dim; the
    # finishing pass adds their partials two programs at a time (the last tile short).
    import hifuse_kernels.window_attention as wa

    monkeypatch.setattr(wa, "BWD_PROGRAMS", 5 * 2)
    monkeypatch.setattr(wa, "FINISH_BLOCK", 2 * wa.FINISH_OUTPUTS)
    _backward(monkeypatch, backward)
    _assert_op_matches_reference(*_op_inputs(2, 20, 26, 2, head_dim=head_dim, seed=3), 2, shift)


@pytest.mark.parametrize("backward", ["whole_windows", "offsets_on_chip"])
@pytest.mark.parametrize("b, h, w, heads, shift", [CASES[0], CASES[3], CASES[5], CASES[7]])
def test_whole_window_backward(device_tiles, monkeypatch, b, h, w, heads, shift, backward):
    _backward(monkeypatch, backward)
    _assert_op_matches_reference(*_op_inputs(b, h, w, heads), heads, shift)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("window, shift", [(3, 1), (5, 2), (9, 4)])
def test_other_windows(device_tiles, monkeypatch, window, shift, backward):
    # slots of 4, 8 and 16 a row on chip (3, 5 and 9 packed): padding, shift and every offset
    _backward(monkeypatch, backward)
    _assert_op_matches_reference(*_op_inputs(1, 11, 10, 2, head_dim=16, seed=5, window=window), 2, shift, window)


def _blocks(dim, heads, shift, seed=0):
    torch.manual_seed(seed)
    eager = GlobalBlock(dim, heads, 7, shift).to(DEVICE)
    with torch.no_grad():  # non-trivial norms and table
        for name, p in eager.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
        eager.attn.relative_position_bias_table.normal_(0, 0.5)
    fused = GlobalBlock(dim, heads, 7, shift).to(DEVICE)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("h, w, heads, shift", [(14, 14, 3, 3), (9, 12, 3, 3), (8, 8, 6, 0), (7, 7, 24, 3)])
def test_global_block_matches_eager(h, w, heads, shift):
    dim = heads * 32
    eager, fused = _blocks(dim, heads, shift)
    x = torch.randn(2, h * w, dim, device=DEVICE)
    xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = eager(xe, h, w)
    with hifuse.use_fused(attention=True, local=False, patches=False, fusion=False, norm=False):
        out = fused(xf, h, w)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    torch.testing.assert_close(xf.grad, xe.grad, **TOL)
    for (name, pe), (_, pf) in zip(eager.named_parameters(), fused.named_parameters()):
        if pe.grad is None:  # norm2 is never used
            assert pf.grad is None, name
            continue
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=2e-4, msg=name)


@pytest.mark.parametrize("shift", [0, 3])
def test_inference_merges_proj_and_fc1(shift):
    eager, fused = _blocks(96, 3, shift)
    x = torch.randn(2, 81, 96, device=DEVICE)
    with torch.no_grad():
        ref = eager(x, 9, 9)
        with hifuse.use_fused(attention=True, local=False, patches=False, fusion=False, norm=False):
            out = fused(x, 9, 9)
            assert "proj_fc1" in fused._hifuse_derived
            # A changed weight is seen: the merged weight is rebuilt.
            fused.fc1.weight.mul_(2)
            eager.fc1.weight.mul_(2)
            torch.testing.assert_close(fused(x, 9, 9), eager(x, 9, 9), **TOL)
    torch.testing.assert_close(out, ref, **TOL)
    # Built under autocast, the merged weight still keeps the parameters' precision.
    fused._hifuse_derived.clear()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16), hifuse.use_fused(attention=True):
        fused(x, 9, 9)
    assert fused._hifuse_derived["proj_fc1"][1][0].dtype == torch.float32


def test_whole_model_with_attention_fused():
    assert_model_matches_eager(DEVICE, attention=True, local=False, patches=False, fusion=False, norm=False)


def test_backward_is_deterministic():
    qkv, bias, table = _op_inputs(2, 16, 23, 3)
    out = window_attention(qkv, bias, table, 3, 7, 3)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (qkv, bias, table), grad, retain_graph=True)
    second = torch.autograd.grad(out, (qkv, bias, table), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_expanded_gradient():
    qkv, bias, table = _op_inputs(1, 9, 5, 3)
    window_attention(qkv, bias, table, 3, 7, 3).sum().backward()
    got = [t.grad.clone() for t in (qkv, bias, table)]
    for t in (qkv, bias, table):
        t.grad = None
    window_attention_ref(qkv, bias, table, 3, 7, 3).sum().backward()
    for a, t in zip(got, (qkv, bias, table)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=2e-4)


def test_no_qkv_bias():
    qkv, _bias, table = _op_inputs(1, 9, 12, 3)
    torch.testing.assert_close(
        window_attention(qkv, None, table, 3, 7, 3), window_attention_ref(qkv, None, table, 3, 7, 3), **TOL
    )


def test_bad_input_errors():
    qkv, bias, table = _op_inputs(1, 7, 7, 3)
    with pytest.raises(ValueError, match="must be \\(B, H, W, 3C\\)"):
        window_attention(qkv[0], bias, table, 3)
    with pytest.raises(ValueError, match="head_dim 48"):
        window_attention(qkv, bias, table, 2)
    with pytest.raises(ValueError, match="table must be"):
        window_attention(qkv, bias, table[:100], 3)
    with pytest.raises(ValueError, match="shift must be"):
        window_attention(qkv, bias, table, 3, 7, 7)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        window_attention(qkv.double(), bias, table, 3)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        window_attention(qkv.detach().transpose(1, 3).contiguous().transpose(1, 3), bias, table, 3)
    with pytest.raises(ValueError, match="qkv_bias"):
        window_attention(qkv, bias[:5], table, 3)


def test_block_falls_back_for_unsupported_head_dim(caplog):
    import logging

    from hifuse import config

    config._logged.clear()
    block = GlobalBlock(80, 2, 7, 3).to(DEVICE)  # head_dim 40
    x = torch.randn(1, 49, 80, device=DEVICE)
    ref = block(x, 7, 7)
    with caplog.at_level(logging.WARNING, logger="hifuse"), hifuse.use_fused(attention=True):
        out = block(x, 7, 7)
    assert torch.equal(out, ref)
    assert any("head_dim 40" in r.getMessage() for r in caplog.records)


def test_fused_block_compiles_without_graph_breaks():
    _eager, fused = _blocks(96, 3, 3)
    x = torch.randn(1, 81, 96, device=DEVICE, requires_grad=True)
    with hifuse.use_fused(attention=True, local=False, patches=False, fusion=False, norm=False):
        ref = fused(x, 9, 9)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        out = compiled(x, 9, 9)
        out.sum().backward()
    torch.testing.assert_close(out, ref, **TOL)
    assert fused.attn.relative_position_bias_table.grad is not None


def test_flops_match_eager():
    # With gradients (training), at 224x224, where no stage pads its windows, fused and eager
    # count the same but for the proj -> fc1 pair, which keeps only its input: fc1's weight
    # gradient comes from it through proj's weight (2c^3 per block where a block has more
    # tokens than channels, else proj's output is rebuilt, 2tc^2), and proj's bias gradient
    # comes from fc1's through fc1's weight (a vector product, 2c^2); norm1's rows, rebuilt for
    # qkv's weight gradient, carry ONES_PAD more columns (a ones column: qkv's bias gradient from
    # the same GEMM, 2 x ONES_PAD x 3c t). In inference the fused
    # block merges proj and fc1 into one GEMM, and with padding it skips the padded tokens'
    # projections: fewer FLOPs. The training counts run on fake tensors (shapes only).
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 2, 1, 1)).to(DEVICE)
    with FakeTensorMode(allow_non_fake_inputs=True):
        eager = hifuse.count_flops(model, (3, 224, 224), backward=True, by_operator=True)
        with hifuse.use_fused(attention=True, local=False, patches=False, fusion=False, norm=False):
            fused = hifuse.count_flops(model, (3, 224, 224), backward=True, by_operator=True)
    with hifuse.use_fused(attention=True, local=False, patches=False, fusion=False, norm=False):
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64, device=DEVICE))  # builds the merged weights
        inference = hifuse.count_flops(model, (3, 64, 64))
    tokens = [(224 // 4 // 2**i) ** 2 for i in range(4)]
    from hifuse_kernels.residual_layer_norm import ONES_PAD

    rebuilt = sum(d * (2 * min(t, c) * c * c + 2 * c * c + 2 * ONES_PAD * 3 * c * t)
                  for d, t, c in zip(model.depths, tokens, model.dims))
    assert sum(fused.values()) == sum(eager.values()) + rebuilt
    assert fused["window_attention"] == eager["bmm"] // 3  # forward share of eager's bmm
    assert inference < hifuse.count_flops(model, (3, 64, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b, h, w, heads, shift", [(8, 56, 56, 3, 3), (8, 28, 28, 6, 0), (8, 14, 14, 12, 3), (8, 7, 7, 24, 3), (3, 10, 12, 3, 3)])
def test_low_precision_cuda(dtype, b, h, w, heads, shift):
    qkv, bias, table = _op_inputs(b, h, w, heads)
    grad = torch.randn(b, h, w, heads * 32, device=DEVICE)
    ref64 = [t.detach().double().requires_grad_() for t in (qkv, bias, table)]
    ref = window_attention_ref(*ref64, heads, 7, shift)
    ref_grads = torch.autograd.grad(ref, ref64, grad.double())
    low = [qkv.detach().to(dtype).requires_grad_(), bias.detach().to(dtype).requires_grad_(), table]
    with torch.autocast("cuda", dtype=dtype):  # as the eager block runs it: an fp32 table, low-precision GEMMs
        pt = window_attention_ref(*low, heads, 7, shift)
    pt_grads = torch.autograd.grad(pt, low, grad.to(pt.dtype))
    out = window_attention(*low, heads, 7, shift)
    grads = torch.autograd.grad(out, low, grad.to(dtype))
    for name, a, p, r in zip(("out", "qkv", "bias", "table"), (out, *grads), (pt, *pt_grads), (ref, *ref_grads)):
        err = (a.double() - r).abs().max().item()
        pt_err = (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-5 * max(1.0, r.abs().max().item()), f"{name}: {err:.3g} vs eager {pt_err:.3g}"
