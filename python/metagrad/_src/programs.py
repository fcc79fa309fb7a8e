"""The programs of a task as flat JAX functions, built from its forward functions.

The contract (which programs exist, their argument groups, what is donated)
is stated once, in ``cpp/runtime/programs.h``, and read here through the
bindings. A task's forward functions ``init``, ``step`` and ``output`` are
exported once (``jax.export``: serialized StableHLO, data only); every
program is built from those exports, so the reverse programs can be built in
another process (Enzyme's, see ``enzyme_worker``) or from a saved task,
without the user's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from metagrad import _runtime
from metagrad._src import layout as layout_lib, runtime, streams
from metagrad._src.layout import Layout

KINDS = {kind["name"]: kind for kind in _runtime.program_kinds()}
# The forward kind each reverse kind differentiates.
DIFFERENTIATES = {name: kind["reverse_of"] for name, kind in KINDS.items() if kind["reverse_of"]}


def needed_by(call: str) -> tuple[str, ...]:
    """The programs the calls of ``call`` need ("run", "metagradient", "check_finite"), in the contract's order."""
    return tuple(name for name, kind in KINDS.items() if kind["needed_by"] == call)


def kind_of(name: str) -> tuple[str, int]:
    """``"segment_vjp_10"`` -> ``("segment_vjp", 10)``; ValueError for names outside the contract."""
    return _runtime.parse_program_name(name)


def sized(kind: str, count: int) -> str:
    """``("advance", 1)`` -> ``"step"``, ``("segment_vjp", 10)`` -> ``"segment_vjp_10"``."""
    return _runtime.sized_program(kind, count)


def is_reverse(name: str) -> bool:
    return kind_of(name)[0] in DIFFERENTIATES


Spec = tuple  # (shape tuple, dtype name)


@dataclass(frozen=True)
class Program:
    """One compiled-to-be program: its portable StableHLO and its flat signature."""

    name: str
    artifact: bytes  # portable StableHLO
    backend: str  # "enzyme" or "jax" for reverse programs, "none" for forward ones
    inputs: tuple[Spec, ...]
    donated: tuple[bool, ...]
    outputs: tuple[Spec, ...]
    fallback: str = ""  # why JAX built a reverse that backend="auto" asked of Enzyme

    def to_json(self) -> dict:
        """The manifest entry of this program (the artifact itself is stored beside it)."""
        entry = {"backend": self.backend,
                 "inputs": [{"shape": list(s), "dtype": d, "donated": bool(k)}
                            for (s, d), k in zip(self.inputs, self.donated)],
                 "outputs": [{"shape": list(s), "dtype": d} for s, d in self.outputs]}
        if self.fallback:
            entry["fallback"] = self.fallback
        return entry

    @classmethod
    def from_json(cls, name: str, entry: dict, artifact: bytes) -> "Program":
        """Inverse of :meth:`to_json`; raises KeyError, TypeError or ValueError on malformed entries."""
        def spec(e):
            return tuple(int(d) for d in e["shape"]), str(e["dtype"])

        return cls(name, artifact, str(entry["backend"]), tuple(spec(e) for e in entry["inputs"]),
                   tuple(bool(e["donated"]) for e in entry["inputs"]), tuple(spec(e) for e in entry["outputs"]),
                   str(entry.get("fallback", "")))


class Forward(NamedTuple):
    """A task's forward functions on flat arguments (typed keys as key data).

    init(*Z, *X) -> S; step(*S, *Z, *X, *B, t) -> S; output(*S, *Z, *X) -> phi
    (B: the streamed batch of step t, empty without a Stream in the data).
    """

    init: Callable
    step: Callable
    output: Callable


