"""attnpkg.MultiHeadAttention: the flash kernel inside a layer, checked against the reference and
the closed-form weight gradients of attnpkg.grads."""
import pytest
import torch

import attnpkg
from attnpkg import grads, reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weights(m):
    return [m.w_q, m.w_k, m.w_v, m.w_o]


@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_weight_gradients_match_closed_form(causal):
    m = attnpkg.MultiHeadAttention(24, 3, causal=causal, device=DEVICE, dtype=torch.float32)
    x = torch.randn(2, 11, 24, device=DEVICE)
    y = m(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    w64 = [w.detach().double() for w in weights(m)]
    x64 = x.double()
    torch.testing.assert_close(y.double(), reference.multihead_attention(x64, x64, x64, *w64, 3, causal=causal), atol=1e-5, rtol=1e-5)
    expected = grads.multihead_backward(x64, x64, x64, *w64, dy.double(), 3, causal=causal)
    for name, w in zip(("w_q", "w_k", "w_v", "w_o"), weights(m)):
        torch.testing.assert_close(w.grad.double(), expected[name], atol=1e-4, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_cross_attention_and_d_head():
    m = attnpkg.MultiHeadAttention(16, 2, d_head=12, device=DEVICE)
    xq, xkv = torch.randn(3, 5, 16, device=DEVICE), torch.randn(3, 9, 16, device=DEVICE)
    assert m.w_q.shape == (16, 24) and m.w_o.shape == (24, 16)
    w = [t.detach() for t in weights(m)]
    torch.testing.assert_close(m(xq, xkv), reference.multihead_attention(xq, xkv, xkv, *w, 2), atol=1e-5, rtol=1e-5)


def test_trains():
    torch.manual_seed(0)
    m = attnpkg.MultiHeadAttention(16, 2, causal=True, device=DEVICE)
    x = torch.randn(4, 12, 16, device=DEVICE)
    target = torch.randn(4, 12, 16, device=DEVICE)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_the_three_call_forms():
    """m(x): self-attention; m(x_q, x_kv): keys and values from one memory; m(x_q, x_k, x_v): all three."""
    m = attnpkg.MultiHeadAttention(16, 2, device=DEVICE)
    w = [t.detach() for t in weights(m)]
    xq, xk, xv = (torch.randn(2, n, 16, device=DEVICE) for n in (5, 7, 7))
    ref = lambda a, b, c: reference.multihead_attention(a, b, c, *w, 2)
    for args, want in (((xq,), ref(xq, xq, xq)), ((xq, xk), ref(xq, xk, xk)), ((xq, xk, xv), ref(xq, xk, xv))):
        torch.testing.assert_close(m(*args), want, atol=1e-5, rtol=1e-5)
    # (x_q and x_k differ in length, so x_v defaulting to x_q instead of x_k could not pass.)
    with pytest.raises(ValueError, match="x_v given without x_k"):
        m(xq, x_v=xv)
