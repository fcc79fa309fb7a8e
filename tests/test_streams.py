"""Streamed training data (metagrad.Stream): batches gathered on the host in the plan's order,
checked against jax.grad through a lax.scan over the same batches and against the same task
with its data resident."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metagrad
from metagrad import schedules
from test_harness import run_bench

N, D, B, T = 200, 6, 8, 30


def _dataset(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype(np.float32)
    y = (x @ rng.normal(size=(D,)) + 0.1 * rng.normal(size=(n,))).astype(np.float32)
    return x, y, np.stack([rng.permutation(n)[:B] for _ in range(T)])


X, Y, INDEX = _dataset()
VAL = (X[:50], Y[:50])
Z = {"weights": np.linspace(0.5, 1.5, N).astype(np.float32), "lr": np.float32(0.05)}


def init(z, data):
    return {"w": jnp.zeros(D), "v": jnp.zeros(D)}


def _sgd_momentum(state, z, x, y, index):
    weights = z["weights"][index]
    g = jax.grad(lambda w: jnp.mean(weights * (x @ w - y) ** 2))(state["w"])
    v = 0.9 * state["v"] + g
    return {"w": state["w"] - z["lr"] * v, "v": v}


def step(state, z, data, t):
    batch = data["train"]
    return _sgd_momentum(state, z, batch.rows["x"], batch.rows["y"], batch.index)


def output(state, z, data):
    x, y = data["val"]
    return jnp.mean((x @ state["w"] - y) ** 2)


def streamed_task(x=X, y=Y, index=INDEX):
    return metagrad.Task(init=init, step=step, output=output, steps=T,
                         data={"train": metagrad.Stream({"x": x, "y": y}, index), "val": VAL})


def reference(z):
    """jax.grad through a lax.scan over the batches, gathered on the host."""
    stream = metagrad.Stream({"x": X, "y": Y}, INDEX)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[stream.batch_of(t) for t in range(T)])

    def objective(z):
        def body(state, xs):
            t, batch = xs
            return step(state, z, {"train": batch, "val": VAL}, t), None
        state, _ = jax.lax.scan(body, init(z, None), (jnp.arange(T), stacked))
        return output(state, z, {"val": VAL})
    return jax.value_and_grad(objective)(z)


@pytest.fixture(scope="module")
def compiled():
    return {loop: streamed_task().compile(Z, fuse_forward=4, loop=loop) for loop in ("unroll", "scan")}


@pytest.fixture(scope="module")
def want():
    return reference(Z)


def batch_bytes():
    return B * (D * 4 + 4 + 4)  # x, y and the int32 index of each row


def assert_close(got, want_tree):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want_tree)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)


SCHEDULES = [schedules.StoreAll(), schedules.Budget(states=3), schedules.Budget(states=3, block=4),
             schedules.Periodic(every=7), schedules.Replay(k=3), None]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_streamed_metagradient_matches_jax_grad_for_every_schedule(compiled, want, schedule):
    value, grad, report = compiled["unroll"].metagradient(Z, schedule, report=True)
    np.testing.assert_allclose(value, want[0], rtol=1e-6)
    assert_close(grad, want[1])
    assert report.prefetch_misses == 0  # the prefetch followed the plan's exact order
    # Every executed step streams its batch, replays included.
    assert report.streamed_bytes == (report.forward_steps + report.reversed_steps) * batch_bytes()


def test_fused_scan_programs_take_their_steps_batches_stacked(compiled, want):
    task = compiled["scan"]
    _, grad, report = task.metagradient(Z, schedules.Budget(states=3, block=4), report=True)
    for name in ("advance_4", "segment_vjp_4"):
        batch = tuple(task.programs[name].inputs[6:10])  # after the state (2), z (2) and data (2) leaves
        assert batch == (((4, B, D), "float32"), ((4, B), "float32"), ((4, B), "int32"), ((), "int32"))
    assert_close(grad, want[1])
    assert report.prefetch_misses == 0 and report.reversed_steps == T


def test_streamed_equals_the_same_task_with_its_data_resident(compiled):
    resident = _resident_task().compile(Z, fuse_forward=4)
    schedule = schedules.Budget(states=4, block=4)
    _, want_grad = resident.metagradient(Z, schedule)
    _, grad = compiled["unroll"].metagradient(Z, schedule)
    assert_close(grad, want_grad)
    np.testing.assert_allclose(compiled["unroll"].train(Z)["w"], resident.train(Z)["w"], rtol=1e-6)


def test_the_determinism_check_reads_the_same_batches_in_its_prefetched_order(compiled, want):
    _, grad, report = compiled["unroll"].metagradient(Z, schedules.Budget(states=3), check_determinism=True,
                                                      report=True)
    assert_close(grad, want[1])
    assert report.determinism_checks > 0 and report.prefetch_misses == 0


def test_device_bytes_count_the_batches_in_flight_not_the_rows(compiled):
    task = compiled["unroll"]
    _, _, report = task.metagradient(Z, schedules.StoreAll(), report=True)
    resident = VAL[0].nbytes + VAL[1].nbytes + Z["weights"].nbytes + 4
    in_flight = (metagrad._runtime.PREFETCH_DEPTH + 1) * 4 * batch_bytes()  # the longest program runs 4 steps
    assert report.data_bytes == task.data_bytes == resident + in_flight
    assert report.data_bytes < X.nbytes + Y.nbytes


def test_a_memory_mapped_file_is_read_by_rows_not_loaded(tmp_path):
    """A file far larger than what the run reads: the process's own memory grows by the batches in
    flight, and the pages it maps stay those of the rows read (the index reads 240 contiguous rows)."""
    width = 1024
    rows = 32768  # 128 MiB of float32
    path = tmp_path / "rows.f32"
    array = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(rows, width))
    array[:T * B] = np.random.default_rng(1).normal(size=(T * B, width)).astype(np.float32)
    array.flush()
    del array
    index = np.arange(T * B).reshape(T, B)

    def wide_init(z, data):
        return {"w": jnp.zeros(width)}

    def wide_step(state, z, data, t):
        x = data["train"].rows
        g = jax.grad(lambda w: jnp.mean((x @ w - 1.0) ** 2))(state["w"])
        return {"w": state["w"] - z * g}

    def wide_output(state, z, data):
        return jnp.sum(state["w"] ** 2)

    def task(x):
        return metagrad.Task(init=wide_init, step=wide_step, output=wide_output, steps=T,
                             data={"train": metagrad.Stream(x, index)})

    z = np.float32(0.01)
    small = np.load(str(path), mmap_mode="r")[:T * B]
    _, want_grad = task(np.ascontiguousarray(small)).compile(z).metagradient(z)  # compiles the programs
    before = _memory_kib()
    mapped = np.load(str(path), mmap_mode="r")
    _, grad, report = task(mapped).compile(z).metagradient(z, report=True)
    after = _memory_kib()
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)
    file_kib = path.stat().st_size // 1024
    assert report.streamed_bytes >= T * B * width * 4
    # Documented constant: 16 MiB for the batches in flight, staging and the run's own buffers.
    assert after["RssAnon"] - before["RssAnon"] < 16 * 1024 < file_kib
    assert after["RssFile"] - before["RssFile"] < file_kib // 4


def _memory_kib() -> dict:
    with open(f"/proc/{os.getpid()}/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith("Rss")}


# -- errors ---------------------------------------------------------------------


def test_init_and_output_cannot_read_the_stream():
    def bad_output(state, z, data):
        return jnp.sum(data["train"].rows["x"]) + jnp.sum(state["w"])

    task = metagrad.Task(init=init, step=step, output=bad_output, steps=T,
                         data={"train": metagrad.Stream({"x": X, "y": Y}, INDEX), "val": VAL})
    with pytest.raises(ValueError, match=r"data\['train'\] is a metagrad.Stream: only step\(state, z, data, t\)"):
        task.compile(Z)


def test_stream_arguments_are_checked():
    with pytest.raises(ValueError, match="outside the 200 rows"):
        metagrad.Stream({"x": X}, INDEX + 190)
    with pytest.raises(ValueError, match=r"integer array \(T, B\)"):
        metagrad.Stream({"x": X}, INDEX[0])
    with pytest.raises(ValueError, match="share their leading dimension"):
        metagrad.Stream({"x": X, "y": Y[:10]}, INDEX)
    with pytest.raises(TypeError, match=r"rows\['x'\] is float64, which JAX computes as float32"):
        metagrad.Stream({"x": X.astype(np.float64)}, INDEX)
    with pytest.raises(ValueError, match="not C-contiguous"):
        metagrad.Stream({"x": np.asfortranarray(X)}, INDEX)
    with pytest.raises(ValueError, match="batches for 29 steps, the task has 30"):
        streamed_task(index=INDEX[:-1]).compile(Z)
    two = metagrad.Task(init=init, step=step, output=output, steps=T,
                        data={"train": metagrad.Stream({"x": X}, INDEX), "more": metagrad.Stream({"y": Y}, INDEX)})
    with pytest.raises(ValueError, match="data holds 2 Streams"):
        two.compile(Z)


@pytest.mark.parametrize("split", [True, False], ids=["rows-split", "replicated"])
def test_a_sharded_task_streams_each_device_its_share_of_each_batch(want, split):
    from jax.sharding import PartitionSpec as P

    sharding = metagrad.Sharding(mesh={"batch": 2}, batch=P("batch") if split else P())
    task = streamed_task().compile(Z, fuse_forward=4, sharding=sharding,
                                   client=metagrad.runtime.get_client(cpu_device_count=4))
    assert task._task_layout.batch[0].shape == [B // 2 if split else B, D]
    for schedule in (schedules.Budget(states=3, block=4), schedules.StoreAll()):
        value, grad, report = task.metagradient(Z, schedule, report=True)
        np.testing.assert_allclose(value, want[0], rtol=1e-5)  # the devices' sums round in another order
        assert_close(grad, want[1])
        assert report.prefetch_misses == 0 and report.devices == 2
        share = batch_bytes() // (2 if split else 1)  # per device
        assert report.streamed_bytes == (report.forward_steps + report.reversed_steps) * share


def test_a_batch_split_along_other_axes_is_refused():
    from jax.sharding import PartitionSpec as P

    with pytest.raises(ValueError, match="a streamed batch may be split along its rows \\(its first axis\\) only"):
        streamed_task().compile(Z, sharding=metagrad.Sharding(mesh={"batch": 2}, batch=P(None, "batch")),
                                client=metagrad.runtime.get_client(cpu_device_count=4))


def _rows_file(tmp_path, rows):
    path = tmp_path / "x.npy"
    np.save(path, rows)
    return path


def test_a_slice_of_a_mapped_file_reads_its_own_rows(compiled, want, tmp_path):
    """Rows read from the file at the slice's offset give what the same rows in memory give."""
    padded = np.concatenate([np.full((37, D), np.nan, np.float32), X])
    mapped = np.load(_rows_file(tmp_path, padded), mmap_mode="r")[37:]
    task = streamed_task(x=mapped).compile(Z, fuse_forward=4)
    _, grad = task.metagradient(Z, schedules.Budget(states=3))
    assert_close(grad, want[1])


