"""Tasks over several devices: how their values are split (docs/scaling.md).

A :class:`Sharding` names a device mesh and, as ``PartitionSpec`` prefix
trees (or rules), how the data, z and the training state are split over it.
Every program of the task is lowered with these shardings (jax's
``NamedSharding`` on an ``AbstractMesh``: jax itself keeps its one device)
and partitioned by XLA's SPMD partitioner when the plugin compiles it; the
user's step stays single-program code, XLA inserts the collectives. The
runtime then runs each program once per device, with one shard of every value
on each (``cpp/runtime/sharding.h`` says where each block lives; uploads and
downloads here use its functions, like the C++ harness).

Per argument group of the program contract (``cpp/runtime/programs.h``): S,
Z and X as given; B (streamed batches) by ``Sharding.batch``; D (cotangents) like S's differentiable leaves; A
(metagradient accumulators) like Z; t, p and f replicated. With m outputs at
once, D and A carry a whole leading m axis.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from metagrad import _runtime

PARTITIONERS = ("shardy", "gspmd")

# A PartitionSpec as data: per dimension, the mesh axes splitting it (major first).
Spec = tuple  # tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Sharding:
    """How a task's values are split over a mesh of devices.

    Attributes:
      mesh: axis names to sizes, e.g. ``{"batch": 4}`` or ``{"data": 2, "model": 2}``;
        partition ``p`` has the row-major mesh coordinates of ``p``.
      data, z, state: ``PartitionSpec`` prefix trees of the data, the
        metaparameter and the training state (``P()`` or ``None``:
        replicated), or a rule ``leaf -> PartitionSpec`` called with each
        leaf's ``LeafSpec`` (``.path``, ``.shape``, ``.dtype``), handy for
        optimizer states that repeat the parameters' structure.
      batch: the ``PartitionSpec`` of every leaf of a streamed batch (a
        :class:`metagrad.Stream`'s rows, ``(B, ...)``, and their index):
        ``P("data")`` gives each device its share of each step's rows (the
        runtime reads and copies each share to its device); only the rows'
        axis may be split. Default replicated: every device gets all B rows.
      partitioner: ``"shardy"`` (jax's default) or ``"gspmd"``.
      devices: the client's devices of the partitions, in order (indices into
        ``client.devices``; default the first ``prod(mesh)``).
    """

    mesh: Mapping[str, int]
    data: Any = P()
    z: Any = P()
    state: Any = P()
    batch: Any = P()
    partitioner: str = "shardy"
    devices: Sequence[int] | None = None

    def __post_init__(self):
        if not isinstance(self.mesh, Mapping) or not self.mesh:
            raise ValueError(f"Sharding.mesh must map axis names to sizes, e.g. {{'batch': 4}}, got {self.mesh!r}")
        for name, size in self.mesh.items():
            if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, (int, np.integer)) \
                    or size < 1:
                raise ValueError(f"Sharding.mesh must map axis names to sizes >= 1, got {name!r}: {size!r}")
        if self.partitioner not in PARTITIONERS:
            raise ValueError(f"Sharding.partitioner must be one of {PARTITIONERS}, got {self.partitioner!r}")
        if self.devices is not None:
            devices = list(self.devices)
            if len(devices) != self.num_devices or len(set(devices)) != len(devices) or \
                    any(isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 for d in devices):
                raise ValueError(f"Sharding.devices must list {self.num_devices} distinct device indices (one per "
                                 f"partition of the mesh {dict(self.mesh)}), got {self.devices!r}")

    @property
    def num_devices(self) -> int:
        return math.prod(int(s) for s in self.mesh.values())


def _spec_data(spec, what: str) -> Spec:
    """A PartitionSpec (or None: replicated) as a tuple of per-dimension axis tuples."""
    if spec is None:
        return ()
    if not isinstance(spec, P):
        raise TypeError(f"{what}: expected a jax.sharding.PartitionSpec (or None), got {type(spec).__name__} "
                        f"{spec!r}")
    out = []
    for entry in spec:
        if entry is None:
            out.append(())
        elif isinstance(entry, str):
            out.append((entry,))
        elif isinstance(entry, (tuple, list)) and all(isinstance(a, str) for a in entry):
            out.append(tuple(entry))
        else:
            raise TypeError(f"{what}: PartitionSpec {spec} has the entry {entry!r}; use None, a mesh axis name or a "
                            f"tuple of them")
    return tuple(out)


def _partition_spec(spec: Spec) -> P:
    return P(*[None if not axes else axes[0] if len(axes) == 1 else tuple(axes) for axes in spec])


def _leaf_specs(given, leaves, treedef, mesh, what: str) -> tuple[Spec, ...]:
    """One checked spec per leaf of ``what`` from a prefix tree or a rule."""
    if callable(given) and not isinstance(given, P):
        specs = [_spec_data(given(leaf), f"Sharding.{what}({leaf.path})") for leaf in leaves]
    else:
        is_spec = lambda x: x is None or isinstance(x, P)  # noqa: E731
        paths = jax.tree_util.tree_unflatten(treedef, [leaf.path for leaf in leaves])
        try:
            full = jax.tree.broadcast(given, paths, is_leaf=is_spec)
        except (ValueError, TypeError) as error:
            raise ValueError(f"Sharding.{what} is not a PartitionSpec prefix of the {what} pytree: {error}") from None
        specs = [_spec_data(s, f"Sharding.{what}") for s in jax.tree_util.tree_leaves(full, is_leaf=is_spec)]
    for spec, leaf in zip(specs, leaves):
        _runtime.check_partition_spec(list(leaf.shape), [list(a) for a in spec], list(mesh), leaf.path)
    return tuple(specs)


@dataclass(frozen=True)
class TaskSharding:
    """A :class:`Sharding` resolved for one task: a spec per leaf, as plain data.

    It travels to Enzyme's process and into saved tasks as JSON, and keys the
    compile caches.
    """

    mesh: tuple[tuple[str, int], ...]
    partitioner: str
    state: tuple[Spec, ...]
    z: tuple[Spec, ...]
    data: tuple[Spec, ...]
    batch: tuple[Spec, ...] = ()  # per leaf of a streamed batch (layout.batch)

    @property
    def num_devices(self) -> int:
        return math.prod(size for _, size in self.mesh)

    def to_json(self) -> dict:
        lists = lambda specs: [[list(axes) for axes in spec] for spec in specs]  # noqa: E731
        return {"mesh": [[name, size] for name, size in self.mesh], "partitioner": self.partitioner,
                "state": lists(self.state), "z": lists(self.z), "data": lists(self.data),
                **({"batch": lists(self.batch)} if self.batch else {})}

    @classmethod
    def from_json(cls, entry: dict) -> "TaskSharding":
        specs = lambda key: tuple(tuple(tuple(str(a) for a in axes) for axes in spec) for spec in entry[key])  # noqa
        return cls(tuple((str(name), int(size)) for name, size in entry["mesh"]), str(entry["partitioner"]),
                   specs("state"), specs("z"), specs("data"), specs("batch") if "batch" in entry else ())

    def key(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    # -- shapes ----------------------------------------------------------------

    def shard_shape(self, shape, spec: Spec) -> tuple[int, ...]:
        return tuple(_runtime.shard_shape(list(shape), [list(a) for a in spec], list(self.mesh)))

    def group_specs(self, layout, group: str) -> list[Spec]:
        """One spec per leaf of contract group ``group`` (programs.h) for ``layout``."""
        m = ((),) if layout.outputs else ()  # the leading axis of m outputs is whole
        table = {
            "S": lambda: list(self.state),
            "Z": lambda: list(self.z),
            "X": lambda: list(self.data),
            "B": lambda: list(self.batch),
            "D": lambda: [m + spec for spec, leaf in zip(self.state, layout.state) if leaf.floating],
            "A": lambda: [m + spec for spec in self.z],
        }
        return table[group]() if group in table else [()]

    def program_specs(self, kind: dict, layout, steps: int = 0) -> tuple[list[Spec], list[Spec]]:
        """(input specs, output specs) of a program of this ``kind`` (``programs.KINDS``) that runs
        ``steps`` steps (0: a kind that is not sized); programs of several steps take their
        batches stacked on a whole leading axis."""
        def specs(group):
            found = self.group_specs(layout, group)
            return [((),) + spec for spec in found] if group == "B" and steps > 1 else found

        flat = lambda groups: [s for g in groups for s in specs(g)]  # noqa: E731
        return flat(kind["inputs"]), flat(kind["outputs"])

    # -- lowering --------------------------------------------------------------

    def lower(self, fn: Callable, structs, in_specs, out_specs, donate_argnums: tuple[int, ...]):
        """``jax.jit(fn)`` lowered with these shardings on an abstract mesh (jax keeps its one device)."""
        from jax._src import config

        mesh = AbstractMesh(tuple(size for _, size in self.mesh), tuple(name for name, _ in self.mesh))
        named = lambda specs: tuple(NamedSharding(mesh, _partition_spec(s)) for s in specs)  # noqa: E731
        out_shardings = named(out_specs)
        if not isinstance(jax.eval_shape(fn, *structs), (tuple, list)):  # phi or a flag: one result
            (out_shardings,) = out_shardings
        with config.use_shardy_partitioner(self.partitioner == "shardy"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            jitted = jax.jit(fn, in_shardings=named(in_specs), out_shardings=out_shardings,
                             donate_argnums=donate_argnums, keep_unused=True)
            # With only an abstract mesh, jax needs the platform named.
            return jitted.trace(*structs).lower(lowering_platforms=("cpu",))

    # -- values ----------------------------------------------------------------

    def upload(self, array: np.ndarray, spec: Spec, client, devices: Sequence[int]) -> list:
        """The shards of a host array, partition p's on ``devices[p]`` (strided copies)."""
        spec_lists, mesh = [list(a) for a in spec], list(self.mesh)
        shard = _runtime.shard_shape(list(array.shape), spec_lists, mesh)
        buffers = []
        for p, device in enumerate(devices):
            offsets = _runtime.shard_offsets(list(array.shape), spec_lists, mesh, p)
            block = array[tuple(slice(o, o + n) for o, n in zip(offsets, shard))]
            buffers.append(client.buffer_from_array(block, device))
        return buffers

    def assemble(self, shards: Sequence, shape, spec: Spec) -> np.ndarray:
        """The global array from its shards; a replicated block is read once."""
        spec_lists, mesh = [list(a) for a in spec], list(self.mesh)
        out, done = None, set()
        for p, shard in enumerate(shards):
            offsets = tuple(_runtime.shard_offsets(list(shape), spec_lists, mesh, p))
            if offsets in done:
                continue
            done.add(offsets)
            block = shard.to_numpy()
            if out is None:
                out = np.empty(tuple(shape), block.dtype)
            out[tuple(slice(o, o + n) for o, n in zip(offsets, block.shape))] = block
        return out


