"""Checkpointing schedules: how the reverse pass gets the states it needs.

Reverse mode through ``T`` training steps visits ``theta_{T-1} ... theta_0`` in
reverse order. A schedule decides which states are saved on the way forward
and which are recomputed (replayed) from a saved one. Pass one of these as
``schedule=``:

* :class:`Replay` -- the paper's recursive ``k``-ary REPLAY: at most
  ``k * ceil(log_k T)`` saved states (exactly ``1 + (k-1) ceil(log_k T)``),
  at most ``T * ceil(log_k T)`` forward steps.
* :class:`StoreAll` -- save every state: ``T`` states, ``T`` forward steps.
* :class:`Periodic` -- two-level: a checkpoint every ``every`` steps, each
  segment stored in full in turn: about ``T/every + every`` states, < ``2T`` steps.
* :class:`Budget` -- binomial checkpointing (Griewank's *revolve*) with a
  given number of saved states, as many as fit in a byte budget, or as many
  as ``Replay(k)`` holds (``Budget(k=4)``, the default of
  ``CompiledTask.metagradient``): the fewest forward steps any schedule can
  have in that memory.

REPLAY vs revolve at equal memory (forward steps, first pass included; the
peak is REPLAY's, and ``Budget(states=peak)`` is given the same)::

       T     k  peak  Replay(k)  Budget(states=peak)
    1000     2    10       5045         3640
    1000     4    15       3775         3035
    1000     8    22       3140         2703
    1000    32    62       1938         1938
   10000     2    14      69009        46129
   10000     4    20      51545        37980
   10000     8    30      41167        34020
   10000    32    71      28377        27302

Revolve never does worse; it gains most where memory is tight (small ``k``).

``block > 1`` fuses the last level: the policy works on blocks of ``block`` steps
and reverses each block with one compiled reverse of the whole block (the
block's residuals are held inside that program, on top of the saved states).
Saved-state counts never include the current state.

A plan is a :class:`Plan` (a C++ sequence of :class:`Action`); ``plan.stats(T)``
checks it and returns its forward steps, peak and fused lengths.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from metagrad._runtime import (Action, Plan, PlanError, plan_periodic, plan_replay, plan_revolve, plan_store_all,
                               revolve_forward_steps)

__all__ = [
    "Action", "Budget", "Periodic", "Plan", "PlanError", "Replay", "StoreAll", "plan_periodic", "plan_replay",
    "plan_revolve", "plan_store_all", "revolve_forward_steps",
]

_INT32_MAX = 2**31 - 1  # the step index is an int32, and so are slot numbers
_INT64_MAX = 2**63 - 1  # every integer the C++ planner takes fits an int64


def _int(name: str, value, minimum: int, maximum: int | None = None, where: str = "") -> int:
    """``value`` as an int in [minimum, maximum], or a ValueError/TypeError naming it."""
    label = f"{where}{name}"
    if isinstance(value, bool):
        raise TypeError(f"{label} must be an int, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{label} must be an int, got {type(value).__name__} {value!r}") from None
    if number < minimum or (maximum is not None and number > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{label} must be {allowed}, got {number}")
    return number


def _steps(steps) -> int:
    return _int("steps", steps, 1, _INT32_MAX)


@dataclass(frozen=True)
class Replay:
    """Recursive ``k``-ary REPLAY (the paper's schedule).

    Splits the run into ``k`` near-equal segments, saves their first states on
    the way forward, then recurses into the segments in reverse order. Peak
    ``1 + (k-1) * ceil(log_k T)`` saved states; forward steps at most
    ``T * ceil(log_k T)``. ``block``: steps per fused reverse block.
    """

    k: int = 4
    block: int = 1

    def __post_init__(self):
        _int("k", self.k, 2, _INT32_MAX, "Replay: ")
        _int("block", self.block, 1, _INT64_MAX, "Replay: ")

    def plan(self, steps: int, state_bytes: int = 0) -> Plan:
        return plan_replay(_steps(steps), self.k, self.block)


@dataclass(frozen=True)
class StoreAll:
    """Save every state: ``T`` saved states, no replay."""

    def plan(self, steps: int, state_bytes: int = 0) -> Plan:
        return plan_store_all(_steps(steps))


@dataclass(frozen=True)
class Periodic:
    """Two-level checkpointing: a checkpoint every ``every`` steps.

    Each segment, last first, is replayed from its checkpoint with all its
    states saved, then reversed. ``every`` must be a multiple of ``block``.
    Peak about ``T/every + every/block`` saved states.
    """

    every: int
    block: int = 1

    def __post_init__(self):
        every = _int("every", self.every, 1, _INT64_MAX, "Periodic: ")
        block = _int("block", self.block, 1, _INT64_MAX, "Periodic: ")
        if every % block:
            raise ValueError(f"Periodic: every ({every}) must be a multiple of block ({block})")

    def plan(self, steps: int, state_bytes: int = 0) -> Plan:
        return plan_periodic(_steps(steps), self.every, self.block)


@dataclass(frozen=True)
class Budget:
    """Binomial checkpointing (revolve) within a memory budget.

    Give exactly one of ``states`` (saved states at once, state_0's included),
    ``bytes`` (turned into ``bytes // state_bytes`` states) or ``k`` (the peak
    that ``Replay(k, block)`` would hold for the same ``T``: REPLAY's memory,
    with fewer forward steps; ``Budget(k=4)`` is the default schedule). The
    budget covers saved states only: the current state, the cotangents and a
    fused block's residuals come on top. At least one state is needed.
    """

    states: int | None = None
    bytes: int | None = None
    k: int | None = None
    block: int = 1

    def __post_init__(self):
        given = [name for name in ("states", "bytes", "k") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"Budget: give exactly one of states=, bytes= or k=, got states={self.states!r}, "
                             f"bytes={self.bytes!r}, k={self.k!r}")
        if self.states is not None:
            _int("states", self.states, 1, _INT32_MAX, "Budget: ")
        elif self.bytes is not None:
            _int("bytes", self.bytes, 1, _INT64_MAX, "Budget: ")
        else:
            _int("k", self.k, 2, _INT32_MAX, "Budget: ")
        _int("block", self.block, 1, _INT64_MAX, "Budget: ")

    def __repr__(self) -> str:
        given = ", ".join(f"{name}={getattr(self, name)}" for name in ("states", "bytes", "k")
                          if getattr(self, name) is not None)
        return f"Budget({given}, block={self.block})"

    def slots(self, state_bytes: int = 0, steps: int | None = None) -> int:
        """The number of states the budget holds, for states of ``state_bytes`` bytes
        (and, for ``k=``, a run of ``steps`` steps)."""
        if self.states is not None:
            return self.states
        if self.k is not None:
            if steps is None:
                raise ValueError("Budget(k=...): the number of states depends on steps; pass steps=")
            steps = _steps(steps)
            return max(1, plan_replay(steps, self.k, self.block).stats(steps)["peak_saved"])
        size = _int("state_bytes", state_bytes, 1, _INT64_MAX, "Budget(bytes=...): ")
        states = self.bytes // size
        if states < 1:
            raise ValueError(f"Budget: bytes={self.bytes} holds {states} states of {size} bytes; the minimum is "
                             f"1 state ({size} bytes)")
        return min(states, _INT32_MAX)

    def plan(self, steps: int, state_bytes: int = 0) -> Plan:
        steps = _steps(steps)
        return plan_revolve(steps, self.slots(state_bytes, steps), self.block)
