"""``MultiHeadAttention``: a multi-head attention layer whose core is :func:`attnpkg.flash_attention`."""
import math

import torch
from torch import nn

from .attention import flash_attention
from .reference import merge_heads, split_heads

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """``Y = Concat(head_1, ..., head_H) W^O`` with ``head_h = softmax(Q_h K_h^T / sqrt(d_k)) V_h``.

    The weights follow the book's convention (rows are tokens, ``Y = X W``), with no biases:
    ``w_q, w_k: (d_model, H * d_head)``, ``w_v: (d_model, H * d_head)``, ``w_o: (H * d_head, d_model)``;
    head ``h`` owns columns ``h*d_head:(h+1)*d_head`` (and the same rows of ``w_o``). So
    ``attnpkg.reference.multihead_attention`` and ``attnpkg.grads.multihead_backward`` take its
    parameters as they are.

    Args:
        d_model: width of the inputs and outputs.
        n_heads: number of heads ``H``.
        d_head: width of each head (the kernel needs one width for queries, keys and values);
            ``d_model // n_heads`` by default.
        causal: mask future keys (bottom-right aligned, see :func:`attnpkg.flash_attention`).
        device: where the parameters live (a CUDA GPU, or the CPU through Triton's interpreter).
        dtype: of the parameters: float16, bfloat16 or float32, the dtypes of
            :func:`attnpkg.flash_attention`.

    ``forward(x_q, x_k=None, x_v=None)`` takes ``(B, N, d_model)`` inputs: ``x_k`` defaults to
    ``x_q`` (self-attention) and ``x_v`` to ``x_k`` (cross-attention over one memory, ``x_k``); ``x_v``
    without ``x_k`` is an error.

    Raises:
        ValueError: if ``d_model // n_heads`` is 0 and no ``d_head`` is given.

    Its input errors (dtype, device, a head width over 256) are those of
    :func:`attnpkg.flash_attention`.
    """

    def __init__(self, d_model, n_heads, d_head=None, *, causal=False, device=None, dtype=None):
        super().__init__()
        d_head = d_model // n_heads if d_head is None else d_head
        if d_head < 1:
            raise ValueError(f"MultiHeadAttention: d_model ({d_model}) // n_heads ({n_heads}) is 0; pass d_head")
        self.d_model, self.n_heads, self.d_head, self.causal = d_model, n_heads, d_head, causal
        factory = dict(device=device, dtype=dtype)
        self.w_q = nn.Parameter(torch.empty(d_model, n_heads * d_head, **factory))
        self.w_k = nn.Parameter(torch.empty(d_model, n_heads * d_head, **factory))
        self.w_v = nn.Parameter(torch.empty(d_model, n_heads * d_head, **factory))
        self.w_o = nn.Parameter(torch.empty(n_heads * d_head, d_model, **factory))
        self.reset_parameters()

    def reset_parameters(self):
        """Draw every weight uniformly from ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``, fan-in being its number of rows."""
        for w in (self.w_q, self.w_k, self.w_v, self.w_o):
            bound = 1.0 / math.sqrt(w.shape[0])      # fan-in: the rows of Y = X W
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x_q, x_k=None, x_v=None):
        """Multi-head attention of ``x_q`` over ``x_k``, ``x_v``.

        Args:
            x_q: ``(B, Nq, d_model)``.
            x_k: ``(B, Nk, d_model)``; ``x_q`` by default (self-attention).
            x_v: ``(B, Nk, d_model)``; ``x_k`` by default.

        Returns:
            ``Y`` of shape ``(B, Nq, d_model)``, differentiable in the inputs and the weights.

        Raises:
            ValueError: if ``x_v`` is given without ``x_k``.
        """
        if x_k is None and x_v is not None:
            raise ValueError("MultiHeadAttention: x_v given without x_k; pass x_k too (x_v defaults to x_k, "
                             "not the other way round)")
        x_k = x_q if x_k is None else x_k
        x_v = x_k if x_v is None else x_v
        q = split_heads(x_q @ self.w_q, self.n_heads)
        k = split_heads(x_k @ self.w_k, self.n_heads)
        v = split_heads(x_v @ self.w_v, self.n_heads)
        return merge_heads(flash_attention(q, k, v, causal=self.causal)) @ self.w_o

    def extra_repr(self):
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}, causal={self.causal}"
