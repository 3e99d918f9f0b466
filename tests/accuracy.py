"""The accuracy criterion of flash-attn's tests: compared with a float64 reference, the kernel's
error may be at most twice the error of the same computation done by PyTorch in the kernel's
precision, plus a small absolute floor."""
import torch

from attnpkg import reference


def max_error(x, ref):
    x, ref = x.double(), ref.double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (torch.sign(x) == torch.sign(ref))
    return torch.where(both_inf, 0.0, (x - ref).abs()).max().item() if x.numel() else 0.0


def attention_and_grads(q, k, v, do, causal, scale=None, fn=reference.attention, **options):
    """Output, lse and (dq, dk, dv) of ``fn`` via autograd, in the inputs' dtype. ``options``: more
    keyword arguments of ``fn`` (window_size, softcap, alibi_slopes, ...)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, causal=causal, scale=scale, return_lse=True, **options)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do) if o.numel() else (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def assert_flash_accuracy(got, q, k, v, do, causal, scale=None, floor=1e-5, fn=reference.attention, **options):
    """``got``: dict of the kernel's results. Checks each against float64 with the 2x rule.

    The absolute floor is relative to the size of the quantity's pass: ``floor`` times the largest
    exact output entry for ``o``, the largest finite exact lse (at least 1) for ``lse``, and the
    largest exact gradient entry (over dq, dk, dv) for the gradients. It matters only where
    PyTorch's error happens to be exactly 0 (a single key, say), or is below float32's resolution
    of a large quantity (an lse of -400 is resolved to 3e-5)."""
    exact = attention_and_grads(*(t.double() for t in (q, k, v, do)), causal, scale, fn, **options)
    same_precision = attention_and_grads(q, k, v, do, causal, scale, fn, **options)
    size = lambda names: max([1.0] + [exact[n].abs().max().item() for n in names if exact[n].numel()])
    finite_lse = exact["lse"][torch.isfinite(exact["lse"])].abs()
    lse_size = max(1.0, finite_lse.max().item()) if finite_lse.numel() else 1.0
    scales = {"o": size(["o"]), "lse": lse_size,
              **dict.fromkeys(("dq", "dk", "dv"), size(["dq", "dk", "dv"]))}
    for name, value in got.items():
        assert not value.isnan().any(), f"{name} has NaN"
        kernel_err = max_error(value, exact[name])
        torch_err = max_error(same_precision[name], exact[name])
        allowed = 2 * torch_err + floor * scales[name]
        assert kernel_err <= allowed, (
            f"{name}: kernel error {kernel_err:.3g} > 2 x PyTorch {q.dtype} error {torch_err:.3g} + {floor:g} x {scales[name]:.3g}")


def assert_same_results(o, lse, leaves, want):
    """``o``, ``lse`` and the gradients in ``leaves[i].grad`` equal ``want`` (a dict as above): the same
    computation reached another way (compiled against eager, say)."""
    torch.testing.assert_close(o, want["o"])
    torch.testing.assert_close(lse, want["lse"])
    for leaf, name in zip(leaves, ("dq", "dk", "dv")):
        torch.testing.assert_close(leaf.grad, want[name])
