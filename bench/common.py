"""Shared helpers of the bench scripts: timing, the harness binary, saving tasks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)


def harness_path() -> str:
    """The installed ``metagrad-bench`` executable (``metagrad/bin`` beside the module)."""
    from metagrad import _runtime

    path = os.path.join(os.path.dirname(_runtime.__file__), "bin", "metagrad-bench")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: rebuild with pip install --no-build-isolation -e .")
    return path


def timed(fn, *args, repeat: int = 3, warmup: int = 1, sync=None):
    """Median and min wall seconds of ``fn(*args)`` (``sync`` blocks on the result)."""
    sync = sync or (lambda r: r)
    for _ in range(warmup):
        sync(fn(*args))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn(*args))
        samples.append(time.perf_counter() - t0)
    return {"median": statistics.median(samples), "min": min(samples), "samples": samples}


def machine_notes() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    import jax

    info["jax"] = jax.__version__
    return info


def advance_program(compiled, n: int, unroll: bool = True):
    """A portable program running ``n`` steps in one execution: (S, Z, X, t0) -> S.

    Unrolled by default: XLA's CPU backend compiles some ops (convolutions)
    much more slowly inside a while loop (a lax.scan) than in straight-line
    code (bench/reverse_step.py shows it for the CNN).
    """
    import jax
    import jax.numpy as jnp

    from metagrad import lowering, runtime

    flat = lowering._Flat(compiled.task, compiled.layout)
    ns, nz, nx = flat.ns, flat.nz, flat.nx
    task = compiled.task

    def advance(*args):
        s, z, x, t0 = args[:ns], args[ns:ns + nz], args[ns + nz:ns + nz + nx], args[-1]
        zz, data = flat.z(z), flat.data(x)
        if unroll:
            state = flat.state(s)
            for i in range(n):
                state = task.step(state, zz, data, t0 + i)
            return tuple(flat.state_leaves(state))
        body = lambda carry, i: (task.step(carry, zz, data, t0 + i), None)  # noqa: E731
        final = jax.lax.scan(body, flat.state(s), jnp.arange(n, dtype=jnp.int32))[0]
        return tuple(flat.state_leaves(final))

    target = runtime.stablehlo_target(compiled.client)
    return lowering._lower_one(advance, flat.specs("S", "Z", "X", "t"), (), target)


def save_task(compiled, path: str, *, fused_lengths=(), advance=(10,), unroll: bool = True) -> None:
    """``compiled.save(path)`` with the fused reverses of ``fused_lengths`` and ``advance_<n>`` programs."""
    from metagrad import lowering, runtime

    missing = tuple(n for n in fused_lengths if n > 1 and f"segment_vjp_{n}" not in compiled.programs)
    if missing:
        new = lowering.lower_task(compiled.task, compiled.layout, backend=compiled.backend,
                                  target=runtime.stablehlo_target(compiled.client), segment_lengths=missing,
                                  only_segments=True)
        compiled.programs.update(new)  # compiled lazily by the runner if Python uses them
        for name, program in new.items():
            compiled._executables[name] = runtime.compile_module(program.artifact, compiled.client)
    compiled.save(path)
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    for n in sorted({int(n) for n in (advance or ()) if int(n) > 1}):
        name = f"advance_{n}"
        with open(os.path.join(path, "programs", f"{name}.mlirbc"), "wb") as f:
            f.write(advance_program(compiled, n, unroll))
        manifest["programs"][name] = {"file": f"programs/{name}.mlirbc", "backend": "none"}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)


def fused_lengths(steps: int, leaf: int) -> tuple[int, ...]:
    """Fused reverse lengths a plan with this leaf uses."""
    if leaf <= 1:
        return ()
    lengths = {min(leaf, steps)}
    if steps % leaf and steps > leaf:
        lengths.add(steps % leaf)
    return tuple(sorted(n for n in lengths if n > 1))


def run_harness(task_dir: str, args: list[str], timeout: float | None = None) -> dict:
    """Run metagrad-bench with ``--json``; returns its parsed output."""
    from metagrad import runtime

    command = [harness_path(), task_dir, "--plugin", runtime.default_plugin_path(), "--json", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return json.loads(done.stdout)


def fmt_ratio(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.2f}x"
