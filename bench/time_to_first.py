"""Time to the first metagradient, as a new user meets it: a fresh process, an empty cache.

For each model of a ladder (the digits MLP and CNN of ``tasks.py``, the
transformer LM of ``tasks.py`` at 1, 2, 4 and 8 layers, and the Flax
transformer of ``compile_cache.py``), three fresh processes run one after
another, never beside other work:

- JAX: ``jax.jit(jax.value_and_grad(objective))`` compiled and called once,
  where ``objective(z)`` runs ``init``, a ``lax.scan`` of the ``step`` under
  ``jax.checkpoint`` and ``output``: the five lines a user would write instead;
- metagrad, cold: ``task.compile(z)`` and the first ``metagradient(z)`` (the
  default schedule), with an empty compile-cache directory; the set-up
  phases of both (``CompiledTask.setup`` and ``Report.setup_seconds``);
- metagrad, warm: the same in another fresh process with that cache.

The target: metagrad cold at most 1.5x JAX on every rung, its growth from 1 to
8 layers no steeper than JAX's, and the warm process at most 10% of the cold one.

    python bench/time_to_first.py [--rungs mlp,cnn,lm1,lm2,lm4,lm8,flax] [--steps 200]

Writes bench/results/time_to_first.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import BENCH_DIR, RESULTS_DIR, write_results

RUNGS = ("mlp", "cnn", "lm1", "lm2", "lm4", "lm8", "flax")
LATER_CALLS_LIMIT = 2000  # --calls: the cold process calls on until Auto adopts its fused programs, at most this often
TARGET = 1.5  # metagrad's cold time to a first metagradient / JAX's compile and first call
WARM_TARGET = 0.10  # a second process with the cache / the first


def make(rung: str, steps: int):
    """``(task, z)`` of a rung of the ladder."""
    import tasks

    if rung.startswith("lm"):
        tasks.LM["blocks"] = int(rung[2:])
        return tasks.make_task("transformer", steps)
    if rung == "flax":
        from compile_cache import make as make_cached

        return make_cached("transformer")  # its own T (50): the Flax model is the slowest to compile
    return tasks.make_task(rung, steps)


def parameters(task, z) -> int:
    import jax
    import numpy as np

    params = jax.eval_shape(lambda: task.init(z, task.data))[0]
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def jax_first(rung: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    task, z = make(rung, steps)
    data = jax.tree_util.tree_map(jnp.asarray, task.data)

    def objective(z):
        state = task.init(z, data)
        body = jax.checkpoint(lambda s, t: (task.step(s, z, data, t), None))
        state, _ = jax.lax.scan(body, state, jnp.arange(task.steps, dtype=jnp.int32))
        return task.output(state, z, data)

    start = time.perf_counter()
    value, grad = jax.jit(jax.value_and_grad(objective))(jnp.asarray(z))
    jax.block_until_ready(grad)
    return {"seconds": time.perf_counter() - start, "value": float(value), "steps": task.steps,
            "parameters": parameters(task, z), "grad_norm": float(np.linalg.norm(np.asarray(grad)))}


def metagrad_first(rung: str, steps: int, calls: int = 1) -> dict:
    import numpy as np

    task, z = make(rung, steps)
    start = time.perf_counter()
    compiled = task.compile(z)
    compile_seconds = time.perf_counter() - start
    compile_setup = dict(compiled.setup.seconds)  # compiled.setup goes on to gather the calls' set-up
    compile_setup_programs = set(compiled.setup.compile_seconds)
    value, grad, report = compiled.metagradient(z, report=True)
    seconds = time.perf_counter() - start
    first_setup = dict(compiled.setup.seconds)
    later, adopted = [], 0
    while len(later) < calls - 1 or (adopted == 0 and len(later) < LATER_CALLS_LIMIT and calls > 1):
        begin = time.perf_counter()  # Auto's next calls: the second starts the background build
        _, _, after = compiled.metagradient(z, report=True)
        later.append({"seconds": time.perf_counter() - begin, "started": begin - start, "run_seconds": after.seconds_total,
                      "setup": dict(after.setup_seconds), "schedule": after.schedule})
        if not adopted and not any(note in after.schedule for note in ("(first call", "build in the background")):
            adopted = len(later) + 1  # the call (counting the first) that planned over the fused programs
    background = {k: v - first_setup.get(k, 0.0) for k, v in compiled.setup.seconds.items()}
    background = {k: v - sum(c["setup"].get(k, 0.0) for c in later) for k, v in background.items()}
    return {"seconds": seconds, "later_calls": later, "adopted_at_call": adopted, "background_setup": background,
            "background_xla_per_program": {k: v for k, v in compiled.setup.compile_seconds.items()
                                           if k not in report.compile_seconds and k not in compile_setup_programs},
            "compile_seconds": compile_seconds, "call_seconds": seconds - compile_seconds,
            "compile_setup": compile_setup, "call_setup": dict(report.setup_seconds),
            "xla_per_program": {**compiled.setup.compile_seconds, **report.compile_seconds},
            "run_seconds": report.seconds_total, "schedule": report.schedule, "value": float(value),
            "grad_norm": float(np.linalg.norm(np.asarray(grad)))}


def child(method: str, rung: str, steps: int, cache_dir: str | None, calls: int = 1) -> dict:
    """One fresh process: ``method`` on ``rung``. The arguments go on the command line, not into
    the code: JAX's exports carry source locations, and a cache keyed by them misses when the
    calling line's text differs between the cold and the warm process."""
    env = dict(os.environ)
    if cache_dir:
        env["METAGRAD_CACHE_DIR"] = cache_dir
    code = (f"import json, sys; sys.path.insert(0, {BENCH_DIR!r}); import time_to_first as m; "
            "print('RESULT ' + json.dumps(m.run_child(*sys.argv[1:])))")
    done = subprocess.run([sys.executable, "-c", code, method, rung, str(steps), str(calls)], capture_output=True,
                          text=True, env=env, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{method} on {rung} failed:\n{done.stderr[-3000:]}")


def run_child(method: str, rung: str, steps: str, calls: str) -> dict:
    if method == "jax_first":
        return jax_first(rung, int(steps))
    return metagrad_first(rung, int(steps), int(calls))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["rung"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    ax.bar([i - width for i in x], [r["jax"]["seconds"] for r in rows], width, label="JAX: compile + first call")
    ax.bar(list(x), [r["metagrad"]["seconds"] for r in rows], width, label="metagrad: compile + first metagradient")
    ax.bar([i + width for i in x], [r["warm"]["seconds"] for r in rows], width, label="metagrad, warm cache")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("seconds (fresh process)")
    ax.set_title("Time to the first metagradient")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], steps: int, rungs: str, load, repeat: int) -> list[str]:
    def phases(setup: dict) -> str:
        return ", ".join(f"{k} {v:.1f}" for k, v in setup.items() if v >= 0.05) or "-"

    def spread(r: dict) -> str:
        ratios = [m / j for m, j in zip(r["samples"]["metagrad"], r["samples"]["jax"])]
        return f"{min(ratios):.2f}-{max(ratios):.2f}x"

    md = [f"# Time to the first metagradient (fresh processes, empty cache; T = {steps}, the Flax model 50)", "",
          f"Command: `python bench/time_to_first.py --rungs {rungs} --steps {steps} --repeat {repeat}`. "
          f"Load average before: {load[0]:.2f}; every process ran alone. Each figure is the median of {repeat} "
          "fresh-process runs (each repeat with its own empty cache); the ratio's range is over the repeats.", "",
          "| model | parameters | JAX: compile + first call | metagrad: `compile` | + first `metagradient` "
          "| total | / JAX | warm cache: total (share) | warm `compile` / cold | compile phases (s) "
          "| first call's phases (s) | its plan |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        m, w = r["metagrad"], r["warm"]
        met = "met" if r["ratio"] <= TARGET else "missed"
        md.append(f"| {r['rung']} | {r['jax']['parameters']:,} | {r['jax']['seconds']:.1f} s | "
                  f"{m['compile_seconds']:.1f} s | {m['call_seconds']:.1f} s (run {m['run_seconds']:.2f}) | "
                  f"{m['seconds']:.1f} s | **{r['ratio']:.2f}x** ({met}; {spread(r)}) | {w['seconds']:.1f} s "
                  f"({100 * r['warm_share']:.0f}%) | {100 * w['compile_seconds'] / m['compile_seconds']:.0f}% | "
                  f"{phases(m['compile_setup'])} | {phases(m['call_setup'])} | "
                  f"{m['schedule'].split(' -> ')[-1].split(' (')[0]} |")
    by = {r["rung"]: r for r in rows}
    if "lm1" in by and "lm8" in by:
        growth = {k: by["lm8"][k]["seconds"] / by["lm1"][k]["seconds"] for k in ("jax", "metagrad")}
        md += ["", f"Growth from 1 to 8 layers: JAX {growth['jax']:.2f}x, metagrad {growth['metagrad']:.2f}x "
                   f"({'no steeper' if growth['metagrad'] <= growth['jax'] else 'steeper'})."]
    md += ["", f"Target: total / JAX <= {TARGET}x; warm cache <= {WARM_TARGET:.0%} of the cold process. The first "
               "call plans over single-step reverses (`Auto`'s first call); the second starts building the fused "
               "reverses in the background (no call waits for them), which this table does not include. The warm "
               "total includes the first call's run, which "
               "no cache shortens; `warm compile / cold` compares `task.compile` alone."]
    return md


def later_markdown(rows: list[dict], calls: int) -> list[str]:
    """The cold process's calls after the first, as runs of calls on the same plan."""
    md = ["", f"The cold process's later calls (`--calls {calls}`: after the first, calls follow one another until "
              f"`Auto` plans over the fused programs its second call started building in the background, and at "
              f"least {calls} calls in all). Calls on the same plan are one line (median seconds, range):", "",
          "| model | calls | seconds (median, range) | run | set-up phases (s) | plan |",
          "|---|---|---:|---:|---|---|"]
    for r in rows:
        m = r["metagrad"]
        calls_ = [{**m, "setup": m["call_setup"], "seconds": m["call_seconds"]}, *m["later_calls"]]
        groups = []  # runs of consecutive calls on one plan; a call with set-up starts its own
        for i, c in enumerate(calls_, start=1):
            if groups and groups[-1]["schedule"] == c["schedule"] and not c["setup"] and not groups[-1]["setup"]:
                groups[-1]["calls"].append((i, c))
            else:
                groups.append({"schedule": c["schedule"], "setup": c["setup"], "calls": [(i, c)]})
        for g in groups:
            numbers = [i for i, _ in g["calls"]]
            seconds = sorted(c["seconds"] for _, c in g["calls"])
            runs = sorted(c["run_seconds"] for _, c in g["calls"])
            span = f"{numbers[0]}" if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"
            spread = "" if len(seconds) == 1 else f" ({seconds[0]:.2f}-{seconds[-1]:.2f})"
            md.append(f"| {r['rung']} | {span} | {seconds[len(seconds) // 2]:.2f}{spread} | {runs[len(runs) // 2]:.2f} | "
                      f"{', '.join(f'{k} {v:.1f}' for k, v in g['setup'].items() if v >= 0.05) or '-'} | "
                      f"{g['schedule'].split(' -> ')[-1]} |")
    md += ["", "| model | fused plan from call | seconds from the start to that call | background build's set-up (s) "
               "| its XLA compiles (s) |", "|---|---:|---:|---|---|"]
    for r in rows:
        m = r["metagrad"]
        at = m["adopted_at_call"]
        when = f"{m['later_calls'][at - 2]['started']:.1f}" if at else "-"
        md.append(f"| {r['rung']} | {at or 'not within the calls'} | {when} | "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in m['background_setup'].items() if v >= 0.05) or '-'} | "
                  f"{', '.join(f'{k} {v:.1f}' for k, v in m['background_xla_per_program'].items()) or '-'} |")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rungs", default=",".join(RUNGS))
    parser.add_argument("--steps", type=int, default=200, help="training steps T (the Flax model has its own, 50)")
    parser.add_argument("--repeat", type=int, default=3, help="fresh-process runs of each method (median)")
    parser.add_argument("--calls", type=int, default=1,
                        help="metagradients in the cold process, at least (above 1: and on until Auto plans over "
                             "the fused programs built in the background); the later ones get tables of their own")
    parser.add_argument("--out", default="time_to_first", help="results name under bench/results/")
    parser.add_argument("--render", help="rewrite the table and plot from this results JSON, running nothing")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        rows, load = saved["rows"], saved["load_before"]
        name = os.path.splitext(os.path.basename(args.render))[0]
        md = markdown(rows, saved["steps"], ",".join(r["rung"] for r in rows), load, saved["repeat"])
        write_results(name, md, {k: v for k, v in saved.items() if k != "machine"})
        plot(rows, os.path.join(RESULTS_DIR, f"{name}.png"))
        return
    load = os.getloadavg()
    rows = []
    for rung in args.rungs.split(","):
        runs = {"jax": [], "metagrad": [], "warm": []}
        for _ in range(args.repeat):  # each repeat: its own empty cache, the three processes in turn
            with tempfile.TemporaryDirectory() as cache_dir:
                runs["jax"].append(child("jax_first", rung, args.steps, None))
                runs["metagrad"].append(child("metagrad_first", rung, args.steps, cache_dir, args.calls))
                runs["warm"].append(child("metagrad_first", rung, args.steps, cache_dir))
        # each method's median run (by its seconds), and every run's seconds for the spread
        row = {"rung": rung, **{k: sorted(v, key=lambda r: r["seconds"])[len(v) // 2] for k, v in runs.items()},
               "samples": {k: [r["seconds"] for r in v] for k, v in runs.items()}}
        row["ratio"] = row["metagrad"]["seconds"] / row["jax"]["seconds"]
        row["warm_share"] = row["warm"]["seconds"] / row["metagrad"]["seconds"]
        rows.append(row)
        print(f"{rung}: JAX {row['jax']['seconds']:.1f} s, metagrad {row['metagrad']['seconds']:.1f} s "
              f"({row['ratio']:.2f}x), warm {row['warm']['seconds']:.1f} s", file=sys.stderr)

    md = markdown(rows, args.steps, args.rungs, load, args.repeat)
    if args.calls > 1:
        md += later_markdown(rows, args.calls)
        md[2] = md[2].replace(f"--repeat {args.repeat}`", f"--repeat {args.repeat} --calls {args.calls} --out {args.out}`")
    write_results(args.out, md, {"steps": args.steps, "repeat": args.repeat, "calls": args.calls, "load_before": load,
                                 "rows": rows})
    plot(rows, os.path.join(RESULTS_DIR, f"{args.out}.png"))


if __name__ == "__main__":
    main()
