"""Where the planner's calibration and a real run part: StoreAll's time per step against the calibrated programs.

    python bench/calibration_drift.py [--kinds mlp_table,wide] [--steps 100,1000] [--loop scan] [--repeat 5]

For each task and T: the calibration Auto plans from (``compiled.cost_table(z)``:
each program timed in chains of at least 20 ms at the step positions of a run) against
``StoreAll()``, which runs every step once forward and once in reverse over T
saved states. Per step: the forward pass (``Report.seconds_forward`` less
``init`` and ``output_vjp``) over T against the calibrated ``step``, and the
reverse (``seconds_reverse`` less ``init_vjp``) over T against the calibrated
``step_vjp``; medians of ``--repeat`` runs after a warm-up. A ratio above 1 is
time the calibration does not see, and so the planner does not predict.
``--out`` names the results (bench/results/<out>.{md,json}).
"""

from __future__ import annotations

import argparse
import statistics

from common import write_results

import metagrad
from tasks import make_task


def measure(kind: str, steps: int, loop: str, repeat: int) -> dict:
    task, z = make_task(kind, steps)
    compiled = task.compile(z, loop=loop)
    table = compiled.cost_table(z)
    compiled.metagradient(z, metagrad.StoreAll())
    forward, reverse = [], []
    for _ in range(repeat):
        report = compiled.metagradient(z, metagrad.StoreAll(), report=True)[2]
        forward.append((report.seconds_forward - table.init.seconds - table.output_vjp.seconds) / steps)
        reverse.append((report.seconds_reverse - table.init_vjp.seconds) / steps)
    out = {"step_s": table.step.seconds, "step_vjp_s": table.step_vjp.seconds,
           "forward_per_step_s": statistics.median(forward), "reverse_per_step_s": statistics.median(reverse)}
    out["forward_ratio"] = out["forward_per_step_s"] / out["step_s"]
    out["reverse_ratio"] = out["reverse_per_step_s"] / out["step_vjp_s"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp_table,wide")
    parser.add_argument("--steps", default="100,1000")
    parser.add_argument("--loop", default="scan", choices=("unroll", "scan"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default="calibration_drift")
    args = parser.parse_args()
    results = {"loop": args.loop, "repeat": args.repeat, "runs": {}}
    lines = [f"# StoreAll per step against the calibration (loop={args.loop!r}, medians of {args.repeat})", "",
             "| task | T | calibrated step (ms) | forward per step (ms) | ratio | calibrated step_vjp (ms) "
             "| reverse per step (ms) | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in args.kinds.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            r = results["runs"][f"{kind}/{steps}"] = measure(kind, steps, args.loop, args.repeat)
            lines.append(f"| {kind} | {steps} | {1e3 * r['step_s']:.3f} | {1e3 * r['forward_per_step_s']:.3f} | "
                         f"{r['forward_ratio']:.2f} | {1e3 * r['step_vjp_s']:.3f} | "
                         f"{1e3 * r['reverse_per_step_s']:.3f} | {r['reverse_ratio']:.2f} |")
            print(lines[-1], flush=True)
    write_results(args.out, lines, results)


if __name__ == "__main__":
    main()
