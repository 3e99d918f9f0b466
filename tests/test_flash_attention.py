"""attnpkg.flash_attention against a float64 reference, on the CPU through Triton's interpreter
(small shapes) and, where a CUDA GPU is present, compiled (all shapes)."""
import pytest
import torch

import attnpkg
from accuracy import assert_flash_accuracy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


def run_flash(q, k, v, do, causal, scale=None, deterministic=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attnpkg.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True, deterministic=deterministic)
    o.backward(do)
    return {"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def random_inputs(b, hq, hkv, nq, nk, d, dtype, scale_inputs=1.0):
    q = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype) * scale_inputs
    k = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype) * scale_inputs
    v = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype)
    do = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype)
    return q, k, v, do


# (B, Hq, Hkv, Nq, Nk, D): small enough for the interpreter, covering every path of the kernels.
SMALL_CASES = [
    (1, 1, 1, 1, 1, 16),       # one token
    (2, 2, 2, 17, 17, 40),     # batch > 1, ragged length, head_dim not a power of two
    (1, 2, 2, 64, 64, 64),     # whole tiles
    (1, 1, 1, 40, 100, 80),    # Nq < Nk
    (1, 1, 1, 100, 40, 16),    # Nq > Nk (causal: fully masked rows)
    (1, 4, 2, 33, 33, 32),     # grouped-query
    (2, 3, 1, 20, 45, 16),     # multi-query
    (1, 1, 1, 17, 23, 128),
    (1, 1, 1, 9, 12, 256),
]


# The two portable backward passes: five products with dQ by atomic adds (switched on here: by default
# attnpkg runs the other, which measured faster), and the deterministic seven. The Hopper kernel, which
# deterministic=False would run on an H100/H200, is switched off here: tests/test_hopper.py tests it.
MODES = {"fused": False, "deterministic": True}


@pytest.fixture(autouse=True)
def _fused_backward_on(monkeypatch):
    from attnpkg import attention, hopper
    monkeypatch.setattr(attention, "FUSED_BACKWARD", True)
    monkeypatch.setattr(hopper, "ENABLED", False)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_reference(case, causal, mode):
    q, k, v, do = random_inputs(*case, HALF)
    assert_flash_accuracy(run_flash(q, k, v, do, causal, deterministic=MODES[mode]), q, k, v, do, causal)


@pytest.mark.parametrize("setting", [None, True, False])
@pytest.mark.parametrize("torch_flag", [False, True])
def test_deterministic_follows_torch_unless_given(monkeypatch, setting, torch_flag):
    from attnpkg import attention
    seen = []
    real = attention.backward_impl
    monkeypatch.setattr(attention, "backward_impl", lambda *args: seen.append(args[-1]) or real(*args))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: torch_flag)
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE, dtype=HALF, requires_grad=True) for _ in range(3))
    attnpkg.flash_attention(q, k, v, deterministic=setting).sum().backward()
    assert seen == [torch_flag if setting is None else setting]
    with pytest.raises(TypeError, match="deterministic must be None, True or False"):
        attnpkg.flash_attention(q, k, v, deterministic="yes")


def test_fused_backward_launches_no_dq_kernel(monkeypatch):
    """deterministic=False runs the five-product kernel alone; True adds the dQ kernel."""
    from attnpkg import attention
    launched = []
    real = attention.launch
    monkeypatch.setattr(attention, "launch", lambda kernel: launched.append(kernel.__name__) or real(kernel))
    q, k, v = (torch.randn(1, 2, 8, 16, device=DEVICE, dtype=HALF, requires_grad=True) for _ in range(3))
    for deterministic in (False, True):
        launched.clear()
        attnpkg.flash_attention(q, k, v, deterministic=deterministic).sum().backward()
        assert ("flash_backward_dq_kernel" in launched) == deterministic, launched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_dtype(dtype):
    q, k, v, do = random_inputs(1, 2, 1, 30, 50, 24, dtype)
    got = run_flash(q, k, v, do, True)
    assert got["o"].dtype == dtype and got["dq"].dtype == dtype and got["lse"].dtype == torch.float32
    assert_flash_accuracy(got, q, k, v, do, True)


