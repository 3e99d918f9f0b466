"""Time attnpkg against another version of itself, in one process on one GPU, interleaved.

A change that should cost nothing (a fix, a refactor) is checked here before the full benchmark:
the base version is imported under another name, and for each case the two are timed in
alternation (``triton.testing.do_bench``, the better median of ``--rounds`` rounds each), so clock
drift and the machine's state affect both alike.

    git archive <commit> attnpkg | tar -x -C /tmp/base
    python benchmarks/compare_base.py /tmp/base/attnpkg            # the --quick cases of attnpkg.bench
    python benchmarks/compare_base.py /tmp/base/attnpkg --case 128,causal,bf16,4096
    python benchmarks/compare_base.py /tmp/base/attnpkg --case 128,causal,bf16,16384 --layout packed-2048
"""
import argparse
import importlib.util
import sys

import torch

import attnpkg
from attnpkg.bench import DTYPES, attention_flops, heads_for, parse_case


def load_base(path, name="attnpkg_base"):
    """The package at ``path`` imported as ``name``, with its own kernels, beside this tree's ``attnpkg``."""
    spec = importlib.util.spec_from_file_location(name, f"{path}/__init__.py", submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def workload(head_dim, n, layout, batch=None):
    """``(batch, heads, sequences, length)`` of one case: the tensors' batch and heads, and the sequences whose
    FLOPs are counted (packed-L: the N / L documents of each row, of L tokens)."""
    default_batch, heads = heads_for(head_dim)
    batch = batch or default_batch
    if layout.startswith("packed-"):
        length = int(layout.split("-")[1])
        return batch, heads, batch * n // length, length
    return batch, heads, batch, n


def times(package, head_dim, causal, dtype, n, layout, batch=None):
    """Forward and backward milliseconds of one package's attention. ``layout``: "bhnd" (contiguous
    (B, H, N, D)), "bnhd" ((B, N, H, D) tensors passed transposed, as SDPA users hold them) or "packed-L"
    (each row of N tokens holds N / L documents of L tokens, through flash_attention_varlen) or "window-W"
    (bhnd, with a window of W - 1 keys left of each query)."""
    from triton.testing import do_bench
    batch, heads, _, length = workload(head_dim, n, layout, batch)
    token_major = layout == "bnhd" or layout.startswith("packed-")
    shape = (batch, n, heads, head_dim) if token_major else (batch, heads, n, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    if layout == "bhnd":
        fn = lambda: package.flash_attention(q, k, v, causal=causal)
    elif layout.startswith("window-"):                # W - 1 keys left of each query (with causal: W keys in all)
        w = int(layout.split("-")[1])
        fn = lambda: package.flash_attention(q, k, v, causal=causal, window_size=(w - 1, -1))
    elif layout == "bnhd":
        fn = lambda: package.flash_attention(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal)
    else:
        cu = torch.arange(0, batch * n + 1, length, device="cuda", dtype=torch.int32)
        fn = lambda: package.flash_attention_varlen(*(x.view(batch * n, heads, head_dim) for x in (q, k, v)),
                                                    cu, cu, length, length, causal=causal)
    o = fn()
    do = torch.randn_like(o)
    fwd = do_bench(fn)
    bwd = do_bench(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
    return fwd, bwd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="folder of the other attnpkg package")
    parser.add_argument("--case", type=parse_case, action="append", help="D,causal|full,bf16|fp16,N (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout", default="bhnd",
                        help="bhnd (default), bnhd, packed-L (documents of L tokens) or window-W (bhnd, W - 1 keys "
                             "left of each query; FLOPs are counted as without the window)")
    parser.add_argument("--batch", type=int, help="batch size (default: 4, as attnpkg.bench)")
    args = parser.parse_args(argv)
    base = load_base(args.base)
    cases = args.case or [(d, c, "bf16", n) for d in (64, 128) for c in (False, True) for n in (1024, 4096, 16384)]
    print(f"{'case':28} {'fwd new/base':>13} {'bwd new/base':>13}   TFLOP/s fwd new, base | bwd new, base")
    worst = {"forward": [], "backward": []}
    for head_dim, causal, dtype_name, n in cases:
        best = {}
        for _ in range(args.rounds):
            for name, package in (("new", attnpkg), ("base", base)):
                f, b = times(package, head_dim, causal, DTYPES[dtype_name], n, args.layout, args.batch)
                old = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(old[0], f), min(old[1], b))
        _, heads, sequences, length = workload(head_dim, n, args.layout, args.batch)
        tf = lambda ms, mode: attention_flops(sequences, heads, length, head_dim, causal, mode) / ms / 1e9
        ratio_f = best["base"][0] / best["new"][0]
        ratio_b = best["base"][1] / best["new"][1]
        worst["forward"].append(ratio_f)
        worst["backward"].append(ratio_b)
        label = f"D{head_dim} {'causal' if causal else 'full'} {dtype_name} N={n} {args.layout}"
        print(f"{label:28} {ratio_f:13.3f} {ratio_b:13.3f}   {tf(best['new'][0], 'forward'):6.0f} "
              f"{tf(best['base'][0], 'forward'):6.0f} | {tf(best['new'][1], 'backward'):6.0f} "
              f"{tf(best['base'][1], 'backward'):6.0f}", flush=True)
    for mode, ratios in worst.items():
        print(f"{mode}: speed new/base min {min(ratios):.3f}, geometric mean "
              f"{torch.tensor(ratios).log().mean().exp().item():.3f}")


if __name__ == "__main__":
    main()
