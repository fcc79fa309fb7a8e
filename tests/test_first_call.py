"""The way to a first metagradient: what compile builds, Auto's first call, and where the time goes."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import baselines
from metagrad._src import compiled as compiled_lib, enzyme_worker, setup_time
from models import make_task

STEPS = 40


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    """An empty disk cache and no task compiled in this process: everything is built."""
    monkeypatch.setenv("METAGRAD_CACHE_DIR", str(tmp_path / "cache"))
    compiled_lib.forget_compiled()
    yield
    compiled_lib.forget_compiled()


def calls_until_built(compiled, z, limit: float = 600.0):
    """Call ``metagradient`` until Auto plans over the fused reverses built in the background;
    returns the first such call's ``(value, grad, report, seconds)``."""
    deadline = time.monotonic() + limit
    while True:
        start = time.perf_counter()
        value, grad, report = compiled.metagradient(z, report=True)
        if "build in the background" not in report.schedule:
            return value, grad, report, time.perf_counter() - start
        assert time.monotonic() < deadline, "the background build did not finish"
        time.sleep(0.1)


def test_auto_runs_single_step_reverses_until_the_fused_ones_built_in_the_background_are_ready(cold_cache):
    task, z = make_task("weights", "adam", steps=STEPS)
    compiled = task.compile(z)
    assert set(compiled.programs) == set(compiled_lib.FIRST_PROGRAMS)

    value, grad, first = compiled.metagradient(z, report=True)
    assert "Budget(states=40, block=1)" in first.schedule and "first call" in first.schedule
    assert first.predicted_seconds == 0  # one block length on one tier: nothing to calibrate
    assert first.executions == 1 + STEPS + 1 + STEPS + 1  # init, steps, output_vjp, step_vjps, init_vjp
    assert set(compiled.programs) == set(compiled_lib.FIRST_PROGRAMS)  # nothing more was built

    value2, grad2, second = compiled.metagradient(z, report=True)  # starts the build, does not wait for it
    assert "block=1)" in second.schedule and "build in the background" in second.schedule
    assert second.setup_seconds == {}

    value3, grad3, adopted, _ = calls_until_built(compiled, z)
    assert "block=10" in adopted.schedule and "first call" not in adopted.schedule
    assert {"segment_vjp_10", "advance_10"} <= set(compiled.programs)
    assert adopted.setup_seconds["calibrate"] > 0 and adopted.executions < first.executions
    assert compiled.setup.compile_seconds["segment_vjp_10"] > 0  # the build's time, gathered by the task

    want_value, want_grad = baselines.scan_metagradient(task, z)
    for v, g in ((value, grad), (value2, grad2), (value3, grad3)):
        np.testing.assert_allclose(v, float(want_value), rtol=1e-5)
        assert relative_error(g, want_grad) < 1e-3  # Adam, float32: as in test_metagradient

    _, _, after = compiled.metagradient(z, report=True)  # everything built and calibrated: no set-up
    assert after.schedule == adopted.schedule and after.setup_seconds == {} and after.compile_seconds == {}


EXITING = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from metagrad._src import enzyme_worker
    from models import make_task
    task, z = make_task("weights", "adam", steps=40)
    compiled = task.compile(z)
    compiled.metagradient(z)
    compiled.metagradient(z)  # starts the background build; the interpreter exits while Enzyme works on it
    while enzyme_worker._WORKER._process is None or enzyme_worker._WORKER._process.poll() is not None:
        time.sleep(0.01)
