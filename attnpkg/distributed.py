"""Context-parallel (ring) attention over ``torch.distributed``: one sequence spread over several devices.

Each of the ``P`` ranks of a process group holds ``1/P`` of the sequence: its shard of the queries, keys and
values. The key/value shards travel around the ring of ranks (rank ``r`` sends to ``r + 1`` and receives from
``r - 1``), and each rank merges the partial results of its queries against every shard through their
log-sum-exps, the merge of the FlashAttention forward pass. The backward pass runs the ring again; the
gradients of the keys and values travel with their shard and come home complete after ``P`` steps.

    import torch.distributed as dist
    from attnpkg.distributed import ring_attention, shard, unshard

    dist.init_process_group("nccl")      # one process per GPU (torchrun), each after torch.cuda.set_device(...)
    q, k, v = (shard(t, layout="zigzag") for t in (q_full, k_full, v_full))   # this rank's part
    o = ring_attention(q, k, v, causal=True, layout="zigzag")                # this rank's part of the output
    o_full = unshard(o, layout="zigzag")                                     # the whole output, on every rank

Layouts. ``"contiguous"``: rank ``r`` holds tokens ``[r N/P, (r + 1) N/P)``. With a causal mask the last rank
then has about ``2P - 1`` times the work of the first. ``"zigzag"``: the sequence is cut into ``2P`` chunks and rank ``r``
holds chunks ``r`` and ``2P - 1 - r``, one early and one late, so every rank has the same causal work.
``schedule`` says which blocks each rank computes at each step of the ring.

Communication: ``torch.distributed.batch_isend_irecv`` (NCCL on GPUs, Gloo on CPUs), started before the
computation on the current shard, waited on only when the next shard is needed. On NCCL the transfers run on
the process group's own CUDA stream (which waits for the current stream when they are issued), and
``wait()`` makes the current stream wait for them: the kernels queued in between run concurrently.
"""
import inspect
import io
import math
import os
import socket
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from . import attention as _attention
from .attention import flash_attention

__all__ = ["ring_attention", "shard", "unshard", "positions", "schedule", "block_work", "Block", "LAYOUTS",
           "ring_attention_gathered", "spawn"]

LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------------------------------
# Layouts: which tokens a rank holds
# ---------------------------------------------------------------------------------------------------------

def _check_layout(layout, where):
    if layout not in LAYOUTS:
        raise ValueError(f"{where}: layout must be one of {LAYOUTS}, got {layout!r}")


def positions(n: int, rank: int, world_size: int, layout: str = "contiguous") -> torch.Tensor:
    """Global positions (a ``LongTensor`` of ``n // world_size`` entries) of the tokens that ``rank`` holds
    when a sequence of ``n`` tokens is spread over ``world_size`` ranks with ``layout``."""
    _check_layout(layout, "positions")
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"positions: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    parts = world_size if layout == "contiguous" else 2 * world_size
    if n % parts:
        raise ValueError(f"positions: a sequence of {n} tokens does not split into {parts} equal chunks "
                         f"({layout} layout over {world_size} ranks); pad it to a multiple of {parts}")
    c = n // parts
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((parts - 1 - rank) * c, (parts - rank) * c)])


