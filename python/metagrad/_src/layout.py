"""A task's flat layout: validation of a Task against an example z, and the
conversions between its pytrees and the flat argument lists of its programs.

Nothing is compiled here: shapes come from tracing (``jax.make_jaxpr``), and every
error names the offending leaf by its pytree path.

Typed PRNG keys (``jax.random.key``) cross the flat boundary as their
``key_data`` (uint32 arrays) and are re-wrapped inside every program: the
runtime only ever holds plain arrays, and keys are carried, never
differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from metagrad._src import streams, trees

PyTree = Any


@dataclass(frozen=True)
class LeafSpec:
    """One flat array: its pytree path, shape and dtype (a key's ``key_data`` for keys)."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    key_impl: str | None = None  # the PRNG implementation of a typed-key leaf

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def floating(self) -> bool:
        """Real floating point (bfloat16 and float16 included): carries a cotangent."""
        return self.key_impl is None and jnp.issubdtype(np.dtype(self.dtype), jnp.floating)

    def struct(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, self.dtype)

    def to_json(self) -> dict:
        entry = {"path": self.path, "shape": list(self.shape), "dtype": self.dtype}
        if self.key_impl is not None:
            entry["key_impl"] = self.key_impl
        return entry

    @classmethod
    def from_json(cls, entry: dict) -> "LeafSpec":
        return cls(entry["path"], tuple(int(d) for d in entry["shape"]), entry["dtype"], entry.get("key_impl"))


def accumulator_dtype(dtype: str) -> str:
    """Metagradients of 16-bit float z are summed over the steps in float32."""
    return "float32" if np.dtype(dtype).itemsize < 4 else dtype


@dataclass(frozen=True)
class Layout:
    """Flat structure of a task: its z, data and state leaves, and phi."""

    z_tree: dict  # trees.encode(...) of each pytree: plain JSON data
    z: tuple[LeafSpec, ...]
    data_tree: dict
    data: tuple[LeafSpec, ...]
    state_tree: dict
    state: tuple[LeafSpec, ...]
    phi_shape: tuple[int, ...] = ()  # () or (m,): m outputs at once
    phi_dtype: str = "float32"
    batch: tuple[LeafSpec, ...] = ()  # the streamed batch of one step (streams.Batch's leaves); () without a Stream
    treedefs: dict = field(default_factory=dict, compare=False, repr=False)  # the live treedefs, when known

    @property
    def differentiable(self) -> tuple[bool, ...]:
        return tuple(spec.floating for spec in self.state)

    @property
    def outputs(self) -> int:
        """0 when phi is a scalar, else the number m of outputs taken at once."""
        return self.phi_shape[0] if self.phi_shape else 0

    @property
    def state_bytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.state)

    def accumulators(self) -> list[jax.ShapeDtypeStruct]:
        m = self.phi_shape
        return [jax.ShapeDtypeStruct(m + s.shape, accumulator_dtype(s.dtype)) for s in self.z]

    def cotangents(self) -> list[jax.ShapeDtypeStruct]:
        m = self.phi_shape
        return [jax.ShapeDtypeStruct(m + s.shape, s.dtype) for s in self.state if s.floating]

    def to_json(self) -> dict:
        """Plain data; ``accumulators`` is derived (written for readers without this module)."""
        return {"z": [s.to_json() for s in self.z], "data": [s.to_json() for s in self.data],
                "state": [s.to_json() for s in self.state],
                "phi": {"shape": list(self.phi_shape), "dtype": self.phi_dtype},
                "accumulators": [{"shape": list(a.shape), "dtype": np.dtype(a.dtype).name}
                                 for a in self.accumulators()],
                "trees": {"z": self.z_tree, "data": self.data_tree, "state": self.state_tree},
                **({"batch": [s.to_json() for s in self.batch]} if self.batch else {})}

    @classmethod
    def from_json(cls, entry: dict) -> "Layout":
        specs = {name: tuple(LeafSpec.from_json(e) for e in entry[name]) for name in ("z", "data", "state")}
        return cls(entry["trees"]["z"], specs["z"], entry["trees"]["data"], specs["data"], entry["trees"]["state"],
                   specs["state"], tuple(int(d) for d in entry["phi"]["shape"]), entry["phi"]["dtype"],
                   tuple(LeafSpec.from_json(e) for e in entry.get("batch", [])))

    # -- pytrees <-> flat leaves ------------------------------------------------

    def unflatten(self, which: str, leaves) -> PyTree:
        """A pytree of ``which`` ("z", "data", "state") from flat leaves: the user's own
        classes when this layout was made from their task, generic containers after load."""
        treedef = self.treedefs.get(which)
        if treedef is not None:
            return jax.tree_util.tree_unflatten(treedef, list(leaves))
        return trees.rebuild(getattr(self, f"{which}_tree"), list(leaves))