def test_custom_scale():
    q, k, v, do = random_inputs(1, 2, 2, 20, 20, 16, HALF)
    assert_flash_accuracy(run_flash(q, k, v, do, False, scale=0.05), q, k, v, do, False, scale=0.05)


@pytest.mark.parametrize("causal", [False, True])
def test_large_logits_do_not_overflow(causal):
    # bf16 has float32's range, so PyTorch's own bf16 computation is a fair baseline here.
    q, k, v, do = random_inputs(1, 2, 2, 48, 48, 32, torch.bfloat16, scale_inputs=100.0)
    got = run_flash(q, k, v, do, causal)
    assert all(torch.isfinite(t).all() for name, t in got.items() if name != "lse")
    # Logits reach 1e5 here, where float32 itself resolves only steps of 0.008: the probabilities
    # recomputed in the backward pass can move by 0.5%, while PyTorch's bf16 rounds S so coarsely that
    # saturated rows come out exactly one-hot. So the floor is 1% of the gradients' size.
    assert_flash_accuracy(got, q, k, v, do, causal, floor=1e-2)


def test_large_logits_float16():
    # Logits near 5e4: PyTorch's float16 attention overflows (inf - inf = NaN); the kernel keeps
    # its logits in float32 and stays within float16 rounding of the exact result.
    q, k, v, do = random_inputs(1, 2, 2, 48, 48, 32, torch.float16, scale_inputs=100.0)
    got = run_flash(q, k, v, do, True)
    exact = attnpkg.reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert torch.isfinite(got["o"]).all() and not any(t.isnan().any() for t in got.values())
    torch.testing.assert_close(got["o"].double(), exact, atol=2e-3, rtol=2e-3)


def test_strided_inputs():
    base = torch.randn(2, 40, 3, 2, 48, device=DEVICE, dtype=HALF)          # (B, N, 3, H, D): a packed qkv
    q, k, v = (base[:, :, i].transpose(1, 2)[..., :40] for i in range(3))  # (B, H, N, 40), no dim contiguous
    assert not q.is_contiguous()
    do = torch.randn(2, 2, 40, 40, device=DEVICE, dtype=HALF).transpose(-1, -2).contiguous().transpose(-1, -2)
    assert_flash_accuracy(run_flash(q, k, v, do, True), q, k, v, do, True)


def test_fully_masked_rows_give_zeros_and_minus_inf_lse():
    q, k, v, do = random_inputs(1, 2, 2, 20, 6, 16, HALF)     # causal, 14 rows see no key
    got = run_flash(q, k, v, do, True)
    assert torch.all(got["o"][:, :, :14] == 0) and torch.all(got["dq"][:, :, :14] == 0)
    assert torch.all(got["lse"][:, :, :14] == float("-inf")) and torch.isfinite(got["lse"][:, :, 14:]).all()
    assert not any(t.isnan().any() for t in got.values())


def test_lse_merges_partial_attentions():
    """Attention over [K1; K2] from two halves, weighted by their lse: the property lse is for."""
    q, k, v, _ = random_inputs(1, 2, 2, 16, 40, 32, torch.float32)
    o1, lse1 = attnpkg.flash_attention(q, k[:, :, :25], v[:, :, :25], return_lse=True)
    o2, lse2 = attnpkg.flash_attention(q, k[:, :, 25:], v[:, :, 25:], return_lse=True)
    lse = torch.logaddexp(lse1, lse2)
    merged = torch.exp(lse1 - lse)[..., None] * o1 + torch.exp(lse2 - lse)[..., None] * o2
    o, lse_full = attnpkg.flash_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(merged, o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_full, atol=1e-5, rtol=1e-5)