def _group_size_rank(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("attnpkg.distributed: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (or use attnpkg.distributed.spawn)")
    return dist.get_world_size(group), dist.get_rank(group)


def shard(x: torch.Tensor, group=None, layout: str = "contiguous", *, dim: int = 2) -> torch.Tensor:
    """This rank's part of the whole sequence ``x`` (the same tensor on every rank), along ``dim``.

    ``dim = 2`` is the sequence dimension of ``(B, H, N, D)`` tensors and of the ``(B, H, N)`` lse. The result
    is a new tensor (differentiable in ``x``) with ``N / P`` tokens, in the order of :func:`positions`.
    """
    world_size, rank = _group_size_rank(group)
    index = positions(x.shape[dim], rank, world_size, layout).to(x.device)
    return x.index_select(dim, index)


def unshard(x: torch.Tensor, group=None, layout: str = "contiguous", *, dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's part ``x`` (the inverse of :func:`shard`), on every rank.

    An all-gather: every rank must call it with parts of the same shape. Not differentiable.
    """
    world_size, rank = _group_size_rank(group)
    parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    n = x.shape[dim] * world_size
    shape = list(x.shape)
    shape[dim] = n
    full = x.new_empty(shape)
    for r, part in enumerate(parts):
        full.index_copy_(dim, positions(n, r, world_size, layout).to(x.device), part)
    return full


# ---------------------------------------------------------------------------------------------------------
# The schedule: which blocks of (this rank's queries) x (the shard it holds) to compute at each step
# ---------------------------------------------------------------------------------------------------------

class Block(NamedTuple):
    """One kernel call: local query rows ``rows`` against rows ``cols`` of the key/value shard held, causal
    (the diagonal block, ``Nq == Nk``, aligned) or fully visible."""
    rows: slice
    cols: slice
    causal: bool


def schedule(rank: int, source: int, world_size: int, n_local: int, *, causal: bool,
             layout: str = "contiguous", n_queries: Optional[int] = None) -> list[Block]:
    """The blocks that ``rank`` computes when it holds the key/value shard of rank ``source``: ``n_local`` keys
    (and as many queries, or ``n_queries`` of them without a causal mask).

    Shards have equal lengths, so a pair of chunks (queries of chunk ``a``, keys of chunk ``b``) is fully
    visible (``b < a``), the causal diagonal (``b == a``) or empty (``b > a``), and empty pairs are skipped.

    - contiguous: the chunk of ``source`` is before, at or after the rank's own chunk.
    - zigzag, ``c = n_local / 2``: the rank holds chunks ``r`` (local rows ``[0, c)``) and ``2P-1-r``
      (``[c, 2c)``). For ``source == r`` the local causal mask is exact (its early half comes first in both).
      For ``source < r`` both query chunks see the early key chunk ``source`` and neither sees the late one
      ``2P-1-source``: all rows against keys ``[0, c)``. For ``source > r`` only the late query chunk sees the
      key chunks, both of them: rows ``[c, 2c)`` against all keys. Every step costs the same.
    """
    _check_layout(layout, "schedule")
    everything = slice(0, n_local)
    if not causal:
        return [Block(slice(0, n_local if n_queries is None else n_queries), everything, False)]
    if n_queries is not None and n_queries != n_local:
        raise ValueError(f"schedule: a causal ring needs as many queries as keys per rank, got {n_queries} and {n_local}")
    if source == rank:
        return [Block(everything, everything, True)]
    if layout == "contiguous":
        return [Block(everything, everything, False)] if source < rank else []
    if n_local % 2:
        raise ValueError(f"schedule: the zigzag layout needs an even shard length, got {n_local}")
    c = n_local // 2
    if source < rank:
        return [Block(everything, slice(0, c), False)]
    return [Block(slice(c, n_local), everything, False)]


def block_work(blocks: list[Block]) -> float:
    """Query-key pairs computed by a list of blocks (half of the square for a causal one, as the kernels skip
    the tiles above the diagonal): the unit of work of a step."""
    work = 0.0
    for b in blocks:
        m, n = b.rows.stop - b.rows.start, b.cols.stop - b.cols.start
        work += m * (m + 1) / 2 if b.causal else m * n
    return work


# ---------------------------------------------------------------------------------------------------------
# Communication around the ring
# ---------------------------------------------------------------------------------------------------------

class _Ring:
    """Point-to-point exchange with the neighbours in a process group: send to rank + 1, receive from rank - 1."""

    def __init__(self, group):
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = to_global((self.rank + 1) % self.world_size)
        self.prev = to_global((self.rank - 1) % self.world_size)
        self.wait_seconds = None        # set to a list to record the time spent waiting (see _timed_waits)

    def exchange(self, tensor: torch.Tensor):
        """Start sending ``tensor`` to the next rank and receiving one like it from the previous rank.
        Returns a handle whose ``wait()`` returns the received tensor."""
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.next, self.group),
               dist.P2POp(dist.irecv, received, self.prev, self.group)]
        return _Pending(dist.batch_isend_irecv(ops), received, tensor, self)


class _Pending:
    def __init__(self, works, received, sent, ring):
        self.works, self.received, self.sent, self.ring = works, received, sent, ring

    def wait(self) -> torch.Tensor:
        timing = self.ring.wait_seconds is not None
        if timing and self.received.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()            # NCCL: the current stream waits for the transfer; Gloo: the host waits
        if timing:
            if self.received.is_cuda:
                end.record()
                self.ring.wait_seconds.append((start, end))
            else:
                self.ring.wait_seconds.append(time.perf_counter() - t0)
        self.sent = None        # the send is complete: its buffer may be reused
        return self.received


class _Local:
    """A stand-in for _Ring without communication: the same schedule and kernels on the shard already held
    (wrong results; for timing the computation of a ring alone)."""

    def __init__(self, world_size, rank):
        self.world_size, self.rank, self.wait_seconds = world_size, rank, None

    def exchange(self, tensor):
        return _Done(tensor)


class _Done:
    def __init__(self, tensor):
        self.received = tensor

    def wait(self):
        return self.received


# ---------------------------------------------------------------------------------------------------------
# Forward and backward around the ring
# ---------------------------------------------------------------------------------------------------------

def _merge_into(out, lse, o_part, lse_part):
    """Merge the attention of some rows over more keys into the accumulators (out float32, lse) in place:
    lse' = logaddexp(lse, lse_part), out' = e^(lse - lse') out + e^(lse_part - lse') o_part."""
    new = torch.logaddexp(lse, lse_part)
    new_safe = torch.where(torch.isneginf(new), 0.0, new)     # both parts empty: keep (0, -inf)
    out.mul_(torch.exp(lse - new_safe).unsqueeze(-1)).addcmul_(o_part, torch.exp(lse_part - new_safe).unsqueeze(-1))
    lse.copy_(new)


def _keys(kv, cols, n_local):
    """Key and value rows ``cols`` of the stacked shard ``kv`` (2, B, Hkv, n, D), as contiguous tensors
    (the forward kernel reads K and V through tensor descriptors only when they are contiguous)."""
    k, v = kv[0], kv[1]
    if cols.start == 0 and cols.stop == n_local:
        return k, v
    return k[:, :, cols].contiguous(), v[:, :, cols].contiguous()


def _ring_forward(q, k, v, ring, causal, scale, layout):
    """This rank's (o, lse) over the whole sequence; o in the dtype of q, lse float32."""
    n_local = k.shape[2]
    kv = torch.stack([k, v])                      # one buffer travels: (2, B, Hkv, n, D)
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    for step in range(ring.world_size):
        source = (ring.rank - step) % ring.world_size
        pending = ring.exchange(kv) if step + 1 < ring.world_size else None    # next shard, in flight
        for b in schedule(ring.rank, source, ring.world_size, n_local, causal=causal, layout=layout,
                          n_queries=q.shape[2]):
            k_b, v_b = _keys(kv, b.cols, n_local)
            o_b, lse_b = flash_attention(q[:, :, b.rows], k_b, v_b, causal=b.causal, scale=scale, return_lse=True)
            _merge_into(out[:, :, b.rows], lse[:, :, b.rows], o_b, lse_b)
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


# Whether the kernels' backward pass offers a faster, non-deterministic variant (a `deterministic` argument).
_BACKWARD_HAS_VARIANTS = "deterministic" in inspect.signature(_attention.backward_impl).parameters


def _pair_backward(do, q, k, v, o, lse, dlse, causal, scale, deterministic):
    """Gradients (dq, dk, dv) of one block, given the FINAL o and lse of its query rows: with P = exp(S - lse)
    and D = rowsum(dO o) - dlse global, they are exactly this block's part of the whole gradient.
    The one call of the kernels' backward pass."""
    if _BACKWARD_HAS_VARIANTS:
        return _attention.backward_impl(do, q, k, v, o, lse, dlse, causal, scale, deterministic=deterministic)
    return _attention.backward_impl(do, q, k, v, o, lse, dlse, causal, scale)


def _ring_backward(do, dlse, q, k, v, o, lse, ring, causal, scale, layout, deterministic=True):
    n_local = k.shape[2]
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_pending = None
    for step in range(ring.world_size):
        source = (ring.rank - step) % ring.world_size
        kv_pending = ring.exchange(kv) if step + 1 < ring.world_size else None
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)   # this step's part of (dk, dv)
        for b in schedule(ring.rank, source, ring.world_size, n_local, causal=causal, layout=layout,
                          n_queries=q.shape[2]):
            k_b, v_b = kv[0][:, :, b.cols], kv[1][:, :, b.cols]
            rows = b.rows
            dq_b, dk_b, dv_b = _pair_backward(
                do[:, :, rows], q[:, :, rows], k_b, v_b, o[:, :, rows], lse[:, :, rows].contiguous(),
                None if dlse is None else dlse[:, :, rows].contiguous(), b.causal, scale, deterministic)
            dq[:, :, rows] += dq_b
            dkv[0][:, :, b.cols] += dk_b
            dkv[1][:, :, b.cols] += dv_b
        if dkv_pending is not None:
            dkv += dkv_pending.wait()             # what the earlier ranks added to this shard's gradients
        dkv_pending = ring.exchange(dkv)          # ... passed on with the shard
        if kv_pending is not None:
            kv = kv_pending.wait()
    dkv = dkv_pending.wait()                      # after P steps, this rank's own shard comes home complete
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, causal, scale, layout, deterministic=True):
        o, lse = _ring_forward(q, k, v, ring, causal, scale, layout)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.layout, ctx.deterministic = ring, causal, scale, layout, deterministic
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dq, dk, dv = _ring_backward(do, dlse, q, k, v, o, lse, ctx.ring, ctx.causal, ctx.scale, ctx.layout,
                                    ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


def _backend_devices(group) -> Optional[set]:
    """Device types the group's backend can send, or None if unknown."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:                                # per-device backends, e.g. "cpu:gloo,cuda:nccl"
        return {pair.split(":")[0] for pair in backend.split(",") if ":" in pair}
    return {"nccl": {"cuda"}, "gloo": {"cpu"}}.get(backend)


def _validate(q, k, v, group, causal, scale, layout):
    """Local checks, then an all-gather of every rank's shapes and options so that all ranks raise together
    (a rank that raised alone would leave the others waiting for it forever)."""
    world_size, rank = _group_size_rank(group)
    if world_size == 1:
        raise ValueError("ring_attention: the process group has one rank, so there is no ring: "
                         "call attnpkg.flash_attention on the whole sequence instead")
    _check_layout(layout, "ring_attention")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"ring_attention: q must be a torch.Tensor, got {type(q).__name__}")
    devices = _backend_devices(group)
    backend = dist.get_backend(group)
    if devices is not None and q.device.type not in devices:
        hint = ("move the shards to this rank's GPU" if backend == "nccl"
                else "use the NCCL backend for CUDA tensors" if q.device.type == "cuda" else "")
        raise ValueError(f"ring_attention: the {backend} backend of the process group cannot send tensors on "
                         f"{q.device.type} (it handles {', '.join(sorted(devices))})" + (f": {hint}" if hint else ""))
    problem = ""
    try:
        _attention._check_inputs(q, k, v, scale)
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError(f"ring_attention: with causal=True each rank must hold as many queries as keys "
                             f"(the same tokens), got q {tuple(q.shape)} and k {tuple(k.shape)}")
        if causal and layout == "zigzag" and q.shape[2] % 2:
            raise ValueError(f"ring_attention: the zigzag layout holds two chunks per rank, so the shard length "
                             f"must be even, got {q.shape[2]}")
    except (TypeError, ValueError) as error:
        problem = str(error).replace("flash_attention:", "ring_attention:")
        error_type = type(error)
    shapes = list(q.shape) + list(k.shape) + [v.shape[2], v.shape[3]] if not problem else [0] * 10
    mine = torch.tensor([float(bool(problem))] + [float(s) for s in shapes] +
                        [float(causal), float(LAYOUTS.index(layout)),
                         float(scale if scale is not None else 0.0), float(_DTYPE_CODES.get(q.dtype, 0))],
                        dtype=torch.float64, device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(everyone, mine, group=group)
    everyone = [t.tolist() for t in everyone]
    if problem:
        raise error_type(problem)
    failed = [r for r, t in enumerate(everyone) if t[0]]
    if failed:
        raise ValueError(f"ring_attention: the inputs of rank(s) {failed} are invalid (see the error there)")
    names = ("q", "k")
    for r, t in enumerate(everyone):
        if t[1:11] != everyone[rank][1:11]:
            theirs, ours = t[1:11], everyone[rank][1:11]
            describe = lambda s: ", ".join(f"{n} {tuple(int(x) for x in s[4 * i:4 * i + 4])}" for i, n in enumerate(names))
            raise ValueError(f"ring_attention: every rank must hold shards of the same shape (equal lengths); "
                             f"rank {rank} has {describe(ours)} but rank {r} has {describe(theirs)}")
        if t[11:] != everyone[rank][11:]:
            raise ValueError(f"ring_attention: every rank must call with the same causal, layout, scale and dtype; "
                             f"rank {rank} and rank {r} differ")


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, return_lse=False, layout="contiguous",
                   deterministic=None):
    """Exact softmax attention over a sequence spread across the ranks of a process group.

    Every rank of ``group`` calls it with its own shards; the result is this rank's shard of the attention over
    the whole sequence, what :func:`attnpkg.flash_attention` on the whole sequence gives at this rank's tokens.
    Differentiable in ``q``, ``k`` and ``v`` (the backward pass is a second trip around the ring).

    Args:
        q: this rank's queries, ``(B, Hq, n, D)``, ``n = N / P``; the tokens at :func:`positions` for ``layout``.
        k, v: this rank's keys and values, ``(B, Hkv, n, D)`` (``Hq`` a multiple of ``Hkv``, as in
            ``flash_attention``). Without a causal mask the key shards may have another length than the queries.
        group: the process group (default: the whole world), of at least two ranks. Its backend must be able to
            send the tensors: NCCL for CUDA tensors, Gloo for CPU tensors (which run through Triton's interpreter).
        causal: query ``i`` sees keys ``j <= i`` (global positions).
        scale: multiplies ``q k^T``; ``1/sqrt(D)`` by default.
        return_lse: also return this rank's rows of the log-sum-exp (natural log, float32, ``(B, Hq, n)``).
        layout: ``"contiguous"`` or ``"zigzag"``: which tokens each rank holds (see :func:`shard`). It matters only
            with ``causal=True``, where zigzag balances the work.
        deterministic: whether the backward pass must give bit-identical gradients on every run; ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()``. The ring adds its terms in a fixed order; this picks
            the variant of the kernels' backward pass where they offer a faster, non-deterministic one.

    Every rank must hold shards of the same shapes and pass the same options; this is checked (one small
    all-gather per call) and every rank raises a ``ValueError`` or ``TypeError`` if not.
    """
    _validate(q, k, v, group, causal, scale, layout)
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"ring_attention: deterministic must be None, True or False, got {deterministic!r}")
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ring = _Ring(group)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        o, lse = _RingAttention.apply(q, k, v, ring, bool(causal), scale, layout, deterministic)
    else:
        o, lse = _ring_forward(q, k, v, ring, bool(causal), scale, layout)
    return (o, lse) if return_lse else o


def ring_attention_gathered(q, k, v, do=None, dlse=None, *, causal=False, scale=None, layout="contiguous",
                            group=None) -> dict:
    """The ring on whole-sequence tensors, for checking it: every rank passes the same whole ``q, k, v`` (and
    optionally output gradients ``do``, ``dlse``), takes its shards with :func:`shard`, runs
    :func:`ring_attention` forward and (given ``do`` or ``dlse``) backward, and gathers every result with
    :func:`unshard`. Returns the whole ``o``, ``lse`` and, with a backward pass, ``dq``, ``dk``, ``dv``."""
    q_r, k_r, v_r = (shard(t, group, layout).requires_grad_(do is not None or dlse is not None) for t in (q, k, v))
    o, lse = ring_attention(q_r, k_r, v_r, group=group, causal=causal, scale=scale, return_lse=True, layout=layout)
    result = {"o": unshard(o.detach(), group, layout), "lse": unshard(lse.detach(), group, layout)}
    if do is not None or dlse is not None:
        outputs = [(o, shard(do, group, layout)) if do is not None else None,
                   (lse, shard(dlse, group, layout)) if dlse is not None else None]
        torch.autograd.backward(*zip(*[pair for pair in outputs if pair is not None]))
        for name, t in (("dq", q_r), ("dk", k_r), ("dv", v_r)):
            result[name] = unshard(t.grad, group, layout)
    return result


# ---------------------------------------------------------------------------------------------------------
# Running a function on several local processes (tests, the book, benchmarks)
# ---------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serialise(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _spawned(rank, world_size, port, backend, fn, args, kwargs, queue):
    if backend == "gloo":
        torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device_id = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            device_id=device_id)
    result = fn(*args, **kwargs)     # an exception ends this process at once: spawn then stops the others
    queue.put((rank, _serialise(_to_cpu(result))))
    dist.barrier()
    dist.destroy_process_group()


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {key: _to_cpu(val) for key, val in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(val) for val in x)
    return x


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout: Optional[float] = None, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` new processes that form a process group (``backend``
    "gloo" on CPUs, "nccl" with one GPU per process) over a free port on localhost; return the ranks'
    results, in rank order (tensors come back on the CPU). If a process raises, the others are stopped and
    the exception is raised here; after ``timeout`` seconds (if given) all are stopped and ``TimeoutError`` raised.

    ``fn`` must be importable by the new processes (defined at the top level of a module, not in a notebook
    or an interactive session), as ``torch.multiprocessing`` starts them with the "spawn" method. Gloo
    processes get ``TRITON_INTERPRET=1``, so that they run the kernels on CPU tensors even where a GPU exists.
    """
    import torch.multiprocessing as mp

    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"spawn: {world_size} NCCL processes need {world_size} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = _free_port()
    saved = os.environ.get("TRITON_INTERPRET")
    if backend == "gloo":               # CPU tensors: the new processes run the kernels through the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        procs = mp.start_processes(_spawned, args=(world_size, port, backend, fn, args, kwargs, queue),
                                   nprocs=world_size, join=False, start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    results = {}

    def drain():
        while not queue.empty():
            rank, payload = queue.get()
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)

    start = time.monotonic()
    while True:
        drain()
        if procs.join(timeout=0.05):
            break
        if timeout is not None and time.monotonic() - start > timeout:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"spawn: {fn.__name__} on {world_size} processes did not finish in {timeout} s")
    drain()
    return [results[r] for r in range(world_size)]
