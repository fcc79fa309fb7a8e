"""The planner: the fastest checkpointing plan that fits a device-memory budget.

``Auto(memory=...)`` (the default schedule of ``CompiledTask.metagradient``)
chooses, for each fused reverse length ``block`` it may use, the binomial
(revolve) plan with the most saved states that fits the budget, predicts its
time, and runs the fastest; plans predicted within ``NEAR_TIE`` of the fastest
count as tied, and the tie goes to the fewest program executions. Predictions
come from a cost table of the task's programs: the device bytes of each
execution (XLA's compiled memory statistics) and its seconds (a short
calibration that runs each program a few times, once per compiled task). The
plan is then simulated with the task runner's own accounting
(``simulate_plan``), so the predicted peak is what the run's
``Report.peak_device_bytes`` measures.

The budget covers everything the run holds on the device: data and z, saved
states, the current state, cotangents and metagradient accumulators, and the
temporaries of the program running. Its default is
``DEFAULT_CPU_BUDGET`` on the CPU plugin (device memory is the host's RAM,
shared with everything else) and ``GPU_BUDGET_SHARE`` of the device's free
memory elsewhere.

Every plan is also checked against the memory the device has before it runs,
whatever the schedule: a plan that cannot fit is a :class:`DeviceMemoryError`
naming what it needs, what there is, and a schedule that fits.

Host tier: with a host-memory budget (``Auto(host_memory=...)``; none by
default on the CPU plugin, whose device memory is the host's RAM already),
some slots of a plan may keep their states in host memory: a save copies the
state there, a restore copies it back. The planner then also considers plans
with more saved states than the device holds: for each, the fewest slots that
must move for the device peak to fit, taking first the slots that cost the
fewest copies (``host_slot_order``: saves plus restores, measured per plan),
and the calibrated cost of one copy each way. It runs the fastest plan that
fits both budgets, host copies included.

Over several devices every byte figure is per device (each holds one shard of
every value): ``memory`` is what each device may hold; ``host_memory`` is the
host's, shared by the devices.
"""

from __future__ import annotations

from dataclasses import dataclass

from metagrad import _runtime
from metagrad._src.schedules import Budget, _int, plan_revolve

DEFAULT_CPU_BUDGET = 2 * 2**30
GPU_BUDGET_SHARE = 0.5
HOST_BUDGET_SHARE = 0.5  # of the host's available RAM, for saved states of a GPU's run
HOST_MEMORY_KIND = _runtime.HOST_MEMORY_KIND  # the host tier's memory kind
# Fused reverse lengths Auto considers: an unrolled program's compile time grows
# with its length, a lax.scan's does not, and a long scan of dot-heavy steps
# runs fastest per step.
DEFAULT_BLOCKS = {"unroll": (1, 10), "scan": (1, 10, 100)}
# Lengths between those, compiled only where the budget rules out the longest: a short fused reverse
# can hold no more memory than a single step's while it runs faster (bench/fused_lengths.py measures it).
GAP_BLOCKS = {"unroll": (3,), "scan": (3, 30)}
# Plans predicted within this share of the fastest are a tie, which goes to the
# fewest executions: the share is below the spread of a calibration from one
# process to the next (bench/calibration_drift.py measures it), and every
# execution pays a dispatch (a wake-up of the plugin's thread pool) that costs
# the most when the machine is busy, which calibration does not see.
NEAR_TIE = 0.10


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
      memory: bytes the run may hold on each device, data and z included
        (default: 2 GiB on the CPU plugin, half the free memory of a GPU).
      blocks: fused reverse block lengths to consider (default ``(1, 10)``, or
        ``(1, 10, 100)`` for a task compiled with ``loop="scan"``; capped at T);
        each length > 1 compiles one more reverse program. With the default,
        where the budget rules out every plan over the longest block, Auto
        also tries the lengths between (``GAP_BLOCKS``: 3, and 30
        for ``loop="scan"``), compiled then, and runs one only if its plan is
        predicted faster. With the default, no call waits for a fused reverse:
        the first call of a compiled task plans over single-step reverses, the
        second starts building the fused ones in the background, and each call
        plans over those built (``CompiledTask.prepare`` builds them now).
      host_memory: bytes of host memory for saved states, all devices together
        (default: none on the CPU plugin, half the host's available RAM
        elsewhere); 0 keeps every state on the device.
    """

    memory: int | None = None
    blocks: tuple[int, ...] | None = None
    host_memory: int | None = None

    def __post_init__(self):
        for name, minimum in (("memory", 1), ("host_memory", 0)):
            if getattr(self, name) is not None:
                _int(f"{name} (bytes)", getattr(self, name), minimum, 2**63 - 1, where="Auto: ")
        if self.blocks is not None:
            if not self.blocks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.blocks):
                raise ValueError(f"Auto: blocks must be a non-empty tuple of ints >= 1, got {self.blocks!r}")

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


def default_host_budget(client) -> int:
    """No host tier on the CPU plugin (its device memory is host RAM); elsewhere
    ``HOST_BUDGET_SHARE`` of the host's available RAM."""
    if client.platform_name == "cpu":
        return 0
    available = _meminfo_available()
    return int(HOST_BUDGET_SHARE * available) if available else 0


