"""Applications: the digits tasks compute what they claim, each baseline's plumbing does what its name
says, each CLI subcommand runs end to end at toy size and writes its files, and bad arguments fail before
any work with messages naming them."""

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from metagrad._src import cli
from metagrad.applications import attribution, common, data_selection, lr_schedule, poisoning, smoothness, weights
from metagrad.applications import attributors as A
from metagrad.applications import digits as D
from metagrad.applications.data_selection import auroc

SPLIT = D.load_split(n_train=60, n_val=20, n_test=20, seed=3)
CFG = D.TrainConfig(hidden=8, steps=7, batch_size=20, lr=0.1)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def assert_trees_close(a, b, **kw):
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, **kw)


# --------------------------------------------------------------------------- #
# the digits tasks
# --------------------------------------------------------------------------- #

def test_split_and_label_flips():
    s = D.load_split(n_train=100, n_val=30, seed=1)
    assert s["x_train"].shape == (100, 64) and s["x_test"].shape == (1797 - 130, 64)
    assert 0.0 <= s["x_train"].min() and s["x_train"].max() <= 1.0
    y2, mask = D.flip_labels(s["y_train"], 0.2, seed=0)
    assert mask.sum() == 20
    assert np.all(y2[mask] != s["y_train"][mask]) and np.all(y2[~mask] == s["y_train"][~mask])


def test_batch_table_is_epochs_of_permutations():
    tab = D.batch_table(10, 3, 7, seed=0)
    assert tab.shape == (7, 3)
    for e in range(2):  # 3 batches per epoch (drop-last): no repeats inside an epoch
        epoch = tab[3 * e:3 * e + 3].ravel()
        assert len(set(epoch.tolist())) == 9
    np.testing.assert_array_equal(tab, D.batch_table(10, 3, 7, seed=0))


def test_roles_describe_the_same_run():
    """Weights z=1, poison z=the clean images and a constant LR schedule are all the plain run."""
    plain = baselines.train(D.make_task(CFG, SPLIT, role="weights"), jnp.ones(60))
    poison = baselines.train(D.make_task(CFG, SPLIT, role="poison"), jnp.asarray(SPLIT["x_train"][:5]))
    lr = baselines.train(D.make_task(CFG, SPLIT, role="lr"), jnp.full(3, np.log(CFG.lr), jnp.float32))
    assert_trees_close(poison, plain, rtol=1e-6, atol=1e-7)
    assert_trees_close(lr, plain, rtol=1e-5, atol=1e-6)


def test_weight_zero_removes_an_example():
    """z_i = 0 trains exactly as if example i had label noise of no consequence: its loss term is gone."""
    cfg = CFG.with_(batch_size=None, weight_decay=0.0)
    z = np.ones(60, np.float32)
    z[7] = 0.0
    y_other = np.array(SPLIT["y_train"], copy=True)
    y_other[7] = (y_other[7] + 1) % 10  # changing a zero-weight example's label changes nothing
    a = baselines.train(D.make_task(cfg, SPLIT, role="weights"), jnp.asarray(z))
    b = baselines.train(D.make_task(cfg, SPLIT, role="weights", y_train=y_other), jnp.asarray(z))
    assert_trees_close(a, b, rtol=0, atol=0)


def test_train_many_matches_single_runs():
    task = D.make_task(CFG, SPLIT, role="weights")
    zs = np.random.default_rng(0).uniform(0.5, 1.5, (3, 60)).astype(np.float32)
    many = D.train_many(task, zs, chunk=2)
    for i in range(3):
        one = baselines.train(task, jnp.asarray(zs[i]))["params"]
        assert_trees_close(jax.tree_util.tree_map(lambda a: a[i], many), one, rtol=1e-5, atol=1e-6)


