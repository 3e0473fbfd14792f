"""Data parallelism over the batch axis: a 1-D device mesh and helpers to place batches on it.

Generation and the image metrics run data-parallel the same way: the parameters are replicated on
every device of a :func:`batch_mesh`, each batch of inputs is padded to a multiple of the device
count and split along axis 0 (:func:`shard_batch`), and the jitted function runs once on the
global batch; XLA partitions it (GSPMD), so the code that computes one image is the code of the
single-device path. With one device every helper is a plain ``device_put``.

Padding repeats the last row (never zeros), so padded rows are valid inputs for any model (no
division by a zero norm); callers drop them with ``[:n]``.

PTQ calibration runs data-parallel over the samples instead (:func:`shard_samples`,
:func:`map_samples`): the sample count must divide evenly over the devices (no padding, so that
no padded sample can enter a loss sum, an activation maximum or a Hessian), and per-sample
results are gathered before they are summed, in the order of the single-device path.

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


def global_batch_mesh() -> Mesh:
  """A 1-D ``"batch"`` mesh over every device of every process (after ``jax.distributed.initialize``;
  with one process the same as :func:`batch_mesh`)."""
  return batch_mesh(jax.devices())


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
  """Every array leaf of ``tree`` copied onto every device of the mesh (over several processes:
  each process passes the same values and fills its own devices)."""
  if not mesh.is_multi_process:
    return jax.device_put(tree, replicated(mesh))
  return _from_host(tree, replicated(mesh))


def _from_host(tree: Any, sharding: NamedSharding) -> Any:
  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree_util.tree_map(place, tree)


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


# ----------------------------------------------------------------------------- calibration samples
def shard_samples(tree: Any, mesh: Mesh, what: str = "calibration state") -> Any:
  """Every leaf ``[S, ...]`` of ``tree`` split along axis 0 over ``mesh`` (S / devices samples each).

  Args:
    tree: arrays (device or host) sharing the sample count S on axis 0; with several processes
      every process passes the same full values (each keeps only its devices' rows).
    mesh: from :func:`batch_mesh` or :func:`global_batch_mesh`.
    what: names the tree in errors.

  Raises:
    ValueError: leaves without a common leading axis, or S not a multiple of the device count
      (padding is refused: padded samples would enter sums, maxima and Hessians).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  sizes = sorted({np.shape(x)[0] if np.ndim(x) else -1 for x in leaves})
  if not leaves or len(sizes) != 1 or sizes[0] < 1:
    raise ValueError(f"{what}: every array needs the same sample count on axis 0, got shapes "
                     f"{[np.shape(x) for x in leaves]}")
  s = sizes[0]
  if s % mesh.size:
    raise ValueError(f"{what}: {s} samples do not split evenly over {mesh.size} devices; use a sample count that "
                     f"is a multiple of {mesh.size} (calib.num_samples) or turn data parallelism off "
                     "(calib.data_parallel=False)")
  if not mesh.is_multi_process:
    return jax.device_put(tree, batch_sharding(mesh))
  return _from_host(tree, batch_sharding(mesh))


def per_device(fn: Callable[..., Any], xs: Any, mesh: Mesh, *, gather: bool = False) -> Any:
  """``fn(xs)`` with every leaf of ``xs`` split along axis 0 over ``mesh`` and ``fn`` run on each
  device's rows (``shard_map``; ``fn`` may close over replicated values). Outputs stay split, or
  with ``gather`` are gathered in row order onto every device. Call inside ``jit``."""
  spec = PartitionSpec(BATCH_AXIS)

  def local(part):
    out = fn(part)
    if gather:
      out = jax.tree_util.tree_map(lambda a: jax.lax.all_gather(a, BATCH_AXIS, tiled=True), out)
    return out
  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=PartitionSpec() if gather else spec,
                       check_vma=False)(xs)


def map_samples(body: Callable[[Any], Any], xs: Any, mesh: Mesh | None, batch_size: int,
                *, gather: bool = False) -> Any:
  """``jax.lax.map(body, xs, batch_size=batch_size)`` over samples ``[S, ...]``, data-parallel on ``mesh``.

  Call inside ``jit``. With a mesh of more than one device every device maps ``body`` over its own
  S / devices samples in batches of ``batch_size`` (:func:`per_device`: the per-device program is
  the single-device one); outputs stay split over the mesh, or with ``gather`` are gathered in
  sample order onto every device, so that a following sum adds the same numbers in the same order
  as on one device. ``body`` may close over replicated values (parameters, candidate weights).
  """
  if mesh is None or mesh.size == 1:
    return jax.lax.map(body, xs, batch_size=batch_size)
  return per_device(lambda part: jax.lax.map(body, part, batch_size=batch_size), xs, mesh, gather=gather)


def gather_replicated(tree: Any, mesh: Mesh) -> Any:
  """Every leaf of ``tree`` (split or not) whole on every device of ``mesh``; works across processes."""
  return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def to_host(x: Any) -> np.ndarray:
  """``x`` as a numpy array on this host, gathering the rows other processes hold when needed."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def is_main_process() -> bool:
  """True on process 0 (the one that writes files in a multi-process run)."""
  return jax.process_index() == 0


__all__ = ["BATCH_AXIS", "batch_mesh", "batch_sharding", "gather_replicated", "global_batch_mesh", "is_main_process",
           "map_batches", "map_samples", "per_device", "pad_rows", "padded_size", "replicate", "replicated", "shard_batch", "shard_samples",
           "single_device_mesh", "to_host"]
