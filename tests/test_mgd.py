"""MGD: step rules (Optax), projections, history save/resume, progress, argument checking."""

import io
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import optax
import pytest

from metagrad import mgd


def quadratic(target):
    """phi(z) = 0.5 ||z - target||^2 on a dict pytree."""

    def fn(z):
        d = {k: z[k] - target[k] for k in z}
        return 0.5 * sum(float(np.sum(v ** 2)) for v in d.values()), d

    return fn


TARGET = {"a": np.array([0.3, -2.0, 0.7, 2.5], np.float32), "b": np.array([[1.5, 0.25]], np.float32)}
Z0 = {"a": np.zeros(4, np.float32), "b": np.zeros((1, 2), np.float32)}


@pytest.mark.parametrize("rule", [mgd.sign_step(0.05), optax.sgd(0.5), optax.adam(0.1)])
def test_rules_decrease_a_quadratic(rule):
    h = mgd.run(quadratic(TARGET), Z0, steps=60, direction="minimize", step_rule=rule, progress=False)
    assert h.values[-1] < 0.05 * h.values[0]
    assert h.best_value == min(h.values)
    np.testing.assert_allclose(h.best_z["a"], h.snapshots.get(h.best_step, h.best_z)["a"])


def test_maximize_goes_uphill_and_projection_holds():
    # maximize -phi = minimize phi... here maximize ||z - target||^2 inside a box: corners
    h = mgd.run(quadratic(TARGET), Z0, steps=30, direction="maximize", step_rule=mgd.sign_step(0.2),
                projection=mgd.box(-1.0, 1.0), progress=False)
    assert h.values[-1] > h.values[0]
    np.testing.assert_array_equal(h.z["a"], np.array([-1.0, 1.0, -1.0, -1.0], np.float32))
    assert h.z["a"].dtype == np.float32


def test_sign_step_exact_arithmetic():
    """A schedule is read at the MGD step count (0, 1, ...); a zero gradient does not move z."""
    calls = []

    def lr(i):
        calls.append(i)
        return 0.1 * (i + 1)

    def minimize(g):
        return lambda z: (0.0, {"a": g})

    z0 = {"a": np.zeros(3, np.float32)}
    h = mgd.run(minimize(np.array([2.0, -3.0, 0.0])), z0, steps=1, direction="minimize",
                step_rule=mgd.sign_step(lr), progress=False)
    h = mgd.run(minimize(np.array([1.0, 1.0, 1.0])), z0, steps=2, direction="minimize",
                step_rule=mgd.sign_step(lr), history=h, progress=False)
    np.testing.assert_allclose(h.z["a"], [-0.3, -0.1, -0.2], rtol=1e-6)


def test_maximize_hands_the_rule_the_negated_gradient():
    """Adam's first step is lr * sign(descent direction): maximizing moves z up the gradient."""
    h = mgd.run(lambda z: (0.0, {"a": np.array([1e-6, -3.0], np.float32)}), {"a": np.ones(2, np.float32)},
                steps=1, direction="maximize", step_rule=optax.adam(0.01, eps=0.0), progress=False)
    np.testing.assert_allclose(h.z["a"], [1.01, 0.99], rtol=1e-6)


