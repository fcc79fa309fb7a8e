"""Compile a bench task and save it for metagrad-bench (the C++ harness).

    python bench/save_task.py mlp --steps 1000 --block 10 --out /tmp/mlp1000
    metagrad-bench /tmp/mlp1000 --schedule replay:4,replay:16:10,storeall

Writes the task's programs (init, step, output, output_vjp, step_vjp,
init_vjp, all_finite), the fused reverses ``segment_vjp_n`` that ``--block``
needs, and ``advance_<n>`` (n steps in one execution, used by the harness to
separate per-execution cost from compute).
"""

from __future__ import annotations

import argparse
import time

from common import fused_lengths, save_task
from tasks import KINDS, make_task


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backend", default="auto", choices=("auto", "enzyme", "jax"))
    parser.add_argument("--block", type=int, action="append", default=[],
                        help="fused reverse block length to include (repeatable)")
    parser.add_argument("--advance", type=int, default=10,
                        help="steps of the fused forward program advance_<n> (1: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    task, z = make_task(args.kind, args.steps)
    t0 = time.perf_counter()
    compiled = task.compile(z, backend=args.backend, fuse_forward=args.advance)
    lengths = sorted({n for block in args.block for n in fused_lengths(args.steps, block)})
    save_task(compiled, args.out, blocks=args.block)
    print(f"saved {args.kind} T={args.steps} ({args.backend}; fused {lengths or 'none'}) to {args.out} "
          f"in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
