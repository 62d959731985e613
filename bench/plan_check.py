"""The memory plan against the driver: for each `tunestudio bench --json` line, the plan's peak vs
the driver-measured peak of the process. A point passes when they differ by at most 3% of the
measured peak or 256 MiB, whichever is larger. Prints a Markdown table; exit 1 if any point fails."""
import sys

from bench_lines import read

G, M = 2 ** 30, 2 ** 20
rows, bad = [], 0
for r in read(sys.argv[1:]):
    drv, plan = r["peak_driver_bytes"], r["plan_peak_bytes"]
    diff = plan - drv
    ok = abs(diff) <= max(0.03 * drv, 256 * M)
    bad += not ok
    rows.append(f'| {r["shape"]} | {r["seq"]} | {r["rank"]} | {r["checkpointing"]} | {drv / G:.2f} | {plan / G:.2f} | '
                f'{100 * diff / drv:+.2f}% ({diff / M:+.0f} MiB) | {r["peak_arena_bytes"] / G:.2f} | {r["plan_arena_bytes"] / G:.2f} | {"ok" if ok else "FAIL"} |')
print("| shape | seq | r | checkpointing | driver peak GiB | plan GiB | plan − driver | arena GiB | plan arena GiB | within 3% / 256 MiB |")
print("|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
print(f"\n{len(rows) - bad} of {len(rows)} points within bounds")
sys.exit(1 if bad else 0)
