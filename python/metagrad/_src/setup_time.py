"""Where the time before a run goes: tracing, Enzyme, XLA's compiles, calibration.

The code that does each piece of set-up marks it with :func:`phase`; a
:class:`SetupTime` opened with :func:`record` around a call (``Task.compile``,
one ``metagradient``) collects the seconds of the phases that ran inside it on
the same thread. Phases nest: the inner phase's seconds are not counted again
in the outer one, so the phases add up to the time they cover.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

# The phases, in the order set-up runs them (the Report's setup_seconds keys).
PHASES = ("trace", "enzyme", "compile", "calibrate")

_active = threading.local()


@dataclass
class SetupTime:
    """Seconds by phase, and XLA's compile seconds by program."""

    seconds: dict[str, float] = field(default_factory=dict)
    compile_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def add(self, other: "SetupTime") -> None:
        for name, value in other.seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value
        for name, value in other.compile_seconds.items():
            self.compile_seconds[name] = self.compile_seconds.get(name, 0.0) + value


@contextlib.contextmanager
def record():
    """Collect the phases that run on this thread inside the block into a new SetupTime."""
    recorders = getattr(_active, "recorders", [])
    recorder = SetupTime()
    _active.recorders = [*recorders, recorder]
    try:
        yield recorder
    finally:
        _active.recorders = recorders


@contextlib.contextmanager
def phase(name: str, program: str | None = None):
    """Count the block's seconds as phase ``name`` (and, for "compile", as ``program``'s)."""
    if name not in PHASES:
        raise ValueError(f"unknown set-up phase {name!r}; the phases are {PHASES}")
    stack = getattr(_active, "phases", [])
    start = time.perf_counter()
    _active.phases = [*stack, 0.0]  # seconds of phases nested inside this one
    try:
        yield
    finally:
        nested = _active.phases[-1]
        _active.phases = stack
        elapsed = time.perf_counter() - start
        if stack:
            _active.phases[-1] += elapsed
        for recorder in getattr(_active, "recorders", []):
            recorder.seconds[name] = recorder.seconds.get(name, 0.0) + elapsed - nested
            if name == "compile" and program is not None:
                recorder.compile_seconds[program] = recorder.compile_seconds.get(program, 0.0) + elapsed
