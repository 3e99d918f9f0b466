"""Inputs at the edges of what the kernels address, mask and represent: each of these once gave NaN,
another head's data or a crashed CUDA context. CPU (interpreter) where the fault shows there, GPU
otherwise; then a sweep on the GPU over every pass, mask, layout and dtype against float64."""
import math

import pytest
import torch

import attnpkg
from accuracy import assert_flash_accuracy, attention_and_grads
from test_flash_attention import DEVICE, random_inputs, run_flash


def anti_aligned(b, hq, hkv, nq, nk, d, dtype, strength):
    """Keys near a vector u, queries near -strength/|u|^2 u: every score of every row is about
    -strength * scale, so each row's lse is very negative."""
    u = torch.randn(d, device=DEVICE)
    u = u / u.norm()
    k = (u * 4 + 0.1 * torch.randn(b, hkv, nk, d, device=DEVICE)).to(dtype)
    q = (-u * strength / 4 + 0.1 * torch.randn(b, hq, nq, d, device=DEVICE)).to(dtype)
    v = torch.randn(b, hkv, nk, d, device=DEVICE, dtype=dtype)
    do = torch.randn(b, hq, nq, d, device=DEVICE, dtype=dtype)
    return q, k, v, do


# Scores near -100 leave float32 about 1e-5 of absolute resolution in the exponent; the backward
# recomputes P = 2^(s - lse2) from two such numbers, so its relative error is about 1e-5 where
# PyTorch's softmax, which subtracts the row max from s, can be luckier. The gradients (dK is
# scale * dS^T Q with |Q| near 100) then differ by a few 1e-5 of their size.
NEGATIVE_FLOOR = 1e-4


# 1. Keys past Nk in the last, ragged key tile of the dQ pass: P = e^(-lse) there overflows when
#    the row's lse is very negative (float32/bfloat16: lse < -89; float16: lse < -11).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_key_tile_with_very_negative_lse(dtype):
    # D = 16, scale 1/4: scores about -0.25 * 400 = -100, so lse is about -96. Nk = 40: a ragged tile.
    q, k, v, do = anti_aligned(1, 2, 2, 8, 40, 16, dtype, strength=400.0)
    got = run_flash(q, k, v, do, False)
    assert got["lse"].max() < -90                       # the regime of the fault
    assert_flash_accuracy(got, q, k, v, do, False, floor=NEGATIVE_FLOOR)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nk,d", [(100, 64), (200, 128), (77, 40), (300, 256)])
def test_gpu_ragged_key_tile_with_negative_lse_float16(nk, d, causal):
    q, k, v, do = anti_aligned(2, 4, 2, 64, nk, d, torch.float16, strength=3 * 16 * math.sqrt(d))
    got = run_flash(q, k, v, do, causal)
    assert got["lse"][torch.isfinite(got["lse"])].max() < -11
    assert_flash_accuracy(got, q, k, v, do, causal)


# 2. The forward's K/V tiles through tensor descriptors (Hopper, D 128) cross into the next head.
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_other_heads_values_never_leak(dtype, causal):
    q, k, v, do = random_inputs(2, 4, 2, 100, 100, 128, dtype)
    want = attnpkg.reference.attention(q.double(), k.double(), v.double(), causal=causal)
    # Non-finite values in the first key and value of k/v head 1, the rows just past the end of k/v
    # head 0 (of each batch) as one (B * Hkv * Nk, D) matrix. Query heads 0 and 1 read k/v head 0.
    k[:, 1, 0, 0] = float("nan")
    v[:, 1, 0, 0] = float("inf")
    o = attnpkg.flash_attention(q, k, v, causal=causal)
    assert torch.isfinite(o[:, :2]).all()
    assert (o[:, :2].double() - want[:, :2]).abs().max() < 2e-2


