"""CompiledTask: training in the runtime, the compile cache, save and load."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from models import make_task


@pytest.fixture(scope="module", params=["sgdm", "adam"])
def compiled(request):
    task, z = make_task("weights", request.param, steps=60)
    return task, z, task.compile(z, backend="enzyme")


def test_train_equals_a_jax_scan_of_the_step(compiled):
    task, z, c = compiled
    z = (z * np.linspace(0.5, 1.5, z.size)).astype(np.float32)
    got = jax.tree_util.tree_leaves(c.train(z))
    want = jax.tree_util.tree_leaves(baselines.train(task, z))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        # A scan fuses differently from per-step programs; Adam's 1/sqrt(nu) amplifies
        # those float32 roundings over the run, so compare relative to the array's scale.
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(w))))


def test_train_returns_the_state_pytree(compiled):
    task, z, c = compiled
    state = c.train(z)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(task.init(z, task.data))


def test_second_compile_hits_the_cache(compiled):
    task, z, c = compiled
    start = time.perf_counter()
    again = task.compile(np.zeros_like(z), backend="enzyme")
    assert time.perf_counter() - start < 0.5
    assert again.programs is c.programs
    assert task.compile(z, backend="jax").programs is not c.programs


def test_the_suite_runs_on_its_own_fresh_cache():
    from conftest import CACHE_DIR
    from metagrad._src import cache

    assert cache.directory() == CACHE_DIR and CACHE_DIR.startswith(tempfile.gettempdir())


def test_a_program_on_disk_is_keyed_by_the_code_that_lowered_it(compiled, tmp_path, monkeypatch):
    """Edit a lowering source and the program keys change: the entry the old code wrote is
    not read back. The same text gives the same key (the cache still serves unchanged code)."""
    from metagrad._src import cache, lowering

    task, z, c = compiled
    package = os.path.dirname(lowering.__file__)
    for name in lowering.LOWERING_SOURCES:
        shutil.copy(os.path.join(package, name), tmp_path / name)
    assert lowering.code_identity(str(tmp_path)) == lowering.code_identity()
    with open(tmp_path / "programs.py", "a") as f:
        f.write("# changed\n")
    edited = lowering.code_identity.__wrapped__(str(tmp_path))
    assert edited != lowering.code_identity()

    exports, layout = c.exports, c.layout
    key = lambda: lowering.program_key(exports, layout, "step_vjp", "enzyme", "", "unroll")  # noqa: E731
    before = key()
    cache.put("programs", before, b"built by the old code")
    monkeypatch.setattr(lowering, "code_identity", lambda: edited)
    after = key()
    assert after != before and cache.get("programs", after) is None
    assert cache.get("programs", before) == b"built by the old code"


def test_a_save_that_fails_leaves_the_task_that_was_there(compiled, tmp_path, monkeypatch):
    from metagrad._src import saved

    task, z, c = compiled
    path = tmp_path / "task"
    c.save(str(path))
    before = (path / "manifest.json").read_bytes()
    write_into = saved._write_into

    def fails_halfway(compiled_task, directory, exports):  # as a full disk or a kill would
        write_into(compiled_task, directory, exports)
        raise OSError("No space left on device")

    monkeypatch.setattr(saved, "_write_into", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        c.save(str(path))
    assert (path / "manifest.json").read_bytes() == before
    assert os.listdir(tmp_path) == ["task"]  # no half-written directory beside it
    monkeypatch.undo()
    c.save(str(path))  # a save over an existing task replaces it whole
    assert os.listdir(tmp_path) == ["task"]
    np.testing.assert_array_equal(metagrad.load(str(path)).metagradient(z, metagrad.StoreAll())[1],
                                  c.metagradient(z, metagrad.StoreAll())[1])


def test_new_data_values_reuse_the_programs_with_their_own_data(compiled):
    task, z, c = compiled
    data = dict(task.data, x=task.data["x"][::-1].copy())
    changed = metagrad.Task(init=task.init, step=task.step, output=task.output, steps=task.steps, data=data)
    start = time.perf_counter()
    other = changed.compile(z, backend="enzyme")
    assert time.perf_counter() - start < 0.5
    assert other.programs is c.programs
    got = jax.tree_util.tree_leaves(other.train(z))
    want = jax.tree_util.tree_leaves(baselines.train(changed, z))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-4, atol=1e-4 * float(np.max(np.abs(w))))
    assert not np.allclose(jax.tree_util.tree_leaves(c.train(z))[0], got[0])  # its own data, not the first task's


SCRIPT = """
import sys, numpy as np, metagrad
loaded = metagrad.load(sys.argv[1])
z = np.load(sys.argv[2])
state = loaded.train(z)
import jax
np.savez(sys.argv[3], *jax.tree_util.tree_leaves(state))
value, grad = loaded.metagradient(z, metagrad.Replay(k=3))
np.savez(sys.argv[4], value=value, grad=grad)
"""


def test_save_then_load_in_a_fresh_process_is_bit_exact(compiled, tmp_path):
    task, z, c = compiled
    z = (z * 0.9).astype(np.float32)
    c.save(str(tmp_path / "task"))
    manifest = json.loads((tmp_path / "task" / "manifest.json").read_text())
    assert manifest["steps"] == task.steps and manifest["versions"]["jax"] == jax.__version__
    assert {"init", "step", "step_vjp", "output_vjp", "init_vjp"} <= set(manifest["programs"])
    np.save(tmp_path / "z.npy", z)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "task"), str(tmp_path / "z.npy"),
                          str(tmp_path / "state.npz"), str(tmp_path / "grad.npz")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded_state = np.load(tmp_path / "state.npz")
    for i, leaf in enumerate(jax.tree_util.tree_leaves(c.train(z))):
        np.testing.assert_array_equal(loaded_state[f"arr_{i}"], leaf)
    value, grad = c.metagradient(z, metagrad.Replay(k=3))
    loaded_grad = np.load(tmp_path / "grad.npz")
    assert loaded_grad["value"] == value
    np.testing.assert_array_equal(loaded_grad["grad"], grad)


def test_load_rejects_a_directory_without_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        metagrad.load(str(tmp_path))


def test_loaded_task_builds_new_fused_programs_from_its_exports(tmp_path):
    task, z10 = make_task("weights", "sgdm", steps=10)
    compiled = task.compile(z10, backend="jax")
    compiled.save(str(tmp_path / "small"))
    loaded = metagrad.load(str(tmp_path / "small"))
    assert "segment_vjp_4" not in loaded.programs
    schedule = metagrad.Replay(k=2, block=4)  # 10 steps = blocks of 4, 4 and 2
    value, grad = loaded.metagradient(z10, schedule)
    assert {"segment_vjp_2", "segment_vjp_4"} <= set(loaded.programs)
    want_value, want_grad = compiled.metagradient(z10, schedule)
    assert value == want_value
    np.testing.assert_array_equal(grad, want_grad)


def test_max_pooling_with_auto_backend_is_correct():
    task, z = make_task("weights", "sgdm", steps=20, pool="max")
    with pytest.raises(metagrad.EnzymeUnsupportedError, match="select_and_scatter"):
        task.compile(z, backend="enzyme")
    with pytest.warns(UserWarning, match="using JAX's autodiff"):
        compiled = task.compile(z, backend="auto")
    value, grad = compiled.metagradient(z, metagrad.Replay(k=3))
    want_value, want_grad = baselines.scan_metagradient(task, z)
    np.testing.assert_allclose(value, float(want_value), rtol=1e-6)
    np.testing.assert_allclose(grad, np.asarray(want_grad), rtol=1e-3, atol=1e-5 * np.abs(want_grad).max())
