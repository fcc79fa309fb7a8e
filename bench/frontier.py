"""The time-memory frontier: metagrad's schedules and planner against JAX and Equinox at every memory budget.

    python bench/frontier.py --steps 1000                          # the four tasks at T = 1000
    python bench/frontier.py --kinds mlp_table,transformer --steps 10000 --out bench/results/frontier10k
    python bench/frontier.py --kinds mlp_table --steps 100 --repeat 1 --out /tmp/f   # a quick try
    python bench/frontier.py --render a.json b.json --out bench/results/frontier_all  # tables + plot again
        # (a (task, T) row of b.json replaces a.json's whole)
    python bench/frontier.py --kinds mlp_table --steps 1000 --scan-form --save-tasks /tmp/tasks   # compile only
    python bench/frontier.py --kinds mlp_table --steps 1000 --scan-form --tasks-from /tmp/tasks   # run them
        # (compile where enzyme-ad installs, run on a machine where it does not, e.g. a GPU's)

Tasks (bench/tasks.py): ``mlp_table`` (the digits MLP, batches read from a
``(T, 128)`` index table in ``data``), ``cnn``, ``wide`` and ``transformer``
(a 2-block causal LM with AdamW); z = per-example (per-sequence) weights.

Cells, one subprocess each (a clean process peak RSS; a crash or a limit hits
only that cell), for each task and T:

* training: the runtime's ``compiled.train(z)`` and ``jax.jit`` of one
  ``lax.scan`` (``baselines.train``, the unit of time: see below);
* with ``--scan-form``, also the task compiled with ``loop="scan"``: its
  training (100-step forward programs) and the planner on it
  (``Auto(memory=B)`` at the same budgets, and ``Auto()``), where it also
  considers fused reverses of 100 steps (a ``lax.scan`` over Enzyme-reversed
  steps); ``--budgets-from`` takes those budgets from the peers
  of an earlier result file, or ``--budgets`` names them, so these cells can run
  alone (``--skip`` the rest);
* metagrad: ``compiled.metagradient(z, schedule=...)`` for fixed schedules
  (``Budget(states=s, block=l)``, ``Replay(k)``, ``StoreAll()``,
  ``Periodic(every, block)``), the default ``metagradient(z)``, and the planner
  ``Auto(memory=B)`` at budgets B taken from the peers' measured memory (each
  peer's device bytes; the planner's budget counts the data and z, as the
  peers' do) and below the smallest of them;
* peers: JAX store-all (``baselines.scan_metagradient``), JAX
  ``jax.checkpoint`` segments of s steps (``checkpoint_every=s``), Python-driven
  REPLAY (``baselines.replay_metagradient``, k in {4, 32}), and Equinox's
  checkpointed scan (``equinox.internal.scan(kind="checkpointed",
  checkpoints=c)``, ``jax.value_and_grad`` through it, jitted).

The tasks are compiled and saved once per (task, T) (with the fused 10-step
reverse), and each metagrad cell loads the saved task (``metagrad.load``).

Time: each cell runs its method once to warm up (compiling the jitted peers)
and then ``--repeat`` times, each run followed by a run of JAX's training of
the same task (``baselines.train``) in the same process; ``x train`` is the
median of the per-run ratios. The machines are shared, and the load of other
processes changes from cell to cell: a ratio to a yardstick timed beside it
cancels most of that, so every comparison (tables, plot, targets) uses
``x train``; the median seconds are shown too. Device memory, in bytes a method holds on the device at
its peak, all counting the same things -- the arguments (z and the data), the
outputs (value and gradient) and everything in between:

* metagrad: the Report's ``peak_device_bytes`` (saved states, current state,
  cotangents and gradient accumulators, the running program's temporaries)
  plus the bytes of the data and z (which the runtime also holds);
* jitted JAX and Equinox: XLA's compiled memory analysis, argument + output +
  temp - alias bytes (``baselines.memory_stats``; for Equinox the
  executable's ``memory_analysis()``);
* Python REPLAY: its peak live states plus the argument + output + temp bytes
  of its largest program (the step's vjp, or the output's over the
  validation data).

``RSS`` is the cell's process peak resident set (compilation included).

Verdicts compare like with like. Every cell of a row is the median of the same
number of repeats, measured in the same run of this script (``--render`` of
several files takes each (task, T) row whole from one file). A method setting
enters once: a peer's parameter, or for metagrad the plan that ran on its
compile, whichever cells ran it (a fixed schedule, the default, the Auto budgets
that chose it), with the median ``x train`` of those cells, never its fastest.
The per-budget table takes as budgets the memory of every point on the peers'
and on metagrad's Pareto frontiers; at each it names the fastest peer that fits
and metagrad's fastest plan that fits, and checks the targets: metagrad <= 1.0x
the fastest peer that fits, and <= 0.8x where the budget is below JAX
checkpoint's smallest peak (the least memory of its segment-length sweep);
where no peer fits, metagrad must still run. "Fits" means device bytes with no
host memory (the peers use none); where an ``Auto`` plan kept states in host
memory, a second table compares device + host bytes. Also: the default within
1.1x of the best plan fitting its memory (among the plans of its own compile:
``loop='scan'`` cells are another), and training through the runtime <= 1.0x
``jax.jit(lax.scan)``; and the rows whose verdict would change if each plan
counted its fastest cell and host memory were not counted.

A cell that runs past --timeout seconds or --mem-limit-gb of RSS is killed and
the tables say so. Writes ``<out>.{md,json,png}`` (default bench/results/frontier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

from common import (add_cell_arguments, flat_leaves, fmt_bytes, machine_notes, replay_device_bytes, run_limited,
                    save_json, save_text)

PEERS = ("jax_storeall", "jax_checkpoint", "python_replay", "equinox")
TRAINING = ("train_runtime", "train_runtime_scan", "train_jax")
RUNTIME_TRAINING = {"train_runtime": "default compile", "train_runtime_scan": "loop='scan'"}  # method: its compile
BLOCK = 10  # the fused reverse block length of the block > 1 schedules (saved with each task)
TARGET_PEER, TARGET_BELOW_CHECKPOINT, TARGET_DEFAULT = 1.0, 0.8, 1.1


def merge_runs(parts) -> dict:
    """Runs of several result files by task and T. A row is measured whole, in one run of the benchmark:
    where two files hold the same (task, T), the later file's row replaces the earlier's entirely."""
    runs = {}
    for part in parts:
        runs.update(part)
    return runs


# --------------------------------------------------------------------------- #
# the sweeps
# --------------------------------------------------------------------------- #

def fixed_schedules(T: int) -> list[dict]:
    """metagrad's fixed schedules at T, as ``{"name": class name, "args": keyword arguments}``."""
    every = max(BLOCK, round(math.sqrt(T) / BLOCK) * BLOCK)
    out = [{"name": "Budget", "args": {"states": s, "block": 1}} for s in (8, 32, 128, 512) if s < T]
    out += [{"name": "Budget", "args": {"states": s, "block": BLOCK}} for s in (4, 8, 16, 32, 64, 256, 512)
            if s < T // BLOCK]
    out += [{"name": "Replay", "args": {"k": k}} for k in (4, 32)]
    out += [{"name": "Periodic", "args": {"every": every, "block": block}} for block in (1, BLOCK)]
    out += [{"name": "StoreAll", "args": {}}, {"name": "default", "args": {}}]
    return out


def peer_params(method: str, T: int) -> list:
    if method == "jax_storeall":
        return [None]
    if method == "jax_checkpoint":  # segment lengths around sqrt(T), the usual choice
        root = math.sqrt(T)
        return sorted({s for s in (10, round(root / 2), round(root), round(2 * root), T // 10) if 1 <= s < T})
    if method == "python_replay":
        return [4, 32]
    if method == "equinox":
        return [c for c in (8, 16, 32, 64, 128) if c < T]
    raise ValueError(method)


def auto_budgets(peer_cells: list[dict], base_bytes: int) -> list[int]:
    """Planner budgets: each peer's device bytes, and two below the smallest (still above the data and z)."""
    budgets = sorted(c["device_bytes"] for c in peer_cells
                     if c["status"] == "ok" and c.get("device_bytes") and c["device_bytes"] > base_bytes)
    if budgets:
        room = budgets[0] - base_bytes
        budgets = [base_bytes + room // 4, base_bytes + room // 2] + budgets
    kept = []
    for b in budgets:  # budgets within 5% of one already kept add nothing
        if not kept or b > kept[-1] * 1.05:
            kept.append(b)
    return kept


def label(cell: dict) -> str:
    method, p = cell["method"], cell.get("param")
    if method == "metagrad":
        if p["name"] == "default":
            return "metagrad default metagradient(z)"
        args = ", ".join(f"{k}={v}" for k, v in p["args"].items())
        return f"metagrad {p['name']}({args})"
    if method == "auto":
        return f"metagrad Auto(memory={fmt_bytes(p)})"
    if method == "auto_scan":
        return "metagrad Auto(), loop='scan'" if p is None else f"metagrad Auto(memory={fmt_bytes(p)}), loop='scan'"
    return {"train_runtime": "training, runtime compiled.train", "train_jax": "training, jax.jit(lax.scan)",
            "train_runtime_scan": "training, runtime compiled.train, loop='scan'",
            "jax_storeall": "JAX scan store-all", "jax_checkpoint": f"JAX scan + checkpoint every {p}",
            "python_replay": f"Python REPLAY k={p}", "equinox": f"Equinox checkpointed scan, {p} checkpoints"}[method]


def family(cell: dict) -> str:
    """The plot's curve a cell belongs to: one per method."""
    method, p = cell["method"], cell.get("param")
    if method == "metagrad":
        return "metagrad default" if p["name"] == "default" else "metagrad fixed schedules"
    return {"auto": "metagrad Auto", "auto_scan": "metagrad Auto, loop='scan'", "jax_storeall": "JAX store-all",
            "jax_checkpoint": "JAX checkpoint", "python_replay": "Python REPLAY", "equinox": "Equinox checkpointed"}.get(method, method)


# --------------------------------------------------------------------------- #
# cells (each runs in its own process)
# --------------------------------------------------------------------------- #

def _tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def prepare(spec: dict) -> dict:
    """Compile the task as a user would (``task.compile(z)``), with the fused BLOCK-step reverse, and save it;
    with ``spec["loop"] == "scan"``: ``task.compile(z, loop="scan")`` with every reverse ``Auto()`` considers."""
    import metagrad
    from tasks import make_task

    task, z = make_task(spec["kind"], spec["steps"])
    t0 = time.perf_counter()
    compiled = task.compile(z, loop=spec.get("loop", "unroll"))
    compiled.prepare(metagrad.Auto() if spec.get("loop") == "scan" else metagrad.Budget(states=2, block=BLOCK))
    seconds = time.perf_counter() - t0
    compiled.save(spec["task_dir"])
    return {"compile_seconds": seconds, "state_bytes": int(compiled.layout.state_bytes),
            "data_bytes": _tree_bytes(task.data), "z_bytes": _tree_bytes(z),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _schedule(param: dict):
    import metagrad

    return None if param["name"] == "default" else getattr(metagrad, param["name"])(**param["args"])


def _equinox_fn(task, checkpoints: int):
    """``jax.value_and_grad`` of phi(A(z)) through Equinox's checkpointed scan, jitted."""
    import equinox.internal as eqxi
    import jax
    import jax.numpy as jnp

    def objective(z, data):
        def body(state, t):
            return task.step(state, z, data, t), None

        state, _ = eqxi.scan(body, task.init(z, data), jnp.arange(task.steps, dtype=jnp.int32),
                             kind="checkpointed", checkpoints=checkpoints)
        return task.output(state, z, data)

    return jax.jit(jax.value_and_grad(objective))


def worker(spec: dict) -> dict:
    import jax
    import numpy as np

    import metagrad
    from metagrad import baselines
    from tasks import make_task

    method, param, T = spec["method"], spec.get("param"), spec["steps"]
    task, z = make_task(spec["kind"], T)
    out = {}
    device = None
    if method in ("metagrad", "auto", "auto_scan", *RUNTIME_TRAINING):
        compiled = metagrad.load(spec["task_dir"] + ("-scan" if method in ("auto_scan", "train_runtime_scan") else ""))
        base = _tree_bytes(task.data) + _tree_bytes(z)
        if method in RUNTIME_TRAINING:
            run = lambda: compiled.train(z)  # noqa: E731
        else:
            schedule = metagrad.Auto(memory=param) if method in ("auto", "auto_scan") else _schedule(param)
            kwargs = {} if schedule is None else {"schedule": schedule}
            if isinstance(schedule, (metagrad.Auto, type(None))):  # nothing left to build in the background
                compiled.prepare(schedule or metagrad.Auto())
            run = lambda: compiled.metagradient(z, report=True, **kwargs)  # noqa: E731
    elif method == "train_jax":
        run = lambda: jax.block_until_ready(baselines.train(task, z))  # noqa: E731
        device = baselines.memory_stats(task, z, method="train")["total_bytes"]
    elif method in ("jax_storeall", "jax_checkpoint"):
        run = lambda: jax.block_until_ready(baselines.scan_metagradient(task, z, checkpoint_every=param))  # noqa: E731
        device = baselines.memory_stats(task, z, checkpoint_every=param)["total_bytes"]
    elif method == "python_replay":
        stats = {}
        run = lambda: jax.block_until_ready(baselines.replay_metagradient(task, z, k=param, stats=stats))  # noqa: E731
    elif method == "equinox":
        executable = _equinox_fn(task, param).lower(z, task.data).compile()
        analysis = executable.memory_analysis()
        device = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
                     - analysis.alias_size_in_bytes)
        run = lambda: jax.block_until_ready(executable(z, task.data))  # noqa: E731
    else:
        raise ValueError(f"unknown method {method!r}")
    # The yardstick, JAX's training of the same task, runs after each timed run in this process: the ratio
    # of the two cancels most of the load other processes put on the machine at that moment.
    yardstick = lambda: jax.block_until_ready(baselines.train(task, z))  # noqa: E731
    result = run()  # warm-up: compiles the jitted peers
    yardstick()
    samples, ratios = [], []
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        result = run()
        t1 = time.perf_counter()
        yardstick()
        samples.append(t1 - t0)
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    if method in ("metagrad", "auto", "auto_scan"):
        value, grad, report = result
        device = int(report.peak_device_bytes) + base
        out["host_bytes"] = int(report.peak_host_bytes)
        out["report"] = {name: getattr(report, name) for name in (
            "schedule", "forward_steps", "executions", "peak_saved_states", "peak_device_bytes", "peak_host_bytes",
            "seconds_total", "predicted_peak_device_bytes", "predicted_seconds") if hasattr(report, name)}
        out["report"]["schedule"] = str(out["report"].get("schedule"))
    elif method == "python_replay":
        value, grad = result
        device = replay_device_bytes(stats, baselines.memory_stats(task, z, method="replay"))
        out["max_live_states"] = stats["max_live_states"]
    elif method not in TRAINING:
        value, grad = result
    if method not in TRAINING:
        out["value"] = float(np.asarray(value))
        out["grad_norm"] = float(np.linalg.norm(flat_leaves(grad)))
    out.setdefault("host_bytes", 0)  # the peers hold nothing in host memory
    return {"seconds": statistics.median(samples), "samples": samples, "x_train": statistics.median(ratios),
            "x_train_samples": ratios, "device_bytes": device,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **out}


# --------------------------------------------------------------------------- #
# analysis
# --------------------------------------------------------------------------- #

def _ok(cell) -> bool:
    return cell["status"] == "ok" and cell.get("device_bytes") is not None


def _pareto(cells: list[dict]) -> list[dict]:
    """The cells no other cell beats in both time and memory, by memory."""
    front = []
    for cell in sorted(cells, key=lambda c: (c["device_bytes"], c["x_train"])):
        if not front or cell["x_train"] < front[-1]["x_train"]:
            front.append(cell)
    return front


def _plan_of(cell: dict) -> str:
    """The plan a metagrad cell ran: a fixed schedule, or the one Auto chose."""
    schedule = cell.get("report", {}).get("schedule", "")
    return schedule.split(" -> ", 1)[1] if " -> " in schedule else schedule


def _auto_budget(cell: dict) -> int:
    schedule = cell.get("report", {}).get("schedule", "")
    return int(schedule.split("Auto(memory=", 1)[1].split(")", 1)[0]) if "Auto(memory=" in schedule else 0


def _host_bytes(cell: dict, state_bytes: int) -> int:
    """Host memory a cell held: the report's peak, or, for cells measured before it was recorded, an upper
    bound from the plan (each host slot holds at most one state at a time); 0 for the peers."""
    if "host_bytes" in cell:
        return cell["host_bytes"]
    schedule = cell.get("report", {}).get("schedule", "")
    if " of its slots in host memory" in schedule:
        return int(schedule.split(" of its slots in host memory")[0].rsplit(" ", 1)[1]) * state_bytes
    return 0


def candidates(cells: list[dict], state_bytes: int) -> list[dict]:
    """What the verdicts compare: one entry per method setting (a peer's parameter; for metagrad, the plan
    that ran on its compile), however many cells measured it, with the median of their ``x train``. Each
    cell is itself the median of the row's repeats, so a plan measured several times (a fixed schedule and
    the Auto budgets that chose it) enters once, not by its luckiest run."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["method"] in PEERS:
            key = (label(c),)
        else:
            key = ("loop='scan'" if c["method"] == "auto_scan" else "", _plan_of(c).split(" (host_memory=")[0])
        groups.setdefault(key, []).append(c)
    out = []
    for key, group in groups.items():
        xs = sorted(c["x_train"] for c in group)
        name = label(group[0]) if group[0]["method"] in PEERS else (
            f"metagrad {key[1]}" + (f", {key[0]}" if key[0] else ""))
        out.append({"key": key, "label": name, "x_train": statistics.median(xs), "runs": len(group), "spread": [xs[0], xs[-1]],
                    "device_bytes": max(c["device_bytes"] for c in group),
                    "host_bytes": max(_host_bytes(c, state_bytes) for c in group),
                    "auto": any(c["method"] in ("auto", "auto_scan") for c in group), "cells": [label(c) for c in group]})
    return out


def _fastest(cells: list[dict], budget: int, memory=lambda c: c["device_bytes"]):
    fits = [c for c in cells if memory(c) <= budget]
    return min(fits, key=lambda c: c["x_train"]) if fits else None


def _shown(candidate) -> str:
    if candidate is None:
        return "none"
    if candidate["runs"] == 1:
        return candidate["label"]
    low, high = candidate["spread"]
    return f"{candidate['label']} (median of {candidate['runs']} cells, {low:.2f}-{high:.2f}x)"


def _rows(peers: list[dict], ours: list[dict], checkpoint_floor: float, memory) -> list[dict]:
    """Per budget (the memory of every point on the peers' and metagrad's Pareto frontiers): the fastest peer
    and metagrad candidate that fit, and the target's verdict."""
    def front(cells):
        return _pareto([{**c, "device_bytes": memory(c)} for c in cells])

    rows = []
    for budget in sorted({c["device_bytes"] for c in front(peers) + front(ours)}):
        peer, best = _fastest(peers, budget, memory), _fastest(ours, budget, memory)
        auto = _fastest([c for c in ours if c["auto"]], budget, memory)
        row = {"budget": budget, "peer": peer and _shown(peer), "peer_x": peer and peer["x_train"],
               "best": best and _shown(best), "best_x": best and best["x_train"],
               "auto": auto and _shown(auto), "auto_x": auto and auto["x_train"]}
        if peer is None:
            row["target"] = None
            row["verdict"] = "met: no peer fits, metagrad runs" if best else "missed: nothing fits"
        else:
            target = TARGET_BELOW_CHECKPOINT if budget < checkpoint_floor else TARGET_PEER
            row["target"] = target
            if best is None:
                row["verdict"] = "missed: no metagrad plan fits"
            else:
                row["ratio"] = best["x_train"] / peer["x_train"]
                row["verdict"] = ("met" if row["ratio"] <= target
                                  else f"missed by {100 * (row['ratio'] / target - 1):.0f}%")
        rows.append(row)
    return rows


def analyse(run: dict) -> dict:
    """Per-budget rows and target checks of one (task, T).

    Verdicts at equal device memory compare metagrad plans that kept nothing in host memory with the peers
    (which never do); where a plan used the host tier, a second set of rows compares device + host bytes.
    ``luckiest`` lists the rows whose verdict would change if each plan counted its fastest cell and host memory
    were not counted."""
    cells = run["cells"]
    state_bytes = run.get("prepare", {}).get("state_bytes", 0)
    repeats = sorted({len(c["x_train_samples"]) for c in cells if c["status"] == "ok" and "x_train_samples" in c})
    peer_cells = [c for c in cells if c["method"] in PEERS and _ok(c)]
    our_cells = [c for c in cells if c["method"] in ("metagrad", "auto", "auto_scan") and _ok(c)]
    peers, ours = candidates(peer_cells, state_bytes), candidates(our_cells, state_bytes)
    checkpoint = [c["device_bytes"] for c in cells if c["method"] == "jax_checkpoint" and _ok(c)]
    checkpoint_floor = min(checkpoint) if checkpoint else math.inf
    device_only = [c for c in ours if c["host_bytes"] == 0]
    rows = _rows(peers, device_only, checkpoint_floor, lambda c: c["device_bytes"])
    out = {"rows": rows, "repeats": repeats, "checkpoint_floor": None if math.isinf(checkpoint_floor)
           else checkpoint_floor}
    if len(device_only) < len(ours):
        out["total_rows"] = _rows(peers, ours, checkpoint_floor, lambda c: c["device_bytes"] + c["host_bytes"])
    # The rule a reviewer would distrust, for contrast: each plan by its fastest cell, host memory uncounted.
    single = [{**c, "label": c["label"] if c["runs"] == 1 else f"{c['label']} (fastest of {c['runs']} cells)",
               "x_train": c["spread"][0], "runs": 1} for c in ours]
    luckiest = {r["budget"]: r for r in _rows(peers, single, checkpoint_floor, lambda c: c["device_bytes"])}
    out["luckiest"] = [{"budget": r["budget"], "verdict": r["verdict"], "ratio": r.get("ratio"),
                        "luckiest_verdict": luckiest[r["budget"]]["verdict"],
                        "luckiest_ratio": luckiest[r["budget"]].get("ratio"), "luckiest_best": luckiest[r["budget"]]["best"]}
                       for r in rows if r["budget"] in luckiest and luckiest[r["budget"]]["verdict"] != r["verdict"]]
    # Training in each compile the row has; the target is judged on the faster, which a user can choose.
    forms = {RUNTIME_TRAINING[c["method"]]: c["x_train"] for c in cells
             if c["method"] in RUNTIME_TRAINING and c["status"] == "ok"}
    if forms:
        ratio = min(forms.values())
        out["training"] = {"ratio": ratio, "forms": forms,
                           "verdict": "met" if ratio <= 1.0 else f"missed by {100 * (ratio - 1):.0f}%"}
    default = next((c for c in our_cells if c["method"] == "metagrad" and c["param"]["name"] == "default"), None)
    if default is not None:
        budget = _auto_budget(default)  # Auto()'s (2 GiB on the CPU plugin), data and z included
        mine = next(c for c in ours if c["key"] == ("", _plan_of(default)))
        # the other plans the default's own compiled task ran (loop='scan' cells are another compile)
        others = [c for c in device_only if c["key"][0] == "" and c is not mine and c["device_bytes"] <= budget]
        best = min(others, key=lambda c: c["x_train"], default=None)
        if best is not None:
            ratio = mine["x_train"] / best["x_train"]
            out["default"] = {"x_train": mine["x_train"], "runs": mine["runs"], "spread": mine["spread"],
                              "device_bytes": mine["device_bytes"], "plan": _plan_of(default), "budget": budget,
                              "best": _shown(best), "best_x": best["x_train"], "ratio": ratio,
                              "compared": len(others),
                              "verdict": "met" if ratio <= TARGET_DEFAULT
                              else f"missed by {100 * (ratio / TARGET_DEFAULT - 1):.0f}%"}
    # every metagradient cell against JAX store-all (else the first peer): the same value and gradient
    reference = next((c for c in peer_cells if c["method"] == "jax_storeall"), peer_cells[0] if peer_cells else None)
    mismatches = []
    if reference is not None:
        for c in peer_cells + our_cells:
            dv = abs(c["value"] - reference["value"]) / max(abs(reference["value"]), 1e-30)
            dg = abs(c["grad_norm"] - reference["grad_norm"]) / max(reference["grad_norm"], 1e-30)
            if dv > 1e-4 or dg > 1e-2:
                mismatches.append(f"{label(c)}: value {c['value']:.6g} vs {reference['value']:.6g}, "
                                  f"|grad| {c['grad_norm']:.6g} vs {reference['grad_norm']:.6g}")
    out["mismatches"] = mismatches
    # the planner's own accounting against what the same runs measured
    reports = [c["report"] for c in our_cells if c["report"].get("predicted_peak_device_bytes")]
    timed = [r["seconds_total"] / r["predicted_seconds"] for r in reports if r.get("predicted_seconds")]
    if reports:
        out["planner"] = {"cells": len(reports),
                          "peak_as_predicted": sum(r["peak_device_bytes"] == r["predicted_peak_device_bytes"]
                                                   for r in reports),
                          "timed_cells": len(timed), "time_ratio": [min(timed), max(timed)] if timed else None}
    return out


# --------------------------------------------------------------------------- #
# output
# --------------------------------------------------------------------------- #

def _x(ratio) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def _budget_table(rows: list[dict], memory: str) -> list[str]:
    lines = [f"| budget ({memory}) | fastest peer that fits | x train | metagrad's best that fits "
             "| x train | Auto's best that fits | metagrad / peer | target | verdict |",
             "|---:|---|---:|---|---:|---|---:|---:|---|"]
    for row in rows:
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        target = f"<= {row['target']:.1f}x" if row["target"] else "-"
        lines.append(f"| {fmt_bytes(row['budget'])} | {row['peer'] or 'none'} | {_x(row['peer_x'])} "
                     f"| {row['best'] or 'none'} | {_x(row['best_x'])} | {row['auto'] or '-'} "
                     f"| {ratio} | {target} | {row['verdict']} |")
    return lines


def markdown(results: dict) -> str:
    rendered = f" Tables rendered by `{results['rendered_by']}`." if "rendered_by" in results else ""
    lines = [f"Command: `{results['command']}`; {results.get('seconds_total', 0):.0f} s in all; "
             f"load average {results['machine'].get('loadavg_start')} at the start, "
             f"{results['machine'].get('loadavg_end')} at the end. `x train`: median over {results['repeat']} "
             f"runs (after a warm-up) of the run's time / the time of `jax.jit(lax.scan)` training of the same "
             f"task and T timed right after it in the same process; every comparison uses it. Device memory "
             f"counts arguments (z, data), outputs and everything between, for every method (see the docstring). "
             f"Devices: {', '.join(results['machine'].get('devices', ['cpu']))}; metagrad's PJRT plugin: "
             f"{results['machine'].get('pjrt_plugin', 'xla_cpu_pjrt.so')}.{rendered}"]
    for key, run in results["runs"].items():
        analysis = analyse(run)
        info = run.get("prepare", {})
        lines.append(f"\n## {run['kind']}, T = {run['steps']}\n")
        if info.get("status") == "ok":
            data_z = fmt_bytes(info["data_bytes"] + info["z_bytes"])
            lines.append(f"State {fmt_bytes(info['state_bytes'])}, data + z {data_z} (counted in metagrad's device "
                         f"memory); compile + save {info['compile_seconds']:.0f} s.\n")
        else:
            lines.append(f"Compiling the task failed ({info.get('reason')}): no metagrad cells.\n")
        repeats = analysis["repeats"]
        if len(repeats) > 1:
            lines.append(f"**Not like for like**: the cells of this row are medians of {repeats} repeats.\n")
        lines += _budget_table(analysis["rows"], "device memory")
        if "total_rows" in analysis:
            lines.append("\nWith the plans that kept states in host memory, at equal device + host bytes (the "
                         "peers hold nothing in host memory):\n")
            lines += _budget_table(analysis["total_rows"], "device + host memory")
        if analysis["luckiest"]:
            lines.append("\nVerdicts that would change if each plan counted its fastest cell and host memory were "
                         "not counted:\n")
            lines.append("| budget | verdict (plan medians) | ratio | with the fastest cell | ratio | that cell |")
            lines.append("|---:|---|---:|---|---:|---|")
            for r in analysis["luckiest"]:
                lines.append(f"| {fmt_bytes(r['budget'])} | {r['verdict']} | {_x(r['ratio'])} "
                             f"| {r['luckiest_verdict']} | {_x(r['luckiest_ratio'])} | {r['luckiest_best']} |")
        floor = analysis["checkpoint_floor"]
        lines.append(f"\nJAX checkpoint's smallest peak: {fmt_bytes(floor) if floor else 'none ran'} "
                     f"(budgets below it: target 0.8x).")
        if "training" in analysis:
            t = analysis["training"]
            forms = t.get("forms", {"default compile": t["ratio"]})
            lines.append(f"Training through the runtime: "
                         f"{', '.join(f'{x:.2f}x ({form})' for form, x in forms.items())} `jax.jit(lax.scan)` "
                         f"(target <= 1.0x: {t['verdict']}).")
        if "default" in analysis:
            d = analysis["default"]
            runs = f" (median of {d['runs']} cells that ran it, {d['spread'][0]:.2f}-{d['spread'][1]:.2f}x)" \
                if d["runs"] > 1 else ""
            lines.append(f"Default `metagradient(z)` ran {d['plan']}: {_x(d['x_train'])} train{runs} at "
                         f"{fmt_bytes(d['device_bytes'])}; fastest of the {d['compared']} other plans of its compile "
                         f"within its budget ({fmt_bytes(d['budget'])} with data and z): {d['best']}; "
                         f"{d['ratio']:.2f}x (target <= 1.1x: {d['verdict']}).")
        if "planner" in analysis:
            p = analysis["planner"]
            timing = (f"; measured / predicted time {p['time_ratio'][0]:.2f}-{p['time_ratio'][1]:.2f} over the "
                      f"{p['timed_cells']} cells whose time it predicts (Auto and the default)" if p["time_ratio"] else "")
            lines.append(f"Planner: measured peak = predicted peak in {p['peak_as_predicted']} of {p['cells']} "
                         f"metagrad cells{timing}.")
        for m in analysis["mismatches"]:
            lines.append(f"**Value or gradient differs from JAX store-all**: {m}.")
        lines.append("\n| method | time (s) | x train | device memory | host memory | process peak RSS | notes |")
        lines.append("|---|---:|---:|---:|---:|---:|---|")
        for c in run["cells"]:
            if c["status"] != "ok":
                status, reason = c["status"], c["reason"]
                if "DeviceMemoryError: " in reason:  # the planner refused the budget, as it must
                    status, reason = "does not fit", reason.split("DeviceMemoryError: ", 1)[1]
                lines.append(f"| {label(c)} | {status}: {reason} | | | | | |")
                continue
            notes = []
            if "report" in c:
                r = c["report"]
                notes.append(f"{r['peak_saved_states']} states, {r['forward_steps']} forward steps")
                if c["method"] != "metagrad" or c["param"]["name"] == "default":  # what Auto chose
                    notes.append(f"plan {r['schedule']}")
                if r.get("predicted_seconds"):  # 0: a fixed schedule, whose time is not predicted
                    notes.append(f"predicted {r['predicted_seconds']:.3g} s")
                if r.get("predicted_peak_device_bytes"):
                    notes.append(f"predicted peak {fmt_bytes(r['predicted_peak_device_bytes'])}")
                if c["method"] != "metagrad" and c["param"] is not None:
                    fits = c["device_bytes"] <= c["param"]  # the budget counts the data and z
                    notes.append(f"peak {'within' if fits else 'OVER'} its budget")
            if "max_live_states" in c:
                notes.append(f"{c['max_live_states']} live states")
            lines.append(f"| {label(c)} | {c['seconds']:.3f} | {_x(c['x_train'])} | "
                         f"{fmt_bytes(c.get('device_bytes'))} | {fmt_bytes(_host_bytes(c, info.get('state_bytes', 0)))} "
                         f"| {fmt_bytes(c.get('peak_rss_bytes'))} | "
                         f"{'; '.join(notes)} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    # runs with nothing but training cells (a run stopped early) have no frontier to draw
    runs = [r for r in results["runs"].values() if any(c["method"] not in TRAINING and _ok(c) for c in r["cells"])]
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    steps = sorted({r["steps"] for r in runs})
    fig, axes = plt.subplots(len(steps), len(kinds), figsize=(5.5 * len(kinds), 4.5 * len(steps)), squeeze=False)
    families = sorted({family(c) for r in runs for c in r["cells"] if c["method"] not in TRAINING})
    colors = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(families)}
    for run in runs:
        ax = axes[steps.index(run["steps"])][kinds.index(run["kind"])]
        ax.set(title=f"{run['kind']}, T = {run['steps']}", xscale="log", yscale="log",
               xlabel="peak device memory (MiB)", ylabel="time / training time (jax.jit scan, same process)")
        for fam in families:
            cells = [c for c in run["cells"] if family(c) == fam and _ok(c)]
            if not cells:
                continue
            # every cell as a point; the method's curve through the cells no other of its cells beats
            ax.plot([c["device_bytes"] / 2**20 for c in cells], [c["x_train"] for c in cells], "o",
                    color=colors[fam], alpha=0.35, markersize=4)
            front = _pareto(cells)
            ax.plot([c["device_bytes"] / 2**20 for c in front], [c["x_train"] for c in front],
                    "o-" if fam.startswith("metagrad") else "s--", color=colors[fam], label=fam, markersize=5,
                    drawstyle="steps-post" if len(front) > 1 else "default")
        ax.xaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2, 5)))
        for formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
            formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        for formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save_results(results: dict, out: str) -> None:
    save_json(out + ".json", results)


def write(results: dict, out: str) -> str:
    """The JSON, the markdown tables and the plot."""
    save_results(results, out)
    text = markdown(results)
    save_text(out + ".md", text)
    try:
        plot(results, out + ".png")
    except Exception as error:  # the tables matter more than the figure
        print(f"plot failed: {error}", file=sys.stderr)
    return text


# --------------------------------------------------------------------------- #
# the driver
# --------------------------------------------------------------------------- #

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_arguments(parser, kinds="mlp_table,cnn,wide,transformer", steps="1000,10000", repeat=3,
                       repeat_help="timed runs per cell (median), after one warm-up", out="frontier")
    parser.add_argument("--skip", default="", help="comma-separated methods not to run: jax_storeall, jax_checkpoint, "
                        "python_replay, equinox, metagrad (the fixed schedules), default, auto, auto_scan")
    parser.add_argument("--scan-form", action="store_true",
                        help="also the task compiled with loop='scan': its training, and Auto on it (fused "
                        "reverses of 100 steps)")
    parser.add_argument("--budgets-from", metavar="JSON", help="take Auto's budgets from this result file's peers")
    parser.add_argument("--budgets", metavar="BYTES", help="comma-separated: run Auto at these budgets (device "
                        "bytes, data and z included) instead of the peers' memory, e.g. a peer's cell of an earlier run")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only rewrite tables and plot from result files")
    parser.add_argument("--save-tasks", metavar="DIR", help="only compile and save the tasks into DIR (no cells)")
    parser.add_argument("--tasks-from", metavar="DIR", help="run the tasks saved by --save-tasks DIR "
                        "instead of compiling them")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.prepare:
        print(json.dumps(worker(json.loads(args.worker)) if args.worker else prepare(json.loads(args.prepare))))
        return 0
    if args.render:
        parts = []
        for path in args.render:
            with open(path) as f:
                parts.append(json.load(f))
        results = {"command": "`; `".join(p["command"] for p in parts), "repeat": parts[0]["repeat"],
                   "rendered_by": " ".join(["python bench/frontier.py"] + sys.argv[1:]),
                   "machine": parts[0]["machine"], "seconds_total": sum(p.get("seconds_total", 0) for p in parts),
                   "runs": merge_runs(p["runs"] for p in parts)}
        print(write(results, args.out))
        return 0

    import metagrad

    skip = set(filter(None, args.skip.split(",")))
    steps = [int(s) for s in args.steps.split(",") if args.max_steps is None or int(s) <= args.max_steps]
    mem_limit = int(args.mem_limit_gb * 2**30)
    results = {"machine": machine_notes(), "command": " ".join(["python bench/frontier.py"] + sys.argv[1:]),
               "repeat": args.repeat, "auto_available": hasattr(metagrad, "Auto"), "runs": {}}
    start = time.perf_counter()
    # The saved tasks: a temporary folder removed at the end, unless kept (--save-tasks) or given (--tasks-from).
    workdir = args.save_tasks or args.tasks_from or tempfile.mkdtemp(prefix="metagrad-frontier-")
    os.makedirs(workdir, exist_ok=True)

    def cell(spec: dict) -> dict:
        command = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
        out = {"method": spec["method"], "param": spec.get("param"), **run_limited(command, args.timeout, mem_limit)}
        shown = (f"{out['seconds']:.3f} s, {out['x_train']:.2f}x train, {fmt_bytes(out.get('device_bytes'))}"
                 if out["status"] == "ok" else
            f"{out['status']}: {out['reason']}")
        print(f"[{time.perf_counter() - start:6.0f} s] {spec['kind']} T={spec['steps']} {label(out)}: {shown}",
              file=sys.stderr)
        return out

    def prepared(spec: dict) -> dict:
        """Compile and save the task (its result kept beside it as JSON), or read what --save-tasks kept."""
        record = spec["task_dir"] + ".prepare.json"
        if args.tasks_from:
            if not os.path.exists(record):
                sys.exit(f"no task saved at {spec['task_dir']}: run --save-tasks {workdir} with the same --kinds, "
                         f"--steps (and --scan-form) first")
            with open(record) as f:
                return json.load(f)
        command = [sys.executable, os.path.abspath(__file__), "--prepare", json.dumps(spec)]
        out = run_limited(command, 2 * args.timeout, mem_limit)
        if args.save_tasks:
            with open(record, "w") as f:
                json.dump(out, f)
        return out

    try:
        for T in steps:
            for kind in args.kinds.split(","):
                run = results["runs"][f"{kind}/{T}"] = {"kind": kind, "steps": T, "cells": []}
                base = {"kind": kind, "steps": T, "repeat": args.repeat,
                        "task_dir": os.path.join(workdir, f"{kind}-{T}")}
                scan = {**base, "loop": "scan", "task_dir": base["task_dir"] + "-scan"}
                run["prepare"] = prepared(base)
                print(f"[{time.perf_counter() - start:6.0f} s] {kind} T={T} compiled: {run['prepare']}",
                      file=sys.stderr)
                if args.scan_form:
                    run["prepare_scan"] = prepared(scan)
                    print(f"[{time.perf_counter() - start:6.0f} s] {kind} T={T} compiled (loop='scan'): "
                          f"{run['prepare_scan']}", file=sys.stderr)
                if args.save_tasks:
                    continue
                compiled = run["prepare"]["status"] == "ok"
                scan_compiled = args.scan_form and run["prepare_scan"]["status"] == "ok"
                specs = [{**base, "method": "train_jax"}]
                specs += [{**base, "method": "train_runtime"}] if compiled else []
                specs += [{**base, "method": "train_runtime_scan"}] if scan_compiled else []
                specs += [{**base, "method": m, "param": p} for m in PEERS if m not in skip for p in peer_params(m, T)]
                if compiled:  # --skip metagrad: the fixed schedules; --skip default: the default metagradient(z)
                    specs += [{**base, "method": "metagrad", "param": p} for p in fixed_schedules(T)
                              if ("default" if p["name"] == "default" else "metagrad") not in skip]
                for spec in specs:
                    run["cells"].append(cell(spec))
                    save_results(results, args.out)
                methods = [m for m, built in (("auto", True), ("auto_scan", scan_compiled)) if built and m not in skip]
                if not compiled or not methods:
                    continue
                if not results["auto_available"]:
                    run["cells"].append({"method": "auto", "param": None, "status": "n/a",
                                         "reason": "not available (metagrad.Auto is not in this build)"})
                    continue
                data_z = run["prepare"]["data_bytes"] + run["prepare"]["z_bytes"]
                peers = [c for c in run["cells"] if c["method"] in PEERS]
                if args.budgets_from:
                    with open(args.budgets_from) as f:
                        peers += [c for c in json.load(f)["runs"].get(f"{kind}/{T}", {"cells": []})["cells"]
                                  if c["method"] in PEERS]
                budgets = ([int(b) for b in args.budgets.split(",")] if args.budgets
                           else auto_budgets(peers, data_z))
                for method in methods:
                    for budget in budgets + ([None] if method == "auto_scan" else []):
                        run["cells"].append(cell({**base, "method": method, "param": budget}))
                        save_results(results, args.out)
    finally:
        if not (args.save_tasks or args.tasks_from):
            shutil.rmtree(workdir, ignore_errors=True)
    if args.save_tasks:
        print(f"saved tasks in {workdir}")
        return 0
    results["seconds_total"] = time.perf_counter() - start
    results["machine"]["loadavg_end"] = os.getloadavg()
    print(write(results, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
