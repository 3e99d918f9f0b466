"""attnpkg.exercises: every checker passes the book's solution, says "not attempted" for the empty
exercise, and rejects typical wrong answers with the message that names the mistake."""
import pytest
import torch

from attnpkg import exercises  # first: without a GPU it switches Triton's interpreter on before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnpkg.kernels.tiles import descriptor_origin  # noqa: E402


def todo(*args):
    raise NotImplementedError


def assert_rejects(report, *phrases):
    assert not report.ok, report
    text = str(report)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in\n{text}"


def test_not_attempted_is_not_a_failure():
    report = exercises.softmax_backward(todo)
    assert not report.ok and not report.failures
    assert "not attempted yet" in str(report) and "not attempted yet" in report._repr_html_()
    with pytest.raises(AssertionError, match="not attempted"):
        report.assert_ok()


def test_raising_code_is_reported_not_raised():
    def broken(p, dp):
        return p @ dp          # shapes do not fit
    report = exercises.softmax_backward(broken)
    assert_rejects(report, "raised RuntimeError")


def test_a_tuple_of_the_wrong_length():
    assert_rejects(exercises.matmul_backward(lambda x, w, dy: dy @ w.T), "expected a tuple of 2 results")


# Chapter 1 -------------------------------------------------------------------------------------------

def test_softmax_backward():
    assert exercises.softmax_backward(lambda p, dp: p * (dp - (dp * p).sum(-1, keepdim=True))).ok
    assert_rejects(exercises.softmax_backward(lambda p, dp: p * dp), "correction - p <dp, p> is missing")
    assert_rejects(exercises.softmax_backward(lambda p, dp: p * (dp - dp.sum(-1, keepdim=True))), "not the plain sum of dp")
    assert_rejects(exercises.softmax_backward(lambda p, dp: -p * (dp - (dp * p).sum(-1, keepdim=True))), "wrong sign")
    # building the Jacobian is slow but right
    jac = lambda p, dp: (dp.unsqueeze(-2) @ (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2))).squeeze(-2)
    assert exercises.softmax_backward(jac).ok


def test_logsumexp():
    def safe(s):
        m = s.amax(-1, keepdim=True)
        return (m + torch.log(torch.exp(s - m).sum(-1, keepdim=True))).squeeze(-1)
    assert exercises.logsumexp(safe).ok
    assert_rejects(exercises.logsumexp(lambda s: torch.log(torch.exp(s).sum(-1))), "subtract the row maximum first", "infinite")
    assert_rejects(exercises.logsumexp(lambda s: torch.log(torch.exp(s - s.amax(-1, keepdim=True)).sum(-1))),
                   "maximum m is not added back")
    assert_rejects(exercises.logsumexp(lambda s: safe(s)[..., None]), "keeps the last dimension")


# Chapter 2 -------------------------------------------------------------------------------------------

def test_matmul_backward():
    def right(x, w, dy):
        dw = x.transpose(-2, -1) @ dy
        return dy @ w.T, dw.reshape(-1, *w.shape).sum(0)
    assert exercises.matmul_backward(right).ok
    assert_rejects(exercises.matmul_backward(lambda x, w, dy: (dy @ w.T, x.transpose(-2, -1) @ dy)), "not summed over the batch")
    assert_rejects(exercises.matmul_backward(lambda x, w, dy: (dy @ w.T, (dy.transpose(-2, -1) @ x).reshape(-1, 4, 3).sum(0))),
                   "dw is transposed")


def test_linear_backward():
    assert exercises.linear_backward(lambda x, w, b, dy: (dy @ w.T, x.T @ dy, dy.sum(0))).ok
    assert_rejects(exercises.linear_backward(lambda x, w, b, dy: (dy @ w.T, x.T @ dy, dy.mean(0))), "mean of dY's rows")
    assert_rejects(exercises.linear_backward(lambda x, w, b, dy: (dy @ w.T, x.T @ dy, dy)), "db is dY itself")
    assert_rejects(exercises.linear_backward(lambda x, w, b, dy: (dy @ w.T, x.T @ dy * 2, dy.sum(0))), "dw is 2 times")


# Chapter 3 -------------------------------------------------------------------------------------------

