"""Reference metagradients computed with JAX's own autodiff.

These are the baselines every metagrad result is checked and benchmarked
against, and a pure-JAX engine the applications can fall back to:

* :func:`train` -- one ``lax.scan`` over all steps, jitted.
* :func:`scan_metagradient` -- ``jax.value_and_grad`` of ``phi(A(z))`` through
  one ``lax.scan`` that stores every step's residuals, or, with
  ``checkpoint_every=s``, a two-level scheme inside one XLA program (a scan over
  segments of ``s`` steps, each segment under ``jax.checkpoint``).
* :func:`replay_metagradient` -- the REPLAY schedule (recursive ``k``-ary split
  of ``[0, T)``) driven from Python with jitted ``step``
  and step-vjp, the way a user would write it by hand.
* :func:`memory_stats` -- XLA's compiled memory statistics of the program
  behind each of them: the device memory a baseline needs.

Jitted functions are cached per ``(init, step, output, steps)``; the data is an
argument of every jitted function (not a closed-over constant), so tasks that
share functions and shapes but differ in data share one compilation, and jax's
own cache handles new shapes.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from metagrad._src.task import Task

__all__ = ["train", "scan_metagradient", "replay_metagradient", "memory_stats", "clear_cache"]

PyTree = Any

_CACHE: dict[tuple, Callable] = {}
_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every cached jitted function (frees their executables)."""
    with _LOCK:
        _CACHE.clear()


def _key(task: Task, *extra) -> tuple:
    return (task.init, task.step, task.output, int(task.steps)) + extra


def _cached(key: tuple, build: Callable[[], Callable]) -> Callable:
    with _LOCK:
        fn = _CACHE.get(key)
    if fn is None:
        fn = build()
        with _LOCK:
            fn = _CACHE.setdefault(key, fn)
    return fn


def _check(task: Task) -> None:
    if not isinstance(task, Task):
        raise TypeError(f"task must be a metagrad.Task, got {type(task).__name__}")
    if int(task.steps) < 1:
        raise ValueError(f"task.steps must be >= 1, got {task.steps}")


def _run_steps(task: Task, state, z, data, t0, n: int):
    """``n`` steps from step index ``t0`` (``t0`` may be traced)."""

    def body(s, i):
        return task.step(s, z, data, t0 + i), None

    state, _ = lax.scan(body, state, jnp.arange(n, dtype=jnp.int32))
    return state


# --------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------- #

def _build_train(task: Task) -> Callable:
    T = int(task.steps)

    def run(z, data):
        state = task.init(z, data)
        return _run_steps(task, state, z, data, jnp.int32(0), T)

    return jax.jit(run)


def train(task: Task, z: PyTree) -> PyTree:
    """Run all ``task.steps`` steps from ``init`` and return the final state."""
    _check(task)
    fn = _cached(_key(task, "train"), lambda: _build_train(task))
    return fn(z, task.data)


# --------------------------------------------------------------------------- #
# jax.grad through lax.scan (optionally two-level checkpointed)
# --------------------------------------------------------------------------- #

def _build_scan(task: Task, checkpoint_every: int | None) -> Callable:
    T = int(task.steps)

    def objective(z, data):
        state = task.init(z, data)
        if checkpoint_every is None or checkpoint_every >= T:
            state = _run_steps(task, state, z, data, jnp.int32(0), T)
        else:
            s = int(checkpoint_every)
            nseg, rem = divmod(T, s)

            @jax.checkpoint
            def segment(st, t0):
                return _run_steps(task, st, z, data, t0, s)

            def outer(st, t0):
                return segment(st, t0), None

            starts = jnp.arange(nseg, dtype=jnp.int32) * s
            state, _ = lax.scan(outer, state, starts)
            if rem:
                tail = jax.checkpoint(lambda st: _run_steps(task, st, z, data, jnp.int32(nseg * s), rem))
                state = tail(state)
        return task.output(state, z, data)

    return jax.jit(jax.value_and_grad(objective))


def _scan_fn(task: Task, checkpoint_every: int | None) -> Callable:
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")
    return _cached(_key(task, "scan", checkpoint_every), lambda: _build_scan(task, checkpoint_every))


