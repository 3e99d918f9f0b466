"""Checkers for the book's "Your turn" exercises: each grades a reader's function in place.

    from attnpkg import exercises
    exercises.softmax_backward(my_softmax_backward)      # a report: which case, which entry, what is wrong

A checker calls the reader's function on fresh inputs, compares each result with the formula the
book derives (in float64, or float32 for the Triton exercises) and says what is wrong in the words of
:func:`attnpkg.check.describe_mismatch`: the wrong shape, a transpose, a constant factor, NaN, the
right numbers in the wrong places, the worst entry, or one of the typical mistakes that the
exercise lists. A function that still raises ``NotImplementedError`` (the book's empty exercise
cells) gets "not attempted yet" and no failure, so that the page still runs; ``.assert_ok()`` on
the report raises unless every case passed (the book's solution cells use it).

The Triton exercises take a ``@triton.jit`` function, which a small kernel here calls in its loop; on
a machine without a GPU it runs through Triton's interpreter.
"""
import math

import torch
import triton
import triton.language as tl

from .check import Finding, Report, _quiet, describe_mismatch, max_error, reference_pass

__all__ = ["softmax_backward", "logsumexp", "matmul_backward", "linear_backward", "attention_backward",
           "causal_mask", "split_heads", "projection_weight_gradient", "online_update", "merge_partials",
           "forward_tile", "descriptor_origin", "delta", "dq_tile", "start_values", "attention_flops",
           "causal_tile_fraction", "five_product_memory", "window_mask", "softcap_backward", "pair_index",
           "window_tiles", "ring_merge", "causal_work", "ring_waits"]

f64 = torch.float64
LOG2E = 1.4426950408889634


class _NotAttempted(Exception):
    pass


def _call(fn, args):
    try:
        return fn(*args)
    except NotImplementedError as e:
        raise _NotAttempted from e


def _as_tuple(x, n):
    if n == 1:
        return (x,)
    if not isinstance(x, (tuple, list)) or len(x) != n:
        raise TypeError(f"expected a tuple of {n} results, got {type(x).__name__}"
                        + (f" of length {len(x)}" if isinstance(x, (tuple, list)) else ""))
    return tuple(x)


def _grade(title, fn, cases, names, *, atol=1e-9):
    """Run ``fn`` on each case and compare; a case is (label, args, expected tuple, alternatives dict).

    ``alternatives[name]`` lists (description, tensor) of typical wrong answers for that output."""
    name_of = getattr(fn, "__name__", "the function")
    findings = []
    for label, args, want, alternatives in cases:
        try:
            got = _as_tuple(_call(fn, args), len(names))
        except _NotAttempted:
            message = (f"not attempted yet: fill in {name_of} above (it still raises NotImplementedError), "
                       "run its cell, then this one again")
            return Report(f"Your turn: {title}", [Finding(title, "", "todo", message)])
        except Exception as e:  # noqa: BLE001 - the reader's code: report, don't crash the page
            findings.append(Finding(title, label, "FAIL", f"{name_of} raised {type(e).__name__}: {e}",
                                    diagnosis="raised"))
            continue
        messages = []
        for name, g, w in zip(names, got, want):
            w = torch.as_tensor(w, dtype=f64)
            g_t = torch.as_tensor(g).detach() if isinstance(g, (int, float, torch.Tensor)) else g
            size = max(1.0, w[torch.isfinite(w)].abs().max().item() if torch.isfinite(w).any() else 1.0)
            tol = atol * size
            if isinstance(g_t, torch.Tensor) and g_t.shape == w.shape and max_error(g_t.double(), w) <= tol:
                continue
            if isinstance(g_t, torch.Tensor) and g_t.dtype == torch.bool and w.dtype != torch.bool:
                g_t = g_t.double()
            messages.append(describe_mismatch(name, g_t, w, tol, alternatives.get(name, ())))
        if messages:
            findings.append(Finding(title, label, "FAIL", "; ".join(messages), diagnosis=messages[0]))
        else:
            findings.append(Finding(title, label, "pass", ", ".join(names) + " right"))
    return Report(f"Your turn: {title}", findings)


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator, dtype=f64)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Chapter 1: the softmax

def softmax_backward(fn):
    """``fn(p, dp)``: ``ds = J^T dp`` for each row (last dim) of the probabilities ``p``, without building J."""
    g = _gen(1)
    cases = []
    for label, shape in (("one row of 6", (6,)), ("a batch of rows (3, 5, 8)", (3, 5, 8))):
        p = torch.softmax(_randn(*shape, generator=g), dim=-1)
        dp = _randn(*shape, generator=g)
        want = p * (dp - (dp * p).sum(-1, keepdim=True))
        alts = {"ds": [("this is p * dp, the diagonal term alone: the correction - p <dp, p> is missing", p * dp),
                       ("the correction must use <dp, p> = sum_j dp_j p_j, not the plain sum of dp",
                        p * (dp - dp.sum(-1, keepdim=True))),
                       ("the inner product runs over the wrong dimension (it must be the last, within a row)",
                        p * (dp - (dp * p).sum(0, keepdim=True)) if len(shape) > 1 else p * 0 + float("nan"))]}
        cases.append((label, (p, dp), (want,), alts))
    return _grade("softmax_backward", fn, cases, ["ds"])


def logsumexp(fn):
    """``fn(s)``: ``log sum_j exp(s_j)`` over the last dim, safe for logits of any size."""
    g = _gen(2)
    cases = []
    for label, s in (("logits of size ~3", 3 * _randn(4, 7, generator=g)),
                     ("logits near +1000 (exp overflows)", 1000 + _randn(4, 7, generator=g)),
                     ("logits near -1000 (exp underflows)", -1000 + _randn(4, 7, generator=g))):
        m = s.amax(-1, keepdim=True)
        want = torch.logsumexp(s, -1)
        alts = {"lse": [("the row maximum m is not added back: log sum exp(s - m) + m", torch.log(torch.exp(s - m).sum(-1))),
                        ("it keeps the last dimension: return shape (..., ) not (..., 1)", want[..., None])]}
        cases.append((label, (s,), (want,), alts))
    report = _grade("logsumexp", fn, cases, ["lse"])
    for f in report.failures:
        if "infinite" in f.message or "NaN" in f.message:
            f.message += " -- exp overflows or underflows: subtract the row maximum first"
    return report


