"""Tasks over several CPU devices: data-parallel and parameter-sharded
(FSDP-style) digits MLP and transformer give the single-device metagradient
for per-example weights, a learning-rate schedule and weight decay at once,
with Replay, Budget and StoreAll; each device holds its share of a leaf;
wrong shardings fail before anything compiles; saved states go to host memory
when the device budget is short; saved sharded tasks run in metagrad-bench."""

import functools
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import metagrad
from metagrad import _runtime, runtime
from metagrad._src import cache, lowering, sharding as sharding_lib
import models

# The client has 4 devices. Tasks, whose steps run collectives, use at most as many
# devices as there are cores: with more, XLA's CPU collectives can deadlock and abort
# the process (docs/scaling.md section 8; seen in bench/scaling.py, not in these tests).
DEVICES, STEPS = 4, 5
N = min(DEVICES, len(os.sched_getaffinity(0)))
SCHEDULES = [metagrad.Replay(k=2), metagrad.Budget(states=2), metagrad.StoreAll()]
Z_SPECS = {"weights": P(None, "batch"), "lr": P(), "wd": P()}  # per-example weights split like their batch
DATA_SPECS = {"mlp": {"x": P(None, "batch"), "y": P(None, "batch"), "x_val": P(), "y_val": P()},
              "transformer": {"tokens": P(None, "batch"), "val": P()}}


def fsdp(leaf):
    """Parameters and optimizer states split on their first axis where it divides."""
    return P("batch") if leaf.shape and leaf.shape[0] % N == 0 else P()


STATE_SPECS = {"data_parallel": P(), "fsdp": fsdp}


@pytest.fixture(scope="module")
def client():
    return runtime.get_client(cpu_device_count=DEVICES)


@functools.lru_cache(maxsize=None)
def _task(model: str):
    if model == "mlp":
        task, z0 = models.make_task("all", steps=STEPS, batched=True)
    else:
        task, z0 = models.make_transformer_task("all", steps=STEPS)
    rng = np.random.default_rng(1)  # away from the all-ones weights and the constant schedule
    z = {"weights": (z0["weights"] * (1 + 0.2 * rng.normal(size=z0["weights"].shape))).astype(np.float32),
         "lr": (z0["lr"] * np.linspace(1.0, 0.5, STEPS)).astype(np.float32), "wd": z0["wd"]}
    return task, z


@functools.lru_cache(maxsize=None)
def _reference(model: str):
    """phi and its gradient from jax.grad through lax.scan, on jax's one device."""
    task, z = _task(model)

    def run(z):
        state = task.init(z, task.data)
        state = jax.lax.scan(lambda s, t: (task.step(s, z, task.data, t), None), state,
                             jnp.arange(STEPS, dtype=jnp.int32))[0]
        return task.output(state, z, task.data)

    return jax.jit(jax.value_and_grad(run))(z)


@functools.lru_cache(maxsize=None)
def _compiled(model: str, variant: str):
    task, z = _task(model)
    sharding = metagrad.Sharding({"batch": N}, data=DATA_SPECS[model], z=Z_SPECS, state=STATE_SPECS[variant])
    client = runtime.get_client(cpu_device_count=DEVICES)
    return task.compile(z, client=client, sharding=sharding, fuse_forward=2 if model == "mlp" else 1), z


