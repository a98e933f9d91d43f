"""Compile every Triton kernel of hifuse_kernels for a GPU target, without a GPU.

Catches what the CPU interpreter cannot: type errors, unsupported operations and layout
problems that only show when Triton lowers a kernel to PTX and a cubin. Reports each kernel's
registers per thread and spilled bytes (``ptxas -v`` on its PTX), and fails when a kernel
spills, a memory-bound kernel needs more than MEMORY_BOUND_REGS registers, or a kernel is
not compiled under its op file's name (``_triton.kernel``). Usage:

    python scripts/check_triton_compile.py [--arch 90] [--jobs N]

The variants are compiled as Triton's JIT compiles a launch: pointers 16-byte aligned (as
every fresh tensor's is), which lets loads and stores be vectorised, and sizes not
specialised (any shape). What a launch of given sizes compiles differs again: the JIT also
specialises an int on divisibility by 16 (and on being 1). ``--launches FILE`` compiles
exactly the variants of the launches recorded there, e.g. those of a HiFuse-Tiny training
step (``step_ledger.py --launches``), and reports how many programs of each an SM holds and
how wide its global loads are (``load_widths``: a memory-bound kernel whose threads load one
2-byte element at a time keeps too few bytes in flight to reach the memory's bandwidth):

    TRITON_INTERPRET=1 python scripts/step_ledger.py --fused fused --at 32 --launches steps.json
    python scripts/check_triton_compile.py --launches steps.json

Must run without TRITON_INTERPRET=1 (kernels defined for the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton import compile as triton_compile  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import hifuse_kernels._triton as _triton  # noqa: E402
import hifuse_kernels.batch_norm_act as bna  # noqa: E402
import hifuse_kernels.dwconv_layer_norm as dln  # noqa: E402
import hifuse_kernels.channel_gate as cg  # noqa: E402
import hifuse_kernels.channel_pool as cp  # noqa: E402
import hifuse_kernels.gated_layer_norm as gln  # noqa: E402
import hifuse_kernels.layer_norm_cat as lnc  # noqa: E402
import hifuse_kernels.patch_conv_norm as pcn  # noqa: E402
import hifuse_kernels.spatial_pool as sp  # noqa: E402
import hifuse_kernels.gelu_linear as gl  # noqa: E402
import hifuse_kernels.gelu_residual as gr  # noqa: E402
import hifuse_kernels.residual_layer_norm as rln  # noqa: E402
import hifuse_kernels.window_attention as wa  # noqa: E402

FLOATS = {"scale", "eps", "momentum", "momentum_rest"}
# Every kernel but the window attention's streams memory and needs many resident warps to hide
# its latency. Registers are given per program: at 128 a thread, 65536 per SM hold two 8-warp
# programs (or one of 16 warps); at 134, one 8-warp program. More than this fails.
MEMORY_BOUND_REGS = 128
COMPUTE_KERNELS = {"window_attention", "gelu_linear"}
# Variants that still spill, with the spill-store bytes measured (sm_90a, pointers aligned and
# sizes not specialised, as the cases below are compiled), per triton version and keyed by
# (kernel, dtype, head dim, shifted): a check fails when one of them spills more, no longer
# spills (take it off), or any other variant spills at all; an entry no variant of the run
# matches fails too. Left: the float32 window-attention backward (training without autocast;
# 16-48 B a thread) and 4 B in two forwards. The bf16 backward and forward of a HiFuse-Tiny
# step, compiled as its launches specialise them (``--launches``), spill nothing. Under a
# triton not listed here the largest figure of any version is allowed and a spill that has
# gone is not reported.
_BWD = "window_attention._bwd_kernel"
_FWD = "window_attention._fwd_kernel"
KNOWN_SPILLS = {
    "3.8": {(_BWD, "fp32", 16, False): 16, (_BWD, "fp32", 32, True): 32, (_BWD, "fp32", 32, False): 32,
            (_BWD, "fp32", 64, True): 36, (_BWD, "fp32", 64, False): 40, (_FWD, "fp32", 64, True): 4,
            (_FWD, "bf16", 32, False): 4},
    "3.6": {(_BWD, "fp32", 32, True): 48, (_BWD, "fp32", 32, False): 24, (_BWD, "fp32", 64, True): 24,
            (_BWD, "fp32", 64, False): 20},
}


def known_spills() -> tuple[dict, bool]:
    """(the known spills for the installed triton, whether that version is listed)."""
    version = ".".join(triton.__version__.split(".")[:2])
    if version in KNOWN_SPILLS:
        return KNOWN_SPILLS[version], True
    merged: dict = {}
    for spills in KNOWN_SPILLS.values():
        for key, n in spills.items():
            merged[key] = max(merged.get(key, 0), n)
    return merged, False


SPILLS, SPILLS_LISTED = known_spills()

DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def row_launch(c: int, tiles: int, rows_name: str) -> dict:
    """The constexprs and warps a row op launches with over c channels, ``tiles`` tiles held."""
    rows = _triton.rows_per_program(c, tiles)
    return {rows_name: rows, "BLOCK_C": _triton.block_channels(c), "WARPS": _triton.row_warps(c, rows)}


def _as_warps(launch: dict) -> dict:
    """An op's launch dict with num_warps as the WARPS these cases use."""
    launch = dict(launch)
    launch["WARPS"] = launch.pop("num_warps")
    return launch


