"""attnpkg.distributed: ring attention over torch.distributed.

The schedule and the per-block backward are checked in this process. The ring itself runs on 2 and 4 new
processes that form a Gloo group (CPU tensors, kernels through Triton's interpreter, tiny shapes), and its
gathered output, lse and gradients are compared with attnpkg.flash_attention on the whole sequence and with
the float64 reference by the accuracy rule of the single-device tests. The tests marked gpu run the same
comparison with NCCL at large shapes (they need at least 2 GPUs; 4 for the four-rank cases).
"""
import pytest
import torch
import torch.distributed as dist

import attnpkg
from accuracy import attention_and_grads, max_error
from attnpkg import distributed as D
from attnpkg import reference as ref
from attnpkg.attention import backward_impl

# name: (Hq, Hkv, causal, layout, with dlse, dtype)
CASES = {
    2: {"full": (2, 2, False, "contiguous", False, torch.float16),
        "full-more-queries": (2, 2, False, "contiguous", False, torch.float16),       # 48 queries, 32 keys a rank
        "full-gqa-zigzag-dlse": (2, 1, False, "zigzag", True, torch.float16),
        "causal-contiguous": (2, 2, True, "contiguous", False, torch.float16),
        "causal-zigzag": (2, 2, True, "zigzag", False, torch.float16),
        "causal-zigzag-gqa-dlse": (2, 1, True, "zigzag", True, torch.float16),
        "causal-contiguous-fp32-dlse": (2, 1, True, "contiguous", True, torch.float32)},
    4: {"full-gqa": (2, 1, False, "contiguous", False, torch.float16),
        "causal-contiguous-gqa-dlse": (2, 1, True, "contiguous", True, torch.float16),
        "causal-zigzag": (2, 2, True, "zigzag", False, torch.float16),
        "causal-zigzag-gqa-dlse": (2, 1, True, "zigzag", True, torch.float16)},
}
N_PER_RANK, HEAD_DIM = 32, 16
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")     # where this process checks results


def make_inputs(world_size, hq, hkv, with_dlse, dtype, n_per_rank=N_PER_RANK, head_dim=HEAD_DIM, device=DEV,
                queries_per_rank=None):
    n = world_size * n_per_rank
    nq = n if queries_per_rank is None else world_size * queries_per_rank
    randn = lambda *shape: torch.randn(*shape, device=device).to(dtype)
    q, k, v, do = randn(1, hq, nq, head_dim), randn(1, hkv, n, head_dim), randn(1, hkv, n, head_dim), randn(1, hq, nq, head_dim)
    dlse = torch.randn(1, hq, nq, device=device) if with_dlse else None
    return q, k, v, do, dlse


def run_cases(cases):
    """In each rank: every case through ring_attention_gathered (shard, ring forward and backward, unshard)."""
    return {name: D.ring_attention_gathered(q, k, v, do, dlse, causal=causal, layout=layout)
            for name, (q, k, v, do, dlse, causal, layout) in cases.items()}


def grads_with_lse(fn, q, k, v, do, dlse, causal, scale=None):
    """o, lse, dq, dk, dv of fn by autograd for L = <do, o> (+ <dlse, lse>)."""
    if dlse is None:
        return attention_and_grads(q, k, v, do, causal, scale, fn=fn)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, causal=causal, scale=scale, return_lse=True)
    dq, dk, dv = torch.autograd.grad((o, lse), (q, k, v), (do, dlse.to(lse.dtype)))
    return {"o": o, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def check_against_whole_sequence(got, q, k, v, do, dlse, causal, floor=1e-5):
    """The ring's gathered results against float64 (2x rule) and against flash_attention on the whole sequence."""
    got = {name: t.to(DEV) for name, t in got.items()}
    q, k, v, do = (t.to(DEV) for t in (q, k, v, do))
    dlse = None if dlse is None else dlse.to(DEV)
    exact = grads_with_lse(ref.attention, *(t.double() for t in (q, k, v, do)),
                           None if dlse is None else dlse.double(), causal)
    same_precision = grads_with_lse(ref.attention, q, k, v, do, dlse, causal)
    flash = grads_with_lse(attnpkg.flash_attention, q, k, v, do, dlse, causal)
    size = lambda names: max([1.0] + [exact[n].abs().max().item() for n in names])
    scales = {"o": size(["o"]), "lse": 1.0, **dict.fromkeys(("dq", "dk", "dv"), size(["dq", "dk", "dv"]))}
    assert set(got) == {"o", "lse", "dq", "dk", "dv"}
    for name, value in got.items():
        assert value.shape == exact[name].shape and value.dtype == flash[name].dtype, name
        assert not value.isnan().any(), f"{name} has NaN"
        ring_err = max_error(value, exact[name])
        torch_err, flash_err = max_error(same_precision[name], exact[name]), max_error(flash[name], exact[name])
        assert ring_err <= 2 * torch_err + floor * scales[name], (
            f"{name}: ring error {ring_err:.3g} > 2 x PyTorch error {torch_err:.3g} + floor")
        gap = max_error(value, flash[name])
        assert gap <= 2 * max(torch_err, flash_err) + floor * scales[name], (
            f"{name}: ring and flash_attention on the whole sequence differ by {gap:.3g} (flash error {flash_err:.3g})")


# ------------------------------------------------------------------------------------------------------------
# In one process: layouts, schedule, and the backward pass of one block
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_positions_partition_the_sequence(layout, world_size):
    n = 2 * world_size * 5
    parts = [D.positions(n, r, world_size, layout) for r in range(world_size)]
    assert all(len(p) == n // world_size for p in parts)
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))
    if layout == "zigzag":
        c = n // (2 * world_size)
        for r, p in enumerate(parts):      # chunks r and 2P-1-r
            assert torch.equal(p, torch.cat([torch.arange(r * c, (r + 1) * c),
                                             torch.arange((2 * world_size - 1 - r) * c, (2 * world_size - r) * c)]))


