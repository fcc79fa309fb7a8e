"""The benchmark tasks: small training runs on sklearn digits, as metagrad Tasks.

* ``mlp``:  the paper's digits setup -- a 64-256-10 tanh MLP, batch 128, SGD
  with momentum 0.9; the metaparameter is a weight per training example.
* ``cnn``:  a small average-pool CNN on the 8x8 digit images (3x3 conv 8 ->
  2x2 average pool -> 3x3 conv 16 -> 2x2 average pool -> dense 10), batch 32,
  SGD with momentum; per-example weights.
* ``wide``: a compute-bound MLP 64-512-512-10, batch 128, SGD with
  momentum; per-example weights.
* ``mlp_table``: ``mlp`` with shuffled batches: step ``t`` reads row ``t`` of a
  ``(T, 128)`` int32 index table held in ``data`` (a fresh permutation of the
  training set each epoch), the way a user's data loader would feed it.
* ``transformer``: a small causal language model on synthetic tokens (token
  and position embeddings, 2 pre-LayerNorm blocks of 4-head causal attention
  and a GELU MLP, final LayerNorm and unembedding; about 110k parameters),
  AdamW from optax; 4 sequences of 16 tokens per step read from an index
  table like ``mlp_table``; the metaparameter is a weight per training
  sequence, the output the mean next-token loss on held-out sequences.

Every step is pure: the batch is a function of the step index ``t`` (the
index tables are fixed by a seed when the task is made).

``make_task(kind, steps, streamed=True)`` makes the same task with its training
rows in a :class:`metagrad.Stream` (the same batches, gathered on the host
instead of on the device); ``rows`` replaces the training rows (a larger
dataset, or a file mapped with ``np.load(..., mmap_mode="r")``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import metagrad

KINDS = ("mlp", "cnn", "wide", "mlp_table", "transformer")
N_TRAIN = 1024
N_VAL = 256


@functools.lru_cache(maxsize=None)
def digits():
    from metagrad.applications.digits import load_all

    x, y = load_all()
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


def index_table(steps: int, n: int, batch: int, seed: int = 0) -> np.ndarray:
    """``(steps, batch)`` int32: row ``t`` is step ``t``'s batch, epochs of fresh permutations of ``range(n)``."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch // n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    return order[:steps * batch].reshape(steps, batch).astype(np.int32)


def batches(kind: str, steps: int, n: int) -> np.ndarray:
    """``(steps, batch)``: the rows each step of ``kind`` reads from ``n`` training rows."""
    if kind == "transformer":
        return index_table(steps, n, LM["batch"])
    batch = CONFIGS["mlp" if kind == "mlp_table" else kind][2]
    if kind == "mlp_table":
        return index_table(steps, n, batch)
    return ((np.arange(steps)[:, None] * batch + np.arange(batch)) % n).astype(np.int32)


def make_task(kind: str = "mlp", steps: int = 1000, streamed: bool = False, rows=None):
    """``(task, z0)``: the benchmark task of ``kind`` with ``steps`` steps, z0 = ones (one weight per
    training row). ``streamed``: the training rows in a metagrad.Stream; ``rows``: other training rows
    (a dict like ``digits()``'s ``x`` and ``y``, or the transformer's ``seqs``)."""
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}: one of {', '.join(KINDS)}")
    if kind == "transformer":
        return _transformer_task(steps, streamed, rows)
    table = kind == "mlp_table"
    init_params, apply, batch, lr = CONFIGS["mlp" if table else kind]
    train = rows if rows is not None else {"x": digits()["x"], "y": digits()["y"]}
    n = len(train["y"])
    data = {"x_val": jnp.asarray(digits()["x_val"]), "y_val": jnp.asarray(digits()["y_val"])}
    if streamed:
        data["train"] = metagrad.Stream(train, batches(kind, steps, n))
    else:
        data.update(x=jnp.asarray(train["x"]), y=jnp.asarray(train["y"]))
        if table:
            data["batches"] = jnp.asarray(index_table(steps, n, batch))
    momentum = 0.9

    def loss(params, x, y, weights):
        return jnp.mean(weights * _xent(apply(params, x), y))

    def init(z, data):
        params = init_params()
        return params, jax.tree_util.tree_map(jnp.zeros_like, params)

    def step(state, z, data, t):
        params, velocity = state
        if streamed:
            x, y, index = data["train"].rows["x"], data["train"].rows["y"], data["train"].index
        else:
            index = data["batches"][t] if table else (t * batch + jnp.arange(batch)) % n
            x, y = data["x"][index], data["y"][index]
        grads = jax.grad(loss)(params, x, y, z[index])
        velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
        params = jax.tree_util.tree_map(lambda p, v: p - lr * v, params, velocity)
        return params, velocity

    def output(state, z, data):
        params, _ = state
        y = data["y_val"]
        return jnp.mean(_xent(apply(params, data["x_val"]), y))

    task = metagrad.Task(init=init, step=step, output=output, steps=steps, data=data)
    return task, np.ones(n, np.float32)


