"""Launch configurations: resident programs from a compiled kernel's registers and shared
memory, the tuned table the launchers read (keyed by device and shape class), and the sweep
that writes it, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import DEVICE, recorded_launches, triton_device_or_skip
from hifuse_kernels import _configs, _triton
from hifuse_kernels import batch_norm_act as bna
from hifuse_kernels import channel_pool as cp
from hifuse_kernels import dwconv_layer_norm as dln
from hifuse_kernels import gelu_linear as gl
from hifuse_kernels import gelu_residual as gr
from hifuse_kernels import spatial_pool as sp
from hifuse_kernels import window_attention as wa

SWEEP = Path(__file__).parents[1] / "scripts" / "sweep_configs.py"
H100 = _triton.SmLimits(registers=65536, threads=2048, shared=233472, programs=32)


# --------------------------------------------------------------------------- resident programs


@pytest.mark.parametrize("regs, shared, warps, programs", [
    (100, 0, 16, 1),  # 104 registers a thread x 512 threads: one program's worth of 65536
    (128, 0, 8, 2),  # 128 x 256 = 32768: two
    (129, 0, 8, 1),  # rounded up per warp to 136: 34816, one
    (32, 0, 4, 16),  # the threads bind first: 2048 / 128
    (16, 0, 1, 32),  # then the block slots
    (32, 100 * 1024, 4, 2),  # shared memory: 228 KB over 100 KB + the 1 KB CUDA keeps a block
    (255, 0, 32, 1),  # too large for one SM still gives one program
])
def test_programs_per_sm(regs, shared, warps, programs):
    assert _triton.programs_per_sm(regs, shared, warps, H100) == programs


class _FakeKernel:
    """Stands for a JITFunction: ``warmup`` returns a compiled kernel with these resources."""

    def __init__(self, regs, shared=0, warps=16, loaded=True, error=None):
        self.regs, self.shared, self.warps, self.loaded, self.error = regs, shared, warps, loaded, error
        self.warmups = []

    def warmup(self, *args, grid, **kwargs):
        if self.error:
            raise self.error
        self.warmups.append((args, kwargs))
        compiled = SimpleNamespace(metadata=SimpleNamespace(shared=self.shared, num_warps=kwargs["num_warps"]))
        if self.loaded:
            compiled.n_regs, compiled.n_spills = self.regs, 0
        else:  # triton loads the binary, which reports the registers, on first use
            compiled._init_handles = lambda: setattr(compiled, "n_regs", self.regs)
        return compiled


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA launches as seen from a 132-SM H100, without one."""
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    monkeypatch.setattr(_triton, "_wide", [False])
    monkeypatch.setattr(_triton, "sm_limits", lambda index: H100)
    monkeypatch.setattr(_triton, "_sm_count", lambda index: 132)
    monkeypatch.setattr(_triton, "_resident", {})
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())


def test_reduction_programs_from_the_compiled_kernel(fake_gpu):
    cuda = torch.device("cuda", 0)
    heavy, light = _FakeKernel(regs=100), _FakeKernel(regs=32, loaded=False)
    args = (torch.empty(4, dtype=torch.bfloat16), torch.float64, 1000, 96)
    # 100 registers, 16 warps: one program an SM, over 2 channel blocks
    assert _triton.reduction_programs(10**6, 2, cuda, kernel=heavy, args=args, launch=dict(BLOCK=64, num_warps=16)) \
        == 132 // 2
    # 32 registers, 4 warps: the threads allow 16 programs an SM
    launch = dict(BLOCK=64, num_warps=4)
    assert _triton.reduction_programs(10**6, 2, cuda, kernel=light, args=args, launch=launch) == 16 * 132 // 2
    assert _triton.reduction_programs(50, 2, cuda, kernel=light, args=args, launch=launch) == 50
    # warmup got dtypes, not tensors; compiled once per kernel, dtypes, launch and device
    assert light.warmups[0][0][:2] == (torch.bfloat16, torch.float64)
    assert len(light.warmups) == 1
    _triton.reduction_programs(10**6, 2, cuda, kernel=light, args=args, launch=dict(BLOCK=32, num_warps=4))
    assert len(light.warmups) == 2
    # without a kernel, the assumption: 2048 threads an SM of 16-warp programs
    assert _triton.reduction_programs(10**6, 2, cuda) == 4 * 132 // 2
    # tensors given by keyword, as dtypes: triton's warmup takes them wrapped (it only wraps the
    # positional ones itself)
    _triton.reduction_programs(10**6, 2, cuda, kernel=light, args=args, launch=dict(launch, G=torch.bfloat16, S=7))
    kwargs = light.warmups[-1][1]
    assert kwargs["G"].dtype == torch.bfloat16 and type(kwargs["G"]).__name__ == "MockTensor" and kwargs["S"] == 7


