"""Checkpointing schedules on the digits MLP: time and memory vs T.

    python bench/replay.py [--steps 100,1000,10000] [--no-fused-forward]

The paper's digits setup (64-256-10 MLP, batch 128, SGD with momentum,
per-example weights as z). For each T, one metagrad-bench process (no Python
inside) times training and every schedule, interleaved, and reports for each:
metagradient time / training time (same process), forward steps (first pass
included), executions, peak saved states and bytes, and the largest temporary
buffer of the reverse programs it runs (a fused block's residuals live there).

Schedules: Replay(k) for k in 2..32 with blocks of 1 and of 10 steps (fused
reverse of 10 steps), revolve (Budget) with the same number of states as
Replay(4), revolve with 32*log_32(T) states on blocks of 10 (compare.py's
choice), and, where T states fit in --storeall-limit-mb, StoreAll and
Periodic(every=T, block=10) (every block start saved: no replay, the fastest
any schedule can be). ``bound`` is k*log_k(T), the paper's state count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

from common import RESULTS_DIR, machine_notes, run_harness, save_json, save_task

import metagrad
from tasks import make_task

BLOCK = 10


def schedules(T: int, state_bytes: int, storeall_limit: int):
    """(harness spec, k or None) for each schedule measured at T."""
    out = [(f"replay:{k}", k) for k in (2, 4, 8, 16, 32)]
    out += [(f"replay:{k}:{BLOCK}", k) for k in (4, 16, 32)]
    peak4 = metagrad.Replay(k=4).plan(T).stats(T)["peak_saved"]
    bound32 = math.floor(32 * math.log(T) / math.log(32))
    out += [(f"budget:{peak4}", None), (f"budget:{bound32}:{BLOCK}", 32)]
    if T * state_bytes <= storeall_limit:
        out += [("storeall", None), (f"periodic:{T}:{BLOCK}", None)]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="100,1000,10000")
    parser.add_argument("--backend", default="enzyme", choices=("enzyme", "jax"))
    parser.add_argument("--repeat", type=int, default=0, help="0: 5 at T <= 100, 3 at T <= 1000, else 1")
    parser.add_argument("--no-fused-forward", action="store_true")
    parser.add_argument("--storeall-limit-mb", type=float, default=2048)
    parser.add_argument("--task-dir", help="reuse a directory written by bench/save_task.py (mlp, --block 10)")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]

    task_dir = args.task_dir
    if task_dir is None:
        task_dir = tempfile.mkdtemp(prefix="metagrad-replay-")
        t0 = time.perf_counter()
        task, z = make_task("mlp", 100)
        save_task(task.compile(z, backend=args.backend, fuse_forward=BLOCK), task_dir, blocks=(BLOCK,))
        print(f"compiled and saved the task in {time.perf_counter() - t0:.1f} s ({task_dir})", file=sys.stderr)
    with open(os.path.join(task_dir, "manifest.json")) as f:
        state_bytes = sum(math.prod(leaf["shape"]) * 4 for leaf in json.load(f)["state"])

    results = {"machine": machine_notes(), "backend": args.backend, "fused_forward": not args.no_fused_forward,
               "runs": []}
    for T in steps:
        plan = schedules(T, state_bytes, int(args.storeall_limit_mb * 2**20))
        repeat = args.repeat or (5 if T <= 100 else 3 if T <= 1000 else 1)
        extra = ["--no-fused-forward"] if args.no_fused_forward else []
        out = run_harness(task_dir, ["--steps", str(T), "--schedule", ",".join(s for s, _ in plan),
                                     "--repeat", str(repeat), "--dispatch-iters", "0", *extra])
        train = out["train"]["seconds"]["median"]
        print(f"\nT = {T}: training {train:.3f} s ({train / T * 1e6:.0f} us/step; forward "
              f"{'fused ' + out['fused_forward'] if out['fused_forward'] else 'one execution per step'}); "
              f"median of {repeat}")
        print(f"  {'schedule':18s} {'time s':>8s} {'/train':>7s} {'fwd/T':>6s} {'execs':>6s} {'states':>6s} "
              f"{'bound':>6s} {'saved MiB':>9s} {'+temp MiB':>9s}")
        for (spec, k), m in zip(plan, out["metagradient"]):
            bound = k * math.log(T) / math.log(k) if k else None
            row = {"T": T, "schedule": m["schedule"], "seconds": m["seconds"]["median"],
                   "ratio_to_train": m["ratio_to_train"], "forward_steps": m["forward_steps"],
                   "executions": m["executions"], "peak_saved_states": m["peak_saved_states"],
                   "peak_saved_bytes": m["peak_saved_bytes"], "reverse_temp_bytes": m["reverse_program_temp_bytes"],
                   "bound_k_log_k_T": bound, "train_seconds": train, "value": m["value"]}
            results["runs"].append(row)
            print(f"  {m['schedule']:18s} {row['seconds']:8.3f} {row['ratio_to_train']:6.2f}x "
                  f"{row['forward_steps'] / T:6.2f} {row['executions']:6d} {row['peak_saved_states']:6d} "
                  f"{'' if bound is None else f'{bound:.0f}':>6s} {row['peak_saved_bytes'] / 2**20:9.2f} "
                  f"{row['reverse_temp_bytes'] / 2**20:9.2f}")
    name = "replay" + ("_unfused" if args.no_fused_forward else "") + ".json"
    save_json(os.path.join(RESULTS_DIR, name), results)


if __name__ == "__main__":
    main()
