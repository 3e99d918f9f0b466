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
    attnpkg.check               a conformance report for any attention function (python -m attnpkg.check)
    attnpkg.exercises           the checkers of the book's exercises
    attnpkg.notebook            setup() and show_source() for the book's chapters
    attnpkg.bench               python -m attnpkg.bench: the benchmark against torch's SDPA backends

Shapes are SDPA's ``(batch, heads, seq, head_dim)``; rows are tokens and ``Y = X W``. The book's
page "API reference" documents each of them.

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
from . import distributed  # noqa: E402  (context-parallel ring attention)

__all__ = ["__version__", "MultiHeadAttention", "check", "distributed", "exercises", "flash_attention",
           "flash_attention_varlen", "grads", "masks", "notebook", "reference", "softmax"]


def __getattr__(name):
    """``attnpkg.check`` and ``attnpkg.exercises`` load on first use (so ``python -m attnpkg.check`` runs it once)."""
    if name in ("check", "exercises"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
