"""Row softmax and its backward pass in Triton (the softmax chapter's kernels).

One program per row. The forward pass makes two sweeps over the row in tiles of ``BLOCK``:
the first keeps a running maximum ``m`` and a running sum ``l`` of ``exp(x - m)`` (rescaling
``l`` whenever ``m`` grows: the online softmax), the second writes ``exp(x - m) / l``. The
backward pass computes ``dx = p * (dp - <dp, p>)`` without the Jacobian, also in two sweeps.
"""
import triton
import triton.language as tl

from .tiles import round_to

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def softmax_forward_kernel(X, P, stride_x, stride_p, n_cols, BLOCK: tl.constexpr, MANUAL_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)   # per-lane running max and sum
    l = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(X + row * stride_x + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # lanes that have seen only padding
        l = l * tl.math.exp2((m - m_safe) * LOG2E) + tl.math.exp2((x - m_safe) * LOG2E)
        m = m_new
    # Merge the lanes: the row max, and each lane's sum rescaled to it.
    m_row = tl.max(m, 0)
    l_row = tl.sum(l * tl.math.exp2((m - m_row) * LOG2E), 0)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        x = tl.load(X + row * stride_x + start + cols, mask=ok, other=float("-inf")).to(tl.float32)
        p = tl.math.exp2((x - m_row) * LOG2E) / l_row
        tl.store(P + row * stride_p + start + cols, round_to(p, P.dtype.element_ty, MANUAL_BF16), mask=ok)


@triton.jit
def softmax_backward_kernel(P, DP, DX, stride_p, stride_dp, stride_dx, n_cols, BLOCK: tl.constexpr,
                            MANUAL_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        p = tl.load(P + row * stride_p + start + cols, mask=ok, other=0.0).to(tl.float32)
        dp = tl.load(DP + row * stride_dp + start + cols, mask=ok, other=0.0).to(tl.float32)
        dot += p * dp
    dot_row = tl.sum(dot, 0)                       # <dp, p> for this row
    for start in range(0, n_cols, BLOCK):
        ok = start + cols < n_cols
        p = tl.load(P + row * stride_p + start + cols, mask=ok, other=0.0).to(tl.float32)
        dp = tl.load(DP + row * stride_dp + start + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + start + cols, round_to(p * (dp - dot_row), DX.dtype.element_ty, MANUAL_BF16), mask=ok)
