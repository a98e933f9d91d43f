"""Channels-last end to end: a fused training step copies no activation to change its layout.

Every copy_/clone/contiguous (a layout-only ``_to_copy`` too) of a tensor the size of an
activation is counted by a dispatch mode during one fused training step on fake tensors
(shapes only, so Tiny runs at 224x224 here). The design needs exactly these:
- forward, without autocast only: the patch GEMMs' gathers (``patch_conv``) of each local
  downsample's input and of the image for the patch embedding and the stem (under autocast
  the downsamples' LayerNorm writes its rows in the patches' order and the stems gather the
  image's patches inside their kernel, ``patch_conv_norm``);
- backward: those gathers' gradients for the three downsamples, without autocast (the image
  has none), and one dense copy of the classifier mean's broadcast gradient at the last stage
  (two while the shortcut was added by a pass of its own after conv3's BatchNorm).
"""

from collections import Counter

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import hifuse
import hifuse_kernels
from helpers import DEVICE, triton_device_or_skip

pytestmark = triton_device_or_skip()

COPIES = {"copy_", "clone", "contiguous"}


class CountCopies(TorchDispatchMode):
    """Counts copies of tensors with at least ``least`` elements and not the size of a
    parameter (weight casts, weight layouts for GEMMs and weight gradients are not
    activations), forward and backward apart."""

    def __init__(self, least: int, parameter_sizes: set):
        super().__init__()
        self.least, self.parameter_sizes = least, parameter_sizes
        self.calls = Counter()
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        layout_only = name == "_to_copy" and kwargs.get("dtype", source.dtype if source is not None else None) == getattr(source, "dtype", None)
        if source is not None and (name in COPIES or layout_only):
            if source.numel() >= self.least and source.numel() not in self.parameter_sizes:
                self.calls[self.phase, name, tuple(source.shape)] += 1
        return func(*args, **kwargs)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_step_copies_only_what_the_design_needs(autocast):
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    model = hifuse.create_model("hifuse_tiny", num_classes=3).to(DEVICE).train()
    batch, size = 2, 224
    sizes = {p.numel() for p in model.parameters()}
    counter = CountCopies(batch * model.dims[-1] * (size // 32) ** 2, sizes)
    with FakeTensorMode(allow_non_fake_inputs=True), hifuse.use_fused():
        x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast), counter:
            loss = model(x).float().sum()
            counter.phase = "backward"
            loss.backward()
    s = size // 4
    dims = model.dims
    want = Counter({
        ("forward", "clone", (batch, s, s, 4, 4, 3)): 0 if autocast else 2,  # patch embedding and stem
        ("forward", "clone", (batch, s // 2, s // 2, 2, 2, dims[0])): 0 if autocast else 1,
        ("forward", "clone", (batch, s // 4, s // 4, 2, 2, dims[1])): 0 if autocast else 1,
        ("forward", "clone", (batch, s // 8, s // 8, 2, 2, dims[2])): 0 if autocast else 1,
        ("backward", "clone", (batch, s // 2, 2, s // 2, 2, dims[0])): 0 if autocast else 1,
        ("backward", "clone", (batch, s // 4, 2, s // 4, 2, dims[1])): 0 if autocast else 1,
        ("backward", "clone", (batch, s // 8, 2, s // 8, 2, dims[2])): 0 if autocast else 1,
        ("backward", "clone", (batch, s // 8, s // 8, dims[3])): 1,
    })
    assert counter.calls == want
