"""Learning-rate schedules on a user's own task: metagradient descent over a schedule's knots against the
standard schedules, each with its peak tuned.

The user's step reads its learning rate from ``z`` with :func:`rate_at`: ``z`` is the log learning rate at
knots spread evenly over the ``T`` steps, linearly interpolated per step. A ``z`` with ``T`` knots is a
schedule given step by step, which is how the standard schedules (Optax's, :data:`FAMILIES` of the digits
application) are trained. :func:`tune` runs MGD on the knots (Adam in log rate, in ``[1e-3, 10]``) over the
fit seeds, tunes each standard family's peak by the same objective (the task's output, averaged over the fit
seeds), and trains every schedule on seeds none of them saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from metagrad import Task, mgd
from metagrad.applications.common import Metagradient, Timer, bar, compare, resolve_engine, spread, summary
from metagrad.applications.lr_schedule import FAMILIES, HI, LO, knots_to_steps, schedule
from metagrad.applications.weights import MGD, Runs, seed_split

FLAT = "flat start (MGD's z0)"


def rate_at(z, t, steps: int):
    """The learning rate of step ``t`` (a traced int32) from ``z``, the log rate at ``len(z)`` knots spread
    evenly over ``steps`` steps, linearly interpolated: for use inside the task's ``step``."""
    knots = jnp.linspace(0.0, steps - 1.0, z.shape[0])
    return jnp.exp(jnp.interp(jnp.asarray(t, jnp.float32), knots, z))


@dataclass
class Tuning:
    """What :func:`tune` found: MGD's schedule and each family's tuned peak (``schedules``: name -> per-step
    rates), and their comparison on the unseen seeds."""

    schedules: dict
    comparison: dict
    history: mgd.History
    engine: str
    seconds: dict

    def summary(self) -> dict:
        return summary(self.comparison)

    def to_json(self) -> dict:
        return {"comparison": self.comparison, "summary": self.summary(), "history": self.history.summary(),
                "schedules": self.schedules, "seconds": self.seconds}


def tune(make: Callable[[int], Task], evaluate: Callable, *, steps: int, knots: int = 8,
         fit_seeds: Sequence[int], eval_seeds: Sequence[int], primary: str, higher_is_better: bool = False,
         mgd_steps: int = 50, lr: float = 0.1, start: float = 0.1, peaks: Sequence[float] | None = None,
         progress: bool = True, engine: str = "auto") -> Tuning:
    """MGD over ``knots`` log-rate knots against every standard schedule of :data:`FAMILIES`.

    Args:
      make: ``seed -> Task`` of ``steps`` steps whose step takes its rate from ``z`` by :func:`rate_at`, and
        whose ``output`` MGD and the peak search minimize (a validation loss).
      evaluate: ``(final state, seed) -> {metric: value}`` on held-out data.
      knots: the schedule's knots (MGD's z); ``start``: the flat rate MGD starts from; ``lr``: Adam's step in
        log rate (cosine-decayed over ``mgd_steps``).
      peaks: the peak rates tried per family (default 12 log-spaced in ``[0.03, 3]``).
    """
    if knots < 2 or knots > steps:
        raise ValueError(f"knots must be in [2, steps={steps}], got {knots!r}")
    if not start > 0 or not lr > 0:
        raise ValueError(f"start and lr must be > 0, got {start!r} and {lr!r}")
    fit, unseen = seed_split(fit_seeds, eval_seeds, "the tuning")
    peaks = np.geomspace(0.03, 3.0, 12) if peaks is None else np.asarray(peaks, np.float64)
    clock, engine = Timer(), resolve_engine(engine)
    z0 = np.full(knots, np.log(start), np.float32)
    meta = Metagradient([make(s) for s in fit], z0, engine=engine)
    rate = optax.cosine_decay_schedule(lr, max(mgd_steps - 1, 1))
    history = mgd.run(meta, z0, steps=mgd_steps, direction="minimize", step_rule=optax.adam(rate),
                      projection=mgd.box(LO, HI), progress=progress, label="tune: mgd")
    mgd_seconds = clock()
    per_step = Runs(make, np.zeros(steps, np.float32), engine)  # a schedule given step by step

    def fit_objective(rates) -> float:
        return float(np.mean([per_step.outputs(s, np.log(rates)).mean() for s in fit]))

    tuned = {}
    for family in bar(FAMILIES, desc="tune: standard schedules", enabled=progress):
        tried = [fit_objective(schedule(family, peak, steps)) for peak in peaks]
        best = int(np.argmin(np.where(np.isfinite(tried), tried, np.inf)))  # a diverged run loses
        tuned[family] = {"peak": float(peaks[best]), "fit_output": tried[best], "tried": tried}
    candidates = {MGD: knots_to_steps(history.best_z, steps),
                  **{family: schedule(family, t["peak"], steps) for family, t in tuned.items()},
                  FLAT: knots_to_steps(z0, steps)}
    metrics: dict = {name: {} for name in candidates}
    for s in bar(unseen, desc="tune: unseen seeds", enabled=progress):
        for name, rates in candidates.items():
            for metric, value in dict(evaluate(per_step.train(s, np.log(rates)), s)).items():
                metrics[name].setdefault(metric, []).append(float(value))
    if primary not in metrics[MGD]:
        raise ValueError(f"primary={primary!r} is not a metric of evaluate (it returns {sorted(metrics[MGD])})")
    methods = {name: {metric: spread(v) for metric, v in m.items()} for name, m in metrics.items()}
    for family, t in tuned.items():
        methods[family]["peak"] = t["peak"]
    comparison = compare(methods, primary=primary, higher_is_better=higher_is_better, mgd=MGD, references=(FLAT,),
                         unit=f"{len(unseen)} unseen training seeds",
                         target=f"MGD's {primary} beats every tuned standard schedule's")
    comparison["target_met"] = comparison.get("mgd_beats_strongest")
    comparison["tuning"] = tuned
    return Tuning({name: rates.tolist() for name, rates in candidates.items()}, comparison, history, meta.engine,
                  {"mgd": mgd_seconds, "tuning and evaluation": clock() - mgd_seconds,
                   "metagradients": meta.seconds})


__all__ = ["rate_at", "tune", "Tuning", "FAMILIES"]
