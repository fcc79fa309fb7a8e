"""Shared model and data code for the applications: sklearn digits, small MLP/CNN,
deterministic training written as a :class:`metagrad.Task`.

Everything a training run depends on is in the task's ``data`` (initial
weights, the batch index table) or in the frozen :class:`TrainConfig`, so a run
is a pure function of ``z``: batch ``t`` is row ``t`` of a table fixed in
advance, and there is no randomness inside ``step``.

The metaparameter's *role* says where ``z`` enters training:

* ``"weights"``: per-example loss weights, shape ``[n_train]``;
* ``"poison"``: the first ``n_poison`` training images, shape ``[n_poison, 64]``
  (labels stay those of the examples they replace);
* ``"lr"``: log learning rates at ``K`` knots spread evenly over ``[0, T-1]``,
  linearly interpolated per step, shape ``[K]``.

The output ``phi`` is the mean cross-entropy on the validation set, or, with
``output="weighted"``, ``data["out_w"] @ (the losses of the test examples)``
(a one-hot ``out_w`` gives a single test example's loss; an identity matrix the
vector of all of them, for a runtime that takes metagradients of many outputs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from metagrad import Task
from metagrad.applications.common import bar

__all__ = ["TrainConfig", "load_split", "flip_labels", "init_params", "make_task", "apply", "evaluate",
           "train_loss", "lr_at", "per_example_loss", "margin", "train_grid", "train_many", "trajectory",
           "evaluate_grid", "evaluate_grid_per_example", "ensemble", "optimizer", "ROLES", "OUTPUTS"]

ROLES = ("weights", "poison", "lr")
OUTPUTS = ("val", "weighted")


@dataclass(frozen=True)
class TrainConfig:
    """A deterministic training recipe (hashable: one compilation per config).

    ``arch="mlp"``: 64 -> hidden -> 10; ``arch="cnn"``: two 3x3 conv layers
    (``hidden//2`` and ``hidden`` channels) each followed by 2x2 ``pool``
    (``"avg"`` or ``"max"``), then a dense layer. ``logit_scale`` multiplies the
    final logits (< 1 smooths training). ``batch_size=None`` is full batch.
    LR schedule: linear warmup over ``warmup`` steps then ``decay`` (``"none"``,
    ``"linear"`` to 0, ``"cosine"`` to 0), unless the role is ``"lr"``.
    ``clip=c`` soft-clips the gradient's global norm, ``g * c / sqrt(|g|^2 + c^2)``
    (smooth everywhere, unlike hard clipping): large learning rates then stop
    diverging, which removes the cliff in ``phi`` as a function of the rate.
    """

    arch: str = "mlp"
    hidden: int = 128
    activation: str = "gelu"
    pool: str = "avg"
    logit_scale: float = 1.0
    steps: int = 200
    batch_size: int | None = 100
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    adam_b1: float = 0.9
    adam_b2: float = 0.99
    adam_eps: float = 1e-8
    weight_decay: float = 5e-4
    warmup: int = 0
    decay: str = "none"
    clip: float | None = None
    init_seed: int = 0
    batch_seed: int = 0

    def __post_init__(self):
        checks = [
            ("arch", self.arch in ("mlp", "cnn"), "'mlp' or 'cnn'"),
            ("activation", self.activation in ("relu", "gelu", "tanh", "softplus"), "relu, gelu, tanh or softplus"),
            ("pool", self.pool in ("avg", "max"), "'avg' or 'max'"),
            ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
            ("decay", self.decay in ("none", "linear", "cosine"), "none, linear or cosine"),
            ("steps", isinstance(self.steps, int) and self.steps >= 1, "an int >= 1"),
            ("hidden", isinstance(self.hidden, int) and self.hidden >= 2, "an int >= 2"),
            ("batch_size", self.batch_size is None or (isinstance(self.batch_size, int) and self.batch_size >= 1),
             "None (full batch) or an int >= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("logit_scale", self.logit_scale > 0, "> 0"),
            ("warmup", isinstance(self.warmup, int) and 0 <= self.warmup <= self.steps, "an int in [0, steps]"),
            ("clip", self.clip is None or self.clip > 0, "None or > 0"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

    def with_(self, **kw) -> "TrainConfig":
        return replace(self, **kw)


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #

@functools.lru_cache(maxsize=None)
def load_all() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 of scikit-learn's digits in their file's order: pixels scaled to ``[0, 1]``
    (float32, 64 per image) and labels (int32). Cached; do not modify the arrays."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def load_split(n_train: int = 1000, n_val: int = 300, n_test: int | None = None, seed: int = 0) -> dict:
    """Shuffle the 1797 digits with ``seed`` and split train/val/test (test = the rest by default).

    Pixels are scaled to ``[0, 1]``. Returns numpy arrays ``x_train, y_train,
    x_val, y_val, x_test, y_test``.
    """
    x, y = load_all()
    n = len(y)
    if n_test is None:
        n_test = n - n_train - n_val
    if min(n_train, n_val, n_test) < 1 or n_train + n_val + n_test > n:
        raise ValueError(f"split sizes n_train={n_train}, n_val={n_val}, n_test={n_test} must be >= 1 "
                         f"and sum to at most {n}")
    perm = np.random.default_rng(seed).permutation(n)
    a, b, c = perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:n_train + n_val + n_test]
    return {"x_train": x[a], "y_train": y[a], "x_val": x[b], "y_val": y[b], "x_test": x[c], "y_test": y[c]}


def flip_labels(y: np.ndarray, fraction: float, seed: int = 0, n_classes: int = 10):
    """Give a random ``fraction`` of the labels a different random class. Returns ``(y_noisy, flipped_mask)``."""
    rng = np.random.default_rng(seed)
    n = len(y)
    idx = rng.choice(n, int(round(fraction * n)), replace=False)
    y2 = y.copy()
    y2[idx] = (y[idx] + rng.integers(1, n_classes, len(idx))) % n_classes
    mask = np.zeros(n, bool)
    mask[idx] = True
    return y2.astype(np.int32), mask


# --------------------------------------------------------------------------- #
# model
# --------------------------------------------------------------------------- #

def init_params(cfg: TrainConfig, seed: int | None = None) -> dict:
    """He-style initialization (numpy, float32) from ``cfg.init_seed`` (or ``seed``)."""
    rng = np.random.default_rng(cfg.init_seed if seed is None else seed)

    def dense(fan_in, fan_out):
        return (rng.normal(size=(fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    if cfg.arch == "mlp":
        return {"w1": dense(64, cfg.hidden), "b1": np.zeros(cfg.hidden, np.float32),
                "w2": dense(cfg.hidden, 10), "b2": np.zeros(10, np.float32)}
    c1, c2 = max(cfg.hidden // 2, 1), cfg.hidden
    return {"k1": (rng.normal(size=(3, 3, 1, c1)) * np.sqrt(2.0 / 9)).astype(np.float32),
            "b1": np.zeros(c1, np.float32),
            "k2": (rng.normal(size=(3, 3, c1, c2)) * np.sqrt(2.0 / (9 * c1))).astype(np.float32),
            "b2": np.zeros(c2, np.float32),
            "w3": dense(4 * c2, 10), "b3": np.zeros(10, np.float32)}


def _act(name, x):
    if name == "relu":
        return jax.nn.relu(x)
    if name == "gelu":
        return jax.nn.gelu(x)
    if name == "softplus":
        return jax.nn.softplus(x)
    return jnp.tanh(x)


def _pool(kind, x):
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return x.mean(axis=(2, 4)) if kind == "avg" else x.max(axis=(2, 4))


def apply(cfg: TrainConfig, params: dict, x) -> jnp.ndarray:
    """Logits for images ``x`` of shape ``[n, 64]`` (pixels in ``[0, 1]``)."""
    if cfg.arch == "mlp":
        h = _act(cfg.activation, x @ params["w1"] + params["b1"])
        out = h @ params["w2"] + params["b2"]
    else:
        dn = ("NHWC", "HWIO", "NHWC")
        h = x.reshape(-1, 8, 8, 1)
        h = lax.conv_general_dilated(h, params["k1"], (1, 1), "SAME", dimension_numbers=dn) + params["b1"]
        h = _pool(cfg.pool, _act(cfg.activation, h))
        h = lax.conv_general_dilated(h, params["k2"], (1, 1), "SAME", dimension_numbers=dn) + params["b2"]
        h = _pool(cfg.pool, _act(cfg.activation, h))
        out = h.reshape(h.shape[0], -1) @ params["w3"] + params["b3"]
    return cfg.logit_scale * out


def _ce(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


# --------------------------------------------------------------------------- #
# the training run as a Task
# --------------------------------------------------------------------------- #

def train_loss(cfg: TrainConfig, params: dict, x, y, w=None):
    """The training objective on a batch: the (``w``-weighted) mean cross-entropy plus weight decay."""
    per = _ce(apply(cfg, params, x), y)
    loss = jnp.mean(per if w is None else w * per)
    if cfg.weight_decay:
        loss = loss + 0.5 * cfg.weight_decay * sum(jnp.sum(p ** 2) for k, p in params.items() if k[0] in "wk")
    return loss


def lr_at(cfg: TrainConfig, t, z=None, role: str = "weights"):
    """The learning rate of step ``t`` (from ``z`` when the role is ``"lr"``)."""
    tf = jnp.asarray(t).astype(jnp.float32)
    if role == "lr":
        knots = jnp.linspace(0.0, cfg.steps - 1.0, z.shape[0])
        return jnp.exp(jnp.interp(tf, knots, z))
    lr = jnp.float32(cfg.lr)
    if cfg.warmup > 0:
        lr = lr * jnp.minimum(1.0, (tf + 1.0) / cfg.warmup)
    if cfg.decay != "none":
        span = max(cfg.steps - cfg.warmup, 1)
        frac = jnp.clip((tf - cfg.warmup) / span, 0.0, 1.0)
        lr = lr * ((1.0 - frac) if cfg.decay == "linear" else 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return lr


def optimizer(cfg: TrainConfig, lr) -> optax.GradientTransformation:
    """``cfg``'s Optax optimizer at learning rate ``lr`` (a traced scalar where it depends on ``z`` or ``t``;
    the state's structure does not depend on it)."""
    if cfg.optimizer == "sgd":
        return optax.sgd(lr, momentum=cfg.momentum)
    # eps inside the root (the paper's eps_root) keeps d/dv of 1/sqrt(v) bounded
    return optax.adam(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=0.0, eps_root=cfg.adam_eps ** 2)


@functools.lru_cache(maxsize=None)
def _functions(cfg: TrainConfig, role: str, output: str):
    """``init, step, output`` for a config; cached so equal configs share compilations."""

    def init(z, data):
        params = data["params0"]
        return {"params": params, "opt": optimizer(cfg, cfg.lr).init(params)}

    def batch(z, data, t):
        x, y = data["x_train"], data["y_train"]
        if role == "poison":
            x = jnp.concatenate([z.astype(x.dtype), x[z.shape[0]:]], axis=0)
        w = z if role == "weights" else None
        if cfg.batch_size is not None:
            idx = data["batches"][t]
            x, y = x[idx], y[idx]
            w = None if w is None else w[idx]
        return x, y, w

    def step(state, z, data, t):
        x, y, w = batch(z, data, t)
        g = jax.grad(functools.partial(train_loss, cfg))(state["params"], x, y, w)
        if cfg.clip is not None:
            sq = sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(g))
            g = jax.tree_util.tree_map(lambda v: v * (cfg.clip / jnp.sqrt(sq + cfg.clip ** 2)), g)
        updates, opt_state = optimizer(cfg, lr_at(cfg, t, z, role)).update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}

    def out(state, z, data):
        if output == "val":
            return jnp.mean(_ce(apply(cfg, state["params"], data["x_val"]), data["y_val"]))
        per = _ce(apply(cfg, state["params"], data["x_out"]), data["y_out"])
        return data["out_w"] @ per

    return init, step, out


