"""The benchmark tasks: small training runs on sklearn digits, as metagrad Tasks.

* ``mlp``:  design.md section 5's setup -- a 64-256-10 tanh MLP, batch 128, SGD
  with momentum 0.9; the metaparameter is a weight per training example.
* ``cnn``:  a small average-pool CNN on the 8x8 digit images (3x3 conv 8 ->
  2x2 average pool -> 3x3 conv 16 -> 2x2 average pool -> dense 10), batch 32,
  SGD with momentum; per-example weights.
* ``wide``: a compute-bound MLP 64-512-512-10, batch 128, SGD with
  momentum; per-example weights.

Every step is pure: the batch is a function of the step index ``t``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import metagrad

KINDS = ("mlp", "cnn", "wide")
N_TRAIN = 1024
N_VAL = 256


@functools.lru_cache(maxsize=None)
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    return {"x": x[:N_TRAIN], "y": y[:N_TRAIN], "x_val": x[N_TRAIN:N_TRAIN + N_VAL],
            "y_val": y[N_TRAIN:N_TRAIN + N_VAL]}


def _xent(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def _dense_init(key, fan_in, fan_out):
    return {"w": jax.random.normal(key, (fan_in, fan_out), jnp.float32) / np.sqrt(fan_in),
            "b": jnp.zeros(fan_out, jnp.float32)}


def _mlp_init(widths):
    keys = jax.random.split(jax.random.PRNGKey(0), len(widths) - 1)
    return [_dense_init(k, a, b) for k, a, b in zip(keys, widths[:-1], widths[1:])]


def _mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _avg_pool(x):  # NHWC, 2x2 stride 2
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cnn_init():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {"c1": jax.random.normal(k1, (3, 3, 1, 8), jnp.float32) / 3.0, "b1": jnp.zeros(8, jnp.float32),
            "c2": jax.random.normal(k2, (3, 3, 8, 16), jnp.float32) / np.sqrt(72.0), "b2": jnp.zeros(16, jnp.float32),
            "out": _dense_init(k3, 2 * 2 * 16, 10)}


def _cnn_apply(params, x):
    x = x.reshape(-1, 8, 8, 1)
    x = _avg_pool(jnp.tanh(_conv(x, params["c1"]) + params["b1"]))
    x = _avg_pool(jnp.tanh(_conv(x, params["c2"]) + params["b2"]))
    x = x.reshape(x.shape[0], -1)
    return x @ params["out"]["w"] + params["out"]["b"]


CONFIGS = {
    # kind: (init params, apply, batch, learning rate)
    "mlp": (lambda: _mlp_init([64, 256, 10]), _mlp_apply, 128, 0.05),
    "cnn": (_cnn_init, _cnn_apply, 32, 0.05),
    "wide": (lambda: _mlp_init([64, 512, 512, 10]), _mlp_apply, 128, 0.02),
}


def make_task(kind: str = "mlp", steps: int = 1000):
    """``(task, z0)``: the benchmark task of ``kind`` with ``steps`` steps, z0 = ones."""
    init_params, apply, batch, lr = CONFIGS[kind]
    data = {k: jnp.asarray(v) for k, v in digits().items()}
    momentum = 0.9

    def loss(params, x, y, weights):
        return jnp.mean(weights * _xent(apply(params, x), y))

    def init(z, data):
        params = init_params()
        return params, jax.tree_util.tree_map(jnp.zeros_like, params)

    def step(state, z, data, t):
        params, velocity = state
        index = (t * batch + jnp.arange(batch)) % N_TRAIN
        grads = jax.grad(loss)(params, data["x"][index], data["y"][index], z[index])
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
        params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
        return params, velocity

    def output(state, z, data):
        params, _ = state
        y = data["y_val"]
        return jnp.mean(_xent(apply(params, data["x_val"]), y))

    task = metagrad.Task(init=init, step=step, output=output, steps=steps, data=data)
    return task, np.ones(N_TRAIN, np.float32)
