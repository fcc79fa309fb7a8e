"""A training run described in JAX: the unit metagrad compiles and differentiates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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
