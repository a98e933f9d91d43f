"""NaN and Inf travel through every fused op and the fused model as they do in eager: a NaN
pixel gives NaN logits and NaN gradients, so a diverging training run does not go unnoticed."""

import pytest
import torch
import torch.nn.functional as F

import hifuse
import hifuse_kernels
from hifuse_kernels import _triton
from hifuse_kernels.batch_norm_act import batch_norm_act, batch_norm_act_ref
from hifuse_kernels.channel_pool import channel_pool, channel_pool_ref
from hifuse_kernels.dwconv_layer_norm import dwconv_layer_norm, dwconv_layer_norm_ref
from hifuse_kernels.gated_layer_norm import gated_layer_norm, gated_layer_norm_ref
from hifuse_kernels.gelu_residual import gelu_residual, gelu_residual_ref
from hifuse_kernels.layer_norm_cat import layer_norm_cat, layer_norm_cat_ref
from hifuse_kernels.layer_norm_cf import layer_norm_cf, layer_norm_cf_ref
from hifuse_kernels.patch_conv import patch_conv, patch_conv_ref
from hifuse_kernels.patch_merge_norm import patch_merge_norm, patch_merge_norm_ref
from hifuse_kernels.residual_layer_norm import gelu_residual_layer_norm, gelu_residual_layer_norm_ref
from hifuse_kernels.spatial_pool import spatial_pool, spatial_pool_ref
from hifuse_kernels.window_attention import window_attention, window_attention_ref

from helpers import whole_model_kwargs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is None
NATIVE = hifuse_kernels.native_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="no Triton device")
needs_native = pytest.mark.skipif(not NATIVE, reason="native extension not built")
VALUES = [float("nan"), float("inf"), float("-inf")]


def _poison(t: torch.Tensor, value: float, where=(0,)) -> torch.Tensor:
    t = t.detach().clone()
    t.view(-1)[list(where)] = value
    return t.requires_grad_()


def _assert_same(out, ref, what="output", covers=False):
    """Non-finite values where eager has them, the rest close. Outputs: non-finite in exactly
    the same places. Gradients (``covers``): non-finite at least where eager's are (never
    hidden); a fused reduction may spread a NaN further than eager's (the window attention's
    bias-table gradient sums each head's scores in one product)."""
    out, ref = out.detach().double(), ref.detach().double()
    bad, ref_bad = ~out.isfinite(), ~ref.isfinite()
    if covers:
        assert bool((bad | ~ref_bad).all()), f"{what}: a non-finite value of eager's is finite here"
    else:
        assert torch.equal(bad, ref_bad), f"{what}: non-finite values in other places than eager's"
    both = ~bad & ~ref_bad
    torch.testing.assert_close(out[both], ref[both], rtol=1e-4, atol=1e-4, msg=what)


