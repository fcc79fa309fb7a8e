"""Scaling out: per-device memory and time on 1, 2 and 4 devices, and
the host tier's transfer volume and cost.

Task: the ``wide`` digits MLP of ``tasks.py`` (64-512-512-10, batch 128, SGD
with momentum, per-example weights) with its training set stored as batches
(``x[b]``: batch b), so that the batch axis splits over devices without a
gather. Variants on a mesh ``{"batch": n}``:

* ``data_parallel``: data and per-example weights split on the batch axis,
  parameters and velocity replicated (XLA all-reduces the gradients);
* ``fsdp``: the same, plus every parameter and velocity leaf split on its
  first axis where it divides.

For each: XLA's per-device bytes of the step program, the per-device state,
data and peak bytes of a metagradient run (``Report``), and medians of
training and metagradient times. Then the host tier: the calibrated cost of
copying one state to ``pinned_host`` and back, a run whose device budget
holds no saved state (every slot the planner moves goes to host memory)
against one with a budget that holds them all, and how much the placement
rule (``host_slot_order``: slots with the fewest saves plus restores first)
saves against the opposite order for the same plan.

CPU timings are only indicative: the CPU plugin's "devices" are threads on
the same cores (2 shared cores here), so more devices do not add compute,
and every memory space is host RAM, so host copies are memcpys, not PCIe
transfers. The byte figures are exact.

    python bench/scaling.py [--steps 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import write_results

BATCH = 128
DEVICES = (1, 2, 4)


def make_task(steps: int, hidden: int):
    import metagrad
    from tasks import N_TRAIN, _mlp_apply, _mlp_init, _xent, digits

    d = digits()
    batches = N_TRAIN // BATCH
    data = {"x": d["x"].reshape(batches, BATCH, 64), "y": d["y"].reshape(batches, BATCH),
            "x_val": d["x_val"], "y_val": d["y_val"]}
    lr, momentum = 0.05, 0.9

    def loss(params, x, y, weights):
        return jnp.mean(weights * _xent(_mlp_apply(params, x), y))

    def init(z, data):
        params = _mlp_init((64, hidden, hidden, 10))
        return params, jax.tree_util.tree_map(jnp.zeros_like, params)

    def step(state, z, data, t):
        params, velocity = state
        b = t % batches
        grads = jax.grad(loss)(params, jnp.asarray(data["x"])[b], jnp.asarray(data["y"])[b], z[b])
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
        return jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity), velocity

    def output(state, z, data):
        return jnp.mean(_xent(_mlp_apply(state[0], jnp.asarray(data["x_val"])), jnp.asarray(data["y_val"])))

    return metagrad.Task(init, step, output, steps, data), np.ones((batches, BATCH), np.float32)


def sharding(variant: str, n: int):
    import metagrad
    from jax.sharding import PartitionSpec as P

    data = {"x": P(None, "batch"), "y": P(None, "batch"), "x_val": P(), "y_val": P()}
    state = (lambda leaf: P("batch") if leaf.shape and leaf.shape[0] % n == 0 else P()) if variant == "fsdp" else P()
    return metagrad.Sharding({"batch": n}, data=data, z=P(None, "batch"), state=state)


def median_seconds(fn, repeat: int) -> float:
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def scaling_rows(task, z, repeat: int, schedule) -> list[dict]:
    from metagrad import runtime

    client = runtime.get_client(cpu_device_count=max(DEVICES))
    rows, reference = [], None
    for variant in ("data_parallel", "fsdp"):
        for n in DEVICES:
            if n == 1 and variant == "fsdp":
                continue  # one device: nothing to split
            t0 = time.perf_counter()
            try:
                compiled = task.compile(z, client=client, fuse_forward=10,
                                        sharding=None if n == 1 else sharding(variant, n))
            except ValueError as error:  # more CPU devices than cores: refused (docs/scaling.md)
                rows.append({"variant": variant, "devices": n, "refused": str(error)})
                print(f"  {variant:>13} x{n}: refused: {error}", flush=True)
                continue
            compile_s = time.perf_counter() - t0
            value, grad, report = compiled.metagradient(z, schedule, report=True)
            if reference is None:
                reference = (value, grad)
            error = float(np.abs(grad - reference[1]).max() / np.abs(reference[1]).max())
            step = compiled.cost_table(z).step
            rows.append({
                "variant": "one device" if n == 1 else variant, "devices": n, "compile_s": compile_s,
                "step_bytes": step.bytes, "step_s": step.seconds,
                "state_bytes": report.state_bytes, "data_bytes": report.data_bytes,
                "peak_device_bytes": report.peak_device_bytes,
                "train_s": median_seconds(lambda: compiled.train(z), repeat),
                "metagradient_s": median_seconds(lambda: compiled.metagradient(z, schedule), repeat),
                "grad_rel_error": error, "phi": float(value)})
            print(f"  {rows[-1]['variant']:>13} x{n}: state {report.state_bytes / 2**10:8.1f} KiB/device, peak "
                  f"{report.peak_device_bytes / 2**20:6.2f} MiB/device, train {rows[-1]['train_s']:.3f} s, "
                  f"metagradient {rows[-1]['metagradient_s']:.3f} s, |grad - 1 device| {error:.1e}", flush=True)
    return rows


def host_tier(task, z, repeat: int, runnable: list[dict]) -> dict:
    import metagrad
    from metagrad import runtime, schedules

    client = runtime.get_client(cpu_device_count=max(DEVICES))
    out = {}
    for n in sorted({1, max(r["devices"] for r in runnable)}):
        compiled = task.compile(z, client=client, fuse_forward=10, sharding=None if n == 1 else
                                sharding("data_parallel", n))
        roomy = metagrad.Auto(memory=2**31, blocks=(1,), host_memory=2**31)
        _, _, device_report = compiled.metagradient(z, roomy, report=True)  # calibrates, with host copies
        costs = compiled.cost_table(z, roomy)
        try:
            compiled.metagradient(z, metagrad.Auto(memory=1, blocks=(1,), host_memory=0))
        except metagrad.DeviceMemoryError as error:
            minimum = int(str(error).rsplit("at least ", 1)[1].rstrip("."))
        tight = metagrad.Auto(memory=minimum - 1, blocks=(1,), host_memory=2**31)
        _, _, host_report = compiled.metagradient(z, tight, report=True)
        times = {name: median_seconds(lambda a=auto: compiled.metagradient(z, a), repeat)
                 for name, auto in (("device_only", roomy), ("host_tier", tight))}
        out[f"{n}_devices"] = {
            "state_bytes_per_device": costs.state_bytes,
            "to_host_s_per_state": costs.to_host.seconds, "from_host_s_per_state": costs.from_host.seconds,
            "step_s": costs.programs["step"].seconds, "step_vjp_s": costs.programs["step_vjp"].seconds,
            "device_budget": minimum - 1,
            "runs": {name: {**{k: getattr(r, k) for k in (
                "schedule", "forward_steps", "peak_device_bytes", "peak_host_bytes", "host_saved_states",
                "bytes_to_host", "bytes_from_host", "predicted_seconds")}, "median_s": times[name]}
                for name, r in (("device_only", device_report), ("host_tier", host_report))}}
        entry = out[f"{n}_devices"]
        print(f"  x{n}: state {entry['state_bytes_per_device'] / 2**10:.0f} KiB/device; one state to host "
              f"{entry['to_host_s_per_state'] * 1e6:.0f} us, back {entry['from_host_s_per_state'] * 1e6:.0f} us; "
              f"a step {entry['step_s'] * 1e6:.0f} us", flush=True)
        for name, run in entry["runs"].items():
            print(f"    {name:>11}: {run['schedule']}\n"
                  f"                 device peak {run['peak_device_bytes'] / 2**20:.2f} MiB, host peak "
                  f"{run['peak_host_bytes'] / 2**20:.2f} MiB, {run['bytes_to_host'] / 2**20:.2f} MiB to host, "
                  f"{run['bytes_from_host'] / 2**20:.2f} MiB back, {run['forward_steps']} forward steps, "
                  f"{run['median_s']:.3f} s", flush=True)
    # The placement rule against its opposite, on one plan: the same number of host slots.
    steps = task.steps
    plan = metagrad.schedules.plan_revolve(steps, 12)
    order = schedules.host_slot_order(plan)
    rule = []
    for k in (1, 3, 6):
        cheap = schedules.simulate_plan(plan, costs, set(order[:k]))
        dear = schedules.simulate_plan(plan, costs, set(order[-k:]))
        rule.append({"host_slots": k, "fewest_copies_first": {f: cheap[f] for f in ("bytes_to_host", "bytes_from_host",
                                                                                       "peak_bytes", "seconds")},
                     "most_copies_first": {f: dear[f] for f in ("bytes_to_host", "bytes_from_host", "peak_bytes",
                                                                 "seconds")}})
        print(f"  revolve(12) over {steps} steps, {k} slots on the host: fewest-copies-first moves "
              f"{(cheap['bytes_to_host'] + cheap['bytes_from_host']) / 2**20:.2f} MiB (device peak "
              f"{cheap['peak_bytes'] / 2**20:.2f} MiB), most-copies-first "
              f"{(dear['bytes_to_host'] + dear['bytes_from_host']) / 2**20:.2f} MiB (peak "
              f"{dear['peak_bytes'] / 2**20:.2f} MiB)", flush=True)
    out["placement_rule"] = rule
    return out


def markdown(result: dict) -> list[str]:
    lines = ["# Scaling (bench/scaling.py)", "",
             f"digits MLP 64-{result['hidden']}-{result['hidden']}-10, batch 128, T = {result['steps']}, "
             f"metagradient schedule "
             f"{result['schedule']}. Bytes are per device; CPU timings only indicative (the CPU plugin's devices "
             f"share the machine's cores; host copies are memcpys).", "",
             "| variant | devices | state/device | data+z/device | peak/device | bytes a step adds/device | a step "
             "| train | metagradient | max rel. error vs 1 device |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["scaling"]:
        if "refused" in r:
            lines.append(f"| {r['variant']} | {r['devices']} | refused: {r['refused']} |||||||")
            continue
        lines.append(f"| {r['variant']} | {r['devices']} | {r['state_bytes'] / 2**10:.1f} KiB | "
                     f"{r['data_bytes'] / 2**10:.1f} KiB | {r['peak_device_bytes'] / 2**20:.2f} MiB | "
                     f"{r['step_bytes'] / 2**10:.1f} KiB | {r['step_s'] * 1e6:.0f} us | "
                     f"{r['train_s']:.3f} s | {r['metagradient_s']:.3f} s | {r['grad_rel_error']:.1e} |")
    lines += ["", "Host tier (Auto(blocks=(1,)); `device_only`: a budget that holds every state; `host_tier`: one "
              "byte below the least any device-only plan needs):", "",
              "| devices | run | plan | device peak | host peak | to host | from host | forward steps | predicted "
              "| measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    hosts = {key: entry for key, entry in result["host_tier"].items() if key != "placement_rule"}
    for key, entry in hosts.items():
        for name, run in entry["runs"].items():
            lines.append(f"| {key.split('_')[0]} | {name} | {run['schedule']} | "
                         f"{run['peak_device_bytes'] / 2**20:.2f} MiB | {run['peak_host_bytes'] / 2**20:.2f} MiB | "
                         f"{run['bytes_to_host'] / 2**20:.2f} MiB | {run['bytes_from_host'] / 2**20:.2f} MiB | "
                         f"{run['forward_steps']} | {run['predicted_seconds']:.3f} s | {run['median_s']:.3f} s |")
    lines += ["", "Copy cost (calibration medians; a state is replicated in data parallelism, so each of its "
              "copies moves one shard per device):", "",
              "| devices | state/device | to pinned_host | back to device | a step | its reverse |",
              "|---|---|---|---|---|---|"]
    for key, entry in hosts.items():
        lines.append(f"| {key.split('_')[0]} | {entry['state_bytes_per_device'] / 2**10:.0f} KiB | "
                     f"{entry['to_host_s_per_state'] * 1e6:.0f} us | {entry['from_host_s_per_state'] * 1e6:.0f} us | "
                     f"{entry['step_s'] * 1e6:.0f} us | {entry['step_vjp_s'] * 1e6:.0f} us |")
    lines += ["", "Placement rule on revolve(12) (bytes moved, both ways):", "",
              "| host slots | fewest copies first | most copies first |", "|---|---|---|"]
    for r in result["host_tier"]["placement_rule"]:
        moved = lambda c: (c["bytes_to_host"] + c["bytes_from_host"]) / 2**20  # noqa: E731
        lines.append(f"| {r['host_slots']} | {moved(r['fewest_copies_first']):.2f} MiB | "
                     f"{moved(r['most_copies_first']):.2f} MiB |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512,
                        help="hidden width (on 2 cores, 4 devices with 512-wide dots can abort in XLA's collectives: "
                             "docs/scaling.md)")
    parser.add_argument("--out", default="scaling", help="results/<out>.{md,json}")
    args = parser.parse_args()
    import metagrad

    task, z = make_task(args.steps, args.hidden)
    schedule = metagrad.Budget(states=8)
    print(f"scaling, T = {args.steps}:", flush=True)
    result = {"steps": args.steps, "hidden": args.hidden, "schedule": repr(schedule),
              "scaling": scaling_rows(task, z, args.repeat, schedule)}
    print("host tier:", flush=True)
    result["host_tier"] = host_tier(task, z, args.repeat, [r for r in result["scaling"] if "refused" not in r])
    write_results(args.out, markdown(result), result)


if __name__ == "__main__":
    main()