def test_ensemble_is_the_mean_of_its_members():
    tasks = [D.make_task(CFG.with_(init_seed=s, batch_seed=s), SPLIT, role="lr") for s in range(3)]
    ens = D.ensemble(tasks)
    z = jnp.asarray(np.log([0.05, 0.2, 0.1]), jnp.float32)
    v, g = baselines.scan_metagradient(ens, z)
    each = [baselines.scan_metagradient(t, z) for t in tasks]
    np.testing.assert_allclose(float(v), np.mean([float(e[0]) for e in each]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g), np.mean([np.asarray(e[1]) for e in each], axis=0), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="same init/step/output functions"):
        D.ensemble([tasks[0], D.make_task(CFG, SPLIT, role="weights")])


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_digits_metagradient_matches_finite_differences(x64, arch):
    import dataclasses

    cfg = CFG.with_(arch=arch, hidden=4, steps=4, activation="gelu")
    task = D.make_task(cfg, SPLIT, role="weights")
    to64 = lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    task = dataclasses.replace(task, data=jax.tree_util.tree_map(to64, task.data))
    z = np.ones(60)
    v, g = baselines.scan_metagradient(task, jnp.asarray(z))
    assert np.asarray(g).dtype == np.float64
    u = np.random.default_rng(0).normal(size=60)
    h = 1e-4
    phi = lambda zz: float(task.output(baselines.train(task, jnp.asarray(zz)), zz, task.data))  # noqa: E731
    fd = (phi(z + h * u) - phi(z - h * u)) / (2 * h)
    np.testing.assert_allclose(fd, float(np.asarray(g) @ u), rtol=1e-6)


def test_engines_agree():
    task = D.make_task(CFG, SPLIT, role="weights")
    z = np.ones(60, np.float32)
    v_jax, g_jax = common.Metagradient(task, z, engine="jax")(z)
    v_rt, g_rt = common.Metagradient(task, z, engine="metagrad")(z)
    np.testing.assert_allclose(v_rt, v_jax, rtol=1e-6)
    np.testing.assert_allclose(g_rt, g_jax, rtol=1e-4, atol=1e-7)


def test_metagradient_cycles_over_tasks():
    tasks = [D.make_task(CFG.with_(init_seed=s, batch_seed=s), SPLIT, role="weights") for s in range(2)]
    z = np.ones(60, np.float32)
    m = common.Metagradient(tasks, z, engine="jax")
    first, second, third = m(z), m(z), m(z)
    assert first[0] != second[0] and first[0] == third[0]
    assert first[0] == m.at(0, z)[0]


# --------------------------------------------------------------------------- #
# pieces of the applications
# --------------------------------------------------------------------------- #

def test_auroc():
    assert auroc([1, 1, 0, 0], [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.9, 0.8]) == 0.0
    assert auroc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_sign_agreement():
    d = np.array([1.0, -2.0, 0.5])
    assert smoothness.sign_agreement(d, 3 * d) == 1.0
    assert smoothness.sign_agreement(d, -d) == -1.0
    # weighted by size: the big coordinate that flips dominates
    assert smoothness.sign_agreement([1.0, 10.0], [1.0, -10.0]) == pytest.approx((2 - 20) / 22)


def test_standard_schedules_peak_and_stay_positive():
    T = 50
    for fam in lr_schedule.FAMILIES:
        lrs = lr_schedule.schedule(fam, 0.5, T)
        assert lrs.shape == (T,) and np.all(lrs > 0), fam
        assert lrs.max() == pytest.approx(0.5, rel=2e-3), fam
        np.testing.assert_allclose(lr_schedule.schedule(fam, 0.1, T), np.asarray(
            jax.vmap(lr_schedule.FAMILIES[fam](0.1, T))(jnp.arange(T))), rtol=1e-5)  # peak x shape
    np.testing.assert_allclose(lr_schedule.schedule("cosine", 0.5, T)[[0, -1]], [0.5, 5e-4], rtol=1e-5)
    warm = lr_schedule.schedule("warm-up + linear decay", 0.5, T)
    assert warm[0] == pytest.approx(0.02) and warm.argmax() == 5 and warm[-1] == pytest.approx(5e-4, rel=1e-3)
    np.testing.assert_allclose(lr_schedule.knots_to_steps(np.log([0.1, 0.4]), 3), [0.1, 0.2, 0.4])  # geometric mid


# --------------------------------------------------------------------------- #
# the evaluation protocol
# --------------------------------------------------------------------------- #

def test_spread_is_mean_and_standard_error():
    s = common.spread([1.0, 2.0, 3.0, 6.0])
    assert s["mean"] == 3.0 and s["n"] == 4
    assert s["sem"] == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    assert np.isnan(common.spread([4.0])["sem"])


