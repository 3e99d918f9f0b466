"""Benchmark attnpkg.distributed.ring_attention on the GPUs of one machine (NCCL), forward + backward.

    python benchmarks/ring_attention.py                          # 2 and 4 GPUs (as many as there are), 32k and 64k tokens per GPU
    python benchmarks/ring_attention.py --gpus 2 --tokens 32768  # a 2-GPU machine, one size
    python benchmarks/ring_attention.py --quick                  # 2 GPUs, 8k tokens per GPU, 3 repeats: a smoke test

Case: B = 1, H = 16, D = 128, bfloat16, causal, zigzag layout, ``n`` tokens per GPU (``N = P n`` in all). For each
number of GPUs ``P`` it starts ``P`` processes (one GPU each) and measures, as the median over repeats of the
slowest rank's wall time of one forward + backward pass (barrier and synchronisation before, synchronisation after):

- ``attnpkg-ring``: ``ring_attention``; its forward time is measured alone as well.
- ``attnpkg-ring-compute-only``: the same schedule and kernel calls with the communication left out (each rank
  keeps computing on its own shard: wrong results, right work), so ring minus this is the communication that
  computation did not hide. The time the ring's compute stream spent waiting for transfers is also recorded
  directly, with CUDA events around each wait.
- ``comm-only``: the ring's transfers alone (P - 1 key/value exchanges forward; P - 1 key/value and P gradient
  exchanges backward), and the bandwidth they reached.
- ``torch-cp-allgather`` / ``torch-cp-alltoall``: PyTorch's ``context_parallel`` (SDPA, head-tail load balancing,
  which is the zigzag layout), where it runs; otherwise the error is written to the log.
- ``single-gpu``: ``attnpkg.flash_attention`` on the whole sequence on one GPU (GPU 0, the others idle).

Per-GPU throughput is the causal FLOP count of the whole sequence (``attnpkg.bench.attention_flops``: forward
``2 B H N^2 D``, backward 2.5 times that) divided by ``P`` and by the time; the efficiency of the ring is its per-GPU
throughput over the single GPU's (the target is at least 0.85). Peak memory per GPU is the most allocated by one
forward + backward pass beyond its inputs (largest over ranks); with ``n`` fixed it must not grow with ``P``.
The ring's gathered output and gradients are compared with the single GPU's (largest absolute difference).

Writes ``ring_attention.csv`` and ``ring_attention.log`` (machine, versions and date in both) to ``--out``.
"""
import argparse
import csv
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import attnpkg
from attnpkg import distributed as D
from attnpkg.bench import attention_flops

B, H, HEAD_DIM, DTYPE = 1, 16, 128, torch.bfloat16
DETERMINISTIC = torch.are_deterministic_algorithms_enabled()    # what ring_attention and flash_attention default to
FIELDS = ["provider", "world_size", "tokens_per_gpu", "seq_len", "batch", "heads", "head_dim", "dtype", "causal",
          "layout", "forward_ms", "total_ms", "backward_ms", "tflops_per_gpu", "efficiency", "wait_forward_ms",
          "wait_backward_ms", "comm_forward_ms", "comm_backward_ms", "comm_gb_per_s", "peak_bytes_per_gpu",
          "max_diff_o", "max_diff_dq", "max_diff_dk", "max_diff_dv", "note",
          "gpu", "gpus_on_machine", "torch", "triton", "cuda", "nccl", "python", "date", "backward_kernels"]


def environment():
    import triton
    gpu = torch.cuda.is_available()
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if gpu else ""
    return {"gpu": torch.cuda.get_device_name(0) if gpu else "CPU", "gpus_on_machine": torch.cuda.device_count(),
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "nccl": nccl,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "backward_kernels": "deterministic" if DETERMINISTIC or not D._BACKWARD_HAS_VARIANTS else "non-deterministic"}


def flops(n_total, mode):
    return attention_flops(B, H, n_total, HEAD_DIM, True, mode)


def on_gpu():
    return torch.cuda.is_available() and dist.get_backend() == "nccl"


def device():
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def sync():
    if on_gpu():
        torch.cuda.synchronize()


def timed(fn, warmup, reps, everyone=True):
    """Median over repeats of the wall time of fn() (seconds), the slowest rank's when ``everyone``."""
    times = []
    for i in range(warmup + reps):
        if everyone:
            dist.barrier()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    t = torch.tensor(times, device=device(), dtype=torch.float64)
    if everyone:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def peak_bytes(fn, everyone=True):
    """Most bytes allocated by fn() beyond what was allocated before (0 on the CPU: not measured there)."""
    if not on_gpu():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.tensor([torch.cuda.max_memory_allocated() - before], device="cuda", dtype=torch.float64)
    if everyone:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return int(peak.item())


