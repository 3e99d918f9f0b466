"""FlashAttention backward for Hopper GPUs (sm_90) in Triton's Gluon dialect: five products per tile pair.

The portable backward (``flash_backward.py``) runs seven matrix products per tile pair in two kernels, so that every
sum belongs to one program (deterministic). This kernel runs FlashAttention-3's schedule: one program per key tile
computes S, P, dP and dS once, keeps dK and dV in registers and adds each dS K into a float32 dQ buffer, with the
matrix products issued asynchronously so that the exponentials and dS run while the tensor cores work. Gluon
expresses what ``triton.language`` does not: where each wait on a product goes, the shared-memory ring and its
barriers. ``attnpkg.hopper`` chooses it only where it was tested (see there); Triton's interpreter cannot run it.

Mathematics (one head; P = softmax(scale * Q K^T), O = P V, lse the row log-sum-exp, natural log):

    lse2 = lse * log2(e)        P = 2^(s * qk_scale - lse2),   s = Q K^T, qk_scale = scale * log2(e)
    delta = rowsum(dO * O)      dP = dO V^T       dS = P * (dP - delta)
    dV = P^T dO                 dK = scale * dS^T Q            dQ = scale * dS K

One program owns a key tile K_j, V_j (BLOCK_N = 128 keys) of one *query* head and streams the query
tiles i (BLOCK_M = 64 rows of Q, dO) that see it.  It works on transposed tiles (keys along M), so dV
and dK need no transpose.  With m = lse2 / qk_scale:

    S^T - m      = K_j Q_i^T  + (-m)     (M=128 keys, N=64, K=D)  A = K smem, B = Q smem permuted
    dP^T - delta = V_j dO_i^T + (-delta) (same)                   A = V smem, B = dO smem permuted
    P^T  = 2^((S^T - m) qk_scale)         dS^T = P^T * (dP^T - delta)
    dV  += P^T dO_i             (M=128, N=D, K=64)                A = P^T smem, B = dO smem
    dK  += dS^T Q_i             (same)                            A = dS^T smem, B = Q smem
    dQ_i = dS K_j               (M=64, N=D, K=128)                A = dS^T smem seen transposed, B = K smem

-m and -delta start the two accumulators (``flash_backward_preprocess`` writes them per query tile with
``PAIRS``, TMA brings them with Q and dO), so no per-query row vector stays in registers.  scale * dQ_i goes
into a float32 buffer (B*Hq*Nq, D) by a TMA bulk reduction (cp.reduce.async.bulk.tensor .add =
`ttng.async_tma_reduce`, which Triton 3.6 builds but Gluon 3.6 does not wrap: `_tma_reduce_add` below), staged
through one float32 shared tile.  The host then casts dQacc (already scaled) to the input dtype.  The float32 adds of different key tiles land in any order:
dQ is not bitwise deterministic (dK, dV are).

Pipeline of one iteration.  warpgroup_mma groups complete in issue order, per warpgroup;
wait(1) leaves at most the most recent group of *this warpgroup* in flight.  Each of the 2 warpgroups
(8 warps) owns 64 of the 128 keys of S^T, dP^T, dK, dV and half of D for dQ.

    wait ready_l/ready_q[s]; issue S^T;  wait ready_do[s]; issue dP^T     in flight: dK(t-1), S, dP
    wait(1)  -> dK(t-1), S^T done                                         dP^T still running
    P^T = exp2 (+ mask)                                                   overlaps dP^T
    tma.store_wait(0) + bar.sync (the previous dQ reduce has read its staging tile)
    P^T -> smem, fence, bar.sync (A), issue dV += P^T dO                  in flight: dP, dV
    wait(1)  -> dP^T done                                                 dV still running
    dS^T = P^T (dP^T - delta)                                             overlaps dV
    arm ready_*[stage of tile t+S-1] (expect-tx)
    dS^T -> smem, fence, bar.sync (B)
    TMA loads of tile t+S-1 into the stage that tile t-1 used            (free: see below)
    issue dQ = dS K, (membar's bar.sync), issue dK += dS^T Q              in flight: dV, dQ, dK
    wait(1)  -> dV, dQ done                                               dK runs on into tile t+1
    dQ -> staging smem, fence, bar.sync (D), TMA reduce-add (async)

So exp2 overlaps dP^T, dS overlaps dV, the dQ epilogue and the next tile's waits and S/dP issue overlap
dK, the TMA loads of a tile overlap the previous tile(s), and the dQ reduce overlaps the next tile.
(Every product waited for at once, the same kernel ran 1.13-1.24x the two-kernel pass against 1.20-1.30x:
benchmarks/NOTES.md.)

Buffer reuse: the stage that tile t-1 used is rewritten after (B) of tile t: its readers S(t-1), dP(t-1),
dV(t-1) finished inside tile t-1, and dK(t-1) (the last reader of that Q) at the first wait(1) of tile t,
before (A) in every warpgroup.  P^T and dS^T tiles: their readers of tile t-1 (dV, dQ, dK) finished before
(A) of tile t.  The staging tile: store_wait before (A).

mbarrier phases: three barriers per ring stage s (ready_q, ready_do, ready_l: one per TMA copy, so that
Triton's shared-memory hazard analysis does not put a bar.sync between copies that share a barrier).
Each is armed (arrive + expect-tx) once per tile t with t % NUM_STAGES == s and completes once, when that
copy's bytes have landed, so tile t waits on them with parity (t // NUM_STAGES) & 1.  Tiles are numbered by
one counter t over the masked, full and masked loops (contiguous ranges), so the bookkeeping carries
across the loops.  A barrier is re-armed (tile t+S-1) only after every thread has passed its wait on
the previous phase (tile t-1, in iteration t-1, followed by several bar.syncs), so no waiter can miss a
phase.  kv_bar is used once (parity 0).  Tiles past the last are never armed nor waited for.

Masks: the band of ``attnpkg.masks``, bottom-right aligned: query i sees key j iff
i + Nk - Nq - left <= j <= i + Nk - Nq + right (causal: right = 0; an unbounded side is Nq + Nk, and LEFT /
RIGHT say which sides exist).  For a key tile, query tiles that see none of it are skipped; the others run
as masked [first, full_first) (the right edge: the causal diagonal), full [full_first, full_end) (no mask
arithmetic), masked [full_end, last) (the left edge of a window), the schedule of ``masks.query_tiles``.
A ragged last key tile is masked against every query tile (keys >= Nk -> P = 0).
Rows past Nq (and rows that see no key) get -m = -1e30, so P = 0 and dS = 0; their Q/dO rows are the next
head's finite rows or TMA zeros, so they add exact zeros to dK, dV and to dQacc (TMA clips rows past the
buffer; rows of the next head receive +0).

Packed sequences (VARLEN): the tensors are (total, H, D), seen as matrices (total, H*D) whose rows hold the
heads of one token side by side; sequence b's head h starts at row cu[b] and column h*D, and its lengths
replace Nq, Nk above.  A tile that runs past the sequence reads the next sequence's rows: as past Nq, their
-m is -1e30 (the preprocessing pads each sequence's pairs) and keys past Nk are masked, so they add exact
zeros, also to the next sequence's dQacc rows.  Key tiles past a sequence's keys visit no query tile and
store nothing; the grid spans the longest sequence.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)
from triton._C.libtriton import ir


@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Bulk-add the shared tile ``src`` into global memory at ``coord`` of ``tensor_desc`` (asynchronous, a
    TMA 'store' group: ``tma.store_wait`` waits for it to have read ``src``)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _opaque_zero(x):
    """0, from an asm statement the compiler cannot see through or hoist."""
    return gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _expect_tile(ready_q, ready_do, ready_l, stage, QBYTES: gl.constexpr, LBYTES: gl.constexpr, pred):
    """Arm the three barriers of ring stage ``stage`` (arrive + expect-tx; each phase completes when its
    copy's bytes have landed).  One barrier per copy: Triton's shared-memory barrier analysis puts a CTA
    barrier between two operations on the same mbarrier, so copies sharing one would each cost a bar.sync."""
    mbarrier.expect(ready_q.index(stage), QBYTES, pred=pred)
    mbarrier.expect(ready_do.index(stage), QBYTES, pred=pred)
    mbarrier.expect(ready_l.index(stage), LBYTES, pred=pred)


@gluon.jit
def _copy_tile(q_desc, do_desc, ld_desc, q_ring, do_ring, ld_ring, ready_q, ready_do, ready_l, stage,
               row, col, l_row, pred):
    """Q, dO rows [row, row + BLOCK_M) at column col, and the (-m, -delta) pair of the tile (2 * BLOCK_M floats
    at l_row)."""
    tma.async_copy_global_to_shared(q_desc, [row, col], ready_q.index(stage), q_ring.index(stage), pred=pred)
    tma.async_copy_global_to_shared(do_desc, [row, col], ready_do.index(stage), do_ring.index(stage), pred=pred)
    tma.async_copy_global_to_shared(ld_desc, [l_row], ready_l.index(stage), ld_ring.index(stage), pred=pred)


@gluon.jit
def _query_tiles(lo, hi, dk, dv, start_n, q_row0, q_col, l_row0, q_lo, n_q, n_k, left, right, n_total, qk_scale, scale,
                 q_desc, do_desc, dq_desc, ld_desc, kv_bufs, q_ring, do_ring, ld_ring,
                 p_bufs, ds_bufs, dq_s, ready_q, ready_do, ready_l,
                 MASKED: gl.constexpr, LEFT: gl.constexpr, RIGHT: gl.constexpr,
                 HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Tiles t in [lo, hi) of this program's query tiles (query rows q_lo + t * BLOCK_M ...)."""
    dtype: gl.constexpr = q_desc.dtype
    # Register layouts: 8 warps as [8, 1] for the 128-row (key) products, each warpgroup owning 64 keys;
    # [4, 2] for the 64-row dQ product, each warpgroup owning half of D.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_M, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps // 2, 2],
                                                        instr_shape=[16, HEAD_DIM // 2, 16])
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)     # along queries
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)     # along keys
    QBYTES: gl.constexpr = BLOCK_M * HEAD_DIM * (dtype.primitive_bitwidth // 8)
    LBYTES: gl.constexpr = 2 * BLOCK_M * 4
    zero_s = gl.full([BLOCK_N, BLOCK_M], 0.0, gl.float32, s_layout)
    zero_dq = gl.full([BLOCK_M, HEAD_DIM], 0.0, gl.float32, dq_layout)
    diag = n_k - n_q
    gl.thread_barrier()     # orders the prologue's TMA issues before the loop (else one bar.sync per tile)
    for t in range(lo, hi):
        stage = t % NUM_STAGES
        phase = (t // NUM_STAGES) & 1
        start_m = q_lo + t * BLOCK_M
        q_s = q_ring.index(stage)
        do_s = do_ring.index(stage)
        ld_s = ld_ring.index(stage)
        # The fixed tiles are indexed by an opaque zero so that their wgmma descriptors are rebuilt
        # in each iteration (a few uniform adds) instead of being hoisted out of the loop, where
        # they hold ~40 registers and spill.
        z = _opaque_zero(t)
        k_s = kv_bufs.index(z)
        v_s = kv_bufs.index(z + 1)
        p_s = p_bufs.index(z)
        ds_s = ds_bufs.index(z)

        # S^T - m = K Q^T - m and dP^T - delta = V dO^T - delta, both asynchronous, with m = lse2 / qk_scale
        # and delta folded into the accumulators' start values (the preprocessing stores -m and -delta, padded per
        # head with -1e30 and 0 past Nq, and TMA brought them with Q and dO): P^T = 2^((S^T - m) qk_scale),
        # and neither m nor delta stays in registers.
        mbarrier.wait(ready_l.index(stage), phase)
        mbarrier.wait(ready_q.index(stage), phase)
        neg_m = ld_s.slice(0, BLOCK_M).load(col_layout)
        s = warpgroup_mma(k_s, q_s.permute((1, 0)), gl.broadcast(neg_m[None, :], zero_s)[0], is_async=True)
        mbarrier.wait(ready_do.index(stage), phase)
        neg_delta = ld_s.slice(BLOCK_M, BLOCK_M).load(col_layout)
        dp = warpgroup_mma(v_s, do_s.permute((1, 0)), gl.broadcast(neg_delta[None, :], zero_s)[0],
                           is_async=True)
        # Leaves dP^T in flight; completes S^T and everything older (dK of the previous tile).
        s = warpgroup_mma_wait(1, deps=[s])

        # P^T = 2^((S^T - m) qk_scale): 0 for rows past Nq (m = 1e30) and for masked entries.
        if MASKED:
            keys = start_n + gl.arange(0, BLOCK_N, layout=row_layout)
            ok = keys[:, None] < n_k
            offs_q = start_m + gl.arange(0, BLOCK_M, layout=col_layout)
            if RIGHT:
                ok = ok & (keys[:, None] <= offs_q[None, :] + diag + right)
            if LEFT:
                ok = ok & (keys[:, None] >= offs_q[None, :] + diag - left)
            s = gl.where(ok, s, float("-inf"))
        p = gl.exp2(s * qk_scale)
        # The previous tile's dQ reduce must have read the staging tile before anyone rewrites it
        # (only the issuing thread has bulk groups; barrier (A) publishes its wait).
        tma.store_wait(0)
        # P^T to shared memory; each warpgroup's dV product reads its own 64 rows.
        p_s.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()                                          # (A)
        dv = warpgroup_mma(p_s, do_s, dv, is_async=True)         # dV += P^T dO
        dp = warpgroup_mma_wait(1, deps=[dp])                       # dP^T done, dV in flight

        ds = p * dp                                                 # dS^T = P^T (dP^T - delta)
        # Prefetch tile t + NUM_STAGES - 1 into the stage tile t - 1 used: arm its barriers now (every
        # thread passed its waits on that stage's previous phase before (A)), copy after (B), when every
        # warpgroup has passed the wait that completed dK(t-1), the last reader of that Q.
        nxt = t + NUM_STAGES - 1
        have = nxt < n_total
        ns = nxt % NUM_STAGES
        _expect_tile(ready_q, ready_do, ready_l, ns, QBYTES, LBYTES, have)
        ds_s.store(ds.to(dtype))
        fence_async_shared()
        gl.thread_barrier()                                          # (B)
        _copy_tile(q_desc, do_desc, ld_desc, q_ring, do_ring, ld_ring, ready_q, ready_do, ready_l, ns,
                   q_row0 + q_lo + nxt * BLOCK_M, q_col, l_row0 + (q_lo + nxt * BLOCK_M) * 2, have)

        # dQ_i = dS K_j: A = dS (64 x 128) as the transposed view of the dS^T tile in shared memory.
        dq = warpgroup_mma(ds_s.permute((1, 0)), k_s, zero_dq, use_acc=False, is_async=True)
        dk = warpgroup_mma(ds_s, q_s, dk, is_async=True)         # dK += dS^T Q
        # dV and dQ done; dK keeps running into the next tile (until its first wait).
        dq, dv = warpgroup_mma_wait(1, deps=[dq, dv])

        dq_s.store(dq * scale)                                      # dQ = scale dS K
        fence_async_shared()
        gl.thread_barrier()                                          # (D)
        _tma_reduce_add(dq_desc, [q_row0 + start_m, q_col], dq_s)
    return dk, dv


@gluon.jit
def hopper_backward_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, ld_desc, DK, DV, CU_Q, CU_K,
                           n_q, n_k, n_heads, pair_tiles, left, right, qk_scale, scale,
                           GROUP: gl.constexpr, VARLEN: gl.constexpr, LEFT: gl.constexpr, RIGHT: gl.constexpr,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """Grid (cdiv(Nk, BLOCK_N), B * Hq).  Dense (head-major): q/do/dq descriptors are (B*Hq*Nq, D) rows, blocks
    [BLOCK_M, D]; k/v (B*Hkv*Nk, D) rows, blocks [BLOCK_N, D]; a head starts at row (b H + h) N, column 0.
    VARLEN (packed sequences, token-major): q/do/dq are (total_q, Hq*D), k/v (total_k, Hkv*D), the heads of
    a token side by side; sequence b's head h starts at row cu[b], column h D, and n_q, n_k (the longest
    sequences) give way to its own lengths.  ld: float32 (B*Hq*pair_tiles*2*BLOCK_M,), per query tile
    BLOCK_M values -m = -lse2 / qk_scale then BLOCK_M values -delta (-1e30 and 0 past the sequence), blocks
    [2 * BLOCK_M].  DK, DV: (B, Hq, Nk, D), or (total_k, Hq, D) packed, in the input dtype when GROUP == 1,
    else float32 partials that the host sums over each group."""
    gl.static_assert(num_warps == 8, "two warpgroups of 64 keys each")
    gl.static_assert(BLOCK_N == 16 * num_warps)
    dtype: gl.constexpr = q_desc.dtype
    pid_n = gl.program_id(0)
    bh = gl.program_id(1)
    start_n = pid_n * BLOCK_N
    l_row0 = bh * pair_tiles * (2 * BLOCK_M)
    if VARLEN:      # sequence b = bh // n_heads, query head h = bh % n_heads
        seq = bh // n_heads
        head = bh % n_heads
        q_row0 = gl.load(CU_Q + seq)
        k_row0 = gl.load(CU_K + seq)
        n_q = gl.load(CU_Q + seq + 1) - q_row0
        n_k = gl.load(CU_K + seq + 1) - k_row0
        q_col = head * HEAD_DIM
        kv_row = k_row0 + start_n
        kv_col = (head // GROUP) * HEAD_DIM
        dk_base = (k_row0.to(gl.int64) + start_n) * (n_heads * HEAD_DIM) + head * HEAD_DIM
        dk_stride = n_heads * HEAD_DIM
    else:
        q_row0 = bh * n_q
        q_col = 0
        kv_row = (bh // GROUP) * n_k + start_n
        kv_col = 0
        dk_base = (bh.to(gl.int64) * n_k + start_n) * HEAD_DIM
        dk_stride = HEAD_DIM
    q_tiles = gl.cdiv(n_q, BLOCK_M)

    # Query tiles that see this key tile, [first, last), in tile units: masked [first, full_first), full
    # [full_first, full_end), masked [full_end, last). Query i sees key j iff j - diag - right <= i <= j - diag + left.
    diag = n_k - n_q
    ragged = start_n + BLOCK_N > n_k
    first = 0
    full_first = 0
    last = q_tiles
    full_end = q_tiles
    if RIGHT:       # rows before start_n - diag - right see none of the tile; from its last key's on, all of it
        first = gl.maximum(start_n - diag - right, 0) // BLOCK_M
        full_first = gl.cdiv(gl.maximum(start_n + BLOCK_N - 1 - diag - right, 0), BLOCK_M)
    if LEFT:        # rows past the last key + left see none of it; rows up to start_n - diag + left, all of it
        last_key = gl.minimum(start_n + BLOCK_N, n_k) - 1
        last = gl.cdiv(gl.maximum(gl.minimum(last_key - diag + left + 1, n_q), 0), BLOCK_M)
        blind = start_n - diag + left + 1
        full_end = gl.where(blind >= n_q, q_tiles, gl.maximum(blind, 0) // BLOCK_M)
    if VARLEN:      # a key tile past this sequence's keys (the grid spans the longest): no query tile
        last = gl.where(start_n < n_k, last, first)
    last = gl.maximum(last, first)
    full_first = gl.minimum(gl.maximum(full_first, first), last)
    full_end = gl.minimum(gl.maximum(full_end, full_first), last)
    full_first = gl.where(ragged, last, full_first)
    full_end = gl.where(ragged, last, full_end)
    q_lo = first * BLOCK_M
    n_total = last - first
    n_masked = full_first - first
    n_full = full_end - first

    # Shared memory: K, V (whole tile), Q/dO/(-m,-delta) ring, P^T and dS^T tiles, dQ staging, barriers.
    kv_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_DIM], k_desc.layout)     # K, V
    q_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ld_ring = gl.allocate_shared_memory(gl.float32, [NUM_STAGES, 2 * BLOCK_M], ld_desc.layout)
    pt_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    p_bufs = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M], pt_layout)            # P^T
    ds_bufs = gl.allocate_shared_memory(dtype, [1, BLOCK_N, BLOCK_M], pt_layout)           # dS^T
    dq_s = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM], dq_desc.layout)
    ready_q = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ready_do = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ready_l = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready_q.index(i), count=1)
        mbarrier.init(ready_do.index(i), count=1)
        mbarrier.init(ready_l.index(i), count=1)
    mbarrier.init(kv_bar, count=1)
    fence_async_shared()

    mbarrier.expect(kv_bar, 2 * BLOCK_N * HEAD_DIM * (dtype.primitive_bitwidth // 8))
    tma.async_copy_global_to_shared(k_desc, [kv_row, kv_col], kv_bar, kv_bufs.index(0))
    tma.async_copy_global_to_shared(v_desc, [kv_row, kv_col], kv_bar, kv_bufs.index(1))
    QBYTES: gl.constexpr = BLOCK_M * HEAD_DIM * (dtype.primitive_bitwidth // 8)
    LBYTES: gl.constexpr = 2 * BLOCK_M * 4
    for i in gl.static_range(NUM_STAGES - 1):          # prologue: tiles 0 .. NUM_STAGES-2
        _expect_tile(ready_q, ready_do, ready_l, i, QBYTES, LBYTES, i < n_total)
        _copy_tile(q_desc, do_desc, ld_desc, q_ring, do_ring, ld_ring, ready_q, ready_do, ready_l, i,
                   q_row0 + q_lo + i * BLOCK_M, q_col, l_row0 + (q_lo + i * BLOCK_M) * 2, i < n_total)

    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    dk = gl.full([BLOCK_N, HEAD_DIM], 0.0, gl.float32, kv_layout)
    dv = gl.full([BLOCK_N, HEAD_DIM], 0.0, gl.float32, kv_layout)
    dk = warpgroup_mma_init(dk)          # dK stays in flight across iterations; dV is waited inside one
    mbarrier.wait(kv_bar, 0)

    dk, dv = _query_tiles(0, n_masked, dk, dv, start_n, q_row0, q_col, l_row0, q_lo, n_q, n_k, left, right, n_total,
                          qk_scale, scale, q_desc, do_desc, dq_desc, ld_desc, kv_bufs, q_ring, do_ring, ld_ring,
                          p_bufs, ds_bufs, dq_s, ready_q, ready_do, ready_l,
                          True, LEFT, RIGHT, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, num_warps)
    dk, dv = _query_tiles(n_masked, n_full, dk, dv, start_n, q_row0, q_col, l_row0, q_lo, n_q, n_k, left, right, n_total,
                          qk_scale, scale, q_desc, do_desc, dq_desc, ld_desc, kv_bufs, q_ring, do_ring, ld_ring,
                          p_bufs, ds_bufs, dq_s, ready_q, ready_do, ready_l,
                          False, LEFT, RIGHT, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, num_warps)
    if LEFT:        # without a left edge full_end = last: no masked run after the full one
        dk, dv = _query_tiles(n_full, n_total, dk, dv, start_n, q_row0, q_col, l_row0, q_lo, n_q, n_k, left, right,
                              n_total, qk_scale, scale, q_desc, do_desc, dq_desc, ld_desc, kv_bufs, q_ring, do_ring, ld_ring,
                              p_bufs, ds_bufs, dq_s, ready_q, ready_do, ready_l,
                              True, LEFT, RIGHT, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, num_warps)
    dk, dv = warpgroup_mma_wait(0, deps=[dk, dv])
    tma.store_wait(0)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(ready_q.index(i))
        mbarrier.invalidate(ready_do.index(i))
        mbarrier.invalidate(ready_l.index(i))
    mbarrier.invalidate(kv_bar)

    # dK = scale * dK, dV: pointer stores of the rows below Nk (zeros for keys that no query sees).
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, kv_layout))
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, kv_layout))
    offs = dk_base + rows[:, None] * dk_stride + cols[None, :]
    ok = (start_n + rows[:, None] < n_k) & (cols[None, :] < HEAD_DIM)
    gl.store(DK + offs, (dk * scale).to(DK.dtype.element_ty), mask=ok)
    gl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=ok)
