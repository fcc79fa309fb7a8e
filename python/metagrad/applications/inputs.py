"""Data poisoning on a user's own task: the metaparameter is part of the training inputs.

An :class:`InputTask` is the user's training run as a function of the training seed: ``make(seed)``
returns a :class:`metagrad.Task` whose ``z`` replaces some training inputs (the pixels of a few images,
some rows of features) and whose ``output`` the attacker raises (a validation loss). :func:`attack` raises
it by metagradient ascent with the inputs kept in a box, then trains on seeds the attack never saw, with
the clean inputs and with every attack, and reports the damage (the drop of a metric) paired per seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from metagrad import Task, mgd
from metagrad.applications.common import Metagradient, Timer, bar, compare, resolve_engine, spread, summary
from metagrad.applications.weights import MGD, Runs, seed_split

PyTree = Any
STEP_SIZES = (0.05, 0.1, 0.2, 0.5, 1.0)  # the one-metagradient attack's step, as a fraction of the box, tried


@dataclass(frozen=True)
class InputTask:
    """A training run whose metaparameter is some of its training inputs, as a function of the training seed.

    Attributes:
      make: ``seed -> Task`` whose ``z`` (shaped like ``clean``) takes the place of the attacked inputs and
        whose ``output`` is what the attack raises.
      clean: the attacked inputs' clean values (a pytree of arrays).
      evaluate: ``(final state, seed) -> {metric: value}`` on held-out data.
    """

    make: Callable[[int], Task]
    clean: PyTree
    evaluate: Callable[[PyTree, int], Mapping[str, float]]

    def __post_init__(self):
        if not callable(self.make) or not callable(self.evaluate):
            raise TypeError("InputTask needs make: seed -> metagrad.Task and evaluate: (state, seed) -> metrics")


@dataclass
class Attack:
    """What :func:`attack` found: each attack's inputs (``inputs[name]``; ``"clean"`` among them) and the
    comparison on the unseen seeds (primary: the drop of ``primary`` from the clean run, paired per seed)."""

    inputs: dict
    comparison: dict
    history: mgd.History
    engine: str  # what computed the metagradients and trained: "metagrad" (the runtime) or "jax"
    seconds: dict

    def summary(self) -> dict:
        return summary(self.comparison)

    def to_json(self) -> dict:
        return {"comparison": self.comparison, "summary": self.summary(), "history": self.history.summary(),
                "seconds": self.seconds}


def attack(task: InputTask, *, box: tuple[float, float], fit_seeds: Sequence[int], eval_seeds: Sequence[int],
           primary: str, higher_is_better: bool = True, steps: int = 100, lr: float = 0.02,
           others: Mapping[str, tuple[Callable[[int], Task], PyTree]] | None = None, progress: bool = True,
           engine: str = "auto") -> Attack:
    """Raise the task's output by moving the attacked inputs within ``box = (lo, hi)``, and compare.

    MGD: signed ascent steps of ``lr`` from the clean inputs, clipped to the box, one metagradient per fit
    seed in turn. Baselines: ``one metagradient``, a single signed step along the metagradient at the clean
    inputs, its size (a fraction of the box, :data:`STEP_SIZES`) the one that raises the output most on the
    fit seeds; and the user's ``others`` (name -> ``(make, z)``: another attack on the same examples, e.g.
    the clean inputs with flipped labels). Every attack and the clean inputs are trained on ``eval_seeds``;
    the primary metric is the drop of ``task.evaluate``'s ``primary`` from the clean run's, paired per
    seed (``higher_is_better``: whether ``primary`` is good when high, like an accuracy).
    """
    lo, hi = (float(b) for b in box)
    if not lo < hi:
        raise ValueError(f"box must be (lo, hi) with lo < hi, got {box!r}")
    fit, unseen = seed_split(fit_seeds, eval_seeds, "the attack")
    clean = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), task.clean)
    for leaf in jax.tree_util.tree_leaves(clean):
        if leaf.min() < lo or leaf.max() > hi:
            raise ValueError(f"the clean inputs lie in [{leaf.min()}, {leaf.max()}], outside the box ({lo}, {hi})")
    clock = Timer()
    meta = Metagradient([task.make(s) for s in fit], clean, engine=engine)
    first = {}

    def record(i, z, value, grad):
        if i == 0:
            first["grad"] = grad

    history = mgd.run(meta, clean, steps=steps, direction="maximize", step_rule=mgd.sign_step(lr),
                      projection=mgd.box(lo, hi), callback=record, progress=progress, label="attack: mgd")
    mgd_seconds = clock()
    runs = {"": Runs(task.make, clean, resolve_engine(engine))}
    for name, (make, _) in (others or {}).items():
        runs[name] = Runs(make, clean, resolve_engine(engine))

    def step_of(eps):
        return jax.tree_util.tree_map(lambda z, g: np.clip(z + eps * (hi - lo) * np.sign(g), lo, hi).astype(z.dtype),
                                      clean, first["grad"])

    candidates = [step_of(eps) for eps in STEP_SIZES]
    raised = [np.mean([runs[""].outputs(s, z).mean() for s in fit]) for z in candidates]
    inputs = {"clean": clean, MGD: history.z, "one metagradient": candidates[int(np.argmax(raised))]}
    metrics: dict = {}
    for s in bar(unseen, desc="attack: unseen seeds", enabled=progress):
        for name, z in inputs.items():
            _add(metrics, name, task.evaluate(runs[""].train(s, z), s))
        for name, (_, z) in (others or {}).items():
            _add(metrics, name, task.evaluate(runs[name].train(s, z), s))
    if primary not in metrics["clean"]:
        raise ValueError(f"primary={primary!r} is not a metric of InputTask.evaluate (it returns "
                         f"{sorted(metrics['clean'])})")
    sign = 1.0 if higher_is_better else -1.0
    methods = {}
    for name in (MGD, "one metagradient", *(others or {})):
        drop = sign * (np.asarray(metrics["clean"][primary]) - np.asarray(metrics[name][primary]))
        methods[name] = {f"{primary} drop": spread(drop), **{m: spread(v) for m, v in metrics[name].items()}}
    methods["one metagradient"]["tuning"] = {"step sizes": list(STEP_SIZES), "fit output": [float(r) for r in raised]}
    comparison = compare(methods, primary=f"{primary} drop", higher_is_better=True, mgd=MGD,
                         unit=f"{len(unseen)} unseen training seeds",
                         target=f"MGD's {primary} drop beats every other attack's")
    comparison["target_met"] = comparison.get("mgd_beats_strongest")
    comparison["clean"] = {m: spread(v) for m, v in metrics["clean"].items()}
    return Attack(inputs, comparison, history, meta.engine,
                  {"mgd": mgd_seconds, "evaluation": clock() - mgd_seconds, "metagradients": meta.seconds})


def _add(metrics: dict, name: str, values: Mapping[str, float]) -> None:
    for metric, value in dict(values).items():
        metrics.setdefault(name, {}).setdefault(metric, []).append(float(value))
