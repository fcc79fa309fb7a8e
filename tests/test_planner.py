"""The planner (Auto): plans that fit their budget on the runtime's own accounting,
fused blocks only where their memory fits, the same metagradient as every
fixed schedule, and clear errors for budgets and devices too small."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import metagrad
from metagrad import schedules
from metagrad._src import lowering, planner
from models import make_task

STEPS = 40


@pytest.fixture(scope="module")
def compiled():
    task, z = make_task("weights", "adam", steps=STEPS)
    z = (z * np.linspace(0.5, 1.5, z.size)).astype(np.float32)
    return task, z, task.compile(z, backend="jax", fuse_forward=4)


def test_auto_fits_its_budget_and_predicts_the_peak_it_measures(compiled):
    _, z, c = compiled
    state = c.layout.state_bytes
    for budget in (c.data_bytes + 6 * state, c.data_bytes + 12 * state, c.data_bytes + 60 * state, None):
        _, _, report = c.metagradient(z, metagrad.Auto(memory=budget, blocks=(1, 4)), report=True)
        assert report.peak_device_bytes + report.data_bytes <= report.budget_bytes, report
        assert report.predicted_peak_device_bytes == report.peak_device_bytes, report
        assert report.predicted_seconds > 0
        assert report.schedule.startswith(f"Auto(memory={report.budget_bytes}) -> Budget(states=")


def test_the_cost_table_is_what_auto_predicts_from(compiled):
    _, z, c = compiled
    auto = metagrad.Auto(memory=c.data_bytes + 12 * c.layout.state_bytes, blocks=(1,))
    _, _, report = c.metagradient(z, auto, report=True)
    table = c.cost_table(z, auto)
    assert table.state_bytes == report.state_bytes and table.programs["step"].seconds > 0 and table.programs["step_vjp"].seconds > 0
    plan = schedules.Budget(states=report.peak_saved_states).plan(STEPS)
    predicted = schedules.simulate_plan(plan, table)
    assert report.schedule.endswith(f"-> Budget(states={report.peak_saved_states}, block=1)")
    assert predicted["peak_bytes"] == report.predicted_peak_device_bytes
    assert predicted["seconds"] == pytest.approx(report.predicted_seconds)
    with pytest.raises(TypeError, match="cost_table takes an Auto schedule"):
        c.cost_table(z, metagrad.StoreAll())


@pytest.mark.parametrize("schedule", [
    metagrad.StoreAll(), metagrad.Periodic(every=8), metagrad.Periodic(every=8, block=4), metagrad.Replay(k=3),
    metagrad.Replay(k=2, block=4), metagrad.Budget(states=5), metagrad.Budget(states=3, block=4)],
    ids=str)
def test_prediction_and_run_walk_the_plan_alike(compiled, schedule):
    """The planner's prediction and the runner's run are one walk of the plan: equal peaks and executions.
    A run that counted a saved state, a cotangent or a program's bytes differently, or split an advance
    into other programs, would differ here."""
    _, z, c = compiled
    _, _, report = c.metagradient(z, schedule, report=True)
    table = c.cost_table(z, metagrad.Auto(blocks=(1, 4)))  # the same executables: fused forward 4, fused reverse 4
    predicted = schedules.simulate_plan(schedule.plan(STEPS), table)
    assert predicted["peak_bytes"] == report.peak_device_bytes > 0
    assert predicted["executions"] == report.executions
    assert report.peak_saved_states == schedule.plan(STEPS).stats(STEPS)["peak_saved"]


def test_the_calibration_times_every_program_auto_weighs(compiled):
    _, z, c = compiled
    auto = metagrad.Auto(blocks=(1, 4))
    costs = c.calibrate(z, auto, repeats=2)
    table = c.cost_table(z, auto)
    assert set(costs) == set(table.programs) == {"init", "step", "advance_4", "output_vjp", "step_vjp",
                                                 "segment_vjp_4", "init_vjp"}
    assert all(costs[name].seconds > 0 and costs[name].bytes == table.programs[name].bytes for name in costs), costs
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        c.calibrate(z, auto, repeats=0)
    with pytest.raises(TypeError, match="calibrate takes an Auto schedule"):
        c.calibrate(z, metagrad.StoreAll())


def test_more_memory_never_means_more_recomputation(compiled):
    _, z, c = compiled
    forward = []
    for states in (6, 12, 30):
        _, _, report = c.metagradient(z, metagrad.Auto(memory=c.data_bytes + states * c.layout.state_bytes,
                                                       blocks=(1,)), report=True)
        forward.append(report.forward_steps)
    assert forward == sorted(forward, reverse=True) and forward[-1] < forward[0]


def test_auto_gives_the_metagradient_of_every_fixed_schedule(compiled):
    _, z, c = compiled
    value, grad = c.metagradient(z)  # Auto() with its default budget
    for schedule in (metagrad.Replay(k=3), metagrad.StoreAll(), metagrad.Budget(states=5, block=4),
                     metagrad.Periodic(every=8, block=4)):
        v, g = c.metagradient(z, schedule)
        np.testing.assert_allclose(v, value, rtol=1e-6)
        np.testing.assert_allclose(g, grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_a_budget_below_every_plan_names_the_minimum(compiled):
    _, z, c = compiled
    with pytest.raises(metagrad.DeviceMemoryError, match=r"below the minimum any plan needs here: .* Raise "
                                                         r"Auto\(memory=\.\.\.\) to at least (\d+)") as error:
        c.metagradient(z, metagrad.Auto(memory=c.data_bytes + c.layout.state_bytes))
    minimum = int(str(error.value).rsplit(" ", 1)[1].rstrip("."))
    _, _, report = c.metagradient(z, metagrad.Auto(memory=minimum), report=True)  # the minimum itself works
    assert report.peak_device_bytes + report.data_bytes <= minimum


def _cost(seconds: float, nbytes: int) -> schedules.ProgramCost:
    c = schedules.ProgramCost()
    c.seconds, c.bytes = seconds, nbytes
    return c


def _table(fused_bytes: int, fused_seconds: float) -> schedules.CostTable:
    """A hand-made cost table: state 100 B, a fused 10-step reverse that is fast but holds ``fused_bytes``."""
    table = schedules.CostTable()
    table.state_bytes, table.cotangent_bytes = 100, 100
    table.programs = {"init": _cost(1, 100), "step": _cost(1, 100), "output_vjp": _cost(2, 200),
                      "init_vjp": _cost(2, 100), "step_vjp": _cost(2, 100),
                      "segment_vjp_10": _cost(fused_seconds, fused_bytes)}
    return table


def _fused_reverses(table) -> set:
    return {name for name in table.programs if name.startswith("segment_vjp_")}


def test_fused_blocks_are_chosen_only_where_their_memory_fits():
    table = _table(fused_bytes=5000, fused_seconds=5.0)  # 10 steps reversed for 5 s instead of 20 s
    roomy = schedules.choose(table, 100, (1, 10), budget=20_000, data_bytes=0)
    assert roomy.schedule.block == 10
    tight = schedules.choose(table, 100, (1, 10), budget=4_000, data_bytes=0)
    assert tight.schedule.block == 1
    assert tight.peak_bytes <= 4_000 and roomy.peak_bytes <= 20_000
    for choice in (roomy, tight):
        assert schedules.simulate_plan(choice.plan, table)["peak_bytes"] == choice.peak_bytes


def test_with_host_memory_the_minimum_named_is_the_least_any_state_count_needs():
    # A fused forward that holds 50 kB: one saved state replays through it, while saving every state (in
    # host memory) replays nothing and needs a few hundred bytes. Seen on a GPU: the error named the
    # one-state plan's minimum (2.97 MiB) where another state count ran in 2.0 MiB.
    table = _table(fused_bytes=500, fused_seconds=5.0)
    table.programs = {**table.programs, "advance_10": _cost(5.0, 50_000)}
    table.to_host, table.from_host = _cost(0.1, 0), _cost(0.1, 0)
    host = 10**6
    with pytest.raises(metagrad.DeviceMemoryError, match=r"Raise Auto\(memory=\.\.\.\) to at least") as error:
        schedules.choose(table, 100, (1, 10), budget=200, data_bytes=0, host_budget=host)
    minimum = int(str(error.value).rsplit(" ", 1)[1].rstrip("."))
    assert minimum < 50_000
    choice = schedules.choose(table, 100, (1, 10), budget=minimum, data_bytes=0, host_budget=host)
    assert choice.peak_bytes <= minimum and choice.host_slots
    with pytest.raises(metagrad.DeviceMemoryError):
        schedules.choose(table, 100, (1, 10), budget=minimum - 1, data_bytes=0, host_budget=host)


def test_the_lengths_between_are_built_only_where_the_budget_rules_out_the_longest_block(monkeypatch):
    """Single-step blocks chosen for speed, not for memory, are no reason to build 3-step reverses."""
    task, z = make_task("weights", "sgdm", steps=STEPS)
    c = task.compile(z, backend="jax", fuse_forward=4)
    real = planner.choose

    def single_steps_first(table, steps, blocks, *args, **kwargs):  # as if single steps timed fastest
        return real(table, steps, (1,) if 1 in blocks else blocks, *args, **kwargs)

    monkeypatch.setattr(planner, "choose", single_steps_first)
    roomy = metagrad.Auto(memory=c.data_bytes + 1000 * c.layout.state_bytes)
    assert _fused_reverses(c.cost_table(z, roomy)) == {"segment_vjp_10"}
    value, grad, report = c.metagradient(z, roomy, report=True)
    assert report.schedule.endswith("block=1)")  # settled: nothing more to build, so no note
    want_value, want_grad = c.metagradient(z, metagrad.StoreAll())
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_a_near_tie_goes_to_the_plan_with_fewer_executions():
    def plans(fused_seconds):
        table = _table(fused_bytes=500, fused_seconds=fused_seconds)
        single, fused = (schedules.simulate_plan(metagrad.Budget(states=100, block=leaf).plan(100), table)
                         for leaf in (1, 10))
        return table, single, fused

    # Fused blocks of 10 steps for 21.5 s against single-step reverses at 2 s each: predicted 5% slower.
    table, single, fused = plans(21.5)
    assert single["seconds"] < fused["seconds"] < (1 + schedules.NEAR_TIE) * single["seconds"]
    assert fused["executions"] < single["executions"]
    near = schedules.choose(table, 100, (1, 10), budget=20_000, data_bytes=0)
    assert (near.schedule.block, near.seconds, near.executions) == (10, fused["seconds"], fused["executions"])
    # 26 s per block: beyond the tie, so the faster prediction wins.
    table, single, fused = plans(26.0)
    assert fused["seconds"] > (1 + schedules.NEAR_TIE) * single["seconds"]
    far = schedules.choose(table, 100, (1, 10), budget=20_000, data_bytes=0)
    assert (far.schedule.block, far.seconds) == (1, single["seconds"])


def test_the_lengths_between_are_tried_only_below_the_longest_and_within_t():
    assert planner.gap_blocks("unroll", 1, (1, 10), 1000) == (3,)
    assert planner.gap_blocks("unroll", 10, (1, 10), 1000) == ()
    assert planner.gap_blocks("scan", 1, (1, 10, 100), 1000) == (3, 30)
    assert planner.gap_blocks("scan", 10, (1, 10, 100), 1000) == (30,)
    assert planner.gap_blocks("scan", 1, (1, 10, 100), 20) == (3,)  # 100 is capped at T = 20
    assert planner.gap_blocks("unroll", 1, (1, 10), 3) == ()


def test_a_length_between_replaces_the_choice_only_where_predicted_faster():
    def table(gap_seconds):
        t = _table(fused_bytes=5000, fused_seconds=5.0)  # the 10-step reverse does not fit 4 kB
        t.programs = {**t.programs, "segment_vjp_3": _cost(gap_seconds, 100)}  # 3 steps in a single step's bytes
        return t

    # 3 steps reversed in 4 s instead of 6: faster, and it fits where 10 steps do not.
    faster = schedules.choose_with_gaps(table(4.0), 100, (1, 10), (3,), budget=4_000, data_bytes=0)
    assert faster.schedule.block == 3 and faster.peak_bytes <= 4_000
    # In 8 s: its plan is predicted slower, though within the near tie and with fewer executions,
    # which choose() over all the lengths would take; the lengths between do not get that tie.
    slower = table(8.0)
    first = schedules.choose(slower, 100, (1, 10), budget=4_000, data_bytes=0)
    gap = schedules.choose(slower, 100, (3,), budget=4_000, data_bytes=0)
    assert first.seconds < gap.seconds < (1 + schedules.NEAR_TIE) * first.seconds
    assert gap.executions < first.executions
    assert schedules.choose(slower, 100, (1, 3, 10), budget=4_000, data_bytes=0).schedule.block == 3
    kept = schedules.choose_with_gaps(slower, 100, (1, 10), (3,), budget=4_000, data_bytes=0)
    assert (kept.schedule, kept.seconds) == (first.schedule, first.seconds) and kept.schedule.block == 1


def test_a_tight_budget_builds_the_lengths_between_and_gives_the_same_metagradient(monkeypatch):
    task, z = make_task("weights", "adam", steps=STEPS)
    c = task.compile(z, backend="jax", fuse_forward=4)
    with pytest.raises(metagrad.DeviceMemoryError) as error:
        c.metagradient(z, metagrad.Auto(memory=c.data_bytes + c.layout.state_bytes))
    minimum = int(str(error.value).rsplit(" ", 1)[1].rstrip("."))
    value, grad = c.metagradient(z, metagrad.StoreAll())

    def no_enzyme(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'enzyme_ad'")

    c.prepare(metagrad.Auto(blocks=(1, 10)))  # the default lengths built, not those between
    with monkeypatch.context() as patch:  # a loaded task where enzyme-ad is not installed
        patch.setattr(lowering, "lower", no_enzyme)
        with pytest.warns(UserWarning, match=r"Auto: the fused reverses of 3 steps, which may run faster within "
                                             r"this budget, cannot be built here \(ModuleNotFoundError: No module "
                                             r"named 'enzyme_ad'\)"):
            while True:  # the first call starts their build in the background; a later one finds it failed
                v, g, report = c.metagradient(z, metagrad.Auto(memory=minimum), report=True)
                if "build in the background" not in report.schedule:
                    break
    assert report.schedule.endswith("block=1)") and "segment_vjp_3" not in c.programs
    results = [(v, g), c.metagradient(z, metagrad.Budget(states=4, block=3))]
    c = task.compile(z, backend="jax", fuse_forward=4)  # where they can be built (a task plans without them
    # from its failed build on)
    # the 10-step reverse fits neither budget; 3-step plans fit the second, where timing decides
    for budget in (minimum + 1, c.data_bytes + 14 * c.layout.state_bytes):
        given = metagrad.Auto(memory=budget, blocks=(1, 10))  # the default lengths, named: no others tried
        c.metagradient(z, given)
        assert _fused_reverses(c.cost_table(z, given)) == {"segment_vjp_10"}
        auto = metagrad.Auto(memory=budget)
        v, g, report = c.metagradient(z, auto, report=True)
        assert report.peak_device_bytes + report.data_bytes <= budget
        assert _fused_reverses(c.cost_table(z, auto)) == {"segment_vjp_3", "segment_vjp_10"}  # what it chose from
        results.append((v, g))
    assert "segment_vjp_3" in c.programs
    for v, g in results:
        np.testing.assert_allclose(v, value, rtol=1e-6)
        np.testing.assert_allclose(g, grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())


def test_simulated_cost_adds_up_the_executions():
    table = _table(fused_bytes=5000, fused_seconds=5.0)
    plan = metagrad.StoreAll().plan(3)
    cost = schedules.simulate_plan(plan, table)
    # init, 3 steps, output_vjp, 3 step_vjps, init_vjp
    assert cost["executions"] == 9
    assert cost["seconds"] == 1 + 3 * 1 + 2 + 3 * 2 + 2
    # The peak is at output_vjp: states 0..2 saved, state 3 current (not saved), and output_vjp's own bytes.
    assert cost["peak_bytes"] == 3 * 100 + 100 + 200


def test_auto_is_not_a_plan_of_its_own():
    with pytest.raises(TypeError, match="Auto chooses its plan from the compiled task's costs"):
        metagrad.Auto().plan(10)
    with pytest.raises(ValueError, match=r"Auto: memory \(bytes\) must be in \[1, 9223372036854775807\], got 0"):
        metagrad.Auto(memory=0)
    with pytest.raises(TypeError, match=r"Auto: host_memory \(bytes\) must be an int, got float 1.5"):
        metagrad.Auto(host_memory=1.5)
    with pytest.raises(ValueError, match="blocks must be a non-empty tuple"):
        metagrad.Auto(blocks=(0,))


OVERSIZED = """
import resource
# should the check fail, this process gets an allocation error, not the OOM killer
resource.setrlimit(resource.RLIMIT_AS, ({available}, {available}))
import numpy as np, jax, jax.numpy as jnp, metagrad
leaf = {leaf}  # float32 elements: a state far beyond a few copies of the machine's memory
def init(z, data): return jnp.zeros(leaf, jnp.float32)
def step(state, z, data, t): return state * z[0]
def output(state, z, data): return state[0]
compiled = metagrad.Task(init, step, output, 8, None).compile(np.ones(1, np.float32), backend="jax")
for run in (lambda: compiled.metagradient(np.ones(1, np.float32), metagrad.StoreAll()),
            lambda: compiled.metagradient(np.ones(1, np.float32))):
    try:
        run()
        print("RAN")
    except metagrad.DeviceMemoryError as error:
        print("REFUSED", error)
