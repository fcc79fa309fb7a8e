"""Data selection: keep the training examples that help, by metagradient descent, against cheap filters.

Setup (sklearn digits): a random ``noise`` fraction of the training labels is
flipped to another class. ``z`` is a weight per training example; ``A(z)`` is
minibatch SGD with momentum (Optax) on the ``z``-weighted cross-entropy;
``phi`` is the mean cross-entropy on a clean validation set. MGD takes signed
steps ``z <- P(z - lr * sign(g))`` from the uniform ``z = keep``, where ``P``
projects onto fractional selections of the kept budget, ``{0 <= z <= 1,
sum z = keep * n}``, and successive steps cycle over ``seeds`` training seeds
(initialization and batch order) so the weights do not fit one trajectory.

Every method then keeps the same fraction ``keep`` of the examples (its
top-scored ones) and is trained on them, weights 0/1, on ``eval_seeds`` training
seeds that neither MGD nor any baseline saw:

* ``MGD``: the ``keep * n`` largest final weights;
* ``loss ranking``: train once (fit seed 0), drop the highest-loss examples;
* ``first metagradient``: one metagradient at ``z = 1`` (exact influence of
  each example on the validation loss), drop those whose weight hurts most;
* ``val kNN``: drop the examples whose label a k-nearest-neighbour classifier
  fit on the clean validation set finds least likely;
* ``random``: a random subset;
* references, not competitors: ``all data`` (nothing dropped) and
  ``clean only (oracle)`` (exactly the unflipped examples; knows the noise).

Primary metric: test accuracy (and loss), mean +- standard error over the
unseen seeds. Secondary: how well each score separates flipped from clean
examples (detection AUROC).
"""

from __future__ import annotations

import os

import numpy as np

from metagrad.applications import digits, weights
from metagrad.applications.common import (ArgumentError, Timer, check_split, compare, log, merge_params,
                                          plot_comparison, plt, resolve_engine, seed_groups, write_result)
from metagrad.applications.weights import MGD

NAME = "data-selection"
DEFAULTS = dict(steps=40, n_train=1000, n_val=300, noise=0.2, keep=0.8, lr=0.05, seeds=4, eval_seeds=8,
                train_steps=200, hidden=128, batch_size=100, knn=10, seed=0)
TOY = dict(steps=2, n_train=120, n_val=40, noise=0.2, keep=0.8, lr=0.1, seeds=1, eval_seeds=2, train_steps=6,
           hidden=8, batch_size=20, knn=3, seed=0)
REFERENCES = ("all data", "clean only (oracle)")


def auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``labels``."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, np.float64)))


