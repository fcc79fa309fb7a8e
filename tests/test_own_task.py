"""The applications on a user's own task, at toy size, on a data set that is not digits: data selection and
attribution (metagrad.applications.weights), poisoning (inputs), learning-rate schedules (rates), the
metasmoothness diagnostic (smoothness.diagnose); and the documented Equinox example."""

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad.applications import breast_cancer, inputs, rates, smoothness, weights
from metagrad.applications.digits import batch_table, flip_labels

N, STEPS, BATCH = 40, 6, 10
SPLIT = breast_cancer.load_split(n_train=N, n_val=30, seed=0)
Y_NOISY, FLIPPED = flip_labels(SPLIT["y_train"], 0.25, seed=0, n_classes=2)


def logits(params, x):
    return x @ params["w"] + params["b"]


def xent(params, x, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits(params, x)), y[:, None], axis=1)[:, 0]


def init(z, data):
    return {"w": data["w0"], "b": jnp.zeros(2)}


def step(params, z, data, t):
    i = data["batches"][t]
    grads = jax.grad(lambda p: jnp.mean(z[i] * xent(p, data["x"][i], data["y"][i])))(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)


def validation_loss(params, z, data):
    return jnp.mean(xent(params, data["x_val"], data["y_val"]))


def held_out_losses(params, z, data):
    return xent(params, data["x_val"][:3], data["y_val"][:3])


def weighted(output=validation_loss, **fields):
    def make(seed):
        w0 = np.random.default_rng(seed).normal(scale=0.1, size=(30, 2)).astype(np.float32)
        return metagrad.Task(init=init, step=step, output=output, steps=STEPS,
                             data={"x": SPLIT["x_train"], "y": Y_NOISY, "x_val": SPLIT["x_val"],
                                   "y_val": SPLIT["y_val"], "w0": w0, "batches": batch_table(N, BATCH, STEPS, seed)})

    def evaluate(params, seed):
        return {"accuracy": float(np.mean(np.argmax(logits(params, SPLIT["x_test"]), -1) == SPLIT["y_test"])),
                "loss": float(np.mean(xent(params, SPLIT["x_test"], SPLIT["y_test"])))}

    def per_example_loss(params, seed):
        return xent(params, SPLIT["x_train"], Y_NOISY)

    return weights.WeightedTask(make, N, **{"evaluate": evaluate, "per_example_loss": per_example_loss, **fields})