def _attention_backward(q, k, v, do, scale, *, use_scale=True, use_d=True):
    p = torch.softmax(scale * q @ k.T, dim=-1)
    dp = do @ v.T
    ds = p * (dp - ((do * (p @ v)).sum(-1, keepdim=True) if use_d else 0))
    tau = scale if use_scale else 1.0
    return tau * ds @ k, tau * ds.T @ q, p.T @ do


def test_attention_backward():
    assert exercises.attention_backward(_attention_backward).ok
    assert_rejects(exercises.attention_backward(lambda *a: _attention_backward(*a, use_scale=False)), "misses the factor scale")
    assert_rejects(exercises.attention_backward(lambda *a: _attention_backward(*a, use_d=False)), "lacks the correction D")
    def no_transpose(q, k, v, do, scale):
        dq, dk, dv = _attention_backward(q, k, v, do, scale)
        p = torch.softmax(scale * q @ k.T, dim=-1)
        return dq, dk, p @ do if p.shape[0] == p.shape[1] else dv.T
    assert_rejects(exercises.attention_backward(no_transpose), "missing the transpose: dV = P^T dO", "dv is transposed")


def test_causal_mask():
    right = lambda n_q, n_k: torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + n_k - n_q
    assert exercises.causal_mask(right).ok
    assert_rejects(exercises.causal_mask(lambda n_q, n_k: torch.ones(n_q, n_k, dtype=torch.bool).tril()), "aligned top-left")
    assert_rejects(exercises.causal_mask(lambda n_q, n_k: torch.arange(n_k)[None, :] < torch.arange(n_q)[:, None] + n_k - n_q),
                   "diagonal is excluded")
    assert_rejects(exercises.causal_mask(lambda n_q, n_k: ~right(n_q, n_k)), "swapped")


# Chapter 4 -------------------------------------------------------------------------------------------

def test_split_heads():
    assert exercises.split_heads(lambda x, h: x.reshape(x.shape[0], h, -1).transpose(0, 1)).ok
    assert_rejects(exercises.split_heads(lambda x, h: x.reshape(h, x.shape[0], -1)), "without the transpose")
    assert_rejects(exercises.split_heads(lambda x, h: x.reshape(x.shape[0], -1, h).permute(2, 0, 1)), "every H-th column")


def test_projection_weight_gradient():
    assert exercises.projection_weight_gradient(lambda x, dq: torch.cat([x.T @ d for d in dq], dim=1)).ok
    assert exercises.projection_weight_gradient(lambda x, dq: x.T @ dq.transpose(0, 1).reshape(x.shape[0], -1)).ok
    assert_rejects(exercises.projection_weight_gradient(lambda x, dq: x.T @ dq.sum(0)), "heads were summed")
    assert_rejects(exercises.projection_weight_gradient(lambda x, dq: x.T @ dq.permute(1, 2, 0).reshape(x.shape[0], -1)),
                   "interleaved")


# Chapter 5 -------------------------------------------------------------------------------------------

def _online_update(m, l, acc, s, v, rescale_acc=True, rescale_l=True):
    m_new = torch.maximum(m, s.max())
    alpha, p = torch.exp(m - m_new), torch.exp(s - m_new)
    return m_new, (alpha if rescale_l else 1) * l + p.sum(), (alpha if rescale_acc else 1) * acc + p @ v


def test_online_update():
    assert exercises.online_update(_online_update).ok
    assert_rejects(exercises.online_update(lambda *a: _online_update(*a, rescale_acc=False)), "acc is not rescaled")
    assert_rejects(exercises.online_update(lambda *a: _online_update(*a, rescale_l=False)), "l is not rescaled")


def _merge(o1, lse1, o2, lse2):
    lse = torch.logaddexp(lse1, lse2)
    return torch.exp(lse1 - lse)[:, None] * o1 + torch.exp(lse2 - lse)[:, None] * o2, lse


def test_merge_partials():
    assert exercises.merge_partials(_merge).ok
    assert_rejects(exercises.merge_partials(lambda o1, l1, o2, l2: ((o1 + o2) / 2, torch.logaddexp(l1, l2))), "plain average")
    assert_rejects(exercises.merge_partials(lambda o1, l1, o2, l2: (_merge(o1, l1, o2, l2)[0], l1 + l2)), "multiplies the two sums")
    assert_rejects(exercises.merge_partials(lambda o1, l1, o2, l2: (_merge(o1, l1, o2, l2)[0], torch.maximum(l1, l2))),
                   "keeps the larger part only")


