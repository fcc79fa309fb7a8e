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

import metagrad
from metagrad.applications.digits import load_all

KINDS = ("weights", "lr", "wd", "poison")


def _part(z, kind: str, which: str):
    """The metaparameter ``which`` of z: z itself for that kind, z[which] for kind "all"
    (weights, lr and wd at once), else None."""
    return z[which] if kind == "all" else z if kind == which else None


@functools.lru_cache(maxsize=None)
def digits(n_train: int = 128, n_val: int = 64, dtype: str = "float32"):
    x, y = load_all()
    x = x.astype(dtype)
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
              hidden: int = 32, n_poison: int = 4, dtype: str = "float32", pool=None, batched: bool = False):
    """A digits MLP task and a starting metaparameter z0 of the given kind.

    ``batched``: the training set stored as batches, ``x[b]`` of shape
    ``(batch, 64)``, step t training on batch ``t % (n // batch)`` (per-example
    weights shaped alike): a layout whose batch axis can be split over devices
    without a gather (data parallelism).
    """
    data = digits(dtype=dtype)
    n = data["x"].shape[0]
    opt = _optimizer(optimizer)
    base_lr = 0.05 if optimizer == "sgdm" else 0.01
    if batched:
        if kind == "poison":
            raise ValueError("batched=True has no poison variant")
        data = {**data, "x": data["x"].reshape(n // batch, batch, 64), "y": data["y"].reshape(n // batch, batch)}

    def train_inputs(z, data, t):
        w = _part(z, kind, "weights")
        if batched:
            b = t % (n // batch)
            weights = w[b] if w is not None else jnp.ones(batch, data["x"].dtype)
            return jnp.asarray(data["x"])[b], jnp.asarray(data["y"])[b], weights
        index = (t * batch + jnp.arange(batch)) % n
        x = jnp.asarray(data["x"])
        if kind == "poison":
            x = x.at[:n_poison].set(z)
        weights = w[index] if w is not None else jnp.ones(batch, x.dtype)
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
        wd, lrs = _part(z, kind, "wd"), _part(z, kind, "lr")
        if wd is not None:
            grads = jax.tree_util.tree_map(lambda g, p: g + wd * p, grads, params)
        updates, opt_state = opt.update(grads, opt_state, params)
        lr = lrs[t] if lrs is not None else base_lr
        params = jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates)
        return params, opt_state

    def output(state, z, data):
        params, _ = state
        return loss(params, data["x_val"], data["y_val"], jnp.ones(data["y_val"].shape[0], dtype))

    z0 = {"weights": np.ones((n // batch, batch) if batched else n, dtype), "lr": np.full(steps, base_lr, dtype),
          "wd": np.asarray(1e-3, dtype)}
    z0 = z0 if kind == "all" else np.array(data["x"][:n_poison]) if kind == "poison" else z0[kind]
    return metagrad.Task(init=init, step=step, output=output, steps=steps, data=data), z0


def make_transformer_task(kind: str = "weights", steps: int = 6, *, batches: int = 4, batch: int = 8,
                          length: int = 8, vocab: int = 16, width: int = 16, heads: int = 2, blocks: int = 1):
    """A tiny causal transformer LM (token embedding, pre-LayerNorm causal attention
    blocks with a GELU MLP, tied output) trained with Adam on synthetic sequences
    (each token the previous plus a per-sequence stride, mod vocab), and z0 of
    ``kind``: per-sequence weights (batches, batch), an lr schedule, weight decay, or
    all three ("all"). Data is stored as batches (``tokens[b]``: batch b) so its
    batch axis can be split."""
    rng = np.random.default_rng(0)
    start = rng.integers(0, vocab, (batches, batch, 1))
    stride = rng.integers(1, 4, (batches, batch, 1))
    tokens = ((start + stride * np.arange(length + 1)) % vocab).astype(np.int32)
    val = ((rng.integers(0, vocab, (batch, 1)) + rng.integers(1, 4, (batch, 1)) * np.arange(length + 1)) % vocab)
    data = {"tokens": tokens, "val": val.astype(np.int32)}
    opt = optax.adam(1.0, eps_root=1e-12)
    base_lr = 0.01

    def layer_norm(x, p):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["bias"]

    def init(z, data):
        keys = iter(jax.random.split(jax.random.PRNGKey(0), 4 * blocks + 2))
        normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape)  # noqa: E731
        norm = lambda: {"scale": jnp.ones(width), "bias": jnp.zeros(width)}  # noqa: E731
        params = {"embed": normal((vocab, width), 0.5), "pos": normal((length, width), 0.1), "final": norm(),
                  "blocks": [{"ln1": norm(), "qkv": normal((width, 3 * width), width ** -0.5),
                              "out": normal((width, width), width ** -0.5), "ln2": norm(),
                              "up": normal((width, 4 * width), width ** -0.5),
                              "down": normal((4 * width, width), (4 * width) ** -0.5)} for _ in range(blocks)]}
        return params, opt.init(params)

    def logits(params, seq):
        x = params["embed"][seq] + params["pos"]
        mask = jnp.tril(jnp.ones((length, length), bool))
        for p in params["blocks"]:
            q, k, v = jnp.split(layer_norm(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
            split = lambda a: a.reshape(*a.shape[:-1], heads, width // heads)  # noqa: E731
            scores = jnp.einsum("...qhd,...khd->...hqk", split(q), split(k)) / np.sqrt(width // heads)
            attention = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
            x = x + jnp.einsum("...hqk,...khd->...qhd", attention, split(v)).reshape(x.shape) @ p["out"]
            x = x + jax.nn.gelu(layer_norm(x, p["ln2"]) @ p["up"]) @ p["down"]
        return layer_norm(x, params["final"]) @ params["embed"].T

    def loss(params, tokens, weights):
        losses = optax.softmax_cross_entropy_with_integer_labels(logits(params, tokens[..., :-1]), tokens[..., 1:])
        return jnp.mean(weights * losses.mean(-1))

    def step(state, z, data, t):
        params, opt_state = state
        b = t % batches
        w, wd, lrs = _part(z, kind, "weights"), _part(z, kind, "wd"), _part(z, kind, "lr")
        weights = w[b] if w is not None else jnp.ones(batch)
        grads = jax.grad(loss)(params, jnp.asarray(data["tokens"])[b], weights)
        if wd is not None:
            grads = jax.tree_util.tree_map(lambda g, p: g + wd * p, grads, params)
        updates, opt_state = opt.update(grads, opt_state, params)
        lr = lrs[t] if lrs is not None else base_lr
        return jax.tree_util.tree_map(lambda p, u: p + lr * u, params, updates), opt_state

    def output(state, z, data):
        return loss(state[0], jnp.asarray(data["val"]), jnp.ones(batch))

    z0 = {"weights": np.ones((batches, batch), np.float32), "lr": np.full(steps, base_lr, np.float32),
          "wd": np.asarray(1e-2, np.float32)}
    z0 = z0 if kind == "all" else z0[kind]
    return metagrad.Task(init=init, step=step, output=output, steps=steps, data=data), z0
