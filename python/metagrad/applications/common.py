"""What the applications share: choosing the metagradient engine, writing results."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any, Sequence

import jax
import numpy as np

from metagrad import baselines
from metagrad import Task

__all__ = ["ENGINES", "ArgumentError", "merge_params", "Metagradient", "resolve_engine", "write_result", "plt",
           "Timer"]

ENGINES = ("auto", "metagrad", "jax")


class ArgumentError(ValueError):
    """A bad application argument; the message names it."""


_POSITIVE = {"steps": 0, "seeds": 1, "train_steps": 1, "hidden": 2, "n_train": 2, "n_val": 1, "batch_size": 1}


def merge_params(name: str, defaults: dict, overrides: dict) -> dict:
    """``defaults`` updated with the non-``None`` ``overrides``; unknown names are an :class:`ArgumentError`."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ArgumentError(f"unknown argument(s) for {name}: {sorted(unknown)}; known: {sorted(defaults)}")
    p = dict(defaults)
    p.update({k: v for k, v in overrides.items() if v is not None})
    for k, v in p.items():
        d = defaults[k]
        if isinstance(d, bool) and not isinstance(v, (bool, np.bool_)):
            raise ArgumentError(f"{k} must be a bool, got {v!r}")
        is_int = isinstance(d, int) and not isinstance(d, bool)
        if is_int and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ArgumentError(f"{k} must be an int, got {v!r}")
        if isinstance(d, float) and (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))):
            raise ArgumentError(f"{k} must be a number, got {v!r}")
        if is_int and k in _POSITIVE and v < _POSITIVE[k]:
            raise ArgumentError(f"{k} must be >= {_POSITIVE[k]}, got {v!r}")
    return p


def resolve_engine(engine: str) -> str:
    """``"metagrad"`` (the C++ runtime: ``task.compile(...).metagradient``) or
    ``"jax"`` (:func:`metagrad.baselines.scan_metagradient`); ``"auto"`` is ``"metagrad"``."""
    if engine not in ENGINES:
        raise ArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
    return "metagrad" if engine == "auto" else engine


class Metagradient:
    """``z -> (value, grad)`` for one or several tasks of the same shapes.

    With several tasks (e.g. the same recipe under different seeds), call
    ``i`` uses task ``i % len(tasks)`` (MGD then averages over training
    randomness along the way); :meth:`at` picks one explicitly. Values and
    gradients come back as numpy arrays. Compilation is lazy and cached.
    """

    def __init__(self, tasks: Task | Sequence[Task], z_example, *, engine: str = "auto", k: int = 4,
                 backend: str = "auto"):
        self.tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not self.tasks:
            raise ValueError("Metagradient needs at least one task")
        self.requested = engine
        self.engine = resolve_engine(engine)
        self.k = k
        self.backend = backend
        self.z_example = z_example
        self._compiled: dict[int, Any] = {}
        self.calls = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0

    def _compiled_task(self, i: int):
        if i not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[i] = self.tasks[i].compile(self.z_example, backend=self.backend)
            self.compile_seconds += time.perf_counter() - t0
        return self._compiled[i]

    def _fallback(self, err: Exception) -> None:
        # engine="auto" only: a runtime that cannot take this task falls back to JAX, loudly
        warnings.warn(f"metagrad runtime failed ({type(err).__name__}: {err}); engine='auto' falls back to 'jax'",
                      RuntimeWarning, stacklevel=3)
        self.engine = "jax"

    def at(self, i: int, z):
        t0 = time.perf_counter()
        task = self.tasks[i % len(self.tasks)]
        if self.engine == "jax":
            value, grad = baselines.scan_metagradient(task, z)
        else:
            import metagrad

            try:
                value, grad = self._compiled_task(i % len(self.tasks)).metagradient(
                    z, schedule=metagrad.Budget(k=self.k))
            except Exception as err:
                if self.requested != "auto":
                    raise
                self._fallback(err)
                return self.at(i, z)
        value = float(value)
        grad = jax.tree_util.tree_map(np.asarray, grad)
        self.seconds += time.perf_counter() - t0
        return value, grad

    def __call__(self, z):
        i = self.calls
        self.calls += 1
        return self.at(i, z)

    def train(self, z, i: int = 0):
        """The final state of task ``i`` at ``z`` (through the same engine)."""
        if self.engine != "jax":
            try:
                return self._compiled_task(i).train(z)
            except Exception as err:
                if self.requested != "auto":
                    raise
                self._fallback(err)
        return baselines.train(self.tasks[i], z)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return _jsonable(np.asarray(x).tolist())
    return x


def write_result(out_dir: str | None, result: dict) -> str | None:
    """Write ``result`` to ``out_dir/result.json`` (creating the folder); returns the path."""
    if out_dir is None:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "result.json")
    with open(path, "w") as f:
        json.dump(_jsonable(result), f, indent=2)
    return path


def plt():
    """matplotlib.pyplot with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as pyplot

    return pyplot


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def log(msg: str, enabled: bool = True) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
