"""Data attribution: predict the effect of removing training data, by the exact metagradient and by cheap methods.

Setup (sklearn digits): ``z`` is a weight per training example; at ``z = 1``
(the normal run) the metagradient ``g = d loss_j(A(z)) / dz`` of a test
example's loss gives the linear prediction for training without a subset ``S``:
``loss_j(A(1 - 1_S)) - loss_j(A(1)) ~= -sum_{i in S} g_i``. The baselines
(:mod:`metagrad.applications.attributors`) make the same kind of prediction
from the trained model only: gradient dot products at the final model, TracIn
over checkpoints, influence functions (damped inverse Hessian, conjugate
gradients) and TRAK (random projections).

The linear datamodeling score (LDS) of a method, per test example: the
Spearman correlation, over ``subsets`` random subsets of ``fractions`` of the
training data, between its predicted and the actual loss changes (retrained
for real, in vmapped programs). Every method computes its scores on the
``seeds`` fit seeds (and averages them); it is reported on:

* **unseen seeds** (primary): the actual changes averaged over ``eval_seeds``
  training seeds (initialization and batch order) no method saw -- how well it
  predicts what removing data does to *training*, not to one run;
* **the same run** (secondary, the setting of exact attribution, MAGIC): each
  fit seed's scores against that very run's actual changes. The baselines'
  hyperparameters (damping, ridge) are chosen on this, so it flatters them.

Spread: mean +- standard error over the ``test_examples`` test examples. The
default recipe is a smooth one (GELU, warm-up then linear decay); the
``contrast`` recipe (ReLU, constant learning rate, no warm-up) is run too, to
show what smoothness buys.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from metagrad.applications import attributors
from metagrad.applications import digits
from metagrad.applications.common import (ArgumentError, Metagradient, Timer, bar, check_split, compare, log,
                                          merge_params, plot_comparison, plt, resolve_engine, seed_groups, spread,
                                          write_result)
from metagrad.applications.weights import linear_datamodeling_score

NAME = "attribution"
DEFAULTS = dict(test_examples=8, subsets=50, fractions=(0.01, 0.05), seeds=2, eval_seeds=4, n_train=1000, n_val=300,
                train_steps=200, hidden=128, batch_size=100, tracin_every=20, trak_dim=512, seed=0, contrast=True)
TOY = dict(test_examples=2, subsets=4, fractions=(0.05, 0.2), seeds=1, eval_seeds=1, n_train=120, n_val=40,
           train_steps=6, hidden=8, batch_size=20, tracin_every=2, trak_dim=16, seed=0, contrast=False)
METAGRADIENT = "metagradient"
DAMPINGS = (1e-3, 1e-2, 1e-1)  # influence functions: tried on the fit seeds
RIDGES = (1e-2, 1e-1, 1.0)  # TRAK: relative ridge, tried on the fit seeds


def params(toy: bool = False, **kw) -> dict:
    """The run's parameters (:data:`DEFAULTS`, or :data:`TOY`, updated by ``kw``), all checked."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    check_split(p, n_test_min=p["test_examples"])
    try:
        p["fractions"] = tuple(float(f) for f in p["fractions"])
    except (TypeError, ValueError):
        raise ArgumentError(f"fractions must be numbers in (0, 1), got {p['fractions']!r}") from None
    if not p["fractions"] or not all(0 < f < 1 for f in p["fractions"]):
        raise ArgumentError(f"fractions must be in (0, 1), got {p['fractions']!r}")
    if not 1 <= p["tracin_every"] <= p["train_steps"] or p["train_steps"] % p["tracin_every"]:
        raise ArgumentError(f"tracin_every must divide train_steps={p['train_steps']}, got {p['tracin_every']!r}")
    if p["trak_dim"] < 1:
        raise ArgumentError(f"trak_dim must be >= 1, got {p['trak_dim']!r}")
    return p


def smooth_config(p: dict) -> digits.TrainConfig:
    return digits.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         activation="gelu", logit_scale=1.0, momentum=0.9, weight_decay=5e-4,
                         warmup=max(1, p["train_steps"] // 4), decay="linear")


def contrast_config(p: dict) -> digits.TrainConfig:
    return digits.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         activation="relu", logit_scale=1.0, momentum=0.9, weight_decay=5e-4)


