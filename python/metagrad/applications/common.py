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
from tqdm import tqdm

from metagrad import Auto, Task, baselines

__all__ = ["ENGINES", "ArgumentError", "merge_params", "check_split", "Metagradient", "resolve_engine",
           "write_result", "plt", "Timer", "log", "bar", "seed_groups", "spearman", "spread", "compare", "fmt_spread",
           "summary", "plot_comparison"]

ENGINES = ("auto", "metagrad", "jax")
N_DIGITS = 1797  # sklearn's digits


class ArgumentError(ValueError):
    """A bad application argument; the message names it."""


# the smallest value each integer parameter may take (wherever an application has it)
_MINIMUM = {"steps": 1, "seeds": 1, "eval_seeds": 1, "train_steps": 1, "hidden": 2, "n_train": 2, "n_val": 1,
            "batch_size": 1, "seed": 0, "subsets": 3, "test_examples": 1, "knots": 2, "directions": 3,
            "sign_directions": 1}


def merge_params(name: str, defaults: dict, overrides: dict) -> dict:
    """``defaults`` updated with the non-``None`` ``overrides``, type- and range-checked;
    a bad or unknown name is an :class:`ArgumentError`."""
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
        if isinstance(d, float) and not np.isfinite(v):
            raise ArgumentError(f"{k} must be finite, got {v!r}")
        if is_int and k in _MINIMUM and v < _MINIMUM[k]:
            raise ArgumentError(f"{k} must be >= {_MINIMUM[k]}, got {v!r}")
    return p


def check_split(p: dict, n_test_min: int = 1) -> None:
    """The digits split and batch size of ``p`` fit the 1797 examples (an :class:`ArgumentError` if not)."""
    if p["n_train"] + p["n_val"] + n_test_min > N_DIGITS:
        raise ArgumentError(f"n_train + n_val must leave at least {n_test_min} of the {N_DIGITS} digits for "
                            f"testing, got n_train={p['n_train']}, n_val={p['n_val']}")
    if p.get("batch_size") is not None and p["batch_size"] > p["n_train"]:
        raise ArgumentError(f"batch_size must be <= n_train, got batch_size={p['batch_size']}, "
                            f"n_train={p['n_train']}")


def resolve_engine(engine: str) -> str:
    """``"metagrad"`` (the C++ runtime: ``task.compile(...).metagradient``) or
    ``"jax"`` (:func:`metagrad.baselines.scan_metagradient`); ``"auto"`` is ``"metagrad"``."""
    if engine not in ENGINES:
        raise ArgumentError(f"engine must be one of {ENGINES}, got {engine!r}")
    return "metagrad" if engine == "auto" else engine


class Metagradient:
    """``z -> (value, grad)`` for one or several tasks of the same shapes (for a task
    with m outputs, ``value`` has m entries and ``grad`` a leading m axis).

    With several tasks (e.g. the same recipe under different seeds), call
    ``i`` uses task ``i % len(tasks)`` (MGD then averages over training
    randomness along the way); :meth:`at` picks one explicitly. Values and
    gradients come back as numpy arrays. Compilation is lazy and cached.
    """

    def __init__(self, tasks: Task | Sequence[Task], z_example, *, engine: str = "auto", backend: str = "auto"):
        self.tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not self.tasks:
            raise ValueError("Metagradient needs at least one task")
        self.requested = engine
        self.engine = resolve_engine(engine)
        self.backend = backend
        self.z_example = z_example
        self._compiled: dict[int, Any] = {}
        self._task_calls: dict[int, int] = {}
        self.calls = 0
        self.seconds = 0.0
        self.compile_seconds = 0.0

    def _compiled_task(self, i: int):
        t0 = time.perf_counter()
        if i not in self._compiled:
            self._compiled[i] = self.tasks[i].compile(self.z_example, backend=self.backend)
            self._task_calls[i] = 0
        self._task_calls[i] += 1
        if self._task_calls[i] == 2:
            # From a task's second call on, the plan Auto settles on, built now rather than in the
            # background: which call changes plan must not depend on timing, so that a run repeats.
            self._compiled[i].prepare(Auto())
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
            try:
                value, grad = self._compiled_task(i % len(self.tasks)).metagradient(z)  # the planner's choice
            except Exception as err:
                if self.requested != "auto":
                    raise
                self._fallback(err)
                return self.at(i, z)
        value = float(value) if np.ndim(value) == 0 else np.asarray(value)  # m outputs: their m values
        grad = jax.tree_util.tree_map(np.asarray, grad)
        self.seconds += time.perf_counter() - t0
        return value, grad

    def __call__(self, z):
        i = self.calls
        self.calls += 1
        return self.at(i, z)


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