def _key_impl(struct) -> str:
    found = []
    jax.eval_shape(lambda key: found.append(str(jax.random.key_impl(key))) or jax.random.key_data(key), struct)
    return found[0]


def _leaf_specs(tree, what: str) -> tuple[Any, tuple[LeafSpec, ...]]:
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = []
    for path, leaf in paths_and_leaves:
        name = what + jax.tree_util.keystr(path)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"{name} is a {type(leaf).__name__}, not an array: every leaf must be an array")
        shape = tuple(int(d) for d in leaf.shape)
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, leaf.dtype))
            specs.append(LeafSpec(name, tuple(data.shape), np.dtype(data.dtype).name,
                                  _key_impl(jax.ShapeDtypeStruct(shape, leaf.dtype))))
            continue
        # As jax.jit does: numpy's float64/int64 become 32-bit unless x64 is on.
        dtype = np.dtype(jax.dtypes.canonicalize_dtype(leaf.dtype))
        if dtype.kind == "c":
            raise TypeError(f"{name} is {dtype.name}: complex leaves are not supported (split them into real and "
                            f"imaginary parts)")
        specs.append(LeafSpec(name, shape, dtype.name))
    return treedef, tuple(specs)


def wrap(specs, leaves) -> list:
    """Flat leaves as the user's arrays: key data back to typed keys (inside a program)."""
    return [leaf if spec.key_impl is None else jax.random.wrap_key_data(leaf, impl=spec.key_impl)
            for spec, leaf in zip(specs, leaves)]


def unwrap(specs, leaves) -> list:
    """The user's arrays as flat leaves: typed keys to their key data."""
    return [leaf if spec.key_impl is None else jax.random.key_data(leaf) for spec, leaf in zip(specs, leaves)]


def _traced(what: str, fn: Callable, *args):
    """The shapes ``fn(*args)`` returns, from two traces that must agree: metagrad traces each
    function once per program it builds, so a function that is not pure (numpy randomness or
    Python state read while it is traced) would compute something different in each program,
    and the metagradient would be silently wrong."""
    try:
        # A new wrapper per trace: JAX's trace cache would hand back the first trace for `fn` itself.
        first, shapes = jax.make_jaxpr(lambda *a: fn(*a), return_shape=True)(*args)
        second = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    except Exception as error:
        raise ValueError(f"{what} failed when traced with abstract inputs: {type(error).__name__}: {error}") from error
    difference = _trace_difference(first, second)
    if difference:
        raise ValueError(f"{what} is not a pure function of its arguments: two traces of it differ ({difference}). "
                         f"metagrad traces it once per program, so each program would compute something different. "
                         f"Draw randomness with jax.random from a key derived from t (jax.random.fold_in(key, t)) "
                         f"instead of numpy or Python's random, and read no Python state that changes between calls.")
    return shapes


