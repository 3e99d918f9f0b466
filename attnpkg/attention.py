"""``flash_attention``: the public entry point to the Triton FlashAttention kernels.

All validation happens here, at the boundary; the kernels assume valid input. The forward and
backward passes are registered as ``torch.library`` custom ops (with fake implementations for
tracing), so ``torch.compile(fullgraph=True)`` can call them, and joined by ``register_autograd``.
"""
import math
import os

import torch
import triton

from .kernels.flash_backward import (flash_backward_dkdv_kernel, flash_backward_dq_kernel,
                                     flash_backward_preprocess)
from .kernels.flash_forward import flash_forward_kernel

__all__ = ["flash_attention"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _tile_config(head_dim_padded: int, dtype: torch.dtype, causal: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward and dQ kernels; dK/dV swaps M and N."""
    if _interpreting():
        return 32, 32, 4, 1          # the interpreter runs one program at a time: any tile is exact
    wide = 2 if dtype == torch.float32 else 1      # fp32 tiles take twice the shared memory
    if head_dim_padded <= 64:
        return 128 // wide, 64, 4, 3
    if head_dim_padded <= 128:
        return 128 // wide, 64 // wide, 8, 3
    return 64 // wide, 32, 8, 2


def _launch_meta(q):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    upcast = _interpreting() and q.dtype == torch.bfloat16   # the interpreter's tl.dot mishandles bf16
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=d, BLOCK_D=block_d, UPCAST=upcast, PRECISION=precision)


@torch.library.custom_op("attnpkg::flash_attention_forward", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    batch, n_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    o = torch.empty((batch, n_heads, n_q, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    if n_k == 0:                               # no key at all: every row is fully masked
        return o.zero_(), lse.fill_(float("-inf"))
    meta = _launch_meta(q)
    block_m, block_n, warps, stages = _tile_config(meta["BLOCK_D"], q.dtype, causal)
    grid = (triton.cdiv(n_q, block_m), batch * n_heads)
    flash_forward_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        n_heads, n_q, n_k, scale * LOG2E,
        GROUP=n_heads // n_kv_heads, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **meta)
    return o, lse


@_forward.register_fake
def _(q, k, v, causal, scale):
    batch, n_heads, n_q, head_dim = q.shape
    return q.new_empty((batch, n_heads, n_q, head_dim)), q.new_empty((batch, n_heads, n_q), dtype=torch.float32)


@torch.library.custom_op("attnpkg::flash_attention_backward", mutates_args=())
def _backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
              lse: torch.Tensor, dlse: torch.Tensor | None, causal: bool, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, n_heads, n_q, head_dim = q.shape
    n_kv_heads, n_k = k.shape[1], k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if batch == 0 or n_q == 0 or n_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _launch_meta(q)
    block_m, block_n, warps, stages = _tile_config(meta["BLOCK_D"], q.dtype, causal)
    delta = torch.empty((batch, n_heads, n_q), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    preprocess_m = 64 if not _interpreting() else 32
    flash_backward_preprocess[(triton.cdiv(n_q, preprocess_m), batch * n_heads)](
        o, do, lse.contiguous(), dlse.contiguous() if dlse is not None else lse, delta, lse2,
        *o.stride(), *do.stride(), n_heads, n_q,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=preprocess_m, HAS_DLSE=dlse is not None)
    common = dict(GROUP=n_heads // n_kv_heads, CAUSAL=causal, num_warps=warps, num_stages=stages, **meta)
    # dK/dV: one program per key tile; query tiles stream past it (BLOCK_N keys x BLOCK_M queries).
    flash_backward_dkdv_kernel[(triton.cdiv(n_k, block_m), batch * n_kv_heads)](
        q, k, v, do, lse2, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        n_kv_heads, n_q, n_k, scale * LOG2E, scale, BLOCK_M=block_n, BLOCK_N=block_m, **common)
    flash_backward_dq_kernel[(triton.cdiv(n_q, block_m), batch * n_heads)](
        q, k, v, do, lse2, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        n_heads, n_q, n_k, scale * LOG2E, scale, BLOCK_M=block_m, BLOCK_N=block_n, **common)
    return dq, dk, dv


@_backward.register_fake
def _(do, q, k, v, o, lse, dlse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward_rule(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = _backward(do, q, k, v, o, lse, dlse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward.register_autograd(_backward_rule, setup_context=_setup_context)


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
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"flash_attention: scale must be a finite number, got {scale!r}")
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
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


def flash_attention(q, k, v, *, causal=False, scale=None, return_lse=False):
    """Exact softmax attention with the FlashAttention algorithm, forward and backward in Triton.

    A drop-in for ``torch.nn.functional.scaled_dot_product_attention(q, k, v)`` without dropout
    or an explicit mask; differentiable in ``q``, ``k`` and ``v``.

    Args:
        q: queries, ``(B, Hq, Nq, D)``.
        k: keys, ``(B, Hkv, Nk, D)``. ``Hq`` must be a multiple of ``Hkv``: query head ``h``
            uses key/value head ``h // (Hq // Hkv)`` (grouped-query; ``Hkv = 1`` is multi-query).
            ``Nk`` may differ from ``Nq``.
        v: values, ``(B, Hkv, Nk, D)``.
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (aligned bottom-right, so the last
            query sees every key, as in a decoder extending a key cache). With ``Nq == Nk`` this is
            SDPA's ``is_causal=True``; with ``Nq != Nk`` SDPA aligns top-left (``j <= i``) instead.
            Queries that see no key (``i < Nq - Nk``) output zeros, with lse ``-inf`` and zero gradients.
        scale: multiplies ``q k^T`` before the softmax; ``1/sqrt(D)`` by default.
        return_lse: also return the row log-sum-exp ``lse[b, h, i] = log sum_j exp(scale q_i.k_j)``
            (natural log, float32, ``(B, Hq, Nq)``), the quantity that merges partial attentions.

    Returns:
        ``o`` of shape ``(B, Hq, Nq, D)`` in the dtype of ``q``, and ``lse`` if ``return_lse``.

    Supported: float16 and bfloat16 (fp32 accumulation) and float32; any ``D`` from 1 to 256; any
    sequence length; strided inputs. CUDA tensors run the compiled kernels; without a CUDA GPU,
    CPU tensors run the same kernels through Triton's interpreter (slow: for small shapes).
    The backward pass is deterministic.
    """
    _check_inputs(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    o, lse = _forward(q, k, v, bool(causal), scale)
    return (o, lse) if return_lse else o
