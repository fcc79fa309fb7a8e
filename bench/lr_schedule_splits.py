"""How robust the learning-rate schedule application's result is: MGD's schedule against the tuned
standard schedules on several data splits and with both metagradient engines.

    python bench/lr_schedule_splits.py                          # splits 0,1,2 x engines metagrad,jax
    python bench/lr_schedule_splits.py --splits 0 --engines jax

Each cell is ``metagrad run lr-schedule`` with its defaults (``--set seed=S --engine E``): the
split's seed draws the train/validation/test examples; MGD and every schedule's tuning run on the
fit seeds, and each method's test loss is reported on unseen training seeds. The engines differ
in the order of floating-point operations (the runtime's plan against JAX's ``lax.scan``), so a
result that only one engine reproduces is not a result. Writes
``bench/results/lr_schedule_splits.{md,json}``.
"""

from __future__ import annotations

import argparse
import sys

from common import write_results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", default="0,1,2", help="comma-separated data-split seeds")
    parser.add_argument("--engines", default="metagrad,jax", help="comma-separated: metagrad, jax")
    args = parser.parse_args(argv)
    from metagrad.applications import lr_schedule

    rows = []
    for seed in (int(s) for s in args.splits.split(",")):
        for engine in args.engines.split(","):
            result = lr_schedule.run(seed=seed, engine=engine, progress=False)
            comparison = result["comparison"]
            methods = comparison["methods"]
            strongest = comparison["strongest_baseline"]
            rows.append({"split": seed, "engine": result["engine"], "mgd": methods[lr_schedule.MGD]["test_loss"],
                         "strongest": strongest, "strongest_loss": methods[strongest]["test_loss"],
                         "mgd_minus_strongest": comparison["mgd_minus_strongest"],
                         "beats": comparison["mgd_beats_strongest"]})
            print(f"split {seed} {engine}: MGD {rows[-1]['mgd']['mean']:.4f}, {strongest} "
                  f"{rows[-1]['strongest_loss']['mean']:.4f}", file=sys.stderr, flush=True)

    def spread(s):
        return f"{s['mean']:.4f} +- {s['sem']:.4f}"

    command = " ".join(["python bench/lr_schedule_splits.py", *(sys.argv[1:] if argv is None else argv)])
    md = [f"Command: `{command}`. Test loss (lower is better), mean +- standard error over the unseen "
          "training seeds of `metagrad run lr-schedule`'s defaults; the difference is paired by seed.", "",
          "| split | engine | MGD | strongest tuned schedule | its test loss | MGD minus it | MGD lower |",
          "|---:|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['split']} | {r['engine']} | {spread(r['mgd'])} | {r['strongest']} | "
                  f"{spread(r['strongest_loss'])} | {spread(r['mgd_minus_strongest'])} | "
                  f"{'yes' if r['beats'] else 'no'} |")
    wins = sum(r["beats"] for r in rows)
    md += ["", f"MGD's schedule has the lower mean test loss in {wins} of {len(rows)} cells."]
    write_results("lr_schedule_splits", md, {"command": command, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