# 2b. Every kernel's descriptor path, forced on the interpreter (on a GPU the tile table decides): both
#     layouts a descriptor takes (head-major, token-major), packed sequences, ragged tiles, and
#     non-finite values in the rows that a tile crossing the end of a head brings in.
def layout_inputs(b, hq, hkv, nq, nk, d, dtype, token_major):
    if not token_major:
        return random_inputs(b, hq, hkv, nq, nk, d, dtype)
    shapes = ((b, nq, hq, d), (b, nk, hkv, d), (b, nk, hkv, d), (b, nq, hq, d))
    return [torch.randn(s, device=DEVICE, dtype=dtype).transpose(1, 2) for s in shapes]    # SDPA's layout


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tiles; GPU runs follow the tile table")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head_major", "token_major"])
def test_descriptor_paths_on_the_interpreter(monkeypatch, token_major, causal):
    from attnpkg import attention
    monkeypatch.setattr(attention, "INTERPRETER_TILES", attention.INTERPRETER_TILES._replace(tma=True))
    built = []
    real = attention._descriptor
    monkeypatch.setattr(attention, "_descriptor", lambda *a: built.append(real(*a)) or built[-1])
    # Nk = 72: a key tile crosses into the next k/v head.
    q, k, v, do = layout_inputs(2, 4, 2, 64, 72, 32, torch.float16, token_major)
    assert_flash_accuracy(run_flash(q, k, v, do, causal, deterministic=True), q, k, v, do, causal)
    assert len(built) == 4 and all(d is not None for d in built)       # K and V of the forward and the dQ kernel
    if not token_major:
        # Non-finite values just past k/v head 0 (the first key of head 1): query heads 0 and 1 stay exact.
        k, v = k.clone(), v.clone()
        k[:, 1, 0, 0], v[:, 1, 0, 0] = float("nan"), float("inf")
        got = run_flash(q, k, v, do, causal, deterministic=True)
        first = [x[:, :2] if name in ("o", "lse", "dq") else x[:, :1] for name, x in got.items()]
        assert all(torch.isfinite(x[x != float("-inf")]).all() for x in first)
        assert_flash_accuracy({name: x for name, x in zip(got, first)}, q[:, :2], k[:, :1], v[:, :1], do[:, :2],
                              causal)
    # Packed sequences: token-major, ragged, one empty.
    lengths = [23, 0, 41, 1]
    cu = torch.tensor([0, 23, 23, 64, 65], dtype=torch.int32, device=DEVICE)
    q, k, v, do = (torch.randn(65, h, 32, device=DEVICE, dtype=torch.float16) for h in (4, 2, 2, 4))
    built.clear()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = attnpkg.flash_attention_varlen(*leaves, cu, cu, max(lengths), max(lengths), causal=causal,
                                           return_lse=True)
    o.backward(do)
    assert len(built) == 4 and all(d is not None for d in built)
    got = {"o": o, "lse": lse, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    assert_flash_accuracy(got, q, k, v, do, causal, fn=attnpkg.reference.attention_varlen, cu_seqlens_q=cu,
                          cu_seqlens_k=cu)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's tiles; GPU runs follow the tile table")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_descriptor_paths_for_model_layouts(monkeypatch, causal):
    """Layouts that models hand over without a copy: slices of one fused QKV projection (rows 3 H D apart,
    K and V starting mid-row) and one k/v head broadcast to every query head (head stride 0)."""
    from attnpkg import attention
    monkeypatch.setattr(attention, "INTERPRETER_TILES", attention.INTERPRETER_TILES._replace(tma=True))
    built = []
    real = attention._descriptor
    monkeypatch.setattr(attention, "_descriptor", lambda *a: built.append(real(*a)) or built[-1])
    b, n, h, d = 2, 40, 3, 32
    qkv = torch.randn(b, n, 3, h, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    views = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    base = torch.randn(2, b, 1, n, d, device=DEVICE, dtype=torch.float16, requires_grad=True)
    broadcast = [base[i].expand(b, h, n, d) for i in range(2)]
    for q, k, v in (views, [views[0], *broadcast]):
        for x in (q, k, v):
            x.retain_grad()
            x.grad = None                        # the query view serves both cases
        do = torch.randn(b, h, n, d, device=DEVICE, dtype=torch.float16)
        built.clear()
        o, lse = attnpkg.flash_attention(q, k, v, causal=causal, return_lse=True, deterministic=True)
        torch.autograd.backward(o, do)
        assert len(built) == 4 and all(x is not None for x in built), built      # every K, V tile by TMA
        got = {"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
        assert_flash_accuracy(got, *(x.detach().contiguous() for x in (q, k, v)), do, causal)


# 3. Row offsets past 2^31 elements: a view whose rows lie 2^20 elements apart.
@pytest.mark.gpu
def test_gpu_offsets_past_two_to_the_31():
    rows, stride, d = 2200, 2**20, 64                   # the last row starts 2.3e9 elements in
    buf = torch.empty(rows, stride, device="cuda", dtype=torch.float16)
    q, k, v, do = (buf[:, i * d:(i + 1) * d][None, None] for i in range(4))
    for x in (q, k, v, do):
        x.normal_()
    assert q.stride(2) == stride and (rows - 1) * stride > 2**31
    contiguous = [x.contiguous() for x in (q, k, v, do)]
    for causal in (False, True):
        got = run_flash(q, k, v, do, causal)
        assert_flash_accuracy(got, *contiguous, causal)
    del buf


def test_int64_offsets_on_the_interpreter(monkeypatch):
    """The 64-bit offset variant of every kernel, forced on a small strided case, is exact too."""
    from attnpkg import attention
    huge = torch.empty(1, 1, 3000, 64, device="meta").as_strided((1, 1, 3000, 64), (0, 0, 2**20, 1))
    assert attention._needs_int64(huge) and not attention._needs_int64(torch.empty(1, 1, 3000, 64, device="meta"))
    monkeypatch.setattr(attention, "_needs_int64", lambda *tensors: True)
    q, k, v, do = sweep_inputs((1, 4, 2, 37, 45, 24), torch.float32, "normal", strided=True)
    for causal in (False, True):
        assert_flash_accuracy(run_flash(q, k, v, do, causal), q, k, v, do, causal)


# 4. More than 65535 (batch x heads) programs along what used to be the grid's second axis.
@pytest.mark.gpu
def test_gpu_batch_times_heads_above_65535():
    b, h, n, d = 2100, 32, 128, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = attnpkg.flash_attention(q, k, v, causal=True)
    do = torch.randn_like(o)
    o.backward(do)
    for i in (0, 777, b - 1):                            # spot checks, in float64, over every head
        sl = [t[i:i + 1].detach() for t in (q, k, v)] + [do[i:i + 1]]
        exact = attention_and_grads(*(t.double() for t in sl), True)
        tol = lambda x: 2e-2 * max(1.0, x.abs().max().item())
        assert (o[i:i + 1].double() - exact["o"]).abs().max() < tol(exact["o"])
        for name, t in (("dq", q), ("dk", k), ("dv", v)):
            assert (t.grad[i:i + 1].double() - exact[name]).abs().max() < tol(exact[name]), (i, name)


def test_grid_stays_within_cuda_limits(monkeypatch):
    """Whatever B * H, every launch has at most 65535 programs on axes 1 and 2."""
    from attnpkg import attention
    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(attention, "launch", lambda kernel: Recorder())
    q = torch.randn(70000, 1, 1, 16, device=DEVICE, dtype=torch.float16)
    o, lse = attention.forward_impl(q, q, q, True, 0.25)
    attention.backward_impl(o, q, q, q, o, lse, None, True, 0.25)
    assert len(grids) == 4
    for grid in grids:
        assert grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:]), grid
        assert math.prod(grid) >= 70000


# 5. Scales that float32 cannot carry.
@pytest.mark.parametrize("scale", [1e-50, 1e-39, 1e39, 1e300])
def test_scale_outside_float32_is_refused(scale):
    x = torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"scale .* outside .*float32"):
        attnpkg.flash_attention(x, x, x, scale=scale)


