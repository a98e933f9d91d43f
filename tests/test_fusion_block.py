"""The fused fusion block (HFFBlock) against eager: each position, train and eval, autocast, AdamW steps."""

import copy

import pytest
import torch

import hifuse
from helpers import assert_autocast_within_eager_error, assert_model_matches_eager, feature
from hifuse.model import ConvBN, HFFBlock
from hifuse_kernels import _triton
from hifuse_kernels.layer_norm_cat import unsupported_reason as layer_norm_cat_unsupported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is not None,
    reason=str(_triton.unsupported_reason(torch.zeros(1, device=DEVICE))),
)
FUSION_ONLY = dict(attention=False, local=False, patches=False, fusion=True, norm=False)


# --------------------------------------------------------------------------- the block


def _randomise_batch_norms(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))


def _block_inputs(dim, b, h, w, with_f, channels_last):
    shapes = [(b, dim, h, w), (b, dim, h, w)] + ([(b, dim // 2, 2 * h, 2 * w)] if with_f else [])
    return [feature(s, k, channels_last, device=DEVICE) for k, s in enumerate(shapes)]


def _assert_within_eager_error(a, e, r, name):
    """a (fused) as close to r (float64) as e (eager float32) is, twice over, plus 1e-5 of the
    scale: a training BatchNorm over a few pixels (fu3, fu4: six) magnifies rounding, and on
    the GPU eager's own gradients stray from float64 by more than a fixed bound allows."""
    err, eager_err = (a - r).abs().max().item(), (e - r).abs().max().item()
    assert err <= 2 * eager_err + 1e-5 * max(1.0, r.abs().max().item()), (
        f"{name}: max error {err:.3g} against float64, eager's {eager_err:.3g}, max {r.abs().max().item():.3g}")


def _skip_without_native():
    reason = layer_norm_cat_unsupported([torch.zeros(1, 1, 1, 1, device=DEVICE)], torch.ones(1, device=DEVICE))
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("position", ["fu1", "fu2", "fu3", "fu4"])
@pytest.mark.parametrize("train", [True, False])
def test_block_matches_eager(position, train):
    _skip_without_native()
    dim, b, h, w = {"fu1": (96, 2, 7, 5), "fu2": (192, 1, 3, 5), "fu3": (384, 2, 3, 1), "fu4": (768, 2, 3, 1)}[position]
    torch.manual_seed(0)
    eager = HFFBlock(dim).to(DEVICE)
    _randomise_batch_norms(eager)
    eager.train(train)
    fused = copy.deepcopy(eager)
    exact = copy.deepcopy(eager).double()
    inputs = _block_inputs(dim, b, h, w, position != "fu1", channels_last=position != "fu2")
    inputs_f = [t.detach().clone().requires_grad_() for t in inputs]
    inputs_d = [t.detach().double().requires_grad_() for t in inputs]
    ref = eager(*inputs)
    ref64 = exact(*inputs_d)
    with hifuse.use_fused(**FUSION_ONLY):
        out = fused(*inputs_f)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _assert_within_eager_error(out, ref, ref64, "output")
    grad = torch.randn_like(ref)
    ref.backward(grad)
    ref64.backward(grad.double())
    out.backward(grad)
    for k, (a, t, d) in enumerate(zip(inputs_f, inputs, inputs_d)):
        _assert_within_eager_error(a.grad, t.grad, d.grad, f"input {k}")
    for (name, pe), pf, pd in zip(eager.named_parameters(), fused.parameters(), exact.parameters()):
        assert (pe.grad is None) == (pf.grad is None), name
        if pe.grad is not None:
            _assert_within_eager_error(pf.grad, pe.grad, pd.grad, name)
    for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("autocast", [False, True])
def test_biases_before_batch_norms_get_zero_gradients(autocast):
    """In training the batch mean takes the bias of each convolution before a BatchNorm away:
    its gradient is zero, which the fused block writes as zero in the parameter's dtype (eager
    writes the rounding residue of a column sum that cancels), and the other gradients stay
    eager's."""
    _skip_without_native()
    torch.manual_seed(0)
    block = HFFBlock(32).to(DEVICE).train()
    _randomise_batch_norms(block)
    inputs = _block_inputs(32, 2, 6, 5, True, channels_last=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast), hifuse.use_fused(**FUSION_ONLY):
        block(*inputs).float().square().sum().backward()
    biased = [n for n, m in block.named_modules() if isinstance(m, ConvBN) and m.bn is not None and m.conv.bias is not None]
    assert sorted(biased) == ["Updim", "W", "W3", "W_g", "W_l"]
    for name in biased:
        bias = getattr(block, name).conv.bias
        if name == "W":  # the first block's projection; this one has Updim's part: W3
            assert bias.grad is None
            continue
        assert bias.grad.dtype == bias.dtype and torch.equal(bias.grad, torch.zeros_like(bias)), name


def test_block_with_stochastic_depth():
    """Active drop path: the shortcut is added after it (not by the IRMLP's last pass); the same
    samples dropped as eager's for the same random state."""
    _skip_without_native()
    torch.manual_seed(0)
    eager = HFFBlock(32, drop_path=0.5).to(DEVICE).train()
    _randomise_batch_norms(eager)
    fused = copy.deepcopy(eager)
    inputs = _block_inputs(32, 4, 3, 5, True, channels_last=True)
    inputs_f = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(1)
    ref = eager(*inputs)
    torch.manual_seed(1)
    with hifuse.use_fused(**FUSION_ONLY):
        out = fused(*inputs_f)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    out.backward(grad)
    for k, (a, t) in enumerate(zip(inputs_f, inputs)):
        torch.testing.assert_close(a.grad, t.grad, rtol=1e-4, atol=1e-4, msg=f"input {k}")


@pytest.mark.parametrize("train", [True, False])
def test_block_under_autocast(train):
    _skip_without_native()
    torch.manual_seed(0)
    block = HFFBlock(32).to(DEVICE).train(train)
    _randomise_batch_norms(block)
    inputs = _block_inputs(32, 2, 6, 5, True, channels_last=True)
    assert_autocast_within_eager_error(block, inputs, **FUSION_ONLY)


def test_adamw_steps_match_eager():
    _skip_without_native()
    torch.manual_seed(0)
    eager = HFFBlock(32).to(DEVICE)
    fused = copy.deepcopy(eager)
    gen = torch.Generator().manual_seed(1)
    # Biases in front of a training-mode BatchNorm (and norm1's, which only feeds one) have an
    # exactly zero gradient; AdamW would blow its rounding noise up to steps of about lr in
    # either implementation (and the running means with them), so they are frozen in both.
    frozen = {f"{n}.conv.bias" for n, m in eager.named_modules() if getattr(m, "bn", None) is not None}
    for model in (eager, fused):
        for n, p in model.named_parameters():
            if n in frozen or n in ("norm1.bias", "norm2.bias"):
                p.requires_grad_(False)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (eager, fused)]
    for _step in range(3):
        l, g, f = (torch.randn(s, generator=gen).to(DEVICE) for s in ((2, 32, 5, 3), (2, 32, 5, 3), (2, 16, 10, 6)))
        for model, opt, fuse in zip((eager, fused), opts, (False, True)):
            opt.zero_grad()
            with hifuse.use_fused(fuse, **FUSION_ONLY):
                loss = model(l, g, f).square().mean()
            loss.backward()
            opt.step()
    for (name, pe), pf in zip(eager.named_parameters(), fused.parameters()):
        if pe.requires_grad:
            # AdamW moves every entry by about lr per step whatever its gradient's size, so
            # entries with near-zero gradients move apart by rounding: allow 2% of that path.
            torch.testing.assert_close(pf, pe, rtol=0, atol=0.02 * 3 * 1e-3, msg=name)
    for (name, be), bf in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(bf, be, rtol=1e-4, atol=1e-6, msg=name)


def test_whole_model_with_fusion_fused():
    _skip_without_native()
    assert_model_matches_eager(DEVICE, **FUSION_ONLY)


def test_block_falls_back_with_reason(caplog, monkeypatch):
    from hifuse_kernels import gated_layer_norm

    monkeypatch.setattr(gated_layer_norm, "unsupported_reason", lambda *a: "no gating kernels here")
    block = HFFBlock(32).to(DEVICE)
    l, g = torch.randn(1, 32, 3, 3, device=DEVICE), torch.randn(1, 32, 3, 3, device=DEVICE)
    ref = block(l, g)
    with caplog.at_level("WARNING", logger="hifuse"), hifuse.use_fused(**FUSION_ONLY):
        out = block(l, g)
    if layer_norm_cat_unsupported([l], torch.ones(32, device=DEVICE)) is None:
        assert "no gating kernels here" in caplog.text
    torch.testing.assert_close(out, ref)


def test_flops_match_eager():
    _skip_without_native()
    model = hifuse.create_model("hifuse_tiny", num_classes=3).to(DEVICE)
    eager = hifuse.count_flops(model, (3, 64, 64), backward=True)
    with hifuse.use_fused(**FUSION_ONLY):
        assert hifuse.count_flops(model, (3, 64, 64), backward=True) == eager


def test_block_compiles_without_graph_breaks():
    _skip_without_native()
    block = HFFBlock(32).to(DEVICE)
    l, g, f = (torch.randn(s, device=DEVICE, requires_grad=True) for s in ((1, 32, 3, 5), (1, 32, 3, 5), (1, 16, 6, 10)))
    ref = block(l, g, f)
    with hifuse.use_fused(**FUSION_ONLY):
        out = torch.compile(block, fullgraph=True, backend="aot_eager")(l, g, f)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert block.residual.conv1.conv.weight.grad is not None
