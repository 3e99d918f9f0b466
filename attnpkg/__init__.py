"""attnpkg: FlashAttention forward and backward in Triton, with the reference passes and the
closed-form gradients that the companion book derives.

Public API:
    attnpkg.flash_attention     FlashAttention forward and backward (Triton), a drop-in for SDPA
    attnpkg.flash_attention_varlen  the same over packed sequences of different lengths
    attnpkg.masks               the tile schedule of causal, sliding-window and packed masks
    attnpkg.MultiHeadAttention  an nn.Module around flash_attention
    attnpkg.softmax             row softmax with a Triton backward kernel
    attnpkg.reference           materialised attention (ground truth), multi-head attention
    attnpkg.grads               closed-form backward passes (softmax, matmul, attention, multi-head)

On a machine without a CUDA GPU the Triton kernels run on CPU tensors through Triton's
interpreter. It must be switched on before any kernel is defined, so it is done here, on import.
"""
import os

import torch

__version__ = "0.1.0"

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import grads, masks, notebook, reference  # noqa: E402
from .attention import flash_attention  # noqa: E402
from .fused_softmax import softmax  # noqa: E402
from .modules import MultiHeadAttention  # noqa: E402
from .varlen import flash_attention_varlen  # noqa: E402

__all__ = ["__version__", "MultiHeadAttention", "flash_attention", "flash_attention_varlen", "grads", "masks", "notebook", "reference", "softmax"]