def test_projections_stay_in_their_sets():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = {"v": (3 * rng.normal(size=17)).astype(np.float32)}
        b = mgd.box(-0.5, 2.0)(x)["v"]
        assert b.min() >= -0.5 and b.max() <= 2.0
        p = mgd.pixel_range(0.0, 1.0)(x)["v"]
        assert p.min() >= 0 and p.max() <= 1
        s = mgd.simplex(2.0)(x)["v"]
        assert s.min() >= 0 and abs(float(s.sum()) - 2.0) < 1e-5
        hard = mgd.top_k(5)(x)["v"]
        assert set(np.unique(hard)) <= {0.0, 1.0} and hard.sum() == 5
        np.testing.assert_array_equal(np.sort(np.argsort(-x["v"])[:5]), np.sort(np.nonzero(hard)[0]))
        soft = mgd.top_k(5, soft=True)(x)["v"]
        assert soft.min() >= 0 and soft.max() <= 1 and abs(float(soft.sum()) - 5) < 1e-4
    # projections are projections: idempotent, and already-feasible points do not move
    y = {"v": np.array([0.2, 0.3, 0.5])}
    np.testing.assert_allclose(mgd.simplex()(y)["v"], y["v"])
    np.testing.assert_allclose(mgd.top_k(1, soft=True)(y)["v"], y["v"], atol=1e-9)
    # simplex projection is the Euclidean one: known answer
    np.testing.assert_allclose(mgd.simplex()({"v": np.array([2.0, 0.0, 1.0])})["v"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(mgd.simplex()({"v": np.array([0.5, 0.5, 0.5])})["v"], [1 / 3] * 3)


def test_leafwise_projection():
    proj = mgd.leafwise({"a": mgd.box(0, 1), "b": None})
    out = proj({"a": np.array([-1.0, 2.0]), "b": np.array([-1.0, 2.0])})
    np.testing.assert_array_equal(out["a"], [0.0, 1.0])
    np.testing.assert_array_equal(out["b"], [-1.0, 2.0])


@pytest.mark.parametrize("make_rule", [
    lambda: optax.adam(0.05), lambda: mgd.sign_step(0.03),
    lambda: optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(optax.cosine_decay_schedule(-0.1, 7))),
])
def test_history_save_load_resume_is_exact(tmp_path, make_rule):
    fn = quadratic(TARGET)
    kw = dict(direction="minimize", projection=mgd.box(-1.0, 3.0), snapshot_every=2, progress=False)
    full = mgd.run(fn, Z0, steps=7, step_rule=make_rule(), **kw)

    part = mgd.run(fn, Z0, steps=3, step_rule=make_rule(), **kw)
    path = str(tmp_path / "hist.npz")
    part.save(path)
    loaded = mgd.History.load(path, Z0, make_rule())
    assert loaded.values == part.values and loaded.steps_done == 3
    resumed = mgd.run(fn, Z0, steps=7, step_rule=make_rule(), history=loaded, **kw)

    assert resumed.values == full.values
    assert resumed.grad_norms == full.grad_norms
    for k in Z0:
        np.testing.assert_array_equal(resumed.z[k], full.z[k])
        np.testing.assert_array_equal(resumed.best_z[k], full.best_z[k])
    assert sorted(resumed.snapshots) == sorted(full.snapshots) == [0, 2, 4, 6]
    for i in full.snapshots:
        np.testing.assert_array_equal(resumed.snapshots[i]["a"], full.snapshots[i]["a"])


def test_checkpoint_path_and_callback(tmp_path):
    path = str(tmp_path / "ck.npz")
    seen = []

    def cb(i, z, value, grad):
        seen.append(i)
        return {"z0": float(z["a"][0])}

    h = mgd.run(quadratic(TARGET), Z0, steps=4, direction="minimize", step_rule=mgd.sign_step(0.1),
                callback=cb, checkpoint_path=path, progress=False)
    assert seen == [0, 1, 2, 3]
    assert [r["step"] for r in h.records] == [0, 1, 2, 3]
    assert h.records[1]["z0"] == pytest.approx(0.1)
    loaded = mgd.History.load(path, Z0, mgd.sign_step(0.1))
    assert loaded.records == h.records and loaded.values == h.values


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_in_a_terminal_only(capsys, monkeypatch):
    run = lambda **kw: mgd.run(quadratic(TARGET), Z0, steps=3, direction="minimize",  # noqa: E731
                               step_rule=mgd.sign_step(0.1), label="demo", **kw)
    run()
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no bar
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run()
    text = term.getvalue()
    assert "demo" in text and "3/3" in text and "phi=" in text and ("step/s" in text or "s/step" in text)
    assert "\r" in text  # one line redrawn in place
    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    run(progress=False)
    assert term.getvalue() == ""


def transpose(z):
    return {"a": z["a"], "b": z["b"].T}


def test_a_projection_that_changes_a_shape_is_an_error():
    """(1, 2) -> (2, 1) keeps the size: reshaping it back would silently scramble z."""
    with pytest.raises(ValueError, match=re.escape(
            "the projection returned z['b'] has shape (2, 1), but z['b'] has shape (1, 2)")):
        mgd.run(quadratic(TARGET), Z0, steps=1, direction="minimize", step_rule=mgd.sign_step(0.1),
                projection=transpose, progress=False)
    with pytest.raises(ValueError, match=re.escape(
            "metagradient_fn returned a gradient['b'] has shape (2,), but z['b'] has shape (1, 2)")):
        mgd.run(lambda z: (0.0, {"a": z["a"], "b": z["b"].ravel()}), Z0, steps=1, direction="minimize",
                step_rule=mgd.sign_step(0.1), progress=False)
    with pytest.raises(ValueError, match="the projection returned z has structure"):
        mgd.run(quadratic(TARGET), Z0, steps=1, direction="minimize", step_rule=mgd.sign_step(0.1),
                projection=lambda z: z["a"], progress=False)


def test_resuming_with_another_z_shape_is_an_error(tmp_path):
    h = mgd.run(quadratic(TARGET), Z0, steps=2, direction="minimize", step_rule=optax.adam(0.1), progress=False)
    other = {"a": np.zeros(4, np.float32), "b": np.zeros((2, 1), np.float32)}
    with pytest.raises(ValueError, match=re.escape(
            "the resumed history's z['b'] has shape (1, 2), but z0['b'] has shape (2, 1)")):
        mgd.run(quadratic(TARGET), other, steps=3, direction="minimize", step_rule=optax.adam(0.1), history=h,
                progress=False)
    path = str(tmp_path / "h.npz")
    h.save(path)
    with pytest.raises(ValueError, match=re.escape(
            "the saved z['b'] has shape (1, 2), but z0['b'] has shape (2, 1)")):
        mgd.History.load(path, other, optax.adam(0.1))
    with pytest.raises(ValueError, match=re.escape(
            f"the saved step-rule state in {path!r} has 5 leaves, but this step rule's state has 0")):
        mgd.History.load(path, Z0, mgd.sign_step(0.1))


@pytest.mark.parametrize("damage", [lambda raw: raw[:len(raw) // 2], lambda raw: b"not a zip file at all"],
                         ids=["truncated", "foreign"])
def test_a_damaged_history_file_names_its_path(tmp_path, damage):
    h = mgd.run(quadratic(TARGET), Z0, steps=2, direction="minimize", step_rule=optax.adam(0.1), progress=False)
    path = str(tmp_path / "h.npz")
    h.save(path)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(damage(raw))
    with pytest.raises(ValueError, match=re.escape(f"{path!r} cannot be read as a saved metagrad.mgd.History (")
                       + r".*delete it to start the run over"):
        mgd.History.load(path, Z0, optax.adam(0.1))


KILLED_RUN = textwrap.dedent("""
    import sys, numpy as np, optax
    from metagrad import mgd
    path, steps = sys.argv[1], int(sys.argv[2])
    target = {"a": np.linspace(-1, 1, 2_000_000, dtype=np.float32)}  # 8 MB: each save takes a while
    fn = lambda z: (0.5 * float(np.sum((z["a"] - target["a"]) ** 2)), {"a": z["a"] - target["a"]})
    z0 = {"a": np.zeros(2_000_000, np.float32)}
    history = mgd.History.load(path, z0, optax.adam(0.05)) if len(sys.argv) > 3 else None
    mgd.run(fn, z0, steps=steps, direction="minimize", step_rule=optax.adam(0.05), history=history,
            checkpoint_path=path, progress=False)
""")


def test_a_run_killed_while_it_checkpoints_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL lands while the history is written (a new checkpoint every step): the file left
    behind is the last complete one, and resuming from it ends where an uninterrupted run does."""
    script, steps = tmp_path / "run.py", 40
    script.write_text(KILLED_RUN)
    killed, full = str(tmp_path / "killed.npz"), str(tmp_path / "full.npz")
    subprocess.run([sys.executable, str(script), full, str(steps)], check=True)
    child = subprocess.Popen([sys.executable, str(script), killed, str(steps)])
    deadline = time.monotonic() + 120
    while not os.path.exists(killed + ".tmp.npz") and time.monotonic() < deadline:  # a write under way
        time.sleep(0.001)
    while not os.path.exists(killed) and time.monotonic() < deadline:  # at least one complete checkpoint
        time.sleep(0.001)
    time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    z0 = {"a": np.zeros(2_000_000, np.float32)}
    done = mgd.History.load(killed, z0, optax.adam(0.05)).steps_done
    assert 1 <= done < steps
    subprocess.run([sys.executable, str(script), killed, str(steps), "resume"], check=True)
    resumed, uninterrupted = (mgd.History.load(p, z0, optax.adam(0.05)) for p in (killed, full))
    assert resumed.steps_done == uninterrupted.steps_done == steps
    assert resumed.values == uninterrupted.values
    np.testing.assert_array_equal(resumed.z["a"], uninterrupted.z["a"])


def test_bad_arguments():
    fn = quadratic(TARGET)
    with pytest.raises(ValueError, match="direction"):
        mgd.run(fn, Z0, steps=1, direction="down", step_rule=mgd.sign_step(0.1))
    with pytest.raises(TypeError, match="direction"):
        mgd.run(fn, Z0, steps=1, step_rule=mgd.sign_step(0.1))
    with pytest.raises(ValueError, match="steps"):
        mgd.run(fn, Z0, steps=-1, direction="minimize", step_rule=mgd.sign_step(0.1))
    with pytest.raises(TypeError, match="step_rule must be an optax.GradientTransformation .* got float"):
        mgd.run(fn, Z0, steps=1, direction="minimize", step_rule=0.1)
    with pytest.raises(ValueError, match="sign_step lr must be > 0, got -1.0"):
        mgd.sign_step(-1.0)
    with pytest.raises(TypeError, match="sign_step lr must be a number or a schedule"):
        mgd.sign_step("fast")
    with pytest.raises(ValueError, match="lo <= hi"):
        mgd.box(1.0, 0.0)
    with pytest.raises(ValueError, match="top_k"):
        mgd.top_k(-2)
    with pytest.raises(ValueError, match="larger than"):
        mgd.top_k(10)({"a": np.zeros(3)})
    with pytest.raises(FloatingPointError, match="phi=nan"):
        mgd.run(lambda z: (float("nan"), z), Z0, steps=1, direction="minimize", step_rule=mgd.sign_step(0.1),
                progress=False)
