"""Accuracy-degrading data poisoning by metagradient ascent (MGD-DP), against gradient-based attacks.

Setup (sklearn digits): the first ``fraction`` of the training examples are
replaced by poison images ``z`` (``[n_poison, 64]``, pixels kept in ``[0, 1]``;
their labels stay those of the replaced examples). ``A(z)`` is minibatch SGD
with momentum (Optax) on the poisoned training set; ``phi`` is the mean
validation cross-entropy, *maximized* by signed steps ``z <- clip(z + lr *
sign(g), 0, 1)`` from the clean images, cycling over ``seeds`` training seeds
(initialization and batch order) so the poison does not fit one trajectory.

Attacks at the same budget (the same examples; the pixel attacks in the same
box), each tuned on the fit seeds only:

* ``label flip``: keep the clean images, give each the most confusing wrong
  label (the highest wrong-class logit of a model trained on clean data);
* ``one metagradient``: a single signed step ``clip(z0 + eps * sign(g0), 0, 1)``
  along the metagradient at the clean images (``eps`` chosen on the fit seeds);
* ``GradCancel``: poison pixels that make a bad target model a stationary point
  of the poisoned training loss, ``min_z ||grad_theta L(theta_target; clean +
  z)||^2`` (in the spirit of Lu et al.'s gradient cancelling; the target is a
  model trained with a fraction of labels flipped, that fraction chosen on the
  fit seeds).

Primary metric: the test accuracy drop (clean minus poisoned training, paired
per seed) on ``eval_seeds`` unseen training seeds, mean +- standard error.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metagrad.applications import digits, inputs
from metagrad.applications.common import (ArgumentError, Timer, bar, check_split, compare, log, merge_params,
                                          plot_comparison, plt, resolve_engine, seed_groups, write_result)
from metagrad.applications.inputs import MGD

NAME = "poisoning"
DEFAULTS = dict(steps=150, fraction=0.03, n_train=1000, n_val=300, lr=0.02, seeds=8, eval_seeds=8, train_steps=400,
                hidden=128, batch_size=100, cancel_steps=300, seed=0)
TOY = dict(steps=2, fraction=0.05, n_train=120, n_val=40, lr=0.05, seeds=1, eval_seeds=2, train_steps=6, hidden=8,
           batch_size=20, cancel_steps=5, seed=0)
TARGET_FLIPS = (0.1, 0.3, 0.6)  # GradCancel: fraction of labels flipped to make its target model


def params(toy: bool = False, **kw) -> dict:
    """The run's parameters (:data:`DEFAULTS`, or :data:`TOY`, updated by ``kw``), all checked."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    check_split(p)
    if not 0 < p["fraction"] < 1:
        raise ArgumentError(f"fraction must be in (0, 1), got {p['fraction']!r}")
    if not p["lr"] > 0:
        raise ArgumentError(f"lr must be > 0, got {p['lr']!r}")
    if p["cancel_steps"] < 1:
        raise ArgumentError(f"cancel_steps must be >= 1, got {p['cancel_steps']!r}")
    return p


def config(p: dict) -> digits.TrainConfig:
    return digits.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         logit_scale=1.0, momentum=0.9, weight_decay=5e-4)


def most_confusing_labels(cfg: digits.TrainConfig, clean_params: dict, images, labels) -> np.ndarray:
    """Each image's highest-scoring wrong class under a model trained on clean data."""
    logits = np.array(digits.apply(cfg, clean_params, jnp.asarray(images)))
    logits[np.arange(len(labels)), labels] = -np.inf
    return logits.argmax(axis=1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _cancel_step(cfg: digits.TrainConfig, lr: float):
    opt = optax.adam(lr)

    def objective(z, target, x_rest, y):
        x = jnp.concatenate([z, x_rest], axis=0)
        g = jax.grad(functools.partial(digits.train_loss, cfg))(target, x, y)
        return sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(g))

    def step(z, opt_state, target, x_rest, y):
        value, grad = jax.value_and_grad(objective)(z, target, x_rest, y)
        updates, opt_state = opt.update(grad, opt_state, z)
        return jnp.clip(optax.apply_updates(z, updates), 0.0, 1.0), opt_state, value

    return opt, jax.jit(step)


