"""gelu_linear (a GEMM whose input's GELU is taken on load) against eager."""

import pytest
import torch
from helpers import DEVICE, check_grads, recorded_launches, triton_device_or_skip

from hifuse_kernels.gelu_linear import gelu_linear, gelu_linear_ref

pytestmark = triton_device_or_skip()


def _inputs(m, k, n, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = 2 * torch.randn(m, k, generator=g)  # both sides of GELU's bend
    w = torch.randn(n, k, generator=g) / k**0.5
    b = 0.1 * torch.randn(n, generator=g) if bias else None
    out = [h.to(DEVICE, dtype), w.to(DEVICE), None if b is None else b.to(DEVICE)]
    return [t if t is None else t.requires_grad_() for t in out]


# (rows, K, N): one row, sizes off every tile, the IRMLP's 12C -> C at Tiny's first width, N past 256
@pytest.mark.parametrize("m, k, n, bias", [(1, 16, 3, True), (37, 48, 10, False), (130, 200, 96, True),
                                           (70, 1152, 96, False), (33, 64, 300, True)])
def test_matches_reference(tiles, m, k, n, bias):
    h, w, b = _inputs(m, k, n, bias)
    inputs = [t for t in (h, w, b) if t is not None]
    check_grads(gelu_linear(h, w, b), gelu_linear_ref(h, w, b), inputs, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_expanded_gradient():
    h, w, b = _inputs(2 * 3 * 5, 32, 24)
    h4 = h.detach().view(2, 3, 5, 32).requires_grad_()
    out = gelu_linear(h4, w, b)
    assert out.shape == (2, 3, 5, 24)
    out.sum().backward()  # a stride-0 gradient
    got = [t.grad.clone() for t in (h4, w, b)]
    for t in (h4, w, b):
        t.grad = None
    gelu_linear_ref(h4, w, b).sum().backward()
    for a, t in zip(got, (h4, w, b)):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


def test_backward_deterministic(device_tiles):
    h, w, b = _inputs(300, 96, 40)
    grad = torch.randn(300, 40, device=DEVICE)
    first = torch.autograd.grad(gelu_linear(h, w, b), (h, w, b), grad)
    second = torch.autograd.grad(gelu_linear(h, w, b), (h, w, b), grad)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_rows_past_one_grid_axis(monkeypatch, device_tiles):
    """Rows beyond 65535 tiles of one grid axis (stage 1 at batch 1338 and more): the launches
    take one axis for rows and column tiles together. Launches recorded, not run."""
    from hifuse_kernels import _triton

    grids = []

    class Recorder:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_triton, "wrap_triton", Recorder)
    m = 65536 * 64 + 1
    h = torch.empty(m, 16, dtype=torch.bfloat16, device=DEVICE)
    w = torch.empty(300, 16, device=DEVICE)
    torch.ops.hifuse.gelu_linear(h, w, None)
    torch.ops.hifuse.gelu_linear_backward(torch.empty(m, 300, dtype=torch.bfloat16, device=DEVICE), h, w, False)
    assert len(grids) == 3 and all(len(g) == 1 or g[1] <= 65535 for g in grids), grids


def test_bad_input():
    h, w, b = _inputs(4, 16, 8)
    with pytest.raises(ValueError, match="weight must be"):
        gelu_linear(h, w[:, :8], b)
    with pytest.raises(ValueError, match="bias must be"):
        gelu_linear(h, w, b[:3])
    with pytest.raises(TypeError, match="dtypes"):
        gelu_linear(h.double(), w, b)
    with pytest.raises(TypeError, match="tensors"):
        gelu_linear(h, "w", b)


@pytest.mark.parametrize("n", [300, 700])
def test_one_pass_route(tiles, n):
    """Where the launch table asks for the backward in one pass past 256 columns (``ONE_PASS``:
    the columns padded to 512 or 1024), one kernel gives both gradients, and they match the
    reference. (fp32: the interpreter's; on a GPU the route is bf16/fp16's, below.)"""
    from hifuse_kernels import _configs
    from hifuse_kernels.gelu_linear import ONE_PASS

    if DEVICE == "cuda":
        pytest.skip("fp32 takes the two kernels on a GPU (its one pass spills): test_low_precision covers the route")
    h, w, b = _inputs(40, 48, n)
    with _configs.forced({"gelu_linear.route": {"gemm": ONE_PASS}}), recorded_launches() as launched:
        out = gelu_linear(h, w, b)
        check_grads(out, gelu_linear_ref(h, w, b), [h, w, b], rtol=1e-5, atol=1e-5)
    assert "gelu_linear._bwd_kernel" in launched and "gelu_linear._bwd_input_kernel" not in launched


def test_one_pass_route_refused_where_it_does_not_apply():
    """An entry asking for one pass at 256 columns or fewer (one pass already) or past 1024
    (wider than a program covers), or for an unknown way, is refused with a warning, and the op
    computes as by default."""
    from hifuse_kernels import _configs
    from hifuse_kernels.gelu_linear import ONE_PASS, TRITON, route

    for n, gemm, problem in ((96, ONE_PASS, "257 to 1024 columns, not 96"), (2000, ONE_PASS, "not 2000"),
                             (300, 4, "gemm=4 must be 1")):
        with _configs.forced({"gelu_linear.route": {"gemm": gemm}}), pytest.warns(_configs.ConfigWarning, match=problem):
            assert route(n, 48, torch.float32, torch.device(DEVICE)) == TRITON


def test_one_pass_tiles_must_cover_every_column(device_tiles):
    """A one-pass backward entry whose column tile misses columns (a program holds them all)
    or only pads them is refused with a warning: the default's tile, which covers them."""
    from hifuse_kernels import _configs
    from hifuse_kernels.gelu_linear import bwd_launch

    for block_n in (512, 2048):
        with _configs.forced({"gelu_linear.backward": {"BLOCK_N": block_n}}), \
                pytest.warns(_configs.ConfigWarning, match=f"BLOCK_N={block_n} must be 1024"):
            assert bwd_launch(64, 768, torch.bfloat16, 9216, torch.device(DEVICE))["BLOCK_N"] == 1024


# 96 columns: the one-pass backward; 384: the input- and weight-gradient kernels, or with the
# launch table's ONE_PASS route the one pass too (768: its 1024 x 16 tiles)
@pytest.mark.parametrize("n, one_pass", [(96, False), (384, False), (384, True), (768, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, n, one_pass):
    """Under autocast's dtypes: within twice eager's own error against float64 (the rule the
    suite uses), eager being autocast's GELU then GEMM, at the IRMLP's 12C -> C. (The
    interpreter's kernels take the same rounded operands to an fp32 product: its
    low-precision dot is wrong.)"""
    m = 4099 if DEVICE == "cuda" else 300 if n < 768 else 40  # the interpreter's products are slow
    if n == 768 and dtype == torch.float16 and DEVICE != "cuda":
        pytest.skip("the interpreter's 1024 x 16 tiles: bf16 covers them")
    h, w, b = _inputs(m, 12 * n, n, dtype=dtype)
    grad = torch.randn(m, n, device=DEVICE)
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = gelu_linear_ref(*ref_in)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    with torch.autocast(DEVICE, dtype=dtype):
        eager = gelu_linear_ref(h, w, b)
    eager_grads = torch.autograd.grad(eager, (h, w, b), grad.to(dtype))
    from hifuse_kernels import _configs

    with _configs.forced({"gelu_linear.route": {"gemm": 3} if one_pass else {}}), recorded_launches() as launched:
        out = gelu_linear(h, w, b)
        got = torch.autograd.grad(out, (h, w, b), grad.to(dtype))
    assert out.dtype == dtype
    assert ("gelu_linear._bwd_input_kernel" in launched) == (n > 256 and not one_pass)
    err = lambda a, r: (a.double() - r).abs().max().item()  # noqa: E731
    assert err(out, ref) <= 2 * err(eager, ref) + 1e-6
    for name, a, e, r in zip(("h", "weight", "bias"), got, eager_grads, want):
        assert a.dtype == (dtype if name == "h" else torch.float32), name
        assert err(a, r) <= 2 * err(e, r) + 1e-6, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 300])
def test_library_route(dtype, n):
    """Where the launch table routes a shape to a GELU pass and torch's GEMMs, the op computes
    as eager under autocast does (float32: as eager), and launches no kernel of its own."""
    from hifuse_kernels import _configs

    h, w, b = _inputs(37, 64, n, dtype=dtype)
    grad = torch.randn(37, n, device=DEVICE).to(dtype)
    with torch.autocast(DEVICE, dtype=dtype, enabled=dtype != torch.float32):
        eager = gelu_linear_ref(h, w, b)
    want = torch.autograd.grad(eager, (h, w, b), grad)
    with _configs.forced({"gelu_linear.route": {"gemm": 2}}), recorded_launches() as launched:
        out = gelu_linear(h, w, b)
        got = torch.autograd.grad(out, (h, w, b), grad)
    assert not launched
    assert out.dtype == dtype and torch.equal(out, eager)
    # the gradients within the GEMM dtype's rounding: the bias's is summed in float32 here, by
    # eager in the GEMM's dtype, and eager's GEMMs may take their operands in another layout
    for name, a, e in zip(("h", "weight", "bias"), got, want):
        assert a.dtype == e.dtype, name
        torch.testing.assert_close(a, e, rtol=1.6e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if name == "bias"
                                   else 1e-5, msg=lambda m, name=name: f"{name}: {m}")


def _walked_traffic(kernel: str, m: int, n: int, k: int, tiles: dict, splits: int, size: dict) -> int:
    """What the programs of one launch load and store, walked program by program and loop
    step by step as the kernel runs (masked elements not counted): ``tile_traffic``'s hand count."""
    bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]

    def span(start, block, limit):
        return max(0, min(block, limit - start))

    rows, cols, ks = range(0, m, bm), range(0, n, bn), range(0, k, bk)
    total = 0
    if kernel == "_fwd_kernel":
        for r in rows:
            for c in cols:
                total += sum(span(r, bm, m) * span(k0, bk, k) * size["H"] + span(c, bn, n) * span(k0, bk, k) * size["W"]
                             for k0 in ks)
                total += span(r, bm, m) * span(c, bn, n) * size["OUT"]
    elif kernel == "_bwd_input_kernel":
        for r in rows:
            for k0 in ks:
                total += sum(span(r, bm, m) * span(c, bn, n) * size["G"] + span(c, bn, n) * span(k0, bk, k) * size["W"]
                             for c in cols)
                total += span(r, bm, m) * span(k0, bk, k) * (size["H"] + size["DH"])
    elif kernel == "_bwd_weight_kernel":
        for c in cols:
            for k0 in ks:
                for s in range(splits):
                    total += sum(span(r, bm, m) * (span(c, bn, n) * size["G"] + span(k0, bk, k) * size["H"])
                                 for r in rows[s::splits])
                    total += span(c, bn, n) * span(k0, bk, k) * size["PART"]
    else:  # _bwd_kernel: W's column tile loaded once a program, G's rows whole
        for k0 in ks:
            for s in range(splits):
                total += n * span(k0, bk, k) * (size["W"] + size["PART"])
                total += sum(span(r, bm, m) * (n * size["G"] + span(k0, bk, k) * (size["H"] + size["DH"]))
                             for r in rows[s::splits])
    return total


@pytest.mark.parametrize("kernel", ["_fwd_kernel", "_bwd_input_kernel", "_bwd_weight_kernel", "_bwd_kernel"])
def test_tile_traffic_matches_a_walk_of_the_programs(kernel):
    from hifuse_kernels.gelu_linear import tile_traffic

    m, n, k, splits = 203, 70 if kernel == "_bwd_kernel" else 150, 333, 3
    tiles = dict(BLOCK_M=32, BLOCK_N=128 if kernel == "_bwd_kernel" else 64, BLOCK_K=64)
    size = dict(H=2, W=4, B=4, OUT=2, G=2, DH=2, PART=4)
    params = {name: torch.empty(0, dtype={2: torch.bfloat16, 4: torch.float32}[b]) for name, b in size.items()}
    got = tile_traffic(kernel, dict(params, M=m, N=n, K=k, SPLITS=splits, HAS_BIAS=False, **tiles))
    assert got == _walked_traffic(kernel, m, n, k, tiles, splits, size)

