"""The C++ PJRT runtime: compile, execute, buffers, DLPack, errors."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metagrad import runtime
from models import make_task


@pytest.fixture(scope="module")
def client():
    return runtime.get_client()


def portable(fn, *args, donate=(), client=None):
    lowered = jax.jit(fn, donate_argnums=donate, keep_unused=True).lower(*args)
    return runtime.portable_artifact(lowered, client=client)


def test_plugin_reports_versions(client):
    major, minor = client.plugin_api_version
    assert major == 0 and minor >= 50
    version = client.plugin_attributes["stablehlo_current_version"]
    assert len(version) == 3
    target = runtime.stablehlo_target(client)
    assert tuple(int(p) for p in target.split(".")) <= tuple(version)
    # The default plugin is the CPU one, or $METAGRAD_PJRT_PLUGIN's (a CUDA plugin on a GPU's machine).
    assert client.platform_name == ("cuda" if "cuda" in os.path.basename(client.plugin_path) else "cpu")
    assert "device" in client.devices[0].memory_kinds


def test_cpu_device_count_is_selectable():
    client = runtime.get_client(runtime.cpu_plugin_path(), cpu_device_count=3)
    assert [d.id for d in client.devices] == [0, 1, 2]
    with pytest.raises(ValueError, match="cpu_device_count"):
        runtime.get_client(runtime.cpu_plugin_path(), cpu_device_count=0)
    # A CUDA plugin's devices are its GPUs: asking it for CPU devices is an error, not ignored.
    with pytest.raises(ValueError, match="cpu_device_count applies to the CPU plugin only; xla_cuda_plugin.so"):
        runtime.get_client("/any/xla_cuda_plugin.so", cpu_device_count=3)


@pytest.mark.parametrize("as_text", [True, False])
def test_matmul_tanh_matches_jax(client, as_text):
    def f(x, w):
        return jnp.tanh(x @ w)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32)).astype(np.float32)
    w = rng.normal(size=(32, 8)).astype(np.float32)
    code = jax.jit(f).lower(x, w).as_text() if as_text else portable(f, x, w, client=client)
    executable = runtime.compile_module(code, client)
    assert [o.shape for o in executable.outputs] == [[16, 8]]
    (out,) = executable.execute([runtime.to_device(x, client), runtime.to_device(w, client)])
    np.testing.assert_allclose(out.to_numpy(), np.asarray(jax.jit(f)(x, w)), rtol=1e-6, atol=1e-6)


def test_mlp_training_step_matches_jax(client):
    # SGD with momentum: well conditioned, so the runtime must agree with jax.jit closely.
    task, z = make_task("weights", "sgdm", steps=4)
    state = task.init(z, task.data)
    leaves, tree = jax.tree_util.tree_flatten(state)

    def step(leaves, z, t):
        return jax.tree_util.tree_leaves(task.step(jax.tree_util.tree_unflatten(tree, leaves), z, task.data, t))

    t = np.int32(3)
    executable = runtime.compile_module(portable(step, leaves, z, t, client=client), client)
    args = [runtime.to_device(np.asarray(a), client) for a in leaves] + [runtime.to_device(z, client),
                                                                       runtime.to_device(t, client)]
    got = [b.to_numpy() for b in executable.execute(args)]
    want = jax.jit(step)(leaves, z, t)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-6, atol=1e-7)


def test_chained_executions_stay_on_device(client):
    def f(x, y):
        return 0.5 * x + jnp.sin(y), y + 1.0

    x0 = np.linspace(-1, 1, 64).astype(np.float32)
    y0 = np.zeros(64, np.float32)
    executable = runtime.compile_module(portable(f, x0, y0, donate=(0, 1), client=client), client)
    assert executable.donated == [True, True]
    x, y = runtime.to_device(x0, client), runtime.to_device(y0, client)
    first = x
    for _ in range(100):
        x, y = executable.execute([x, y])
    assert first.is_deleted  # donated: consumed in place, never copied back
    want_x, want_y = x0, y0
    step = jax.jit(f)
    for _ in range(100):
        want_x, want_y = step(want_x, want_y)
    np.testing.assert_allclose(x.to_numpy(), np.asarray(want_x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y.to_numpy(), np.asarray(want_y))


def test_dlpack_exchange_with_jax(client):
    host = np.arange(12, dtype=np.float32).reshape(3, 4)
    buffer = runtime.to_device(host, client)
    as_jax = jnp.from_dlpack(buffer)
    np.testing.assert_array_equal(np.asarray(as_jax), host)
    # buffer_from_array takes arrays in host memory; to_device takes one from any device (through the host).
    on_host = jax.device_put(jnp.arange(5, dtype=jnp.int32) * 2, jax.devices("cpu")[0])
    np.testing.assert_array_equal(client.buffer_from_array(on_host).to_numpy(), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(runtime.to_device(jnp.arange(5, dtype=jnp.int32) * 3, client).to_numpy(),
                                  [0, 3, 6, 9, 12])


def test_buffers_from_strided_and_many_dtypes(client):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    view = base[:, ::2]
    np.testing.assert_array_equal(runtime.to_device(view, client).to_numpy(), view)
    np.testing.assert_array_equal(client.buffer_from_array(base.T).to_numpy(), base.T)
    for dtype in (np.float32, np.float16, np.int8, np.uint32, np.int64, np.bool_):
        value = (np.arange(6) % 3).astype(dtype)
        buffer = runtime.to_device(value, client)
        assert buffer.dtype == np.dtype(dtype).name
        np.testing.assert_array_equal(buffer.to_numpy(), value)


# -- bad input: a clear Python exception, and the process goes on -------------

@pytest.fixture(scope="module")
def add_executable(client):
    return runtime.compile_module(portable(lambda a, b: a + b, np.ones(3, np.float32), np.ones(3, np.float32),
                                           client=client), client)


def test_wrong_number_of_arguments(client, add_executable):
    with pytest.raises(ValueError, match="takes 2 argument"):
        add_executable.execute([runtime.to_device(np.ones(3, np.float32), client)])


def test_wrong_shape_and_dtype(client, add_executable):
    good = runtime.to_device(np.ones(3, np.float32), client)
    with pytest.raises(ValueError, match=r"argument 1 is float32\[4\], the program expects float32\[3\]"):
        add_executable.execute([good, runtime.to_device(np.ones(4, np.float32), client)])
    with pytest.raises(ValueError, match=r"argument 0 is int32\[3\]"):
        add_executable.execute([runtime.to_device(np.ones(3, np.int32), client), good])


def test_donated_buffer_reuse_is_refused(client):
    executable = runtime.compile_module(portable(lambda a: a * 2, np.ones(3, np.float32), donate=(0,),
                                                 client=client), client)
    buffer = runtime.to_device(np.ones(3, np.float32), client)
    executable.execute([buffer])
    with pytest.raises(ValueError, match="donated to an earlier execution"):
        executable.execute([buffer])
    with pytest.raises(ValueError, match="donated"):
        buffer.to_numpy()


def test_missing_plugin_file():
    with pytest.raises(FileNotFoundError, match="PJRT plugin not found"):
        runtime.load_plugin("/nonexistent/plugin.so")
    with pytest.raises(ValueError, match="not found"):
        runtime.Plugin.load("/nonexistent/plugin.so")


def test_not_a_plugin(tmp_path):
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"not an elf file")
    with pytest.raises(ValueError, match="cannot load PJRT plugin"):
        runtime.Plugin.load(str(fake))


def test_malformed_module(client):
    with pytest.raises(ValueError, match="not a valid StableHLO module"):
        runtime.compile_module("this is not mlir", client)
    with pytest.raises(ValueError, match="not a valid StableHLO module"):
        runtime.compile_module(b"\x00\x01garbage", client)
    with pytest.raises(runtime.PjrtError, match="compiling the program"):
        client.compile(b"module { bogus }", "mlir", [], [])
    with pytest.raises(ValueError, match="unknown program format"):
        client.compile(b"x", "onnx", [], [])


def test_errors_leave_the_process_usable():
    # A fresh process hits each error, then still computes: no abort reaches the user.
    script = """
import numpy as np
from metagrad import runtime
c = runtime.get_client()
for bad in (lambda: c.compile(b"", "mlir", [], []), lambda: c.compile(b"junk", "mlir", [], []),
            lambda: runtime.Plugin.load("/missing.so")):
    try:
        bad()
    except (ValueError, RuntimeError):
        pass
print(runtime.to_device(np.arange(3, dtype=np.float32), c).to_numpy().sum())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("3.0")


def test_out_of_device_memory_is_an_exception(client):
    # 1 TiB output: the plugin refuses the allocation; the runtime stays usable.
    huge = runtime.compile_module(portable(lambda x: jnp.broadcast_to(x, (2**38,)) + 1.0, np.float32(1),
                                           client=client), client)
    with pytest.raises(runtime.PjrtError, match="Out of memory"):
        huge.execute([runtime.to_device(np.float32(1), client)])[0].block_until_ready()
    np.testing.assert_array_equal(runtime.to_device(np.arange(3.0), client).to_numpy(), [0.0, 1.0, 2.0])