# ---------------------------------------------------------------------------------------------------
# Chapter 2: matrix products

def matmul_backward(fn):
    """``fn(x, w, dy)``: ``(dx, dw)`` for ``y = x @ w``; ``x`` may have batch dimensions, ``w`` is shared."""
    g = _gen(3)
    cases = []
    for label, xshape in (("x (5, 3), w (3, 4)", (5, 3)), ("x (2, 5, 3) in a batch, w (3, 4) shared", (2, 5, 3))):
        x, w = _randn(*xshape, generator=g), _randn(3, 4, generator=g)
        dy = _randn(*xshape[:-1], 4, generator=g)
        dx, dw_each = dy @ w.T, x.transpose(-2, -1) @ dy
        dw = dw_each if dw_each.dim() == 2 else dw_each.sum(0)
        not_summed = "dW is not summed over the batch: w is shared, so its gradient adds up every batch entry"
        alts = {"dw": [(not_summed, dw_each)] if dw_each.dim() > 2 else []}
        cases.append((label, (x, w, dy), (dx, dw), alts))
    return _grade("matmul_backward", fn, cases, ["dx", "dw"])


def linear_backward(fn):
    """``fn(x, w, b, dy)``: ``(dx, dw, db)`` for ``y = x @ w + b`` (the bias added to every row)."""
    g = _gen(4)
    x, w, b = _randn(6, 3, generator=g), _randn(3, 4, generator=g), _randn(4, generator=g)
    dy = _randn(6, 4, generator=g)
    alts = {"db": [("db is the mean of dY's rows, but the bias is added to every row: it is their sum", dy.mean(0)),
                   ("db is dY itself: the bias is shared by the rows, sum them", dy)]}
    cases = [("x (6, 3), w (3, 4), b (4,)", (x, w, b, dy), (dy @ w.T, x.T @ dy, dy.sum(0)), alts)]
    return _grade("linear_backward", fn, cases, ["dx", "dw", "db"])


# ---------------------------------------------------------------------------------------------------
# Chapter 3: one head

def attention_backward(fn):
    """``fn(q, k, v, do, scale)``: ``(dq, dk, dv)`` of ``O = softmax(scale Q K^T) V`` for one head (2-D inputs)."""
    g = _gen(5)
    cases = []
    for label, nq, nk, d in (("Nq = Nk = 6, d = 4", 6, 6, 4), ("Nq = 5, Nk = 7, d = 3", 5, 7, 3)):
        q, k, v, do = (_randn(n, d, generator=g) for n in (nq, nk, nk, nq))
        scale = 1 / math.sqrt(d)
        ref = reference_pass(q, k, v, do, scale=scale)
        p = torch.softmax(scale * q @ k.T, -1)
        ds_no_d = p * (do @ v.T)
        alts = {"dq": [("dQ misses the factor scale: dQ = scale dS K", ref["dq"] / scale),
                       ("dS lacks the correction D: dS = P * (dP - D) with D = rowsum(dO * O)", scale * ds_no_d @ k)],
                "dk": [("dK misses the factor scale: dK = scale dS^T Q", ref["dk"] / scale),
                       ("dS lacks the correction D: dS = P * (dP - D) with D = rowsum(dO * O)", scale * ds_no_d.T @ q)],
                "dv": [("dV = P dO is missing the transpose: dV = P^T dO", p @ do)] if nq == nk else []}
        cases.append((label, (q, k, v, do, scale), (ref["dq"], ref["dk"], ref["dv"]), alts))
    return _grade("attention_backward", fn, cases, ["dq", "dk", "dv"])


def causal_mask(fn):
    """``fn(n_q, n_k)``: boolean ``(n_q, n_k)``, True where query i sees key j: ``j <= i + n_k - n_q`` (bottom-right)."""
    cases = []
    for n_q, n_k in ((4, 4), (3, 6), (6, 3)):
        i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
        want = (j <= i + n_k - n_q).double()
        top_left = ("aligned top-left (query i sees keys j <= i); the book aligns the last query with the last key, "
                    "j <= i + Nk - Nq")
        alts = {"mask": [(top_left, (j <= i).double()),
                         ("the diagonal is excluded: a query sees its own key, use <=, not <",
                          (j < i + n_k - n_q).double()),
                         ("True and False are swapped: True marks the keys a query may see",
                          (j > i + n_k - n_q).double())]}
        cases.append((f"n_q = {n_q}, n_k = {n_k}", (n_q, n_k), (want,), alts))
    return _grade("causal_mask", fn, cases, ["mask"])


# ---------------------------------------------------------------------------------------------------
# Chapter 4: several heads

def split_heads(fn):
    """``fn(x, n_heads)``: ``(N, H*d) -> (H, N, d)``, head h taking columns ``h*d:(h+1)*d``."""
    g = _gen(6)
    x = _randn(5, 3 * 4, generator=g)
    want = x.reshape(5, 3, 4).transpose(0, 1)
    alts = {"heads": [("a reshape to (H, N, d) without the transpose mixes tokens and heads: reshape to (N, H, d), "
                       "then transpose", x.reshape(3, 5, 4)),
                      ("head h took every H-th column instead of the block h*d:(h+1)*d",
                       x.reshape(5, 4, 3).permute(2, 0, 1))]}
    return _grade("split_heads", fn, [("N = 5, H = 3, d = 4", (x, 3), (want,), alts)], ["heads"])


def projection_weight_gradient(fn):
    """``fn(x, dq_heads)``: ``dW^Q`` of shape ``(d_model, H*d_k)`` from ``x (N, d_model)`` and the per-head
    gradients ``dq_heads (H, N, d_k)`` of ``Q_h = X W^Q_h``."""
    g = _gen(7)
    x, dq = _randn(6, 5, generator=g), _randn(3, 6, 2, generator=g)
    want = torch.cat([x.T @ dq[h] for h in range(3)], dim=1)
    alts = {"dw_q": [("the heads were summed: each head owns its own columns of W^Q, so concatenate the heads' "
                      "gradients X^T dQ_h", x.T @ dq.sum(0)),
                     ("columns interleaved across heads: head h owns the block of columns h*d_k:(h+1)*d_k",
                      x.T @ dq.permute(1, 2, 0).reshape(6, 6))]}
    return _grade("projection_weight_gradient", fn, [("N = 6, d_model = 5, H = 3, d_k = 2", (x, dq), (want,), alts)],
                  ["dw_q"])