def forward_of_task(task, layout: Layout) -> Forward:
    """The user's functions with flat arguments and results."""
    ns, nz, nx = len(layout.state), len(layout.z), len(layout.data)

    def trees(s, z, x, batch=None):
        state = layout.unflatten("state", layout_lib.wrap(layout.state, s)) if s is not None else None
        data = layout.unflatten("data", layout_lib.wrap(layout.data, x))
        if layout.batch:  # step reads the stream's batch; init and output cannot read the stream
            found = streams.find(data)
            data = (streams.unreadable(data, found[0]) if batch is None
                    else streams.replace(data, layout.unflatten("batch", batch)))
        return state, layout.unflatten("z", z), data

    def flat_state(state):
        return tuple(layout_lib.unwrap(layout.state, jax.tree_util.tree_leaves(state)))

    def init(*args):
        _, z, x = trees(None, args[:nz], args[nz:])
        return flat_state(task.init(z, x))

    def step(*args):
        state, z, x = trees(args[:ns], args[ns:ns + nz], args[ns + nz:ns + nz + nx], args[ns + nz + nx:-1])
        return flat_state(task.step(state, z, x, args[-1]))

    def output(*args):
        state, z, x = trees(args[:ns], args[ns:ns + nz], args[ns + nz:])
        return task.output(state, z, x)

    return Forward(init, step, output)


def group_specs(layout: Layout, groups: str, steps: int = 0) -> list[jax.ShapeDtypeStruct]:
    """The structs of ``groups`` for a program of ``steps`` steps (0: a program of no sized kind)."""
    stacked = (steps,) if steps > 1 else ()  # programs of several steps take their batches stacked
    table = {
        "S": lambda: [s.struct() for s in layout.state],
        "Z": lambda: [s.struct() for s in layout.z],
        "X": lambda: [s.struct() for s in layout.data],
        "B": lambda: [jax.ShapeDtypeStruct(stacked + s.shape, s.dtype) for s in layout.batch],
        "t": lambda: [jax.ShapeDtypeStruct((), jnp.int32)],
        "D": layout.cotangents,
        "A": layout.accumulators,
        "p": lambda: [jax.ShapeDtypeStruct(layout.phi_shape, layout.phi_dtype)],
        "f": lambda: [jax.ShapeDtypeStruct((), jnp.bool_)],
    }
    return [spec for group in groups for spec in table[group]()]


def signature(layout: Layout, name: str) -> tuple[list, tuple[bool, ...], list]:
    """(input structs, donated flags, output structs) of program ``name`` by the contract."""
    kind_name, steps = kind_of(name)
    kind = KINDS[kind_name]
    inputs, donated = [], []
    for group in kind["inputs"]:
        specs = group_specs(layout, group, steps)
        inputs += specs
        donated += [group in kind["donated"]] * len(specs)
    return inputs, tuple(donated), group_specs(layout, kind["outputs"])


def export_forward(forward: Forward, layout: Layout, check: Callable | None = None,
                   custom_calls: tuple[str, ...] = (), vjp: bool = False) -> dict[str, bytes]:
    """The forward functions, exported (serialized StableHLO with their signatures).

    ``custom_calls``: targets the runtime has handlers for, exported although
    jax.export guarantees nothing about them. ``check(lowered, name)``
    explains a function that cannot be exported (host callbacks, custom calls
    without a handler) by refusing its lowered module. ``vjp``: include each
    function's VJP (for saved tasks, whose JAX reverses are built from the
    exports; it doubles the export's cost, so compiling leaves it out).
    """
    disabled = [jax.export.DisabledSafetyCheck.custom_call(target) for target in custom_calls]
    exports = {}
    for name in ("init", "step", "output"):
        inputs, _, _ = signature(layout, name)
        try:
            exported = jax.export.export(jax.jit(getattr(forward, name)), disabled_checks=disabled)(*inputs)
        except (NotImplementedError, ValueError):
            if check is not None:
                check(jax.jit(getattr(forward, name)).lower(*inputs), name)
            raise
        exports[name] = bytes(exported.serialize(vjp_order=1 if vjp else 0))
    return exports


def forward_of_exports(exports: dict[str, bytes]) -> Forward:
    """Forward functions from their exports (deserializing runs no code)."""
    calls = {name: jax.export.deserialize(bytearray(blob)).call for name, blob in exports.items()}
    return Forward(calls["init"], lambda *args: tuple(calls["step"](*args)), calls["output"])


def _split(args, *sizes):
    out, i = [], 0
    for size in sizes:
        out.append(list(args[i:i + size]))
        i += size
    return out


LOOPS = ("unroll", "scan")  # how programs of n > 1 steps are written (see _Builder.steps)
# Steps per execution of the fused forward programs (advance_n) when compile() is not told, by loop.
# A scan compiles in constant time, so scan-form tasks also get 100-step advances: ten times fewer
# executions, each paying the plugin's per-execution cost (docs/performance.md, "Fewer executions").
DEFAULT_FUSE_FORWARD = {"unroll": (10,), "scan": (10, 100)}