""")


def test_an_exit_during_a_background_build_ends_it_cleanly(cold_cache, tmp_path):
    """At exit the build stops between programs and its Enzyme process is ended: that must not
    read as Enzyme failing (backend='auto' would fall back to JAX's reverse and cache it)."""
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", str(script), os.path.dirname(__file__)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "autodiff" not in done.stderr and "Traceback" not in done.stderr
    task, z = make_task("weights", "adam", steps=STEPS)
    compiled = task.compile(z).prepare(metagrad.Auto())  # what the exiting process cached, and the rest
    assert not any(program.fallback for program in compiled.programs.values())


def test_auto_with_explicit_blocks_and_prepared_tasks_plan_over_fused_reverses_at_once(cold_cache):
    task, z = make_task("weights", "sgdm", steps=STEPS)
    compiled = task.compile(z)
    _, _, report = compiled.metagradient(z, metagrad.Auto(blocks=(1, 10)), report=True)
    assert "block=10" in report.schedule and "first call" not in report.schedule

    other = make_task("weights", "sgdm", steps=STEPS)[0].compile(z).prepare(metagrad.Auto())
    _, _, report = other.metagradient(z, report=True)
    assert "block=10" in report.schedule and "first call" not in report.schedule


def test_lazy_programs_are_built_where_they_are_needed(cold_cache, tmp_path):
    task, z = make_task("weights", "sgdm", steps=STEPS)
    compiled = task.compile(z)
    with pytest.raises(metagrad.CheckFailed, match="step 0"):
        compiled.metagradient(np.full_like(z, np.nan), metagrad.StoreAll(), check_finite=True)
    assert set(compiled_lib.CHECK_PROGRAMS) <= set(compiled.programs)
    np.testing.assert_allclose(compiled.train(z)[0]["w1"], task.compile(z, fuse_forward=1).train(z)[0]["w1"],
                               rtol=1e-6)
    assert "advance_10" in compiled.programs
    # compiled again in this process, the task shares the programs built so far, not its fused lengths
    assert task.compile(z, fuse_forward=1).fuse_forward == () and task.compile(z).fuse_forward == (10,)
    compiled.save(str(tmp_path / "saved"))
    loaded = metagrad.load(str(tmp_path / "saved"))
    assert set(compiled_lib.BASE_PROGRAMS) | {"advance_10"} <= set(loaded.programs)
    assert loaded.fuse_forward == (10,)


def test_setup_phases_add_up_to_the_measured_setup_time(cold_cache):
    task, z = make_task("poison", "adam", steps=STEPS)
    start = time.perf_counter()
    compiled = task.compile(z)
    compile_wall = time.perf_counter() - start
    assert set(compiled.setup.seconds) <= set(setup_time.PHASES)
    assert set(compiled.setup.compile_seconds) == set(compiled_lib.FIRST_PROGRAMS)
    assert abs(compiled.setup.total - compile_wall) <= 0.1 * compile_wall

    compiled.metagradient(z)
    _, _, report, call_seconds = calls_until_built(compiled, z)  # calibrates the fused programs built
    call_setup = call_seconds - report.seconds_total
    assert report.setup_seconds["calibrate"] > 0
    assert abs(sum(report.setup_seconds.values()) - call_setup) <= 0.1 * call_setup
    assert compiled.setup.total > compile_wall  # the task's record gathers every call's set-up


def test_phases_nest_without_counting_twice():
    with setup_time.record() as outer:
        with setup_time.phase("trace"):
            time.sleep(0.05)
            with setup_time.phase("compile", "step"):
                time.sleep(0.1)
    assert outer.seconds["compile"] == pytest.approx(0.1, abs=0.03)
    assert outer.seconds["trace"] == pytest.approx(0.05, abs=0.03)
    assert outer.compile_seconds == {"step": outer.seconds["compile"]}
    with pytest.raises(ValueError, match="unknown set-up phase 'lowering'"):
        with setup_time.phase("lowering"):
            pass


def test_kept_arguments_read_from_the_lowering_match_the_compiled_executable():
    def f(a, unused, b, also_unused):
        return a * 2 + b

    args = [jnp.ones(3), jnp.ones(2), jnp.ones(3), jnp.ones(())]
    lowered = jax.jit(f).lower(*args)
    assert enzyme_worker.kept_arguments(lowered) == {0, 2} == set(lowered.compile()._executable._kept_var_idx)


def test_a_loaded_task_without_enzyme_plans_over_single_step_reverses(cold_cache, tmp_path, monkeypatch):
    task, z = make_task("weights", "sgdm", steps=STEPS)
    task.compile(z).save(str(tmp_path / "saved"))  # no fused reverse in it
    loaded = metagrad.load(str(tmp_path / "saved"))
    loaded.metagradient(z)  # the first call needs none

    def no_enzyme(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'enzyme_ad'")

    monkeypatch.setattr(compiled_lib.lowering, "lower", no_enzyme)
    with pytest.warns(UserWarning, match=r"Auto: the fused reverses of 10 steps cannot be built here "
                                         r"\(ModuleNotFoundError: No module named 'enzyme_ad'\); planning without "
                                         r"them. Call prepare\(metagrad.Auto\(\)\) before save\(\)"):
        value, grad, report, _ = calls_until_built(loaded, z)
    assert report.schedule.endswith("(single-step reverses: the fused ones could not be built)")
    want_value, want_grad = loaded.metagradient(z, metagrad.StoreAll())
    assert value == want_value and relative_error(grad, want_grad) == 0
    with pytest.raises(ModuleNotFoundError):  # lengths the user named are built or the call fails
        loaded.metagradient(z, metagrad.Auto(blocks=(1, 10)))


def test_reading_the_kept_arguments_leaves_enzymes_reverse_unchanged(monkeypatch):
    # What Enzyme's child does (enzyme_worker._skip_dead_argument_compiles), done here: the reverse
    # built with it computes the bits of the one enzyme-ad builds when it compiles to find the kept
    # arguments (two builds are not byte-identical even without it: the modules' names differ).
    from enzyme_ad.jax import primitives

    from metagrad._src import cache, layout as layout_lib, programs, runtime

    task, z = make_task("poison", "adam", steps=3)
    layout = layout_lib.describe(task, z)
    forward = programs.forward_of_exports(programs.export_forward(programs.forward_of_task(task, layout), layout))
    client = runtime.get_client()
    compiles = []
    real_compile = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: compiles.append(1) or
                        real_compile(self, *a, **k))
    inputs, _, _ = programs.signature(layout, "step_vjp")
    rng = np.random.default_rng(0)
    arrays = [np.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype) if np.issubdtype(s.dtype, np.floating)
              else np.zeros(s.shape, s.dtype) for s in inputs]

    def run():
        program = programs.build("step_vjp", forward, layout, "enzyme", runtime.stablehlo_target(client))
        executable = cache.compile_program(program, client)
        return [b.to_numpy() for b in executable.execute([runtime.to_device(a, client) for a in arrays])]

    unchanged = run()
    assert compiles, "enzyme-ad no longer compiles to find the kept arguments: the child's workaround can go"
    monkeypatch.setattr(primitives, "lower", primitives.lower)  # restored after the test
    enzyme_worker._skip_dead_argument_compiles()
    compiles.clear()
    patched = run()
    assert not compiles
    assert len(patched) == len(unchanged) and all(np.all(np.isfinite(a)) for a in patched)
    assert all(np.array_equal(a, b) for a, b in zip(patched, unchanged))


