"""FlashAttention backward pass in Triton: three kernels, no atomics, so gradients are deterministic.

The forward pass saved only O and the row log-sum-exp, so each kernel recomputes the
probabilities of a tile from Q, K and the lse, ``P = 2^(s - lse * log2 e)``, instead of reading an
N x N matrix. With ``dP = dO V^T`` and ``D = rowsum(dO * O)``:

    dV = P^T dO        dS = P * (dP - D)        dQ = scale * dS K        dK = scale * dS^T Q

1. ``flash_backward_preprocess``: D for every query row (and lse in base 2).
2. ``flash_backward_dkdv_kernel``: one program per key tile accumulates dK and dV over every
   query tile that sees it, and over every query head of its group (grouped-query attention).
3. ``flash_backward_dq_kernel``: one program per query tile accumulates dQ over the key tiles.

Each sum is accumulated by one program in a fixed order, so the result is the same bit for bit
on every run. The price is that S and dP are computed twice (once per kernel).

Masks visit the same tiles as the forward (:mod:`attnpkg.masks`). With a soft cap the score is
``z = c tanh(s / c)``, so ``dS`` is multiplied by ``dz/ds = 1 - tanh^2(s / c)``; ALiBi adds a
constant to the score and leaves ``dS`` unchanged.
"""
import triton
import triton.language as tl

