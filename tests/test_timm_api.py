"""The timm model API as a timm user calls it: num_classes=0 features, reset_classifier,
set_grad_checkpointing, no_weight_decay and pretrained_cfg."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import hifuse
from hifuse import CheckpointMismatchError, config, load_checkpoint
from hifuse import model as model_
from helpers import CPU_MODEL, triton_device_or_skip


def small(num_classes=3, **kwargs):
    torch.manual_seed(0)
    return hifuse.create_model("hifuse_tiny", num_classes=num_classes, **CPU_MODEL, **kwargs)


def test_num_classes_zero_gives_pooled_features():
    model = hifuse.create_model("hifuse_tiny", num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, model.num_features) == (2, 768)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x)))
    assert isinstance(model.get_classifier(), nn.Identity) and isinstance(model.head, nn.Identity)
    assert not [k for k in model.state_dict() if k.startswith(("conv_head.", "head."))]


def test_reset_classifier_to_features_and_back():
    model = small(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        torch.testing.assert_close(model(x), pooled)
        assert model.pretrained_cfg["num_classes"] == 0

        model.reset_classifier(5, global_pool="avg")
        assert model(x).shape == (2, 5) and model.num_classes == model.pretrained_cfg["num_classes"] == 5
    assert model.get_classifier().out_features == model.head.out_features == 5
    fresh = small(num_classes=5).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in fresh.items()}
    with pytest.raises(ValueError, match="averaging"):
        model.reset_classifier(5, global_pool="max")
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_reset_classifier_keeps_device_and_dtype():
    model = small().double()
    model.reset_classifier(6)
    assert model.conv_head.weight.dtype == model.head.weight.dtype == torch.float64


def test_num_classes_zero_and_checkpoints(tmp_path):
    """A full checkpoint fills a num_classes=0 model with drop_head=True (strict loading calls
    its heads unexpected, and says so); a features-only one fills a classifier with
    drop_head=True."""
    full = small(num_classes=7).eval()
    path = tmp_path / "full.pth"
    torch.save({"net": full.state_dict()}, path)

    features = small(num_classes=0).eval()
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(features, path)
    text = str(err.value)
    assert "unexpected keys (4)" in text and "conv_head.weight" in text and "drop_head=True" in text
    load_checkpoint(features, path, drop_head=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(features(x), full.forward_head(full.forward_features(x), pre_logits=True))

    bare = tmp_path / "features.pth"
    torch.save(features.state_dict(), bare)
    classifier = small(num_classes=3)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        load_checkpoint(classifier, bare)
    load_checkpoint(classifier, bare, drop_head=True)
    assert torch.equal(classifier.fu4.W3.conv.weight, full.fu4.W3.conv.weight)


def test_command_line_refuses_a_model_without_classifier(tmp_path):
    from hifuse.cli import models
    from hifuse.cli.errors import CliError

    state = small(num_classes=0).state_dict()
    assert models.architecture(state)["num_classes"] == 0
    path = tmp_path / "features.pth"
    torch.save(state, path)
    with pytest.raises(CliError, match="no classifier"):
        models.load_for_inference(path, None, torch.device("cpu"))


def test_flops_without_classifier():
    with_head, without = small(num_classes=5), small(num_classes=0)
    size = (3, 64, 64)
    assert hifuse.count_flops(with_head, size) - hifuse.count_flops(without, size) == 2 * with_head.num_features * 5


# --------------------------------------------------------------------------- grad checkpointing


def blocks(model):
    return sum(model.depths) * 2 + len(model.fusion_blocks)


def train_step(model, x, checkpointing, fused=False):
    """Output, parameter gradients, BatchNorm buffers and bytes autograd kept outside the
    checkpoints (parameters left out) of one training forward + backward."""
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = []
    torch.manual_seed(1)  # drop path draws the same masks
    with hifuse.use_fused(fused), saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    out.square().sum().backward()
    kept = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in saved}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    return out, grads, buffers, sum(n for k, n in kept.items() if k not in params)


def assert_same_step(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], msg=name, **tol)
    # the recomputation in backward does not count the batch a second time
    assert a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_grad_checkpointing_same_outputs_and_gradients(monkeypatch):
    model = small(drop_path_rate=0.2, local_drop_path_rate=0.2).double().train()
    start = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    plain = train_step(model, x, False)

    calls = []
    real = model_.checkpoint
    monkeypatch.setattr(model_, "checkpoint", lambda fn, *a, **k: calls.append(type(fn).__name__) or real(fn, *a, **k))
    model.load_state_dict(start)
    ckpt = train_step(model, x, True)
    assert all(m.grad_checkpointing for m in (model, *model.stages, *model.global_stages))
    assert len(calls) == blocks(model) and set(calls) == {"GlobalBlock", "LocalBlock", "HFFBlock"}
    assert_same_step(ckpt, plain, rtol=0, atol=0)
    assert ckpt[3] < plain[3] / 4, f"kept {ckpt[3]} bytes with checkpointing, {plain[3]} without"

    calls.clear()
    with torch.no_grad():  # nothing to keep for backward: no checkpoints
        model(x)
    assert not calls
    model.set_grad_checkpointing(False)
    assert not any(m.grad_checkpointing for m in (model, *model.stages, *model.global_stages))


@triton_device_or_skip()
def test_grad_checkpointing_with_fused_blocks():
    """Fused blocks run inside their checkpoints; a global stage's fused blocks are then not
    chained. Same outputs and gradients as fused without checkpoints."""
    model = small().train()
    start = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    plain = train_step(model, x, False, fused=True)
    model.load_state_dict(start)
    ckpt = train_step(model, x, True, fused=True)
    assert config.part_decisions(model) == {p: {None} for p in ("patches", "local", "attention", "fusion")}
    assert_same_step(ckpt, plain, rtol=1e-5, atol=1e-5)
    assert ckpt[3] < plain[3] / 2, f"kept {ckpt[3]} bytes with checkpointing, {plain[3]} without"

    # backward recomputes as the forward ran, whatever the switch says by then
    model.load_state_dict(start)
    eager = train_step(model, x, False)
    model.load_state_dict(start)
    with hifuse.use_fused():
        assert_same_step(train_step(model, x, True), eager, rtol=0, atol=0)


# --------------------------------------------------------------------------- weight decay, cfg


def test_no_weight_decay_names_the_bias_tables():
    model = small()
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert isinstance(names, set) and names <= params.keys()
    tables = {n for n, m in model.named_modules() if isinstance(m, model_.WindowAttention)}
    assert names == {f"{n}.relative_position_bias_table" for n in tables}
    assert len(names) == sum(model.depths)


def test_pretrained_cfg_is_the_command_lines_preprocessing():
    from torchvision import transforms as T

    from hifuse.cli.preprocess import Preprocess, eval_transform

    model = hifuse.create_model("hifuse_tiny", num_classes=7)
    cfg, pre = model.pretrained_cfg, Preprocess()
    assert model.default_cfg is cfg
    assert cfg["input_size"] == (3, 224, 224) == (3, pre.img_size, pre.img_size)
    assert cfg["interpolation"] == pre.interpolation and cfg["crop_mode"] == pre.crop == "center"
    assert cfg["mean"] == pre.mean == (0.5, 0.5, 0.5) and cfg["std"] == pre.std == (0.5, 0.5, 0.5)
    assert cfg["num_classes"] == 7 and cfg["architecture"] == "hifuse_tiny" and cfg["fixed_input_size"] is False
    # timm resizes the short side to floor(size / crop_pct); the command line to int(size * 1.143)
    for size in range(32, 2049, 32):
        assert math.floor(size / cfg["crop_pct"]) == int(size * pre.resize), size
    resize = eval_transform(pre).transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == math.floor(224 / cfg["crop_pct"]) == 256
    assert resize.interpolation.value == cfg["interpolation"]

    modules = dict(model.named_modules())
    for name in cfg["first_conv"]:
        assert isinstance(modules[name], nn.Conv2d) and modules[name].in_channels == 3
    assert cfg["classifier"][0] == "conv_head" and model.get_classifier() is modules["conv_head"]
    assert all(isinstance(modules[name], nn.Linear) for name in cfg["classifier"])
    assert hifuse.create_model("hifuse_tiny", in_chans=1).pretrained_cfg["input_size"] == (1, 224, 224)
