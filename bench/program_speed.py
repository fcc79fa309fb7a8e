"""Programs at jax.jit speed? The runtime against jax.jit(lax.scan) on the same training step.

    python bench/program_speed.py [--kinds mlp_table,cnn,wide,transformer] [--steps 1000] [--repeat 5]
        [--fuse 1,10,100] [--segments 10,25] [--forms [--scan-fuse 10,100,1000]] [--training-only]

Everything is measured in this one process, the variants of a task alternating
``--repeat`` times (medians; wall time and the process's CPU time, which counts
every thread and is less sensitive to other processes on the machine).

Training (T steps from init):

* ``jax.jit(lax.scan)``: ``metagrad.baselines.train``, one jitted ``lax.scan``
  over all steps on jaxlib's own CPU client;
* ``runtime: same program``: that very program (the same StableHLO, lowered by
  jax) compiled and executed once through the runtime's plugin
  (``metagrad.runtime``): the plugin's XLA against jaxlib's, one execution each;
* ``compiled.train, fuse_forward=n``: the runtime as users run it, one
  execution per ``n`` steps (unrolled ``advance_n`` programs);
* with ``--forms``: ``advance_n`` as a ``lax.scan`` of n steps
  (``task.compile(z, fuse_forward=n, loop="scan")``, n from ``--scan-fuse``).

Reverse, per step (one forward recomputation and one reverse each, as both
sides do them):

* runtime ``n = 1``: the reverse phase of ``StoreAll`` / T (T executions of ``step_vjp``);
* runtime ``n > 1``: the reverse phase of ``Periodic(every=T, block=n)`` / T
  (T/n executions of the fused ``segment_vjp_n``); with ``--forms`` also its
  scan form (JAX differentiates the loop, Enzyme each step);
* JAX: ``jax.jit`` of the vjp of an n-step ``lax.scan`` (``n = 1``: one step),
  run T/n times from Python with chained cotangents, / T.

``rev only`` subtracts each side's forward step (training / T: the runtime's
``fuse_forward=10``, JAX's scan). Results: ``bench/results/program_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from common import write_results

import jax
import jax.numpy as jnp
import numpy as np

import metagrad
from metagrad import baselines
from same_program import lowered_training, plugin_runner
from tasks import make_task


def _run_steps(task, state, z, data, t0, n: int):
    def body(s, i):
        return task.step(s, z, data, t0 + i), None
    return jax.lax.scan(body, state, jnp.arange(n, dtype=jnp.int32))[0]


def _jax_segment_vjp(task, n: int):
    """JAX's reverse of n steps from a state: the peer's unit of work per block."""
    def f(state, z, data, t0, s_bar, z_acc):
        _, pull = jax.vjp(lambda st, zz: _run_steps(task, st, zz, data, t0, n), state, z)
        sb, zb = pull(s_bar)
        return sb, jax.tree_util.tree_map(jnp.add, z_acc, zb)
    return jax.jit(f, donate_argnums=(4, 5))


def measure(entries: dict, repeat: int) -> dict:
    """entries: name -> fn() returning None (timed here) or the seconds it measured itself."""
    for fn in entries.values():
        fn()
    wall = {k: [] for k in entries}
    cpu = {k: [] for k in entries}
    for _ in range(repeat):
        for name, fn in entries.items():
            c0, t0 = time.process_time(), time.perf_counter()
            own = fn()
            wall[name].append(own if own is not None else time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: {"wall_s": statistics.median(wall[k]), "cpu_s": statistics.median(cpu[k]), "samples": wall[k]}
            for k in entries}


def _reverse_seconds(compiled, z, schedule) -> float:
    return compiled.metagradient(z, schedule, report=True)[2].seconds_reverse


def run_kind(kind: str, args) -> dict:
    T = args.steps
    task, z = make_task(kind, T)
    fuse = [n for n in args.fuse if n <= T]
    segments = [n for n in args.segments if n <= T and T % n == 0]
    compiled = {n: task.compile(z, fuse_forward=n) for n in fuse}
    scan_fuse = [n for n in (args.scan_fuse or fuse) if n <= T]
    scanned = {n: task.compile(z, fuse_forward=n, loop="scan") for n in scan_fuse if n > 1 and args.forms}
    c10 = compiled.get(10) or compiled[fuse[-1]]
    s10 = scanned.get(10) or (scanned[max(scanned)] if scanned else None)

    # -- training ---------------------------------------------------------------
    entries = {"jax.jit(lax.scan)": lambda: jax.block_until_ready(baselines.train(task, z)) and None}
    entries["runtime: same program"] = plugin_runner(*lowered_training(task, z), c10.client)
    for n, c in compiled.items():
        entries[f"compiled.train, fuse_forward={n}"] = lambda c=c: c.train(z) and None
    for n, c in scanned.items():
        entries[f"compiled.train, fuse_forward={n}, loop='scan'"] = lambda c=c: c.train(z) and None
    training = measure(entries, args.repeat)
    if args.training_only:
        return {"steps": T, "training": training}

    # -- reverse, per step ------------------------------------------------------
    state0 = jax.jit(task.init)(z, task.data)
    entries = {"jax forward": lambda: jax.block_until_ready(baselines.train(task, z)) and None,
               "runtime forward": lambda: c10.train(z) and None,
               "runtime n=1": lambda: _reverse_seconds(c10, z, metagrad.StoreAll())}
    for n in [1] + segments:
        vjp = _jax_segment_vjp(task, n)

        def run_jax(vjp=vjp, n=n):
            s_bar = jax.tree_util.tree_map(jnp.ones_like, state0)
            z_acc = jax.tree_util.tree_map(jnp.zeros_like, z)
            for k in reversed(range(T // n)):
                s_bar, z_acc = vjp(state0, z, task.data, np.int32(k * n), s_bar, z_acc)
            jax.block_until_ready(z_acc)
        entries[f"jax n={n}"] = run_jax
        if n > 1:
            schedule = metagrad.Periodic(every=T, block=n)
            entries[f"runtime n={n}"] = lambda s=schedule: _reverse_seconds(c10.prepare(s), z, s)
            if s10 is not None:
                entries[f"runtime n={n}, loop='scan'"] = lambda s=schedule: _reverse_seconds(s10.prepare(s), z, s)
    reverse = measure(entries, args.repeat)
    return {"steps": T, "training": training, "reverse": reverse}


def report(kind: str, result: dict) -> str:
    T = result["steps"]
    tr, rv = result["training"], result.get("reverse")
    base = tr["jax.jit(lax.scan)"]
    lines = [f"\n### {kind} (T = {T}; medians of the repeats)\n",
             "| training | wall ms | / jax.jit | CPU ms | / jax.jit |", "|---|---|---|---|---|"]
    for name, m in tr.items():
        lines.append(f"| {name} | {m['wall_s'] * 1e3:.1f} | {m['wall_s'] / base['wall_s']:.2f}x | "
                     f"{m['cpu_s'] * 1e3:.1f} | {m['cpu_s'] / base['cpu_s']:.2f}x |")
    if rv is None:
        return "\n".join(lines)
    per = {k: v["wall_s"] / T * 1e6 for k, v in rv.items()}
    fj, fr = per["jax forward"], per["runtime forward"]
    lines += ["", f"forward per step: runtime {fr:.0f} us (fuse_forward=10), jax.jit(lax.scan) {fj:.0f} us", "",
              "| reverse per step, n steps per program | runtime us | JAX us | runtime / JAX | rev only: runtime us | "
              "JAX us | runtime / JAX |", "|---|---|---|---|---|---|---|"]
    for name, us in per.items():
        if not name.startswith("runtime n="):
            continue
        n = int(re.match(r"runtime n=(\d+)", name).group(1))
        j = per[f"jax n={n}"]
        lines.append(f"| {name.replace('runtime ', '')} | {us:.0f} | {j:.0f} | {us / j:.2f}x | {us - fr:.0f} | "
                     f"{j - fj:.0f} | {(us - fr) / (j - fj):.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp_table,cnn,wide")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fuse", type=lambda s: [int(x) for x in s.split(",")], default=[1, 10, 100])
    parser.add_argument("--segments", type=lambda s: [int(x) for x in s.split(",")], default=[10, 25],
                        help="fused reverse lengths (an unrolled segment_vjp_100 compiles for minutes)")
    parser.add_argument("--forms", action="store_true", help="also lax.scan forms of advance_n and segment_vjp_n")
    parser.add_argument("--scan-fuse", type=lambda s: [int(x) for x in s.split(",")],
                        help="with --forms: the forward lengths of the scan-form training (default: --fuse)")
    parser.add_argument("--training-only", action="store_true", help="skip the reverse per step")
    parser.add_argument("--out", default="program_speed", help="results/<out>.{md,json}")
    args = parser.parse_args(argv)
    results, markdown = {"args": vars(args), "tasks": {}}, ["# Programs at jax.jit speed"]
    for kind in args.kinds.split(","):
        results["tasks"][kind] = run_kind(kind, args)
        markdown.append(report(kind, results["tasks"][kind]))
        print(markdown[-1], flush=True)
    write_results(args.out, markdown, results)


if __name__ == "__main__":
    main()
