"""Metagradient descent (MGD): optimize a metaparameter ``z`` with metagradients.

A small functional API in the style of Optax::

    from metagrad import mgd
    hist = mgd.run(metagradient_fn, z0, steps=50, direction="minimize",
                   step_rule=mgd.sign_step(0.05), projection=mgd.box(0.0, 1.0))
    z_best = hist.best_z

* ``metagradient_fn(z) -> (value, grad)`` is any function returning
  ``phi(A(z))`` and its gradient with ``z``'s pytree structure
  (``CompiledTask.metagradient``, :func:`metagrad.baselines.scan_metagradient`,
  ...).
* A *step rule* (:class:`StepRule`) is a pair of pure functions
  ``init(z) -> state`` and ``update(g, state, z) -> (z_new, state)`` that take a
  *descent* step on ``g``; :func:`run` hands it ``+grad`` to minimize and
  ``-grad`` to maximize, so the rules never need to know the direction.
  Provided: :func:`sign_step`, :func:`gradient_step`, :func:`adam`. Learning
  rates are floats or callables ``lr(i) -> float`` of the MGD step ``i``
  (e.g. :func:`cosine_decay`).
* A *projection* is a pure function ``z -> z`` applied after every update:
  :func:`box`, :func:`pixel_range`, :func:`simplex`, :func:`top_k`. They act
  on every leaf of ``z``; for pytrees that need different sets per leaf, write
  a function that projects each leaf (see :func:`leafwise`).
* :class:`History` records ``phi`` and the metagradient norm at every step and
  ``z`` snapshots, can be saved to ``.npz`` and loaded back, and ``run`` resumes
  from a loaded history exactly (same iterates as an uninterrupted run).

Internally ``z`` is held as float numpy arrays; the metagradient function
receives numpy arrays of the dtypes of ``z0``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

__all__ = [
    "StepRule", "sign_step", "gradient_step", "adam", "cosine_decay",
    "box", "pixel_range", "simplex", "top_k", "leafwise",
    "History", "run",
]

PyTree = Any
_tree = jax.tree_util


# --------------------------------------------------------------------------- #
# step rules
# --------------------------------------------------------------------------- #

class StepRule(NamedTuple):
    """``init(z) -> state``; ``update(g, state, z) -> (z_new, state)`` (a descent step on ``g``).

    ``state`` must be a pytree of numpy arrays/scalars (so it can be saved).
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[[PyTree, PyTree, PyTree], tuple[PyTree, PyTree]]


def _lr_fn(lr, name="lr") -> Callable[[int], float]:
    if callable(lr):
        return lambda i: float(lr(i))
    if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number or a callable lr(step) -> float, got {lr!r}")
    if not lr > 0:
        raise ValueError(f"{name} must be > 0, got {lr!r}")
    value = float(lr)
    return lambda i: value