def _compare(fused, ref, inputs, seed=0):
    """fused(*inputs) against ref(*inputs): outputs, then the gradient of every input that
    requires one, for the same upstream gradient."""
    torch.manual_seed(seed)
    a = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    b = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    out, expect = fused(*a), ref(*b)
    outs = out if isinstance(out, tuple) else (out,)
    expects = expect if isinstance(expect, tuple) else (expect,)
    for k, (o, e) in enumerate(zip(outs, expects)):
        _assert_same(o, e, f"output {k}")
    grads = [torch.randn_like(e) for e in expects]
    leaves_a = [t for t in a if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves_b = [t for t in b if isinstance(t, torch.Tensor) and t.requires_grad]
    ga = torch.autograd.grad(outs, leaves_a, grads, allow_unused=True)
    gb = torch.autograd.grad(expects, leaves_b, grads, allow_unused=True)
    for k, (x, y) in enumerate(zip(ga, gb)):
        if y is not None:
            _assert_same(x, y, f"gradient {k}", covers=True)


def _rand(*shape):
    return torch.randn(*shape, device=DEVICE)


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_channel_pool(value):
    g = _poison(_rand(2, 8, 5, 7), value, where=(3, 40))
    _compare(channel_pool, channel_pool_ref, [g])


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_spatial_pool(value):
    l = _poison(_rand(2, 8, 5, 7), value, where=(3, 40))
    _compare(spatial_pool, spatial_pool_ref, [l])


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_gated_layer_norm(value):
    n, c, h, w = 2, 8, 3, 5
    g = _poison(_rand(n, c, h, w), value)
    args = [g, _rand(n, c, 1, 1), _rand(n, c, h, w), _rand(n, 1, h, w), _rand(n, c, h, w),
            torch.ones(3 * c, device=DEVICE), torch.zeros(3 * c, device=DEVICE)]
    args = [t.requires_grad_() for t in args]
    _compare(gated_layer_norm, gated_layer_norm_ref, args)


@needs_triton
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("value", VALUES)
def test_batch_norm_act(act, value):
    x = _poison(_rand(2, 8, 4, 6), value)
    bn_a, bn_b = torch.nn.BatchNorm2d(8).to(DEVICE), torch.nn.BatchNorm2d(8).to(DEVICE)
    _compare(lambda t: batch_norm_act(t, bn_a, act), lambda t: batch_norm_act_ref(t, bn_b, act), [x])
    _assert_same(bn_a.running_mean, bn_b.running_mean, "running_mean")
    _assert_same(bn_a.running_var, bn_b.running_var, "running_var")


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_gelu_residual_and_residual_layer_norm(value):
    y, s = _poison(_rand(2, 6, 16), value), _rand(2, 6, 16).requires_grad_()
    _compare(gelu_residual, gelu_residual_ref, [y, s])
    w, b = torch.ones(16, device=DEVICE).requires_grad_(), torch.zeros(16, device=DEVICE).requires_grad_()
    _compare(lambda *a: gelu_residual_layer_norm(*a, 1e-5, torch.float32),
             lambda *a: gelu_residual_layer_norm_ref(*a, 1e-5, torch.float32), [y, s, w, b])


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_dwconv_layer_norm(value):
    c = 16
    x = _poison(_rand(1, 5, 6, c), value, where=(2 * c + 3,))
    args = [x, _rand(c, 1, 3, 3), _rand(c), torch.ones(c, device=DEVICE), torch.zeros(c, device=DEVICE)]
    args = [args[0]] + [t.requires_grad_() for t in args[1:]]
    _compare(dwconv_layer_norm, dwconv_layer_norm_ref, args)


@needs_triton
@pytest.mark.parametrize("value", VALUES)
def test_window_attention(value):
    heads, c = 2, 32
    qkv = _poison(_rand(1, 9, 9, 3 * c), value, where=(5,))
    args = [qkv, _rand(3 * c).requires_grad_(), (0.1 * _rand(169, heads)).requires_grad_(), heads, 7, 3]
    _compare(window_attention, window_attention_ref, args)


@needs_native
@pytest.mark.parametrize("value", VALUES)
def test_native_layer_norms(value):
    x = _poison(_rand(2, 8, 3, 5), value)
    w, b = torch.ones(8, device=DEVICE).requires_grad_(), torch.zeros(8, device=DEVICE).requires_grad_()
    _compare(layer_norm_cf, lambda *a: layer_norm_cf_ref(*a, 1e-6), [x, w, b])
    other = _rand(2, 4, 3, 5).requires_grad_()
    w2, b2 = torch.ones(12, device=DEVICE).requires_grad_(), torch.zeros(12, device=DEVICE).requires_grad_()
    _compare(lambda p, q, ww, bb: layer_norm_cat([p, q], ww, bb), lambda p, q, ww, bb: layer_norm_cat_ref([p, q], ww, bb),
             [x, other, w2, b2])
    tokens = _poison(_rand(2, 15, 8), value)
    w4, b4 = torch.ones(32, device=DEVICE).requires_grad_(), torch.zeros(32, device=DEVICE).requires_grad_()
    _compare(lambda t, ww, bb: patch_merge_norm(t, 3, 5, ww, bb), lambda t, ww, bb: patch_merge_norm_ref(t, 3, 5, ww, bb),
             [tokens, w4, b4])


@pytest.mark.parametrize("value", VALUES)
def test_patch_conv(value):
    x = _poison(_rand(1, 8, 8, 3), value)
    _compare(patch_conv, patch_conv_ref, [x, _rand(6, 3, 4, 4).requires_grad_(), _rand(6).requires_grad_()])


@needs_triton
@needs_native
@pytest.mark.parametrize("train, value", [(True, float("nan")), (False, float("inf"))])
def test_whole_model_carries_non_finite_input(train, value):
    """One bad pixel: logits and every parameter gradient non-finite where eager's are."""
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, **whole_model_kwargs(DEVICE)).to(DEVICE).train(train)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    x[0, 1, 10, 20] = value

    def run(fused):
        model.zero_grad()
        with hifuse.use_fused(fused):
            out = model(x)
            F.cross_entropy(out, torch.tensor([1, 2], device=DEVICE)).backward()
        return out.detach(), {n: p.grad.isfinite().all().item() for n, p in model.named_parameters() if p.grad is not None}

    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref, ref_finite = run(False)
    model.load_state_dict(state)  # the eager step moved the running statistics
    out, finite = run(True)
    # the bad image's logits are non-finite, the other image's are not (eval) or are (training:
    # the batch statistics mix the images)
    assert torch.equal(out.isfinite(), ref.isfinite()) and not ref[0].isfinite().any()
    assert finite == ref_finite
    assert not all(ref_finite.values())
