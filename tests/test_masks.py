"""Sliding windows, soft cap and ALiBi: the tile schedule of attnpkg.masks against brute force, and
flash_attention against a float64 reference (CPU interpreter: small shapes; GPU: large shapes)."""
import pytest
import torch

import attnpkg
from attnpkg import masks, reference
from accuracy import assert_flash_accuracy, assert_same_results
from test_flash_attention import DEVICE, HALF, random_inputs


def run_flash(q, k, v, do, causal=False, **options):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = attnpkg.flash_attention(q, k, v, causal=causal, return_lse=True, **options)
    o.backward(do)
    return {"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


# --- the schedule ---------------------------------------------------------------------------------

def brute_force_classes(n_q, n_k, bm, bn, window, causal):
    """EMPTY / PARTIAL / FULL of every (query tile, key tile) from the element mask itself. Rows past
    n_q don't count (their results are discarded); keys past n_k make a tile partial."""
    seen = reference.window_mask(n_q, n_k, window, causal)
    tq, tk = -(-n_q // bm), -(-n_k // bn)
    out = torch.zeros(tq, tk, dtype=torch.long)
    for a in range(tq):
        for b in range(tk):
            block = seen[a * bm:(a + 1) * bm, b * bn:(b + 1) * bn]
            whole = (b + 1) * bn <= n_k
            out[a, b] = masks.FULL if block.all() and whole else masks.PARTIAL if block.any() else masks.EMPTY
    return out


WINDOWS = [((-1, -1), False), ((-1, -1), True), ((5, 0), False), ((0, 0), False), ((16, 3), False),
           ((-1, 7), False), ((9, -1), False), ((40, 40), True), ((100, 0), False)]
SHAPES = [(64, 64, 16, 16), (37, 53, 16, 8), (53, 37, 8, 16), (10, 100, 16, 16), (100, 10, 8, 8), (1, 1, 16, 16)]


@pytest.mark.parametrize("window,causal", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_schedule_visits_exactly_the_visible_tiles(shape, window, causal):
    """Both directions: a tile pair is visited iff some visible pair lies in it (nothing skipped that
    is needed, nothing loaded that is empty), and called full only if every pair is visible."""
    n_q, n_k, bm, bn = shape
    truth = brute_force_classes(n_q, n_k, bm, bn, window, causal)
    for by in ("query", "key"):
        got = masks.tile_classes(n_q, n_k, bm, bn, window_size=window, causal=causal, by=by)
        assert torch.equal(got != masks.EMPTY, truth != masks.EMPTY), (by, got, truth)
        assert not ((got == masks.FULL) & (truth != masks.FULL)).any(), (by, got, truth)
        if by == "query":       # the forward uses every full tile there is
            assert torch.equal(got == masks.FULL, truth == masks.FULL), (got, truth)


@pytest.mark.parametrize("window,causal", [w for w in WINDOWS if w[0][0] < 0])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_variant_without_a_left_edge_visits_the_same_tiles(shape, window, causal):
    """No mask and causal have no left edge: the backward kernels then compile a schedule whose masked
    run on the left side (dQ: before the full run; dK/dV: after it) is always empty, and leave that loop
    out. It must classify every tile as the general schedule does, and that run must be empty."""
    n_q, n_k, bm, bn = shape
    for by in ("query", "key"):
        general = masks.tile_classes(n_q, n_k, bm, bn, window_size=window, causal=causal, by=by)
        variant = masks.tile_classes(n_q, n_k, bm, bn, window_size=window, causal=causal, by=by, _left_unbounded=True)
        assert torch.equal(variant, general), (by, variant, general)
        start, full_start, full_end, stop = masks.tile_schedule(n_q, n_k, bm, bn, window_size=window, causal=causal,
                                                                by=by, _left_unbounded=True).long().unbind(1)
        skipped = (start < full_start) if by == "query" else (full_end < stop)
        assert not skipped.any(), (by, start, full_start, full_end, stop)


@pytest.mark.parametrize("window,causal", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dkdv_loop_bounds_are_multiples_of_the_query_tile(shape, window, causal):
    """The dK/dV kernel's loops start at start, full_start and full_end: each must be a multiple of the
    query tile (also without a full tile, and past the last row), so that the loop counter is one and
    the full loop's row tests stay per group of rows (see masks.query_tiles). The end of a run
    (stop, and full_end = n_q without a left edge) may be any row."""
    n_q, n_k, bm, bn = shape
    for left_unbounded in (False, True):
        s = masks.tile_schedule(n_q, n_k, bm, bn, window_size=window, causal=causal, by="key",
                                _left_unbounded=left_unbounded).long()
        no_left_edge = left_unbounded and masks.window_bounds(window, causal, n_q, n_k)[0] >= n_q + n_k
        lower = s[:, :2] if no_left_edge else s[:, :3]
        assert not (lower % bm).any(), (left_unbounded, s)


def test_window_cost_grows_with_n_times_window():
    """Visited tiles of a window of 64 keys: linear in N (the causal count is quadratic)."""
    counts = {n: int((masks.tile_classes(n, n, 32, 32, window_size=(64, 0)) != masks.EMPTY).sum()) for n in (256, 512, 1024)}
    assert counts[1024] - counts[512] == 2 * (counts[512] - counts[256])
    causal = int((masks.tile_classes(1024, 1024, 32, 32, causal=True) != masks.EMPTY).sum())
    assert counts[1024] < causal / 4


# --- the kernels against float64 ------------------------------------------------------------------

CASES = [  # (B, Hq, Hkv, Nq, Nk, D)
    (1, 2, 2, 70, 70, 32),     # ragged tiles
    (1, 2, 1, 40, 90, 16),     # Nq < Nk, multi-query
    (2, 4, 2, 90, 40, 24),     # Nq > Nk, grouped-query, head dim not a power of two
]
MASKS = [dict(window_size=(8, 0)), dict(window_size=(20, 5)), dict(window_size=(0, 0)),
         dict(window_size=(-1, 3)), dict(window_size=(33, -1)), dict(causal=True, window_size=(16, 16))]


@pytest.mark.parametrize("options", MASKS, ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_windows_match_float64_reference(case, options):
    q, k, v, do = random_inputs(*case, HALF)
    causal = options.pop("causal", False)
    assert_flash_accuracy(run_flash(q, k, v, do, causal, **options), q, k, v, do, causal, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_window_every_dtype(dtype):
    q, k, v, do = random_inputs(1, 2, 1, 45, 61, 40, dtype)
    assert_flash_accuracy(run_flash(q, k, v, do, window_size=(12, 2)), q, k, v, do, False, window_size=(12, 2))


def test_causal_window_right_is_ignored():
    """causal=True sets right = 0 whatever window_size says (as flash-attn does)."""
    q, k, v, _ = random_inputs(1, 1, 1, 33, 33, 16, torch.float32)
    a = attnpkg.flash_attention(q, k, v, causal=True, window_size=(5, 9))
    b = attnpkg.flash_attention(q, k, v, window_size=(5, 0))
    assert torch.equal(a, b)


def test_rows_outside_every_window_give_zero():
    """Nq > Nk with a window of 0 to the left and right: rows i < Nq - Nk see nothing."""
    q, k, v, do = random_inputs(1, 1, 1, 50, 20, 16, HALF)
    got = run_flash(q, k, v, do, window_size=(0, 0))
    assert torch.all(got["o"][:, :, :30] == 0) and torch.all(got["lse"][:, :, :30] == float("-inf"))
    assert torch.all(got["dq"][:, :, :30] == 0) and not any(t.isnan().any() for t in got.values())


def alibi(hq, b=None):
    shape = (hq,) if b is None else (b, hq)
    return torch.rand(shape, device=DEVICE, dtype=torch.float32) * 0.5 + 0.05


SCORE_OPTIONS = [dict(softcap=2.0), dict(softcap=0.7, causal=True), dict(alibi=1), dict(alibi=2, causal=True),
                 dict(softcap=5.0, alibi=1, window_size=(10, 4))]


@pytest.mark.parametrize("mode", ["fused", "deterministic"])
@pytest.mark.parametrize("options", SCORE_OPTIONS, ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_softcap_and_alibi_match_float64_reference(monkeypatch, case, options, mode):
    from attnpkg import attention
    monkeypatch.setattr(attention, "FUSED_BACKWARD", True)          # (with a soft cap or ALiBi: never attnpkg.hopper)
    options = dict(options)
    causal = options.pop("causal", False)
    if "alibi" in options:
        options["alibi_slopes"] = alibi(case[1], case[0] if options.pop("alibi") == 2 else None)
    q, k, v, do = random_inputs(*case, HALF, scale_inputs=2.0)          # large scores: the cap matters
    got = run_flash(q, k, v, do, causal, deterministic=mode == "deterministic", **options)
    assert_flash_accuracy(got, q, k, v, do, causal, **options)


def test_softcap_bounds_the_scores():
    """With a soft cap c every logit lies in (-c, c): the lse is at most c + log Nk."""
    q, k, v, _ = random_inputs(1, 2, 2, 20, 30, 16, torch.float32, scale_inputs=10.0)
    _, lse = attnpkg.flash_attention(q, k, v, softcap=1.5, return_lse=True)
    assert (lse <= 1.5 + torch.log(torch.tensor(30.0)) + 1e-5).all()
    _, lse_uncapped = attnpkg.flash_attention(q, k, v, return_lse=True)
    assert (lse_uncapped > 1.5 + torch.log(torch.tensor(30.0))).any()


def test_gradient_through_lse_with_masks():
    q, k, v, do = random_inputs(1, 2, 1, 30, 40, 16, torch.float32)
    dlse = torch.randn(1, 2, 30, device=DEVICE)
    options = dict(window_size=(7, 3), softcap=3.0, alibi_slopes=alibi(2))
    grads = []
    for fn in (attnpkg.flash_attention, reference.attention):
        exact = fn is reference.attention
        leaves = [(t.double() if exact else t.clone()).requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves, return_lse=True, **options)
        finite = torch.isfinite(lse)
        torch.autograd.backward([o, lse.where(finite, 0)], [do.to(o.dtype), dlse.to(lse.dtype)])
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("bad,match", [
    (dict(window_size=(-2, 0)), "window sizes must be >= -1"),
    (dict(window_size=(1.5, 0)), "window_size must be a pair of ints"),
    (dict(window_size=(3,)), "window_size must be a pair of ints"),
    (dict(softcap=-1.0), "softcap must be a finite number >= 0"),
    (dict(softcap=float("nan")), "softcap must be a finite number >= 0"),
    (dict(softcap=float("inf")), "softcap must be a finite number >= 0"),
    (dict(alibi_slopes=torch.ones(3)), r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), "alibi_slopes must be float32"),
    (dict(alibi_slopes=[0.1, 0.2]), "alibi_slopes must be a torch.Tensor"),
])
def test_bad_mask_options_raise(bad, match):
    q = torch.randn(1, 2, 8, 16, device=DEVICE, dtype=HALF)
    if isinstance(bad.get("alibi_slopes"), torch.Tensor):
        bad = dict(alibi_slopes=bad["alibi_slopes"].to(DEVICE))
    with pytest.raises((ValueError, TypeError), match=match):
        attnpkg.flash_attention(q, q, q, **bad)


def test_compiled_with_masks():
    q, k, v, do = random_inputs(1, 2, 1, 24, 40, 16, torch.float32)
    options = dict(window_size=(6, 2), softcap=4.0, alibi_slopes=alibi(2))
    fn = torch.compile(lambda q, k, v: attnpkg.flash_attention(q, k, v, return_lse=True, **options),
                       fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves)
    o.backward(do)
    want = run_flash(q, k, v, do, **options)
    assert_same_results(o, lse, leaves, want)


# --- large shapes on the GPU ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(window_size=(256, 0)), dict(window_size=(300, 77)), dict(causal=True, window_size=(1000, 0)),
                                     dict(softcap=30.0, causal=True), dict(alibi=1, causal=True),
                                     dict(softcap=20.0, alibi=2, window_size=(511, 0))],
                         ids=lambda o: str(sorted(o.items())))
@pytest.mark.parametrize("case", [(2, 8, 2, 1537, 1537, 128), (1, 4, 4, 1000, 3001, 64), (2, 4, 1, 2049, 777, 256),
                                  (1, 2, 2, 4099, 4099, 96)], ids=lambda c: "x".join(map(str, c)))
def test_gpu_large_masks(case, options, dtype):
    options = dict(options)
    causal = options.pop("causal", False)
    if "alibi" in options:
        options["alibi_slopes"] = alibi(case[1], case[0] if options.pop("alibi") == 2 else None)
    q, k, v, do = random_inputs(*case, dtype)
    assert_flash_accuracy(run_flash(q, k, v, do, causal, **options), q, k, v, do, causal, **options)