def test_a_file_changed_while_streamed_fails_naming_it(tmp_path):
    path = _rows_file(tmp_path, X)
    task = streamed_task(x=np.load(path, mmap_mode="r")).compile(Z, fuse_forward=4)
    task.metagradient(Z)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4 * D)
    with pytest.raises(metagrad.CheckFailed, match=f"the streamed rows' file {path} changed while it was streamed "
                                                   f"\\(its size went from"):
        task.metagradient(Z)
    shorter = np.load(_rows_file(tmp_path, X), mmap_mode="r")
    with open(shorter.filename, "r+b") as f:  # under the mapping, before anything reads it
        f.truncate(os.path.getsize(shorter.filename) - 4 * D)
    with pytest.raises(ValueError, match=f"the streamed rows' file {shorter.filename} holds 4904 bytes; its 200 "
                                         f"rows of float32\\[6\\] from byte 128 need 4928"):
        streamed_task(x=shorter).compile(Z, fuse_forward=4)


def test_a_saved_streamed_task_references_its_file_and_runs_in_the_harness(want, tmp_path):
    """Rows read from a file are referenced by its path; rows in memory are carried in the directory."""
    path = _rows_file(tmp_path, X)
    task = streamed_task(x=np.load(path, mmap_mode="r")).compile(Z, fuse_forward=4)
    schedule = schedules.Budget(states=3, block=4)
    task.prepare(schedule).save(str(tmp_path / "task"))
    rows = json.loads((tmp_path / "task" / "manifest.json").read_text())["stream"]["rows"]
    assert rows == [{"file": str(path), "offset": 128, "rows": N, "bytes": path.stat().st_size,
                     "modified_ns": path.stat().st_mtime_ns},
                    {"file": "arrays/stream_rows_1.bin", "offset": 0, "rows": N}]
    loaded = metagrad.load(str(tmp_path / "task"))
    value, grad = loaded.metagradient(Z, schedule)
    assert_close(grad, want[1])
    done = run_bench(tmp_path / "task", "--schedule", "budget:3:4", "--repeat", "1", "--warmup", "0",
                     "--dispatch-iters", "0", "--json", "--save-grad", str(tmp_path / "grads"))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)["metagradient"][0]["report"]
    assert report["prefetch_misses"] == 0 and report["streamed_bytes"] > 0
    assert np.fromfile(tmp_path / "grads" / "0" / "value.bin", np.float32)[0] == value
    for i, leaf in enumerate(jax.tree_util.tree_leaves(grad)):  # z's leaves: lr, weights
        np.testing.assert_array_equal(np.fromfile(tmp_path / "grads" / "0" / f"grad_{i}.bin", np.float32),
                                      np.ravel(leaf))


