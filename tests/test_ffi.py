"""Custom calls in a step: jaxlib's LAPACK kernels run in the runtime; host callbacks are refused at compile time."""

import ctypes
import functools
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import io_callback

import metagrad
from metagrad import baselines
from metagrad import runtime
from metagrad._src import ffi  # the registration's internals: versions and the adapter

N, STEPS = 6, 8


@functools.lru_cache(maxsize=None)  # the same functions, so compiling again hits metagrad's cache
def _linalg_task(op: str) -> metagrad.Task:
    """Steps of a preconditioned fixed-point iteration whose solve is ``op``; z: ridge and lr schedule."""
    rng = np.random.default_rng(0)
    data = {"m": rng.normal(size=(N, N)).astype(np.float32), "b": rng.normal(size=(N,)).astype(np.float32)}

    def solve(a, r):
        if op == "solve":
            return jnp.linalg.solve(a, r)
        if op == "cholesky":
            return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), r)
        w, v = jnp.linalg.eigh(a)
        return v @ ((v.T @ r) / w)

    def init(z, data):
        return {"x": jnp.zeros(N, jnp.float32)}

    def step(state, z, data, t):
        a = data["m"] @ data["m"].T + (1.0 + z["reg"]) * jnp.eye(N)
        return {"x": state["x"] + z["lr"][t] * solve(a, data["b"] - 0.3 * state["x"])}

    def output(state, z, data):
        return jnp.sum(state["x"] ** 2)

    return metagrad.Task(init, step, output, STEPS, data)


Z = {"reg": np.float32(0.5), "lr": np.full(STEPS, 0.5, np.float32)}


@pytest.fixture(scope="module", params=[("solve", "jax"), ("solve", "auto"), ("cholesky", "auto"), ("eigh", "jax")],
                ids=lambda p: "-".join(p))
def linalg(request):
    op, backend = request.param
    task = _linalg_task(op)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = task.compile(Z, backend=backend)
    return task, compiled, backend, [str(w.message) for w in caught]


def test_linalg_step_metagradient_equals_jax_grad_through_scan(linalg):
    task, compiled, _, _ = linalg
    want_value, want_grad = baselines.scan_metagradient(task, Z)
    for schedule in (metagrad.Replay(k=2), metagrad.StoreAll()):
        value, grad = compiled.metagradient(Z, schedule)
        np.testing.assert_allclose(value, want_value, rtol=1e-5)
        for name in Z:
            scale = float(np.max(np.abs(want_grad[name])))
            np.testing.assert_allclose(grad[name], want_grad[name], rtol=0, atol=1e-5 * scale)


def test_auto_backend_falls_back_to_jax_for_the_lapack_step_only(linalg):
    _, compiled, backend, messages = linalg
    reverse = {name: p.backend for name, p in compiled.programs.items() if "vjp" in name}
    if backend == "jax":
        assert set(reverse.values()) == {"jax"} and not messages
        return
    # Enzyme has no adjoint for the LAPACK custom call: the step's reverse comes from JAX, and the
    # warning says which and why (the once-per-run reverses are JAX's under "auto" anyway).
    assert reverse == {"output_vjp": "jax", "step_vjp": "jax", "init_vjp": "jax"}
    assert any("step_vjp" in m and "stablehlo.custom_call" in m for m in messages)


def test_enzyme_backend_names_the_custom_call():
    with pytest.raises(metagrad.EnzymeUnsupportedError, match="stablehlo.custom_call.*jnp.linalg") as info:
        _linalg_task("solve").compile(Z, backend="enzyme")
    assert info.value.program == "step_vjp"


def test_a_saved_linalg_task_runs_in_a_fresh_process(tmp_path):
    # The process never lowers a linalg op, so nothing but metagrad fills jaxlib's LAPACK pointers
    # (without _lapack.initialize() this run dies with SIGSEGV).
    compiled = _linalg_task("solve").compile(Z, backend="jax")
    compiled.prepare(metagrad.Replay(k=2)).save(str(tmp_path))
    _, want = compiled.metagradient(Z, metagrad.Replay(k=2))
    code = ("import json, numpy as np, metagrad; "
            f"z = {{'reg': np.float32(0.5), 'lr': np.full({STEPS}, 0.5, np.float32)}}; "
            f"g = metagrad.load({str(tmp_path)!r}).metagradient(z, metagrad.Replay(k=2))[1]; "
            "print(json.dumps({'reg': float(g['reg']), 'lr': g['lr'].tolist()}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got == {"reg": float(want["reg"]), "lr": want["lr"].tolist()}  # bit for bit


def test_linalg_programs_match_jax_in_the_runtime():
    def f(a, b):
        q, r = jnp.linalg.qr(a)
        return (jnp.linalg.solve(a, b), jnp.linalg.cholesky(a), jnp.linalg.eigh(a)[0], q, r,
                jnp.linalg.svd(a, compute_uv=False), jnp.linalg.inv(a), jnp.linalg.det(a))

    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 5)).astype(np.float32)
    a, b = m @ m.T + 5 * np.eye(5, dtype=np.float32), rng.normal(size=5).astype(np.float32)
    client = runtime.get_client()
    artifact = runtime.portable_artifact(jax.jit(f).lower(a, b), client=client)
    got = runtime.compile_module(artifact, client).execute([runtime.to_device(a), runtime.to_device(b)])
    for g, w in zip(got, jax.jit(f)(a, b)):
        np.testing.assert_allclose(g.to_numpy(), w, rtol=1e-5, atol=1e-5)


