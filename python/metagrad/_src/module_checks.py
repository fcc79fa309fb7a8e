"""Checks of a lowered program before compilation: custom calls the runtime cannot run.

A ``stablehlo.custom_call`` runs only if the plugin has a handler for its
target. jaxlib's kernels (``jnp.linalg`` on CPU) get one (:mod:`ffi`); host
callbacks (``jax.debug.print``, ``jax.debug.callback``, ``jax.pure_callback``,
``io_callback``) never can: their handler calls back into the Python
interpreter, and the runtime runs every step in C++ with no Python. Without
this check such a program compiles and then fails at execution with an FFI
message that names neither the op nor the line.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator

from metagrad._src import ffi

# Targets XLA's compiler consumes itself (sharding, placement and layout
# annotations): no handler is involved.
_XLA_TARGETS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement",
                          "LayoutConstraint", "MoveToHost", "MoveToDevice"})
# xla_python_cpu_callback, xla_ffi_python_cpu_callback, xla_ffi_partitioned_python_gpu_callback,
# xla_buffer_python_cpu_callback, ...
_CALLBACK_TARGET = re.compile(r"^xla_(ffi_|buffer_)?(partitioned_)?python_\w+_callback$")
# Name-stack entries jax gives each callback primitive, as they appear in op locations.
_CALLBACKS = {
    "debug_print": ("jax.debug.print",
                    "Remove it; to look at values, run the step with plain JAX (jax.jit), or carry the value in "
                    "the state and read it from compiled.train(z)."),
    "debug_callback": ("jax.debug.callback",
                       "Remove it; to look at values, run the step with plain JAX (jax.jit), or carry the value "
                       "in the state and read it from compiled.train(z)."),
    "pure_callback": ("jax.pure_callback",
                      "Write the function with jax.numpy / jax.lax, or as an XLA FFI handler registered with "
                      "metagrad.runtime.register_ffi_target."),
    "io_callback": ("jax.experimental.io_callback",
                    "Move the side effect out of the step: do it before or after compiled.train / "
                    "metagradient, from the values they return."),
}
_WHY_CALLBACK = ("host callbacks run Python during the step, and metagrad's runtime runs every step in C++ "
                 "with no Python interpreter")
_SOURCE_LINE = re.compile(r'"([^"]+\.py)":(\d+):')


class UnsupportedOpError(ValueError):
    """A program contains an operation the runtime cannot execute."""

    def __init__(self, program: str, op: str, message: str):
        self.program, self.op = program, op
        super().__init__(message)


def custom_calls(module) -> Iterator[tuple[str, str]]:
    """``(call_target_name, location)`` of every custom call in an MLIR module, nested regions included."""
    from jaxlib.mlir import ir

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if op.operation.name == "stablehlo.custom_call":
                        target = ir.StringAttr(op.operation.attributes["call_target_name"]).value
                        yield target, str(op.location)
                    yield from walk(op.operation)

    yield from walk(module.operation)


def _where(location: str) -> str:
    match = _SOURCE_LINE.search(location)  # innermost frame: the user's line
    return f" at {match.group(1)}:{match.group(2)}" if match else ""


def _callback_error(program: str, target: str, location: str) -> UnsupportedOpError:
    for name, (op, advice) in _CALLBACKS.items():
        if f"/{name}" in location or f'"{name}' in location:
            break
    else:
        op, advice = "a host callback", _CALLBACKS["pure_callback"][1]
    return UnsupportedOpError(
        program, op,
        f"{program} calls {op} (custom call '{target}'{_where(location)}), which metagrad cannot run: "
        f"{_WHY_CALLBACK}. {advice}")


def check_custom_calls(module, program: str, handled: Collection[str] | None = None) -> None:
    """Raise :class:`UnsupportedOpError` at the first custom call of ``module`` that cannot run.

    ``handled``: targets with a handler in the plugin (default:
    :func:`ffi.handled_targets`).
    """
    handled = ffi.handled_targets() if handled is None else handled
    for target, location in custom_calls(module):
        if target in handled or target in _XLA_TARGETS or target.startswith("xla.sdy."):
            continue
        if _CALLBACK_TARGET.match(target):
            raise _callback_error(program, target, location)
        reason = ffi.missing_handler_reason(target)
        raise UnsupportedOpError(
            program, target,
            f"{program} contains custom call '{target}'{_where(location)}, which has no handler in metagrad's "
            "PJRT plugin" + (f": {reason}" if reason else "") + ". Express the op with jax.numpy / jax.lax, or "
            "register its XLA FFI handler with metagrad.runtime.register_ffi_target(name, capsule).")


def check_lowered(lowered, program: str) -> None:
    """:func:`check_custom_calls` on a ``jax.stages.Lowered``."""
    check_custom_calls(lowered.compiler_ir("stablehlo"), program)
