"""jaxlib's custom-call kernels, registered with the PJRT plugins metagrad runs.

On CPU, jax lowers ``jnp.linalg`` (solve, cholesky, eigh, qr, svd, ...) to
custom calls such as ``lapack_sgetrf_ffi``; on CUDA to cuSOLVER/cuBLAS ones
(``cusolver_getrf_ffi``, ...). Their handlers live in jaxlib (or the
``jax-cuda*-plugin`` package) and jaxlib registers them with its own XLA only.
A plugin loaded by metagrad has a separate handler registry, process-wide per
plugin, so :func:`register_jaxlib_handlers` registers them there once per
plugin, through the plugin's PJRT FFI extension (``cpp/runtime/ffi.cc``).

The CPU path is tested; the CUDA path (platform ``"CUDA"``, handlers from
``jax._src.lib.gpu_*``) is written the same way but has not run on a GPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from metagrad import _runtime

# XLA's name for each platform in its handler registry.
_XLA_PLATFORM = {"cpu": "Host", "cuda": "CUDA"}


@dataclass(frozen=True)
class Registration:
    """What registering jaxlib's handlers with one plugin did."""

    platform: str
    targets: frozenset[str]  # registered, runnable on that plugin
    adapted: bool  # registered behind the FFI version adapter (see cpp/runtime/ffi.h)
    failure: str | None  # why nothing was registered, if so


_lock = threading.Lock()
_registrations: dict[str, Registration] = {}  # plugin path -> what was registered
_user_targets: dict[str, set[str]] = {}  # plugin path -> targets from register_ffi_target


def _platform(client) -> str:
    return "cuda" if client.platform_name.lower() in ("cuda", "gpu") else "cpu"


def jaxlib_handlers(platform: str) -> dict[str, Any]:
    """jaxlib's typed FFI handlers for ``platform`` (``"cpu"`` or ``"cuda"``): target -> capsule.

    The untyped (api_version 0) legacy targets are left out: jax no longer
    emits them and XLA:CPU refuses them.
    """
    if platform == "cpu":
        from jaxlib import cpu_sparse, lapack

        modules, key = (lapack, cpu_sparse), "cpu"
    elif platform == "cuda":
        from jax._src.lib import gpu_linalg, gpu_prng, gpu_solver, gpu_sparse

        modules, key = (gpu_linalg, gpu_prng, gpu_solver, gpu_sparse), "CUDA"
    else:
        raise ValueError(f"no jaxlib handlers for platform {platform!r}: use 'cpu' or 'cuda'")
    handlers = {}
    for module in modules:
        if module is None:  # jax without the CUDA plugin that holds this module's kernels
            continue
        for name, capsule, api_version in module.registrations().get(key, []):
            if api_version == 1:
                handlers[name] = capsule
    return handlers


def register_jaxlib_handlers(client) -> Registration:
    """Register jaxlib's kernels with ``client``'s plugin (once per plugin; later calls return the first result).

    Never raises for an incompatible plugin: the failure is recorded, and
    :func:`missing_handler_reason` gives it to the compile-time check that
    refuses programs calling those targets.
    """
    with _lock:
        path = client.plugin_path
        if path in _registrations:
            return _registrations[path]
        platform = _platform(client)
        try:
            handlers = jaxlib_handlers(platform)
        except ImportError as error:  # a jax whose layout of the kernels' modules differs
            _registrations[path] = Registration(platform, frozenset(), False,
                                                f"jaxlib's {platform} kernels could not be imported: {error}")
            return _registrations[path]
        if platform == "cpu":
            from jaxlib.cpu import _lapack

            _lapack.initialize()  # the kernels call LAPACK through pointers jaxlib fills from scipy
        from metagrad._src import runtime

        plugin = runtime.load_plugin(path)
        registered, adapted, failure = set(), False, None
        if not plugin.can_register_ffi_handlers:
            failure = f"the PJRT plugin {path} cannot register FFI handlers (its PJRT FFI extension has none)"
        else:
            for name, capsule in sorted(handlers.items()):
                try:
                    how = plugin.register_ffi_handler(name, _XLA_PLATFORM[platform], capsule, allow_adapter=True)
                except (ValueError, RuntimeError) as error:  # incompatible FFI versions or ABI
                    failure = str(error)
                    break
                registered.add(name)
                adapted |= how == "adapted"
        _registrations[path] = Registration(platform, frozenset(registered), adapted, failure)
        return _registrations[path]


def register_ffi_target(name: str, handler, *, client=None) -> None:
    """Register your own typed XLA FFI handler (a capsule, as for ``jax.ffi.register_ffi_target``).

    Programs calling ``custom_call @name`` then run in metagrad's runtime on
    ``client``'s plugin. The handler must be built with XLA FFI headers no
    newer than the plugin's (``Plugin.ffi_api_version``).
    """
    from metagrad._src import runtime

    client = client or runtime.get_client()
    plugin = runtime.load_plugin(client.plugin_path)
    plugin.register_ffi_handler(name, _XLA_PLATFORM[_platform(client)], handler)
    with _lock:
        _user_targets.setdefault(client.plugin_path, set()).add(name)


def handled_targets() -> frozenset[str]:
    """Custom-call targets that have, or will have, a handler in the plugins of this process.

    jaxlib's CPU targets count before any client exists: the first client of
    a plugin registers them (``runtime.get_client``), unless that failed.
    """
    with _lock:
        names = set().union(*_user_targets.values(), *(r.targets for r in _registrations.values()))
        attempted = {r.platform for r in _registrations.values()}
    if "cpu" not in attempted:
        names |= set(jaxlib_handlers("cpu"))
    return frozenset(names)


def missing_handler_reason(target: str) -> str | None:
    """Why jaxlib's ``target`` has no handler in a plugin, if registering it failed."""
    with _lock:
        for registration in _registrations.values():
            if registration.failure is not None and target not in registration.targets:
                return registration.failure
    return None


def versions(client) -> dict[str, Any]:
    """XLA FFI C API versions: metagrad's headers (jaxlib's), jaxlib's handlers, the plugin's XLA."""
    platform = _platform(client)
    handlers = jaxlib_handlers(platform)
    from metagrad._src import runtime

    plugin = runtime.load_plugin(client.plugin_path)
    sample = next(iter(handlers.values()), None)
    return {
        "metagrad_headers": tuple(_runtime.XLA_FFI_API_VERSION),
        "jaxlib_handlers": tuple(_runtime.ffi_handler_metadata(sample)["api_version"]) if sample else None,
        "plugin": tuple(plugin.ffi_api_version(_XLA_PLATFORM[platform])),
    }