# --------------------------------------------------------------------------- #
# the transformer language model
# --------------------------------------------------------------------------- #

LM = {"vocab": 64, "length": 16, "width": 64, "heads": 4, "blocks": 2, "batch": 4, "n_train": 512, "n_val": 64,
      "lr": 3e-3, "weight_decay": 0.01}


@functools.lru_cache(maxsize=None)
def tokens():
    """Synthetic sequences from a fixed sparse Markov chain (each token has 4 likely successors), so the
    model has something to learn: ``length + 1`` tokens per sequence (inputs and shifted targets)."""
    rng = np.random.default_rng(1)
    vocab, length = LM["vocab"], LM["length"]
    successors = rng.integers(0, vocab, (vocab, 4))
    n = LM["n_train"] + LM["n_val"]
    seqs = np.empty((n, length + 1), np.int32)
    seqs[:, 0] = rng.integers(0, vocab, n)
    for i in range(length):
        pick = successors[seqs[:, i], rng.integers(0, 4, n)]
        noise = rng.integers(0, vocab, n)
        seqs[:, i + 1] = np.where(rng.random(n) < 0.1, noise, pick)
    return {"seqs": seqs[:LM["n_train"]], "seqs_val": seqs[LM["n_train"]:]}


def _layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _transformer_init():
    vocab, length, width, blocks = LM["vocab"], LM["length"], LM["width"], LM["blocks"]
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 3 + 4 * blocks))

    def normal(shape, scale):
        return jax.random.normal(next(keys), shape, jnp.float32) * scale

    def norm():
        return {"g": jnp.ones(width, jnp.float32), "b": jnp.zeros(width, jnp.float32)}

    return {
        "embed": normal((vocab, width), 0.1), "pos": normal((length, width), 0.1),
        "blocks": [{"ln1": norm(), "qkv": normal((width, 3 * width), width ** -0.5),
                    "proj": normal((width, width), width ** -0.5), "ln2": norm(),
                    "up": _dense_init(next(keys), width, 4 * width), "down": _dense_init(next(keys), 4 * width, width)}
                   for _ in range(blocks)],
        "ln": norm(), "unembed": normal((width, vocab), width ** -0.5),
    }


def _transformer_apply(params, seqs):
    """Next-token logits ``(batch, length, vocab)`` for token ids ``(batch, length)``."""
    heads = LM["heads"]
    x = params["embed"][seqs] + params["pos"]
    b, n, width = x.shape
    causal = jnp.tril(jnp.ones((n, n), bool))
    for block in params["blocks"]:
        h = _layer_norm(block["ln1"], x)
        q, k, v = jnp.split(h @ block["qkv"], 3, axis=-1)
        q, k, v = (a.reshape(b, n, heads, width // heads) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // heads)
        # A large finite negative, not -inf: the reverse of the softmax stays finite.
        attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", attention, v).reshape(b, n, width) @ block["proj"]
        h = _layer_norm(block["ln2"], x)
        h = jax.nn.gelu(h @ block["up"]["w"] + block["up"]["b"])
        x = x + h @ block["down"]["w"] + block["down"]["b"]
    return _layer_norm(params["ln"], x) @ params["unembed"]


def _sequence_loss(params, seqs):
    """Mean next-token cross-entropy of each sequence, ``(batch,)``."""
    logits = _transformer_apply(params, seqs[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, seqs[:, 1:, None], axis=-1)[..., 0].mean(-1)


def _transformer_task(steps: int, streamed: bool = False, rows=None):
    import optax

    # eps_root > 0: the reverse through sqrt(nu) stays finite where nu is 0
    # (embedding rows of tokens not yet seen).
    optimizer = optax.adamw(LM["lr"], b2=0.99, eps_root=1e-12, weight_decay=LM["weight_decay"])
    seqs = rows["seqs"] if rows is not None else tokens()["seqs"]
    data = {"seqs_val": jnp.asarray(tokens()["seqs_val"])}
    if streamed:
        data["train"] = metagrad.Stream({"seqs": seqs}, batches("transformer", steps, len(seqs)))
    else:
        data.update(seqs=jnp.asarray(seqs), batches=jnp.asarray(batches("transformer", steps, len(seqs))))

    def loss(params, seqs, weights):
        return jnp.mean(weights * _sequence_loss(params, seqs))

    def init(z, data):
        params = _transformer_init()
        return params, optimizer.init(params)

    def step(state, z, data, t):
        params, opt_state = state
        if streamed:
            batch, index = data["train"].rows["seqs"], data["train"].index
        else:
            index = data["batches"][t]
            batch = data["seqs"][index]
        grads = jax.grad(loss)(params, batch, z[index])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def output(state, z, data):
        params, _ = state
        return jnp.mean(_sequence_loss(params, data["seqs_val"]))

    task = metagrad.Task(init=init, step=step, output=output, steps=steps, data=data)
    return task, np.ones(len(seqs), np.float32)