def test_jaxlib_handlers_are_registered_with_the_plugin():
    client = runtime.get_client()
    registration = ffi.register_jaxlib_handlers(client)
    assert registration.failure is None
    assert {"lapack_sgetrf_ffi", "lapack_spotrf_ffi", "lapack_ssyevd_ffi", "lapack_dgetrf_ffi"} <= registration.targets
    versions = ffi.versions(client)
    assert versions["metagrad_headers"] == versions["jaxlib_handlers"]  # built against jaxlib's own header
    # Handlers newer than the plugin's XLA go behind the version adapter; the plugin would drop them otherwise.
    assert registration.adapted == (versions["jaxlib_handlers"] > versions["plugin"])


# -- handlers of our own: the registration ABI and the version gate ---------------------------------------------

_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
_REGISTERED = []  # ctypes handlers stay alive as long as the plugin (the process) may call them
ctypes.pythonapi.PyCapsule_New.restype = ctypes.py_object
ctypes.pythonapi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _fake_handler(version, calls):
    """A typed FFI handler (ctypes) that declares FFI API ``version`` and counts its executions."""
    u64 = lambda address: ctypes.c_uint64.from_address(address).value  # noqa: E731

    def handler(frame):
        extension = u64(frame + 8)  # XLA_FFI_CallFrame.extension_start
        if extension and ctypes.c_int32.from_address(extension + 8).value == 1:  # the metadata query
            metadata = u64(extension + 24)  # XLA_FFI_Metadata: struct_size, api_version{size, ext, major, minor}
            ctypes.c_int32.from_address(metadata + 24).value, ctypes.c_int32.from_address(metadata + 28).value = version
            ctypes.c_uint32.from_address(metadata + 32).value = 0
            return None
        calls.append(1)
        return None

    function = _HANDLER(handler)
    return function, ctypes.pythonapi.PyCapsule_New(ctypes.cast(function, ctypes.c_void_p), None, None)


def test_a_handler_newer_than_the_plugin_is_refused_with_both_versions():
    client = runtime.get_client()
    plugin_version = runtime.load_plugin(client.plugin_path).ffi_api_version("Host")
    _, capsule = _fake_handler((plugin_version[0], plugin_version[1] + 5), [])
    with pytest.raises(ValueError, match=r"built with XLA FFI API \d+\.\d+, newer than the \d+\.\d+ of PJRT plugin"):
        runtime.register_ffi_target("metagrad_test_too_new", capsule)
    assert "metagrad_test_too_new" not in ffi.handled_targets()


def test_a_registered_user_handler_runs_in_the_runtime():
    client = runtime.get_client()
    calls = []
    function, capsule = _fake_handler(runtime.load_plugin(client.plugin_path).ffi_api_version("Host"), calls)
    _REGISTERED.append(function)
    runtime.register_ffi_target("metagrad_test_counter", capsule)
    assert "metagrad_test_counter" in ffi.handled_targets()
    call = jax.ffi.ffi_call("metagrad_test_counter", jax.ShapeDtypeStruct((2,), jnp.float32))
    lowered = jax.jit(lambda x: call(x)).lower(jnp.ones(2, jnp.float32))
    executable = runtime.compile_module(runtime.portable_artifact(lowered, client=client))
    executable.execute([runtime.to_device(np.ones(2, np.float32))])[0].block_until_ready()
    assert calls == [1]


# -- host callbacks and unknown custom calls are refused when lowering -----------------------------------------

def _callback_task(kind: str, where: str = "step") -> metagrad.Task:
    def hook(w):
        if kind == "print":
            jax.debug.print("w = {}", w)
        elif kind == "callback":
            jax.debug.callback(lambda v: None, w)
        elif kind == "pure":
            w = jax.pure_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(w.shape, w.dtype), w)
        elif kind == "io":
            w = io_callback(lambda a: np.asarray(a), jax.ShapeDtypeStruct(w.shape, w.dtype), w)
        return w

    def init(z, data):
        return {"w": jnp.zeros(4)}

    def step(state, z, data, t):
        w = state["w"] - z * (state["w"] - 1.0)
        return {"w": hook(w) if where == "step" else w}

    def output(state, z, data):
        w = hook(state["w"]) if where == "output" else state["w"]
        return jnp.sum(w ** 2)

    return metagrad.Task(init, step, output, 3, {})


@pytest.mark.parametrize("kind, op", [("print", "jax.debug.print"), ("callback", "jax.debug.callback"),
                                      ("pure", "jax.pure_callback"), ("io", "jax.experimental.io_callback")])
def test_host_callbacks_are_refused_at_compile_time(kind, op):
    with pytest.raises(metagrad.UnsupportedOpError) as info:
        _callback_task(kind).compile(np.float32(0.1))
    message = str(info.value)
    assert info.value.program == "step" and info.value.op == op
    assert f"step calls {op}" in message and "no Python" in message
    assert "test_ffi.py:" in message  # the user's line


def test_a_callback_in_output_names_the_output_program():
    with pytest.raises(metagrad.UnsupportedOpError, match="output calls jax.debug.print"):
        _callback_task("print", where="output").compile(np.float32(0.1), backend="jax")


def test_a_custom_call_without_handler_is_refused():
    call = jax.ffi.ffi_call("no_such_kernel", jax.ShapeDtypeStruct((4,), jnp.float32))
    task = metagrad.Task(lambda z, d: {"w": jnp.zeros(4)}, lambda s, z, d, t: {"w": call(s["w"]) * z},
                         lambda s, z, d: jnp.sum(s["w"]), 3, {})
    with pytest.raises(metagrad.UnsupportedOpError, match="step contains custom call 'no_such_kernel'.*no handler"):
        task.compile(np.float32(0.1), backend="jax")
