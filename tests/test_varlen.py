"""flash_attention_varlen (packed sequences) against a float64 reference and against flash_attention
on each sequence alone (CPU interpreter: small shapes; GPU: large shapes)."""
import pytest
import torch

import attnpkg
from attnpkg import reference
from accuracy import assert_flash_accuracy, assert_same_results
from test_flash_attention import DEVICE, HALF


def packed(lengths_q, lengths_k, hq, hkv, d, dtype):
    cu = lambda lengths: torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype)
    v = torch.randn(tk, hkv, d, device=DEVICE, dtype=dtype)
    do = torch.randn(tq, hq, d, device=DEVICE, dtype=dtype)
    return q, k, v, do, cu(lengths_q), cu(lengths_k), max(lengths_q), max(lengths_k)


def run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **options)
    o.backward(do)
    return {"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def check(lengths_q, lengths_k, hq, hkv, d, dtype, **options):
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed(lengths_q, lengths_k, hq, hkv, d, dtype)
    got = run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, **options)
    assert got["o"].shape == q.shape and got["lse"].shape == (hq, q.shape[0]) and got["o"].is_contiguous()
    causal = options.pop("causal", False)
    assert_flash_accuracy(got, q, k, v, do, causal, fn=reference.attention_varlen, cu_seqlens_q=cu_q,
                          cu_seqlens_k=cu_k, **options)
    return got


LENGTHS = [  # (lengths_q, lengths_k)
    ([1, 1, 1], [1, 1, 1]),                  # sequences of one token
    ([17, 0, 40, 5], [17, 0, 40, 5]),        # an empty sequence inside the batch, ragged lengths
    ([33, 8, 1], [50, 8, 20]),               # Nq < Nk per sequence (a key cache)
    ([20, 3, 0], [7, 0, 0]),                 # Nq > Nk, queries without keys, an empty last sequence
]


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window_size=(6, 2)),
                                     dict(causal=True, softcap=3.0), dict(alibi=True, causal=True)],
                         ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda c: "-".join(map(str, c[0])) + "_" + "-".join(map(str, c[1])))
def test_varlen_matches_float64_reference(lengths, options):
    options = dict(options)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(len(lengths[0]), 4, device=DEVICE) * 0.3
    check(*lengths, 4, 2, 24, HALF, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_varlen_every_dtype(dtype):
    check([9, 30], [30, 9], 2, 1, 40, dtype, causal=True)


def test_varlen_equals_flash_attention_per_sequence():
    lengths = [13, 1, 35, 0, 20]
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed(lengths, lengths, 2, 2, 32, torch.float32)
    o, lse = attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, window_size=(9, 0),
                                            return_lse=True)
    bounds = cu_q.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue
        dense = lambda t: t[a:b].transpose(0, 1)[None]
        o1, lse1 = attnpkg.flash_attention(dense(q), dense(k), dense(v), causal=True, window_size=(9, 0), return_lse=True)
        torch.testing.assert_close(o[a:b], o1[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse[:, a:b], lse1[0], atol=1e-6, rtol=1e-6)


def test_varlen_larger_max_seqlen_is_fine():
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed([10, 4], [10, 4], 2, 2, 16, torch.float32)
    a = attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    b = attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, 100, 70, causal=True)
    assert torch.equal(a, b)


