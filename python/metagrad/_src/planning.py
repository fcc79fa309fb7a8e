"""Planning for a compiled task: the plan a schedule runs, and Auto's search for it.

``Auto`` asks for the fastest plan that fits its budgets. With its default block
lengths, no call waits for the fused reverses (an unrolled copy of the step per
fused step, the slowest programs to build): the first call plans over
single-step reverses, the second starts building the fused ones in the
background (``background``), and every call plans over what is built. The
first call after a build has finished settles from the new programs' compiled
memory alone whether any plan over them fits, calibrates them (once per set of
programs, kept in the disk cache so that another process makes the same
choice) and searches (``planner.choose``); where the budget rules out the
longest block, the lengths between are built the same way and tried.
Explicit lengths (``Auto(blocks=...)``), ``prepare`` and the cost queries build
what they need at once. Any plan, fixed or chosen, is predicted
(``simulate_plan``) and checked against the device's memory before it runs.
``CompiledTask`` owns one ``Planning``; it asks the task for runners and
programs and keeps its own caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import warnings
from dataclasses import dataclass
from typing import Any

from metagrad import _runtime
from metagrad._src import background, cache, enzyme_worker, planner, setup_time
from metagrad._src.planner import Auto


@dataclass(frozen=True)
class Planned:
    """The plan a metagradient runs, with its prediction."""

    described: str  # the schedule, and what Auto chose
    plan: Any
    fused: tuple[int, ...]  # fused reverse lengths the plan runs
    forward: tuple[int, ...] | None  # fused forward lengths it runs (None: the task's fuse_forward)
    seconds: float  # predicted (0 for fixed schedules: no calibration)
    peak_bytes: int | None  # predicted peak device bytes (per device)
    budget: int  # Auto's budget (0 for fixed schedules)
    host_slots: frozenset = frozenset()  # slots of the plan in host memory
    peak_host_bytes: int = 0  # predicted, per device
    host_budget: int = 0  # Auto's host budget per device



def _steps(lengths) -> str:
    return ", ".join(map(str, lengths))


def check_schedule(schedule):
    if isinstance(schedule, type):
        raise TypeError(f"schedule must be a schedule instance, got the class {schedule.__name__}: write "
                        f"{schedule.__name__}(...)")
    if not hasattr(schedule, "plan"):
        raise TypeError(f"schedule must be a metagrad schedule (Auto, Replay, StoreAll, Periodic, Budget), "
                        f"got {type(schedule).__name__}")
    return schedule


class Planning:
    """The planning of one compiled task (``task``): its caches of calibrations and of Auto's
    choices, its background builds, and how many metagradients Auto planned so far."""

    def __init__(self, task):
        self.task = task
        self._calibrations: dict = {}  # program costs by the set of program names calibrated
        self._choices: dict = {}  # Auto's final (choice, costs) by (Auto.blocks, budgets)
        self._builds: dict = {}  # background builds by the fused reverse lengths they build
        self._unbuildable: set = set()  # fused reverse lengths whose build failed: planned without
        self._lock = threading.Lock()  # one thread plans at a time
        self.calls = 0  # metagradients Auto planned

    def host_memory_kind(self) -> str | None:
        kinds = self.task.client.devices[self.task.devices[0]].memory_kinds
        return planner.HOST_MEMORY_KIND if planner.HOST_MEMORY_KIND in kinds else None

    def auto_blocks(self, auto: Auto) -> tuple[int, ...]:
        """The fused reverse lengths Auto considers first."""
        return tuple(auto.blocks or planner.DEFAULT_BLOCKS[self.task.loop])

    def fused(self, blocks) -> tuple[int, ...]:
        """The segment programs plans over blocks of the lengths ``blocks`` need."""
        return tuple(sorted({n for block in blocks for n in planner.fused_lengths(self.task.steps, block)}))

    def _budgets(self, auto: Auto) -> tuple[int, int, str | None]:
        """Auto's device budget, its host budget per device, and the host memory kind (None: none)."""
        budget = auto.memory or planner.default_budget(self.task.client)
        host_kind = self.host_memory_kind()
        host_memory = auto.host_memory if auto.host_memory is not None else planner.default_host_budget(self.task.client)
        return budget, (host_memory // self.task.num_devices if host_kind else 0), host_kind

    def _built(self, lengths: tuple[int, ...], wait: bool, what: str) -> bool:
        """Whether the runner over the fused reverses of ``lengths`` (and the task's fused
        forwards) is built. With ``wait`` it is built now (raising what the build raises).
        Without, a background build is started where none is under way; one that failed is
        warned of once (``what``: the programs, for the warning), and its lengths planned
        without from then on."""
        build = self._builds.get(lengths)
        if build is not None and (wait or build.done()):
            del self._builds[lengths]
            self.task.setup.add(build.setup)
            try:
                build.result()
            except (background.Stopped, enzyme_worker.Interrupted):
                pass  # abandoned, not failed: built again below, or by the next call
            except Exception as error:
                if not wait:
                    self._unbuilt(lengths, what, error)
                    return False
        if wait:
            self.task._runner(lengths)
            return True
        if lengths in self._unbuildable:
            return False
        if not self.task._missing(self.task._runner_programs(lengths)):
            return True
        if lengths not in self._builds:
            self._builds[lengths] = background.Build(lambda: self.task._runner(lengths), what)
        return False

    def _unbuilt(self, lengths: tuple[int, ...], what: str, error: Exception) -> None:
        """Plan without the fused reverses of ``lengths`` from now on, and say why."""
        self._unbuildable.add(lengths)
        advice = (" Call prepare(metagrad.Auto()) before save() to keep them in the saved task."
                  if isinstance(error, ImportError) else "")
        warnings.warn(f"Auto: {what} cannot be built here ({type(error).__name__}: {error}); planning without "
                      f"them.{advice}", stacklevel=7)

    def _choose_single_step(self, auto: Auto, z_buffers) -> tuple[planner.Choice, int, int]:
        """The plan over single-step reverses that fits Auto's budgets, with the programs built
        so far. One block length leaves nothing to compare on one memory tier: the most states
        that fit is the fastest plan, so no calibration runs there (the prediction is 0)."""
        budget, host_budget, host_kind = self._budgets(auto)
        runner = self.task._runner((), self.task._built_forward())
        costs = runner.program_bytes()
        if host_budget:
            costs = self._costs(runner, (1,), budget, host_budget, host_kind, z_buffers)
        choice = planner.choose(planner.cost_table(self.task._task_layout, costs), self.task.steps, (1,), budget,
                                self.task.data_bytes, host_budget)
        return choice, budget, host_budget

    def costs(self, auto: Auto, z_buffers) -> dict:
        """The program costs (and host copies) Auto plans from under ``auto``'s budgets."""
        with self._lock:
            return self._choose(auto, z_buffers, wait=True)[3]

    def _choose(self, auto: Auto, z_buffers, wait: bool) -> tuple[planner.Choice, int, int, dict, str] | None:
        """The plan Auto picks, its device budget, its host budget per device, the program costs
        it was chosen from and a note for the report; None while (without ``wait``) its fused
        reverses are built in the background. While the lengths between are, the choice without
        them (and a note that says so)."""
        blocks = self.auto_blocks(auto)
        budget, host_budget, host_kind = self._budgets(auto)
        key = (auto.blocks, budget, host_budget)  # blocks=None also tries GAP_BLOCKS: not the same as the defaults
        if key not in self._choices:
            first = self.fused(blocks)
            if not self._built(first, wait, f"the fused reverses of {_steps(first)} steps"):
                return None
            costs = self._costs(self.task._runner(first), blocks, budget, host_budget, host_kind, z_buffers)
            table = planner.cost_table(self.task._task_layout, costs)
            choice = planner.choose(table, self.task.steps, blocks, budget, self.task.data_bytes, host_budget)
            longest = min(max(blocks), self.task.steps)
            gaps = () if auto.blocks or planner.fits(table, self.task.steps, longest, budget, self.task.data_bytes,
                                                     host_budget) else planner.gap_blocks(
                self.task.loop, choice.schedule.block, blocks, self.task.steps)
            if gaps:
                both = self.fused(blocks + gaps)
                what = f"the fused reverses of {_steps(gaps)} steps, which may run faster within this budget,"
                try:
                    built = self._built(both, wait, what)
                except ImportError as error:  # a loaded task builds no program where enzyme-ad is not installed
                    self._unbuilt(both, what, error)
                    built = False
                if built:
                    costs = self._costs(self.task._runner(both), blocks, budget, host_budget, host_kind, z_buffers)
                    choice = planner.choose_with_gaps(planner.cost_table(self.task._task_layout, costs), self.task.steps,
                                                      blocks, gaps, budget, self.task.data_bytes, host_budget)
                elif both not in self._unbuildable:  # until they are built, the choice without them
                    return choice, budget, host_budget, costs, " (while the lengths between build in the background)"
            self._choices[key] = choice, costs
        choice, costs = self._choices[key]
        return choice, budget, host_budget, costs, ""

    def _costs(self, runner, first_blocks, budget: int, host_budget: int, host_kind: str | None, z_buffers) -> dict:
        """The cost of each program of ``runner`` (and, with a host budget, of one state's copies).
        Whether any plan over ``first_blocks`` fits is settled from the programs' compiled memory
        alone; only then are they calibrated (once per set of programs), which runs them."""
        sizes = runner.program_bytes()
        wanted = tuple(sorted(set(sizes) | ({"to_host", "from_host"} if host_budget else set())
                              | ({"stream"} if self.task.stream is not None else set())))
        if wanted not in self._calibrations:
            planner.choose(planner.cost_table(self.task._task_layout, sizes), self.task.steps, first_blocks, budget,
                           self.task.data_bytes, host_budget)
            self._calibrations[wanted] = self._calibrate(runner, sizes, z_buffers, host_kind if host_budget else "")
        return {name: self._calibrations[wanted][name] for name in wanted}

    def _calibrate(self, runner, sizes: dict, z_buffers, host_kind: str) -> dict:
        """Each program's seconds per execution (and, with a host tier, one state's copies),
        measured once per machine: kept in the disk cache, so that another process makes
        the same choice (and the same bits)."""
        entry = cache.client_key(self.task.client, "calibration", sorted(
            (name, hashlib.sha256(self.task.programs[name].artifact).hexdigest()) for name in sizes
            if name in self.task.programs), sorted(sizes), host_kind, self.task.num_devices, _runtime.CALIBRATION_VERSION,
            self.task.stream and self.task.stream.described())
        stored = cache.get("calibration", entry)
        if stored is not None:
            try:
                return {name: planner.program_cost(*values) for name, values in json.loads(stored).items()}
            except (ValueError, TypeError):
                pass
        # Calibration holds a state, the next one of a chain, and the cotangents.
        peak = 3 * self.task._task_layout.state_bytes + max(cost.bytes for cost in sizes.values())
        planner.check_fits(self.task.client, peak, self.task.data_bytes, "calibrating the task's programs",
                           "The task's state is too large for this device.", self.task.num_devices)
        with setup_time.phase("calibrate"):
            costs = runner.calibrate(z_buffers, host_memory_kind=host_kind)
        if not background.running():  # timings beside a compile are skewed: not kept for other processes
            cache.put("calibration", entry, json.dumps({n: [c.seconds, c.bytes] for n, c in costs.items()}).encode())
        return costs

    def _plan_auto(self, auto: Auto, z_buffers) -> Planned:
        """The plan ``auto`` runs now: its choice over the fused reverses built, or over
        single-step reverses before they are (see the module's docstring)."""
        lengths = self.fused(self.auto_blocks(auto))
        chosen, forward, note = None, None, ""
        if auto.blocks is None and self.calls == 0 and self.task._missing(self.task._runner_programs(lengths)):
            note = " (first call: single-step reverses; the next call starts building the fused ones)"
        else:
            chosen = self._choose(auto, z_buffers, wait=auto.blocks is not None)
            if chosen is None:
                note = (" (single-step reverses: the fused ones could not be built)" if lengths in self._unbuildable
                        else " (single-step reverses while the fused ones build in the background)")
        if chosen is None:
            choice, budget, host_budget = self._choose_single_step(auto, z_buffers)
            forward = self.task._built_forward()
        else:
            choice, budget, host_budget, _, note = chosen
        described = f"Auto(memory={budget}) -> {choice.schedule!r}"
        if choice.host_slots:
            described += (f" with {len(choice.host_slots)} of its slots in host memory "
                          f"(host_memory={host_budget * self.task.num_devices})")
        return Planned(described + note, choice.plan, (), forward, choice.seconds, choice.peak_bytes, budget,
                       choice.host_slots, choice.peak_host_bytes, host_budget)

    def plan(self, schedule, z_buffers) -> Planned:
        """The plan ``schedule`` runs, its prediction, checked against the device's memory."""
        schedule = check_schedule(schedule if schedule is not None else Auto())
        if isinstance(schedule, Auto):
            with self._lock:
                planned = self._plan_auto(schedule, z_buffers)
                self.calls += 1
        else:
            plan = schedule.plan(self.task.steps, state_bytes=self.task._task_layout.state_bytes)
            planned = Planned(repr(schedule), plan, (), None, 0.0, None, 0)
        fused = tuple(n for n in planned.plan.stats(self.task.steps)["fused_lengths"] if n > 1)
        planned = dataclasses.replace(planned, fused=fused)
        if planned.peak_bytes is None:
            table = planner.cost_table(self.task._task_layout, self.task._runner(fused, planned.forward).program_bytes())
            planned = dataclasses.replace(planned,
                                          peak_bytes=_runtime.simulate_plan(planned.plan, table)["peak_bytes"])
        planner.check_fits(self.task.client, planned.peak_bytes, self.task.data_bytes, planned.described,
                           "Auto() (the default schedule) picks the fastest plan that fits the device; "
                           "Budget(states=...) with fewer states needs less.", self.task.num_devices,
                           planned.peak_host_bytes)
        return planned
