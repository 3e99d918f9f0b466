"""FlashAttention forward for Hopper GPUs (sm_90) in Triton's Gluon dialect, warp-specialized.

The portable forward (``flash_forward.py``) is one program of 8 warps that loads, multiplies and exponentiates in
turn: each tile's exponentials wait for its Q K^T, and the two warpgroups, kept in step by the barriers around its
copies, run their softmax at the same time while the tensor cores idle. This kernel splits the same work across
three partitions of one program (FlashAttention-3's structure), which ``triton.language`` cannot express:

* a **producer** warp issues every copy (Hopper's tensor memory engine, TMA): Q once, then the key and value tiles
  into two rings of ``STAGES`` shared-memory slots, as soon as a slot is free;
* two **consumer** warpgroups each own 64 of the tile's 128 query rows. Step j of a consumer issues S_j = Q K_j^T
  and O += P_{j-1} V_{j-1} together, waits for S_j only, and computes the softmax of S_j while P_{j-1} V_{j-1} is
  still on the tensor cores (the product P V runs one step late). Nothing keeps the two consumers in step.

Mathematics (as in ``flash_forward.py``). With c = scale * log2(e) and base-2 logits s_ij = c q_i.k_j, a row keeps
over the key tiles seen so far m = max_j s_ij, l = sum_j 2^(s_ij - m), O = sum_j 2^(s_ij - m) v_j, and ends with
o = O / l and lse = (m + log2 l) ln 2. A tile that raises m to m' first multiplies O and l by 2^(m - m').

Masks: the band of ``attnpkg.masks`` (query i sees key j iff i + Nk - Nq - left <= j <= i + Nk - Nq + right, and
j < Nk), classified per 64-row half as ``masks.key_tiles`` does for a query tile: masked key tiles [start, full_lo),
full ones [full_lo, full_hi) (no mask arithmetic), masked [full_hi, stop). The producer loads the union of both
halves' tiles, [lo, hi); a consumer releases the tiles it does not need unread, so that every slot is freed by both.

Barriers. Slot s of a ring holds the tiles i = t - lo with i % STAGES == s; tile i is that slot's f-th fill,
f = i // STAGES. ``full[s]`` (count 1) completes when the fill's bytes land: consumers wait on it with parity
f & 1. ``empty[s]`` (count 2) completes when both consumers have released the fill (each arrives once, after the
wait that retires its last read of the slot): before fill f the producer waits on it with parity (f & 1) ^ 1, which
a fresh barrier passes at once (f = 0). A consumer arrives for fill f only after fill f landed, which the producer
issued only after both released fill f - 1, so no consumer can arrive twice in one phase.

Descriptors. Dense batches: Q and O are (B Hq, Nq, D), K and V (B Hkv, Nk, D), copied in boxes of [1, rows, D]:
the engine reads zeros past a head's last row (so no other head's keys or values enter) and drops rows past it on
the store of O. Packed sequences (VARLEN): the (total, H, D) tensors are seen as (H, total, D), one plane per head,
and sequence b is rows cu[b]:cu[b+1] of each plane. A tile that runs past a sequence reads the next one's rows:
their scores are masked, the value rows past the sequence are zeroed in shared memory before they are used (a
non-finite value times p = 0 is NaN), and O is stored by masked pointer stores instead of the engine.
``attnpkg.hopper`` chooses this kernel only where it was tested; Triton's interpreter cannot run it.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)


@gluon.jit
def _program_tile(n_q, BLOCK_M: gl.constexpr, LONGEST_FIRST: gl.constexpr):
    """(first query row of this program's tile, b * Hq + h), tiles varying fastest; the same in every partition."""
    n_tiles = gl.cdiv(n_q, BLOCK_M)
    pid = gl.program_id(0)
    tile = pid % n_tiles
    if LONGEST_FIRST:
        tile = n_tiles - 1 - tile                 # causal: the longest rows first, the shortest in the last wave
    return tile * BLOCK_M, pid // n_tiles


@gluon.jit
def _sequence(bh, n_q, n_k, n_heads, CU_Q, CU_K, GROUP: gl.constexpr, VARLEN: gl.constexpr):
    """Where program ``bh`` (= b * Hq + h) finds its rows: ``(q_plane, q_row0, kv_plane, kv_row0, n_q, n_k)``,
    the descriptor planes and first rows of its queries and keys, and their lengths."""
    if VARLEN:
        seq = bh // n_heads
        head = bh % n_heads
        q_row0 = gl.load(CU_Q + seq)
        kv_row0 = gl.load(CU_K + seq)
        n_q = gl.load(CU_Q + seq + 1) - q_row0
        n_k = gl.load(CU_K + seq + 1) - kv_row0
        return head, q_row0, head // GROUP, kv_row0, n_q, n_k
    kv_plane = (bh // n_heads) * (n_heads // GROUP) + (bh % n_heads) // GROUP
    return bh, 0, kv_plane, 0, n_q, n_k


@gluon.jit
def _band_tiles(start_h, n_q, n_k, left, right, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                LEFT: gl.constexpr, RIGHT: gl.constexpr):
    """Key tiles (in tile units) of the query rows [start_h, start_h + HALF_M): ``(start, full_lo, full_hi, stop)``,
    masked [start, full_lo), full [full_lo, full_hi), masked [full_hi, stop); all 0 when the rows see no key.
    LEFT / RIGHT: the band has that edge (else it is open on that side)."""
    diag = n_k - n_q
    last = gl.minimum(start_h + HALF_M, n_q) - 1                  # the last real row
    stop_key = n_k
    full_hi_key = n_k
    if RIGHT:
        stop_key = gl.minimum(last + diag + right + 1, n_k)
        full_hi_key = gl.maximum(gl.minimum(start_h + diag + right + 1, n_k), 0)
    start = 0
    full_lo = 0
    if LEFT:
        start = gl.maximum(start_h + diag - left, 0) // BLOCK_N
        full_lo = gl.cdiv(gl.maximum(last + diag - left, 0), BLOCK_N)
    stop = gl.cdiv(gl.maximum(stop_key, 0), BLOCK_N)
    full_hi = full_hi_key // BLOCK_N
    empty = (start_h >= n_q) | (stop <= start)
    none_full = full_hi <= full_lo
    full_lo = gl.where(none_full, stop, gl.minimum(gl.maximum(full_lo, start), stop))
    full_hi = gl.where(none_full, stop, gl.minimum(full_hi, stop))
    return (gl.where(empty, 0, start), gl.where(empty, 0, full_lo), gl.where(empty, 0, full_hi),
            gl.where(empty, 0, stop))


@gluon.jit
def _union(start0, stop0, start1, stop1):
    """The tiles the producer loads: the union of the halves' ranges (contiguous: the band moves one key per row)."""
    lo = gl.where(stop0 > start0, start0, start1)
    lo = gl.where((stop1 > start1) & (start1 < lo), start1, lo)
    return lo, gl.maximum(gl.maximum(stop0, stop1), lo)


# ------------------------------------------------------------------------------------------------ producer
@gluon.jit
def _ring_load(desc, plane, row0, tile, i, full, empty, smem, STAGES: gl.constexpr, BLOCK_N: gl.constexpr):
    """Copy key tile ``tile`` (rows from ``row0`` of ``plane``) into fill i // STAGES of slot i % STAGES, once both
    consumers freed it."""
    s = i % STAGES
    mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
    mbarrier.expect(full.index(s), desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [plane, row0 + tile * BLOCK_N, 0], full.index(s), smem.index(s))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
              GROUP: gl.constexpr, VARLEN: gl.constexpr, LONGEST_FIRST: gl.constexpr, LEFT: gl.constexpr,
              RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: Q's two halves, then K_0 and, for each tile i, K_{i+1} before V_i (the order the consumers use)."""
    q_bars, k_full, k_empty, v_full, v_empty = bars
    HALF_M: gl.constexpr = BLOCK_M // 2
    start_m, bh = _program_tile(n_q, BLOCK_M, LONGEST_FIRST)
    q_plane, q_row0, kv_plane, kv_row0, n_q, n_k = _sequence(bh, n_q, n_k, n_heads, CU_Q, CU_K, GROUP, VARLEN)
    s0, _a0, _b0, e0 = _band_tiles(start_m, n_q, n_k, left, right, HALF_M, BLOCK_N, LEFT, RIGHT)
    s1, _a1, _b1, e1 = _band_tiles(start_m + HALF_M, n_q, n_k, left, right, HALF_M, BLOCK_N, LEFT, RIGHT)
    lo, hi = _union(s0, e0, s1, e1)
    for h in gl.static_range(2):
        has_rows = start_m + h * HALF_M < n_q
        mbarrier.expect(q_bars.index(h), q_desc.block_type.nbytes, pred=has_rows)
        tma.async_copy_global_to_shared(q_desc, [q_plane, q_row0 + start_m + h * HALF_M, 0], q_bars.index(h),
                                        q_smem.index(h), pred=has_rows)
    n = hi - lo
    if n > 0:
        _ring_load(k_desc, kv_plane, kv_row0, lo, 0, k_full, k_empty, k_smem, STAGES, BLOCK_N)
    for i in range(n):
        if i + 1 < n:
            _ring_load(k_desc, kv_plane, kv_row0, lo + i + 1, i + 1, k_full, k_empty, k_smem, STAGES, BLOCK_N)
        _ring_load(v_desc, kv_plane, kv_row0, lo + i, i, v_full, v_empty, v_smem, STAGES, BLOCK_N)


# ------------------------------------------------------------------------------------------------ consumers
@gluon.jit
def _softmax(s, m_i, rows, cols, n_k, diag, left, right, qk_scale, MASKED: gl.constexpr, LEFT: gl.constexpr,
             RIGHT: gl.constexpr):
    """p = 2^(c s - m_new), the new running maximum m_new and alpha = 2^(m_i - m_new) for a tile s = q.k."""
    if MASKED:
        ok = cols[None, :] < n_k
        if LEFT:
            ok = ok & (cols[None, :] >= rows[:, None] + diag - left)
        if RIGHT:
            ok = ok & (cols[None, :] <= rows[:, None] + diag + right)
        s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)               # qk_scale > 0: the max commutes with it
    if MASKED:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)       # a row with no key yet: p = 0, alpha = 0
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - m_use[:, None])                     # one FFMA and one exp2 per score
    return p, m_new, gl.exp2(m_i - m_use)


