"""Shifted-window attention of the global branch in one Triton kernel, forward and backward.

Eager HiFuse pads, rolls and partitions the (B, H, W, C) tokens into 7x7 windows, runs
attention with a gathered (heads, 49, 49) relative bias and a (windows, 49, 49) shift mask,
then merges, rolls back and crops: six full passes over memory around 5% of real math.
Here one program handles one (window, head): it computes, for each of its 49 tokens, where
that token sits in the unshifted, unpadded grid and loads q, k, v straight from the qkv
projection (B, H, W, 3C). Tokens that fall in the zero padding get q = k = v = the qkv bias,
which is what the linear layer gives a zero input; they are not masked. A window's tokens sit
in the tiles' slots row by row, each row in 8 slots for bf16/fp16 (a power of two: see
backward), packed 7 to a row for fp32. The bias is the (169, heads) table spread to one dense
(heads, 64, 64) tile (a contiguous load; a gather from the table costs the kernels
registers), built once per call by the entry point (one gather launch) and kept for
backward, and the -100 shift mask comes from region labels computed in the kernel. The output
of each real token is written to its own position; nothing rolled, padded or partitioned is
ever stored.

Backward recomputes the scores from the saved log-sum-exp, and with whole key rows (bf16/fp16)
takes softmax's row sums sum(P dP) from them, not sum(dO O), so the output is not read
again. Every real token belongs to one
window, so dq, dk, dv are written without collisions; padded tokens feed the qkv bias
gradient and all windows feed the bias table gradient, both through per-program partial
sums that are added in a fixed order afterwards, so two backward passes give identical bits.
A backward program keeps a window's keys and values loaded and takes its queries in blocks
of 16 rows (dk and dv accumulate over the blocks), so its score tiles are (16, 64): with whole
(64, 64) tiles the kernel spilled registers. The bias table's gradient is dS summed by the
row and column offsets of query and key: with rows in slots of a power of two, a block of dS
regroups by reshapes into (query row, key row) x (query column, key column) and two small
products with 0/1 matrices sum it by offset, in registers, so a program writes a (16, 16)
partial per head once. In fp32, whose products run on FMA units and take more registers, the
keys go in blocks of 16 as well, dq accumulates over them in its output, and dS adds into a
(64, 64) slot per program in global memory (L2), which the op sums by offset.

Layers: reference, kernels, launchers, registered op, autograd, functional entry point.
Its user is the fused ``GlobalBlock`` (``hifuse.fused.global_branch``).
"""

from __future__ import annotations

import torch

from . import _configs, _triton
from ._triton import tl, triton
from .reference import (
    cached,
    relative_position_index,
    shift_mask,
    window_merge,
    window_partition,
)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WINDOW = 11  # window**2 tokens must fit the 128-row tile
HEAD_DIMS = (16, 32, 64)

__all__ = ["window_attention", "window_attention_ref", "unsupported_reason"]


# --------------------------------------------------------------------------- reference


def window_attention_ref(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    table: torch.Tensor,
    num_heads: int,
    window: int,
    shift: int,
) -> torch.Tensor:
    """What the eager GlobalBlock computes between its qkv and proj layers.

    Args:
        qkv: (B, H, W, 3C) output of the qkv projection of the unpadded tokens.
        qkv_bias: (3C,) bias of that projection (what padded tokens carry), or None.
        table: ((2w-1)**2, heads) relative position bias table.
    Returns:
        (B, H, W, C) attention output, before proj.
    """
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    pad_r, pad_b = (window - w % window) % window, (window - h % window) % window
    hp, wp = h + pad_b, w + pad_r
    full = qkv.new_zeros(b, hp, wp, c3) if qkv_bias is None else qkv_bias.to(qkv.dtype).expand(b, hp, wp, c3).clone()
    full[:, :h, :w] = qkv
    if shift:
        full = torch.roll(full, shifts=(-shift, -shift), dims=(1, 2))
    n = window * window
    windows = window_partition(full, window).view(-1, n, 3, num_heads, c // num_heads)
    q, k, v = windows.permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (c // num_heads) ** -0.5) @ k.transpose(-2, -1)
    index = relative_position_index(window, table.device)
    attn = attn + table[index.view(-1)].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    if shift:
        mask = shift_mask(hp, wp, window, shift, qkv.device)
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, window, window, c)
    out = window_merge(out, window, hp, wp)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :h, :w].contiguous()