@triton.jit
def _forward_tile(acc, m_i, l_i, q, k, v, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return acc * alpha[:, None] + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _forward_tile_stub(acc, m_i, l_i, q, k, v, qk_scale):
    return acc, m_i, l_i


@triton.jit
def _forward_tile_exp(acc, m_i, l_i, q, k, v, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    return acc * alpha[:, None] + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _forward_tile_no_rescale(acc, m_i, l_i, q, k, v, qk_scale):
    s = tl.dot(q, tl.trans(k)) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    return acc + tl.dot(p, v), m_new, l_i * alpha + tl.sum(p, 1)


def test_forward_tile():
    assert exercises.forward_tile(_forward_tile).ok
    report = exercises.forward_tile(_forward_tile_stub)
    assert not report.failures and "not attempted yet" in str(report)
    assert_rejects(exercises.forward_tile(_forward_tile_exp), "use tl.math.exp2")
    assert_rejects(exercises.forward_tile(_forward_tile_no_rescale), "acc is not rescaled")
    assert_rejects(exercises.forward_tile(lambda *a: a[:3]), "must be a @triton.jit function")


def _origin(b, h, first_row, stride_b, stride_h, stride_n, *, first=True, column=True, rows_of_head=False):
    offset = b * stride_b + h * stride_h * (stride_n if rows_of_head else 1)
    return offset // stride_n + (first_row if first else 0), (offset % stride_n if column else 0)


def test_descriptor_origin():
    assert exercises.descriptor_origin(_origin).ok
    assert_rejects(exercises.descriptor_origin(lambda *a: _origin(*a, first=False)), "first row is not added")
    assert_rejects(exercises.descriptor_origin(lambda *a: _origin(*a, column=False)), "column is always 0")
    assert_rejects(exercises.descriptor_origin(lambda *a: _origin(*a, rows_of_head=True)), "counted in rows")


@triton.jit
def _origin_kernel(OUT, b, h, first_row, stride_b, stride_h, stride_n):
    row, col = descriptor_origin(b.to(tl.int64), h.to(tl.int64), first_row, stride_b, stride_h, stride_n)
    tl.store(OUT, row)
    tl.store(OUT + 1, col)


def test_descriptor_origin_matches_the_kernels():
    """The exercise's answer is what tiles.descriptor_origin computes in the kernels (run by the interpreter
    or the GPU) for each layout of the exercise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for args in ((1, 2, 0, 120, 40, 8), (1, 2, 0, 120, 8, 24), (0, 3, 7, 0, 8, 32), (0, 0, 5, 0, 8, 8)):
        out = torch.empty(2, dtype=torch.int32, device=device)
        _origin_kernel[(1,)](out, *args)
        assert tuple(out.tolist()) == _origin(*args), args


def _ring_waits(i, stages):
    fill = i // stages
    return i % stages, fill % 2, (fill + 1) % 2


def test_ring_waits():
    assert exercises.ring_waits(_ring_waits).ok
    assert "not attempted" in str(exercises.ring_waits(todo))
    assert_rejects(exercises.ring_waits(lambda i, s: (i // s, *_ring_waits(i, s)[1:])), "not the slot")
    assert_rejects(exercises.ring_waits(lambda i, s: (i % s, i % 2, (i + 1) % 2)), "a ring of one slot")
    assert_rejects(exercises.ring_waits(lambda i, s: (*_ring_waits(i, s)[:2], _ring_waits(i, s)[1])), "deadlock")
    assert_rejects(exercises.ring_waits(lambda i, s: (*_ring_waits(i, s)[:2], 0 if i < s else _ring_waits(i, s)[2])),
                   "fresh barrier")


def test_ring_waits_are_the_waits_of_the_hopper_forward():
    """The parities the exercise accepts are the ones the Gluon forward waits on: the producer's in `_ring_load`, the
    consumers' in `_step` and on their first and last tiles."""
    import inspect
    from attnpkg.kernels import hopper_forward
    producer = inspect.getsource(hopper_forward._ring_load.fn)
    consumer = inspect.getsource(hopper_forward._step.fn) + inspect.getsource(hopper_forward._consumer.fn)
    assert "s = i % STAGES" in producer and "mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)" in producer
    assert "mbarrier.wait(k_full.index(ks), (i // STAGES) & 1)" in consumer
    assert "mbarrier.wait(k_full.index(i0 % STAGES), (i0 // STAGES) & 1)" in consumer
    kernel = lambda i, stages: (i % stages, (i // stages) & 1, ((i // stages) & 1) ^ 1)
    assert exercises.ring_waits(kernel).ok


# Chapter 6 -------------------------------------------------------------------------------------------

def test_delta():
    right = lambda o, do, dlse: (do * o).sum(-1) - (0 if dlse is None else dlse)
    assert exercises.delta(right).ok
    assert_rejects(exercises.delta(lambda o, do, dlse: (do * o).sum(-1) + (0 if dlse is None else dlse)), "dlse is added")
    assert_rejects(exercises.delta(lambda o, do, dlse: (do * o).sum(-1)), "dlse is ignored")
    assert_rejects(exercises.delta(lambda o, do, dlse: (do * o).sum(-2)), "over the queries")


def _start_values(lse, delta, scale, block):
    n = lse.shape[-1]
    tiles = -(-n // block)
    m = torch.full(lse.shape[:-1] + (tiles * block,), -1e30, dtype=lse.dtype)
    d = torch.zeros_like(m)
    m[..., :n] = torch.where(torch.isfinite(lse), -lse / scale, -1e30)
    d[..., :n] = -delta
    return torch.stack((m.unflatten(-1, (tiles, block)), d.unflatten(-1, (tiles, block))), dim=-2)


def test_start_values():
    assert exercises.start_values(_start_values).ok
    assert "not attempted" in str(exercises.start_values(todo))
    assert_rejects(exercises.start_values(lambda l, d, s, b: _start_values(l, d, 1.0, b)), "the scale is missing")
    assert_rejects(exercises.start_values(lambda l, d, s, b: _start_values(l, d, s, b).flip(-2)), "swapped")
    assert_rejects(exercises.start_values(lambda l, d, s, b: -_start_values(l, d, s, b)), "sign")

    def infinite(lse, delta, scale, block):
        x = _start_values(lse, delta, scale, block)
        return torch.where(x == -1e30, float("-inf"), x)
    assert_rejects(exercises.start_values(infinite), "infinite")

    def slightly_off(lse, delta, scale, block):             # one entry off by 1e-3: the padding must not hide it
        x = _start_values(lse, delta, scale, block)
        x[0, 0, 0, 1] += 1e-3
        return x
    assert_rejects(exercises.start_values(slightly_off))


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k, v, qk_scale):
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds, k)


@triton.jit
def _dq_tile_stub(dq, q, do, lse2, delta, k, v, qk_scale):
    return dq


@triton.jit
def _dq_tile_no_delta(dq, q, do, lse2, delta, k, v, qk_scale):
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    return dq + tl.dot(p * tl.dot(do, tl.trans(v)), k)


@triton.jit
def _dq_tile_exp(dq, q, do, lse2, delta, k, v, qk_scale):
    p = tl.exp(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
    ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
    return dq + tl.dot(ds, k)


def test_dq_tile():
    assert exercises.dq_tile(_dq_tile).ok
    report = exercises.dq_tile(_dq_tile_stub)
    assert not report.failures and "not attempted yet" in str(report)
    assert_rejects(exercises.dq_tile(_dq_tile_no_delta), "lacks the correction D")
    assert_rejects(exercises.dq_tile(_dq_tile_exp), "use tl.math.exp2")


# Chapter 7 -------------------------------------------------------------------------------------------

def test_attention_flops():
    assert exercises.attention_flops(lambda b, h, nq, nk, dk, dv: 2 * b * h * nq * nk * (dk + dv)).ok
    assert_rejects(exercises.attention_flops(lambda b, h, nq, nk, dk, dv: b * h * nq * nk * (dk + dv)), "multiply-adds counted once")
    assert_rejects(exercises.attention_flops(lambda b, h, nq, nk, dk, dv: 2 * b * h * nq * nk * dk), "only S = Q K^T counted")


def _five_product_bytes(b, h, n, d, e):
    return b * h * (n * (4 * d * e + 4 * d + 4) + -(-n // 64) * 64 * 8)


def test_five_product_memory():
    assert exercises.five_product_memory(_five_product_bytes).ok
    assert_rejects(exercises.five_product_memory(lambda b, h, n, d, e: b * h * n * (4 * d * e + 12)), "two-kernel pass")
    assert_rejects(exercises.five_product_memory(lambda b, h, n, d, e: b * h * n * (4 * d * e + 4 * d + 12)),
                   "whole last tile")
    assert_rejects(exercises.five_product_memory(
        lambda b, h, n, d, e: _five_product_bytes(b, h, n, d, e) - b * h * n * d * e), "still alive")


def test_five_product_memory_matches_the_recorded_peaks():
    """The answer the checker accepts is what the five-product pass allocated on the GPU (the committed record)."""
    import csv
    from pathlib import Path
    rows = list(csv.DictReader(open(Path(__file__).parent.parent / "benchmarks/h200/record/memory.csv")))
    five = [r for r in rows if r["backward"] == "five-product"]
    assert five
    for r in five:
        got = _five_product_bytes(int(r["batch"]), int(r["heads"]), int(r["n"]), int(r["head_dim"]), 2)
        assert got == int(r["peak_bytes"]), r


def test_causal_tile_fraction():
    assert exercises.causal_tile_fraction(lambda n, block: (n // block + 1) / (2 * (n // block))).ok
    assert_rejects(exercises.causal_tile_fraction(lambda n, block: 0.5), "limit for many tiles")
    assert_rejects(exercises.causal_tile_fraction(lambda n, block: (n + 1) / (2 * n)), "counts the visible entries")


# Chapter 8 -------------------------------------------------------------------------------------------

def _window(n_q, n_k, left, right, *, top_left=False, strict=False, swap=False, literal=False):
    i, j = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
    p = i if top_left else i + n_k - n_q
    left, right = (right, left) if swap else (left, right)
    ok = torch.ones(n_q, n_k, dtype=torch.bool)
    if left >= 0 or literal:
        ok &= (j > p - left) if strict else (j >= p - left)
    if right >= 0 or literal:
        ok &= (j < p + right) if strict else (j <= p + right)
    return ok


def test_window_mask():
    assert exercises.window_mask(_window).ok
    from attnpkg import reference
    assert exercises.window_mask(lambda n_q, n_k, left, right: reference.window_mask(n_q, n_k, (left, right))).ok
    assert_rejects(exercises.window_mask(lambda *a: _window(*a, top_left=True)), "aligned top-left")
    assert_rejects(exercises.window_mask(lambda *a: _window(*a, strict=True)), "ends of the window are left out")
    assert_rejects(exercises.window_mask(lambda *a: _window(*a, swap=True)), "left and right are swapped")
    assert_rejects(exercises.window_mask(lambda *a: _window(*a, literal=True)), "-1 is taken as a number")
    assert_rejects(exercises.window_mask(lambda *a: ~_window(*a)), "True and False are swapped")


def test_softcap_backward():
    assert exercises.softcap_backward(lambda s, g, c: g * (1 - torch.tanh(s / c) ** 2)).ok
    def by_autograd(s, g, c):
        s = s.clone().requires_grad_()
        (c * torch.tanh(s / c)).backward(g)
        return s.grad
    assert exercises.softcap_backward(by_autograd).ok
    assert_rejects(exercises.softcap_backward(lambda s, g, c: g), "factor 1 - tanh^2(s / c) is missing")
    assert_rejects(exercises.softcap_backward(lambda s, g, c: g * (1 - torch.tanh(s) ** 2)), "tanh of s instead of s / c")
    assert_rejects(exercises.softcap_backward(lambda s, g, c: g * (1 - torch.tanh(s / c) ** 2) / c), "divided by c")
    assert_rejects(exercises.softcap_backward(lambda s, g, c: g * (1 - torch.tanh(s / c))), "tanh is not squared")


def _window_tiles(n, w, block):
    t, big_w = n // block, w // block
    return sum(min(i, big_w) + 1 for i in range(t))      # query tile i visits min(i, w / block) + 1 key tiles


def test_window_tiles():
    assert exercises.window_tiles(_window_tiles).ok
    assert_rejects(exercises.window_tiles(lambda n, w, b: (n // b) * (w // b + 1)), "fewer keys to their left")
    assert_rejects(exercises.window_tiles(lambda n, w, b: sum(min(i + 1, w // b) for i in range(n // b))),
                   "one more than its length in tiles")
    assert_rejects(exercises.window_tiles(lambda n, w, b: (n // b) * (n // b + 1) // 2), "the causal count")
    assert_rejects(exercises.window_tiles(lambda n, w, b: (n // b) * (w // b)), "window's area in tiles")


def test_window_tiles_counts_the_record_cases_as_the_schedule_does():
    """The closed form the checker accepts is the kernels' schedule at the record's shape (N = 16k, w = 4096)."""
    from attnpkg import masks
    classes = masks.tile_classes(16384, 16384, 128, 128, window_size=(4095, 0))
    assert _window_tiles(16384, 4096, 128) == int((classes != masks.EMPTY).sum()) == 3696


# Chapter 9 -------------------------------------------------------------------------------------------

def _ring_merge(parts, *, update_lse=True, guard=True):
    o, lse = torch.zeros_like(parts[0][0]), torch.full_like(parts[0][1], float("-inf"))
    for o_s, lse_s in parts:
        new = torch.logaddexp(lse, lse_s)
        safe = torch.where(torch.isneginf(new), 0.0, new) if guard else new
        o = torch.exp(lse - safe)[:, None] * o + torch.exp(lse_s - safe)[:, None] * o_s
        if update_lse:
            lse = new
    return o, lse


def test_ring_merge():
    assert exercises.ring_merge(_ring_merge).ok
    def stacked(parts):
        lse = torch.logsumexp(torch.stack([l for _, l in parts]), 0)
        return sum(torch.exp(l - lse)[:, None] * o for o, l in parts), lse
    assert exercises.ring_merge(stacked).ok
    assert_rejects(exercises.ring_merge(lambda parts: (sum(o for o, _ in parts) / len(parts), stacked(parts)[1])),
                   "plain average of the")
    unguarded = exercises.ring_merge(lambda parts: _ring_merge(parts, guard=False))
    assert_rejects(unguarded, "o is NaN", "where the merged lse is still -inf, keep (0, -inf)")
    assert len(unguarded.failures) == 1 and "hidden shards first" in unguarded.failures[0].case
    assert_rejects(exercises.ring_merge(lambda parts: _ring_merge(parts, update_lse=False)),
                   "lse was never updated", "o is the last part alone")
    def base2(parts):
        lse = torch.log2(sum(torch.exp2(l) for _, l in parts))
        return sum(torch.exp2(l - lse)[:, None] * o for o, l in parts), lse
    assert_rejects(exercises.ring_merge(base2), "exp2 / log2 on a natural-log lse")
    assert_rejects(exercises.ring_merge(lambda parts: (stacked(parts)[0], torch.stack([l for _, l in parts]).amax(0))),
                   "keeps the largest part only")


def _causal_work(n_total, world, layout, *, diag_full=False, zigzag_full=False):
    n = n_total // world
    diag = n * n if diag_full else n * (n + 1) / 2
    if layout == "zigzag":
        return torch.full((world,), diag + (world - 1) * n * n / (1 if zigzag_full else 2), dtype=torch.float64)
    return torch.tensor([r * n * n + diag for r in range(world)], dtype=torch.float64)


def test_causal_work():
    assert exercises.causal_work(_causal_work).ok
    from attnpkg import distributed as cp
    def from_schedule(n_total, world, layout):
        n = n_total // world
        return [sum(cp.block_work(cp.schedule(r, s, world, n, causal=True, layout=layout)) for s in range(world))
                for r in range(world)]
    assert exercises.causal_work(from_schedule).ok          # a list is accepted too
    assert_rejects(exercises.causal_work(lambda n_total, world, layout: [n_total * (n_total + 1) / 2 / world] * world),
                   "every rank the average")
    assert_rejects(exercises.causal_work(lambda n_total, world, layout: _causal_work(n_total, world, "contiguous")),
                   "zigzag counted like the contiguous layout")
    assert_rejects(exercises.causal_work(lambda *a: _causal_work(*a, diag_full=True)), "diagonal block counted as n^2")
    assert_rejects(exercises.causal_work(lambda *a: _causal_work(*a, zigzag_full=True)), "steps off the diagonal counted as n^2")


# The book ----------------------------------------------------------------------------------------------

def _cells(path):
    import json
    return [(c["cell_type"], "".join(c["source"]), c.get("metadata", {}).get("tags", []))
            for c in json.loads(path.read_text())["cells"]]


@pytest.mark.parametrize("chapter", ["01", "02", "03", "04", "05", "06", "07", "08", "09"])
def test_every_chapter_has_checked_exercises(chapter):
    """At least two exercises per chapter, each: a TODO cell, a cell that grades it, a folded solution that the
    same checker asserts (so every build of the book runs the solution through its checker)."""
    from pathlib import Path
    (path,) = (Path(__file__).resolve().parents[1] / "notebooks").glob(f"{chapter}_*.ipynb")
    cells = _cells(path)
    graded = 0
    for i, (kind, source, tags) in enumerate(cells[:-2]):
        if kind == "code" and "# TODO" in source:
            check_kind, check, _ = cells[i + 1]
            solution_kind, solution, solution_tags = cells[i + 2]
            name = check.strip().removeprefix("exercises.").split("(")[0]
            assert check_kind == "code" and check.strip().startswith("exercises.") and name in exercises.__all__, check
            assert "hide-input" in solution_tags and f"exercises.{name}(" in solution and ".assert_ok()" in solution
            assert ("raise NotImplementedError" in source) != source.lstrip().startswith(("@triton.jit", "import triton"))
            graded += 1
    assert graded >= 2, f"{path.name}: {graded} checked exercises"


def test_every_checker_is_used_in_the_book():
    from pathlib import Path
    text = "".join(p.read_text() for p in (Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
    unused = [name for name in exercises.__all__ if f"exercises.{name}(" not in text]
    assert not unused, unused


# Chapter 8: the start values of packed sequences ------------------------------------------------------

def _pair_index(cu, heads, block, *, tiles=None, local=True, stride=2, head_major=False):
    lengths = (cu[1:] - cu[:-1]).tolist()
    tiles = tiles or -(-max(lengths) // block)
    out = torch.empty(heads, int(cu[-1]), dtype=torch.long)
    for b, n in enumerate(lengths):
        for i in range(n):
            row = int(cu[b]) + i
            j = i if local else row
            for h in range(heads):
                program = h * len(lengths) + b if head_major else b * heads + h
                out[h, row] = (program * tiles + j // block) * stride * block + j % block
    return out


def test_pair_index():
    assert exercises.pair_index(_pair_index).ok
    assert "not attempted" in str(exercises.pair_index(todo))
    assert_rejects(exercises.pair_index(lambda cu, h, b: _pair_index(cu, h, b, tiles=-(-int(cu[-1]) // b))),
                   "taken from the packed length")
    assert_rejects(exercises.pair_index(lambda cu, h, b: _pair_index(cu, h, b, local=False)), "is the packed row")
    assert_rejects(exercises.pair_index(lambda cu, h, b: _pair_index(cu, h, b, stride=1)), "stride is 2 block")
    assert_rejects(exercises.pair_index(lambda cu, h, b: _pair_index(cu, h, b, head_major=True)), "head-major")


def test_pair_index_matches_the_preprocessing_kernel():
    """The exercise's answer is where flash_backward_preprocess (VARLEN, PAIRS) writes each row's -m."""
    from attnpkg.kernels.flash_backward import flash_backward_preprocess
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths, heads, block, d = [6, 0, 1, 9], 3, 4, 16
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    total, tiles = int(cu[-1]), -(-max(lengths) // block)
    o, do = (torch.randn(total, heads, d, device=device) for _ in range(2))
    lse = torch.randn(1, heads, total, device=device)
    pairs = torch.full((len(lengths) * heads * tiles * 2 * block,), float("nan"), device=device)
    strides = (0, o.stride(1), o.stride(0), 1)
    flash_backward_preprocess[(tiles * len(lengths) * heads,)](
        o, do, lse, lse, pairs, pairs, cu.to(torch.int32).to(device), *strides, *strides, heads, max(lengths), total,
        1.0, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=block, HAS_DLSE=False, PAIRS=True, VARLEN=True, INT64=False)
    index = _pair_index(cu, heads, block).to(device)
    torch.testing.assert_close(pairs[index], -lse[0])
