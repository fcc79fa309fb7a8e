"""The planner: the fastest checkpointing plan that fits a device-memory budget.

``Auto(memory=...)`` (the default schedule of ``CompiledTask.metagradient``)
chooses, for each fused reverse length ``leaf`` it may use, the binomial
(revolve) plan with the most saved states that fits the budget, predicts its
time, and runs the fastest. Predictions come from a cost table of the task's
programs: the device bytes of each execution (XLA's compiled memory
statistics) and its seconds (a short calibration that runs each program a
few times, once per compiled task). The plan is then simulated with the task
runner's own accounting (``simulate_plan``), so the predicted peak is what
the run's ``Report.peak_device_bytes`` measures.

The budget covers everything the run holds on the device: data and z, saved
states, the current state, cotangents and metagradient accumulators, and the
temporaries of the program running. Its default is
``DEFAULT_CPU_BUDGET`` on the CPU plugin (device memory is the host's RAM,
shared with everything else) and ``GPU_BUDGET_SHARE`` of the device's free
memory elsewhere.

Every plan is also checked against the memory the device has before it runs,
whatever the schedule: a plan that cannot fit is a :class:`DeviceMemoryError`
naming what it needs, what there is, and a schedule that fits.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from metagrad import _runtime
from metagrad._src.schedules import Budget, plan_revolve

DEFAULT_CPU_BUDGET = 2 * 2**30
GPU_BUDGET_SHARE = 0.5
# Fused reverse lengths Auto considers: unrolled programs compile in time that
# grows with their length (11 s at 10 steps, 35 s at 25 for the digits MLP),
# lax.scan programs in constant time, and long scans of dot-heavy steps run
# fastest per step (docs/performance.md).
DEFAULT_LEAVES = {"unroll": (1, 10), "scan": (1, 10, 100)}


class DeviceMemoryError(MemoryError):
    """A plan needs more device memory than the budget or the device has."""


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


@dataclass(frozen=True)
class Auto:
    """Let metagrad choose the plan: the fastest that fits ``memory`` device bytes.

    Attributes:
      memory: bytes the run may hold on the device, data and z included
        (default: 2 GiB on the CPU plugin, half the free memory of a GPU).
      leaves: fused reverse block lengths to consider (default ``(1, 10)``, or
        ``(1, 10, 100)`` for a task compiled with ``loop="scan"``; capped at T);
        each length > 1 compiles one more reverse program.
    """

    memory: int | None = None
    leaves: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.memory is not None:
            if isinstance(self.memory, bool):
                raise TypeError(f"Auto: memory must be a number of bytes, got {self.memory!r}")
            try:
                memory = operator.index(self.memory)
            except TypeError:
                raise TypeError(f"Auto: memory must be an int number of bytes, got {self.memory!r}") from None
            if not 1 <= memory <= 2**63 - 1:
                raise ValueError(f"Auto: memory must be >= 1 byte, got {memory}")
        if self.leaves is not None:
            if not self.leaves or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.leaves):
                raise ValueError(f"Auto: leaves must be a non-empty tuple of ints >= 1, got {self.leaves!r}")

    def plan(self, steps: int, state_bytes: int = 0):
        raise TypeError("Auto chooses its plan from the compiled task's costs: pass it to "
                        "CompiledTask.metagradient(z, schedule=Auto(...)), not to plan()")


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_available(client) -> int | None:
    """Bytes the device can still give: the host's available RAM for the CPU
    plugin, free device memory (limit minus in use) elsewhere; None if unknown."""
    if client.platform_name == "cpu":
        return _meminfo_available()
    stats = client.memory_stats(0)
    if stats is None or not stats.get("bytes_limit"):
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def default_budget(client) -> int:
    if client.platform_name == "cpu":
        return DEFAULT_CPU_BUDGET
    available = device_available(client)
    return int(GPU_BUDGET_SHARE * available) if available else DEFAULT_CPU_BUDGET


def program_cost(seconds: float, nbytes: int) -> _runtime.ProgramCost:
    cost = _runtime.ProgramCost()
    cost.seconds, cost.bytes = float(seconds), int(nbytes)
    return cost


def cost_table(layout, costs: dict) -> _runtime.CostTable:
    """A CostTable from per-program costs (``TaskRunner.calibrate``/``program_bytes``)."""
    table = _runtime.CostTable()
    table.state_bytes = layout.state_bytes
    table.cotangent_bytes = (sum(s.nbytes for s in layout.state if s.floating) * max(layout.outputs, 1)
                             + sum(a.size * a.dtype.itemsize for a in layout.accumulators()))
    advance, segment = {}, {}
    for name, cost in costs.items():
        kind, n = _runtime.parse_program_name(name)
        if kind == "advance":
            advance[n] = cost
        elif kind == "segment_vjp":
            segment[n] = cost
        else:
            setattr(table, kind, cost)
    table.advance, table.segment_vjp = advance, segment
    return table


@dataclass(frozen=True)
class Choice:
    schedule: Budget
    plan: object
    seconds: float
    peak_bytes: int


def _revolve(steps: int, states: int, leaf: int, table) -> tuple[object, dict]:
    plan = plan_revolve(steps, states, leaf)
    return plan, _runtime.simulate_plan(plan, table)


def choose(table, steps: int, leaves, budget: int, data_bytes: int) -> Choice:
    """The fastest revolve plan over ``leaves`` whose peak plus data fits ``budget``."""
    best, minimum = None, None
    for leaf in sorted(set(min(n, steps) for n in leaves)):
        blocks = -(-steps // leaf)
        plan, cost = _revolve(steps, 1, leaf, table)
        need = cost["peak_bytes"] + data_bytes
        minimum = need if minimum is None else min(minimum, need)
        if need > budget:
            continue
        lo, hi = 1, blocks  # the most states that fit: peak grows with them, time falls
        chosen = (1, plan, cost)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            plan, cost = _revolve(steps, mid, leaf, table)
            if cost["peak_bytes"] + data_bytes <= budget:
                lo, chosen = mid, (mid, plan, cost)
            else:
                hi = mid - 1
        states, plan, cost = chosen
        if best is None or cost["seconds"] < best.seconds:
            best = Choice(Budget(states=states, leaf=leaf), plan, cost["seconds"], cost["peak_bytes"])
    if best is None:
        raise DeviceMemoryError(
            f"a device-memory budget of {_bytes(budget)} is below the minimum any plan needs here: "
            f"{_bytes(minimum)} ({_bytes(data_bytes)} of data and z, one saved state, the current state, "
            f"cotangents and the reverse program's temporaries). Raise Auto(memory=...) to at least {minimum}.")
    return best


def check_fits(client, predicted_peak: int, data_bytes: int, what: str, suggestion: str) -> None:
    """Refuse a run whose predicted device bytes exceed what the device has."""
    available = device_available(client)
    need = predicted_peak + data_bytes
    if available is not None and need > available:
        raise DeviceMemoryError(
            f"{what} needs {_bytes(need)} of device memory ({_bytes(data_bytes)} of data and z, "
            f"{_bytes(predicted_peak)} at its peak: saved states, the current state, cotangents and temporaries), "
            f"the device has {_bytes(available)} available. {suggestion}")


def fused_lengths(steps: int, leaf: int) -> tuple[int, ...]:
    """The fused reverse lengths a plan over blocks of ``leaf`` steps uses (the last block may be shorter)."""
    lengths = {min(leaf, steps)}
    if steps % leaf and steps > leaf:
        lengths.add(steps % leaf)
    return tuple(sorted(n for n in lengths if n > 1))