def params(toy: bool = False, **kw) -> dict:
    """The run's parameters (:data:`DEFAULTS`, or :data:`TOY`, updated by ``kw``), all checked."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    check_split(p)
    for name in ("noise", "keep"):
        if not 0 < p[name] < 1:
            raise ArgumentError(f"{name} must be in (0, 1), got {p[name]!r}")
    if not p["lr"] > 0:
        raise ArgumentError(f"lr must be > 0, got {p['lr']!r}")
    if not 1 <= p["knn"] <= p["n_val"]:
        raise ArgumentError(f"knn must be in [1, n_val={p['n_val']}], got {p['knn']!r}")
    return p


def config(p: dict) -> digits.TrainConfig:
    return digits.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.2,
                         logit_scale=0.5, momentum=0.9, weight_decay=5e-4)


def knn_scores(split: dict, y_noisy, k: int) -> np.ndarray:
    """A ``k``-nearest-neighbour classifier on the clean validation set: the probability of each given label."""
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k).fit(split["x_val"], split["y_val"])
    proba = knn.predict_proba(split["x_train"])
    column = {int(c): j for j, c in enumerate(knn.classes_)}  # a class absent from the validation set scores 0
    return np.array([proba[i, column[int(c)]] if int(c) in column else 0.0 for i, c in enumerate(y_noisy)])


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = params(toy, **kw)
    resolve_engine(engine)
    clock = Timer()
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    y_noisy, flipped = digits.flip_labels(split["y_train"], p["noise"], seed=p["seed"])
    cfg = config(p)
    fit_seeds, unseen_seeds = seed_groups(p)
    n = p["n_train"]
    k = int(round(p["keep"] * n))

    def evaluate(state, seed):
        metrics = digits.evaluate(cfg, state["params"], split["x_test"], split["y_test"])
        return {"test_acc": metrics["acc"], "test_loss": metrics["loss"]}

    task = weights.WeightedTask(
        lambda seed: digits.make_task(cfg.with_(init_seed=seed, batch_seed=seed), split, role="weights",
                                      y_train=y_noisy),
        n, evaluate, lambda state, seed: digits.per_example_loss(cfg, state["params"], split["x_train"], y_noisy))
    log(f"[{NAME}] n_train={n} flipped={int(flipped.sum())} keep={k} T={cfg.steps} MGD steps={p['steps']} on seeds "
        f"{fit_seeds}, reported on unseen seeds {unseen_seeds}", progress)
    aurocs = []

    def callback(i, z, value, grad):
        # at step 0 all weights tie; rank by the metagradient itself (upweighting hurts -> flipped)
        aurocs.append(auroc(flipped, grad) if i == 0 else auroc(flipped, -z))
        return {"auroc": aurocs[-1]}

    selection = weights.select(task, keep=p["keep"], fit_seeds=fit_seeds, eval_seeds=unseen_seeds,
                               primary="test_acc", steps=p["steps"], lr=p["lr"],
                               scores={"val kNN": knn_scores(split, y_noisy, p["knn"])},
                               references={"clean only (oracle)": ~flipped}, callback=callback, progress=progress,
                               seed=p["seed"], engine=engine)
    methods = selection.comparison["methods"]
    for m, z in selection.selections.items():
        methods[m].update(kept_fraction=float(z.mean()), flipped_kept=int(z[flipped].sum()),
                          clean_dropped=int((1 - z)[~flipped].sum()))
    for m, s in selection.scores.items():
        methods[m]["detection_auroc"] = auroc(flipped, -np.asarray(s, np.float64))
    met = methods[MGD]["test_acc"]["mean"] >= methods["loss ranking"]["test_acc"]["mean"]
    comparison = compare(methods, primary="test_acc", higher_is_better=True, mgd=MGD, references=REFERENCES,
                         unit=f"{len(unseen_seeds)} unseen training seeds",
                         target="MGD's test accuracy >= the loss-ranking filter's at the same kept fraction",
                         target_met=met)
    hist = selection.history
    result = {"application": NAME, "engine": selection.engine, "params": p, "comparison": comparison,
              "metrics": {"seeds": {"fit": fit_seeds, "unseen": unseen_seeds}, "kept": k,
                          "flipped": int(flipped.sum()),
                          "val_loss_start": hist.values[0], "val_loss_last": hist.values[-1],
                          "mgd_detection_auroc_by_step": aurocs},
              "targets": {comparison["target"]: met},
              "history": hist.summary(),
              "seconds": {"total": clock(), **selection.seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, aurocs, comparison, hist.z, flipped)
    log(f"[{NAME}] test acc on {len(unseen_seeds)} unseen seeds, keeping {k}/{n}: "
        + ", ".join(f"{m} {v['test_acc']['mean']:.4f}+-{v['test_acc']['sem']:.4f}" for m, v in methods.items())
        + f" | {clock():.1f}s", progress)
    return result


def _plot(out, hist, aurocs, comparison, z, flipped):
    pyplot = plt()
    fig, ax = pyplot.subplots(1, 4, figsize=(19, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.4, 1]})
    ax[0].plot(hist.values, marker=".")
    ax[0].set(xlabel="MGD step", ylabel="validation loss", title="phi = validation loss (fit seeds)")
    ax[1].plot(aurocs, marker=".", color="C3", label="MGD")
    for j, m in enumerate(("loss ranking", "val kNN", "first metagradient")):
        ax[1].axhline(comparison["methods"][m]["detection_auroc"], color=f"C{j}", ls="--", label=m)
    ax[1].set(xlabel="MGD step", ylabel="AUROC (flipped vs clean)", title="detection of flipped labels")
    ax[1].legend(fontsize=7)
    plot_comparison(ax[2], comparison, title="test accuracy, same kept fraction, unseen seeds")
    bins = np.linspace(0, 1, 21)
    ax[3].hist(z[~flipped], bins=bins, alpha=0.7, label="clean")
    ax[3].hist(z[flipped], bins=bins, alpha=0.7, label="flipped")
    ax[3].set(xlabel="MGD weight z_i", ylabel="count", title="final weights")
    ax[3].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_selection.png"), dpi=110)
    pyplot.close(fig)
