"""Host time of attnpkg's launchers at a short sequence, where the host path can be longer than the GPU work.

    python benchmarks/host_profile.py [--n 1024] [--head-dim 128] [--causal]

Times, without synchronising inside the loop, what Python spends per call of ``forward_impl``,
``backward_impl``, ``flash_attention`` and a forward + ``torch.autograd.grad`` (microseconds), then
profiles ``backward_impl`` with cProfile (the functions with the most time of their own). Compare with
the GPU time of the same pass (``python -m attnpkg.bench --case ... --host``, CUDA-graph column).
"""
import argparse
import cProfile
import pstats
import time

import torch

import attnpkg
from attnpkg import attention


def host_us(fn, calls=200):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return elapsed * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args()
    d, causal = args.head_dim, args.causal
    q, k, v = (torch.randn(4, 2048 // d, args.n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    scale = d ** -0.5
    o, lse = attention.forward_impl(q, k, v, causal, scale)
    backward = lambda: attention.backward_impl(do, q, k, v, o, lse, None, causal, scale, True)
    for _ in range(20):                                  # compile and fill the launch cache first
        backward()
        torch.autograd.grad(attnpkg.flash_attention(q, k, v, causal=causal), (q, k, v), do)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | N={args.n} D={d} causal={causal}")
    print(f"forward_impl            {host_us(lambda: attention.forward_impl(q, k, v, causal, scale)):8.1f} us")
    print(f"backward_impl           {host_us(backward):8.1f} us")
    print(f"flash_attention         {host_us(lambda: attnpkg.flash_attention(q, k, v, causal=causal)):8.1f} us")
    both = lambda: torch.autograd.grad(attnpkg.flash_attention(q, k, v, causal=causal), (q, k, v), do)
    print(f"forward + autograd.grad {host_us(both):8.1f} us")
    # Time spent inside backward_impl when the autograd engine calls it (on its own thread), against
    # the same call made directly above.
    inside = []
    real = attention.backward_impl

    in_engine = cProfile.Profile()                # profiles the thread that enables it: the engine's

    def timed(*a, **kw):
        start = time.perf_counter()
        in_engine.enable()
        out = real(*a, **kw)
        in_engine.disable()
        inside.append(time.perf_counter() - start)
        return out
    attention.backward_impl = timed
    host_us(both)
    attention.backward_impl = real
    print(f"  of which backward_impl {sum(inside) / len(inside) * 1e6:8.1f} us (called by the engine, profiled)")
    pstats.Stats(in_engine).sort_stats("tottime").print_stats(12)
    # The backward method called on this thread, without the autograd engine.
    o = attnpkg.flash_attention(q, k, v, causal=causal)
    print(f"grad_fn(do, None)       {host_us(lambda: o.grad_fn.apply(do, None)):8.1f} us")
    # The engine's own cost, on an op with a trivial backward.
    print(f"autograd.grad of q * 2  {host_us(lambda: torch.autograd.grad(q * 2, (q,), do)):8.1f} us")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            both()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    profile_ = cProfile.Profile()
    profile_.enable()
    for _ in range(100):
        backward()
    profile_.disable()
    torch.cuda.synchronize()
    pstats.Stats(profile_).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