def cosine_decay(init: float, end: float, steps: int) -> Callable[[int], float]:
    """``lr(i)``: from ``init`` at step 0 down to ``end`` at step ``steps - 1`` along a half cosine, then ``end``.

    On a rough ``phi`` a constant rate keeps ``z`` bouncing around a minimum;
    decaying it lets MGD settle.
    """
    for name, v in (("init", init), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0:
            raise ValueError(f"cosine_decay {name} must be a number > 0, got {v!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"cosine_decay steps must be an int >= 1, got {steps!r}")
    span = max(int(steps) - 1, 1)

    def lr(i: int) -> float:
        frac = min(max(i, 0), span) / span
        return float(end + 0.5 * (init - end) * (1.0 + math.cos(math.pi * frac)))

    return lr


def sign_step(lr) -> StepRule:
    """``z <- z - lr * sign(g)``: the step of the paper's MGD (robust to metagradient scale)."""
    lr_at = _lr_fn(lr)

    def init(z):
        return {"count": np.int64(0)}

    def update(g, state, z):
        eta = lr_at(int(state["count"]))
        z_new = _tree.tree_map(lambda zz, gg: (zz - eta * np.sign(gg)).astype(zz.dtype), z, g)
        return z_new, {"count": np.int64(state["count"] + 1)}

    return StepRule(init, update)


def gradient_step(lr, *, normalize: bool = False) -> StepRule:
    """``z <- z - lr * g`` (``normalize=True``: ``g / ||g||``, the global 2-norm over all leaves)."""
    lr_at = _lr_fn(lr)

    def init(z):
        return {"count": np.int64(0)}

    def update(g, state, z):
        eta = lr_at(int(state["count"]))
        if normalize:
            norm = _global_norm(g)
            eta = eta / norm if norm > 0 else 0.0
        z_new = _tree.tree_map(lambda zz, gg: (zz - eta * gg).astype(zz.dtype), z, g)
        return z_new, {"count": np.int64(state["count"] + 1)}

    return StepRule(init, update)


def adam(lr, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> StepRule:
    """Adam on the metagradient (bias-corrected), ``z <- z - lr * m_hat / (sqrt(v_hat) + eps)``."""
    lr_at = _lr_fn(lr)
    for name, b in (("b1", b1), ("b2", b2)):
        if not 0 <= b < 1:
            raise ValueError(f"{name} must be in [0, 1), got {b!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")

    def init(z):
        zeros = _tree.tree_map(lambda zz: np.zeros(np.shape(zz), np.float64), z)
        return {"count": np.int64(0), "m": zeros, "v": _tree.tree_map(np.copy, zeros)}

    def update(g, state, z):
        i = int(state["count"])
        eta = lr_at(i)
        m = _tree.tree_map(lambda mm, gg: b1 * mm + (1 - b1) * gg, state["m"], g)
        v = _tree.tree_map(lambda vv, gg: b2 * vv + (1 - b2) * np.square(gg.astype(np.float64)), state["v"], g)
        c1, c2 = 1 - b1 ** (i + 1), 1 - b2 ** (i + 1)
        z_new = _tree.tree_map(
            lambda zz, mm, vv: (zz - eta * (mm / c1) / (np.sqrt(vv / c2) + eps)).astype(zz.dtype), z, m, v)
        return z_new, {"count": np.int64(i + 1), "m": m, "v": v}

    return StepRule(init, update)


# --------------------------------------------------------------------------- #
# projections
# --------------------------------------------------------------------------- #

def box(lo: float, hi: float) -> Callable[[PyTree], PyTree]:
    """Clip every entry of every leaf to ``[lo, hi]``."""
    if not lo <= hi:
        raise ValueError(f"box needs lo <= hi, got lo={lo!r}, hi={hi!r}")
    return lambda z: _tree.tree_map(lambda x: np.clip(x, lo, hi).astype(x.dtype), z)


def pixel_range(lo: float = 0.0, hi: float = 1.0) -> Callable[[PyTree], PyTree]:
    """Keep image pixels in their valid range ``[lo, hi]`` (a :func:`box`, named for images)."""
    return box(lo, hi)


def _project_simplex(x: np.ndarray, total: float) -> np.ndarray:
    """Euclidean projection of a vector onto ``{y >= 0, sum y = total}`` (sort-based, O(n log n))."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - total
    ind = np.arange(1, x.size + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    tau = css[rho] / (rho + 1.0)
    return np.maximum(x - tau, 0.0)


def simplex(total: float = 1.0) -> Callable[[PyTree], PyTree]:
    """Euclidean projection of each leaf (flattened) onto ``{z >= 0, sum z = total}``."""
    if not total > 0:
        raise ValueError(f"simplex total must be > 0, got {total!r}")

    def project(z):
        return _tree.tree_map(
            lambda x: _project_simplex(np.ravel(x).astype(np.float64), total).reshape(np.shape(x)).astype(x.dtype), z)

    return project


def _project_capped_simplex(x: np.ndarray, k: float, iters: int = 100) -> np.ndarray:
    """Euclidean projection onto ``{0 <= y <= 1, sum y = k}``: ``clip(x - tau, 0, 1)`` with tau by bisection."""
    lo, hi = float(np.min(x)) - 1.0, float(np.max(x))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if np.clip(x - mid, 0.0, 1.0).sum() > k:
            lo = mid
        else:
            hi = mid
    return np.clip(x - 0.5 * (lo + hi), 0.0, 1.0)


def top_k(k: int, *, soft: bool = False) -> Callable[[PyTree], PyTree]:
    """Keep ``k`` entries per leaf.

    ``soft=False``: the ``k`` largest entries become 1, the rest 0 (ties broken
    by position; a non-convex projection: MGD then moves the *selection*, as in
    the paper's data selection). ``soft=True``: the Euclidean projection onto
    the capped simplex ``{0 <= z <= 1, sum z = k}`` (``clip(z - tau, 0, 1)``
    with ``tau`` found by bisection), a convex relaxation whose points are
    fractional selections of total mass ``k``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"top_k k must be an int >= 0, got {k!r}")

    def project(z):
        def leaf(x):
            flat = np.ravel(x)
            if k > flat.size:
                raise ValueError(f"top_k k={k} is larger than a leaf of size {flat.size}")
            if soft:
                out = _project_capped_simplex(flat.astype(np.float64), float(k))
            else:
                out = np.zeros(flat.size)
                if k:
                    out[np.argsort(-flat, kind="stable")[:k]] = 1.0
            return out.reshape(np.shape(x)).astype(x.dtype)

        return _tree.tree_map(leaf, z)

    return project


def leafwise(projections: PyTree) -> Callable[[PyTree], PyTree]:
    """Apply a different projection to each leaf: ``projections`` has ``z``'s structure
    with a projection (or ``None`` for no projection) in place of each leaf."""

    def project(z):
        return _tree.tree_map(lambda p, x: x if p is None else p(x), projections, z,
                              is_leaf=lambda p: p is None or callable(p))

    return project


# --------------------------------------------------------------------------- #
# history
# --------------------------------------------------------------------------- #

def _global_norm(tree) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in _tree.tree_leaves(tree))))


