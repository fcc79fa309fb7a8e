"""The arithmetic floor of a metagradient: FLOPs per schedule, as a multiple of training.

    python bench/flops.py [--kinds mlp,cnn,wide] [--steps 1000,10000]

XLA's cost analysis (jaxlib's compiler, JAX's autodiff) counts the FLOPs of one
training step ``F``, of its reverse ``V1`` (``step_vjp``: recomputes what it
needs of the step, then reverses it) and of a fused reverse of ``L`` steps per
step ``VL`` (``segment_vjp_L``: the block's forward with its residuals kept,
then the reverse). A schedule's plan fixes how many steps it runs forward and
which reverses it runs, so its FLOPs over training's ``T * F`` is the time
ratio it would reach if every FLOP ran as fast as training's: a floor no
implementation of that schedule goes under. JAX's ``scan + checkpoint`` runs
``T`` forward steps, then per segment the forward again with residuals and the
reverse, about ``T * (F + VL)`` -- estimated, because XLA's cost analysis counts
a loop body once.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

import metagrad
from tasks import make_task

BLOCK = 10


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def step_costs(kind: str, block: int = BLOCK) -> dict:
    """FLOPs of one step, one step's reverse, and a fused ``block``-step reverse per step (straight-line code,
    as the runtime's programs are)."""
    task, z = make_task(kind, block)
    state = task.init(z, task.data)
    t0 = jnp.int32(3)

    def run(s, z, t, n):
        for i in range(n):
            s = task.step(s, z, task.data, t + i)
        return s

    def reverse(s, z, c, t, n):
        _, pull = jax.vjp(lambda s, z: run(s, z, t, n), s, z)
        return pull(c)

    return {"F": _flops(lambda s, z, t: run(s, z, t, 1), state, z, t0),
            "V1": _flops(lambda s, z, c, t: reverse(s, z, c, t, 1), state, z, state, t0),
            "VL": _flops(lambda s, z, c, t: reverse(s, z, c, t, block), state, z, state, t0) / block}


def schedule_flops(plan, T: int, costs: dict, block: int = BLOCK) -> float:
    """FLOPs of a plan: its forward steps plus its reverses, single (``V1``) or fused (``VL``)."""
    total = plan.stats(T)["forward_steps"] * costs["F"]
    for action in plan:
        if action.kind == "reverse":
            if action.count == 1:
                total += costs["V1"]
            elif action.count == block:
                total += block * costs["VL"]
            else:
                raise ValueError(f"no cost for a fused reverse of {action.count} steps")
    return total


def schedules(T: int):
    """``(name, schedule)``: the default, REPLAY, revolve at the bound ``32 log_32 T`` with and without
    fused blocks, and the two that hold more than the bound (no replays)."""
    bound = math.floor(32 * math.log(T) / math.log(32))
    return [
        ("Budget(k=4), the default", metagrad.Budget(k=4)),
        ("Replay(k=4)", metagrad.Replay(k=4)),
        ("Budget, 32 log_32 T states", metagrad.Budget(states=bound)),
        (f"Budget, 32 log_32 T states, block {BLOCK}", metagrad.Budget(states=bound, block=BLOCK)),
        (f"Periodic(every=T, block={BLOCK}): T/{BLOCK} states", metagrad.Periodic(every=T, block=BLOCK)),
        ("StoreAll: T states", metagrad.StoreAll()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="mlp,cnn,wide")
    parser.add_argument("--steps", default="1000,10000")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    for kind in args.kinds.split(","):
        c = step_costs(kind)
        print(f"{kind}: step F = {c['F'] / 1e6:.2f} MFLOP; reverse V1 = {c['V1'] / c['F']:.2f} F; "
              f"fused reverse of {BLOCK}, per step, V{BLOCK} = {c['VL'] / c['F']:.2f} F")
        print(f"  {'schedule':48s} " + " ".join(f"{'T=' + str(T):>8s}" for T in steps))
        by_steps = {T: schedules(T) for T in steps}
        for i, (name, _) in enumerate(by_steps[steps[0]]):
            ratios = [schedule_flops(by_steps[T][i][1].plan(T), T, c) / (T * c["F"]) for T in steps]
            print(f"  {name:48s} " + " ".join(f"{r:7.2f}x" for r in ratios))
        print(f"  {'JAX scan + checkpoint (estimate: 1 + V' + str(BLOCK) + '/F)':48s} "
              + " ".join(f"{1 + c['VL'] / c['F']:7.2f}x" for _ in steps))


if __name__ == "__main__":
    main()