"""


def test_a_plan_that_cannot_fit_the_device_is_refused_before_it_runs():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    leaf = available // 3 // 4  # a third of the free RAM per state: StoreAll holds 8
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    code = textwrap.dedent(OVERSIZED.replace("{leaf}", str(leaf)).replace("{available}", str(available)))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("REFUSED StoreAll() needs") and "the device has" in lines[0]
    assert "Auto() (the default schedule) picks the fastest plan that fits" in lines[0]
    assert lines[1].startswith("REFUSED a device-memory budget of 2.00 GiB is below the minimum")


SAME_CHOICE = """
import hashlib, sys, numpy as np, metagrad
sys.path.insert(0, sys.argv[1])
from models import make_task
task, z = make_task("weights", "sgdm", steps=40)
compiled = task.compile(z, backend="jax")
compiled.prepare(metagrad.Auto())  # every program Auto may use, built now
value, grad, report = compiled.metagradient(z, report=True)  # calibrated, and the choice made
print(report.schedule, hashlib.sha256(np.asarray(grad).tobytes()).hexdigest())
"""


def test_a_second_process_makes_the_same_choice_and_computes_the_same_bits(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), METAGRAD_CACHE_DIR=str(tmp_path))
    here = os.path.dirname(os.path.abspath(__file__))
    runs = [subprocess.run([sys.executable, "-c", SAME_CHOICE, here], capture_output=True, text=True, timeout=600,
                           env=env) for _ in range(2)]
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, second = (run.stdout.strip().splitlines()[-1] for run in runs)
    assert first == second  # the calibration is cached per machine: the same plan, the same gradient
    assert list(tmp_path.glob("calibration/*/*"))
