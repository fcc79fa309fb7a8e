"""Data selection and attribution on a user's own task: applications whose metaparameter is one weight
per training example.

A :class:`WeightedTask` is the user's training run as a function of the training seed (initialization and
batch order): ``make(seed)`` returns a :class:`metagrad.Task` whose ``z`` is a float32 weight per training
example, ``(n,)``. Every method is evaluated by training for real, on seeds it never looked at:

* :func:`select`: metagradient descent on the weights (signed steps, projected onto fractional selections
  of the kept budget, cycling over the fit seeds) against loss ranking, the first metagradient, a random
  subset and all data, each keeping the same number of examples and trained on the unseen seeds;
* :func:`attribute`: the metagradients of the task's m outputs with respect to the weights at ``z = 1`` (one
  batched call per seed): the linear prediction of what removing training examples does to each output;
* :func:`lds`: the linear datamodeling score of any such scores: the Spearman correlation, per output,
  between the predicted and the actual changes over random subsets removed and retrained on given seeds.

Tasks that ``make`` builds from the same ``init``/``step``/``output`` functions, differing only in their
data (a key and a batch table per seed), share one compilation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from metagrad import Task, baselines, mgd
from metagrad._src import streams
from metagrad.applications.common import (Metagradient, Timer, bar, compare, plot_comparison, plt, resolve_engine,
                                          spearman, spread, summary, write_result)

PyTree = Any
MGD = "MGD"


@dataclass(frozen=True)
class WeightedTask:
    """A training run with one weight per training example, as a function of the training seed.

    Attributes:
      make: ``seed -> Task`` whose ``z`` is float32 ``(n,)``: the weight of each training example's loss. Its
        ``output`` is what :func:`select` minimizes (a validation loss) or what :func:`attribute` attributes
        (a vector of m test losses).
      n: the number of training examples.
      evaluate: ``(final state, seed) -> {metric: value}`` on held-out data, for :func:`select`'s comparison.
      per_example_loss: ``(final state, seed) -> (n,)`` each training example's loss, for the loss-ranking
        baseline of :func:`select` (optional: without it that baseline is left out).
    """

    make: Callable[[int], Task]
    n: int
    evaluate: Callable[[PyTree, int], Mapping[str, float]] | None = None
    per_example_loss: Callable[[PyTree, int], Any] | None = None

    def __post_init__(self):
        if not callable(self.make):
            raise TypeError(f"WeightedTask.make must be a function seed -> metagrad.Task, got {self.make!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, (int, np.integer)) or self.n < 2:
            raise ValueError(f"WeightedTask.n must be the number of training examples (an int >= 2), got {self.n!r}")


class Runs:
    """A task per training seed, each compiled once (for metaparameters like ``z_example``) and trained
    for real with a given ``z``: by the runtime, or by JAX (``engine="jax"``)."""

    def __init__(self, make: Callable[[int], Task], z_example: PyTree, engine: str = "metagrad"):
        self.make, self.engine = make, engine
        self.z_example = _float32(z_example)
        self._compiled: dict = {}
        self._tasks: dict = {}

    def task(self, seed: int) -> Task:
        if seed not in self._tasks:
            task = self.make(seed)
            if not isinstance(task, Task):
                raise TypeError(f"make({seed}) returned a {type(task).__name__}, not a metagrad.Task")
            self._tasks[seed] = task
        return self._tasks[seed]

    def compiled(self, seed: int):
        if seed not in self._compiled:
            self._compiled[seed] = self.task(seed).compile(self.z_example)
        return self._compiled[seed]

    def train(self, seed: int, z) -> PyTree:
        z = _float32(z)
        if self.engine == "jax":
            return baselines.train(self.task(seed), z)
        return self.compiled(seed).train(z, progress=False)

    def outputs(self, seed: int, z) -> np.ndarray:
        """The task's output after training with ``z``, as a vector."""
        task = self.task(seed)
        found = streams.find(task.data)
        data = task.data if found is None else streams.unreadable(task.data, found[0])
        value = _jitted_output(task.output)(self.train(seed, z), _float32(z), data)
        return np.atleast_1d(np.asarray(value, np.float64))


def _float32(tree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)


def _runs(weighted: WeightedTask, engine: str = "metagrad") -> Runs:
    return Runs(weighted.make, np.ones(weighted.n, np.float32), engine)


_OUTPUTS: dict = {}


def _jitted_output(output: Callable) -> Callable:
    if output not in _OUTPUTS:
        _OUTPUTS[output] = jax.jit(output)
    return _OUTPUTS[output]