def visible_from_schedule(rank, world_size, n, causal, layout):
    """(n/P, n) boolean: which global keys the schedule lets this rank's queries see, and how often."""
    n_local = n // world_size
    seen = torch.zeros(n_local, n, dtype=torch.int64)
    for source in range(world_size):
        key_pos = D.positions(n, source, world_size, layout)
        for b in D.schedule(rank, source, world_size, n_local, causal=causal, layout=layout):
            m, c = b.rows.stop - b.rows.start, b.cols.stop - b.cols.start
            block = torch.ones(m, c, dtype=torch.int64)
            if b.causal:
                block = torch.tril(block)
            seen[b.rows, key_pos[b.cols]] += block
    return seen


@pytest.mark.parametrize("layout", D.LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("world_size", [2, 3, 4, 8])
def test_schedule_computes_each_visible_pair_once(world_size, causal, layout):
    n = 2 * world_size * 3
    mask = ref.causal_mask(n, n) if causal else torch.ones(n, n, dtype=torch.bool)
    for rank in range(world_size):
        seen = visible_from_schedule(rank, world_size, n, causal, layout)
        expected = mask[D.positions(n, rank, world_size, layout)]
        assert torch.equal(seen, expected.long()), (rank, seen, expected)


def test_zigzag_balances_the_causal_work():
    world_size, n_local = 4, 64
    work = {layout: [sum(D.block_work(D.schedule(r, s, world_size, n_local, causal=True, layout=layout))
                         for s in range(world_size)) for r in range(world_size)] for layout in D.LAYOUTS}
    assert len(set(work["zigzag"])) == 1                                   # every rank the same
    per_step = [D.block_work(D.schedule(1, s, world_size, n_local, causal=True, layout="zigzag")) for s in range(4)]
    assert max(per_step) - min(per_step) <= n_local / 2                    # and every step nearly the same
    c = work["contiguous"]
    assert c == sorted(c) and c[-1] > 5 * c[0]                             # contiguous: the last rank does most
    assert sum(c) == sum(work["zigzag"])                                   # the same total


@pytest.mark.parametrize("with_dlse", [False, True])
def test_block_backward_with_final_lse_is_the_blocks_share(with_dlse):
    """The property the backward ring rests on: backward_impl on one block of keys, with the whole sequence's o
    and lse (and dlse), gives that block's part of dq and exactly its rows of dk, dv."""
    q, k, v, do, dlse = make_inputs(1, 2, 1, with_dlse, torch.float32, n_per_rank=48)
    scale = q.shape[-1] ** -0.5
    o, lse = attnpkg.flash_attention(q, k, v, causal=True, return_lse=True)
    whole = backward_impl(do, q, k, v, o, lse, dlse, True, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    chunks = [slice(0, 16), slice(16, 32), slice(32, 48)]
    for a, rows in enumerate(chunks):
        for b, cols in enumerate(chunks[:a + 1]):
            dq_b, dk_b, dv_b = backward_impl(do[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols],
                                             o[:, :, rows], lse[:, :, rows].contiguous(),
                                             None if dlse is None else dlse[:, :, rows].contiguous(), a == b, scale)
            dq[:, :, rows] += dq_b
            dk[:, :, cols] += dk_b
            dv[:, :, cols] += dv_b
    for got, expected in zip((dq, dk, dv), whole):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # the blocks' own lse instead of the final one gives wrong gradients: the check can fail
    o_b, lse_b = attnpkg.flash_attention(q[:, :, 16:32], k[:, :, :16], v[:, :, :16], return_lse=True)
    wrong = backward_impl(do[:, :, 16:32], q[:, :, 16:32], k[:, :, :16], v[:, :, :16], o_b, lse_b, None, False, scale)
    right = backward_impl(do[:, :, 16:32], q[:, :, 16:32], k[:, :, :16], v[:, :, :16], o[:, :, 16:32],
                          lse[:, :, 16:32].contiguous(), None, False, scale)
    assert not torch.allclose(wrong[1], right[1], atol=1e-3)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.shard(q)


def test_layout_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        D.positions(8, 0, 2, "striped")
    with pytest.raises(ValueError, match="does not split into 4 equal chunks"):
        D.positions(10, 0, 2, "zigzag")
    with pytest.raises(ValueError, match="does not split into 3 equal chunks"):
        D.positions(10, 0, 3, "contiguous")
    with pytest.raises(ValueError, match="even shard length"):
        D.schedule(0, 1, 2, 7, causal=True, layout="zigzag")


# ------------------------------------------------------------------------------------------------------------
# The ring on Gloo processes
# ------------------------------------------------------------------------------------------------------------

_inputs, _results = {}, {}


def ring_results(world_size):
    """Every case of CASES[world_size], run on one set of world_size processes (started once per module)."""
    if world_size not in _results:
        cases = {}
        for name, (hq, hkv, causal, layout, with_dlse, dtype) in CASES[world_size].items():
            q, k, v, do, dlse = make_inputs(world_size, hq, hkv, with_dlse, dtype, device="cpu",   # Gloo: CPU
                                            queries_per_rank=48 if "more-queries" in name else None)
            _inputs[world_size, name] = (q, k, v, do, dlse, causal)
            cases[name] = (q, k, v, do, dlse, causal, layout)
        results = D.spawn(run_cases, world_size, cases, timeout=900)
        for r in range(1, world_size):      # every rank gathers the same whole results
            for name in cases:
                for key, value in results[0][name].items():
                    assert torch.equal(value, results[r][name][key]), (name, key, r)
        _results[world_size] = results[0]
    return _results[world_size]


@pytest.mark.parametrize("world_size,name", [(p, name) for p in CASES for name in CASES[p]])
def test_ring_matches_whole_sequence(world_size, name):
    got = ring_results(world_size)[name]
    q, k, v, do, dlse, causal = _inputs[world_size, name]
    check_against_whole_sequence(got, q, k, v, do, dlse, causal)


def bad_calls():
    """In each of two ranks: calls that must fail on every rank, and what each raised."""
    rank = dist.get_rank()
    q = torch.randn(1, 2, 8, 16)
    outcomes = {}

    def attempt(name, call):
        try:
            call()
        except (TypeError, ValueError) as error:
            outcomes[name] = (type(error).__name__, str(error))
        else:
            outcomes[name] = None

    short = q[:, :, :4] if rank == 1 else q
    attempt("unequal lengths", lambda: D.ring_attention(short, short, short))
    attempt("unequal causal", lambda: D.ring_attention(q, q, q, causal=rank == 0))
    attempt("invalid on one rank", lambda: D.ring_attention(q[0] if rank == 1 else q, q, q))
    attempt("float64", lambda: D.ring_attention(q.double(), q.double(), q.double()))
    attempt("odd zigzag shard", lambda: D.ring_attention(q[:, :, :7], q[:, :, :7], q[:, :, :7], causal=True,
                                                         layout="zigzag"))
    attempt("causal, q and k of different lengths", lambda: D.ring_attention(q, q[:, :, :4], q[:, :, :4], causal=True))
    attempt("meta tensors with gloo", lambda: D.ring_attention(*(torch.empty(1, 2, 8, 16, device="meta"),) * 3))
    attempt("bad layout", lambda: D.ring_attention(q, q, q, layout="striped"))
    attempt("bad deterministic", lambda: D.ring_attention(q, q, q, deterministic="yes"))
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
    attempt("group of one", lambda: D.ring_attention(q, q, q, group=singles[rank]))
    # the ring still works after the failed calls (nobody is left waiting), and without autograd
    with torch.no_grad():
        o = D.ring_attention(q, q, q, causal=True)
    attempt("a valid call", lambda: None)
    outcomes["o"] = o
    return outcomes


def test_errors_are_raised_on_every_rank():
    results = D.spawn(bad_calls, 2, timeout=600)
    expected = {
        "unequal lengths": ("ValueError", "same shape (equal lengths)"),
        "unequal causal": ("ValueError", "same causal, layout"),
        "float64": ("TypeError", "float64 is not supported"),
        "odd zigzag shard": ("ValueError", "shard length must be even"),
        "causal, q and k of different lengths": ("ValueError", "as many queries as keys"),
        "meta tensors with gloo": ("ValueError", "gloo backend of the process group cannot send tensors on meta"),
        "bad layout": ("ValueError", "layout must be one of"),
        "bad deterministic": ("TypeError", "deterministic must be None, True or False"),
        "group of one": ("ValueError", "call attnpkg.flash_attention"),
    }
    for rank, outcome in enumerate(results):
        for name, (kind, text) in expected.items():
            assert outcome[name] is not None, f"rank {rank}: {name}: no error"
            assert outcome[name][0] == kind and text in outcome[name][1], (rank, name, outcome[name])
            assert outcome[name][1].startswith("ring_attention:"), outcome[name]
        assert outcome["a valid call"] is None
    assert results[1]["invalid on one rank"][0] == "ValueError" and "4 dimensions" in results[1]["invalid on one rank"][1]
    assert results[0]["invalid on one rank"] == ("ValueError", "ring_attention: the inputs of rank(s) [1] are invalid "
                                                               "(see the error there)")
    assert "rank 0 has q (1, 2, 8, 16)" in results[0]["unequal lengths"][1]
    assert "rank 1 has q (1, 2, 4, 16)" in results[0]["unequal lengths"][1]


# ------------------------------------------------------------------------------------------------------------
# NCCL on GPUs, large shapes
# ------------------------------------------------------------------------------------------------------------

def _gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def nccl_case(q, k, v, do, dlse, causal, layout):
    """In each rank: the inputs to this rank's GPU, the ring, the gathered results (returned by rank 0 only)."""
    device = torch.device("cuda", torch.cuda.current_device())
    q, k, v, do = (t.to(device) for t in (q, k, v, do))
    dlse = None if dlse is None else dlse.to(device)
    result = D.ring_attention_gathered(q, k, v, do, dlse, causal=causal, layout=layout)
    return result if dist.get_rank() == 0 else None


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=_gpus(2)), pytest.param(4, marks=_gpus(4))])
@pytest.mark.parametrize("causal,layout,hkv", [(False, "contiguous", 8), (True, "contiguous", 2), (True, "zigzag", 8),
                                               (True, "zigzag", 2)])