def test_compare_picks_the_strongest_baseline_not_a_reference():
    sp = common.spread
    methods = {"mgd": {"acc": sp([0.90, 0.92])}, "weak": {"acc": sp([0.80, 0.82])},
               "strong": {"acc": sp([0.91, 0.89])}, "oracle": {"acc": sp([0.99, 0.99])}}
    c = common.compare(methods, primary="acc", higher_is_better=True, references=("oracle",), unit="2 seeds",
                       target="t", target_met=True)
    assert c["strongest_baseline"] == "strong" and c["mgd_beats_strongest"]
    assert c["mgd_minus_strongest"]["values"] == pytest.approx([-0.01, 0.03])  # paired per seed
    c = common.compare(methods, primary="acc", higher_is_better=False, references=("oracle",), unit="", target="")
    assert c["strongest_baseline"] == "weak" and not c["mgd_beats_strongest"]
    assert common.seed_groups({"seeds": 2, "eval_seeds": 3}) == ([0, 1], [1000, 1001, 1002])


# --------------------------------------------------------------------------- #
# the baselines' plumbing
# --------------------------------------------------------------------------- #

def test_keep_top_keeps_exactly_k_by_score_ties_by_position():
    np.testing.assert_array_equal(weights.keep_top([0.5, 0.9, 0.5, 0.1, 0.5], 3), [1, 1, 1, 0, 0])


def test_knn_scores_are_the_probability_of_the_given_label():
    split = {"x_val": np.array([[0.0], [0.1], [1.0], [1.1]], np.float32), "y_val": np.array([3, 3, 5, 5]),
             "x_train": np.array([[0.05], [1.05], [0.05]], np.float32)}
    np.testing.assert_allclose(data_selection.knn_scores(split, np.array([3, 3, 7]), k=2), [1.0, 0.0, 0.0])


def test_most_confusing_label_is_the_top_wrong_class():
    params = {"w1": np.eye(64, 8, dtype=np.float32), "b1": np.zeros(8, np.float32),
              "w2": np.eye(8, 10, dtype=np.float32), "b2": np.zeros(10, np.float32)}
    cfg = D.TrainConfig(hidden=8, activation="relu")
    x = np.zeros((2, 64), np.float32)
    x[0, [2, 4]] = [3.0, 2.0]  # logits: class 2 highest, then 4
    x[1, [1, 6]] = [1.0, 2.0]
    np.testing.assert_array_equal(poisoning.most_confusing_labels(cfg, params, x, np.array([2, 6])), [4, 1])


# the toy sizes of the CLI runs below: tests on them share compiled programs with those runs
TOY_SPLIT = D.load_split(n_train=120, n_val=40, seed=0)


def test_grad_cancel_shrinks_the_gradient_at_the_target_and_stays_in_the_box():
    cfg = poisoning.config(poisoning.params(toy=True))
    target = D.init_params(cfg, seed=5)
    z0, x_rest, y = TOY_SPLIT["x_train"][:6], TOY_SPLIT["x_train"][6:], TOY_SPLIT["y_train"]

    def grad_norm(z):
        g = jax.grad(functools.partial(D.train_loss, cfg))(target, jnp.concatenate([z, x_rest]), y)
        return float(sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(g)))

    z = poisoning.grad_cancel(cfg, target, z0, x_rest, y, steps=30)
    assert z.shape == z0.shape and z.min() >= 0.0 and z.max() <= 1.0
    assert grad_norm(z) < 0.9 * grad_norm(z0)