def full_inputs(n_total, where):
    """The whole sequence's q, k, v and dO, the same on every rank."""
    g = torch.Generator(device=where).manual_seed(1234)
    return [torch.randn(B, H, n_total, HEAD_DIM, device=where, generator=g).to(DTYPE) for _ in range(4)]


def empty_cache():
    if on_gpu():
        torch.cuda.empty_cache()


def rank_main(n, warmup, reps, with_torch_cp, shape=(B, H, HEAD_DIM)):
    """One rank of a run on P GPUs with n tokens each; rank 0 returns the rows (others return None)."""
    global B, H, HEAD_DIM
    B, H, HEAD_DIM = shape                  # this process's copy of the module: the shape of this run
    P, rank = dist.get_world_size(), dist.get_rank()
    where = device()
    n_total, scale = P * n, HEAD_DIM ** -0.5
    common = dict(world_size=P, tokens_per_gpu=n, seq_len=n_total, batch=B, heads=H, head_dim=HEAD_DIM,
                  dtype="bf16", causal=True, layout="zigzag")
    rows, notes = [], []
    log = (lambda *a: print(f"[P={P} n={n}]", *a, flush=True)) if rank == 0 else (lambda *a: None)

    full = full_inputs(n_total, where)
    q, k, v, do = (D.shard(t, layout="zigzag").contiguous() for t in full)
    del full
    empty_cache()
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def ring_step(ring=None):
        if ring is None:
            o = D.ring_attention(q, k, v, causal=True, layout="zigzag")
        else:
            o = D._RingAttention.apply(q, k, v, ring, True, scale, "zigzag", DETERMINISTIC)[0]
        o.backward(do)
        q.grad = k.grad = v.grad = None

    def ring_forward():
        D.ring_attention(q, k, v, causal=True, layout="zigzag")

    # --- the ring: memory, forward, forward + backward, waits --------------------------------------------------
    ring_step()
    peak = peak_bytes(ring_step)
    t_fwd = timed(ring_forward, warmup, reps)
    t_tot = timed(ring_step, warmup, reps)
    ring = D._Ring(None)
    waits_f, waits_b = [], []
    for _ in range(reps):
        ring.wait_seconds = []
        o = D._RingAttention.apply(q, k, v, ring, True, scale, "zigzag", DETERMINISTIC)[0]
        n_fwd = len(ring.wait_seconds)
        o.backward(do)
        q.grad = k.grad = v.grad = None
        sync()
        ms = [w[0].elapsed_time(w[1]) if isinstance(w, tuple) else w * 1e3 for w in ring.wait_seconds]
        waits_f.append(sum(ms[:n_fwd]))
        waits_b.append(sum(ms[n_fwd:]))
    waits = torch.tensor([statistics.median(waits_f), statistics.median(waits_b)], device=where, dtype=torch.float64)
    dist.all_reduce(waits, op=dist.ReduceOp.MAX)

    # --- the same work without communication ---------------------------------------------------------------------
    local = D._Local(P, rank)
    t_local_fwd = timed(lambda: D._RingAttention.apply(q, k, v, local, True, scale, "zigzag", DETERMINISTIC), warmup, reps)
    t_local = timed(lambda: ring_step(local), warmup, reps)

    # --- the communication alone ---------------------------------------------------------------------------------
    kv = torch.stack([k.detach(), v.detach()])
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=where)

    def comm_forward():
        x = kv
        for _ in range(P - 1):
            x = ring.exchange(x).wait()

    def comm_backward():
        x, g = kv, dkv
        for _ in range(P - 1):
            x = ring.exchange(x).wait()
        for _ in range(P):
            g = ring.exchange(g).wait()

    ring.wait_seconds = None
    t_comm_f = timed(comm_forward, warmup, reps)
    t_comm_b = timed(comm_backward, warmup, reps)
    gb_per_s = (P - 1) * kv.numel() * kv.element_size() / t_comm_f / 1e9
    per_gpu = lambda t, mode="total": (flops(n_total, "forward") + (flops(n_total, "backward") if mode == "total" else 0)) / P / t / 1e12
    rows.append(dict(common, provider="attnpkg-ring", forward_ms=t_fwd * 1e3, total_ms=t_tot * 1e3,
                     backward_ms=(t_tot - t_fwd) * 1e3, tflops_per_gpu=per_gpu(t_tot),
                     wait_forward_ms=waits[0].item(), wait_backward_ms=waits[1].item(),
                     comm_forward_ms=t_comm_f * 1e3, comm_backward_ms=t_comm_b * 1e3, comm_gb_per_s=gb_per_s,
                     peak_bytes_per_gpu=peak))
    rows.append(dict(common, provider="attnpkg-ring-compute-only", forward_ms=t_local_fwd * 1e3,
                     total_ms=t_local * 1e3, backward_ms=(t_local - t_local_fwd) * 1e3,
                     tflops_per_gpu=per_gpu(t_local)))
    log(f"ring {t_tot * 1e3:.1f} ms (forward {t_fwd * 1e3:.1f}), compute only {t_local * 1e3:.1f} ms, "
        f"waits {waits[0].item():.2f} + {waits[1].item():.2f} ms, transfers alone {t_comm_f * 1e3:.2f} + "
        f"{t_comm_b * 1e3:.2f} ms ({gb_per_s:.0f} GB/s), peak {peak / 2**30:.2f} GiB")

    # --- gathered results, for the comparison with one GPU -------------------------------------------------------
    o = D.ring_attention(q, k, v, causal=True, layout="zigzag")
    o.backward(do)
    gathered = {name: D.unshard(t.detach(), layout="zigzag")
                for name, t in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad))}
    if rank != 0:
        gathered = None
    o = kv = dkv = None
    q.grad = k.grad = v.grad = None
    empty_cache()

    # --- PyTorch's context_parallel ------------------------------------------------------------------------------
    if with_torch_cp:
        for method in ("allgather", "alltoall"):
            try:
                rows.append(dict(common, **torch_context_parallel(method, n_total, warmup, reps, per_gpu)))
                log(f"torch context_parallel ({method}): {rows[-1]['total_ms']:.1f} ms")
            except Exception as error:          # noqa: BLE001 (an experimental API: record why it did not run)
                note = f"torch-cp-{method} did not run: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
                notes.append(note)
                rows.append(dict(common, provider=f"torch-cp-{method}", note=note))
                log(note)
            empty_cache()

    # --- one GPU, the whole sequence ------------------------------------------------------------------------------
    q = k = v = do = None                      # free the shards (the closures above hold these names)
    empty_cache()
    dist.barrier()
    if rank == 0:
        qf, kf, vf, dof = full_inputs(n_total, where)
        qf, kf, vf = (t.requires_grad_() for t in (qf, kf, vf))

        def single():
            o = attnpkg.flash_attention(qf, kf, vf, causal=True)
            o.backward(dof)
            qf.grad = kf.grad = vf.grad = None

        single()
        peak1 = peak_bytes(single, everyone=False)
        t1_fwd = timed(lambda: attnpkg.flash_attention(qf, kf, vf, causal=True), warmup, reps, everyone=False)
        t1 = timed(single, warmup, reps, everyone=False)
        o = attnpkg.flash_attention(qf, kf, vf, causal=True)
        o.backward(dof)
        diffs = {f"max_diff_{name}": (gathered[name].float() - ref.float()).abs().max().item()
                 for name, ref in (("o", o), ("dq", qf.grad), ("dk", kf.grad), ("dv", vf.grad))}
        rows.append(dict(common, world_size=1, tokens_per_gpu=n_total, layout="", provider="single-gpu",
                         forward_ms=t1_fwd * 1e3, total_ms=t1 * 1e3, backward_ms=(t1 - t1_fwd) * 1e3,
                         tflops_per_gpu=(flops(n_total, "forward") + flops(n_total, "backward")) / t1 / 1e12,
                         peak_bytes_per_gpu=peak1))
        for r in rows:
            if r["provider"] != "single-gpu" and r.get("total_ms"):
                r["efficiency"] = r["tflops_per_gpu"] / rows[-1]["tflops_per_gpu"]
        rows[0].update(diffs)
        log(f"one GPU {t1 * 1e3:.1f} ms; ring efficiency {rows[0]['efficiency']:.3f}; differences {diffs}")
        del qf, kf, vf, dof, o
    dist.barrier()
    return rows if rank == 0 else None


