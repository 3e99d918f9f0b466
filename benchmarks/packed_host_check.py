"""The cost of checking ``cu_seqlens`` on the host, for packed sequences (``flash_attention_varlen``).

Reading the prefix sums is a device -> host copy that waits for the GPU. ``flash_attention_varlen`` reads each
tensor once while it is unchanged (``attnpkg.varlen._CHECKED``). This times the packed forward pass with a new
tensor every call (read every time), with the same tensor (read once), and the same documents as a dense batch
in SDPA's layout, eagerly (``do_bench``) and on CUDA-graph time where the call can be captured.

    python benchmarks/packed_host_check.py          # B=4 rows of 16k tokens, 8 causal documents of 2048 each
"""
import torch
from triton.testing import do_bench, do_bench_cudagraph

import attnpkg
from attnpkg.bench import environment

B, N, H, D, L = 4, 16384, 16, 128, 2048
q, k, v = (torch.randn(B * N, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
cu = torch.arange(0, B * N + 1, L, dtype=torch.int32, device="cuda")
docs = B * N // L
flops = 4 * docs * H * L * L * D / 2                  # causal: half of each document's pairs
qd, kd, vd = (x.view(docs, L, H, D).transpose(1, 2) for x in (q, k, v))
cases = {
    "packed, new cu_seqlens each call": (lambda: attnpkg.flash_attention_varlen(q, k, v, cu.clone(), cu.clone(), L, L,
                                                                                causal=True), False),
    "packed, the same cu_seqlens": (lambda: attnpkg.flash_attention_varlen(q, k, v, cu, cu, L, L, causal=True), True),
    "dense batch, SDPA layout": (lambda: attnpkg.flash_attention(qd, kd, vd, causal=True), True),
}
env = environment()
print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | {env['date']}")
print(f"forward, bf16, {docs} causal documents of {L} tokens, H={H}, D={D}: ms (TFLOP/s), best of 2 rounds")
best = {}
for _ in range(2):
    for name, (fn, capturable) in cases.items():
        eager = do_bench(fn, warmup=50, rep=300)
        graph = do_bench_cudagraph(fn, rep=300) if capturable else float("nan")
        old = best.get(name, (float("inf"), float("inf")))
        best[name] = (min(eager, old[0]), min(graph, old[1]) if capturable else graph)
for name, (eager, graph) in best.items():
    print(f"{name:34s} eager {eager:.3f} ({flops / eager / 1e9:4.0f})   CUDA graph "
          + (f"{graph:.3f} ({flops / graph / 1e9:4.0f})" if graph == graph else "- (reads the tensor: not capturable)"))