def cost_table(task_layout, costs: dict) -> _runtime.CostTable:
    """A CostTable from the runner's layout (per-device shards) and per-program costs
    (``TaskRunner.calibrate``/``program_bytes``; ``to_host``/``from_host``: one state's copies;
    ``stream``: one step's streamed batch)."""
    table = _runtime.CostTable()
    table.state_bytes = task_layout.state_bytes
    table.cotangent_bytes = task_layout.cotangent_bytes
    copies = ("to_host", "from_host", "stream")
    for name in copies:
        if name in costs:
            setattr(table, name, costs[name])
    table.programs = {name: cost for name, cost in costs.items() if name not in copies}
    return table


@dataclass(frozen=True)
class Choice:
    schedule: Budget
    plan: object
    seconds: float
    peak_bytes: int
    host_slots: frozenset = frozenset()  # slots whose states live in host memory
    peak_host_bytes: int = 0
    executions: int = 0


def _revolve(steps: int, states: int, block: int, table) -> tuple[object, dict]:
    plan = plan_revolve(steps, states, block)
    return plan, _runtime.simulate_plan(plan, table)


def fewest_host_slots(plan, table, budget: int, data_bytes: int) -> tuple[frozenset, dict] | None:
    """The fewest slots of ``plan`` to hold in host memory, cheapest first
    (``host_slot_order``), for its device peak plus data to fit ``budget``, and
    the plan's cost with them; None if not even all of them suffice. Moving a
    slot never raises the device peak, so the count is found by bisection."""
    order = _runtime.host_slot_order(plan)
    cost = lambda n: _runtime.simulate_plan(plan, table, set(order[:n]))  # noqa: E731
    if cost(len(order))["peak_bytes"] + data_bytes > budget:
        return None
    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid)["peak_bytes"] + data_bytes <= budget:
            hi = mid
        else:
            lo = mid + 1
    return frozenset(order[:lo]), cost(lo)


def _state_counts(blocks: int) -> list[int]:
    """Saved-state counts tried with the host tier: about 1.5x apart, and all blocks."""
    counts, n = {blocks}, 1
    while n < blocks:
        counts.add(n)
        n = max(n + 1, int(n * 1.5))
    return sorted(counts)


