"""What the determinism spot check costs a metagradient: every run with replays copies one state
to the host twice (the first pass's and the replay's) and compares them.

    python bench/spot_check.py                       # mlp_table, wide, transformer at T = 1000
    python bench/spot_check.py --kinds wide --steps 100

The copies are timed alone (the state's buffers to host memory, as the runner copies them), beside
the metagradient's time in the same process, with a plan that replays (``Budget(states=32)``: the
default plan of these tasks saves every state on the CPU and so replays nothing, and checks
nothing): the share is 2 copies / the run.
Each figure is the median of ``--repeat`` samples. Writes ``bench/results/spot_check.{md,json}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import fmt_bytes, write_results


def measure(kind: str, steps: int, repeat: int) -> dict:
    import jax
    import numpy as np

    import metagrad
    from metagrad import runtime
    from tasks import make_task

    task, z = make_task(kind, steps)
    compiled = task.compile(z)
    schedule = metagrad.Budget(states=32)
    compiled.metagradient(z, schedule)
    runs, reports = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        _, _, report = compiled.metagradient(z, schedule, report=True)
        runs.append(time.perf_counter() - start)
        reports.append(report)
    state = [runtime.to_device(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(compiled.train(z))]
    copies = []
    for _ in range(repeat):
        start = time.perf_counter()
        for buffer in state:
            buffer.to_numpy()
        copies.append(time.perf_counter() - start)
    run, copy = statistics.median(runs), statistics.median(copies)
    return {"kind": kind, "steps": steps, "state_bytes": compiled.layout.state_bytes, "schedule": reports[-1].schedule,
            "determinism_checks": reports[-1].determinism_checks, "run_s": run, "copy_s": copy,
            "share": 2 * copy / run}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp_table,wide,transformer")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    rows = [measure(kind, args.steps, args.repeat) for kind in args.kinds.split(",")]
    command = " ".join(["python bench/spot_check.py", *(sys.argv[1:] if argv is None else argv)])
    md = [f"Command: `{command}`. Medians of {args.repeat}; the machine ran nothing else.", "",
          "| task | T | state | plan | checks in the run | metagradient | one state to host | 2 copies / run |",
          "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        md.append(f"| {r['kind']} | {r['steps']} | {fmt_bytes(r['state_bytes'])} | {r['schedule']} | "
                  f"{r['determinism_checks']} | {r['run_s']:.3f} s | {1e3 * r['copy_s']:.3f} ms | "
                  f"{100 * r['share']:.3f}% |")
    write_results("spot_check", md, {"command": command, "repeat": args.repeat, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
