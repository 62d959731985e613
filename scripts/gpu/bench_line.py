"""One line of a `tunestudio bench --json` object (read from stdin), for device logs."""
import json
import sys

r = json.loads(sys.stdin.read())
g = 2 ** 30
over = 100 * (r["plan_peak_bytes"] - r["peak_driver_bytes"]) / r["peak_driver_bytes"]
print(
    f"{r['shape']:12} seq {r['seq']:6} r {r['rank']:3} {r['checkpointing']:8} {r['tokens_per_s']:8.0f} tok/s"
    f"  driver {r['peak_driver_bytes'] / g:6.2f}  plan {r['plan_peak_bytes'] / g:6.2f} GiB ({over:+.1f}%)"
    f"  arena {r['peak_arena_bytes'] / g:6.2f}  ctx {r['context_bytes'] / g:4.2f}  MFU {100 * r['mfu']:4.1f}%  first {r['first_step_s']:4.1f}s"
)
