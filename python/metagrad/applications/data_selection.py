"""Data selection: find and drop mislabeled training examples by metagradient descent.

Setup (sklearn digits): a random ``noise`` fraction of the training labels is
flipped to another class. ``z`` is a weight per training example (in
``[0, 1]``, start at 1); ``A(z)`` is minibatch SGD with momentum on the
``z``-weighted cross-entropy; ``phi`` is the mean cross-entropy on a clean
validation set. MGD takes signed steps ``z <- clip(z - lr * sign(g), 0, 1)``.
Successive MGD steps cycle over ``seeds`` training seeds (initialization and
batch order), so the weights do not overfit one training trajectory.

Reported: test accuracy of training on all data, on the MGD weights, on the
examples with weight > 0.5 ("selected"), and on the clean examples only (an
oracle); the AUROC of ``-z`` for telling flipped from clean examples.
Accuracies are averaged over the ``seeds`` training seeds.
"""

from __future__ import annotations

import numpy as np

from metagrad import mgd
from metagrad.applications import digits as D
from metagrad.applications.common import ArgumentError, Metagradient, merge_params, Timer, log, plt, write_result

NAME = "data-selection"
DEFAULTS = dict(steps=40, n_train=1000, n_val=300, noise=0.2, lr=0.05, seeds=4, train_steps=200, hidden=128,
                batch_size=100, seed=0)
TOY = dict(steps=2, n_train=120, n_val=40, noise=0.2, lr=0.1, seeds=1, train_steps=6, hidden=8, batch_size=20,
           seed=0)


def auroc(labels, scores) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``labels``."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, np.float64)))


def config(p: dict) -> D.TrainConfig:
    return D.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.2,
                         logit_scale=0.5, momentum=0.9, weight_decay=5e-4)


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    if not 0 < p["noise"] < 1:
        raise ArgumentError(f"noise must be in (0, 1), got {p['noise']!r}")
    if p["seeds"] < 1:
        raise ArgumentError(f"seeds must be >= 1, got {p['seeds']!r}")
    clock = Timer()
    split = D.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    y_noisy, flipped = D.flip_labels(split["y_train"], p["noise"], seed=p["seed"])
    cfg = config(p)
    tasks = [D.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="weights", y_train=y_noisy)
             for s in range(p["seeds"])]
    n = p["n_train"]
    z0 = np.ones(n, np.float32)
    meta = Metagradient(tasks, z0, engine=engine)
    log(f"[{NAME}] engine={meta.engine} n_train={n} flipped={int(flipped.sum())} T={cfg.steps} "
        f"MGD steps={p['steps']}", progress)

    aurocs = []

    def callback(i, z, value, grad):
        # at step 0 all weights tie; rank by the metagradient itself (upweighting hurts -> flipped)
        a = auroc(flipped, grad) if i == 0 else auroc(flipped, -z)
        aurocs.append(a)
        return {"auroc": a}

    hist = mgd.run(meta, z0, steps=p["steps"], direction="minimize", step_rule=mgd.sign_step(p["lr"]),
                   projection=mgd.box(0.0, 1.0), callback=callback, progress=progress, label=f"[{NAME}] mgd")
    z = hist.z
    mgd_seconds = clock()

    def test_acc(weights):
        accs, losses = [], []
        for i in range(len(tasks)):
            state = meta.train(np.asarray(weights, np.float32), i)
            ev = D.evaluate(cfg, state["params"], split["x_test"], split["y_test"])
            accs.append(ev["acc"])
            losses.append(ev["loss"])
        return float(np.mean(accs)), float(np.mean(losses))

    selected = (z > 0.5).astype(np.float32)
    acc_all, loss_all = test_acc(np.ones(n))
    acc_w, loss_w = test_acc(z)
    acc_sel, loss_sel = test_acc(selected)
    acc_clean, loss_clean = test_acc((~flipped).astype(np.float32))
    metrics = {
        "auroc": auroc(flipped, -z),
        "auroc_first_metagradient": aurocs[0] if aurocs else None,
        "test_acc_all_data": acc_all, "test_acc_mgd_weights": acc_w, "test_acc_mgd_selected": acc_sel,
        "test_acc_clean_only_oracle": acc_clean,
        "test_loss_all_data": loss_all, "test_loss_mgd_weights": loss_w,
        "val_loss_start": hist.values[0] if hist.values else None,
        "val_loss_last": hist.values[-1] if hist.values else None,
        "selected_fraction": float(selected.mean()),
        "flipped_removed_fraction": float(1 - selected[flipped].mean()) if flipped.any() else None,
        "clean_removed_fraction": float(1 - selected[~flipped].mean()),
    }
    result = {"application": NAME, "engine": meta.engine, "params": p, "metrics": metrics,
              "targets": {"auroc>=0.9": metrics["auroc"] >= 0.9,
                          "mgd_acc>all_data_acc": max(acc_w, acc_sel) > acc_all},
              "history": hist.summary(), "seconds": {"total": clock(), "mgd": mgd_seconds,
                                                     "metagradients": meta.seconds, "compile": meta.compile_seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, aurocs, z, flipped)
    log(f"[{NAME}] AUROC {metrics['auroc']:.3f} | test acc: all data {acc_all:.4f}, MGD weights {acc_w:.4f}, "
        f"MGD selected {acc_sel:.4f} (clean-only oracle {acc_clean:.4f}) | {clock():.1f}s", progress)
    return result


def _plot(out, hist, aurocs, z, flipped):
    import os

    pyplot = plt()
    fig, ax = pyplot.subplots(1, 3, figsize=(13, 3.6))
    ax[0].plot(hist.values, marker=".")
    ax[0].set(xlabel="MGD step", ylabel="validation loss", title="phi = validation loss")
    ax[1].plot(aurocs, marker=".", color="C2")
    ax[1].set(xlabel="MGD step", ylabel="AUROC (flipped vs clean)", title="detection of flipped labels")
    bins = np.linspace(0, 1, 21)
    ax[2].hist(z[~flipped], bins=bins, alpha=0.7, label="clean")
    ax[2].hist(z[flipped], bins=bins, alpha=0.7, label="flipped")
    ax[2].set(xlabel="MGD weight z_i", ylabel="count", title="final weights")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "data_selection.png"), dpi=110)
    pyplot.close(fig)
