"""A task compiled for the runtime: training and metagradients run in C++."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metagrad import _runtime
from metagrad._src import keys, lowering, runtime
from metagrad._src.lowering import Layout, LeafSpec, Program
from metagrad._src.schedules import Budget
from metagrad._src.task import Task

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Report:
    """What one metagradient (or training) run did, measured by the runtime."""

    steps: int
    forward_steps: int
    reversed_steps: int
    executions: int
    peak_saved_states: int
    peak_saved_bytes: int
    state_bytes: int
    determinism_checks: int
    seconds_forward: float
    seconds_reverse: float
    seconds_total: float
    schedule: str = ""

    @property
    def replayed_steps(self) -> int:
        """Forward steps beyond the first pass."""
        return self.forward_steps - self.steps


def _all_finite_program(layout: Layout, target: str) -> Program:
    specs = [s.struct() for s, d in zip(layout.state, layout.differentiable) if d]
    specs += [s.struct() for s in layout.z]

    def all_finite(*leaves):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))

    return Program("all_finite", lowering.portable_artifact(jax.jit(all_finite).lower(*specs), target), "none")


@dataclass
class CompiledTask:
    """Executables of a task, its data on the device, and runners per fusion length.

    Made by :meth:`Task.compile` (see :func:`compile_task`) or :func:`load`.
    """

    layout: Layout
    steps: int
    backend: str
    programs: dict[str, Program]
    client: Any
    data: list = field(repr=False)  # host arrays of the data leaves, uploaded once
    z_example: Any = field(repr=False)
    task: Task | None = None  # None when loaded from disk
    _executables: dict = field(default_factory=dict, repr=False)
    _runners: dict = field(default_factory=dict, repr=False)
    _data: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        for name, program in self.programs.items():
            if name not in self._executables:
                self._executables[name] = runtime.compile_module(program.artifact, self.client)
        self._data = [runtime.to_device(leaf, self.client) for leaf in self.data]

    # -- inputs ---------------------------------------------------------------

    def _z_buffers(self, z) -> list:
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(z)
        if treedef != self.layout.z_tree:
            raise ValueError(f"z has structure {treedef}, the task was compiled for {self.layout.z_tree}")
        buffers = []
        for (path, leaf), spec in zip(paths_and_leaves, self.layout.z):
            array = np.asarray(leaf)
            if tuple(array.shape) != spec.shape or array.dtype != np.dtype(spec.dtype):
                raise ValueError(f"z{jax.tree_util.keystr(path)} is {array.dtype}{list(array.shape)}, the task was "
                                 f"compiled for {spec.dtype}{list(spec.shape)}")
            buffers.append(runtime.to_device(array, self.client))
        return buffers

    def _runner(self, fused_lengths: tuple[int, ...] = ()):
        """The runner holding the fused reverse programs of these lengths (compiled on first use)."""
        if fused_lengths not in self._runners:
            missing = tuple(n for n in fused_lengths if f"segment_vjp_{n}" not in self.programs)
            if missing:
                if self.task is None:
                    raise ValueError(f"this loaded task has no fused reverse of {list(missing)} steps; save it after "
                                     f"running that schedule, or use a schedule with leaf=1")
                new = lowering.lower_task(self.task, self.layout, backend=self.backend,
                                          target=runtime.stablehlo_target(self.client), segment_lengths=missing,
                                          only_segments=True)
                for name, program in new.items():
                    self.programs[name] = program
                    self._executables[name] = runtime.compile_module(program.artifact, self.client)
            segments = {n: self._executables[f"segment_vjp_{n}"] for n in fused_lengths}
            advance = {int(name.rsplit("_", 1)[1]): exe for name, exe in self._executables.items()
                       if name.startswith("advance_")}
            base = {name: exe for name, exe in self._executables.items()
                    if not name.startswith(("segment_vjp_", "advance_"))}
            self._runners[fused_lengths] = _runtime.TaskRunner(base, segments, advance, self.steps,
                                                               list(self.layout.differentiable), len(self.layout.z),
                                                               self._data)
        return self._runners[fused_lengths]

    def prepare(self, schedule) -> "CompiledTask":
        """Compile now the fused reverse programs ``schedule`` needs for this task.

        ``metagradient`` does this on first use; call it before :meth:`save` so
        a saved task can run that schedule without the user's code.
        """
        plan = schedule.plan(self.steps, state_bytes=self.layout.state_bytes)
        self._runner(tuple(n for n in plan.stats(self.steps)["fused_lengths"] if n > 1))
        return self

    # -- running --------------------------------------------------------------

    def train(self, z):
        """Train with metaparameter ``z``; returns the final state (numpy leaves)."""
        state, _ = self._runner().train(self._z_buffers(z))
        return jax.tree_util.tree_unflatten(self.layout.state_tree, [keys.wrap(b.to_numpy(), spec.key)
                                                                     for b, spec in zip(state, self.layout.state)])

    def metagradient(self, z, schedule=None, *, check_determinism: bool | int = False, check_finite: bool = False,
                     report: bool = False):
        """``phi(A(z))`` and its exact gradient with respect to ``z``.

        Args:
          z: metaparameter, with the structure of the example it was compiled with.
          schedule: a policy from :mod:`metagrad.schedules` (default ``Budget(k=4)``:
            revolve in the memory of ``Replay(k=4)``, with fewer forward steps).
          check_determinism: compare replayed states with the first pass bit for
            bit (``True``: every state; an int ``n``: every n-th state); raises
            ``CheckFailed`` naming the first step that differs.
          check_finite: raise ``CheckFailed`` at the first reversed step whose
            cotangent holds NaN or Inf.
          report: also return a :class:`Report` of the run.

        Returns:
          ``(value, grad)``, or ``(value, grad, report)``; ``grad`` has z's structure.
        """
        schedule = schedule if schedule is not None else Budget(k=4)
        if not hasattr(schedule, "plan"):
            raise TypeError(f"schedule must be a metagrad schedule (Replay, StoreAll, Periodic, Budget), "
                            f"got {type(schedule).__name__}")
        if isinstance(check_determinism, bool):
            stride = 1 if check_determinism else 0
        elif isinstance(check_determinism, int) and check_determinism >= 1:
            stride = check_determinism
        else:
            raise ValueError(f"check_determinism must be a bool or a stride >= 1, got {check_determinism!r}")
        z_buffers = self._z_buffers(z)
        plan = schedule.plan(self.steps, state_bytes=self.layout.state_bytes)
        runner = self._runner(tuple(n for n in plan.stats(self.steps)["fused_lengths"] if n > 1))
        value, grad, stats = runner.metagradient(z_buffers, plan, stride, check_finite)
        value = value.to_numpy()[()]
        grad = jax.tree_util.tree_unflatten(self.layout.z_tree, [b.to_numpy() for b in grad])
        if report:
            return value, grad, Report(schedule=repr(schedule), **stats)
        return value, grad

    # -- persistence ----------------------------------------------------------

    def save(self, path: str) -> None:
        """Write artifacts, manifest, data and the example z to directory ``path``.

        The C++ harness (``metagrad-bench``) and :func:`load` run it without the
        user's code.
        """
        import enzyme_ad
        from jaxlib.mlir.dialects import stablehlo

        os.makedirs(os.path.join(path, "programs"), exist_ok=True)
        os.makedirs(os.path.join(path, "arrays"), exist_ok=True)
        for name, program in self.programs.items():
            with open(os.path.join(path, "programs", f"{name}.mlirbc"), "wb") as f:
                f.write(program.artifact)
        data = [np.asarray(leaf) for leaf in self.data]
        z_leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(self.z_example)]
        for prefix, leaves in (("data", data), ("z", z_leaves)):
            for i, leaf in enumerate(leaves):
                np.ascontiguousarray(leaf).tofile(os.path.join(path, "arrays", f"{prefix}_{i}.bin"))
        with open(os.path.join(path, "trees.pkl"), "wb") as f:
            pickle.dump({"z": self.layout.z_tree, "data": self.layout.data_tree, "state": self.layout.state_tree}, f)

        def leaves(specs):
            return [{"path": s.path, "shape": list(s.shape), "dtype": s.dtype, **({"key": s.key} if s.key else {})}
                    for s in specs]

        manifest = {
            "format": "metagrad-task", "version": MANIFEST_VERSION, "steps": self.steps, "backend": self.backend,
            "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__,
                         "enzyme_ad": getattr(enzyme_ad, "__version__", "0.0.16"),
                         "stablehlo_producer": stablehlo.get_current_version(),
                         "stablehlo_target": runtime.stablehlo_target(self.client)},
            "programs": {name: {"file": f"programs/{name}.mlirbc", "backend": p.backend}
                         for name, p in self.programs.items()},
            "z": leaves(self.layout.z), "data": leaves(self.layout.data), "state": leaves(self.layout.state),
            "differentiable": list(self.layout.differentiable),
            "trees": {"z": str(self.layout.z_tree), "data": str(self.layout.data_tree),
                      "state": str(self.layout.state_tree)},
        }
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)


def load(path: str, *, client=None) -> CompiledTask:
    """Load a task written by :meth:`CompiledTask.save` (no user code needed)."""
    manifest_path = os.path.join(path, "manifest.json")
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"{path!r} holds no manifest.json: not a saved metagrad task")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != "metagrad-task" or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{manifest_path} is not a metagrad task manifest of version {MANIFEST_VERSION}")
    with open(os.path.join(path, "trees.pkl"), "rb") as f:
        trees = pickle.load(f)

    def specs(entries):
        return tuple(LeafSpec(e["path"], tuple(e["shape"]), e["dtype"], e.get("key")) for e in entries)

    def arrays(prefix, entries):
        return [np.fromfile(os.path.join(path, "arrays", f"{prefix}_{i}.bin"), dtype=e["dtype"]).reshape(e["shape"])
                for i, e in enumerate(entries)]

    layout = Layout(trees["z"], specs(manifest["z"]), trees["data"], specs(manifest["data"]), trees["state"],
                    specs(manifest["state"]), tuple(manifest["differentiable"]))
    programs = {}
    for name, entry in manifest["programs"].items():
        with open(os.path.join(path, entry["file"]), "rb") as f:
            programs[name] = Program(name, f.read(), entry["backend"])
    z_example = jax.tree_util.tree_unflatten(layout.z_tree, arrays("z", manifest["z"]))
    return CompiledTask(layout, manifest["steps"], manifest["backend"], programs, client or runtime.get_client(),
                        data=arrays("data", manifest["data"]), z_example=z_example)


# Programs take the data as arguments, so tasks that differ only in their data
# values (seeds, subsets, configurations) share programs and executables.
_CACHE: dict = {}


def clear_cache() -> None:
    """Forget every compiled task of this process (and JAX baselines' compilations)."""
    from metagrad._src import baselines

    _CACHE.clear()
    baselines.clear_cache()


def compile_task(task: Task, z_example, *, backend: str = "enzyme", fuse_forward: int = 10,
                 client=None) -> CompiledTask:
    """Validate, lower, differentiate and compile ``task`` for metaparameters like ``z_example``.

    ``fuse_forward = n > 1`` also compiles a program running ``n`` steps per
    execution (``min(n, steps)``), used by training and by the replays of every
    schedule: fewer executions, so less per-execution overhead where a step is
    short (1.3-1.9x faster training on the digits MLP and CNN), for a few
    seconds more compile. ``1`` runs one execution per step.

    Compiling a task with the same functions, steps, backend and shapes again
    (whatever its data values) reuses the compiled programs from an in-memory
    cache; only the data is uploaded.
    """
    if backend not in lowering.BACKENDS:
        raise ValueError(f"backend must be one of {lowering.BACKENDS}, got {backend!r}")
    client = client or runtime.get_client()
    layout = lowering.describe(task, z_example)
    if isinstance(fuse_forward, bool) or not isinstance(fuse_forward, int) or fuse_forward < 1:
        raise ValueError(f"fuse_forward must be an integer >= 1 (steps per forward execution), got {fuse_forward!r}")
    fuse_forward = min(fuse_forward, int(task.steps))
    key = (task.init, task.step, task.output, task.steps, layout.data, layout.z, backend, fuse_forward, id(client))
    if key not in _CACHE:
        target = runtime.stablehlo_target(client)
        advance = (fuse_forward,) if fuse_forward > 1 else ()
        programs = lowering.lower_task(task, layout, backend=backend, target=target, advance_lengths=advance)
        programs["all_finite"] = _all_finite_program(layout, target)
        executables = {name: runtime.compile_module(p.artifact, client) for name, p in programs.items()}
        _CACHE[key] = (programs, executables)
    programs, executables = _CACHE[key]
    z_copy = jax.tree_util.tree_map(np.asarray, z_example)
    return CompiledTask(layout, int(task.steps), backend, programs, client,
                        data=[keys.carried(leaf) for leaf in jax.tree_util.tree_leaves(task.data)],
                        z_example=z_copy, task=task, _executables=executables)
