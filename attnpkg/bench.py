"""Benchmark attnpkg.flash_attention against torch's SDPA backends: ``python -m attnpkg.bench``.

Everything is measured in one process and one run, forward and backward separately, with CUDA
events (``triton.testing.do_bench``: median of many repeats after warm-up, L2 flushed between
repeats), on fresh random inputs, after checking attnpkg's output against SDPA's. Each case is
measured in two interleaved rounds over all providers, and each keeps its better median. FLOPs are
counted as ``4 B H N^2 D`` for the forward pass (halved when causal) and 2.5 times that for the
backward pass. Prints a table of TFLOP/s and of the ratio attnpkg / each backend, and writes
a CSV and plots. Without a CUDA GPU it says so and exits.

    python -m attnpkg.bench                 # the full sweep (about 10 minutes on an H100)
    python -m attnpkg.bench --quick         # N in {1k, 4k, 16k}, bf16 (a couple of minutes)
    python -m attnpkg.bench --case 128,causal,bf16,8192
    python -m attnpkg.bench --memory        # also peak memory of forward + backward against N
    python -m attnpkg.bench --gqa           # also grouped- and multi-query cases
    python -m attnpkg.bench --host          # also eager against CUDA-graph time: what the host costs
    python -m attnpkg.bench --masks         # only the mask cases against FlexAttention, and the window sweep
"""
import argparse
import csv
import datetime
import itertools
import os
import platform
import sys

import torch

