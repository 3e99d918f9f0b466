"""Every closed form of attnpkg.grads against torch.autograd in float64 (and gradcheck where it fits)."""
import pytest
import torch

from attnpkg import grads, reference

f64 = dict(dtype=torch.float64)


def autograd_of(fn, inputs, dy):
    inputs = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, dy)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_softmax_jacobian_matches_autograd(n):
    s = torch.randn(3, n, **f64)
    p = torch.softmax(s, dim=-1)
    for row in range(3):
        expected = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, dim=-1), s[row])
        torch.testing.assert_close(grads.softmax_jacobian(p)[row], expected)


def test_softmax_jacobian_cases_and_structure():
    p = torch.softmax(torch.randn(6, **f64), dim=-1)
    jac = grads.softmax_jacobian(p)
    torch.testing.assert_close(jac.diagonal(), p * (1 - p))            # j == k
    off = ~torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(jac[off], -(p[:, None] * p[None, :])[off])  # j != k
    torch.testing.assert_close(jac, jac.T)
    torch.testing.assert_close(jac.sum(dim=0), torch.zeros(6, **f64))  # shifting s changes nothing


def test_softmax_backward_matches_autograd_and_jacobian():
    s, dp = torch.randn(4, 5, 9, **f64), torch.randn(4, 5, 9, **f64)
    p = torch.softmax(s, dim=-1)
    (expected,) = autograd_of(lambda x: torch.softmax(x, dim=-1), [s], dp)
    torch.testing.assert_close(grads.softmax_backward(p, dp), expected)
    via_jacobian = (dp.unsqueeze(-2) @ grads.softmax_jacobian(p)).squeeze(-2)
    torch.testing.assert_close(grads.softmax_backward(p, dp), via_jacobian)


@pytest.mark.parametrize("x_shape,w_shape", [((2, 3), (3, 4)), ((5, 7, 3), (3, 2)), ((1, 1), (1, 1))])
def test_matmul_backward_matches_autograd(x_shape, w_shape):
    x, w = torch.randn(x_shape, **f64), torch.randn(w_shape, **f64)
    dy = torch.randn(*x_shape[:-1], w_shape[-1], **f64)
    expected = autograd_of(lambda a, b: a @ b, [x, w], dy)
    for got, want in zip(grads.matmul_backward(x, w, dy), expected):
        torch.testing.assert_close(got, want)


ATTENTION_CASES = [
    # (B, Hq, Hkv, Nq, Nk, d_k, d_v)
    (2, 3, 3, 7, 7, 5, 5),
    (1, 1, 1, 1, 1, 4, 4),      # one head, one token
    (2, 2, 2, 6, 6, 4, 7),      # d_k != d_v
    (1, 2, 2, 5, 11, 8, 8),     # more keys than queries
    (1, 2, 2, 11, 5, 8, 8),     # more queries than keys (causal: fully masked rows)
    (2, 6, 2, 9, 9, 8, 8),      # grouped-query
    (1, 4, 1, 6, 8, 8, 8),      # multi-query
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_backward_matches_autograd(case, causal):
    b, hq, hkv, nq, nk, dk, dv = case
    q, k = torch.randn(b, hq, nq, dk, **f64), torch.randn(b, hkv, nk, dk, **f64)
    v, do = torch.randn(b, hkv, nk, dv, **f64), torch.randn(b, hq, nq, dv, **f64)
    expected = autograd_of(lambda *t: reference.attention(*t, causal=causal), [q, k, v], do)
    got = grads.attention_backward(q, k, v, do, causal=causal)
    for name, g, e in zip("qkv", got, expected):
        assert not g.isnan().any(), f"d{name} has NaN"
        torch.testing.assert_close(g, e, msg=lambda m: f"d{name}: {m}")


def test_attention_backward_custom_scale():
    q, k, v, do = (torch.randn(2, 2, 6, 4, **f64) for _ in range(4))
    expected = autograd_of(lambda *t: reference.attention(*t, scale=0.7), [q, k, v], do)
    for g, e in zip(grads.attention_backward(q, k, v, do, scale=0.7), expected):
        torch.testing.assert_close(g, e)


def test_reference_attention_gradcheck():
    inputs = [torch.randn(1, 2, 4, 3, **f64, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *t: reference.attention(*t, causal=True), inputs)


def random_mha(b, nq, nk, d_model, n_heads, d_k, d_v):
    x_q, x_k, x_v = torch.randn(b, nq, d_model, **f64), torch.randn(b, nk, d_model, **f64), torch.randn(b, nk, d_model, **f64)
    w_q, w_k = torch.randn(d_model, n_heads * d_k, **f64), torch.randn(d_model, n_heads * d_k, **f64)
    w_v, w_o = torch.randn(d_model, n_heads * d_v, **f64), torch.randn(n_heads * d_v, d_model, **f64)
    return [x_q, x_k, x_v, w_q, w_k, w_v, w_o]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dims", [(2, 5, 5, 8, 2, 4, 4), (1, 1, 1, 6, 1, 6, 6), (2, 4, 7, 6, 3, 2, 5), (1, 7, 3, 4, 2, 3, 3)])
def test_multihead_backward_matches_autograd(dims, causal):
    inputs = random_mha(*dims)
    n_heads = dims[4]
    dy = torch.randn(dims[0], dims[1], dims[3], **f64)
    expected = autograd_of(lambda *t: reference.multihead_attention(*t, n_heads, causal=causal), inputs, dy)
    got = grads.multihead_backward(*inputs, dy, n_heads, causal=causal)
    assert list(got) == ["x_q", "x_k", "x_v", "w_q", "w_k", "w_v", "w_o"]
    for name, e in zip(got, expected):
        torch.testing.assert_close(got[name], e, msg=lambda m: f"{name}: {m}")


def test_self_attention_input_gradient_is_the_sum_of_three_terms():
    x, _, _, w_q, w_k, w_v, w_o = random_mha(2, 6, 6, 8, 2, 4, 4)
    dy = torch.randn(2, 6, 8, **f64)
    (expected,) = autograd_of(lambda t: reference.multihead_attention(t, t, t, w_q, w_k, w_v, w_o, 2, causal=True), [x], dy)
    got = grads.multihead_backward(x, x, x, w_q, w_k, w_v, w_o, dy, 2, causal=True)
    torch.testing.assert_close(got["x_q"] + got["x_k"] + got["x_v"], expected)


def test_multihead_gradcheck():
    inputs = [t.requires_grad_() for t in random_mha(1, 3, 4, 4, 2, 2, 2)]
    assert torch.autograd.gradcheck(lambda *t: reference.multihead_attention(*t, 2), inputs)
