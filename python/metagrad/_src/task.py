"""A training run described in JAX: the unit metagrad compiles and differentiates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from metagrad._src.compiled import compile_task
from metagrad._src.lowering import DEFAULT_BACKEND

PyTree = Any


@dataclass(frozen=True)
class Task:
    """A deterministic training run ``z -> phi(A(z))``.

    Attributes:
      init: ``init(z, data) -> state``; ``state`` is any pytree of arrays.
      step: ``step(state, z, data, t) -> state``, ``t`` an int32 scalar step
        index. Must be pure and deterministic: derive randomness and batch
        order from ``t`` (e.g. ``jax.random.fold_in(key, t)``).
      output: ``output(state, z, data) -> scalar``, the quantity ``phi``
        whose metagradient is taken.
      steps: number of training steps ``T >= 1``.
      data: pytree of arrays, uploaded to the device once and read-only.
    """

    init: Callable[[PyTree, PyTree], PyTree]
    step: Callable[[PyTree, PyTree, PyTree, Any], PyTree]
    output: Callable[[PyTree, PyTree, PyTree], Any]
    steps: int
    data: PyTree = None

    def compile(self, z_example, *, backend: str = DEFAULT_BACKEND, fuse_forward: int | Sequence[int] | None = None,
                loop: str = "unroll", client=None, sharding=None):
        """Lower, differentiate and compile this task for metaparameters shaped like ``z_example``.

        ``backend``: ``"auto"`` (the default: Enzyme, falling back to JAX's
        autodiff, with one line of warning, for any program Enzyme cannot
        differentiate), ``"enzyme"`` (Enzyme or an EnzymeUnsupportedError),
        or ``"jax"`` (JAX's autodiff). Enzyme runs in a separate process, so a
        crash inside it cannot end this one.
        ``fuse_forward``: steps per forward execution, an int or a sequence
        of them: each ``n > 1`` compiles an ``n``-step program that training
        and replays run from every step index that is a multiple of ``n``
        with ``n`` steps left (1: one execution per step, the shortest
        compile). None, the default: 10, and for ``loop="scan"`` also 100
        (``programs.DEFAULT_FUSE_FORWARD``). ``loop``: programs of
        several steps as straight-line code (``"unroll"``) or a ``lax.scan``
        (``"scan"``: compiles in constant time; faster for long fused reverses
        of dot-heavy steps, slower for convolutions).
        ``sharding``: a :class:`metagrad.Sharding` to run every program over
        several devices of the client (XLA's SPMD partitioner; see
        docs/scaling.md); None runs on one device.
        Returns a :class:`metagrad.CompiledTask`.
        """
        return compile_task(self, z_example, backend=backend, fuse_forward=fuse_forward, loop=loop, client=client,
                            sharding=sharding)
