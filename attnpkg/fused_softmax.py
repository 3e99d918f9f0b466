"""``softmax``: a row softmax whose forward and backward passes are Triton kernels."""
import os

import torch

from .kernels.softmax import softmax_backward_kernel, softmax_forward_kernel

__all__ = ["softmax"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(x):
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _manual_bf16(x):
    return os.environ.get("TRITON_INTERPRET") == "1" and x.dtype == torch.bfloat16


def _block(n_cols):
    cap = 1024 if os.environ.get("TRITON_INTERPRET") == "1" else 4096
    return min(cap, max(16, 1 << (n_cols - 1).bit_length()))


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        rows = _rows(x)
        p = torch.empty_like(rows)
        if rows.numel():
            softmax_forward_kernel[(rows.shape[0],)](rows, p, rows.stride(0), p.stride(0), rows.shape[1],
                                                     BLOCK=_block(rows.shape[1]), MANUAL_BF16=_manual_bf16(x))
        p = p.view(x.shape)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, dp):
        (p,) = ctx.saved_tensors
        p_rows, dp_rows = _rows(p), _rows(dp)
        dx = torch.empty_like(p_rows)
        if p_rows.numel():
            softmax_backward_kernel[(p_rows.shape[0],)](p_rows, dp_rows, dx, p_rows.stride(0), dp_rows.stride(0),
                                                        dx.stride(0), p_rows.shape[1], BLOCK=_block(p_rows.shape[1]),
                                                        MANUAL_BF16=_manual_bf16(p))
        return dx.view(p.shape)


def softmax(x):
    """Softmax over the last dimension, ``p = exp(x - max) / sum(exp(x - max))``, in Triton.

    Differentiable: its backward kernel computes ``dx = p * (dp - rowsum(dp * p))``, the
    vector-Jacobian product, without building the Jacobian ``diag(p) - p p^T``.

    Args:
        x: a tensor of float16, bfloat16 or float32, any shape with at least one dimension;
            on a CUDA GPU, or on the CPU through Triton's interpreter when no GPU is present.

    Returns:
        ``p`` with the shape and dtype of ``x`` (computed in float32). Rows of any length are
        swept in tiles of at most 4096 entries (1024 in the interpreter).

    Raises:
        TypeError: if ``x`` is not a tensor, or its dtype is not float16, bfloat16 or float32.
        ValueError: if ``x`` is a scalar, or on a device other than CUDA or (without a GPU) the CPU.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"softmax: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("softmax: x must have at least one dimension, got a scalar")
    if x.dtype not in _DTYPES:
        hint = "; use torch.softmax for float64" if x.dtype == torch.float64 else ""
        raise TypeError(f"softmax: dtype {x.dtype} is not supported (float16, bfloat16, float32){hint}")
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("softmax: CPU tensors run through Triton's interpreter, which is off because a CUDA GPU is "
                         "present; move x to the GPU")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"softmax: tensors on {x.device.type} are not supported")
    return _Softmax.apply(x)
