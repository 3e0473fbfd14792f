"""Data parallelism over the batch axis: a 1-D device mesh and helpers to place batches on it.

Generation and the image metrics run data-parallel the same way: the parameters are replicated on
every device of a :func:`batch_mesh`, each batch of inputs is padded to a multiple of the device
count and split along axis 0 (:func:`shard_batch`), and the jitted function runs once on the
global batch; XLA partitions it (GSPMD), so the code that computes one image is the code of the
single-device path. With one device every helper is a plain ``device_put``.

Padding repeats the last row (never zeros), so padded rows are valid inputs for any model (no
division by a zero norm); callers drop them with ``[:n]``.

Test on a CPU machine with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before
jax initializes, so in a fresh process).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``"batch"`` over ``devices`` (default: every local device, in id order)."""
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("batch_mesh needs at least one device")
  return Mesh(np.asarray(devices, dtype=object), (BATCH_AXIS,))


def single_device_mesh() -> Mesh:
  """The mesh of the first local device only (data parallelism off)."""
  return batch_mesh(jax.local_devices()[:1])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Axis 0 split over the mesh, the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def padded_size(n: int, mesh: Mesh) -> int:
  """``n`` rounded up to a multiple of the mesh's device count (at least one row per device)."""
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"batch size must be an int >= 0, got {n!r}")
  d = mesh.size
  return max(d, -(-int(n) // d) * d)


def pad_rows(x: Any, size: int) -> np.ndarray:
  """``x [n, ...]`` padded to ``[size, ...]`` by repeating its last row (numpy, on the host)."""
  x = np.asarray(x)
  n = x.shape[0] if x.ndim else 0
  if x.ndim == 0 or n == 0:
    raise ValueError(f"cannot pad an empty batch (shape {x.shape})")
  if n > size:
    raise ValueError(f"batch of {n} rows is larger than the padded size {size}")
  if n == size:
    return x
  return np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])


def shard_batch(x: Any, mesh: Mesh, size: int | None = None) -> jax.Array:
  """``x [n, ...]`` padded to ``size`` rows (default :func:`padded_size`) and split over the mesh.

  Args:
    x: a host array (numpy or anything ``np.asarray`` takes) with the batch on axis 0.
    mesh: from :func:`batch_mesh`.
    size: the padded row count, a multiple of the device count (fixed across the batches of a
      loop so that one shape compiles once).

  Returns:
    A ``jax.Array`` of shape ``[size, ...]`` with ``NamedSharding(mesh, P("batch"))``.
  """
  x = np.asarray(x)
  size = padded_size(x.shape[0], mesh) if size is None else size
  if size % mesh.size:
    raise ValueError(f"padded batch size {size} is not a multiple of the {mesh.size} devices of the mesh")
  return jax.device_put(pad_rows(x, size), batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array leaf of ``tree`` copied onto every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def map_batches(fn: Callable[..., Any], arrays: Sequence[Any], mesh: Mesh, batch_size: int,
                *, replicated_args: Sequence[Any] = ()) -> np.ndarray:
  """``fn(*replicated_args, *batch)`` over rows of ``arrays`` in sharded batches; outputs concatenated.

  Every call has the same padded shape (``batch_size`` rounded up to the device count), so a
  jitted ``fn`` compiles once; padded rows are dropped.

  Args:
    fn: jitted, maps arrays ``[b, ...]`` (same b) to one array ``[b, ...]``.
    arrays: host arrays with the same length on axis 0.
    mesh: from :func:`batch_mesh`.
    batch_size: rows per call over all devices (before rounding up).
    replicated_args: leading arguments already placed with :func:`replicate` (e.g. parameters).

  Returns:
    numpy ``[n, ...]``.
  """
  arrays = [np.asarray(a) for a in arrays]
  if not arrays:
    raise ValueError("map_batches needs at least one array")
  n = arrays[0].shape[0]
  if any(a.shape[0] != n for a in arrays):
    raise ValueError(f"arrays have different lengths {[a.shape[0] for a in arrays]}")
  if n == 0:
    raise ValueError("map_batches got empty arrays")
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  size = padded_size(min(int(batch_size), n), mesh)
  out = []
  for start in range(0, n, size):
    chunk = [shard_batch(a[start:start + size], mesh, size) for a in arrays]
    m = min(size, n - start)
    out.append(np.asarray(fn(*replicated_args, *chunk))[:m])
  return np.concatenate(out)


__all__ = ["BATCH_AXIS", "batch_mesh", "batch_sharding", "map_batches", "pad_rows", "padded_size", "replicate",
           "replicated", "shard_batch", "single_device_mesh"]
