"""One compiled task shared by several threads: every call gets the single-threaded result."""

import threading

import jax
import numpy as np

import metagrad
from models import make_task

STEPS = 30
SCHEDULES = [metagrad.StoreAll(), metagrad.Replay(k=3), metagrad.Budget(states=4, block=5),
             metagrad.Replay(k=2, block=10)]


def test_threads_sharing_a_compiled_task_get_the_single_threaded_results():
    task, z = make_task("weights", "adam", steps=STEPS)
    reference = task.compile(z)
    zs = [(z * (1 + 0.1 * i)).astype(z.dtype) for i in range(3)]
    calls = [("train", None, i) for i in range(3)] + [("metagradient", s, i) for s in SCHEDULES for i in range(3)]
    expected = {}
    for kind, schedule, i in calls:
        expected[kind, repr(schedule), i] = (
            reference.train(zs[i]) if kind == "train" else reference.metagradient(zs[i], schedule))
    for attempt in range(3):  # races show on a runner's first calls: three fresh compiled tasks
        compiled = task.compile(z)  # its own runners, whose first calls the threads make together
        got, errors = {}, []

        def worker(offset: int) -> None:
            try:
                for round_ in range(2):
                    for j in range(len(calls)):
                        kind, schedule, i = calls[(j + offset + round_) % len(calls)]
                        result = (compiled.train(zs[i]) if kind == "train" else
                                  compiled.metagradient(zs[i], schedule, progress=False))
                        got.setdefault((kind, repr(schedule), i), []).append(result)
            except Exception as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for key, results in got.items():
            want = jax.tree_util.tree_leaves(expected[key])
            assert len(results) == 8, key
            for result in results:  # the same programs on the same inputs: the same bits
                assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(result), want)), key