def check_seeds(seeds, what: str) -> list[int]:
    values = [int(s) for s in seeds]
    if not values or any(isinstance(s, bool) for s in seeds):
        raise ValueError(f"{what} must be a non-empty sequence of integer seeds, got {seeds!r}")
    return values


def seed_split(fit_seeds, eval_seeds, who: str) -> tuple[list[int], list[int]]:
    """``(fit, unseen)`` seeds, checked: no evaluation seed among the fit seeds ``who`` looked at."""
    fit, unseen = check_seeds(fit_seeds, "fit_seeds"), check_seeds(eval_seeds, "eval_seeds")
    if set(fit) & set(unseen):
        raise ValueError(f"eval_seeds must be seeds {who} never saw; {sorted(set(fit) & set(unseen))} are fit seeds")
    return fit, unseen


def keep_top(scores, k: int) -> np.ndarray:
    """0/1 weights keeping the ``k`` highest ``scores`` (ties broken by position)."""
    z = np.zeros(len(scores), np.float32)
    z[np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]] = 1.0
    return z


@dataclass
class Selection:
    """What :func:`select` found: MGD's final weights, every method's scores (higher: keep) and
    selections (0/1), and their comparison on the unseen seeds (``comparison``, see
    :func:`metagrad.applications.common.compare`)."""

    weights: np.ndarray
    scores: dict[str, np.ndarray]
    selections: dict[str, np.ndarray]
    comparison: dict
    history: mgd.History
    engine: str  # what computed the metagradients and trained: "metagrad" (the runtime) or "jax"
    seconds: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The comparison as a person reads it: each method's primary metric, mean +- standard error."""
        return summary(self.comparison)

    def to_json(self) -> dict:
        return {"comparison": self.comparison, "summary": self.summary(), "history": self.history.summary(),
                "weights": self.weights, "selections": self.selections, "seconds": self.seconds}

    def save(self, out: str) -> None:
        """``out/result.json`` and ``out/selection.png``."""
        write_result(out, self.to_json())
        pyplot = plt()
        fig, ax = pyplot.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 1.4]})
        ax[0].plot(self.history.values, marker=".")
        ax[0].set(xlabel="MGD step", ylabel="the task's output (fit seeds)", title="MGD on the weights")
        plot_comparison(ax[1], self.comparison, title="same kept fraction, unseen seeds")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "selection.png"), dpi=110)
        pyplot.close(fig)