def _reversible(forward: Forward, layout: Layout, backend: str) -> Forward:
    """The forward functions as Enzyme differentiates them (``backend="enzyme"``), else as they are."""
    if backend != "enzyme":
        return forward
    from enzyme_ad.jax import enzyme_jax_ir

    ns, nz, nx = len(layout.state), len(layout.z), len(layout.data)
    # enzyme-ad 0.0.16's reverse rule (enzyme_vjp) indexes its list of
    # per-argument activities by output position, so a function with more
    # outputs than arguments fails with an IndexError: unused scalar arguments
    # pad the list (init returns every state leaf from fewer z and data leaves).
    pad = max(0, ns - nz - nx)
    init = enzyme_jax_ir()(lambda *args: forward.init(*args[:nz + nx]))
    padding = [jnp.zeros((), jnp.float32)] * pad
    return Forward(lambda *args: init(*args, *padding), enzyme_jax_ir()(forward.step),
                   enzyme_jax_ir()(forward.output))


class _Builder:
    """The flat function of each program kind, for one task and backend."""

    def __init__(self, forward: Forward, layout: Layout, backend: str, loop: str):
        self.forward, self.layout, self.backend, self.loop = forward, layout, backend, loop
        self.sizes = len(layout.state), len(layout.z), len(layout.data), len(layout.batch)
        self.diff = [i for i, spec in enumerate(layout.state) if spec.floating]
        self.m = layout.outputs

    @property
    def rev(self) -> Forward:
        return _reversible(self.forward, self.layout, self.backend)

    def steps(self, step: Callable, n: int, state: list, z: list, x: list, b: list, t0) -> list:
        """n steps from t0. Unrolled by default: XLA's CPU backend runs convolutions
        inside a while loop several times slower; ``loop="scan"`` writes a lax.scan,
        which compiles in constant time and runs long fused reverses of dot-heavy
        steps faster (docs/performance.md). Enzyme aborts on a scan's
        stablehlo.while, so with Enzyme JAX differentiates the loop and Enzyme each step."""
        if n == 1:
            return list(step(*state, *z, *x, *b, t0))
        if self.loop == "unroll":
            for i in range(n):
                state = list(step(*state, *z, *x, *[leaf[i] for leaf in b], t0 + i))
            return state
        body = lambda carry, xs: (list(step(*carry, *z, *x, *xs[1], t0 + xs[0])), None)  # noqa: E731
        return jax.lax.scan(body, state, (jnp.arange(n, dtype=jnp.int32), list(b)))[0]

    def merge(self, state, leaves) -> list:
        state = list(state)
        for i, leaf in zip(self.diff, leaves):
            state[i] = leaf
        return state

    def full(self, d_leaves) -> list:
        """A cotangent for every state leaf: ``d_leaves`` where differentiable, float0
        zeros elsewhere (Enzyme's vjp wants one per output of what it differentiated)."""
        it = iter(d_leaves)
        return [next(it) if spec.floating else np.zeros(spec.shape, jax.dtypes.float0) for spec in self.layout.state]

    def pull_all(self, pull, cotangent, expand=lambda c: c):
        """The vjp at one cotangent, or at each of the m cotangents stacked on a leading axis.

        One forward pass serves all m: JAX's reverse is batched (vmap); Enzyme's
        primitive has no batching rule, so its m reverses run in a loop.
        """
        if self.m == 0:
            return pull(expand(cotangent))
        if self.backend == "enzyme":
            return jax.lax.map(lambda c: pull(expand(c)), cotangent)
        return jax.vmap(lambda c: pull(expand(c)))(cotangent)

    @staticmethod
    def accumulate(acc, z_bar) -> list:
        return [a + jnp.asarray(g).astype(a.dtype) for a, g in zip(acc, z_bar)]

    # -- one method per program kind -------------------------------------------

    def advance(self, n: int) -> Callable:
        ns, nz, nx, nb = self.sizes

        def run(*args):
            s, z, x, b, (t0,) = _split(args, ns, nz, nx, nb, 1)
            return tuple(self.steps(self.forward.step, n, s, z, x, b, t0))
        return run

    def all_finite(self, n: int) -> Callable:
        return lambda *leaves: jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves] or [True]))

    def state_finite(self, n: int) -> Callable:
        return lambda *leaves: jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaves[i])) for i in self.diff] or [True]))

    def output_vjp(self, n: int) -> Callable:
        ns, nz, nx, _ = self.sizes
        rev, acc_dtypes = self.rev, [a.dtype for a in self.layout.accumulators()]

        def run(*args):
            s, z, x = _split(args, ns, nz, nx)
            phi, pull = jax.vjp(lambda d, zz: rev.output(*self.merge(s, d), *zz, *x), [s[i] for i in self.diff], z)
            seed = jnp.ones_like(phi) if self.m == 0 else jnp.eye(self.m, dtype=phi.dtype)
            d_bar, z_bar = self.pull_all(pull, seed)
            return (phi, *d_bar, *[g.astype(dt) for g, dt in zip(z_bar, acc_dtypes)])
        return run

    def step_vjp(self, n: int) -> Callable:
        return self.segment_vjp(1)

    def segment_vjp(self, n: int) -> Callable:
        ns, nz, nx, nb = self.sizes
        nd, rev = len(self.diff), self.rev

        def run(*args):
            s, z, x, b, (t0,), d, acc = _split(args, ns, nz, nx, nb, 1, nd, nz)
            forward = lambda d_leaves, zz: self.steps(rev.step, n, self.merge(s, d_leaves), zz, x, b, t0)  # noqa: E731
            _, pull = jax.vjp(forward, [s[i] for i in self.diff], z)
            d_bar, z_bar = self.pull_all(pull, d, self.full)
            return (*d_bar, *self.accumulate(acc, z_bar))
        return run

    def init_vjp(self, n: int) -> Callable:
        _, nz, nx, _ = self.sizes
        nd, rev = len(self.diff), self.rev

        def run(*args):
            z, x, d, acc = _split(args, nz, nx, nd, nz)
            _, pull = jax.vjp(lambda zz: list(rev.init(*zz, *x)), z)
            (z_bar,) = self.pull_all(pull, d, self.full)
            return tuple(self.accumulate(acc, z_bar))
        return run


