"""The op benchmarks' byte model (benchmarks/byte_model.py, conftest.time_op) against hand counts.

One case per op, forward and backward, counted as ``--count-only`` counts them (launches
recorded, not run; the GPU's launch tiles, so a reduction's partials come from the
interpreter's two programs) at batch 1 and image size 32, bf16. Each hand count says what
every launch reads and writes; a kernel that changes what it launches changes its count here
(and the results README's table, ``benchmarks/results/README.md``). Eager moves more but has
the same least bytes, in the dtypes eager gives under autocast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEVICE, triton_device_or_skip

ROOT = Path(__file__).parents[1]
BF16, F32, F64, I64 = 2, 4, 8, 8  # bytes per element

pytestmark = [pytest.mark.skipif(DEVICE != "cpu", reason="counted on a CPU: the CPU runs cover it"),
              triton_device_or_skip()]


def _gelu_residual():
    n = 8 * 8 * 288  # (1, 8, 8, 3C) at stage 1: y bf16, the stream f32
    forward = n * (BF16 + F32 + F32)  # one kernel: y, stream in; f32 sum out
    backward = n * (F32 + BF16 + BF16)  # one kernel: grad, y in; dy out; the stream's gradient is grad itself
    least = n * (BF16 + F32) + n * F32 + n * F32 + n * BF16  # in, out, its gradient, dy (not the stream's)
    return 2, forward + backward, least


def _residual_layer_norm():
    m, c = 64, 96  # (64, 96) rows at stage 1: y bf16, stream f32, weight and bias f32
    rows_in = m * c * (BF16 + F32) + 2 * c * F32
    forward = rows_in + m * c * (F32 + BF16) + 2 * m * F32  # stream f32 and rows bf16 out, mean and rstd
    # backward: grads of both outputs, y, stream, weight, mean, rstd in; dy, dstream and the
    # weight and bias partials of 2 programs out; then both summed in one launch
    partials = 2 * 2 * c * F32
    backward = m * c * (F32 + BF16 + BF16 + F32) + c * F32 + 2 * m * F32 + m * c * (BF16 + F32) + partials
    sums = 2 * 2 * c * F32 + 2 * c * F32
    least = 2 * rows_in + 2 * m * c * (F32 + BF16)  # inputs and their gradients, outputs and theirs
    return 3, forward + backward + sums, least


def _batch_norm_act():
    m, c = 64, 288  # IRMLP bn1 at stage 1: (1, 288, 8, 8) bf16 x and f32 residual, channels-last
    x, r, vec = m * c * BF16, m * c * F32, c * F32
    running = 2 * vec + I64  # running mean and var, num_batches_tracked
    # statistics over gelu(x) + r, 1 program (64 rows): f64 mean and M2 partials, f64 count
    stats = x + r + 2 * c * F64 + F64
    combine = 2 * c * F64 + F64 + 3 * vec + running  # -> mean, invstd, var; running updated
    apply = x + r + 4 * vec + m * c * F32  # mean, invstd, weight, bias; f32 out
    # backward: 2 programs of 32 rows; f64 partials of sum(dz) and sum(dz * x_hat)
    reduce = m * c * F32 + x + r + 4 * vec + 2 * 2 * c * F64
    sums = 2 * 2 * c * F64 + 4 * vec  # -> sum(dz), sum(dz * x_hat), dweight, dbias
    bwd_apply = m * c * F32 + x + r + 6 * vec + x + r  # grad, x, r, 6 vectors in; dx, dr out
    least = (x + r + 2 * vec) * 2 + 2 * running + 2 * m * c * F32  # in and gradients, running, out and its grad
    return 6, stats + combine + apply + reduce + sums + bwd_apply, least


def _dwconv_layer_norm():
    p, c = 49, 768  # (1, 7, 7, 768) at stage 4, bf16 with bf16 parameters
    x, taps, vec, stat = p * c * BF16, 9 * c * BF16, c * BF16, p * F32
    forward = x + taps + 3 * vec + x + 2 * stat  # x, taps, conv bias, LN weight and bias in; out, mean, rstd
    # backward, one kernel: 2 programs (bands of 4 rows), each with three rows of the conv
    # output's gradient (bf16, the incoming gradient's dtype) and a row of 12 C partials; the
    # LayerNorm's bias not given (its weight in its place), the other gradient of x neither (dx)
    backward = x + taps + 2 * vec + x + 2 * stat + x + 2 * 3 * 7 * c * BF16 + 2 * 12 * c * F32
    # the partials summed once, then a cast each
    glue = 2 * 12 * c * F32 + 12 * c * F32
    glue += (9 * c * F32 + taps) + 3 * (c * F32 + vec)
    least = 2 * (x + taps + 3 * vec) + 2 * x
    return 7, forward + backward + glue, least  # no zero gradients for mean and rstd


def _gated_layer_norm():
    s, c = 64, 96  # fusion stage 1, one image: g, l, x (1, 96, 8, 8) bf16, gates and parameters bf16
    part, cg, sg, vec, stat = s * c * BF16, c * BF16, s * BF16, 3 * c * BF16, s * F32
    ins = 3 * part + cg + sg + 2 * vec
    forward = ins + 3 * part + 2 * stat  # (1, 64, 288) bf16 out, mean, rstd (no zero gradients for these)
    # backward: 2 programs of 4 rows; dg, dl, dx, dsg (in the gate's dtype), channel-gate and
    # affine partials
    backward = 3 * part + (ins - vec) + 2 * stat + 3 * part + sg + 2 * c * F32 + 2 * 2 * 3 * c * F32
    sums = (2 * c * F32 + c * F32) + 2 * (2 * 3 * c * F32 + 3 * c * F32)  # channel gate, weight, bias
    casts = (c * F32 + cg) + 2 * (3 * c * F32 + vec)  # the same three to bf16
    least = 2 * ins + 2 * 3 * part
    return 6, forward + backward + sums + casts, least  # the weight's and bias's partials in one sum


def _layer_norm_cat():
    part, vec, stat = 64 * 96 * BF16, 192 * BF16, 64 * F32  # two (1, 96, 8, 8) bf16 parts, bf16 parameters
    forward = 2 * part + 2 * vec + 2 * part + 2 * stat  # one Triton kernel: parts in, (1, 192, 8, 8) bf16 out
    partials = 2 * 192 * F32  # two programs' weight (and bias) partials
    backward = 2 * part + 2 * part + vec + 2 * stat + 2 * part + 2 * partials  # grad, parts, weight, stats; dparts
    sums = 2 * (partials + 192 * F32) + 2 * (192 * F32 + vec)  # the partials summed, then cast to bf16
    least = 2 * (2 * part + 2 * vec) + 2 * 2 * part
    return 4, forward + backward + sums, least  # the weight's and bias's partials in one sum


def _layer_norm_cf():
    x, vec, stat = 96 * 64 * BF16, 96 * F32, 64 * F32  # stem: (1, 96, 8, 8) bf16, f32 parameters, f32 out
    out = 96 * 64 * F32
    forward = x + 2 * vec + out + 2 * stat
    zeros = 2 * stat
    backward = out + x + vec + 2 * stat + x + 2 * vec
    least = 2 * (x + 2 * vec) + 2 * out
    return 4, forward + zeros + backward, least


def _patch_merge_norm():
    x, vec, stat = 196 * 384 * BF16, 4 * 384 * F32, 49 * F32  # merge 3: (1, 196, 384) bf16 -> (1, 49, 1536) bf16
    forward = x + 2 * vec + x + 2 * stat  # no zero gradients: the op asks for none
    backward = x + x + vec + 2 * stat + x + 2 * vec
    least = 2 * (x + 2 * vec) + 2 * x
    return 2, forward + backward, least


def _channel_pool():
    g = 64 * 96 * BF16  # fusion stage 1: (1, 96, 8, 8) bf16; 2 chunks of 32 positions
    parts = 2 * 96  # (1, 2, 96) partial sums, maxima (f32) and positions (i32)
    kernel = g + 3 * parts * F32
    combine = 3 * parts * F32 + 2 * 96 * BF16 + 96 * F32  # partials in; average, maximum (bf16), position out
    backward = 2 * 96 * BF16 + 96 * F32 + g  # both gradients and positions in, dg out
    least = g + 2 * 96 * BF16 + 2 * 96 * BF16 + g
    return 3, kernel + combine + backward, least


def _spatial_pool():
    l, out = 64 * 96 * BF16, 2 * 64 * BF16  # fusion stage 1: (1, 96, 8, 8) bf16 -> (1, 2, 8, 8)
    return 2, (l + out) + (l + out + l), 2 * (l + out)


def _stem_layer():
    # local_down1 under bf16 autocast: (1, 96, 8, 8) f32 channels-last; LayerNorm 96, conv 96 -> 192, 2x2/2
    x, vec, w, bias = 96 * 64 * F32, 96 * F32, 192 * 96 * 4 * F32, 192 * F32
    rows = 64 * 96 * BF16
    norm = x + 2 * vec + rows + 2 * 64 * F32  # LayerNorm written in bf16 for the GEMM, as its 2x2 patches; mean, rstd
    weight = 2 * w + (w + w // 2) + (bias + bias // 2)  # weight laid out (C_out, 2*2*C_in), then both cast
    out = 16 * 192 * BF16
    gemm = bias // 2 + rows + w // 2 + out  # one addmm over the 16 patches, bias included
    forward = norm + weight + gemm
    d_bias = out + bias  # a float32 sum
    # input gradient; weight gradient in float32 from the GEMM (a GPU's out_dtype)
    d_gemm = (out + w // 2 + rows) + (out + rows + w)
    # LayerNorm backward: 2 programs; grad, x, weight, mean, rstd in; dx and partials out; one sum
    d_norm = rows + x + vec + 2 * 64 * F32 + x + 2 * 2 * vec + 2 * (2 * vec + vec)
    least = 2 * (x + 2 * vec + w + bias) + 2 * out
    return 10, forward + d_bias + d_gemm + d_norm, least  # the LayerNorm backward reads its gradient as patches


def _window_attention():
    # stage 4: qkv (1, 7, 7, 2304) bf16, qkv bias bf16, table (169, 24) f32; 24 heads of 32, one window
    qkv, qkv_bias, table, out = 49 * 2304 * BF16, 2304 * BF16, 169 * 24 * F32, 49 * 768 * BF16
    dense, lse, heads = 24 * 64 * 64 * F32, 24 * 64 * F32, 24
    # the dense bias: one gather from the table through the (64 x 64) index
    bias = table + 64 * 64 * I64 + dense
    forward = bias + qkv + qkv_bias + dense + out + lse
    # one backward program: its bias-table partial, dS summed by offset (16 x 16 a head)
    ds_part, dbias_part = heads * 16 * 16 * F32, heads * 3 * 32 * F32
    backward = qkv + qkv_bias + dense + out + lse + qkv + dbias_part + ds_part  # reads dO, not O
    # one finishing pass: the partials summed, the table's 13 x 13 offsets written as (169, heads)
    # and the qkv bias's gradient in its order and dtype
    finish = ds_part + dbias_part + table + qkv_bias
    least = 2 * (qkv + qkv_bias + table) + 2 * out
    return 4, forward + backward + finish, least


# node id -> hand count (launches, bytes moved, least bytes), forward and backward in bf16
CASES = {
    "test_residual.py::test_gelu_residual[bf16-fwd_bwd-fused-s1]": _gelu_residual,
    "test_residual.py::test_residual_layer_norm[bf16-fwd_bwd-fused-s1]": _residual_layer_norm,
    "test_batch_norm_act.py::test_batch_norm_act[bf16-fwd_bwd-fused-irmlp_bn1-fu1]": _batch_norm_act,
    "test_dwconv_layer_norm.py::test_dwconv_layer_norm[bf16-fwd_bwd-fused-stage4]": _dwconv_layer_norm,
    "test_fusion_block.py::test_gated_layer_norm[bf16-fwd_bwd-fused-fu1]": _gated_layer_norm,
    "test_fusion_block.py::test_layer_norm_cat[bf16-fwd_bwd-fused-2-fu1]": _layer_norm_cat,
    "test_fusion_block.py::test_gate_pooling[bf16-fwd_bwd-fused-channel_pool-fu1]": _channel_pool,
    "test_fusion_block.py::test_gate_pooling[bf16-fwd_bwd-fused-spatial_pool-fu1]": _spatial_pool,
    "test_layer_norm_cf.py::test_layer_norm_cf[stem96-bf16-fwd_bwd-native]": _layer_norm_cf,
    "test_patch_merge_norm.py::test_patch_merge_norm[bf16-fwd_bwd-native-merge3]": _patch_merge_norm,
    "test_patch_conv.py::test_stem_layer[bf16-fwd_bwd-fused-local_down1]": _stem_layer,
    "test_window_attention.py::test_window_attention[bf16-fwd_bwd-fused-stage4]": _window_attention,
}


def _eager(node: str) -> str:
    return node.replace("-fused-", "-eager-").replace("-native", "-eager")


def _subprocess_env() -> dict:
    """This environment for a pytest of its own: without an xdist worker's variables, which
    make pytest-benchmark disable itself (and write no JSON) in the child too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return {**env, "TRITON_INTERPRET": "1"}


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict:
    """extra_info of every case, fused and eager, counted by the benchmarks themselves."""
    out = tmp_path_factory.mktemp("count") / "counted.json"
    nodes = [f"benchmarks/{n}" for node in CASES for n in (node, _eager(node))]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *nodes, "-p", "no:cacheprovider", "-q", "--count-only", "--batch", "1",
         "--image-size", "32", "--dtype", "bf16", f"--benchmark-json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=_subprocess_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    benches = json.loads(out.read_text())["benchmarks"]
    return {b["fullname"].removeprefix("benchmarks/"): b["extra_info"] for b in benches}