def batch_table(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``[steps, batch_size]`` int32: batch ``t`` is row ``t``; each epoch a fresh permutation (drop-last)."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({n})")
    per_epoch = n // batch_size
    rows = []
    epoch = 0
    while len(rows) < steps:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        rows.extend(perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch))
        epoch += 1
    return np.stack(rows[:steps]).astype(np.int32)


def make_task(cfg: TrainConfig, split: dict, *, role: str, output: str = "val", x_out=None, y_out=None,
              out_w=None, y_train=None) -> Task:
    """A :class:`metagrad.Task` training ``cfg`` on ``split`` with ``z`` in ``role``.

    ``y_train`` overrides the split's training labels (e.g. noisy labels).
    ``output="weighted"`` needs ``x_out, y_out, out_w``.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    data = {"x_train": np.asarray(split["x_train"], np.float32),
            "y_train": np.asarray(split["y_train"] if y_train is None else y_train, np.int32),
            "params0": init_params(cfg)}
    if output == "val":
        data["x_val"], data["y_val"] = np.asarray(split["x_val"], np.float32), np.asarray(split["y_val"], np.int32)
    else:
        if x_out is None or y_out is None or out_w is None:
            raise ValueError("output='weighted' needs x_out, y_out and out_w")
        data["x_out"], data["y_out"] = np.asarray(x_out, np.float32), np.asarray(y_out, np.int32)
        data["out_w"] = np.asarray(out_w, np.float32)
    if cfg.batch_size is not None:
        data["batches"] = batch_table(len(data["y_train"]), cfg.batch_size, cfg.steps, cfg.batch_seed)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    # seeds only shape the data, so tasks differing in seed share functions (and compilations)
    init, step, out = _functions(cfg.with_(init_seed=0, batch_seed=0), role, output)
    return Task(init=init, step=step, output=out, steps=cfg.steps, data=data)


# --------------------------------------------------------------------------- #
# evaluation helpers
# --------------------------------------------------------------------------- #

@functools.lru_cache(maxsize=None)
def _eval_fn(cfg: TrainConfig):
    def ev(params, x, y):
        logits = apply(cfg, params, x)
        return jnp.mean(_ce(logits, y)), jnp.mean(jnp.argmax(logits, -1) == y)

    return jax.jit(ev)


def evaluate(cfg: TrainConfig, params: dict, x, y) -> dict:
    """``{"loss": mean cross-entropy, "acc": accuracy}`` of ``params`` on ``(x, y)``."""
    loss, acc = _eval_fn(cfg)(params, jnp.asarray(x), jnp.asarray(y))
    return {"loss": float(loss), "acc": float(acc)}


@functools.lru_cache(maxsize=None)
def _grid_fn(init, step, steps):
    def one(z, data):
        state = init(z, data)
        state, _ = lax.scan(lambda s, t: (step(s, z, data, t), None), state, jnp.arange(steps, dtype=jnp.int32))
        return state["params"]

    over_data = jax.vmap(one, in_axes=(None, 0))
    return jax.jit(jax.vmap(over_data, in_axes=(0, None)))


def train_grid(tasks, zs, chunk: int = 4, progress: str | None = None) -> dict:
    """Final params for every metaparameter in ``zs`` (leading axis) under every task of
    ``tasks`` (same functions, e.g. the same recipe under several seeds): leaves
    ``[len(zs), len(tasks), ...]``, trained in vmapped programs of ``chunk``
    metaparameters (the same deterministic runs as :func:`metagrad.baselines.train`).
    ``progress``: the label of a progress bar (shown in a terminal), or ``None``.
    """
    tasks = list(tasks)
    _check_same_functions(tasks)
    fn = _grid_fn(tasks[0].init, tasks[0].step, int(tasks[0].steps))
    data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[t.data for t in tasks])
    zs = np.asarray(zs)
    n = zs.shape[0]
    # pad the last chunk to full size: one compiled shape
    padded = np.concatenate([zs, np.repeat(zs[-1:], -n % chunk, axis=0)]) if n % chunk else zs
    starts = range(0, padded.shape[0], chunk)
    if progress is not None:
        starts = bar(starts, desc=progress)
    outs = [fn(jnp.asarray(padded[i:i + chunk]), data) for i in starts]
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=0)[:n], *outs)


def train_many(task: Task, zs, chunk: int = 16) -> dict:
    """Final params for a batch of metaparameters ``zs`` (leading axis) under one task."""
    return jax.tree_util.tree_map(lambda a: a[:, 0], train_grid([task], zs, chunk))


@functools.lru_cache(maxsize=None)
def _trajectory_fn(init, step, steps, every):
    def run(z, data):
        def chunk(s, t0):
            s = lax.fori_loop(0, every, lambda i, s: step(s, z, data, t0 + i), s)
            return s, s["params"]

        starts = jnp.arange(0, steps, every, dtype=jnp.int32)
        return lax.scan(chunk, init(z, data), starts)[1]

    return jax.jit(run)


def trajectory(task: Task, z, every: int) -> dict:
    """The params after every ``every`` steps (``steps`` must be a multiple): leaves ``[steps // every, ...]``."""
    if task.steps % every:
        raise ValueError(f"every={every} must divide the task's {task.steps} steps")
    return _trajectory_fn(task.init, task.step, int(task.steps), int(every))(jnp.asarray(z), task.data)


@functools.lru_cache(maxsize=None)
def _grid_eval_fns(cfg: TrainConfig):
    def per_example(params, x, y):
        return per_example_loss(cfg, params, x, y)

    def metrics(params, x, y):
        logits = apply(cfg, params, x)
        return jnp.mean(_ce(logits, y)), jnp.mean(jnp.argmax(logits, -1) == y)

    over = lambda f: jax.jit(jax.vmap(f, in_axes=(0, None, None)))  # noqa: E731
    return over(metrics), over(per_example)


def _flat_models(params: dict):
    """Params with any leading axes as one axis of models, and those axes (``b1`` is a vector in both
    architectures, so its leading axes are the params')."""
    lead = params["b1"].shape[:-1]
    return jax.tree_util.tree_map(lambda a: jnp.reshape(a, (-1,) + a.shape[len(lead):]), params), lead


def evaluate_grid(cfg: TrainConfig, params: dict, x, y) -> dict:
    """:func:`evaluate` for params with any leading axes: ``{"loss", "acc"}`` arrays of those axes."""
    flat, lead = _flat_models(params)
    loss, acc = _grid_eval_fns(cfg)[0](flat, jnp.asarray(x), jnp.asarray(y))
    return {"loss": np.asarray(loss).reshape(lead), "acc": np.asarray(acc).reshape(lead)}


def evaluate_grid_per_example(cfg: TrainConfig, params: dict, x, y) -> np.ndarray:
    """Each example's loss under params with any leading axes: ``[*axes, len(y)]``."""
    flat, lead = _flat_models(params)
    return np.asarray(_grid_eval_fns(cfg)[1](flat, jnp.asarray(x), jnp.asarray(y))).reshape(lead + (len(y),))


def per_example_loss(cfg: TrainConfig, params: dict, x, y):
    """``[b]``: the cross-entropy of each example."""
    return _ce(apply(cfg, params, jnp.asarray(x)), jnp.asarray(y))


def margin(cfg: TrainConfig, params: dict, x, y):
    """``[b]``: the correct class's logit minus the log-sum-exp of the others (``log(p / (1 - p))``)."""
    logits = apply(cfg, params, jnp.asarray(x))
    y = jnp.asarray(y)
    correct = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
    return correct - jax.nn.logsumexp(others, axis=1)


@functools.lru_cache(maxsize=None)
def _ensemble_functions(init, step, output):
    def e_init(z, data):
        return jax.vmap(init, in_axes=(None, 0))(z, data)

    def e_step(state, z, data, t):
        return jax.vmap(step, in_axes=(0, None, 0, None))(state, z, data, t)

    def e_output(state, z, data):
        return jnp.mean(jax.vmap(output, in_axes=(0, None, 0))(state, z, data))

    return e_init, e_step, e_output


def _check_same_functions(tasks) -> None:
    if not tasks:
        raise ValueError("needs at least one task")
    first = tasks[0]
    for t in tasks[1:]:
        if (t.init, t.step, t.output, t.steps) != (first.init, first.step, first.output, first.steps):
            raise ValueError("needs tasks with the same init/step/output functions and steps (seeds may differ)")


def ensemble(tasks) -> Task:
    """One task running several same-shaped tasks side by side (``vmap``) with the
    shared ``z``; ``phi`` is the mean of their outputs.

    With tasks that differ only in seed (initial weights, batch order), ``phi``
    estimates the *expected* output over training randomness: a smoother
    objective whose metagradient is still exact. The state is the stacked states.
    """
    tasks = list(tasks)
    _check_same_functions(tasks)
    first = tasks[0]
    data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[t.data for t in tasks])
    init, step, output = _ensemble_functions(first.init, first.step, first.output)
    return Task(init=init, step=step, output=output, steps=first.steps, data=data)
