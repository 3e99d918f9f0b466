"""Every kernel configuration attnpkg can launch compiles for every GPU that Colab hands out.

Colab gives a T4 (compute capability 7.5), an A100 (8.0), an L4 (8.9) or an H100 (9.0). Only the last
can be tested on real hardware here, but Triton compiles for a target without its GPU
(``triton.compile(src, target=GPUTarget("cuda", capability, 32))``, ptxas included), and the compiled
kernel reports the shared memory one program needs. A kernel whose shared memory passes the GPU's
per-block limit (opt-in) fails at its first launch, so this test compiles each configuration and
compares its shared memory with the limit of each target.

The configurations are not listed here: they are recorded from attnpkg's own launch code.
``forward_impl`` and ``backward_impl`` run on CPU tensors with ``launch`` replaced by a recorder and
the GPU's capability, shared memory and name patched in, so each kernel is compiled with exactly the
arguments, tiles (``tiles_for``: ``SMALL_SMEM_TILES`` below 160 KiB of shared memory, ``HOPPER_TILES``
on 9.0 and newer for 16-bit inputs, ``SMALL_TILES`` otherwise), warps, stages and flags that the launch
code passes on that GPU, for each head-dim class, dtype (no bfloat16 on 7.5, which ``flash_attention``
refuses there), causal flag and, on Hopper, with and without the TMA tensor descriptors; the softmax
kernels likewise. A new kernel or a new table entry is covered without a change here. A configuration
that attnpkg refuses on a GPU (a ``ValueError`` naming it) must be one that does not fit there.

The compilation runs in a subprocess with ``TRITON_INTERPRET=0`` (importing attnpkg without a GPU
switches the interpreter on, under which nothing is compiled), on all CPU cores, and uses Triton's
cache, so a second run only compiles what changed. Run by itself: ``python tests/test_gpu_targets.py``
prints the table of configurations and their shared memory.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KIB = 1024
# Colab's GPUs: compute capability and the most shared memory one block may use (opt-in).
TARGETS = {"T4": (75, 64 * KIB), "A100": (80, 163 * KIB), "L4": (89, 99 * KIB), "H100": (90, 227 * KIB)}
HEAD_DIMS = (64, 128, 256)                 # the largest head dim of each tile class (64, 128, 256)
SOFTMAX_COLS = (4096,)                     # the largest BLOCK of attnpkg.softmax
# GPU_TARGETS=full also compiles the causal=False variants (the same tiles, no mask arithmetic), the
# smaller head dims of each class and the smallest softmax BLOCK: about twice the work.
FULL = os.environ.get("GPU_TARGETS") == "full"
if FULL:
    HEAD_DIMS, SOFTMAX_COLS = (16, 32, 64, 96, 128, 192, 256), (16, 4096)


def _cuda_available():
    import torch
    return torch.cuda.is_available()


def _causal_flags(tiles_for, kernels, dtype, head_dim):
    """Both mask flags in the full run; else causal=True, and causal=False only where it gets other tiles.
    (Call with attention._capability patched.)"""
    import torch
    gpu = torch.device("cuda", 0)

    def tiles(kernel, causal):
        try:
            return tiles_for(kernel, head_dim, dtype, gpu, causal)
        except ValueError as error:                      # a refusal: the same for both flags?
            return str(error)

    if FULL or any(tiles(kernel, False) != tiles(kernel, True) for kernel in kernels):
        return (False, True)
    return (True,)


def _dtypes(capability):
    import torch
    return (torch.float16, torch.float32) if capability < 80 else (torch.float16, torch.bfloat16, torch.float32)


def _gpu(capability):
    name = next(gpu for gpu, (cap, _) in TARGETS.items() if cap == capability)
    return name, TARGETS[name][1]


def record_launches(capability, refusals=None):
    """Every kernel launch that attnpkg makes on a GPU of this capability: [(kernel, args, kwargs, case)].
    A configuration that attnpkg refuses on this GPU (a ValueError) is appended to ``refusals``."""
    import torch

    from attnpkg import attention, fused_softmax

    launches, case = [], {}
    refusals = [] if refusals is None else refusals
    gpu_name, shared = _gpu(capability)

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                launches.append((self.kernel, args, kwargs, dict(case)))
                case.pop("tiles", None)            # the tiles belong to this launch only
            return record

    def chosen_tiles(kernel, block_d, dtype, device, causal):
        tiles = tiles_for(kernel, block_d, dtype, gpu, causal)
        case["tiles"] = [kernel, *tiles]
        return tiles

    gpu = torch.device("cuda", 0)
    tiles_for = attention.tiles_for
    patches = {(attention, "launch"): Recorder, (attention, "_capability"): lambda device: divmod(capability, 10),
               (attention, "_shared_memory"): lambda device: shared, (torch.cuda, "get_device_name"): lambda d=None: gpu_name,
               (attention, "tiles_for"): chosen_tiles,
               (fused_softmax, "softmax_forward_kernel"): Recorder(fused_softmax.softmax_forward_kernel),
               (fused_softmax, "softmax_backward_kernel"): Recorder(fused_softmax.softmax_backward_kernel)}
    saved = {key: getattr(*key) for key in patches}
    try:
        for (module, name), value in patches.items():
            setattr(module, name, value)
        for dtype in _dtypes(capability):
            for head_dim in HEAD_DIMS:
                for causal in _causal_flags(tiles_for, attention.HOPPER_TILES, dtype, head_dim):
                    # contiguous, and SDPA's transposed layout: TMA where the tiles ask for it and the layout
                    # allows it (the transposed one only where the head dim is a power of two), else pointers
                    for layout in ("contiguous", "strided"):
                        case.update(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, causal=causal,
                                    layout=layout)
                        shape = (1, 2, 128, head_dim)
                        q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
                        if layout == "strided":
                            q, k, v = (torch.randn(1, 128, 2, head_dim, dtype=dtype).transpose(1, 2)
                                       for _ in range(3))
                        try:
                            o, lse = attention.forward_impl(q, k, v, causal, head_dim ** -0.5)
                            attention.backward_impl(torch.randn_like(o), q, k, v, o, lse, None, causal,
                                                    head_dim ** -0.5)
                        except ValueError as error:         # refused on this GPU, with a message
                            refusals.append(dict(case, capability=capability, error=str(error)))
                            case.pop("tiles", None)
            for n_cols in SOFTMAX_COLS:
                case.update(dtype=str(dtype).removeprefix("torch."), head_dim=None, causal=None, layout=n_cols)
                x = torch.randn(2, n_cols, dtype=dtype, requires_grad=True)
                fused_softmax._Softmax.apply(x).backward(torch.randn(2, n_cols, dtype=dtype))   # past the CPU check
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
    return launches


def compile_jobs(capability, refusals=None):
    """The distinct compilations of the recorded launches: what Triton's own launch would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    jobs = {}
    for kernel, args, kwargs, case in record_launches(capability, refusals):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        key = repr((kernel.fn.__name__, capability, signature, sorted(constexprs.items()), sorted(attrs.items()),
                    sorted(options.__dict__.items())))
        job = jobs.setdefault(key, dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, capability=capability,
                                        signature=signature, constexprs=constexprs, attrs=attrs,
                                        named={kernel.arg_names[path[0]]: repr(value)
                                               for path, value in constexprs.items()},
                                        options=options.__dict__, cases=[]))
        job["cases"].append(case)
    return list(jobs.values())