@pytest.mark.parametrize("node", list(CASES))
def test_bytes_match_the_hand_count(counted, node):
    launches, moved, least = CASES[node]()
    info = counted[node]
    assert (info["launches"], info["bytes_moved"], info["bytes_min"]) == (launches, moved, least)


def test_backward_reads_the_inputs_again(counted):
    """``bytes_read_min``, the forward's reads a backward alone reads again: the spatial
    pooling's l, (1, 96, 8, 8) bf16."""
    node = "test_fusion_block.py::test_gate_pooling[bf16-fwd_bwd-fused-spatial_pool-fu1]"
    assert counted[node]["bytes_read_min"] == 64 * 96 * BF16


@pytest.mark.parametrize("node", list(CASES))
def test_eager_has_the_same_least_bytes(counted, node):
    fused, eager = counted[node], counted[_eager(node)]
    assert eager["bytes_min"] == fused["bytes_min"]
    assert eager["bytes_moved"] > fused["bytes_min"]


def test_multi_tensor_launches():
    """ATen's multi-tensor apply (the batched weight casts): a launch per 64 tensors or 320
    blocks of 65536 elements for two lists, a tensor cut at a full launch going on in the next."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from byte_model import multi_tensor_launches

    small = [torch.empty(10)] * 65
    assert multi_tensor_launches(small) == 2
    assert multi_tensor_launches(small[:64]) == 1
    assert multi_tensor_launches([torch.empty(320 * 65536 + 1)]) == 2
    assert multi_tensor_launches([torch.empty(0), torch.empty(1)]) == 1
    assert multi_tensor_launches(small[:110], depth=1) == 1


def test_a_launch_counts_its_keyword_tensors():
    """A Triton launch's bytes are those of every tensor it is given, keyword ones included
    (a kernel's optional pointers, e.g. the BatchNorm apply's shortcut), each tensor once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from byte_model import Ledger, RecordLaunches

    ledger = Ledger()
    a, b = torch.empty(10), torch.empty(6, dtype=torch.bfloat16)
    RecordLaunches(ledger)(test_a_launch_counts_its_keyword_tensors)[(1,)](a, 3, S=b, T=a, BLOCK=4)
    assert ledger.total("bytes", "triton") == 10 * 4 + 6 * 2


def test_a_gemm_launch_counts_its_tile_traffic():
    """A Triton launch of a kernel whose module models its tile traffic (``tile_traffic``)
    adds it to ``Ledger.tile_bytes``, its positional arguments named as the kernel names them."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from byte_model import Ledger, RecordLaunches

    from hifuse_kernels import gelu_linear as gl

    ledger = Ledger()
    h, w, out = torch.empty(300, 1152, dtype=torch.bfloat16), torch.empty(96, 1152), torch.empty(300, 96)
    tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32)
    RecordLaunches(ledger)(gl._fwd_kernel)[(3,)](h, w, w, out, 300, 96, 1152, HAS_BIAS=False, PRECISION="tf32",
                                                 UPCAST=False, **tiles)
    want = gl.tile_traffic("_fwd_kernel", dict(H=h, W=w, B=w, OUT=out, M=300, N=96, K=1152, HAS_BIAS=False, **tiles))
    assert ledger.tile_bytes == {"gelu_linear._fwd_kernel": want}
    assert ledger.total("tile_bytes") == want == 300 * 1152 * 2 + 3 * 96 * 1152 * 4 + 300 * 96 * 4
