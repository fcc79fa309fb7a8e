"""Small training tasks on sklearn digits, shared by the tests.

Each metaparameter kind of the REPLAY issue is one ``make_task`` option:
per-example data weights, a per-step learning-rate schedule, weight decay, and
poison pixels replacing a few training images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import metagrad

KINDS = ("weights", "lr", "wd", "poison")


@functools.lru_cache(maxsize=None)
def digits(n_train: int = 128, n_val: int = 64, dtype: str = "float32"):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    y = y.astype(np.int32)
    return {"x": x[:n_train], "y": y[:n_train],
            "x_val": x[n_train:n_train + n_val], "y_val": y[n_train:n_train + n_val]}


def _optimizer(name: str):
    # Unit learning rate: the schedule (z or a constant) scales the update.
    if name == "sgdm":
        return optax.sgd(1.0, momentum=0.9)
    if name == "adam":
        return optax.adam(1.0, eps_root=1e-12)  # eps_root: finite reverse through sqrt(nu) at nu = 0
    raise ValueError(name)


def _init_params(dtype, hidden):
    key = jax.random.PRNGKey(0)
    k1, k2 = jax.random.split(key)
    return {"w1": (jax.random.normal(k1, (64, hidden)) / 8.0).astype(dtype), "b1": jnp.zeros(hidden, dtype),
            "w2": (jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden)).astype(dtype), "b2": jnp.zeros(10, dtype)}


def _logits(params, x, pool=None):
    h = x @ params["w1"] + params["b1"]
    if pool == "max":  # max over pairs of hidden units: its gradient is select_and_scatter
        h = jax.lax.reduce_window(h[:, None, :, None], -jnp.inf, jax.lax.max, (1, 1, 2, 1), (1, 1, 2, 1),
                                  "VALID")[:, 0, :, 0]
        h = jnp.concatenate([h, h], axis=1)
    return jnp.tanh(h) @ params["w2"] + params["b2"]


def make_task(kind: str = "weights", optimizer: str = "sgdm", steps: int = 50, *, batch: int = 32,
              hidden: int = 32, n_poison: int = 4, dtype: str = "float32", pool=None):
    """A digits MLP task and a starting metaparameter z0 of the given kind."""
    data = digits(dtype=dtype)
    n = data["x"].shape[0]
    opt = _optimizer(optimizer)
    base_lr = 0.05 if optimizer == "sgdm" else 0.01

    def train_inputs(z, data, t):
        index = (t * batch + jnp.arange(batch)) % n
        x = jnp.asarray(data["x"])
        if kind == "poison":
            x = x.at[:n_poison].set(z)
        weights = z[index] if kind == "weights" else jnp.ones(batch, x.dtype)
        return x[index], jnp.asarray(data["y"])[index], weights

    def loss(params, x, y, weights):
        losses = optax.softmax_cross_entropy_with_integer_labels(_logits(params, x, pool), y)
        return jnp.mean(weights * losses)

    def init(z, data):
        params = _init_params(dtype, hidden)
        return params, opt.init(params)

    def step(state, z, data, t):
        params, opt_state = state
        x, y, weights = train_inputs(z, data, t)
        grads = jax.grad(loss)(params, x, y, weights)
        if kind == "wd":
            grads = jax.tree_util.tree_map(lambda g, p: g + z * p, grads, params)
        updates, opt_state = opt.update(grads, opt_state, params)
        lr = z[t] if kind == "lr" else base_lr
        params = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates)
        return params, opt_state

    def output(state, z, data):
        params, _ = state
        return loss(params, data["x_val"], data["y_val"], jnp.ones(data["y_val"].shape[0], dtype))

    z0 = {"weights": np.ones(n, dtype), "lr": np.full(steps, base_lr, dtype),
          "wd": np.asarray(1e-3, dtype), "poison": np.array(data["x"][:n_poison])}[kind]
    return metagrad.Task(init=init, step=step, output=output, steps=steps, data=data), z0
