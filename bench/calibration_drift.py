"""Where the planner's calibration and a real run part: StoreAll's time per step against the calibrated programs.

    python bench/calibration_drift.py [--kinds mlp_table,wide] [--steps 100,1000] [--loop scan] [--repeat 5]
                                      [--calibrations 8]

For each task and T: the calibration Auto plans from (``compiled.cost_table(z)``:
each program timed in chains of at least 20 ms at the step positions of a run) against
``StoreAll()``, which runs every step once forward and once in reverse over T
saved states. Per step: the forward pass (``Report.seconds_forward`` less
``init`` and ``output_vjp``) over T against the calibrated ``step``, and the
reverse (``seconds_reverse`` less ``init_vjp``) over T against the calibrated
``step_vjp``; medians of ``--repeat`` runs after a warm-up. A ratio above 1 is
time the calibration does not see, and so the planner does not predict.
With ``--calibrations N``, each task is then calibrated N more times in the
same process: how far one calibration's figures, and the ratios between
programs that decide the plan, move from one calibration to the next.
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
        once = table.programs["init"].seconds + table.programs["output_vjp"].seconds
        forward.append((report.seconds_forward - once) / steps)
        reverse.append((report.seconds_reverse - table.programs["init_vjp"].seconds) / steps)
    out = {"step_s": table.programs["step"].seconds, "step_vjp_s": table.programs["step_vjp"].seconds,
           "forward_per_step_s": statistics.median(forward), "reverse_per_step_s": statistics.median(reverse)}
    out["forward_ratio"] = out["forward_per_step_s"] / out["step_s"]
    out["reverse_ratio"] = out["reverse_per_step_s"] / out["step_vjp_s"]
    return out


def spread(kind: str, steps: int, loop: str, calibrations: int) -> dict:
    """Per program: its seconds in each of ``calibrations`` calibrations, and the
    ratios the planner weighs: step_vjp / step, and each fused reverse's seconds
    per step / step_vjp."""
    task, z = make_task(kind, steps)
    compiled = task.compile(z, loop=loop)
    runs = [{name: cost.seconds for name, cost in compiled.calibrate(z).items()} for _ in range(calibrations)]
    ratios = {"step_vjp / step": [r["step_vjp"] / r["step"] for r in runs]}
    for name in sorted(runs[0]):
        if name.startswith("segment_vjp_"):
            n = int(name.rsplit("_", 1)[1])
            ratios[f"{name} / {n} / step_vjp"] = [r[name] / n / r["step_vjp"] for r in runs]
    return {"seconds": {name: [r[name] for r in runs] for name in runs[0]}, "ratios": ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp_table,wide")
    parser.add_argument("--steps", default="100,1000")
    parser.add_argument("--loop", default="scan", choices=("unroll", "scan"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--calibrations", type=int, default=0,
                        help="calibrate each task this many more times, in one process (0: no)")
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
    if args.calibrations:
        lines += ["", f"## {args.calibrations} calibrations in one process", "",
                  "| task | T | figure | least | median | most | most / least |", "|---|---:|---|---:|---:|---:|---:|"]
        results["calibrations"] = {}
        for kind in args.kinds.split(","):
            for steps in (int(s) for s in args.steps.split(",")):
                r = results["calibrations"][f"{kind}/{steps}"] = spread(kind, steps, args.loop, args.calibrations)
                rows = [(f"`{name}` (ms)", [1e3 * v for v in values]) for name, values in
                        (("step", r["seconds"]["step"]), ("step_vjp", r["seconds"]["step_vjp"]))]
                rows += list(r["ratios"].items())
                for figure, values in rows:
                    lines.append(f"| {kind} | {steps} | {figure} | {min(values):.3f} | "
                                 f"{statistics.median(values):.3f} | {max(values):.3f} | "
                                 f"{max(values) / min(values):.2f} |")
                    print(lines[-1], flush=True)
    write_results(args.out, lines, results)


if __name__ == "__main__":
    main()
