"""Checks of scripts/gpu/others_check.sh: the plan and the bench while another process holds memory
on the card, against the same on the idle card. Arguments: the output folder and the GiB held.
Prints one line per check; exit 1 if any fails."""
import json
import os
import sys

out, held_gib = sys.argv[1], float(sys.argv[2])
G, M = 2 ** 30, 2 ** 20
failed = 0


def load(name):
    path = os.path.join(out, f"others.{name}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL {name}: cannot read {path} ({e})")
        return None


def check(ok, text):
    global failed
    failed += not ok
    print(("ok   " if ok else "FAIL ") + text)


def ours(terms):
    return {k: v for k, v in terms.items() if k != "other_processes"}


def context_of(cache_file):
    try:
        with open(os.path.join(out, cache_file)) as f:
            values = list(json.load(f).values())
        return values[0] if len(values) == 1 else None
    except (OSError, ValueError):
        return None


plan_idle, plan_busy, plan_again = load("plan_idle"), load("plan_busy"), load("plan_busy_remeasured")
bench_idle, bench_busy, bench_fresh = load("bench_idle"), load("bench_busy"), load("bench_nocache")
if None in (plan_idle, plan_busy, plan_again, bench_idle, bench_busy, bench_fresh):
    sys.exit(1)

held = held_gib * G
idle_others = plan_idle["terms"].get("other_processes", 0)
busy_others = plan_busy["terms"].get("other_processes", 0)
# The holder also has its own CUDA context (about 0.5 GiB) besides what it allocated.
grew = busy_others - idle_others
check(held <= grew <= held + 1.5 * G,
      f"plan: other processes {idle_others / G:.2f} GiB idle, {busy_others / G:.2f} GiB busy (+{grew / G:.2f}, {held_gib:g} GiB held)")
check(ours(plan_busy["terms"]) == ours(plan_idle["terms"]),
      f"plan: our own terms while busy equal the idle card's (peak {plan_busy['peak_bytes'] / G:.3f} vs {plan_idle['peak_bytes'] / G:.3f} GiB)")
check(plan_busy["peak_bytes"] == plan_idle["peak_bytes"], "plan: the same peak")
avail_drop = plan_idle["available_bytes"] - plan_busy["available_bytes"]
check(avail_drop == grew, f"plan: what the run may have fell by exactly the other process's memory ({avail_drop / G:.2f} GiB)")

c_idle, c_busy, c_fresh = bench_idle["context_bytes"], bench_busy["context_bytes"], bench_fresh["context_bytes"]
check(abs(c_busy - c_idle) <= 64 * M, f"bench: context measured while busy {c_busy / M:.0f} MiB vs idle {c_idle / M:.0f} MiB")
check(abs(c_fresh - c_idle) <= 64 * M, f"bench: context measured with the cache removed {c_fresh / M:.0f} MiB vs idle {c_idle / M:.0f} MiB")
for name, cached in [("after the idle bench", context_of("others.cache_idle.json")), ("after the busy bench, cache removed", context_of("others.cache_nocache.json"))]:
    check(cached is not None and abs(cached - c_idle) <= 64 * M,
          f"cache {name}: {cached if cached is None else f'{cached / M:.0f} MiB'} vs idle {c_idle / M:.0f} MiB")
check(bench_busy["others_bytes"] >= held, f"bench: other processes {bench_busy['others_bytes'] / G:.2f} GiB while busy")
check(bench_busy["plan_terms"].get("other_processes", 0) >= held, "bench: the plan's other_processes term while busy")
check(abs(bench_busy["plan_peak_bytes"] - bench_idle["plan_peak_bytes"]) <= 64 * M,
      f"bench: plan peak busy {bench_busy['plan_peak_bytes'] / G:.3f} vs idle {bench_idle['plan_peak_bytes'] / G:.3f} GiB")
d_busy, d_idle = bench_busy["peak_driver_bytes"], bench_idle["peak_driver_bytes"]
check(abs(d_busy - d_idle) <= 256 * M, f"bench: our driver peak busy {d_busy / G:.3f} vs idle {d_idle / G:.3f} GiB (other processes left out)")
diff = {k: (plan_again["terms"].get(k), v) for k, v in ours(plan_idle["terms"]).items() if plan_again["terms"].get(k) != v}
check(set(diff) <= {"cuda_context"} and all(abs(a - b) <= 64 * M for a, b in diff.values()),
      f"plan after the busy bench re-measured the context: only cuda_context may move, within 64 MiB ({diff})")
print(f"\n{'all checks passed' if not failed else f'{failed} checks FAILED'}")
sys.exit(1 if failed else 0)
