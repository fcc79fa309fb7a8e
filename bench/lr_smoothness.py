"""Does the learning-rate task's metagradient predict phi? Momentum 0.9 against 0.5.

    python bench/lr_smoothness.py                    # the lr-schedule application's task, 4 seeds
    python bench/lr_smoothness.py --momenta 0.9,0.7,0.5 --directions 16

For each momentum and each base schedule (geometric decay from ``peak`` to
``peak / 10`` at the application's 8 knots, in log rate), one metagradient
``g`` at ``z`` and, for random unit directions ``u``, the first-order
prediction ``h g . u`` against the real change ``phi(z + h u) - phi(z)``
(``phi`` = mean validation loss of the seed ensemble). Pearson and Spearman
correlation across directions and the fraction of agreeing signs: near 1 the
training is metasmooth there and MGD can follow the metagradient; near 0 it
follows noise. This is why the lr-schedule application trains with momentum 0.5.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr

from metagrad.applications import digits
from metagrad.applications import lr_schedule as L
from metagrad.applications.common import Metagradient


def prediction_check(meta: Metagradient, z: np.ndarray, h: float, directions: int, rng) -> dict:
    v0, g = meta(z)
    predicted, actual = [], []
    for _ in range(directions):
        u = rng.standard_normal(z.shape).astype(z.dtype)
        u /= np.linalg.norm(u)
        v1, _ = meta(z + h * u)
        predicted.append(h * float(np.dot(g, u)))
        actual.append(float(v1 - v0))
    predicted, actual = np.array(predicted), np.array(actual)
    return {"pearson": float(np.corrcoef(predicted, actual)[0, 1]), "spearman": float(spearmanr(predicted, actual)[0]),
            "signs": float(np.mean(np.sign(predicted) == np.sign(actual))),
            "mean_abs_predicted": float(np.abs(predicted).mean()), "mean_abs_actual": float(np.abs(actual).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--momenta", default="0.9,0.5")
    parser.add_argument("--peaks", default="0.3,1.0")
    parser.add_argument("--steps-h", default="0.05,0.2", help="finite step sizes h in log rate")
    parser.add_argument("--directions", type=int, default=12)
    parser.add_argument("--engine", default="auto", choices=("auto", "metagrad", "jax"))
    args = parser.parse_args()
    p = dict(L.DEFAULTS)
    split = digits.load_split(p["n_train"], p["n_val"], seed=p["seed"])
    print(f"lr-schedule task: {p['seeds']} seeds, T={p['train_steps']}, {p['knots']} knots; "
          f"{args.directions} random directions per row")
    print(f"{'momentum':>8} {'peak':>5} {'h':>5} {'pearson':>8} {'spearman':>9} {'signs':>6} "
          f"{'|pred|':>8} {'|real|':>8}")
    for momentum in (float(m) for m in args.momenta.split(",")):
        cfg = L.config(p).with_(momentum=momentum)
        task = digits.ensemble([digits.make_task(cfg.with_(init_seed=s, batch_seed=s), split, role="lr")
                           for s in range(p["seeds"])])
        rng = np.random.default_rng(0)
        for peak in (float(x) for x in args.peaks.split(",")):
            z = np.log(np.geomspace(peak, peak / 10, p["knots"])).astype(np.float32)
            meta = Metagradient(task, z, engine=args.engine)
            for h in (float(x) for x in args.steps_h.split(",")):
                r = prediction_check(meta, z, h, args.directions, rng)
                print(f"{momentum:8.2f} {peak:5.2f} {h:5.2f} {r['pearson']:8.2f} {r['spearman']:9.2f} "
                      f"{r['signs']:6.2f} {r['mean_abs_predicted']:8.4f} {r['mean_abs_actual']:8.4f}", flush=True)


if __name__ == "__main__":
    main()
