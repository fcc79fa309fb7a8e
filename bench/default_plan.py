"""The default metagradient(z) against StoreAll, in one process: what Auto's choice costs.

    python bench/default_plan.py [--kinds cnn,mlp_table] [--steps 1000] [--repeat 5]

For each task: ``compiled.metagradient(z)`` (Auto with its default budget) and
``compiled.metagradient(z, StoreAll())`` (the fastest plan when memory is no
object: every state stored, no recomputation) alternate ``--repeat`` times
after a warm-up (medians). Also the default's wall time against the runner's
own time (``Report.seconds_total``): what a call spends outside the runner,
choosing the plan included, and the same for the first call (calibration,
unless cached on disk, and the plan search). ``--out`` names the results
(bench/results/<out>.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import write_results

import metagrad
from tasks import make_task


def measure(kind: str, steps: int, repeat: int) -> dict:
    task, z = make_task(kind, steps)
    compiled = task.compile(z).prepare(metagrad.Auto())  # nothing left to build in the background
    runs = {"default": lambda: compiled.metagradient(z, report=True),
            "StoreAll": lambda: compiled.metagradient(z, metagrad.StoreAll(), report=True)}
    first = {}
    for name, run in runs.items():  # warm-up; the default's first call calibrates and chooses its plan
        t0 = time.perf_counter()
        report = run()[2]
        first[name] = time.perf_counter() - t0 - report.seconds_total
    reports = {}
    wall = {name: [] for name in runs}
    inside = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t0 = time.perf_counter()
            reports[name] = run()[2]
            wall[name].append(time.perf_counter() - t0)
            inside[name].append(reports[name].seconds_total)
    out = {name: {"wall_s": statistics.median(wall[name]), "runner_s": statistics.median(inside[name]),
                  "first_call_outside_runner_s": first[name], "plan": reports[name].schedule} for name in runs}
    out["ratio"] = out["default"]["wall_s"] / out["StoreAll"]["wall_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="cnn,mlp_table")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="default_plan")
    args = parser.parse_args()
    results = {"steps": args.steps, "repeat": args.repeat, "tasks": {}}
    lines = [f"# The default metagradient(z) against StoreAll (T = {args.steps}, medians of {args.repeat})", "",
             "| task | default's plan | default (s) | its runner (s) | first call outside the runner (s) | StoreAll (s) "
             "| default / StoreAll |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for kind in args.kinds.split(","):
        r = results["tasks"][kind] = measure(kind, args.steps, args.repeat)
        lines.append(f"| {kind} | {r['default']['plan']} | {r['default']['wall_s']:.3f} | "
                     f"{r['default']['runner_s']:.3f} | {r['default']['first_call_outside_runner_s']:.3f} | "
                     f"{r['StoreAll']['wall_s']:.3f} | {r['ratio']:.2f} |")
        print(lines[-1], flush=True)
    write_results(args.out, lines, results)


if __name__ == "__main__":
    main()
