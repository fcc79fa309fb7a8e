"""Learning-rate schedule search by metagradient descent, against standard schedules with tuned peaks.

Setup (sklearn digits): ``z`` is the log learning rate at ``knots`` points
spread evenly over the ``T`` training steps, linearly interpolated per step
(``lr_t = exp(interp(t, knots, z))``). ``A(z)`` trains ``seeds`` copies of the
MLP side by side (different initialization and batch order, one shared
schedule: :func:`metagrad.applications.digits.ensemble`), and ``phi`` is their
mean validation cross-entropy: the expected validation loss over training
randomness, a smoother objective than one run's. Training soft-clips the
gradient norm (:class:`~metagrad.applications.digits.TrainConfig` ``clip``), so
too-large rates degrade training gradually instead of diverging: without it the
best schedules sit at a cliff (the edge of stability) where ``phi`` is not
smooth. The recipe is SGD with momentum 0.5: with 0.9, the region of good
schedules (peak rates near 1) is not metasmooth -- there the metagradient's
prediction of how ``phi`` changes along random directions correlates 0.44 / -0.19
with the real change (steps 0.05 / 0.2 in log rate), against 1.00 / 1.00 with 0.5
(``bench/lr_smoothness.py``) -- so MGD would follow noise. MGD: Adam (Optax) on
``z`` from a flat schedule (rate ``lr``, cosine-decayed to ``lr * lr_decay``),
projected to ``[1e-3, 10]``.

Baselines: the standard schedules of :data:`FAMILIES` (Optax's), each with its
peak rate tuned over ``steps`` log-spaced values in ``[peak_min, peak_max]``
-- one training of the seed ensemble per MGD step, per family (a metagradient
costs a few trainings, but a one-dimensional search gains little from more
points) -- chosen by the same ``phi`` on the same fit seeds. Reported: the
test (and validation) loss of every method's schedule on ``eval_seeds`` unseen
training seeds, mean +- standard error.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad import mgd
from metagrad.applications import digits
from metagrad.applications.common import (ArgumentError, Metagradient, Timer, check_split, compare, log, merge_params,
                                          plot_comparison, plt, resolve_engine, seed_groups, spread, write_result)

NAME = "lr-schedule"
DEFAULTS = dict(steps=50, knots=8, seeds=4, eval_seeds=4, train_steps=200, lr=0.1, lr_decay=1.0, start_lr=0.1,
                peak_min=0.03, peak_max=10.0, n_train=1000, n_val=300, hidden=128, batch_size=100, seed=0)
TOY = dict(steps=2, knots=3, seeds=2, eval_seeds=2, train_steps=6, lr=0.1, lr_decay=1.0, start_lr=0.1,
           peak_min=0.03, peak_max=3.0, n_train=120, n_val=40, hidden=8, batch_size=20, seed=0)
LO, HI = np.log(1e-3), np.log(10.0)
MGD = "MGD"
FLAT = "flat start (MGD's z0)"


def _warmup_linear(peak: float, T: int) -> optax.Schedule:
    w = max(int(0.1 * T), 1)
    return optax.join_schedules([optax.linear_schedule(peak / 25, peak, w),
                                 optax.linear_schedule(peak, peak / 1e3, max(T - 1 - w, 1))], [w])


# every schedule ends above zero, so it has a log rate; each is its peak times a fixed shape
FAMILIES = {
    "constant": lambda peak, T: optax.constant_schedule(peak),
    "linear decay": lambda peak, T: optax.linear_schedule(peak, peak / 1e3, max(T - 1, 1)),
    "cosine": lambda peak, T: optax.cosine_decay_schedule(peak, max(T - 1, 1), alpha=1e-3),
    "warm-up + linear decay": _warmup_linear,
    "warm-up + cosine": lambda peak, T: optax.warmup_cosine_decay_schedule(peak / 25, peak, max(int(0.1 * T), 1),
                                                                           max(T - 1, 2), peak / 1e3),
    "one-cycle": lambda peak, T: optax.cosine_onecycle_schedule(max(T - 1, 1), peak, 0.3, 25.0, 1e3),
}


def params(toy: bool = False, **kw) -> dict:
    """The run's parameters (:data:`DEFAULTS`, or :data:`TOY`, updated by ``kw``), all checked."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    check_split(p)
    for name in ("lr", "lr_decay", "start_lr"):
        if not p[name] > 0:
            raise ArgumentError(f"{name} must be > 0, got {p[name]!r}")
    if not 0 < p["peak_min"] < p["peak_max"]:
        raise ArgumentError(f"need 0 < peak_min < peak_max, got {p['peak_min']!r}, {p['peak_max']!r}")
    return p