def test_gradient_through_lse():
    q, k, v, do = random_inputs(1, 2, 2, 12, 20, 16, torch.float32)
    dlse = torch.randn(1, 2, 12, device=DEVICE)
    grads = []
    for fn in (attnpkg.flash_attention, attnpkg.reference.attention):
        leaves = [t.double().requires_grad_() if fn is attnpkg.reference.attention else t.clone().requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves, causal=True, return_lse=True)
        torch.autograd.backward([o, lse], [do.to(o.dtype), dlse.to(lse.dtype)])
        grads.append([t.grad.double() for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_gradient_of_lse_sum_is_an_expanded_tensor():
    """lse.sum() sends back a stride-0 gradient; the kernel must not read it as contiguous."""
    q, k, v, do = random_inputs(1, 2, 2, 16, 24, 16, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = attnpkg.flash_attention(*leaves, return_lse=True)
    (o.sum() + lse.sum()).backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    o64, lse64 = attnpkg.reference.attention(*ref, return_lse=True)
    (o64.sum() + lse64.sum()).backward()
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_backward_is_deterministic():
    q, k, v, do = random_inputs(2, 4, 2, 70, 70, 32, HALF)
    first, second = run_flash(q, k, v, do, True, deterministic=True), run_flash(q, k, v, do, True, deterministic=True)
    for name in ("dq", "dk", "dv"):
        assert torch.equal(first[name], second[name]), name


def test_matches_sdpa_where_they_agree():
    q, k, v, _ = random_inputs(2, 4, 4, 50, 50, 64, torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attnpkg.flash_attention(q, k, v, causal=True), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape_q,shape_kv", [((0, 2, 8, 16), (0, 2, 8, 16)), ((1, 2, 0, 16), (1, 2, 8, 16)),
                                              ((1, 2, 8, 16), (1, 2, 0, 16))])
def test_empty_inputs(shape_q, shape_kv):
    q = torch.randn(shape_q, device=DEVICE, dtype=HALF, requires_grad=True)
    k, v = (torch.randn(shape_kv, device=DEVICE, dtype=HALF, requires_grad=True) for _ in range(2))
    o, lse = attnpkg.flash_attention(q, k, v, return_lse=True)
    assert o.shape == q.shape and lse.shape == q.shape[:3]
    if shape_kv[2] == 0 and q.numel():                    # queries but no keys: every row is fully masked
        assert torch.all(o == 0) and torch.all(lse == float("-inf"))
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and not q.grad.isnan().any()


def test_torch_compile_traces_the_custom_ops():
    """fullgraph tracing through the registered ops and their fake implementations (aot_eager: no codegen)."""
    q, k, v = (torch.randn(1, 2, 40, 16, device=DEVICE, dtype=HALF, requires_grad=True) for _ in range(3))

    def layer(q, k, v):
        o, lse = attnpkg.flash_attention(q, k, v, causal=True, return_lse=True)
        return (o * 2).sum() + lse.sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    got = torch.autograd.grad(loss, (q, k, v))
    want = torch.autograd.grad(layer(q, k, v), (q, k, v))
    torch.testing.assert_close(loss, layer(q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# Larger shapes: too slow for the interpreter, run where there is a GPU.
GPU_CASES = [(b, h, hkv, n, n, d) for (b, h, hkv) in [(2, 4, 4), (1, 8, 2)] for n in (128, 200, 1000)
             for d in (16, 40, 64, 80, 128, 256)] + [(2, 4, 1, 1000, 128, 64), (2, 4, 2, 128, 1000, 128),
                                                     (1, 2, 2, 1, 1000, 64), (1, 2, 2, 1000, 1, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gpu_matches_float64_reference(case, causal, dtype, mode):
    q, k, v, do = random_inputs(*case, dtype)
    assert_flash_accuracy(run_flash(q, k, v, do, causal, deterministic=MODES[mode]), q, k, v, do, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_float32_and_large_logits(d):
    for dtype, s in ((torch.float32, 1.0), (torch.bfloat16, 100.0)):
        q, k, v, do = random_inputs(2, 4, 2, 1000, 1000, d, dtype, scale_inputs=s)
        assert_flash_accuracy(run_flash(q, k, v, do, True), q, k, v, do, True)
