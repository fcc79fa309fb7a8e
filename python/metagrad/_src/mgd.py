"""Metagradient descent (MGD): optimize a metaparameter ``z`` with metagradients.

A small functional API built on Optax::

    from metagrad import mgd
    hist = mgd.run(metagradient_fn, z0, steps=50, direction="minimize",
                   step_rule=mgd.sign_step(0.05), projection=mgd.box(0.0, 1.0))
    z_best = hist.best_z

* ``metagradient_fn(z) -> (value, grad)`` is any function returning
  ``phi(A(z))`` and its gradient with ``z``'s pytree structure
  (``CompiledTask.metagradient``, :func:`metagrad.baselines.scan_metagradient`,
  ...).
* The *step rule* is any ``optax.GradientTransformation`` acting on ``z``:
  :func:`sign_step` (the paper's signed step), ``optax.adam(lr)``,
  ``optax.sgd(lr)``, chains with ``optax`` schedules... :func:`run` hands it
  ``+grad`` to minimize and ``-grad`` to maximize, so a rule never needs to know
  the direction.
* A *projection* is a pure function ``z -> z`` applied after every update:
  :func:`box`, :func:`pixel_range`, :func:`simplex`, :func:`top_k`. They act
  on every leaf of ``z``; for pytrees that need different sets per leaf, write
  a function that projects each leaf (see :func:`leafwise`). A projection must
  return every leaf in its shape.
* :class:`History` records ``phi`` and the metagradient norm at every step and
  ``z`` snapshots, can be saved to ``.npz`` (with the step rule's Optax state)
  and loaded back, and ``run`` resumes from a loaded history exactly (same
  iterates as an uninterrupted run).

Internally ``z`` is held as numpy arrays; the metagradient function receives
numpy arrays of the dtypes and shapes of ``z0``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import numpy as np
import optax
from tqdm import tqdm

__all__ = ["sign_step", "box", "pixel_range", "simplex", "top_k", "leafwise", "History", "run"]

PyTree = Any
_tree = jax.tree_util


# --------------------------------------------------------------------------- #
# the paper's step rule (every other rule is Optax's)
# --------------------------------------------------------------------------- #

def sign_step(lr) -> optax.GradientTransformation:
    """``z <- z - lr * sign(g)``: the step of the paper's MGD (robust to the metagradient's scale).

    ``lr``: a number > 0, or an Optax schedule ``count -> lr`` (e.g.
    ``optax.cosine_decay_schedule``) of the MGD step.
    """
    if not callable(lr):
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating, np.integer)):
            raise TypeError(f"sign_step lr must be a number or a schedule count -> lr, got {lr!r}")
        if not lr > 0:
            raise ValueError(f"sign_step lr must be > 0, got {lr!r}")
    return optax.sign_sgd(lr)


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


def _copy(tree):
    return _tree.tree_map(lambda x: np.array(x, copy=True), tree)


def _conform(tree, like, what: str, reference: str = "z"):
    """``tree`` as numpy arrays with ``like``'s dtypes.

    A structure or leaf shape that differs from ``like``'s is an error: reshaping
    a transposed leaf would keep its size and silently scramble ``z``.
    """
    treedef, like_def = _tree.tree_structure(tree), _tree.tree_structure(like)
    if treedef != like_def:
        raise ValueError(f"{what} has structure {treedef}, but {reference} has {like_def}")
    out = []
    for (path, x), ref in zip(_tree.tree_flatten_with_path(tree)[0], _tree.tree_leaves(like)):
        if np.shape(x) != np.shape(ref):
            key = _tree.keystr(path)
            raise ValueError(f"{what}{key} has shape {np.shape(x)}, but {reference}{key} has shape {np.shape(ref)}")
        out.append(np.array(x, dtype=np.asarray(ref).dtype, copy=True))
    return _tree.tree_unflatten(like_def, out)


@dataclass
class History:
    """What :func:`run` did, and everything needed to resume it.

    Attributes:
      direction: ``"minimize"`` or ``"maximize"``.
      z: the current metaparameter (after the last update and projection).
      rule_state: the step rule's (Optax) state.
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
        meta["format"] = "metagrad.mgd.History/2"
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, z_template: PyTree, step_rule: optax.GradientTransformation) -> "History":
        """Load a history saved by :meth:`save`.

        ``z_template`` (e.g. ``z0``) and the same ``step_rule`` give the pytree
        structures back; a saved ``z`` or rule state of other shapes (another
        run's file, another rule) is a ``ValueError``.
        """
        try:
            with np.load(path) as f:
                files = {k: f[k] for k in f.files}
            meta = json.loads(bytes(files["meta"]).decode()) if "meta" in files else None
        except FileNotFoundError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
            raise ValueError(f"{path!r} cannot be read as a saved metagrad.mgd.History ({type(error).__name__}: "
                             f"{error}): it is damaged or another kind of file; delete it to start the run "
                             f"over") from error
        if meta is None:
            raise ValueError(f"{path!r} is not a saved metagrad.mgd.History")
        if meta.get("format") != "metagrad.mgd.History/2":
            raise ValueError(f"{path!r} is not a saved metagrad.mgd.History of format 2 (found "
                             f"{meta.get('format')!r})")
        z_template = _copy(z_template)

        def tree(name, template, what, reference):
            treedef = _tree.tree_structure(template)
            n_saved = sum(1 for k in files if k.startswith(name + "/"))
            if n_saved != treedef.num_leaves:
                raise ValueError(f"{what} in {path!r} has {n_saved} leaves, but {reference} has {treedef.num_leaves}")
            return _conform(_tree.tree_unflatten(treedef, [files[f"{name}/{j}"] for j in range(n_saved)]),
                            template, what, reference)

        state_template = _tree.tree_map(np.asarray, step_rule.init(z_template))
        z_of = lambda name, what: tree(name, z_template, what, "z0")  # noqa: E731
        return cls(
            direction=meta["direction"], z=z_of("z", "the saved z"),
            rule_state=tree("rule_state", state_template, "the saved step-rule state",
                            "this step rule's state"),
            values=list(meta["values"]), grad_norms=list(meta["grad_norms"]), times=list(meta["times"]),
            snapshots={int(i): z_of(f"snap{int(i)}", f"the saved snapshot {i}") for i in meta["snapshot_steps"]},
            best_value=meta["best_value"], best_step=meta["best_step"],
            best_z=z_of("best_z", "the saved best z") if meta["has_best_z"] else None, records=list(meta["records"]))


