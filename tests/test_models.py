"""Bring your own model: Flax and Equinox models as tasks, exact against jax.grad.

These are the worked examples of docs/guide.md ("Bring your own model"), at
test size.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metagrad
from metagrad import baselines
from models import digits

eqx = pytest.importorskip("equinox")
nn = pytest.importorskip("flax.linen")

STEPS, BATCH = 24, 16


def _data():
    d = digits()
    return {"x": d["x"], "y": d["y"], "xv": d["x_val"], "yv": d["y_val"]}


def _batch(data, t):
    index = (t * BATCH + jnp.arange(BATCH)) % data["x"].shape[0]
    return index, data["x"][index], data["y"][index]


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32)(x))
        return nn.Dense(10)(x)


def classifier_task(init_params, logits, opt, apply_updates=optax.apply_updates):
    """A task training ``logits(params, x)`` with ``opt`` on digits, z weighting each training example."""
    def loss(params, x, y, w):
        return jnp.mean(w * optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y))

    def init(z, data):
        params = init_params(data)
        return params, opt.init(params)

    def step(state, z, data, t):
        params, opt_state = state
        index, x, y = _batch(data, t)
        grads = jax.grad(loss)(params, x, y, z[index])
        updates, opt_state = opt.update(grads, opt_state, params)
        return apply_updates(params, updates), opt_state

    def output(state, z, data):
        return loss(state[0], data["xv"], data["yv"], 1.0)

    data = _data()
    return metagrad.Task(init, step, output, STEPS, data), np.ones(data["x"].shape[0], np.float32)


def flax_task():
    model = FlaxMLP()
    return classifier_task(lambda data: model.init(jax.random.PRNGKey(0), data["x"][:1]), model.apply,
                           optax.adam(1e-2, eps_root=1e-12))


class EqxMLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(64, 32, key=k1)
        self.out = eqx.nn.Linear(32, 10, key=k2)

    def __call__(self, x):
        return self.out(jax.nn.tanh(self.hidden(x)))


def equinox_task():
    # The state holds arrays only: the model's static parts stay in the closure.
    _, static = eqx.partition(EqxMLP(jax.random.PRNGKey(0)), eqx.is_array)
    return classifier_task(lambda data: eqx.filter(EqxMLP(jax.random.PRNGKey(0)), eqx.is_array),
                           lambda params, x: jax.vmap(eqx.combine(params, static))(x),
                           optax.sgd(0.1, momentum=0.9), eqx.apply_updates)


@pytest.mark.parametrize("make", [flax_task, equinox_task], ids=["flax", "equinox"])
def test_model_libraries_give_exact_metagradients(make):
    task, z = make()
    z = (z * np.linspace(0.5, 1.5, z.size)).astype(np.float32)
    compiled = task.compile(z)
    value, grad = compiled.metagradient(z, metagrad.Replay(k=3))
    want_value, want_grad = baselines.scan_metagradient(task, z)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    scale = float(np.max(np.abs(want_grad)))
    assert float(np.max(np.abs(grad - want_grad))) <= 1e-3 * scale


SAVE_EQX = """
import sys
sys.path.insert(0, sys.argv[2])
from test_models import equinox_task
task, z = equinox_task()
task.compile(z, backend="jax").save(sys.argv[1])
"""

LOAD = """
import sys, numpy as np, metagrad
loaded = metagrad.load(sys.argv[1])
params, _ = loaded.train(loaded.z_example)
print(type(params).__name__, params._fields, params.hidden.weight.shape)
"""


def test_a_task_with_an_equinox_state_loads_without_equinox_imported(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    saved = subprocess.run([sys.executable, "-c", SAVE_EQX, str(tmp_path / "task"), here], capture_output=True,
                           text=True, timeout=600, env=env)
    assert saved.returncode == 0, saved.stderr[-2000:]
    loaded = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path / "task")], capture_output=True, text=True,
                            timeout=600, env=env)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    # The module comes back as a named tuple of its fields (equinox is never imported by load).
    assert loaded.stdout.strip() == "EqxMLP ('hidden', 'out') (32, 64)"
