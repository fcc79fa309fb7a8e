"""The main comparison: metagrad's runtime vs JAX's own metagradients, side by side.

    python bench/compare.py                      # mlp, cnn, wide; T = 100, 1000, 10000
    python bench/compare.py --max-steps 1000     # skip the largest sizes (about 15 minutes here)
    python bench/compare.py --kinds mlp --steps 1000,10000

Tasks (bench/tasks.py): the digits MLP of the paper's setup, a small
average-pool CNN and a wider, compute-bound MLP; z = per-example weights.

Rows, each measured in its own subprocess (clean process peak RSS, and a
crash or a limit hits only that cell):

* training (runtime)      metagrad-bench: init + T steps in the C++ runtime;
* metagrad, Enzyme        metagrad-bench: the metagradient with binomial checkpointing
                          (Budget / revolve) holding at most 32 log_32(T) states --
                          the memory of the paper's REPLAY with k = 32 -- on blocks of
                          10 steps (fused reverse), reverse programs from Enzyme;
* metagrad, JAX reverse   the same with reverse programs from JAX's autodiff;
* JAX train (lax.scan)    metagrad.baselines.train, for reference;
* JAX scan store-all      jax.value_and_grad through lax.scan (all residuals);
* JAX scan + checkpoint   the same with jax.checkpoint on segments of sqrt(T) steps;
* JAX Python REPLAY       REPLAY(k) driven from Python with jitted step / step-vjp.

Times are medians over --repeat runs after one warm-up run (compilation is
excluded everywhere); ``/train`` divides by the training (runtime) row of the
same T. Memory: ``device`` is the bytes a method holds on the device -- for the
runtime (peak saved states + current state + cotangent) x state bytes + the
largest temporary buffer of the reverse programs it runs; for the jitted JAX
baselines XLA's compiled memory analysis (arguments + outputs + temporaries);
for Python REPLAY its peak live states plus the step-vjp's temporaries.
``RSS`` is the process's peak resident set (compilation included).

A cell that runs past --timeout seconds or --mem-limit-gb of RSS is killed and
the table says so. Writes bench/results/compare.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import (BENCH_DIR, add_cell_arguments, fmt_bytes, harness_path, machine_notes, replay_device_bytes,
                    run_limited, save_json, save_text)

SCHEDULE_K, SCHEDULE_BLOCK = 32, 10


def state_bound(T: int, k: int = SCHEDULE_K) -> int:
    """The paper's REPLAY memory, k * log_k(T) states."""
    return max(1, math.floor(k * math.log(T) / math.log(k)))


def schedule(T: int) -> str:
    """metagrad's schedule at T: binomial checkpointing (Budget) with k*log_k(T) states, fused blocks."""
    return f"budget:{state_bound(T)}:{SCHEDULE_BLOCK}"


JAX_ROWS = ("jax_train", "scan_storeall", "scan_checkpoint", "python_replay")
LABELS = {
    "train": "training (runtime)",
    "metagrad_enzyme": f"metagrad, Enzyme (Budget {SCHEDULE_K} log_{SCHEDULE_K} T states, block {SCHEDULE_BLOCK})",
    "metagrad_jax": "metagrad, JAX reverse (same schedule)",
    "jax_train": "JAX train (lax.scan)",
    "scan_storeall": "JAX scan store-all",
    "scan_checkpoint": "JAX scan + checkpoint(sqrt T)",
    "python_replay": f"JAX Python REPLAY (k={SCHEDULE_K})",
}


# --------------------------------------------------------------------------- #
# the JAX worker (runs in its own process)
# --------------------------------------------------------------------------- #

