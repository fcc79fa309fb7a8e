"""Accuracy-degrading data poisoning by metagradient ascent (MGD-DP).

Setup (sklearn digits): the first ``fraction`` of the training examples are
replaced by poison images ``z`` (``[n_poison, 64]``, pixels kept in ``[0, 1]``
by projection; their labels stay those of the replaced examples). ``A(z)`` is
minibatch SGD with momentum on the poisoned training set; ``phi`` is the mean
validation cross-entropy, *maximized* by signed steps
``z <- clip(z + lr * sign(g), 0, 1)``, starting from the clean images.
Successive MGD steps cycle over ``seeds`` training seeds (initialization and
batch order) so the poison does not overfit one training trajectory.

Baseline attack on the same examples: keep the clean images and flip each label
to its most confusing class (the highest wrong-class logit of a model trained on
clean data).

Reported: test accuracy after training on clean data, on the label-flip
baseline and on the MGD poison, averaged over the ``seeds`` seeds MGD used and
over ``eval_seeds`` *unseen* seeds (transfer to training runs the attack never
saw); the drop ratio MGD/baseline for both.
"""

from __future__ import annotations

import os

import numpy as np

from metagrad import mgd
from metagrad.applications import digits as D
from metagrad.applications.common import ArgumentError, Metagradient, merge_params, Timer, log, plt, write_result

NAME = "poisoning"
DEFAULTS = dict(steps=150, fraction=0.03, n_train=1000, n_val=300, lr=0.02, seeds=8, eval_seeds=4, train_steps=400,
                hidden=128, batch_size=100, seed=0)
TOY = dict(steps=2, fraction=0.05, n_train=120, n_val=40, lr=0.05, seeds=1, eval_seeds=1, train_steps=6, hidden=8,
           batch_size=20, seed=0)


def config(p: dict) -> D.TrainConfig:
    return D.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         logit_scale=1.0, momentum=0.9, weight_decay=5e-4)


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    if not 0 < p["fraction"] < 1:
        raise ArgumentError(f"fraction must be in (0, 1), got {p['fraction']!r}")
    if p["seeds"] < 1 or p["eval_seeds"] < 0:
        raise ArgumentError(f"seeds must be >= 1 and eval_seeds >= 0, got {p['seeds']!r}, {p['eval_seeds']!r}")
    clock = Timer()
    split = D.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    n_poison = max(1, int(round(p["fraction"] * p["n_train"])))
    cfg = config(p)

    def tasks_for(seeds, y_train=None):
        return [D.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="poison", y_train=y_train)
                for s in seeds]

    train_seeds = list(range(p["seeds"]))
    unseen_seeds = list(range(1000, 1000 + p["eval_seeds"]))
    tasks = tasks_for(train_seeds)
    z0 = split["x_train"][:n_poison].copy()
    meta = Metagradient(tasks, z0, engine=engine)
    log(f"[{NAME}] engine={meta.engine} poison {n_poison}/{p['n_train']} examples, T={cfg.steps}, "
        f"MGD steps={p['steps']}", progress)

    hist = mgd.run(meta, z0, steps=p["steps"], direction="maximize", step_rule=mgd.sign_step(p["lr"]),
                   projection=mgd.pixel_range(0.0, 1.0), progress=progress, label=f"[{NAME}] mgd")
    z = hist.z
    mgd_seconds = clock()

    from metagrad import baselines

    def accuracy(ts, images):
        accs = []
        for task in ts:
            state = baselines.train(task, np.asarray(images, np.float32))
            accs.append(D.evaluate(cfg, state["params"], split["x_test"], split["y_test"])["acc"])
        return float(np.mean(accs)) if accs else float("nan")

    # baseline: most confusing label for each poisoned example under a clean model
    clean_state = baselines.train(tasks[0], z0)
    logits = np.array(D.apply(cfg, clean_state["params"], z0))
    y_true = split["y_train"][:n_poison]
    logits[np.arange(n_poison), y_true] = -np.inf
    y_flip = np.array(split["y_train"], copy=True)
    y_flip[:n_poison] = logits.argmax(axis=1)

    groups = {"mgd_seeds": train_seeds, "unseen_seeds": unseen_seeds}
    metrics = {}
    for name, seeds in groups.items():
        if not seeds:
            continue
        plain = tasks_for(seeds)
        flipped = tasks_for(seeds, y_train=y_flip)
        clean = accuracy(plain, z0)
        poisoned = accuracy(plain, z)
        base = accuracy(flipped, z0)
        drop_mgd, drop_base = clean - poisoned, clean - base
        metrics[name] = {"test_acc_clean": clean, "test_acc_labelflip_baseline": base, "test_acc_mgd_poison": poisoned,
                         "drop_labelflip": drop_base, "drop_mgd": drop_mgd,
                         "drop_ratio_mgd_over_baseline": drop_mgd / drop_base if drop_base > 0 else float("inf")}
    metrics["val_loss_start"] = hist.values[0] if hist.values else None
    metrics["val_loss_last"] = hist.values[-1] if hist.values else None
    metrics["mean_abs_pixel_change"] = float(np.mean(np.abs(z - z0)))
    metrics["n_poison"] = n_poison
    headline = metrics.get("unseen_seeds") or metrics["mgd_seeds"]
    result = {"application": NAME, "engine": meta.engine, "params": p, "metrics": metrics,
              "targets": {"drop_ratio>=3 (unseen seeds)": headline["drop_ratio_mgd_over_baseline"] >= 3,
                          "drop_ratio>=3 (mgd seeds)": metrics["mgd_seeds"]["drop_ratio_mgd_over_baseline"] >= 3},
              "history": hist.summary(),
              "seconds": {"total": clock(), "mgd": mgd_seconds, "metagradients": meta.seconds,
                          "compile": meta.compile_seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, z0, z, y_true)
    m = metrics["mgd_seeds"]
    log(f"[{NAME}] test acc (MGD seeds): clean {m['test_acc_clean']:.4f}, label-flip "
        f"{m['test_acc_labelflip_baseline']:.4f}, MGD poison {m['test_acc_mgd_poison']:.4f}, drop ratio "
        f"{m['drop_ratio_mgd_over_baseline']:.2f}", progress)
    if "unseen_seeds" in metrics:
        m = metrics["unseen_seeds"]
        log(f"[{NAME}] test acc (unseen seeds): clean {m['test_acc_clean']:.4f}, label-flip "
            f"{m['test_acc_labelflip_baseline']:.4f}, MGD poison {m['test_acc_mgd_poison']:.4f}, drop ratio "
            f"{m['drop_ratio_mgd_over_baseline']:.2f} | {clock():.1f}s", progress)
    return result


def _plot(out, hist, z0, z, labels):
    pyplot = plt()
    k = min(8, len(z0))
    fig = pyplot.figure(figsize=(13, 3.8))
    grid = fig.add_gridspec(2, k + 5)
    ax = fig.add_subplot(grid[:, :4])
    ax.plot(hist.values, marker=".", markersize=3)
    ax.set(xlabel="MGD step", ylabel="validation loss", title="phi (maximized)")
    for row, (imgs, name) in enumerate(((z0, "clean"), (z, "poison"))):
        for j in range(k):
            a = fig.add_subplot(grid[row, 5 + j])
            a.imshow(np.asarray(imgs[j]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(name, fontsize=9)
            if row == 0:
                a.set_title(f"label {int(labels[j])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "poisoning.png"), dpi=110)
    pyplot.close(fig)