def scan_metagradient(task: Task, z: PyTree, checkpoint_every: int | None = None):
    """``(phi(A(z)), d phi(A(z)) / dz)`` by ``jax.value_and_grad`` through ``lax.scan``.

    Args:
      task: the training run.
      z: the metaparameter (any pytree of float arrays); the gradient has its
        structure.
      checkpoint_every: ``None`` stores every step's residuals (memory O(T));
        an int ``s`` scans over segments of ``s`` steps with ``jax.checkpoint``
        on each (about ``T/s`` saved states plus one segment's residuals, one
        extra forward pass). ``T`` need not be divisible by ``s``: the last,
        shorter segment is checkpointed too.
    """
    _check(task)
    return _scan_fn(task, checkpoint_every)(z, task.data)


# --------------------------------------------------------------------------- #
# REPLAY driven from Python
# --------------------------------------------------------------------------- #

class _ReplayFns:
    """The jitted pieces a hand-written REPLAY needs."""

    def __init__(self, task: Task):
        self.init = jax.jit(task.init)
        self.step = jax.jit(task.step)

        def step_vjp(state, z, data, t, state_bar, z_bar):
            _, vjp = jax.vjp(lambda s, zz: task.step(s, zz, data, t), state, z)
            s_bar, zb = vjp(state_bar)
            return s_bar, jax.tree_util.tree_map(jnp.add, z_bar, zb)

        def output_vjp(state, z, data):
            value, vjp = jax.vjp(lambda s, zz: task.output(s, zz, data), state, z)
            s_bar, z_bar = vjp(jnp.ones_like(value))
            return value, s_bar, z_bar

        def init_vjp(z, data, state_bar, z_bar):
            _, vjp = jax.vjp(lambda zz: task.init(zz, data), z)
            (zb,) = vjp(state_bar)
            return jax.tree_util.tree_map(jnp.add, z_bar, zb)

        # keep_unused: REPLAY holds all of the data on the device for the whole run, and
        # memory_stats counts it through these programs' arguments, as it counts a scan's.
        self.step_vjp = jax.jit(step_vjp, keep_unused=True)
        self.output_vjp = jax.jit(output_vjp, keep_unused=True)
        self.init_vjp = jax.jit(init_vjp, keep_unused=True)


