"""metagrad-bench, the C++ harness: it runs saved tasks with no Python in its
process, agrees with the Python API, and names the file and field of every
malformed manifest."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import metagrad
from models import make_task

SCHEDULES = {  # harness spelling -> the Python API's schedule
    "replay:3": metagrad.Replay(k=3),
    "budget:4": metagrad.Budget(states=4),
    "periodic:6": metagrad.Periodic(every=6),
    "storeall": metagrad.StoreAll(),
    "replay:2:4": metagrad.Replay(k=2, block=4),
    "budget:3:4": metagrad.Budget(states=3, block=4),
}


def bench_path() -> str:
    """The harness is installed beside the interpreter, on the environment's PATH."""
    path = shutil.which("metagrad-bench", path=os.path.dirname(sys.executable))
    assert path is not None, "metagrad-bench is not installed beside python"
    return path


def run_bench(directory, *args, env_plugin=None):
    env = {k: v for k, v in os.environ.items() if k != "METAGRAD_PJRT_PLUGIN"}
    if env_plugin:
        env["METAGRAD_PJRT_PLUGIN"] = env_plugin
    return subprocess.run([bench_path(), str(directory), *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.fixture(scope="module", params=[1, 4], ids=["unfused", "fused-forward"])
def saved(request, tmp_path_factory):
    task, z = make_task("weights", "adam", steps=22)
    compiled = task.compile(z, backend="jax", fuse_forward=request.param)
    for schedule in SCHEDULES.values():
        compiled.prepare(schedule)
    directory = tmp_path_factory.mktemp(f"task{request.param}")
    compiled.save(str(directory))
    z = (z * np.linspace(0.5, 1.5, z.size)).astype(np.float32)
    np.ascontiguousarray(z).tofile(directory / "arrays" / "z_0.bin")  # the harness runs the saved z
    return compiled, z, directory


def test_harness_agrees_with_the_python_api_on_every_schedule(saved, tmp_path):
    compiled, z, directory = saved
    done = run_bench(directory, "--schedule", ",".join(SCHEDULES), "--repeat", "1", "--warmup", "0",
                     "--dispatch-iters", "0", "--json", "--save-grad", str(tmp_path))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["fused_forward"] == ("4" if "advance_4" in compiled.programs else "")
    for i, (name, schedule) in enumerate(SCHEDULES.items()):
        value, grad, report = compiled.metagradient(z, schedule, report=True)
        bench_value = np.fromfile(tmp_path / str(i) / "value.bin", np.float32)[0]
        bench_grad = np.fromfile(tmp_path / str(i) / "grad_0.bin", np.float32)
        assert bench_value == value, name  # the same programs on the same plugin: bit for bit
        np.testing.assert_array_equal(bench_grad, grad, err_msg=name)
        bench_report = out["metagradient"][i]["report"]
        for field in ("forward_steps", "reversed_steps", "peak_saved_states", "peak_saved_bytes", "executions",
                      "peak_device_bytes"):
            assert bench_report[field] == getattr(report, field), (name, field)


def test_harness_finds_the_cpu_plugin_by_itself(saved):
    _, _, directory = saved
    done = run_bench(directory, "--schedule", "none", "--repeat", "1", "--warmup", "0", "--dispatch-iters", "0",
                     "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["info"]["plugin"].endswith("xla_cpu_pjrt.so")


def test_a_missing_fused_program_is_named(saved):
    _, _, directory = saved
    done = run_bench(directory, "--schedule", "replay:2:5", "--dispatch-iters", "0")
    assert done.returncode == 1
    assert "no segment_vjp_5" in done.stderr and "compiled.prepare(schedule)" in done.stderr


@pytest.fixture
def broken(saved, tmp_path):
    """A copy of a saved task whose manifest a test edits."""
    _, _, directory = saved
    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    manifest = json.loads((copy / "manifest.json").read_text())

    def write(edit):
        edit(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        return copy

    return write


def _drop(entry, key):
    entry.pop(key)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(version=1), r"manifest version 1, this harness reads version 4"),
    (lambda m: _drop(m, "steps"), r'manifest has no "steps"'),
    (lambda m: m["layout"]["z"][0].update(dtype="float128"), r"layout.z\[0\].dtype 'float128' is not a supported"),
    (lambda m: m["programs"]["step"].update(file="../../etc/passwd"), r"programs.step.file must be a relative path"),
    (lambda m: m["programs"]["step_vjp"]["inputs"].pop(), r"programs.step_vjp.inputs are .* the layout implies"),
    (lambda m: m["programs"]["step_vjp"]["outputs"].pop(), r"programs.step_vjp.outputs are .* the layout implies"),
    (lambda m: m["programs"].update(mystery=m["programs"]["step"]), r"programs.mystery.*not a program of a task"),
    (lambda m: m["arrays"]["data"].pop(), r"arrays.data lists 3 files for 4 leaves"),
])
def test_malformed_manifests_name_the_file_and_field(broken, edit, message):
    directory = broken(edit)
    done = run_bench(directory, "--dispatch-iters", "0")
    assert done.returncode == 1
    assert str(directory / "manifest.json") in done.stderr
    assert __import__("re").search(message, done.stderr), done.stderr


def test_a_short_array_file_is_named(saved, tmp_path):
    _, _, directory = saved
    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    (copy / "arrays" / "data_0.bin").write_bytes(b"\0" * 12)
    done = run_bench(copy, "--dispatch-iters", "0")
    assert done.returncode == 1
    assert "data_0.bin holds 12 bytes" in done.stderr and "data['x']" in done.stderr


def test_a_truncated_program_is_named(saved, tmp_path):
    _, _, directory = saved
    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    program = copy / "programs" / "step.mlirbc"
    program.write_bytes(program.read_bytes()[:100])
    done = run_bench(copy, "--dispatch-iters", "0")
    assert done.returncode == 1
    assert "step.mlirbc: does not compile as program step" in done.stderr


def test_a_program_file_swapped_for_another_program_is_named(saved, tmp_path):
    _, _, directory = saved
    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    (copy / "programs" / "output_vjp.mlirbc").write_bytes((copy / "programs" / "step.mlirbc").read_bytes())
    done = run_bench(copy, "--dispatch-iters", "0")
    assert done.returncode == 1
    assert "output_vjp.mlirbc: is not program output_vjp: it returns [" in done.stderr, done.stderr


def test_not_json(saved, tmp_path):
    _, _, directory = saved
    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    (copy / "manifest.json").write_text("{not json")
    done = run_bench(copy)
    assert done.returncode == 1 and "manifest.json" in done.stderr
