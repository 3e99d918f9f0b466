"""attnpkg.softmax (Triton forward and backward kernels) against float64 torch."""
import pytest
import torch

import attnpkg
from attnpkg import grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 33), (4, 1000), (2, 2500)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_and_backward(shape, dtype):
    x = (3 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    p = attnpkg.softmax(x)
    dp = torch.randn_like(p)
    p.backward(dp)
    x64 = x.detach().double().requires_grad_()
    p64 = torch.softmax(x64, dim=-1)
    p64.backward(dp.double())
    same = x.detach().clone().requires_grad_()                     # PyTorch in the same precision
    torch.softmax(same, dim=-1).backward(dp)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    assert p.dtype == dtype and x.grad.dtype == dtype
    torch.testing.assert_close(p.double(), p64, atol=tol, rtol=tol)
    assert (x.grad.double() - x64.grad).abs().max() <= 2 * (same.grad.double() - x64.grad).abs().max() + tol / 10
    torch.testing.assert_close(p.double().sum(-1), torch.ones(shape[:-1], dtype=torch.float64, device=DEVICE), atol=tol * 10, rtol=0)


def test_backward_is_the_closed_form():
    p = torch.softmax(torch.randn(6, 40, device=DEVICE), dim=-1)
    dp = torch.randn_like(p)
    x = torch.log(p).requires_grad_()
    attnpkg.softmax(x).backward(dp)
    torch.testing.assert_close(x.grad, grads.softmax_backward(p, dp), atol=1e-6, rtol=1e-5)


def test_large_inputs_and_minus_infinity():
    x = torch.tensor([[1000.0, 999.0, float("-inf")], [-1e4, -1e4 - 1, -1e4 - 2]], device=DEVICE)
    p = attnpkg.softmax(x)
    torch.testing.assert_close(p, torch.softmax(x, dim=-1))
    assert p[0, 2] == 0


def test_non_contiguous_input():
    x = torch.randn(30, 8, device=DEVICE).T                   # rows are strided
    torch.testing.assert_close(attnpkg.softmax(x), torch.softmax(x, dim=-1))
