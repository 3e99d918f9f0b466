"""FlashAttention forward pass (Dao et al. 2022; FlashAttention-2, Dao 2023) in Triton.

One program computes one tile of ``BLOCK_M`` query rows of one (batch, head): it keeps the
query tile, a running row maximum ``m``, a running row sum ``l`` and an output accumulator in
registers, and streams the keys and values through in tiles of ``BLOCK_N``. The softmax is
computed in base 2 with ``log2(e)`` folded into the scale, so each probability costs one ``exp2``:

    softmax(scale * q.k)_j = 2^(s_j - m) / sum_l 2^(s_l - m),  s = (scale * log2 e) * q.k

Masks (causal, sliding windows, packed sequences: see :mod:`attnpkg.masks`) split the key range
in three: masked tiles at the band's left edge, tiles every query row of the program sees in full
(no mask arithmetic), and masked tiles at the right edge (the causal diagonal) and at the end of the
sequence. Tiles outside the band are never loaded. A soft cap and ALiBi transform the scores in
registers before the row maximum is taken.
"""
import triton
import triton.language as tl

from ..masks import key_tiles, visible
from .tiles import (descriptor_origin, load_tile, round_to, score_transform, sequence_bounds, tile_and_head,
                    wide_arange)

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc, k_row, k_col, v_row,
                     v_col, offs_m, offs_n, offs_d, start, stop, n_k, diag, qk_scale, left, right, cap2, slope2,
                     MASKED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold the key/value tiles in [start, stop) into the running (acc, m, l) of one query tile."""
    for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        if USE_TMA:
            # Hopper's tensor memory accelerator copies the tile. A tile that crosses the end of this
            # head's (or sequence's) keys brings in the next one's rows (zeros past the tensor): their
            # scores are masked below, and their values must be zeroed too, since p = 0 times a
            # non-finite value is NaN. Full tiles never cross it (masks.key_tiles).
            k = k_desc.load([k_row + start_n, k_col])
            v = v_desc.load([v_row + start_n, v_col])
            if MASKED:
                v = tl.where(cols[:, None] < n_k, v, 0.0)
        else:
            k = load_tile(k_base + cols[:, None] * stride_kn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
            v = load_tile(v_base + cols[:, None] * stride_vn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP or ALIBI:
            # Transformed scores: the row maximum is taken after the transform (a soft cap is not
            # monotone in the raw score once ALiBi is added, and bounds it anyway).
            s = score_transform(qk * qk_scale, offs_m[:, None], cols[None, :], diag, cap2, slope2, SOFTCAP, ALIBI)
            if MASKED:
                s = tl.where(visible(offs_m[:, None], cols[None, :], n_k, diag, left, right), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
        else:
            if MASKED:
                qk = tl.where(visible(offs_m[:, None], cols[None, :], n_k, diag, left, right), qk, float("-inf"))
            # New running maximum of the base-2 logits s = qk_scale * q.k (qk_scale > 0, so the max
            # commutes with the scaling).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row that has seen no key yet keeps m = -inf; shifting by 0 instead keeps its
        # p = 2^-inf = 0 and alpha = 0 free of NaN.
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        if SOFTCAP or ALIBI:
            p = tl.math.exp2(s - m_new_safe[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - m_new_safe[:, None])      # one fused multiply-add per logit
        # Rescale what was accumulated under the old maximum: the invariant is
        # acc = sum_j 2^(s_j - m) v_j and l = sum_j 2^(s_j - m) over the keys seen so far.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def flash_forward_kernel(Q, K, V, O, LSE, K_DESC, V_DESC, CU_Q, CU_K, SLOPES,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_ob, stride_oh, stride_om, stride_od,
                         n_heads, n_q, n_k, lse_head_stride, qk_scale, left, right, cap2,
                         GROUP: tl.constexpr, LONGEST_FIRST: tl.constexpr, VARLEN: tl.constexpr,
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                         USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Grid: (cdiv(Nq, BLOCK_M) * B * Hq,). Writes O (B, Hq, Nq, D) and LSE (B, Hq, Nq), natural log.

    The query row i sees key j iff ``masks.visible``: ``i + Nk - Nq - left <= j <= i + Nk - Nq + right``.
    With VARLEN the tensors are packed sequences viewed as (1, H, total, D), ``n_q``, ``n_k`` are the
    longest sequences' lengths, and program b of the batch axis takes sequence b's rows
    ``CU_Q[b]:CU_Q[b+1]`` and keys ``CU_K[b]:CU_K[b+1]`` (LSE is (Hq, total_q), rows ``lse_head_stride``
    apart). SOFTCAP: each scaled score s becomes c tanh(s / c) (``cap2 = c log2 e``); ALIBI: minus
    ``SLOPES[b, h] * |i + Nk - Nq - j|``.
    With USE_TMA, K_DESC and V_DESC are tensor descriptors of K and V viewed as matrices of their rows
    (``attention._descriptor``; ``tiles.descriptor_origin`` finds a head's first row in them).
    With INT64, row offsets are 64-bit (a row index times a row stride can pass 2^31)."""
    start_m, off_bh = tile_and_head(n_q, BLOCK_M, LONGEST_FIRST)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hkv = off_h // GROUP                      # grouped-query: GROUP query heads share a k/v head
    q0, n_q, k0, n_k = sequence_bounds(off_b, n_q, n_k, CU_Q, CU_K, VARLEN)
    if VARLEN:
        if start_m >= n_q:                        # this sequence is shorter than the longest
            return

    offs_m = start_m + wide_arange(BLOCK_M, INT64)
    offs_n = wide_arange(BLOCK_N, INT64)
    offs_d = wide_arange(BLOCK_D, INT64)                # head_dim padded to a power of two; the pad is masked
    row_ok = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q_base = Q + off_b * stride_qb + off_h * stride_qh + q0 * stride_qm
    q = load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, n_q, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + k0 * stride_kn + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + k0 * stride_vn + offs_d[None, :] * stride_vd
    k_row, k_col, v_row, v_col = 0, 0, 0, 0
    if USE_TMA:                                   # where this k/v head (and sequence) starts in K_DESC, V_DESC
        k_row, k_col = descriptor_origin(off_b, off_hkv, k0, stride_kb, stride_kh, stride_kn)
        v_row, v_col = descriptor_origin(off_b, off_hkv, k0, stride_vb, stride_vh, stride_vn)
    slope2 = 0.0
    if ALIBI:
        slope2 = tl.load(SLOPES + off_b * n_heads + off_h) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key tiles [start, full_start) and [full_end, stop) need the element mask; [full_start, full_end) are
    # seen in full by every row of this query tile. Tiles outside [start, stop) are never loaded.
    diag = n_k - n_q
    start, full_start, full_end, stop = key_tiles(start_m, n_q, n_k, left, right, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                                     k_row, k_col, v_row, v_col, offs_m, offs_n, offs_d, start, full_start, n_k, diag,
                                     qk_scale, left, right, cap2, slope2, True, SOFTCAP, ALIBI,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, False, USE_TMA)
    acc, m_i, l_i = _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                                     k_row, k_col, v_row, v_col, offs_m, offs_n, offs_d, full_start, full_end, n_k,
                                     diag, qk_scale, left, right, cap2, slope2, False, SOFTCAP, ALIBI,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, WARP_SPECIALIZE, USE_TMA)
    acc, m_i, l_i = _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                                     k_row, k_col, v_row, v_col, offs_m, offs_n, offs_d, full_end, stop, n_k, diag,
                                     qk_scale, left, right, cap2, slope2, True, SOFTCAP, ALIBI,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, False, USE_TMA)

    # Normalise. A row with no visible key has l = 0: its output is 0 and its lse is -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + (q0 + offs_m[:, None]) * stride_om + offs_d[None, :] * stride_od,
             round_to(o, O.dtype.element_ty, UPCAST), mask=row_ok)
    if VARLEN:
        lse_row0 = off_h * lse_head_stride + q0
    else:
        lse_row0 = off_bh.to(tl.int64) * n_q
    tl.store(LSE + lse_row0 + offs_m, lse, mask=offs_m < n_q)
