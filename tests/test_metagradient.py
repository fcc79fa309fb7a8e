"""Exact metagradients from the C++ runtime, checked against JAX and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from models import KINDS, make_task

STEPS = 200


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module")
def compiled_tasks():
    cache = {}

    def get(kind, optimizer, backend="enzyme", steps=STEPS):
        key = (kind, optimizer, backend, steps)
        if key not in cache:
            task, z = make_task(kind, optimizer, steps=steps)
            cache[key] = (task, z, task.compile(z, backend=backend, fuse_forward=1))
        return cache[key]
    return get


def perturbed(z, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    return (z * (1 + scale * rng.standard_normal(z.shape))).astype(z.dtype)


CASES = [(kind, "adam") for kind in KINDS] + [("weights", "sgdm"), ("lr", "sgdm")]


@pytest.mark.parametrize("kind,optimizer", CASES)
def test_matches_jax_grad_through_the_whole_training(compiled_tasks, kind, optimizer):
    task, z0, compiled = compiled_tasks(kind, optimizer)
    z = perturbed(z0)
    value, grad = compiled.metagradient(z, metagrad.Replay(k=4))
    want_value, want_grad = baselines.scan_metagradient(task, z)
    assert grad.shape == z.shape and grad.dtype == z.dtype
    np.testing.assert_allclose(value, float(want_value), rtol=1e-5)
    assert relative_error(grad, want_grad) < 1e-3
    assert np.linalg.norm(grad) > 0


def test_jax_backend_matches_enzyme_backend(compiled_tasks):
    _, z0, enzyme = compiled_tasks("poison", "adam")
    _, _, jax_backend = compiled_tasks("poison", "adam", backend="jax")
    assert jax_backend.programs["step_vjp"].backend == "jax"
    z = perturbed(z0, seed=3)
    _, g_enzyme = enzyme.metagradient(z)
    _, g_jax = jax_backend.metagradient(z)
    assert relative_error(g_enzyme, g_jax) < 1e-3


POLICIES = [metagrad.StoreAll(), metagrad.Periodic(every=16), metagrad.Replay(k=2), metagrad.Replay(k=7),
            metagrad.Budget(states=3), metagrad.Replay(k=3, block=8), metagrad.Periodic(every=24, block=8)]


def test_every_policy_gives_the_same_metagradient(compiled_tasks):
    _, z0, compiled = compiled_tasks("lr", "adam")
    z = perturbed(z0, seed=1)
    reference_value, reference = compiled.metagradient(z, metagrad.StoreAll())
    for policy in POLICIES:
        value, grad, report = compiled.metagradient(z, policy, report=True)
        assert value == reference_value, policy
        # Same programs on the same states: bit-equal except fused segments (other fusion).
        tolerance = 0 if getattr(policy, "block", 1) == 1 else 1e-5
        assert relative_error(grad, reference) <= tolerance, policy
        stats = policy.plan(STEPS).stats(STEPS)
        assert report.forward_steps == stats["forward_steps"]
        assert report.peak_saved_states == stats["peak_saved"]
        assert report.reversed_steps == STEPS


def test_report_of_a_replay_run(compiled_tasks):
    _, z0, compiled = compiled_tasks("weights", "adam")
    k = 4
    _, _, report = compiled.metagradient(z0, metagrad.Replay(k=k), report=True)
    assert report.steps == STEPS
    assert report.peak_saved_states <= k * math.ceil(math.log(STEPS, k))
    assert STEPS < report.forward_steps <= STEPS * math.ceil(math.log(STEPS, k))
    assert report.replayed_steps == report.forward_steps - STEPS
    assert report.peak_saved_bytes == report.peak_saved_states * report.state_bytes
    assert report.state_bytes == compiled.layout.state_bytes
    assert report.seconds_total >= report.seconds_forward > 0


# -- float64: central finite differences along a random direction ------------


@pytest.mark.parametrize("kind", ["weights", "lr", "wd"])
def test_central_finite_difference_in_float64(x64, kind):
    task, z0 = make_task(kind, "sgdm", steps=40, dtype="float64")
    compiled = task.compile(z0, backend="enzyme")
    z = perturbed(z0, seed=2)
    _, grad = compiled.metagradient(z, metagrad.Replay(k=3))
    assert grad.dtype == np.float64
    direction = np.random.default_rng(5).standard_normal(z.shape)
    direction /= np.linalg.norm(direction)
    h = 1e-4 * max(1.0, float(np.max(np.abs(z))))

    def phi(zz):
        state = compiled.train(zz)
        return float(task.output(state, zz, task.data))
    finite_difference = (phi(z + h * direction) - phi(z - h * direction)) / (2 * h)
    directional = float(np.sum(grad * direction))
    assert directional == pytest.approx(finite_difference, rel=1e-5, abs=1e-9)


# -- checks during the reverse pass ------------------------------------------

def test_determinism_check_passes_on_a_pure_step(compiled_tasks):
    _, z0, compiled = compiled_tasks("weights", "adam")
    value, grad, report = compiled.metagradient(z0, metagrad.Replay(k=4), check_determinism=True, report=True)
    assert report.determinism_checks > 1
    _, plain, unasked = compiled.metagradient(z0, metagrad.Replay(k=4), report=True)
    np.testing.assert_array_equal(grad, plain)
    assert unasked.determinism_checks == 1  # the one state every run with replays compares
    assert compiled.metagradient(z0, metagrad.StoreAll(), report=True)[2].determinism_checks == 0  # no replay


def test_determinism_check_catches_a_hidden_counter():
    # XLA's stateful rng_uniform reads a counter the step is not given: every
    # execution draws new numbers, so replays differ from the first pass.
    task, z0 = make_task("weights", "sgdm", steps=30)

    def noisy_step(state, z, data, t):
        params, opt_state = task.step(state, z, data, t)
        noise = jax.lax.rng_uniform(jnp.float32(0), jnp.float32(1e-3), params["b2"].shape)
        return dict(params, b2=params["b2"] + noise), opt_state

    noisy = metagrad.Task(init=task.init, step=noisy_step, output=task.output, steps=30, data=task.data)
    compiled = noisy.compile(z0, backend="jax", fuse_forward=1)
    with pytest.raises(metagrad.CheckFailed, match=r"training is not deterministic: replaying steps? \d+"):
        compiled.metagradient(z0, metagrad.Replay(k=2), check_determinism=True)
    # Unasked, the run still compares the first state a replay recomputes: the same error.
    with pytest.raises(metagrad.CheckFailed, match=r"training is not deterministic: replaying steps? \d+ .* beyond "
                                                   r"rounding"):
        compiled.metagradient(z0, metagrad.Replay(k=2))
    value, _ = compiled.metagradient(z0, metagrad.StoreAll())  # the runtime stays usable
    assert np.isfinite(value)


def test_non_finite_check_names_the_step(compiled_tasks):
    _, z0, compiled = compiled_tasks("lr", "sgdm")
    z = z0.copy()
    z[150] = np.inf  # training blows up at step 150: every later state, and so each cotangent, is non-finite
    with pytest.raises(metagrad.CheckFailed, match=r"training diverged: the state after step 150 holds NaN or Inf"):
        compiled.metagradient(z, metagrad.Replay(k=4), check_finite=True)
    _, grad = compiled.metagradient(z, metagrad.Replay(k=4))
    assert not np.all(np.isfinite(grad))  # without the check: silently non-finite


# -- bad input ----------------------------------------------------------------

def test_bad_schedules_and_inputs(compiled_tasks):
    _, z0, compiled = compiled_tasks("weights", "adam")
    with pytest.raises(ValueError, match="k"):
        compiled.metagradient(z0, metagrad.Replay(k=1))
    with pytest.raises(ValueError, match="minimum is 1 state"):
        compiled.metagradient(z0, metagrad.Budget(bytes=16))
    with pytest.raises(TypeError, match="schedule must be a metagrad schedule"):
        compiled.metagradient(z0, schedule="replay")
    with pytest.raises(ValueError, match=r"z is float32\[5\], the task was compiled for float32\[128\]"):
        compiled.metagradient(z0[:5])
    with pytest.raises(ValueError, match=r"z has the leaves \[\"z\['w'\]\"\], the task was compiled for \['z'\]"):
        compiled.metagradient({"w": z0})
    with pytest.raises(ValueError, match="check_determinism"):
        compiled.metagradient(z0, check_determinism=-1)
    value, grad = compiled.metagradient(z0, metagrad.Budget(bytes=4 * compiled.layout.state_bytes))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_fused_forward_programs_give_the_same_metagradient(compiled_tasks):
    task, z0, single = compiled_tasks("lr", "sgdm")
    fused = task.compile(z0, backend="enzyme", fuse_forward=8)
    z = perturbed(z0, seed=4)
    value, grad, report = fused.metagradient(z, metagrad.Replay(k=4), report=True)
    assert "advance_8" in fused.programs  # built for the run that uses it
    want_value, want_grad, single_report = single.metagradient(z, metagrad.Replay(k=4), report=True)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert relative_error(grad, want_grad) < 1e-5
    assert report.forward_steps == single_report.forward_steps
    assert report.executions < single_report.executions  # several steps per forward execution
    for bad in (0, True, (10, 0), (), "10", 2.5):
        with pytest.raises(ValueError, match="fuse_forward must be an integer >= 1 or a non-empty sequence"):
            task.compile(z0, fuse_forward=bad)


def test_scan_form_of_fused_programs_gives_the_same_metagradient(compiled_tasks):
    # JAX differentiates the lax.scan of a fused reverse, Enzyme each step inside it.
    task, z0, single = compiled_tasks("lr", "sgdm")
    scanned = task.compile(z0, backend="enzyme", fuse_forward=8, loop="scan")
    z = perturbed(z0, seed=5)
    value, grad, report = scanned.metagradient(z, metagrad.Replay(k=4, block=10), report=True)
    want_value, want_grad = single.metagradient(z, metagrad.Replay(k=4))
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert relative_error(grad, want_grad) < 1e-5
    assert scanned.programs["segment_vjp_10"].backend == "enzyme"
    assert report.reversed_steps == STEPS and report.executions < STEPS
    with pytest.raises(ValueError, match="loop must be one of"):
        task.compile(z0, loop="while")


def test_scan_form_runs_100_step_forward_programs_by_default(compiled_tasks):
    task, z0, single = compiled_tasks("lr", "sgdm")
    scanned = task.compile(z0, backend="enzyme", loop="scan")
    only_10 = task.compile(z0, backend="enzyme", loop="scan", fuse_forward=10)
    assert scanned.fuse_forward == (10, 100) and only_10.fuse_forward == (10,)
    z = perturbed(z0, seed=6)
    for got, want in zip(jax.tree_util.tree_leaves(scanned.train(z)), jax.tree_util.tree_leaves(single.train(z))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert {"advance_10", "advance_100"} <= set(scanned.programs)
    schedule = metagrad.Periodic(every=100, block=10)
    value, grad, report = scanned.metagradient(z, schedule, report=True)
    _, _, report_10 = only_10.metagradient(z, schedule, report=True)
    want_value, want_grad = single.metagradient(z, metagrad.Replay(k=4))
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    assert relative_error(grad, want_grad) < 1e-5
    # The first pass saves no state inside steps 0-100: one 100-step execution there, not ten of 10 steps.
    # It saves every 10th state from step 100 on, and replays of 0-100 save every 10th: those stay 10-step.
    assert report.forward_steps == report_10.forward_steps
    assert report_10.executions - report.executions == 9
    scanned.metagradient(z, schedule, check_determinism=True)  # the 100-step program against single steps
