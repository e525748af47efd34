"""Particles and data over a device mesh, through XLA's SPMD partitioner.

Nothing here runs a program: it builds meshes and places arrays. The partitioning itself is
JAX's: under a mesh (``jax.set_mesh``, or ``ex.fit(devices=...)``) the outermost ``ex.vmap``
whose lane count the mesh divides constrains its lanes to be split over the mesh's first
axis (``dsl._primitives.vmap``), data placed with :func:`shard_batch` is split along its
leading (batch) axis, and XLA propagates the partitioning through the estimator and inserts
the reductions. Results equal the one-device results up to the order of floating-point
sums; random draws are the same, since each lane's key derives from its lane index.

Multi-host: after ``jax.distributed.initialize(...)`` in every process, ``jax.devices()``
lists all processes' devices and :func:`device_mesh` spans them; :func:`shard_batch` then
reads each process's argument as *its own part* of the batch (``jax.make_array_from_process_
local_data``), and replicated arguments must be equal in every process.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import numpy as np

from .._errors import ProgramError
from . import _jax_compat as compat

AXIS = "devices"


def device_mesh(devices=None, *, axis: str = AXIS) -> jax.sharding.Mesh:
    """A one-axis mesh: ``devices`` is ``None`` or ``"all"`` (all of ``jax.devices()``, across
    processes after ``jax.distributed.initialize``), a count (the first ``n``), a list of
    devices, or a mesh (returned as it is)."""
    if isinstance(devices, jax.sharding.Mesh):
        return devices
    available = jax.devices()
    if devices is None or (isinstance(devices, str) and devices == "all"):
        chosen = available
    elif isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        n = int(devices)
        if n < 1:
            raise ProgramError(f"devices={n}: the number of devices must be at least 1.")
        if n > len(available):
            raise ProgramError(
                f"devices={n}, but JAX sees {len(available)} device(s) ({available[0].platform}). On CPU, "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX is imported.")
        chosen = available[:n]
    elif isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device) for d in devices):
        chosen = list(devices)
    else:
        raise ProgramError(f"devices must be \"all\", a device count, a list of devices or a jax.sharding.Mesh; "
                           f"got {devices!r}.")
    return compat.make_mesh(chosen, axis)


def _global(x, sharding, local_batch: bool):
    """``x`` as a global array with ``sharding``; with ``local_batch`` (multi-process) ``x`` is
    this process's part of the batch."""
    if local_batch and jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x  # already global
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # keys: by their data
        data = _global(jax.random.key_data(x), jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()), False)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh: jax.sharding.Mesh):
    """Every array of ``tree`` on every device of ``mesh``."""
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: _global(x, sharding, False) if _is_array(x) else x, tree)


def shard_batch(tree, mesh: jax.sharding.Mesh, *, what: str = "data"):
    """Every array of ``tree`` split along its leading (batch) axis over ``mesh``'s first
    axis. With several processes, each process passes its own part of the batch."""
    axis = mesh.axis_names[0]
    count = dict(mesh.shape)[axis]
    local = count // max(jax.process_count(), 1) if jax.process_count() > 1 else count
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))

    def one(path, x):
        if not _is_array(x):
            return x
        shape = np.shape(x)
        name = what + jax.tree_util.keystr(path)
        if not shape or shape[0] % local:
            raise ProgramError(
                f"{name} has shape {tuple(shape)}: its leading (batch) axis must be a multiple of the "
                f"{local} device(s) it is split over. Pad or trim the batch, or leave it out of shard_data.")
        return _global(x, sharding, True)

    return jax.tree_util.tree_map_with_path(one, tree)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, numbers.Number)) and not isinstance(x, bool)


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``; for a replicated array of several processes, this process's copy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils  # optional: only with several processes

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
