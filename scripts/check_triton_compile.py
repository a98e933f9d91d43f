"""Compile every Triton kernel of hifuse_kernels for a GPU target, without a GPU.

Catches what the CPU interpreter cannot: type errors, unsupported operations and layout
problems that only show when Triton lowers a kernel to PTX and a cubin. Usage:

    python scripts/check_triton_compile.py [--arch 90]

Must run without TRITON_INTERPRET=1 (kernels defined for the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import hifuse_kernels._triton as _triton  # noqa: E402
import hifuse_kernels.batch_norm_act as bna  # noqa: E402
import hifuse_kernels.dwconv_layer_norm as dln  # noqa: E402
import hifuse_kernels.channel_pool as cp  # noqa: E402
import hifuse_kernels.gated_layer_norm as gln  # noqa: E402
import hifuse_kernels.spatial_pool as sp  # noqa: E402
import hifuse_kernels.gelu_residual as gr  # noqa: E402
import hifuse_kernels.residual_layer_norm as rln  # noqa: E402
import hifuse_kernels.window_attention as wa  # noqa: E402

FLOATS = {"scale", "eps"}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def cases(dtype: str):
    """(kernel, pointer dtypes by name ('dt' = the activation dtype), constexprs)."""
    prec = "ieee" if dtype == "fp32" else "tf32"
    attn = dict(WS=7, BN=64, D=32, BD=32, SHIFTED=True, PRECISION=prec)
    f32 = "fp32"
    yield wa._fwd_kernel, dict(QKV="dt", BIAS="dt", TABLE=f32, OUT="dt", LSE=f32), attn
    yield wa._fwd_kernel, dict(QKV="dt", BIAS="dt", TABLE=f32, OUT="dt", LSE=f32), {**attn, "SHIFTED": False, "D": 64, "BD": 64}
    yield wa._bwd_kernel, dict(QKV="dt", BIAS="dt", TABLE=f32, OUT="dt", DOUT="dt", LSE=f32, DQKV="dt",
                               DBIAS_PART=f32, DS_PART=f32), attn
    for block_c in (128, 1024):
        tiles = dict(BLOCK_P=dln.BLOCK_P, BLOCK_C=block_c)  # launched with dln._warps(C) warps
        yield dln._fwd_kernel, dict(X="dt", CW=f32, CB=f32, LW=f32, LB=f32, OUT="dt", MEAN=f32, RSTD=f32), tiles
        # under autocast: the fp32 stream in, the GEMM's dtype out
        yield dln._fwd_kernel, dict(X=f32, CW=f32, CB=f32, LW=f32, LB=f32, OUT="dt", MEAN=f32, RSTD=f32), tiles
        yield dln._bwd_norm_kernel, dict(X="dt", CW=f32, CB=f32, LW=f32, GRAD="dt", MEAN=f32, RSTD=f32, DY=f32,
                                         PART_LW=f32, PART_LB=f32), tiles
        yield dln._bwd_conv_kernel, dict(X="dt", CW=f32, DY=f32, DX="dt", PART_CW=f32, PART_CB=f32), tiles
    yield gr._fwd_kernel, dict(Y="dt", S=f32, OUT=f32), dict(BLOCK=gr.BLOCK)
    yield gr._bwd_kernel, dict(G="dt", Y="dt", DY="dt"), dict(BLOCK=gr.BLOCK)
    tile = dict(BLOCK_M=bna.BLOCK_M, BLOCK_C=bna.BLOCK_C, WARPS=4)
    for prologue in (False, True):  # with the prologue: bf16 conv output, fp32 residual stream
        io = dict(Y="dt", R=f32 if prologue else "dt")
        yield bna._stats_kernel, dict(**io, MEAN_PART=f32, M2_PART=f32), {**tile, "PROLOGUE": prologue}
        for act in (0, 1, 2):
            flags = {**tile, "PROLOGUE": prologue, "ACT": act}
            out = "dt"  # with the prologue too: the IRMLP's bn1 writes conv2's GEMM dtype
            yield bna._apply_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT=out), flags
            yield bna._apply_pool_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT=out), flags
            for pool in (False, True):
                bwd = {**flags, "POOL": pool}
                yield bna._bwd_reduce_kernel, dict(G=out, **io, MEAN=f32, INVSTD=f32, W=f32, B=f32,
                                                   SUM_DZ_PART=f32, SUM_DZXH_PART=f32), bwd
                yield bna._bwd_apply_kernel, dict(G=out, **io, MEAN=f32, INVSTD=f32, W=f32, B=f32, SUM_DZ=f32,
                                                  SUM_DZXH=f32, DY="dt", DR=io["R"]), bwd
    for c in (96, 768):  # fp32 residual stream, dt GEMM output and normalised rows (autocast)
        rows = dict(BLOCK_M=_triton.rows_per_program(c), BLOCK_C=_triton.block_channels(c), WARPS=_triton.row_warps(c))
        for prologue in (False, True):
            yield rln._fwd_kernel, dict(Y="dt", S=f32, W=f32, B=f32, OUT=f32, NORMED="dt", MEAN=f32, RSTD=f32), \
                {**rows, "PROLOGUE": prologue}
            yield rln._bwd_kernel, dict(DOUT=f32, DNORMED="dt", Y="dt", S=f32, W=f32, MEAN=f32, RSTD=f32, DY="dt",
                                        DS=f32, PART_W=f32, PART_B=f32), {**rows, "PROLOGUE": prologue, "HAS_DOUT": prologue}
    pool = dict(BLOCK_S=cp.BLOCK_S, BLOCK_C=64)
    yield cp._channel_pool_kernel, dict(G="dt", SUM=f32, MAX=f32, ARG="i32"), pool
    yield cp._channel_pool_bwd_kernel, dict(D_AVG="dt", D_MAX="dt", ARG="i32", DG="dt"), pool
    for c in (96, 768):  # launched as the op launches them, fp32 g and l with dt gates and X (autocast)
        rows = dict(BLOCK_P=_triton.rows_per_program(c, 1), BLOCK_C=_triton.block_channels(c), WARPS=_triton.row_warps(c))
        yield sp._spatial_pool_kernel, dict(L="dt", OUT="dt"), rows
        yield sp._spatial_pool_bwd_kernel, dict(L="dt", D_OUT="dt", DL="dt"), rows
        rows = dict(BLOCK_P=_triton.rows_per_program(c, 3), BLOCK_C=_triton.block_channels(c), WARPS=_triton.row_warps(c))
        yield gln._gated_ln_kernel, dict(G=f32, CG="dt", L=f32, SG="dt", X="dt", W=f32, B=f32, OUT=f32, MEAN=f32,
                                        RSTD=f32), rows
        yield gln._gated_ln_bwd_kernel, dict(GRAD=f32, G=f32, CG="dt", L=f32, SG="dt", X="dt", W=f32, MEAN=f32,
                                            RSTD=f32, DG=f32, DL=f32, DSG=f32, DX="dt", PART_CG=f32, PART_W=f32,
                                            PART_B=f32), rows


def signature(kernel, pointers: dict, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for p in kernel.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in pointers:
            kind = pointers[p.name]
            sig[p.name] = "*" + (DTYPES[dtype] if kind == "dt" else kind)
        elif p.name in FLOATS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    missing = (set(constexprs) - {"WARPS"}) ^ {p.name for p in kernel.params if p.is_constexpr}
    if missing:
        raise SystemExit(f"{kernel.fn.__name__}: constexprs out of date: {sorted(missing)}")
    return sig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dtype in DTYPES:
        for kernel, pointers, constexprs in cases(dtype):
            name = f"{kernel.fn.__module__.split('.')[-1]}.{kernel.fn.__name__} {dtype} {constexprs}"
            start = time.time()
            try:
                constexprs = dict(constexprs)
                warps = constexprs.pop("WARPS", None)
                if warps is None and "BLOCK_C" in constexprs:
                    warps = dln._warps(constexprs["BLOCK_C"])
                src = ASTSource(fn=kernel, signature=signature(kernel, pointers, constexprs, dtype), constexprs=constexprs)
                options = {"num_warps": warps} if warps else {}
                compiled = triton_compile(src, target=target, options=options)
                print(f"ok   {name} ({time.time() - start:.1f}s, shared {compiled.metadata.shared} B)")
            except Exception as err:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL {name}: {type(err).__name__}: {err}")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
