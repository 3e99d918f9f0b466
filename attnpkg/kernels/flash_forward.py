"""FlashAttention forward pass (Dao et al. 2022; FlashAttention-2, Dao 2023) in Triton.

One program computes one tile of ``BLOCK_M`` query rows of one (batch, head): it keeps the
query tile, a running row maximum ``m``, a running row sum ``l`` and an output accumulator in
registers, and streams the keys and values through in tiles of ``BLOCK_N``. The softmax is
computed in base 2 with ``log2(e)`` folded into the scale, so each probability costs one ``exp2``:

    softmax(scale * q.k)_j = 2^(s_j - m) / sum_l 2^(s_l - m),  s = (scale * log2 e) * q.k

Causal masking (bottom-right aligned: query ``i`` sees keys ``j <= i + Nk - Nq``) splits the
key range in two: tiles every query row of the program sees in full (no mask arithmetic), then
the tiles on the diagonal and at the end of the sequence, which are masked. Tiles past the
diagonal are never loaded.
"""
import triton
import triton.language as tl

from .tiles import load_tile, round_to, tile_and_head, wide_arange

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, k_desc, v_desc, kv_row0,
                     offs_m, offs_n, offs_d, start, stop, n_k, diag, qk_scale,
                     MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                     PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, USE_TMA: tl.constexpr):
    """Fold the key/value tiles in [start, stop) into the running (acc, m, l) of one query tile."""
    for start_n in tl.range(start, stop, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        cols = start_n + offs_n
        if USE_TMA:
            # Hopper's tensor memory accelerator copies the tile. A tile that crosses the end of this
            # head's keys brings in the next head's rows (zeros past the tensor): their scores are
            # masked below, and their values must be zeroed too, since p = 0 times a non-finite
            # value is NaN.
            k = k_desc.load([kv_row0 + start_n, 0])
            v = v_desc.load([kv_row0 + start_n, 0])
            if MASKED:
                v = tl.where(cols[:, None] < n_k, v, 0.0)
        else:
            k = load_tile(k_base + cols[:, None] * stride_kn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
            v = load_tile(v_base + cols[:, None] * stride_vn, cols, n_k, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED:
            visible = cols[None, :] < n_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
            qk = tl.where(visible, qk, float("-inf"))
        # New running maximum of the base-2 logits s = qk_scale * q.k (qk_scale > 0, so the max
        # commutes with the scaling). A row that has seen no key yet keeps m = -inf; shifting
        # by 0 instead keeps its p = 2^-inf = 0 and alpha = 0 free of NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        p = tl.math.exp2(qk * qk_scale - m_new_safe[:, None])      # one fused multiply-add per logit
        # Rescale what was accumulated under the old maximum: the invariant is
        # acc = sum_j 2^(s_j - m) v_j and l = sum_j 2^(s_j - m) over the keys seen so far.
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def flash_forward_kernel(Q, K, V, O, LSE, K_DESC, V_DESC,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_ob, stride_oh, stride_om, stride_od,
                         n_heads, n_q, n_k, qk_scale,
                         GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                         USE_TMA: tl.constexpr, INT64: tl.constexpr):
    """Grid: (cdiv(Nq, BLOCK_M) * B * Hq,). Writes O (B, Hq, Nq, D) and LSE (B, Hq, Nq), natural log.

    With USE_TMA, K_DESC and V_DESC are tensor descriptors of K and V viewed as (B * Hkv * Nk, D).
    With INT64, row offsets are 64-bit (a row index times a row stride can pass 2^31)."""
    start_m, off_bh = tile_and_head(n_q, BLOCK_M, CAUSAL)
    off_b = (off_bh // n_heads).to(tl.int64)
    off_h = (off_bh % n_heads).to(tl.int64)
    off_hkv = off_h // GROUP                      # grouped-query: GROUP query heads share a k/v head

    offs_m = start_m + wide_arange(BLOCK_M, INT64)
    offs_n = wide_arange(BLOCK_N, INT64)
    offs_d = wide_arange(BLOCK_D, INT64)                # head_dim padded to a power of two; the pad is masked
    row_ok = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  offs_m, n_q, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + offs_d[None, :] * stride_vd
    kv_row0 = ((off_b * (n_heads // GROUP) + off_hkv) * n_k).to(tl.int32)   # first row of this k/v head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key tiles [0, full_end) are seen in full by every row of this query tile; [full_end, stop) need masks.
    diag = n_k - n_q
    if CAUSAL:
        stop = tl.minimum(n_k, start_m + BLOCK_M + diag)
        full_end = tl.minimum(tl.maximum(start_m + diag + 1, 0) // BLOCK_N, n_k // BLOCK_N) * BLOCK_N
    else:
        stop = n_k
        full_end = (n_k // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, kv_row0,
                                     offs_m, offs_n, offs_d, 0, full_end, n_k, diag, qk_scale, False, CAUSAL,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, WARP_SPECIALIZE, USE_TMA)
    acc, m_i, l_i = _attend_to_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, kv_row0,
                                     offs_m, offs_n, offs_d, full_end, stop, n_k, diag, qk_scale, True, CAUSAL,
                                     HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PRECISION, False, USE_TMA)

    # Normalise. A row with no visible key has l = 0: its output is 0 and its lse is -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             round_to(o, O.dtype.element_ty, UPCAST), mask=row_ok)
    tl.store(LSE + off_bh.to(tl.int64) * n_q + offs_m, lse, mask=offs_m < n_q)
