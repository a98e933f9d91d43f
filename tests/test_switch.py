"""hifuse.use_fused(): call and context manager, environment override, fallback logging."""

import copy
import logging

import pytest
import torch

import hifuse
import hifuse_kernels
from hifuse import config
from hifuse_kernels import _ext


def test_default_is_eager():
    assert config.fused_parts() == hifuse.FusedParts()
    assert not any(hifuse.is_fused(p) for p in hifuse.FusedParts.names())


def test_plain_call_persists_and_can_be_undone():
    hifuse.use_fused()
    assert all(hifuse.is_fused(p) for p in hifuse.FusedParts.names())
    hifuse.use_fused(attention=False)
    assert not hifuse.is_fused("attention") and hifuse.is_fused("norm")
    hifuse.use_fused(False)
    assert not any(hifuse.is_fused(p) for p in hifuse.FusedParts.names())


def test_context_manager_restores():
    hifuse.use_fused(norm=False)
    with hifuse.use_fused(attention=False, local=False, patches=False, fusion=False, norm=True):
        assert hifuse.is_fused("norm") and not hifuse.is_fused("local")
        with hifuse.use_fused(False):
            assert not hifuse.is_fused("norm")
        assert hifuse.is_fused("norm")
    assert hifuse.is_fused("local") and not hifuse.is_fused("norm")


@pytest.mark.parametrize(
    "value, expect",
    [("1", {"attention", "local", "patches", "fusion", "norm"}), ("0", set()), ("attention, norm", {"attention", "norm"})],
)
def test_environment_overrides_calls(monkeypatch, value, expect):
    monkeypatch.setenv(config.ENV_VAR, value)
    hifuse.use_fused(False)
    assert {p for p in hifuse.FusedParts.names() if hifuse.is_fused(p)} == expect
    hifuse.use_fused()
    assert {p for p in hifuse.FusedParts.names() if hifuse.is_fused(p)} == expect


def test_environment_rejects_unknown_parts(monkeypatch):
    monkeypatch.setenv(config.ENV_VAR, "attention,flash")
    with pytest.raises(ValueError, match="flash"):
        hifuse.is_fused("attention")


def test_rebuilds_call_context_and_environment(monkeypatch):
    assert config.rebuilds() == hifuse.Rebuilds.all(True)
    hifuse.use_rebuilds(irmlp=False)
    assert not config.rebuilding("irmlp") and config.rebuilding("norm3")
    with hifuse.use_rebuilds(False):
        assert not any(config.rebuilding(n) for n in hifuse.Rebuilds.names())
    assert not config.rebuilding("irmlp") and config.rebuilding("norm3")
    monkeypatch.setenv(config.REBUILD_VAR, "norm3, local_norm")
    assert {n for n in hifuse.Rebuilds.names() if config.rebuilding(n)} == {"norm3", "local_norm"}
    monkeypatch.setenv(config.REBUILD_VAR, "norm3,flash")
    with pytest.raises(ValueError, match="flash"):
        config.rebuilding("norm3")
    with pytest.raises(TypeError, match="flash"):
        hifuse.use_rebuilds(flash=False)


def _count_native_calls(monkeypatch):
    from hifuse_kernels import layer_norm_cf

    calls = []
    real = layer_norm_cf.layer_norm_cf

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_norm_cf, "layer_norm_cf", spy)
    return calls


@pytest.mark.skipif(not hifuse_kernels.native_available(), reason="native extension not built")
def test_switch_is_read_at_forward_time_and_keeps_state(monkeypatch):
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3).eval()  # built before the switch
    x = torch.randn(1, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _count_native_calls(monkeypatch)
    with torch.no_grad():
        eager = model(x)
        assert calls == []
        with hifuse.use_fused(attention=False, local=False, patches=False, fusion=False, norm=True):
            fused = model(x)
    # 4 local stem/downsample norms + fu1's norm2 and norm3 + norm1 and norm3 in fu2..fu4
    assert len(calls) == 4 + 2 + 3 * 2
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-4)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fallback_when_extension_missing(monkeypatch, caplog):
    monkeypatch.setattr(_ext, "load_error", lambda: "the compiled hifuse extension is missing; build it")
    config._logged.clear()
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        with caplog.at_level(logging.WARNING, logger="hifuse"), hifuse.use_fused(attention=False, local=False, patches=False):
            fused = model(x)
            model(x)
    torch.testing.assert_close(fused, eager, rtol=0, atol=0)
    notes = [r.getMessage() for r in caplog.records if "fused norm runs eager" in r.getMessage()]
    assert len(notes) == 1 and "extension is missing" in notes[0]


