"""Careless and hostile inputs: nothing crashes the interpreter, nothing gives a
silently wrong number, and every error says what was wrong and what to do.

Each class of failure found when metagrad was tried as a new user would has a
test here. Those that once killed the process run in a child process, which
must survive and print what the parent checks.
"""

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from models import make_task

HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(code: str, *args, timeout=900):
    """Run ``code`` in a fresh interpreter; returns the completed process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, *sys.path]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


# -- crashes -------------------------------------------------------------------

SORTING_STEP = """
import warnings, numpy as np, jax, jax.numpy as jnp, metagrad
from metagrad import baselines
from models import make_task

base, z = make_task("weights", "sgdm", steps=12)

def step(state, z, data, t):
    params, opt = base.step(state, z, data, t)
    w = params["b1"]
    params = dict(params, b1=w - 0.01 * jnp.{op}(w))  # sorting on the differentiated path
    return params, opt

task = metagrad.Task(init=base.init, step=step, output=base.output, steps=12, data=base.data)
try:
    task.compile(z, backend="enzyme")
    print("NO ERROR")
except metagrad.EnzymeUnsupportedError as error:
    print("ENZYME:", error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    compiled = task.compile(z)  # backend="auto"
print("WARNINGS:", [str(w.message) for w in caught])
value, grad = compiled.metagradient(z, metagrad.Replay(k=3))
want_value, want_grad = baselines.scan_metagradient(task, z)
print("ERROR:", float(np.max(np.abs(grad - want_grad)) / np.max(np.abs(want_grad))))
"""


@pytest.mark.parametrize("op", ["sort", "median"])
def test_enzyme_crash_is_an_error_and_auto_falls_back(op):
    done = run_child(SORTING_STEP.replace("{op}", op))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "ENZYME: Enzyme cannot differentiate" in out and "stablehlo.sort" in out, out
    warnings = [line for line in out.splitlines() if line.startswith("WARNINGS:")][0]
    assert "using JAX's autodiff for step_vjp" in warnings
    assert "MLIR" not in done.stderr and "Enzyme MLIR dumped" not in done.stderr  # no page of MLIR for the user
    error = float(out.split("ERROR:")[1])
    assert error < 1e-4


def test_fft_step_falls_back_to_jax_and_is_exact():
    task, z = make_task("weights", "sgdm", steps=10)

    def step(state, z, data, t):
        params, opt = task.step(state, z, data, t)
        spectrum = jnp.fft.rfft(params["b1"])
        params = dict(params, b1=params["b1"] - 1e-3 * jnp.fft.irfft(spectrum * 0.5, n=params["b1"].shape[0]))
        return params, opt

    fft_task = metagrad.Task(init=task.init, step=step, output=task.output, steps=10, data=task.data)
    with pytest.warns(UserWarning, match="using JAX's autodiff"):
        compiled = fft_task.compile(z)
    value, grad = compiled.metagradient(z, metagrad.Replay(k=3))
    want_value, want_grad = baselines.scan_metagradient(fft_task, z)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-4 * np.abs(want_grad).max())


PLANNER_LIMITS = """
import sys
import metagrad
from metagrad.schedules import Action, Plan
plan = metagrad.Budget(states=3, block=sys.maxsize).plan(10)
print("LEAF", plan.stats(10)["fused_lengths"])
for make in (lambda: metagrad.Replay().plan(10**12), lambda: metagrad.Budget(states=2).plan(2**31),
             lambda: metagrad.Replay(k=4, block=2**70), lambda: metagrad.Budget(states=2**40)):
    try:
        make()
        print("NO ERROR")
    except (ValueError, TypeError) as error:
        print("REFUSED", type(error).__name__, error)
try:
    Plan([Action("save", 0, slot=2**31 - 1)]).stats(4)
except metagrad.PlanError as error:
    print("PLAN", error)
"""


def test_planner_integers_are_range_checked_and_never_crash():
    done = run_child(PLANNER_LIMITS, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "LEAF [10]"
    assert [line.split(" ")[0] for line in lines[1:5]] == ["REFUSED"] * 4
    assert "steps must be in [1, 2147483647], got 1000000000000" in lines[1]
    assert "block must be in [1, 9223372036854775807]" in lines[3]
    assert "slot 2147483647 is beyond the plan's 1 actions" in lines[5]


INTERRUPT = """
import os, signal, threading, time, numpy as np, metagrad
from models import make_task
# A child of a background job (`cmd &` in a script) starts with SIGINT ignored, and Python then installs
# no KeyboardInterrupt handler: put back the one an interactive user has.
signal.signal(signal.SIGINT, signal.default_int_handler)
task, z = make_task("weights", "sgdm", steps=20000, hidden=256)
compiled = task.compile(z, backend="jax")
compiled.metagradient(np.ones_like(z), metagrad.Replay(k=4))  # warm
for run in ("train", "metagradient"):
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    try:
        compiled.train(z) if run == "train" else compiled.metagradient(z, metagrad.Replay(k=2))
        print(run, "FINISHED", time.perf_counter() - start)
    except KeyboardInterrupt:
        print(run, "INTERRUPTED", time.perf_counter() - start)
small, zs = make_task("weights", "sgdm", steps=20)
value, _ = small.compile(zs, backend="jax").metagradient(zs)
print("USABLE", np.isfinite(value))
"""


def test_ctrl_c_interrupts_a_long_run_within_a_second():
    done = run_child(INTERRUPT)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    for run in ("train", "metagradient"):
        verdict, seconds = lines[run].split()
        assert verdict == "INTERRUPTED", lines
        assert float(seconds) < 2.5  # signal at 1 s, honoured within about a second
    assert lines["USABLE"] == "True"


# -- silent wrong answers --------------------------------------------------------

SAVE_WITH_USER_CLASSES = """
import sys, dataclasses
from typing import NamedTuple
import jax, jax.numpy as jnp, numpy as np, metagrad

class Meta(NamedTuple):
    w: jnp.ndarray
    lr: jnp.ndarray

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Model:
    weight: jnp.ndarray
    bias: jnp.ndarray

x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(16, 2)
y = (x[:, 0] - 2 * x[:, 1]).astype(np.float32)

def init(z, data):
    return Model(jnp.zeros(2), jnp.zeros(()))

def step(state, z, data, t):
    def loss(m):
        return jnp.mean(z.w * (data["x"] @ m.weight + m.bias - data["y"]) ** 2)
    g = jax.grad(loss)(state)
    return jax.tree_util.tree_map(lambda p, gp: p - z.lr * gp, state, g)

def output(state, z, data):
    return jnp.mean((data["x"] @ state.weight + state.bias - data["y"]) ** 2)

z = Meta(np.ones(16, np.float32), np.float32(0.1))
compiled = metagrad.Task(init, step, output, 20, {"x": x, "y": y}).compile(z, backend="jax")
compiled.save(sys.argv[1])
value, grad = compiled.metagradient(z, metagrad.Replay(k=3))
np.savez(sys.argv[2], value=value, w=grad.w, lr=grad.lr)
"""

LOAD_WITHOUT_USER_CODE = """
import sys, numpy as np, metagrad
loaded = metagrad.load(sys.argv[1])
z = loaded.z_example
print("Z", type(z).__name__, z._fields)
value, grad = loaded.metagradient(z, metagrad.Replay(k=3))
print("GRAD", type(grad).__name__, grad._fields)
want = np.load(sys.argv[2])
print("SAME", value == want["value"], np.array_equal(grad.w, want["w"]), np.array_equal(grad.lr, want["lr"]))
state = loaded.train(z)
print("STATE", type(state).__name__, state._fields)
"""


def test_a_saved_task_with_user_classes_loads_where_they_do_not_exist(tmp_path):
    saved = run_child(SAVE_WITH_USER_CLASSES, tmp_path / "task", tmp_path / "want.npz")
    assert saved.returncode == 0, saved.stderr[-2000:]
    assert not list(tmp_path.glob("task/*.pkl"))
    loaded = run_child(LOAD_WITHOUT_USER_CODE, tmp_path / "task", tmp_path / "want.npz")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    lines = loaded.stdout.splitlines()
    assert lines[0] == "Z Meta ('w', 'lr')"  # a stand-in named tuple, built without importing __main__
    assert lines[1] == "GRAD Meta ('w', 'lr')"
    assert lines[2] == "SAME True True True"
    assert lines[3] == "STATE Model ('weight', 'bias')"


@pytest.fixture(scope="module")
def saved_task(tmp_path_factory):
    task, z = make_task("weights", "sgdm", steps=8)
    directory = tmp_path_factory.mktemp("saved")
    task.compile(z, backend="jax").save(str(directory))
    return directory


def _copy(directory, tmp_path):
    import shutil

    copy = tmp_path / "task"
    shutil.copytree(directory, copy)
    return copy


def test_a_program_file_swapped_for_another_program_is_refused_on_load(saved_task, tmp_path):
    copy = _copy(saved_task, tmp_path)
    (copy / "programs" / "output_vjp.mlirbc").write_bytes((copy / "programs" / "step.mlirbc").read_bytes())
    with pytest.raises(ValueError, match=r"output_vjp.mlirbc.*: is not program output_vjp: it returns \["):
        metagrad.load(str(copy))


def test_load_never_unpickles_anything(saved_task, tmp_path):
    copy = _copy(saved_task, tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("trees.pkl", "arrays.pkl", "manifest.pkl"):
        (copy / name).write_bytes(pickle.dumps(Exploit()))
    metagrad.load(str(copy))
    assert not marker.exists()


@pytest.mark.parametrize("edit,where,message", [
    (lambda m: m["programs"]["step"].update(file="../../../etc/passwd"), "programs.step.file", "outside"),
    (lambda m: m["programs"]["step"].update(file="/etc/passwd"), "programs.step.file", "relative path"),
    (lambda m: m["arrays"]["data"].__setitem__(0, "../x.bin"), r"arrays.data\[0\]", "outside"),
    (lambda m: m["layout"]["trees"].update(z={"kind": "code", "children": []}), "layout", "unknown tree node"),
    (lambda m: m["programs"]["step_vjp"]["inputs"].pop(), "programs.step_vjp.inputs", "do not match"),
    (lambda m: m["programs"]["step_vjp"]["outputs"].pop(), "programs.step_vjp.outputs", "do not match"),
    (lambda m: m.update(version=1), "manifest.json", "manifest version 1"),
    (lambda m: m.update(steps=2**40), "steps", r"must be in \[1, 2\^31-1\]"),
])
def test_load_errors_name_the_file_and_field(saved_task, tmp_path, edit, where, message):
    copy = _copy(saved_task, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=f"{where}.*{message}") as error:
        metagrad.load(str(copy))
    assert str(copy) in str(error.value)


def test_a_short_array_or_truncated_program_names_its_file(saved_task, tmp_path):
    copy = _copy(saved_task, tmp_path)
    (copy / "arrays" / "z_0.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError, match=r"z_0.bin: holds 8 bytes, z \(float32\[128\]\) needs 512"):
        metagrad.load(str(copy))
    copy2 = _copy(saved_task, tmp_path / "second")
    program = copy2 / "programs" / "output.mlirbc"
    program.write_bytes(program.read_bytes()[:64])
    with pytest.raises(ValueError, match=r"output.mlirbc: does not compile as program output"):
        metagrad.load(str(copy2))


@pytest.mark.parametrize("draw", [lambda: np.random.normal(0, 1e-2, 10).astype(np.float32),
                                  lambda: np.float32(random.gauss(0, 1e-2))], ids=["numpy", "python"])
def test_a_step_that_draws_randomness_while_traced_is_refused_at_compile(draw):
    task, z = make_task("weights", "sgdm", steps=30)

    def step(state, z, data, t):  # a draw at trace time: every compiled program would bake other constants
        params, opt = task.step(state, z, data, t)
        return dict(params, b2=params["b2"] + draw()), opt

    impure = metagrad.Task(init=task.init, step=step, output=task.output, steps=30, data=task.data)
    with pytest.raises(ValueError, match=r"step\(state, z, data, t\).* is not a pure function of its arguments: two "
                                         r"traces of it differ .*jax.random.fold_in\(key, t\)"):
        impure.compile(z, backend="jax")


def test_determinism_check_catches_a_step_that_changes_after_its_first_traces():
    task, z = make_task("weights", "sgdm", steps=30)
    traces = []

    def step(state, z, data, t):  # pure in the two traces compile compares, then numpy draws at trace time
        traces.append(t)
        params, opt = task.step(state, z, data, t)
        if len(traces) <= 2:
            return params, opt
        return dict(params, b2=params["b2"] + np.random.normal(0, 1e-2, 10).astype(np.float32)), opt

    impure = metagrad.Task(init=task.init, step=step, output=task.output, steps=30, data=task.data)
    compiled = impure.compile(z, backend="jax")
    with pytest.raises(metagrad.CheckFailed, match="fused program for steps 0..9 and the same steps run one by one "
                                                   "disagree beyond rounding"):
        compiled.metagradient(z, metagrad.Replay(k=3), check_determinism=True)


def test_determinism_check_passes_on_fused_programs_with_unaligned_replays():
    # Replay(k=3) restores states at steps that are not multiples of the fused
    # length: replays run single steps where the first pass ran fused chunks,
    # and the check must accept those rounding differences.
    task, z = make_task("weights", "adam", steps=47)
    compiled = task.compile(z, backend="jax", fuse_forward=5)
    value, grad, report = compiled.metagradient(z, metagrad.Replay(k=3), check_determinism=True, report=True)
    assert report.determinism_checks > 10
    plain_value, plain_grad = compiled.metagradient(z, metagrad.Replay(k=3))
    assert value == plain_value
    np.testing.assert_array_equal(grad, plain_grad)  # the checked run runs the same programs


# -- unclear errors ---------------------------------------------------------------

def test_argument_errors_are_clear(saved_task):
    compiled = metagrad.load(str(saved_task))
    z = compiled.z_example
    with pytest.raises(TypeError, match="check_finite must be True or False, got 'no'"):
        compiled.metagradient(z, check_finite="no")
    with pytest.raises(TypeError, match=r"got the class Replay: write Replay\(...\)"):
        compiled.metagradient(z, schedule=metagrad.Replay)
    with pytest.raises(ValueError, match=r"z is float16\[128\], the task was compiled for float32\[128\]"):
        compiled.metagradient(z.astype(np.float16))
    with pytest.raises(TypeError, match="cannot copy an array of dtype <U1 to the device"):
        metagrad.runtime.to_device(np.array(["a", "b"]))


def test_numpy_float64_data_and_z_are_taken_as_jax_takes_them():
    task, z = make_task("weights", "sgdm", steps=6)
    data64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v.astype(np.int64)) for k, v in task.data.items()}
    task64 = metagrad.Task(init=task.init, step=task.step, output=task.output, steps=6, data=data64)
    compiled = task64.compile(z.astype(np.float64), backend="jax")
    assert {spec.dtype for spec in compiled.layout.data} == {"float32", "int32"}
    value, grad = compiled.metagradient(z.astype(np.float64))
    want_value, want_grad = baselines.scan_metagradient(task, z)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert grad.dtype == np.float32
