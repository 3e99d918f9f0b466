"""Measure candidate tile configurations of each attention kernel on this GPU.

    python benchmarks/sweep_tiles.py [--n 8192] [--dtype bf16] > sweep.txt

For each kernel (forward, dkdv, dq, fused: the five-product backward), head dim (64, 128) and causal flag it times every candidate
in ``CANDIDATES`` with the others at their table values, and prints TFLOP/s per candidate and
the best one: the numbers behind ``attnpkg.attention.HOPPER_TILES`` (see NOTES.md).
"""
import argparse
import itertools

import torch
from triton.testing import do_bench

from attnpkg import attention
from attnpkg.bench import attention_flops, heads_for

T = attention.Tiles
CANDIDATES = {
    "forward": [T(128, 64, 8, 3), T(128, 128, 8, 3), T(128, 64, 8, 4), T(128, 128, 8, 3, True),
                T(128, 64, 8, 3, False, True), T(128, 128, 8, 3, False, True), T(128, 64, 8, 4, False, True),
                T(128, 128, 8, 2, False, True), T(128, 128, 8, 3, True, True), T(128, 64, 8, 3, True, True),
                T(128, 64, 8, 5, False, True), T(64, 128, 4, 3, False, True), T(128, 128, 8, 2, True, True)],
    "dkdv": [T(128, 64, 8, 3), T(128, 32, 4, 3), T(128, 64, 4, 3), T(64, 64, 4, 3), T(128, 128, 8, 2),
             T(64, 128, 4, 3), T(128, 32, 8, 3), T(64, 32, 4, 3)],
    # The five-product kernel, dQ added as bulk tile reductions (tma; element-by-element atomics lost in
    # earlier sweeps, `h200/sweep_fused*.log`).
    "fused": [T(128, 64, 8, 3, tma=True), T(128, 32, 4, 3, tma=True), T(128, 64, 8, 2, tma=True)],
    # tma: the streamed K, V tiles through tensor descriptors.
    "dq": [T(128, 128, 8, 2), T(128, 128, 8, 2, tma=True), T(128, 64, 8, 3), T(128, 64, 8, 3, tma=True),
           T(128, 128, 8, 3, tma=True)],
}


def time_kernel(kernel, tiles, head_dim, causal, dtype, n):
    batch, heads = heads_for(head_dim)
    q, k, v, do = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=dtype) for _ in range(4))
    scale = head_dim ** -0.5
    table = attention.tiles_for
    attention.tiles_for = lambda name, *a: tiles if name == kernel else table(name, *a)
    try:
        o, lse = attention.forward_impl(q, k, v, causal, scale)
        if kernel == "forward":
            ms = do_bench(lambda: attention.forward_impl(q, k, v, causal, scale), warmup=25, rep=100, return_mode="median")
            return attention_flops(batch, heads, n, head_dim, causal, "forward") / ms / 1e9
        deterministic = kernel != "fused"        # dkdv and dq: the deterministic two-kernel pass
        attention.FUSED_BACKWARD = kernel == "fused"
        ms = do_bench(lambda: attention.backward_impl(do, q, k, v, o, lse, None, causal, scale, deterministic),
                      warmup=25, rep=100, return_mode="median")
        return attention_flops(batch, heads, n, head_dim, causal, "backward") / ms / 1e9
    except Exception as error:          # out of shared memory or registers: not a candidate here
        return f"{type(error).__name__}"
    finally:
        attention.tiles_for = table
        attention.FUSED_BACKWARD = False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--kernels", default="forward,dkdv,dq")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--causal", default="full,causal")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    print(f"{torch.cuda.get_device_name()} N={args.n} {args.dtype} (backward TFLOP/s: whole backward, one kernel varied)")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    flags = [c == "causal" for c in args.causal.split(",")]
    for kernel, head_dim, causal in itertools.product(args.kernels.split(","), head_dims, flags):
        results = [(time_kernel(kernel, t, head_dim, causal, dtype, args.n), t) for t in CANDIDATES[kernel]]
        show = lambda t: ",".join(str(int(x)) for x in t)
        line = "  ".join(f"{show(t)}:{r:.0f}" if isinstance(r, float) else f"{show(t)}:{r}" for r, t in results)
        best = max((r, t) for r, t in results if isinstance(r, float))
        print(f"{kernel:7} D{head_dim} {'causal' if causal else 'full  '} best {show(best[1])} {best[0]:.0f} | {line}", flush=True)


if __name__ == "__main__":
    main()