def logistic_task(n=24, d=5, lam=0.1, steps=300, lr=1.0):
    """Full-batch gradient descent on L2-regularised logistic regression: strongly convex, converged.
    ``phi`` is ``out_w . (test losses)``: a one-hot ``out_w`` in the data picks one test example."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) / np.sqrt(d)
    y = (x @ rng.normal(size=d) + 0.3 * rng.normal(size=n) > 0).astype(np.float64)
    data = {"x": x, "y": y, "x_test": rng.normal(size=(3, d)) / np.sqrt(d), "y_test": np.array([1.0, 0.0, 1.0]),
            "out_w": np.zeros(3)}

    def per_example(w, xx, yy):
        return jnp.logaddexp(0.0, xx @ w) - yy * (xx @ w)

    def objective(w, xx, yy, z=None):
        per = per_example(w, xx, yy)
        return jnp.mean(per if z is None else z * per) + 0.5 * lam * jnp.sum(w * w)

    task = metagrad.Task(init=lambda z, dd: jnp.zeros(dd["x"].shape[1]), steps=steps, data=data,
                         step=lambda w, z, dd, t: w - lr * jax.grad(objective)(w, dd["x"], dd["y"], z),
                         output=lambda w, z, dd: per_example(w, dd["x_test"], dd["y_test"]) @ dd["out_w"])
    return per_example, objective, task


def test_influence_equals_the_metagradient_on_a_converged_strongly_convex_problem(x64):
    """At the optimum of a strongly convex objective, d loss_test / d z_i = -(1/n) g_test^T H^-1 g_i exactly."""
    per_example, objective, task = logistic_task()
    data, ones = task.data, jnp.ones(len(task.data["y"]))
    grads = [np.asarray(baselines.scan_metagradient(dataclasses.replace(task, data={**data, "out_w": np.eye(3)[j]}),
                                                    ones)[1]) for j in range(3)]
    w = baselines.train(task, ones)
    assert float(jnp.linalg.norm(jax.grad(objective)(w, data["x"], data["y"]))) < 1e-10  # converged
    g_test = A.per_example_grads(per_example, w, data["x_test"], data["y_test"])
    g_train = A.per_example_grads(per_example, w, data["x"], data["y"])
    scores = A.influence(objective, w, g_test, g_train, damping=0.0, args=(data["x"], data["y"]))
    np.testing.assert_allclose(scores, np.stack(grads), rtol=1e-5, atol=1e-7)  # CG to a 1e-6 residual


def test_per_example_grads_grad_dot_and_tracin():
    loss = functools.partial(D.per_example_loss, CFG)
    p0, p1 = D.init_params(CFG, seed=1), D.init_params(CFG, seed=2)
    x, y = SPLIT["x_train"][:4], SPLIT["y_train"][:4]
    xt, yt = SPLIT["x_test"][:2], SPLIT["y_test"][:2]
    g = A.per_example_grads(loss, p0, x, y, chunk=2)  # chunks of the test batch's size: one compiled shape
    one = jax.grad(lambda q: loss(q, x[3:4], y[3:4])[0])(p0)
    np.testing.assert_allclose(g[3], jax.flatten_util.ravel_pytree(one)[0], rtol=1e-5, atol=1e-7)
    gt = A.per_example_grads(loss, p0, xt, yt)
    np.testing.assert_allclose(A.grad_dot(gt, g), -np.asarray(gt @ g.T), rtol=1e-6)
    g1, gt1 = A.per_example_grads(loss, p1, x, y, chunk=2), A.per_example_grads(loss, p1, xt, yt)
    np.testing.assert_allclose(A.tracin([(gt, g), (gt1, g1)], [0.5, 2.0]),
                               0.5 * A.grad_dot(gt, g) + 2.0 * A.grad_dot(gt1, g1), rtol=1e-6)


@pytest.fixture(scope="module")
def toy_attribution():
    """The attribution toy's recipe, with training example 0 replaced by a copy of test example 0."""
    p = attribution.params(toy=True)
    split = {k: np.array(v, copy=True) for k, v in TOY_SPLIT.items()}
    split["x_train"][0], split["y_train"][0] = split["x_test"][0], split["y_test"][0]
    cfg, idx = attribution.smooth_config(p), np.array([0, 1])
    scores = attribution.baseline_scores(cfg, split, idx, seed=0, every=p["tracin_every"], trak_dim=p["trak_dim"])
    values, grads, _ = attribution.test_metagradients(cfg, split, idx, seed=0, engine="jax")
    return cfg, split, idx, {attribution.METAGRADIENT: grads, **scores}, values


def test_every_attribution_method_finds_a_duplicate_of_the_test_example_helpful(toy_attribution):
    """Sign conventions: upweighting a training copy of the test example lowers its loss (negative score);
    the cheap methods, which look at gradient similarity, rank it among the most helpful."""
    _, split, _, scores, _ = toy_attribution
    n = len(split["y_train"])
    for name, sc in scores.items():
        assert sc.shape == (2, n), name
        if name.startswith("influence") and name != "influence (damping 0.1)":
            continue  # H is indefinite six steps into training: small dampings can flip signs (why it is tuned)
        assert sc[0, 0] < 0, name
        if name != attribution.METAGRADIENT:  # the exact effect through minibatch steps need not be the largest
            assert sc[0, 0] <= np.quantile(sc[0], 0.1), name


