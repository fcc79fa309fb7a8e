"""A task compiled for the runtime: training and metagradients run in C++."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from metagrad import _runtime
from metagrad._src import cache, ffi, lowering, module_checks, planner, programs, runtime, saved, setup_time, trees
from metagrad._src import sharding as sharding_lib
from metagrad._src.layout import Layout, describe
from metagrad._src.planner import Auto
from metagrad._src.programs import Program
from metagrad._src.progress import steps_bar
from metagrad._src.sharding import TaskSharding

# The report of a run: bound from C++ (cpp/runtime/task_runner.h lists its fields).
Report = _runtime.Report

# What a first metagradient runs, built by Task.compile. The other programs are built on first
# use: the finiteness checks by check_finite, the fused forward programs (advance_n) by train() and
# by the metagradients after the first, the fused reverses by the plans that run them, and all of
# them by save().
FIRST_PROGRAMS = (*programs.needed_by("run"), *programs.needed_by("metagradient"))
CHECK_PROGRAMS = programs.needed_by("check_finite")
BASE_PROGRAMS = tuple(name for name, kind in programs.KINDS.items() if not kind["sized"])


def _task_layout(layout: Layout, sharding: TaskSharding | None) -> _runtime.TaskLayout:
    """The runner's layout: every leaf as each device's shard of it."""
    def specs(structs, group):
        leaf_specs = [()] * len(structs) if sharding is None else sharding.group_specs(layout, group)
        return [runtime.ArraySpec(list(s.shape if sharding is None else sharding.shard_shape(s.shape, spec)),
                                  np.dtype(s.dtype).name) for s, spec in zip(structs, leaf_specs)]

    task_layout = _runtime.TaskLayout()
    task_layout.devices = 1 if sharding is None else sharding.num_devices
    task_layout.state = specs([s.struct() for s in layout.state], "S")
    task_layout.z = specs([s.struct() for s in layout.z], "Z")
    task_layout.data = specs([s.struct() for s in layout.data], "X")
    task_layout.differentiable = list(layout.differentiable)
    task_layout.accumulators = specs(layout.accumulators(), "A")
    task_layout.phi = runtime.ArraySpec(list(layout.phi_shape), layout.phi_dtype)
    task_layout.outputs = layout.outputs
    return task_layout


def _host_leaves(tree, specs, what: str) -> list[np.ndarray]:
    """The leaves of ``tree`` as numpy arrays of the compiled dtypes, checked against ``specs``.

    Like ``jax.jit``, 64-bit numpy arrays are taken as 32-bit unless x64 is on.
    """
    paths = trees.leaf_paths(tree, what)
    expected = [spec.path for spec in specs]
    if paths != expected:
        raise ValueError(f"{what} has the leaves {paths}, the task was compiled for {expected}")
    arrays = []
    for spec, leaf in zip(specs, jax.tree_util.tree_leaves(tree)):
        if spec.key_impl is not None:
            leaf = jax.random.key_data(leaf) if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
        array = np.asarray(leaf)
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(array.dtype))
        if tuple(array.shape) != spec.shape or dtype != np.dtype(spec.dtype):
            hint = (" (numpy arrays are 64-bit by default: cast them with .astype, or compile with "
                    "jax_enable_x64 on)" if array.dtype.itemsize == 8 and np.dtype(spec.dtype).itemsize < 8 else "")
            raise ValueError(f"{spec.path} is {array.dtype.name}{list(array.shape)}, the task was compiled for "
                             f"{spec.dtype}{list(spec.shape)}{hint}")
        arrays.append(np.asarray(array, dtype=dtype, order="C"))
    return arrays


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _determinism_stride(value) -> int:
    if isinstance(value, (bool, np.bool_)):
        return 1 if value else 0
    try:
        stride = operator.index(value)
    except TypeError:
        stride = 0
    if stride < 1 or stride > 2**31 - 1:
        raise ValueError(f"check_determinism must be True, False or a stride >= 1 (every n-th state), got {value!r}")
    return stride


def _check_schedule(schedule):
    if isinstance(schedule, type):
        raise TypeError(f"schedule must be a schedule instance, got the class {schedule.__name__}: write "
                        f"{schedule.__name__}(...)")
    if not hasattr(schedule, "plan"):
        raise TypeError(f"schedule must be a metagrad schedule (Auto, Replay, StoreAll, Periodic, Budget), "
                        f"got {type(schedule).__name__}")
    return schedule


@dataclass(frozen=True)
class _Planned:
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


@dataclass
class CompiledTask:
    """Executables of a task, its data on the device, and runners per fused reverse length.

    Made by :meth:`metagrad.Task.compile` or :func:`metagrad.load`.
    """

    layout: Layout
    steps: int
    backend: str
    loop: str  # how programs of several steps are written (programs.LOOPS)
    exports: dict[str, bytes] = field(repr=False)  # the forward functions: every program derives from them
    programs: dict[str, Program] = field(repr=False)
    client: Any = field(repr=False)
    data: list = field(repr=False)  # host arrays of the data leaves, uploaded once
    z_example: Any = field(repr=False)
    forward: programs.Forward | None = field(default=None, repr=False)  # the task's own functions, if known
    sharding: TaskSharding | None = None  # None: one device
    devices: tuple[int, ...] = (0,)  # the client's devices of the partitions
    # lengths of the fused forward programs (advance_n), built on first use; None: those a loaded task holds
    fuse_forward: tuple[int, ...] | None = None
    setup: setup_time.SetupTime = field(default_factory=setup_time.SetupTime, repr=False)  # seconds spent so far
    executables: dict = field(default_factory=dict, repr=False)  # compiled programs by name, built on first use
    _runners: dict = field(default_factory=dict, repr=False)
    _data: list = field(default_factory=list, repr=False)
    # calibrated ProgramCost by program name, per set of programs calibrated together
    _calibrations: dict = field(default_factory=dict, repr=False)
    _choices: dict = field(default_factory=dict, repr=False)  # Auto's (choice, costs) by (Auto.leaves, budgets)
    _metagradients: int = field(default=0, repr=False)  # calls of metagradient with Auto planned so far

    def __post_init__(self):
        self._options = sharding_lib.compile_options(self.client, self.sharding, self.devices)
        if self.fuse_forward is None:
            self.fuse_forward = tuple(sorted(n for kind, n in map(programs.kind_of, self.programs)
                                             if kind == "advance"))
        for name, program in self.programs.items():
            if name not in self.executables:
                self.executables[name] = runtime.compile_program(program, self.client, self._options)
        self._data = self._upload(self.data, "data")
        self._task_layout = _task_layout(self.layout, self.sharding)

    def _upload(self, arrays, what: str) -> list:
        """Host arrays of group ``what`` ("data", "z") as device buffers: per leaf, one shard per device."""
        if self.sharding is None:
            return [runtime.to_device(a, self.client) for a in arrays]
        return [b for a, spec in zip(arrays, getattr(self.sharding, what))
                for b in self.sharding.upload(a, spec, self.client, self.devices)]

    def _download(self, buffers, leaves, specs) -> list[np.ndarray]:
        """Host arrays of the leaves ``leaves`` from their shards (leaf-major)."""
        if self.sharding is None:
            return [b.to_numpy() for b in buffers]
        n = len(self.devices)
        return [self.sharding.assemble(buffers[i * n:(i + 1) * n], leaf.shape, spec)
                for i, (leaf, spec) in enumerate(zip(leaves, specs))]

    def _z_buffers(self, z) -> list:
        return self._upload(_host_leaves(z, self.layout.z, "z"), "z")

    def _ensure(self, names) -> None:
        """Lower and compile programs ``names`` that this task does not have yet."""
        missing = [name for name in names if name not in self.programs]
        if not missing:
            return
        def compile_now(name: str, program: Program) -> None:
            self.executables[name] = runtime.compile_program(program, self.client, self._options)
            self.programs[name] = program

        lowering.lower(self.exports, self.layout, missing, backend=self.backend,
                       target=runtime.stablehlo_target(self.client), loop=self.loop, forward=self.forward,
                       sharding=self.sharding, ready=compile_now)

    def _runner(self, fused_lengths: tuple[int, ...] = (), forward_lengths: tuple[int, ...] | None = None,
                checks: bool = False):
        """The runner with the fused reverse programs of ``fused_lengths``, the fused forward
        programs of ``forward_lengths`` (None: the task's ``fuse_forward``) and, with ``checks``,
        the finiteness checks: each built on first use."""
        forward_lengths = self.fuse_forward if forward_lengths is None else forward_lengths
        names = (*FIRST_PROGRAMS, *(programs.sized("segment_vjp", n) for n in fused_lengths),
                 *(programs.sized("advance", n) for n in forward_lengths), *(CHECK_PROGRAMS if checks else ()))
        key = tuple(sorted(names))
        if key not in self._runners:
            self._ensure(names)
            chosen = {name: self.executables[name] for name in names}
            self._runners[key] = _runtime.TaskRunner(chosen, self._task_layout, self.steps, self._data)
        return self._runners[key]

    def _built_forward(self) -> tuple[int, ...]:
        """The lengths of the fused forward programs built so far."""
        return tuple(n for n in self.fuse_forward if programs.sized("advance", n) in self.programs)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data and z on each device, held there throughout a run."""
        return sum(spec.nbytes for spec in (*self._task_layout.data, *self._task_layout.z))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def _host_memory_kind(self) -> str | None:
        kinds = self.client.devices[self.devices[0]].memory_kinds
        return planner.HOST_MEMORY_KIND if planner.HOST_MEMORY_KIND in kinds else None

    def _auto_leaves(self, auto: Auto) -> tuple[int, ...]:
        """The fused reverse lengths Auto considers first."""
        return tuple(auto.leaves or planner.DEFAULT_LEAVES[self.loop])

    def _fused(self, leaves) -> tuple[int, ...]:
        """The segment programs plans over blocks of ``leaves`` need."""
        return tuple(sorted({n for leaf in leaves for n in planner.fused_lengths(self.steps, leaf)}))

    def _budgets(self, auto: Auto) -> tuple[int, int, str | None]:
        """Auto's device budget, its host budget per device, and the host memory kind (None: none)."""
        budget = auto.memory or planner.default_budget(self.client)
        host_kind = self._host_memory_kind()
        host_memory = auto.host_memory if auto.host_memory is not None else planner.default_host_budget(self.client)
        return budget, (host_memory // self.num_devices if host_kind else 0), host_kind

    def _first_plan_is_single_step(self, auto: Auto) -> bool:
        """Whether this call plans over single-step reverses alone: the first metagradient with
        Auto's default lengths, while their fused reverses are not built. It runs without
        them: an unrolled copy of the step per fused step, they are the slowest programs to
        build. The calls after it build them and choose among all."""
        default = self._fused(self._auto_leaves(auto))
        return (auto.leaves is None and self._metagradients == 0
                and not all(programs.sized("segment_vjp", n) in self.programs for n in default))

    def _choose_single_step(self, auto: Auto, z_buffers) -> tuple[planner.Choice, int, int]:
        """The plan over single-step reverses that fits Auto's budgets, with the programs built
        so far. One block length leaves nothing to compare on one memory tier: the most states
        that fit is the fastest plan, so no calibration runs there (the prediction is 0)."""
        budget, host_budget, host_kind = self._budgets(auto)
        runner = self._runner((), self._built_forward())
        costs = runner.program_bytes()
        if host_budget:
            costs = self._costs(runner, (1,), budget, host_budget, host_kind, z_buffers)
        choice = planner.choose(planner.cost_table(self._task_layout, costs), self.steps, (1,), budget,
                                self.data_bytes, host_budget)
        return choice, budget, host_budget

    def _choose(self, auto: Auto, z_buffers) -> tuple[planner.Choice, int, int, dict]:
        """The plan Auto picks, its device budget, its host budget per device, and the
        program costs it was chosen from."""
        leaves = self._auto_leaves(auto)
        budget, host_budget, host_kind = self._budgets(auto)
        key = (auto.leaves, budget, host_budget)  # leaves=None also tries GAP_LEAVES: not the same as the defaults
        if key not in self._choices:
            costs = self._costs(self._runner(self._fused(leaves)), leaves, budget, host_budget, host_kind, z_buffers)
            table = planner.cost_table(self._task_layout, costs)
            choice = planner.choose(table, self.steps, leaves, budget, self.data_bytes, host_budget)
            gaps = () if auto.leaves else planner.gap_leaves(self.loop, choice.schedule.leaf, leaves, self.steps)
            if gaps:
                try:
                    runner = self._runner(self._fused(leaves + gaps))
                except ImportError as error:  # a loaded task builds no program where enzyme-ad is not installed
                    warnings.warn(f"Auto: the fused reverses of {', '.join(map(str, gaps))} steps, which may run "
                                  f"faster within this budget, cannot be built here ({error}); planning without "
                                  "them. Call prepare(metagrad.Auto()) before save() to keep them in the saved task.",
                                  stacklevel=4)
                else:
                    costs = self._costs(runner, leaves, budget, host_budget, host_kind, z_buffers)
                    choice = planner.choose_with_gaps(planner.cost_table(self._task_layout, costs), self.steps,
                                                      leaves, gaps, budget, self.data_bytes, host_budget)
            self._choices[key] = choice, costs
        choice, costs = self._choices[key]
        return choice, budget, host_budget, costs

    def _costs(self, runner, first_leaves, budget: int, host_budget: int, host_kind: str | None, z_buffers) -> dict:
        """The cost of each program of ``runner`` (and, with a host budget, of one state's copies).
        Whether any plan over ``first_leaves`` fits is settled from the programs' compiled memory
        alone; only then are they calibrated (once per set of programs), which runs them."""
        sizes = runner.program_bytes()
        wanted = tuple(sorted(set(sizes) | ({"to_host", "from_host"} if host_budget else set())))
        if wanted not in self._calibrations:
            planner.choose(planner.cost_table(self._task_layout, sizes), self.steps, first_leaves, budget,
                           self.data_bytes, host_budget)
            self._calibrations[wanted] = self._calibrate(runner, sizes, z_buffers, host_kind if host_budget else "")
        return {name: self._calibrations[wanted][name] for name in wanted}

    def _calibrate(self, runner, sizes: dict, z_buffers, host_kind: str) -> dict:
        """Each program's seconds per execution (and, with a host tier, one state's copies),
        measured once per machine: kept in the disk cache, so that another process makes
        the same choice (and the same bits)."""
        entry = runtime.cache_key_of(self.client, "calibration", sorted(
            (name, hashlib.sha256(self.programs[name].artifact).hexdigest()) for name in sizes
            if name in self.programs), sorted(sizes), host_kind, self.num_devices, _runtime.CALIBRATION_VERSION)
        stored = cache.get("calibration", entry)
        if stored is not None:
            try:
                return {name: planner.program_cost(*values) for name, values in json.loads(stored).items()}
            except (ValueError, TypeError):
                pass
        # Calibration holds a state, the next one of a chain, and the cotangents.
        peak = 3 * self._task_layout.state_bytes + max(cost.bytes for cost in sizes.values())
        planner.check_fits(self.client, peak, self.data_bytes, "calibrating the task's programs",
                           "The task's state is too large for this device.", self.num_devices)
        with setup_time.phase("calibrate"):
            costs = runner.calibrate(z_buffers, host_memory_kind=host_kind)
        cache.put("calibration", entry, json.dumps({n: [c.seconds, c.bytes] for n, c in costs.items()}).encode())
        return costs

    def _plan(self, schedule, z_buffers) -> "_Planned":
        """The plan ``schedule`` runs, its prediction, checked against the device's memory."""
        schedule = _check_schedule(schedule if schedule is not None else Auto())
        if isinstance(schedule, Auto):
            forward, single_step = None, ""
            if self._first_plan_is_single_step(schedule):
                single_step = " (first call: single-step reverses; the fused ones are built by the next call)"
            else:
                try:
                    choice, budget, host_budget, _ = self._choose(schedule, z_buffers)
                except ImportError as error:  # a loaded task, where enzyme-ad is not installed
                    if schedule.leaves is not None:
                        raise
                    warnings.warn(f"Auto: the fused reverse programs cannot be built here ({error}); planning over "
                                  "single-step reverses. Call prepare(metagrad.Auto()) before save() to keep them "
                                  "in the saved task.", stacklevel=4)
                    single_step = " (single-step reverses: no fused ones could be built)"
            if single_step:
                choice, budget, host_budget = self._choose_single_step(schedule, z_buffers)
                forward = self._built_forward()
            described = f"Auto(memory={budget}) -> {choice.schedule!r}"
            if choice.host_slots:
                described += (f" with {len(choice.host_slots)} of its slots in host memory "
                              f"(host_memory={host_budget * self.num_devices})")
            described += single_step
            planned = _Planned(described, choice.plan, (), forward, choice.seconds, choice.peak_bytes, budget,
                               choice.host_slots, choice.peak_host_bytes, host_budget)
        else:
            plan = schedule.plan(self.steps, state_bytes=self._task_layout.state_bytes)
            planned = _Planned(repr(schedule), plan, (), None, 0.0, None, 0)
        fused = tuple(n for n in planned.plan.stats(self.steps)["fused_lengths"] if n > 1)
        planned = dataclasses.replace(planned, fused=fused)
        if planned.peak_bytes is None:
            table = planner.cost_table(self._task_layout, self._runner(fused, planned.forward).program_bytes())
            planned = dataclasses.replace(planned,
                                          peak_bytes=_runtime.simulate_plan(planned.plan, table)["peak_bytes"])
        planner.check_fits(self.client, planned.peak_bytes, self.data_bytes, planned.described,
                           "Auto() (the default schedule) picks the fastest plan that fits the device; "
                           "Budget(states=...) with fewer states needs less.", self.num_devices,
                           planned.peak_host_bytes)
        return planned

    def cost_table(self, z, schedule: Auto | None = None) -> _runtime.CostTable:
        """What ``Auto`` plans from: each program's seconds per execution (a calibration,
        measured once per machine and kept in the disk cache) and device bytes, the
        state's and the cotangents' bytes per device and, where ``schedule`` allows a
        host tier, one state's copies to host memory and back. Pass it to
        :func:`metagrad.schedules.simulate_plan` to predict any plan.
        """
        auto = Auto() if schedule is None else schedule
        if not isinstance(auto, Auto):
            raise TypeError(f"cost_table takes an Auto schedule (its budgets decide the host tier), got {auto!r}")
        return planner.cost_table(self._task_layout, self._choose(auto, self._z_buffers(z))[3])

    def calibrate(self, z, schedule: Auto | None = None, repeats: int = 3) -> dict:
        """Time now, past the kept calibration, each program ``Auto`` weighs for ``schedule``
        (default ``Auto()``; its fused programs are built first): seconds per execution (the
        median of ``repeats`` samples) and device bytes, as ``ProgramCost`` by program name.
        What :meth:`cost_table` holds is one such measurement, taken once per machine."""
        auto = Auto() if schedule is None else schedule
        if not isinstance(auto, Auto):
            raise TypeError(f"calibrate takes an Auto schedule (its block lengths decide the programs), got {auto!r}")
        runner = self._runner(self._fused(self._auto_leaves(auto)))
        return runner.calibrate(self._z_buffers(z), repeats)

    def prepare(self, schedule) -> "CompiledTask":
        """Compile now the fused forward and reverse programs ``schedule`` needs for this task.

        ``metagradient`` does this on first use (with ``Auto()``, from its second
        call: the first plans over single-step reverses); call it before timing,
        or before :meth:`save` so that the saved task holds them (a loaded task
        can also build them: it keeps the forward functions, but that needs jax
        and enzyme-ad).
        """
        if isinstance(schedule, Auto):
            leaves = self._auto_leaves(schedule)
            if schedule.leaves is None:  # and the lengths between, which a tight budget may use
                leaves += planner.gap_leaves(self.loop, 1, leaves, self.steps)
            self._runner(self._fused(leaves))
        else:
            self._runner(self._plan(schedule, None).fused)
        return self

    # -- running --------------------------------------------------------------

    def _state_tree(self, buffers):
        arrays = self._download(buffers, self.layout.state, self.sharding and self.sharding.state)
        leaves = [array if spec.key_impl is None else jax.random.wrap_key_data(array, impl=spec.key_impl)
                  for spec, array in zip(self.layout.state, arrays)]
        return self.layout.unflatten("state", leaves)

    def train(self, z, *, progress: bool | None = None):
        """Train with metaparameter ``z``; returns the final state (numpy leaves).

        ``progress``: a tqdm bar for runs over a second (None: on a terminal only).
        """
        forward = max((b.bytes for name, b in self._runner().program_bytes().items()
                       if programs.kind_of(name)[0] in ("step", "advance")), default=0)
        planner.check_fits(self.client, forward + self._task_layout.state_bytes, self.data_bytes, "training",
                           "The state, data and z must fit the device.", self.num_devices)
        with steps_bar("training", progress) as bar:
            state, _ = self._runner().train(self._z_buffers(z), bar)
        return self._state_tree(state)

    def metagradient(self, z, schedule=None, *, check_determinism: bool | int = False, check_finite: bool = False,
                     report: bool = False, progress: bool | None = None):
        """``phi(A(z))`` and its exact gradient with respect to ``z``.

        Args:
          z: metaparameter, with the structure of the example it was compiled with.
          schedule: ``Auto(memory=...)`` (the default: the fastest plan that fits
            a device-memory budget, see :class:`metagrad.Auto`) or a fixed
            policy from :mod:`metagrad.schedules`. Any plan that cannot fit the
            device's memory is refused before it runs (``DeviceMemoryError``).
          check_determinism: compare replayed states with the first pass
            (``True``: at every state the run reaches; an int ``n``: every n-th),
            and the fused forward programs with single steps once; raises
            ``CheckFailed`` naming the first step that differs. The checked run
            executes the same programs as the unchecked one.
          check_finite: raise ``CheckFailed`` at the first forward step whose
            state, or the first reversed step whose cotangent, holds NaN or Inf.
          report: also return a :class:`Report` of the run.
          progress: a tqdm bar of the forward and reversed steps for runs over a
            second (None, the default: only when stderr is a terminal).

        Returns:
          ``(value, grad)``, or ``(value, grad, report)``; ``grad`` has z's structure.
        """
        stride = _determinism_stride(check_determinism)
        check_finite = _check_flag("check_finite", check_finite)
        report = _check_flag("report", report)
        z_buffers = self._z_buffers(z)
        with setup_time.record() as setup:
            planned = self._plan(schedule, z_buffers)
            runner = self._runner(planned.fused, planned.forward, checks=check_finite)
        self.setup.add(setup)
        if isinstance(schedule, (Auto, type(None))):
            self._metagradients += 1
        with steps_bar("metagradient", progress) as bar:
            value, grad, stats = runner.metagradient(z_buffers, planned.plan, stride, check_finite, bar,
                                                     set(planned.host_slots),
                                                     self._host_memory_kind() or planner.HOST_MEMORY_KIND)
        value = value.to_numpy()  # phi is replicated: partition 0's copy
        value = value[()] if value.ndim == 0 else value
        grad = self._download(grad, self.layout.z, self.sharding and self.sharding.z)
        grad = [g.astype(spec.dtype, copy=False) for g, spec in zip(grad, self.layout.z)]
        grad = self.layout.unflatten("z", grad)
        if report:
            stats.schedule = planned.described
            stats.predicted_seconds = planned.seconds
            stats.predicted_peak_device_bytes = planned.peak_bytes
            stats.predicted_peak_host_bytes = planned.peak_host_bytes
            stats.budget_bytes = planned.budget
            stats.host_budget_bytes = planned.host_budget
            stats.setup_seconds, stats.compile_seconds = setup.seconds, setup.compile_seconds
            return value, grad, stats
        return value, grad

    def save(self, path: str) -> None:
        """Write the task to directory ``path``: data only (see :func:`metagrad.load`).

        The C++ harness (``metagrad-bench``) and :func:`metagrad.load` run it
        without the user's code.
        """
        self._ensure([*BASE_PROGRAMS, *(programs.sized("advance", n) for n in self.fuse_forward)])
        exports = self.exports
        if self.forward is not None:  # saved exports carry their VJPs (see programs.export_forward)
            exports = programs.export_forward(self.forward, self.layout, custom_calls=_handled_calls(), vjp=True)
        saved.write(self, path, exports)


def _handled_calls() -> tuple[str, ...]:
    return tuple(sorted(ffi.handled_targets()))


# Programs take the data as arguments, so tasks that differ only in their data
# values (seeds, subsets, configurations) share programs and executables.
_MEMORY: dict = {}


def forget_compiled() -> None:
    """Forget the tasks compiled in this process."""
    _MEMORY.clear()


def _fuse_lengths(fuse_forward, loop: str) -> tuple[int, ...]:
    """``fuse_forward`` as a tuple of lengths (None: the loop's default), each checked."""
    if fuse_forward is None:
        return programs.DEFAULT_FUSE_FORWARD[loop]
    lengths = ((fuse_forward,) if isinstance(fuse_forward, (int, np.integer))
               else tuple(fuse_forward) if isinstance(fuse_forward, (tuple, list)) else ())
    if not lengths or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in lengths):
        raise ValueError("fuse_forward must be an integer >= 1 or a non-empty sequence of them (steps per forward "
                         f"execution), or None for the loop's default, got {fuse_forward!r}")
    return tuple(int(n) for n in lengths)


def compile_task(task, z_example, *, backend: str, fuse_forward, loop: str, client=None,
                 sharding: sharding_lib.Sharding | None = None) -> CompiledTask:
    """Validate, lower, differentiate and compile ``task`` for metaparameters like ``z_example``
    (over the devices of ``sharding``, when given)."""
    if backend not in lowering.BACKENDS:
        raise ValueError(f"backend must be one of {lowering.BACKENDS}, got {backend!r}")
    if loop not in programs.LOOPS:
        raise ValueError(f"loop must be one of {programs.LOOPS}, got {loop!r}")
    fuse_lengths = _fuse_lengths(fuse_forward, loop)
    client = client or runtime.get_client()
    layout = describe(task, z_example)
    resolved, devices = sharding_lib.resolve(sharding, layout, client) if sharding is not None else (None, (0,))
    steps = int(task.steps)
    fuse = tuple(sorted({min(n, steps) for n in fuse_lengths} - {1}))
    key = (task.init, task.step, task.output, json.dumps(layout.to_json(), sort_keys=True), backend, loop,
           id(client), bool(jax.config.jax_enable_x64), resolved and resolved.key(), devices)
    with setup_time.record() as setup:
        if key not in _MEMORY:
            forward = programs.forward_of_task(task, layout)
            with setup_time.phase("trace"):
                exports = programs.export_forward(forward, layout, module_checks.check_lowered, _handled_calls())
            options = sharding_lib.compile_options(client, resolved, devices)
            executables = {}
            built = lowering.lower(exports, layout, FIRST_PROGRAMS, backend=backend,
                                   target=runtime.stablehlo_target(client), loop=loop, forward=forward,
                                   sharding=resolved, ready=lambda name, program: executables.__setitem__(
                                       name, runtime.compile_program(program, client, options)))
            _MEMORY[key] = (forward, exports, built, executables)
        forward, exports, built, executables = _MEMORY[key]
    return CompiledTask(layout, steps, backend, loop, exports, built, client,
                        data=_host_leaves(task.data, layout.data, "data"),
                        z_example=jax.tree_util.tree_map(np.asarray, z_example), forward=forward,
                        sharding=resolved, devices=devices, fuse_forward=fuse, setup=setup,
                        executables=executables)


def load(path: str, *, client=None) -> CompiledTask:
    """Load a task written by :meth:`CompiledTask.save`: no user code is needed, and
    nothing in the directory is executed (see ``saved``)."""
    return CompiledTask(**saved.read(path, client))
