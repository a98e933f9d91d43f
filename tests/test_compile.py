"""torch.compile(fullgraph=True) traces the whole model, eager and with the fused parts on."""

import pytest
import torch

import hifuse
import hifuse_kernels


@pytest.mark.parametrize("fused", [False, True])
def test_whole_model_compiles_without_graph_breaks(fused):
    if fused and not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    torch.manual_seed(0)
    # one block per stage but two in the second, whose 8x8 grid at 64x64 still shifts windows:
    # every module kind and the block-to-block hand-over, at half the compile time of Tiny
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 2, 1, 1))
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    with hifuse.use_fused(fused):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert model.fu4.residual.conv3.conv.weight.grad is not None