def select(weighted: WeightedTask, *, keep: float, fit_seeds: Sequence[int], eval_seeds: Sequence[int],
           primary: str, higher_is_better: bool = True, steps: int = 40, lr: float = 0.05,
           scores: Mapping[str, Any] | None = None, references: Mapping[str, Any] | None = None,
           callback: Callable | None = None, progress: bool = True, seed: int = 0, engine: str = "auto"
           ) -> Selection:
    """Choose ``keep * n`` training examples by metagradient descent, and compare with the cheap filters.

    MGD minimizes the task's output (a validation loss) over weights in ``[0, 1]`` summing to the kept
    budget, from the uniform weights, with signed steps of ``lr``, one metagradient per step on the
    ``fit_seeds`` in turn. Then every method keeps its ``keep * n`` highest-scored examples (weights 0/1)
    and is trained on each of ``eval_seeds``, which no method saw; ``weighted.evaluate`` scores the result.

    Methods: ``MGD`` (its final weights); ``loss ranking`` (drop the examples of highest training loss
    after one ordinary run; needs ``weighted.per_example_loss``); ``first metagradient`` (drop those whose
    weight hurts the output most at the uniform weights); the user's ``scores`` (name -> ``(n,)``,
    higher: keep); ``random``; and as references, not competitors, ``all data`` and the user's
    ``references`` (name -> ``(n,)`` 0/1 weights, e.g. an oracle).

    ``primary``: the metric of ``weighted.evaluate`` that decides (``higher_is_better`` says which way).
    ``callback(i, z, value, grad)``: as :func:`metagrad.mgd.run`'s. ``engine``: ``"auto"`` or
    ``"metagrad"`` (the runtime) or ``"jax"`` (JAX's autodiff through ``lax.scan``, and JAX's training).
    """
    if weighted.evaluate is None:
        raise TypeError("select needs WeightedTask.evaluate: (final state, seed) -> {metric: value} on held-out "
                        "data, to compare the selections")
    if not 0 < keep < 1:
        raise ValueError(f"keep must be the fraction of examples kept, in (0, 1), got {keep!r}")
    fit, unseen = seed_split(fit_seeds, eval_seeds, "MGD")
    n = weighted.n
    k = int(round(keep * n))
    runs, clock = _runs(weighted, resolve_engine(engine)), Timer()
    z0 = np.full(n, k / n, np.float32)
    meta = Metagradient([runs.task(s) for s in fit], z0, engine=engine)
    first = {}

    def record(i, z, value, grad):
        if i == 0:
            first["grad"] = np.asarray(grad, np.float64)
        return callback(i, z, value, grad) if callback is not None else None

    history = mgd.run(meta, z0, steps=steps, direction="minimize", step_rule=mgd.sign_step(lr),
                      projection=mgd.top_k(k, soft=True), callback=record, progress=progress, label="select: mgd")
    mgd_seconds = clock()
    all_scores = {MGD: np.asarray(history.z, np.float64)}
    if weighted.per_example_loss is not None:
        losses = np.asarray(weighted.per_example_loss(runs.train(fit[0], np.ones(n)), fit[0]), np.float64)
        if losses.shape != (n,):
            raise ValueError(f"WeightedTask.per_example_loss returned shape {losses.shape}, not ({n},)")
        all_scores["loss ranking"] = -losses
    all_scores["first metagradient"] = -first["grad"]
    for name, values in (scores or {}).items():
        all_scores[name] = _vector(values, n, f"scores[{name!r}]")
    all_scores["random"] = np.random.default_rng([seed, 1]).random(n)
    selections = {name: keep_top(s, k) for name, s in all_scores.items()}
    selections["all data"] = np.ones(n, np.float32)
    for name, values in (references or {}).items():
        selections[name] = _vector(values, n, f"references[{name!r}]").astype(np.float32)
    metrics: dict = {name: {} for name in selections}
    for s in bar(unseen, desc="select: unseen seeds", enabled=progress):
        for name, z in selections.items():
            for metric, value in dict(weighted.evaluate(runs.train(s, z), s)).items():
                metrics[name].setdefault(metric, []).append(float(value))
    if primary not in metrics[MGD]:
        raise ValueError(f"primary={primary!r} is not a metric of WeightedTask.evaluate (it returns "
                         f"{sorted(metrics[MGD])})")
    methods = {name: {metric: spread(values) for metric, values in m.items()} for name, m in metrics.items()}
    references_ = ("all data", *(references or {}))
    comparison = compare(methods, primary=primary, higher_is_better=higher_is_better, mgd=MGD,
                         references=references_, unit=f"{len(unseen)} unseen training seeds",
                         target=f"MGD's {primary} beats every baseline's at the same kept fraction")
    comparison["target_met"] = comparison.get("mgd_beats_strongest")
    return Selection(np.asarray(history.z), all_scores, selections, comparison, history, meta.engine,
                     {"mgd": mgd_seconds, "evaluation": clock() - mgd_seconds, "metagradients": meta.seconds})


def _vector(values, n: int, what: str) -> np.ndarray:
    v = np.asarray(values, np.float64)
    if v.shape != (n,):
        raise ValueError(f"{what} must have one value per training example, shape ({n},), got {v.shape}")
    return v


def train(weighted: WeightedTask, seed: int, z=None) -> PyTree:
    """The final training state of seed ``seed`` with weights ``z`` (default: all 1), trained by the runtime."""
    return _runs(weighted).train(seed, np.ones(weighted.n) if z is None else z)


def gradient_scores(per_example_loss: Callable, params: PyTree, train_rows: tuple, test_rows: tuple, *,
                    damping: float = 1e-2) -> dict[str, np.ndarray]:
    """The cheap attribution baselines from one trained model, as ``(m, n)`` scores in :func:`attribute`'s
    convention: ``grad dot`` (``-grad loss_j . grad loss_i``) and ``influence`` (the same through the damped
    inverse Hessian of the mean training loss, by conjugate gradients). ``per_example_loss(params, x, y)``
    returns each example's loss; ``train_rows`` and ``test_rows`` are ``(x, y)``. TracIn and TRAK need the
    training trajectory or the model's margin: see ``metagrad.applications.attributors``."""
    from metagrad.applications import attributors

    g_test = attributors.per_example_grads(per_example_loss, params, *test_rows)
    g_train = attributors.per_example_grads(per_example_loss, params, *train_rows)
    objective = _mean_of(per_example_loss)
    return {"grad dot": attributors.grad_dot(g_test, g_train),
            "influence": attributors.influence(objective, params, g_test, g_train, damping=damping,
                                               args=tuple(train_rows))}


_MEANS: dict = {}