# ---------------------------------------------------------------------------------------------------
# Chapter 5: the FlashAttention forward pass

def online_update(fn):
    """``fn(m, l, acc, s_tile, v_tile)``: one step of the online softmax for one query row (natural exp):
    returns ``(m_new, l_new, acc_new)``. ``m``, ``l`` are 0-d tensors, ``acc`` is ``(d,)``, ``s_tile`` ``(n,)``,
    ``v_tile`` ``(n, d)``."""
    g = _gen(8)
    cases = []
    s_all, v_all = 3 * _randn(12, generator=g), _randn(12, 3, generator=g)
    m0, l0, a0 = torch.tensor(-math.inf, dtype=f64), torch.tensor(0.0, dtype=f64), torch.zeros(3, dtype=f64)
    # states after the first 4 keys, then a tile whose maximum is larger (the rescaling matters)
    s_all[4:8] += 4
    m1 = s_all[:4].max()
    l1, a1 = torch.exp(s_all[:4] - m1).sum(), torch.exp(s_all[:4] - m1) @ v_all[:4]
    for label, (m, l, a), sl in (("first tile, from m = -inf, l = 0, acc = 0", (m0, l0, a0), slice(0, 4)),
                                 ("second tile, larger maximum", (m1, l1, a1), slice(4, 8))):
        s_t, v_t = s_all[sl], v_all[sl]
        m_new = torch.maximum(m, s_t.max())
        alpha, p = torch.exp(m - m_new), torch.exp(s_t - m_new)
        want = (m_new, alpha * l + p.sum(), alpha * a + p @ v_t)
        alts = {"acc": [("acc is not rescaled by alpha = exp(m - m_new) before the new tile is added", a + p @ v_t)],
                "l": [("l is not rescaled by alpha = exp(m - m_new) before the new tile is added", l + p.sum())]}
        cases.append((label, (m.clone(), l.clone(), a.clone(), s_t, v_t), want, alts))
    return _grade("online_update", fn, cases, ["m", "l", "acc"])


def merge_partials(fn):
    """``fn(o1, lse1, o2, lse2)``: output and lse of one set of queries over two disjoint sets of keys, from
    each part's output ``(N, d)`` and lse ``(N,)``."""
    g = _gen(9)
    q, k, v = _randn(5, 4, generator=g), _randn(9, 4, generator=g), _randn(9, 4, generator=g)
    one, two, whole = (reference_pass(q, k[sl], v[sl]) for sl in (slice(0, 4), slice(4, 9), slice(0, 9)))
    alts = {"o": [("o is the plain average of o1 and o2: weight each by exp(lse_r - lse)", (one["o"] + two["o"]) / 2),
                  ("o = o1 + o2: each part must be weighted by exp(lse_r - lse)", one["o"] + two["o"])],
            "lse": [("lse = lse1 + lse2 multiplies the two sums; lse = log(exp(lse1) + exp(lse2)) adds them",
                     one["lse"] + two["lse"]),
                    ("lse = max(lse1, lse2) keeps the larger part only", torch.maximum(one["lse"], two["lse"]))]}
    cases = [("keys 0-3 and 4-8", (one["o"], one["lse"], two["o"], two["lse"]), (whole["o"], whole["lse"]), alts)]
    # a part that is empty for some queries: (0, -inf) must leave the other part unchanged
    lse_empty = torch.full((5,), -math.inf, dtype=f64)
    cases.append(("second part without keys: (o2, lse2) = (0, -inf)",
                  (one["o"], one["lse"], torch.zeros_like(one["o"]), lse_empty), (one["o"], one["lse"]), {}))
    return _grade("merge_partials", fn, cases, ["o", "lse"])


@triton.jit
def _forward_harness(Q, K, V, O, LSE, n_k, qk_scale, BODY: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """One program per query tile: the loop of the FlashAttention forward with the reader's body."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        k = tl.load(K + (start_n + offs_n)[:, None] * D + offs_d[None, :])
        v = tl.load(V + (start_n + offs_n)[:, None] * D + offs_d[None, :])
        acc, m_i, l_i = BODY(acc, m_i, l_i, q, k, v, qk_scale)
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], acc / l_i[:, None])
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453)


@triton.jit
def _dq_harness(Q, K, V, DO, LSE2, DELTA, DQ, n_k, qk_scale, scale, BODY: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """One program per query tile: the loop of the dQ kernel with the reader's body."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :])
    do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :])
    lse2 = tl.load(LSE2 + offs_m)
    delta = tl.load(DELTA + offs_m)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        k = tl.load(K + (start_n + offs_n)[:, None] * D + offs_d[None, :])
        v = tl.load(V + (start_n + offs_n)[:, None] * D + offs_d[None, :])
        dq = BODY(dq, q, do, lse2, delta, k, v, qk_scale)
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], dq * scale)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _is_jit(fn):
    """A @triton.jit function (compiled or interpreted) wraps the Python function as ``.fn``."""
    return callable(getattr(fn, "fn", None))