def bar(iterable=None, *, desc: str, enabled: bool = True, total: int | None = None):
    """A tqdm progress bar on stderr, drawn only when ``enabled`` and stderr is a terminal."""
    return tqdm(iterable, desc=desc, total=total, file=sys.stderr, disable=None if enabled else True,
                dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------- #
# the evaluation protocol: fit on some training seeds, report on unseen ones
# --------------------------------------------------------------------------- #

UNSEEN = 1000  # unseen seeds are UNSEEN, UNSEEN + 1, ...: disjoint from every fit seed an application uses


def seed_groups(p: dict) -> tuple[list[int], list[int]]:
    """``(fit, unseen)``: the training seeds (initialization and batch order) a method may look at,
    and the seeds every method is reported on."""
    return list(range(p["seeds"])), list(range(UNSEEN, UNSEEN + p["eval_seeds"]))


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences (ties get their average rank)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def spread(values) -> dict:
    """``{"mean", "sem", "n", "values"}``: the mean and its standard error (``sem`` is NaN for one value)."""
    v = np.asarray(values, np.float64).ravel()
    sem = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    return {"mean": float(v.mean()), "sem": sem, "n": int(v.size), "values": v.tolist()}


def compare(methods: dict, *, primary: str, higher_is_better: bool, mgd: str = "mgd", references=(),
            unit: str, target: str, target_met: bool | None = None) -> dict:
    """The head-to-head of one application.

    ``methods[name][metric]`` are :func:`spread` dicts on the same unseen seeds
    (or test examples: ``unit`` says which). Baselines are the methods other
    than ``mgd`` and the ``references`` (all data, oracles: context, not
    competitors). Returns the strongest baseline on ``primary``, whether MGD
    beats it, and their paired difference (mean and standard error over the
    shared seeds), and the application's ``target`` with ``target_met``.
    """
    sign = 1.0 if higher_is_better else -1.0
    baselines_ = [m for m in methods if m != mgd and m not in references]
    strongest = max(baselines_, key=lambda m: sign * methods[m][primary]["mean"]) if baselines_ else None
    out = {"primary": primary, "higher_is_better": higher_is_better, "unit": unit, "mgd": mgd,
           "references": list(references), "baselines": baselines_, "methods": methods,
           "strongest_baseline": strongest, "target": target, "target_met": target_met}
    if strongest is not None:
        a = np.asarray(methods[mgd][primary]["values"])
        b = np.asarray(methods[strongest][primary]["values"])
        diff = spread(a - b) if a.shape == b.shape else None
        out["mgd_minus_strongest"] = diff
        out["mgd_beats_strongest"] = bool(sign * (methods[mgd][primary]["mean"] - methods[strongest][primary]["mean"])
                                          > 0)
    return out


def fmt_spread(v: dict, digits: int = 4) -> str:
    """``"mean +- sem"`` of a :func:`spread` dict."""
    return f"{v['mean']:.{digits}f} +- {v['sem']:.{digits}f}"


def summary(comp: dict) -> dict:
    """:func:`compare`'s result without the per-seed values: what a person reads."""
    out = {"primary": comp["primary"], "higher_is_better": comp["higher_is_better"], "over": comp["unit"],
           "methods": {m: fmt_spread(v[comp["primary"]]) for m, v in comp["methods"].items()},
           "references (not competitors)": comp["references"],
           "strongest_baseline": comp["strongest_baseline"], "mgd_beats_strongest": comp.get("mgd_beats_strongest")}
    if comp.get("mgd_minus_strongest"):
        out["mgd_minus_strongest (paired)"] = fmt_spread(comp["mgd_minus_strongest"])
    out["target"] = comp["target"]
    out["target_met"] = comp["target_met"]
    return out


def plot_comparison(ax, comp: dict, title: str | None = None) -> None:
    """Bars of the primary metric (mean +- standard error) of every method of :func:`compare`'s result."""
    names = list(comp["methods"])
    means = [comp["methods"][m][comp["primary"]]["mean"] for m in names]
    sems = [np.nan_to_num(comp["methods"][m][comp["primary"]]["sem"]) for m in names]
    colors = ["C3" if m == comp["mgd"] else ("0.7" if m in comp["references"] else "C0") for m in names]
    y = np.arange(len(names))[::-1]
    ax.barh(y, means, xerr=sems, color=colors, capsize=3)
    ax.set_yticks(y, names, fontsize=8)
    lo, hi = min(m - s for m, s in zip(means, sems)), max(m + s for m, s in zip(means, sems))
    pad = 0.15 * (hi - lo) if hi > lo else 1.0
    ax.set_xlim(lo - pad, hi + pad)  # the differences, not the distance from zero, are what is read
    better = "higher" if comp["higher_is_better"] else "lower"
    ax.set(xlabel=f"{comp['primary']} ({better} is better; mean +- s.e. over {comp['unit']})",
           title=title or "MGD (red) vs baselines (blue), references grey")
