"""torch.compile(fullgraph=True) traces the whole model, eager and with the fused parts on."""

from collections import Counter

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager
from torch._dynamo.utils import counters

import hifuse
import hifuse_kernels


# every hifuse op one opaque node of the training graph: per global block an attention and a
# residual LayerNorm (the stage's first norm1 too); per local block a dwconv + LayerNorm and a
# GELU + residual; per fusion block the LayerNorm over the concatenation, both poolings, the
# gated LayerNorm, the IRMLP's GELU + residual, its conv3 taking the GELU on load and seven
# training BatchNorms (six in the first, which has no Updim)
TRAINING_OPS = {
    "window_attention": 5, "window_attention_dense_bias": 5, "residual_layer_norm": 5, "patch_merge_norm": 3,
    "dwconv_layer_norm": 5, "gelu_residual": 5 + 4,
    "layer_norm_cat_rows_bn": 4, "channel_pool": 4, "channel_gate": 4, "spatial_pool": 4, "gated_layer_norm_bn": 4,
    "gelu_linear": 4,
    # W_l's and W_g's BatchNorms are applied by layer_norm_cat_rows_bn, W/W3's BatchNorm + GELU by
    # gated_layer_norm_bn (no batch_norm_act of their own)
    "batch_norm_stats": 27, "batch_norm_act": 27 - 8 - 4,
}


def _hifuse_ops(gm) -> Counter:
    """hifuse ops of the forward: the graph's own nodes and those of the forward bodies of the
    autograd.Functions Dynamo traced (``hifuse_kernels.recompute``)."""
    return Counter(
        str(n.target).split(".")[1]
        for name, m in gm.named_modules() if name == "" or name.startswith("fwd_body")
        for n in m.graph.nodes if n.op == "call_function" and str(n.target).startswith("hifuse.")
    )


def _small_model(**kwargs):
    # one block per stage but two in the first, whose 8x8 grid at 32x32 shifts its windows:
    # every module kind and the block-to-block hand-over, at a fraction of Tiny's time (the
    # fused kernels run in the Triton interpreter on a CPU)
    torch.manual_seed(0)
    return hifuse.create_model("hifuse_tiny", num_classes=3, depths=(2, 1, 1, 1), **kwargs)


def test_eager_model_compiles_without_graph_breaks():
    model = _small_model()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()  # other tests compiled the same forward under other settings
    with hifuse.use_fused(False):
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
        out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert len(graphs) == 1 and not _hifuse_ops(graphs[0])


def test_fused_model_compiles_with_inductor():
    """Inductor over the fused model on the GPU (its CPU backend where there is none, the
    kernels then plain custom ops), as a user calls torch.compile:
    one graph per mode, every hifuse op an opaque node, no recompile on a second step of
    the same shape. A training step (forward, backward, then an uncompiled SGD step) gives the
    uncompiled fused model's output and gradients; inference too. Narrow stages (the Triton
    interpreter's time grows with the widths; every module kind is kept).

    Gradients are held to their own scale and the largest one's: at 32x32 the last fusion
    block's training BatchNorms see two values per channel, which magnify rounding (Inductor
    orders fp32 sums its own way), and the biases before BatchNorms have gradients that are
    zero but for rounding."""
    if not hifuse_kernels.native_available():
        pytest.skip("native extension not built")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = hifuse_kernels.triton_unsupported_reason(torch.zeros(1, device=device))
    if reason is not None:  # the model would run eager: no hifuse op to find in the graph
        pytest.skip(reason)
    from torch._inductor.compile_fx import compile_fx

    narrow = {"dims": (32, 64, 128, 256), "num_heads": (2, 4, 8, 16)}
    model = _small_model(**narrow).to(device)
    twin = _small_model(**narrow).to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    with hifuse.use_fused():
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        outs = [compiled(x), twin(x)]
        for out in outs:
            out.sum().backward()
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        largest = max(p.grad.abs().max().item() for p in twin.parameters() if p.grad is not None)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None)
            if q.grad is not None:
                atol = 1e-2 * q.grad.abs().max().item() + 1e-4 * largest
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol)
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled(x)  # a second step of the same shape: no recompile
        assert len(graphs) == 1
        assert _hifuse_ops(graphs[0]) == TRAINING_OPS

        twin.load_state_dict(model.state_dict())
        model.eval()
        twin.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-5)
    assert len(graphs) == 2
    # eval mode folds every BatchNorm into its convolution: no BatchNorm op is left, and the
    # IRMLP's GELU + residual (in training the prologue of its bn1 op) is a pass of its own
    inference = {k: v for k, v in TRAINING_OPS.items() if not k.startswith(("batch_norm", "layer_norm_cat", "gated"))}
    inference["gelu_residual"] += 4
    inference["layer_norm_cat_rows"] = 4
    inference["gated_layer_norm"] = 4
    assert _hifuse_ops(graphs[1]) == inference

