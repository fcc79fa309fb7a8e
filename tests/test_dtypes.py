"""Half-precision state and z, typed PRNG keys, and dtypes Enzyme cannot take."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from metagrad import runtime

STEPS, N, M = 6, 16, 32


def _half_task(dtype) -> metagrad.Task:
    """Least squares trained with momentum, every array in ``dtype``; z: per-example weights and lr schedule."""
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(M, N)).astype(np.float32).astype(dtype),
            "y": rng.normal(size=(M,)).astype(np.float32).astype(dtype)}

    def init(z, data):
        return {"w": jnp.zeros(N, dtype), "m": jnp.zeros(N, dtype), "count": jnp.int32(0)}

    def step(state, z, data, t):
        def loss(w):
            r = data["x"] @ w - data["y"]
            return jnp.mean(z["weights"] * r * r)

        m = (0.9 * state["m"] + jax.grad(loss)(state["w"])).astype(dtype)
        return {"w": (state["w"] - z["lr"][t] * m).astype(dtype), "m": m, "count": state["count"] + 1}

    def output(state, z, data):
        return jnp.mean((data["x"] @ state["w"] - data["y"]) ** 2).astype(jnp.float32)

    return metagrad.Task(init, step, output, STEPS, data)


def _half_z(dtype):
    return {"weights": np.ones(M, dtype), "lr": np.full(STEPS, 0.1, dtype)}


def _compile(task, z, backend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = task.compile(z, backend=backend)
    return compiled, [str(w.message) for w in caught]


@pytest.fixture(scope="module", params=[("bfloat16", "jax"), ("bfloat16", "auto"), ("float16", "auto")],
                ids=lambda p: "-".join(p))
def half(request):
    dtype, backend = request.param
    dtype = jnp.dtype(dtype)
    task = _half_task(dtype)
    compiled, messages = _compile(task, _half_z(dtype), backend)
    return task, compiled, dtype, backend, messages


def test_half_precision_layout(half):
    _, compiled, dtype, _, _ = half
    layout = compiled.layout
    assert [s.dtype for s in layout.z] == [dtype.name, dtype.name]
    assert dict(zip((s.path for s in layout.state), layout.differentiable)) == {
        "state['count']": False, "state['m']": True, "state['w']": True}


def test_half_precision_metagradient_equals_jax_grad_through_scan(half):
    task, compiled, dtype, _, _ = half
    z = _half_z(dtype)
    want_value, want_grad = baselines.scan_metagradient(task, z)
    eps = float(jnp.finfo(dtype).eps)
    for schedule in (metagrad.Replay(k=2), metagrad.StoreAll()):
        value, grad = compiled.metagradient(z, schedule)
        np.testing.assert_allclose(value, want_value, rtol=2 * eps)
        for name in z:
            assert grad[name].dtype == dtype  # like jax.grad: the cotangent of z has z's dtype
            got, want = np.asarray(grad[name], np.float32), np.asarray(want_grad[name], np.float32)
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * eps * float(np.max(np.abs(want))))


def test_half_precision_train_returns_the_dtype(half):
    task, compiled, dtype, _, _ = half
    state = compiled.train(_half_z(dtype))
    want = baselines.train(task, _half_z(dtype))
    assert state["w"].dtype == dtype and state["count"] == STEPS
    np.testing.assert_allclose(np.asarray(state["w"], np.float32), np.asarray(want["w"], np.float32),
                               rtol=0, atol=float(jnp.finfo(dtype).eps) * float(np.max(np.abs(want["w"]))))


def test_enzyme_takes_bfloat16_and_float16_falls_back_with_a_reason(half):
    _, compiled, dtype, backend, messages = half
    reverse = {name: p.backend for name, p in compiled.programs.items() if "vjp" in name}
    if backend == "jax" or dtype.name == "float16":  # enzyme_ad 0.0.16 passes no float16 arrays
        assert set(reverse.values()) == {"jax"}
        assert all("is float16, which enzyme-ad's JAX wrapper does not pass to Enzyme" in m for m in messages)
        assert len(messages) == (backend == "auto")  # the step's reverse: what "auto" asks of Enzyme
    else:  # "auto": Enzyme builds the step's reverse, JAX the once-per-run reverses
        assert reverse == {"step_vjp": "enzyme", "output_vjp": "jax", "init_vjp": "jax"} and not messages


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_arrays_round_trip_through_the_runtime_exactly(dtype):
    dtype = jnp.dtype(dtype)
    finfo = jnp.finfo(dtype)
    values = np.concatenate([np.linspace(-3, 3, 997, dtype=np.float32),
                             [np.inf, -np.inf, np.nan, float(finfo.max), float(finfo.tiny), float(finfo.smallest_subnormal),
                              -0.0]]).astype(dtype)
    for array in (values, values[::3], values[:1000].reshape(40, 25).T, jnp.asarray(values)):
        back = runtime.to_device(array).to_numpy()
        assert back.dtype == dtype and back.shape == array.shape
        assert np.array_equal(np.asarray(array).view(np.uint16), back.view(np.uint16))


def test_uint8_data_with_enzyme_is_refused_naming_the_leaf():
    data = {"x": np.arange(16, dtype=np.uint8)}
    task = metagrad.Task(lambda z, d: {"w": jnp.zeros(16)},
                         lambda s, z, d, t: {"w": s["w"] - z * (s["w"] - d["x"].astype(jnp.float32))},
                         lambda s, z, d: jnp.sum(s["w"] ** 2), 3, data)
    with pytest.raises(metagrad.EnzymeUnsupportedError, match=r"data\['x'\] is uint8, which enzyme-ad's JAX wrapper does not pass to Enzyme"):
        task.compile(np.float32(0.1), backend="enzyme")


# -- typed PRNG keys -------------------------------------------------------------------------------------------

def _key_task() -> metagrad.Task:
    data = {"x": np.linspace(-1, 1, 8).astype(np.float32), "key": jax.random.key(7)}

    def init(z, data):
        return {"w": jnp.zeros(8), "key": jax.random.key(1), "keys": jax.random.split(jax.random.key(2), 3)}

    def step(state, z, data, t):
        noise = (jax.random.normal(jax.random.fold_in(state["key"], t), (8,))
                 + jax.random.normal(jax.random.fold_in(data["key"], t), (8,))
                 + jax.random.normal(state["keys"][t % 3], (8,)))
        w = state["w"] - z["lr"] * (state["w"] - data["x"] - 0.1 * noise)
        return {"w": w, "key": jax.random.fold_in(state["key"], 1), "keys": state["keys"]}

    def output(state, z, data):
        return jnp.sum(state["w"] ** 2) + jnp.sum(jax.random.uniform(state["key"], (2,)))

    return metagrad.Task(init, step, output, STEPS, data)


KEY_Z = {"lr": np.float32(0.3)}


@pytest.fixture(scope="module")
def keyed():
    task = _key_task()
    compiled, _ = _compile(task, KEY_Z, "auto")
    return task, compiled


def test_key_leaves_are_carried_as_key_data_and_never_differentiated(keyed):
    _, compiled = keyed
    specs = {s.path: s for s in compiled.layout.state}
    assert (specs["state['keys']"].shape, specs["state['keys']"].dtype, specs["state['keys']"].key_impl) == (
        (3, 2), "uint32", "threefry2x32")
    assert compiled.layout.data[0].key_impl == "threefry2x32"
    assert dict(zip(specs, compiled.layout.differentiable)) == {
        "state['key']": False, "state['keys']": False, "state['w']": True}


def test_key_task_metagradient_equals_jax_grad_through_scan(keyed):
    task, compiled = keyed
    want_value, want_grad = baselines.scan_metagradient(task, KEY_Z)
    value, grad = compiled.metagradient(KEY_Z, metagrad.Replay(k=2))
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad["lr"], want_grad["lr"], rtol=1e-5)


def test_train_returns_typed_keys(keyed):
    task, compiled = keyed
    state, want = compiled.train(KEY_Z), baselines.train(task, KEY_Z)
    assert jnp.issubdtype(state["key"].dtype, jax.dtypes.prng_key) and state["keys"].shape == (3,)
    np.testing.assert_array_equal(jax.random.key_data(state["key"]), jax.random.key_data(want["key"]))
    np.testing.assert_allclose(state["w"], want["w"], rtol=1e-6)


def test_key_task_saves_and_loads(keyed, tmp_path):
    _, compiled = keyed
    compiled.prepare(metagrad.Replay(k=2)).save(str(tmp_path))
    loaded = metagrad.load(str(tmp_path))
    assert loaded.layout == compiled.layout
    value, grad = compiled.metagradient(KEY_Z, metagrad.Replay(k=2))
    loaded_value, loaded_grad = loaded.metagradient(KEY_Z, metagrad.Replay(k=2))
    assert loaded_value == value and loaded_grad["lr"] == grad["lr"]
    assert jnp.issubdtype(loaded.train(KEY_Z)["key"].dtype, jax.dtypes.prng_key)
