"""Every Triton kernel compiles to a Hopper cubin (no GPU needed): what the interpreter cannot check."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "check_triton_compile.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    # float32 and bfloat16 (the model's training dtypes): float16 variants are the bfloat16
    # code with the other 16-bit type, and took a third of this test's 7 CPU minutes; the
    # script's default compiles them too
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--dtypes", "fp32,bf16"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ", 0 failed" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_bfloat16_stores_round_to_nearest():
    """A kernel's float32 -> bfloat16 store rounds to nearest even, as the GPU does; in the
    interpreter too (conftest mends its truncation), so CPU tests see the GPU's rounding."""
    import torch
    import triton
    import triton.language as tl

    from helpers import DEVICE

    @triton.jit
    def cast(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(Y + offs, tl.load(X + offs, mask=mask).to(Y.dtype.element_ty), mask=mask)

    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 50
    x[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40])
    x = x.to(DEVICE)
    y = torch.empty(1000, dtype=torch.bfloat16, device=DEVICE)
    cast[(1,)](x, y, 1000, BLOCK=1024)
    torch.testing.assert_close(y, x.bfloat16(), rtol=0, atol=0, equal_nan=True)


WRITES_SCRIPT = Path(__file__).parents[1] / "scripts" / "check_kernel_writes.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_compile_sees_exactly_what_each_kernel_writes():
    """torch.compile's reading of each kernel's TTIR names exactly the arguments it stores
    through: a weight called written failed every compiled training step with BatchNorms on
    the H200 (torch 2.11, triton 3.6); a missed output could be dropped by Inductor."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(WRITES_SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert ", 0 failed" in result.stdout


LEDGER_SCRIPT = Path(__file__).parents[1] / "scripts" / "step_ledger.py"


def _record(tmp_path) -> Path:
    """The Triton launches of a narrow HiFuse training step and inference forward (64x64,
    batch 2), as ``step_ledger.py --launches`` records them."""
    out = tmp_path / "launches.json"
    result = subprocess.run([sys.executable, str(LEDGER_SCRIPT), "--narrow", "--image-size", "64", "--at", "2",
                             "--threads", "1", "--fused", "fused", "--launches", str(out)], capture_output=True,
                            text=True, timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_recorded_launches_compile_as_the_gpu_would_compile_them(tmp_path):
    """A training step's and an inference forward's launches, recorded on the CPU, compile to
    the variants a GPU launch would (the recording takes the GPU's choices: no float32 upcast of
    the products), each with its registers and resident programs; one op's here, every
    kernel's by hand (see the script)."""
    path = _record(tmp_path)
    records = json.loads(path.read_text())["launches"]
    kernels = {r["kernel"].rsplit(".", 2)[-2] for r in records}
    assert {"window_attention", "dwconv_layer_norm", "batch_norm_act", "gelu_linear", "layer_norm_cat"} <= kernels
    assert all(r["args"]["UPCAST"] == {"value": False} for r in records if "UPCAST" in r["args"])
    assert all(a["aligned"] for r in records for a in r["args"].values() if "pointer" in a)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--launches", str(path), "--only", "layer_norm_cat"],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert lines and all("programs/SM" in line and "loads (B: count) " in line and "layer_norm_cat." in line
                         for line in lines)
    assert ", 0 failed" in result.stdout


def test_load_widths_counts_global_loads_by_their_bytes_a_thread():
    ptx = """
        ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
        @%p1 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
        ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
        ld.global.b16 { %rs2 }, [ %rd4 + 0 ];
        ld.shared.v4.b32 { %r7, %r8, %r9, %r10 }, [ %r11 + 0 ];
        st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r}); import check_triton_compile as c; " \
           f"print(c.load_widths({ptx!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "{2: 2, 8: 1, 16: 1}"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_recorded_variants_follow_the_jit_rules(tmp_path):
    """What decides a launch's compiled variant, as Triton's JIT decides it: an aligned pointer
    and an int divisible by 16 get the divisibility attribute, an int of 1 becomes a constexpr,
    an unaligned pointer and an int the kernel does not specialise on (PROGRAMS) get nothing;
    launches that differ only in values the JIT does not key on are one variant."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pointer = {"pointer": "*bf16", "aligned": True}
    args = dict(X=pointer, CW=pointer, CB=pointer, LW=pointer, LB=pointer, GRAD=pointer, MEAN=pointer, RSTD=pointer,
                DS=pointer, DX=pointer, OUT=pointer, SLOTS=pointer, PART={"pointer": "*fp32", "aligned": False},
                N={"int": 96}, H={"int": 7}, W={"int": 1}, C={"int": 96}, BAND={"int": 3}, PROGRAMS={"int": 32},
                HAS_DS={"value": False}, BLOCK_P={"int": 8}, BLOCK_C={"int": 128})
    launches = [{"kernel": "hifuse_kernels.dwconv_layer_norm._bwd_kernel", "args": args,
                 "options": {"num_warps": 8}, "launches": 1},
                {"kernel": "hifuse_kernels.dwconv_layer_norm._bwd_kernel",
                 "args": {**args, "N": {"int": 160}, "BAND": {"int": 1}, "PROGRAMS": {"int": 7}},
                 "options": {"num_warps": 8}, "launches": 2}]
    path = tmp_path / "launches.json"
    path.write_text(json.dumps({"launches": launches}))
    code = f"""
import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})
import check_triton_compile as c
v, = c.recorded_variants({str(path)!r})
names = [p.name for p in v["kernel"].params]
print(sorted(names[i] for (i,) in v["attrs"]), v["constexprs"], v["signature"]["PROGRAMS"], v["launches"])
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    aligned = sorted(["X", "CW", "CB", "LW", "LB", "GRAD", "MEAN", "RSTD", "DS", "DX", "OUT", "SLOTS", "N", "C"])
    # constexprs left out of a launch take the kernel's defaults; BAND, not specialised, is not 1 there
    want = "{'W': 1, 'HAS_DS': False, 'BLOCK_P': 8, 'BLOCK_C': 128, 'REBUILD': False, 'PAD': 0, 'IMGS': 1}"
    assert result.stdout.strip() == f"{aligned} {want} i32 3"