def function(name: str, forward: Forward, layout: Layout, backend: str, loop: str = "unroll") -> Callable:
    """The flat function of program ``name``; ``backend`` ("enzyme" or "jax") builds the reverses."""
    kind, n = kind_of(name)
    if kind in ("init", "step", "output"):
        return getattr(forward, kind)
    return getattr(_Builder(forward, layout, backend, loop), kind)(n)


def _spec(struct) -> Spec:
    return tuple(int(d) for d in struct.shape), np.dtype(struct.dtype).name


def build(name: str, forward: Forward, layout: Layout, backend: str, target: str, loop: str = "unroll",
          check: Callable | None = None, sharding=None) -> Program:
    """Lower program ``name`` to a portable artifact with its contract signature;
    ``check(lowered, name)`` may refuse the lowered module first. With a
    ``sharding`` (``sharding.TaskSharding``) the program is lowered for its mesh
    and its signature is per shard."""
    import warnings

    inputs, donated, outputs = signature(layout, name)
    fn = function(name, forward, layout, backend, loop)
    donate = tuple(i for i, d in enumerate(donated) if d)
    if sharding is None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            lowered = jax.jit(fn, donate_argnums=donate, keep_unused=True).lower(*inputs)
    else:
        kind, steps = kind_of(name)
        in_specs, out_specs = sharding.program_specs(KINDS[kind], layout, steps)
        lowered = sharding.lower(fn, inputs, in_specs, out_specs, donate)
        shard = lambda s, spec: jax.ShapeDtypeStruct(sharding.shard_shape(s.shape, spec), s.dtype)  # noqa: E731
        inputs = [shard(s, spec) for s, spec in zip(inputs, in_specs)]
        outputs = [shard(s, spec) for s, spec in zip(outputs, out_specs)]
    if check is not None:
        check(lowered, name)
    return Program(name, runtime.portable_artifact(lowered, target), backend if is_reverse(name) else "none",
                   tuple(_spec(s) for s in inputs), donated, tuple(_spec(s) for s in outputs))
