"""Reads the two runs of scripts/gpu/diverge_probe.sh (CUDA and CPU) and fails when either
flattened to the uniform distribution: five or more steps in a row with a gradient norm of exactly
0 and a loss within 1e-3 of ln(vocab), the signature of a norm that overflowed to zeros.

Usage: diverge_check.py RUNS_CUDA RUNS_CPU MODEL_CONFIG_JSON
"""
import json
import math
import sys
from pathlib import Path


def steps(runs: Path):
    files = sorted(runs.glob("*/metrics.jsonl"))
    if not files:
        return None
    rows = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "grad_norm" in r]


def longest_flat(rows, ln_v):
    best = run = 0
    for r in rows:
        flat = r["grad_norm"] == 0.0 and abs(r["loss"] - ln_v) < 1e-3
        run = run + 1 if flat else 0
        best = max(best, run)
    return best


def main():
    cuda_dir, cpu_dir, cfg = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    vocab = json.loads(cfg.read_text())["vocab_size"]
    ln_v = math.log(vocab)
    runs = {"cuda": steps(cuda_dir), "cpu": steps(cpu_dir)}
    print(f"ln(vocab {vocab}) = {ln_v:.4f}")
    print(f"{'step':>4} | {'cuda loss':>12} {'grad':>10} | {'cpu loss':>12} {'grad':>10}")
    n = max(len(r or []) for r in runs.values())
    for i in range(n):
        cells = []
        for k in ("cuda", "cpu"):
            rows = runs[k] or []
            cells.append(f"{rows[i]['loss']:12.4f} {rows[i]['grad_norm']:10.3e}" if i < len(rows) else " " * 23)
        print(f"{i + 1:>4} | {cells[0]} | {cells[1]}")
    failed = False
    for k, rows in runs.items():
        if rows is None:
            print(f"FAIL {k}: no metrics.jsonl under {cuda_dir if k == 'cuda' else cpu_dir}")
            failed = True
            continue
        flat = longest_flat(rows, ln_v)
        verdict = "FAIL" if flat >= 5 else "ok"
        total = rows[-1].get("total_steps", len(rows)) if rows else 0
        # A run that stopped early (the engine refuses a non-finite loss even with the guard off)
        # is not flat, but say so: "ok" alone read as if it had trained every step.
        ended = f"{len(rows)} of {total} steps" + ("" if len(rows) >= total else ", stopped early (its train log says why)")
        print(f"{verdict} {k}: {ended}, longest stretch at ln(vocab) with zero gradient: {flat}")
        failed |= flat >= 5
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
