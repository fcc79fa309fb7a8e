"""The three JAX reference metagradients agree with each other and with finite differences."""

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines


def _init(z, data):
    return {"w1": data["w1"], "w2": data["w2"], "m1": jnp.zeros_like(data["w1"]), "m2": jnp.zeros_like(data["w2"])}


def _loss(p, x, y, w):
    h = jnp.tanh(x @ p["w1"])
    logits = h @ p["w2"]
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
    return jnp.mean(w * ce)


def _step(state, z, data, t):
    # minibatch chosen by t; per-example weights z["w"], log learning rate z["loglr"]
    idx = data["batches"][t % data["batches"].shape[0]]
    x, y, w = data["x"][idx], data["y"][idx], z["w"][idx]
    p = {"w1": state["w1"], "w2": state["w2"]}
    g = jax.grad(_loss)(p, x, y, w)
    lr = jnp.exp(z["loglr"])
    m1 = 0.9 * state["m1"] + g["w1"]
    m2 = 0.9 * state["m2"] + g["w2"]
    return {"w1": state["w1"] - lr * m1, "w2": state["w2"] - lr * m2, "m1": m1, "m2": m2}


def _output(state, z, data):
    p = {"w1": state["w1"], "w2": state["w2"]}
    return _loss(p, data["xv"], data["yv"], jnp.ones(data["yv"].shape[0])) + 0.01 * jnp.sum(z["w"] ** 2)


def _task(steps, dtype):
    rng = np.random.default_rng(0)
    n, d, h, c = 8, 5, 6, 3
    data = {
        "x": rng.normal(size=(n, d)).astype(dtype), "y": rng.integers(0, c, n).astype(np.int32),
        "xv": rng.normal(size=(6, d)).astype(dtype), "yv": rng.integers(0, c, 6).astype(np.int32),
        "w1": (0.5 * rng.normal(size=(d, h))).astype(dtype), "w2": (0.5 * rng.normal(size=(h, c))).astype(dtype),
        "batches": np.array([[0, 1, 2, 3], [4, 5, 6, 7], [1, 3, 5, 7]], dtype=np.int32),
    }
    z = {"w": jnp.asarray(rng.uniform(0.5, 1.5, n).astype(dtype)), "loglr": jnp.asarray(np.log(0.3).astype(dtype))}
    return metagrad.Task(init=_init, step=_step, output=_output, steps=steps, data=data), z


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("steps", [1, 7])
def test_all_agree_with_finite_differences(x64, steps):
    task, z = _task(steps, np.float64)
    v0, g0 = baselines.scan_metagradient(task, z)
    results = [(v0, g0), baselines.scan_metagradient(task, z, checkpoint_every=3),
               baselines.scan_metagradient(task, z, checkpoint_every=2),
               baselines.replay_metagradient(task, z, k=2), baselines.replay_metagradient(task, z, k=4)]
    for v, g in results:
        assert jax.tree_util.tree_structure(g) == jax.tree_util.tree_structure(z)
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-12)
        np.testing.assert_allclose(_flat(g), _flat(g0), rtol=1e-10, atol=1e-13)

    # central finite differences on every coordinate of z
    def phi(zz):
        return float(task.output(baselines.train(task, zz), zz, task.data))

    assert phi(z) == pytest.approx(float(v0), rel=1e-12)
    flat, unravel = ravel_pytree(z)
    eps = 1e-6
    fd = []
    for i in range(flat.size):
        e = jnp.zeros_like(flat).at[i].set(eps)
        fd.append((phi(unravel(flat + e)) - phi(unravel(flat - e))) / (2 * eps))
    np.testing.assert_allclose(np.array(fd), _flat(g0), rtol=1e-6, atol=1e-9)


def test_train_matches_python_loop():
    task, z = _task(5, np.float32)
    state = task.init(z, task.data)
    for t in range(5):
        state = task.step(state, z, task.data, jnp.int32(t))
    final = baselines.train(task, z)
    np.testing.assert_allclose(_flat(final), _flat(state), rtol=1e-5, atol=1e-6)


def test_replay_stats_and_memory_bound():
    task, z = _task(40, np.float32)
    stats = {}
    v, g = baselines.replay_metagradient(task, z, k=3, stats=stats)
    v0, g0 = baselines.scan_metagradient(task, z)
    np.testing.assert_allclose(_flat(g), _flat(g0), rtol=2e-4, atol=1e-6)
    assert stats["reverse_steps"] == 40
    # depth ceil(log_3 40) = 4 levels of at most k=3 states, plus the final state
    assert stats["max_live_states"] <= 3 * 4 + 1
    assert 40 < stats["forward_steps"] <= 40 * 4


