"""How the packages hang together: dependencies point down, fused decisions are made once,
a fused step never waits on the device, and the package runs where kernels cannot."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode

import hifuse
from hifuse import config
from helpers import CPU_MODEL, whole_model_kwargs
from hifuse_kernels import _triton

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hifuse", "hifuse_kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = _triton.unsupported_reason(torch.zeros(1, device=DEVICE)) is None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any level, function bodies included)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_kernels_never_import_the_model():
    bad = {m: sorted(d for d in deps if d.split(".")[0] == "hifuse")
           for m, deps in _imports().items() if m.split(".")[0] == "hifuse_kernels"}
    assert not {m: d for m, d in bad.items() if d}


def test_command_line_sits_on_top():
    """Only the command line (and ``python -m hifuse``) imports the command line."""
    bad = {m: sorted(d for d in deps if d == "hifuse.cli" or d.startswith("hifuse.cli."))
           for m, deps in _imports().items() if not (m.startswith("hifuse.cli") or m == "hifuse.__main__")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_cycles():
    graph = _imports()
    # A package imports its own submodules to register them; that edge is not a cycle.
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (d.startswith(name + ".") or name.startswith(d + "."))}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_model_file_is_eager_only():
    source = (ROOT / "hifuse" / "model.py").read_text()
    assert "hifuse_kernels." not in source.replace("hifuse_kernels.reference", "")
    assert "def forward_fused" not in source and "fused_unsupported_reason" not in source


needs_kernels = pytest.mark.skipif(not KERNELS, reason="no Triton device (CUDA, or TRITON_INTERPRET=1 on CPU)")


# Tiny's depths with narrow stages on the CPU, where the Triton interpreter's time grows with the widths
NARROW = {k: v for k, v in CPU_MODEL.items() if k != "depths"} if DEVICE == "cpu" else {}


def _small_model(**kwargs):
    torch.manual_seed(0)
    return hifuse.create_model("hifuse_tiny", num_classes=3, **kwargs).to(DEVICE)


@needs_kernels
def test_fused_decisions_are_made_once_per_signature():
    model = _small_model(**NARROW)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with hifuse.use_fused(), torch.no_grad():
        model.eval()
        start = config.checks_run
        model(x)
        first = config.checks_run - start
        model(x)
        assert config.checks_run - start == first, "a repeated forward evaluated capabilities again"
        # every routed module decided once: the model's feature loop, 1 patch embedding, 3
        # mergings, 8 blocks, 4 stages, 4 local downsamples (their LayerNormCFs are not reached
        # when they run fused), 8 local blocks, 4 fusion blocks
        assert first == 1 + 1 + 3 + 8 + 4 + 4 + 8 + 4
        model(torch.randn(1, 3, 32, 64, device=DEVICE))  # a new signature decides again
        assert config.checks_run - start == 2 * first


_SYNCING = {  # ops whose CUDA versions wait for the GPU: a value or a data-dependent size read
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,  # seen as such inside a custom op, where it is not decomposed
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default,
    torch.ops.aten.repeat_interleave.Tensor,
}


class _FailOnSync(TorchDispatchMode):
    """Fails on an op that synchronises with the host on a GPU. The Python implementations of
    hifuse's custom ops are entered (a dispatch mode sees a custom op as one call)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING:
            raise AssertionError(f"host synchronisation: {func}")
        opdef = OPDEFS.get(func._schema.name) if func.namespace == "hifuse" else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _no_tensor_from_data(*_args, **_kwargs):
    # on a GPU, torch.tensor(data, device="cuda") copies from pageable memory: a host
    # synchronisation, and an operation a CUDA graph capture refuses
    raise AssertionError("a tensor made from Python data in a fused step")