def _to_numpy(tree, like=None):
    if like is None:
        return _tree.tree_map(lambda x: np.array(x, copy=True), tree)
    return _tree.tree_map(lambda x, l: np.array(x, dtype=l.dtype, copy=True).reshape(l.shape), tree, like)


@dataclass
class History:
    """What :func:`run` did, and everything needed to resume it.

    Attributes:
      direction: ``"minimize"`` or ``"maximize"``.
      z: the current metaparameter (after the last update and projection).
      rule_state: the step rule's state.
      values: ``values[i]`` is ``phi`` at the ``i``-th iterate ``z_i`` (before update ``i``).
      grad_norms: the 2-norm of the metagradient at ``z_i``.
      times: seconds spent in step ``i`` (metagradient + update).
      snapshots: ``{i: z_i}`` for the chosen steps; ``z_i`` is the iterate at
        which ``values[i]`` was measured (the final iterate is ``z``).
      best_value, best_step, best_z: the best iterate seen (lowest ``phi`` if
        minimizing, highest if maximizing).
      records: per-step dicts returned by the ``callback`` of :func:`run`.
    """

    direction: str
    z: PyTree
    rule_state: PyTree
    values: list = field(default_factory=list)
    grad_norms: list = field(default_factory=list)
    times: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)
    best_value: float | None = None
    best_step: int | None = None
    best_z: PyTree = None
    records: list = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.values)

    def summary(self) -> dict:
        """JSON-friendly summary (no arrays)."""
        return {"direction": self.direction, "steps_done": self.steps_done, "values": [float(v) for v in self.values],
                "grad_norms": [float(v) for v in self.grad_norms], "times": [float(v) for v in self.times],
                "best_value": self.best_value, "best_step": self.best_step,
                "snapshot_steps": sorted(int(i) for i in self.snapshots), "records": self.records}

    def save(self, path: str) -> None:
        """Write the history to ``path`` (``.npz``; arrays as leaves, the rest as JSON).

        Written to a temporary file and renamed, so a crash never leaves a
        half-written history.
        """
        arrays = {}
        for name, tree in (("z", self.z), ("rule_state", self.rule_state), ("best_z", self.best_z)):
            if tree is None:
                continue
            for j, leaf in enumerate(_tree.tree_leaves(tree)):
                arrays[f"{name}/{j}"] = np.asarray(leaf)
        for i, snap in self.snapshots.items():
            for j, leaf in enumerate(_tree.tree_leaves(snap)):
                arrays[f"snap{int(i)}/{j}"] = np.asarray(leaf)
        meta = self.summary()
        meta["has_best_z"] = self.best_z is not None
        meta["format"] = "metagrad.mgd.History/1"
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, z_template: PyTree, step_rule: StepRule) -> "History":
        """Load a history saved by :meth:`save`; ``z_template`` (e.g. ``z0``) and the
        same ``step_rule`` give the pytree structures back."""
        with np.load(path) as f:
            files = {k: f[k] for k in f.files}
        meta = json.loads(bytes(files["meta"]).decode())
        if meta.get("format") != "metagrad.mgd.History/1":
            raise ValueError(f"{path!r} is not a saved metagrad.mgd.History")
        z_template = _to_numpy(z_template)

        def tree(name, template):
            treedef = _tree.tree_structure(template)
            leaves = [files[f"{name}/{j}"] for j in range(treedef.num_leaves)]
            return _tree.tree_unflatten(treedef, leaves)

        state_template = step_rule.init(z_template)
        return cls(
            direction=meta["direction"], z=tree("z", z_template), rule_state=tree("rule_state", state_template),
            values=list(meta["values"]), grad_norms=list(meta["grad_norms"]), times=list(meta["times"]),
            snapshots={int(i): tree(f"snap{int(i)}", z_template) for i in meta["snapshot_steps"]},
            best_value=meta["best_value"], best_step=meta["best_step"],
            best_z=tree("best_z", z_template) if meta["has_best_z"] else None, records=list(meta["records"]))


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #

