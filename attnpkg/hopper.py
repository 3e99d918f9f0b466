"""The Hopper kernels in Gluon, where they were tested: FlashAttention-3's five-product backward and its
warp-specialized forward.

``flash_attention``'s backward pass runs the portable two-kernel pass (``kernels/flash_backward.py``: seven matrix
products per tile pair, every sum owned by one program, the same bits on every run) everywhere, and, where the caller
allows a non-deterministic pass (``deterministic=False``, the default unless torch's deterministic algorithms are on),
this one: ``kernels/hopper_backward.py``, a Gluon kernel that computes each tile's S, P, dP and dS once and adds its
share of dQ into a float32 buffer by bulk reductions (five products). On an H200 it ran 1.2-1.3x the portable pass
at head dim 128 (``benchmarks/NOTES.md``).

It is chosen only where it was tested (:func:`supports`): a Hopper GPU (compute capability 9.0) with the Triton
version it was written against (Gluon's interface changes from one release to the next), head dim 128 (at 64 it was
not faster), float16 or bfloat16, dense batches and packed sequences (``flash_attention_varlen``), any band of
:mod:`attnpkg.masks` (no mask, causal, sliding windows) without a soft cap or ALiBi, at every size: launched like
the portable kernels (``attnpkg/launch.py``), it costs the host no more than they do. Everything else, and the book's
CPU runs, take the portable pass.

The forward pass has a Hopper kernel too, ``kernels/hopper_forward.py``: the same mathematics as the portable
forward, warp-specialized (a producer warp issues the copies, two consumer warpgroups overlap each tile's softmax
with the previous tile's P V product), 1.07-1.24x the portable forward on an H200 (``benchmarks/NOTES.md``).
:func:`supports_forward` admits it on the GPU and Triton it was tested with, at head dim 128 in float16 or bfloat16,
for dense batches and packed sequences whose rows are contiguous, with any band of :mod:`attnpkg.masks` and without
a soft cap or ALiBi. Everything else takes the portable forward, which is also the one the book runs on the CPU.
"""
import functools

import torch
import triton

from .kernels.flash_backward import flash_backward_preprocess
from .launch import launch

ENABLED = True                        # False: always the portable backward (benchmarks, tests)
FORWARD = True                        # False: always the portable forward
WINDOWS = True                        # sliding windows too (else no mask and causal only)
TESTED_TRITON = ("3.6.",)             # Triton versions the kernel was run and tested with
TESTED_CAPABILITY = (9, 0)
HEAD_DIMS = (128,)
BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES = 64, 128, 8, 2
# The forward: 128 query rows per program (two consumer warpgroups of 64), key tiles of 128, rings of two slots;
# registers per thread: 168 at launch (65536 / 384 threads), raised to 240 in the consumers, lowered to 24 in the
# producer warp.
FORWARD_TILES = dict(BLOCK_M=128, BLOCK_N=128, STAGES=2, CONSUMER_REGS=240, PRODUCER_REGS=24)
FORWARD_MAX_REGISTERS = 168
LOG2E = 1.4426950408889634


def supports(q, k, window, softcap, alibi, sequences, capability, triton_version=triton.__version__,
             longest=0) -> bool:
    """Whether the Hopper kernel serves this backward pass: the GPU, Triton, head dim, dtype and mask it was tested
    with. ``window`` is ``(left, right)`` as the kernels take them (an unbounded side is ``Nq + Nk`` or more);
    ``sequences``: None for a dense ``(B, H, N, D)`` batch, else the number of packed sequences (``q``, ``k``
    then being ``(1, H, total, D)`` views) and ``longest`` the longest query sequence; ``capability`` is the GPU's
    ``(major, minor)``.

    Packed sequences get one tile of start values per sequence, head and query tile of the longest sequence (the
    launch grid), 512 bytes each, as many bytes as one row of the float32 dQ buffer: the kernel is taken while those
    tiles are no more than the rows (memory O(total + B), at most twice the dQ buffer). Many short sequences beside
    a long one (1000 beside one of 32k in 64k rows: 8 times the dQ buffer) take the two-kernel pass."""
    n_q, n_k = q.shape[2], k.shape[2]
    big = n_q + n_k
    programs = q.shape[0] * q.shape[1] if sequences is None else sequences * q.shape[1]
    return (ENABLED and capability == TESTED_CAPABILITY and triton_version.startswith(TESTED_TRITON)
            and q.shape[-1] in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16)
            and not softcap and alibi is None and window_tested(window, big)
            and programs <= 65535                                         # the grid's second axis
            and (sequences is None or sequences * -(-longest // BLOCK_M) <= n_q)      # the start values' memory
            and q.shape[0] * q.shape[1] * (n_q + BLOCK_M) < 2**31         # the kernel's row coordinates are 32-bit
            and k.shape[0] * k.shape[1] * (n_k + BLOCK_N) < 2**31)


def supports_forward(q, k, v, softcap, alibi, packed, capability, triton_version=triton.__version__) -> bool:
    """Whether the Hopper forward kernel serves this call: the GPU, Triton, head dim and dtype it was tested with,
    no soft cap or ALiBi, and rows its descriptors can read on 16-byte boundaries: contiguous ``(B, H, N, D)``
    tensors, or (``packed``) ``(1, H, total, D)`` views of contiguous ``(total, H, D)`` ones. Any band."""
    rows = [x[0].transpose(0, 1) if packed else x for x in (q, k, v)]
    return (FORWARD and capability == TESTED_CAPABILITY and triton_version.startswith(TESTED_TRITON)
            and q.shape[-1] in HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16)
            and not softcap and alibi is None
            and all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in rows))