def forward_tile(body):
    """``body(acc, m_i, l_i, q, k, v, qk_scale)``, a ``@triton.jit`` function: fold one tile of keys ``k`` and
    values ``v`` ``(BLOCK_N, D)`` into the running state of a query tile ``q`` ``(BLOCK_M, D)`` in base 2
    (``qk_scale`` = scale * log2 e) and return the new ``(acc, m_i, l_i)``. The harness kernel runs the loop
    over the key tiles and finishes with ``o = acc / l`` and ``lse = (m + log2 l) ln 2``."""
    title = "forward_tile (Triton)"
    if not _is_jit(body):
        return Report(f"Your turn: {title}", [Finding(title, "", "FAIL", "forward_tile must be a @triton.jit function")])
    g = _gen(10)
    n_q, n_k, d, bm, bn = 32, 64, 16, 16, 16
    q, k, v = (_randn(n, d, generator=g) for n in (n_q, n_k, n_k))
    k[16:32] += 1.5 * q.mean(0)             # a later key tile with larger logits: the rescaling matters
    scale = 1 / math.sqrt(d)
    ref = reference_pass(q, k, v, scale=scale)
    dev = _device()
    q32, k32, v32 = (t.float().to(dev) for t in (q, k, v))
    o, lse = torch.empty_like(q32), torch.empty(n_q, device=dev)
    try:
        with _quiet():
            _forward_harness[(n_q // bm,)](q32, k32, v32, o, lse, n_k, scale * LOG2E, body,
                                           BLOCK_M=bm, BLOCK_N=bn, D=d)
    except Exception as e:  # noqa: BLE001
        return Report(f"Your turn: {title}", [Finding(title, "", "FAIL", f"the kernel failed: {type(e).__name__}: "
                                                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}")])
    o, lse = o.double().cpu(), lse.double().cpu()
    if (lse == -math.inf).all() or o.isnan().all():
        return Report(f"Your turn: {title}", [Finding(title, "", "todo", "not attempted yet: the body returns acc, m_i "
                                                      "and l_i unchanged (l stays 0); fill it in and run both cells again")])
    p_nat = torch.softmax(scale * LOG2E * q @ k.T, -1)      # exp instead of exp2 with the base-2 scale
    alts = {"o": [("natural exp of the base-2 logits: use tl.math.exp2 (qk_scale holds log2 e)", p_nat @ v),
                  ("acc is not rescaled by alpha = exp2(m_i - m_new) before the tile is added",
                   _no_rescale(q, k, v, scale, bn))],
            "lse": []}

    def fn():
        return o, lse
    fn.__name__ = "forward_tile"
    return _grade(title, lambda: fn(), [("Nq = 32, Nk = 64, D = 16, tiles 16 x 16", (), (ref["o"], ref["lse"]), alts)],
                  ["o", "lse"], atol=5e-3)


def descriptor_origin(fn):
    """``fn(b, h, first_row, stride_b, stride_h, stride_n)``: ``(row, column)`` where the rows of batch ``b``,
    head ``h`` start in a tensor descriptor that sees the tensor as a matrix of rows ``stride_n`` elements
    apart (chapter 5): head-major ``(B, H, N, D)``, SDPA's ``(B, N, H, D)`` transposed, packed ``(total, H, D)``
    (batch stride 0, the sequence starting at ``first_row``)."""
    cases = []
    layouts = (("contiguous (B, H, N, D) = (2, 3, 5, 8)", (120, 40, 8), 1, 2, 0),
               ("SDPA's (B, N, H, D) = (2, 5, 3, 8), transposed", (120, 8, 24), 1, 2, 0),
               ("packed (total, H, D) = (12, 4, 8), a sequence from row 7", (0, 8, 32), 0, 3, 7),
               ("packed with one head (total, 1, D) = (12, 1, 8), a sequence from row 5", (0, 8, 8), 0, 0, 5))
    for label, (stride_b, stride_h, stride_n), b, h, first_row in layouts:
        offset = b * stride_b + h * stride_h
        row, col = offset // stride_n + first_row, offset % stride_n
        alts = {"row": [("the sequence's first row is not added: packed sequences start at first_row",
                         torch.tensor(float(row - first_row))),
                        ("the head's offset is counted in rows, but a head of a token-major tensor is a block "
                         "of columns: split the element offset into whole rows and a remainder",
                         torch.tensor(float((b * stride_b + h * stride_h * stride_n) // stride_n + first_row)))],
                "column": [("the column is always 0: true when a head's rows follow each other, not when the "
                            "heads of a token sit side by side in one row", torch.tensor(0.0))]}
        args = (b, h, first_row, stride_b, stride_h, stride_n)
        cases.append((f"{label}, b = {b}, h = {h}", args, (torch.tensor(float(row)), torch.tensor(float(col))),
                      alts))
    return _grade("descriptor_origin", fn, cases, ["row", "column"])


def ring_waits(fn):
    """``fn(i, stages)``: for the i-th key tile a program loads into a ring of ``stages`` shared-memory slots (chapter 5,
    the warp-specialized forward), ``(slot, consumer_parity, producer_parity)``: the slot it lands in, the parity a
    consumer waits on (``full``) before reading it, and the parity the producer waits on (``empty``) before copying it.
    The right answer is read off a model of the barriers: each completes one phase per fill (``full``: the copy landed;
    ``empty``: both consumers released the fill), a fresh barrier counts as having completed a phase of parity 1, and a
    wait on parity p returns once the latest completed phase has parity p."""
    cases = []
    for stages in (2, 3):
        completed_full = [1] * stages            # parity of the latest completed phase (fresh: "phase -1", parity 1)
        completed_empty = [1] * stages
        slots, consumer, producer = [], [], []
        for i in range(4 * stages):
            slot = len(slots) % stages
            # The producer may copy once both consumers released the slot's previous fill: the parity of that
            # release (a fresh barrier reports parity 1 as completed).
            producer.append(completed_empty[slot])
            completed_full[slot] ^= 1              # the copy lands: the next phase of `full` completes
            consumer.append(completed_full[slot])  # the consumers wait for exactly that phase
            completed_empty[slot] ^= 1             # both consumers release the fill
            slots.append(slot)
        want = tuple(torch.tensor(x, dtype=f64) for x in (slots, consumer, producer))
        n = torch.arange(4 * stages, dtype=f64)
        alts = {"slot": [("i // stages is the fill number, not the slot: tiles go round the ring, slot i % stages",
                          torch.div(n, stages, rounding_mode="floor"))],
                "consumer_parity": [("i % 2 is the parity of a ring of one slot: with several, a slot's phases count "
                                     "its own fills, i // stages", n % 2)],
                "producer_parity": [("the producer's wait on the fill's own phase would wait for the consumers to "
                                     "release a tile that is not loaded yet (a deadlock): it waits for the previous "
                                     "fill's release, parity (i // stages + 1) % 2", want[1]),
                                    ("0 for the first fill would wait for a phase no one completes: a fresh barrier "
                                     "passes a wait on parity 1 at once", torch.where(n < stages, 0.0, want[2]))]}
        grade_args = (torch.arange(4 * stages), stages)
        cases.append((f"tiles 0..{4 * stages - 1}, a ring of {stages} slots", grade_args, want, alts))

    def over_tiles(i, stages):
        results = [_as_tuple(_call(fn, (int(j), stages)), 3) for j in i]
        return tuple(torch.tensor([float(r[k]) for r in results], dtype=f64) for k in range(3))
    over_tiles.__name__ = getattr(fn, "__name__", "the function")
    return _grade("ring_waits", over_tiles, cases, ["slot", "consumer_parity", "producer_parity"], atol=0.0)


def _no_rescale(q, k, v, scale, bn):
    s = scale * q @ k.T
    m = torch.full((q.shape[0],), -math.inf, dtype=f64)
    l, acc = torch.zeros(q.shape[0], dtype=f64), torch.zeros(q.shape[0], v.shape[1], dtype=f64)
    for start in range(0, k.shape[0], bn):
        st = s[:, start:start + bn]
        m_new = torch.maximum(m, st.amax(1))
        p = torch.exp(st - m_new[:, None])
        l = l * torch.exp(m - m_new) + p.sum(1)
        acc = acc + p @ v[start:start + bn]
        m = m_new
    return acc / l[:, None]


# ---------------------------------------------------------------------------------------------------
# Chapter 6: the FlashAttention backward pass

def delta(fn):
    """``fn(o, do, dlse)``: ``D = rowsum(dO * O) - dlse``, one number per query row (``dlse`` may be None)."""
    g = _gen(11)
    o, do, dlse = _randn(2, 7, 4, generator=g), _randn(2, 7, 4, generator=g), _randn(2, 7, generator=g)
    want = (do * o).sum(-1)
    alts = {"delta": [("dlse is added: a gradient into the lse enters dS as P * dlse, so it lowers D: D = rowsum(dO * O) - dlse",
                       want + dlse),
                      ("dlse is ignored", want),
                      ("the row sum runs over the queries (dim -2) instead of over the head dim (dim -1)",
                       (do * o).sum(-2))]}
    cases = [("no gradient into the lse (dlse = None)", (o, do, None), (want,), {"delta": alts["delta"][2:]}),
             ("with dlse", (o, do, dlse), (want - dlse,), alts)]
    return _grade("delta", fn, cases, ["delta"])


def dq_tile(body):
    """``body(dq, q, do, lse2, delta, k, v, qk_scale)``, a ``@triton.jit`` function: add one tile of keys'
    contribution ``dS K`` to the query tile's ``dq`` accumulator ``(BLOCK_M, D)`` and return it. ``lse2`` is
    the lse in base 2 ``(BLOCK_M,)``, ``delta`` is D ``(BLOCK_M,)``, ``qk_scale`` = scale * log2 e; the
    harness multiplies by the scale once at the end."""
    title = "dq_tile (Triton)"
    if not _is_jit(body):
        return Report(f"Your turn: {title}", [Finding(title, "", "FAIL", "dq_tile must be a @triton.jit function")])
    g = _gen(12)
    n_q, n_k, d, bm, bn = 32, 48, 16, 16, 16
    q, k, v, do = (_randn(n, d, generator=g) for n in (n_q, n_k, n_k, n_q))
    scale = 1 / math.sqrt(d)
    ref = reference_pass(q, k, v, do, scale=scale)
    delta_ = (do * ref["o"]).sum(-1)
    dev = _device()
    t32 = [t.float().contiguous().to(dev) for t in (q, k, v, do, ref["lse"] * LOG2E, delta_)]
    dq = torch.empty(n_q, d, device=dev)
    try:
        with _quiet():
            _dq_harness[(n_q // bm,)](*t32, dq, n_k, scale * LOG2E, scale, body, BLOCK_M=bm, BLOCK_N=bn, D=d)
    except Exception as e:  # noqa: BLE001
        return Report(f"Your turn: {title}", [Finding(title, "", "FAIL", f"the kernel failed: {type(e).__name__}: "
                                                      f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}")])
    dq = dq.double().cpu()
    if (dq == 0).all():
        return Report(f"Your turn: {title}", [Finding(title, "", "todo", "not attempted yet: the body returns dq "
                                                      "unchanged; fill it in and run both cells again")])
    p = torch.softmax(scale * q @ k.T, -1)
    dp = do @ v.T
    alts = {"dq": [("dS lacks the correction D: dS = P * (dP - D)", scale * (p * dp) @ k),
                   ("P from the natural exp of base-2 logits: use tl.math.exp2(s - lse2)",
                    scale * (torch.exp(LOG2E * scale * q @ k.T - ref["lse"][:, None] * LOG2E) * (dp - delta_[:, None])) @ k),
                   ("the scale is applied twice: the harness multiplies by it at the end", scale * ref["dq"])]}
    return _grade(title, lambda: dq, [("Nq = 32, Nk = 48, D = 16, tiles 16 x 16", (), (ref["dq"],), alts)], ["dq"], atol=5e-3)


# ---------------------------------------------------------------------------------------------------
# Chapter 7: speed and memory

def start_values(fn):
    """``fn(lse, delta, scale, block)``: what the Hopper backward starts its two accumulators from (chapter 6,
    ``eq-fb-hopper-start``): for ``lse``, ``delta`` of shape ``(..., N)``, a tensor ``(..., cdiv(N, block), 2, block)``
    holding, per query tile, ``-lse / scale`` then ``-delta``; rows past ``N`` and rows that see no key
    (``lse = -inf``) get ``-1e30`` and ``0``."""
    g = _gen(12)
    n, block, scale = 10, 4, 0.25
    lse, delta = _randn(2, n, generator=g) * 3, _randn(2, n, generator=g)
    lse[1, 3] = -math.inf
    tiles = -(-n // block)

    def pack(m_values, d_values, pad_m=-1e30, pad_d=0.0):
        out = torch.empty(2, tiles * block, 2, dtype=f64)
        out[..., 0], out[..., 1] = pad_m, pad_d
        out[:, :n, 0], out[:, :n, 1] = m_values, d_values
        return out.view(2, tiles, block, 2).transpose(-1, -2)

    seen = torch.isfinite(lse)
    want = pack(torch.where(seen, -lse / scale, -1e30), -delta)
    alts = {"start values": [
        ("the scale is missing: m = lse / scale, since P = 2^(scale log2(e) (K Q^T - m))",
         pack(torch.where(seen, -lse, -1e30), -delta)),
        ("the signs: the accumulators start at -m and -D, so that K Q^T - m and V dO^T - D come out",
         pack(torch.where(seen, lse / scale, 1e30), delta)),
        ("a row that sees no key gets -inf: an infinity in the tensor cores' accumulator; -1e30 gives P = 0 too",
         pack(torch.where(seen, -lse / scale, -math.inf), -delta)),
        ("the two halves of a tile are swapped: -m first, then -D",
         pack(-delta, torch.where(seen, -lse / scale, -1e30), pad_m=0.0, pad_d=-1e30))]}
    # The padding -1e30 would set the scale of the comparison (and so its tolerance): compared with finite entries
    # capped at 1e3 (the right ones here are below 40), infinities kept.
    def squash(x):
        x = torch.as_tensor(x).double()
        return torch.where(torch.isinf(x), x, x.clamp(-1e3, 1e3))

    def graded(*args):
        return squash(_call(fn, args))
    graded.__name__ = getattr(fn, "__name__", "the function")
    alts = {name: [(text, squash(t)) for text, t in items] for name, items in alts.items()}
    cases = [("a ragged last tile and a row that sees no key", (lse, delta, scale, block), (squash(want),), alts)]
    return _grade("start values", graded, cases, ["start values"])


def attention_flops(fn):
    """``fn(b, h, n_q, n_k, d_k, d_v)``: FLOPs of the forward pass's two matrix products (2 per multiply-add)."""
    cases = []
    for args in ((1, 1, 4, 4, 8, 8), (2, 3, 5, 7, 4, 6)):
        b, h, n_q, n_k, d_k, d_v = args
        want = torch.tensor(2.0 * b * h * n_q * n_k * (d_k + d_v))
        alts = {"flops": [("multiply-adds counted once: a product of a x b by b x c is 2abc FLOPs", want / 2),
                          ("only S = Q K^T counted: O = P V costs 2 N_q N_k d_v more", torch.tensor(2.0 * b * h * n_q * n_k * d_k)),
                          ("only O = P V counted: S = Q K^T costs 2 N_q N_k d_k more", torch.tensor(2.0 * b * h * n_q * n_k * d_v))]}
        cases.append((f"B, H, Nq, Nk, dk, dv = {args}", args, (want,), alts))
    return _grade("attention_flops", fn, cases, ["flops"])


def causal_tile_fraction(fn):
    """``fn(n, block)``: the fraction of the N x N score tiles that a causal kernel with square tiles of
    ``block`` rows computes (``n`` a multiple of ``block``)."""
    cases = []
    for n, block in ((128, 32), (1024, 64), (64, 64)):
        t = n // block
        want = torch.tensor((t + 1) / (2 * t))
        alts = {"fraction": [("1/2 is the limit for many tiles; the tiles on the diagonal are computed whole",
                              torch.tensor(0.5)),
                             ("(N + 1) / (2N) counts the visible entries, not the tiles computed",
                              torch.tensor((n + 1) / (2 * n)))]}
        cases.append((f"N = {n}, tiles of {block}", (n, block), (want,), alts))
    return _grade("causal_tile_fraction", fn, cases, ["fraction"])


def five_product_memory(fn):
    """``fn(b, h, n, d, e)``: peak bytes of one forward plus backward pass beyond the inputs when the backward pass is
    attnpkg.hopper's five-product kernel (eq-speed-mem-five): O and the lse of the forward pass; two float32 start
    values per row, written per tile of ``hopper.BLOCK_M`` rows; the float32 dQ buffer; dK, dV; dQ cast from it."""
    from . import hopper
    tile = hopper.BLOCK_M
    cases = []
    for b, h, n, d, e in ((1, 16, 4096, 128, 2), (2, 4, 1000, 64, 2), (1, 2, 100, 128, 4)):
        tiles = -(-n // tile)
        rows = b * h * n
        want = torch.tensor(float(rows * (4 * d * e + 4 * d + 4) + b * h * tiles * tile * 8))
        alts = {"bytes": [
            ("that is the two-kernel pass, BHN(4de + 12): the five-product pass adds a float32 dQ buffer of 4d bytes "
             "per row", torch.tensor(float(rows * (4 * d * e + 12)))),
            ("the dQ buffer is float32 (4 bytes per element), whatever the inputs' dtype",
             torch.tensor(float(rows * (5 * d * e + 4) + b * h * tiles * tile * 8))),
            ("dQ in the inputs' dtype is cast from the buffer while the buffer is still alive: count both",
             torch.tensor(float(rows * (3 * d * e + 4 * d + 4) + b * h * tiles * tile * 8))),
            ("the start values are written per tile of 64 rows, so a length that is not a multiple of 64 pays for "
             "a whole last tile", torch.tensor(float(rows * (4 * d * e + 4 * d + 12)))),
        ]}
        cases.append((f"B = {b}, H = {h}, N = {n}, d = {d}, e = {e}", (b, h, n, d, e), (want,), alts))
    return _grade("five_product_memory", fn, cases, ["bytes"], atol=0.0)


# ---------------------------------------------------------------------------------------------------
# Chapter 8: masks, windows and packed sequences

def window_mask(fn):
    """``fn(n_q, n_k, left, right)``: boolean ``(n_q, n_k)``, True where query i sees key j:
    ``p_i - left <= j <= p_i + right`` with ``p_i = i + n_k - n_q`` (bottom-right), ``-1`` unbounded."""
    cases = []
    for n_q, n_k, left, right in ((4, 9, 3, 1), (7, 5, 1, 2), (6, 6, 2, 0), (5, 8, -1, 1), (6, 7, 2, -1)):
        i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]

        def band(p, lo, hi, strict=False, literal=False):
            ok = torch.ones(n_q, n_k, dtype=torch.bool)
            if lo >= 0 or literal:
                ok &= (j > p - lo) if strict else (j >= p - lo)
            if hi >= 0 or literal:
                ok &= (j < p + hi) if strict else (j <= p + hi)
            return ok.double()
        p = i + n_k - n_q
        want = band(p, left, right)
        alts = {"mask": [("aligned top-left (p_i = i); the book aligns the last query with the last key, "
                          "p_i = i + Nk - Nq", band(i, left, right)),
                         ("left and right are swapped: the window reaches `left` keys back (j >= p_i - left) and "
                          "`right` keys ahead (j <= p_i + right)", band(p, right, left)),
                         ("the ends of the window are left out: both bounds include their key, use <=",
                          band(p, left, right, strict=True)),
                         ("-1 is taken as a number: it means that side of the window is unbounded",
                          band(p, left, right, literal=True)),
                         ("True and False are swapped: True marks the keys a query may see",
                          1 - band(p, left, right))]}
        cases.append((f"n_q = {n_q}, n_k = {n_k}, window ({left}, {right})", (n_q, n_k, left, right), (want,), alts))
    return _grade("window_mask", fn, cases, ["mask"])


def softcap_backward(fn):
    """``fn(s, g, c)``: the gradient reaching the scaled scores ``s`` of ``z = c tanh(s / c)``, given the
    gradient ``g`` reaching ``z``: ``g (1 - tanh(s / c)^2)``, elementwise."""
    gen = _gen(13)
    cases = []
    for label, c, spread in (("c = 1.5, scores of size ~2", 1.5, 2.0), ("c = 5, scores of size ~8", 5.0, 8.0)):
        s, g = spread * _randn(4, 6, generator=gen), _randn(4, 6, generator=gen)
        t = torch.tanh(s / c)
        want = g * (1 - t**2)
        alts = {"ds": [("the cap's factor 1 - tanh^2(s / c) is missing: z = c tanh(s / c) depends on s", g),
                       ("tanh of s instead of s / c: dz/ds = 1 - tanh^2(s / c)", g * (1 - torch.tanh(s) ** 2)),
                       ("divided by c: the c in front and the 1/c inside cancel, dz/ds = 1 - tanh^2(s / c)",
                        g * (1 - t**2) / c),
                       ("tanh is not squared: d tanh(x)/dx = 1 - tanh^2(x)", g * (1 - t)),
                       ("the factor uses the capped score z = c tanh(s / c) instead of s",
                        g * (1 - torch.tanh(c * t / c) ** 2))]}
        cases.append((label, (s, g, c), (want,), alts))
    return _grade("softcap_backward", fn, cases, ["ds"])


def _pair_index(cu, heads, block, *, tiles_of=None, local=True, halves=2, head_major=False):
    """Where each packed query row's -m sits in the Hopper kernel's start-value buffer (the right answer, and,
    through the keywords, the typical slips)."""
    lengths = cu[1:] - cu[:-1]
    tiles = -(-int(lengths.max()) // block) if tiles_of is None else tiles_of
    batch, total = len(lengths), int(cu[-1])
    rows = torch.arange(total)
    seq = torch.searchsorted(cu[1:], rows, right=True)                  # the sequence of each packed row
    i = rows - cu[seq] if local else rows
    h = torch.arange(heads)[:, None]
    program = seq * heads + h if not head_major else h * batch + seq
    return ((program * tiles + i // block) * halves * block + i % block).double()


def pair_index(fn):
    """``fn(cu_seqlens, heads, block)``: for packed sequences (int64 prefix sums ``cu_seqlens``), a ``(heads, total)``
    tensor: the position of each query row's start value -m in the buffer that the Hopper backward reads (chapter 8):
    per sequence b and head h, ``ceil(longest / block)`` query tiles, each ``block`` values -m then ``block`` values
    -D."""
    cases = []
    for label, lengths, heads, block in (("three sequences, one ragged", [5, 8, 3], 2, 4),
                                         ("an empty sequence and one of one token", [6, 0, 1, 9], 3, 4),
                                         ("one sequence", [10], 1, 8)):
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        total = int(cu[-1])
        alts = {"index": [
            ("the number of query tiles per sequence is taken from the packed length (total), not from the longest "
             "sequence, whose tiles the launch grid spans", _pair_index(cu, heads, block, tiles_of=-(-total // block))),
            ("the row is the packed row; within its sequence's tiles it is counted from the sequence's first row, "
             "cu_seqlens[b]", _pair_index(cu, heads, block, local=False)),
            ("each tile holds block values -m and then block values -D: the tile's stride is 2 block",
             _pair_index(cu, heads, block, halves=1)),
            ("the programs are numbered head-major (h B + b); the grid numbers them b H + h",
             _pair_index(cu, heads, block, head_major=True))]}
        cases.append((f"{label}: lengths {lengths}, {heads} heads, block {block}", (cu, heads, block),
                      (_pair_index(cu, heads, block),), alts))
    return _grade("pair_index", fn, cases, ["index"])


def window_tiles(fn):
    """``fn(n, w, block)``: the key tiles the forward kernel visits for one (batch, head) of a causal sliding window of
    ``w`` keys (``window_size = (w - 1, 0)``, ``N_q = N_k = n``), with square tiles of ``block``; ``n`` and ``w`` are
    multiples of ``block``. The right answer is read off the kernels' own schedule (``masks.tile_classes``)."""
    from . import masks
    cases = []
    for n, w, block in ((512, 128, 64), (1024, 256, 128), (768, 768, 64), (2048, 512, 128)):
        classes = masks.tile_classes(n, n, block, block, window_size=(w - 1, 0))
        want = torch.tensor(float((classes != masks.EMPTY).sum()))
        t, big_w = n // block, w // block
        rows = torch.arange(t, dtype=f64)
        alts = {"tiles": [
            ("the first query tiles have fewer keys to their left: query tile t visits min(t, w / block) + 1 tiles, "
             "not w / block + 1 from the start", torch.tensor(t * (big_w + 1.0))),
            ("a window of w keys that ends on a query's own key starts inside a tile: it touches w / block + 1 key "
             "tiles, one more than its length in tiles", torch.minimum(rows + 1, torch.tensor(float(big_w))).sum()),
            ("that is the causal count: the window's left edge stops each query tile w / block tiles back",
             torch.tensor(t * (t + 1) / 2.0)),
            ("N w / block^2 is the window's area in tiles; the tiles its two edges cut are visited too",
             torch.tensor(float(t * big_w)))]}
        cases.append((f"N = {n}, w = {w}, tiles of {block}", (n, w, block), (want,), alts))
    return _grade("window_tiles", fn, cases, ["tiles"], atol=0.0)


# ---------------------------------------------------------------------------------------------------
# Chapter 9: attention across devices

def ring_merge(fn):
    """``fn(parts)``: the output ``(n, d)`` and lse ``(n,)`` of a rank's queries over the whole sequence, from
    the list of ``(o_s, lse_s)`` of its queries against each shard, in the order the ring delivers them
    (``s = (r - t) mod P``); a shard the causal mask hides comes as ``(0, -inf)``."""
    gen = _gen(14)
    cases = []
    for label, world, rank, causal, hidden_first in (
            ("P = 4, rank 1, causal (contiguous): shards 2 and 3 hidden", 4, 1, True, False),
            ("P = 3, rank 0, causal (contiguous): only its own shard", 3, 0, True, False),
            ("P = 3, rank 2, no mask", 3, 2, False, False),
            ("P = 4, rank 1, causal, the hidden shards first (the order must not matter)", 4, 1, True, True)):
        n, d = 4, 3
        q = _randn(n, d, generator=gen)
        k, v = 2 * _randn(world * n, d, generator=gen), _randn(world * n, d, generator=gen)
        parts = []
        for t in range(world):
            s = (rank - t) % world
            ks, vs = k[s * n:(s + 1) * n], v[s * n:(s + 1) * n]
            if causal and s > rank:
                parts.append((torch.zeros(n, d, dtype=f64), torch.full((n,), -math.inf, dtype=f64)))
            else:
                r = reference_pass(q, ks, vs, causal=causal and s == rank)
                parts.append((r["o"], r["lse"]))
        if hidden_first:
            parts = parts[::-1]
        whole = reference_pass(q, k[:(rank + 1) * n] if causal else k, v[:(rank + 1) * n] if causal else v,
                               causal=causal)
        os_, lses = torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts])
        lse2 = torch.log2(torch.exp2(lses).sum(0))
        alts = {"o": [(f"o is the plain average of the {world} parts: weight each by exp(lse_s - lse)", os_.mean(0)),
                      ("o is the sum of the parts: weight each by exp(lse_s - lse)", os_.sum(0)),
                      ("exp2 / log2 on a natural-log lse: the parts' lse are natural logs, merge with exp and log "
                       "(logaddexp)", (torch.exp2(lses - lse2)[..., None] * os_).sum(0)),
                      ("o is the last part alone: the running lse was not updated after each merge, so each merge "
                       "replaced o by the new part", os_[-1])],
                "lse": [("lse was never updated: after each merge set lse = logaddexp(lse, lse_s)",
                         torch.full((n,), -math.inf, dtype=f64)),
                        ("exp2 / log2 on a natural-log lse: lse = log(sum_s exp(lse_s))", lse2),
                        ("lse is the last part's lse: it must be the logaddexp of all of them", lses[-1]),
                        ("lse = max_s lse_s keeps the largest part only", lses.amax(0)),
                        ("lse = sum_s lse_s multiplies the parts' sums; logaddexp adds them", lses.sum(0))]}
        cases.append((label, ([(o.clone(), lse.clone()) for o, lse in parts],), (whole["o"], whole["lse"]), alts))
    report = _grade("ring_merge", fn, cases, ["o", "lse"])
    for f in report.failures:
        if "hidden shards first" in f.case and "NaN" in f.message:
            f.message += (" -- merging (0, -inf) into (0, -inf) gives exp(-inf - (-inf)) = NaN: where the merged lse "
                          "is still -inf, keep (0, -inf)")
    return report


def causal_work(fn):
    """``fn(n_total, world, layout)``: the query-key pairs each rank computes for causal attention of ``n_total``
    tokens on ``world`` ranks, a tensor (or list) of ``world`` numbers, for ``layout`` "contiguous" or "zigzag"
    (a diagonal block of ``n`` queries counts ``n (n + 1) / 2`` pairs, a full one ``n^2``, a hidden one 0)."""
    def as_tensor(*args):
        got = fn(*args)
        return torch.as_tensor(got, dtype=f64) if isinstance(got, (list, tuple)) else got
    as_tensor.__name__ = getattr(fn, "__name__", "the function")
    cases = []
    for n_total, world in ((64, 4), (48, 3), (96, 8)):
        n = n_total // world
        r = torch.arange(world, dtype=f64)
        diag, ones = n * (n + 1) / 2, torch.ones(world, dtype=f64)
        average = n_total * (n_total + 1) / 2 / world * ones
        contiguous = r * n * n + diag
        zigzag = (diag + (world - 1) * n * n / 2) * ones
        alts_c = {"work": [("every rank the average: with the contiguous layout rank r computes r earlier shards in "
                            "full and skips the later ones, so the last rank does about 2P - 1 times the first's work",
                            average),
                           ("the diagonal block counted as n^2 pairs: under the causal mask it has n (n + 1) / 2",
                            (r + 1) * n * n),
                           ("the diagonal block counted as n (n - 1) / 2: each query sees its own key, n (n + 1) / 2",
                            r * n * n + n * (n - 1) / 2),
                           ("the later shards are counted: the causal mask hides them, and the ring skips them",
                            (world - 1) * n * n + diag * ones)]}
        alts_z = {"work": [("zigzag counted like the contiguous layout: rank r holds chunks r and 2P - 1 - r, and "
                            "every rank does the same work", contiguous),
                           ("the steps off the diagonal counted as n^2 pairs: in zigzag each is half a block "
                            "(all queries against the early half of the keys, or the late half of the queries "
                            "against all keys), n^2 / 2", (diag + (world - 1) * n * n) * ones),
                           ("the diagonal block counted as n^2 pairs: under the causal mask it has n (n + 1) / 2",
                            (n * n + (world - 1) * n * n / 2) * ones)]}
        cases.append((f"N = {n_total}, P = {world}, contiguous", (n_total, world, "contiguous"), (contiguous,), alts_c))
        cases.append((f"N = {n_total}, P = {world}, zigzag", (n_total, world, "zigzag"), (zigzag,), alts_z))
    return _grade("causal_work", as_tensor, cases, ["work"])
