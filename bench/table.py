"""Print bench JSON lines (from `tunestudio bench --json`) as a table: speed, memory vs the plan."""
import sys

from bench_lines import read

G = 2 ** 30
for r in read(sys.argv[1:]):
    drv, plan = r["peak_driver_bytes"], r["plan_peak_bytes"]
    err = 100 * (plan - drv) / drv
    print(
        f'{(r.get("card_profile") or "native"):8} {r["shape"]:12} seq {r["seq"]:6} r {r["rank"]:3} {r["checkpointing"]:8} attn {r.get("attention", "?")} '
        f'{r["tokens_per_s"]:8.0f} tok/s  driver {drv / G:6.2f}  plan {plan / G:6.2f} GiB ({err:+.1f}%)  '
        f'arena {r["peak_arena_bytes"] / G:6.2f} (plan {r["plan_arena_bytes"] / G:6.2f})  ctx {r["context_bytes"] / G:4.2f}  '
        f'MFU {100 * r["mfu"]:4.1f}%  GEMM {r["gemm_tflops"]:.0f} TFLOP/s  first step {r["first_step_s"]:4.1f}s'
    )
