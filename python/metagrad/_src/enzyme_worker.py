"""Enzyme's lowering in a separate process, so that it cannot take ours down.

Why a process: Enzyme (enzyme-ad 0.0.16) runs inside the lowering of a jitted
function, in native code, and on some programs it does not raise but
crashes: ``jnp.sort`` / ``jnp.median`` / ``jnp.quantile`` end in SIGSEGV, a
``stablehlo.while`` it cannot type in an LLVM abort. No list of known-bad ops
can be complete, and a crash kills a notebook kernel with its state. So
every reverse program that Enzyme builds is built here, in a child process
that receives only data (the task's exported forward functions, its layout,
the program's name) and returns the portable artifact or the error. A crash
ends the child, not the caller: the caller gets :class:`EnzymeFailed`, and
the next request starts a fresh child. The child is kept between requests,
so its start-up (importing jax and Enzyme, about two seconds) is paid once
per process. What Enzyme prints goes to the ``metagrad`` logger at DEBUG
level, not to the user's terminal.

Run as ``python -m metagrad._src.enzyme_worker`` (by :class:`Worker` only).
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading

log = logging.getLogger("metagrad")

_ADJOINT_ERROR = re.compile(r"could not compute the adjoint for this operation\s*\n?\s*%?[^\"]*\"([\w.]+)\"")


class EnzymeFailed(Exception):
    """Enzyme could not build a program: it raised (``op`` parsed from its
    message where it names one) or its process died (``signal_number`` set)."""

    def __init__(self, message: str, op: str | None = None, signal_number: int | None = None):
        super().__init__(message)
        self.op, self.signal_number = op, signal_number


def _write(stream, payload) -> None:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _read(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return pickle.loads(data)


def kept_arguments(lowered) -> set[int]:
    """The arguments of a lowered jitted function that its jaxpr uses (JAX's dead-argument
    elimination), read from the lowering: ``lowered.compile()`` reports the same set."""
    return set(lowered._lowering.compile_args["kept_var_idx"])


def _skip_dead_argument_compiles() -> None:
    """enzyme-ad 0.0.16 has XLA compile every function it differentiates only to ask
    which arguments survive dead-argument elimination (``compile()._executable.
    _kept_var_idx``), then discards the executable: a whole XLA compile of the step
    inside every Enzyme build. The lowering already holds the answer, so
    in the child ``compile()`` of enzyme-ad's lowerings answers that question alone;
    the reverse Enzyme emits computes the same bits."""
    import types

    from enzyme_ad.jax import primitives

    lower = primitives.lower

    def lower_without_compiling(fn, vals, parameters=None, kwargs={}):  # noqa: B006 (enzyme-ad's signature)
        lowered = lower(fn, vals, parameters, kwargs=kwargs)
        executable = types.SimpleNamespace(_executable=types.SimpleNamespace(_kept_var_idx=kept_arguments(lowered)))
        lowered.compile = lambda: executable
        return lowered

    primitives.lower = lower_without_compiling


def _serve() -> None:
    """The child: answer build requests until stdin closes."""
    import jax

    _skip_dead_argument_compiles()

    from metagrad._src import programs
    from metagrad._src.layout import Layout
    from metagrad._src.sharding import TaskSharding

    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    while (request := _read(requests)) is not None:
        try:
            jax.config.update("jax_enable_x64", request["x64"])
            forward = programs.forward_of_exports(request["exports"])
            layout = Layout.from_json(request["layout"])
            sharding = request.get("sharding")
            program = programs.build(request["name"], forward, layout, "enzyme", request["target"], request["loop"],
                                     sharding=sharding and TaskSharding.from_json(sharding))
            reply = {"program": program}
        except Exception as error:  # every failure goes back to the caller, typed there
            text = f"{type(error).__name__}: {error}"
            match = _ADJOINT_ERROR.search(text)
            reply = {"error": text, "op": match.group(1) if match else None}
        _write(replies, reply)


class Interrupted(Exception):
    """The build was abandoned by its caller (Ctrl-C, or the interpreter exiting): no verdict on
    whether Enzyme can build the program."""


class Worker:
    """The client side: one child process, started on first use, restarted after a crash."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._stderr = None
        self._lock = threading.Lock()
        self._interrupted = False  # the child was ended by interrupt(), not by a crash

    def _start(self) -> None:
        env = dict(os.environ)
        # The folder that holds the metagrad package (this file is metagrad/_src/enzyme_worker.py).
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        env["JAX_PLATFORMS"] = "cpu"  # lowering only: no accelerator needed
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen([sys.executable, "-m", "metagrad._src.enzyme_worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, env=env)

    def _drain_log(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read().decode(errors="replace")
        self._stderr.seek(0)
        self._stderr.truncate()
        if text.strip():
            log.debug("Enzyme's output:\n%s", text)
        return text

    def build(self, request: dict):
        """The Program Enzyme built for ``request``; raises EnzymeFailed."""
        with self._lock:
            self._interrupted = False
            if self._process is None or self._process.poll() is not None:
                self._start()
            try:
                _write(self._process.stdin, request)
                reply = _read(self._process.stdout)
            except BrokenPipeError:
                reply = None
            except BaseException:  # KeyboardInterrupt while Enzyme works: drop the child
                self.close()
                raise
            if reply is None:
                code = self._process.wait()
                self._drain_log()
                self._process = None
                if self._interrupted:
                    raise Interrupted(f"the build of {request['name']} was interrupted")
                how = signal.Signals(-code).name if code < 0 else f"exit code {code}"
                raise EnzymeFailed(f"Enzyme crashed ({how}) while building {request['name']}", None,
                                   -code if code < 0 else None)
            self._drain_log()
        if "error" in reply:
            raise EnzymeFailed(reply["error"], reply["op"])
        return reply["program"]

    def interrupt(self) -> None:
        """End the child now, from any thread: a build waiting on it fails at once (as a crash),
        and the next request starts a fresh child."""
        process = self._process
        if process is not None and process.poll() is None:
            self._interrupted = True
            process.kill()

    def close(self) -> None:
        """End the child (it exits when its input closes) and release its pipes."""
        if self._process is not None:
            for stream in (self._process.stdin, self._process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


_WORKER = Worker()
atexit.register(_WORKER.close)


def build(request: dict):
    """Build one program with Enzyme in the shared child process."""
    return _WORKER.build(request)


def interrupt() -> None:
    """Abandon the build in progress (the caller was interrupted)."""
    _WORKER.interrupt()


if __name__ == "__main__":
    _serve()
