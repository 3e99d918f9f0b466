"""Properties that only a real GPU can show: torch.compile, memory that grows linearly, determinism."""
import math

import pytest
import torch

import attnpkg

pytestmark = pytest.mark.gpu


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def layer(q, k, v):
        return (attnpkg.flash_attention(q, k, v, causal=True) * 2).sum()

    compiled = torch.compile(layer, fullgraph=True)
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    layer(q, k, v).backward()
    torch.testing.assert_close(loss, layer(q, k, v))
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("deterministic", [True, False], ids=["two-kernel", "fastest"])
def test_memory_grows_linearly_in_sequence_length(deterministic):
    peaks = {}
    for n in (4096, 8192, 16384):
        q, k, v = (torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        attnpkg.flash_attention(q, k, v, causal=True, deterministic=deterministic).backward(do)
        torch.cuda.synchronize()
        peaks[n] = torch.cuda.max_memory_allocated() - base
        del q, k, v, do
    # Linear: doubling N doubles the extra memory (an N x N buffer would quadruple it).
    assert peaks[8192] / peaks[4096] < 2.2 and peaks[16384] / peaks[8192] < 2.2, peaks
    # And small: O and the three gradients, 4 times the size of q, plus row statistics; the five-product pass
    # (attnpkg.hopper, where it serves) adds its float32 dQ buffer, 2 more: 6. The 4 heads' 16k x 16k score
    # matrices would take 2 GiB in bf16, 128 times the size of q.
    q_bytes = 4 * 16384 * 128 * 2
    assert peaks[16384] < (4.5 if deterministic else 6.5) * q_bytes, peaks


@pytest.mark.parametrize("hkv", [16, 4, 1])
def test_backward_bitwise_deterministic_on_gpu(hkv):
    q = torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, hkv, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    results = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attnpkg.flash_attention(*leaves, causal=True, deterministic=True).backward(do)
        results.append([t.grad for t in leaves])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _misaligned(shape, dtype, offset):
    """A tensor whose address is ``offset`` elements past a 16-byte boundary (a view into a larger buffer)."""
    return torch.randn(math.prod(shape) + offset, device="cuda", dtype=dtype)[offset:].view(shape)


def test_direct_launch_reuses_compiled_kernels_only_for_the_same_specialization():
    from attnpkg.kernels.flash_forward import flash_forward_kernel
    from attnpkg.launch import launch
    launcher = launch(flash_forward_kernel)
    launcher.compiled.clear()
    shape = (2, 4, 384, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(3))
    first = attnpkg.flash_attention(q, k, v, causal=True)
    assert len(launcher.compiled) == 1
    again = attnpkg.flash_attention(q, k, v, causal=True)        # served by the direct launch
    assert len(launcher.compiled) == 1 and torch.equal(first, again)
    want = attnpkg.reference.attention(q.double(), k.double(), v.double(), causal=True)
    assert (first.double() - want).abs().max() < 2e-3
    # Addresses 2 bytes past 16-byte alignment, odd strides, another length: each its own entry, each exact.
    cases = [tuple(_misaligned(shape, torch.float16, 1) for _ in range(3)),
             tuple(t[..., :40] for t in (q, k, v)),
             tuple(t[:, :, :200] for t in (q, k, v))]
    for args in cases:
        for _ in range(2):                                         # Triton's path, then the direct one
            got = attnpkg.flash_attention(*args, causal=True)
            exact = attnpkg.reference.attention(*(t.double() for t in args), causal=True)
            assert (got.double() - exact).abs().max() < 2e-3
    assert len(launcher.compiled) == 1 + len(cases)


def test_direct_launch_backward_matches_triton_launch(monkeypatch):
    from attnpkg import launch as launch_module
    q, k, v = (torch.randn(2, 8, 640, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attnpkg.flash_attention(*leaves, causal=True, deterministic=True).backward(do)
        return [t.grad for t in leaves]

    grads()
    direct = grads()                                                # second call: direct launches
    monkeypatch.setattr(launch_module, "_direct", False)
    through_triton = grads()
    for a, b in zip(direct, through_triton):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    torch.cuda.set_device(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda:1", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = attnpkg.flash_attention(q, k, v, causal=True)
    o.backward(torch.ones_like(o))
    assert o.device == q.grad.device == torch.device("cuda:1")
    want = attnpkg.reference.attention(*(t.detach().double() for t in (q, k, v)), causal=True)
    assert (o.double() - want).abs().max() < 2e-2
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    attnpkg.reference.attention(*leaves, causal=True).backward(torch.ones_like(want))
    for got, exact in zip((q.grad, k.grad, v.grad), leaves):
        assert (got.double() - exact.grad).abs().max() < 5e-2 * exact.grad.abs().max()


def test_fused_backward_is_deterministic_in_dk_dv_and_close_in_dq(monkeypatch):
    """The atomic adds make dQ's last bits depend on the order of the adds; dK and dV are summed in
    registers in a fixed order, so they are the same on every run. dQ stays within float32
    reordering (before rounding) of the deterministic pass."""
    from attnpkg import attention, hopper
    monkeypatch.setattr(attention, "FUSED_BACKWARD", True)
    monkeypatch.setattr(hopper, "ENABLED", False)                   # the portable five-product kernel
    q = torch.randn(2, 16, 2048, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)

    def grads(deterministic):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attnpkg.flash_attention(*leaves, causal=True, deterministic=deterministic).backward(do)
        return [t.grad for t in leaves]
    exact = grads(True)
    first = grads(False)
    for _ in range(2):
        again = grads(False)
        assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])
        torch.testing.assert_close(again[0], exact[0], atol=2e-2, rtol=2e-2)