def test_a_saved_task_whose_referenced_file_is_gone_is_refused_naming_it(tmp_path):
    path = _rows_file(tmp_path, X)
    streamed_task(x=np.load(path, mmap_mode="r")).compile(Z, fuse_forward=4).save(str(tmp_path / "task"))
    np.save(path, X[::-1].copy())  # the same size, other rows
    os.utime(path, ns=(1, 1))
    with pytest.raises(ValueError, match=f"{path}: changed after the task was saved"):
        metagrad.load(str(tmp_path / "task"))
    done = run_bench(tmp_path / "task", "--schedule", "storeall", "--repeat", "1", "--warmup", "0",
                     "--dispatch-iters", "0")
    assert done.returncode == 1 and f"{path} changed after the task was saved" in done.stderr
    os.remove(path)
    with pytest.raises(ValueError, match=f"{path}: cannot be read as 200 rows of float32\\[6\\] from byte 128"):
        metagrad.load(str(tmp_path / "task"))
    done = run_bench(tmp_path / "task", "--schedule", "storeall", "--repeat", "1", "--warmup", "0",
                     "--dispatch-iters", "0")
    assert done.returncode == 1 and f"cannot open the streamed rows' file {path}" in done.stderr


def test_saved_states_in_host_memory_with_streamed_batches(compiled):
    import re

    task = compiled["unroll"]
    with pytest.raises(metagrad.DeviceMemoryError, match="to at least") as info:
        task.metagradient(Z, metagrad.Auto(memory=1, blocks=(1,), host_memory=0))
    budget = int(re.search(r"at least (\d+)", str(info.value)).group(1)) - 1  # too little with every state on it
    value, grad, report = task.metagradient(Z, metagrad.Auto(memory=budget, blocks=(1,), host_memory=2**30),
                                            report=True)
    want_value, want_grad = task.metagradient(Z, schedules.StoreAll())
    assert "in host memory" in report.schedule and report.peak_host_bytes > 0
    assert report.peak_device_bytes + report.data_bytes <= budget and report.prefetch_misses == 0
    assert value == want_value
    for name in grad:
        np.testing.assert_array_equal(grad[name], want_grad[name])