def grad_cancel(cfg: digits.TrainConfig, target: dict, z0, x_rest, y, steps: int, lr: float = 0.05) -> np.ndarray:
    """Poison pixels in ``[0, 1]`` minimizing the squared norm of the poisoned training loss's gradient at
    ``target`` (Adam, ``steps`` projected steps from ``z0``), so that training is drawn to ``target``."""
    opt, step = _cancel_step(cfg, float(lr))
    z = jnp.asarray(z0)
    state = opt.init(z)
    for _ in range(steps):
        z, state, _ = step(z, state, target, jnp.asarray(x_rest), jnp.asarray(y))
    return np.asarray(z)


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = params(toy, **kw)
    resolve_engine(engine)
    clock = Timer()
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    n_poison = max(1, int(round(p["fraction"] * p["n_train"])))
    cfg = config(p)
    fit_seeds, unseen_seeds = seed_groups(p)
    y_train = np.asarray(split["y_train"], np.int32)

    def tasks_for(seeds, labels=y_train):
        return [digits.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="poison", y_train=labels)
                for s in seeds]

    fit_tasks = tasks_for(fit_seeds)
    z0 = split["x_train"][:n_poison].copy()
    log(f"[{NAME}] poison {n_poison}/{p['n_train']} examples, T={cfg.steps}, MGD steps={p['steps']} on seeds "
        f"{fit_seeds}, reported on unseen seeds {unseen_seeds}", progress)

    def fit_val_loss(images):
        """phi on the fit seeds for each candidate poison (leading axis): GradCancel's tuning objective."""
        trained = digits.train_grid(fit_tasks, np.stack(images).astype(np.float32))
        return digits.evaluate_grid(cfg, trained, split["x_val"], split["y_val"])["loss"].mean(axis=1)

    clock_base = Timer()
    # GradCancel: targets trained (fit seed 0) with a fraction of the labels flipped
    clean_params = {k: v[0] for k, v in digits.train_many(fit_tasks[0], z0[None]).items()}
    cancel, cancel_targets = [], []
    for j, rho in enumerate(bar(TARGET_FLIPS, desc=f"[{NAME}] GradCancel", enabled=progress)):
        y_bad, _ = digits.flip_labels(y_train, rho, seed=p["seed"] + 17 + j)
        bad_task = digits.make_task(cfg.with_(init_seed=fit_seeds[0], batch_seed=fit_seeds[0]), split, role="poison",
                               y_train=y_bad)
        target = {k: v[0] for k, v in digits.train_many(bad_task, z0[None]).items()}
        cancel.append(grad_cancel(cfg, target, z0, split["x_train"][n_poison:], y_train, p["cancel_steps"]))
        cancel_targets.append(digits.evaluate(cfg, target, split["x_test"], split["y_test"])["acc"])
    cancel_phi = fit_val_loss(cancel)
    best_cancel = int(np.argmax(cancel_phi))
    y_flip = y_train.copy()
    y_flip[:n_poison] = most_confusing_labels(cfg, clean_params, z0, y_train[:n_poison])
    baseline_seconds = clock_base()

    def make(labels):
        return lambda seed: tasks_for([seed], labels)[0]

    def evaluate(state, seed):
        return {"test_acc": digits.evaluate(cfg, state["params"], split["x_test"], split["y_test"])["acc"]}

    attacked = inputs.attack(inputs.InputTask(make(y_train), z0, evaluate), box=(0.0, 1.0), fit_seeds=fit_seeds,
                             eval_seeds=unseen_seeds, primary="test_acc", steps=p["steps"], lr=p["lr"],
                             others={"GradCancel": (make(y_train), cancel[best_cancel]),
                                     "label flip": (make(y_flip), z0)}, progress=progress, engine=engine)
    hist = attacked.history
    images = {**attacked.inputs, "GradCancel": cancel[best_cancel]}
    found = attacked.comparison["methods"]
    methods = {m: {"accuracy_drop": found[m]["test_acc drop"], "test_acc": found[m]["test_acc"]}
               for m in (MGD, "one metagradient", "GradCancel", "label flip")}
    methods["one metagradient"]["tuning"] = {"eps": list(inputs.STEP_SIZES),
                                             "fit_val_loss": found["one metagradient"]["tuning"]["fit output"]}
    methods["GradCancel"]["tuning"] = {"target_flip_fraction": list(TARGET_FLIPS),
                                       "target_test_acc": cancel_targets, "fit_val_loss": cancel_phi.tolist()}
    for m in methods:
        if m != "label flip":
            methods[m]["mean_abs_pixel_change"] = float(np.mean(np.abs(images[m] - z0)))
    clean_acc = attacked.comparison["clean"]["test_acc"]
    strongest = max((m for m in methods if m != MGD), key=lambda m: methods[m]["accuracy_drop"]["mean"])
    drop_mgd, drop_base = methods[MGD]["accuracy_drop"]["mean"], methods[strongest]["accuracy_drop"]["mean"]
    ratio = drop_mgd / drop_base if drop_base > 0 else float("inf")
    comparison = compare(methods, primary="accuracy_drop", higher_is_better=True, mgd=MGD,
                         unit=f"{len(unseen_seeds)} unseen training seeds",
                         target="MGD's accuracy drop >= 3x the strongest non-MGD attack's", target_met=ratio >= 3)
    comparison["drop_ratio_mgd_over_strongest"] = ratio
    result = {"application": NAME, "engine": attacked.engine, "params": p, "comparison": comparison,
              "metrics": {"seeds": {"fit": fit_seeds, "unseen": unseen_seeds}, "n_poison": n_poison,
                          "test_acc_clean": clean_acc,
                          "val_loss_start": hist.values[0], "val_loss_last": hist.values[-1]},
              "targets": {comparison["target"]: ratio >= 3},
              "history": hist.summary(),
              "seconds": {"total": clock(), "baselines": baseline_seconds, **attacked.seconds}}
    if out is not None:
        write_result(out, result)
        _plot(out, hist, comparison, images, y_train[:n_poison])
    log(f"[{NAME}] accuracy drop on {len(unseen_seeds)} unseen seeds (clean {clean_acc['mean']:.4f}): "
        + ", ".join(f"{m} {v['accuracy_drop']['mean']:.4f}+-{v['accuracy_drop']['sem']:.4f}"
                    for m, v in methods.items())
        + f"; MGD / strongest ({strongest}) = {ratio:.2f} | {clock():.1f}s", progress)
    return result


def _plot(out, hist, comparison, images, labels):
    pyplot = plt()
    k = min(8, len(labels))
    rows = ("clean", MGD, "one metagradient", "GradCancel")
    fig = pyplot.figure(figsize=(18, 4.6), layout="constrained")
    left, middle, right = fig.subfigures(1, 3, width_ratios=[1, 1.3, 1.6])
    ax = left.subplots()
    ax.plot(hist.values, marker=".", markersize=3)
    ax.set(xlabel="MGD step", ylabel="validation loss", title="phi (maximized, fit seeds)")
    plot_comparison(middle.subplots(), comparison, title="accuracy drop, unseen seeds")
    axes = right.subplots(len(rows), k, squeeze=False)
    for row, name in enumerate(rows):
        for j in range(k):
            a = axes[row][j]
            a.imshow(np.asarray(images[name][j]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            a.set_xticks([])
            a.set_yticks([])
            if j == 0:
                a.set_ylabel(name, fontsize=7)
            if row == 0:
                a.set_title(f"label {int(labels[j])}", fontsize=8)
    fig.savefig(os.path.join(out, "poisoning.png"), dpi=110)
    pyplot.close(fig)