def config(p: dict) -> digits.TrainConfig:
    # soft gradient clipping: large rates stop diverging, so phi(z) has no cliff at the edge of stability;
    # momentum 0.5, not 0.9: with 0.9 the good schedules (peak rate near 1) are not metasmooth and the
    # metagradient does not predict phi there (bench/lr_smoothness.py)
    return digits.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         logit_scale=1.0, momentum=0.5, weight_decay=5e-4, clip=1.0)


@functools.lru_cache(maxsize=None)
def _unit_schedule(family: str, T: int) -> np.ndarray:
    return np.asarray(jax.vmap(FAMILIES[family](1.0, T))(jnp.arange(T)), np.float64)


def schedule(family: str, peak: float, T: int) -> np.ndarray:
    """Per-step learning rates of a standard schedule (all > 0, so they live in log space).

    Every family is its peak times a fixed shape, so the shape is computed once.
    """
    return float(peak) * _unit_schedule(family, int(T))


def knots_to_steps(z: np.ndarray, T: int) -> np.ndarray:
    return np.exp(np.interp(np.arange(T), np.linspace(0, T - 1, len(z)), np.asarray(z, np.float64)))


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = params(toy, **kw)
    resolve_engine(engine)
    clock = Timer()
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    cfg = config(p)
    T = cfg.steps
    fit_seeds, unseen_seeds = seed_groups(p)

    def tasks_for(seeds):
        return [digits.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="lr") for s in seeds]

    z0 = np.full(p["knots"], np.log(p["start_lr"]), np.float32)
    meta = Metagradient(digits.ensemble(tasks_for(fit_seeds)), z0, engine=engine)
    log(f"[{NAME}] engine={meta.engine} T={T} knots={p['knots']} MGD steps={p['steps']} on the ensemble of seeds "
        f"{fit_seeds}, reported on unseen seeds {unseen_seeds}", progress)
    rate = optax.cosine_decay_schedule(p["lr"], max(p["steps"] - 1, 1), alpha=p["lr_decay"])
    hist = mgd.run(meta, z0, steps=p["steps"], direction="minimize", step_rule=optax.adam(rate),
                   projection=mgd.box(LO, HI), progress=progress, label=f"[{NAME}] mgd")
    mgd_seconds = clock()

    def losses(tasks, per_step_lrs, label=None):
        """``{"val", "test"}`` losses ``[schedules, seeds]`` (inf where training diverged)."""
        trained = digits.train_grid(tasks, np.log(np.stack(per_step_lrs)).astype(np.float32),
                               progress=label if progress else None)
        out = {name: digits.evaluate_grid(cfg, trained, split[f"x_{name}"], split[f"y_{name}"])["loss"]
               for name in ("val", "test")}
        return {k: np.where(np.isfinite(v), v, np.inf) for k, v in out.items()}

    # each family's peak, tuned on the fit seeds by phi (their mean validation loss)
    clock_grid = Timer()
    peaks = np.geomspace(p["peak_min"], p["peak_max"], p["steps"])
    grid = [(fam, float(peak)) for fam in FAMILIES for peak in peaks]
    fit_val = losses(tasks_for(fit_seeds), [schedule(f, pk, T) for f, pk in grid],
                     f"[{NAME}] {len(grid)} standard schedules")["val"].mean(axis=1)
    tuned = {}
    for (fam, peak), v in zip(grid, fit_val):
        if fam not in tuned or v < tuned[fam]["fit_val_loss"]:
            tuned[fam] = {"peak": peak, "fit_val_loss": float(v)}
    grid_seconds = clock_grid()

    z_best = hist.best_z
    candidates = {MGD: knots_to_steps(z_best, T), **{f: schedule(f, t["peak"], T) for f, t in tuned.items()},
                  FLAT: knots_to_steps(z0, T)}
    unseen = losses(tasks_for(unseen_seeds), list(candidates.values()))
    methods = {}
    for i, name in enumerate(candidates):
        methods[name] = {"test_loss": spread(unseen["test"][i]), "val_loss": spread(unseen["val"][i])}
        methods[name]["fit_val_loss"] = hist.best_value if name == MGD else (
            tuned[name]["fit_val_loss"] if name in tuned else hist.values[0])
        if name in tuned:
            methods[name]["peak"] = tuned[name]["peak"]
    methods[MGD]["lr_at_knots"] = np.exp(z_best).tolist()
    strongest_test = min(methods[f]["test_loss"]["mean"] for f in FAMILIES)
    met = methods[MGD]["test_loss"]["mean"] <= strongest_test
    comparison = compare(methods, primary="test_loss", higher_is_better=False, mgd=MGD, references=(FLAT,),
                         unit=f"{len(unseen_seeds)} unseen training seeds",
                         target="MGD's test loss <= every tuned standard schedule's", target_met=met)
    result = {"application": NAME, "engine": meta.engine, "params": p, "comparison": comparison,
              "metrics": {"seeds": {"fit": fit_seeds, "unseen": unseen_seeds}, "mgd_best_step": hist.best_step,
                          "schedules_tried_per_family": len(peaks)},
              "targets": {comparison["target"]: met},
              "grid": [{"family": f, "peak": pk, "fit_val_loss": float(v)} for (f, pk), v in zip(grid, fit_val)],
              "history": hist.summary(),
              "seconds": {"total": clock(), "mgd": mgd_seconds, "grid": grid_seconds, "metagradients": meta.seconds,
                          "compile": meta.compile_seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, comparison, candidates, T)
    log(f"[{NAME}] test loss on {len(unseen_seeds)} unseen seeds: " + ", ".join(
        f"{m} {v['test_loss']['mean']:.4f}+-{v['test_loss']['sem']:.4f}" for m, v in methods.items())
        + f" | {clock():.1f}s", progress)
    return result


def _plot(out, hist, comparison, candidates, T):
    pyplot = plt()
    fig, ax = pyplot.subplots(1, 3, figsize=(17, 3.8))
    ax[0].plot(hist.values, marker=".")
    for j, fam in enumerate(FAMILIES):
        ax[0].axhline(comparison["methods"][fam]["fit_val_loss"], color=f"C{j}", ls=":", lw=1)
    ax[0].set(xlabel="MGD step", ylabel="validation loss (fit seeds)", yscale="log",
              title="phi; dotted: each family at its tuned peak")
    t = np.arange(T)
    for j, (name, lrs) in enumerate(candidates.items()):
        style = dict(color="C3", lw=2.5) if name == MGD else dict(color="0.6" if name == FLAT else f"C{j - 1}",
                                                                    lw=1)
        ax[1].plot(t, lrs, label=name, **style)
    ax[1].set(xlabel="training step", ylabel="learning rate", yscale="log", title="schedules")
    ax[1].legend(fontsize=7)
    plot_comparison(ax[2], comparison, title="test loss, unseen seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_schedule.png"), dpi=110)
    pyplot.close(fig)
