"""``flash_attention_varlen``: attention over packed sequences of different lengths (flash-attn's
``flash_attn_varlen_func``), without padding.

A batch of B sequences is stored back to back: ``q`` is ``(total_q, Hq, D)`` and sequence ``b``
owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``. The kernels see these tensors as one
``(1, H, total, D)`` view; each program reads its sequence's offsets from the prefix sums, so a
tile never crosses into another sequence and padding costs neither FLOPs nor memory.
"""
import weakref

import torch

from .attention import MAX_PROGRAMS, SMALLEST_TILE, Mask, _check_inputs, _check_mask_options, _resolve, _run

__all__ = ["flash_attention_varlen"]

# Prefix sums already checked: id -> (the tensor, weakly; (its version, total, max_seqlen, device)). Reading the values
# is a device -> host copy that waits for the GPU, and a model calls every layer with the same prefix sums:
# each unchanged tensor is read once. An in-place change moves the tensor's version counter, so it is read
# again; only writes that bypass the counter (through ``.data``, or another library writing its memory) go unseen.
_CHECKED = {}
_MAX_CHECKED = 256


def _check_cu_seqlens(name, cu, total, max_seqlen, device):
    """Check the prefix sums (once per unchanged tensor, see ``_CHECKED``); returns the batch size."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"flash_attention_varlen: {name} must be a torch.Tensor, got {type(cu).__name__}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"flash_attention_varlen: max_seqlen for {name} must be an int >= 0, got {max_seqlen!r}")
    state = (cu._version, total, max_seqlen, device)
    seen = _CHECKED.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == state:
        return cu.shape[0] - 1
    batch = _read_cu_seqlens(name, cu, total, max_seqlen, device)
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED[id(cu)] = (weakref.ref(cu), state)
    return batch


def _read_cu_seqlens(name, cu, total, max_seqlen, device):
    if cu.dtype != torch.int32:
        raise TypeError(f"flash_attention_varlen: {name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"flash_attention_varlen: {name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"flash_attention_varlen: {name} is on {cu.device}, the inputs on {device}")
    values = cu.tolist()                  # a device -> host copy: correctness first
    if values[0] != 0:
        raise ValueError(f"flash_attention_varlen: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"flash_attention_varlen: {name} must be non-decreasing (prefix sums of lengths), got {values}")
    if values[-1] != total:
        raise ValueError(f"flash_attention_varlen: the last entry of {name} ({values[-1]}) must equal the number of "
                         f"packed rows ({total})")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"flash_attention_varlen: a sequence of {name} has length {longest} > max_seqlen {max_seqlen}")
    return len(lengths)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False,
                           window_size=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None, return_lse=False,
                           deterministic=None):
    """Exact attention over packed sequences, forward and backward in Triton.

    Sequence ``b`` of the batch is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q`` and rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of ``k`` and ``v``; its queries attend only to its keys,
    with the semantics of :func:`attnpkg.flash_attention` per sequence (bottom-right alignment
    ``p_i = i + Nk_b - Nq_b``, ``causal``, ``window_size``, ``softcap``, ``alibi_slopes``).

    Args:
        q: ``(total_q, Hq, D)``; k, v: ``(total_k, Hkv, D)`` with ``Hq`` a multiple of ``Hkv``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` prefix sums of the lengths, from 0 to
            ``total_q`` (``total_k``). Sequences may be empty (a query sequence without keys
            outputs zeros, lse ``-inf``).
        max_seqlen_q, max_seqlen_k: ints at least the longest sequence's length (the launch grid).
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``.
        causal, window_size, softcap, scale, return_lse, deterministic: as in flash_attention.

    Returns:
        ``o`` of shape ``(total_q, Hq, D)``, and if ``return_lse`` the float32 lse ``(Hq, total_q)``.

    The prefix sums are checked on the host (increasing, ending at the totals, within the stated
    maximum lengths). Reading them is a device -> host copy that waits for the GPU (it cost 20 % of a
    packed forward pass at 16k tokens on an H200), so each tensor is read once: later calls with the same,
    unchanged tensor (every layer of a model, every step of a loop over fixed lengths) skip it. A tensor
    changed in place is read again. Under ``torch.compile`` the check is skipped (it cannot read tensor
    values while tracing).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention_varlen: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"flash_attention_varlen: {name} must have 3 dimensions (total, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"flash_attention_varlen: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"flash_attention_varlen: k and v must have the same number of rows, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if torch.compiler.is_compiling():
        batch = cu_seqlens_q.shape[0] - 1
    else:
        batch = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, q.device)
        if _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, q.device) != batch:
            raise ValueError(f"flash_attention_varlen: cu_seqlens_q and cu_seqlens_k must have the same length, got "
                             f"{tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    # The grids span the longest sequence for every sequence and query head: one program per tile of rows.
    programs = -(-max(max_seqlen_q, max_seqlen_k) // SMALLEST_TILE) * batch * q.shape[1]
    if programs > MAX_PROGRAMS:
        raise ValueError(f"flash_attention_varlen: max_seqlen {max(max_seqlen_q, max_seqlen_k)} for {batch} sequences "
                         f"and {q.shape[1]} heads needs up to {programs} programs, more than CUDA's {MAX_PROGRAMS} on "
                         f"one grid axis: pass the longest sequence's length as max_seqlen, or split the batch")
    # The (1, H, total, D) views that the kernels take; flash_attention's checks apply to them.
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    _check_inputs(q4, k4, v4, scale)
    scale, deterministic = _resolve("flash_attention_varlen", scale, deterministic, q.shape[-1])
    window, cap, alibi = _check_mask_options("flash_attention_varlen", bool(causal), window_size, softcap,
                                             alibi_slopes, batch, q.shape[1], q.device)
    mask = Mask(window, cap, alibi, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    o, lse = _run(q4, k4, v4, mask, scale, deterministic)
    o = o.squeeze(0).transpose(0, 1)
    return (o, lse.squeeze(0)) if return_lse else o