# attnpkg: flash_attention with deterministic=False (on Hopper GPUs with the tested Triton, head dim 128: the
# five-product Gluon backward of attnpkg.hopper; elsewhere the two-kernel one); attnpkg-deterministic: with
# deterministic=True (the two-kernel backward everywhere; the same forward pass).
PROVIDERS = ("attnpkg", "attnpkg-deterministic", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
ROUNDS = 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def heads_for(head_dim):
    """Batch 4 and 2048 model width: 32 heads of 64, 16 heads of 128."""
    return 4, 2048 // head_dim


def attention_flops(batch, heads, n, head_dim, causal, mode):
    flops = 4 * batch * heads * n * n * head_dim * (0.5 if causal else 1.0)
    return flops * (2.5 if mode == "backward" else 1.0)


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    chosen = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
              "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                    enable_gqa=q.shape[1] != k.shape[1])
    return run


def _attnpkg(deterministic):
    import attnpkg
    return lambda q, k, v, causal: attnpkg.flash_attention(q, k, v, causal=causal, deterministic=deterministic)


def _provider(name):
    """fn(q, k, v, causal) -> o for one provider."""
    return _attnpkg(name == "attnpkg-deterministic") if name.startswith("attnpkg") else _sdpa(name)


def measure(provider, head_dim, causal, dtype, n, check_against=None, heads=None):
    """Median milliseconds of the forward and of the backward pass, or None if unsupported.
    ``heads``: (batch, query heads, key/value heads) instead of the default shape."""
    from triton.testing import do_bench
    batch, hq, hkv = heads or (*heads_for(head_dim), heads_for(head_dim)[1])
    fn = _provider(provider)
    q = torch.randn(batch, hq, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, hkv, n, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    try:
        o = fn(q, k, v, causal)
    except RuntimeError:        # the backend does not support this case
        return None, None, None
    if check_against is not None:
        error = (o.float() - check_against(q, k, v, causal).float()).abs().max().item()
        if not error < 2e-2:
            raise AssertionError(f"{provider} differs from SDPA by {error} at D={head_dim} causal={causal} N={n}")
    do = torch.randn_like(o)
    forward_ms = do_bench(lambda: fn(q, k, v, causal), warmup=25, rep=100, return_mode="median")
    backward_ms = do_bench(lambda: o.backward(do, retain_graph=True), warmup=25, rep=100,
                           grad_to_none=[q, k, v], return_mode="median")
    return forward_ms, backward_ms, o


MEMORY_PROVIDERS = ("attnpkg", "attnpkg-deterministic", "materialised")


def measure_memory(provider, n, head_dim=128, heads=16, batch=1, dtype=torch.bfloat16):
    """Peak memory allocated by one forward plus backward pass, beyond the inputs (bytes), or None if it does not fit."""
    import attnpkg
    fn = (lambda q, k, v: attnpkg.reference.attention(q, k, v, causal=True)) if provider == "materialised" else \
        (lambda q, k, v: _provider(provider)(q, k, v, True))
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn(q, k, v).backward(do)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    except torch.OutOfMemoryError:
        return None
    finally:
        del q, k, v, do
        torch.cuda.empty_cache()


def backward_pass(provider, n, head_dim=128, heads=16, batch=1, dtype=torch.bfloat16):
    """The backward pass that ``provider`` runs on the memory runs' shapes: ``attention.backward_pass`` for attnpkg,
    ``"autograd"`` for the materialised reference."""
    if provider == "materialised":
        return "autograd"
    from attnpkg.attention import backward_pass as chosen
    q = torch.empty(batch, heads, n, head_dim, device="cuda", dtype=dtype)
    return chosen(q, q, causal=True, deterministic=provider == "attnpkg-deterministic")


def run_memory(out_dir, lengths=(1024, 2048, 4096, 8192, 16384)):
    for provider in MEMORY_PROVIDERS:      # warm-up: cuBLAS allocates its workspace on first use
        measure_memory(provider, 256)
    rows = []
    for n in lengths:
        for provider in MEMORY_PROVIDERS:
            peak = measure_memory(provider, n)
            rows.append(dict(n=n, head_dim=128, heads=16, batch=1, dtype="bf16", causal=True, provider=provider,
                             backward=backward_pass(provider, n), peak_bytes=peak))
        print(f"memory N={n:<6} " + "  ".join(
            f"{r['provider']} ({r['backward']}) " + (f"{r['peak_bytes'] / 2**20:9.1f} MiB" if r["peak_bytes"]
                                                     else "out of memory") for r in rows[-len(MEMORY_PROVIDERS):]),
            flush=True)
    print(f"wrote {write_record(out_dir, 'memory.csv', rows)}")
    return rows


def matmul_ceiling():
    from triton.testing import do_bench
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    return 2 * 8192**3 / ms / 1e9


def environment():
    import triton
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "cudnn": str(torch.backends.cudnn.version()),
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def write_record(out_dir, name, rows, **extra):
    """Write ``rows`` to ``out_dir/name`` as CSV, each row carrying the machine, the versions and the
    date (and any ``extra`` columns): a record says where and when it was measured. Returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    stamp = {**environment(), **extra}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + list(stamp))
        writer.writeheader()
        writer.writerows({**row, **stamp} for row in rows)
    return path


def run(cases, out_dir, plot=True):
    env = environment()
    ceiling = matmul_ceiling()
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | cuDNN {env['cudnn']} | {env['date']}")
    print(f"bf16 8192^3 matrix product: {ceiling:.0f} TFLOP/s (the ceiling)")
    rows = []
    for head_dim, causal, dtype_name, n in cases:
        dtype = DTYPES[dtype_name]
        batch, heads = heads_for(head_dim)
        reference = _sdpa("sdpa-flash")
        # Two interleaved rounds over the providers, keeping each one's better median: clocks and
        # power drift over a long run, and interleaving spreads that drift over all of them.
        best = {}
        for _ in range(ROUNDS):
            for provider in PROVIDERS:
                fwd, bwd, _ = measure(provider, head_dim, causal, dtype, n,
                                      check_against=reference if provider == "attnpkg" else None)
                for mode, ms in (("forward", fwd), ("backward", bwd)):
                    if ms and (provider, mode) in best:
                        ms = min(ms, best[provider, mode])
                    best[provider, mode] = ms
                torch.cuda.empty_cache()
        for provider in PROVIDERS:
            for mode in ("forward", "backward"):
                ms = best[provider, mode]
                tflops = attention_flops(batch, heads, n, head_dim, causal, mode) / ms / 1e9 if ms else None
                rows.append(dict(head_dim=head_dim, causal=causal, dtype=dtype_name, n=n, batch=batch, heads=heads,
                                 provider=provider, mode=mode, ms=ms, tflops=tflops))
        print(_case_line(rows, head_dim, causal, dtype_name, n), flush=True)
        write_record(out_dir, "attention.csv", rows, matmul_tflops=round(ceiling, 1))   # kept if a later case fails
    print(f"\nwrote {os.path.join(out_dir, 'attention.csv')}")
    if plot:
        _plot(rows, env, out_dir)
    print(summary_table(rows))
    return rows


def host_and_gpu_time(provider, head_dim, causal, dtype, n):
    """Milliseconds of the forward and of the backward pass measured two ways: eagerly (host and GPU,
    as a training loop runs them) and replayed from a CUDA graph (GPU only: no Python, no launch cost).
    Their difference is what the host adds where it cannot keep ahead of the GPU."""
    from triton.testing import do_bench, do_bench_cudagraph
    batch, heads = heads_for(head_dim)
    fn = _provider(provider)
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    forward = lambda: fn(q, k, v, causal)
    # A CUDA graph can only hold a backward pass whose forward it holds too (autograd runs the
    # backward on the forward's stream), so the backward is timed as forward + backward - forward.
    both = lambda: torch.autograd.grad(fn(q, k, v, causal), (q, k, v), do)
    times = {}
    for how, bench in (("eager", lambda f: do_bench(f, warmup=25, rep=100, return_mode="median")),
                       ("graph", lambda f: do_bench_cudagraph(f, rep=100, return_mode="median"))):
        try:
            fwd, total = bench(forward), bench(both)
            times["forward", how], times["backward", how] = fwd, total - fwd
        except Exception as error:         # a backend that cannot be captured: say so, go on
            print(f"  {provider}: no {how} timing ({type(error).__name__}: {error})")
            times["forward", how] = times["backward", how] = None
    return times


def run_host(cases, providers=("attnpkg", "sdpa-cudnn")):
    """Eager and CUDA-graph times side by side: where the eager time is larger, the host is the limit."""
    print("\nhost and GPU time (ms): eager | CUDA graph (GPU alone) | eager - graph")
    rows = []
    for head_dim, causal, dtype_name, n in cases:
        for provider in providers:
            times = host_and_gpu_time(provider, head_dim, causal, DTYPES[dtype_name], n)
            for mode in ("forward", "backward"):
                eager, graph = times[mode, "eager"], times[mode, "graph"]
                rows.append(dict(head_dim=head_dim, causal=causal, dtype=dtype_name, n=n, provider=provider,
                                 mode=mode, eager_ms=eager, graph_ms=graph))
                show = lambda ms: f"{ms:7.3f}" if ms is not None else "      -"
                gap = eager - graph if eager is not None and graph is not None else None
                print(f"D{head_dim} {'causal' if causal else 'full  '} {dtype_name} N={n:<5} {provider:<14} {mode:<8} "
                      f"{show(eager)} | {show(graph)} | {show(gap)}", flush=True)
    return rows


GQA_CASES = [(1, 32, hkv, 4096, 128) for hkv in (32, 8, 1)]   # (B, Hq, Hkv, N, D): full width to multi-query


def run_gqa(out_dir, causal_flags=(False, True), dtype_name="bf16"):
    """Grouped-query and multi-query attention at one query width: TFLOP/s should not drop with Hkv."""
    rows = []
    print(f"\ngrouped-query: TFLOP/s by provider ({', '.join(PROVIDERS[:4])}), {dtype_name}")
    for (batch, hq, hkv, n, head_dim), causal in itertools.product(GQA_CASES, causal_flags):
        best = {}
        for _ in range(ROUNDS):
            for provider in PROVIDERS[:4]:
                fwd, bwd, _ = measure(provider, head_dim, causal, DTYPES[dtype_name], n, heads=(batch, hq, hkv))
                for mode, ms in (("forward", fwd), ("backward", bwd)):
                    old = best.get((provider, mode))
                    best[provider, mode] = min(ms, old) if ms and old else (ms or old)
                torch.cuda.empty_cache()
        line = []
        for mode in ("forward", "backward"):
            values = []
            for provider in PROVIDERS[:4]:
                ms = best[provider, mode]
                tflops = attention_flops(batch, hq, n, head_dim, causal, mode) / ms / 1e9 if ms else None
                rows.append(dict(batch=batch, heads=hq, kv_heads=hkv, n=n, head_dim=head_dim, causal=causal,
                                 dtype=dtype_name, provider=provider, mode=mode, ms=ms, tflops=tflops))
                values.append(f"{tflops:6.1f}" if tflops else "     -")
            line.append(mode[:3] + " " + " ".join(values))
        print(f"B={batch} Hq={hq} Hkv={hkv:<2} N={n} D={head_dim} {'causal' if causal else 'full  '}  " + "  ".join(line),
              flush=True)
    write_record(out_dir, "gqa.csv", rows)
    return rows


# Mask cases against FlexAttention (torch.nn.attention.flex_attention, compiled, with the block mask
# of the same pattern). FLOPs are counted on visible (query, key) pairs only.
MASK_SHAPE = dict(batch=4, heads=16, n=16384, head_dim=128)
MASK_CASES = ("causal", "window-4096", "packed-8x2048", "dense-32x2048")
SWEEP_LENGTHS = (2048, 4096, 8192, 16384, 32768)


def visible_pairs(case, n):
    """Visible (query, key) pairs of one (batch, head) row of ``n`` tokens."""
    if case == "causal":
        return n * (n + 1) // 2
    if case.startswith("window-"):
        w = int(case.split("-")[1])
        return sum(min(i + 1, w) for i in range(n))
    if case.startswith("packed-") or case.startswith("dense-"):
        docs, length = map(int, case.split("-")[1].split("x"))
        return (n // length) * length * (length + 1) // 2
    raise ValueError(case)


def _mask_providers(case, batch, heads, n, head_dim):
    """{provider: fn(x, y, z) -> o} for one mask case, and the layout both take: "bhnd" (dense (B, H, N, D)
    tensors) or "bnhd" (packed: (B, N, H, D) tensors, which flash_attention_varlen reads as (B * N, H, D)
    and FlexAttention as (B, H, N, D) views, with no copy for either)."""
    import attnpkg
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    layout = "bhnd"
    if case == "causal":
        mask_mod = lambda b, h, q, kv: q >= kv
        ours = lambda q, k, v: attnpkg.flash_attention(q, k, v, causal=True)
    elif case.startswith("window-"):
        w = int(case.split("-")[1])
        mask_mod = lambda b, h, q, kv: (q >= kv) & (q - kv < w)
        ours = lambda q, k, v: attnpkg.flash_attention(q, k, v, causal=True, window_size=(w - 1, 0))
    elif case.startswith("packed-"):
        layout = "bnhd"
        docs, length = map(int, case.split("-")[1].split("x"))
        doc = torch.arange(n, device="cuda") // length
        mask_mod = lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)
        cu = torch.arange(0, batch * n + 1, length, device="cuda", dtype=torch.int32)
        ours = lambda q, k, v: attnpkg.flash_attention_varlen(
            *(t.view(batch * n, heads, head_dim) for t in (q, k, v)), cu, cu, length, length, causal=True)
    elif case.startswith("dense-"):       # the packed case's documents as a dense batch: no mask between them
        mask_mod = lambda b, h, q, kv: q >= kv
        ours = lambda q, k, v: attnpkg.flash_attention(q, k, v, causal=True)
    else:
        raise ValueError(case)
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device="cuda")
    if layout == "bnhd":
        theirs = lambda q, k, v: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask)
    else:
        theirs = lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    return {"attnpkg": ours, "flex": theirs}, layout


def _shape_of(case):
    shape = dict(MASK_SHAPE)
    if case.startswith("dense-"):
        docs, length = map(int, case.split("-")[1].split("x"))
        shape.update(batch=docs, n=length)
    return shape


def run_masks(out_dir, dtype_name="bf16"):
    """Causal, a causal sliding window of 4096 keys, 8 packed causal documents of 2048 per row (attnpkg:
    flash_attention_varlen), and the same 32 documents as a dense batch, B=4 H=16 D=128 N=16384:
    forward and backward TFLOP/s on visible pairs, attnpkg against FlexAttention."""
    from triton.testing import do_bench
    # Compiled FlexAttention donates its saved buffers to the backward unless told otherwise, which
    # forbids running one backward repeatedly (retain_graph) as the timing below does.
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    dtype = DTYPES[dtype_name]
    rows = []
    print(f"\nmasks ({dtype_name}, TFLOP/s on visible pairs): case, attnpkg fwd / flex fwd, attnpkg bwd / flex bwd")
    for case in MASK_CASES:
        shape = _shape_of(case)
        batch, heads, n, head_dim = shape["batch"], shape["heads"], shape["n"], shape["head_dim"]
        providers, layout = _mask_providers(case, batch, heads, n, head_dim)
        shape_in = (batch, heads, n, head_dim) if layout == "bhnd" else (batch, n, heads, head_dim)
        q, k, v = (torch.randn(shape_in, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        outputs = {name: fn(q, k, v) for name, fn in providers.items()}
        as_bhnd = lambda o: o if layout == "bhnd" or o.shape == shape_in[:1] + (heads, n, head_dim) else \
            o.reshape(batch, n, heads, head_dim).transpose(1, 2)
        error = (as_bhnd(outputs["attnpkg"]).float() - as_bhnd(outputs["flex"]).float()).abs().max().item()
        if not error < 2e-2:
            raise AssertionError(f"attnpkg differs from FlexAttention by {error} on {case}")
        grads_out = {name: torch.randn_like(o) for name, o in outputs.items()}
        flops = 4 * batch * heads * head_dim * visible_pairs(case, n)
        best = {}
        for _ in range(ROUNDS):
            for name, fn in providers.items():
                o, do = fn(q, k, v), grads_out[name]
                fwd = do_bench(lambda: fn(q, k, v), warmup=25, rep=100, return_mode="median")
                bwd = do_bench(lambda: o.backward(do, retain_graph=True), warmup=25, rep=100, grad_to_none=[q, k, v],
                               return_mode="median")
                for mode, ms in (("forward", fwd), ("backward", bwd)):
                    best[name, mode] = min(ms, best.get((name, mode), ms))
        for (name, mode), ms in best.items():
            rows.append(dict(case=case, **shape, dtype=dtype_name, provider=name, mode=mode, ms=ms,
                             tflops=flops * (2.5 if mode == "backward" else 1.0) / ms / 1e9))
        t = {(r["provider"], r["mode"]): r["tflops"] for r in rows if r["case"] == case}
        print(f"{case:15s} fwd {t['attnpkg', 'forward']:6.1f} / {t['flex', 'forward']:6.1f} "
              f"({t['attnpkg', 'forward'] / t['flex', 'forward']:.2f}x)   bwd {t['attnpkg', 'backward']:6.1f} / "
              f"{t['flex', 'backward']:6.1f} ({t['attnpkg', 'backward'] / t['flex', 'backward']:.2f}x)", flush=True)
        del q, k, v, outputs, providers
        torch.cuda.empty_cache()
    write_record(out_dir, "masks.csv", rows)
    return rows


def run_window_sweep(out_dir, window=4096, dtype_name="bf16", plot=True):
    """attnpkg's time against N for causal attention and a causal window: the window's grows like
    N x window, causal's like N^2 (B=1, H=16, D=128)."""
    import attnpkg
    from triton.testing import do_bench
    rows = []
    print(f"\nwindow sweep (B=1 H=16 D=128 {dtype_name}): ms forward / backward")
    for n in SWEEP_LENGTHS:
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=DTYPES[dtype_name], requires_grad=True)
                   for _ in range(3))
        for name, options in (("causal", dict(causal=True)), (f"window-{window}", dict(causal=True, window_size=(window - 1, 0)))):
            o = attnpkg.flash_attention(q, k, v, **options)
            do = torch.randn_like(o)
            fwd = do_bench(lambda: attnpkg.flash_attention(q, k, v, **options), warmup=25, rep=100, return_mode="median")
            bwd = do_bench(lambda: o.backward(do, retain_graph=True), warmup=25, rep=100, grad_to_none=[q, k, v],
                           return_mode="median")
            rows.append(dict(case=name, n=n, forward_ms=fwd, backward_ms=bwd))
            print(f"N={n:6d} {name:12s} {fwd:8.3f} / {bwd:8.3f}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    write_record(out_dir, "window_sweep.csv", rows)
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["case"] for r in rows):
            pts = [r for r in rows if r["case"] == name]
            ax.loglog([r["n"] for r in pts], [r["forward_ms"] + r["backward_ms"] for r in pts], "o-", label=name)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("forward + backward (ms)")
        ax.set_title(f"{environment()['gpu']}: a window costs N x window")
        ax.legend()
        fig.savefig(os.path.join(out_dir, "window_sweep.png"), dpi=120, bbox_inches="tight")
    return rows