def cu(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("change,match", [
    (dict(cu_q=cu([0, 4, 10]).long()), "cu_seqlens_q must be int32"),
    (dict(cu_q=cu([0, 7, 4, 10])), "cu_seqlens_q must be non-decreasing"),
    (dict(cu_k=cu([0, 4, 9])), r"last entry of cu_seqlens_k \(9\) must equal the number of packed rows \(10\)"),
    (dict(cu_q=cu([1, 4, 10])), "cu_seqlens_q must start at 0"),
    (dict(cu_k=cu([0, 10]), max_k=10), "cu_seqlens_q and cu_seqlens_k must have the same length"),
    (dict(cu_q=cu([[0, 4, 10]])), "cu_seqlens_q must be 1-D"),
    (dict(max_q=5), r"has length 6 > max_seqlen 5"),
    (dict(max_k=-1), "max_seqlen for cu_seqlens_k must be an int >= 0"),
    (dict(max_q=2**36), r"needs up to 17179869184 programs, more than CUDA's 2147483647"),    # 2^36 / 16 * 2 * 2
    (dict(q=torch.zeros(2, 10, 2, 16)), "q must have 3 dimensions"),
    (dict(window_size=(-3, 0)), "window sizes must be >= -1"),
    (dict(alibi_slopes=torch.ones(3, 2)), r"alibi_slopes must have shape \(2,\) or \(2, 2\)"),
])
def test_varlen_bad_input_raises(change, match):
    q = torch.randn(10, 2, 16, device=DEVICE, dtype=HALF)
    args = dict(q=q, k=q, v=q, cu_q=cu([0, 4, 10]), cu_k=cu([0, 4, 10]), max_q=6, max_k=6)
    options = {key: change.pop(key) for key in list(change) if key in ("window_size", "alibi_slopes")}
    if "alibi_slopes" in options:
        options["alibi_slopes"] = options["alibi_slopes"].to(DEVICE)
    args.update({key: (value.to(DEVICE) if isinstance(value, torch.Tensor) else value) for key, value in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        attnpkg.flash_attention_varlen(args["q"], args["k"], args["v"], args["cu_q"], args["cu_k"], args["max_q"],
                                       args["max_k"], **options)


def test_prefix_sums_are_read_once_per_unchanged_tensor(monkeypatch):
    """The check of cu_seqlens reads them from the device once per tensor (a read waits for the GPU); a tensor
    changed in place is read again, so a change that breaks it still raises."""
    import attnpkg.varlen as varlen
    reads = []
    read = varlen._read_cu_seqlens
    monkeypatch.setattr(varlen, "_read_cu_seqlens", lambda name, cu, *a: reads.append(name) or read(name, cu, *a))
    q = torch.randn(10, 2, 16, device=DEVICE, dtype=HALF)
    cu_q, cu_k = cu([0, 4, 10]), cu([0, 4, 10])
    call = lambda max_q=6: attnpkg.flash_attention_varlen(q, q, q, cu_q, cu_k, max_q, 6)
    first = call()
    assert reads == ["cu_seqlens_q", "cu_seqlens_k"]
    assert torch.equal(call(), first) and len(reads) == 2            # the same tensors: not read again
    call(max_q=7)                                                    # another bound to check: read again
    assert reads[2:] == ["cu_seqlens_q"]
    cu_q[1] = 7                                                      # lengths 7 and 3: within the bound of 7
    call(max_q=7)
    assert reads[3:] == ["cu_seqlens_q"]
    cu_k[1] = 11                                                     # no longer increasing: must raise
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        call(max_q=7)


def test_varlen_compiled():
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed([7, 0, 19], [11, 3, 19], 2, 1, 16, torch.float32)
    fn = torch.compile(lambda q, k, v: attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                                                      softcap=5.0, return_lse=True),
                       fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves)
    o.backward(do)
    want = run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, causal=True, softcap=5.0)
    assert_same_results(o, lse, leaves, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window_size=(512, 0)),
                                     dict(softcap=30.0, causal=True)], ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("heads,d", [((8, 2), 128), ((4, 4), 64), ((4, 1), 256)])
def test_gpu_varlen_large(heads, d, options, dtype):
    lengths = [2048, 1, 0, 1537, 4099, 1, 777, 0, 3000]
    check(lengths, lengths, *heads, d, dtype, **dict(options))
    check(lengths, [l + 100 if l else 0 for l in lengths], *heads, d, dtype, **dict(options))


@pytest.mark.gpu
def test_gpu_compile_inductor_masks_and_varlen():
    """torch.compile(fullgraph=True) with the default backend (Inductor) around both entry points."""
    lengths = [300, 0, 1, 1000]
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed(lengths, lengths, 8, 2, 128, torch.bfloat16)
    slopes = torch.rand(8, device=DEVICE) * 0.1
    options = dict(causal=True, window_size=(255, 0), softcap=30.0, alibi_slopes=slopes)
    fn = torch.compile(lambda q, k, v: attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options),
                       fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do)
    want = run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, **options)
    torch.testing.assert_close(o, want["o"])
    for leaf, name in zip(leaves, ("dq", "dk", "dv")):
        torch.testing.assert_close(leaf.grad, want[name])
    dense = [t[:1000].transpose(0, 1)[None].contiguous() for t in (q, k, v)]
    fn = torch.compile(lambda q, k, v: attnpkg.flash_attention(q, k, v, **options), fullgraph=True)
    torch.testing.assert_close(fn(*dense), attnpkg.flash_attention(*dense, **options))


def test_varlen_fused_backward(monkeypatch):
    """The five-product backward (dQ by atomic adds) on packed sequences, grouped-query, with a window."""
    from attnpkg import attention
    monkeypatch.setattr(attention, "FUSED_BACKWARD", True)
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed([21, 0, 40, 1], [30, 5, 40, 1], 4, 2, 16, HALF)
    got = run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, window_size=(7, 2), deterministic=False)
    assert_flash_accuracy(got, q, k, v, do, False, fn=reference.attention_varlen, cu_seqlens_q=cu_q,
                          cu_seqlens_k=cu_k, window_size=(7, 2))