def _split(lo: int, hi: int, k: int) -> list[int]:
    """``k`` (or fewer) nearly equal segment starts covering ``[lo, hi)``, plus ``hi``."""
    n = hi - lo
    parts = min(k, n)
    return [lo + (n * i) // parts for i in range(parts)] + [hi]


def replay_metagradient(task: Task, z: PyTree, k: int = 4, *, stats: dict | None = None):
    """``(phi(A(z)), d phi(A(z)) / dz)`` by the REPLAY schedule, one jitted call per step.

    Split ``[0, T)`` into ``k`` segments, save the first state of each while
    going forward, then for each segment in reverse order recurse into it; a
    segment of at most ``k`` steps is replayed once storing its states and
    reversed step by step. At most about ``k * log_k(T)`` states are alive,
    and about ``T * log_k(T)`` extra steps are run.

    Args:
      k: branching factor, ``>= 2``.
      stats: if a dict is given, it receives ``forward_steps`` (steps run,
        first pass included), ``reverse_steps`` and ``max_live_states``.
    """
    _check(task)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    fns = _cached(_key(task, "replay"), lambda: _ReplayFns(task))
    data = task.data
    T = int(task.steps)
    counters = {"forward_steps": 0, "reverse_steps": 0, "live": 0, "max_live_states": 0}

    def hold(n):
        counters["live"] += n
        counters["max_live_states"] = max(counters["max_live_states"], counters["live"])

    def fwd(state, t):
        counters["forward_steps"] += 1
        return fns.step(state, z, data, jnp.int32(t))

    def reverse(lo, hi, s_lo, s_bar, z_bar):
        """Adjoint of the state at ``lo`` given that of the state at ``hi``."""
        if hi - lo <= k:
            states = [s_lo]
            for t in range(lo, hi - 1):
                states.append(fwd(states[-1], t))
            hold(len(states) - 1)
            for t in range(hi - 1, lo - 1, -1):
                counters["reverse_steps"] += 1
                s_bar, z_bar = fns.step_vjp(states[t - lo], z, data, jnp.int32(t), s_bar, z_bar)
                states.pop()
            hold(-(hi - lo - 1))
            return s_bar, z_bar
        bounds = _split(lo, hi, k)
        starts = [s_lo]
        for i in range(len(bounds) - 2):
            s = starts[-1]
            for t in range(bounds[i], bounds[i + 1]):
                s = fwd(s, t)
            starts.append(s)
        hold(len(starts) - 1)
        for i in range(len(bounds) - 2, -1, -1):
            s_bar, z_bar = reverse(bounds[i], bounds[i + 1], starts[i], s_bar, z_bar)
            starts.pop()
            if i:
                hold(-1)
        return s_bar, z_bar

    # Forward pass to the final state, saving the k top-level segment starts;
    # the recursion below reuses them instead of replaying from 0.
    s0 = fns.init(z, data)
    hold(1)
    bounds = _split(0, T, k)
    starts = [s0]
    s = s0
    for i in range(len(bounds) - 1):
        for t in range(bounds[i], bounds[i + 1]):
            s = fwd(s, t)
        if i < len(bounds) - 2:
            starts.append(s)
    hold(len(starts) - 1 + 1)
    value, s_bar, z_bar = fns.output_vjp(s, z, data)
    del s
    hold(-1)
    for i in range(len(bounds) - 2, -1, -1):
        s_bar, z_bar = reverse(bounds[i], bounds[i + 1], starts[i], s_bar, z_bar)
        starts.pop()
        hold(-1)
    z_bar = fns.init_vjp(z, data, s_bar, z_bar)
    if stats is not None:
        stats.update(forward_steps=counters["forward_steps"], reverse_steps=counters["reverse_steps"],
                     max_live_states=counters["max_live_states"])
    return value, z_bar


# --------------------------------------------------------------------------- #
# device memory of the baselines' programs
# --------------------------------------------------------------------------- #

MEMORY_METHODS = ("train", "scan", "replay")


def _tree_bytes(tree) -> int:
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


def memory_stats(task: Task, z: PyTree, *, method: str = "scan", checkpoint_every: int | None = None) -> dict:
    """XLA's compiled memory statistics of the jitted program behind a baseline.

    Compiles the program for ``z``'s shapes (nothing is run) and reads
    ``memory_analysis()`` of the executable.

    Args:
      method: ``"train"`` (:func:`train`'s program), ``"scan"``
        (:func:`scan_metagradient`'s, with ``checkpoint_every``) or
        ``"replay"`` (the largest, by ``total_bytes``, of the programs
        :func:`replay_metagradient` runs beside its saved states: the step's
        vjp, the output's vjp, which reads the validation data, and init's
        vjp, each with all of z and the data as arguments, which REPLAY
        holds on the device throughout; REPLAY holds
        ``stats["max_live_states"]`` states of ``state_bytes`` each on top
        of it).
      checkpoint_every: as in :func:`scan_metagradient`; only with ``"scan"``.

    Returns:
      a dict of ints: ``argument_bytes`` (for ``"train"`` and ``"scan"``: z
      and the data), ``output_bytes``, ``temp_bytes``, ``alias_bytes``,
      ``total_bytes`` (argument + output + temp - alias: what the program
      holds on the device while it runs), XLA's own ``peak_bytes`` estimate,
      and ``state_bytes`` (one training state).
    """
    _check(task)
    if method not in MEMORY_METHODS:
        raise ValueError(f"method must be one of {MEMORY_METHODS}, got {method!r}")
    if checkpoint_every is not None and method != "scan":
        raise ValueError(f"checkpoint_every applies to method='scan' only, got method={method!r}")
    z = jax.tree_util.tree_map(jnp.asarray, z)
    data = task.data
    state = jax.eval_shape(task.init, z, data)
    if method == "train":
        programs = [(_cached(_key(task, "train"), lambda: _build_train(task)), (z, data))]
    elif method == "scan":
        programs = [(_scan_fn(task, checkpoint_every), (z, data))]
    else:
        fns = _cached(_key(task, "replay"), lambda: _ReplayFns(task))
        programs = [(fns.step_vjp, (state, z, data, jnp.int32(0), state, z)), (fns.output_vjp, (state, z, data)),
                    (fns.init_vjp, (z, data, state, z))]
    stats = max((_compiled_memory(fn, args) for fn, args in programs), key=lambda s: s["total_bytes"])
    stats["state_bytes"] = _tree_bytes(state)
    return stats


def _compiled_memory(fn, args) -> dict:
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        raise NotImplementedError(f"the {jax.default_backend()} backend reports no compiled memory statistics")
    stats = {"argument_bytes": analysis.argument_size_in_bytes, "output_bytes": analysis.output_size_in_bytes,
             "temp_bytes": analysis.temp_size_in_bytes, "alias_bytes": analysis.alias_size_in_bytes,
             "peak_bytes": analysis.peak_memory_in_bytes}
    stats = {name: int(value) for name, value in stats.items()}
    stats["total_bytes"] = (stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
                            - stats["alias_bytes"])
    return stats
