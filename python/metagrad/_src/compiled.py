"""A task compiled for the runtime: training and metagradients run in C++."""

from __future__ import annotations

import json
import operator
import threading
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from metagrad import _runtime
from metagrad._src import (background, cache, ffi, lowering, module_checks, planner, programs, runtime, saved,
                           setup_time, streams, trees)
from metagrad._src import sharding as sharding_lib
from metagrad._src.layout import Layout, describe
from metagrad._src.planner import Auto
from metagrad._src.planning import Planning
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
# One build at a time in the process: tasks compiled from the same functions share their programs
# (see _MEMORY), and a call that needs a program a background build is making waits for it.
_BUILDING = threading.Lock()


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
    task_layout.batch = specs([s.struct() for s in layout.batch], "B")
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
    stream: streams.Stream | None = field(default=None, repr=False)  # the data's Stream: rows kept on the host
    setup: setup_time.SetupTime = field(default_factory=setup_time.SetupTime, repr=False)  # seconds spent so far
    executables: dict = field(default_factory=dict, repr=False)  # compiled programs by name, built on first use
    _runners: dict = field(default_factory=dict, repr=False)
    _data: list = field(default_factory=list, repr=False)
    _planning: Planning = field(init=False, repr=False)  # how its schedules become plans

    def __post_init__(self):
        self._options = sharding_lib.compile_options(self.client, self.sharding, self.devices)
        if self.fuse_forward is None:
            self.fuse_forward = tuple(sorted(n for kind, n in map(programs.kind_of, self.programs)
                                             if kind == "advance"))
        for name, program in self.programs.items():
            if name not in self.executables:
                self.executables[name] = cache.compile_program(program, self.client, self._options)
        self._data = self._upload(self.data, "data")
        self._task_layout = _task_layout(self.layout, self.sharding)
        self._stream = None if self.stream is None else _runtime.BatchStream(
            self.stream.sources(),
            [runtime.ArraySpec(list(leaf.shape[1:]), leaf.dtype.name) for leaf in self.stream.leaves],
            self.stream.batches, self.client, list(self.devices),
            [] if self.sharding is None else list(self.sharding.mesh),
            [] if self.sharding is None else [[list(axes) for axes in spec] for spec in self.sharding.batch])
        self._planning = Planning(self)

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

    def _missing(self, names) -> list[str]:
        """The programs of ``names`` this task has not built yet."""
        return [name for name in names if name not in self.programs]

    def _ensure(self, names) -> None:
        """Lower and compile programs ``names`` that this task does not have yet (waiting for a
        build on another thread to finish first)."""
        if not self._missing(names):
            return
        with _BUILDING:
            missing = self._missing(names)
            if missing:
                self._build(missing)

    def _build(self, missing) -> None:
        def compile_now(name: str, program: Program) -> None:
            if background.stopping():
                raise background.Stopped()
            self.executables[name] = cache.compile_program(program, self.client, self._options)
            self.programs[name] = program  # after its executable: a program listed here can run

        lowering.lower(self.exports, self.layout, missing, backend=self.backend,
                       target=runtime.stablehlo_target(self.client), loop=self.loop, forward=self.forward,
                       sharding=self.sharding, ready=compile_now)

    def _runner(self, fused_lengths: tuple[int, ...] = (), forward_lengths: tuple[int, ...] | None = None,
                checks: bool = False):
        """The runner with the fused reverse programs of ``fused_lengths``, the fused forward
        programs of ``forward_lengths`` (None: the task's ``fuse_forward``) and, with ``checks``,
        the finiteness checks: each built on first use."""
        names = self._runner_programs(fused_lengths, forward_lengths, checks)
        key = tuple(sorted(names))
        if key not in self._runners:
            self._ensure(names)
            chosen = {name: self.executables[name] for name in names}
            self._runners[key] = _runtime.TaskRunner(chosen, self._task_layout, self.steps, self._data, self._stream)
        return self._runners[key]

    def _runner_programs(self, fused_lengths: tuple[int, ...] = (), forward_lengths: tuple[int, ...] | None = None,
                         checks: bool = False) -> tuple[str, ...]:
        """The programs of the runner ``_runner`` makes for these arguments."""
        forward_lengths = self.fuse_forward if forward_lengths is None else forward_lengths
        return (*FIRST_PROGRAMS, *(programs.sized("segment_vjp", n) for n in fused_lengths),
                *(programs.sized("advance", n) for n in forward_lengths), *(CHECK_PROGRAMS if checks else ()))

    def _built_forward(self) -> tuple[int, ...]:
        """The lengths of the fused forward programs built so far."""
        return tuple(n for n in self.fuse_forward if programs.sized("advance", n) in self.programs)

    @property
    def data_bytes(self) -> int:
        """Bytes of the data and z on each device, held there throughout a run, and of the
        streamed batches in flight (the running program's and those prefetched, each as
        large as the longest fused program's)."""
        resident = sum(spec.nbytes for spec in (*self._task_layout.data, *self._task_layout.z))
        if self._stream is None:
            return resident
        longest = max([1, *self.fuse_forward, *(n for kind, n in map(programs.kind_of, self.programs)
                                                 if kind == "segment_vjp")])
        return resident + (_runtime.PREFETCH_DEPTH + 1) * self._stream.batch_bytes(longest)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

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
        return planner.cost_table(self._task_layout, self._planning.costs(auto, self._z_buffers(z)))

    def calibrate(self, z, schedule: Auto | None = None, repeats: int = 3) -> dict:
        """Time now, past the kept calibration, each program ``Auto`` weighs for ``schedule``
        (default ``Auto()``; its fused programs are built first): seconds per execution (the
        median of ``repeats`` samples) and device bytes, as ``ProgramCost`` by program name.
        What :meth:`cost_table` holds is one such measurement, taken once per machine."""
        auto = Auto() if schedule is None else schedule
        if not isinstance(auto, Auto):
            raise TypeError(f"calibrate takes an Auto schedule (its block lengths decide the programs), got {auto!r}")
        runner = self._runner(self._planning.fused(self._planning.auto_blocks(auto)))
        return runner.calibrate(self._z_buffers(z), repeats)

    def prepare(self, schedule) -> "CompiledTask":
        """Compile now the fused forward and reverse programs ``schedule`` needs for this task.

        ``metagradient`` does this on first use (with ``Auto()``, in the background
        from its second call, running single-step plans until they are built);
        call it before timing, for calls that repeat bit for bit, or before
        :meth:`save` so that the saved task holds them (a loaded task
        can also build them: it keeps the forward functions, but that needs jax
        and enzyme-ad).
        """
        if isinstance(schedule, Auto):
            blocks = self._planning.auto_blocks(schedule)
            if schedule.blocks is None:  # and the lengths between, which a tight budget may use
                blocks += planner.gap_blocks(self.loop, 1, blocks, self.steps)
            self._runner(self._planning.fused(blocks))
        else:
            self._runner(self._planning.plan(schedule, None).fused)
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
            executes the same programs as the unchecked one. Unasked (``False``),
            a run with replays still compares one state, the first a replay
            recomputes, to rounding (two copies of one state to the host).
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
            planned = self._planning.plan(schedule, z_buffers)
            runner = self._runner(planned.fused, planned.forward, checks=check_finite)
        self.setup.add(setup)
        with steps_bar("metagradient", progress) as bar:
            value, grad, stats = runner.metagradient(z_buffers, planned.plan, stride, check_finite, bar,
                                                     set(planned.host_slots),
                                                     self._planning.host_memory_kind() or planner.HOST_MEMORY_KIND)
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
    stream = streams.find(task.data)
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
                                       name, cache.compile_program(program, client, options)))
            _MEMORY[key] = (forward, exports, built, executables)
        forward, exports, built, executables = _MEMORY[key]
    return CompiledTask(layout, steps, backend, loop, exports, built, client,
                        data=_host_leaves(task.data, layout.data, "data"),
                        z_example=jax.tree_util.tree_map(np.asarray, z_example), forward=forward,
                        sharding=resolved, devices=devices, fuse_forward=fuse, stream=stream and stream[1], setup=setup,
                        executables=executables)


def load(path: str, *, client=None) -> CompiledTask:
    """Load a task written by :meth:`CompiledTask.save`: no user code is needed, and
    nothing in the directory is executed (see ``saved``)."""
    return CompiledTask(**saved.read(path, client))
