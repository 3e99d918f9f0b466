"""attnpkg.hopper's forward: the warp-specialized Gluon kernel, chosen only where it was tested, exact where it runs."""
import pytest
import torch

import attnpkg
from attnpkg import attention, hopper
from accuracy import assert_flash_accuracy
from test_hopper import BANDS, SHAPES, _taken

TESTED = dict(capability=hopper.TESTED_CAPABILITY, triton_version=hopper.TESTED_TRITON[0] + "0")


def qkv(d=128, dtype=torch.bfloat16, n_q=256, n_k=256):
    return (torch.empty(2, 4, n_q, d, dtype=dtype), torch.empty(2, 2, n_k, d, dtype=dtype),
            torch.empty(2, 2, n_k, d, dtype=dtype))


@pytest.mark.parametrize("change,chosen", [
    (dict(), True),
    (dict(softcap=30.0), False),
    (dict(alibi=torch.ones(2, 4)), False),
    (dict(layout="packed", packed=True), True),          # packed sequences: (1, H, total, D) views of (total, H, D)
    (dict(layout="packed-strided", packed=True), False), # q of a fused (total, 3, H, D) projection
    (dict(d=64), False),
    (dict(d=96), False),
    (dict(dtype=torch.float32), False),
    (dict(layout="transposed"), False),                  # SDPA's (B, N, H, D) seen as (B, H, N, D)
    (dict(layout="misaligned"), False),                  # 2 bytes past a 16-byte boundary
    (dict(capability=(8, 0)), False),
    (dict(capability=(10, 0)), False),
    (dict(triton_version="3.9.0"), False),
    (dict(enabled=False), False),
], ids=str)
def test_hopper_forward_is_chosen_only_where_it_was_tested(monkeypatch, change, chosen):
    monkeypatch.setattr(hopper, "FORWARD", change.pop("enabled", True))
    q, k, v = qkv(change.pop("d", 128), change.pop("dtype", torch.bfloat16))
    layout = change.pop("layout", None)
    if layout == "transposed":
        q = torch.empty(2, 256, 4, 128, dtype=q.dtype).transpose(1, 2)
    elif layout == "misaligned":
        q = torch.empty(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    elif layout == "packed":
        q, k, v = (torch.empty(300, h, 128, dtype=q.dtype).transpose(0, 1)[None] for h in (4, 2, 2))
    elif layout == "packed-strided":
        q, k, v = (torch.empty(300, 3, h, 128, dtype=q.dtype)[:, 0].transpose(0, 1)[None] for h in (4, 2, 2))
    args = dict(softcap=0.0, alibi=None, packed=False, **TESTED)
    args.update(change)
    assert hopper.supports_forward(q, k, v, **args) is chosen


def _hopper_here():
    if not torch.cuda.is_available():
        return False
    q, k, v = (t.cuda() for t in qkv())
    return hopper.supports_forward(q, k, v, 0.0, None, False, attention._capability(q.device))


needs_hopper = pytest.mark.skipif(not _hopper_here(), reason="needs the GPU and Triton attnpkg.hopper was tested with")


def _forward(q, k, v, **options):
    o, lse = attnpkg.flash_attention(q, k, v, return_lse=True, **options)
    return {"o": o, "lse": lse}


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,window", BANDS + [(False, (0, 0)), (True, (64, 0))], ids=str)
@pytest.mark.parametrize("b,hq,hkv,n_q,n_k", SHAPES + [(1, 2, 2, 200, 64)])
def test_hopper_forward_matches_float64(monkeypatch, dtype, causal, window, b, hq, hkv, n_q, n_k):
    calls = _taken(monkeypatch, "forward")
    q = torch.randn(b, hq, n_q, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, n_k, 128, device="cuda", dtype=dtype) for _ in range(2))
    got = _forward(q, k, v, causal=causal, window_size=window)
    assert calls, "the Hopper forward did not run"
    assert_flash_accuracy(got, q, k, v, torch.zeros_like(q), causal, window_size=window)