# --------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _tokens(wid, t, H, W, Hp, Wp, n_win_w, n_win, shift, WS: tl.constexpr, WP: tl.constexpr):
        """Per slot ``t`` of window `wid` (slot t holds the window's token at row t // WP, column
        t % WP): batch, shifted-grid row/col, source row/col, validity (a token of the window),
        realness (a source position inside the image)."""
        b = wid // n_win
        w_in = wid % n_win
        wr = w_in // n_win_w
        wc = w_in % n_win_w
        valid = (t // WP < WS) & (t % WP < WS)
        ys = wr * WS + t // WP  # position in the shifted, padded grid
        xs = wc * WS + t % WP
        yo = (ys + shift) % Hp  # position before the roll
        xo = (xs + shift) % Wp
        real = valid & (yo < H) & (xo < W)
        return b.to(tl.int64), ys, xs, yo, xo, valid, real

    @triton.jit
    def _load_part(ptr, bias_ptr, row_off, part_off, d, dmask, valid, real):
        """q, k or v of a window: real tokens from qkv, padded ones from the bias."""
        x = tl.load(ptr + row_off[:, None] + (part_off + d)[None, :], mask=real[:, None] & dmask[None, :], other=0.0)
        pb = tl.load(bias_ptr + part_off + d, mask=dmask, other=0.0)
        pad = valid & (real == 0)
        return tl.where(pad[:, None], pb[None, :].to(x.dtype), x)

    @triton.jit
    def _labels(ys, xs, Hp, Wp, shift, WS: tl.constexpr):
        """Shift region (0..8) of each token: scores across regions get -100."""
        lr = tl.where(ys < Hp - WS, 0, tl.where(ys < Hp - shift, 1, 2))
        lc = tl.where(xs < Wp - WS, 0, tl.where(xs < Wp - shift, 1, 2))
        return lr * 3 + lc

    @triton.jit
    def _scores(q, k, rel_ptr, tq, tk, lab_q, lab_k, scale,
                BN: tl.constexpr, SHIFTED: tl.constexpr, PRECISION: tl.constexpr):
        """Scores of query tokens ``tq`` against key tokens ``tk``."""
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32, input_precision=PRECISION) * scale
        # the head's dense bias: -inf in the padding columns, so no gather and no mask here
        s += tl.load(rel_ptr + tq[:, None] * BN + tk[None, :])
        if SHIFTED:
            s += tl.where(lab_q[:, None] != lab_k[None, :], -100.0, 0.0)
        return s

    @triton.jit
    def _offset_sums(ds, qb, kb, BM: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr, TP: tl.constexpr):
        """The (BM, BK) block of dS at query slots qb.. and key slots kb.. summed by relative
        offset: (TP, TP), [dh + WP - 1, dw + WP - 1] for dh, dw the query's row and column
        minus the key's. Regrouped as rows (query row, key row) x columns (query column, key
        column), it is E^T dS' F with E and F 0/1 matrices picking each offset: two small
        products, no scatter. (BM // WP) * (BK // WP) must be 16 or more (tl.dot's least)."""
        KR: tl.constexpr = BK // WP
        R: tl.constexpr = (BM // WP) * KR
        x = tl.reshape(tl.permute(tl.reshape(ds, (BM // WP, WP, KR, WP)), (0, 2, 1, 3)), (R, WP * WP))
        r = tl.arange(0, R)
        col = tl.arange(0, WP * WP)
        d = tl.arange(0, TP)
        e = tl.where((qb // WP + r // KR - kb // WP - r % KR + WP - 1)[:, None] == d[None, :], 1.0, 0.0)
        f = tl.where((col // WP - col % WP + WP - 1)[:, None] == d[None, :], 1.0, 0.0)
        xf = tl.dot(x, f, input_precision="ieee")
        return tl.dot(tl.trans(e), xf, input_precision="ieee")

    @_triton.kernel
    def _dense_bias_kernel(TABLE, INDEX, OUT, HEADS, ENTRIES, N, BLOCK: tl.constexpr):
        """out[h, k] = table[index[k], h] (index ENTRIES: 0, a padding row; beyond: -inf, a
        padding column), for the (bn x bn) scores of head program_id(0)."""
        h = tl.program_id(0)
        k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = k < N
        idx = tl.load(INDEX + k, mask=m, other=0)
        v = tl.load(TABLE + idx * HEADS + h, mask=m & (idx < ENTRIES), other=0.0).to(tl.float32)
        v = tl.where(idx > ENTRIES, float("-inf"), v)
        tl.store(OUT + h.to(tl.int64) * N + k, v, mask=m)

    @_triton.kernel
    def _fwd_kernel(QKV, BIAS, REL, OUT, LSE,
                    H, W, Hp, Wp, n_win_w, n_win, C, heads, shift, scale,
                    s_b, s_h, s_w, o_b, o_h, o_w,
                    WS: tl.constexpr, WP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, D: tl.constexpr,
                    BD: tl.constexpr, SHIFTED: tl.constexpr, PRECISION: tl.constexpr):
        # keys and values of the window stay loaded; queries go in blocks of BM rows
        wid = tl.program_id(0)
        head = tl.program_id(1)
        t = tl.arange(0, BN)
        b, ys, xs, yo, xo, valid, real = _tokens(wid, t, H, W, Hp, Wp, n_win_w, n_win, shift, WS, WP)
        d = tl.arange(0, BD)
        dmask = d < D
        row = b * s_b + yo.to(tl.int64) * s_h + xo.to(tl.int64) * s_w
        k = _load_part(QKV, BIAS, row, C + head * D, d, dmask, valid, real)
        v = _load_part(QKV, BIAS, row, 2 * C + head * D, d, dmask, valid, real)
        lab = _labels(ys, xs, Hp, Wp, shift, WS)
        for qb in range(0, BN, BM):
            tq = qb + tl.arange(0, BM)
            bq, ysq, xsq, yoq, xoq, validq, realq = _tokens(wid, tq, H, W, Hp, Wp, n_win_w, n_win, shift, WS, WP)
            rowq = bq * s_b + yoq.to(tl.int64) * s_h + xoq.to(tl.int64) * s_w
            q = _load_part(QKV, BIAS, rowq, head * D, d, dmask, validq, realq)
            s = _scores(q, k, REL + head * BN * BN, tq, t, _labels(ysq, xsq, Hp, Wp, shift, WS), lab, scale,
                        BN, SHIFTED, PRECISION)
            m = tl.max(s, 1)
            p = tl.exp(s - m[:, None])
            l = tl.sum(p, 1)
            o = tl.dot((p / l[:, None]).to(v.dtype), v, out_dtype=tl.float32, input_precision=PRECISION)
            orow = bq * o_b + yoq.to(tl.int64) * o_h + xoq.to(tl.int64) * o_w
            tl.store(OUT + orow[:, None] + (head * D + d)[None, :], o.to(OUT.dtype.element_ty),
                     mask=realq[:, None] & dmask[None, :])
            tl.store(LSE + (wid.to(tl.int64) * heads + head) * BN + tq, m + tl.log(l), mask=validq)

    @_triton.kernel
    def _bwd_kernel(QKV, BIAS, REL, OUT, DOUT, LSE, DQKV, DBIAS_PART, DS_PART, DS_SLOT,
                    H, W, Hp, Wp, n_win_w, n_win, n_total, per_prog, C, heads, shift, scale,
                    s_b, s_h, s_w, o_b, o_h, o_w, g_b, g_h, g_w,
                    WS: tl.constexpr, WP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                    ON_CHIP: tl.constexpr, TP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                    SHIFTED: tl.constexpr, PRECISION: tl.constexpr):
        # Keys and values go in blocks of BK (bf16/fp16: the whole window, BK = BN), queries in
        # blocks of BM rows, so the score tiles are (BM, BK); dk and dv of a key block
        # accumulate over the query blocks. With BK < BN (fp32, whose products run on FMA units
        # and spilled registers with whole windows) dq of a query block accumulates over the
        # key blocks in DQKV itself, whose rows only this program writes, in a fixed order: an
        # fp32 DQKV only, as a low-precision one would round every partial sum.
        prog = tl.program_id(0)
        head = tl.program_id(1)
        d = tl.arange(0, BD)
        dmask = d < D
        part = prog.to(tl.int64) * heads + head
        # The bias table's gradient. ON_CHIP (bf16/fp16: whole key rows, WP a power of two):
        # this program's dS summed by relative offset (``_offset_sums``) in registers, stored
        # once, a (TP, TP) partial. Else (fp32, blocks of 16 keys: the sums' products cost
        # registers it does not have) dS adds into this program's (BN, BN) slot of DS_SLOT (in
        # L2, behind a barrier), which the op sums by offset.
        offsets = tl.zeros((TP, TP), dtype=tl.float32)
        t = tl.arange(0, BN)
        slot = DS_SLOT + part * BN * BN
        if not ON_CHIP:
            for mb in tl.static_range(0, BN, BM):
                tq = mb + tl.arange(0, BM)
                tl.store(slot + tq[:, None] * BN + t[None, :], tl.zeros((BM, BN), dtype=tl.float32))
        rel = REL + head * BN * BN
        gty = DQKV.dtype.element_ty
        dqb = tl.zeros((BD,), dtype=tl.float32)
        dkb = tl.zeros((BD,), dtype=tl.float32)
        dvb = tl.zeros((BD,), dtype=tl.float32)
        for i in range(0, per_prog):
            wid = prog * per_prog + i
            if wid < n_total:
                for kb in range(0, BN, BK):
                    tk = kb + tl.arange(0, BK)
                    b, ys, xs, yo, xo, valid, real = _tokens(wid, tk, H, W, Hp, Wp, n_win_w, n_win, shift, WS, WP)
                    row = b * s_b + yo.to(tl.int64) * s_h + xo.to(tl.int64) * s_w
                    k = _load_part(QKV, BIAS, row, C + head * D, d, dmask, valid, real)
                    v = _load_part(QKV, BIAS, row, 2 * C + head * D, d, dmask, valid, real)
                    lab = _labels(ys, xs, Hp, Wp, shift, WS)
                    dk = tl.zeros((BK, BD), dtype=tl.float32)
                    dv = tl.zeros((BK, BD), dtype=tl.float32)
                    for qb in range(0, BN, BM):
                        tq = qb + tl.arange(0, BM)
                        bq, ysq, xsq, yoq, xoq, validq, realq = _tokens(wid, tq, H, W, Hp, Wp, n_win_w, n_win,
                                                                        shift, WS, WP)
                        rowq = bq * s_b + yoq.to(tl.int64) * s_h + xoq.to(tl.int64) * s_w
                        q = _load_part(QKV, BIAS, rowq, head * D, d, dmask, validq, realq)
                        s = _scores(q, k, rel, tq, tk, _labels(ysq, xsq, Hp, Wp, shift, WS), lab, scale,
                                    BN, SHIFTED, PRECISION)
                        lse = tl.load(LSE + (wid.to(tl.int64) * heads + head) * BN + tq, mask=validq, other=0.0)
                        p = tl.where(validq[:, None], tl.exp(s - lse[:, None]), 0.0)
                        orow = bq * o_b + yoq.to(tl.int64) * o_h + xoq.to(tl.int64) * o_w
                        qmask = realq[:, None] & dmask[None, :]
                        ocol = (head * D + d)[None, :]
                        do = tl.load(DOUT + orow[:, None] + ocol, mask=qmask, other=0.0)
                        if BK < BN:  # a block of keys: softmax's row sums as sum(dO O) (O = P V)
                            o = tl.load(OUT + orow[:, None] + ocol, mask=qmask, other=0.0)
                            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
                        dv += tl.dot(tl.trans(p).to(do.dtype), do, out_dtype=tl.float32, input_precision=PRECISION)
                        dp = tl.dot(do, tl.trans(v), out_dtype=tl.float32, input_precision=PRECISION)
                        if BK == BN:  # whole key rows: sum(P dP), as eager's softmax backward; O is not read
                            delta = tl.sum(p * dp, 1)
                        ds = p * (dp - delta[:, None])
                        if ON_CHIP:
                            offsets += _offset_sums(ds, qb, kb, BM, BK, WP, TP)
                        else:
                            ds_ptr = slot + tq[:, None] * BN + tk[None, :]
                            tl.debug_barrier()  # the last stores to the slot (and dq) are seen by every thread
                            tl.store(ds_ptr, tl.load(ds_ptr) + ds)
                        dsq = ds.to(q.dtype)
                        dk += tl.dot(tl.trans(dsq), q, out_dtype=tl.float32, input_precision=PRECISION)
                        dq = tl.dot(dsq, k, out_dtype=tl.float32, input_precision=PRECISION) * scale
                        dqb += tl.sum(tl.where((validq & (realq == 0))[:, None], dq, 0.0), 0)
                        growq = bq * g_b + yoq.to(tl.int64) * g_h + xoq.to(tl.int64) * g_w
                        dq_ptr = DQKV + growq[:, None] + (head * D + d)[None, :]
                        if BK < BN:
                            if kb > 0:
                                if ON_CHIP:  # (else the slot's barrier above did this)
                                    tl.debug_barrier()  # the last key block's stores to dq are seen by every thread
                                dq += tl.load(dq_ptr, mask=qmask, other=0.0).to(tl.float32)
                        tl.store(dq_ptr, dq.to(gty), mask=qmask)
                    dk = dk * scale
                    grow = b * g_b + yo.to(tl.int64) * g_h + xo.to(tl.int64) * g_w
                    kmask = real[:, None] & dmask[None, :]
                    tl.store(DQKV + grow[:, None] + (C + head * D + d)[None, :], dk.to(gty), mask=kmask)
                    tl.store(DQKV + grow[:, None] + (2 * C + head * D + d)[None, :], dv.to(gty), mask=kmask)
                    pad = (valid & (real == 0))[:, None]
                    dkb += tl.sum(tl.where(pad, dk, 0.0), 0)
                    dvb += tl.sum(tl.where(pad, dv, 0.0), 0)
        if ON_CHIP:
            d_off = tl.arange(0, TP)
            tl.store(DS_PART + part * TP * TP + d_off[:, None] * TP + d_off[None, :], offsets)
        tl.store(DBIAS_PART + part * 3 * BD + d, dqb)
        tl.store(DBIAS_PART + part * 3 * BD + BD + d, dkb)
        tl.store(DBIAS_PART + part * 3 * BD + 2 * BD + d, dvb)


    @_triton.kernel(do_not_specialize=["PROGS"])
    def _bwd_finish_kernel(DS_PART, DBIAS_PART, DTABLE, DBIAS, PROGS, HEADS, SPAN, FIRST, D, C,
                           TP: tl.constexpr, BD: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
        """The backward programs' partials added in a fixed order and written in the
        parameters' layouts, one launch for what took two sums and two copies: the bias
        table's gradient (entries x heads, SPAN x SPAN offsets from FIRST of each program's
        (TP, TP) offset sums; none where SPAN is 0) and then the qkv bias's (3C,), in its
        (3, heads, D) order, from the (heads, 3, BD) partials. A program takes BLOCK_O outputs
        and BLOCK_P programs' partials of them at a time."""
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        n_table = SPAN * SPAN * HEADS
        in_table = o < n_table
        entry = o // HEADS
        span = tl.maximum(SPAN, 1)  # (no table: SPAN 0, in_table all false)
        col_t = (o % HEADS) * (TP * TP) + (entry // span + FIRST) * TP + entry % span + FIRST
        q = o - n_table
        in_bias = (q >= 0) & (q < 3 * C)
        col_b = ((q % C) // D * 3 + q // C) * BD + q % D
        rows = tl.arange(0, BLOCK_P)
        acc = tl.zeros((BLOCK_P, BLOCK_O), dtype=tl.float32)
        for p0 in range(0, PROGS, BLOCK_P):
            p = (p0 + rows).to(tl.int64)
            pm = (p < PROGS)[:, None]
            acc += tl.load(DS_PART + p[:, None] * (HEADS * TP * TP) + col_t[None, :], mask=pm & in_table[None, :],
                           other=0.0)
            acc += tl.load(DBIAS_PART + p[:, None] * (HEADS * 3 * BD) + col_b[None, :], mask=pm & in_bias[None, :],
                           other=0.0)
        total = tl.sum(acc, 0)
        tl.store(DTABLE + o, total.to(DTABLE.dtype.element_ty), mask=in_table)
        tl.store(DBIAS + q, total.to(DBIAS.dtype.element_ty), mask=in_bias)


# --------------------------------------------------------------------------- launchers


def _geometry(qkv: torch.Tensor, num_heads: int, window: int) -> dict:
    b, h, w, c3 = qkv.shape
    c = c3 // 3
    hp, wp = -(-h // window) * window, -(-w // window) * window
    n_win = (hp // window) * (wp // window)
    d = c // num_heads
    slots = _window_slots(window, qkv.dtype)
    return dict(b=b, h=h, w=w, c=c, hp=hp, wp=wp, n_win_w=wp // window, n_win=n_win, d=d,
                bd=max(16, _triton.next_power_of_2(d)), slots=slots, bn=_padded_tokens(window, slots))


def _precision(qkv: torch.Tensor) -> str:
    # fp32 inputs get full-precision products, as eager's fp32 matmuls (no TF32).
    return "ieee" if qkv.dtype == torch.float32 else "tf32"


def _check(qkv, qkv_bias, table, num_heads, window, shift) -> None:
    problem = _argument_problem(qkv, qkv_bias, table, num_heads, window, shift)
    if problem is not None:
        raise problem[0](f"window_attention: {problem[1]}")


def _argument_problem(qkv, qkv_bias, table, num_heads, window, shift):
    if not isinstance(qkv, torch.Tensor) or not isinstance(table, torch.Tensor):
        return TypeError, "qkv and table must be tensors"
    if qkv.dim() != 4:
        return ValueError, f"qkv must be (B, H, W, 3C), got shape {tuple(qkv.shape)}"
    if qkv.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"qkv must be float32, float16 or bfloat16, got {qkv.dtype}"
    if qkv.stride(-1) != 1:
        return ValueError, "qkv must have a contiguous last dimension"
    if not 1 <= window <= MAX_WINDOW:
        return ValueError, f"window must be in 1..{MAX_WINDOW}, got {window}"
    if not 0 <= shift < window:
        return ValueError, f"shift must be in [0, {window}), got {shift}"
    c3 = qkv.shape[-1]
    if c3 % 3 or (c3 // 3) % num_heads:
        return ValueError, f"last dim {c3} must be 3 * C with C divisible by num_heads={num_heads}"
    d = c3 // 3 // num_heads
    if d not in HEAD_DIMS:
        return ValueError, f"head_dim {d} is not supported (supported: {HEAD_DIMS})"
    if table.shape != ((2 * window - 1) ** 2, num_heads):
        return ValueError, f"table must be ({(2 * window - 1) ** 2}, {num_heads}), got {tuple(table.shape)}"
    if qkv_bias is not None and (not isinstance(qkv_bias, torch.Tensor) or qkv_bias.shape != (c3,)):
        return ValueError, f"qkv_bias must be ({c3},) or None"
    if qkv_bias is not None and qkv_bias.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"qkv_bias must be float32, float16 or bfloat16, got {qkv_bias.dtype}"
    devices = {t.device for t in (qkv, table, qkv_bias) if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        return ValueError, f"qkv, qkv_bias and table must be on one device, got {sorted(map(str, devices))}"
    return None


def unsupported_reason(qkv, qkv_bias, table, num_heads, window, shift) -> str | None:
    """Why the fused kernel cannot take these inputs, or None when it can."""
    reason = _triton.unsupported_reason(qkv)
    if reason is not None:
        return reason
    problem = _argument_problem(qkv, qkv_bias, table, num_heads, window, shift)
    return None if problem is None else problem[1]


def _make_dense_index(window: int, slots: int, bn: int, device: torch.device) -> torch.Tensor:
    entries = (2 * window - 1) ** 2
    # made on the device: under torch.compile this runs in the graph, where a host copy would
    # synchronise and keep the graph from being captured
    index = torch.full((bn, bn), entries + 1, dtype=torch.long, device=device)  # padding columns: -inf
    tokens = _token_slots(window, slots, device)
    index[:, tokens] = entries  # padding rows: 0 (never stored)
    index[tokens[:, None], tokens[None, :]] = relative_position_index(window, device)
    return index.view(-1)


def _token_slots(window: int, slots: int, device: torch.device) -> torch.Tensor:
    """The slot of each token of a window, row-major."""
    steps = torch.arange(window, device=device)
    return (steps[:, None] * slots + steps[None, :]).flatten()


def _sums_on_chip(dtype: torch.dtype) -> bool:
    """Whether the backward kernel sums dS by offset for the bias table's gradient itself
    (bf16/fp16, whose blocks hold whole key rows), or leaves (BN, BN) sums to the op (fp32)."""
    return dtype != torch.float32


def _window_slots(window: int, dtype: torch.dtype) -> int:
    """Slots per row of a window as the kernels lay it out: token (row, column) sits in slot
    row * slots + column. Where the backward sums offsets on chip, a power of two, at least 4,
    so that a tile of scores regroups by row and column offsets with reshapes
    (``_offset_sums``); else rows packed (the window itself): with the power of two, fp32's
    backward spilled registers."""
    return max(4, _triton.next_power_of_2(window)) if _sums_on_chip(dtype) else window


def _padded_tokens(window: int, slots: int) -> int:
    """Slots of a window's tiles: a power of two, at least 16 (``slots`` squared for a power of two)."""
    return max(16, _triton.next_power_of_2(slots * window))


def _offset_slots(slots: int) -> int:
    """Rows and columns of a backward program's bias-table partial: the 2 * slots - 1 offsets
    a row (column) of two slots can differ by, at least 16 (tl.dot's least)."""
    return max(16, 2 * slots)


DENSE_BLOCK = 1024  # scores per program of the dense bias


@_triton.define_op("hifuse::window_attention_dense_bias", mutates_args=())
def _dense_bias_op(table: torch.Tensor, window: int, slots: int) -> torch.Tensor:
    """(heads, bn, bn) float32 bias of each head's scores (``slots`` per window row,
    ``_window_slots``), -inf in the padding columns: the attention kernels load it as one
    contiguous tile (a gather from the table costs them registers). One gather launch from the
    (entries, heads) table."""
    heads = table.shape[1]
    bn = _padded_tokens(window, slots)
    index = cached(_make_dense_index, window, slots, bn, table.device)
    out = torch.empty((heads, bn, bn), device=table.device, dtype=torch.float32)
    n = bn * bn
    _triton.wrap_triton(_dense_bias_kernel)[_triton.grid(heads, triton.cdiv(n, DENSE_BLOCK))](
        table, index, out, heads, (2 * window - 1) ** 2, n, BLOCK=DENSE_BLOCK,
    )
    return out


@_dense_bias_op.register_fake
def _(table, window, slots):
    bn = _padded_tokens(window, slots)
    return table.new_empty((table.shape[1], bn, bn), dtype=torch.float32)


def _dense_bias(table: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense bias the kernels take for qkv of ``dtype``."""
    return torch.ops.hifuse.window_attention_dense_bias(table.contiguous(), window, _window_slots(window, dtype))


def _bias_or_zeros(qkv, qkv_bias):
    # taken in its own dtype: the kernels round it to qkv's as they load it (no cast pass, and
    # its gradient comes back in its dtype)
    if qkv_bias is None:
        return qkv.new_zeros(qkv.shape[-1])
    return qkv_bias.contiguous()


# Warps and query rows per block of the backward: no bf16/fp16 variant spills with these
# (scripts/check_triton_compile.py); 32 or 64 rows, or 4 warps, spill.
BWD_WARPS = 8
BWD_ROWS = 16
# Keys per block of the fp32 backward (64 or more: whole windows, as bf16/fp16 take them),
# and its warps by head dim: none of these spills (with whole windows the fp32 backward
# spilled 36-184 bytes a thread; with 4 warps at head dim 16, 44 bytes).
BWD_FP32_KEYS = 16
BWD_FP32_WARPS = {16: 8, 32: 4, 64: 4}
# (window, head) programs of the backward at most: enough to fill a GPU, few enough that the
# per-program partial sums stay small; more windows are looped over inside a program.
BWD_PROGRAMS = 1024
# The backward's finishing pass: 16 outputs a program, 128 programs' partials of them loaded
# at once (8 a thread on 8 warps).
FINISH_OUTPUTS = 16
FINISH_BLOCK = 2048
FINISH_WARPS = 8
# The forward's: queries in blocks of 16 rows keep every variant at 128 registers or fewer
# (whole 64-row tiles needed up to 255 and spilled in fp32). Wide tiles (the interpreter's)
# take whole windows everywhere.
FWD_WARPS = 4
FWD_ROWS = 16


def _shape_class(qkv: torch.Tensor, g: dict, window: int) -> str:
    """The launch table's shape class: dtype, channels, head dim, window."""
    return f"{_configs.dtype_name(qkv.dtype)}/c{g['c']}/d{g['d']}/w{window}"


def _forward_launch(qkv: torch.Tensor, g: dict, window: int) -> dict:
    """BM (query rows per block) and num_warps of the forward."""
    if _triton.wide():
        return dict(BM=g["bn"], num_warps=FWD_WARPS)

    def problem(config):  # tl.dot takes blocks of 16 rows or more
        return _configs.power_of_two_problem(config, "BM", low=16, high=g["bn"])

    return _configs.launch_config("window_attention.forward", _shape_class(qkv, g, window),
                                  dict(BM=min(FWD_ROWS, g["bn"]), num_warps=FWD_WARPS), qkv.device, problem)


def _backward_launch(qkv: torch.Tensor, g: dict, window: int) -> dict:
    """BM (query rows), BK (keys) per block, num_warps and programs of the backward."""
    if _triton.wide():
        return dict(BM=g["bn"], BK=g["bn"], num_warps=BWD_WARPS, programs=BWD_PROGRAMS)
    # whole key rows: dq accumulates over key blocks in a float32 gradient only, and the
    # on-chip offset sums take whole key rows
    whole = qkv.dtype != torch.float32 or _sums_on_chip(qkv.dtype)
    if not whole and BWD_FP32_KEYS < g["bn"]:
        default = dict(BM=min(BWD_ROWS, g["bn"]), BK=BWD_FP32_KEYS, num_warps=BWD_FP32_WARPS[g["d"]])
    else:
        default = dict(BM=min(BWD_ROWS, g["bn"]), BK=g["bn"], num_warps=BWD_WARPS)

    def problem(config):
        if whole and config["BK"] != g["bn"]:
            return f"BK={config['BK']} must be {g['bn']} (whole windows) for {qkv.dtype}"
        return _configs.power_of_two_problem(config, "BM", "BK", low=16, high=g["bn"])

    return _configs.launch_config("window_attention.backward", _shape_class(qkv, g, window),
                                  dict(default, programs=BWD_PROGRAMS), qkv.device, problem)


@_triton.define_op("hifuse::window_attention", mutates_args=())
def _window_attention_op(
    qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, dense_bias: torch.Tensor, num_heads: int,
    window: int, shift: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``table`` is there for its gradient; the kernel reads ``dense_bias`` (``_dense_bias`` of it)."""
    g = _geometry(qkv, num_heads, window)
    out = qkv.new_empty(g["b"], g["h"], g["w"], g["c"])
    lse = torch.empty(g["b"] * g["n_win"], num_heads, g["bn"], device=qkv.device, dtype=torch.float32)
    grid = _triton.grid(g["b"] * g["n_win"], num_heads)
    _triton.wrap_triton(_fwd_kernel)[grid](
        qkv, qkv_bias, dense_bias, out, lse,
        g["h"], g["w"], g["hp"], g["wp"], g["n_win_w"], g["n_win"], g["c"], num_heads, shift,
        g["d"] ** -0.5,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2),
        WS=window, WP=g["slots"], BN=g["bn"], D=g["d"], BD=g["bd"], SHIFTED=shift > 0, PRECISION=_precision(qkv),
        **_forward_launch(qkv, g, window),
    )
    return out, lse


@_triton.define_op("hifuse::window_attention_backward", mutates_args=())
def _window_attention_backward_op(
    grad_out: torch.Tensor, qkv: torch.Tensor, qkv_bias: torch.Tensor, table: torch.Tensor, dense_bias: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, num_heads: int, window: int, shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _geometry(qkv, num_heads, window)
    grad_out = grad_out.contiguous()
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    n_total = g["b"] * g["n_win"]
    launch = dict(_backward_launch(qkv, g, window))
    per_prog = max(1, -(-n_total * num_heads // launch.pop("programs")))
    progs = -(-n_total // per_prog)
    # bf16/fp16 sum dS by offset in the kernel; fp32 sums it in a slot per program (see the kernel)
    on_chip = _sums_on_chip(qkv.dtype)
    tp = _offset_slots(g["slots"]) if on_chip else 16  # (unused off chip)
    f32 = dict(device=qkv.device, dtype=torch.float32)
    ds_part = torch.empty((progs, num_heads, tp, tp) if on_chip else (0,), **f32)
    ds_slot = torch.empty((0,) if on_chip else (progs, num_heads, g["bn"], g["bn"]), **f32)
    dbias_part = torch.empty(progs, num_heads, 3, g["bd"], device=qkv.device, dtype=torch.float32)
    if launch["BK"] == g["bn"]:  # whole key rows: the kernel does not read the output
        out = out.new_empty((0, 1, 1, 1))
    args = (
        qkv, qkv_bias, dense_bias, out, grad_out, lse, dqkv, dbias_part, ds_part, ds_slot,
        g["h"], g["w"], g["hp"], g["wp"], g["n_win_w"], g["n_win"], n_total, per_prog, g["c"], num_heads,
        shift, g["d"] ** -0.5,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
    )
    shape = dict(WS=window, WP=g["slots"], BN=g["bn"], ON_CHIP=on_chip, TP=tp, D=g["d"], BD=g["bd"], SHIFTED=shift > 0,
                 PRECISION=_precision(qkv))
    _triton.wrap_triton(_bwd_kernel)[_triton.grid(progs, num_heads)](*args, **shape, **launch)
    span = 2 * window - 1
    dtable = torch.empty(span * span, num_heads, device=qkv.device, dtype=table.dtype)  # (entries, heads)
    dbias = torch.empty(3 * g["c"], device=qkv.device, dtype=qkv_bias.dtype)
    if not on_chip:
        sums = _offset_sums_of(ds_slot.sum(0), window, g["slots"])
        dtable.copy_(sums.permute(1, 2, 0).reshape(-1, num_heads))
    # offset dh sits at dh + slots - 1 of a program's sums; the table's entries run over
    # dh = 1 - window .. window - 1
    outputs = (span * span * num_heads if on_chip else 0) + 3 * g["c"]
    _triton.wrap_triton(_bwd_finish_kernel)[(triton.cdiv(outputs, FINISH_OUTPUTS),)](
        ds_part, dbias_part, dtable, dbias, progs, num_heads, span if on_chip else 0, g["slots"] - window, g["d"],
        g["c"], TP=tp, BD=g["bd"], BLOCK_P=FINISH_BLOCK // FINISH_OUTPUTS, BLOCK_O=FINISH_OUTPUTS,
        num_warps=FINISH_WARPS,
    )
    return dqkv, dbias, dtable


def _offset_matrix(window: int, device: torch.device) -> torch.Tensor:
    a = torch.arange(window, device=device)
    return (a[:, None, None] - a[None, :, None] + window - 1 == torch.arange(2 * window - 1, device=device)).float()


def _offset_sums_of(ds: torch.Tensor, window: int, slots: int) -> torch.Tensor:
    """(heads, bn, bn) score sums, ``slots`` per window row, summed by row and column offset
    of query and key: (heads, 2w - 1, 2w - 1), as the bias table lays them out (a product
    with 0/1 matrices, not index_add_, whose CUDA version adds in no fixed order)."""
    tokens = cached(_token_slots, window, slots, ds.device)
    tiles = ds[:, tokens][:, :, tokens].view(-1, window, window, window, window)  # (heads, qrow, qcol, krow, kcol)
    pick = cached(_offset_matrix, window, ds.device)  # [a, b, offset]: a - b is that offset
    return torch.einsum("nacbd,abx,cdy->nxy", tiles, pick, pick)


# Explicit fake implementations: shapes only, so tracing never enters the kernels (under
# TRITON_INTERPRET=1 the interpreter would otherwise be handed fake tensors).
@_window_attention_op.register_fake
def _(qkv, qkv_bias, table, dense_bias, num_heads, window, shift):
    b, h, w, c3 = qkv.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    bn = _padded_tokens(window, _window_slots(window, qkv.dtype))
    lse = qkv.new_empty(b * (hp // window) * (wp // window), num_heads, bn, dtype=torch.float32)
    return qkv.new_empty(b, h, w, c3 // 3), lse


@_window_attention_backward_op.register_fake
def _(grad_out, qkv, qkv_bias, table, dense_bias, out, lse, num_heads, window, shift):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(qkv_bias), torch.empty_like(table)


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    qkv, qkv_bias, table, dense_bias, num_heads, window, shift = inputs
    out, lse = output
    ctx.save_for_backward(qkv, qkv_bias, table, dense_bias, out, lse)
    ctx.config = (num_heads, window, shift)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse, which nothing differentiates


def _backward(ctx, grad_out, _grad_lse):
    qkv, qkv_bias, table, dense_bias, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dqkv, dbias, dtable = torch.ops.hifuse.window_attention_backward(
        grad_out, qkv, qkv_bias, table, dense_bias, out, lse, *ctx.config
    )
    return dqkv, dbias, dtable, None, None, None, None


_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _flops(qkv_shape, bias_shape, table_shape, dense_shape, num_heads, window, shift, out_shape=None, **_kwargs) -> int:
    b, h, w, c3 = qkv_shape
    c = c3 // 3
    hp, wp = -(-h // window) * window, -(-w // window) * window
    n = window * window
    windows = b * (hp // window) * (wp // window)
    return 2 * 2 * windows * n * n * c  # q @ k^T and p @ v over all heads


def _backward_flops(grad_shape, qkv_shape, *args, out_shape=None, **kwargs) -> int:
    # As eager counts its backward: the four matmuls (dv, dp, dq, dk), not the recompute.
    return 2 * _flops(qkv_shape, *args[:3], *args[5:])


def _register_flops() -> None:
    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.hifuse.window_attention)(_flops)
    register_flop_formula(torch.ops.hifuse.window_attention_backward)(_backward_flops)


_register_flops()


# --------------------------------------------------------------------------- functional


def window_attention(
    qkv: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    table: torch.Tensor,
    num_heads: int,
    window: int = 7,
    shift: int = 0,
    check: bool = True,
) -> torch.Tensor:
    """Shifted-window attention with relative position bias on (B, H, W, 3C) qkv.

    Equivalent to ``window_attention_ref``: pads to multiples of ``window`` (padded tokens
    carry ``qkv_bias``), rolls by ``-shift``, masks across shift regions with -100, and
    returns the (B, H, W, C) output at the original token positions. ``check`` False skips
    the argument checks, for callers that made them once already.

    Raises:
        TypeError, ValueError: unsupported dtypes, shapes, window, shift or head_dim.
        RuntimeError: triton is missing or the tensors are on CPU without TRITON_INTERPRET=1.
    """
    if check:
        _check(qkv, qkv_bias, table, num_heads, window, shift)
        reason = _triton.unsupported_reason(qkv)
        if reason is not None:
            raise RuntimeError(f"window_attention: {reason}")
    with torch.no_grad():  # the table's gradient comes from the backward op, through the scores
        dense = _dense_bias(table.detach(), window, qkv.dtype)
    out, _lse = torch.ops.hifuse.window_attention(qkv, _bias_or_zeros(qkv, qkv_bias), table, dense, num_heads, window,
                                                  shift)
    return out

