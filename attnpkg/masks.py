"""The mask schedule: which tiles of the score matrix a mask makes full, partial or empty.

Every mask of :func:`attnpkg.flash_attention` is one band (FlexAttention's full / partial / empty
tile classes, for one family of masks). Queries are aligned bottom-right: query ``i`` sits at key
position ``p_i = i + Nk - Nq``, and with ``window_size = (left, right)`` it sees key ``j`` iff

    p_i - left <= j <= p_i + right,    0 <= j < Nk,

where an unbounded side (``-1``) is passed to the kernels as a number too large to matter.
``causal`` is the window ``(-1, 0)``; no mask is ``(-1, -1)``. A packed batch (varlen) is one
such band per sequence, whose tiles start at the sequence's first token: tiles of another
sequence are never visited.

The same ``@triton.jit`` functions serve the forward kernel, both backward kernels and the
book's figures (through :func:`tile_schedule`, which evaluates them for every tile):

- ``key_tiles`` (a Triton function): for a query tile, the key tiles it visits, ``[start, stop)``, and among
  them ``[full_start, full_end)``, the tiles every row sees in full (no mask arithmetic). The
  kernels run three loops: masked ``[start, full_start)``, full ``[full_start, full_end)``, masked
  ``[full_end, stop)``.
- ``query_tiles``: the mirror, for a key tile (the dK/dV kernel).
- ``visible``: the element mask used in every masked loop.
"""
import torch
import triton
import triton.language as tl