@needs_kernels
def test_fused_step_never_reads_tensor_values(monkeypatch):
    model = _small_model(**whole_model_kwargs(DEVICE))
    for k, m in enumerate(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        m.momentum = None if k % 2 else 0.1  # None: a cumulative average over the batches seen
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    target = torch.tensor([0, 2], device=DEVICE)
    monkeypatch.setattr(torch, "tensor", _no_tensor_from_data)
    monkeypatch.setattr(torch, "as_tensor", _no_tensor_from_data)
    with hifuse.use_fused():
        with _FailOnSync():
            loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
        model.eval()
        with torch.no_grad(), _FailOnSync():
            model(x)


@pytest.mark.gpu
def test_fused_cuda_step_has_no_sync():
    """On a GPU: a fused bf16 training step and an eval forward under
    torch.cuda.set_sync_debug_mode("error") (after one warm-up step)."""
    model = _small_model()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    target = torch.tensor([0, 1, 2, 0], device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()

    with hifuse.use_fused():
        step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            model.eval()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_kernels
def test_weight_derived_tensors_are_computed_once():
    model = _small_model()
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    calls = []
    from hifuse.fused import common

    original = common._compute

    def counting(sources, compute):
        calls.append(1)
        return original(sources, compute)

    with hifuse.use_fused(), torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "_compute", counting)
        model.eval()  # prepares them
        prepared = len(calls)
        assert prepared > 0
        ref = model(x)
        assert len(calls) == prepared
        # a changed weight is seen and that tensor alone recomputed
        model.fu4.W3.bn.running_var.mul_(2)
        out = model(x)
        assert len(calls) == prepared + 1
        assert not torch.equal(out, ref)
    with torch.no_grad(), hifuse.use_fused(False):
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_nothing_made_while_a_cuda_graph_is_captured_is_cached(monkeypatch):
    # captured work runs only when the graph replays: a tensor made during the capture is
    # empty until then, so no cache may keep it for later calls
    from hifuse.fused import common
    from hifuse_kernels import reference
    from hifuse_kernels import window_attention as wa

    model = _small_model()
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    with hifuse.use_fused(), torch.no_grad():
        model.eval()
        model(x)  # the warm-up before a capture
        model.fu4.W3.bn.running_var.mul_(2)  # its folded weights are now stale
        stores = {m: dict(m._hifuse_derived) for m in model.modules() if hasattr(m, "_hifuse_derived")}
        assert stores
        monkeypatch.setattr(common, "capturing", lambda: True)
        monkeypatch.setattr(reference, "capturing", lambda: True)
        out = model(x)
        for m, store in stores.items():
            assert m._hifuse_derived.keys() == store.keys()
            assert all(m._hifuse_derived[k] is v for k, v in store.items())
        # process-wide caches: entries made before are read, new ones are not kept
        entries = dict(reference._cache)
        assert any(key[0] is wa._make_dense_index for key in entries)
        for (make, *key), value in entries.items():
            assert reference.cached(make, *key) is value
        reference.cached(wa._make_dense_index, 5, 8, 64, torch.device(DEVICE))
        reference.shift_mask(35, 42, 7, 3, torch.device(DEVICE))
        assert reference._cache == entries
        monkeypatch.undo()
        with hifuse.use_fused(False):  # the stale entry was recomputed, not read
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_compiled_eval_graph_holds_no_weight_folding():
    block = hifuse.HFFBlock(32).to(DEVICE).eval()
    l, g = torch.randn(1, 32, 4, 4, device=DEVICE), torch.randn(1, 32, 4, 4, device=DEVICE)
    seen = []

    def backend(gm, _inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    with hifuse.use_fused(), torch.no_grad():
        hifuse.prepare(block)
        expected = block(l, g)
        out = torch.compile(block, backend=backend, fullgraph=True)(l, g)
    torch.testing.assert_close(out, expected)
    assert seen and not any("rsqrt" in t for t in seen), "the BatchNorm folding ran inside the graph"


BLOCK_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` now raises ImportError; find_spec finds nothing
"""

RUN_EVERYWHERE = """
import logging
logging.basicConfig(level=logging.WARNING, format="%(message)s")
import torch, hifuse, hifuse_kernels
model = hifuse.create_model("hifuse_tiny", num_classes=4).eval()
x = torch.randn(1, 3, 32, 32)
with torch.no_grad():
    ref = model(x)
    with hifuse.use_fused():
        out = model(x)
# what cannot run fused runs eager; what can (pure-PyTorch patch GEMMs, native ops) agrees
torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
print("native:", hifuse_kernels.native_load_error() is None)
"""


@pytest.mark.parametrize("missing", ["triton", "native", "both"])
def test_runs_without_triton_or_native_library(tmp_path, missing):
    """import, create_model, an eager forward and use_fused() (falling back, with the reason
    logged) where triton cannot be imported and/or the compiled library is absent."""
    root = ROOT
    if missing in ("native", "both"):
        # a copy of the sources without the compiled library
        root = tmp_path / "src"
        for pkg in PACKAGES:
            for path in (ROOT / pkg).rglob("*.py"):
                dest = root / path.relative_to(ROOT)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(path.read_text())
    code = (BLOCK_TRITON if missing in ("triton", "both") else "") + RUN_EVERYWHERE
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    if missing in ("triton", "both"):
        assert "triton is not installed" in log
    if missing in ("native", "both"):
        assert "native: False" in result.stdout and "extension" in log
    assert "runs eager" in log


def test_library_built_for_another_torch_is_refused(monkeypatch):
    """Loading a library built against another torch could crash the process: it is not
    loaded, and the reason names both versions and the command that rebuilds it."""
    from hifuse_kernels import _ext

    if _ext.library_path() is None:
        pytest.skip("native extension not built")
    monkeypatch.setattr(_ext, "built_for", lambda: "0.0.1")
    reason = _ext._load.__wrapped__()
    assert reason is not None and "built against torch 0.0.1" in reason and torch.__version__ in reason
    assert "pip install ." in reason