def test_test_metagradients_are_each_test_examples_metagradient(toy_attribution):
    cfg, split, idx, scores, values = toy_attribution
    for j, i in enumerate(idx):
        task = D.make_task(cfg, split, role="weights", output="weighted", x_out=split["x_test"][idx],
                           y_out=split["y_test"][idx], out_w=np.eye(len(idx))[j])
        v, g = common.Metagradient(task, np.ones(len(split["y_train"]), np.float32), engine="jax")(
            np.ones(len(split["y_train"]), np.float32))
        single = D.make_task(cfg, split, role="weights", output="weighted", x_out=split["x_test"][i:i + 1],
                             y_out=split["y_test"][i:i + 1], out_w=np.ones(1))
        v1, g1 = baselines.scan_metagradient(single, jnp.ones(len(split["y_train"])))
        np.testing.assert_allclose(values[j], v, rtol=1e-6)
        np.testing.assert_allclose(values[j], float(v1), rtol=1e-5)
        np.testing.assert_allclose(scores[attribution.METAGRADIENT][j], np.asarray(g1), rtol=1e-4, atol=1e-8)


def test_lds_of_exact_predictions_is_one():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 30))
    zs = (rng.random((12, 30)) > 0.2).astype(np.float32)
    actual = (zs - 1.0) @ scores.T
    np.testing.assert_allclose(weights.linear_datamodeling_score(scores, zs, actual), [1.0, 1.0])
    np.testing.assert_allclose(weights.linear_datamodeling_score(-scores, zs, actual), [-1.0, -1.0])


# --------------------------------------------------------------------------- #
# the command line
# --------------------------------------------------------------------------- #

# The baselines each comparison must hold (names, or the prefix of a family of settings).
BASELINES = {"data-selection": ("loss ranking", "first metagradient", "val kNN", "random"),
             "poisoning": ("label flip", "one metagradient", "GradCancel"),
             "lr-schedule": tuple(lr_schedule.FAMILIES),
             "attribution": ("grad dot", "TracIn", "influence", "TRAK")}


@pytest.mark.parametrize("app,png", [("data-selection", "data_selection.png"), ("poisoning", "poisoning.png"),
                                     ("lr-schedule", "lr_schedule.png"), ("attribution", "attribution.png"),
                                     ("smoothness", "smoothness.png")])
