"""Metasmoothness: is the training run smooth enough for its metagradient to mean anything?

The diagnostic (after the paper's empirical metasmoothness): along a direction ``v`` in metaparameter space, train three
times, at ``z``, ``z + h v`` and ``z + 2h v``, and compare the two successive
finite-difference changes ``d1 = A(z + h v) - A(z)`` and ``d2 = A(z + 2h v) -
A(z + h v)`` coordinate by coordinate::

    S = sum_i w_i sign(d1_i) sign(d2_i) / sum_i w_i,   w_i = |d1_i| + |d2_i|

``S`` is in ``[-1, 1]``: 1 when the run responds linearly (both changes agree
in sign everywhere), about 0 when the response is noise-like, negative when it
flips. Weighting by the size of the change keeps coordinates that barely move
from dominating. ``S_params`` compares the final weights, ``S_outputs`` the
per-example validation losses. It needs training runs only, no metagradient.

Then, *does the metagradient predict?* For ``directions`` random Gaussian
directions ``u`` we compare the first-order prediction ``h g . u`` with the
actual change ``phi(A(z + h u)) - phi(A(z))`` (``phi`` = mean validation loss):
Pearson and Spearman correlation across directions, and how often the signs
agree.

Here ``z`` are per-example data weights at ``z = 1``; the table varies one
smoothing choice at a time from a deliberately rough base (ReLU MLP, SGD with
momentum, no warm-up): width, logit scale, activation, warm-up, the Adam
``eps_root``, and average vs max pooling in a small CNN (``groups`` selects
rows by group name, comma-separated; empty = all).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from metagrad import Task
from metagrad.applications import digits
from metagrad.applications.common import (ArgumentError, Metagradient, Timer, bar, check_split, log, merge_params, plt,
                                          resolve_engine, spearman, write_result)
from metagrad.applications.weights import Runs

NAME = "smoothness"
DEFAULTS = dict(h=0.05, sign_directions=4, directions=16, n_train=1000, n_val=300, train_steps=200, batch_size=100,
                seed=0, cnn=True, groups="")
TOY = dict(h=0.05, sign_directions=1, directions=4, n_train=120, n_val=40, train_steps=6, batch_size=20, seed=0,
           cnn=False, groups="base,activation")


def variants(p: dict) -> list[tuple[str, str, digits.TrainConfig]]:
    """``(group, name, config)`` rows of the table."""
    base = digits.TrainConfig(arch="mlp", hidden=128, activation="relu", logit_scale=1.0, steps=p["train_steps"],
                         batch_size=p["batch_size"], lr=0.1, momentum=0.9, weight_decay=5e-4)
    adam = base.with_(optimizer="adam", lr=0.003, activation="gelu")
    cnn = base.with_(arch="cnn", hidden=16, activation="gelu")
    smooth = base.with_(activation="gelu", logit_scale=0.5, lr=0.2, warmup=max(1, p["train_steps"] // 4),
                        decay="linear")
    rows = [
        ("base", "MLP-128 ReLU, SGD+momentum", base),
        ("width", "width 16", base.with_(hidden=16)),
        ("width", "width 512", base.with_(hidden=512)),
        ("logit scale", "logits x4", base.with_(logit_scale=4.0)),
        ("logit scale", "logits x0.25", base.with_(logit_scale=0.25)),
        ("activation", "GELU", base.with_(activation="gelu")),
        ("warm-up", "warm-up + linear decay", base.with_(warmup=max(1, p["train_steps"] // 4), decay="linear")),
        ("Adam eps_root", "Adam (GELU) eps 1e-8", adam.with_(adam_eps=1e-8)),
        ("Adam eps_root", "Adam (GELU) eps 1e-3", adam.with_(adam_eps=1e-3)),
    ]
    if p["cnn"]:
        rows += [("pooling", "CNN (GELU) avg pool", cnn.with_(pool="avg")),
                 ("pooling", "CNN (GELU) max pool", cnn.with_(pool="max"))]
    rows.append(("recipe", "GELU + logits x0.5 + warm-up", smooth))
    if p.get("groups"):
        wanted = {g.strip() for g in p["groups"].split(",") if g.strip()}
        known = {g for g, _, _ in rows}
        if wanted - known:
            raise ArgumentError(f"groups: unknown {sorted(wanted - known)}; known: {sorted(known)}")
        rows = [r for r in rows if r[0] in wanted]
    return rows


def sign_agreement(d1: np.ndarray, d2: np.ndarray) -> float:
    """``sum w sign(d1) sign(d2) / sum w`` with ``w = |d1| + |d2|`` (in ``[-1, 1]``)."""
    d1, d2 = np.asarray(d1, np.float64).ravel(), np.asarray(d2, np.float64).ravel()
    w = np.abs(d1) + np.abs(d2)
    total = w.sum()
    return float((w * np.sign(d1) * np.sign(d2)).sum() / total) if total > 0 else 1.0


def metasmoothness(params0, params1, params2) -> float:
    """The diagnostic from the weights trained at ``z``, ``z + h v``, ``z + 2h v``."""
    flat = [np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(q)])
            for q in (params0, params1, params2)]
    return sign_agreement(flat[1] - flat[0], flat[2] - flat[1])


def diagnose(task: Task, z, *, h: float = 0.05, sign_directions: int = 4, directions: int = 16,
             seed: int = 0) -> dict:
    """The metasmoothness diagnostic on any task at metaparameter ``z`` (a pytree of float arrays).

    ``S_state``: :func:`sign_agreement` of the final training state's two successive changes along
    ``sign_directions`` random sign directions of size ``h`` (every floating leaf of the state, the
    optimizer's included); ``S_outputs``: the same for the task's output (each of m outputs a coordinate).
    Then whether the metagradient predicts: over ``directions`` Gaussian directions ``u``, the first-order
    prediction ``h g . u`` of the output's mean against its actual change, by Pearson and Spearman
    correlation and sign agreement. Trains ``1 + 2 * sign_directions + directions`` times in the runtime.
    """
    from jax.flatten_util import ravel_pytree

    if sign_directions < 1 or directions < 3:
        raise ValueError(f"diagnose needs sign_directions >= 1 and directions >= 3 (a correlation over them), got "
                         f"{sign_directions} and {directions}")
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), z))
    flat = np.asarray(flat, np.float32)
    runs = Runs(lambda _: task, unravel(flat))
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=(sign_directions, flat.size)).astype(np.float32)
    gaussian = rng.normal(size=(directions, flat.size)).astype(np.float32)

    def trained(v):
        point = unravel(flat + v)
        return runs.train(0, point), runs.outputs(0, point)

    base_state, base_out = trained(np.zeros_like(flat))
    s_state, s_out = [], []
    for v in signs:
        (state1, out1), (state2, out2) = trained(h * v), trained(2 * h * v)
        s_state.append(metasmoothness(_floating(base_state), _floating(state1), _floating(state2)))
        s_out.append(sign_agreement(out1 - base_out, out2 - out1))
    value, grad = runs.compiled(0).metagradient(unravel(flat))
    g = np.asarray(ravel_pytree(grad)[0], np.float64).reshape(-1, flat.size).mean(axis=0)  # m outputs: their mean
    predicted = h * (gaussian.astype(np.float64) @ g)
    actual = np.array([trained(h * u)[1].mean() - base_out.mean() for u in gaussian])
    return {"S_state": float(np.mean(s_state)), "S_outputs": float(np.mean(s_out)),
            "pred_pearson": float(np.corrcoef(predicted, actual)[0, 1]), "pred_spearman": spearman(predicted, actual),
            "pred_sign_agreement": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "output": base_out.tolist(), "predicted": predicted.tolist(), "actual": actual.tolist()}


def _floating(state):
    return [leaf for leaf in jax.tree_util.tree_leaves(state) if np.issubdtype(np.asarray(leaf).dtype, np.floating)]


def measure(cfg: digits.TrainConfig, split: dict, p: dict, engine: str) -> dict:
    n = len(split["y_train"])
    rng = np.random.default_rng(p["seed"] + 7)
    h = p["h"]
    task = digits.make_task(cfg, split, role="weights")
    z = np.ones(n, np.float32)
    V = rng.choice([-1.0, 1.0], size=(p["sign_directions"], n)).astype(np.float32)
    U = rng.normal(size=(p["directions"], n)).astype(np.float32)
    zs = np.concatenate([z[None], z + h * V, z + 2 * h * V, z + h * U]).astype(np.float32)
    clock = Timer()
    trained = digits.train_many(task, zs)
    train_seconds = clock()
    take = lambda i: jax.tree_util.tree_map(lambda a: a[i], trained)  # noqa: E731
    val = np.asarray(jax.vmap(lambda q: digits.per_example_loss(cfg, q, split["x_val"], split["y_val"]))(trained))
    k = p["sign_directions"]
    s_params = [metasmoothness(take(0), take(1 + d), take(1 + k + d)) for d in range(k)]
    s_out = [sign_agreement(val[1 + d] - val[0], val[1 + k + d] - val[1 + d]) for d in range(k)]
    meta = Metagradient(task, z, engine=engine)
    clock = Timer()
    value, g = meta.at(0, z)
    mg_seconds = clock()
    phi = val.mean(axis=1)
    actual = phi[1 + 2 * k:] - phi[0]
    predicted = h * (U.astype(np.float64) @ np.asarray(g, np.float64))
    pear = float(np.corrcoef(predicted, actual)[0, 1]) if len(actual) > 2 else float("nan")
    return {"S_params": float(np.mean(s_params)), "S_params_each": s_params,
            "S_outputs": float(np.mean(s_out)),
            "pred_pearson": pear, "pred_spearman": spearman(predicted, actual) if len(actual) > 2 else float("nan"),
            "pred_sign_agreement": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "pred_slope": (float(np.dot(predicted, actual) / np.dot(predicted, predicted))
                           if np.any(predicted) else None),
            "val_loss": float(phi[0]), "phi_from_metagradient": value,
            "test_acc": digits.evaluate(cfg, take(0), split["x_test"], split["y_test"])["acc"],
            "engine": meta.engine, "train_seconds": train_seconds, "metagradient_seconds": mg_seconds,
            "predicted": predicted.tolist(), "actual": actual.tolist()}


def params(toy: bool = False, **kw) -> dict:
    """The run's parameters (:data:`DEFAULTS`, or :data:`TOY`, updated by ``kw``), all checked."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    check_split(p)
    if not p["h"] > 0:
        raise ArgumentError(f"h must be > 0, got {p['h']!r}")
    variants(p)  # unknown groups
    return p


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the diagnostic table; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = params(toy, **kw)
    resolve_engine(engine)
    clock = Timer()
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    table = []
    for group, name, cfg in bar(variants(p), desc=f"[{NAME}] recipes", enabled=progress):
        row = {"group": group, "name": name, **measure(cfg, split, p, engine)}
        table.append(row)
        log(f"[{NAME}] {name:32s} S_params {row['S_params']:+.3f}  S_outputs {row['S_outputs']:+.3f}  "
            f"prediction: Pearson {row['pred_pearson']:+.3f} Spearman {row['pred_spearman']:+.3f} "
            f"signs {row['pred_sign_agreement']:.2f}  val {row['val_loss']:.3f}  [{row['engine']}]", progress)
    engines = sorted({r["engine"] for r in table})
    result = {"application": NAME, "engine": "+".join(engines), "params": p,
              "metrics": {r["name"]: {k: r[k] for k in ("S_params", "S_outputs", "pred_pearson", "pred_spearman",
                                                         "pred_sign_agreement", "val_loss", "test_acc", "engine")}
                          for r in table},
              "table": table, "seconds": {"total": clock()}}
    if out is not None:
        write_result(out, result)
        _plot(out, table)
    return result


def _plot(out, table):
    pyplot = plt()
    fig, ax = pyplot.subplots(1, 2, figsize=(13, 0.42 * len(table) + 1.6))
    names = [r["name"] for r in table][::-1]
    y = np.arange(len(names))
    ax[0].barh(y - 0.2, [r["S_params"] for r in table][::-1], height=0.4, label="S (weights)")
    ax[0].barh(y + 0.2, [r["S_outputs"] for r in table][::-1], height=0.4, label="S (val losses)")
    ax[0].set_yticks(y, names, fontsize=8)
    ax[0].set(xlim=(-1, 1), xlabel="metasmoothness", title="metasmoothness (3 runs per direction)")
    ax[0].axvline(0, color="0.5", lw=0.8)
    ax[0].legend(fontsize=8)
    ax[1].barh(y, [r["pred_spearman"] for r in table][::-1], color="C2")
    ax[1].set_yticks(y, [""] * len(names))
    ax[1].set(xlim=(-1, 1), xlabel="Spearman(predicted, actual) over random directions",
              title="does the metagradient predict?")
    ax[1].axvline(0, color="0.5", lw=0.8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "smoothness.png"), dpi=110)
    pyplot.close(fig)