CASES = [(m, v) for m in ("mlp", "transformer") for v in ("data_parallel", "fsdp")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{v}" for m, v in CASES])
def case(request):
    model, variant = request.param
    compiled, z = _compiled(model, variant)
    return model, variant, compiled, z


# Float32 tolerance, relative to each leaf's largest entry: the transformer trains
# with Adam, whose normalisation amplifies rounding, and the single-device
# metagradient itself is 1.8e-4 (weights) and 2.8e-4 (wd) off jax.grad there.
TOLERANCE = {"mlp": 1e-5, "transformer": 2e-3}


def _close(grad, expected, model):
    for name in ("weights", "lr", "wd"):
        scale = np.abs(np.asarray(expected[name])).max()
        np.testing.assert_allclose(grad[name], expected[name], rtol=1e-4, atol=TOLERANCE[model] * scale,
                                   err_msg=name)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_sharded_metagradient_equals_one_device(case, schedule):
    model, variant, compiled, z = case
    value, expected = _reference(model)
    phi, grad, report = compiled.metagradient(z, schedule, report=True)
    np.testing.assert_allclose(phi, value, rtol=1e-5)
    _close(grad, expected, model)
    assert report.devices == N and report.reversed_steps == STEPS


def _shard_bytes(shape, spec, itemsize):
    parts = [1] * len(shape)
    for dim, axes in enumerate(spec):
        parts[dim] = 1 if axes is None else N  # the mesh has one axis, of N devices
    return int(np.prod([d // p for d, p in zip(shape, parts)])) * itemsize


def test_each_device_holds_its_share_of_a_leaf(case):
    model, variant, compiled, z = case
    state, report = compiled._runner().train(compiled._z_buffers(z))
    leaves = compiled.layout.state
    assert len(state) == N * len(leaves)
    expected_total = 0
    for i, leaf in enumerate(leaves):
        shards = state[i * N:(i + 1) * N]
        spec = STATE_SPECS[variant](leaf) if variant == "fsdp" else P()
        size = _shard_bytes(leaf.shape, spec, np.dtype(leaf.dtype).itemsize)
        assert [s.on_device_size for s in shards] == [size] * N, leaf.path
        assert [s.device for s in shards] == list(range(N))
        expected_total += size
    assert report.state_bytes == expected_total  # per device
    whole = sum(leaf.nbytes for leaf in leaves)
    if variant == "fsdp":  # every parameter and moment splits (the Adam/SGD counters do not)
        assert expected_total < whole / N + 64
    else:
        assert expected_total == whole
    # The batched data: each device holds 1/N of every batch.
    first = compiled.layout.data[0]
    assert [b.on_device_size for b in compiled._data[:N]] == [first.nbytes // N] * N


def test_the_saved_sharded_task_runs_in_the_harness(tmp_path):
    from test_harness import run_bench

    compiled, z = _compiled("mlp", "fsdp")
    compiled.save(str(tmp_path / "task"))
    manifest = json.loads((tmp_path / "task" / "manifest.json").read_text())
    assert manifest["sharding"]["mesh"] == [["batch", N]] and manifest["sharding"]["devices"] == list(range(N))
    loaded = metagrad.load(str(tmp_path / "task"))  # a client with N devices, created for it
    value, grad = compiled.metagradient(compiled.z_example, metagrad.Replay(k=2))
    loaded_value, loaded_grad = loaded.metagradient(loaded.z_example, metagrad.Replay(k=2))
    assert loaded_value == value and loaded.devices == compiled.devices
    for name in grad:
        np.testing.assert_array_equal(loaded_grad[name], grad[name])
    done = run_bench(tmp_path / "task", "--schedule", "replay:2", "--repeat", "1", "--warmup", "0", "--json",
                     "--save-grad", str(tmp_path / "grads"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["info"]["devices"] == N
    assert np.fromfile(tmp_path / "grads" / "0" / "value.bin", np.float32)[0] == value
    for i, leaf in enumerate(compiled.layout.z):  # z's leaves in pytree order: lr, wd, weights
        bench = np.fromfile(tmp_path / "grads" / "0" / f"grad_{i}.bin", np.float32).reshape(leaf.shape)
        np.testing.assert_array_equal(bench, grad[leaf.path[3:-2]])


def test_a_short_device_budget_puts_saved_states_in_host_memory():
    compiled, z = _compiled("mlp", "data_parallel")
    with pytest.raises(metagrad.DeviceMemoryError, match="to at least") as info:
        compiled.metagradient(z, metagrad.Auto(memory=1, blocks=(1,), host_memory=0))
    device_only = int(re.search(r"at least (\d+)", str(info.value)).group(1))
    budget = device_only - 1  # no plan fits with every saved state on the device
    value, grad, report = compiled.metagradient(z, metagrad.Auto(memory=budget, blocks=(1,), host_memory=2**30),
                                                report=True)
    expected_value, expected = compiled.metagradient(z, metagrad.StoreAll())
    assert value == expected_value
    for name in grad:
        np.testing.assert_array_equal(grad[name], expected[name])
    assert "in host memory" in report.schedule
    assert report.peak_device_bytes + report.data_bytes <= budget
    assert report.peak_device_bytes == report.predicted_peak_device_bytes
    assert 0 < report.peak_host_bytes == report.predicted_peak_host_bytes <= report.host_budget_bytes
    assert report.host_saved_states > 0
    assert report.bytes_to_host == report.host_saved_states * report.state_bytes
    assert report.bytes_from_host > 0


def test_host_slots_cost_what_the_plan_says():
    plan = metagrad.schedules.plan_replay(20, 3)
    table = _runtime.CostTable()
    table.state_bytes = 100
    table.programs = {name: _runtime.ProgramCost() for name in ("init", "step", "output_vjp", "step_vjp", "init_vjp")}
    table.to_host.seconds = 1.0
    table.from_host.seconds = 2.0
    order = _runtime.host_slot_order(plan)
    copies = {slot: sum(1 for a in plan if a.slot == slot and a.kind in ("save", "restore")) for slot in order}
    assert [copies[s] for s in order] == sorted(copies.values())
    host = set(order[:2])
    device = _runtime.simulate_plan(plan, table)
    cost = _runtime.simulate_plan(plan, table, host)
    saves = sum(1 for a in plan if a.kind == "save" and a.slot in host)
    restores = sum(1 for a in plan if a.kind == "restore" and a.slot in host)
    assert cost["bytes_to_host"] == 100 * saves and cost["bytes_from_host"] == 100 * restores
    assert cost["seconds"] == pytest.approx(device["seconds"] + saves * 1.0 + restores * 2.0)
    assert cost["peak_bytes"] < device["peak_bytes"] and cost["peak_host_bytes"] > 0


def _sharding(**overrides):
    return metagrad.Sharding(**{"mesh": {"batch": DEVICES}, "data": DATA_SPECS["mlp"], "z": Z_SPECS, **overrides})


@pytest.mark.filterwarnings("ignore:.*CPU devices on .* cores:RuntimeWarning")
@pytest.mark.parametrize("sharding, error, message", [
    (_sharding(state=P("batch")), ValueError,
     r"state\[0\]\['b2'\]: dimension 0 of size 10 is split 4 ways by P\('batch'\), which does not divide it"),
    (_sharding(data={"x": P(None, "btch"), "y": P(), "x_val": P(), "y_val": P()}), ValueError,
     r"data\['x'\]: PartitionSpec P\(None, 'btch'\) names mesh axis 'btch', the mesh is \{'batch': 4\}"),
    (_sharding(mesh={"batch": 8}), ValueError,
     r"the mesh \{'batch': 8\} needs 8 devices, the client has 4 .*get_client\(cpu_device_count=8\)"),
    (_sharding(z={"weights": P(None, "batch", "batch"), "lr": P(), "wd": P()}), ValueError,
     r"z\['weights'\] has 2 dimension\(s\) but its PartitionSpec P\(None, 'batch', 'batch'\) names 3"),
    (_sharding(data={"x": P("batch")}), ValueError, r"Sharding.data is not a PartitionSpec prefix of the data pytree"),
    (_sharding(z={"weights": "batch", "lr": P(), "wd": P()}), TypeError,
     r"Sharding.z: expected a jax.sharding.PartitionSpec \(or None\), got str 'batch'"),
])
def test_wrong_shardings_fail_before_anything_compiles(client, monkeypatch, sharding, error, message):
    task, z = models.make_task("all", steps=STEPS, batched=True)
    monkeypatch.setattr(lowering, "lower", lambda *a, **k: pytest.fail("lowered"))
    monkeypatch.setattr(cache, "compile_program", lambda *a, **k: pytest.fail("compiled"))
    monkeypatch.setenv(sharding_lib.OVERSUBSCRIBE_ENV, "1")  # a mesh of 4 on fewer cores: checked, not run
    with pytest.raises(error, match=message):
        task.compile(z, client=client, sharding=sharding)


def test_more_cpu_devices_than_cores_are_refused_before_anything_compiles(monkeypatch):
    task, z = models.make_task("all", steps=STEPS, batched=True)
    monkeypatch.setattr(lowering, "lower", lambda *a, **k: pytest.fail("lowered"))
    cores = len(os.sched_getaffinity(0))
    client = runtime.get_client(cpu_device_count=cores + 1)
    mesh = {"mesh": {"batch": cores + 1}}
    monkeypatch.delenv(sharding_lib.OVERSUBSCRIBE_ENV, raising=False)
    with pytest.raises(ValueError, match=rf"{cores + 1} CPU devices on {cores} cores: XLA's CPU collectives can "
                                         rf"deadlock .* Use a mesh of at most {cores} CPU devices, or set "
                                         rf"METAGRAD_CPU_OVERSUBSCRIBE=1"):
        task.compile(z, client=client, sharding=_sharding(**mesh))
    bad = _sharding(**mesh, data={"x": P("batch")})  # fails after the check, before lowering
    monkeypatch.setenv(sharding_lib.OVERSUBSCRIBE_ENV, "1")
    with pytest.warns(RuntimeWarning, match=rf"{cores + 1} CPU devices on {cores} cores"):
        with pytest.raises(ValueError, match="not a PartitionSpec prefix"):
            task.compile(z, client=client, sharding=bad)
    with warnings.catch_warnings():  # as many devices as cores: no warning
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(ValueError, match="not a PartitionSpec prefix"):
            task.compile(z, client=client, sharding=_sharding(mesh={"batch": cores}, data={"x": P("batch")}))


def test_a_saved_task_over_more_cpu_devices_than_cores_is_refused_on_load_and_in_the_harness(tmp_path, monkeypatch):
    from test_harness import run_bench

    task, z = models.make_task("all", steps=STEPS, batched=True)
    more = len(os.sched_getaffinity(0)) + 1
    monkeypatch.setenv(sharding_lib.OVERSUBSCRIBE_ENV, "1")  # compiled and saved only: nothing runs
    with pytest.warns(RuntimeWarning, match="CPU devices on"):
        compiled = task.compile(z, client=runtime.get_client(cpu_device_count=more),
                                sharding=metagrad.Sharding({"batch": more}))
    compiled.save(str(tmp_path / "task"))
    monkeypatch.delenv(sharding_lib.OVERSUBSCRIBE_ENV)
    with pytest.raises(ValueError, match=rf"{more} CPU devices on {more - 1} cores"):
        metagrad.load(str(tmp_path / "task"))
    done = run_bench(tmp_path / "task", "--schedule", "replay:2", "--repeat", "1", "--warmup", "0")
    assert done.returncode != 0 and done.returncode > 0  # an error, not a signal
    assert f"{more} CPU devices on {more - 1} cores" in done.stderr, done.stderr


def test_sharding_rejects_bad_meshes():
    with pytest.raises(ValueError, match="Sharding.mesh must map axis names to sizes"):
        metagrad.Sharding({})
    with pytest.raises(ValueError, match="sizes >= 1"):
        metagrad.Sharding({"batch": 0})
    with pytest.raises(ValueError, match="partitioner must be one of"):
        metagrad.Sharding({"batch": 2}, partitioner="auto")
    with pytest.raises(ValueError, match="Sharding.devices must list 2 distinct device indices"):
        metagrad.Sharding({"batch": 2}, devices=[1, 1])


def test_compile_options_are_what_xla_parses():
    from jax._src.lib import xla_client

    one_device = bytes([0x1a, 0x04, 0x20, 0x01, 0x28, 0x01])  # as always
    assert _runtime.compile_options() == _runtime.compile_options([0], False, "cpu") == one_device
    options = xla_client.CompileOptions.ParseFromString(_runtime.compile_options([3, 1, 0, 2], True, "cpu"))
    build = options.executable_build_options
    assert (build.num_replicas, build.num_partitions) == (1, 4)
    assert build.use_spmd_partitioning and build.use_shardy_partitioner
    assert str(build.device_assignment) == ("DeviceAssignment{replica_count=1, computation_count=4, "
                                            "Computation0{3} Computation1{1} Computation2{0} Computation3{2}}")
    # Single-threaded kernels for several CPU devices (client.h says why); none elsewhere.
    assert options.env_option_overrides == [("xla_cpu_multi_thread_eigen", False)]
    assert xla_client.CompileOptions.ParseFromString(
        _runtime.compile_options([0, 1], False, "cuda")).env_option_overrides == []


def _program(client, fn, sharding, in_spec, out_spec, shape, donated=()):
    spec_data = lambda s: sharding_lib._spec_data(s, "test")  # noqa: E731
    struct = jax.ShapeDtypeStruct(shape, np.float32)
    lowered = sharding.lower(fn, [struct], [spec_data(in_spec)], [spec_data(out_spec)], donated)
    artifact = runtime.portable_artifact(lowered, client=client)
    shard = runtime.ArraySpec(list(sharding.shard_shape(shape, spec_data(in_spec))), "float32")
    options = _runtime.compile_options([d.id for d in client.devices[:DEVICES]], sharding.partitioner == "shardy", "cpu")
    return client.compile(artifact, "mlir", [shard], [bool(donated)], options), artifact


@pytest.mark.parametrize("partitioner", sharding_lib.PARTITIONERS)
@pytest.mark.parametrize("spec", [P("data", "model"), P("model", "data"), P(("data", "model")),
                                  P(("model", "data")), P(None, "model")], ids=str)
def test_shard_blocks_are_where_xla_puts_them(client, partitioner, spec):
    sharding = sharding_lib.TaskSharding((("data", 2), ("model", 2)), partitioner, (), (), ())
    data = sharding_lib._spec_data(spec, "test")
    x = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)
    gather, _ = _program(client, lambda a: (a + 1,), sharding, spec, P(), x.shape)
    scatter, _ = _program(client, lambda a: (a + 1,), sharding, P(), spec, x.shape)
    replicated = gather.execute(sharding.upload(x, data, client, range(DEVICES)))
    for shard in replicated:  # every device assembled the whole array from the blocks it was given
        np.testing.assert_array_equal(shard.to_numpy(), x + 1)
    split = scatter.execute(sharding.upload(x, (), client, range(DEVICES)))
    np.testing.assert_array_equal(sharding.assemble(split, x.shape, data), x + 1)
    for p, shard in enumerate(split):
        offsets = _runtime.shard_offsets(list(x.shape), [list(a) for a in data], list(sharding.mesh), p)
        block = (x + 1)[tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape))]
        np.testing.assert_array_equal(shard.to_numpy(), block)


def test_programs_check_shards_before_xla_sees_them(client):
    sharding = sharding_lib.TaskSharding((("batch", DEVICES),), "shardy", (), (), ())
    program, artifact = _program(client, lambda a: (a * 2,), sharding, P("batch"), P("batch"), (8, 3), donated=(0,))
    assert program.devices == list(range(DEVICES))
    x = np.arange(24, dtype=np.float32).reshape(8, 3)
    shards = sharding.upload(x, (("batch",),), client, range(DEVICES))
    (*out,) = program.execute(shards)
    np.testing.assert_array_equal(sharding.assemble(out, x.shape, (("batch",),)), 2 * x)
    assert all(s.is_deleted for s in shards)  # donated shard by shard
    swapped = sharding.upload(x, (("batch",),), client, [1, 0, 2, 3])
    with pytest.raises(ValueError, match=r"argument 0 \(shard 0\) is on device 1, the program runs it on device 0"):
        program.execute(swapped)
    # Whole arrays where the program takes shards: refused at compile (a multi-device
    # execution that XLA rejects on one device leaves the CPU client unable to run).
    options = _runtime.compile_options([d.id for d in client.devices[:DEVICES]], True, "cpu")
    with pytest.raises(ValueError, match="the per-shard inputs hold 96 bytes per device but the partitioned "
                                         "program takes 24"):
        client.compile(artifact, "mlir", [runtime.ArraySpec([8, 3], "float32")], [True], options)


def test_host_memory_round_trips_are_exact(client):
    x = np.random.default_rng(0).normal(size=(1000, 33)).astype(np.float32)
    buffer = client.buffer_from_array(x, 2)
    for kind in ("pinned_host", "unpinned_host"):
        host = buffer.copy_to_memory(kind)
        assert (host.memory_kind, host.device, host.on_device_size) == (kind, 2, x.nbytes)
        back = host.copy_to_memory("device")
        assert back.memory_kind == "device"
        np.testing.assert_array_equal(back.to_numpy(), x)
    with pytest.raises(ValueError, match="device 2 has no memory kind 'hbm'; it has: device, pinned_host, "
                                         "unpinned_host"):
        buffer.copy_to_memory("hbm")
