"""Many outputs at once: the metagradients of m outputs in one call against m separate calls.

Attribution needs one metagradient per test example. With ``output``
returning the m test losses as a vector, one call runs one forward pass and
one set of replays, with reverse programs batched over the m cotangents.
This script times that against m separate metagradients of scalar outputs
(the same schedule, the same process, alternating, medians), for m in
{1, 8, 32}, on the digits MLP of ``tasks.py``, and checks they agree.

    python bench/batched_outputs.py [--steps 300] [--repeat 3]

Writes bench/results/batched_outputs.{md,json}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from common import write_results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ms", default="1,8,32")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    import metagrad
    from tasks import CONFIGS, _xent, make_task

    base, z = make_task("mlp", args.steps)
    apply = CONFIGS["mlp"][1]
    schedule = metagrad.Budget(states=32, block=10)
    rows = []
    for m in [int(x) for x in args.ms.split(",")]:
        def losses(state, z, data, m=m):
            return _xent(apply(state[0], data["x_val"][:m]), data["y_val"][:m])

        vector = metagrad.Task(base.init, base.step, losses, args.steps, base.data).compile(z, backend=args.backend)
        singles = [metagrad.Task(base.init, base.step, lambda s, zz, d, i=i: losses(s, zz, d)[i], args.steps,
                                 base.data).compile(z, backend=args.backend) for i in range(m)]
        vector.metagradient(z, schedule)  # warm-up: fused programs compiled
        for single in singles:
            single.metagradient(z, schedule)
        batched, separate = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            values, jacobian = vector.metagradient(z, schedule)
            batched.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            grads = [single.metagradient(z, schedule)[1] for single in singles]
            separate.append(time.perf_counter() - t0)
        error = float(np.max(np.abs(jacobian - np.stack(grads))) / np.max(np.abs(np.stack(grads))))
        row = {"m": m, "batched_s": statistics.median(batched), "separate_s": statistics.median(separate),
               "batched_samples": batched, "separate_samples": separate, "max_relative_difference": error}
        row["ratio"] = row["batched_s"] / row["separate_s"]
        rows.append(row)
        print(f"m={m:3d}: one call {row['batched_s']:.3f} s, {m} calls {row['separate_s']:.3f} s, "
              f"ratio {row['ratio']:.3f}; max relative difference {error:.1e}", flush=True)

    lines = [f"# Many outputs at once (digits MLP, T = {args.steps}, {schedule!r}, backend {args.backend})", "",
             "| m | one call with m outputs (s) | m separate calls (s) | ratio | max relative difference |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['m']} | {r['batched_s']:.3f} | {r['separate_s']:.3f} | {r['ratio']:.3f} | "
              f"{r['max_relative_difference']:.1e} |" for r in rows]
    write_results("batched_outputs", lines, {"steps": args.steps, "schedule": repr(schedule), "rows": rows})


if __name__ == "__main__":
    main()
