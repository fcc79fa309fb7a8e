"""Data attribution: predict the effect of removing training data with one metagradient.

Setup (sklearn digits): ``z`` is a weight per training example; at ``z = 1``
(the normal run) the metagradient ``g = d loss_j(A(z)) / dz`` of a test
example's loss gives the linear prediction for training without a subset ``S``:
``loss_j(A(1 - 1_S)) - loss_j(A(1)) ~= g . (z_S - 1) = -sum_{i in S} g_i``.
For ``subsets`` random subsets of 1% (and 5%) of the training data we retrain
for real (all in a few vmapped programs) and report, per test example, the
Spearman (and Pearson) correlation between predicted and actual changes.

The default recipe is a smooth one (GELU, warm-up then linear decay); the
``contrast`` recipe (ReLU, constant learning rate, no warm-up) is run too, to
show what smoothness buys.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from metagrad.applications import digits as D
from metagrad.applications.common import ArgumentError, Metagradient, merge_params, Timer, log, plt, write_result

NAME = "attribution"
DEFAULTS = dict(test_examples=5, subsets=50, fractions=(0.01, 0.05), n_train=1000, n_val=300, train_steps=200,
                hidden=128, batch_size=100, seed=0, contrast=True)
TOY = dict(test_examples=2, subsets=4, fractions=(0.05, 0.2), n_train=120, n_val=40, train_steps=6, hidden=8,
           batch_size=20, seed=0, contrast=False)


def smooth_config(p: dict) -> D.TrainConfig:
    return D.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         activation="gelu", logit_scale=1.0, momentum=0.9, weight_decay=5e-4,
                         warmup=max(1, p["train_steps"] // 4), decay="linear")


def contrast_config(p: dict) -> D.TrainConfig:
    return D.TrainConfig(hidden=p["hidden"], steps=p["train_steps"], batch_size=p["batch_size"], lr=0.1,
                         activation="relu", logit_scale=1.0, momentum=0.9, weight_decay=5e-4)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


def _pearson(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def study(cfg: D.TrainConfig, split: dict, test_idx, p: dict, engine: str, progress: bool, label: str) -> dict:
    """Predicted vs actual loss changes for each test example and removal fraction under ``cfg``."""
    n = len(split["y_train"])
    rng = np.random.default_rng(p["seed"] + 1)
    base = D.make_task(cfg, split, role="weights")
    ones = np.ones(n, np.float32)
    p_full = D.train_many(base, ones[None])
    removals = {}
    for frac in p["fractions"]:
        k = max(1, int(round(frac * n)))
        zs = np.ones((p["subsets"], n), np.float32)
        for r in range(p["subsets"]):
            zs[r, rng.choice(n, k, replace=False)] = 0.0
        removals[frac] = (zs, D.train_many(base, zs))
    tasks = [D.make_task(cfg, split, role="weights", output="weighted", x_out=split["x_test"][j:j + 1],
                         y_out=split["y_test"][j:j + 1], out_w=np.ones(1)) for j in test_idx]
    meta = Metagradient(tasks, ones, engine=engine)
    rows = []
    for e, j in enumerate(test_idx):
        value, g = meta.at(e, ones)
        x, y = split["x_test"][j:j + 1], split["y_test"][j:j + 1]

        def loss_of(params):
            return np.asarray(jax.vmap(lambda q: D.per_example_loss(cfg, q, x, y)[0])(params))

        base_loss = float(loss_of(p_full)[0])
        row = {"test_index": int(j), "label": int(y[0]), "loss": base_loss, "loss_from_metagradient_call": value,
               "by_fraction": {}}
        for frac, (zs, params) in removals.items():
            actual = loss_of(params) - base_loss
            predicted = (zs - 1.0) @ np.asarray(g, np.float64)
            row["by_fraction"][str(frac)] = {"spearman": _spearman(predicted, actual),
                                             "pearson": _pearson(predicted, actual),
                                             "predicted": predicted.tolist(), "actual": actual.tolist()}
        rows.append(row)
        log(f"[{NAME}] {label} test example {j}: loss {base_loss:.4f}, Spearman "
            + ", ".join(f"{float(f):.0%}: {row['by_fraction'][str(f)]['spearman']:.3f}" for f in p["fractions"]),
            progress)
    summary = {str(f): {"mean_spearman": float(np.mean([r["by_fraction"][str(f)]["spearman"] for r in rows])),
                        "min_spearman": float(np.min([r["by_fraction"][str(f)]["spearman"] for r in rows])),
                        "mean_pearson": float(np.mean([r["by_fraction"][str(f)]["pearson"] for r in rows]))}
               for f in p["fractions"]}
    return {"config": cfg.__dict__, "engine": meta.engine, "examples": rows, "summary": summary,
            "metagradient_seconds": meta.seconds, "compile_seconds": meta.compile_seconds}


def run(*, out: str | None = None, engine: str = "auto", progress: bool = True, toy: bool = False, **kw) -> dict:
    """Run the application; keyword arguments override :data:`DEFAULTS` (or :data:`TOY`)."""
    p = merge_params(NAME, TOY if toy else DEFAULTS, kw)
    p["fractions"] = tuple(float(f) for f in p["fractions"])
    if not all(0 < f < 1 for f in p["fractions"]):
        raise ArgumentError(f"fractions must be in (0, 1), got {p['fractions']!r}")
    if p["subsets"] < 3:
        raise ArgumentError(f"subsets must be >= 3 (a rank correlation needs points), got {p['subsets']!r}")
    clock = Timer()
    split = D.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    if not 1 <= p["test_examples"] <= len(split["y_test"]):
        raise ArgumentError(f"test_examples must be in [1, {len(split['y_test'])}], got {p['test_examples']!r}")
    test_idx = np.random.default_rng(p["seed"]).choice(len(split["y_test"]), p["test_examples"], replace=False)
    smooth = study(smooth_config(p), split, test_idx, p, engine, progress, "smooth")
    studies = {"smooth": smooth}
    if p["contrast"]:
        studies["contrast"] = study(contrast_config(p), split, test_idx, p, engine, progress, "contrast")
    f0 = str(p["fractions"][0])
    result = {"application": NAME, "engine": smooth["engine"], "params": p,
              "metrics": {name: s["summary"] for name, s in studies.items()},
              "targets": {f"mean spearman>=0.8 at {float(f0):.0%} (smooth)":
                          smooth["summary"][f0]["mean_spearman"] >= 0.8},
              "studies": studies, "seconds": {"total": clock()}}
    if out is not None:
        write_result(out, result)
        _plot(out, studies, p["fractions"])
    for name, s in studies.items():
        log(f"[{NAME}] {name}: " + "; ".join(
            f"{float(f):.0%} removed: mean Spearman {v['mean_spearman']:.3f} (min {v['min_spearman']:.3f})"
            for f, v in s["summary"].items()), progress)
    return result


def _plot(out, studies, fractions):
    pyplot = plt()
    names = list(studies)
    fig, axes = pyplot.subplots(len(names), len(fractions), figsize=(4.2 * len(fractions), 3.8 * len(names)),
                                squeeze=False)
    for r, name in enumerate(names):
        for c, frac in enumerate(fractions):
            ax = axes[r][c]
            for e, row in enumerate(studies[name]["examples"][:3]):
                d = row["by_fraction"][str(frac)]
                ax.scatter(d["predicted"], d["actual"], s=10, label=f"test #{row['test_index']} "
                           f"(rho={d['spearman']:.2f})")
            lim = ax.get_xlim()
            ax.plot(lim, lim, color="0.6", lw=1)
            ax.set(xlabel="predicted change g.(z-1)", ylabel="actual change (retrained)",
                   title=f"{name}: remove {float(frac):.0%}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "attribution.png"), dpi=110)
    pyplot.close(fig)
