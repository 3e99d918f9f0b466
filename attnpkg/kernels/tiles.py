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
