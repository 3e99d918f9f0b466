"""Materialised attention: the (N x N) forward passes that every other result is checked against.

Everything here is plain PyTorch and differentiable by autograd, so it serves as ground truth
for the closed-form gradients in :mod:`attnpkg.grads` and for the Triton kernels.

Conventions (see ``book/notation.md``): rows are tokens and ``Y = X W``; attention tensors use
SDPA's layout ``(batch, heads, seq, head_dim)`` (any leading dimensions work here); multi-head
weights are ``w_q, w_k: (d_model, H*d_k)``, ``w_v: (d_model, H*d_v)``, ``w_o: (H*d_v, d_model)``
and head ``h`` owns columns ``h*d_k:(h+1)*d_k`` (rows ``h*d_v:(h+1)*d_v`` of ``w_o``).
"""
import math

import torch

__all__ = ["causal_mask", "window_mask", "expand_kv_heads", "scores", "probabilities", "attention",
           "attention_varlen", "split_heads", "merge_heads", "multihead_attention"]


def causal_mask(n_q, n_k, device=None):
    """Boolean ``(n_q, n_k)`` mask, True where query ``i`` may see key ``j``.

    Aligned bottom-right: query ``i`` sees keys ``j <= i + n_k - n_q``, so the last query sees
    every key. With ``n_q > n_k`` the first ``n_q - n_k`` queries see no key at all. (SDPA's
    ``is_causal=True`` aligns top-left instead; the two agree when ``n_q == n_k``.)

    Args:
        n_q: number of queries.
        n_k: number of keys.
        device: where to create the mask (the CPU by default).

    Returns:
        A ``torch.bool`` tensor of shape ``(n_q, n_k)``. PyTorch's ``attn_mask`` of SDPA takes it as
        it is (True = may attend); ``nn.MultiheadAttention`` wants its negation.
    """
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def window_mask(n_q, n_k, window_size=(-1, -1), causal=False, device=None):
    """Boolean ``(n_q, n_k)`` mask of a sliding window, True where query ``i`` may see key ``j``:
    ``p_i - left <= j <= p_i + right`` with ``p_i = i + n_k - n_q`` (bottom-right), ``-1`` for an
    unbounded side; ``causal`` sets ``right = 0``."""
    left, right = window_size
    right = 0 if causal else right
    p = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=device)[None, :]
    ok = torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= p - left
    if right >= 0:
        ok &= j <= p + right
    return ok


def expand_kv_heads(q, k, v):
    """Repeat key/value heads so grouped-query inputs (``Hq = G * Hkv``) become ordinary ones.

    Query head ``h`` uses key/value head ``h // G``, as in flash-attn and SDPA's ``enable_gqa``.
    Inputs whose head counts already agree (or that have fewer than three dimensions) pass through.

    Args:
        q: queries ``(..., Hq, Nq, d_k)``; only its number of heads is read.
        k: keys ``(..., Hkv, Nk, d_k)``.
        v: values ``(..., Hkv, Nk, d_v)``.

    Returns:
        ``(k, v)`` with ``Hq`` heads each (the same tensors if nothing needs repeating).

    Raises:
        ValueError: if ``Hq`` is not a multiple of ``Hkv``.
    """
    if q.dim() < 3 or q.shape[-3] == k.shape[-3]:
        return k, v
    n_q_heads, n_kv_heads = q.shape[-3], k.shape[-3]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_q_heads}) must be a multiple of key/value heads ({n_kv_heads})")
    group = n_q_heads // n_kv_heads
    return k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)


def scores(q, k, *, causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None):
    """The logits ``S = scale * Q K^T``, soft-capped, minus ALiBi's distance penalty, with ``-inf``
    where the causal mask or the window hides a key.

    Args:
        q: queries ``(..., Nq, d_k)``, any floating dtype (float64 for reference results).
        k: keys ``(..., Nk, d_k)``, with the same leading dimensions as ``q``.
        causal: set the logits of hidden keys to ``-inf`` (bottom-right aligned, :func:`causal_mask`).
        scale: multiplies ``Q K^T``; ``1/sqrt(d_k)`` by default.
        window_size: ``(left, right)``: query ``i`` sees keys ``p_i - left <= j <= p_i + right`` with
            ``p_i = i + Nk - Nq``; ``-1`` is unbounded on that side (see :func:`window_mask`).
        softcap: ``c > 0`` replaces each scaled logit ``s`` by ``c * tanh(s / c)``; 0 is off.
        alibi_slopes: ``(H,)`` or ``(B, H)`` (4-D inputs): subtracts ``slope_h * |p_i - j|`` after the cap.

    Returns:
        ``S`` of shape ``(..., Nq, Nk)`` in the dtype of ``q``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-2, -1))
    n_q, n_k = q.shape[-2], k.shape[-2]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        p = torch.arange(n_q, device=s.device)[:, None] + (n_k - n_q)
        distance = (p - torch.arange(n_k, device=s.device)[None, :]).abs().to(s.dtype)
        slopes = alibi_slopes.to(s.dtype)
        slopes = slopes[:, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        s = s - slopes * distance
    if causal or tuple(window_size) != (-1, -1):
        s = s.masked_fill(~window_mask(n_q, n_k, window_size, causal, device=s.device), float("-inf"))
    return s


def _masked_softmax(s):
    """Row softmax of ``s`` and its log-sum-exp; a row that is all ``-inf`` gives zeros and lse ``-inf``."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no visible key
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    return e / torch.where(l > 0, l, torch.ones_like(l)), (m + torch.log(l)).squeeze(-1)


