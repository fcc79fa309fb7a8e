"""Training data that stays in host memory or on disk, streamed one batch per step.

A :class:`Stream` in a task's ``data`` holds rows (numpy arrays, or files
mapped with ``np.memmap``) and a ``(T, B)`` table of the rows each step
reads. The device never holds the rows: the runtime gathers each step's
batch on the host, in the order the checkpointing plan runs the steps
(replays included), and copies it to the device ahead of use
(``cpp/runtime/batch_stream.h``). ``step`` sees a :class:`Batch`; ``init``
and ``output`` see the resident leaves only.
"""

from __future__ import annotations

import mmap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class Batch(NamedTuple):
    """What ``step(state, z, data, t)`` sees in place of a :class:`Stream`: the
    rows step t reads (the stream's ``rows`` pytree, each leaf ``(B, ...)``) and
    their row numbers ``index`` (int32 ``(B,)``), to gather per-example
    metaparameters such as ``z["weights"][batch.index]`` on the device."""

    rows: PyTree
    index: jax.Array


class Stream:
    """Rows of training data kept on the host, read one batch per step.

    Args:
      rows: a pytree of arrays sharing their leading dimension N (the
        examples); numpy arrays or ``np.memmap`` files, read in place (a
        C-contiguous array of the dtype the task computes in is never copied).
      batches: an integer array ``(T, B)``: step t reads rows ``batches[t]``.
        T is the task's number of steps. A fixed table makes every replay read
        what the first pass read.

    Put it anywhere in the task's ``data``; ``step`` sees it as a :class:`Batch`.
    """

    def __init__(self, rows: PyTree, batches):
        leaves, self.treedef = jax.tree_util.tree_flatten(rows)
        if not leaves:
            raise ValueError("Stream(rows, batches): rows holds no arrays")
        self.rows = rows
        self.leaves = [_row_array(leaf, path) for leaf, path in zip(leaves, _paths(rows))]
        counts = {leaf.shape[0] for leaf in self.leaves}
        if len(counts) != 1:
            raise ValueError(f"Stream rows must share their leading dimension (the examples), got "
                             f"{[leaf.shape[0] for leaf in self.leaves]}")
        self.num_rows = counts.pop()
        index = np.asarray(batches)
        if index.ndim != 2 or not np.issubdtype(index.dtype, np.integer) or index.shape[0] < 1 or index.shape[1] < 1:
            raise ValueError(f"Stream batches must be an integer array (T, B) of row numbers, got "
                             f"{index.dtype}{list(index.shape)}")
        if index.size and (index.min() < 0 or index.max() >= self.num_rows):
            step = int(np.argwhere((index < 0) | (index >= self.num_rows))[0][0])
            raise ValueError(f"Stream batches: step {step} reads rows {index[step].tolist()[:8]}..., outside the "
                             f"{self.num_rows} rows (0..{self.num_rows - 1})")
        self.batches = np.ascontiguousarray(index, dtype=np.int64)

    @property
    def steps(self) -> int:
        return int(self.batches.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.batches.shape[1])

    def __repr__(self) -> str:
        return f"Stream({self.num_rows} rows, {self.steps} steps of {self.batch_size})"

    def sources(self) -> list:
        """Each leaf as the runtime reads it: a file mapped with ``np.memmap`` (``np.load(..., mmap_mode="r")``)
        as ``(path, byte offset, rows)``, read with pread and watched for changes; other arrays as their
        rows' bytes in memory, ``uint8 (N, bytes per row)``."""
        return [_file_rows(leaf) or leaf.reshape(leaf.shape[0], -1).view(np.uint8) for leaf in self.leaves]

    def described(self) -> list:
        """Where each leaf is read from (a file's path or memory) and its row's bytes: what the
        cost of streaming a batch depends on, besides its shape."""
        return [[source[0] if isinstance(source, tuple) else "memory", leaf[0].nbytes]
                for source, leaf in zip(self.sources(), self.leaves)]

    def batch_structs(self) -> Batch:
        """The abstract batch of one step."""
        rows = [jax.ShapeDtypeStruct((self.batch_size, *leaf.shape[1:]), leaf.dtype) for leaf in self.leaves]
        return Batch(jax.tree_util.tree_unflatten(self.treedef, rows),
                     jax.ShapeDtypeStruct((self.batch_size,), jnp.int32))

    def batch_of(self, t: int) -> Batch:
        """Step t's batch, read on the host (for tests and for computing it without metagrad)."""
        index = self.batches[t]
        return Batch(jax.tree_util.tree_unflatten(self.treedef, [leaf[index] for leaf in self.leaves]),
                     index.astype(np.int32))