def _lookup(rows, provider, mode, **case):
    for r in rows:
        if r["provider"] == provider and r["mode"] == mode and all(r[key] == value for key, value in case.items()):
            return r["tflops"]
    return None


def _case_line(rows, head_dim, causal, dtype_name, n):
    case = dict(head_dim=head_dim, causal=causal, dtype=dtype_name, n=n)
    parts = []
    for mode in ("forward", "backward"):
        values = [_lookup(rows, p, mode, **case) for p in PROVIDERS]
        parts.append(mode[:3] + " " + " ".join(f"{v:6.1f}" if v else "     -" for v in values))
    return f"D{head_dim:<3} {'causal' if causal else 'full  '} {dtype_name} N={n:<5}  " + "  ".join(parts)


def summary_table(rows):
    """TFLOP/s of attnpkg (both backward modes) and its ratio to each SDPA backend, one line per case and pass."""
    sdpa = [p for p in PROVIDERS if p.startswith("sdpa")]
    lines = ["", "TFLOP/s of attnpkg, and attnpkg / backend (higher is better; deterministic: the two-kernel backward)",
             f"{'case':<30} {'pass':<12} {'TFLOP/s':>8} " + " ".join(f"{'/' + p[5:]:>10}" for p in sdpa)]
    seen = []
    for r in rows:
        key = (r["head_dim"], r["causal"], r["dtype"], r["n"], r["mode"], r["provider"])
        if key in seen or not r["provider"].startswith("attnpkg") or not r["tflops"]:
            continue
        if r["provider"] == "attnpkg-deterministic" and r["mode"] == "forward":    # the same forward pass
            continue
        seen.append(key)
        case = dict(head_dim=r["head_dim"], causal=r["causal"], dtype=r["dtype"], n=r["n"])
        ratios = []
        for p in sdpa:
            other = _lookup(rows, p, r["mode"], **case)
            ratios.append(f"{r['tflops'] / other:10.2f}" if other else f"{'-':>10}")
        name = f"D{r['head_dim']} {'causal' if r['causal'] else 'full'} {r['dtype']} N={r['n']}"
        mode = r["mode"] + (" determ." if r["provider"] == "attnpkg-deterministic" else "")
        lines.append(f"{name:<30} {mode:<12} {r['tflops']:8.1f} " + " ".join(ratios))
    return "\n".join(lines)


