"""One training program, two XLA CPU clients: jaxlib's against the runtime's plugin, for timing and profiling.

    python bench/same_program.py --kind transformer --steps 100                   # ratio, one process
    python bench/same_program.py --kind transformer --xla-flags=--xla_cpu_enable_fast_math=true
    python bench/same_program.py --kind transformer --client plugin --loop 14 &   # then, once it prints READY:
    perf record -F 999 -g -p <pid> -o plugin.data -- sleep 10

The program is ``jax.jit`` of ``init`` and a ``lax.scan`` over ``--steps``
training steps (as ``bench/program_speed.py``'s "same program"): jaxlib runs
it compiled by its own XLA, the runtime the very same StableHLO compiled by its
plugin. ``--xla-flags`` is set as ``XLA_FLAGS`` after jaxlib has compiled its
side and before the plugin is loaded, so it reaches the plugin's XLA only
(each library parses the variable once, on first use).

Default mode: both sides alternate ``--repeat`` times; prints the medians of
the per-pair ratios, wall and process CPU time. ``--loop S``: one client only,
run repeatedly for S seconds after a warm-up, for ``perf`` to attach to
(``docs/performance.md`` gives the profile this produced).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tasks import make_task


def lowered_training(task, z):
    """``jax.jit`` of init and a ``lax.scan`` over all of ``task``'s steps, lowered; and its arguments."""
    def train(z, data):
        def body(state, t):
            return task.step(state, z, data, t), None
        return jax.lax.scan(body, task.init(z, data), jnp.arange(task.steps, dtype=jnp.int32))[0]

    return jax.jit(train, keep_unused=True).lower(z, task.data), (z, task.data)


def plugin_runner(lowered, arguments, client=None):
    """That very program compiled by the runtime's plugin: a function that runs it once."""
    from metagrad import runtime

    client = client or runtime.get_client()
    executable = runtime.compile_module(runtime.portable_artifact(lowered, client=client), client)
    on_device = [runtime.to_device(np.asarray(x), client) for x in jax.tree_util.tree_leaves(arguments)]

    def run():
        for out in executable.execute(on_device):
            out.block_until_ready()
    return run


def jax_runner(lowered, arguments):
    compiled = lowered.compile()
    return lambda: jax.block_until_ready(compiled(*arguments))


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", default="transformer", help="a task of bench/tasks.py")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for the plugin's XLA only")
    parser.add_argument("--client", choices=("jax", "plugin"), help="with --loop: the client to run")
    parser.add_argument("--loop", type=float, metavar="SECONDS", help="run one client repeatedly, for perf")
    args = parser.parse_args(argv)
    if args.loop is not None and args.client is None:
        parser.error("--loop needs --client jax or --client plugin")

    lowered, arguments = lowered_training(*make_task(args.kind, args.steps))
    if args.loop is not None:
        os.environ["XLA_FLAGS"] = args.xla_flags
        run = (jax_runner if args.client == "jax" else plugin_runner)(lowered, arguments)
        run()
        print("READY", os.getpid(), flush=True)
        runs, end = 0, time.perf_counter() + args.loop
        while time.perf_counter() < end:
            run()
            runs += 1
        print(f"{args.client}: {runs} runs in {args.loop:.0f} s ({runs / args.loop:.2f} per second)")
        return 0

    on_jax = jax_runner(lowered, arguments)
    on_jax()
    os.environ["XLA_FLAGS"] = args.xla_flags
    on_plugin = plugin_runner(lowered, arguments)
    on_plugin()
    wall, cpu, jax_wall = [], [], []
    for _ in range(args.repeat):
        a, b = timed(on_jax), timed(on_plugin)
        wall.append(b[0] / a[0])
        cpu.append(b[1] / a[1])
        jax_wall.append(a[0])
    print(f"{args.kind} T={args.steps} {args.xla_flags or '(plugin defaults)'}: plugin / jaxlib "
          f"wall {statistics.median(wall):.2f}x, CPU {statistics.median(cpu):.2f}x "
          f"(jaxlib {1e3 * statistics.median(jax_wall):.0f} ms per run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
