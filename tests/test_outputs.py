"""Many outputs at once: ``output`` returning a vector of m values gives the
Jacobian (a leading m axis on every z leaf) from one forward pass and one set
of replays, equal to m separate metagradients."""

import numpy as np
import optax
import pytest

import metagrad
from metagrad import baselines
from models import _logits, make_task

M, STEPS = 4, 30


def per_example_losses(state, z, data):
    params, _ = state
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, data["x_val"][:M]), data["y_val"][:M])


@pytest.fixture(scope="module")
def tasks():
    base, z = make_task("weights", "sgdm", steps=STEPS)
    vector = metagrad.Task(base.init, base.step, per_example_losses, STEPS, base.data)
    singles = [metagrad.Task(base.init, base.step, lambda s, zz, d, i=i: per_example_losses(s, zz, d)[i], STEPS,
                             base.data) for i in range(M)]
    return vector, singles, (z * np.linspace(0.5, 1.5, z.size)).astype(np.float32)


@pytest.mark.parametrize("backend", ["enzyme", "jax"])
def test_m_outputs_at_once_equal_m_separate_metagradients(tasks, backend):
    vector, singles, z = tasks
    compiled = vector.compile(z, backend=backend)
    for schedule in (metagrad.Replay(k=3), metagrad.Budget(states=4, block=5)):
        values, jacobian, report = compiled.metagradient(z, schedule, report=True)
        assert values.shape == (M,) and jacobian.shape == (M, z.size)
        assert report.reversed_steps == STEPS  # one traversal for all m outputs
        for i, single in enumerate(singles):
            value, grad = single.compile(z, backend=backend).metagradient(z, schedule)
            np.testing.assert_allclose(values[i], value, rtol=1e-6)
            np.testing.assert_allclose(jacobian[i], grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_m_outputs_match_jax_grad_through_the_training(tasks):
    vector, singles, z = tasks
    values, jacobian = vector.compile(z).metagradient(z)
    for i, single in enumerate(singles):
        want_value, want_grad = baselines.scan_metagradient(single, z)
        np.testing.assert_allclose(values[i], want_value, rtol=1e-5)
        assert np.max(np.abs(jacobian[i] - want_grad)) <= 1e-3 * np.max(np.abs(want_grad))


def test_outputs_must_be_a_scalar_or_a_vector(tasks):
    vector, _, z = tasks
    matrix = metagrad.Task(vector.init, vector.step, lambda s, zz, d: per_example_losses(s, zz, d)[:, None], STEPS,
                           vector.data)
    with pytest.raises(ValueError, match=r"floating-point scalar \(or a vector of m outputs\), got float32\[4, 1\]"):
        matrix.compile(z)
