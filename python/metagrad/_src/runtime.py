"""The runtime from Python (the public ``metagrad.runtime``): finding PJRT plugins,
one cached client per plugin, and compiling StableHLO with the signature read
from the module itself. A task's programs compile through the disk cache
(``cache.compile_program``)."""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

from metagrad import _runtime
from metagrad._runtime import ArraySpec, Buffer, Client, Executable, PjrtError, Plugin

__all__ = [
    "ArraySpec", "Buffer", "Client", "Executable", "PjrtError", "Plugin", "Signature",
    "cpu_plugin_path", "cuda_plugin_path", "default_plugin_path", "get_client", "load_plugin",
    "module_signature", "compile_module", "portable_artifact", "stablehlo_target", "to_device",
]

PLUGIN_ENV = "METAGRAD_PJRT_PLUGIN"


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def cpu_plugin_path() -> str:
    """Path of the CPU plugin shipped by the ``xla-cpu-pjrt`` package."""
    directory = _package_dir("xla_plugins.xla_cpu_pjrt")
    if directory is None:
        raise FileNotFoundError("the CPU PJRT plugin is missing: pip install xla-cpu-pjrt==0.0.1")
    return os.path.join(directory, "xla_cpu_pjrt.so")


def cuda_plugin_path() -> str | None:
    """Path of the CUDA plugin of ``jax-cuda13-pjrt`` or ``jax-cuda12-pjrt``, if installed."""
    for package in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
        try:
            directory = _package_dir(package)
        except ModuleNotFoundError:
            directory = None
        if directory is not None:
            candidate = os.path.join(directory, "xla_cuda_plugin.so")
            if os.path.exists(candidate):
                return candidate
    return None


def default_plugin_path() -> str:
    """``$METAGRAD_PJRT_PLUGIN`` if set, else the CPU plugin."""
    return os.environ.get(PLUGIN_ENV) or cpu_plugin_path()


def is_cuda_plugin(path: str) -> bool:
    """Whether the plugin at ``path`` is a CUDA one (jax-cuda*-pjrt's ``xla_cuda_plugin.so``)."""
    return "cuda" in os.path.basename(path)


def _preload_nvidia_libraries() -> None:
    # The CUDA plugin resolves cuDNN, cuBLAS, NCCL... by soname; like jax, load
    # the copies from the nvidia-* wheels globally first.
    directory = _package_dir("nvidia")
    if directory is None:
        return
    for library in sorted(glob.glob(os.path.join(directory, "*", "lib", "lib*.so*"))):
        try:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass


@functools.lru_cache(maxsize=None)
def load_plugin(path: str) -> Plugin:
    """Load a PJRT plugin once per process (plugins are never unloaded)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"PJRT plugin not found at {path!r}: pass the path of a plugin shared library "
                                f"or set ${PLUGIN_ENV}")
    if is_cuda_plugin(path):
        _preload_nvidia_libraries()
    return Plugin.load(path)


@functools.lru_cache(maxsize=None)
def _client(path: str, options: tuple) -> Client:
    from metagrad._src import ffi

    client = Client.create(load_plugin(path), dict(options))
    ffi.register_jaxlib_handlers(client)  # jnp.linalg's kernels; once per plugin
    return client


def get_client(plugin: str | None = None, *, cpu_device_count: int | None = None,
               options: dict | None = None) -> Client:
    """The process-wide client for a plugin (the default plugin if None).

    ``cpu_device_count`` sets how many devices the CPU plugin exposes;
    ``options`` overrides the plugin's create options entirely.
    """
    path = os.path.abspath(plugin or default_plugin_path())
    if cpu_device_count is not None and cpu_device_count < 1:
        raise ValueError(f"cpu_device_count must be >= 1, got {cpu_device_count}")
    if cpu_device_count is not None and options is None and is_cuda_plugin(path):
        raise ValueError(f"cpu_device_count applies to the CPU plugin only; {os.path.basename(path)} is a CUDA "
                         f"plugin, whose devices are the machine's GPUs")
    chosen = options if options is not None else _runtime.default_client_options(path, int(cpu_device_count or 1))
    return _client(path, tuple(sorted(chosen.items())))


def _version_tuple(value) -> tuple[int, ...]:
    if isinstance(value, str):
        return tuple(int(part) for part in value.split("."))
    return tuple(int(part) for part in value)


def stablehlo_target(client: Client | None = None) -> str:
    """Portable-artifact version: the older of jax's StableHLO and the plugin's."""
    from jaxlib.mlir.dialects import stablehlo

    client = client or get_client()
    producer = _version_tuple(stablehlo.get_current_version())
    consumer = _version_tuple(client.plugin_attributes.get("stablehlo_current_version", producer))
    return ".".join(str(part) for part in min(producer, consumer))


@dataclass(frozen=True)
class Signature:
    """Inputs, outputs and donated inputs of a module's ``main`` function."""

    inputs: tuple[ArraySpec, ...]
    outputs: tuple[ArraySpec, ...]
    donated: tuple[bool, ...]