def resolve(sharding: Sharding, layout, client) -> tuple[TaskSharding, tuple[int, ...]]:
    """The sharding of each leaf of the task, checked, and the partitions' devices.

    Raises ValueError naming the leaf for a spec that names an unknown mesh
    axis, does not divide a dimension or is longer than the array, and for a
    mesh larger than the client: before anything is lowered or compiled.
    """
    if not isinstance(sharding, Sharding):
        raise TypeError(f"sharding must be a metagrad.Sharding, got {type(sharding).__name__}")
    available = len(client.devices)
    if sharding.num_devices > available:
        raise ValueError(f"the mesh {dict(sharding.mesh)} needs {sharding.num_devices} devices, the client has "
                         f"{available} (for the CPU plugin: metagrad.runtime.get_client(cpu_device_count="
                         f"{sharding.num_devices}))")
    devices = tuple(int(d) for d in sharding.devices) if sharding.devices is not None else \
        tuple(range(sharding.num_devices))
    if max(devices) >= available:
        raise ValueError(f"Sharding.devices names device {max(devices)}, the client has {available}")
    check_cpu_cores(client, len(devices))
    mesh = tuple((name, int(size)) for name, size in sharding.mesh.items())
    specs = {what: _leaf_specs(getattr(sharding, what), getattr(layout, what), layout.treedefs.get(what), mesh, what)
             for what in ("data", "z", "state")}
    return TaskSharding(mesh, sharding.partitioner, specs["state"], specs["z"], specs["data"],
                        _batch_specs(sharding.batch, layout.batch, mesh)), devices


