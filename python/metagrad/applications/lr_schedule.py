"""Learning-rate schedule search by metagradient descent, against a grid.

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
(``bench/lr_smoothness.py``) -- so MGD would follow noise. MGD: Adam on ``z``
from a flat schedule (rate ``lr``, cosine-decayed to ``lr * lr_decay``),
projected to ``[1e-3, 10]``.

Competition at an equal budget of training runs: a grid of ``steps`` schedules
(one per MGD step) -- constant, linear decay, and one-cycle (linear warm-up
over 10/30/50% of training then linear decay) at log-spaced peak rates -- and,
for context, a grid about four times larger that contains it (``big_grid``
times finer in peak rate). Each side picks its best schedule by
``phi``; reported are validation and test loss (mean over the seeds), and the
same on ``seeds`` unseen seeds.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from metagrad import baselines, mgd
from metagrad.applications import digits as D
from metagrad.applications.common import ArgumentError, Metagradient, merge_params, Timer, log, plt, write_result

NAME = "lr-schedule"
DEFAULTS = dict(steps=50, knots=8, seeds=4, train_steps=200, lr=0.1, lr_decay=1.0, start_lr=0.1, peak_min=0.03,
                peak_max=10.0, n_train=1000, n_val=300, hidden=128, batch_size=100, seed=0, big_grid=4)
TOY = dict(steps=2, knots=3, seeds=2, train_steps=6, lr=0.1, lr_decay=1.0, start_lr=0.1, peak_min=0.03, peak_max=3.0,
           n_train=120, n_val=40, hidden=8, batch_size=20, seed=0, big_grid=1)
LO, HI = np.log(1e-3), np.log(10.0)
FAMILIES = ("constant", "linear-decay", "one-cycle-10%", "one-cycle-30%", "one-cycle-50%")


def config(p: dict) -> D.TrainConfig:
    # soft gradient clipping: large rates stop diverging, so phi(z) has no cliff at the edge of stability;
    # momentum 0.5, not 0.9: with 0.9 the good schedules (peak rate near 1) are not metasmooth and the
    # metagradient does not predict phi there (bench/lr_smoothness.py)
    return D.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         logit_scale=1.0, momentum=0.5, weight_decay=5e-4, clip=1.0)


def schedule(family: str, peak: float, T: int) -> np.ndarray:
    """Per-step learning rates of a grid schedule (all > 0, so they live in log space)."""
    t = np.arange(T, dtype=np.float64)
    if family == "constant":
        return np.full(T, peak)
    if family == "linear-decay":
        return peak + (peak / 1e3 - peak) * t / max(T - 1, 1)
    pct = {"one-cycle-10%": 0.1, "one-cycle-30%": 0.3, "one-cycle-50%": 0.5}[family]
    w = max(int(pct * T), 1)
    up = peak / 25 + (peak - peak / 25) * t / w
    down = peak + (peak / 1e3 - peak) * (t - w) / max(T - 1 - w, 1)
    return np.where(t < w, up, down)


def grid(n: int, T: int, lo: float, hi: float, refine: int = 1) -> list[tuple[str, float, np.ndarray]]:
    """About ``n`` schedules: ``m = ceil(n / 5)`` log-spaced peaks in ``[lo, hi]`` times the 5 families
    (the first ``n`` in peak-major order). ``refine=f`` puts ``f - 1`` more peaks between neighbours,
    so the refined grid contains the coarse one."""
    m = -(-n // len(FAMILIES))
    peaks = np.geomspace(lo, hi, (m - 1) * refine + 1) if m > 1 else np.array([lo])
    out = [(fam, float(peak), schedule(fam, float(peak), T)) for peak in peaks for fam in FAMILIES]
    return out if refine > 1 else out[:n]


def knots_to_steps(z: np.ndarray, T: int) -> np.ndarray:
    return np.exp(np.interp(np.arange(T), np.linspace(0, T - 1, len(z)), np.asarray(z, np.float64)))


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    if p["knots"] < 2:
        raise ArgumentError(f"knots must be >= 2, got {p['knots']!r}")
    for name in ("lr", "lr_decay", "start_lr"):
        if not p[name] > 0:
            raise ArgumentError(f"{name} must be > 0, got {p[name]!r}")
    if not 0 < p["peak_min"] < p["peak_max"]:
        raise ArgumentError(f"need 0 < peak_min < peak_max, got {p['peak_min']!r}, {p['peak_max']!r}")
    clock = Timer()
    split = D.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    cfg = config(p)
    T = cfg.steps

    def ens(seeds):
        return D.ensemble([D.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="lr") for s in seeds])

    mgd_seeds = list(range(p["seeds"]))
    unseen = list(range(1000, 1000 + p["seeds"]))
    task = ens(mgd_seeds)
    z0 = np.full(p["knots"], np.log(p["start_lr"]), np.float32)
    meta = Metagradient(task, z0, engine=engine)
    log(f"[{NAME}] engine={meta.engine} T={T} knots={p['knots']} seeds={p['seeds']} MGD steps={p['steps']}", progress)
    rate = mgd.cosine_decay(p["lr"], p["lr"] * p["lr_decay"], max(p["steps"], 1))
    hist = mgd.run(meta, z0, steps=p["steps"], direction="minimize", step_rule=mgd.adam(rate),
                   projection=mgd.box(LO, HI), progress=progress, label=f"[{NAME}] mgd")
    mgd_seconds = clock()

    def losses(t, log_lr_steps):
        """(val, test) loss of a per-step log-LR schedule, mean over the ensemble's seeds."""
        state = baselines.train(t, np.asarray(log_lr_steps, np.float32))
        params = state["params"]
        def mean_loss(x, y):
            return np.asarray(jax.vmap(lambda q: D.per_example_loss(cfg, q, x, y).mean())(params))

        val, test = mean_loss(split["x_val"], split["y_val"]), mean_loss(split["x_test"], split["y_test"])
        v, te = float(val.mean()), float(test.mean())
        return (v if np.isfinite(v) else float("inf")), (te if np.isfinite(te) else float("inf"))

    # per-step tasks (z of length T) for the grid and for evaluating any schedule
    step_task, step_task_unseen = ens(mgd_seeds), ens(unseen)
    clock_grid = Timer()
    n_grid = max(p["steps"], 1)
    big = grid(n_grid, T, p["peak_min"], p["peak_max"], refine=p["big_grid"])
    small = grid(n_grid, T, p["peak_min"], p["peak_max"])
    cache = {}

    def grid_eval(entries):
        rows = []
        for fam, peak, lrs in entries:
            key = (fam, round(peak, 12))
            if key not in cache:
                cache[key] = losses(step_task, np.log(lrs))
            rows.append({"family": fam, "peak": peak, "val_loss": cache[key][0], "test_loss": cache[key][1]})
        return rows

    small_rows = grid_eval(small)
    big_rows = grid_eval(big)
    grid_seconds = clock_grid()
    best_small = min(small_rows, key=lambda r: r["val_loss"])
    best_big = min(big_rows, key=lambda r: r["val_loss"])

    z_best = hist.best_z
    mgd_val, mgd_test = losses(step_task, np.log(knots_to_steps(z_best, T)))
    flat_val, flat_test = losses(step_task, np.log(knots_to_steps(z0, T)))
    u_mgd = losses(step_task_unseen, np.log(knots_to_steps(z_best, T)))
    u_small = losses(step_task_unseen, np.log(schedule(best_small["family"], best_small["peak"], T)))
    u_big = losses(step_task_unseen, np.log(schedule(best_big["family"], best_big["peak"], T)))
    metrics = {
        "mgd": {"val_loss": mgd_val, "test_loss": mgd_test, "best_step": hist.best_step,
                "lr_at_knots": np.exp(z_best).tolist(), "unseen_val_loss": u_mgd[0], "unseen_test_loss": u_mgd[1]},
        "start_flat": {"lr": p["start_lr"], "val_loss": flat_val, "test_loss": flat_test},
        "grid_equal_budget": {"size": len(small_rows), **best_small, "unseen_val_loss": u_small[0],
                              "unseen_test_loss": u_small[1]},
        "grid_big": {"size": len(big_rows), **best_big, "unseen_val_loss": u_big[0], "unseen_test_loss": u_big[1]},
    }
    result = {"application": NAME, "engine": meta.engine, "params": p, "metrics": metrics,
              "targets": {"mgd_val<=best_grid_val (equal budget)": mgd_val <= best_small["val_loss"],
                          "mgd_test<=best_grid_test (equal budget)": mgd_test <= best_small["test_loss"]},
              "grid": big_rows, "history": hist.summary(),
              "seconds": {"total": clock(), "mgd": mgd_seconds, "grid": grid_seconds, "metagradients": meta.seconds,
                          "compile": meta.compile_seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, z0, z_best, T, best_small, best_big)
    log(f"[{NAME}] val/test loss: MGD {mgd_val:.4f}/{mgd_test:.4f}; best of {len(small_rows)}-schedule grid "
        f"{best_small['val_loss']:.4f}/{best_small['test_loss']:.4f} ({best_small['family']} peak "
        f"{best_small['peak']:.3g}); best of {len(big_rows)} {best_big['val_loss']:.4f}/{best_big['test_loss']:.4f}; "
        f"flat start {flat_val:.4f} | {clock():.1f}s", progress)
    return result


def _plot(out, hist, z0, z_best, T, best_small, best_big):
    pyplot = plt()
    fig, ax = pyplot.subplots(1, 2, figsize=(11, 3.8))
    ax[0].plot(hist.values, marker=".")
    ax[0].axhline(best_small["val_loss"], color="C1", ls="--", label="best of equal-budget grid")
    ax[0].axhline(best_big["val_loss"], color="C2", ls=":", label="best of big grid")
    ax[0].set(xlabel="MGD step", ylabel="validation loss", yscale="log", title="phi = validation loss")
    ax[0].legend(fontsize=8)
    t = np.arange(T)
    ax[1].plot(t, knots_to_steps(z0, T), color="0.6", label="start (flat)")
    ax[1].plot(t, knots_to_steps(z_best, T), color="C0", lw=2, label="MGD")
    ax[1].plot(t, schedule(best_small["family"], best_small["peak"], T), color="C1", ls="--",
               label=f"grid: {best_small['family']}")
    ax[1].plot(t, schedule(best_big["family"], best_big["peak"], T), color="C2", ls=":",
               label=f"big grid: {best_big['family']}")
    ax[1].set(xlabel="training step", ylabel="learning rate", yscale="log", title="schedules")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "lr_schedule.png"), dpi=110)
    pyplot.close(fig)