from ..masks import key_tiles, query_tiles, visible
from .tiles import (descriptor_origin, load_tile, round_to, score_transform, sequence_bounds, tanh, tile_and_head,
                    wide_arange)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def flash_backward_preprocess(O, DO, LSE, DLSE, DELTA, LSE2, CU_Q,
                              stride_ob, stride_oh, stride_om, stride_od,
                              stride_dob, stride_doh, stride_dom, stride_dod,
                              n_heads, n_q, lse_rows, inv_scale,
                              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                              HAS_DLSE: tl.constexpr, PAIRS: tl.constexpr, VARLEN: tl.constexpr,
                              INT64: tl.constexpr):
    """D = rowsum(dO * O) - dlse, and lse in base 2 with +inf for rows that see no key (so P = 0 there).

    With PAIRS (the input of the Hopper kernel, ``hopper_backward.py``): for each query tile of BLOCK_M rows,
    BLOCK_M values -lse / scale then BLOCK_M values -D, into DELTA (LSE2 is not written); rows past n_q and
    rows that see no key get -1e30 and 0, finite numbers that give P = 0 and dS = 0.

    ``lse_rows``: the rows of one head of LSE. VARLEN (packed sequences, PAIRS only): the grid's batch axis
    indexes sequences and n_q is the longest; sequence b's tiles start at its own first row ``CU_Q[b]`` (of the
    ``(1, H, total)`` lse, ``lse_rows = total``, and of O, dO with ``stride_ob = 0``), so that the pairs
    follow the Hopper kernel's query tiles."""
    start_m, off_bh = tile_and_head(n_q, BLOCK_M, False)
    pair = (off_bh.to(tl.int64) * tl.cdiv(n_q, BLOCK_M) + start_m // BLOCK_M) * (2 * BLOCK_M)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    q0, n_q, _, _ = sequence_bounds(off_b, n_q, n_q, CU_Q, CU_Q, VARLEN)
    offs_m = start_m + wide_arange(BLOCK_M, INT64)
    offs_d = wide_arange(BLOCK_D, INT64)
    ok = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    rows_o = q0 + offs_m
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + rows_o[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + rows_o[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if VARLEN:
        row = off_h * lse_rows + rows_o
    else:
        row = off_bh.to(tl.int64) * lse_rows + offs_m
    lse = tl.load(LSE + row, mask=offs_m < n_q, other=0.0)
    if HAS_DLSE:
        # d lse_i / d S_ij = P_ij: a gradient flowing into lse adds P * dlse to dS, i.e. lowers D by dlse.
        delta -= tl.load(DLSE + row, mask=offs_m < n_q, other=0.0)
    if PAIRS:
        seen = (offs_m < n_q) & (lse != float("-inf"))
        neg_m = tl.where(seen, tl.minimum(tl.maximum(-lse * inv_scale, -1e30), 1e30), -1e30)
        tl.store(DELTA + pair + tl.arange(0, BLOCK_M), neg_m)
        tl.store(DELTA + pair + BLOCK_M + tl.arange(0, BLOCK_M), tl.where(offs_m < n_q, -delta, 0.0))
    else:
        tl.store(DELTA + row, delta, mask=offs_m < n_q)
        tl.store(LSE2 + row, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=offs_m < n_q)


@triton.jit
def _probabilities(qk, lse2, qi, kj, n_k, diag, qk_scale, left, right, cap2, slope2,
                   MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                   LEFT_UNBOUNDED: tl.constexpr, RIGHT_UNBOUNDED: tl.constexpr):
    """Recompute P = 2^(s - lse2) of a tile from the raw products ``qk`` (rows qi, keys kj, either
    orientation), and the factor that dS takes from the soft cap (1 - tanh^2; 1 without it)."""
    s = qk * qk_scale
    dcap = 1.0
    if SOFTCAP:
        t = tanh(s / cap2)                                  # as the forward computes it
        dcap = 1.0 - t * t
    s = score_transform(s, qi, kj, diag, cap2, slope2, SOFTCAP, ALIBI)
    if MASKED:
        # Keys past n_k (a ragged last tile) are masked too, not only hidden ones: their zero score
        # would give P = e^(-lse), which can overflow, times a zero row of K.
        s = tl.where(visible(qi, kj, n_k, diag, left, right, LEFT_UNBOUNDED, RIGHT_UNBOUNDED), s, float("-inf"))
    return tl.math.exp2(s - lse2), dcap


@triton.jit
def _dkdv_from_query_tiles(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base, stride_qm, stride_dom,
                           stride_dqm, dq_row, offs_n, offs_m, offs_d, start, stop, n_q, n_k, diag, qk_scale,
                           left, right, cap2, slope2,
                           MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                           LEFT_UNBOUNDED: tl.constexpr, RIGHT_UNBOUNDED: tl.constexpr, CHECK_ROWS: tl.constexpr,
                           FUSE_DQ: tl.constexpr, DQ_TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles [start, stop) of one query head, and with
    FUSE_DQ add each tile's share dS K of dQ into a float32 buffer: element by element through
    ``dq_base``, pointers to the head's first row (rows ``stride_dqm`` apart), or with DQ_TMA as one bulk
    reduction of the whole tile through the tensor descriptor ``dq_base`` at row ``dq_row`` + tile start.

    Works on transposed tiles (keys along rows) so that no transpose of P or dS is needed for dK, dV.
    Without CHECK_ROWS every query tile of the run lies below ``n_q``: its rows load without a test."""
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + offs_m
        q = load_tile(q_base + rows[:, None] * stride_qm, rows, n_q, offs_d, CHECK_ROWS, HEAD_DIM, BLOCK_D)
        do = load_tile(do_base + rows[:, None] * stride_dom, rows, n_q, offs_d, CHECK_ROWS, HEAD_DIM, BLOCK_D)
        if CHECK_ROWS:
            # Rows past n_q get lse = +inf, hence P = 0, and contribute nothing. The test as offs_m < n_q - start_m:
            # one subtraction per tile, then each row offset compared with it, instead of an addition per row.
            in_seq = offs_m < n_q - start_m
            lse2 = tl.load(lse2_base + rows, mask=in_seq, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=in_seq, other=0.0)
        else:
            lse2 = tl.load(lse2_base + rows)
            delta = tl.load(delta_base + rows)
        if UPCAST:
            q, do = q.to(tl.float32), do.to(tl.float32)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)
        p_t, dcap_t = _probabilities(qk_t, lse2[None, :], rows[None, :], offs_n[:, None], n_k, diag, qk_scale,
                                     left, right, cap2, slope2, MASKED, SOFTCAP, ALIBI, LEFT_UNBOUNDED,
                                     RIGHT_UNBOUNDED)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)        # dV_J += P_IJ^T dO_I
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)               # dP_IJ^T = V_J dO_I^T
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * dcap_t
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)        # dK_J += dS_IJ^T Q_I
        if FUSE_DQ:
            # The fifth product, dQ_I += dS_IJ K_J, which the dQ kernel would otherwise recompute S
            # and dP for. Other key tiles add to the same rows at the same time: float32 atomic adds,
            # whose order (and so the last bits of dQ) changes from run to run.
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PRECISION)
            if DQ_TMA:
                # Hopper's tensor-memory engine adds the tile into global memory in one bulk
                # operation (cp.reduce.async.bulk): rows past n_q carry exact zeros (P = 0 there),
                # so adding them to the next head's rows changes nothing.
                dq_base.atomic_add([dq_row + start_m, 0], dq)
            else:
                tl.atomic_add(dq_base + rows[:, None] * stride_dqm, dq,
                              mask=(rows[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv


@triton.jit
def flash_backward_dkdv_kernel(Q, K, V, DO, LSE2, DELTA, DK, DV, DQ, CU_Q, CU_K, SLOPES,
                               stride_qb, stride_qh, stride_qm, stride_qd,
                               stride_kb, stride_kh, stride_kn, stride_kd,
                               stride_vb, stride_vh, stride_vn, stride_vd,
                               stride_dob, stride_doh, stride_dom, stride_dod,
                               stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                               stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                               stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                               n_heads, n_q, n_k, lse_head_stride, qk_scale, scale, left, right, cap2,
                               GROUP: tl.constexpr, VARLEN: tl.constexpr, SOFTCAP: tl.constexpr,
                               ALIBI: tl.constexpr, LEFT_UNBOUNDED: tl.constexpr, RIGHT_UNBOUNDED: tl.constexpr,
                               FUSE_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                               INT64: tl.constexpr):
    """Grid: (cdiv(Nk, BLOCK_N) * B * Hq,). One program per key tile and *query* head writes that query
    head's dK and dV of the tile: the gradient itself when GROUP = 1, else a float32 partial that the
    launcher sums over the GROUP query heads of each k/v head (every head of a group works in parallel).
    With FUSE_DQ it also adds its share of dQ into the float32 buffer DQ (5 products in all); with
    DQ_TMA, DQ is a tensor descriptor of that buffer as (B * Hq * Nq, D) rows.
    Masks, VARLEN, SOFTCAP and ALIBI as in the forward kernel."""
    start_n, off_bh = tile_and_head(n_k, BLOCK_N, False)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hkv = off_h // GROUP
    q0, n_q, k0, n_k = sequence_bounds(off_b, n_q, n_k, CU_Q, CU_K, VARLEN)
    if VARLEN:
        if start_n >= n_k:                        # this sequence is shorter than the longest
            return
    offs_n = start_n + wide_arange(BLOCK_N, INT64)
    offs_m = wide_arange(BLOCK_M, INT64)
    offs_d = wide_arange(BLOCK_D, INT64)
    kv_ok = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + off_b * stride_kb + off_hkv * stride_kh + (k0 + offs_n[:, None]) * stride_kn + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hkv * stride_vh + (k0 + offs_n[:, None]) * stride_vn + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * n_heads + off_h) * LOG2E

    # Query tiles [start, full_start) and [full_end, stop) see part of this key tile (masked); tiles
    # [full_start, full_end) see all of it; the others see none of it and are skipped. A ragged last key
    # tile is masked against every query tile.
    diag = n_k - n_q
    start, full_start, full_end, stop = query_tiles(start_n, n_q, n_k, left, right, BLOCK_N, BLOCK_M, LEFT_UNBOUNDED)
    if VARLEN:
        row0 = off_h * lse_head_stride + q0
    else:
        row0 = off_bh.to(tl.int64) * n_q
    q_base = Q + off_b * stride_qb + off_h * stride_qh + q0 * stride_qm + offs_d[None, :] * stride_qd
    do_base = DO + off_b * stride_dob + off_h * stride_doh + q0 * stride_dom + offs_d[None, :] * stride_dod
    dq_row = 0
    if DQ_TMA:
        dq_base = DQ
        dq_row, _ = descriptor_origin(off_b, off_h, q0, stride_dqb, stride_dqh, stride_dqm)
    else:
        dq_base = DQ + off_b * stride_dqb + off_h * stride_dqh + q0 * stride_dqm + offs_d[None, :] * stride_dqd
    # Query tiles below rows_end hold rows < n_q only: the full run up to there tests no row (with packed
    # sequences n_q is read at run time, and a test per row cost 7 % of the loop). The rest of the full
    # run, at most the ragged last tile, tests its rows: in the masked run after it where there is one.
    rows_end = n_q // BLOCK_M * BLOCK_M
    split = tl.maximum(tl.minimum(full_end, rows_end), full_start)
    dk, dv = _dkdv_from_query_tiles(dk, dv, k, v, q_base, do_base, dq_base, LSE2 + row0, DELTA + row0, stride_qm,
                                    stride_dom, stride_dqm, dq_row,
                                    offs_n, offs_m, offs_d, start, full_start, n_q, n_k,
                                    diag, qk_scale, left, right, cap2, slope2, True, SOFTCAP, ALIBI,
                                    LEFT_UNBOUNDED, RIGHT_UNBOUNDED, True, FUSE_DQ, DQ_TMA,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PRECISION)
    dk, dv = _dkdv_from_query_tiles(dk, dv, k, v, q_base, do_base, dq_base, LSE2 + row0, DELTA + row0, stride_qm,
                                    stride_dom, stride_dqm, dq_row,
                                    offs_n, offs_m, offs_d, full_start, split, n_q, n_k,
                                    diag, qk_scale, left, right, cap2, slope2, False, SOFTCAP, ALIBI,
                                    LEFT_UNBOUNDED, RIGHT_UNBOUNDED, False, FUSE_DQ, DQ_TMA,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PRECISION)
    # With a left edge: masked from split to stop (the element mask is exact on a full tile too). Without
    # one (no mask, causal): full_end = stop = n_q, and what is left is the ragged last tile, if any.
    dk, dv = _dkdv_from_query_tiles(dk, dv, k, v, q_base, do_base, dq_base, LSE2 + row0, DELTA + row0, stride_qm,
                                    stride_dom, stride_dqm, dq_row,
                                    offs_n, offs_m, offs_d, split, stop, n_q, n_k,
                                    diag, qk_scale, left, right, cap2, slope2, not LEFT_UNBOUNDED, SOFTCAP, ALIBI,
                                    LEFT_UNBOUNDED, RIGHT_UNBOUNDED, True, FUSE_DQ, DQ_TMA,
                                    HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PRECISION)
    tl.store(DK + off_b * stride_dkb + off_h * stride_dkh + (k0 + offs_n[:, None]) * stride_dkn + offs_d[None, :] * stride_dkd,
             round_to(dk * scale, DK.dtype.element_ty, UPCAST), mask=kv_ok)
    tl.store(DV + off_b * stride_dvb + off_h * stride_dvh + (k0 + offs_n[:, None]) * stride_dvn + offs_d[None, :] * stride_dvd,
             round_to(dv, DV.dtype.element_ty, UPCAST), mask=kv_ok)


@triton.jit
def _dq_from_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc, k_row, k_col,
                       v_row, v_col, offs_m, offs_n, offs_d, start, stop, n_k, diag, qk_scale, left, right, cap2,
                       slope2, MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                       LEFT_UNBOUNDED: tl.constexpr, RIGHT_UNBOUNDED: tl.constexpr, USE_TMA: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [start, stop). K and V tiles come through
    pointers, or with USE_TMA through tensor descriptors, as in the forward kernel."""
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + offs_n
        if USE_TMA:
            k = k_desc.load([k_row + start_n, k_col])
            v = v_desc.load([v_row + start_n, v_col])
            if MASKED:
                # A tile that crosses the end of the keys holds the next head's rows: P = 0 there, but
                # 0 times a non-finite value is NaN, so they are zeroed (full tiles never cross it).
                k = tl.where(cols[:, None] < n_k, k, 0.0)
                v = tl.where(cols[:, None] < n_k, v, 0.0)
        else:
            k = load_tile(k_base + cols[:, None] * stride_kn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
            v = load_tile(v_base + cols[:, None] * stride_vn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p, dcap = _probabilities(qk, lse2[:, None], offs_m[:, None], cols[None, :], n_k, diag, qk_scale,
                                 left, right, cap2, slope2, MASKED, SOFTCAP, ALIBI, LEFT_UNBOUNDED, RIGHT_UNBOUNDED)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dcap
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def flash_backward_dq_kernel(Q, K, V, DO, LSE2, DELTA, DQ, K_DESC, V_DESC, CU_Q, CU_K, SLOPES,
                             stride_qb, stride_qh, stride_qm, stride_qd,
                             stride_kb, stride_kh, stride_kn, stride_kd,
                             stride_vb, stride_vh, stride_vn, stride_vd,
                             stride_dob, stride_doh, stride_dom, stride_dod,
                             stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                             n_heads, n_q, n_k, lse_head_stride, qk_scale, scale, left, right, cap2,
                             GROUP: tl.constexpr, LONGEST_FIRST: tl.constexpr, VARLEN: tl.constexpr,
                             SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, LEFT_UNBOUNDED: tl.constexpr,
                             RIGHT_UNBOUNDED: tl.constexpr, USE_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             UPCAST: tl.constexpr, PRECISION: tl.constexpr, INT64: tl.constexpr):
    """Grid: (cdiv(Nq, BLOCK_M) * B * Hq,). Writes dQ of one query tile of one query head. With USE_TMA,
    K and V tiles come through the tensor descriptors K_DESC, V_DESC, as in the forward kernel."""
    start_m, off_bh = tile_and_head(n_q, BLOCK_M, LONGEST_FIRST)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hkv = off_h // GROUP
    q0, n_q, k0, n_k = sequence_bounds(off_b, n_q, n_k, CU_Q, CU_K, VARLEN)
    if VARLEN:
        if start_m >= n_q:
            return
    offs_m = start_m + wide_arange(BLOCK_M, INT64)
    offs_n = wide_arange(BLOCK_N, INT64)
    offs_d = wide_arange(BLOCK_D, INT64)
    ok = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + (q0 + offs_m[:, None]) * stride_qm + offs_d[None, :] * stride_qd,
                mask=ok, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + (q0 + offs_m[:, None]) * stride_dom + offs_d[None, :] * stride_dod,
                 mask=ok, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    if VARLEN:
        row = off_h * lse_head_stride + q0 + offs_m
    else:
        row = off_bh.to(tl.int64) * n_q + offs_m
    lse2 = tl.load(LSE2 + row, mask=offs_m < n_q, other=float("inf"))
    delta = tl.load(DELTA + row, mask=offs_m < n_q, other=0.0)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + k0 * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + k0 * stride_vn + offs_d[None, :] * stride_vd
    k_row, k_col, v_row, v_col = 0, 0, 0, 0
    if USE_TMA:
        k_row, k_col = descriptor_origin(off_b, off_hkv, k0, stride_kb, stride_kh, stride_kn)
        v_row, v_col = descriptor_origin(off_b, off_hkv, k0, stride_vb, stride_vh, stride_vn)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * n_heads + off_h) * LOG2E

    # The forward's schedule: masked [start, full_start), full [full_start, full_end), masked [full_end, stop).
    diag = n_k - n_q
    start, full_start, full_end, stop = key_tiles(start_m, n_q, n_k, left, right, BLOCK_M, BLOCK_N, LEFT_UNBOUNDED)
    if not LEFT_UNBOUNDED:                  # else start = full_start = 0: no masked run before the full one
        dq = _dq_from_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, k_row,
                                k_col, v_row, v_col, offs_m, offs_n, offs_d, start, full_start, n_k, diag, qk_scale,
                                left, right, cap2, slope2, True, SOFTCAP, ALIBI, LEFT_UNBOUNDED, RIGHT_UNBOUNDED,
                                USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    dq = _dq_from_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, k_row,
                            k_col, v_row, v_col, offs_m, offs_n, offs_d, full_start, full_end, n_k, diag, qk_scale,
                            left, right, cap2, slope2, False, SOFTCAP, ALIBI, LEFT_UNBOUNDED, RIGHT_UNBOUNDED,
                            USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    dq = _dq_from_key_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, k_row,
                            k_col, v_row, v_col, offs_m, offs_n, offs_d, full_end, stop, n_k, diag, qk_scale,
                            left, right, cap2, slope2, True, SOFTCAP, ALIBI, LEFT_UNBOUNDED, RIGHT_UNBOUNDED,
                            USE_TMA, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + (q0 + offs_m[:, None]) * stride_dqm + offs_d[None, :] * stride_dqd,
             round_to(dq * scale, DQ.dtype.element_ty, UPCAST), mask=ok)