def test_metagradients(cfg: digits.TrainConfig, split: dict, test_idx, seed: int, engine: str):
    """``(values [m], grads [m, n])``: each test example's loss at ``z = 1`` under training seed ``seed``,
    and its metagradient with respect to the per-example weights.

    All m in one call: ``out_w = np.eye(m)`` makes the output the vector of the
    m losses, whose metagradients the runtime takes from one forward pass and
    one set of replays (the JAX engine: one scan per example).
    """
    m, n = len(test_idx), len(split["y_train"])
    x, y = split["x_test"][test_idx], split["y_test"][test_idx]
    if resolve_engine(engine) == "jax":  # jax.grad wants a scalar output: one task per example
        tasks = [digits.make_task(cfg.with_(init_seed=seed, batch_seed=seed), split, role="weights", output="weighted",
                             x_out=x, y_out=y, out_w=np.eye(m)[j]) for j in range(m)]
        meta = Metagradient(tasks, np.ones(n, np.float32), engine=engine)
        rows = [meta.at(j, np.ones(n, np.float32)) for j in range(m)]
        return np.array([v for v, _ in rows]), np.stack([np.asarray(g, np.float64) for _, g in rows]), meta
    task = digits.make_task(cfg.with_(init_seed=seed, batch_seed=seed), split, role="weights", output="weighted",
                       x_out=x, y_out=y, out_w=np.eye(m))
    meta = Metagradient(task, np.ones(n, np.float32), engine=engine)
    values, grads = meta.at(0, np.ones(n, np.float32))
    return np.asarray(values), np.asarray(grads, np.float64), meta


@functools.lru_cache(maxsize=None)
def _model_fns(cfg: digits.TrainConfig):
    # one object per config, so the baselines' programs compile once per config
    return (functools.partial(digits.per_example_loss, cfg), functools.partial(digits.margin, cfg),
            functools.partial(digits.train_loss, cfg))