def test_cli_runs_each_application(tmp_path, capsys, app, png):
    out = tmp_path / app
    assert cli.main(["run", app, "--toy", "--quiet", "--engine", "jax", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert captured.err == ""  # --quiet
    result = json.loads((out / "result.json").read_text())
    assert (out / png).stat().st_size > 1000
    assert result["application"] == printed["application"] == app
    assert result["engine"] == "jax"
    if app == "smoothness":
        assert printed["metrics"] and result["metrics"]
        return
    comp = result["comparison"]
    assert printed["comparison"]["strongest_baseline"] == comp["strongest_baseline"] in comp["baselines"]
    assert comp["mgd"] in comp["methods"] and len(comp["baselines"]) >= 3
    fit, unseen = result["metrics"]["seeds"]["fit"], result["metrics"]["seeds"]["unseen"]
    assert not set(fit) & set(unseen)
    for name, row in comp["methods"].items():
        n = row[comp["primary"]]["n"]
        assert n == (result["params"]["test_examples"] if app == "attribution" else len(unseen)), name
    assert printed["targets"] == result["targets"] and len(result["targets"]) == 1
    if app == "data-selection":  # every scored method keeps the same number of examples
        kept = round(result["params"]["keep"] * result["params"]["n_train"]) / result["params"]["n_train"]
        for name in ("MGD", *BASELINES[app]):
            assert comp["methods"][name]["kept_fraction"] == pytest.approx(kept), name
    for wanted in BASELINES[app]:  # every baseline a reviewer asks for is in the comparison
        assert any(name.startswith(wanted) for name in comp["baselines"]), (wanted, comp["baselines"])
    if "history" in result:
        history = result["history"]
        assert history["steps_done"] == result["params"]["steps"]
        # MGD moved z the way it was asked to: over the same fit seeds (a metagradient per seed in
        # turn, or one of their ensemble), the objective's last values beat its first. A descent
        # that never moved z would not.
        n = 1 if app == "lr-schedule" else len(fit)
        first, last = np.mean(history["values"][:n]), np.mean(history["values"][-n:])
        assert (last < first) if history["direction"] == "minimize" else (last > first), (first, last)


def test_cli_steps_and_set(tmp_path, capsys):
    out = tmp_path / "ds"
    cli.main(["run", "data-selection", "--toy", "--quiet", "--engine", "jax", "--steps", "3", "--set", "noise=0.3",
              "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["params"]["steps"] == 3 and result["params"]["noise"] == 0.3
    assert len(result["history"]["values"]) == 3


def test_cli_default_engine_runs(tmp_path, capsys):
    """The default engine ('auto': the runtime when it is built) end to end."""
    out = tmp_path / "auto"
    cli.main(["run", "data-selection", "--toy", "--quiet", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["engine"] == common.resolve_engine("auto")


@pytest.mark.parametrize("argv,message", [
    (["run", "no-such-app"], "invalid choice"),
    (["run", "data-selection", "--set", "bogus=1"], "bogus: not a parameter of data-selection"),
    (["run", "data-selection", "--set", "noise=lots"], "noise='lots': expected float"),
    (["run", "data-selection", "--set", "noise"], "NAME=VALUE"),
    (["run", "attribution", "--steps", "5"], "--steps: attribution runs no metagradient descent"),
    (["run", "poisoning", "--steps", "-1"], "steps must be >= 1, got -1"),
    (["run", "lr-schedule", "--steps", "0"], "steps must be >= 1, got 0"),
    (["run", "data-selection", "--set", "seed=-1"], "seed must be >= 0, got -1"),
    (["run", "poisoning", "--set", "eval_seeds=0"], "eval_seeds must be >= 1, got 0"),
    (["run", "data-selection", "--set", "n_train=1700"], "n_train + n_val must leave at least 1"),
    (["run", "data-selection", "--set", "batch_size=2000"], "batch_size must be <= n_train"),
    (["run", "data-selection", "--set", "lr=nan"], "lr must be finite, got nan"),
    (["run", "data-selection", "--engine", "torch"], "invalid choice"),
    (["run", "data-selection", "--toy", "--set", "noise=1.5"], "noise must be in (0, 1)"),
    (["run", "data-selection", "--toy", "--set", "keep=0"], "keep must be in (0, 1), got 0.0"),
    (["run", "attribution", "--set", "tracin_every=7"], "tracin_every must divide train_steps=200, got 7"),
    (["run", "attribution", "--set", "fractions=0.5,2"], "fractions must be in (0, 1)"),
    (["run", "smoothness", "--toy", "--set", "groups=colour"], "groups: unknown"),
])
def test_cli_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """A file, or a folder that cannot be made, is a usage error before the application runs."""
    ran = []
    monkeypatch.setattr(data_selection, "run", lambda **kw: ran.append(kw))
    a_file = tmp_path / "result.txt"
    a_file.write_text("x")
    for out, message in ((a_file, f"--out {str(a_file)!r} is a file, not a folder"),
                         (a_file / "sub", f"--out {str(a_file / 'sub')!r}: cannot write there")):
        with pytest.raises(SystemExit) as err:
            cli.main(["run", "data-selection", "--toy", "--out", str(out)])
        assert err.value.code == 2 and message in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(SystemExit):
            cli.main(["run", "data-selection", "--toy", "--out", str(locked)])
        assert "cannot write there" in capsys.readouterr().err
    assert ran == []


def test_application_functions_reject_bad_arguments():
    with pytest.raises(common.ArgumentError, match="unknown argument.*colour"):
        data_selection.run(toy=True, progress=False, colour=3)
    with pytest.raises(common.ArgumentError, match="steps must be an int"):
        poisoning.run(toy=True, progress=False, steps=2.5)
    with pytest.raises(common.ArgumentError, match=re.escape("fractions must be in (0, 1)")):
        attribution.run(toy=True, progress=False, fractions=(0.5, 2.0))
    with pytest.raises(common.ArgumentError, match="engine must be one of"):
        data_selection.run(toy=True, progress=False, engine="torch")
    with pytest.raises(common.ArgumentError, match="lr_decay must be > 0, got 0"):
        lr_schedule.run(toy=True, progress=False, lr_decay=0.0)
    with pytest.raises(ValueError, match="TrainConfig.pool"):
        D.TrainConfig(pool="median")


def test_entry_point_lists_applications():
    exe = os.path.join(os.path.dirname(sys.executable), "metagrad")
    if not os.path.exists(exe):
        pytest.skip("the metagrad console script is not installed in this environment")
    out = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for name in cli.APPLICATIONS:
        assert name in out.stdout