def _plot(rows, env, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({(r["head_dim"], r["causal"], r["dtype"]) for r in rows})
    for mode in ("forward", "backward"):
        fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.4), squeeze=False)
        for ax, (head_dim, causal, dtype_name) in zip(axes[0], groups):
            for provider in PROVIDERS:
                points = sorted((r["n"], r["tflops"]) for r in rows if r["provider"] == provider and r["mode"] == mode
                                and (r["head_dim"], r["causal"], r["dtype"]) == (head_dim, causal, dtype_name) and r["tflops"])
                if points:
                    ax.plot(*zip(*points), marker="o", label=provider)
            ax.set(xscale="log", xlabel="sequence length N", ylabel="TFLOP/s",
                   title=f"{mode}, D={head_dim}, {'causal' if causal else 'full'}, {dtype_name}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"attention_{mode}.png"), dpi=110)
        plt.close(fig)


def parse_case(text):
    head_dim, causal, dtype_name, n = text.split(",")
    if causal not in ("causal", "full") or dtype_name not in DTYPES:
        raise argparse.ArgumentTypeError("--case D,causal|full,bf16|fp16,N")
    return int(head_dim), causal == "causal", dtype_name, int(n)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnpkg.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N in {1k, 4k, 16k}, bf16 only")
    parser.add_argument("--case", type=parse_case, action="append", help="one case: D,causal|full,bf16|fp16,N (repeatable)")
    parser.add_argument("--out", default="bench-results", help="folder for the CSV and the plots")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--host", action="store_true",
                        help="also eager against CUDA-graph times (host cost) for attnpkg and cuDNN at the chosen cases")
    parser.add_argument("--gqa", action="store_true", help="also grouped- and multi-query cases (B=1, Hq=32, N=4k, D=128)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory of forward + backward, flash against materialised, N = 1k..16k")
    parser.add_argument("--masks", action="store_true",
                        help="only the mask cases (causal, window, packed documents) against FlexAttention, "
                             "and the window-cost sweep")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("python -m attnpkg.bench: no CUDA GPU here, nothing to measure "
              "(the kernels run on the CPU only through Triton's interpreter, which is not for timing).")
        return 0
    if args.masks:
        env = environment()
        print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | {env['date']}")
        run_masks(args.out)
        run_window_sweep(args.out, plot=not args.no_plot)
        return 0
    if args.case:
        cases = args.case
    else:
        lengths = (1024, 4096, 16384) if args.quick else (1024, 2048, 4096, 8192, 16384)
        dtypes = ("bf16",) if args.quick else ("bf16", "fp16")
        cases = [(d, c, t, n) for t in dtypes for d in (64, 128) for c in (False, True) for n in lengths]
    run(cases, args.out, plot=not args.no_plot)
    if args.host:
        run_host(cases)
    if args.gqa:
        run_gqa(args.out)
    if args.memory:
        run_memory(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