def test_native_op_without_extension_raises_import_error(monkeypatch):
    from hifuse_kernels import layer_norm_cf

    monkeypatch.setattr(_ext, "load_error", lambda: "the compiled hifuse extension is missing; build it with pip")
    with pytest.raises(ImportError, match="hifuse::layer_norm_cf is a native op: .*missing; build it"):
        layer_norm_cf.layer_norm_cf(torch.randn(1, 4, 2, 2), torch.ones(4), torch.zeros(4))


def test_package_imports_without_extension(tmp_path):
    """A copy of the packages without the compiled library imports, runs eager, and says why."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    for pkg in (hifuse, hifuse_kernels):
        src = Path(pkg.__file__).parent
        shutil.copytree(src, tmp_path / src.name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        "import hifuse, hifuse_kernels, torch\n"
        "assert hifuse_kernels.__file__.startswith(%r)\n"
        "assert not hifuse_kernels.native_available()\n"
        "print(hifuse_kernels.native_load_error())\n"
        "m = hifuse.create_model('hifuse_tiny', num_classes=2).eval()\n"
        "hifuse.use_fused()\n"
        "print(m(torch.randn(1, 3, 32, 32)).shape)\n"
        "from hifuse_kernels.layer_norm_cf import layer_norm_cf\n"
        "layer_norm_cf(torch.randn(1, 4, 2, 2), torch.ones(4), torch.zeros(4))\n"
    ) % str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert "torch.Size([1, 2])" in out.stdout, out.stderr
    assert "missing" in out.stdout and "pip install" in out.stdout
    assert "ImportError: hifuse::layer_norm_cf is a native op" in out.stderr
    assert "fused norm runs eager" in out.stderr


def test_triton_capability(monkeypatch):
    from hifuse_kernels import _triton

    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = _triton.unsupported_reason(cpu)
    assert reason is not None and ("TRITON_INTERPRET=1" in reason or "not installed" in reason)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = _triton.unsupported_reason(cpu)
    # INTERPRETER_PROBLEM: an interpreter that cannot run the kernels here, found at import
    assert reason is None or "not installed" in reason or reason == _triton.INTERPRETER_PROBLEM


def test_fused_and_eager_flops_agree():
    # The LayerNorm op counts zero, as eager's does (attention: see test_window_attention).
    model = hifuse.create_model("hifuse_tiny", num_classes=3).eval()
    eager = hifuse.count_flops(model, (3, 64, 64))
    with hifuse.use_fused(attention=False):
        assert hifuse.count_flops(model, (3, 64, 64)) == eager


@pytest.mark.parametrize("train", [True, False])
def test_whole_model_with_everything_fused(train):
    """All parts fused together, training (batch statistics) and eval (folded BatchNorms)."""
    from helpers import assert_model_matches_eager

    if not hifuse_kernels.native_available() or _triton_reason() is not None:
        pytest.skip("needs the native extension and runnable Triton kernels")
    assert_model_matches_eager("cuda" if torch.cuda.is_available() else "cpu", train=train)


def _triton_reason():
    from hifuse_kernels import _triton

    return _triton.unsupported_reason(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu"))


def _low_precision_errors(model, state, x, dtype, fused, parts) -> dict[str, float]:
    """Relative L2 errors against float64 eager on the same input of one autocast run's
    logits and parameter gradients (loss: the mean of the squared logits)."""
    device = x.device.type

    def run(m, inp, autocast, use_fused):
        m.load_state_dict(state)
        m.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast), hifuse.use_fused(use_fused, **parts):
            out = m(inp)
        out.float().square().mean().backward()
        return {"logits": out.double(), **{n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None}}

    ref = run(copy.deepcopy(model).double(), x.double(), False, False)
    got = run(model, x, True, fused)
    return {n: ((got[n] - r).norm() / r.norm().clamp_min(1e-30)).item() for n, r in ref.items()}


@pytest.mark.parametrize("device, dtype", [
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, marks=pytest.mark.gpu),
    ("cpu", torch.bfloat16),
])
def test_whole_model_low_precision(device, dtype):
    """Everything fused under autocast, judged as eager under the same autocast is: per tensor
    (the logits and every parameter gradient) the relative L2 error against float64 on the
    same input is within twice the largest of four eager runs on inputs moved by one part in
    2**8, plus 2e-3. In 16 bits a deep net's gradients (sums with cancellation: the spatial
    BatchNorms' run 1-30% off) swing from draw to draw: against one eager run, correct fused
    runs failed on the GPU and on the CPU alike. A fused run outside is judged again on a
    moved input, and fails only where both are outside. On the CPU (the interpreter's 16-bit
    dot products are broken) every part but attention, at 64x64."""
    if device == "cpu" and (not hifuse_kernels.native_available() or _triton_reason() is not None):
        pytest.skip("needs the native extension and runnable Triton kernels")
    parts, size, batch = {}, 224, 8
    if device == "cpu":
        parts, size, batch = {"attention": False}, 64, 4
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=10).to(device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(batch, 3, size, size, device=device)
    gen = torch.Generator().manual_seed(1)
    moved = [x * (1 + 2.0 ** -8 * torch.randn(x.shape, generator=gen).to(device)) for _ in range(4)]
    eager = [_low_precision_errors(model, state, xi, dtype, False, parts) for xi in moved]
    allowed = {n: 2 * max(e[n] for e in eager) + 2e-3 for n in eager[0]}

    def outside(xi):
        errors = _low_precision_errors(model, state, xi, dtype, True, parts)
        return {n: f"{errors[n]:.3g} (allowed {allowed[n]:.3g})" for n in allowed if errors[n] > allowed[n]}

    first = outside(x)
    both = {n: why for n, why in first.items() if n in outside(moved[0])} if first else {}
    assert not both, f"fused errors against float64 outside eager's on two inputs: {both}"


def test_whole_model_inference_with_everything_fused():
    """eval + no_grad: merged proj/fc1 GEMMs, chained norms and folded BatchNorms together."""
    if not hifuse_kernels.native_available() or _triton_reason() is not None:
        pytest.skip("needs the native extension and runnable Triton kernels")
    from helpers import whole_model_kwargs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=5, **whole_model_kwargs(device)).to(device).eval()
    x = torch.randn(2, 3, 64, 96, device=device)
    with torch.no_grad():
        ref = model(x)
        with hifuse.use_fused():
            out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_one_block_stages_run_fused(caplog):
    """--depths 1,1,1,1 (the README's demo): each stage's one block runs the fused attention;
    nothing is logged as falling back, and the result is eager's."""
    if _triton_reason() is not None:
        pytest.skip("needs runnable Triton kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = hifuse.create_model("hifuse_tiny", num_classes=3, depths=(1, 1, 1, 1), dims=(32, 64, 128, 256),
                                num_heads=(2, 4, 8, 16)).to(device)
    x = torch.randn(1, 3, 64, 64, device=device)
    ref = model(x)
    calls = []
    stages = [m for m in model.modules() if isinstance(m, hifuse.model.GlobalStage)]
    with caplog.at_level(logging.WARNING, logger="hifuse"), hifuse.use_fused(attention=True):
        for stage in stages:
            stage.register_forward_hook(lambda m, i, o: calls.append(config._decisions[m]))
        out = model(x)
    assert "attention runs eager" not in caplog.text
    assert len(calls) == 4 and all(set(d.values()) == {None} for d in calls)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