def worker(spec: dict) -> dict:
    import statistics

    import jax

    from metagrad import baselines
    from tasks import make_task

    kind, T, method, repeat = spec["kind"], spec["steps"], spec["method"], spec["repeat"]
    task, z = make_task(kind, T)
    device = None
    if method == "jax_train":
        run = lambda: jax.block_until_ready(baselines.train(task, z))  # noqa: E731
    elif method in ("scan_storeall", "scan_checkpoint"):
        every = None if method == "scan_storeall" else max(1, round(math.sqrt(T)))
        run = lambda: jax.block_until_ready(baselines.scan_metagradient(task, z, checkpoint_every=every))  # noqa: E731
        device = baselines.memory_stats(task, z, checkpoint_every=every)["total_bytes"]
    elif method == "python_replay":
        stats = {}
        run = lambda: jax.block_until_ready(baselines.replay_metagradient(task, z, k=SCHEDULE_K, stats=stats))  # noqa: E731
        run()
        device = replay_device_bytes(stats, baselines.memory_stats(task, z, method="replay"))
    else:
        raise ValueError(method)
    run()  # warm-up (compiles)
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(samples), "samples": samples, "device_bytes": device,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# --------------------------------------------------------------------------- #
# the driver
# --------------------------------------------------------------------------- #

def harness_cell(task_dir: str, T: int, repeat: int, timeout: float, mem_limit: int, extra: list[str]) -> dict:
    command = [harness_path(), task_dir, "--json", "--steps", str(T),
               "--schedule", schedule(T), "--repeat", str(repeat), "--dispatch-iters", "0", *extra]
    return run_limited(command, timeout, mem_limit)


def metagrad_row(out: dict) -> dict:
    m = out["metagradient"][0]
    state_bytes = out["info"]["state_bytes"]
    device = (m["peak_saved_states"] + 2) * state_bytes + max(0, m["reverse_program_temp_bytes"])
    return {"status": "ok", "seconds": m["seconds"]["median"], "device_bytes": device,
            "peak_rss_bytes": out["peak_rss_bytes"], "peak_saved_states": m["peak_saved_states"],
            "forward_steps": m["forward_steps"], "value": m["value"], "own_train_seconds": out["train"]["seconds"]["median"]}


def prepare(kind: str, backend: str, directory: str, timeout: float) -> None:
    command = [sys.executable, os.path.join(BENCH_DIR, "save_task.py"), kind, "--steps", "100", "--backend", backend,
               "--block", str(SCHEDULE_BLOCK), "--out", directory]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"saving {kind}/{backend} failed:\n{done.stderr[-2000:]}")