@pytest.mark.parametrize("scale", [2e-38, 1e-20])
def test_tiny_scale_in_float32_range_gives_uniform_attention(scale):
    q, k, v, do = random_inputs(1, 2, 2, 10, 30, 16, torch.float32)
    got = run_flash(q, k, v, do, False, scale=scale)
    torch.testing.assert_close(got["o"], v.mean(2, keepdim=True).expand_as(got["o"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["lse"], torch.full_like(got["lse"], math.log(30)), atol=1e-5, rtol=1e-5)
    assert_flash_accuracy(got, q, k, v, do, False, scale=scale)


# The sweep: every pass and mask over ragged tiles, Nq != Nk both ways, GQA/MQA, head dims that are
# not powers of two, strided inputs, rows that see no key, very large and very small logits, each dtype.
SWEEP = [(2, 4, 4, 200, 200, 40), (1, 8, 2, 77, 333, 96), (1, 8, 1, 333, 77, 72), (2, 6, 3, 129, 129, 128),
         (1, 4, 1, 1, 257, 256), (1, 4, 4, 257, 1, 24), (3, 2, 2, 1000, 999, 64), (1, 2, 1, 65, 1029, 128)]
REGIMES = {"normal": 1.0, "large": 30.0, "tiny": 1e-3, "negative": None}


def sweep_inputs(case, dtype, regime, strided):
    if regime == "negative":
        d = case[-1]
        strength = 16 * math.sqrt(d) * (3 if dtype == torch.float16 else 8)   # scores near -12 or -128
        q, k, v, do = anti_aligned(*case, dtype, strength=strength)
    else:
        q, k, v, do = random_inputs(*case, dtype, scale_inputs=REGIMES[regime])
    if strided:     # (B, N, H, D) storage seen as (B, H, N, D), and a head dim cut out of a wider one
        q, k, v, do = (torch.cat([x, x], -1).transpose(1, 2).contiguous().transpose(1, 2)[..., :x.shape[-1]]
                       for x in (q, k, v, do))
    return q, k, v, do


@pytest.mark.gpu
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", SWEEP, ids=lambda c: "x".join(map(str, c)))
def test_gpu_sweep(case, causal, dtype, regime):
    strided = SWEEP.index(case) % 2 == 1           # every other shape as a strided view
    if regime == "large" and dtype == torch.float16:
        pytest.skip("logits of 1e4 overflow PyTorch's own float16 attention: no same-precision baseline "
                    "(test_large_logits_float16 checks the kernel against float64 directly)")
    q, k, v, do = sweep_inputs(case, dtype, regime, strided)
    floor = {"large": 1e-2, "negative": NEGATIVE_FLOOR}.get(regime, 1e-5)   # see test_large_logits_do_not_overflow
    assert_flash_accuracy(run_flash(q, k, v, do, causal), q, k, v, do, causal, floor=floor)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sweep_on_the_interpreter(causal, regime):
    """A corner of the sweep small enough for the CPU: ragged tiles, Nq != Nk, GQA, strided, D = 24."""
    q, k, v, do = sweep_inputs((1, 4, 2, 37, 45, 24), torch.float32, regime, strided=True)
    floor = {"large": 1e-2, "negative": NEGATIVE_FLOOR}.get(regime, 1e-5)
    assert_flash_accuracy(run_flash(q, k, v, do, causal), q, k, v, do, causal, floor=floor)