@pytest.mark.gpu
@needs_hopper
def test_rows_that_see_no_key_give_zero_and_minus_infinity(monkeypatch):
    calls = _taken(monkeypatch, "forward")
    q = torch.randn(1, 2, 700, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o, lse = attnpkg.flash_attention(q, k, v, causal=True, return_lse=True)          # rows < 400 see no key
    assert calls
    assert (o[:, :, :400] == 0).all() and (lse[:, :, :400] == float("-inf")).all()
    assert torch.isfinite(o[:, :, 400:]).all() and torch.isfinite(lse[:, :, 400:]).all()


@pytest.mark.gpu
@needs_hopper
def test_no_other_head_enters_a_ragged_tile(monkeypatch):
    """A head's last key tile runs past its rows: the copy reads zeros there, not the next head's keys and values
    (an infinite value there would turn p = 0 into NaN)."""
    calls = _taken(monkeypatch, "forward")
    q = torch.randn(1, 2, 300, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 200, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k[:, 1], v[:, 1] = float("inf"), float("inf")                   # head 1's rows follow head 0's in memory
    o = attnpkg.flash_attention(q, k, v)
    assert calls
    want = attnpkg.reference.attention(q[:, :1].double(), k[:, :1].double(), v[:, :1].double())
    assert torch.isfinite(o[:, :1]).all() and (o[:, :1].double() - want).abs().max() < 2e-2


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (500, 0)], ids=str)
def test_hopper_forward_agrees_with_the_portable_forward(monkeypatch, window):
    q, k, v = (torch.randn(2, 8, 1500, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    calls = _taken(monkeypatch, "forward")
    fast = _forward(q, k, v, window_size=window)
    assert calls and torch.equal(fast["o"], _forward(q, k, v, window_size=window)["o"])     # the same bits again
    monkeypatch.setattr(hopper, "FORWARD", False)
    portable = _forward(q, k, v, window_size=window)
    assert len(calls) == 2
    torch.testing.assert_close(fast["o"], portable["o"], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast["lse"], portable["lse"], atol=1e-4, rtol=1e-5)


@pytest.mark.gpu
@needs_hopper
def test_hopper_forward_is_launched_directly_and_trains(monkeypatch):
    """attnpkg.launch keeps the compiled kernel; the forward feeds the backward (both passes, every head layout)."""
    from attnpkg import launch as launch_module
    from attnpkg.kernels.hopper_forward import hopper_forward_kernel
    calls = _taken(monkeypatch, "forward")
    launcher = launch_module.launch(hopper_forward_kernel)
    launcher.compiled.clear()
    q = torch.randn(2, 8, 700, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 700, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    first = attnpkg.flash_attention(q, k, v, causal=True)
    assert len(launcher.compiled) == 1 and len(calls) == 1
    assert torch.equal(first, attnpkg.flash_attention(q, k, v, causal=True)) and len(launcher.compiled) == 1
    do = torch.randn_like(q)
    for deterministic in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attnpkg.flash_attention(*leaves, causal=True, deterministic=deterministic)
        dq, dk, dv = torch.autograd.grad(o, leaves, do)
        assert_flash_accuracy({"o": o, "dq": dq, "dk": dk, "dv": dv}, q, k, v, do, True)


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(causal=True, window_size=(300, 0)),
                                     dict(window_size=(37, 5))], ids=str)
@pytest.mark.parametrize("hq,hkv,extra_keys", [(4, 4, 0), (8, 2, 100), (8, 1, 0)])
def test_hopper_forward_packed_sequences(monkeypatch, options, hq, hkv, extra_keys):
    """flash_attention_varlen: ragged lengths, sequences of one token and empty ones, Nq < Nk per sequence; tiles
    read across into the next sequence's rows, which must add nothing."""
    from test_varlen import packed
    from attnpkg import reference
    calls = _taken(monkeypatch, "forward")
    lengths = [1000, 1, 0, 129, 2048, 64, 777, 0]
    q, k, v, do, cu_q, cu_k, max_q, max_k = packed(lengths, [n + extra_keys if n else 0 for n in lengths], hq, hkv,
                                                   128, torch.bfloat16)
    o, lse = attnpkg.flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, **options)
    assert calls, "the Hopper forward did not run"
    options = dict(options)
    causal = options.pop("causal", False)
    assert_flash_accuracy({"o": o, "lse": lse}, q, k, v, do, causal, fn=reference.attention_varlen,
                          cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **options)


@pytest.mark.gpu
@needs_hopper
def test_no_other_sequence_enters_a_packed_tile(monkeypatch):
    """Sequence 0's last key tile runs into sequence 1's rows: their scores are masked and their values zeroed,
    so non-finite keys and values there change nothing."""
    calls = _taken(monkeypatch, "forward")
    cu = torch.tensor([0, 200, 500], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(500, h, 128, device="cuda", dtype=torch.bfloat16) for h in (4, 2, 2))
    k[200:260], v[200:260] = float("nan"), float("inf")
    o = attnpkg.flash_attention_varlen(q, k, v, cu, cu, 300, 300, causal=True)
    assert calls
    want = attnpkg.reference.attention(*(x[:200].transpose(0, 1)[None].double() for x in (q, k, v)), causal=True)
    assert torch.isfinite(o[:200]).all()
    assert (o[:200].transpose(0, 1)[None].double() - want).abs().max() < 2e-2
