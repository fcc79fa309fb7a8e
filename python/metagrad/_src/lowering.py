"""Lowering: a task's programs as portable StableHLO, reverses by Enzyme or JAX.

Forward programs are built in this process. Reverse programs are built by
Enzyme in a separate process (``enzyme_worker``: a crash there cannot end
this one) or by JAX's autodiff here. ``backend="auto"`` (the default) tries
Enzyme for the reverses of the step (``PER_STEP_REVERSES``) and falls back to
JAX, with one line of warning, wherever Enzyme fails (and takes JAX's
batched reverse for m outputs at once); the reverses of init and output are
JAX's. ``"enzyme"`` builds every reverse with Enzyme and raises
:class:`EnzymeUnsupportedError` where it cannot; ``"jax"`` never uses Enzyme.

Built programs are cached on disk (``cache``), keyed by content.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import struct
import warnings
from typing import Callable

import jax

from metagrad import _runtime
from metagrad._src import background, cache, enzyme_worker, module_checks, programs, setup_time
from metagrad._src.layout import Layout
from metagrad._src.programs import Program
from metagrad._src.version import VERSION

BACKENDS = ("auto", "enzyme", "jax")
DEFAULT_BACKEND = "auto"


class EnzymeUnsupportedError(ValueError):
    """Enzyme cannot differentiate a program of the task (``backend="enzyme"``)."""

    def __init__(self, program: str, op: str | None, detail: str):
        self.program, self.op = program, op
        what = detail.strip().splitlines()[0][:300] if detail.strip() else "it failed"
        if op and "adjoint" in detail:
            what = f"it has no adjoint for '{op}'"
        elif op:
            what = f"{what}; the program uses '{op}'"
        super().__init__(
            f"Enzyme cannot differentiate {program}: {what}. " + _ADVICE.get(op or "", "")
            + "Use backend='auto' (the default) to fall back to JAX's autodiff for this program, or backend='jax'.")


_ADVICE = {
    "stablehlo.select_and_scatter": "This is the gradient of max-pooling inside the step; average pooling "
                                    "differentiates (and trains more smoothly). ",
    "stablehlo.sort": "Sorting (jnp.sort, argsort, median, quantile, top_k) crashes Enzyme. ",
    "stablehlo.custom_call": "Custom calls (jnp.linalg's LAPACK kernels: solve, cholesky, eigh, qr...) have no "
                             "Enzyme adjoint. ",
}

# Element types the JAX wrapper of enzyme-ad 0.0.16 can hand to Enzyme
# (`maketup` in enzyme_ad/jax/primitives.py); any other (float16, uint8,
# int16...) fails there with a bare KeyError.
_ENZYME_DTYPES = frozenset({"bool", "int8", "int32", "int64", "uint32", "uint64", "bfloat16", "float32", "float64",
                            "complex64", "complex128"})

# Ops on which Enzyme crashes instead of raising (measured with enzyme-ad
# 0.0.16). backend="auto" goes to JAX at once for programs that use them (a
# crash costs a new child process, seconds); backend="enzyme" still asks
# Enzyme, whose child process catches the crash, and the error names the op.
_CRASHES_ENZYME = ("stablehlo.sort",)

# The modules whose code decides what a lowered program holds: a program in the
# disk cache is keyed by their text (with the program contract), so that a
# changed lowering never reads back what the old one built.
LOWERING_SOURCES = ("programs.py", "lowering.py", "enzyme_worker.py", "layout.py", "sharding.py")


@functools.cache
def code_identity(sources: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """A SHA-256 of the lowering's sources (``LOWERING_SOURCES`` in directory ``sources``)
    and the program contract."""
    digest = hashlib.sha256(json.dumps(_runtime.program_kinds(), sort_keys=True).encode())
    for name in LOWERING_SOURCES:
        with open(os.path.join(sources, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()


def versions() -> dict:
    """What produced a lowered program: metagrad's version and lowering code, jax, jaxlib, enzyme-ad."""
    import jaxlib

    return {"metagrad": VERSION, "code": code_identity(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "enzyme_ad": _installed_version("enzyme-ad")}


def _installed_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def program_key(exports: dict[str, bytes], layout: Layout, name: str, backend: str, target: str, loop: str,
                sharding=None) -> str:
    return cache.key("program", versions(), layout.to_json(), name, backend, target, loop,
                     bool(jax.config.jax_enable_x64), *(() if sharding is None else (sharding.to_json(),)),
                     *(exports[k] for k in sorted(exports)))


def _known_crash(exports: dict[str, bytes], name: str) -> str | None:
    source = programs.DIFFERENTIATES[programs.kind_of(name)[0]]
    text = jax.export.deserialize(bytearray(exports[source])).mlir_module()
    return next((op for op in _CRASHES_ENZYME if f"{op}" in text), None)


# The reverses a traversal runs once per training step: where backend="auto" asks Enzyme. The
# reverses of init and output run once per metagradient, so their speed hardly counts, while an
# Enzyme build costs its child process's start and competes with XLA's compiles for the cores:
# JAX builds them, in this process, while Enzyme builds the step's.
PER_STEP_REVERSES = tuple(kind for kind, forward in programs.DIFFERENTIATES.items() if forward == "step")


def _asks_enzyme(name: str, backend: str, layout: Layout) -> bool:
    """Whether program ``name`` goes to Enzyme. With m outputs at once, backend="auto" takes
    JAX's reverse, batched over the m cotangents (vmap): Enzyme's primitive has no batching
    rule, and its m reverses in a loop ran slower than m separate metagradients, where JAX's
    batch runs in about half their time."""
    if backend == "auto":
        return programs.kind_of(name)[0] in PER_STEP_REVERSES and layout.outputs == 0
    return backend == "enzyme" and programs.is_reverse(name)


def _build(exports, forward, layout: Layout, name: str, backend: str, target: str, loop: str, sharding) -> Program:
    # Programs built here are checked for ops the runtime cannot run (host
    # callbacks, custom calls without a handler); Enzyme's reverses hold the
    # same ops as the forward programs, which are checked before them.
    if not _asks_enzyme(name, backend, layout):
        return programs.build(name, forward, layout, "jax", target, loop, module_checks.check_lowered, sharding)
    known = _known_crash(exports, name)
    odd = next((s for s in (*layout.state, *layout.z, *layout.data) if s.dtype not in _ENZYME_DTYPES), None)
    try:
        if odd is not None:
            raise enzyme_worker.EnzymeFailed(f"{odd.path} is {odd.dtype}, which enzyme-ad's JAX wrapper does not "
                                             f"pass to Enzyme")
        if backend == "auto" and known:
            raise enzyme_worker.EnzymeFailed(f"Enzyme crashes on {known}", known)
        return enzyme_worker.build({"name": name, "exports": exports, "layout": layout.to_json(), "target": target,
                                    "loop": loop, "x64": bool(jax.config.jax_enable_x64),
                                    "sharding": sharding and sharding.to_json()})
    except enzyme_worker.EnzymeFailed as failure:
        op = failure.op or known
        if backend == "enzyme":
            raise EnzymeUnsupportedError(name, op, str(failure)) from None
        reason = f"no adjoint for '{op}'" if failure.op else str(failure).splitlines()[0][:200]
        program = programs.build(name, forward, layout, "jax", target, loop, module_checks.check_lowered, sharding)
        return dataclasses.replace(program, fallback=reason)


def lower(exports: dict[str, bytes], layout: Layout, names, *, backend: str, target: str, loop: str = "unroll",
          forward: programs.Forward | None = None, sharding=None,
          ready: Callable[[str, Program], None] | None = None) -> dict[str, Program]:
    """Programs ``names`` of the task with these exported forward functions.

    Each comes from the disk cache when an identical build was cached, else is
    built (and cached). ``forward``: the task's own functions, when this
    process has them (JAX's programs are built from them; Enzyme's always
    from the exports, in its own process). ``sharding``: a
    ``sharding.TaskSharding`` to lower every program for its mesh.
    ``ready(name, program)`` is called as each program is built, on this
    thread: the programs Enzyme builds are built meanwhile, in its process,
    so that whatever ``ready`` does (XLA's compile) overlaps with them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if loop not in programs.LOOPS:
        raise ValueError(f"loop must be one of {programs.LOOPS}, got {loop!r}")
    if forward is None:
        forward = programs.forward_of_exports(exports)

    def one(name: str) -> Program:
        if background.stopping():
            raise background.Stopped()
        entry = program_key(exports, layout, name, backend, target, loop, sharding)
        program = _decode(name, cache.get("programs", entry))
        if program is None:
            program = _build(exports, forward, layout, name, backend, target, loop, sharding)
            cache.put("programs", entry, _encode(program))
        return program

    built = {}

    def done(name: str, program: Program) -> None:
        if program.fallback:  # also when the program came from the cache
            warnings.warn(f"backend='auto': Enzyme cannot differentiate {name} ({program.fallback}); using JAX's "
                          f"autodiff for {name}", stacklevel=5)
        built[name] = program
        if ready is not None:
            ready(name, program)

    asked = [name for name in names if _asks_enzyme(name, backend, layout)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metagrad-enzyme") as pool:
        pending = {name: pool.submit(one, name) for name in asked}
        try:
            for name in names:
                if name not in pending:
                    with setup_time.phase("trace"):
                        program = one(name)
                    done(name, program)
            for name in asked:
                with setup_time.phase("enzyme"):
                    program = pending[name].result()
                done(name, program)
        except BaseException:  # Ctrl-C, or a build that failed: leave no build running behind
            for future in pending.values():
                future.cancel()
            if not all(future.done() for future in pending.values()):
                enzyme_worker.interrupt()
            raise
    return {name: built[name] for name in names}


def _encode(program: Program) -> bytes:
    meta = json.dumps(program.to_json()).encode()
    return struct.pack("<Q", len(meta)) + meta + program.artifact


def _decode(name: str, payload: bytes | None) -> Program | None:
    if payload is None:
        return None
    try:
        (size,) = struct.unpack_from("<Q", payload)
        return Program.from_json(name, json.loads(payload[8:8 + size]), bytes(payload[8 + size:]))
    except (ValueError, KeyError, TypeError, struct.error):
        return None
