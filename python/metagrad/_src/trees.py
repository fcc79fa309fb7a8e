"""Pytree structure as plain JSON data, and back, without running any code.

A saved task records the structure of its z, data and state so that a
process that never imported the user's code can hand back results of the
same shape. Standard containers (tuple, list, dict, None) come back as
themselves; named tuples and every other node type (dataclasses, Flax
structs, Equinox modules, Optax states...) come back as named tuples of
their fields (attribute names where the node has them), built on the fly,
never by importing the type: a task directory cannot make a process run its
code. Leaves stay in order, so ``jax.tree_util.tree_leaves`` of a rebuilt
tree equals that of the original.
"""

from __future__ import annotations

import collections
import functools
import keyword
from typing import Any

import jax

PyTree = Any

_KIND = {tuple: "tuple", list: "list", dict: "dict", type(None): "none"}


def _key_name(key) -> Any:
    for attribute in ("name", "key", "idx"):
        if hasattr(key, attribute):
            value = getattr(key, attribute)
            return value if isinstance(value, (str, int)) else str(value)
    return str(key)


def _children(node) -> list:
    """One level of ``node``: [(key, child)] with keys from jax's key paths."""
    return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


def _is_leaf(node) -> bool:
    return jax.tree_util.all_leaves([node])


def encode(tree: PyTree) -> dict:
    """The structure of ``tree`` as JSON data (leaves are ``{"kind": "leaf"}``)."""
    if _is_leaf(tree):
        return {"kind": "leaf"}
    node_type = type(tree)
    children = _children(tree)
    entry: dict = {"kind": _KIND.get(node_type, "node"), "children": [encode(child) for _, child in children]}
    if entry["kind"] == "dict":
        keys = [key for key, _ in ((_key_name(path[0]), c) for path, c in children)]
        if not all(isinstance(key, (str, int)) for key in keys):
            raise TypeError(f"dict keys must be str or int to save a task, got {keys!r}")
        entry["keys"] = keys
    elif entry["kind"] == "node":
        entry["type"] = f"{node_type.__module__}.{node_type.__qualname__}"
        entry["fields"] = [_key_name(path[0]) for path, _ in children]
    if entry["kind"] == "none":
        entry.pop("children")
    return entry


@functools.lru_cache(maxsize=None)
def _record(type_name: str, fields: tuple) -> type:
    """A named tuple standing in for a node type that is not imported."""
    names = [f if isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f) and not f.startswith("_")
             else f"field{i}" for i, f in enumerate(fields)]
    if len(set(names)) != len(names):
        names = [f"field{i}" for i in range(len(fields))]
    module, _, name = type_name.rpartition(".")
    cls = collections.namedtuple(name if name.isidentifier() else "Node", names)
    cls.__module__ = module or "metagrad.trees"
    cls.__doc__ = f"Stands in for {type_name} (rebuilt from a saved task without importing it)."
    return cls


def rebuild(entry: dict, leaves: list) -> PyTree:
    """The tree ``entry`` describes, with ``leaves`` in order (see the module docstring)."""
    it = iter(leaves)

    def build(node):
        kind = node.get("kind")
        if kind == "leaf":
            return next(it)
        if kind == "none":
            return None
        children = [build(child) for child in node["children"]]
        if kind == "tuple":
            return tuple(children)
        if kind == "list":
            return children
        if kind == "dict":
            return dict(zip(node["keys"], children))
        if kind == "node":
            return _record(node["type"], tuple(node["fields"]))(*children)
        raise ValueError(f"unknown pytree node kind {kind!r}")

    tree = build(entry)
    if next(it, None) is not None:
        raise ValueError("more leaves than the tree structure holds")
    return tree


def check(entry) -> int:
    """Validate an encoded tree read from a file; returns its number of leaves."""
    if not isinstance(entry, dict):
        raise ValueError(f"a tree node must be an object, got {type(entry).__name__}")
    kind = entry.get("kind")
    if kind == "leaf":
        return 1
    if kind == "none":
        return 0
    children = entry.get("children")
    if kind not in ("tuple", "list", "dict", "node") or not isinstance(children, list):
        raise ValueError(f"unknown tree node {dict((k, v) for k, v in entry.items() if k != 'children')!r}")
    if kind == "dict" and (not isinstance(entry.get("keys"), list) or len(entry["keys"]) != len(children)):
        raise ValueError("a dict node needs one key per child")
    if kind == "node" and (not isinstance(entry.get("type"), str) or not isinstance(entry.get("fields"), list)
                           or len(entry["fields"]) != len(children)):
        raise ValueError("a node needs a type name and one field per child")
    return sum(check(child) for child in children)


def leaf_paths(tree: PyTree, prefix: str) -> list[str]:
    """``prefix + keystr(path)`` of every leaf: the structure a value must match."""
    return [prefix + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