class _Progress:
    def __init__(self, total: int, enabled: bool, label: str):
        self.total, self.enabled, self.label = total, enabled, label
        self.tty = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def update(self, i: int, value: float, best: float, gnorm: float, done: int):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = elapsed / max(done, 1)
        eta = rate * (self.total - i)
        width = 20
        fill = int(width * i / max(self.total, 1))
        line = (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {i}/{self.total} phi={value:.5g} "
                f"best={best:.5g} |g|={gnorm:.3g} {rate:.2f}s/step eta {eta:.0f}s")
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K")
            if i == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def run(metagradient_fn: Callable[[PyTree], tuple[Any, PyTree]], z0: PyTree, *, steps: int, direction: str,
        step_rule: StepRule, projection: Callable[[PyTree], PyTree] | None = None,
        snapshot_every: int | None = None, history: History | None = None,
        callback: Callable[[int, PyTree, float, PyTree], dict | None] | None = None,
        checkpoint_path: str | None = None, progress: bool = True, label: str = "mgd") -> History:
    """Metagradient descent for ``steps`` steps in total.

    Each step ``i``: ``value, g = metagradient_fn(z_i)``; record; ``z_{i+1} =
    projection(step_rule.update(+-g, state, z_i))``.

    Args:
      metagradient_fn: ``z -> (phi(A(z)), d phi / dz)``.
      z0: the starting metaparameter (projected before the first step).
      steps: total number of MGD steps, counting those already in ``history``.
      direction: ``"minimize"`` or ``"maximize"`` -- required, never implied.
      step_rule: e.g. :func:`sign_step`, :func:`gradient_step`, :func:`adam`.
      projection: ``z -> z`` onto the allowed set, or ``None``.
      snapshot_every: keep ``z_i`` every this many steps (the final iterate is ``history.z``).
      history: a :class:`History` to resume (from :meth:`History.load`);
        ``z0`` then only gives dtypes/shapes.
      callback: ``callback(i, z_i, value, grad) -> dict or None``; dicts are
        stored in ``history.records`` (e.g. a test accuracy of ``z_i``).
      checkpoint_path: if given, the history is saved there after every step.
      progress: print a one-line progress bar to stderr.
    Returns:
      The :class:`History`; ``history.z`` is the final iterate and
      ``history.best_z`` the best one seen.
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(step_rule, StepRule):
        raise TypeError(f"step_rule must be a metagrad.mgd.StepRule (sign_step, gradient_step, adam), "
                        f"got {type(step_rule).__name__}")
    if snapshot_every is not None and (not isinstance(snapshot_every, (int, np.integer)) or snapshot_every < 1):
        raise ValueError(f"snapshot_every must be None or an int >= 1, got {snapshot_every!r}")
    template = _to_numpy(z0)
    project = projection if projection is not None else (lambda z: z)
    if history is None:
        z = _to_numpy(project(template), template)
        history = History(direction=direction, z=z, rule_state=step_rule.init(z))
    else:
        if history.direction != direction:
            raise ValueError(f"direction={direction!r} differs from the resumed history's {history.direction!r}")
        if _tree.tree_structure(history.z) != _tree.tree_structure(template):
            raise ValueError("the resumed history's z does not have z0's structure")
    sign = 1.0 if direction == "minimize" else -1.0
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    bar = _Progress(steps, progress, label)
    start = history.steps_done
    for i in range(start, steps):
        t0 = time.perf_counter()
        z = history.z
        value, grad = metagradient_fn(z)
        value = float(value)
        grad = _to_numpy(grad, z)
        gnorm = _global_norm(grad)
        if not (math.isfinite(value) and math.isfinite(gnorm)):
            raise FloatingPointError(f"MGD step {i}: phi={value}, |metagradient|={gnorm}; "
                                     "training is unstable at this z (smaller steps, or a smoother setup)")
        if snapshot_every is not None and i % snapshot_every == 0:
            history.snapshots[i] = _to_numpy(z)
        if history.best_value is None or better(value, history.best_value):
            history.best_value, history.best_step, history.best_z = value, i, _to_numpy(z)
        if callback is not None:
            rec = callback(i, z, value, grad)
            if rec is not None:
                history.records.append({"step": i, **rec})
        descent = _tree.tree_map(lambda g: sign * g, grad)
        z_new, history.rule_state = step_rule.update(descent, history.rule_state, z)
        history.z = _to_numpy(project(z_new), z)
        history.values.append(value)
        history.grad_norms.append(gnorm)
        history.times.append(time.perf_counter() - t0)
        if checkpoint_path is not None:
            history.save(checkpoint_path)
        bar.update(i + 1, value, history.best_value, gnorm, i + 1 - start)
    return history