def cases(dtype: str):
    """(kernel, pointer dtypes by name ('dt' = the activation dtype), constexprs)."""
    prec = "ieee" if dtype == "fp32" else "tf32"
    slots = wa._window_slots(7, TORCH_DTYPE[dtype])
    attn = dict(WS=7, WP=slots, BN=wa._padded_tokens(7, slots), D=32, BD=32, SHIFTED=True, PRECISION=prec)
    f32 = "fp32"
    fwd = {**attn, "BM": wa.FWD_ROWS, "WARPS": wa.FWD_WARPS}
    yield wa._dense_bias_kernel, dict(TABLE="dt", INDEX="i64", OUT=f32), dict(BLOCK=wa.DENSE_BLOCK)
    yield wa._bwd_finish_kernel, dict(DS_PART=f32, DBIAS_PART=f32, DTABLE=f32, DBIAS="dt"), \
        dict(TP=wa._offset_slots(slots), BD=32, BLOCK_P=wa.FINISH_BLOCK // wa.FINISH_OUTPUTS,
             BLOCK_O=wa.FINISH_OUTPUTS, WARPS=wa.FINISH_WARPS)
    for d in wa.HEAD_DIMS:  # every supported head dim, shifted (the more registers) and not
        for shifted in (True, False):
            shape = {**attn, "D": d, "BD": d, "SHIFTED": shifted}
            yield wa._fwd_kernel, dict(QKV="dt", BIAS=f32, REL=f32, OUT="dt", LSE=f32), {**shape, "BM": fwd["BM"], "WARPS": fwd["WARPS"]}
            ptrs = dict(QKV="dt", BIAS=f32, REL=f32, OUT="dt", DOUT="dt", LSE=f32, DQKV="dt", DBIAS_PART=f32,
                        DS_PART=f32, DS_SLOT=f32)
            if dtype == "fp32" and wa.BWD_FP32_KEYS < shape["BN"]:  # as the op launches it
                keys = {"BK": wa.BWD_FP32_KEYS, "WARPS": wa.BWD_FP32_WARPS[d]}
            else:
                keys = {"BK": shape["BN"], "WARPS": wa.BWD_WARPS}
            offsets = {"ON_CHIP": dtype != "fp32", "TP": wa._offset_slots(slots)}
            yield wa._bwd_kernel, ptrs, {**shape, "BM": wa.BWD_ROWS, **offsets, **keys}
    for block_c in (128, 256, 512, 1024):  # every channel block of HiFuse (96 .. 768 channels)
        tile = dln._launch_tile(1 << 20, block_c)
        tiles = dict(BLOCK_P=tile["BLOCK_P"], BLOCK_C=block_c, WARPS=tile["num_warps"])
        yield dln._fwd_kernel, dict(X="dt", CW=f32, CB=f32, LW=f32, LB=f32, OUT="dt", MEAN=f32, RSTD=f32), \
            {**tiles, "PAD": 0}
        # under autocast: the fp32 stream in, the GEMM's dtype out
        for pad in (0, dln.ONES_PAD):  # with the ones column (the op's ``ones``)
            yield dln._fwd_kernel, dict(X=f32, CW=f32, CB=f32, LW=f32, LB=f32, OUT="dt", MEAN=f32, RSTD=f32), \
                {**tiles, "PAD": pad}
    for c, width in ((96, 56), (192, 28), (384, 14), (768, 7)):  # HiFuse's stages at 224 x 224
        tile = dln.backward_tile(width, c)
        tiles = dict(BLOCK_P=tile["BLOCK_P"], BLOCK_C=tile["BLOCK_C"], WARPS=tile["num_warps"])
        for x in ("dt", f32):  # f32: under autocast, the fp32 stream with the GEMM's gradient
            for rebuild in (False, True):  # rebuild: the forward's output too, with the ones column
                for has_ds in (False, True):  # with the stream's other gradient added in
                    yield dln._bwd_kernel, dict(X=x, CW=f32, CB=f32, LW=f32, LB=f32, GRAD="dt", MEAN=f32, RSTD=f32,
                                                DS=x, DX=x, OUT="dt", SLOTS="dt", PART=f32), \
                        {**tiles, "HAS_DS": has_ds, "REBUILD": rebuild, "PAD": dln.ONES_PAD if rebuild else 0,
                         "IMGS": 1}  # one image a unit on a GPU
    for n in (96, 192, 384, 768):  # the IRMLP's conv3 widths (K = 12 N), at triton's default num_stages (3)
        ce = {"PRECISION": prec, "UPCAST": False}
        gemm = lambda launch: {k: v for k, v in _as_warps(launch).items() if k != "num_stages"}  # noqa: E731
        dt = TORCH_DTYPE[dtype]
        yield gl._fwd_kernel, dict(H="dt", W=f32, B=f32, OUT="dt"), {**gemm(gl.fwd_launch(1 << 20, n, dt)), **ce,
                                                                     "HAS_BIAS": False}
        yield gl._bwd_input_kernel, dict(G="dt", W=f32, H="dt", DH="dt"), \
            {**gemm(gl.bwd_input_launch(1 << 20, n, dt)), **ce}
        yield gl._bwd_weight_kernel, dict(G="dt", H="dt", PART=f32), {**gemm(gl.bwd_weight_launch(1 << 20, n, dt)), **ce}
        # one pass: up to 256 columns in bf16/fp16, wider where the table's route asks (ONE_PASS)
        if gl.fused_backward(n, dt, one_pass=n > 256):
            yield gl._bwd_kernel, dict(G="dt", W=f32, H="dt", DH="dt", PART=f32), \
                {**gemm(gl.bwd_launch(1 << 20, n, dt)), **ce}
    yield gr._fwd_kernel, dict(Y="dt", S=f32, OUT=f32), dict(BLOCK=gr.BLOCK)
    yield gr._bwd_kernel, dict(G="dt", Y="dt", DY="dt"), dict(BLOCK=gr.BLOCK)
    ungated = {"GATED": False, "X_BN": False, "X_ACT": 0}
    for src in ("dt", f32):  # the IRMLP's bn1 with norm3's result computed on load (g and l fp32 at stage 1)
        tiles = {}
        # as bna._launch takes them, at the first block's 96 channels a part
        for name, block_m in (("stats", bna.BLOCK_M), ("apply", bna.BLOCK_M), ("backward", bna.BWD_BLOCK_M)):
            tile = bna.gated_tile(name, bna.device_tile(block_m, 3 * 96), 96, 4 if dtype == "fp32" else 2)
            tiles[name] = {"BLOCK_M": tile["BLOCK_M"], "BLOCK_C": tile["BLOCK_C"], "WARPS": tile["num_warps"]}
        gate = {"GATED": True, "X_BN": True, "X_ACT": 2, "PROLOGUE": False}
        io = dict(Y="dt", R="dt", G=src, CG=f32, L=src, SG="dt", X="dt", XM=f32, XI=f32, XW=f32, XB=f32, LM=f32,
                  LR=f32, LW=f32, LB=f32, RD=f32)
        yield bna._stats_kernel, dict(**io, MEAN_PART="fp64", M2_PART="fp64", COUNT_PART="fp64"), \
            {**tiles["stats"], **gate}
        yield bna._apply_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT="dt", SC="dt"), \
            {**tiles["apply"], **gate, "ACT": 0, "SHORTCUT": False}
        bwd = {**tiles["backward"], **gate, "ACT": 0, "POOL": False, "GRAD2": False}
        for rebuild in (False, True):
            yield bna._bwd_reduce_kernel, dict(GR="dt", **io, MEAN=f32, INVSTD=f32, W=f32, B=f32,
                                               SUM_DZ_PART="fp64", SUM_DZXH_PART="fp64", OUT="dt", G2="dt"), \
                {**bwd, "REBUILD": rebuild}
        yield bna._bwd_apply_kernel, dict(GR="dt", **io, MEAN=f32, INVSTD=f32, W=f32, B=f32, SUM_DZ=f32,
                                          SUM_DZXH=f32, DY="dt", DR=f32, G2="dt"), bwd
    for c in (64, 1):  # every 1x1 convolution's BatchNorm, and the spatial gate's one channel
        def tile(block_m, c=c):
            return {**bna.device_tile(block_m, c), "WARPS": bna.WARPS}

        for prologue in (False, True) if c > 1 else (False,):  # prologue: bf16 conv output, fp32 stream
            io = dict(Y="dt", R=f32 if prologue else "dt")
            yield bna._stats_kernel, dict(**io, MEAN_PART="fp64", M2_PART="fp64", COUNT_PART="fp64"), \
                {**tile(bna.BLOCK_M), "PROLOGUE": prologue, **ungated}
            for act in (0, 1, 2, 3) if c == 1 else (0, 1, 2):  # sigmoid: the spatial gate's one channel
                flags = {"PROLOGUE": prologue, "ACT": act}
                out = "dt"  # with the prologue too: the IRMLP's bn1 writes conv2's GEMM dtype
                yield bna._apply_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT=out, SC=out), \
                    {**tile(bna.BLOCK_M), **flags, "SHORTCUT": False, **ungated}
                if c > 1 and not prologue and act == 0:  # conv3's, adding the fusion block's shortcut
                    yield bna._apply_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT=out, SC=out), \
                        {**tile(bna.BLOCK_M), **flags, "SHORTCUT": True, **ungated}
                if c > 1:  # only Updim's BatchNorm pools
                    yield bna._apply_pool_kernel, dict(**io, MEAN=f32, INVSTD=f32, W=f32, B=f32, OUT=out), \
                        {**tile(bna.POOL_BLOCK_M), **flags}
                for pool in (False, True) if c > 1 else (False,):
                    bwd = {**tile(bna.BWD_BLOCK_M), **flags, "POOL": pool}
                    # grad2: Updim's two gradients (its part's and the shortcut's), summed on load
                    two = (False, True) if pool and act == 1 else (False,)
                    for rebuild in (False, True) if not pool else (False,):  # rebuild: the apply's output too
                        for grad2 in two:
                            yield bna._bwd_reduce_kernel, dict(GR=out, **io, MEAN=f32, INVSTD=f32, W=f32, B=f32,
                                                               SUM_DZ_PART="fp64", SUM_DZXH_PART="fp64", OUT=out,
                                                               G2=out), \
                                {**bwd, "REBUILD": rebuild, "GRAD2": grad2, **ungated}
                    for grad2 in two:
                        yield bna._bwd_apply_kernel, dict(GR=out, **io, MEAN=f32, INVSTD=f32, W=f32, B=f32,
                                                          SUM_DZ=f32, SUM_DZXH=f32, DY="dt", DR=io["R"], G2=out), \
                            {**bwd, "GRAD2": grad2, **ungated}
    for c in (96, 1):  # the combining kernels' channel blocks: 16 channels, and the spatial gate's one
        combine = _as_warps(bna.combine_launch(c)[1])
        for params in (True, False):  # without the parameters' gradients: sums another op's pass reduced
            yield bna._bwd_sums_kernel, dict(SUM_DZ_PART="fp64", SUM_DZXH_PART="fp64", SUM_DZ=f32, SUM_DZXH=f32,
                                             DW=f32, DB=f32), dict(**combine, PARAMS=params)
        for update in (False, True):
            yield bna._stats_combine_kernel, dict(MEAN_PART="fp64", M2_PART="fp64", COUNT_PART="fp64", MEAN=f32,
                                                  INVSTD=f32, VAR=f32, RUN_MEAN=f32, RUN_VAR=f32, NBT="i64"), \
                dict(**combine, UPDATE=update)
    for c in (96, 192, 384, 768):  # fp32 residual stream, dt GEMM output and normalised rows (autocast)
        rows = row_launch(c, 1, "BLOCK_M")
        for prologue, patch in ((False, 1), (True, 1), (False, 2)):  # patch 2: the local downsamples' order
            for pad in (0, rln.ONES_PAD) if patch == 1 else (0,):  # with the ones column (the op's ``ones``)
                yield rln._fwd_kernel, dict(Y="dt", S=f32, W=f32, B=f32, OUT=f32, NORMED="dt", MEAN=f32, RSTD=f32), \
                    {**rows, "PROLOGUE": prologue, "PATCH": patch, "PAD": pad}
            # rebuild (patch 1): the normalised rows too, with the ones column
            for rebuild in (False, True) if patch == 1 else (False,):
                yield rln._bwd_kernel, dict(DOUT=f32, DNORMED="dt", Y="dt", S=f32, W=f32, MEAN=f32, RSTD=f32, DY="dt",
                                            DS=f32, PART_W=f32, PART_B=f32, B=f32, NORMED="dt"), \
                    {**row_launch(c, rln.REBUILD_TILES if rebuild else rln.BWD_TILES, "BLOCK_M"), "PROLOGUE": prologue,
                     "HAS_DOUT": prologue, "PATCH": patch, "REBUILD": rebuild, "PAD": rln.ONES_PAD if rebuild else 0}
    # the stems: a 4x4x3 patch, 96 channels; the image fp32, the GEMM in the activation dtype
    stem = dict(GEMM=getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]), KSIZE=4,
                UPCAST=False, BLOCK_M=pcn.BLOCK_M, BLOCK_K=64, BLOCK_N=128, WARPS=pcn.WARPS)
    for has_bias in (False, True) if dtype != "fp32" else ():  # float32 GEMMs take the patch GEMM path
        yield pcn._fwd_kernel, dict(X=f32, WK=f32, BIAS=f32, LW=f32, LB=f32, OUT=f32, MEAN=f32, RSTD=f32), \
            {**stem, "HAS_BIAS": has_bias}
        yield pcn._bwd_kernel, dict(X=f32, WK=f32, BIAS=f32, LW=f32, GRAD=f32, MEAN=f32, RSTD=f32, PART=f32), \
            {**stem, "HAS_BIAS": has_bias}
    pool = dict(BLOCK_S=cp.BLOCK_S, BLOCK_C=64)
    for low in (False, True):  # with g's cast for its GEMM (the first fusion block's float32 g)
        yield cp._channel_pool_kernel, dict(G="dt", SUM=f32, MAX=f32, ARG="i32", LOW="bf16"), \
            {**pool, "HAS_LOW": low, "WARPS": cp.POOL_WARPS}
    yield cp._channel_pool_combine_kernel, dict(SUM=f32, MAX=f32, ARG="i32", AVG="dt", BEST="dt", OUT_ARG="i32"), \
        dict(BLOCK_C=64, WARPS=1)
    for acc in (False, True):  # with g's gradient from its next reader added in
        yield cp._channel_pool_bwd_kernel, dict(D_AVG="dt", D_MAX="dt", ARG="i32", ACC=f32, DG=f32), \
            {**pool, "HAS_ACC": acc}
    for c in (96, 768):  # the SE MLP's hidden widths 6 and 48; float32 poolings (the first block's) and dt
        launch = _as_warps(cg._launch(128, c, c // 16))
        for x in (f32, "dt"):
            yield cg._fwd_kernel, dict(X=x, W1=f32, W2=f32, H="dt", GATE="dt"), {**launch, "UPCAST": False}
            yield cg._bwd_kernel, dict(DGATE="dt", GATE="dt", H="dt", W1=f32, W2=f32, DS="dt", DH="dt", DX=x), \
                {**launch, "UPCAST": False}
            yield cg._bwd_weight_kernel, dict(X=x, DS="dt", H="dt", DH="dt", DW1=f32, DW2=f32), \
                {**launch, "UPCAST": False}
    for c in (96, 192, 384, 768):  # launched as the op launches them, fp32 g and l with dt gates and X (autocast)
        rows = row_launch(c, 1, "BLOCK_P")
        for low in (False, True):  # with l's cast for its GEMM (the first fusion block's float32 l)
            yield sp._spatial_pool_kernel, dict(L="dt", OUT="dt", LOW="bf16"), {**rows, "HAS_LOW": low}
        for acc in (False, True):  # with l's gradient from its next reader added in
            yield sp._spatial_pool_bwd_kernel, dict(L="dt", D_OUT="dt", ACC=f32, DL="dt"), \
                {**row_launch(c, 2, "BLOCK_P"), "HAS_ACC": acc}
        bn_ptrs = {f"BN_{s}{p}": f32 for s in "MIWB" for p in "ABD"}
        for parts in (2, 3):  # the fusion blocks' norm2 and norm1: the GEMMs' dtype in and out
            rows = row_launch(c, parts, "BLOCK_M")
            bn = 3 if parts == 2 else 6  # W_l's and W_g's BatchNorms applied on load
            for mask in (0, bn):
                yield lnc._rows_fwd_kernel, dict(A="dt", B="dt", D="dt", W=f32, BIAS=f32, OUT="dt", MEAN=f32,
                                                 RSTD=f32, **bn_ptrs), {**rows, "PARTS": parts, "BN": mask}
            # rebuild: the forward's output too, with a ones column (the projection's bias); and with
            # the BatchNorms applied on load, their sums (or not: under torch.compile)
            # at one row a block (768 channels) a width with no spare lanes writes the ones apart
            variants = [(False, 0, True, False), (True, 0, True, False), (True, bn, True, False),
                        (True, bn, False, False)] + ([(True, bn, True, True)] if c == 768 else [])
            for rebuild, mask, sums, apart in variants:
                yield lnc._rows_bwd_kernel, dict(GRAD="dt", A="dt", B="dt", D="dt", W=f32, MEAN=f32, RSTD=f32,
                                                 DA="dt", DB="dt", DD="dt", PART_W=f32, PART_B=f32, BIAS=f32, OUT="dt",
                                                 BN_SUMS="fp64", **bn_ptrs), \
                    {**_as_warps(lnc._rows_bwd_launch(c)), "PARTS": parts, "REBUILD": rebuild, "BN": mask,
                     "SUMS": sums, "PAD": lnc.ONES_PAD if rebuild else 0, "ONES_APART": apart}
        rows = row_launch(c, 3, "BLOCK_P")
        x_bn = dict(XM=f32, XI=f32, XW=f32, XB=f32)
        # x_bn: x given as the projection's output, its BatchNorm + GELU applied on load
        for out2, on_load in ((False, False), (True, False), (False, True), (True, True)):  # with the GEMM's copy
            yield gln._gated_ln_kernel, dict(G=f32, CG="dt", L=f32, SG="dt", X="dt", W=f32, B=f32, OUT=f32, OUT2="dt",
                                            MEAN=f32, RSTD=f32, **x_bn), \
                {**rows, "HAS_OUT2": out2, "X_BN": on_load, "X_ACT": 2 if on_load else 0}
        # with conv1's gradient (GEMM dtype); x's BatchNorm applied on load, with its backward's sums
        for grad2, on_load, sums in ((False, False, False), (True, False, False), (True, True, False),
                                     (True, True, True)):
            yield gln._gated_ln_bwd_kernel, dict(GRAD=f32, GRAD2="dt", G=f32, CG="dt", L=f32, SG="dt", X="dt", W=f32,
                                                MEAN=f32, RSTD=f32, DG=f32, DL=f32, DSG="dt", DX="dt", PART_CG=f32,
                                                PART_W=f32, PART_B=f32, **x_bn, BN_SUMS="fp64"), \
                {**_as_warps(gln.bwd_launch(c)), "HAS_GRAD2": grad2, "X_BN": on_load, "X_ACT": 2 if on_load else 0,
                 "SUMS": sums}


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


def resources(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack frame and spill bytes of the kernel, as ``ptxas -v`` reports them."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([ptxas, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True, check=True)
    text = run.stdout + run.stderr
    found = {
        "regs": re.search(r"Used (\d+) registers", text),
        "stack": re.search(r"(\d+) bytes stack frame", text),
        "spill_stores": re.search(r"(\d+) bytes spill stores", text),
        "spill_loads": re.search(r"(\d+) bytes spill loads", text),
    }
    return {k: int(m.group(1)) if m else 0 for k, m in found.items()}


_ACCESS = re.compile(r"\bld\.global(?:\.[A-Za-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b")


def load_widths(ptx: str) -> dict[int, int]:
    """{bytes a thread loads: global load instructions} in the kernel's PTX (each instruction
    once, however often it runs)."""
    widths: dict[int, int] = {}
    for vec, bits in _ACCESS.findall(ptx):
        size = int(vec or 1) * int(bits) // 8
        widths[size] = widths.get(size, 0) + 1
    return dict(sorted(widths.items()))


ALIGNED = [["tt.divisibility", 16]]  # the attribute Triton's JIT gives an aligned pointer or an int % 16 == 0


def aligned_pointers(kernel, sig: dict) -> dict:
    """The attributes of a launch on 16-byte aligned tensors: on each pointer argument."""
    return {(i,): ALIGNED for i, p in enumerate(kernel.params) if sig[p.name].startswith("*")}


def spill_key(kernel, dtype: str, constexprs: dict) -> tuple:
    """The KNOWN_SPILLS key of a variant."""
    module = kernel.fn.__module__.split(".")[-1]
    return f"{module}.{kernel.fn.__name__}", dtype, constexprs.get("D"), constexprs.get("SHIFTED")


def usage_problems(module: str, use: dict[str, int], known: int = 0) -> list[str]:
    """What fails a compiled variant of a kernel of ``module`` using ``use`` (``resources``),
    ``known`` its listed spill-store bytes."""
    problems = []
    if use["spill_stores"] > known or (use["spill_loads"] and not known):
        problems.append("spills registers to local memory" + (f" (more than the known {known} B)" if known else ""))
    elif known and SPILLS_LISTED and not use["spill_stores"]:
        problems.append("no longer spills: take it out of KNOWN_SPILLS")
    if module not in COMPUTE_KERNELS and use["regs"] > MEMORY_BOUND_REGS:
        problems.append(f"memory-bound kernel over {MEMORY_BOUND_REGS} registers")
    return problems


def compile_case(job: tuple[int, str, int]) -> tuple[bool, str]:
    """(passed, report line) of case ``index`` of ``cases(dtype)``."""
    arch, dtype, index = job
    kernel, pointers, constexprs = list(cases(dtype))[index]
    module = kernel.fn.__module__.split(".")[-1]
    name = f"{module}.{kernel.fn.__name__} {dtype} {constexprs}"
    start = time.time()
    try:
        constexprs = dict(constexprs)
        warps = constexprs.pop("WARPS", None)  # None: Triton's default, as ops launching without num_warps get
        sig = signature(kernel, pointers, constexprs, dtype)
        src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=aligned_pointers(kernel, sig))
        options = {"num_warps": warps} if warps else {}
        compiled = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        use = resources(compiled.asm["ptx"], arch)
    except Exception as err:  # noqa: BLE001 - report every kernel, then fail
        return False, f"FAIL {name}: {type(err).__name__}: {err}"
    usage = (f"{use['regs']:3d} regs, {use['spill_stores']}/{use['spill_loads']} B spilled (stores/loads), "
             f"{use['stack']} B stack, {compiled.metadata.shared} B shared, {compiled.metadata.num_warps} warps")
    problems = usage_problems(module, use, SPILLS.get(spill_key(kernel, dtype, constexprs), 0))
    # what a GPU profile names its launches (the name of a binary in Triton's cache from
    # before may lag: triton 3.6 leaves the name out of the cache key)
    expected = f"{module}_{kernel.fn.__name__.lstrip('_')}"
    if kernel.repr(None) != expected:
        problems.append(f"compiles as {kernel.repr(None)}, not {expected}: define it with _triton.kernel")
    status = "FAIL" if problems else "ok  "
    return not problems, f"{status} {usage}  {name} ({time.time() - start:.1f}s){': ' + '; '.join(problems) if problems else ''}"


@functools.lru_cache(maxsize=None)
def _recorded(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def recorded_variants(path: str) -> list[dict]:
    """The distinct variants Triton's JIT compiles for the launches recorded in ``path``
    (``step_ledger.py --launches``), by its rules read from each kernel's parameters: a pointer
    is specialised on 16-byte alignment, an int on divisibility by 16 and on being 1 (then a
    constexpr), unless the kernel says not to (``do_not_specialize``). Each with the number
    of launches it serves."""
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl

    variants: dict[str, dict] = {}
    for record in _recorded(path)["launches"]:
        module, name = record["kernel"].rsplit(".", 1)
        kernel = getattr(importlib.import_module(module), name)
        sig, constexprs, attrs, shown = {}, {}, {}, {}
        for i, p in enumerate(kernel.params):
            arg = record["args"].get(p.name, {"value": p.default})
            if "pointer" in arg:
                sig[p.name] = arg["pointer"]
                if arg["aligned"] and not p.do_not_specialize and not p.do_not_specialize_on_alignment:
                    attrs[(i,)] = ALIGNED
                continue
            if "dtype" in arg:
                value = tl.dtype(arg["dtype"])
            else:
                value = arg.get("int", arg.get("float", arg.get("value")))
            if p.is_constexpr:
                sig[p.name], constexprs[p.name] = "constexpr", value
                shown[p.name] = arg.get("dtype", value)
                continue
            kind, key = native_specialize_impl(BaseBackend, value, False, not p.do_not_specialize,
                                               not p.do_not_specialize_on_alignment)
            if kind == "constexpr":
                sig[p.name], constexprs[p.name] = "constexpr", value
                shown[p.name] = value
            else:
                sig[p.name] = kind
                if key == "D":
                    attrs[(i,)] = ALIGNED
        options = record["options"]
        key = json.dumps([record["kernel"], sig, shown, sorted(attrs), options], sort_keys=True, default=str)
        if key not in variants:
            variants[key] = dict(name=record["kernel"].rsplit(".", 2)[-2] + "." + name, kernel=kernel, signature=sig,
                                 constexprs=constexprs, shown=shown, attrs=attrs, options=options, launches=0)
        variants[key]["launches"] += record["launches"]
    return sorted(variants.values(), key=lambda v: (v["name"], -v["launches"]))


def compile_recorded(job: tuple[int, str, int]) -> tuple[bool, str]:
    """(passed, report line) of variant ``index`` of ``recorded_variants(path)``."""
    arch, path, index = job
    v = recorded_variants(path)[index]
    dtypes = sorted({t.lstrip("*") for t in v["signature"].values() if t.startswith("*")})
    name = f"{v['name']} {'/'.join(dtypes)} {v['shown']} {v['options']}"
    try:
        src = ASTSource(fn=v["kernel"], signature=v["signature"], constexprs=v["constexprs"], attrs=v["attrs"])
        compiled = triton_compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v["options"]))
        use = resources(compiled.asm["ptx"], arch)
    except Exception as err:  # noqa: BLE001 - report every variant, then fail
        return False, f"FAIL {name}: {type(err).__name__}: {err}"
    warps = compiled.metadata.num_warps
    programs = _triton.programs_per_sm(use["regs"], compiled.metadata.shared, warps)
    problems = usage_problems(v["name"].split(".")[0], use)
    widths = " ".join(f"{size}:{count}" for size, count in load_widths(compiled.asm["ptx"]).items())
    usage = (f"{use['regs']:3d} regs, {use['spill_stores']}/{use['spill_loads']} B spilled, "
             f"{compiled.metadata.shared:6d} B shared, {warps:2d} warps, {programs:2d} programs/SM, "
             f"loads (B: count) {widths:22s}")
    return not problems, (f"{'FAIL' if problems else 'ok  '} {usage}  {v['launches']:4d} launches  {name}"
                          f"{': ' + '; '.join(problems) if problems else ''}")


def main_recorded(path: str, arch: int, jobs: int, only: str | None) -> int:
    variants = recorded_variants(path)
    about = {k: v for k, v in _recorded(path).items() if k != "launches"}
    print(f"the launches of {about}: {sum(v['launches'] for v in variants)} launches, {len(variants)} variants")
    chosen = [i for i, v in enumerate(variants) if only is None or v["name"].startswith(only + ".")]
    if not chosen:
        print(f"FAIL no recorded launch of {only}")
        return 1
    failures = 0
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for passed, line in pool.map(compile_recorded, [(arch, path, i) for i in chosen]):
            failures += not passed
            print(line, flush=True)
    print(f"{len(chosen)} kernel variants, {failures} failed")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of fp32, bf16, fp16")
    parser.add_argument("--only", help="kernels of this op file only (batch_norm_act, window_attention, ...)")
    parser.add_argument("--launches", help="compile the variants of the launches recorded here (step_ledger.py --launches)")
    args = parser.parse_args()
    if args.launches:
        return main_recorded(os.path.abspath(args.launches), args.arch, args.jobs, args.only)
    dtypes = args.dtypes.split(",")
    jobs, keys = [], set()
    for dtype in dtypes:
        for i, (kernel, _pointers, constexprs) in enumerate(cases(dtype)):
            if args.only is None or kernel.fn.__module__.endswith("." + args.only):
                jobs.append((args.arch, dtype, i))
                keys.add(spill_key(kernel, dtype, constexprs))
    if not SPILLS_LISTED:
        print(f"triton {triton.__version__} has no known-spill list: the largest of {sorted(KNOWN_SPILLS)} apply")
    failures = 0
    for key in sorted(SPILLS.keys() - keys, key=str) if SPILLS_LISTED else ():
        kernel, dtype = key[0], key[1]
        if dtype in dtypes and (args.only is None or kernel.startswith(args.only + ".")):
            print(f"FAIL known spill {key} matches no variant compiled: take it out of KNOWN_SPILLS")
            failures += 1
    with ProcessPoolExecutor(max(1, args.jobs)) as pool:
        for passed, line in pool.map(compile_case, jobs):
            failures += not passed
            print(line, flush=True)
    print(f"{len(jobs)} kernel variants, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