def compile_one(job):
    """Compile one job for its target; returns its shared memory in bytes, or the error."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    try:
        compiled = triton.compile(ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"]),
                                  target=GPUTarget("cuda", job["capability"], 32), options=job["options"])
        return dict(shared=compiled.metadata.shared, error=None)
    except Exception as error:                     # reported, with the configuration, by the test
        return dict(shared=None, error=f"{type(error).__name__}: {str(error)[:300]}")


def tables_used(capability):
    """The tile-table entries that the launch code picks on this capability (to check that all are covered)."""
    import torch

    from attnpkg import attention
    gpu, used = torch.device("cuda", 0), set()
    name, shared = _gpu(capability)
    saved = attention._capability, attention._shared_memory, torch.cuda.get_device_name
    attention._capability, attention._shared_memory = lambda device: divmod(capability, 10), lambda device: shared
    torch.cuda.get_device_name = lambda device=None: name
    try:
        for kernel in attention.HOPPER_TILES:
            if kernel == "fused" and not attention.FUSED_BACKWARD:    # not launched: see attention.FUSED_BACKWARD
                continue
            for dtype in _dtypes(capability):
                for head_dim in HEAD_DIMS:
                    for causal in _causal_flags(attention.tiles_for, attention.HOPPER_TILES, dtype, head_dim):
                        try:
                            used.add((kernel, *attention.tiles_for(kernel, head_dim, dtype, gpu, causal)))
                        except ValueError:                  # refused on this GPU (checked by the test)
                            pass
    finally:
        attention._capability, attention._shared_memory, torch.cuda.get_device_name = saved
    return used


def main():
    """Compile everything for every target; print one JSON line per compilation."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")       # Triton 3.9's default, without its warning
    import attnpkg  # noqa: F401  (after TRITON_INTERPRET=0 is set by the caller)
    refusals = []
    jobs = [job for capability, _ in TARGETS.values() for job in compile_jobs(capability, refusals)]
    for refusal in refusals:
        print(json.dumps(dict(refused=refusal)), flush=True)
    workers = int(os.environ.get("GPU_TARGETS_WORKERS", os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        for job, result in zip(jobs, pool.map(compile_one, jobs)):
            print(json.dumps(dict(kernel=job["kernel"], capability=job["capability"], cases=job["cases"],
                                  constexprs=job["named"],
                                  num_warps=job["options"]["num_warps"], num_stages=job["options"]["num_stages"],
                                  maxnreg=job["options"].get("maxnreg"),
                                  **result)), flush=True)


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=3600,
                         cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


@pytest.fixture(scope="module")
def refused(compiled):
    return [row["refused"] for row in compiled if "refused" in row]


@pytest.fixture(scope="module")
def compiled_only(compiled):
    return [row for row in compiled if "refused" not in row]


def _describe(row):
    cases = sorted({f"{c['dtype']} D={c['head_dim']} causal={c['causal']} {c['layout']}" for c in row["cases"]})
    return (f"{row['kernel']} on {next(g for g, (cap, _) in TARGETS.items() if cap == row['capability'])} "
            f"(warps {row['num_warps']}, stages {row['num_stages']}): {', '.join(cases[:4])}")


def test_every_configuration_compiles_and_fits_in_shared_memory(compiled_only):
    compiled = compiled_only
    limits = {cap: limit for cap, limit in TARGETS.values()}
    failures = [f"{_describe(r)}: {r['error']}" for r in compiled if r["error"]]
    too_big = [f"{_describe(r)}: {r['shared']} bytes of shared memory > {limits[r['capability']]}"
               for r in compiled if r["shared"] is not None and r["shared"] > limits[r["capability"]]]
    assert not failures + too_big, "\n".join(failures + too_big)


def test_configurations_cover_kernels_targets_and_flags(compiled_only):
    compiled = compiled_only
    kernels = {r["kernel"] for r in compiled}
    assert {"flash_forward_kernel", "flash_backward_preprocess", "flash_backward_dkdv_kernel",
            "flash_backward_dq_kernel", "softmax_forward_kernel", "softmax_backward_kernel"} <= kernels
    assert {r["capability"] for r in compiled} == {cap for cap, _ in TARGETS.values()}
    tma = {(r["capability"], r["constexprs"]["USE_TMA"]) for r in compiled if "USE_TMA" in r["constexprs"]}
    # TMA only on Hopper, and there both with and without it (a layout TMA can't take falls back to pointers)
    assert {(90, "True"), (90, "False")} <= tma and {cap for cap, used in tma if used == "True"} == {90}
    # a register cap of the tile table (Tiles.max_registers, the last field) reaches the compiler as maxnreg
    for r in compiled:
        caps = {c["tiles"][-1] for c in r["cases"] if "tiles" in c}
        assert caps <= {r["maxnreg"] or 0}, (_describe(r), caps, r["maxnreg"])
    assert any(r["maxnreg"] for r in compiled if r["capability"] == 90)
    # bfloat16 is never compiled for 7.5, where flash_attention refuses it
    assert not [r for r in compiled if r["capability"] == 75 and any(c["dtype"] == "bfloat16" for c in r["cases"])]
    # every tile-table entry that the launch code can pick on a target was compiled for it
    for capability, _ in TARGETS.values():
        compiled_tiles = {tuple(c["tiles"]) for r in compiled if r["capability"] == capability
                          for c in r["cases"] if "tiles" in c}
        assert tables_used(capability) == compiled_tiles, capability


def test_refusals_name_the_gpu_and_are_needed(compiled_only, refused):
    """Where attnpkg refuses a configuration, its message names the GPU, and the configuration it would have
    compiled does not fit: the same kernel needs more shared memory (on a GPU with room for it) than this GPU has."""
    for refusal in refused:
        name, limit = _gpu(refusal["capability"])
        assert name in refusal["error"] and "shared memory" in refusal["error"], refusal
        need = [r["shared"] for r in compiled_only if r["kernel"] == "flash_backward_dkdv_kernel"
                and r["capability"] != refusal["capability"] and r["constexprs"]["BLOCK_D"] == str(refusal["head_dim"])
                and r["constexprs"]["BLOCK_N"] == "16" and any(c["dtype"] == refusal["dtype"] for c in r["cases"])]
        assert need and min(need) > limit, (refusal, need)
    assert len(refused) < len(compiled_only) // 10           # a refusal is an exception, not the rule


if __name__ == "__main__":
    main()


@pytest.mark.skipif(_cuda_available(), reason="CPU tensors through Triton's interpreter (off where a GPU is present)")
@pytest.mark.parametrize("head_dim", [64, 128, 192])
@pytest.mark.parametrize("causal", [False, True])
def test_small_smem_tiles_are_exact(monkeypatch, head_dim, causal):
    """The tiles that T4 and L4 get (16 to 64 rows) give the right attention and gradients: the kernels run with
    them in Triton's interpreter, with Nq != Nk and lengths that are not multiples of a tile, against float64."""
    import torch

    import attnpkg
    from accuracy import assert_flash_accuracy
    from attnpkg import attention
    size = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    used = []
    monkeypatch.setattr(attention, "tiles_for", lambda kernel, *args: used.append(kernel) or
                        attention.SMALL_SMEM_TILES[size])
    q, k, v, do = (torch.randn(1, 2, n, head_dim) for n in (37, 45, 45, 37))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = attnpkg.flash_attention(q, k, v, causal=causal, return_lse=True)
    o.backward(do)
    assert {"forward", "dkdv", "dq"} <= set(used)
    assert_flash_accuracy({"o": o, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad},
                          q.detach(), k.detach(), v.detach(), do, causal)
