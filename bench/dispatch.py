"""Dispatch overhead per execution: metagrad's runtime vs jax.jit, side by side.

    python bench/dispatch.py [--iters 20000] [--repeat 5]

Two programs, each executed ``--iters`` times in a dependent chain (every
execution consumes the previous one's output; all are enqueued, the last is
awaited) and again awaiting each execution:

* tiny: ``x + 1`` on an f32 scalar -- the cost of an execution whose compute is nil;
* null step: the digits-MLP step's exact signature (8 state leaves, z, 4 data
  leaves, t) returning the state leaves, which are donated and aliased, so it
  computes nothing -- the cost of dispatching a step-shaped execution.

Paths measured in this one process, interleaved ``--repeat`` times (medians):
``runtime (C++)`` is metagrad-bench (no Python in the process; a subprocess
per repetition); ``runtime (Python)`` calls ``Executable.execute`` from a
Python loop; ``jax.jit`` calls the jitted function from a Python loop. The
runtime's own loop (TaskRunner) is the C++ figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from common import RESULTS_DIR, machine_notes, run_harness, save_json

import jax
import jax.numpy as jnp
import numpy as np

from metagrad import runtime

TINY = """module @tiny attributes {mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32} {
  func.func public @main(%arg0: tensor<f32>) -> tensor<f32> {
    %c = stablehlo.constant dense<1.000000e+00> : tensor<f32>
    %0 = stablehlo.add %arg0, %c : tensor<f32>
    return %0 : tensor<f32>
  }
}
"""

_MLIR = {"float32": "f32", "int32": "i32", "float64": "f64", "int64": "i64", "bool": "i1"}


def null_step_mlir(specs, num_state):
    def ty(spec):
        shape, dtype = spec
        return "tensor<" + "".join(f"{d}x" for d in shape) + _MLIR[dtype] + ">"

    args = ", ".join(f"%arg{i}: {ty(s)}" + (f" {{tf.aliasing_output = {i} : i32}}" if i < num_state else "")
                     for i, s in enumerate(specs))
    results = ", ".join(ty(s) for s in specs[:num_state])
    values = ", ".join(f"%arg{i}" for i in range(num_state))
    return (f"module @null_step attributes {{mhlo.num_partitions = 1 : i32, mhlo.num_replicas = 1 : i32}} {{\n"
            f"  func.func public @main({args}) -> ({results}) {{\n    return {values} : {results}\n  }}\n}}\n")


def chain(call, first, iters, await_each, sync):
    x = first()
    t0 = time.perf_counter()
    for _ in range(iters):
        x = call(x)
        if await_each:
            sync(x)
    sync(x)
    return (time.perf_counter() - t0) / iters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    n = args.iters

    from tasks import make_task

    task, z = make_task("mlp", 100)
    compiled = task.compile(z, backend="jax", fuse_forward=1)
    layout = compiled.layout
    state = jax.jit(task.init)(z, task.data)
    state_leaves = jax.tree_util.tree_leaves(state)
    data_leaves = jax.tree_util.tree_leaves(task.data)
    specs = ([(s.shape, s.dtype) for s in layout.state] + [(s.shape, s.dtype) for s in layout.z]
             + [(s.shape, s.dtype) for s in layout.data] + [((), "int32")])
    ns = len(layout.state)

    # runtime from Python
    client = runtime.get_client()
    tiny = runtime.compile_module(TINY, client)
    null = runtime.compile_module(null_step_mlir(specs, ns), client)
    rt_rest = [runtime.to_device(np.asarray(z), client)] + [runtime.to_device(np.asarray(x), client)
                                                            for x in data_leaves]
    rt_rest.append(runtime.to_device(np.int32(0), client))

    def rt_tiny_first():
        return [runtime.to_device(np.float32(0), client)]

    def rt_null_first():
        return [runtime.to_device(np.asarray(s), client) for s in state_leaves]

    def rt_sync(x):
        x[0].block_until_ready()

    # jax.jit
    jtiny = jax.jit(lambda x: x + 1)

    def null_fn(*a):
        return a[:ns]

    jnull = jax.jit(null_fn, donate_argnums=tuple(range(ns)))
    j_rest = [jnp.asarray(z)] + [jnp.asarray(x) for x in data_leaves] + [jnp.int32(0)]

    def j_null_first():
        return tuple(jnp.array(s) for s in state_leaves)

    # C++ harness on a task directory holding init and step only
    tmp = tempfile.mkdtemp(prefix="metagrad-dispatch-")
    compiled.save(tmp)
    with open(os.path.join(tmp, "manifest.json")) as f:
        manifest = json.load(f)
    manifest["programs"] = {k: v for k, v in manifest["programs"].items() if k in ("init", "step")}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f)

    cases = {
        ("tiny", "runtime (Python)"): (lambda x: tiny.execute(x), rt_tiny_first, rt_sync),
        ("tiny", "jax.jit"): (jtiny, lambda: jnp.float32(0), jax.block_until_ready),
        ("null step", "runtime (Python)"): (lambda x: null.execute(x + rt_rest), rt_null_first, rt_sync),
        ("null step", "jax.jit"): (lambda x: jnull(*x, *j_rest), j_null_first, jax.block_until_ready),
    }
    samples = {}
    for key, (call, first, sync) in cases.items():  # warm up
        chain(call, first, 200, False, sync)
    for _ in range(args.repeat):
        for (program, path), (call, first, sync) in cases.items():
            for await_each in (False, True):
                samples.setdefault((program, path, await_each), []).append(chain(call, first, n, await_each, sync))
        h = run_harness(tmp, ["--schedule", "none", "--repeat", "1", "--warmup", "0", "--dispatch-iters", str(n)])
        d = h["dispatch"]
        for program, key in (("tiny", "tiny"), ("null step", "null_step")):
            samples.setdefault((program, "runtime (C++)", False), []).append(d[f"{key}_us"] * 1e-6)
            samples.setdefault((program, "runtime (C++)", True), []).append(d[f"{key}_await_each_us"] * 1e-6)

    rows = []
    print(f"dispatch overhead per execution, us (median of {args.repeat} x {n} executions)")
    print(f"  {'program':10s} {'path':18s} {'chained':>9s} {'await each':>11s} {'jax.jit / this':>15s}")
    for program in ("tiny", "null step"):
        jit = statistics.median(samples[(program, "jax.jit", False)])
        for path in ("runtime (C++)", "runtime (Python)", "jax.jit"):
            chained = statistics.median(samples[(program, path, False)])
            each = statistics.median(samples[(program, path, True)])
            rows.append({"program": program, "path": path, "chained_us": chained * 1e6, "await_each_us": each * 1e6,
                         "jax_over_this": jit / chained})
            print(f"  {program:10s} {path:18s} {chained * 1e6:9.2f} {each * 1e6:11.2f} {jit / chained:14.2f}x")
    save_json(os.path.join(RESULTS_DIR, "dispatch.json"),
              {"machine": machine_notes(), "iters": n, "repeat": args.repeat, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
