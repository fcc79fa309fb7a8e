"""The persistent compile cache: lowered programs and compiled executables on disk.

Compiling a task lowers its programs (Enzyme's reverse programs are the slow
part) and has XLA compile them. Both results are kept under a user cache
directory, keyed by content: a program by the task's exported forward
functions, its layout, the program's name, the backend, the StableHLO target,
the text of the code that lowers it (``lowering.code_identity``) and the
versions of jax, jaxlib, enzyme-ad and metagrad; an executable by its
program's bytes, its compile options, the plugin (path, platform and
version) and the machine (host, CPU). The planner's calibration of a task's
programs is kept the same way, so that another process chooses the same plan
(and computes the same bits). A second process compiling the same task reads
them back.

Location: ``$METAGRAD_CACHE_DIR``, else ``$XDG_CACHE_HOME/metagrad``, else
``~/.cache/metagrad``. ``METAGRAD_CACHE=0`` (or ``off``/``false``) turns the
disk cache off; :func:`metagrad.clear_cache` with ``disk=True`` empties it.

Entries are data, never code (no pickle): a header with the SHA-256 of the key
and of the payload, then the payload. An entry whose header does not match
(corrupted, truncated, written for another key or by another version) is
ignored and rebuilt; a serialized executable that the plugin refuses is too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import tempfile

from metagrad import _runtime

log = logging.getLogger("metagrad")

_MAGIC = b"MGCACHE1"
_HEADER = struct.Struct("<8s32s32s")


def directory() -> str | None:
    """The cache directory, or None when the disk cache is off."""
    if os.environ.get("METAGRAD_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    explicit = os.environ.get("METAGRAD_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "metagrad")


def key(*parts) -> str:
    """A hex SHA-256 over JSON-able parts and bytes."""
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, (bytes, bytearray)) else json.dumps(part, sort_keys=True).encode()
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.hexdigest()


def _path(kind: str, name: str) -> str | None:
    root = directory()
    return None if root is None else os.path.join(root, kind, name[:2], name)


def get(kind: str, name: str) -> bytes | None:
    """The payload stored under (kind, name), or None (missing, unreadable or not matching)."""
    path = _path(kind, name)
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    if len(blob) < _HEADER.size:
        return None
    magic, key_hash, payload_hash = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size:]
    if (magic != _MAGIC or key_hash != hashlib.sha256(name.encode()).digest()
            or payload_hash != hashlib.sha256(payload).digest()):
        log.debug("ignoring the damaged or foreign cache entry %s", path)
        return None
    return payload


def put(kind: str, name: str, payload: bytes) -> None:
    """Store a payload (atomically: a reader sees the old entry, the new one, or none)."""
    path = _path(kind, name)
    if path is None:
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        header = _HEADER.pack(_MAGIC, hashlib.sha256(name.encode()).digest(), hashlib.sha256(payload).digest())
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as f:
            f.write(header + payload)
        os.replace(tmp, path)
    except OSError as error:  # a read-only or full disk costs a recompile, nothing else
        log.debug("could not write the cache entry %s: %s", path, error)


def clear() -> None:
    """Delete the disk cache."""
    root = directory()
    if root is not None and os.path.isdir(root):
        for kind in ("programs", "executables", "calibration"):
            shutil.rmtree(os.path.join(root, kind), ignore_errors=True)


# -- executables: keyed by the plugin and the machine as well -------------------

@functools.lru_cache(maxsize=None)
def _machine() -> dict:
    """What compiled code and timings depend on besides the plugin: the host and its CPU
    (an executable compiled for one CPU's instructions must not run on another)."""
    import hashlib
    import platform

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        pass
    return {"host": platform.node(), "cpu": hashlib.sha256(cpu.encode()).hexdigest()[:16]}


def _client_identity(client) -> dict:
    return {"plugin": os.path.abspath(client.plugin_path), "platform": client.platform_name,
            "version": client.platform_version, "api": list(client.plugin_api_version),
            "devices": len(client.devices), **_machine()}


def client_key(client, *parts) -> str:
    """A disk-cache key for what depends on this client's plugin and machine as well as ``parts``."""
    return key(_client_identity(client), *parts)


def compile_program(program, client=None, options: bytes = b""):
    """Compile a task's program (a ``programs.Program``) for ``client``.

    The executable comes from the disk cache when this program was compiled
    with the same options by the same plugin on this machine before; a cached
    executable the plugin refuses is recompiled.
    """
    from metagrad._src import runtime, setup_time

    client = client or runtime.get_client()
    with setup_time.phase("compile", program.name):
        inputs = [_runtime.ArraySpec(list(shape), dtype) for shape, dtype in program.inputs]
        entry = client_key(client, "executable", bytes(options), program.artifact)
        serialized = get("executables", entry)
        if serialized is not None:
            try:
                return client.deserialize(serialized, inputs, list(program.donated))
            except (_runtime.PjrtError, ValueError):
                pass
        executable = client.compile(program.artifact, "mlir", inputs, list(program.donated), bytes(options))
        try:
            put("executables", entry, executable.serialize())
        except _runtime.PjrtError:  # a plugin that cannot serialize: nothing to cache
            pass
        return executable
