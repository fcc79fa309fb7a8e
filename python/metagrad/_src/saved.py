"""Saved tasks: a directory of data that runs without the user's code.

Format (``MANIFEST_VERSION``; the C++ harness, ``cpp/bench/manifest.cc``,
reads the same)::

    manifest.json                format, version, steps, backend, versions,
                                 layout (leaf specs, phi, accumulators, pytree
                                 structures as JSON), programs, exports, arrays,
                                 and for a task over several devices its
                                 sharding: mesh, partitioner, device order and
                                 one PartitionSpec per leaf (as lists of axes)
    programs/<name>.mlirbc       portable StableHLO, one per program, with its
                                 signature (inputs, donation, outputs; per shard
                                 when sharded) in the manifest
    exports/<fn>.jaxexport       the forward functions (jax.export), from which
                                 new programs (other fused lengths) can be built
    arrays/{data,z}_<i>.bin      raw little-endian arrays, C order, whole (not
                                 per shard)

and for a task with streamed data (a ``Stream``) the manifest's ``stream``:
its index table (``arrays/stream_batches.bin``, int64 (T, B)) and one entry
per leaf of rows, ``{"file", "offset", "rows"}``. Rows that were in memory
are carried (``arrays/stream_rows_<i>.bin``); rows read from a file are
referenced by the file's absolute path, not copied: the task runs where that
file is, as it was when saved (its ``bytes`` and ``modified_ns``, checked
when the task is loaded).

Loading never executes anything from the directory: the manifest is JSON,
pytree structures are rebuilt from plain data (see ``trees``), every path
must stay inside the directory, and every error names the file (and field)
at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import numpy as np

from metagrad import _runtime
from metagrad._src import cache, lowering, programs as programs_lib, runtime, sharding as sharding_lib, streams, trees
from metagrad._src.layout import Layout

MANIFEST_VERSION = _runtime.MANIFEST_VERSION  # the constant the C++ reader checks too
FORMAT = "metagrad-task"


def write(compiled, path: str, exports: dict[str, bytes]) -> None:
    """Write the task into a new directory beside ``path``, then put it in ``path``'s place: a
    reader sees the old task or the new one (for an instant, none), never a mix of both; a
    killed save leaves the old one."""
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(final) and not os.path.isdir(final):
        raise ValueError(f"{path!r} is a file: save() writes a directory")
    staging = tempfile.mkdtemp(prefix=os.path.basename(final) + ".saving-", dir=parent)
    try:
        _write_into(compiled, staging, exports)
        if os.path.isdir(final):
            old = tempfile.mkdtemp(prefix=os.path.basename(final) + ".old-", dir=parent)
            os.replace(final, os.path.join(old, "task"))
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_into(compiled, path: str, exports: dict[str, bytes]) -> None:
    from jaxlib.mlir.dialects import stablehlo

    for folder in ("programs", "arrays", "exports"):
        os.makedirs(os.path.join(path, folder), exist_ok=True)

    def write(relative: str, data: bytes) -> str:
        with open(os.path.join(path, relative), "wb") as f:
            f.write(data)
        return relative

    program_entries = {name: {"file": write(f"programs/{name}.mlirbc", p.artifact), **p.to_json()}
                       for name, p in compiled.programs.items()}
    exports = {name: write(f"exports/{name}.jaxexport", blob) for name, blob in exports.items()}
    z_leaves = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(compiled.z_example)]
    arrays = {prefix: [write(f"arrays/{prefix}_{i}.bin", np.ascontiguousarray(leaf).tobytes())
                       for i, leaf in enumerate(leaves)]
              for prefix, leaves in (("data", compiled.data), ("z", z_leaves))}
    manifest = {
        "format": FORMAT, "version": MANIFEST_VERSION, "steps": compiled.steps, "backend": compiled.backend,
        "loop": compiled.loop,
        "versions": {**lowering.versions(),
                     "stablehlo_producer": stablehlo.get_current_version(),
                     "stablehlo_target": runtime.stablehlo_target(compiled.client)},
        "layout": compiled.layout.to_json(), "programs": program_entries, "exports": exports, "arrays": arrays,
    }
    if compiled.sharding is not None:
        manifest["sharding"] = {**compiled.sharding.to_json(), "devices": list(compiled.devices)}
    if compiled.stream is not None:
        manifest["stream"] = _stream_entry(compiled.stream, write)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def _stream_entry(stream, write) -> dict:
    rows = []
    for i, (leaf, source) in enumerate(zip(stream.leaves, stream.sources())):
        if isinstance(source, tuple):  # a file: referenced
            status = os.stat(source[0])
            rows.append({"file": os.path.abspath(source[0]), "offset": int(source[1]), "rows": int(source[2]),
                         "bytes": status.st_size, "modified_ns": status.st_mtime_ns})
        else:  # rows in memory: carried
            rows.append({"file": write(f"arrays/stream_rows_{i}.bin", np.ascontiguousarray(leaf).tobytes()),
                         "offset": 0, "rows": int(leaf.shape[0])})
    return {"rows": rows, "batches": write("arrays/stream_batches.bin", stream.batches.astype("<i8").tobytes())}


class _Reader:
    """Reads a task directory; every error names the file (and field) at fault."""

    def __init__(self, path: str):
        self.root = os.path.realpath(path)
        self.manifest_path = os.path.join(path, "manifest.json")

    def fail(self, where: str, why: str):
        raise ValueError(f"{where}: {why}")

    def inside(self, relative, field: str) -> str:
        """The path of ``relative`` (a manifest field) if it stays inside the directory."""
        if not isinstance(relative, str) or not relative or os.path.isabs(relative):
            self.fail(f"{self.manifest_path}: {field}", f"must be a relative path inside the task directory, got "
                                                         f"{relative!r}")
        full = os.path.realpath(os.path.join(self.root, relative))
        if os.path.commonpath([full, self.root]) != self.root:
            self.fail(f"{self.manifest_path}: {field}", f"{relative!r} points outside the task directory")
        return full

    def read(self, relative, field: str) -> bytes:
        full = self.inside(relative, field)
        try:
            with open(full, "rb") as f:
                return f.read()
        except OSError as error:
            self.fail(full, f"cannot be read ({error.strerror}); it is listed as {field} in {self.manifest_path}")

    def field(self, entry: dict, name: str, kind, where: str):
        if not isinstance(entry, dict) or name not in entry:
            self.fail(f"{self.manifest_path}: {where}", f"missing field '{name}'")
        value = entry[name]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{self.manifest_path}: {where}.{name}", f"must be {getattr(kind, '__name__', kind)}, got "
                                                               f"{type(value).__name__}")
        return value


def read(path: str, client) -> dict:
    """The parts of a saved task, as keyword arguments of ``CompiledTask`` (all but the client).

    ``client``: None for the default one (for a task over N devices, the
    default plugin's client with N CPU devices).
    """
    reader = _Reader(path)
    if not os.path.exists(reader.manifest_path):
        raise FileNotFoundError(f"{path!r} holds no manifest.json: not a saved metagrad task")
    try:
        with open(reader.manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{reader.manifest_path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        reader.fail(reader.manifest_path, "not a metagrad task manifest (format != 'metagrad-task')")
    if manifest.get("version") != MANIFEST_VERSION:
        reader.fail(reader.manifest_path, f"manifest version {manifest.get('version')!r}; this metagrad reads "
                                          f"version {MANIFEST_VERSION} (save the task again with this version)")
    steps = reader.field(manifest, "steps", int, "manifest")
    if not 1 <= steps <= 2**31 - 1:
        reader.fail(f"{reader.manifest_path}: steps", f"must be in [1, 2^31-1], got {steps}")
    backend = reader.field(manifest, "backend", str, "manifest")
    loop = manifest.get("loop", "unroll")
    if loop not in programs_lib.LOOPS:
        reader.fail(f"{reader.manifest_path}: loop", f"must be one of {programs_lib.LOOPS}, got {loop!r}")
    layout_entry = reader.field(manifest, "layout", dict, "manifest")
    try:
        layout = Layout.from_json(layout_entry)
        for name in ("z", "data", "state"):
            leaves = trees.check(layout_entry["trees"][name])
            if leaves != len(getattr(layout, name)):
                raise ValueError(f"trees.{name} holds {leaves} leaves for {len(getattr(layout, name))} specs")
        for spec in (*layout.z, *layout.data, *layout.state):
            np.dtype(spec.dtype)
    except (KeyError, TypeError, ValueError) as error:
        reader.fail(f"{reader.manifest_path}: layout", f"malformed ({type(error).__name__}: {error})")
    sharding, devices = None, (0,)
    if "sharding" in manifest:
        entry = reader.field(manifest, "sharding", dict, "manifest")
        try:
            sharding = sharding_lib.TaskSharding.from_json(entry)
            devices = tuple(int(d) for d in entry["devices"])
            if len(devices) != sharding.num_devices:
                raise ValueError(f"{len(devices)} devices for a mesh of {sharding.num_devices}")
            for what in ("state", "z", "data", "batch"):
                specs, leaves = getattr(sharding, what), getattr(layout, what)
                if len(specs) != len(leaves):
                    raise ValueError(f"{len(specs)} {what} specs for {len(leaves)} leaves")
                for spec, leaf in zip(specs, leaves):
                    _runtime.check_partition_spec(list(leaf.shape), [list(a) for a in spec], list(sharding.mesh),
                                                  leaf.path)
        except (KeyError, TypeError, ValueError) as error:
            reader.fail(f"{reader.manifest_path}: sharding", f"malformed ({type(error).__name__}: {error})")
    if client is None:
        cpu = not runtime.is_cuda_plugin(runtime.default_plugin_path())  # a CUDA client has all the GPUs
        client = runtime.get_client(cpu_device_count=max(devices) + 1 if sharding and cpu else None)
    if max(devices) >= len(client.devices):
        reader.fail(f"{reader.manifest_path}: sharding.devices",
                    f"the task runs on devices {list(devices)}, the client has {len(client.devices)} (for the CPU "
                    f"plugin: load(path, client=metagrad.runtime.get_client(cpu_device_count={max(devices) + 1})))")
    if sharding:
        sharding_lib.check_cpu_cores(client, len(devices))

    loaded = {}
    for name, entry in reader.field(manifest, "programs", dict, "manifest").items():
        where = f"programs.{name}"
        try:
            kind = programs_lib.KINDS[programs_lib.kind_of(name)[0]]
            expected_inputs, expected_donated, expected_outputs = programs_lib.signature(layout, name)
        except ValueError as error:
            reader.fail(f"{reader.manifest_path}: {where}", str(error))
        if sharding is not None:  # programs take shards
            in_specs, out_specs = sharding.program_specs(kind, layout, programs_lib.kind_of(name)[1])
            expected_inputs = [jax.ShapeDtypeStruct(sharding.shard_shape(s.shape, spec), s.dtype)
                               for s, spec in zip(expected_inputs, in_specs)]
            expected_outputs = [jax.ShapeDtypeStruct(sharding.shard_shape(s.shape, spec), s.dtype)
                                for s, spec in zip(expected_outputs, out_specs)]
        artifact = reader.read(reader.field(entry, "file", str, where), f"{where}.file")
        try:
            program = programs_lib.Program.from_json(name, entry, artifact)
        except (KeyError, TypeError, ValueError) as error:
            reader.fail(f"{reader.manifest_path}: {where}", f"malformed ({type(error).__name__}: {error})")
        wanted = tuple((tuple(s.shape), np.dtype(s.dtype).name) for s in expected_inputs)
        if program.inputs != wanted or program.donated != expected_donated:
            reader.fail(f"{reader.manifest_path}: {where}.inputs", "do not match the layout's signature for "
                                                                   f"{name}: {list(program.inputs)} vs {list(wanted)}")
        wanted = tuple((tuple(s.shape), np.dtype(s.dtype).name) for s in expected_outputs)
        if program.outputs != wanted:
            reader.fail(f"{reader.manifest_path}: {where}.outputs", "do not match the layout's signature for "
                                                                    f"{name}: {list(program.outputs)} vs {list(wanted)}")
        loaded[name] = program
    exports = {name: reader.read(file, f"exports.{name}")
               for name, file in reader.field(manifest, "exports", dict, "manifest").items()}

    def arrays(prefix: str, specs) -> list[np.ndarray]:
        files = reader.field(reader.field(manifest, "arrays", dict, "manifest"), prefix, list, "arrays")
        if len(files) != len(specs):
            reader.fail(f"{reader.manifest_path}: arrays.{prefix}", f"lists {len(files)} files for {len(specs)} leaves")
        out = []
        for i, (file, spec) in enumerate(zip(files, specs)):
            raw = reader.read(file, f"arrays.{prefix}[{i}]")
            if len(raw) != spec.nbytes:
                reader.fail(reader.inside(file, f"arrays.{prefix}[{i}]"),
                            f"holds {len(raw)} bytes, {spec.path} ({spec.dtype}{list(spec.shape)}) needs {spec.nbytes}")
            out.append(np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape).copy())
        return out

    data = arrays("data", layout.data)
    z_leaves = arrays("z", layout.z)
    stream = None
    if "stream" in manifest:
        stream = _read_stream(reader, reader.field(manifest, "stream", dict, "manifest"), layout, steps)
    elif layout.batch:
        reader.fail(f"{reader.manifest_path}: layout.batch", "the programs take streamed batches, but the manifest "
                                                             "has no stream")
    executables = {}
    options = sharding_lib.compile_options(client, sharding, devices)
    for name, program in loaded.items():
        try:
            executables[name] = cache.compile_program(program, client, options)
        except (runtime.PjrtError, ValueError) as error:
            reader.fail(reader.inside(manifest["programs"][name]["file"], f"programs.{name}.file"),
                        f"does not compile as program {name}: {error}")
        # The artifact itself, not only its manifest entry: another program's file in its place
        # compiles, and would fail (or compute something else) only when it runs.
        made = tuple((tuple(s.shape), s.dtype) for s in executables[name].outputs)
        if made != program.outputs:
            reader.fail(reader.inside(manifest["programs"][name]["file"], f"programs.{name}.file"),
                        f"is not program {name}: it returns {list(made)}, {name} returns {list(program.outputs)}")
    return {"layout": layout, "steps": steps, "backend": backend, "loop": loop, "exports": exports, "programs": loaded,
            "data": data, "z_example": layout.unflatten("z", z_leaves), "sharding": sharding, "devices": devices,
            "client": client, "executables": executables, "stream": stream}


def _read_stream(reader: _Reader, entry: dict, layout: Layout, steps: int):
    """The saved task's Stream: every leaf of rows read from its file (inside the directory, or a
    referenced file named by its absolute path)."""
    where = "stream"
    row_specs = layout.batch[:-1]  # the last leaf of a batch is its rows' index
    rows = reader.field(entry, "rows", list, where)
    if len(rows) != len(row_specs) or not row_specs:
        reader.fail(f"{reader.manifest_path}: {where}.rows", f"lists {len(rows)} leaves, layout.batch "
                                                             f"{len(row_specs)}")
    leaves = []
    for i, (row, spec) in enumerate(zip(rows, row_specs)):
        field = f"{where}.rows[{i}]"
        file = reader.field(row, "file", str, field)
        full = file if os.path.isabs(file) else reader.inside(file, f"{field}.file")
        offset, count = reader.field(row, "offset", int, field), reader.field(row, "rows", int, field)
        if "modified_ns" in row and os.path.exists(full):
            status = os.stat(full)
            if (status.st_size, status.st_mtime_ns) != (row.get("bytes"), row["modified_ns"]):
                reader.fail(full, f"changed after the task was saved ({row.get('bytes')} bytes then, "
                                  f"{status.st_size} now, or written to since): the task's rows may differ; save the "
                                  f"task again (it is listed as {field}.file in {reader.manifest_path})")
        try:
            leaves.append(np.memmap(full, dtype=spec.dtype, mode="r", offset=offset, shape=(count, *spec.shape[1:])))
        except (OSError, ValueError) as error:
            reader.fail(full, f"cannot be read as {count} rows of {spec.dtype}{list(spec.shape[1:])} from byte "
                              f"{offset} ({error}); it is listed as {field}.file in {reader.manifest_path}")
    batch = layout.batch[-1].shape[0]
    raw = reader.read(reader.field(entry, "batches", str, where), f"{where}.batches")
    if len(raw) != steps * batch * 8:
        reader.fail(reader.inside(entry["batches"], f"{where}.batches"),
                    f"holds {len(raw)} bytes, the index table of {steps} steps of {batch} rows needs {steps * batch * 8}")
    try:
        return streams.Stream(leaves, np.frombuffer(raw, "<i8").reshape(steps, batch))
    except (TypeError, ValueError) as error:
        reader.fail(f"{reader.manifest_path}: {where}", str(error))
