"""Nested-dict parameter trees: ``"a/b/c"`` paths, and validation against an abstract tree.

Flax params are nested dicts; checkpoints, quantized layers and error messages address leaves by
their ``/``-joined path (``"transformer_blocks_3/attn/to_qkv/kernel"``).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from svdquant_jax.utils.safetensors_io import CheckpointError

MAX_LISTED = 12


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested dict -> ``{"a/b/c": leaf}``."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    path = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, path))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{"a/b/c": leaf}`` -> nested dict."""
  out: dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def listing(items: Iterable[str]) -> str:
  items = sorted(items)
  shown = ", ".join(items[:MAX_LISTED])
  return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def validate_tree(params: Mapping[str, Any], abstract: Mapping[str, Any], what: str = "params",
                  check_dtype: bool = True) -> None:
  """Checks that ``params`` has exactly the paths, shapes (and dtypes) of ``abstract``.

  Args:
    params: nested dict of arrays.
    abstract: nested dict of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape(init)``).
    what: a name for the tree in the error message.
    check_dtype: also require equal dtypes.

  Raises:
    CheckpointError: naming every missing, unexpected and misshaped leaf.
  """
  got, want = flatten(params), flatten(abstract)
  problems = []
  missing = set(want) - set(got)
  extra = set(got) - set(want)
  if missing:
    problems.append(f"missing {len(missing)} leaf/leaves: {listing(missing)}")
  if extra:
    problems.append(f"unexpected {len(extra)} leaf/leaves: {listing(extra)}")
  bad = []
  for path in sorted(set(got) & set(want)):
    g, w = got[path], want[path]
    if tuple(g.shape) != tuple(w.shape):
      bad.append(f"{path}: shape {tuple(g.shape)} != expected {tuple(w.shape)}")
    elif check_dtype and jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
      bad.append(f"{path}: dtype {g.dtype} != expected {w.dtype}")
  if bad:
    problems.append("mismatched: " + "; ".join(bad[:MAX_LISTED]) +
                    (f"; ... ({len(bad) - MAX_LISTED} more)" if len(bad) > MAX_LISTED else ""))
  if problems:
    raise CheckpointError(f"{what} do not match the model: " + " | ".join(problems))


def cast_tree(params: Any, dtype: Any) -> Any:
  """Casts every floating-point leaf of ``params`` to ``dtype`` (integers are kept)."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree_util.tree_map(cast, params)
