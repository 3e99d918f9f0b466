"""attnpkg.hopper: the five-product Gluon backward, chosen only where it was tested, exact where it runs."""
import pytest
import torch

import attnpkg
from attnpkg import attention, hopper
from accuracy import assert_flash_accuracy

TESTED = dict(capability=hopper.TESTED_CAPABILITY, triton_version=hopper.TESTED_TRITON[0] + "0")


def qk(d=128, dtype=torch.bfloat16, n_q=256, n_k=256):
    return torch.empty(2, 4, n_q, d, dtype=dtype), torch.empty(2, 2, n_k, d, dtype=dtype)


@pytest.mark.parametrize("change,chosen", [
    (dict(), True),
    (dict(window=("big", 0)), True),                     # causal
    (dict(window=(100, 0)), True),                       # sliding windows
    (dict(window=(0, 0)), True),
    (dict(window=("big", 5)), True),
    (dict(window=(100, 0), windows=False), False),       # with windows switched off: no mask and causal only
    (dict(window=("big", 0), windows=False), True),
    (dict(softcap=30.0), False),
    (dict(alibi=torch.ones(2, 4)), False),
    (dict(sequences=3), True),                           # packed sequences
    (dict(sequences=3, window=(100, 0)), True),
    (dict(sequences=16383), True),                       # 16383 sequences x 4 heads = 65532 programs
    (dict(sequences=16384), False),                      # 65536: past the grid's second axis (65535)
    (dict(d=64), False),                                 # measured no faster there
    (dict(dtype=torch.float32), False),
    (dict(capability=(8, 0)), False),                    # A100
    (dict(capability=(10, 0)), False),                   # Blackwell: not tested
    (dict(triton_version="3.9.0"), False),               # Gluon changes between releases
], ids=str)
def test_hopper_kernel_is_chosen_only_where_it_was_tested(monkeypatch, change, chosen):
    monkeypatch.setattr(hopper, "WINDOWS", change.pop("windows", True))
    q, k = qk(change.pop("d", 128), change.pop("dtype", torch.bfloat16))
    big = q.shape[2] + k.shape[2]
    window = tuple(big if w == "big" else w for w in change.pop("window", ("big", "big")))
    args = dict(window=window, softcap=0.0, alibi=None, sequences=None, **TESTED)
    args.update(change)
    assert hopper.supports(q, k, **args) is chosen


@pytest.mark.parametrize("lengths,chosen", [
    ([2048] * 32, True),                                   # equal documents: 1 tile per 64 rows
    ([1000, 1, 0, 129, 2048, 64, 777, 0], True),           # 8 x 32 tiles for 4019 rows
    ([1] * 64, True),                                      # 64 tiles for 64 rows: the limit
    ([128] + [1] * 200, False),                            # 201 x 2 tiles for 328 rows
    ([32768] + [32] * 1000, False),                        # 1001 x 512 tiles for 64768 rows: 8x the dQ buffer
], ids=lambda x: str(x)[:30])
def test_packed_start_values_stay_within_the_dq_buffer(lengths, chosen):
    """One tile of start values per (sequence, head, query tile of the longest sequence): while they are no
    more than the rows, their buffer is at most the float32 dQ buffer; beyond, the two-kernel pass."""
    total, big = sum(lengths), 2 * sum(lengths)
    q, k = torch.empty(1, 4, total, 128, dtype=torch.bfloat16), torch.empty(1, 2, total, 128, dtype=torch.bfloat16)
    assert hopper.supports(q, k, (big, big), 0.0, None, len(lengths), **TESTED, longest=max(lengths)) is chosen


def test_hopper_kernel_can_be_switched_off(monkeypatch):
    q, k = qk()
    big = q.shape[2] + k.shape[2]
    monkeypatch.setattr(hopper, "ENABLED", False)
    assert not hopper.supports(q, k, (big, big), 0.0, None, None, **TESTED)


def _taken(monkeypatch, launcher="backward"):
    """A list that records each call of one of attnpkg.hopper's launchers (``backward`` or ``forward``)."""
    calls = []
    run = getattr(hopper, launcher)
    monkeypatch.setattr(hopper, launcher, lambda *a, **kw: calls.append(1) or run(*a, **kw))
    return calls


def _hopper_here():
    if not torch.cuda.is_available():
        return False
    capability = attention._capability(torch.device("cuda"))
    big = 10**9
    return hopper.supports(*(t.cuda() for t in qk()), (big, big), 0.0, None, None, capability)