def test_bad_arguments():
    task, z = _task(3, np.float32)
    with pytest.raises(ValueError, match="checkpoint_every"):
        baselines.scan_metagradient(task, z, checkpoint_every=0)
    with pytest.raises(ValueError, match="k must be"):
        baselines.replay_metagradient(task, z, k=1)
    with pytest.raises(TypeError, match="Task"):
        baselines.train(object(), z)


def _bytes(*trees):
    return sum(np.asarray(x).nbytes for tree in trees for x in jax.tree_util.tree_leaves(tree))


def _about(measured, expected):
    """XLA counts a tuple output's table of buffer pointers (8 bytes a leaf) in output bytes."""
    return expected <= measured <= expected + 8 * 16


def test_memory_stats_accounts_arguments_outputs_and_residuals():
    task, z = _task(40, np.float32)
    state = task.init(z, task.data)
    store_all = baselines.memory_stats(task, z)
    checkpointed = baselines.memory_stats(task, z, checkpoint_every=5)
    for stats in (store_all, checkpointed):
        assert stats["argument_bytes"] == _bytes(z, task.data)
        assert _about(stats["output_bytes"], _bytes(z) + 4)  # the gradient and phi
        assert stats["total_bytes"] == (stats["argument_bytes"] + stats["output_bytes"] + stats["temp_bytes"]
                                        - stats["alias_bytes"])
        assert stats["state_bytes"] == _bytes(state)
    # store-all keeps residuals of all 40 steps, at least the 40 states; 5-step segments far fewer
    assert store_all["temp_bytes"] >= 40 * _bytes(state)
    assert checkpointed["temp_bytes"] < store_all["temp_bytes"] / 2
    # jit drops the arguments a program never reads: training and a step never see the validation set
    read = {name: x for name, x in task.data.items() if name not in ("xv", "yv")}
    train = baselines.memory_stats(task, z, method="train")
    assert train["argument_bytes"] == _bytes(z, read) and _about(train["output_bytes"], _bytes(state))
    # step_vjp(state, z, data, t, state_bar, z_bar), with all of the data, which REPLAY holds throughout
    replay = baselines.memory_stats(task, z, method="replay")
    assert replay["argument_bytes"] == 2 * _bytes(state) + 2 * _bytes(z) + _bytes(task.data) + 4
    assert _about(replay["output_bytes"], _bytes(state) + _bytes(z))


def test_replay_memory_is_its_largest_program():
    """REPLAY's output vjp runs over the validation set: with a large one, that program is its peak."""
    task, z = _task(3, np.float32)
    rng = np.random.default_rng(1)
    data = {**task.data, "xv": rng.normal(size=(4096, 5)).astype(np.float32), "yv": np.zeros(4096, np.int32)}
    task = metagrad.Task(init=_init, step=_step, output=_output, steps=3, data=data)
    state = task.init(z, data)

    def output_vjp(state, z, data):  # written out here, independently of baselines._ReplayFns
        value, vjp = jax.vjp(lambda s, zz: _output(s, zz, data), state, z)
        return (value, *vjp(jnp.ones_like(value)))

    analysis = jax.jit(output_vjp, keep_unused=True).lower(state, z, data).compile().memory_analysis()
    replay = baselines.memory_stats(task, z, method="replay")
    assert replay["argument_bytes"] == analysis.argument_size_in_bytes == _bytes(state, z, data)
    assert replay["temp_bytes"] == analysis.temp_size_in_bytes
    # the step's vjp never reads the validation set: it would have missed these bytes
    assert replay["total_bytes"] > _bytes(data["xv"]) + 2 * _bytes(state)


def test_memory_stats_bad_arguments():
    task, z = _task(3, np.float32)
    with pytest.raises(ValueError, match="method must be one of"):
        baselines.memory_stats(task, z, method="revolve")
    with pytest.raises(ValueError, match="checkpoint_every applies to method='scan' only"):
        baselines.memory_stats(task, z, method="train", checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every must be None or an int"):
        baselines.memory_stats(task, z, checkpoint_every=0)
    with pytest.raises(TypeError, match="Task"):
        baselines.memory_stats(object(), z)