def test_reduction_programs_fall_back_when_the_compile_fails(fake_gpu):
    broken = _FakeKernel(regs=0, error=RuntimeError("out of resources"))
    with pytest.warns(RuntimeWarning, match="out of resources"):
        n = _triton.reduction_programs(10**6, 1, torch.device("cuda", 0), 8, kernel=broken, launch=dict(num_warps=8))
    assert n == 2048 // 256 * 132


def test_reduction_programs_on_cpu_keep_their_counts(device_tiles):
    kernel = _FakeKernel(regs=100)
    assert _triton.reduction_programs(10, 1, torch.device("cpu"), kernel=kernel, launch=dict(num_warps=4)) == 2
    assert not kernel.warmups
    with _triton.device_tiles(False):
        assert _triton.reduction_programs(10, 1, torch.device("cpu")) == 10


# --------------------------------------------------------------------------- the table


def _key() -> str | None:
    """The table's key of the device the tests run kernels on."""
    return _configs.device_key(torch.device(DEVICE))


def _write(path: Path, kernels: dict, device: str) -> Path:
    path.write_text(json.dumps({"format": 1, "devices": {device: {"kernels": kernels}}}))
    return path


@pytest.fixture
def table(tmp_path, monkeypatch):
    """Points HIFUSE_CONFIGS at a table the test writes (``table(kernels)``)."""

    def use(kernels: dict, device: str | None = None) -> Path:
        path = _write(tmp_path / "configs.json", kernels, device or _key())
        monkeypatch.setenv(_configs.ENV_VAR, str(path))
        _configs.reload()
        return path

    yield use
    _configs.reload()


def test_shipped_table_is_a_table():
    assert json.loads(_configs.TABLE.read_text())["format"] == _configs.FORMAT
    assert _configs.INTERPRETER not in _configs.load(_configs.TABLE)


def test_device_key(monkeypatch):
    monkeypatch.setattr(_triton, "interpreting", lambda: True)
    assert _configs.device_key(torch.device("cpu")) == "interpreter"
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    assert _configs.device_key(torch.device("cpu")) is None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        assert _configs.device_key(torch.device("cuda", 0)) == (
            f"{props.name}|{props.major}.{props.minor}|{props.multi_processor_count}")


def test_lookup(table):
    default = dict(BLOCK=1024, num_warps=4)
    cpu = torch.device(DEVICE)
    table({"k": {"a": {"BLOCK": 256, "num_stages": 2}, "b": {"num_warps": 8}}})
    assert _configs.launch_config("k", "a", default, cpu) == dict(BLOCK=256, num_warps=4, num_stages=2)
    assert _configs.launch_config("k", "b", default, cpu) == dict(BLOCK=1024, num_warps=8)
    assert _configs.launch_config("k", "c", default, cpu) is default  # a miss: the default itself
    assert _configs.launch_config("other", "a", default, cpu) is default
    table({"k": {"a": {"BLOCK": 256}}}, device="another GPU|9.0|132")  # another device's entries only
    assert _configs.launch_config("k", "a", default, cpu) is default


@pytest.mark.parametrize("entry, problem", [
    ({"BLOCKS": 256}, "unknown keys"),
    ({"BLOCK": 0}, "positive integer"),
    ({"BLOCK": 2.0}, "positive integer"),
    ({"num_warps": 3}, "num_warps=3 must be a power of two"),
    ({"num_warps": 64}, "num_warps=64 must be a power of two in"),
    ({"num_stages": 9}, "num_stages=9"),
    ({"BLOCK": 384}, "BLOCK=384 must be a power of two"),
    ([256], "JSON object"),
])
def test_bad_entries_are_ignored_with_a_warning(table, entry, problem):
    default = dict(BLOCK=1024, num_warps=4)
    table({"k": {"a": entry}})
    with pytest.warns(_configs.ConfigWarning, match=problem):
        got = _configs.launch_config("k", "a", default, torch.device(DEVICE),
                                     lambda c: _configs.power_of_two_problem(c, "BLOCK"))
    assert got == default
    with warnings.catch_warnings():  # decided once
        warnings.simplefilter("error")
        _configs.launch_config("k", "a", default, torch.device(DEVICE), lambda c: None)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": 99, "devices": {}}), json.dumps([1])])