def probabilities(q, k, *, causal=False, scale=None):
    """The attention matrix ``P = softmax(S)`` (row-wise), with ``S`` from :func:`scores`.

    Takes the arguments of :func:`scores`. Returns ``P`` of shape ``(..., Nq, Nk)``, whose rows sum
    to 1; the row of a query that sees no key is all zeros (not NaN).
    """
    return _masked_softmax(scores(q, k, causal=causal, scale=scale))[0]


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None):
    """Softmax attention ``O = softmax(scale * Q K^T) V``, computed with the full score matrix.

    Plain PyTorch, differentiable by autograd, in any floating dtype (the book uses float64) and on
    any device; it builds the ``(Nq, Nk)`` matrices ``S`` and ``P``, so it is for checking, not for
    long sequences.

    Args:
        q: queries ``(..., Nq, d_k)``; in 4-D SDPA layout ``(B, Hq, Nq, d_k)``.
        k: keys ``(..., Nk, d_k)``; in 4-D layout ``Hkv`` may divide ``Hq`` (grouped-query).
        v: values ``(..., Nk, d_v)``.
        causal: hide keys ``j > i + Nk - Nq`` from query ``i`` (bottom-right alignment).
        scale: multiplies the logits; ``1/sqrt(d_k)`` by default.
        return_lse: also return the row log-sum-exp ``log sum_j exp(S_ij)`` (natural log).
        window_size, softcap, alibi_slopes: as in :func:`attnpkg.flash_attention` (see :func:`scores`).

    Returns:
        ``O`` of shape ``(..., Nq, d_v)``, and with ``return_lse`` the log-sum-exp ``(..., Nq)``.
        A query row that sees no key outputs zeros and has lse ``-inf``; no NaN is produced.

    Raises:
        ValueError: if grouped-query heads do not divide (see :func:`expand_kv_heads`).
    """
    k, v = expand_kv_heads(q, k, v)
    p, lse = _masked_softmax(scores(q, k, causal=causal, scale=scale, window_size=window_size, softcap=softcap,
                                    alibi_slopes=alibi_slopes))
    o = p @ v
    return (o, lse) if return_lse else o


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, alibi_slopes=None, return_lse=False, **options):
    """Packed sequences (``q``: ``(total_q, H, D)``, int ``cu_seqlens``): :func:`attention` on each
    sequence alone, concatenated; lse is ``(H, total_q)``. ``options``: causal, scale, window_size, softcap."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qb, kb, vb = (t[a:e].transpose(0, 1)[None] for t, a, e in ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]),
                                                                  (v, ck[b], ck[b + 1])))
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b])
        if kb.shape[-2] == 0:                       # no key: zeros and lse -inf, as the kernels give
            o = qb.new_zeros(qb.shape[:-1] + vb.shape[-1:])
            lse = qb.new_full(qb.shape[:-1], float("-inf"))
        else:
            o, lse = attention(qb, kb, vb, return_lse=True, alibi_slopes=slopes, **options)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    o, lse = torch.cat(outs, 0), torch.cat(lses, 1)
    return (o, lse) if return_lse else o


def split_heads(x, n_heads):
    """``(..., N, H*d) -> (..., H, N, d)``: head ``h`` takes columns ``h*d:(h+1)*d``.

    Args:
        x: a projection such as ``X W^Q``, ``(..., N, H*d)``.
        n_heads: ``H``; it must divide the last dimension.

    Returns:
        A view of shape ``(..., H, N, d)``, the SDPA layout.
    """
    *lead, n, hd = x.shape
    return x.reshape(*lead, n, n_heads, hd // n_heads).transpose(-3, -2)


def merge_heads(x):
    """``(..., H, N, d) -> (..., N, H*d)``: the inverse of :func:`split_heads` (Concat of the heads).

    Args:
        x: per-head tensors ``(..., H, N, d)``.

    Returns:
        ``Concat(head_1, ..., head_H)`` of shape ``(..., N, H*d)``.
    """
    *lead, h, n, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, n, h * d)


def multihead_attention(x_q, x_k, x_v, w_q, w_k, w_v, w_o, n_heads, *, causal=False):
    """Multi-head attention ``Y = Concat(head_1, ..., head_H) W^O`` with ``head_h = Attention(X_q W^Q_h, X_k W^K_h, X_v W^V_h)``.

    Args:
        x_q: query inputs ``(..., Nq, d_model)``.
        x_k: key inputs ``(..., Nk, d_model)`` (pass one tensor three times for self-attention).
        x_v: value inputs ``(..., Nk, d_model)``.
        w_q: ``(d_model, H*d_k)``; head ``h`` owns columns ``h*d_k:(h+1)*d_k``.
        w_k: ``(d_model, H*d_k)``.
        w_v: ``(d_model, H*d_v)``.
        w_o: ``(H*d_v, d_model)``; head ``h`` owns rows ``h*d_v:(h+1)*d_v``.
        n_heads: ``H``. The logits are scaled by ``1/sqrt(d_k)``.
        causal: bottom-right aligned causal mask in every head (:func:`causal_mask`).

    Returns:
        ``Y`` of shape ``(..., Nq, d_model)``.
    """
    q = split_heads(x_q @ w_q, n_heads)
    k = split_heads(x_k @ w_k, n_heads)
    v = split_heads(x_v @ w_v, n_heads)
    return merge_heads(attention(q, k, v, causal=causal)) @ w_o
