"""The eager model against the published model's layout, sizes, FLOPs and methods."""

import pytest
import torch

import hifuse
from helpers import official

VARIANTS = ["tiny", "small", "base"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_matches_published(variant):
    model = hifuse.create_model(f"hifuse_{variant}", num_classes=7)
    mine = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert mine == official(variant)["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == official(variant)["params"]


@pytest.mark.parametrize(
    "variant, params, gmac",
    [("tiny", 56_277_000, 8.17), ("small", 59_857_848, 8.90), ("base", 70_600_392, 11.07)],
)
def test_depthwise_irmlp_sizes(variant, params, gmac):
    model = hifuse.create_model(f"hifuse_{variant}", num_classes=7, irmlp="depthwise")
    assert sum(p.numel() for p in model.parameters()) == params
    assert round(hifuse.count_flops(model.eval()) / 2e9, 2) == gmac


def test_tiny_flops_by_operator():
    model = hifuse.create_model("hifuse_tiny", num_classes=7).eval()
    flops = hifuse.count_flops(model, (3, 224, 224), by_operator=True)
    published = {"convolution": 31.70, "addmm": 2.78, "mm": 0.35, "bmm": 0.22}  # GFLOP, 2 decimals
    assert set(flops) == set(published)
    for op, gflop in published.items():
        assert flops[op] / 1e9 == pytest.approx(gflop, abs=0.006), op  # addmm: 2.7745 here
    assert round(sum(flops.values()) / 1e9, 2) == 35.04
    assert hifuse.count_flops(model, (2, 3, 224, 224)) == 2 * sum(flops.values())


def test_count_flops_leaves_model_as_it_was():
    model = hifuse.create_model("hifuse_tiny", num_classes=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fwd = hifuse.count_flops(model, (3, 64, 64))
    both = hifuse.count_flops(model, (3, 64, 64), backward=True)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 2.5 * fwd < both < 3.5 * fwd  # backward costs about twice the forward


def test_count_flops_rejects_bad_size():
    model = hifuse.create_model("hifuse_tiny", num_classes=3)
    with pytest.raises(ValueError, match="input_size"):
        hifuse.count_flops(model, (224, 224))


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown HiFuse variant"):
        hifuse.create_model("hifuse_huge")
    with pytest.raises(ValueError, match="irmlp"):
        hifuse.create_model("hifuse_tiny", irmlp="grouped")


def test_create_model_names_are_forgiving():
    assert isinstance(hifuse.create_model("HiFuse-Tiny", num_classes=2), hifuse.HiFuse)


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (160, 160), (96, 224)])
def test_any_multiple_of_32(size):
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(100, 224), (224, 230), (16, 16)])
def test_other_sizes_rejected(size):
    model = hifuse.create_model("hifuse_tiny", num_classes=5)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, *size))


def test_bad_rank_rejected():
    model = hifuse.create_model("hifuse_tiny", num_classes=5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 224, 224))


def test_shift_masks_cached_per_size():
    from hifuse_kernels.reference import shift_mask

    a = shift_mask(14, 21, 7, 3, torch.device("cpu"))
    assert shift_mask(14, 21, 7, 3, torch.device("cpu")) is a
    b = shift_mask(21, 14, 7, 3, torch.device("cpu"))
    assert b.shape == (6, 49, 49) and a.shape == (6, 49, 49)
    assert not torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, -100.0}


def test_shift_mask_regions():
    from hifuse_kernels.reference import shift_mask

    # A 7x7 grid: one window; rows/cols split at 0 and 4 give 4 regions of sizes 4x4, 4x3, 3x4, 3x3.
    mask = shift_mask(7, 7, 7, 3, torch.device("cpu"))[0]
    token = lambda r, c: r * 7 + c  # noqa: E731
    assert mask[token(0, 0), token(3, 3)] == 0
    assert mask[token(0, 0), token(4, 0)] == -100
    assert mask[token(6, 6), token(4, 4)] == 0
    assert mask[token(6, 6), token(3, 6)] == -100


def test_relative_position_index():
    from hifuse_kernels.reference import relative_position_index

    idx = relative_position_index(7)
    assert idx.shape == (49, 49) and idx.dtype == torch.int64
    assert idx[0, 0] == 6 * 13 + 6
    assert idx[0, 48] == 0  # token (0,0) vs (6,6): (0-6+6)*13 + (0-6+6)
    assert idx[48, 0] == 168


def test_timm_style_methods():
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 768, 2, 2)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, 768)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        torch.testing.assert_close(model.conv_head(pre), model(x))
    model.reset_classifier(11)
    assert model.get_classifier().out_features == 11 and model.head.out_features == 11
    assert model(x).shape == (2, 11)


def test_train_step_updates_everything():
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3)
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    unused = ("norm.", "head.", "fu1.Updim.", "fu1.norm1.", "fu1.W3.")
    unused += tuple(f"fu{i}.{part}." for i in (2, 3, 4) for part in ("norm2", "W"))
    for name, p in model.named_parameters():
        used = not (name.startswith(unused) or (name.startswith("layers") and ".norm2." in name))
        assert (p.grad is not None) == used, name


def test_drop_path_option():
    model = hifuse.create_model("hifuse_tiny", num_classes=3, drop_path_rate=0.2)
    rates = [getattr(b.drop_path, "rate", 0.0) for s in model.global_stages for b in s.blocks]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.2) < 1e-6
    with pytest.raises(ValueError):
        hifuse.create_model("hifuse_tiny", drop_path_rate=1.5)


def test_hff_block_shape_errors():
    block = hifuse.HFFBlock(96)
    l = torch.randn(1, 96, 8, 8)
    with pytest.raises(ValueError, match="g"):
        block(l, torch.randn(1, 96, 8, 7))
    with pytest.raises(ValueError, match="f must be"):
        block(l, l, torch.randn(1, 48, 8, 8))
    with pytest.raises(ValueError, match="l must be"):
        block(torch.randn(1, 95, 8, 8), l)