_MLIR_DTYPES = {mlir: name for name, mlir, _ in _runtime.dtypes()}
_DTYPES = frozenset(_MLIR_DTYPES.values())


def _spec_of(mlir_type) -> ArraySpec:
    from jaxlib.mlir import ir

    tensor = ir.RankedTensorType(mlir_type)
    element = str(tensor.element_type)
    if element not in _MLIR_DTYPES:
        raise ValueError(f"unsupported element type {element} in module signature")
    return ArraySpec(list(tensor.shape), _MLIR_DTYPES[element])


def module_signature(code: str | bytes) -> Signature:
    """Read the signature of ``main`` from MLIR text or a portable artifact."""
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import stablehlo

    with jax_mlir.make_ir_context() as context:
        try:
            if isinstance(code, (bytes, bytearray)):
                module = stablehlo.deserialize_portable_artifact(context, bytes(code))
            else:
                module = ir.Module.parse(code)
        except Exception as error:  # MLIR raises several types; all mean malformed input
            raise ValueError(f"not a valid StableHLO module: {error}") from None
        for operation in module.body.operations:
            if operation.operation.name == "func.func" and ir.StringAttr(operation.attributes["sym_name"]).value == "main":
                function_type = ir.FunctionType(ir.TypeAttr(operation.attributes["function_type"]).value)
                inputs = tuple(_spec_of(t) for t in function_type.inputs)
                outputs = tuple(_spec_of(t) for t in function_type.results)
                donated = [False] * len(inputs)
                if "arg_attrs" in operation.attributes:
                    for index, attrs in enumerate(ir.ArrayAttr(operation.attributes["arg_attrs"])):
                        names = {named.name for named in ir.DictAttr(attrs)}
                        donated[index] = bool(names & {"tf.aliasing_output", "jax.buffer_donor"})
                return Signature(inputs, outputs, tuple(donated))
    raise ValueError("the module has no func.func @main")


def portable_artifact(lowered, target: str | None = None, client: Client | None = None) -> bytes:
    """A lowered jax function (``jax.jit(f).lower(...)``) as a portable StableHLO artifact.

    ``target``: the StableHLO version to write (default: :func:`stablehlo_target`
    of ``client``). Goes through XLA's serializer, which legalizes CHLO ops
    (``erf_inv`` from ``jax.random.normal``, ...) that the Python StableHLO
    bindings reject.
    """
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib import _jax

    bytecode = jax_mlir.module_to_bytecode(lowered.compiler_ir("stablehlo"))
    return _jax.mlir.serialize_portable_artifact(bytecode, target or stablehlo_target(client))


def compile_module(code: str | bytes, client: Client | None = None) -> Executable:
    """Compile StableHLO (MLIR text or portable artifact bytes) for ``client``."""
    client = client or get_client()
    signature = module_signature(code)
    return client.compile(code if isinstance(code, bytes) else code.encode(), "mlir",
                          list(signature.inputs), list(signature.donated))


def to_device(array, client: Client | None = None, device: int = 0) -> Buffer:
    """Copy a host array (numpy, jax, anything array-like) to a device buffer."""
    client = client or get_client()
    array = np.asarray(array)
    if array.dtype.name not in _DTYPES:
        raise TypeError(f"cannot copy an array of dtype {array.dtype} to the device: the runtime holds "
                        f"{', '.join(sorted(_DTYPES))}")
    return client.buffer_from_array(array, device)  # strided arrays are copied by PJRT directly