needs_hopper = pytest.mark.skipif(not _hopper_here(), reason="needs the GPU and Triton attnpkg.hopper was tested with")


# The bands (causal flag, window_size) and shapes (B, Hq, Hkv, Nq, Nk) the Hopper kernels are checked on.
BANDS = [(False, (-1, -1)), (True, (-1, -1)), (True, (300, 0)), (False, (37, 5)), (False, (-1, 17)), (False, (200, -1))]
SHAPES = [
    (2, 4, 4, 1000, 1000),          # ragged tiles
    (1, 4, 4, 4096, 4096),
    (2, 8, 2, 300, 1000),           # grouped-query, Nq < Nk
    (2, 8, 1, 1000, 256),           # multi-query, Nq > Nk: with causal, rows that see no key
    (1, 2, 1, 1, 1),
    (1, 2, 2, 64, 129),             # one key past a tile (forward: one half of the query tile has no rows)
]


def grads(q, k, v, do, dlse=None, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attnpkg.flash_attention(q, k, v, return_lse=True, **options)
    outputs, seeds = ((o, lse), (do, dlse)) if dlse is not None else ((o,), (do,))
    dq, dk, dv = torch.autograd.grad(outputs, (q, k, v), seeds)
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,window", BANDS, ids=str)
@pytest.mark.parametrize("b,hq,hkv,n_q,n_k", SHAPES)
def test_hopper_backward_matches_float64(monkeypatch, dtype, causal, window, b, hq, hkv, n_q, n_k):
    calls = _taken(monkeypatch)
    q = torch.randn(b, hq, n_q, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, n_k, 128, device="cuda", dtype=dtype) for _ in range(2))
    do = torch.randn_like(q)
    got = grads(q, k, v, do, causal=causal, window_size=window, deterministic=False)
    assert calls, "the Hopper kernel did not run"
    assert_flash_accuracy(got, q, k, v, do, causal, window_size=window)
    if causal and window == (-1, -1) and n_q > n_k:
        assert (got["dq"][:, :, :n_q - n_k] == 0).all()         # rows that see no key: zero gradient


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("hkv", [8, 1])
def test_hopper_backward_with_a_gradient_into_lse(monkeypatch, hkv):
    calls = _taken(monkeypatch)
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, hkv, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do, dlse = torch.randn_like(q), torch.randn(2, 8, 700, device="cuda")
    got = grads(q, k, v, do, dlse, causal=True, deterministic=False)
    assert calls
    want = grads(q, k, v, do, dlse, causal=True, deterministic=True)
    for name in ("dq", "dk", "dv"):
        torch.testing.assert_close(got[name], want[name], atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_hopper
def test_deterministic_runs_the_two_kernel_pass_and_defaults_follow_torch(monkeypatch):
    calls = _taken(monkeypatch)
    q, k, v = (torch.randn(1, 4, 512, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    attnpkg.flash_attention(q, k, v, causal=True, deterministic=True).sum().backward()
    assert not calls
    attnpkg.flash_attention(q, k, v, causal=True).sum().backward()      # None: torch's setting, off by default
    assert len(calls) == 1
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    attnpkg.flash_attention(q, k, v, causal=True).sum().backward()
    assert len(calls) == 1
    attnpkg.flash_attention(q, k, v, causal=True, softcap=20.0, deterministic=False).sum().backward()
    assert len(calls) == 1                                               # a soft cap: not supported there


@pytest.mark.gpu
@needs_hopper
def test_hopper_backward_dk_dv_bitwise_stable_dq_close(monkeypatch):
    """dK and dV are sums owned by one program; dQ's float32 additions land in any order."""
    calls = _taken(monkeypatch)
    q = torch.randn(2, 8, 2048, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 2048, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    do = torch.randn_like(q)
    runs = [grads(q, k, v, do, causal=True, deterministic=False) for _ in range(3)]
    assert len(calls) == 3
    for other in runs[1:]:
        assert torch.equal(other["dk"], runs[0]["dk"]) and torch.equal(other["dv"], runs[0]["dv"])
        torch.testing.assert_close(other["dq"], runs[0]["dq"], atol=1e-2, rtol=1e-2)


def test_preprocess_writes_the_start_values_of_the_hopper_kernel():
    """flash_backward_preprocess with PAIRS: per query tile of 64 rows, -lse / scale then -(rowsum(dO * O) - dlse);
    -1e30 and 0 for rows that see no key and rows past Nq (CPU: Triton's interpreter)."""
    from attnpkg.kernels.flash_backward import flash_backward_preprocess
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, h, n_q, d, scale, block = 2, 3, 100, 32, 0.3, hopper.BLOCK_M
    o, do = (torch.randn(b, h, n_q, d, device=device) for _ in range(2))
    lse, dlse = torch.randn(b, h, n_q, device=device) * 5, torch.randn(b, h, n_q, device=device)
    lse[0, 1, 7] = lse[1, 2, 99] = float("-inf")                 # rows that see no key
    tiles = -(-n_q // block)
    pairs = torch.full((b * h * tiles * 2 * block,), float("nan"), device=device)
    flash_backward_preprocess[(tiles * b * h,)](o, do, lse, dlse, pairs, pairs, lse, *o.stride(), *do.stride(), h,
                                                n_q, n_q, 1.0 / scale, HEAD_DIM=d, BLOCK_D=d, BLOCK_M=block,
                                                HAS_DLSE=True, PAIRS=True, VARLEN=False, INT64=False)
    got = pairs.view(b, h, tiles, 2, block).transpose(3, 4).reshape(b, h, tiles * block, 2)
    want_m = torch.full((b, h, tiles * block), -1e30, device=device)
    want_m[:, :, :n_q] = torch.where(lse == float("-inf"), -1e30, -lse / scale)
    want_d = torch.zeros((b, h, tiles * block), device=device)
    want_d[:, :, :n_q] = -((o * do).sum(-1) - dlse)
    torch.testing.assert_close(got[..., 0], want_m)
    torch.testing.assert_close(got[..., 1], want_d, atol=1e-5, rtol=1e-5)


def test_preprocess_pairs_follow_each_packed_sequence():
    """Packed sequences (VARLEN): each sequence's query tiles start at its own first row, so the pairs of
    sequence b, head h, tile t are rows cu[b] + 64 t ... of the (1, H, total) lse, padded past the sequence."""
    from attnpkg.kernels.flash_backward import flash_backward_preprocess
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths, h, d, scale, block = [70, 0, 1, 130], 2, 16, 0.5, hopper.BLOCK_M
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, longest = sum(lengths), max(lengths)
    o, do = (torch.randn(total, h, d, device=device) for _ in range(2))
    lse, dlse = torch.randn(1, h, total, device=device) * 5, torch.randn(1, h, total, device=device)
    tiles = -(-longest // block)
    pairs = torch.full((len(lengths) * h * tiles * 2 * block,), float("nan"), device=device)
    strides = lambda x: (0, x.stride(1), x.stride(0), 1)              # (1, H, total, D) views, batch stride 0
    flash_backward_preprocess[(tiles * len(lengths) * h,)](
        o, do, lse, dlse, pairs, pairs, cu, *strides(o), *strides(do), h, longest, total, 1.0 / scale,
        HEAD_DIM=d, BLOCK_D=d, BLOCK_M=block, HAS_DLSE=True, PAIRS=True, VARLEN=True, INT64=False)
    got = pairs.view(len(lengths), h, tiles, 2, block).transpose(3, 4).reshape(len(lengths), h, tiles * block, 2)
    delta = (o * do).sum(-1).T[None] - dlse                           # (1, H, total)
    for b, n in enumerate(lengths):
        rows = slice(int(cu[b]), int(cu[b]) + n)
        torch.testing.assert_close(got[b, :, :n, 0], -lse[0, :, rows] / scale)
        torch.testing.assert_close(got[b, :, :n, 1], -delta[0, :, rows], atol=1e-5, rtol=1e-5)
        assert (got[b, :, n:, 0] == -1e30).all() and (got[b, :, n:, 1] == 0).all()


@pytest.mark.gpu
@needs_hopper
def test_hopper_backward_takes_any_layout(monkeypatch):
    """SDPA's (B, N, H, D) layout passed transposed, and a contiguous slice that starts off a 16-byte boundary:
    the kernel's descriptors need aligned row matrices, so such inputs are copied first."""
    calls = _taken(monkeypatch)
    base = torch.randn(2 * 4 * 300 * 128 + 3, device="cuda", dtype=torch.bfloat16)
    q = base[3:].view(2, 4, 300, 128).requires_grad_()             # contiguous, 6 bytes off alignment
    k, v = (torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(2))
    assert q.is_contiguous() and q.data_ptr() % 16 and not k.is_contiguous()
    do = torch.randn(2, 4, 300, 128, device="cuda", dtype=torch.bfloat16)
    o, lse = attnpkg.flash_attention(q, k, v, causal=True, return_lse=True, deterministic=False)
    o.backward(do)
    assert calls
    got = {"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    assert_flash_accuracy(got, *(t.detach() for t in (q, k, v)), do, True)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window_size=(300, 0)),
                                     dict(window_size=(37, 5))], ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("extra_keys", [0, 100])
def test_hopper_backward_packed_sequences(monkeypatch, dtype, options, hq, hkv, extra_keys):
    """Packed sequences (flash_attention_varlen): ragged lengths, sequences of one token and empty ones, Nq < Nk per
    sequence; every tile reads across into the next sequence's rows, which must add nothing."""
    from test_varlen import packed, run_varlen
    from attnpkg import reference
    calls = _taken(monkeypatch)
    lengths = [1000, 1, 0, 129, 2048, 64, 777, 0]
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed(lengths, [n + extra_keys if n else 0 for n in lengths], hq, hkv,
                                                   128, dtype)
    got = run_varlen(q, k, v, do, cu_q, cu_k, max_q, max_k, deterministic=False, **options)
    assert calls, "the Hopper kernel did not run"
    options = dict(options)
    causal = options.pop("causal", False)
    assert_flash_accuracy(got, q, k, v, do, causal, fn=reference.attention_varlen, cu_seqlens_q=cu_q,
                          cu_seqlens_k=cu_k, **options)


@pytest.mark.gpu
@needs_hopper
def test_hopper_backward_packed_from_a_fused_projection(monkeypatch):
    """q, k, v as slices of one (total, 3, H, D) projection (rows 3 H D apart): copied to the layout the
    descriptors read; the gradients equal those of contiguous copies."""
    calls = _taken(monkeypatch)
    lengths = torch.tensor([300, 0, 513, 64])
    cu = torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    qkv = torch.randn(int(lengths.sum()), 3, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    do = torch.randn(int(lengths.sum()), 8, 128, device="cuda", dtype=torch.bfloat16)
    o = attnpkg.flash_attention_varlen(*qkv.unbind(1), cu, cu, 513, 513, causal=True, deterministic=False)
    (grad,) = torch.autograd.grad(o, qkv, do)
    assert calls
    parts = [t.detach().contiguous().requires_grad_() for t in qkv.unbind(1)]
    o2 = attnpkg.flash_attention_varlen(*parts, cu, cu, 513, 513, causal=True, deterministic=False)
    want = torch.autograd.grad(o2, parts, do)
    torch.testing.assert_close(o, o2, atol=0, rtol=0)
    for i in range(3):
        torch.testing.assert_close(grad[:, i], want[i], atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
@needs_hopper
def test_gluon_kernel_is_launched_directly_after_its_first_call(monkeypatch):
    """attnpkg.launch keeps the compiled Gluon kernel per specialization; the direct launch gives the gradients
    of Triton's own launch (dK, dV bit for bit; dQ's float32 sums in any order)."""
    from attnpkg import launch as launch_module
    from attnpkg.kernels.hopper_backward import hopper_backward_kernel
    _taken(monkeypatch)
    launcher = launch_module.launch(hopper_backward_kernel)
    launcher.compiled.clear()
    q, k, v = (torch.randn(2, 4, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    do = torch.randn_like(q)
    first = grads(q, k, v, do, causal=True, deterministic=False)
    assert len(launcher.compiled) == 1
    direct = grads(q, k, v, do, causal=True, deterministic=False)
    assert len(launcher.compiled) == 1
    monkeypatch.setattr(launch_module, "_direct", False)
    through_triton = grads(q, k, v, do, causal=True, deterministic=False)
    for name in ("dk", "dv"):
        assert torch.equal(direct[name], through_triton[name]) and torch.equal(first[name], direct[name])
    torch.testing.assert_close(direct["dq"], through_triton["dq"], atol=2e-2, rtol=1e-2)


def test_backward_pass_names_the_two_kernel_pass_off_hopper():
    q = torch.empty(1, 2, 64, 128)
    assert attention.backward_pass(q, q, causal=True, deterministic=False) == "two-kernel"
    assert attention.backward_pass(q, q, deterministic=True) == "two-kernel"


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_pass_names_the_pass_that_runs(monkeypatch, deterministic):
    calls = _taken(monkeypatch)
    q, k, v = (torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    named = attention.backward_pass(q, k, causal=True, deterministic=deterministic)
    attnpkg.flash_attention(q, k, v, causal=True, deterministic=deterministic).sum().backward()
    assert named == ("two-kernel" if deterministic else "five-product") == ("five-product" if calls else "two-kernel")