def _resident_task():
    def resident_step(state, z, data, t):
        index = data["index"][t]
        return _sgd_momentum(state, z, data["x"][index], data["y"][index], index)

    return metagrad.Task(init=init, step=resident_step, output=output, steps=T,
                         data={"x": X, "y": Y, "index": INDEX.astype(np.int32), "val": VAL})


def test_mgd_over_per_example_weights_of_a_streamed_dataset(compiled):
    def descend(task):
        return metagrad.mgd.run(lambda z: task.metagradient(z, schedules.Budget(states=4, block=4)), Z, steps=4,
                                direction="minimize", step_rule=metagrad.mgd.sign_step(0.02),
                                projection=metagrad.mgd.leafwise({"weights": metagrad.mgd.box(0.0, 2.0),
                                                                  "lr": metagrad.mgd.box(0.05, 0.05)}),  # lr held
                                progress=False)

    streamed = descend(compiled["unroll"])
    resident = descend(_resident_task().compile(Z, fuse_forward=4))
    assert streamed.values[-1] < streamed.values[0]
    np.testing.assert_allclose(streamed.values, resident.values, rtol=1e-5)
    np.testing.assert_allclose(streamed.z["weights"], resident.z["weights"], atol=1e-6)


def test_calls_on_two_threads_share_the_stream_one_at_a_time(compiled, want):
    """Runners of one task (other schedules, other programs) share its stream: a call waits for the other's."""
    from concurrent.futures import ThreadPoolExecutor

    task = compiled["unroll"]
    plans = [schedules.Budget(states=3, block=4), schedules.Replay(k=3), schedules.StoreAll()] * 2
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda s: task.metagradient(Z, s, report=True), plans))
    for value, grad, report in results:
        np.testing.assert_allclose(value, want[0], rtol=1e-6)
        assert_close(grad, want[1])
        assert report.prefetch_misses == 0
        assert report.streamed_bytes == (report.forward_steps + report.reversed_steps) * batch_bytes()


def test_a_saved_sharded_streamed_task_runs_in_load_and_the_harness(want, tmp_path):
    from jax.sharding import PartitionSpec as P

    client = metagrad.runtime.get_client(cpu_device_count=4)
    task = streamed_task().compile(Z, fuse_forward=4, client=client,
                                   sharding=metagrad.Sharding(mesh={"batch": 2}, batch=P("batch")))
    schedule = schedules.Budget(states=3, block=4)
    task.prepare(schedule).save(str(tmp_path / "task"))
    value, grad = metagrad.load(str(tmp_path / "task"), client=client).metagradient(Z, schedule)
    np.testing.assert_allclose(value, want[0], rtol=1e-5)
    assert_close(grad, want[1])
    done = run_bench(tmp_path / "task", "--schedule", "budget:3:4", "--repeat", "1", "--warmup", "0",
                     "--dispatch-iters", "0", "--json", "--save-grad", str(tmp_path / "grads"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["info"]["devices"] == 2 and out["metagradient"][0]["report"]["prefetch_misses"] == 0
    assert np.fromfile(tmp_path / "grads" / "0" / "value.bin", np.float32)[0] == value
