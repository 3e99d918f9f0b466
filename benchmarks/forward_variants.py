"""Time the forward pass of attnpkg variants in one process on one GPU, interleaved: other copies of the package
(``git archive <commit> attnpkg | tar -x -C /tmp/<name>``) and tile configurations of the D = 128 forward.

    python benchmarks/forward_variants.py --package base=/tmp/base/attnpkg --package b=/tmp/b/attnpkg
    python benchmarks/forward_variants.py --tiles 128,128,8,3 --tiles 64,64,4,2 --tiles 128,64,8,2,128

Cases: the mask cases of ``python -m attnpkg.bench --masks`` (B 4, H 16, N 16k, D 128, bf16; eager time, as that
benchmark takes it) and dense ones (CUDA-graph time, the GPU alone). Each variant's output is checked against the
first variant's; each time is the best median of ``--rounds`` interleaved rounds; speeds are TFLOP/s on visible pairs
and, in brackets, relative to the first variant.
"""
import argparse

import torch

import attnpkg
from attnpkg import attention
from attnpkg.bench import MASK_CASES, MASK_SHAPE, visible_pairs
from compare_base import load_base    # benchmarks/, beside this file

DENSE_CASES = ((128, True, 1024), (128, False, 1024), (128, True, 4096), (128, False, 4096), (128, True, 16384),
               (128, False, 16384), (64, True, 1024), (64, False, 1024), (64, True, 16384), (64, False, 16384))


def with_tiles(fn, tiles):
    """``fn`` run with the D = 128 forward's tiles replaced by ``tiles`` (None: the table's own)."""
    table = attention.HOPPER_TILES["forward"]

    def run():
        saved = dict(table)
        if tiles is not None:
            table[(128, True)] = table[(128, False)] = tiles
        try:
            return fn()
        finally:
            table.update(saved)
    return run


def mask_case(case, package):
    """(forward of ``package``, visible-pair FLOPs) for one of the mask cases."""
    batch, heads, n, head_dim = (MASK_SHAPE[key] for key in ("batch", "heads", "n", "head_dim"))
    if case.startswith("dense-"):
        batch, n = map(int, case.split("-")[1].split("x"))
    packed = case.startswith("packed-")
    shape = (batch, n, heads, head_dim) if packed else (batch, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    if case.startswith("window-"):
        w = int(case.split("-")[1])
        fn = lambda: package.flash_attention(q, k, v, causal=True, window_size=(w - 1, 0))
    elif packed:
        length = int(case.split("x")[1])
        cu = torch.arange(0, batch * n + 1, length, device="cuda", dtype=torch.int32)
        fn = lambda: package.flash_attention_varlen(*(t.view(batch * n, heads, head_dim) for t in (q, k, v)),
                                                    cu, cu, length, length, causal=True)
    else:
        fn = lambda: package.flash_attention(q, k, v, causal=True)
    return fn, 4 * batch * heads * head_dim * visible_pairs(case, n)


def dense_case(head_dim, causal, n, package):
    batch, heads = 4, 2048 // head_dim
    q, k, v = (torch.randn(batch, heads, n, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    return (lambda: package.flash_attention(q, k, v, causal=causal),
            4 * batch * heads * n * n * head_dim * (0.5 if causal else 1.0))


def main(argv=None):
    from triton.testing import do_bench, do_bench_cudagraph
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", action="append", default=[], help="NAME=PATH of another attnpkg (repeatable)")
    parser.add_argument("--tiles", action="append", default=[],
                        help="BLOCK_M,BLOCK_N,WARPS,STAGES[,MAXNREG] for the D = 128 forward, with TMA (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", help="run only the cases whose label contains this text")
    args = parser.parse_args(argv)
    variants = {"tree": (attnpkg, None)} if not args.tiles else {}
    for item in args.package:
        name, path = item.split("=", 1)
        variants[name] = (load_base(path, f"attnpkg_{name}"), None)
    for item in args.tiles:
        m, n, warps, stages, *cap = map(int, item.split(","))
        variants[item] = (attnpkg, attention.Tiles(m, n, warps, stages, tma=True, max_registers=cap[0] if cap else 0))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | variants: {', '.join(variants)}", flush=True)
    cases = [(case, "eager", lambda p, c=case: mask_case(c, p)) for case in MASK_CASES]
    cases += [(f"D{d} {'causal' if c else 'full'} N={n}", "graph", lambda p, d=d, c=c, n=n: dense_case(d, c, n, p))
              for d, c, n in DENSE_CASES]
    for label, how, make in cases:
        if args.only and args.only not in label:
            continue
        torch.manual_seed(0)
        fns = {}
        for name, (package, tiles) in variants.items():
            torch.manual_seed(0)                       # the same inputs for every variant
            fn, flops = make(package)
            fns[name] = with_tiles(fn, tiles)
        first = next(iter(fns))
        want = fns[first]().float()
        for name, fn in fns.items():
            error = (fn().float() - want).abs().max().item()
            if not error < 2e-2:
                raise AssertionError(f"{name} differs from {first} by {error} on {label}")
        best = {}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                ms = (do_bench(fn, warmup=25, rep=100, return_mode="median") if how == "eager"
                      else do_bench_cudagraph(fn, rep=100, return_mode="median"))
                best[name] = min(ms, best.get(name, ms))
        line = f"{label:18s} {how}  " + "  ".join(f"{name} {flops / ms / 1e9:5.0f} ({best[first] / ms:.3f})"
                                                 for name, ms in best.items())
        print(line, flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