class _StreamedElsewhere:
    """What ``init`` and ``output`` see in place of a Stream: reading it is an error."""

    def __init__(self, path: str):
        self._path = path

    def _refuse(self, *_):
        raise TypeError(f"{self._path} is a metagrad.Stream: only step(state, z, data, t) reads it, as the "
                        f"metagrad.Batch of step t. Keep what init and output read (a validation set) as plain "
                        f"arrays in data.")

    def __getattr__(self, name):
        if name.startswith("__"):  # protocols probed by hasattr
            raise AttributeError(name)
        self._refuse()

    __getitem__ = __iter__ = __len__ = __array__ = _refuse


# Neither holds arrays the task's programs take as data: the rows stay on the host.
for _node in (Stream, _StreamedElsewhere):
    jax.tree_util.register_pytree_node(_node, lambda node: ((), node), lambda node, _: node)


def _paths(tree) -> list[str]:
    return ["rows" + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _row_array(leaf, path: str) -> np.ndarray:
    array = leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)
    if array.ndim < 1:
        raise ValueError(f"Stream {path} is a scalar: rows need a leading dimension (the examples)")
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(array.dtype))
    if dtype != array.dtype:
        raise TypeError(f"Stream {path} is {array.dtype.name}, which JAX computes as {dtype.name}: store the rows as "
                        f"{dtype.name} (streamed rows are read in place, never converted)")
    if not array.flags.c_contiguous:
        raise ValueError(f"Stream {path} is not C-contiguous: streamed rows are read in place "
                         f"(np.ascontiguousarray copies it)")
    return array


def _file_rows(leaf: np.ndarray) -> tuple[str, int, int] | None:
    mapping = getattr(leaf, "_mmap", None)
    if not isinstance(leaf, np.memmap) or not getattr(leaf, "filename", None) or mapping is None:
        return None
    # np.memmap maps from the allocation boundary below its offset; slices keep the parent's offset.
    start = leaf.offset - leaf.offset % mmap.ALLOCATIONGRANULARITY
    return str(leaf.filename), start + leaf.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data, leaf.shape[0]


def find(data: PyTree) -> tuple[str, Stream] | None:
    """The path and Stream of ``data``'s stream; None without one. ValueError for more than one."""
    found = [(jax.tree_util.keystr(path), node) for path, node in
             jax.tree_util.tree_flatten_with_path(data, is_leaf=lambda x: isinstance(x, Stream))[0]
             if isinstance(node, Stream)]
    if len(found) > 1:
        raise ValueError(f"data holds {len(found)} Streams ({', '.join('data' + p for p, _ in found)}): put every "
                         f"streamed array into one metagrad.Stream (its rows may be a pytree)")
    return found[0] if found else None


def replace(data: PyTree, value) -> PyTree:
    """``data`` with its Stream replaced by ``value``."""
    return jax.tree_util.tree_map(lambda node: value if isinstance(node, Stream) else node, data,
                                  is_leaf=lambda x: isinstance(x, Stream))


def unreadable(data: PyTree, path: str) -> PyTree:
    """``data`` as init and output see it."""
    return replace(data, _StreamedElsewhere("data" + path))