def test_nccl_ring_matches_reference(world_size, causal, layout, hkv):
    """bfloat16, D = 128, 1024 tokens per GPU: the accuracy rule against float64 and flash_attention."""
    q, k, v, do, dlse = make_inputs(world_size, 8, hkv, hkv == 2, torch.bfloat16, n_per_rank=1024, head_dim=128,
                                    device="cpu")
    got = D.spawn(nccl_case, world_size, q, k, v, do, dlse, causal, layout, backend="nccl", timeout=900)[0]
    check_against_whole_sequence(got, q, k, v, do, dlse, causal)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [pytest.param(2, marks=_gpus(2)), pytest.param(4, marks=_gpus(4))])
def test_nccl_ring_large(world_size):
    """16k tokens per GPU, H = 16, D = 128, bfloat16, causal zigzag. Too large for a float64 reference: the
    rule with flash_attention in float32 on the whole sequence standing in for the exact result, and
    flash_attention in bfloat16 for the same-precision one."""
    q, k, v, do, _ = make_inputs(world_size, 16, 16, False, torch.bfloat16, n_per_rank=16384, head_dim=128,
                                 device="cpu")
    got = D.spawn(nccl_case, world_size, q, k, v, do, None, True, "zigzag", backend="nccl", timeout=900)[0]
    q, k, v, do = (t.cuda() for t in (q, k, v, do))
    exact = attention_and_grads(*(t.float() for t in (q, k, v, do)), True, fn=attnpkg.flash_attention)
    same = attention_and_grads(q, k, v, do, True, fn=attnpkg.flash_attention)
    for name, value in got.items():
        err, allowed = max_error(value.cuda(), exact[name]), 2 * max_error(same[name], exact[name]) + 1e-5
        assert err <= allowed, f"{name}: ring error {err:.3g} > {allowed:.3g}"


def cpu_tensors_on_nccl():
    q = torch.randn(1, 2, 8, 16)
    try:
        D.ring_attention(q, q, q)
    except ValueError as error:
        return str(error)


@pytest.mark.gpu
@_gpus(2)
def test_nccl_refuses_cpu_tensors():
    messages = D.spawn(cpu_tensors_on_nccl, 2, backend="nccl", timeout=600)
    assert all(m and "nccl backend of the process group cannot send tensors on cpu" in m for m in messages)