def choose(table, steps: int, blocks, budget: int, data_bytes: int, host_budget: int = 0) -> Choice:
    """The fastest revolve plan over ``blocks`` whose device peak plus data fits
    ``budget`` (per device), with some of its slots in host memory where
    ``host_budget`` (per device) allows; of plans within ``NEAR_TIE`` of the
    fastest prediction, the one with the fewest executions."""
    candidates, minimum = [], None
    for block in sorted(set(min(n, steps) for n in blocks)):
        units = -(-steps // block)
        plan, cost = _revolve(steps, 1, block, table)
        need = cost["peak_bytes"] + data_bytes
        minimum = need if minimum is None else min(minimum, need)
        if need <= budget:
            lo, hi = 1, units  # the most states that fit: peak grows with them, time falls
            chosen = (1, plan, cost)
            while lo < hi:
                mid = (lo + hi + 1) // 2
                plan, cost = _revolve(steps, mid, block, table)
                if cost["peak_bytes"] + data_bytes <= budget:
                    lo, chosen = mid, (mid, plan, cost)
                else:
                    hi = mid - 1
            states, plan, cost = chosen
            candidates.append(Choice(Budget(states=states, block=block), plan, cost["seconds"], cost["peak_bytes"],
                                     executions=cost["executions"]))
        if host_budget <= 0:
            continue
        # More states than the device holds, some in host memory: fewer replays, more copies.
        for states in _state_counts(units):
            plan = plan_revolve(steps, states, block)
            # The least device memory this plan runs in: every slot in host memory. Any count of states
            # can be the smallest (one state replays with the fused forward programs, whose temporaries
            # can outweigh the reverse's), so the minimum is taken over all of them.
            everything = _runtime.simulate_plan(plan, table, set(_runtime.host_slot_order(plan)))
            if everything["peak_host_bytes"] <= host_budget:
                minimum = min(minimum, everything["peak_bytes"] + data_bytes)
            fit = fewest_host_slots(plan, table, budget, data_bytes)
            if fit is None or not fit[0] or fit[1]["peak_host_bytes"] > host_budget:
                continue
            slots, cost = fit
            candidates.append(Choice(Budget(states=states, block=block), plan, cost["seconds"], cost["peak_bytes"],
                                     slots, cost["peak_host_bytes"], cost["executions"]))
    if not candidates:
        where = ("one saved state, the current state" if host_budget <= 0 else
                 f"the current state (saved states in up to {_bytes(host_budget)} of host memory)")
        raise DeviceMemoryError(
            f"a device-memory budget of {_bytes(budget)} is below the minimum any plan needs here: "
            f"{_bytes(minimum)} ({_bytes(data_bytes)} of data and z, {where}, "
            f"cotangents and the reverse program's temporaries). Raise Auto(memory=...) to at least {minimum}.")
    fastest = min(choice.seconds for choice in candidates)
    return min((choice for choice in candidates if choice.seconds <= (1 + NEAR_TIE) * fastest),
               key=lambda choice: (choice.executions, choice.seconds))


def gap_blocks(loop: str, chosen: int, blocks, steps: int) -> tuple[int, ...]:
    """The lengths of ``GAP_BLOCKS`` worth a try after ``choose`` over ``blocks`` chose blocks of
    ``chosen`` steps: those between it and the longest of ``blocks`` (capped at T)."""
    longest = min(max(blocks), steps)
    return tuple(n for n in GAP_BLOCKS[loop] if chosen < n < longest)


def fits(table, steps: int, block: int, budget: int, data_bytes: int, host_budget: int = 0) -> bool:
    """Whether any plan over blocks of ``block`` steps fits the budgets (see ``choose``)."""
    try:
        choose(table, steps, (block,), budget, data_bytes, host_budget)
    except DeviceMemoryError:
        return False
    return True


def choose_with_gaps(table, steps: int, blocks, gaps, budget: int, data_bytes: int, host_budget: int = 0) -> Choice:
    """``choose`` over ``blocks``, unless the best plan over the ``gaps`` lengths is predicted faster.
    The near tie, which goes to fewer executions, does not carry a gap length in (longer blocks mostly
    have fewer): searched with the others, the wide MLP's 30-step blocks with 6 states were taken over
    10-step ones with 16, and ran 7% slower (bench/fused_lengths.py)."""
    choice = choose(table, steps, blocks, budget, data_bytes, host_budget)
    try:
        gap = choose(table, steps, gaps, budget, data_bytes, host_budget)
    except DeviceMemoryError:
        return choice
    return gap if gap.seconds < choice.seconds else choice


def check_fits(client, predicted_peak: int, data_bytes: int, what: str, suggestion: str, devices: int = 1,
               host_peak: int = 0) -> None:
    """Refuse a run whose predicted device bytes (per device) exceed what the device
    has. The CPU plugin's devices all live in the host's RAM, with the host tier."""
    available = device_available(client)
    need = predicted_peak + data_bytes
    if client.platform_name == "cpu":
        need = devices * (need + host_peak)
    if available is not None and need > available:
        raise DeviceMemoryError(
            f"{what} needs {_bytes(need)} of device memory ({_bytes(data_bytes)} of data and z, "
            f"{_bytes(predicted_peak)} at its peak: saved states, the current state, cotangents and temporaries"
            + (f"; per device, over {devices} devices" if devices > 1 else "") +
            f"), the device has {_bytes(available)} available. {suggestion}")


def fused_lengths(steps: int, block: int) -> tuple[int, ...]:
    """The fused reverse lengths a plan over blocks of ``block`` steps uses (the last block may be shorter)."""
    lengths = {min(block, steps)}
    if steps % block and steps > block:
        lengths.add(steps % block)
    return tuple(sorted(n for n in lengths if n > 1))