def _batch_specs(given, leaves, mesh) -> tuple[Spec, ...]:
    """Sharding.batch for each leaf of a streamed batch: the rows' axis split, or nothing."""
    spec = _spec_data(given, "Sharding.batch")
    if any(spec[1:]):
        raise ValueError(f"Sharding.batch is {given}: a streamed batch may be split along its rows (its first "
                         f"axis) only")
    specs = tuple(spec[:len(leaf.shape)] for leaf in leaves)
    for spec, leaf in zip(specs, leaves):
        _runtime.check_partition_spec(list(leaf.shape), [list(a) for a in spec], list(mesh), leaf.path)
    return specs


OVERSUBSCRIBE_ENV = _runtime.CPU_OVERSUBSCRIBE_ENV  # read by CheckCpuCores (C++)


def check_cpu_cores(client, num_devices: int) -> None:
    """Refuse more CPU devices than cores before anything runs (the rule and why:
    ``CheckCpuCores`` in cpp/runtime/sharding.h); with ``$METAGRAD_CPU_OVERSUBSCRIBE=1``
    a warning instead."""
    warning = _runtime.check_cpu_cores(client.platform_name, num_devices)
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=4)


def compile_options(client, sharding: TaskSharding | None, devices: Sequence[int]) -> bytes:
    """The serialized compile options of a task's programs: none on one device (the
    plugin's default), else SPMD partitions on ``devices`` (cpp/runtime/client.h)."""
    if sharding is None:
        return b""
    return _runtime.compile_options([client.devices[d].id for d in devices], sharding.partitioner == "shardy",
                                    client.platform_name)
