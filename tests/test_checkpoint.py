"""Reading checkpoints in the published formats, and clear errors when they do not fit."""

import pytest
import torch

import hifuse
from hifuse import CheckpointMismatchError, load_checkpoint


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=7)
    # Make running statistics and counters non-default so they are checked too.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(5)
    return model


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrap", ["bare", "net", "state_dict", "module_prefix"])
def test_formats(tmp_path, source, wrap):
    state = source.state_dict()
    obj = {
        "bare": state,
        "net": {"net": state, "optimizer": {}, "epoch": 3, "lr_schedule": {}},
        "state_dict": {"state_dict": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    target = hifuse.create_model("hifuse_tiny", num_classes=7)
    load_checkpoint(target, path)
    assert _same(source, target)


def test_mismatch_lists_everything(tmp_path, source):
    state = dict(source.state_dict())
    state.pop("fu1.W_l.conv.weight")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    target = hifuse.create_model("hifuse_tiny", num_classes=3)
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(target, path)
    text = str(err.value)
    assert "missing keys (1)" in text and "fu1.W_l.conv.weight" in text
    assert "unexpected keys (1)" in text and "extra.weight" in text
    assert "conv_head.weight: checkpoint (7, 768) vs model (3, 768)" in text
    assert "head.bias: checkpoint (7,) vs model (3,)" in text
    assert "drop_head=True" in text


def test_drop_head_for_fine_tuning(tmp_path, source):
    path = tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), path)
    target = hifuse.create_model("hifuse_tiny", num_classes=3)
    head_before = target.conv_head.weight.clone()
    load_checkpoint(target, path, drop_head=True)
    assert torch.equal(target.conv_head.weight, head_before)
    assert torch.equal(target.fu4.W3.conv.weight, source.fu4.W3.conv.weight)
    assert torch.equal(target.layers2.blocks[1].attn.relative_position_bias_table,
                       source.layers2.blocks[1].attn.relative_position_bias_table)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointMismatchError, match="not a state_dict"):
        load_checkpoint(hifuse.create_model("hifuse_tiny"), path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module, not weights
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(hifuse.create_model("hifuse_tiny"), path)
