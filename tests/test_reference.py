"""The reference attention against torch's own SDPA, and its edge cases."""
import pytest
import torch
import torch.nn.functional as F

from attnpkg import reference

f64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (1, 1, 1, 4), (3, 2, 33, 16)])
def test_matches_sdpa_square(shape, causal):
    q, k, v = (torch.randn(shape, **f64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal), expected)


@pytest.mark.parametrize("n_q,n_k", [(5, 9), (9, 5), (1, 6)])
def test_bottom_right_causal_matches_explicit_mask(n_q, n_k):
    q = torch.randn(2, 3, n_q, 8, **f64)
    k, v = torch.randn(2, 3, n_k, 8, **f64), torch.randn(2, 3, n_k, 6, **f64)
    visible = torch.tensor([[j <= i + n_k - n_q for j in range(n_k)] for i in range(n_q)])
    out = reference.attention(q, k, v, causal=True)
    rows = visible.any(dim=1)
    expected = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=visible[rows])
    torch.testing.assert_close(out[:, :, rows], expected)
    assert torch.all(out[:, :, ~rows] == 0), "a query with no visible key must output zeros"


def test_fully_masked_rows_give_zero_output_and_minus_inf_lse():
    q, k, v = torch.randn(1, 2, 6, 4, **f64), torch.randn(1, 2, 2, 4, **f64), torch.randn(1, 2, 2, 4, **f64)
    out, lse = reference.attention(q, k, v, causal=True, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.all(lse[..., :4] == float("-inf")) and torch.isfinite(lse[..., 4:]).all()
    assert torch.all(out[..., :4, :] == 0)


def test_lse_is_log_sum_exp_of_scores():
    q, k, v = torch.randn(2, 2, 10, 8, **f64), torch.randn(2, 2, 12, 8, **f64), torch.randn(2, 2, 12, 8, **f64)
    _, lse = reference.attention(q, k, v, scale=0.3, return_lse=True)
    torch.testing.assert_close(lse, torch.logsumexp(0.3 * q @ k.transpose(-2, -1), dim=-1))


def test_grouped_query_matches_sdpa():
    q = torch.randn(2, 6, 10, 8, **f64)
    k, v = torch.randn(2, 2, 10, 8, **f64), torch.randn(2, 2, 10, 8, **f64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(reference.attention(q, k, v, causal=True), expected)


def test_large_logits_do_not_overflow():
    q, k, v = (100 * torch.randn(1, 1, 16, 8, dtype=torch.float32) for _ in range(3))
    out = reference.attention(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference.attention(q.double(), k.double(), v.double()), atol=1e-3, rtol=1e-3)


def test_multihead_matches_torch_module():
    d_model, n_heads, n = 12, 3, 7
    mha = torch.nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, n, d_model, **f64)
    expected, _ = mha(x, x, x, need_weights=False)
    w_q, w_k, w_v = (w.T for w in mha.in_proj_weight.chunk(3))
    out = reference.multihead_attention(x, x, x, w_q, w_k, w_v, mha.out_proj.weight.T, n_heads)
    torch.testing.assert_close(out, expected)


def test_split_and_merge_heads_are_inverse():
    x = torch.randn(2, 5, 12, **f64)
    heads = reference.split_heads(x, 3)
    assert heads.shape == (2, 3, 5, 4)
    torch.testing.assert_close(heads[:, 1], x[..., 4:8])
    torch.testing.assert_close(reference.merge_heads(heads), x)
