"""Programs built on a background thread while metagradients run on those already built.

``Auto``'s fused programs are the slowest to build (an unrolled reverse of ten
steps takes XLA many times a single step's compile), and whether they make any
plan faster is known only once they are built and timed. So the calls of a
compiled task do not wait for them: the second ``metagradient`` starts their
build on a daemon thread (this module), every call meanwhile runs the best plan
over single-step reverses, and the first call after the build has finished
times the new programs and plans over all of them. The build's thread
releases the GIL inside XLA's compile and waits on Enzyme's own process, so
the calls in the foreground go on at close to full speed where there are spare
cores.

At interpreter exit a build stops before its next program (the Enzyme process
is ended at once); the program XLA is compiling is left to finish, since
tearing the process down under a running compile could crash it.
"""

from __future__ import annotations

import atexit
import importlib
import threading
from concurrent.futures import Future
from typing import Any, Callable

from metagrad._src import enzyme_worker, setup_time

_STOP = threading.Event()
_THREADS: set[threading.Thread] = set()
_THREADS_LOCK = threading.Lock()


class Stopped(Exception):
    """The interpreter is exiting: a background build ends before its next program."""


def stopping() -> bool:
    """Whether builds should end now: the interpreter is exiting (checked between programs)."""
    return _STOP.is_set()


def running() -> bool:
    """Whether a background build is under way in this process (timings taken now are skewed)."""
    with _THREADS_LOCK:
        return any(thread.is_alive() for thread in _THREADS)


class Build:
    """A build under way: ``done()`` without waiting, ``result()`` waits and raises the build's error.
    ``setup`` holds its set-up seconds by phase once it is done."""

    def __init__(self, work: Callable[[], Any], name: str):
        self._future: Future = Future()
        self.setup = setup_time.SetupTime()
        thread = threading.Thread(target=self._run, args=(work,), name=f"metagrad-build {name}", daemon=True)
        with _THREADS_LOCK:
            _THREADS.add(thread)
        thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            with setup_time.record() as self.setup:  # filled as the build runs; read once it is done
                if _STOP.is_set():
                    raise Stopped()
                result = work()
        except BaseException as error:  # noqa: BLE001 (the caller re-raises it from result())
            self._future.set_exception(error)
        else:
            self._future.set_result(result)
        finally:
            with _THREADS_LOCK:
                _THREADS.discard(threading.current_thread())

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> Any:
        return self._future.result()


def _stop_at_exit() -> None:
    _STOP.set()
    with _THREADS_LOCK:
        threads = list(_THREADS)
    if threads:
        enzyme_worker.interrupt()
    for thread in threads:
        thread.join()


# Stop before the interpreter joins its non-daemon threads: the lowering's Enzyme thread is one,
# and it must see the stop before it takes the next program. These hooks run last registered
# first, so concurrent.futures registers its join of its workers first (importing it does);
# atexit's handlers would run only after both.
importlib.import_module("concurrent.futures.thread")
getattr(threading, "_register_atexit", atexit.register)(_stop_at_exit)
