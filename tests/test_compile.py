"""torch.compile(fullgraph=True) traces the whole model, eager and with the fused parts on."""

from collections import Counter

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager

import hifuse
import hifuse_kernels


@pytest.mark.parametrize("fused", [False, True])
def test_whole_model_compiles_without_graph_breaks(fused):
    if fused and not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    torch.manual_seed(0)
    # one block per stage but two in the first, whose 8x8 grid at 32x32 shifts its windows:
    # every module kind and the block-to-block hand-over, at a fraction of Tiny's time (the
    # fused kernels run in the Triton interpreter on a CPU)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(2, 1, 1, 1))
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()  # other tests compiled the same forward under other settings
    with hifuse.use_fused(fused):
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        out = compiled(x)
        out.sum().backward()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x).sum().backward()  # a second step of the same shape: no recompile
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert model.fu4.residual.conv3.conv.weight.grad is not None
    assert len(graphs) == 1
    ops = Counter(str(n.target).split(".")[1] for n in graphs[0].graph.nodes
                  if n.op == "call_function" and str(n.target).startswith("hifuse."))
    if not fused:
        assert not ops
    else:
        # every hifuse op one opaque node: per global block an attention and a residual
        # LayerNorm; per local block a dwconv + LayerNorm and a GELU + residual; per fusion block
        # the LayerNorm over the concatenation, both poolings, the gated LayerNorm, the IRMLP's
        # GELU + residual and seven training BatchNorms (six in the first, which has no Updim)
        assert ops == {
            "window_attention": 5, "residual_layer_norm": 5, "patch_merge_norm": 3,
            "dwconv_layer_norm": 5, "gelu_residual": 5 + 4,
            "layer_norm_cat": 4, "channel_pool": 4, "spatial_pool": 4, "gated_layer_norm": 4,
            "batch_norm_stats": 27, "batch_norm_act": 27,
        }
