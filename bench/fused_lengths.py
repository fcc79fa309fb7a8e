"""Auto with more fused reverse lengths than its first ones, at tight budgets.

    python bench/fused_lengths.py --kind cnn --steps 1000 --budgets 2.6,3.8 --blocks 1-10,1-3-10,default
    python bench/fused_lengths.py --kind wide --steps 1000 --loop scan --budgets 31.2,58.6,113.6 \\
        --blocks 1-10-100,1-3-10-30-100,default

Below the memory of the longest default block (``Auto``'s ``blocks``: 1 and 10
steps, and 100 for a ``loop="scan"`` task), the planner falls back to shorter
blocks with more states; an intermediate length might fill that gap. For each
budget (MiB, data and z included, as the frontier's ``Auto(memory=B)`` cells)
and each set of blocks (``default``: ``Auto(memory=B)``, which tries the
planner's ``GAP_LEAVES`` where its first choice has shorter blocks than the
longest): the plan ``Auto(memory=B, blocks=...)`` chooses, its
predicted time and peak, and its time over JAX's training of the same task
(``baselines.train``, run after each timed run: the frontier's ``x train``).
The block sets alternate within each repeat, in one process; medians.
``--out`` names the results (bench/results/<out>.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
from common import write_results

import metagrad
from metagrad import baselines
from tasks import make_task


def _blocks(text: str) -> tuple[int, ...] | None:
    return None if text == "default" else tuple(int(n) for n in text.split("-"))


def measure(kind: str, steps: int, loop: str, budgets_mib: list[float], block_sets: list[tuple[int, ...] | None],
            repeat: int) -> list[dict]:
    task, z = make_task(kind, steps)
    compiled = task.compile(z, loop=loop)
    yardstick = lambda: jax.block_until_ready(baselines.train(task, z))  # noqa: E731
    yardstick()
    rows = []
    for mib in budgets_mib:
        schedules = {blocks: metagrad.Auto(memory=int(mib * 2**20), blocks=blocks) for blocks in block_sets}
        reports = {blocks: compiled.metagradient(z, schedule, report=True)[2]  # warm-up: compiles, calibrates
                   for blocks, schedule in schedules.items()}
        ratios = {blocks: [] for blocks in block_sets}
        for _ in range(repeat):
            for blocks, schedule in schedules.items():
                t0 = time.perf_counter()
                compiled.metagradient(z, schedule)
                t1 = time.perf_counter()
                yardstick()
                ratios[blocks].append((t1 - t0) / (time.perf_counter() - t1))
        for blocks in block_sets:
            report = reports[blocks]
            rows.append({"budget_mib": mib, "blocks": list(blocks or ["default"]), "plan": str(report.schedule),
                         "predicted_seconds": report.predicted_seconds,
                         "peak_mib": (report.peak_device_bytes + compiled.data_bytes) / 2**20,
                         "x_train": statistics.median(ratios[blocks]), "x_train_samples": ratios[blocks]})
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="cnn")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--loop", default="unroll", choices=("unroll", "scan"))
    parser.add_argument("--budgets", default="2.6,3.8", help="comma-separated MiB, data and z included")
    parser.add_argument("--blocks", default="1-10,1-3-10,default",
                        help="comma-separated block sets, lengths joined by '-', or 'default'")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="fused_lengths")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    block_sets = [_blocks(s) for s in args.blocks.split(",")]
    rows = measure(args.kind, args.steps, args.loop, budgets, block_sets, args.repeat)
    lines = [f"# Auto's fused reverse lengths: {args.kind}, T = {args.steps}, loop={args.loop!r} "
             f"(x train: medians of {args.repeat})", "",
             "| budget | blocks | plan | predicted (s) | peak | x train | samples |",
             "|---:|---|---|---:|---:|---:|---|"]
    lines += [f"| {r['budget_mib']:.1f} MiB | {', '.join(map(str, r['blocks']))} | {r['plan']} | "
              f"{r['predicted_seconds']:.3f} | {r['peak_mib']:.2f} MiB | {r['x_train']:.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in r['x_train_samples'])} |" for r in rows]
    write_results(args.out, lines, {"kind": args.kind, "steps": args.steps, "loop": args.loop,
                                    "repeat": args.repeat, "rows": rows})


if __name__ == "__main__":
    main()
