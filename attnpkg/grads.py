"""Closed-form backward passes, written from the formulas the book derives (no autograd inside).

Each function takes the forward inputs and the upstream gradient ``dY = dL/dY`` and returns
``dL/d(input)`` for every input. Shapes and conventions are those of :mod:`attnpkg.reference`.
The equation numbers refer to the book's chapters.
"""
import math

import torch

from .reference import merge_heads, probabilities, split_heads

__all__ = ["softmax_jacobian", "softmax_backward", "matmul_backward", "attention_backward",
           "multihead_backward"]


def softmax_jacobian(p):
    """The softmax Jacobian ``J = diag(p) - p p^T`` for each row ``p`` of ``(..., N)``.

    ``J[..., j, k] = dp_j / ds_k = p_j (delta_jk - p_k)``. It is symmetric, and each of its rows
    sums to zero.

    Args:
        p: probabilities ``(..., N)``, each row the softmax of a row of logits.

    Returns:
        ``J`` of shape ``(..., N, N)``, in the dtype of ``p``.
    """
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def softmax_backward(p, dp):
    """The vector-Jacobian product ``ds = J^T dp = p * (dp - <dp, p>)`` row by row, without building ``J``.

    Args:
        p: probabilities ``(..., N)`` (the softmax's output, saved by the forward pass).
        dp: the upstream gradient ``dL/dp``, the shape of ``p``.

    Returns:
        ``ds = dL/ds``, the shape of ``p``; each row sums to zero.
    """
    return p * (dp - (dp * p).sum(dim=-1, keepdim=True))


def _sum_to(x, shape):
    """Sum a broadcast gradient back down to ``shape`` (the weights are shared over batch dimensions)."""
    while x.dim() > len(shape):
        x = x.sum(dim=0)
    return x


def matmul_backward(x, w, dy):
    """Gradients of ``Y = X W``: ``dX = dY W^T`` and ``dW = X^T dY`` (summed over any batch dimensions of ``X``).

    Args:
        x: ``(..., N, d_in)``; rows are tokens.
        w: ``(d_in, d_out)``, shared by every batch element.
        dy: the upstream gradient ``dL/dY``, ``(..., N, d_out)``.

    Returns:
        ``(dx, dw)`` with the shapes of ``x`` and ``w``.
    """
    dx = dy @ w.transpose(-2, -1)
    dw = _sum_to(x.transpose(-2, -1) @ dy, w.shape)
    return dx, dw


def attention_backward(q, k, v, do, *, causal=False, scale=None):
    """Gradients of ``O = softmax(scale * Q K^T) V`` with respect to ``Q``, ``K`` and ``V``.

    With ``P`` the attention probabilities::

        dV = P^T dO                      dP = dO V^T
        D  = rowsum(dO * O)              dS = P * (dP - D)      (softmax backward, row by row)
        dQ = scale * dS K                dK = scale * dS^T Q

    Grouped-query inputs (4-D, ``Hq = G * Hkv``) return ``dK, dV`` summed over each group of query heads.

    Args:
        q: queries ``(..., Nq, d_k)``.
        k: keys ``(..., Nk, d_k)``.
        v: values ``(..., Nk, d_v)``.
        do: the upstream gradient ``dL/dO``, ``(..., Nq, d_v)``.
        causal: bottom-right aligned causal mask, as in :func:`attnpkg.reference.attention`.
        scale: ``1/sqrt(d_k)`` by default.

    Returns:
        ``(dq, dk, dv)`` with the shapes of ``q``, ``k`` and ``v``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_q_heads, n_kv_heads = q.shape[-3] if q.dim() >= 3 else 1, k.shape[-3] if k.dim() >= 3 else 1
    group = n_q_heads // n_kv_heads
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    p = probabilities(q, k, causal=causal, scale=scale)
    o = p @ v
    dv = p.transpose(-2, -1) @ do
    dp = do @ v.transpose(-2, -1)
    delta = (do * o).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta)
    dq = scale * (ds @ k)
    dk = scale * (ds.transpose(-2, -1) @ q)
    if group > 1:
        dk = dk.unflatten(-3, (n_kv_heads, group)).sum(dim=-3)
        dv = dv.unflatten(-3, (n_kv_heads, group)).sum(dim=-3)
    return dq, dk, dv


def multihead_backward(x_q, x_k, x_v, w_q, w_k, w_v, w_o, dy, n_heads, *, causal=False):
    """Gradients of :func:`attnpkg.reference.multihead_attention` with respect to all seven inputs.

    Writing ``A = Concat(head_1..head_H)`` (``(..., Nq, H*d_v)``) and ``Q = X_q W^Q`` etc.::

        dW^O = A^T dY            dA = dY (W^O)^T    -> split into per-head dO_h
        (dQ_h, dK_h, dV_h) = attention_backward(Q_h, K_h, V_h, dO_h)
        dW^Q = X_q^T dQ          dX_q = dQ (W^Q)^T      (likewise for K and V)

    where ``dQ = Concat_h dQ_h``. Weight gradients are summed over batch dimensions. For
    self-attention (one ``X`` passed three times), ``dL/dX = dX_q + dX_k + dX_v``.

    Args:
        x_q: query inputs ``(..., Nq, d_model)``.
        x_k: key inputs ``(..., Nk, d_model)``.
        x_v: value inputs ``(..., Nk, d_model)``.
        w_q: ``(d_model, H*d_k)``.
        w_k: ``(d_model, H*d_k)``.
        w_v: ``(d_model, H*d_v)``.
        w_o: ``(H*d_v, d_model)``.
        dy: the upstream gradient ``dL/dY``, ``(..., Nq, d_model)``.
        n_heads: ``H``.
        causal: bottom-right aligned causal mask in every head.

    Returns:
        A dict with keys ``x_q, x_k, x_v, w_q, w_k, w_v, w_o``, each gradient the shape of its input.
    """
    q_all, k_all, v_all = x_q @ w_q, x_k @ w_k, x_v @ w_v
    q, k, v = (split_heads(t, n_heads) for t in (q_all, k_all, v_all))
    p = probabilities(q, k, causal=causal)
    a = merge_heads(p @ v)
    da = dy @ w_o.transpose(-2, -1)
    dq, dk, dv = attention_backward(q, k, v, split_heads(da, n_heads), causal=causal)
    grads = {"w_o": _sum_to(a.transpose(-2, -1) @ dy, w_o.shape)}
    for name, x, w, dproj in (("q", x_q, w_q, dq), ("k", x_k, w_k, dk), ("v", x_v, w_v, dv)):
        grads["x_" + name], grads["w_" + name] = matmul_backward(x, w, merge_heads(dproj))
    return {key: grads[key] for key in ("x_q", "x_k", "x_v", "w_q", "w_k", "w_v", "w_o")}