def table(results: dict) -> str:
    lines = []
    for kind, per_t in results["tasks"].items():
        lines.append(f"\n### {kind}\n")
        lines.append("| T | method | time (s) | / train | / fastest JAX metagrad | device memory | process peak RSS |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|")
        for T, rows in per_t.items():
            train = rows.get("train", {}).get("seconds")
            jax_best = min((rows[m]["seconds"] for m in ("scan_storeall", "scan_checkpoint", "python_replay")
                            if rows.get(m, {}).get("status") == "ok"), default=None)
            for method, label in LABELS.items():
                row = rows.get(method)
                if row is None:
                    continue
                if row["status"] != "ok":
                    lines.append(f"| {T} | {label} | {row['status']}: {row['reason']} | | | | |")
                    continue
                s = row["seconds"]
                ratio = f"{s / train:.2f}x" if train else "-"
                vs_jax = (f"{s / jax_best:.2f}x" if jax_best and method not in ("train", "jax_train") else "")
                extra = (f" ({row['peak_saved_states']} states)" if "peak_saved_states" in row else "")
                lines.append(f"| {T} | {label} | {s:.3f} | {ratio} | {vs_jax} | {fmt_bytes(row.get('device_bytes'))}"
                             f"{extra} | {fmt_bytes(row.get('peak_rss_bytes'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(results["tasks"])
    colors = {method: plt.get_cmap("tab10")(i) for i, method in enumerate(LABELS)}
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        per_t = results["tasks"][kind]
        for method, label in LABELS.items():
            ts, secs, mems = [], [], []
            for T, rows in per_t.items():
                row = rows.get(method)
                if row and row["status"] == "ok":
                    ts.append(int(T))
                    secs.append(row["seconds"])
                    mems.append(row.get("device_bytes") or float("nan"))
            if ts:
                axes[0][col].plot(ts, secs, "o-", label=label, color=colors[method])
                if method not in ("train", "jax_train"):
                    axes[1][col].plot(ts, [m / 2**20 for m in mems], "o-", label=label, color=colors[method])
        axes[0][col].set(title=f"{kind}: time", xscale="log", yscale="log", xlabel="T (steps)", ylabel="seconds")
        axes[1][col].set(title=f"{kind}: device memory", xscale="log", yscale="log", xlabel="T (steps)",
                         ylabel="MiB")
        for ax in axes[:, col]:
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, kinds="mlp,cnn,wide", steps="100,1000,10000", repeat=0,
                       repeat_help="timed runs per cell (0: 3 for T <= 1000, else 1)", out="compare")
    parser.add_argument("--no-fused-forward", action="store_true", help="runtime: one execution per forward step")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    steps = [int(s) for s in args.steps.split(",") if args.max_steps is None or int(s) <= args.max_steps]
    mem_limit = int(args.mem_limit_gb * 2**30)
    extra = ["--no-fused-forward"] if args.no_fused_forward else []
    results = {"machine": machine_notes(), "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
               "schedule": {str(T): schedule(T) for T in steps}, "fused_forward": not args.no_fused_forward,
               "tasks": {}}
    start = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="metagrad-compare-")
    for kind in args.kinds.split(","):
        dirs = {}
        for backend in ("enzyme", "jax"):
            dirs[backend] = os.path.join(workdir, f"{kind}-{backend}")
            t0 = time.perf_counter()
            prepare(kind, backend, dirs[backend], args.timeout)
            print(f"[{time.perf_counter() - start:6.0f} s] saved {kind}/{backend} in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        per_t = results["tasks"].setdefault(kind, {})
        for T in steps:
            repeat = args.repeat or (3 if T <= 1000 else 1)
            rows = per_t.setdefault(str(T), {})
            for backend in ("enzyme", "jax"):
                out = harness_cell(dirs[backend], T, repeat, args.timeout, mem_limit, extra)
                key = f"metagrad_{backend}"
                if out["status"] != "ok":
                    rows[key] = out
                    continue
                rows[key] = metagrad_row(out)
                if backend == "enzyme":
                    rows["train"] = {"status": "ok", "seconds": out["train"]["seconds"]["median"],
                                     "peak_rss_bytes": out["peak_rss_bytes"], "device_bytes": None,
                                     "fused_forward": out.get("fused_forward", "")}
            for method in JAX_ROWS:
                spec = {"kind": kind, "steps": T, "method": method, "repeat": repeat}
                command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
                rows[method] = run_limited(command, args.timeout, mem_limit)
            summary = ", ".join(f"{m}={r['seconds']:.2f}s" if r["status"] == "ok" else f"{m}={r['status']}"
                                for m, r in rows.items())
            print(f"[{time.perf_counter() - start:6.0f} s] {kind} T={T}: {summary}", file=sys.stderr)
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            save_json(args.out + ".json", results)
    results["seconds_total"] = time.perf_counter() - start
    results["machine"]["loadavg_end"] = os.getloadavg()
    markdown = (f"Command: `python bench/compare.py {' '.join(sys.argv[1:])}`; metagrad schedules "
                f"{', '.join(f'T={T}: {schedule(T)}' for T in steps)}; "
                f"forward {'fused (advance_10, unrolled)' if not args.no_fused_forward else 'one execution per step'}; "
                f"{results['seconds_total']:.0f} s in all.\n" + table(results))
    save_json(args.out + ".json", results)
    save_text(args.out + ".md", markdown)
    try:
        plot(results, args.out + ".png")
    except Exception as error:  # the table matters more than the figure
        print(f"plot failed: {error}", file=sys.stderr)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