def test_unreadable_tables_give_the_defaults(tmp_path, monkeypatch, text):
    path = tmp_path / "t.json"
    path.write_text(text)
    monkeypatch.setenv(_configs.ENV_VAR, str(path))
    _configs.reload()
    try:
        with pytest.warns(_configs.ConfigWarning):
            assert _configs.launch_config("k", "a", {"num_warps": 4}, torch.device(DEVICE)) == {"num_warps": 4}
    finally:
        _configs.reload()


def test_malformed_device_entries_give_the_defaults(table):
    table({"k": ["not", "an", "object"]})
    with pytest.warns(_configs.ConfigWarning, match="/kernels/k is not a JSON object"):
        assert _configs.launch_config("k", "a", {"num_warps": 4}, torch.device(DEVICE)) == {"num_warps": 4}


def test_missing_table_gives_the_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv(_configs.ENV_VAR, str(tmp_path / "absent.json"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _configs.launch_config("k", "a", {"num_warps": 4}, torch.device(DEVICE)) == {"num_warps": 4}


def test_forced_entries_win_over_the_table(table):
    table({"k": {"a": {"num_warps": 8}}})
    cpu = torch.device(DEVICE)
    with _configs.forced({"k": {"num_warps": 2}}):
        assert _configs.launch_config("k", "a", {"num_warps": 4}, cpu) == {"num_warps": 2}
        with _configs.forced({"k": {}}):
            assert _configs.launch_config("k", "a", {"num_warps": 4}, cpu) == {"num_warps": 4}
    assert _configs.launch_config("k", "a", {"num_warps": 4}, cpu) == {"num_warps": 8}


def test_save_merges(tmp_path):
    path = _write(tmp_path / "t.json", {"k": {"a": {"num_warps": 8}}}, device="gpu A")
    _configs.save(path, "gpu B", {"k": {"a": {"num_warps": 2}, "c": {"num_warps": 1}}},
                  {"batch": 1, "results": {"k": {"a": 1, "c": 1}}})
    _configs.save(path, "gpu B", {"k": {"b": {"num_warps": 4}, "c": None}, "j": {"a": {"BLOCK": 16}}},
                  {"batch": 2, "results": {"k": {"c": 2}}})
    devices = _configs.load(path)
    assert devices["gpu A"]["kernels"] == {"k": {"a": {"num_warps": 8}}}
    assert devices["gpu B"]["kernels"] == {"j": {"a": {"BLOCK": 16}},
                                           "k": {"a": {"num_warps": 2}, "b": {"num_warps": 4}}}
    assert devices["gpu B"]["sweep"] == {"batch": 2, "results": {"k": {"a": 1, "c": 2}}}


# --------------------------------------------------------------------------- the launchers read it

needs_kernels = triton_device_or_skip()


# The table's launch names and the kernels they launch.
KERNELS = {
    "window_attention.forward": "window_attention._fwd_kernel",
    "window_attention.backward": "window_attention._bwd_kernel",
    "batch_norm_act.stats": "batch_norm_act._stats_kernel",
    "batch_norm_act.apply": "batch_norm_act._apply_kernel",
    "batch_norm_act.apply_pool": "batch_norm_act._apply_pool_kernel",
    "batch_norm_act.backward": "batch_norm_act._bwd_apply_kernel",
    "gelu_residual.forward": "gelu_residual._fwd_kernel",
    "gelu_residual.backward": "gelu_residual._bwd_kernel",
    "channel_pool.forward": "channel_pool._channel_pool_kernel",
    "channel_pool.backward": "channel_pool._channel_pool_bwd_kernel",
    "spatial_pool.forward": "spatial_pool._spatial_pool_kernel",
    "spatial_pool.backward": "spatial_pool._spatial_pool_bwd_kernel",
    "gelu_linear.forward": "gelu_linear._fwd_kernel",
    "gelu_linear.input": "gelu_linear._bwd_input_kernel",
    "gelu_linear.weight": "gelu_linear._bwd_weight_kernel",
    "gelu_linear.backward": "gelu_linear._bwd_kernel",
    "dwconv_layer_norm.forward": "dwconv_layer_norm._fwd_kernel",
    "dwconv_layer_norm.backward": "dwconv_layer_norm._bwd_kernel",
    "gelu_linear.route": None,  # how the op computes: gemm 2 launches none of its kernels
}
NOT_KERNEL_ARGS = {"programs", "chunks", "band"}  # read by the launchers, not passed to the kernels
# the smoke's conv3 (192 columns) takes gelu_linear's one-pass backward, not these two
SMOKE_UNUSED = {"gelu_linear.input", "gelu_linear.weight"}


def _run_ops(c: int = 192, hw: int = 4, batch: int = 1) -> None:
    """Every wired op, forward and backward, on fp32 inputs of C channels (the sweep's smoke
    shapes by default), against its reference."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE).requires_grad_()

    def check(out, ref, inputs, atol=1e-4):
        out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=atol)
        grads = [torch.randn(r.shape, generator=gen).to(DEVICE) for r in ref]
        for a, b in zip(torch.autograd.grad(out, inputs, grads), torch.autograd.grad(ref, inputs, grads)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)

    heads, window = c // 32, 7
    qkv, bias, tab = randn(batch, hw, hw, 3 * c), randn(3 * c, scale=0.1), randn((2 * window - 1) ** 2, heads)
    for shift in (0, 3):
        check(wa.window_attention(qkv, bias, tab, heads, window, shift),
              wa.window_attention_ref(qkv, bias, tab, heads, window, shift), (qkv, bias, tab))
    y, s = randn(batch, hw, hw, c), randn(batch, hw, hw, c)
    check(gr.gelu_residual(y, s), gr.gelu_residual_ref(y, s), (y, s))
    h, w = randn(batch * hw * hw, 2 * c), randn(c, 2 * c, scale=(2 * c) ** -0.5)  # the sweep's smoke conv3
    check(gl.gelu_linear(h, w), gl.gelu_linear_ref(h, w), (h, w))
    dw = (y, randn(c, 1, 3, 3, scale=0.3), randn(c, scale=0.1), randn(c, scale=0.1), randn(c, scale=0.1))
    check(dln.dwconv_layer_norm(*dw), dln.dwconv_layer_norm_ref(*dw), dw)
    g = randn(batch, c, hw, hw)
    check(cp.channel_pool(g), cp.channel_pool_ref(g), (g,))
    check(sp.spatial_pool(g), sp.spatial_pool_ref(g), (g,))
    bns = ((c, "gelu", False, False), (3 * c, None, True, False), (1, None, False, False), (c, "relu", False, True))
    for channels, act, residual, pool in bns:
        size = 2 * hw if pool else hw
        x = randn(batch, channels, size, size)
        r = randn(batch, channels, size, size) if residual else None
        fused, eager = (torch.nn.BatchNorm2d(channels).to(DEVICE) for _ in range(2))
        with torch.no_grad():
            fused.weight.normal_(1, 0.1, generator=None)
        eager.load_state_dict(fused.state_dict())
        inputs = (x,) if r is None else (x, r)
        check(bna.batch_norm_act(x, fused, act, r, pool), bna.batch_norm_act_ref(x, eager, act, r, pool), inputs)
        torch.testing.assert_close(fused.running_var, eager.running_var)
    _run_gated_batch_norm(gen, c, batch, hw * hw)


def _run_gated_batch_norm(gen, c: int, n: int, s: int) -> None:
    """The IRMLP's bn1 with its residual r computed on load from norm3's sources (parts of c
    channels; the sweep's smoke case), against the plain ops given r."""
    def plain(*shape, positive=False):
        t = torch.randn(*shape, generator=gen)
        return (t.abs() + 0.5 if positive else t).to(DEVICE)

    g, l, xy = plain(n, s, c), plain(n, s, c), plain(n, s, c)
    cg, sg, lw, lb = plain(n, c, positive=True), plain(n, s, positive=True), plain(3 * c), plain(3 * c)
    x_bn = [plain(c), plain(c, positive=True), plain(c), plain(c)]
    gelu = bna.ACTIVATIONS["gelu"]
    r, mu, rstd, _ = torch.ops.hifuse.gated_layer_norm_bn(g, cg, l, sg, xy, *x_bn, gelu, lw, lb, 1e-6)
    src = bna.gated_sources([g, cg, l, sg, xy, mu, rstd, lw, lb, *x_bn], gelu, r.dtype)
    r, y, grad = r.view(n * s, 3 * c), plain(n * s, 3 * c), plain(n * s, 3 * c)
    close = dict(rtol=1e-4, atol=1e-4)
    want = torch.ops.hifuse.batch_norm_stats(y, r, 1e-5, None, None, None, 0.0)
    torch.testing.assert_close(torch.ops.hifuse.batch_norm_stats_gated(y, *src, 1e-5, None, None, None, 0.0), want,
                               **close)
    params = (want[0], want[1], plain(3 * c, positive=True), plain(3 * c), 0)
    torch.testing.assert_close(torch.ops.hifuse.batch_norm_act_gated(y, *src, *params, None),
                               torch.ops.hifuse.batch_norm_act(y, r, *params, s, 1, False, None), **close)
    dy, dr, dw, db, _ = torch.ops.hifuse.batch_norm_act_backward(grad, y, r, *params, s, 1, False)
    torch.testing.assert_close(torch.ops.hifuse.batch_norm_act_gated_backward(grad, y, *src, *params)[:4],
                               (dy, dr, dw, db), **close)


def _assert_launched_with(launches: dict, kernels: dict) -> int:
    """Every entry of ``kernels`` for a launch that ran was what it launched with; how many."""
    checked = 0
    for name, classes in kernels.items():
        for entry in classes.values():
            if KERNELS[name] is None:
                op = name.split(".")[0]
                assert entry.get("gemm") != 2 or not any(k.startswith(f"{op}.") for k in launches), (name, entry)
                checked += 1
                continue
            seen = launches.get(KERNELS[name], [])
            want = {k: v for k, v in entry.items() if k not in NOT_KERNEL_ARGS}
            assert any(want.items() <= kw.items() for kw in seen), (name, entry, seen)
            checked += 1
    return checked


def _device_tiles():
    return _triton.device_tiles() if _triton.interpreting() else contextlib.nullcontext()


@needs_kernels
def test_launchers_read_the_table(table):
    kernels = {
        "window_attention.forward": {"fp32/c192/d32/w7": {"BM": 64, "num_warps": 2}},
        "window_attention.backward": {"fp32/c192/d32/w7": {"BM": 32, "BK": 32, "num_warps": 4, "programs": 1}},
        "batch_norm_act.stats": {"fp32/c192": {"BLOCK_M": 8, "BLOCK_C": 128, "num_warps": 4}},
        "batch_norm_act.apply": {"fp32/c576/res": {"BLOCK_M": 32, "BLOCK_C": 256}},
        "batch_norm_act.apply_pool": {"fp32/c192/pool": {"BLOCK_M": 4, "BLOCK_C": 32, "num_warps": 2}},
        "batch_norm_act.backward": {"fp32/c1": {"BLOCK_M": 128, "BLOCK_C": 16, "num_warps": 4},
                                    "fp32/c576/gated": {"BLOCK_M": 8, "BLOCK_C": 64, "num_warps": 2}},
        "gelu_residual.forward": {"fp32/fp32": {"BLOCK": 64, "num_warps": 2}},
        "gelu_residual.backward": {"fp32/fp32": {"BLOCK": 32}},
        "channel_pool.forward": {"fp32/c192/s16": {"BLOCK_S": 4, "BLOCK_C": 32, "chunks": 3}},
        "channel_pool.backward": {"fp32/c192/s16": {"BLOCK_S": 2, "BLOCK_C": 256, "num_warps": 8}},
        "spatial_pool.forward": {"fp32/c192": {"BLOCK_P": 2, "num_warps": 1}},
        "spatial_pool.backward": {"fp32/c192": {"BLOCK_P": 32, "num_warps": 2}},
        "dwconv_layer_norm.backward": {"fp32/c192": {"BLOCK_P": 2, "num_warps": 4, "band": 1}},
        "gelu_linear.route": {"fp32/n192/k384": {"gemm": 2}},
    }
    table(kernels)
    with _device_tiles(), recorded_launches() as launches, warnings.catch_warnings():
        warnings.simplefilter("error", _configs.ConfigWarning)
        _run_ops()
    assert _assert_launched_with(launches, kernels) == sum(len(v) for v in kernels.values())
    # one backward program per head: it loops over every window
    assert all(kw["BK"] == 32 for kw in launches["window_attention._bwd_kernel"])


@needs_kernels
def test_launchers_ignore_entries_they_would_run_wrongly(table):
    table({
        "window_attention.forward": {"fp32/c192/d32/w7": {"BM": 8}},  # tl.dot takes 16 rows or more
        "spatial_pool.forward": {"fp32/c192": {"BLOCK_P": 3}},
        "channel_pool.forward": {"fp32/c192/s16": {"BLOCK_C": 48}},
        "gelu_residual.forward": {"fp32/fp32": {"BLOCK": 4, "tile": 2}},
        "dwconv_layer_norm.backward": {"fp32/c192": {"band": -1}},
        "gelu_linear.route": {"fp32/n192/k384": {"gemm": 3}},
        "batch_norm_act.stats": {"fp32/c576/gated": {"BLOCK_C": 128}},  # 128 does not divide 192
    })
    with _device_tiles(), recorded_launches() as launches, pytest.warns(_configs.ConfigWarning) as caught:
        _run_ops()
    messages = " ".join(str(w.message) for w in caught)
    for problem in ("BM=8 must be a power of two in [16, 64]", "BLOCK_P=3", "BLOCK_C=48", "unknown keys ['tile']",
                    "band=-1 must be a positive integer", "is for 257 to 1024 columns, not 192", "BLOCK_C=128 must divide the 192"):
        assert problem in messages
    assert {kw["BM"] for kw in launches["window_attention._fwd_kernel"]} == {wa.FWD_ROWS}
    assert "gelu_linear._fwd_kernel" in launches


def test_low_precision_backward_refuses_key_blocks(table):
    qkv = torch.zeros(1, 4, 4, 96, dtype=torch.bfloat16, device=DEVICE)
    g = wa._geometry(qkv, 1, 7)
    table({"window_attention.backward": {"bf16/c32/d32/w7": {"BK": 16}}})
    with _triton.device_tiles(), pytest.warns(_configs.ConfigWarning, match="whole windows"):
        launch = wa._backward_launch(qkv, g, 7)
    assert launch["BK"] == g["bn"] == 64


# --------------------------------------------------------------------------- the sweep


@pytest.mark.slow
@needs_kernels
def test_sweep_writes_a_table_the_kernels_read(tmp_path, monkeypatch):
    """The sweep end to end at tiny shapes (under the interpreter without a GPU): it writes a
    table for this device that the launchers then read, still giving the references' results."""
    out = tmp_path / "configs.json"
    _write(out, {"k": {"a": {"num_warps": 8}}}, device="some other GPU|8.0|108")
    env = dict(os.environ)
    env.pop(_configs.ENV_VAR, None)
    run = subprocess.run([sys.executable, str(SWEEP), "--smoke", "--out", str(out), "--budget-s", "600"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "wrong results" not in run.stdout
    devices = _configs.load(out)
    assert devices["some other GPU|8.0|108"]["kernels"] == {"k": {"a": {"num_warps": 8}}}  # kept
    swept = devices[_key()]
    assert swept["sweep"]["batch"] == 1 and set(swept["sweep"]["results"]) == set(KERNELS) - SMOKE_UNUSED
    kernels = swept["kernels"]
    if _triton.interpreting():
        assert kernels, run.stdout  # larger tiles win by far in the interpreter
    assert set(kernels) <= set(KERNELS)
    monkeypatch.setenv(_configs.ENV_VAR, str(out))
    _configs.reload()
    try:
        with _device_tiles(), recorded_launches() as launches, warnings.catch_warnings():
            warnings.simplefilter("error", _configs.ConfigWarning)
            _run_ops()
    finally:
        _configs.reload()
    assert _assert_launched_with(launches, kernels) == sum(len(v) for v in kernels.values())


def test_sweep_without_a_gpu_needs_out():
    if torch.cuda.is_available():
        pytest.skip("on a GPU the sweep writes the shipped table by default")
    run = subprocess.run([sys.executable, str(SWEEP), "--smoke"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "give --out" in run.stderr
