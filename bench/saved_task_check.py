"""A saved task's metagradient, in this process's runtime, against JAX's on jax's default device.

    python bench/saved_task_check.py mlp_table 1000 /tmp/tasks/mlp_table-1000 [--schedule Budget:64:10]

For a machine where the task was not compiled (a GPU's, through the plugin in
``$METAGRAD_PJRT_PLUGIN``): loads the saved task, runs ``metagradient(z)`` (the
default plan, or ``--schedule``) and ``jax.value_and_grad`` through
``lax.scan`` (``baselines.scan_metagradient``) of the same task built from
bench/tasks.py, and prints both values, the gradients' relative difference
and the Report. Exits 1 when the relative difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

import metagrad
from common import flat_leaves
from metagrad import baselines
from tasks import KINDS, make_task


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("steps", type=int)
    parser.add_argument("task_dir")
    parser.add_argument("--schedule", help="Budget:STATES:BLOCK, Replay:K or StoreAll (default: the planner's)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest relative difference of the gradients accepted (float32, and a GPU's "
                             "matrix products may round differently between the two programs)")
    args = parser.parse_args(argv)

    task, z = make_task(args.kind, args.steps)
    t0 = time.perf_counter()
    compiled = metagrad.load(args.task_dir)
    print(f"loaded {args.task_dir} in {time.perf_counter() - t0:.1f} s; client {compiled.client.platform_name}, "
          f"jax devices {jax.devices()}")
    kwargs = {}
    if args.schedule:
        name, *numbers = args.schedule.split(":")
        numbers = [int(n) for n in numbers]
        kwargs["schedule"] = {"Budget": lambda s, block=1: metagrad.Budget(states=s, block=block),
                              "Replay": lambda k: metagrad.Replay(k), "StoreAll": metagrad.StoreAll}[name](*numbers)
    value, grad, report = compiled.metagradient(z, report=True, **kwargs)
    t0 = time.perf_counter()
    value, grad, report = compiled.metagradient(z, report=True, **kwargs)
    seconds = time.perf_counter() - t0
    jax_value, jax_grad = jax.block_until_ready(baselines.scan_metagradient(task, z))
    t0 = time.perf_counter()
    jax_value, jax_grad = jax.block_until_ready(baselines.scan_metagradient(task, z))
    jax_seconds = time.perf_counter() - t0
    ours, theirs = flat_leaves(grad), flat_leaves(jax_grad)
    difference = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    print(f"value: metagrad {float(np.asarray(value)):.6g}, JAX {float(np.asarray(jax_value)):.6g}; gradient "
          f"relative difference {difference:.2e} (norm {np.linalg.norm(theirs):.4g}); seconds: metagrad "
          f"{seconds:.3f}, JAX store-all {jax_seconds:.3f} (one run each, after one warm-up)")
    print(report)
    return 0 if difference <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
