"""``flash_attention``: the public entry point to the Triton FlashAttention kernels.

All validation happens here, at the boundary; the kernels assume valid input. Eager calls go
through a ``torch.autograd.Function`` straight to the kernels. Under ``torch.compile`` the same
kernels run as ``torch.library`` custom ops (with fake implementations for tracing, joined by
``register_autograd``), so ``torch.compile(fullgraph=True)`` can call ``flash_attention``.
"""
import contextlib
import functools
import math
import os
from typing import NamedTuple, Optional

import torch

try:                                    # host-side tensor descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from .kernels.flash_backward import (flash_backward_dkdv_kernel, flash_backward_dq_kernel,
                                     flash_backward_preprocess)
from .kernels.flash_forward import flash_forward_kernel
from . import hopper
from .launch import launch
from .masks import window_bounds

__all__ = ["flash_attention", "Mask"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The kernels take scale * log2(e) as a float32: it must be a normal float32 number, neither 0,
# subnormal (digits lost) nor infinite.
MIN_SCALE = torch.finfo(torch.float32).tiny
MAX_SCALE = torch.finfo(torch.float32).max / 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Tiles(NamedTuple):
    """Launch shape of one kernel: rows of the program's own tile, rows of the streamed tile, warps,
    pipeline stages, and (forward only) Triton's automatic warp specialization of the main loop."""
    own: int
    streamed: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    tma: bool = False        # Hopper's tensor-memory engine: the streamed K and V tiles (forward, dQ kernel)
                             # through tensor descriptors; the five-product backward's dQ adds as bulk reductions
    max_registers: int = 0   # a cap per thread (Triton's maxnreg; 0: the compiler's choice), to keep two
                             # programs per multiprocessor where a mask's variant of a kernel would cross it


# Tiles by kernel, padded head dim and causal flag, for Hopper GPUs: the fastest candidates of
# benchmarks/sweep_tiles.py on an H100 (see benchmarks/NOTES.md).
_T = Tiles
HOPPER_TILES = {
    # The D = 64 forward fits two programs of 8 warps per multiprocessor at 128 registers; a window or packed
    # sequences took it to 136 and 157 (one program), which the cap brings back with no spill.
    "forward": {(64, False): _T(128, 64, 8, 3, max_registers=128),
                (64, True): _T(128, 64, 8, 3, max_registers=128),
                (128, False): _T(128, 128, 8, 3, tma=True),
                (128, True): _T(128, 128, 8, 3, tma=True),
                (256, False): _T(64, 32, 8, 2), (256, True): _T(64, 32, 8, 2)},
    "dkdv": {(64, False): _T(128, 32, 4, 3), (64, True): _T(128, 32, 4, 3),
             (128, False): _T(128, 64, 8, 3), (128, True): _T(128, 64, 8, 3),
             (256, False): _T(64, 32, 8, 2), (256, True): _T(64, 32, 8, 2)},
    # The five-product backward (dK, dV and dQ by atomics in one kernel; off, see FUSED_BACKWARD).
    "fused": {(64, False): _T(128, 32, 4, 3, tma=True), (64, True): _T(128, 32, 4, 3, tma=True),
              (128, False): _T(128, 64, 8, 3, tma=True), (128, True): _T(128, 64, 8, 3, tma=True),
              (256, False): _T(64, 32, 8, 2), (256, True): _T(64, 32, 8, 2)},
    "dq": {(64, False): _T(128, 64, 8, 3, tma=True), (64, True): _T(128, 64, 8, 3, tma=True),
           (128, False): _T(128, 64, 8, 3, tma=True), (128, True): _T(128, 64, 8, 3, tma=True),
           (256, False): _T(64, 32, 8, 2), (256, True): _T(64, 32, 8, 2)},
}
# Other GPUs (and fp32 inputs, whose tiles take twice the shared memory): smaller tiles that fit in the A100's
# 163 KiB of shared memory per block.
SMALL_TILES = {64: _T(64, 64, 4, 2), 128: _T(64, 32, 4, 2), 256: _T(32, 32, 4, 1)}
# GPUs with less shared memory per block (Colab's T4: 64 KiB, L4: 99 KiB; most consumer GPUs): tiles that fit in
# 64 KiB in every dtype, except the float32 dK/dV kernel at head dims above 128 (65 KiB), which a T4 refuses.
# tests/test_gpu_targets.py compiles every configuration for each of Colab's GPUs and checks these limits.
SMALL_SMEM_TILES = {64: _T(32, 64, 4, 1), 128: _T(32, 16, 4, 1), 256: _T(16, 16, 4, 1)}
SMALL_SMEM = 160 * 1024                  # below this many bytes per block, SMALL_SMEM_TILES
FP32_DKDV_256_SMEM = 65 * 1024           # what the float32 dK/dV kernel needs at head dims 129-256
INTERPRETER_TILES = _T(32, 32, 4, 1)     # one program at a time on the CPU: any tile is exact
# The fewest rows a program of any kernel owns (the launch grids count tiles of this many rows at most).
SMALLEST_TILE = min(t.own for t in (*SMALL_TILES.values(), *SMALL_SMEM_TILES.values(), INTERPRETER_TILES,
                                    *(t for table in HOPPER_TILES.values() for t in table.values())))
MAX_PROGRAMS = 2**31 - 1                 # CUDA's limit on the grid's first axis, which the kernels use


def tiles_for(kernel: str, block_d: int, dtype: torch.dtype, device: torch.device, causal: bool) -> Tiles:
    """The tile configuration of ``kernel`` ("forward", "dkdv", "fused" or "dq") for this head dim, dtype, GPU and mask."""
    if device.type != "cuda":
        return INTERPRETER_TILES
    size = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
    shared = _shared_memory(device)
    if shared < SMALL_SMEM:
        if kernel == "dkdv" and size == 256 and dtype == torch.float32 and shared < FP32_DKDV_256_SMEM:
            major, minor = _capability(device)
            raise ValueError(f"flash_attention: the float32 backward pass for head_dim > 128 needs "
                             f"{FP32_DKDV_256_SMEM // 1024} KiB of shared memory per block, and "
                             f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has "
                             f"{shared // 1024} KiB: use float16, or head_dim <= 128")
        return SMALL_SMEM_TILES[size]
    if dtype != torch.float32 and _capability(device) >= (9, 0):
        return HOPPER_TILES[kernel][(size, causal)]
    return SMALL_TILES[size]


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _capability(device: torch.device) -> tuple[int, int]:
    return _device_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_shared_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _shared_memory(device: torch.device) -> int:
    """The most shared memory one block may use on this GPU (opt-in), in bytes."""
    return _device_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


def _descriptor(x, rows: int, block_d: int):
    """A tensor descriptor of ``x`` (``(B, H, N, D)``, or a packed ``(1, H, total, D)`` view) as a matrix of
    its rows, from which a kernel copies ``[rows, block_d]`` tiles with Hopper's tensor memory engine; or
    None where Triton has no descriptors or the layout allows none.

    Two layouts qualify, with D contiguous and rows 16-byte aligned. Head-major: a head's N rows follow
    the previous head's (a contiguous ``(B, H, N, D)`` tensor; a head stride of 0, one k/v head broadcast to
    all, too), seen as ``(B * H * N, D)``. Token-major: the heads of one token side by side (SDPA's
    ``(B, N, H, D)`` transposed, the slices of a fused ``(B, N, 3, H, D)`` projection, a packed ``(total, H, D)``
    tensor), seen as ``(tokens, H * D)`` with head h at column ``h * D``; there the tile must be exactly D
    wide, or it would reach into the next head's columns. ``tiles.descriptor_origin`` finds a head's first
    row and column in either. Rows past the matrix read as zeros."""
    if TensorDescriptor is None:
        return None
    b, h, n, d = x.shape
    stride_b, stride_h, stride_n, stride_d = x.stride()
    if (stride_d != 1 or n == 0 or stride_n < d or (stride_n * x.element_size()) % 16 or x.data_ptr() % 16
            or (b > 1 and stride_b % stride_n)):                  # each batch starts on a row
        return None
    if h == 1 or stride_h % stride_n == 0:                        # head-major
        head_rows, width = (stride_h // stride_n if h > 1 else 0), d
    elif block_d == d and stride_h >= d and (h - 1) * stride_h + d <= stride_n:     # token-major
        head_rows, width = 0, (h - 1) * stride_h + d
    else:
        return None
    n_rows = (b - 1) * (stride_b // stride_n if b > 1 else 0) + (h - 1) * head_rows + n
    if n_rows + rows >= 2**31:                                    # the kernels' coordinates are 32-bit
        return None
    return TensorDescriptor(x, shape=[n_rows, width], strides=[stride_n, 1], block_shape=[rows, block_d])


def _descriptors(t: Tiles, block_d: int, *tensors):
    """Descriptors of ``tensors`` for tiles of ``t.streamed`` rows, or None unless the tile table asks for
    them (``t.tma``) and every tensor's layout allows one."""
    if not t.tma:
        return None
    descriptors = [_descriptor(x, t.streamed, block_d) for x in tensors]
    return None if None in descriptors else descriptors


def _dq_descriptor(dq_acc, t: Tiles, block_d: int):
    """A tensor descriptor of the float32 dQ buffer as (B * Hq * Nq, D) rows, through which the
    five-product kernel adds whole tiles (Hopper's bulk reduction), or None: not asked for, Triton too
    old, rows too narrow for the engine (D * 4 bytes not a multiple of 16) or too many for 32 bits."""
    if not t.tma or block_d > 128:
        return None
    return _descriptor(dq_acc, t.streamed, block_d)


# Plain Python on the host: triton.next_power_of_2 and triton.cdiv are slow to call outside a kernel.
def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _kernel_meta(q):
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, _next_power_of_2(d)),
                UPCAST=_interpreting() and q.dtype == torch.bfloat16,   # the interpreter's tl.dot mishandles bf16
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _needs_int64(*tensors) -> bool:
    """Whether a row or column offset inside one (batch, head) slice can reach 2^31 elements (a tile
    reaches up to 255 rows past the last): then the kernels compute offsets in 64 bits (INT64),
    otherwise in 32. Batch and head offsets are always 64-bit."""
    return any((x.shape[2] + 256) * x.stride(2) + 256 * x.stride(3) >= 2**31 for x in tensors)


def _on_device_of(x):
    """Triton launches on the current CUDA device: make it the one ``x`` lives on."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


class Mask(NamedTuple):
    """Everything about the attention pattern beyond plain softmax(scale q k^T), as the kernels take it.

    ``window``: ``(left, right)`` with ``-1`` for an unbounded side (``causal`` is ``(-1, 0)``);
    ``softcap``: c > 0 caps each scaled score to c tanh(s / c) (0: off); ``alibi``: float32 slopes
    ``(B, Hq)`` or None; ``cu_q``, ``cu_k``, ``max_q``, ``max_k``: packed sequences (varlen), whose
    tensors come as ``(1, H, total, D)`` views of ``(total, H, D)``, or None."""
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[torch.Tensor] = None
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_q: int = 0
    max_k: int = 0


def _as_mask(causal) -> Mask:
    """``causal`` may be a bool (the two masks of the original interface) or a :class:`Mask`."""
    return causal if isinstance(causal, Mask) else Mask(window=(-1, 0) if causal else (-1, -1))


def _mask_args(q, k, mask: Mask):
    """The kernels' mask arguments: pointers (CU_Q, CU_K, SLOPES), the numbers (n_q, n_k, stride of an
    lse head, left, right, cap2), the constexprs, whether the tiles take the causal table, whether the
    longest rows run first, and the open sides of the band (the backward kernels' constexprs)."""
    varlen = mask.cu_q is not None
    n_q, n_k = (mask.max_q, mask.max_k) if varlen else (q.shape[2], k.shape[2])
    left, right = window_bounds(mask.window, False, n_q, n_k)
    dummy = q
    pointers = (mask.cu_q if varlen else dummy, mask.cu_k if varlen else dummy,
                mask.alibi if mask.alibi is not None else dummy)
    numbers = (n_q, n_k, q.shape[2], left, right, float(mask.softcap) * LOG2E if mask.softcap else 1.0)
    # A side of the band is open when no key lies beyond it (window_bounds made it n_q + n_k).
    open_sides = dict(LEFT_UNBOUNDED=left >= n_q + n_k, RIGHT_UNBOUNDED=right >= n_q + n_k)
    banded = not (open_sides["LEFT_UNBOUNDED"] and open_sides["RIGHT_UNBOUNDED"])
    flags = dict(VARLEN=varlen, SOFTCAP=bool(mask.softcap), ALIBI=mask.alibi is not None)
    # The tiles of a row grow with its index when only the right side is bounded (causal): run the
    # longest first.
    longest_first = open_sides["LEFT_UNBOUNDED"] and not open_sides["RIGHT_UNBOUNDED"]
    return pointers, numbers, flags, banded, longest_first, open_sides


def _strides(packed: bool, *tensors):
    """The strides the kernels take, in order. Packed: the batch stride is 0, since the batch axis of the
    launch grid indexes sequences, whose offsets come from the prefix sums instead."""
    return [s for x in tensors for s in ((0, *x.stride()[1:]) if packed else x.stride())]


def forward_impl(q, k, v, causal, scale: float):
    """Run the forward kernel: returns (o, lse). ``causal``: a bool or a :class:`Mask`. Inputs are
    assumed valid (see flash_attention)."""
    mask = _as_mask(causal)
    batch, n_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    o = _empty_out(q, mask.cu_q is not None)
    lse = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if n_k == 0:                               # no key at all: every row is fully masked
        return o.zero_(), lse.fill_(float("-inf"))
    pointers, numbers, flags, banded, longest_first, _ = _mask_args(q, k, mask)
    if (q.device.type == "cuda" and not _interpreting()
            and hopper.supports_forward(q, k, v, mask.softcap, mask.alibi, flags["VARLEN"], _capability(q.device))):
        with _on_device_of(q):
            return hopper.forward(q, k, v, o, lse, numbers[3:5], scale, longest_first, mask.cu_q, mask.cu_k,
                                  mask.max_q, mask.max_k)
    meta = _kernel_meta(q)
    t = tiles_for("forward", meta["BLOCK_D"], q.dtype, q.device, banded)
    descriptors = _descriptors(t, meta["BLOCK_D"], k, v)
    if flags["VARLEN"]:                  # the grid spans the longest sequence, for each sequence of the batch
        batch, n_q = mask.cu_q.shape[0] - 1, mask.max_q
    with _on_device_of(q):
        # One grid axis (tiles fastest): CUDA allows 2^31 - 1 programs there, 65535 on the others.
        launch(flash_forward_kernel)[(_cdiv(n_q, t.own) * batch * n_heads,)](
            q, k, v, o, lse, *(descriptors or (k, v)), *pointers, *_strides(flags["VARLEN"], q, k, v, o),
            n_heads, *numbers[:3], scale * LOG2E, *numbers[3:],
            GROUP=n_heads // n_kv_heads, LONGEST_FIRST=longest_first, **flags, BLOCK_M=t.own, BLOCK_N=t.streamed,
            WARP_SPECIALIZE=t.warp_specialize, USE_TMA=descriptors is not None, INT64=_needs_int64(q, k, v, o),
            num_warps=t.num_warps, num_stages=t.num_stages, maxnreg=t.max_registers or None, **meta)
    return o, lse


def _empty_out(x, packed: bool, dtype=None):
    """An uninitialised tensor shaped like ``x``: contiguous for dense ``(B, H, N, D)`` tensors, and for
    a packed ``(1, H, total, D)`` view, the same view of a contiguous ``(total, H, D)`` tensor (what
    flash_attention_varlen returns). The fake implementations below allocate the same way."""
    dtype = x.dtype if dtype is None else dtype
    if packed:
        return torch.empty((x.shape[2], x.shape[1], x.shape[3]), dtype=dtype, device=x.device).transpose(0, 1)[None]
    return torch.empty(x.shape, dtype=dtype, device=x.device)


# The five-product backward in triton.language (dQ added by atomics from the dK/dV kernel) is exact, but
# on the H200 with Triton 3.6 it measured 0.80-0.98x the two-kernel pass (benchmarks/NOTES.md): whole-tile
# float32 atomic adds cost more than the two products they save. So it is off: deterministic=False runs
# attnpkg.hopper's Gluon kernel where that was tested, and the two-kernel pass elsewhere.
FUSED_BACKWARD = False


def _five_product_window(q, k, mask: Mask, deterministic: bool):
    """The band ``(left, right)`` for :mod:`attnpkg.hopper`'s five-product kernel where it serves this backward
    pass (see :func:`backward_impl`), else None."""
    if deterministic or not q.is_cuda or _interpreting() or 0 in (q.shape[0], q.shape[2], k.shape[2]):
        return None
    window = window_bounds(mask.window, False, q.shape[2], k.shape[2])
    sequences = mask.cu_q.shape[0] - 1 if mask.cu_q is not None else None
    serves = hopper.supports(q, k, window, mask.softcap, mask.alibi, sequences, _capability(q.device),
                             longest=mask.max_q)
    return window if serves else None


def backward_pass(q, k, causal=False, deterministic=None) -> str:
    """Which backward pass ``flash_attention(q, k, v, causal=causal, deterministic=deterministic)`` runs:
    ``"five-product"`` (:mod:`attnpkg.hopper`) or ``"two-kernel"`` (with ``FUSED_BACKWARD``, ``"fused"`` where the
    Hopper kernel does not serve and determinism is not asked for). The benchmark records it beside its timings."""
    deterministic = _resolve("backward_pass", None, deterministic, q.shape[-1])[1]
    if _five_product_window(q, k, _as_mask(causal), deterministic) is not None:
        return "five-product"
    return "fused" if FUSED_BACKWARD and not deterministic else "two-kernel"


def backward_impl(do, q, k, v, o, lse, dlse, causal, scale: float, deterministic: bool = True):
    """Run the backward kernels: returns (dq, dk, dv). ``dlse`` (or None) is the gradient of lse;
    ``causal``: a bool or a :class:`Mask`.

    Two kernels: one per key tile for dK and dV, one per query tile for dQ, each recomputing S and
    dP (7 matrix products per tile pair), every sum in a fixed order. With ``deterministic=False``,
    where :mod:`attnpkg.hopper` was tested (a Hopper GPU, its Triton version, head dim 128, dense or
    packed inputs without a soft cap or ALiBi), its Gluon kernel instead: 5 products per tile pair, dQ
    summed by float32 bulk reductions whose order varies from run to run. With ``FUSED_BACKWARD`` and
    ``deterministic=False`` elsewhere: the dK/dV kernel alone computes S, P, dP and dS once and adds its
    share of dQ by atomic adds."""
    mask = _as_mask(causal)
    packed = mask.cu_q is not None
    batch, n_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    window = _five_product_window(q, k, mask, deterministic)
    if window is not None:
        with _on_device_of(q):                         # allocates its own gradients
            return hopper.backward(do, q, k, v, o, lse, dlse, window, scale, mask.cu_q, mask.cu_k, mask.max_q,
                                   mask.max_k)
    dq, dk, dv = _empty_out(q, packed), _empty_out(k, packed), _empty_out(v, packed)
    if batch == 0 or n_q == 0 or n_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _kernel_meta(q)
    group = n_heads // n_kv_heads
    # Grouped-query: each query head's share of dK, dV in float32, summed over the group below.
    dk_part, dv_part = (dk, dv) if group == 1 else (
        torch.empty((batch, n_heads, n_k, head_dim), dtype=torch.float32, device=q.device) for _ in range(2))
    fuse = FUSED_BACKWARD and not deterministic
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if fuse else dq
    wide = _needs_int64(q, k, v, o, do, dq_acc, dk_part, dv_part)
    delta = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    rows = 32 if _interpreting() else 64
    pointers, numbers, flags, banded, longest_first, open_sides = _mask_args(q, k, mask)
    # No mask or causal: the band has no left edge, so neither kernel compiles the masked run on that
    # side; open sides drop out of the masked tiles' element test (the forward keeps its one kernel).
    flags = dict(flags, **open_sides)
    # Packed sequences: the grids span the longest sequences, for each sequence of the batch.
    grid_q, grid_k, sequences = (mask.max_q, mask.max_k, mask.cu_q.shape[0] - 1) if packed else (n_q, n_k, batch)
    with _on_device_of(q):
        # Packed sequences are rows of one (1, H, total) batch here: the preprocess needs no offsets.
        launch(flash_backward_preprocess)[(_cdiv(n_q, rows) * batch * n_heads,)](
            o, do, lse, dlse.contiguous() if dlse is not None else lse, delta, lse2, lse,   # dlse: maybe an expand
            *o.stride(), *do.stride(), n_heads, n_q, n_q, 1.0 / scale,
            HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=rows, HAS_DLSE=dlse is not None, PAIRS=False,
            VARLEN=False, INT64=wide)
        # dK/dV (and dQ by atomics): one program owns a tile of keys and a query head; query tiles stream past it.
        t = tiles_for("fused" if fuse else "dkdv", meta["BLOCK_D"], q.dtype, q.device, banded)
        dq_desc = _dq_descriptor(dq_acc, t, meta["BLOCK_D"]) if fuse and not packed else None
        launch(flash_backward_dkdv_kernel)[(_cdiv(grid_k, t.own) * sequences * n_heads,)](
            q, k, v, do, lse2, delta, dk_part, dv_part, dq_acc if dq_desc is None else dq_desc, *pointers,
            *_strides(packed, q, k, v, do, dk_part, dv_part, dq_acc), n_heads, *numbers[:3], scale * LOG2E, scale,
            *numbers[3:], GROUP=group, **flags, FUSE_DQ=fuse, DQ_TMA=dq_desc is not None, BLOCK_N=t.own,
            BLOCK_M=t.streamed, INT64=wide, num_warps=t.num_warps, num_stages=t.num_stages, **meta)
        if not fuse:
            # dQ: one program owns a tile of queries; tiles of keys stream past it.
            t = tiles_for("dq", meta["BLOCK_D"], q.dtype, q.device, banded)
            kv = _descriptors(t, meta["BLOCK_D"], k, v)
            launch(flash_backward_dq_kernel)[(_cdiv(grid_q, t.own) * sequences * n_heads,)](
                q, k, v, do, lse2, delta, dq, *(kv or (k, v)), *pointers, *_strides(packed, q, k, v, do, dq),
                n_heads, *numbers[:3], scale * LOG2E, scale, *numbers[3:], GROUP=group,
                LONGEST_FIRST=longest_first, **flags, USE_TMA=kv is not None,
                BLOCK_M=t.own, BLOCK_N=t.streamed, INT64=wide, num_warps=t.num_warps, num_stages=t.num_stages, **meta)
    if fuse:
        dq.copy_(dq_acc.mul_(scale))
    if group > 1:                    # a fixed order of summation: deterministic
        dk.copy_(dk_part.view(batch, n_kv_heads, group, n_k, head_dim).sum(2))
        dv.copy_(dv_part.view(batch, n_kv_heads, group, n_k, head_dim).sum(2))
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Eager path: the kernels called directly, with as little Python per call as possible."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, deterministic):
        o, lse = forward_impl(q, k, v, mask, scale)
        ctx.set_materialize_grads(False)        # an unused lse gets None, not a tensor of zeros
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.scale, ctx.deterministic = mask, scale, deterministic
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = backward_impl(do, q, k, v, o, lse, dlse, ctx.mask, ctx.scale, ctx.deterministic)
        return dq, dk, dv, None, None, None


# The same kernels as torch.library custom ops, which torch.compile can trace (fake implementations give
# the output shapes) and call from a compiled graph. The mask travels as plain arguments.
def _mask_of(window_left, window_right, softcap, alibi, cu_q, cu_k, max_q, max_k) -> Mask:
    return Mask((window_left, window_right), softcap, alibi, cu_q, cu_k, max_q, max_k)


@torch.library.custom_op("attnpkg::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int, window_right: int,
                softcap: float, alibi: Optional[torch.Tensor], cu_q: Optional[torch.Tensor],
                cu_k: Optional[torch.Tensor], max_q: int, max_k: int, scale: float,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_impl(q, k, v, _mask_of(window_left, window_right, softcap, alibi, cu_q, cu_k, max_q, max_k), scale)


@_forward_op.register_fake
def _(q, k, v, window_left, window_right, softcap, alibi, cu_q, cu_k, max_q, max_k, scale, deterministic):
    batch, n_heads, n_q, head_dim = q.shape
    return _empty_out(q, cu_q is not None), q.new_empty((batch, n_heads, n_q), dtype=torch.float32)


@torch.library.custom_op("attnpkg::flash_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, dlse: Optional[torch.Tensor], window_left: int, window_right: int,
                 softcap: float, alibi: Optional[torch.Tensor], cu_q: Optional[torch.Tensor],
                 cu_k: Optional[torch.Tensor], max_q: int, max_k: int, scale: float, deterministic: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward_impl(do, q, k, v, o, lse, dlse,
                         _mask_of(window_left, window_right, softcap, alibi, cu_q, cu_k, max_q, max_k), scale,
                         deterministic)


@_backward_op.register_fake
def _(do, q, k, v, o, lse, dlse, window_left, window_right, softcap, alibi, cu_q, cu_k, max_q, max_k, scale,
      deterministic):
    packed = cu_q is not None
    return _empty_out(q, packed), _empty_out(k, packed), _empty_out(v, packed)


def _setup_context(ctx, inputs, output):
    q, k, v, *mask_args, scale, deterministic = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.mask_args, ctx.scale, ctx.deterministic = mask_args, scale, deterministic


def _backward_rule(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    do = torch.zeros_like(o) if do is None else do
    dq, dk, dv = _backward_op(do, q, k, v, o, lse, dlse, *ctx.mask_args, ctx.scale, ctx.deterministic)
    return (dq, dk, dv) + (None,) * (len(ctx.mask_args) + 2)


_forward_op.register_autograd(_backward_rule, setup_context=_setup_context)


def _run(q, k, v, mask: Mask, scale: float, deterministic: bool):
    """Forward through the custom op (compiling), the autograd Function (gradients) or the kernel alone."""
    if torch.compiler.is_compiling():
        return _forward_op(q, k, v, mask.window[0], mask.window[1], float(mask.softcap), mask.alibi, mask.cu_q,
                           mask.cu_k, mask.max_q, mask.max_k, scale, deterministic)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, mask, scale, deterministic)
    return forward_impl(q, k, v, mask, scale)          # inference: no graph to record


def _check_inputs(q, k, v, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have 4 dimensions (batch, heads, seq, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.float64:
        raise TypeError("flash_attention: float64 is not supported by the kernels; use "
                        "attnpkg.reference.attention for a double-precision result")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"flash_attention: dtype {q.dtype} is not supported (use float16, bfloat16 or float32)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    (b, hq, nq, d), (bk, hkv, nk, dk), (bv, hv, nv, dv) = q.shape, k.shape, v.shape
    if not (b == bk == bv):
        raise ValueError(f"flash_attention: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (d == dk == dv):
        raise ValueError(f"flash_attention: head_dim must be the same for q, k, v, got {d}, {dk}, {dv} "
                         f"(shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)})")
    if nk != nv or hkv != hv:
        raise ValueError(f"flash_attention: k and v must have the same heads and length, got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"flash_attention: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"flash_attention: scale must be a positive finite number, got {scale!r}")
        if not MIN_SCALE <= scale <= MAX_SCALE:
            raise ValueError(f"flash_attention: scale {scale!r} is outside [{MIN_SCALE:.3g}, {MAX_SCALE:.3g}]: the kernels "
                             f"compute in float32, where scale * log2(e) would be "
                             f"{'zero or subnormal' if scale < MIN_SCALE else 'infinite'}; rescale q instead")
    if q.device.type == "cuda":
        major, minor = _capability(q.device)
        if q.dtype == torch.bfloat16 and major < 8:
            raise TypeError(f"flash_attention: bfloat16 needs a GPU of compute capability 8.0 or newer; "
                            f"{torch.cuda.get_device_name(q.device)} has {major}.{minor}: use float16")
    elif q.device.type == "cpu":
        if not _interpreting():
            raise ValueError("flash_attention: CPU tensors run through Triton's interpreter, which is off because a "
                             "CUDA GPU is present; move the tensors to the GPU, or set TRITON_INTERPRET=1 before "
                             "importing attnpkg")
    else:
        raise ValueError(f"flash_attention: tensors on {q.device.type} are not supported (use CUDA, or CPU "
                         f"through Triton's interpreter)")


def _check_mask_options(name, causal, window_size, softcap, alibi_slopes, batch, n_heads, device):
    """Validate the mask options; returns ``(window, softcap, alibi)`` as :class:`Mask` takes them.

    ``causal=True`` sets the window's right side to 0, whatever it was (as flash-attn does)."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"{name}: window_size must be a pair of ints (left, right), -1 for unbounded, got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"{name}: window sizes must be >= -1 (-1: unbounded), got window_size={tuple(window_size)}")
    if causal:
        right = 0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{name}: softcap must be a finite number >= 0 (0: off), got {softcap!r}")
    if softcap and not MIN_SCALE <= softcap * LOG2E <= MAX_SCALE:
        raise ValueError(f"{name}: softcap {softcap!r} is outside the float32 range the kernels compute in")
    alibi = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"{name}: alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
        if alibi_slopes.dtype != torch.float32:
            raise TypeError(f"{name}: alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if tuple(alibi_slopes.shape) not in ((n_heads,), (batch, n_heads)):
            raise ValueError(f"{name}: alibi_slopes must have shape ({n_heads},) or ({batch}, {n_heads}) "
                             f"(query heads, or batch and query heads), got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != device:
            raise ValueError(f"{name}: alibi_slopes is on {alibi_slopes.device}, the inputs on {device}")
        alibi = alibi_slopes.detach().expand(batch, n_heads).contiguous()
    return (left, right), float(softcap), alibi


def _resolve(name, scale, deterministic, head_dim):
    """The scale (``1/sqrt(head_dim)`` by default; its range is checked by _check_inputs) and the
    determinism (``None``: torch's setting) that the kernels run with."""
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"{name}: deterministic must be None, True or False, got {deterministic!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return (1.0 / math.sqrt(head_dim) if scale is None else float(scale)), deterministic


def flash_attention(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None,
                    return_lse=False, deterministic=None):
    """Exact softmax attention with the FlashAttention algorithm, forward and backward in Triton.

    A drop-in for ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` without dropout
    or an explicit mask; differentiable in ``q``, ``k`` and ``v``. Masks and score modifications
    follow flash-attn (``flash_attn_func``), with queries aligned bottom-right: query ``i`` sits at
    key position ``p_i = i + Nk - Nq``.

    Args:
        q: queries, ``(B, Hq, Nq, D)``.
        k: keys, ``(B, Hkv, Nk, D)``. ``Hq`` must be a multiple of ``Hkv``: query head ``h``
            uses key/value head ``h // (Hq // Hkv)`` (grouped-query; ``Hkv = 1`` is multi-query).
            ``Nk`` may differ from ``Nq``.
        v: values, ``(B, Hkv, Nk, D)``.
        causal: query ``i`` sees keys ``j <= p_i`` (aligned bottom-right, so the last query sees
            every key, as in a decoder extending a key cache). With ``Nq == Nk`` this is
            SDPA's ``is_causal=True``; with ``Nq != Nk`` SDPA aligns top-left (``j <= i``) instead.
            It is the window ``(-1, 0)``: with ``causal=True`` the right side of ``window_size`` is
            set to 0, whatever it was (as flash-attn does).
        window_size: ``(left, right)``, local (sliding-window) attention: query ``i`` sees keys
            ``p_i - left <= j <= p_i + right``; ``-1`` leaves that side unbounded. Key tiles
            outside the band are never loaded, so the cost grows with ``Nq x window``.
        softcap: ``c > 0`` replaces each scaled score ``s`` by ``c tanh(s / c)`` (Gemma 2); 0 is off.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``: adds ``-slope[b, h] |p_i - j|`` to the
            (capped) score (ALiBi). No gradient flows to the slopes.
        scale: multiplies ``q k^T`` before the softmax; ``1/sqrt(D)`` by default. It must be
            positive (the kernels take the row maximum before scaling) and, since the kernels
            compute in float32, a normal float32 number (about 1.2e-38 to 1.7e38).
        return_lse: also return the row log-sum-exp ``lse[b, h, i] = log sum_j exp(z_ij)`` of the
            final scores ``z`` (natural log, float32, ``(B, Hq, Nq)``), the quantity that merges
            partial attentions; differentiable.
        deterministic: whether the backward pass must give bit-identical gradients on every run.
            ``None`` (default) follows ``torch.are_deterministic_algorithms_enabled()``. ``True``
            guarantees it (the two-kernel pass, seven matrix products per tile pair). ``False`` allows
            a non-deterministic pass where one is faster: on Hopper GPUs (H100, H200) with the Triton
            version it was tested with, head dim 128, dense or packed inputs with any band (no mask,
            causal, sliding windows) but no soft cap or ALiBi, that is the five-product Gluon kernel
            of :mod:`attnpkg.hopper` (dQ summed by float32 bulk reductions in any order: its last bits
            vary; 1.2-1.3x the deterministic pass on an H200); elsewhere the deterministic pass.

    Returns:
        ``o`` of shape ``(B, Hq, Nq, D)`` in the dtype of ``q``, and ``lse`` if ``return_lse``.
        Queries that see no key (with causal, ``i < Nq - Nk``; with windows, rows whose band lies
        outside ``[0, Nk)``) output zeros, with lse ``-inf`` and zero gradients.

    Supported: float16 and bfloat16 (fp32 accumulation) and float32; any ``D`` from 1 to 256; any
    sequence length; strided inputs (SDPA's ``(B, N, H, D)`` layout passed as ``x.transpose(1, 2)`` takes
    the same tensor-descriptor path on Hopper GPUs, measured within 3 % of a contiguous tensor at D = 128).
    CUDA tensors run the compiled kernels; without a CUDA GPU, CPU tensors run the same kernels through
    Triton's interpreter (slow: for small shapes).
    For packed sequences of different lengths see :func:`attnpkg.flash_attention_varlen`.
    """
    _check_inputs(q, k, v, scale)
    scale, deterministic = _resolve("flash_attention", scale, deterministic, q.shape[-1])
    window, cap, alibi = _check_mask_options("flash_attention", bool(causal),
                                             window_size, softcap, alibi_slopes, q.shape[0], q.shape[1], q.device)
    o, lse = _run(q, k, v, Mask(window, cap, alibi), scale, deterministic)
    return (o, lse) if return_lse else o
