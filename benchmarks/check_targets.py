"""Check a results file of ``python -m attnpkg.bench`` against the project's speed targets.

    python benchmarks/check_targets.py benchmarks/h100/attention.csv

Targets: forward at least 0.9x SDPA cuDNN for N >= 4096 and at least 1.0x SDPA flash for
N >= 1024; backward at least 1.0x SDPA flash for N >= 4096.
"""
import csv
import sys

TARGETS = [("forward", "sdpa-cudnn", 4096, 0.9), ("forward", "sdpa-flash", 1024, 1.0), ("backward", "sdpa-flash", 4096, 1.0)]


def main(path):
    rows = list(csv.DictReader(open(path)))
    tflops = {(r["head_dim"], r["causal"], r["dtype"], int(r["n"]), r["mode"], r["provider"]): float(r["tflops"] or 0)
              for r in rows}
    print(f"{rows[0]['gpu']} | torch {rows[0]['torch']} | triton {rows[0]['triton']} | {rows[0]['date']}")
    missed = 0
    for mode, other, min_n, target in TARGETS:
        ratios = {key[:4]: tflops[key] / tflops[key[:5] + (other,)] for key in tflops
                  if key[4] == mode and key[5] == "attnpkg" and key[3] >= min_n and tflops.get(key[:5] + (other,))}
        misses = {k: r for k, r in ratios.items() if r < target}
        missed += len(misses)
        print(f"{mode} >= {target}x {other} for N >= {min_n}: {len(ratios) - len(misses)}/{len(ratios)} cases met,"
              f" lowest {min(ratios.values()):.2f}")
        for (d, causal, dtype, n), r in sorted(misses.items()):
            print(f"    missed: D{d} {'causal' if causal == 'True' else 'full'} {dtype} N={n}: {r:.2f}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/h100/attention.csv"))
