"""Check a results file of ``python -m attnpkg.bench`` against the project's speed targets.

    python benchmarks/check_targets.py benchmarks/h100/attention.csv
    python benchmarks/check_targets.py benchmarks/h200/masks.csv        # --masks: against FlexAttention

Targets: forward at least 0.9x SDPA cuDNN for N >= 4096 and at least 1.0x SDPA flash for
N >= 1024; backward at least 1.0x SDPA flash for N >= 4096; backward at least 1.0x SDPA cuDNN
(``attnpkg``, deterministic=False) and 0.9x (``attnpkg-deterministic``) for N >= 4096, where the
file has that provider. Masks (``masks.csv``): at least 1.3x FlexAttention forward and 1.2x backward for
each mask, and packed documents within 10 % of the TFLOP/s of the same documents as a dense batch.
"""
import csv
import sys

# (pass, attnpkg's provider, the other provider, from N, target ratio)
TARGETS = [("forward", "attnpkg", "sdpa-cudnn", 4096, 0.9), ("forward", "attnpkg", "sdpa-flash", 1024, 1.0),
           ("backward", "attnpkg", "sdpa-flash", 4096, 1.0), ("backward", "attnpkg", "sdpa-cudnn", 4096, 1.0),
           ("backward", "attnpkg-deterministic", "sdpa-cudnn", 4096, 0.9)]


MASK_TARGETS = {"forward": 1.3, "backward": 1.2}
PACKED, DENSE = "packed-8x2048", "dense-32x2048"


def check_masks(rows):
    """Returns the number of targets missed in a ``masks.csv``."""
    tflops = {(r["case"], r["provider"], r["mode"]): float(r["tflops"]) for r in rows}
    missed = 0
    for case in dict.fromkeys(r["case"] for r in rows):
        if case == DENSE:                              # the reference for packed documents, not a mask
            continue
        for mode, target in MASK_TARGETS.items():
            ratio = tflops[case, "attnpkg", mode] / tflops[case, "flex", mode]
            missed += ratio < target
            print(f"{case:15s} {mode:8s} {ratio:.2f}x FlexAttention (target {target}x){'' if ratio >= target else '  MISSED'}")
    for mode in MASK_TARGETS:
        ratio = tflops[PACKED, "attnpkg", mode] / tflops[DENSE, "attnpkg", mode]
        missed += not 0.9 <= ratio
        print(f"packed / dense   {mode:8s} {ratio:.2f} (target >= 0.9){'' if ratio >= 0.9 else '  MISSED'}")
    return missed


def main(path):
    rows = list(csv.DictReader(open(path)))
    print(f"{rows[0]['gpu']} | torch {rows[0]['torch']} | triton {rows[0]['triton']} | {rows[0]['date']}")
    if "case" in rows[0]:
        return 1 if check_masks(rows) else 0
    tflops = {(r["head_dim"], r["causal"], r["dtype"], int(r["n"]), r["mode"], r["provider"]): float(r["tflops"] or 0)
              for r in rows}
    missed = 0
    for mode, ours, other, min_n, target in TARGETS:
        ratios = {key[:4]: tflops[key] / tflops[key[:5] + (other,)] for key in tflops
                  if key[4] == mode and key[5] == ours and key[3] >= min_n and tflops.get(key[:5] + (other,))}
        if not ratios:
            continue
        misses = {k: r for k, r in ratios.items() if r < target}
        missed += len(misses)
        print(f"{ours} {mode} >= {target}x {other} for N >= {min_n}: {len(ratios) - len(misses)}/{len(ratios)} cases met,"
              f" lowest {min(ratios.values()):.2f}")
        for (d, causal, dtype, n), r in sorted(misses.items()):
            print(f"    missed: D{d} {'causal' if causal == 'True' else 'full'} {dtype} N={n}: {r:.2f}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/h100/attention.csv"))
