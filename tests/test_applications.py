"""Applications: the digits tasks compute what they claim, each CLI subcommand runs end to end at
toy size and writes its files, and bad arguments fail with messages naming them."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad import baselines
from metagrad._src import cli
from metagrad.applications import common, lr_schedule, smoothness
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
    with pytest.raises(ValueError, match="same init/step/output"):
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


def test_lr_grid_schedules():
    T = 50
    for fam in lr_schedule.FAMILIES:
        lrs = lr_schedule.schedule(fam, 0.5, T)
        assert lrs.shape == (T,) and np.all(lrs > 0) and lrs.max() == pytest.approx(0.5)
    coarse = lr_schedule.grid(10, T, 0.01, 1.0)
    fine = lr_schedule.grid(10, T, 0.01, 1.0, refine=4)
    assert len(coarse) == 10 and len(fine) == 5 * (1 * 4 + 1)
    fine_keys = {(f, round(p, 9)) for f, p, _ in fine}
    assert all((f, round(p, 9)) in fine_keys for f, p, _ in coarse)
    np.testing.assert_allclose(lr_schedule.knots_to_steps(np.log([0.1, 0.4]), 3), [0.1, 0.2, 0.4])  # geometric mid


# --------------------------------------------------------------------------- #
# the command line
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("app,png", [("data-selection", "data_selection.png"), ("poisoning", "poisoning.png"),
                                     ("lr-schedule", "lr_schedule.png"), ("attribution", "attribution.png"),
                                     ("smoothness", "smoothness.png")])
def test_cli_runs_each_application(tmp_path, capsys, app, png):
    out = tmp_path / app
    assert cli.main(["run", app, "--toy", "--quiet", "--engine", "jax", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    result = json.loads((out / "result.json").read_text())
    assert (out / png).stat().st_size > 1000
    assert result["application"] == printed["application"] == app
    assert result["engine"] == "jax"
    assert printed["metrics"] and result["metrics"]
    if "history" in result:
        assert result["history"]["steps_done"] == result["params"]["steps"]


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
    (["run", "poisoning", "--steps", "-1"], "--steps must be >= 0"),
    (["run", "data-selection", "--engine", "torch"], "invalid choice"),
    (["run", "data-selection", "--toy", "--set", "noise=1.5"], "noise must be in (0, 1)"),
    (["run", "smoothness", "--toy", "--set", "groups=colour"], "groups: unknown"),
])
def test_cli_bad_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_application_functions_reject_bad_arguments():
    from metagrad.applications import attribution, data_selection, poisoning

    with pytest.raises(common.ArgumentError, match="unknown argument.*colour"):
        data_selection.run(toy=True, progress=False, colour=3)
    with pytest.raises(common.ArgumentError, match="steps must be an int"):
        poisoning.run(toy=True, progress=False, steps=2.5)
    with pytest.raises(common.ArgumentError, match="fractions must be in"):
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
