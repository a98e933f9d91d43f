"""A linear layer whose input is the exact GELU of a tensor, with the GELU done on load.

The IRMLP ends in ``conv3(gelu(conv2(...)))``: an expansion to 4x the channels, a GELU, and a
1x1 convolution back. Eager writes the GELU output (as large as the expansion), reads it
into the GEMM and keeps it for the weight gradient; backward reads the GEMM's input gradient
back for GELU's backward. Here three Triton GEMMs never materialise the GELU output:

- forward: ``gelu(h) @ W^T (+ b)``, the GELU applied to each loaded tile of h (rounded to h's
  dtype, as eager's GELU output is), W cast on load to h's dtype (autocast's GEMM dtype);
- input gradient: ``(g @ W) * gelu'(h)``, the product rounded to g's dtype first (eager's GEMM
  writes it so) and GELU's backward applied in the epilogue;
- weight gradient: ``g^T @ gelu(h)``, GELU again on load, in W's dtype straight from fp32
  accumulators: programs split the rows among them in a fixed pattern and write partial
  sums, which are added in a fixed order (identical bits on every run).

Up to 256 output columns (the IRMLP's first two widths, where h is largest) both gradients
come from one pass over h and g: a program keeps a column tile of W and accumulates its
weight-gradient partial while writing the input gradient of its rows. Wider, the launch table
may ask for that pass too (``ONE_PASS``, up to 1024 columns): h is read once, not twice, but
the columns are padded to a power of two (384 to 512, 768 to 1024: a third more products) and
g is read once per narrower K tile; which is faster is for the sweep to time.

Only h is kept for backward, which the GELU's backward keeps in eager anyway. Each kernel
reads h once per tile of the other operand's columns; the column tiles of one row tile run
side by side, so the repeated reads come from L2.

Where the launch table says so for a shape class (``gelu_linear.route``, ``gemm``: 2), the op
computes as eager does instead: a GELU pass, then torch's GEMMs (cuBLAS on a GPU). Wide outputs
take the GELU once per column tile here, and the GEMM library may outrun these kernels by more
than the pass they save; the sweep (``scripts/sweep_configs.py``) times both on the GPU.

Layers: reference, kernels, launchers, registered ops, autograd, functional entry point.
Its user is the fused IRMLP (``hifuse.fused.fusion_block``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _configs, _triton
from ._triton import tl, triton

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = ["gelu_linear", "gelu_linear_ref", "unsupported_reason"]


def gelu_linear_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(F.gelu(h), weight, bias)


if triton is not None:
    from ._triton import gelu, gelu_grad

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32; UPCAST (the interpreter, whose low-precision dot is
        wrong) takes the same rounded operands to fp32 first: the same products."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _rows(pid, M, BLOCK: tl.constexpr):
        r = pid * BLOCK + tl.arange(0, BLOCK)
        return r.to(tl.int64), r < M

    @triton.jit
    def _tile(P, r, c, ld, rmask, cmask):
        """P[r, c] of a row-major matrix with ``ld`` columns, zero outside the masks."""
        return tl.load(P + r[:, None].to(tl.int64) * ld + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)

    @_triton.kernel
    def _fwd_kernel(H, W, B, OUT, M, N, K, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """OUT tile (row tile, column tile) of program pid = row tile * column tiles + column
        tile: the column tiles of one row tile run side by side, so its h tiles are read from
        L2 after the first (and one grid axis holds any number of rows)."""
        n_tiles = tl.cdiv(N, BLOCK_N)
        rm, mmask = _rows(tl.program_id(0) // n_tiles, M, BLOCK_M)
        rn = tl.program_id(0) % n_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < K
            a = gelu(_tile(H, rm, rk, K, mmask, kmask).to(tl.float32)).to(H.dtype.element_ty)
            w = _tile(W, rn, rk, K, nmask, kmask).to(H.dtype.element_ty)
            acc += _dot(a, tl.trans(w), PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rm[:, None] * N + rn[None, :], acc.to(OUT.dtype.element_ty),
                 mask=mmask[:, None] & nmask[None, :])

    @_triton.kernel
    def _bwd_input_kernel(G, W, H, DH, M, N, K, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """DH tile (row tile, column tile) = (G @ W) * gelu'(H), programs ordered as the
        forward's: G's tile is read from L2 by the row tile's other programs."""
        k_tiles = tl.cdiv(K, BLOCK_K)
        rm, mmask = _rows(tl.program_id(0) // k_tiles, M, BLOCK_M)
        rk = tl.program_id(0) % k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = rk < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            nmask = rn < N
            g = _tile(G, rm, rn, N, mmask, nmask)
            acc += _dot(g, _tile(W, rn, rk, K, nmask, kmask).to(G.dtype.element_ty), PRECISION, UPCAST)
        m2 = mmask[:, None] & kmask[None, :]
        offs = rm[:, None] * K + rk[None, :]
        h = tl.load(H + offs, mask=m2, other=0.0).to(tl.float32)
        da = acc.to(G.dtype.element_ty).to(tl.float32)
        tl.store(DH + offs, (da * gelu_grad(h)).to(DH.dtype.element_ty), mask=m2)

    @_triton.kernel(do_not_specialize=["SPLITS"])
    def _bwd_weight_kernel(G, H, PART, M, N, K, SPLITS, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Partial G^T @ gelu(H) of the row tiles s, s + SPLITS, ... (s = program_id(1)) for the
        output tile program_id(0) (column tiles of W fastest)."""
        k_tiles = tl.cdiv(K, BLOCK_K)
        rn = tl.program_id(0) // k_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(0) % k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
        nmask = rn < N
        kmask = rk < K
        s = tl.program_id(1)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in range(s, tl.cdiv(M, BLOCK_M), SPLITS):
            rm, mmask = _rows(t, M, BLOCK_M)
            g = _tile(G, rm, rn, N, mmask, nmask)
            a = gelu(_tile(H, rm, rk, K, mmask, kmask).to(tl.float32)).to(G.dtype.element_ty)
            acc += _dot(tl.trans(g), a, PRECISION, UPCAST)
        offs = (s.to(tl.int64) * N + rn[:, None]) * K + rk[None, :]
        tl.store(PART + offs, acc, mask=nmask[:, None] & kmask[None, :])


    @_triton.kernel(do_not_specialize=["SPLITS"])
    def _bwd_kernel(G, W, H, DH, PART, M, N, K, SPLITS, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Both gradients in one pass over h, for N <= BLOCK_N: the program of columns
        program_id(0) and row tiles s, s + SPLITS, ... (s = program_id(1)) keeps W's column
        tile loaded, writes DH of its tiles and one partial of G^T @ gelu(H)."""
        rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = rk < K
        rn = tl.arange(0, BLOCK_N)
        nmask = rn < N
        w = _tile(W, rn, rk, K, nmask, kmask).to(G.dtype.element_ty)
        s = tl.program_id(1)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for t in range(s, tl.cdiv(M, BLOCK_M), SPLITS):
            rm, mmask = _rows(t, M, BLOCK_M)
            g = _tile(G, rm, rn, N, mmask, nmask)
            m2 = mmask[:, None] & kmask[None, :]
            offs = rm[:, None] * K + rk[None, :]
            h = tl.load(H + offs, mask=m2, other=0.0).to(tl.float32)
            da = _dot(g, w, PRECISION, UPCAST).to(G.dtype.element_ty).to(tl.float32)
            tl.store(DH + offs, (da * gelu_grad(h)).to(DH.dtype.element_ty), mask=m2)
            acc += _dot(tl.trans(g), gelu(h).to(G.dtype.element_ty), PRECISION, UPCAST)
        offs = (s.to(tl.int64) * N + rn[:, None]) * K + rk[None, :]
        tl.store(PART + offs, acc, mask=nmask[:, None] & kmask[None, :])


# --------------------------------------------------------------------------- launchers


def _precision(t: torch.Tensor) -> dict:
    # fp32 inputs get full-precision products, as eager's fp32 matmuls (no TF32)
    return dict(PRECISION="ieee" if t.dtype == torch.float32 else "tf32",
                UPCAST=_triton.interpreter_launches() and t.dtype != torch.float32)


def _width(n: int) -> int:
    """A power-of-two tile at least 16 wide covering n columns, at most 256."""
    return max(16, min(256, _triton.next_power_of_2(n)))


def _rows_tile(m: int, block_m: int, cols: int) -> int:
    # with wide tiles (the interpreter) as many rows as a wide tile holds: fewer programs
    if _triton.wide():
        return max(16, min(_triton.next_power_of_2(m), _triton.WIDE_VALUES // cols))
    return block_m


# Default tiles, warps and stages (sm90, ``check_triton_compile``): the GELU (an erf) of a
# loaded tile takes registers, so the tiles are modest, and what their programs load again
# from L2 (``tile_traffic``) is several times h. In bf16/fp16 they are, among the tiles that
# spill nothing under triton 3.8 and 3.6, those that load least with at least as many warps
# an SM as before, compiled as a HiFuse step launches them (registers under 3.8 / 3.6):
# 128-row tiles in the forward (127 / 127, two programs an SM as with 64 rows: W's tiles read
# half as often) and, on 16 warps, in the input gradient (62 / 62, two programs of 16 warps
# for three of 8); 64-wide K tiles in both weight-gradient kernels (G's tiles read half as
# often: 80 / 80, three programs an SM as with 32; the one-pass kernel takes 16-row tiles for
# that, 79 / 79 at up to 128 columns, three programs as before, 145 / 185 at 256, one; the
# ``ONE_PASS`` route's 512 x 32 and 1024 x 16 tiles 138 / 137 and 137 / 137, one). The launch
# table (``_configs``) may replace them per device.


def _tiles_problem(config: dict) -> str | None:
    return _configs.power_of_two_problem(config, "BLOCK_M", "BLOCK_N", "BLOCK_K", low=16, high=256)


def _launch(name: str, m: int, n: int, k: int, dtype: torch.dtype, default: dict, device: torch.device,
            check=_tiles_problem) -> dict:
    if _triton.wide():
        return default
    return _configs.launch_config(f"gelu_linear.{name}", f"{_configs.dtype_name(dtype)}/n{n}/k{k}", default, device,
                                  check)


# How the op computes (``route``): the Triton kernels, or a GELU pass and the GEMM library's
# GEMMs, or the Triton kernels with the backward in one pass where it is two kernels by default
TRITON, LIBRARY, ONE_PASS = 1, 2, 3
ONE_PASS_COLUMNS = 1024  # the most a one-pass program covers (a power of two at least n)


def _route_problem(n: int, dtype: torch.dtype):
    def problem(config: dict) -> str | None:
        gemm = config["gemm"]
        if gemm not in (TRITON, LIBRARY, ONE_PASS):
            return (f"gemm={gemm} must be {TRITON} (Triton kernels), {LIBRARY} (a GELU pass, then torch's GEMMs) or "
                    f"{ONE_PASS} (Triton kernels, the backward in one pass)")
        if gemm == ONE_PASS and not 256 < n <= ONE_PASS_COLUMNS:
            return f"gemm={ONE_PASS} (the backward in one pass) is for 257 to {ONE_PASS_COLUMNS} columns, not {n}"
        if gemm == ONE_PASS and dtype == torch.float32 and not _triton.interpreter_launches():
            return f"gemm={ONE_PASS} (the backward in one pass) is for bf16/fp16: float32's products spill there"
        return None
    return problem


def route(n: int, k: int, dtype: torch.dtype, device: torch.device) -> int:
    """``TRITON``, ``LIBRARY`` or ``ONE_PASS`` for (N, K) in ``dtype`` on ``device``: the launch
    table's choice, Triton by default."""
    return _configs.launch_config("gelu_linear.route", f"{_configs.dtype_name(dtype)}/n{n}/k{k}", dict(gemm=TRITON),
                                  device, _route_problem(n, dtype))["gemm"]


def _wide_backward_launch(m: int, n: int, k: int) -> dict:
    """Either kernel of the two-kernel backward with wide tiles (the interpreter, which pays per
    program and per loop step, not per value): N and K tiles up to 128, where the GPU's tiles
    made a HiFuse-Small weight gradient 2000 programs a call."""
    block_n, block_k = min(128, _width(n)), min(128, _width(k))
    return dict(BLOCK_M=_rows_tile(m, 64, max(block_n, block_k)), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
                num_stages=3)


def fwd_launch(m: int, n: int, dtype: torch.dtype, k: int = 0, device: torch.device | None = None) -> dict:
    low = dtype != torch.float32
    block_n = min(128 if low else 64, _width(n))
    default = dict(BLOCK_M=_rows_tile(m, 128 if low else 64, max(block_n, 32)), BLOCK_N=block_n, BLOCK_K=32,
                   num_warps=8, num_stages=3)
    return default if device is None else _launch("forward", m, n, k, dtype, default, device)


def bwd_input_launch(m: int, n: int, dtype: torch.dtype, k: int = 0, device: torch.device | None = None) -> dict:
    low = dtype != torch.float32
    if _triton.wide() and k:
        return _wide_backward_launch(m, n, k)
    block_k = 64 if low else 32
    default = dict(BLOCK_M=_rows_tile(m, 128 if low else 64, block_k), BLOCK_N=min(64, _width(n)), BLOCK_K=block_k,
                   num_warps=16 if low else 8, num_stages=3)
    return default if device is None else _launch("input", m, n, k, dtype, default, device)


def fused_backward(n: int, dtype: torch.dtype, one_pass: bool = False) -> bool:
    """Whether the backward is one pass (``_bwd_kernel``): by default up to 256 output columns
    in bf16/fp16; ``one_pass`` (the launch table's ``ONE_PASS`` route) up to 1024. fp32 products
    spill there, so fp32 takes the two kernels, but under the interpreter, which has no registers
    to spill (its tests run both)."""
    return n <= (ONE_PASS_COLUMNS if one_pass else 256) and (dtype != torch.float32
                                                              or _triton.interpreter_launches())


def bwd_launch(m: int, n: int, dtype: torch.dtype, k: int = 0, device: torch.device | None = None) -> dict:
    # every column in a program: past 256 the K tile narrows as the column tile widens, keeping
    # the weight gradient's accumulator at 256 x 64
    block_n = max(16, _triton.next_power_of_2(n))

    def problem(config):
        if config["BLOCK_N"] != block_n:  # narrower misses columns, wider only pads
            return f"BLOCK_N={config['BLOCK_N']} must be {block_n}, the power of two that covers the {n} columns"
        return _configs.power_of_two_problem(config, "BLOCK_M", "BLOCK_K", low=16, high=256)

    low = dtype != torch.float32
    block_k = max(16, 64 * 256 // max(256, block_n)) if low else 32
    if _triton.wide():  # the interpreter pays per program, not per register: 128-wide K tiles
        block_k = max(block_k, min(128, _width(k)))
    default = dict(BLOCK_M=_rows_tile(m, 16 if low else 64, max(block_n, 32)), BLOCK_N=block_n, BLOCK_K=block_k,
                   num_warps=8, num_stages=3)
    return default if device is None else _launch("backward", m, n, k, dtype, default, device, problem)


def bwd_weight_launch(m: int, n: int, dtype: torch.dtype, k: int = 0, device: torch.device | None = None) -> dict:
    low = dtype != torch.float32
    if _triton.wide() and k:
        return _wide_backward_launch(m, n, k)
    block_n = min(128 if low else 32, _width(n))
    block_k = 64 if low else 32
    default = dict(BLOCK_M=_rows_tile(m, 64 if low else 32, block_k), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8,
                   num_stages=3)
    return default if device is None else _launch("weight", m, n, k, dtype, default, device)


def tile_traffic(kernel: str, args: dict) -> int:
    """Bytes one launch of ``kernel`` (a name: ``_fwd_kernel`` ...) moves between L2 and the
    SMs: each tile counted every time a program loads or stores it. ``args``: the launch's
    arguments by parameter name (tensors, sizes and the BLOCK_* tiles).

    A GEMM's programs load the tiles of both operands again for every tile of its output they
    share: the forward reads h once per column tile and W once per row tile, the input gradient
    G once per K tile and W once per row tile, the weight gradient G once per K tile and h once
    per column tile, the one-pass backward G once per K tile (and W once per program). The
    first read of each comes from memory; the others hit L2 when the programs that share a
    tile run together, as the launches order them. What the byte model counts (each tensor
    once) is the least of this."""
    m, n, k = args["M"], args["N"], args["K"]
    bm, bn, bk = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    size = {name: t.element_size() for name, t in args.items() if isinstance(t, torch.Tensor)}
    row_tiles, col_tiles, k_tiles = triton.cdiv(m, bm), triton.cdiv(n, bn), triton.cdiv(k, bk)
    if kernel == "_fwd_kernel":
        bias = row_tiles * n * size["B"] if args.get("HAS_BIAS") else 0
        return col_tiles * m * k * size["H"] + row_tiles * n * k * size["W"] + bias + m * n * size["OUT"]
    if kernel == "_bwd_input_kernel":
        return k_tiles * m * n * size["G"] + row_tiles * n * k * size["W"] + m * k * (size["H"] + size["DH"])
    if kernel == "_bwd_weight_kernel":
        return (k_tiles * m * n * size["G"] + col_tiles * m * k * size["H"]
                + args["SPLITS"] * n * k * size["PART"])
    if kernel == "_bwd_kernel":
        return (k_tiles * m * n * size["G"] + args["SPLITS"] * n * k * (size["W"] + size["PART"])
                + m * k * (size["H"] + size["DH"]))
    raise ValueError(f"gelu_linear has no kernel {kernel!r}")


@_triton.define_op("hifuse::gelu_linear", mutates_args=())
def _fwd_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = h.shape
    n = weight.shape[0]
    if route(n, k, h.dtype, h.device) == LIBRARY:  # as eager under autocast: the weight and bias in h's dtype
        return F.linear(F.gelu(h), weight.to(h.dtype), None if bias is None else bias.to(h.dtype))
    out = torch.empty((m, n), device=h.device, dtype=h.dtype)
    launch = fwd_launch(m, n, h.dtype, k, h.device)
    grid = _triton.grid(triton.cdiv(n, launch["BLOCK_N"]) * triton.cdiv(m, launch["BLOCK_M"]))
    _triton.wrap_triton(_fwd_kernel)[grid](
        h, weight, weight if bias is None else bias, out, m, n, k, HAS_BIAS=bias is not None,
        **_precision(h), **launch,
    )
    return out


@_triton.define_op("hifuse::gelu_linear_backward", mutates_args=())
def _bwd_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, with_bias: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh in h's dtype, dweight in weight's, dbias in weight's: empty without ``with_bias``)."""
    m, k = h.shape
    n = weight.shape[0]
    db = grad.sum(0, dtype=weight.dtype) if with_bias else weight.new_empty((0,))
    way = route(n, k, h.dtype, h.device)
    if way == LIBRARY:  # eager's backward: its GEMMs in h's dtype
        dh = torch.ops.aten.gelu_backward(grad @ weight.to(h.dtype), h)
        return dh, (grad.t() @ F.gelu(h)).to(weight.dtype), db
    dh = torch.empty_like(h)
    if fused_backward(n, h.dtype, way == ONE_PASS):
        launch = bwd_launch(m, n, h.dtype, k, h.device)
        flags = {**_precision(h), **launch}
        k_tiles = triton.cdiv(k, launch["BLOCK_K"])
        splits = _triton.reduction_programs(triton.cdiv(m, launch["BLOCK_M"]), k_tiles, h.device, kernel=_bwd_kernel,
                                            args=(grad, weight, h, h.dtype, torch.float32, m, n, k, 2), launch=flags)
        part = torch.empty((splits, n, k), device=h.device, dtype=torch.float32)
        _triton.wrap_triton(_bwd_kernel)[_triton.grid(k_tiles, splits)](grad, weight, h, dh, part, m, n, k, splits,
                                                                        **flags)
        return dh, part.sum(0).to(weight.dtype), db
    launch = bwd_input_launch(m, n, h.dtype, k, h.device)
    grid = _triton.grid(triton.cdiv(k, launch["BLOCK_K"]) * triton.cdiv(m, launch["BLOCK_M"]))
    _triton.wrap_triton(_bwd_input_kernel)[grid](grad, weight, h, dh, m, n, k, **_precision(h), **launch)
    launch = bwd_weight_launch(m, n, h.dtype, k, h.device)
    tiles = triton.cdiv(n, launch["BLOCK_N"]) * triton.cdiv(k, launch["BLOCK_K"])
    flags = {**_precision(h), **launch}
    splits = _triton.reduction_programs(triton.cdiv(m, launch["BLOCK_M"]), tiles, h.device, kernel=_bwd_weight_kernel,
                                        args=(grad, h, torch.float32, m, n, k, 2), launch=flags)
    part = torch.empty((splits, n, k), device=h.device, dtype=torch.float32)
    _triton.wrap_triton(_bwd_weight_kernel)[_triton.grid(tiles, splits)](
        grad, h, part, m, n, k, splits, **flags
    )
    return dh, part.sum(0).to(weight.dtype), db


@_fwd_op.register_fake
def _(h, weight, bias):
    return h.new_empty((h.shape[0], weight.shape[0]))


@_bwd_op.register_fake
def _(grad, h, weight, with_bias):
    db = weight.new_empty((weight.shape[0],) if with_bias else (0,))
    return torch.empty_like(h), torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    h, weight, bias = inputs
    ctx.save_for_backward(h, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    h, weight = ctx.saved_tensors
    dh, dw, db = torch.ops.hifuse.gelu_linear_backward(grad.contiguous(), h, weight, ctx.bias_dtype is not None)
    return dh, dw, (None if ctx.bias_dtype is None else db.to(ctx.bias_dtype))


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _flops(h_shape, w_shape, *_args, out_shape=None, **_kwargs) -> int:
    return 2 * h_shape[0] * h_shape[1] * w_shape[0]  # the GEMM, as FlopCounterMode counts eager's


def _backward_flops(grad_shape, h_shape, w_shape, *_args, out_shape=None, **_kwargs) -> int:
    return 2 * _flops(h_shape, w_shape)


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.hifuse.gelu_linear)(_flops)
    register_flop_formula(torch.ops.hifuse.gelu_linear_backward)(_backward_flops)


_register_flops()


# --------------------------------------------------------------------------- functional


def _argument_problem(h, weight, bias):
    if not isinstance(h, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return TypeError, "h and weight must be tensors"
    if bias is not None and not isinstance(bias, torch.Tensor):
        return TypeError, f"bias must be a tensor or None, got {type(bias).__name__}"
    if h.dim() < 1 or weight.dim() != 2 or weight.shape[1] != h.shape[-1]:
        return ValueError, f"weight must be (N, {h.shape[-1] if h.dim() else '?'}), got {tuple(weight.shape)}"
    if bias is not None and bias.shape != (weight.shape[0],):
        return ValueError, f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}"
    tensors = [t for t in (h, weight, bias) if t is not None]
    if any(t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return TypeError, f"dtypes must be float32, float16 or bfloat16, got {[t.dtype for t in tensors]}"
    if len({t.device for t in tensors}) > 1:
        return ValueError, "all tensors must be on one device"
    if h.numel() // max(h.shape[-1], 1) >= 2**31:
        return ValueError, "h has 2**31 rows or more"
    return None


def unsupported_reason(h, weight, bias=None) -> str | None:
    reason = _triton.unsupported_reason(h)
    if reason is not None:
        return reason
    problem = _argument_problem(h, weight, bias)
    return None if problem is None else problem[1]


def gelu_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                check: bool = True) -> torch.Tensor:
    """``F.linear(F.gelu(h), weight, bias)`` (exact GELU) without writing the GELU's output.

    Args:
        h: (..., K) pre-activation; the GEMM runs in its dtype (the weight is cast on load,
            as autocast casts it for a low-precision input).
        weight: (N, K); bias: (N,) or None.
        check: False skips the argument checks, for callers that made them once already.
    Returns:
        (..., N) in h's dtype; gradients in the dtypes of h, weight and bias.
    """
    if check:
        problem = _argument_problem(h, weight, bias)
        if problem is not None:
            raise problem[0](f"gelu_linear: {problem[1]}")
        reason = _triton.unsupported_reason(h)
        if reason is not None:
            raise RuntimeError(f"gelu_linear: {reason}")
    rows = h.reshape(-1, h.shape[-1]).contiguous()
    out = torch.ops.hifuse.gelu_linear(rows, weight.contiguous(), bias)
    return out.view(*h.shape[:-1], weight.shape[0])
