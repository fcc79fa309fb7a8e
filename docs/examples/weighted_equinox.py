"""Data selection and attribution on your own task: an Equinox MLP on scikit-learn's breast cancer data,
30% of its training labels flipped (docs/guide.md, section 5).

    python docs/examples/weighted_equinox.py --out bench/results/weighted_equinox.json   # the documented run
    python docs/examples/weighted_equinox.py --toy    # seconds (tests/test_own_task.py runs it)
"""

import argparse
import json

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import metagrad
from metagrad.applications import breast_cancer, weights
from metagrad.applications.digits import batch_table, flip_labels


def mlp(seed: int):
    return eqx.nn.MLP(in_size=30, out_size=2, width_size=32, depth=1, key=jax.random.key(seed))


STATIC = eqx.filter(mlp(0), eqx.is_array, inverse=True)  # the model's non-array parts


def model(params):
    return eqx.combine(params, STATIC)


def xent(params, x, y):  # per example
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model(params))(x), y)


OPTIMIZER = optax.sgd(0.1, momentum=0.9)


# Defined once: the tasks of other seeds differ in their data only, and share one compilation.
def init(z, data):
    return data["params"], OPTIMIZER.init(data["params"])


def step(state, z, data, t):
    params, opt = state
    i = data["batches"][t]
    grads = jax.grad(lambda p: jnp.mean(z[i] * xent(p, data["x"][i], data["y"][i])))(params)
    updates, opt = OPTIMIZER.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt


def validation_loss(state, z, data):  # what data selection minimizes
    return jnp.mean(xent(state[0], data["x_val"], data["y_val"]))


def test_losses(state, z, data):  # what attribution attributes: m test examples' losses
    return xent(state[0], data["x_val"][:ATTRIBUTED], data["y_val"][:ATTRIBUTED])


ATTRIBUTED = 8


def problem(n_train: int, steps: int, output=validation_loss, batch: int = 32):
    split = breast_cancer.load_split(n_train=n_train, n_val=100, seed=0)
    y_noisy, flipped = flip_labels(split["y_train"], 0.3, seed=0, n_classes=2)

    def make(seed):  # the training seed: initial weights and batch order
        return metagrad.Task(init=init, step=step, output=output, steps=steps, data={
            "x": split["x_train"], "y": y_noisy, "x_val": split["x_val"], "y_val": split["y_val"],
            "batches": batch_table(n_train, batch, steps, seed), "params": eqx.filter(mlp(seed), eqx.is_array)})

    def evaluate(state, seed):
        predicted = jnp.argmax(jax.vmap(model(state[0]))(split["x_test"]), -1)
        return {"test accuracy": float(jnp.mean(predicted == split["y_test"]))}

    def per_example_loss(state, seed):
        return xent(state[0], split["x_train"], y_noisy)

    return weights.WeightedTask(make, n_train, evaluate, per_example_loss), flipped, split, y_noisy


def main(toy: bool = False) -> dict:
    n_train, steps = (60, 8) if toy else (300, 150)
    # Data selection: keep 70% of the examples, judged on seeds MGD never saw.
    task, flipped, _, _ = problem(n_train, steps)
    selection = weights.select(task, keep=0.7, fit_seeds=[0] if toy else [0, 1, 2, 3],
                               eval_seeds=[100, 101] if toy else range(100, 108), primary="test accuracy",
                               steps=2 if toy else 30, lr=0.05, references={"clean only (oracle)": ~flipped},
                               progress=not toy)
    # Attribution: the metagradients of 8 test losses, against gradient dot products and influence functions.
    task, _, split, y_noisy = problem(n_train, steps, output=test_losses)
    scores = {"metagradient": weights.attribute(task, seeds=[0]),
              **weights.gradient_scores(xent, weights.train(task, seed=0)[0], (split["x_train"], y_noisy),
                                        (split["x_val"][:ATTRIBUTED], split["y_val"][:ATTRIBUTED]))}
    attribution = weights.lds(task, scores, seeds=[100] if toy else [100, 101, 102, 103],
                              subsets=4 if toy else 50, fraction=0.1, progress=not toy)
    return {"selection": selection.summary(), "attribution": attribution.summary(),
            "flipped kept by MGD": int(selection.selections[weights.MGD][flipped].sum()),
            "flipped": int(flipped.sum())}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--toy", action="store_true")
    parser.add_argument("--out", help="also write the result (JSON) here")
    args = parser.parse_args()
    text = json.dumps({"command": "python docs/examples/weighted_equinox.py" + (" --toy" if args.toy else ""),
                       **main(args.toy)}, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