__all__ = ["tile_schedule", "tile_classes", "window_bounds", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@triton.jit
def visible(qi, kj, n_k, diag, left, right, LEFT_UNBOUNDED: tl.constexpr = False,
            RIGHT_UNBOUNDED: tl.constexpr = False):
    """Whether query ``qi`` sees key ``kj`` (broadcastable integer arrays): the band around
    ``p = qi + diag`` (``diag = Nk - Nq``), and keys inside ``[0, Nk)`` only. A side that is
    unbounded (a constexpr) is not tested: no mask leaves ``kj < n_k`` alone."""
    ok = kj < n_k
    if not LEFT_UNBOUNDED:
        ok = ok & (kj >= qi + diag - left)
    if not RIGHT_UNBOUNDED:
        ok = ok & (kj <= qi + diag + right)
    return ok


@triton.jit
def key_tiles(start_m, n_q, n_k, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              LEFT_UNBOUNDED: tl.constexpr = False):
    """Key tiles visited by the query tile ``[start_m, start_m + BLOCK_M)``: ``(start, full_start, full_end, stop)``.

    Tiles ``[start, stop)`` hold every key some row of the tile sees; tiles ``[full_start, full_end)``
    (multiples of BLOCK_N) are seen in full by every row below ``n_q``. Without a full tile,
    ``full_start = full_end = stop`` (everything is masked). ``stop <= start`` means no key at all.
    The forward and dQ kernels use the key index of a full tile only for addresses, so their full loop
    does not need ``full_start`` to be a provable multiple of BLOCK_N (``query_tiles`` does).

    ``LEFT_UNBOUNDED`` (a constexpr: ``left >= Nq + Nk``, no mask or causal): ``start = full_start = 0``,
    so ``[start, full_start)`` is empty and a kernel need not emit its loop; without a full tile,
    ``full_end = 0`` and ``[full_end, stop)`` holds every tile. The same tiles, classified the same way."""
    diag = n_k - n_q
    last = tl.minimum(start_m + BLOCK_M, n_q) - 1            # the last real row of the tile
    stop = tl.minimum(last + diag + right + 1, n_k)
    if LEFT_UNBOUNDED:
        # Loop bounds that are multiples of the tile (0, or a multiple of BLOCK_N): the compiler keeps
        # the full loop's row arithmetic as cheap as with constant bounds.
        full_end = tl.maximum(tl.minimum(start_m + diag + right + 1, n_k), 0) // BLOCK_N * BLOCK_N
        return 0, 0, full_end, stop
    start = tl.maximum(start_m + diag - left, 0) // BLOCK_N * BLOCK_N
    # Full: the first key is at or after the band's left edge of the last row, the last key at or
    # before the band's right edge of the first row, and the tile lies inside [0, Nk).
    full_start = tl.cdiv(tl.maximum(last + diag - left, 0), BLOCK_N) * BLOCK_N
    full_end = tl.maximum(tl.minimum(start_m + diag + right + 1, n_k), 0) // BLOCK_N * BLOCK_N
    none = full_end <= full_start
    full_start = tl.where(none, stop, full_start)
    full_end = tl.where(none, stop, full_end)
    return start, full_start, full_end, stop


@triton.jit
def query_tiles(start_n, n_q, n_k, left, right, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                LEFT_UNBOUNDED: tl.constexpr = False):
    """The mirror of ``key_tiles`` (a Triton function): query tiles that see the key tile ``[start_n, start_n + BLOCK_N)``.

    Query ``i`` sees key ``j`` iff ``j - diag - right <= i <= j - diag + left``. Tiles
    ``[full_start, full_end)`` see every key of the tile (rows past ``n_q`` contribute nothing: the
    backward gives them P = 0); a key tile that runs past ``n_k`` is never full.

    Without a full tile, ``full_start = full_end = start`` (everything is masked, in the last loop).
    ``start``, ``full_start`` and ``full_end`` are multiples of BLOCK_M that the compiler can prove
    (products by BLOCK_M, or ``cdiv(n_q, BLOCK_M) * BLOCK_M`` where the run reaches the last query tile,
    which ends a loop of step BLOCK_M where ``n_q`` does; never ``tl.where`` with ``stop`` or ``n_q``).
    The loop counter is then a known multiple of the tile, and with a length ``n_q`` that is a multiple of
    16 the rows' test ``rows < n_q`` is computed once per 16 rows instead of once per row.

    ``LEFT_UNBOUNDED`` (a constexpr: ``left >= Nq + Nk``): ``full_end = stop = n_q``, so ``[full_end, stop)``
    is empty and a kernel need not emit its loop. The same tiles, classified the same way."""
    diag = n_k - n_q
    last = tl.minimum(start_n + BLOCK_N, n_k) - 1
    start = tl.maximum(start_n - diag - right, 0) // BLOCK_M * BLOCK_M
    q_end = tl.cdiv(n_q, BLOCK_M) * BLOCK_M                  # the end of the last query tile
    full_start = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag - right, 0), BLOCK_M) * BLOCK_M, q_end)
    if LEFT_UNBOUNDED:
        # Every row from the first full one on sees the whole tile.
        full_start = tl.where(start_n + BLOCK_N > n_k, q_end, full_start)
        return start, full_start, n_q, n_q
    stop = tl.minimum(last - diag + left + 1, n_q)
    first_blind = start_n - diag + left + 1                  # rows from here on miss key start_n
    full_end = tl.minimum(tl.maximum(first_blind, 0) // BLOCK_M * BLOCK_M, q_end)
    # Every row from full_start to the last sees key start_n: full_end runs to the last query tile.
    full_end = tl.where(first_blind >= n_q, q_end, full_end)
    none = (full_end <= full_start) | (start_n + BLOCK_N > n_k)
    full_start = tl.where(none, start, full_start)
    full_end = tl.where(none, start, full_end)
    return start, full_start, full_end, stop


@triton.jit
def _tile_schedule_kernel(OUT, n_q, n_k, left, right, BY_KEY: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LEFT_UNBOUNDED: tl.constexpr):
    tile = tl.program_id(0)
    if BY_KEY:
        start, full_start, full_end, stop = query_tiles(tile * BLOCK_N, n_q, n_k, left, right, BLOCK_N, BLOCK_M,
                                                        LEFT_UNBOUNDED)
    else:
        start, full_start, full_end, stop = key_tiles(tile * BLOCK_M, n_q, n_k, left, right, BLOCK_M, BLOCK_N,
                                                      LEFT_UNBOUNDED)
    tl.store(OUT + tile * 4 + 0, start)
    tl.store(OUT + tile * 4 + 1, full_start)
    tl.store(OUT + tile * 4 + 2, full_end)
    tl.store(OUT + tile * 4 + 3, stop)


def window_bounds(window_size=(-1, -1), causal=False, n_q=0, n_k=0):
    """``(left, right)`` as the kernels take them: ``causal`` sets ``right = 0`` (as flash-attn
    does), and an unbounded side (``-1``) or one longer than both sequences becomes ``n_q + n_k``,
    which no key can exceed."""
    big = n_q + n_k
    left, right = window_size
    if causal:
        right = 0
    return (big if left < 0 else min(left, big)), (big if right < 0 else min(right, big))


def tile_schedule(n_q, n_k, block_m, block_n, *, window_size=(-1, -1), causal=False, by="query", device=None,
                  _left_unbounded=False):
    """Evaluate the kernels' own schedule functions for every tile.

    ``by="query"``: one row per query tile, ``(start, full_start, full_end, stop)`` in key positions
    (``key_tiles`` (a Triton function), what the forward and dQ kernels run); ``by="key"``: one row per key tile
    in query positions (``query_tiles``, the dK/dV kernel). Returns an int32 tensor ``(tiles, 4)``
    (on ``device``: the CPU runs Triton's interpreter)."""
    if by not in ("query", "key"):
        raise ValueError(f"tile_schedule: by must be 'query' or 'key', got {by!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    left, right = window_bounds(window_size, causal, n_q, n_k)
    n_tiles = -(-(n_k if by == "key" else n_q) // (block_n if by == "key" else block_m))
    out = torch.empty((n_tiles, 4), dtype=torch.int32, device=device)
    if n_tiles:
        # _left_unbounded: the variant the backward kernels compile for a band with no left edge.
        _tile_schedule_kernel[(n_tiles,)](out, n_q, n_k, left, right, BY_KEY=by == "key",
                                          LEFT_UNBOUNDED=_left_unbounded and left >= n_q + n_k,
                                          BLOCK_M=block_m, BLOCK_N=block_n)
    return out


def tile_classes(n_q, n_k, block_m, block_n, *, window_size=(-1, -1), causal=False, by="query", device=None,
                 _left_unbounded=False):
    """``(query tiles, key tiles)`` int tensor of EMPTY (0, never loaded), PARTIAL (1, element mask)
    and FULL (2, no mask), read off :func:`tile_schedule`."""
    s = tile_schedule(n_q, n_k, block_m, block_n, window_size=window_size, causal=causal, by=by,
                      _left_unbounded=_left_unbounded,
                      device=device).cpu().long()
    own, other = (block_n, block_m) if by == "key" else (block_m, block_n)
    n_other = -(-(n_q if by == "key" else n_k) // other)
    first = torch.arange(n_other)[None, :] * other                 # first position of each tile visited
    start, full_start, full_end, stop = (s[:, i:i + 1] for i in range(4))
    visited = (first >= start) & (first < stop)
    full = (first >= full_start) & (first < full_end)
    classes = torch.where(full, FULL, torch.where(visited, PARTIAL, EMPTY))
    return classes.T.contiguous() if by == "key" else classes