def test_breast_cancer_splits_are_standardized_by_the_training_split():
    split = breast_cancer.load_split(n_train=300, n_val=100, seed=1)
    assert split["x_train"].shape == (300, 30) and len(split["y_test"]) == 569 - 400
    np.testing.assert_allclose(split["x_train"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(split["x_train"].std(0), 1, atol=1e-4)
    assert set(np.unique(split["y_train"])) == {0, 1} and split["x_train"].dtype == np.float32


def test_select_compares_every_method_on_the_unseen_seeds_by_real_training():
    task = weighted()
    result = weights.select(task, keep=0.75, fit_seeds=[0], eval_seeds=[10, 11], primary="accuracy", steps=2,
                            lr=0.1, references={"clean only": ~FLIPPED},
                            scores={"x norm": -np.abs(SPLIT["x_train"]).sum(1)}, progress=False)
    assert list(result.selections) == ["MGD", "loss ranking", "first metagradient", "x norm", "random", "all data",
                                       "clean only"]
    for name, z in result.selections.items():
        kept = 30 if name not in ("all data", "clean only") else z.sum()
        assert z.sum() == kept and set(np.unique(z)) <= {0.0, 1.0}, name
    # Each method's numbers are real trainings of its selection on the unseen seeds.
    for name, z in result.selections.items():
        want = [task.evaluate(weights.train(task, s, z), s)["accuracy"] for s in (10, 11)]
        np.testing.assert_allclose(result.comparison["methods"][name]["accuracy"]["values"], want, err_msg=name)
    # Loss ranking: one ordinary run (fit seed 0), then each example's loss on its own (possibly flipped) label.
    losses = np.asarray(xent(weights.train(task, 0), SPLIT["x_train"], Y_NOISY))
    np.testing.assert_allclose(result.scores["loss ranking"], -losses, rtol=1e-6)
    kept = result.selections["loss ranking"]
    assert losses[kept == 0].min() >= losses[kept == 1].max()
    # MGD's first step and the first-metagradient baseline use the same metagradient.
    _, grad = task.make(0).compile(np.ones(N, np.float32)).metagradient(np.full(N, 0.75, np.float32))
    np.testing.assert_allclose(result.scores["first metagradient"], -grad, rtol=1e-5, atol=1e-9)
    assert result.comparison["strongest_baseline"] in ("loss ranking", "first metagradient", "random", "x norm")
    assert result.history.steps_done == 2
    assert set(result.to_json()) >= {"comparison", "summary", "weights", "selections"}


def test_attribute_gives_each_outputs_metagradient_and_lds_scores_it_against_retraining():
    task = weighted(output=held_out_losses)
    scores = weights.attribute(task, seeds=[0])
    assert scores.shape == (3, N)
    # Row j is output j's metagradient with respect to the weights at z = 1: JAX through the unrolled run.
    want = jax.jacrev(lambda z: _unrolled_outputs(task.make(0), z))(jnp.ones(N))
    np.testing.assert_allclose(scores, np.asarray(want), rtol=1e-4, atol=1e-7)
    cheap = weights.gradient_scores(xent, weights.train(task, 0), (SPLIT["x_train"], Y_NOISY),
                                    (SPLIT["x_val"][:3], SPLIT["y_val"][:3]))
    assert set(cheap) == {"grad dot", "influence"} and cheap["grad dot"].shape == (3, N)
    result = weights.lds(task, {"metagradient": scores, **cheap}, seeds=[0], subsets=6, fraction=0.1,
                         progress=False)
    assert result.actual.shape == (6, 3) and result.removed.sum(1).tolist() == [4.0] * 6
    # The actual changes are real retrainings without each subset.
    base = _unrolled_outputs(task.make(0), jnp.ones(N))
    without = _unrolled_outputs(task.make(0), jnp.asarray(1.0 - result.removed[0]))
    np.testing.assert_allclose(result.actual[0], without - base, rtol=1e-3, atol=1e-6)
    lds = result.comparison["methods"]["metagradient"]["LDS"]
    assert lds["n"] == 3 and lds["mean"] > 0.5  # a linear model's first-order prediction ranks the subsets


def _unrolled_outputs(task, z):
    state = task.init(z, task.data)
    for t in range(task.steps):
        state = task.step(state, z, task.data, t)
    return task.output(state, z, task.data)


def test_errors_name_what_the_task_lacks():
    with pytest.raises(TypeError, match="select needs WeightedTask.evaluate"):
        weights.select(weighted(evaluate=None), keep=0.5, fit_seeds=[0], eval_seeds=[1], primary="accuracy")
    with pytest.raises(ValueError, match=r"eval_seeds must be seeds MGD never saw; \[0\] are fit seeds"):
        weights.select(weighted(), keep=0.5, fit_seeds=[0], eval_seeds=[0, 1], primary="accuracy")
    with pytest.raises(ValueError, match=r"keep must be the fraction of examples kept, in \(0, 1\)"):
        weights.select(weighted(), keep=1.5, fit_seeds=[0], eval_seeds=[1], primary="accuracy")
    with pytest.raises(ValueError, match=r"primary='acc' is not a metric of WeightedTask.evaluate \(it returns "
                                         r"\['accuracy', 'loss'\]\)"):
        weights.select(weighted(), keep=0.5, fit_seeds=[0], eval_seeds=[1], primary="acc", steps=1,
                       progress=False)
    with pytest.raises(ValueError, match=r"scores\['bad'\] must have one value per training example"):
        weights.select(weighted(), keep=0.5, fit_seeds=[0], eval_seeds=[1], primary="accuracy", steps=1,
                       scores={"bad": np.ones(3)}, progress=False)
    with pytest.raises(ValueError, match="WeightedTask.n must be the number of training examples"):
        weights.WeightedTask(lambda seed: None, 1)
    with pytest.raises(TypeError, match=r"make\(0\) returned a NoneType, not a metagrad.Task"):
        weights.attribute(weights.WeightedTask(lambda seed: None, N))
    with pytest.raises(ValueError, match=r"scores\['m'\] has 2 rows, the task has 3 outputs"):
        weights.lds(weighted(output=held_out_losses), {"m": np.ones((2, N))}, seeds=[0], subsets=3, progress=False)
    with pytest.raises(ValueError, match=r"subsets must be an int >= 3"):
        weights.lds(weighted(output=held_out_losses), {"m": np.ones((3, N))}, seeds=[0], subsets=2)


def test_the_documented_equinox_example_runs_at_toy_size():
    path = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples" / "weighted_equinox.py"
    result = runpy.run_path(str(path))["main"](toy=True)
    assert set(result["selection"]["methods"]) == {"MGD", "loss ranking", "first metagradient", "random", "all data",
                                                   "clean only (oracle)"}
    assert set(result["attribution"]["methods"]) == {"metagradient", "grad dot", "influence"}


# -- poisoning: the first K training rows are the metaparameter -------------------------------------------

K = 4
BOX = (float(SPLIT["x_train"][:K].min()) - 1.0, float(SPLIT["x_train"][:K].max()) + 1.0)


def poisoned_step(params, z, data, t):
    x = jnp.concatenate([z, data["x"][K:]])
    i = data["batches"][t]
    grads = jax.grad(lambda p: jnp.mean(xent(p, x[i], data["y"][i])))(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.5 * g, params, grads)


def poisoning_make(labels):
    def make(seed):
        w0 = np.random.default_rng(seed).normal(scale=0.1, size=(30, 2)).astype(np.float32)
        return metagrad.Task(init=init, step=poisoned_step, output=validation_loss, steps=STEPS,
                             data={"x": SPLIT["x_train"], "y": labels, "x_val": SPLIT["x_val"], "y_val": SPLIT["y_val"],
                                   "w0": w0, "batches": batch_table(N, BATCH, STEPS, seed)})
    return make


def accuracy(params, seed):
    return {"accuracy": float(np.mean(np.argmax(logits(params, SPLIT["x_test"]), -1) == SPLIT["y_test"]))}


def test_attack_raises_the_output_in_the_box_and_reports_the_drop_on_unseen_seeds():
    clean = SPLIT["x_train"][:K]
    flipped = SPLIT["y_train"].copy()
    flipped[:K] = 1 - flipped[:K]
    task = inputs.InputTask(poisoning_make(SPLIT["y_train"]), clean, accuracy)
    result = inputs.attack(task, box=BOX, fit_seeds=[0], eval_seeds=[10, 11], primary="accuracy", steps=3, lr=0.2,
                           others={"label flip": (poisoning_make(flipped), clean)}, progress=False)
    assert set(result.inputs) == {"clean", "MGD", "one metagradient"}
    for name in ("MGD", "one metagradient"):
        z = result.inputs[name]
        assert z.shape == clean.shape and z.min() >= BOX[0] and z.max() <= BOX[1], name
    assert result.history.values[-1] > result.history.values[0]  # ascent on the fit seed's validation loss
    methods = result.comparison["methods"]
    assert set(methods) == {"MGD", "one metagradient", "label flip"}
    # The drop is paired per unseen seed against the clean run, by real training.
    for name, (make, z) in {"MGD": (task.make, result.inputs["MGD"]),
                            "label flip": (poisoning_make(flipped), clean)}.items():
        runs = weights.Runs(make, clean)
        drops = [accuracy(weights.Runs(task.make, clean).train(s, clean), s)["accuracy"]
                 - accuracy(runs.train(s, z), s)["accuracy"] for s in (10, 11)]
        np.testing.assert_allclose(methods[name]["accuracy drop"]["values"], drops, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match=r"the clean inputs lie in .*, outside the box \(0.0, 1.0\)"):
        inputs.attack(task, box=(0.0, 1.0), fit_seeds=[0], eval_seeds=[1], primary="accuracy")
    with pytest.raises(ValueError, match=r"eval_seeds must be seeds the attack never saw; \[0\] are fit seeds"):
        inputs.attack(task, box=BOX, fit_seeds=[0], eval_seeds=[0], primary="accuracy")


def test_the_smoothness_diagnostic_runs_on_any_task():
    task = weighted().make(0)
    report = smoothness.diagnose(task, np.ones(N, np.float32), h=0.05, sign_directions=2, directions=5)
    assert -1 <= report["S_state"] <= 1 and -1 <= report["S_outputs"] <= 1
    assert len(report["predicted"]) == len(report["actual"]) == 5
    # A few steps of logistic regression respond almost linearly to the weights: the metagradient predicts.
    assert report["S_state"] > 0.9 and report["pred_pearson"] > 0.9
    with pytest.raises(ValueError, match="directions >= 3"):
        smoothness.diagnose(task, np.ones(N, np.float32), directions=2)


# -- learning-rate schedules: z is the log rate at knots -----------------------------------------------------

def scheduled_step(params, z, data, t):
    i = data["batches"][t]
    grads = jax.grad(lambda p: jnp.mean(xent(p, data["x"][i], data["y"][i])))(params)
    return jax.tree_util.tree_map(lambda p, g: p - rates.rate_at(z, t, STEPS) * g, params, grads)


def scheduled_make(seed):
    return metagrad.Task(init=init, step=scheduled_step, output=validation_loss, steps=STEPS,
                         data=weighted().make(seed).data)


def test_rate_at_interpolates_the_log_rate_between_knots():
    from metagrad.applications.lr_schedule import knots_to_steps

    z = np.log(np.array([0.1, 1.0, 0.01], np.float32))
    got = [float(rates.rate_at(jnp.asarray(z), t, 9)) for t in range(9)]
    np.testing.assert_allclose(got, knots_to_steps(z, 9), rtol=1e-5)


def test_tune_compares_mgds_schedule_with_every_tuned_family_on_unseen_seeds():
    def loss(params, seed):
        return {"loss": float(np.mean(xent(params, SPLIT["x_test"], SPLIT["y_test"])))}

    result = rates.tune(scheduled_make, loss, steps=STEPS, knots=3, fit_seeds=[0], eval_seeds=[10, 11],
                        primary="loss", mgd_steps=2, peaks=[0.1, 0.5, 2.0], progress=False)
    assert set(result.schedules) == {"MGD", *rates.FAMILIES, rates.FLAT}
    assert result.history.steps_done == 2
    methods = result.comparison["methods"]
    for family in rates.FAMILIES:
        assert methods[family]["peak"] in (0.1, 0.5, 2.0)
    # Every schedule's figures are real trainings of the user's task with that schedule, step by step.
    runs = weights.Runs(scheduled_make, np.zeros(STEPS, np.float32))
    for name in ("MGD", "constant"):
        want = [loss(runs.train(s, np.log(result.schedules[name])), s)["loss"] for s in (10, 11)]
        np.testing.assert_allclose(methods[name]["loss"]["values"], want, rtol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match=r"knots must be in \[2, steps=6\]"):
        rates.tune(scheduled_make, loss, steps=STEPS, knots=7, fit_seeds=[0], eval_seeds=[1], primary="loss")