def forward(q, k, v, o, lse, window, scale: float, longest_first: bool, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """Fill ``o`` and ``lse`` by the Hopper forward kernel; the inputs must pass :func:`supports_forward`.
    ``window``: ``(left, right)`` as the kernels take them. Dense: contiguous ``(B, Hq, N, D)`` tensors and lse
    ``(B, Hq, Nq)``. Packed sequences (``cu_q`` given): ``(1, H, total, D)`` views of ``(total, H, D)`` tensors,
    lse ``(1, Hq, total_q)``; ``max_q``, ``max_k`` at least the longest sequences."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .kernels.hopper_forward import hopper_forward_kernel

    _, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    packed = cu_q is not None
    left, right = window
    t = FORWARD_TILES

    def planes(x, rows):
        """Dense (B, H, N, D) as (B H, N, D); packed (total, H, D) as (H, total, D). The engine reads zeros past a
        plane's last row."""
        b, h, n, _ = x.shape
        shape, strides = ([h, n, d], [d, h * d, 1]) if packed else ([b * h, n, d], [n * d, d, 1])
        return TensorDescriptor(x, shape, strides, [1, rows, d], _layout3(rows, d, x.dtype))
    # The grid spans the longest sequence (packed) for each sequence; an open side of the band is grid_q + grid_k.
    batch, grid_q, grid_k = (cu_q.shape[0] - 1, max_q, max_k) if packed else (q.shape[0], n_q, n_k)
    launch(hopper_forward_kernel)[(-(-grid_q // t["BLOCK_M"]) * batch * heads,)](
        planes(q, t["BLOCK_M"] // 2), planes(k, t["BLOCK_N"]), planes(v, t["BLOCK_N"]), planes(o, t["BLOCK_M"] // 2),
        o, lse, cu_q if packed else lse, cu_k if packed else lse, grid_q, grid_k, heads, left, right, scale * LOG2E,
        n_q, GROUP=heads // kv_heads, VARLEN=packed, LONGEST_FIRST=longest_first, LEFT=left < grid_q + grid_k,
        RIGHT=right < grid_q + grid_k, HEAD_D=d, **t, num_warps=4, maxnreg=FORWARD_MAX_REGISTERS)
    return o, lse


@functools.lru_cache(maxsize=None)
def _layout3(rows, d, dtype):
    """The shared-memory layout of a ``[1, rows, d]`` box of ``dtype`` (the forward's descriptors), built once."""
    from triton.experimental.gluon import language as gl

    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return gl.NVMMASharedLayout.get_default_for([1, rows, d], element)


def window_tested(window, big) -> bool:
    """The bands the kernel was tested with: any (``WINDOWS``), or only no mask and causal."""
    left, right = window
    return WINDOWS or (left >= big and (right >= big or right == 0))


def _aligned(x):
    """``x`` itself if its rows are a matrix the descriptors can read (contiguous, on a 16-byte boundary), else a
    contiguous copy (a slice off a 16-byte boundary, SDPA's (B, N, H, D) layout passed transposed, the q of a
    fused (total, 3, H, D) projection)."""
    return x if x.is_contiguous() and x.data_ptr() % 16 == 0 else torch.empty(x.shape, dtype=x.dtype,
                                                                                device=x.device).copy_(x)


@functools.lru_cache(maxsize=None)
def _layout(block, d, dtype):
    """The shared-memory layout of a descriptor's block: swizzled ``[block, d]`` tiles of ``dtype``, or (``d`` = 0)
    a flat run of ``block`` float32 start values. Built once per kind: Gluon's default took 13.5 us a call on a CPU."""
    from triton.experimental.gluon import language as gl

    if d == 0:
        return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([block, d], element)


def backward(do, q, k, v, o, lse, dlse, window, scale: float, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """``(dq, dk, dv)`` by the Hopper kernel; the inputs must pass :func:`supports`. ``window``: ``(left, right)`` as
    the kernels take them. Dense: ``(B, H, N, D)`` tensors. Packed sequences (``cu_q`` given): ``(1, H, total,
    D)`` views of ``(total, H, D)`` tensors, the gradients returned the same way. dQ's float32 sums arrive in any
    order, so its last bits can change from run to run (dK and dV are deterministic)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .kernels.hopper_backward import hopper_backward_kernel

    batch, heads, n_q, d = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    packed = cu_q is not None
    left, right = window                          # as masks.window_bounds gives them: Nq + Nk for an open side
    # The rows the descriptors read, contiguous: dense (B, H, N, D) seen as (B H N, D), a head's rows after the
    # previous head's; packed (total, H, D) seen as (total, H D), the heads of a token side by side.
    if packed:
        q, k, v, o, do = (_aligned(x[0].transpose(0, 1)) for x in (q, k, v, o, do))
        batch, grid_q, grid_k = cu_q.shape[0] - 1, max_q, max_k
        o_strides, do_strides = (0, o.stride(1), o.stride(0), 1), (0, do.stride(1), do.stride(0), 1)
    else:
        q, k, v, o, do = (_aligned(x) for x in (q, k, v, o, do))
        grid_q, grid_k = n_q, n_k
        o_strides, do_strides = o.stride(), do.stride()
    pair_tiles = -(-grid_q // BLOCK_M)
    # Per query tile, -lse / scale and -D (preprocessing with PAIRS): they start the S^T and dP^T accumulators.
    pairs = torch.empty(batch * heads * pair_tiles * 2 * BLOCK_M, dtype=torch.float32, device=q.device)
    launch(flash_backward_preprocess)[(pair_tiles * batch * heads,)](
        o, do, lse, dlse.contiguous() if dlse is not None else lse, pairs, pairs, cu_q if packed else lse,
        *o_strides, *do_strides, heads, grid_q, n_q, 1.0 / scale, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=BLOCK_M,
        HAS_DLSE=dlse is not None, PAIRS=True, VARLEN=packed, INT64=(n_q + 256) * o_strides[2] >= 2**31)
    # dQ's float32 sums, and dK, dV: per query head in float32 under grouped-query attention (summed below).
    partial = torch.float32 if group > 1 else q.dtype
    if packed:
        dq_acc = torch.zeros((n_q, heads, d), dtype=torch.float32, device=q.device)
        dk, dv = (torch.empty((n_k, heads, d), dtype=partial, device=q.device) for _ in range(2))
    else:
        dq_acc = torch.zeros((batch, heads, n_q, d), dtype=torch.float32, device=q.device)
        dk, dv = (torch.empty((batch, heads, n_k, d), dtype=partial, device=q.device) for _ in range(2))

    def rows(x, block):
        matrix = x.view(x.shape[0], -1) if packed else x.view(-1, d)
        return TensorDescriptor(matrix, list(matrix.shape), list(matrix.stride()), [block, d],
                                _layout(block, d, x.dtype))
    pair_desc = TensorDescriptor(pairs, [pairs.numel()], [1], [2 * BLOCK_M], _layout(2 * BLOCK_M, 0, pairs.dtype))
    launch(hopper_backward_kernel)[(-(-grid_k // BLOCK_N), batch * heads)](
        rows(q, BLOCK_M), rows(k, BLOCK_N), rows(v, BLOCK_N), rows(do, BLOCK_M), rows(dq_acc, BLOCK_M),
        pair_desc, dk, dv, cu_q if packed else pairs, cu_k if packed else pairs, grid_q, grid_k, heads, pair_tiles,
        left, right, scale * LOG2E, scale,
        GROUP=group, VARLEN=packed, LEFT=left < n_q + n_k, RIGHT=right < n_q + n_k, HEAD_DIM=d,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_STAGES=NUM_STAGES, num_warps=NUM_WARPS)
    dq = dq_acc.to(q.dtype)                                           # the kernel added scale * dS K
    if group > 1:                                                     # a fixed order of summation
        shape = (n_k, kv_heads, group, d) if packed else (batch, kv_heads, group, n_k, d)
        dk, dv = (x.view(shape).sum(2).to(q.dtype) for x in (dk, dv))
    if packed:                                                        # back to (1, H, total, D) views
        dq, dk, dv = (x.transpose(0, 1)[None] for x in (dq, dk, dv))
    return dq, dk, dv