def _mean_of(per_example_loss: Callable) -> Callable:
    """The mean training loss of ``per_example_loss``: one object per function (the solver compiles once)."""
    if per_example_loss not in _MEANS:
        _MEANS[per_example_loss] = lambda params, x, y: per_example_loss(params, x, y).mean()
    return _MEANS[per_example_loss]


def attribute(weighted: WeightedTask, seeds: Sequence[int] = (0,)) -> np.ndarray:
    """``(m, n)``: the metagradient of each of the task's m outputs (a scalar output: m = 1) with respect to
    each training example's weight at ``z = 1``, averaged over ``seeds``. Row j, times the change of the
    weights, predicts the change of output j: removing the examples ``S`` changes it by about
    ``-scores[j, S].sum()``."""
    runs = _runs(weighted)
    rows = []
    for s in check_seeds(seeds, "seeds"):
        _, grad = runs.compiled(s).metagradient(runs.z_example)
        grad = np.asarray(grad, np.float64)
        rows.append(grad.reshape(-1, weighted.n))
    return np.mean(rows, axis=0)


@dataclass
class Attribution:
    """What :func:`lds` measured: per method, the LDS over the m outputs (``methods[name]["LDS"]``, a
    :func:`~metagrad.applications.common.spread`), and the subsets' actual output changes ``actual``
    ``(subsets, m)``."""

    comparison: dict
    actual: np.ndarray
    removed: np.ndarray  # (subsets, n): 1 where an example was removed

    def summary(self) -> dict:
        return summary(self.comparison)

    def to_json(self) -> dict:
        return {"comparison": self.comparison, "summary": self.summary(), "actual": self.actual,
                "removed": self.removed}


def linear_datamodeling_score(scores, weights, actual) -> np.ndarray:
    """``(m,)``: per output j, the Spearman correlation over subsets between the predicted changes
    ``(weights - 1) @ scores[j]`` and the ``actual`` changes ``(subsets, m)``."""
    predicted = (np.asarray(weights, np.float64) - 1.0) @ np.asarray(scores, np.float64).T
    return np.array([spearman(predicted[:, j], actual[:, j]) for j in range(actual.shape[1])])


def lds(weighted: WeightedTask, scores: Mapping[str, Any], *, seeds: Sequence[int], subsets: int = 50,
        fraction: float = 0.05, seed: int = 0, progress: bool = True) -> Attribution:
    """The linear datamodeling score of each method's ``scores`` (name -> ``(m, n)``, as :func:`attribute`
    returns): ``subsets`` random subsets of ``fraction`` of the training examples are removed, the task is
    retrained for real on each of ``seeds`` with and without them, and the actual change of each output
    (averaged over the seeds) is correlated with each method's prediction. ``seeds`` the scores were not
    computed on measure how well a method predicts what training does, not one run."""
    if not scores:
        raise ValueError("lds needs scores: a mapping from a method's name to its (m, n) scores")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    if isinstance(subsets, bool) or not isinstance(subsets, (int, np.integer)) or subsets < 3:
        raise ValueError(f"subsets must be an int >= 3 (a rank correlation over them), got {subsets!r}")
    n = weighted.n
    rng = np.random.default_rng(seed)
    removed = np.zeros((subsets, n), np.float32)
    for r in range(subsets):
        removed[r, rng.choice(n, max(1, int(round(fraction * n))), replace=False)] = 1.0
    runs = _runs(weighted)
    changes = []
    for s in bar(check_seeds(seeds, "seeds"), desc="lds: retraining", enabled=progress):
        base = runs.outputs(s, np.ones(n))
        changes.append([runs.outputs(s, 1.0 - mask) - base for mask in removed])
    actual = np.mean(changes, axis=0)  # (subsets, m)
    methods = {}
    for name, values in scores.items():
        values = np.asarray(values, np.float64).reshape(-1, n)
        if values.shape[0] != actual.shape[1]:
            raise ValueError(f"scores[{name!r}] has {values.shape[0]} rows, the task has {actual.shape[1]} outputs")
        methods[name] = {"LDS": spread(linear_datamodeling_score(values, 1.0 - removed, actual))}
    first = next(iter(methods))
    comparison = compare(methods, primary="LDS", higher_is_better=True, mgd=first,
                         unit=f"{actual.shape[1]} outputs, retrained on {len(changes)} seed(s)",
                         target=f"{first}'s LDS beats every other method's")
    comparison["target_met"] = comparison.get("mgd_beats_strongest")
    return Attribution(comparison, actual, removed)


__all__ = ["WeightedTask", "Selection", "Attribution", "select", "train", "attribute", "gradient_scores", "lds",
           "linear_datamodeling_score", "keep_top"]