def test_an_interrupted_build_ends_the_enzyme_build_behind_it(cold_cache, monkeypatch):
    from metagrad._src import layout as layout_lib, lowering, programs, runtime

    task, z = make_task("weights", "sgdm", steps=3)
    layout = layout_lib.describe(task, z)
    forward = programs.forward_of_task(task, layout)
    exports = programs.export_forward(forward, layout)
    ended = threading.Event()

    def slow_enzyme(request):  # a long Enzyme build, ended only by interrupt()
        if not ended.wait(timeout=60):
            raise AssertionError("the Enzyme build was left running")
        raise enzyme_worker.EnzymeFailed("Enzyme crashed (SIGKILL)")

    def interrupt_on_first(name, program):
        raise KeyboardInterrupt

    monkeypatch.setattr(enzyme_worker, "build", slow_enzyme)
    monkeypatch.setattr(enzyme_worker, "interrupt", ended.set)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        lowering.lower(exports, layout, compiled_lib.FIRST_PROGRAMS, backend="enzyme",
                       target=runtime.stablehlo_target(runtime.get_client()), forward=forward,
                       ready=interrupt_on_first)
    assert ended.is_set() and time.perf_counter() - start < 30


def test_an_enzyme_build_ended_by_interrupt_is_not_taken_for_enzymes_failure(cold_cache):
    """backend='auto' falls back to JAX's reverse where Enzyme fails, and caches that; a build
    the caller abandoned (Ctrl-C, exit) is no such verdict."""
    from metagrad._src import layout as layout_lib, lowering, programs, runtime

    task, z = make_task("weights", "sgdm", steps=3)
    layout = layout_lib.describe(task, z)
    forward = programs.forward_of_task(task, layout)
    exports = programs.export_forward(forward, layout)
    target = runtime.stablehlo_target(runtime.get_client())
    enzyme_worker._WORKER.close()  # the next build starts the child: a build long enough to interrupt
    errors = []

    def build():
        try:
            lowering.lower(exports, layout, ["step_vjp"], backend="auto", target=target, forward=forward)
        except Exception as error:  # noqa: BLE001 (checked below)
            errors.append(error)

    thread = threading.Thread(target=build)
    thread.start()
    worker = enzyme_worker._WORKER
    while not (worker._lock.locked() and worker._process is not None and worker._process.poll() is None):
        time.sleep(0.001)  # the child is started for this build (it imports jax before it reads the request)
    enzyme_worker.interrupt()
    thread.join(timeout=120)
    assert [type(error) for error in errors] == [enzyme_worker.Interrupted]
    built = lowering.lower(exports, layout, ["step_vjp"], backend="auto", target=target, forward=forward)
    assert not built["step_vjp"].fallback  # nothing of the abandoned build was cached
