"""Small helpers shared by the attention kernels."""
import triton
import triton.language as tl


@triton.jit
def load_tile(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows x BLOCK_D) tile, zero-filling rows past ``n_rows`` and columns past ``HEAD_DIM``.

    Masks are emitted only where they can be needed, so full tiles of a power-of-two head
    dimension load without predicates."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def tile_and_head(n, BLOCK: tl.constexpr, LONGEST_FIRST: tl.constexpr):
    """First row of this program's tile, and its flat (batch, head) index.

    The grid is one axis of ``cdiv(n, BLOCK) * B * H`` programs, tiles varying fastest: CUDA allows
    2^31 - 1 programs along axis 0 but only 65535 along the others, which ``B * H`` can exceed.
    With ``LONGEST_FIRST`` (causal) the tiles of a head run in reverse, the longest rows first, so
    the last wave of programs is the shortest."""
    n_tiles = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    tile = pid % n_tiles
    if LONGEST_FIRST:
        tile = n_tiles - 1 - tile
    return tile * BLOCK, pid // n_tiles


@triton.jit
def wide_arange(BLOCK: tl.constexpr, INT64: tl.constexpr):
    """``tl.arange(0, BLOCK)``, in 64 bits when ``INT64``. Row offsets are row index x row stride:
    32-bit arithmetic is faster, and right while every such product stays below 2^31."""
    offsets = tl.arange(0, BLOCK)
    if INT64:
        offsets = offsets.to(tl.int64)
    return offsets


@triton.jit
def round_to(x, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Convert float32 ``x`` to an output dtype, rounding to nearest even.

    The GPU does that by itself. Triton's interpreter truncates float32 -> bfloat16, so when
    ``MANUAL_BF16`` is set (interpreting, bf16 output) the rounding is done on the bits."""
    if dtype == tl.float32:
        return x
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)          # round half to even on the top 16 bits
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def sequence_bounds(off_b, n_q, n_k, CU_Q, CU_K, VARLEN: tl.constexpr):
    """``(q0, n_q, k0, n_k)``: first row and length of this program's queries and keys. Dense: 0 and the
    tensors' lengths. VARLEN (packed sequences): sequence ``off_b``'s slice of the prefix sums."""
    if VARLEN:
        q0 = tl.load(CU_Q + off_b)
        k0 = tl.load(CU_K + off_b)
        n_q = tl.load(CU_Q + off_b + 1) - q0
        n_k = tl.load(CU_K + off_b + 1) - k0
        # The first rows in 64 bits: a row times a row stride of a long packed tensor can pass 2^31.
        q0 = q0.to(tl.int64)
        k0 = k0.to(tl.int64)
    else:
        q0 = 0
        k0 = 0
    return q0, n_q, k0, n_k


@triton.jit
def tanh(x):
    """tanh from exp2, the one transcendental the kernels already use (also in the interpreter):
    tanh|x| = (1 - e) / (1 + e) with e = e^(-2|x|) in (0, 1], which cannot overflow."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)                  # 2 log2(e)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def score_transform(s, qi, kj, diag, cap2, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The score modifications, on base-2 logits ``s = scale * log2(e) * q.k``: the soft cap
    ``c tanh(s / c)`` (``cap2 = c log2 e``), then ALiBi's ``- slope |i + Nk - Nq - j|`` (``slope2 = slope log2 e``)."""
    if SOFTCAP:
        s = cap2 * tanh(s / cap2)
    if ALIBI:
        s = s - slope2 * tl.abs(qi + diag - kj).to(tl.float32)
    return s


@triton.jit
def descriptor_origin(off_b, off_h, first_row, stride_b, stride_h, stride_n):
    """``(row, column)`` of the first row of one (batch, head) slice in a tensor descriptor that views
    the tensor as a matrix of rows ``stride_n`` elements apart (see ``attention._descriptor``).

    Head-major ``(B, H, N, D)`` tensors put a head's rows after the previous head's: row ``(b H + h) N``,
    column 0. Token-major ones (SDPA's ``(B, N, H, D)`` transposed, and packed ``(total, H, D)``) put the
    heads of a token side by side in one row: row ``b N`` (or the sequence's ``first_row``), column
    ``h D``. Both split the element offset ``b stride_b + h stride_h`` into whole rows and a remainder:
    ``stride_b`` is a whole number of rows, and ``stride_h`` either one too (head-major) or less than a row
    (token-major), so the split is done per term, in 32 bits (the launcher checks that rows fit)."""
    b = off_b.to(tl.int32)
    h = off_h.to(tl.int32)
    row = b * (stride_b // stride_n) + h * (stride_h // stride_n) + first_row
    return row.to(tl.int32), h * (stride_h % stride_n)