def baseline_scores(cfg: digits.TrainConfig, split: dict, test_idx, seed: int, every: int, trak_dim: int) -> dict:
    """Every cheap method's (and hyperparameter's) scores ``[m, n]`` from training seed ``seed``'s run."""
    task = digits.make_task(cfg.with_(init_seed=seed, batch_seed=seed), split, role="weights")
    x_train, y_train = split["x_train"], split["y_train"]
    x_test, y_test = split["x_test"][test_idx], split["y_test"][test_idx]
    traj = digits.trajectory(task, np.ones(len(y_train), np.float32), every)
    checkpoints = [{k: v[c] for k, v in traj.items()} for c in range(cfg.steps // every)]
    final = checkpoints[-1]
    loss, margin, objective = _model_fns(cfg)

    def grads(fn, params):
        return (attributors.per_example_grads(fn, params, x_test, y_test),
                attributors.per_example_grads(fn, params, x_train, y_train))

    per_checkpoint = [grads(loss, c) for c in checkpoints]
    g_test, g_train = per_checkpoint[-1]
    # TracIn's weights: the learning rate summed over the steps each checkpoint closes
    lrs = [float(np.sum(digits.lr_at(cfg, np.arange(c * every, (c + 1) * every)))) for c in range(len(checkpoints))]
    out = {"grad dot": attributors.grad_dot(g_test, g_train), "TracIn": attributors.tracin(per_checkpoint, lrs)}
    for d in DAMPINGS:
        out[f"influence (damping {d:g})"] = attributors.influence(objective, final, g_test, g_train, damping=d,
                                                        args=(x_train, y_train))
    phi_test, phi_train = attributors.trak_features(*grads(margin, final), dim=trak_dim, seed=seed)
    p_train = np.exp(-np.asarray(loss(final, x_train, y_train)))
    for r in RIDGES:
        out[f"TRAK (ridge {r:g})"] = attributors.trak(phi_test, phi_train, p_train, ridge=r)
    return out


def _family(name: str) -> str:
    return name.split(" (")[0]


def study(cfg: digits.TrainConfig, split: dict, test_idx, p: dict, engine: str, progress: bool, label: str) -> dict:
    """Every method's LDS under ``cfg``, on the same runs and on unseen seeds."""
    n = len(split["y_train"])
    fit_seeds, unseen_seeds = seed_groups(p)
    rng = np.random.default_rng(p["seed"] + 1)
    subsets = {}
    for frac in p["fractions"]:
        zs = np.ones((p["subsets"], n), np.float32)
        for r in range(p["subsets"]):
            zs[r, rng.choice(n, max(1, int(round(frac * n))), replace=False)] = 0.0
        subsets[frac] = zs
    zs_all = np.concatenate([np.ones((1, n), np.float32)] + list(subsets.values()))
    seeds = fit_seeds + unseen_seeds
    clock = Timer()
    tasks = [digits.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="weights") for s in seeds]
    x, y = split["x_test"][test_idx], split["y_test"][test_idx]
    trained = digits.train_grid(tasks, zs_all, progress=f"[{NAME}] {label} retraining" if progress else None)
    losses = np.asarray(digits.evaluate_grid_per_example(cfg, trained, x, y), np.float64)  # [1 + R*F, seeds, m]
    changes = losses[1:] - losses[:1]
    retrain_seconds = clock()

    def actual(frac, seed_positions):
        """[subsets, m]: the loss changes of ``frac``'s subsets, averaged over the given seeds."""
        k = list(subsets).index(frac)
        return changes[k * p["subsets"]:(k + 1) * p["subsets"]][:, seed_positions].mean(axis=1)

    clock = Timer()
    per_seed, meta_seconds = [], 0.0
    for s in bar(fit_seeds, desc=f"[{NAME}] {label} scores", enabled=progress):
        values, grads, meta = test_metagradients(cfg, split, test_idx, s, engine)
        meta_seconds += meta.seconds
        per_seed.append({METAGRADIENT: grads, **baseline_scores(cfg, split, test_idx, s, p["tracin_every"],
                                                                p["trak_dim"])})
    scores_seconds = clock()
    frac0 = p["fractions"][0]
    same_run = {name: {frac: np.mean([linear_datamodeling_score(sc[name], subsets[frac], actual(frac, [i]))
                                      for i, sc in enumerate(per_seed)], axis=0) for frac in p["fractions"]}
                for name in per_seed[0]}
    # each family's hyperparameter: the best same-run LDS on the fit seeds at the first fraction
    chosen = {}
    for name in per_seed[0]:
        fam = _family(name)
        if fam not in chosen or same_run[name][frac0].mean() > same_run[chosen[fam]][frac0].mean():
            chosen[fam] = name
    unseen_pos = list(range(len(fit_seeds), len(seeds)))
    methods = {}
    for fam, name in chosen.items():
        mean_scores = np.mean([sc[name] for sc in per_seed], axis=0)
        row = {}
        for frac in p["fractions"]:
            row[f"LDS {frac:g}"] = spread(linear_datamodeling_score(mean_scores, subsets[frac],
                                                                     actual(frac, unseen_pos)))
        for frac in p["fractions"]:
            row[f"same-run LDS {frac:g}"] = spread(same_run[name][frac])
        row["variant"] = name
        methods[fam] = row
    tuning = {name: {f"{frac:g}": float(same_run[name][frac].mean()) for frac in p["fractions"]} for name in same_run}
    log(f"[{NAME}] {label}: LDS on {len(unseen_seeds)} unseen seeds: " + "; ".join(
        f"{fam} " + ", ".join(f"{v[f'LDS {f:g}']['mean']:.3f}" for f in p["fractions"]) for fam, v in methods.items()),
        progress)
    return {"config": cfg.__dict__, "engine": meta.engine, "methods": methods, "tuning_same_run_lds": tuning,
            "seconds": {"retraining": retrain_seconds, "scores": scores_seconds, "metagradients": meta_seconds}}


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = params(toy, **kw)
    resolve_engine(engine)
    clock = Timer()
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    test_idx = np.random.default_rng(p["seed"]).choice(len(split["y_test"]), p["test_examples"], replace=False)
    fit_seeds, unseen_seeds = seed_groups(p)
    studies = {"smooth": study(smooth_config(p), split, test_idx, p, engine, progress, "smooth")}
    if p["contrast"]:
        studies["contrast"] = study(contrast_config(p), split, test_idx, p, engine, progress, "contrast")
    smooth = studies["smooth"]["methods"]
    fracs = [f"LDS {f:g}" for f in p["fractions"]]
    met = all(smooth[METAGRADIENT][f]["mean"] > max(v[f]["mean"] for k, v in smooth.items() if k != METAGRADIENT)
              for f in fracs)
    comparison = compare(smooth, primary=fracs[0], higher_is_better=True, mgd=METAGRADIENT,
                         unit=f"{p['test_examples']} test examples (actual changes averaged over "
                              f"{len(unseen_seeds)} unseen seeds)",
                         target="the metagradient's LDS (unseen seeds) above every baseline's, at every removed "
                                "fraction", target_met=met)
    result = {"application": NAME, "engine": studies["smooth"]["engine"], "params": p, "comparison": comparison,
              "metrics": {"seeds": {"fit": fit_seeds, "unseen": unseen_seeds}, "test_indices": test_idx.tolist(),
                          **{name: {fam: {k: v[k]["mean"] for k in v if k != "variant"}
                                    for fam, v in s["methods"].items()} for name, s in studies.items()}},
              "targets": {comparison["target"]: met}, "studies": studies, "seconds": {"total": clock()}}
    if out is not None:
        write_result(out, result)
        _plot(out, studies, p["fractions"])
    return result


def _plot(out, studies, fractions):
    pyplot = plt()
    names = list(studies)
    cols = [f"LDS {f:g}" for f in fractions] + [f"same-run LDS {f:g}" for f in fractions]
    fig, axes = pyplot.subplots(len(names), len(cols), figsize=(4.6 * len(cols), 3.2 * len(names)), squeeze=False)
    for r, name in enumerate(names):
        methods = studies[name]["methods"]
        for c, col in enumerate(cols):
            comp = compare(methods, primary=col, higher_is_better=True, mgd=METAGRADIENT, unit="test examples",
                           target="")
            kind = "unseen seeds" if col.startswith("LDS") else "the same run"
            plot_comparison(axes[r][c], comp, title=f"{name}: {col.split()[-1]} removed, {kind}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "attribution.png"), dpi=110)
    pyplot.close(fig)
