"""Typed PRNG keys (``jax.random.key``) in a task's state or data.

A key array has an extended dtype (``key<fry>``) that numpy, the manifest,
the runtime and the C++ harness do not know. At the flat program boundary a
key leaf is therefore carried as its ``jax.random.key_data`` (uint32, shape
``key.shape + impl.key_shape``) and re-wrapped with
``jax.random.wrap_key_data`` inside each program, so the user's functions see
keys and everything else sees integers, which are never differentiated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_key(leaf) -> bool:
    """Whether an array (or ShapeDtypeStruct) holds typed PRNG keys."""
    return jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def impl_name(leaf) -> str:
    """The PRNG implementation of a key array or ShapeDtypeStruct (``"threefry2x32"``, ``"rbg"``...)."""
    data = jax.eval_shape(jax.random.key_data, leaf)
    return str(jax.random.key_impl(jax.random.wrap_key_data(np.zeros(data.shape, data.dtype), dtype=leaf.dtype)))


def carried(leaf):
    """A leaf as programs carry it: its key data if it holds keys, else itself.

    Works on arrays, tracers and ShapeDtypeStructs.
    """
    if not is_key(leaf):
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.eval_shape(jax.random.key_data, leaf)
    return jax.random.key_data(leaf)


def wrap(array, impl: str | None):
    """The inverse of :func:`carried` for a leaf whose spec records ``impl`` (None: not a key)."""
    return array if impl is None else jax.random.wrap_key_data(array, impl=impl)


def key_shape(data_shape: tuple[int, ...], impl: str) -> tuple[int, ...]:
    """Shape of the key array whose key data has ``data_shape``."""
    trailing = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).ndim
    return tuple(data_shape[:len(data_shape) - trailing])