def _host_array(x) -> np.ndarray:
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _trace_difference(first, second) -> str:
    """What differs between two traces of one function ('' when nothing does)."""
    if len(first.consts) != len(second.consts):
        return f"{len(first.consts)} constants, then {len(second.consts)}"
    for i, (a, b) in enumerate(zip(first.consts, second.consts)):
        a, b = _host_array(a), _host_array(b)
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            return f"constant {i}, {a.dtype}{list(a.shape)}, has other values"
    if str(first.jaxpr) != str(second.jaxpr):
        return "the operations or their literal values changed"
    return ""


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= 2**31 - 1:
        raise ValueError(f"Task.steps must be an integer >= 1 (and below 2^31, the range of the int32 step index), "
                         f"got {steps!r}")
    return int(steps)


def describe(task, z_example) -> Layout:
    """Validate a task against an example metaparameter; return its flat layout."""
    for name in ("init", "step", "output"):
        if not callable(getattr(task, name, None)):
            raise TypeError(f"Task.{name} must be callable")
    _check_steps(task.steps)
    z_treedef, z_specs = _leaf_specs(z_example, "z")
    if not z_specs:
        raise ValueError("z has no array leaves: the metaparameter must hold at least one array")
    for spec in z_specs:
        if not spec.floating:
            raise TypeError(f"{spec.path} has dtype {spec.dtype}: metaparameters must be floating point "
                            f"(float32, float64, bfloat16 or float16)")
    data_treedef, data_specs = _leaf_specs(task.data, "data")
    z_structs = jax.tree_util.tree_unflatten(z_treedef, [s.struct() for s in z_specs])
    data_structs = jax.tree_util.tree_map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), task.data)
    stream = streams.find(task.data)
    batch_treedef, batch_specs, step_data = None, (), data_structs
    if stream is not None:
        path, found = stream
        if found.steps != task.steps:
            raise ValueError(f"data{path} has batches for {found.steps} steps, the task has {task.steps}: its "
                             f"batches table must have one row per step")
        batch_treedef, batch_specs = _leaf_specs(found.batch_structs(), "data" + path)
        step_data = streams.replace(data_structs, found.batch_structs())
        data_structs = streams.unreadable(data_structs, path)

    state = _traced("init(z, data)", task.init, z_structs, data_structs)
    state_treedef, state_specs = _leaf_specs(state, "state")
    if not state_specs:
        raise ValueError("init(z, data) returned no arrays: the training state must hold at least one array")
    t = jax.ShapeDtypeStruct((), jnp.int32)
    next_state = _traced("step(state, z, data, t) with t an int32 scalar", task.step, state, z_structs,
                         step_data, t)
    next_treedef, next_specs = _leaf_specs(next_state, "step(...)")
    if next_treedef != state_treedef:
        raise ValueError(f"step changes the structure of the state: init gives {state_treedef}, step gives "
                         f"{next_treedef}")
    for before, after in zip(state_specs, next_specs):
        if (before.shape, before.dtype, before.key_impl) != (after.shape, after.dtype, after.key_impl):
            raise ValueError(f"step changes {before.path} from {before.dtype}{list(before.shape)} to "
                             f"{after.dtype}{list(after.shape)}: the state must keep its shapes and dtypes")
    phi = _traced("output(state, z, data)", task.output, state, z_structs, data_structs)
    if (not hasattr(phi, "shape") or len(phi.shape) > 1 or (len(phi.shape) == 1 and phi.shape[0] < 1)
            or not jnp.issubdtype(phi.dtype, jnp.floating)):
        raise ValueError(f"output(state, z, data) must return a floating-point scalar (or a vector of m outputs), "
                         f"got {getattr(phi, 'dtype', type(phi).__name__)}{list(getattr(phi, 'shape', []))}")
    return Layout(trees.encode(z_example), z_specs, trees.encode(task.data), data_specs,
                  trees.encode(state), state_specs, tuple(int(d) for d in phi.shape),
                  np.dtype(phi.dtype).name, batch_specs,
                  {"z": z_treedef, "data": data_treedef, "state": state_treedef, "batch": batch_treedef})