def _gpu_model(**kwargs):
    torch.manual_seed(0)
    return hifuse.create_model("hifuse_tiny", num_classes=3, **kwargs).cuda()


def _warm_up(model, static_in, calls):
    """The README's warm-up before a capture: calls on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            model(static_in)
    torch.cuda.current_stream().wait_stream(side)


def _capture(model, static_in):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)
    return graph, static_out


@pytest.mark.gpu
def test_cuda_graph_replays_fused_inference():
    """The README's hand-captured CUDA graph: warm-up on a side stream, capture, replay with
    new inputs copied in; each replay equals the uncaptured fused forward."""
    model = _gpu_model().eval()
    static_in = torch.zeros(4, 3, 224, 224, device="cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    with hifuse.use_fused(), torch.inference_mode(), autocast:
        _warm_up(model, static_in, 3)
        graph, static_out = _capture(model, static_in)
        for seed in (1, 2):
            x = torch.randn(4, 3, 224, 224, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            static_in.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_out, model(x), rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_capture_caches_nothing():
    """A weight-derived tensor that is stale when the capture starts is computed in the graph
    (replays use the new weights) and never cached: it holds nothing until the first replay."""
    model = _gpu_model().eval()
    static_in = torch.randn(2, 3, 64, 64, device="cuda")
    with hifuse.use_fused(), torch.inference_mode():
        _warm_up(model, static_in, 2)
        model.fu4.W3.bn.running_var.mul_(2)
        stale = dict(model.fu4.W3._hifuse_derived)
        graph, static_out = _capture(model, static_in)
        assert all(model.fu4.W3._hifuse_derived[k] is v for k, v in stale.items())
        graph.replay()
        torch.testing.assert_close(static_out, model(static_in), rtol=0, atol=0)


@pytest.mark.gpu
def test_reduce_overhead_trains_and_infers_fused():
    """torch.compile(mode="reduce-overhead") over the fused model: training steps give the
    uncompiled fused gradients; a new batch size gets its own graph (the results say so:
    a graph recorded for 4 images replayed for 2 could not give 2 images' logits)."""
    model = _gpu_model()
    reference = _gpu_model()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    torch._dynamo.reset()
    counters.clear()
    with hifuse.use_fused(), torch.autocast("cuda", dtype=torch.bfloat16):
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            compiled(x).float().sum().backward()
            reference(x).float().sum().backward()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
        model.eval()
        reference.eval()
        with torch.inference_mode():
            for batch in (4, 4, 2, 4):
                out = compiled(x[:batch]).clone()
                assert out.shape[0] == batch
                torch.testing.assert_close(out, reference(x[:batch]), rtol=2e-2, atol=2e-3)
    # Inductor runs a graph without CUDA graphs when it holds what a capture cannot (a CPU
    # tensor, a host copy, ...): it says why in its log, and the step loses what graphs save
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