def torch_context_parallel(method, n_total, warmup, reps, per_gpu):
    """PyTorch's context_parallel around SDPA (its default backend choice), forward + backward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method

    mesh = init_device_mesh(device().type, (dist.get_world_size(),))
    set_rotate_method(method)
    buffers = full_inputs(n_total, device())            # context_parallel shards whole buffers in place
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(buffers)):
        q, k, v = (t.detach().requires_grad_() for t in buffers[:3])
        do = buffers[3]

        def forward():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        def step():
            forward().backward(do)
            q.grad = k.grad = v.grad = None

        step()
        peak = peak_bytes(step)
        t_fwd = timed(forward, warmup, reps)
        t = timed(step, warmup, reps)
    return dict(provider=f"torch-cp-{method}", forward_ms=t_fwd * 1e3, total_ms=t * 1e3,
                backward_ms=(t - t_fwd) * 1e3, tflops_per_gpu=per_gpu(t), peak_bytes_per_gpu=peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, nargs="+", help="numbers of GPUs (default: 2 and 4, those available)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 65536], help="tokens per GPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--no-torch-cp", action="store_true", help="leave out PyTorch's context_parallel")
    parser.add_argument("--quick", action="store_true", help="2 GPUs, 8k tokens per GPU, 3 repeats")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="check this script's plumbing on 2 CPU processes (Gloo, Triton's interpreter), 64 tokens "
                             "each, H=2, D=16; the numbers mean nothing")
    parser.add_argument("--out", default=None, help="folder for the CSV and the log (default benchmarks/<gpu>x<count>)")
    args = parser.parse_args()
    backend, count = "nccl", torch.cuda.device_count()
    if args.cpu_smoke:
        backend, count = "gloo", 2
    elif count < 2:
        sys.exit("benchmarks/ring_attention.py needs at least 2 CUDA GPUs (or --cpu-smoke)")
    gpus = args.gpus or [p for p in (2, 4) if p <= count]
    tokens, reps, warmup = args.tokens, args.reps, args.warmup
    if args.quick:
        gpus, tokens, reps, warmup = [2], [8192], 3, 1
    shape = (B, H, HEAD_DIM)
    if args.cpu_smoke:
        gpus, tokens, reps, warmup, shape = [2], [64], 2, 1, (1, 2, 16)
    env = environment()
    slug = env["gpu"].replace("NVIDIA ", "").split()[0].lower()
    out = Path(args.out or Path(__file__).parent / (f"{slug}x{count}" if not args.cpu_smoke else "cpu-smoke"))
    out.mkdir(parents=True, exist_ok=True)
    header = (f"{env['gpu']} x {count} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
              f"NCCL {env['nccl']} | Python {env['python']} | {env['date']} | {env['backward_kernels']} backward kernels")
    lines = [header, f"B={shape[0]} H={shape[1]} D={shape[2]} bf16 causal zigzag; warmup {warmup}, {reps} repeats (medians)"]
    print("\n".join(lines), flush=True)
    rows = []
    for P in gpus:
        if P > count:
            sys.exit(f"--gpus {P}: this machine has {count} GPUs")
        for n in tokens:
            rows += D.spawn(rank_main, P, n, warmup, reps, not args.no_torch_cp, shape, backend=backend)[0]
    lines.append("")
    lines.append(f"{'provider':28s} {'P':>2} {'n/GPU':>7} {'N':>8} | {'fwd ms':>8} {'total ms':>9} | "
                 f"{'TFLOP/s/GPU':>11} {'eff.':>6} | {'wait f+b ms':>12} {'comm f+b ms':>12} {'GB/s':>6} | {'peak GiB':>8}")
    for r in rows:
        if not r.get("total_ms"):
            lines.append(f"{r['provider']:28s} {r['world_size']:>2} {r['tokens_per_gpu']:>7} {r['seq_len']:>8} | {r.get('note', '')}")
            continue
        f = lambda key, fmt: format(r[key], fmt) if r.get(key) not in (None, "") else "-".rjust(int(fmt.split(".")[0]))
        waits = f"{r['wait_forward_ms']:.1f}+{r['wait_backward_ms']:.1f}" if r.get("wait_forward_ms") is not None else "-"
        comm = f"{r['comm_forward_ms']:.1f}+{r['comm_backward_ms']:.1f}" if r.get("comm_forward_ms") is not None else "-"
        peak = f"{r['peak_bytes_per_gpu'] / 2**30:.2f}" if r.get("peak_bytes_per_gpu") else "-"
        lines.append(f"{r['provider']:28s} {r['world_size']:>2} {r['tokens_per_gpu']:>7} {r['seq_len']:>8} | "
                     f"{f('forward_ms', '8.1f')} {f('total_ms', '9.1f')} | {f('tflops_per_gpu', '11.1f')} "
                     f"{f('efficiency', '6.3f')} | {waits:>12} {comm:>12} {f('comm_gb_per_s', '6.0f')} | {peak:>8}")
    lines.append("")
    for r in rows:
        if r["provider"] == "attnpkg-ring":
            ok = r.get("efficiency", 0) >= 0.85
            lines.append(f"target P={r['world_size']} n={r['tokens_per_gpu']}: ring per-GPU throughput "
                         f"{r.get('efficiency', float('nan')):.3f} x one GPU ({'met' if ok else 'MISSED'}, >= 0.85); "
                         f"largest difference to one GPU: o {r.get('max_diff_o', float('nan')):.3g}, "
                         f"dq {r.get('max_diff_dq', float('nan')):.3g}, dk {r.get('max_diff_dk', float('nan')):.3g}, "
                         f"dv {r.get('max_diff_dv', float('nan')):.3g}")
    text = "\n".join(lines)
    print("\n".join(lines[2:]))
    (out / "ring_attention.log").write_text(text + "\n")
    with open(out / "ring_attention.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({**{key: r.get(key, "") for key in FIELDS}, **env})
    print(f"wrote {out / 'ring_attention.csv'} and {out / 'ring_attention.log'}")


if __name__ == "__main__":
    main()