@gluon.jit
def _release(full, empty, i, STAGES: gl.constexpr):
    """Free fill i of a ring unread (a tile the other half needs and this one does not)."""
    mbarrier.wait(full.index(i % STAGES), (i // STAGES) & 1)
    mbarrier.arrive(empty.index(i % STAGES))


@gluon.jit
def _zero_rows_from(tile, first_zero, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr):
    """Zero rows [first_zero, BLOCK_N) of a value tile in shared memory, in two 64-row halves, and make the stores
    visible to the tensor cores. Both consumers may zero the same tile at once: they write the same zeros."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    for half in gl.static_range(2):
        part = tile.slice(half * 64, 64)
        rows = half * 64 + gl.arange(0, 64, gl.SliceLayout(1, layout))
        x = part.load(layout)
        part.store(gl.where(rows[:, None] < first_zero, x, gl.zeros_like(x)))
    fence_async_shared()
    gl.thread_barrier()                                            # this partition's 4 warps


@gluon.jit
def _step(t, lo, o, m_i, l_i, p_op, q_tile, k_smem, v_smem, k_full, k_empty, v_full, v_empty, rows, cols0, n_k,
          diag, left, right, qk_scale, pin, s_layout: gl.constexpr, p_layout: gl.constexpr, MASKED: gl.constexpr,
          LEFT: gl.constexpr, RIGHT: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
          HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """Key tile t (ring index i = t - lo): S_t = Q K_t^T and O += P_{t-1} V_{t-1} in flight together; the softmax
    of S_t runs while P_{t-1} V_{t-1} is on the tensor cores.

    ``pin``: a shared-memory store of the new row sums (which need every exp2) placed before the wait for P V keeps
    ptxas from hoisting that wait above the exponentials (which would undo the overlap). Its data is never read."""
    i = t - lo
    ks = i % STAGES
    vs = (i - 1) % STAGES
    mbarrier.wait(k_full.index(ks), (i // STAGES) & 1)
    k_tile = k_smem.index(ks).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
    s_tok = warpgroup_mma(q_tile, k_tile, gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
    mbarrier.wait(v_full.index(vs), ((i - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(vs).reshape([BLOCK_N, HEAD_D]), o, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1, deps=[s_tok])       # S_t done (groups retire in issue order)
    mbarrier.arrive(k_empty.index(ks))
    p, m_new, alpha = _softmax(s, m_i, rows, t * BLOCK_N + cols0, n_k, diag, left, right, qk_scale, MASKED,
                               LEFT, RIGHT)
    l_i = l_i * alpha + gl.sum(p, 1)
    pin.store(l_i)
    p_next = gl.convert_layout(p.to(p_op.dtype), p_layout)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
    mbarrier.arrive(v_empty.index(vs))
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o.type.layout))[:, None]
    return o, m_new, l_i, p_next


@gluon.jit
def _consumer(HALF: gl.constexpr, q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k,
              n_heads, left, right, qk_scale, lse_head_stride, GROUP: gl.constexpr, VARLEN: gl.constexpr,
              LONGEST_FIRST: gl.constexpr, LEFT: gl.constexpr, RIGHT: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    """Query rows [start_m + 64 HALF, start_m + 64 HALF + 64) of the program's tile: one warpgroup."""
    q_bars, k_full, k_empty, v_full, v_empty = bars
    HALF_M: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    start_m, bh = _program_tile(n_q, BLOCK_M, LONGEST_FIRST)
    q_plane, q_row0, _kv_plane, _kv_row0, n_q, n_k = _sequence(bh, n_q, n_k, n_heads, CU_Q, CU_K, GROUP, VARLEN)
    start_h = start_m + HALF * HALF_M
    start, full_lo, full_hi, stop = _band_tiles(start_h, n_q, n_k, left, right, HALF_M, BLOCK_N, LEFT, RIGHT)
    s_other, _a, _b, e_other = _band_tiles(start_m + (1 - HALF) * HALF_M, n_q, n_k, left, right, HALF_M, BLOCK_N,
                                           LEFT, RIGHT)
    lo, hi = _union(start, stop, s_other, e_other)
    diag = n_k - n_q
    has_rows = start_h < n_q
    own = stop > start
    first = gl.where(own, start, hi)                  # without tiles of its own, the half releases all of [lo, hi)

    q_tile = q_smem.index(HALF).reshape([HALF_M, HEAD_D])
    pin = pin_smem.index(HALF)
    rows = start_h + gl.arange(0, HALF_M, row_layout)
    cols0 = gl.arange(0, BLOCK_N, gl.SliceLayout(0, s_layout))
    m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([HALF_M], gl.float32, row_layout)
    o = gl.zeros([HALF_M, HEAD_D], gl.float32, o_layout)

    mbarrier.wait(q_bars.index(HALF), 0, pred=has_rows)            # also before Q's slot is reused for O
    for t in range(lo, first):                                     # tiles before this half's band
        _release(k_full, k_empty, t - lo, STAGES)
        _release(v_full, v_empty, t - lo, STAGES)
    if own:
        # The first tile: S only (masked: it may be the only one, or at an edge).
        i0 = start - lo
        mbarrier.wait(k_full.index(i0 % STAGES), (i0 // STAGES) & 1)
        k_tile = k_smem.index(i0 % STAGES).reshape([BLOCK_N, HEAD_D]).permute((1, 0))
        s_tok = warpgroup_mma(q_tile, k_tile, gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout), use_acc=False,
                              is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s_tok])
        mbarrier.arrive(k_empty.index(i0 % STAGES))
        p, m_i, alpha = _softmax(s, m_i, rows, start * BLOCK_N + cols0, n_k, diag, left, right, qk_scale, True,
                                 LEFT, RIGHT)
        l_i = gl.sum(p, 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # The other tiles: masked up to full_lo, full up to full_hi, masked to the end.
        for t in range(start + 1, full_lo):
            o, m_i, l_i, p_op = _step(t, lo, o, m_i, l_i, p_op, q_tile, k_smem, v_smem, k_full, k_empty, v_full,
                                      v_empty, rows, cols0, n_k, diag, left, right, qk_scale, pin, s_layout, p_layout,
                                      True, LEFT, RIGHT, HALF_M, BLOCK_N, HEAD_D, STAGES)
        for t in range(gl.maximum(full_lo, start + 1), full_hi):
            o, m_i, l_i, p_op = _step(t, lo, o, m_i, l_i, p_op, q_tile, k_smem, v_smem, k_full, k_empty, v_full,
                                      v_empty, rows, cols0, n_k, diag, left, right, qk_scale, pin, s_layout, p_layout,
                                      False, LEFT, RIGHT, HALF_M, BLOCK_N, HEAD_D, STAGES)
        for t in range(gl.maximum(full_hi, start + 1), stop):
            o, m_i, l_i, p_op = _step(t, lo, o, m_i, l_i, p_op, q_tile, k_smem, v_smem, k_full, k_empty, v_full,
                                      v_empty, rows, cols0, n_k, diag, left, right, qk_scale, pin, s_layout, p_layout,
                                      True, LEFT, RIGHT, HALF_M, BLOCK_N, HEAD_D, STAGES)
        # The last P V.
        last = stop - 1 - lo
        vs = last % STAGES
        mbarrier.wait(v_full.index(vs), (last // STAGES) & 1)
        if VARLEN:                          # only the last tile can run past the sequence's keys
            if stop * BLOCK_N > n_k:
                _zero_rows_from(v_smem.index(vs).reshape([BLOCK_N, HEAD_D]), n_k - (stop - 1) * BLOCK_N, BLOCK_N,
                                HEAD_D)
        o_tok = warpgroup_mma(p_op, v_smem.index(vs).reshape([BLOCK_N, HEAD_D]), o, is_async=True)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[o_tok, p_op])
        mbarrier.arrive(v_empty.index(vs))
        for t in range(stop, hi):                                  # tiles after this half's band
            _release(k_full, k_empty, t - lo, STAGES)
            _release(v_full, v_empty, t - lo, STAGES)

    # Normalise: rows with no visible key (l = 0) give o = 0 and lse = -inf.
    l_safe = gl.where(l_i == 0.0, 1.0, l_i)
    o = o * gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))[:, None]
    lse = gl.where(l_i == 0.0, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    if VARLEN:                              # LSE: (Hq, total_q); O: (total_q, Hq, D), by masked pointer stores
        gl.store(LSE + q_plane.to(gl.int64) * lse_head_stride + q_row0 + rows, lse, mask=rows < n_q)
        o_rows = gl.arange(0, HALF_M, gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, HEAD_D, gl.SliceLayout(0, o_layout))
        offsets = ((q_row0 + start_h + o_rows).to(gl.int64)[:, None] * (n_heads * HEAD_D) + q_plane * HEAD_D
                   + o_cols[None, :])
        gl.store(O + offsets, o.to(dtype), mask=(start_h + o_rows)[:, None] < n_q)
    else:
        gl.store(LSE + bh.to(gl.int64) * n_q + rows, lse, mask=rows < n_q)
        if has_rows:
            # O goes through this half's Q slot (its products have retired) and out by TMA (rows past Nq dropped).
            o_smem = q_smem.index(HALF)
            o_smem.reshape([HALF_M, HEAD_D]).store(o.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                                        # this partition's 4 warps only
            tma.async_copy_shared_to_global(o_desc, [q_plane, start_h, 0], o_smem)
            tma.store_wait(0)


@gluon.jit
def _consumer0(q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
               qk_scale, lse_head_stride, GROUP: gl.constexpr, VARLEN: gl.constexpr, LONGEST_FIRST: gl.constexpr,
               LEFT: gl.constexpr, RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    _consumer(0, q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
              qk_scale, lse_head_stride, GROUP, VARLEN, LONGEST_FIRST, LEFT, RIGHT, BLOCK_M, BLOCK_N, HEAD_D, STAGES)


@gluon.jit
def _consumer1(q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
               qk_scale, lse_head_stride, GROUP: gl.constexpr, VARLEN: gl.constexpr, LONGEST_FIRST: gl.constexpr,
               LEFT: gl.constexpr, RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               HEAD_D: gl.constexpr, STAGES: gl.constexpr):
    _consumer(1, q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
              qk_scale, lse_head_stride, GROUP, VARLEN, LONGEST_FIRST, LEFT, RIGHT, BLOCK_M, BLOCK_N, HEAD_D, STAGES)


@gluon.jit(do_not_specialize=["n_q", "n_k", "n_heads", "left", "right", "lse_head_stride"])
def hopper_forward_kernel(q_desc, k_desc, v_desc, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right, qk_scale,
                          lse_head_stride, GROUP: gl.constexpr, VARLEN: gl.constexpr, LONGEST_FIRST: gl.constexpr,
                          LEFT: gl.constexpr, RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          HEAD_D: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                          PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """Grid: (cdiv(Nq, BLOCK_M) * B * Hq,). q_desc, o_desc: (B Hq, Nq, D) in [1, BLOCK_M / 2, D] boxes; k_desc,
    v_desc: (B Hkv, Nk, D) in [1, BLOCK_N, D] boxes; LSE: (B, Hq, Nq) float32; qk_scale = scale * log2(e);
    ``left``, ``right``: the band as the kernels take it (LEFT, RIGHT: whether that edge exists).
    VARLEN: the descriptors are (H, total, D) planes, B is the number of sequences, n_q and n_k the longest ones'
    lengths (the grid), CU_Q and CU_K the int32 prefix sums; O (total_q, Hq, D) is written through its pointer,
    LSE is (Hq, total_q) with rows ``lse_head_stride`` apart."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(STAGES >= 2, "the K and V rings need two slots at least")
    dtype: gl.constexpr = q_desc.dtype
    HALF_M: gl.constexpr = BLOCK_M // 2
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, HALF_M, HEAD_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_N, HEAD_D], v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    pin_smem = gl.allocate_shared_memory(gl.float32, [2, HALF_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)       # the producer's expect
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)      # one arrival per consumer
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    gl.thread_barrier()                               # the barriers exist before the partitions fork
    bars = (q_bars, k_full, k_empty, v_full, v_empty)
    gl.warp_specialize([
        (_consumer0, (q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
                      qk_scale, lse_head_stride, GROUP, VARLEN, LONGEST_FIRST, LEFT, RIGHT, BLOCK_M, BLOCK_N, HEAD_D,
                      STAGES)),       # default partition
        (_consumer1, (q_smem, pin_smem, k_smem, v_smem, bars, o_desc, O, LSE, CU_Q, CU_K, n_q, n_k, n_heads, left, right,
                      qk_scale, lse_head_stride, GROUP, VARLEN, LONGEST_FIRST, LEFT, RIGHT, BLOCK_M, BLOCK_N, HEAD_D,
                      STAGES)),       # worker: 4 warps
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, CU_Q, CU_K, n_q, n_k, n_heads, left,
                     right, GROUP, VARLEN, LONGEST_FIRST, LEFT, RIGHT, BLOCK_M, BLOCK_N, STAGES)),  # worker: 1 warp
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