# --------------------------------------------------------------------------- #
# the loop
# --------------------------------------------------------------------------- #

def run(metagradient_fn: Callable[[PyTree], tuple[Any, PyTree]], z0: PyTree, *, steps: int, direction: str,
        step_rule: optax.GradientTransformation, projection: Callable[[PyTree], PyTree] | None = None,
        snapshot_every: int | None = None, history: History | None = None,
        callback: Callable[[int, PyTree, float, PyTree], dict | None] | None = None,
        checkpoint_path: str | None = None, progress: bool = True, label: str = "mgd") -> History:
    """Metagradient descent for ``steps`` steps in total.

    Each step ``i``: ``value, g = metagradient_fn(z_i)``; record; ``u, state =
    step_rule.update(+-g, state, z_i)``; ``z_{i+1} = projection(z_i + u)``.

    Args:
      metagradient_fn: ``z -> (phi(A(z)), d phi / dz)``.
      z0: the starting metaparameter (projected before the first step).
      steps: total number of MGD steps, counting those already in ``history``.
      direction: ``"minimize"`` or ``"maximize"`` -- required, never implied.
      step_rule: an ``optax.GradientTransformation``, e.g. :func:`sign_step`,
        ``optax.adam(lr)``, ``optax.sgd(lr)``.
      projection: ``z -> z`` onto the allowed set, or ``None``.
      snapshot_every: keep ``z_i`` every this many steps (the final iterate is ``history.z``).
      history: a :class:`History` to resume (from :meth:`History.load`);
        ``z0`` then only gives dtypes/shapes.
      callback: ``callback(i, z_i, value, grad) -> dict or None``; dicts are
        stored in ``history.records`` (e.g. a test accuracy of ``z_i``).
      checkpoint_path: if given, the history is saved there after every step.
      progress: a tqdm bar on stderr (shown only when stderr is a terminal).
      label: the bar's description.
    Returns:
      The :class:`History`; ``history.z`` is the final iterate and
      ``history.best_z`` the best one seen.
    """
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', got {direction!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not isinstance(step_rule, optax.GradientTransformation):
        raise TypeError(f"step_rule must be an optax.GradientTransformation (e.g. mgd.sign_step(lr), "
                        f"optax.adam(lr)), got {type(step_rule).__name__}")
    if snapshot_every is not None and (not isinstance(snapshot_every, (int, np.integer)) or snapshot_every < 1):
        raise ValueError(f"snapshot_every must be None or an int >= 1, got {snapshot_every!r}")
    template = _copy(z0)
    project = projection if projection is not None else (lambda z: z)
    if history is None:
        z = _conform(project(template), template, "the projection returned z")
        history = History(direction=direction, z=z, rule_state=step_rule.init(z))
    else:
        if history.direction != direction:
            raise ValueError(f"direction={direction!r} differs from the resumed history's {history.direction!r}")
        history.z = _conform(history.z, template, "the resumed history's z", "z0")
    sign = 1.0 if direction == "minimize" else -1.0
    better = (lambda a, b: a < b) if direction == "minimize" else (lambda a, b: a > b)
    start = history.steps_done
    # disable=None: tqdm draws only when stderr is a terminal (logs and pipes stay clean)
    bar = tqdm(total=steps, initial=min(start, steps), desc=label, unit="step", file=sys.stderr,
               disable=None if progress else True, dynamic_ncols=True)
    try:
        for i in range(start, steps):
            t0 = time.perf_counter()
            z = history.z
            value, grad = metagradient_fn(z)
            value = float(value)
            grad = _conform(grad, z, "metagradient_fn returned a gradient")
            gnorm = _global_norm(grad)
            if not (math.isfinite(value) and math.isfinite(gnorm)):
                raise FloatingPointError(f"MGD step {i}: phi={value}, |metagradient|={gnorm}; "
                                         "training is unstable at this z (smaller steps, or a smoother setup)")
            if snapshot_every is not None and i % snapshot_every == 0:
                history.snapshots[i] = _copy(z)
            if history.best_value is None or better(value, history.best_value):
                history.best_value, history.best_step, history.best_z = value, i, _copy(z)
            if callback is not None:
                rec = callback(i, z, value, grad)
                if rec is not None:
                    history.records.append({"step": i, **rec})
            descent = _tree.tree_map(lambda g: sign * g, grad)
            updates, history.rule_state = step_rule.update(descent, history.rule_state, z)
            z_new = _conform(optax.apply_updates(z, updates), z, "the step rule's update of z")
            history.z = _conform(project(z_new), z, "the projection returned z")
            history.values.append(value)
            history.grad_norms.append(gnorm)
            history.times.append(time.perf_counter() - t0)
            if checkpoint_path is not None:
                history.save(checkpoint_path)
            bar.set_postfix({"phi": f"{value:.5g}", "best": f"{history.best_value:.5g}", "|g|": f"{gnorm:.3g}"},
                            refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return history
