"""Atomic checkpoints of pytrees in ``.npz`` files.

A checkpoint is one ``.npz``: the tree's leaves (``leaf_0``, ``leaf_1``, ...) and a JSON
``meta`` record (a format tag, the tree's structure and leaf shapes, and whatever the caller
adds: a configuration that a resumed run must match). It is written to a temporary file in
the same folder and moved into place with ``os.replace``, so a reader -- or a run killed
while writing -- never sees a partial file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import jax
import numpy as np

from .._errors import EstimaxError


class CheckpointError(EstimaxError, ValueError):
    """A checkpoint that cannot be read, or was written for another run."""


def save_npz_atomically(path: str, arrays: dict) -> None:
    """Write ``arrays`` to ``path`` in one step (temporary file, fsync, ``os.replace``).
    Raises ``OSError`` when the folder cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _structure(tree) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {"tree": str(treedef), "leaves": [[list(np.shape(x)), str(np.asarray(x).dtype)] for x in leaves]}


def save_tree(path: str, tree, meta: dict, *, format: str) -> None:
    """Save ``tree`` (a pytree of arrays) and ``meta`` (JSON-able) to ``path`` atomically."""
    leaves = jax.tree_util.tree_leaves(tree)
    record = dict(meta, format=format, structure=_structure(tree))
    arrays = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(leaves)}
    arrays["meta"] = np.asarray(json.dumps(record))
    save_npz_atomically(path, arrays)


def load_tree(path: str, template, meta: dict, *, format: str) -> tuple[Any, dict]:
    """The tree saved at ``path``, shaped like ``template``; refused with a
    :class:`CheckpointError` naming what differs when the file has another format, another
    structure, or a ``meta`` entry that differs from ``meta``'s."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        record = json.loads(str(arrays["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the checkpoint {path}: {e}") from None
    if not isinstance(record, dict) or record.get("format") != format:
        raise CheckpointError(f"{path} is not a {format} checkpoint (it is {record.get('format') if isinstance(record, dict) else '?'!r}).")
    for k, v in meta.items():
        if record.get(k) != v:
            raise CheckpointError(f"{path} was written for another run: its {k} is {record.get(k)!r}, this run's is {v!r}. "
                                  "Delete it (or pass another path) to start over.")
    if record.get("structure") != _structure(template):
        raise CheckpointError(f"{path} holds a state of another structure than this run's (other parameters, "
                              "solver or options). Delete it (or pass another path) to start over.")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    try:
        loaded = [np.asarray(arrays[f"leaf_{i}"]).astype(np.asarray(t).dtype) for i, t in enumerate(leaves)]
    except KeyError as e:
        raise CheckpointError(f"{path} is damaged: {e} is missing.") from None
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in loaded]), record
