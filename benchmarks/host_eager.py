"""Eager and CUDA-graph time of the backward pass at short lengths: the Gluon kernel of attnpkg.hopper against the
two-kernel pass (hopper.ENABLED = False), six rounds interleaved, medians; D = 128, B = 4, H = 16, bf16.

    python benchmarks/host_eager.py
"""
import statistics

import torch

from attnpkg import bench, hopper

print(torch.cuda.get_device_name(), torch.__version__, flush=True)
rows = {}
for _ in range(6):
    for n in (512, 1024, 2048):
        for causal in (True, False):
            for name, enabled in (("gluon", True), ("two-kernel", False)):
                hopper.ENABLED = enabled
                t = bench.host_and_gpu_time("attnpkg", 128, causal, torch.bfloat16, n)
                rows.setdefault((n, causal, name), []).append((t["backward", "eager"], t["backward", "graph"]))
hopper.ENABLED = True
print("backward ms, D128 B4 H16 bf16, median of 6 interleaved rounds (min..max): eager | graph")
for n in (512, 1024, 2048):
    for causal in (True, False):
        out = []
        for name in ("gluon", "two-kernel"):
            e, g = zip(*rows[(n, causal, name)])          # eager, graph
            out.append(f"{name} {statistics.median(e):.3f} ({min(e):.3f}..{max(e):.3f}) | {statistics.median(g):.3f}")
        print(f"N={n:<5} {'causal' if causal else 'full  '} " + "   ".join(out), flush=True)
