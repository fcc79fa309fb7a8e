"""The PJRT runtime itself: plugins, clients, device buffers and executables.

metagrad's tasks run on it; it is public for users who want to run StableHLO
programs without a task (see ``tests/test_runtime.py`` for examples).
"""

from metagrad._src.ffi import register_ffi_target
from metagrad._src.runtime import (
    ArraySpec, Buffer, Client, Executable, PjrtError, Plugin, Signature, compile_module, cpu_plugin_path,
    cuda_plugin_path, default_plugin_path, get_client, load_plugin, module_signature, portable_artifact, stablehlo_target,
    to_device,
)

__all__ = [
    "ArraySpec", "Buffer", "Client", "Executable", "PjrtError", "Plugin", "Signature", "compile_module",
    "cpu_plugin_path", "cuda_plugin_path", "default_plugin_path", "get_client", "load_plugin", "module_signature",
    "portable_artifact", "register_ffi_target", "stablehlo_target", "to_device",
]
