"""LoRA branches on a linen model's linear layers at run time, the weights left untouched.

Every targeted layer computes ``y + Σ_i s_i·((x·A_iᵀ)·B_iᵀ + Δb_i)`` where ``x`` is the layer's raw
input, ``y`` its own output and ``s_i`` the strength of LoRA ``i``. The layer may be an
``nn.Dense`` or what :func:`~svdquant_jax.nn.swap_dense` runs in its place
(:class:`~svdquant_jax.nn.SVDQuantDense`, :class:`~svdquant_jax.nn.WeightOnlyDense`): the
interceptor only sees ``x`` and ``y``, so 4-bit codes, scales and smoothing are never read or
changed. Norm weights a LoRA carries replace the model's (not scaled by the strength).

The LoRAs are one pytree of arrays (:func:`lora_params`)::

    {"strength": float32 [L],
     "layers": {path: {"a": [R, K], "b": [N, R], "owner": int32 [R]}},   # all LoRAs' ranks stacked
     "bias":   {path: {"delta": [M, N], "owner": int32 [M]}},
     "norms":  {path: [D]}}

``owner`` says which LoRA (index into ``strength``) each rank / bias row belongs to. The strengths
are array leaves: under ``jax.jit`` new strengths (:func:`set_strengths`) reuse the compiled
program; only other LoRA files (other ranks or layers) retrace it.

    fn = jax.jit(with_lora(lambda p, **kw: model.apply({"params": p}, **kw)))
    out = fn({"base": params, "lora": lora_params([lora], [0.8])}, **inputs)
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.utils import trees

Array = jax.Array


def _factors(f: Any) -> tuple[Any, Any]:
  return (f.a, f.b) if hasattr(f, "a") else tuple(f)


def lora_params(loras: Sequence[Any], strengths: Sequence[float] | None = None,
                dtype: Any = jnp.float32) -> dict[str, Any]:
  """Stacks several LoRAs into the runtime pytree (module docstring).

  Args:
    loras: objects with ``layers`` (``{path: factors}``, factors with ``.a [r, K]`` and
      ``.b [N, r]`` or an ``(a, b)`` pair), ``bias`` (``{path: Δb [N]}``) and ``norms``
      (``{path: weight [D]}``), e.g. :class:`~svdquant_jax.models.flux_lora.FluxLora`.
    strengths: one per LoRA (default 1.0 each).
    dtype: dtype of the factors, bias deltas and norm weights (e.g. the model's param dtype).

  Raises:
    ValueError: a strength count that does not match, or two LoRAs whose factors for one layer
      disagree on its input or output width (named).
  """
  strengths = [1.0] * len(loras) if strengths is None else [float(s) for s in strengths]
  if len(strengths) != len(loras):
    raise ValueError(f"{len(loras)} LoRA(s) but {len(strengths)} strength(s)")
  layers: dict[str, Any] = {}
  for path in sorted({p for lora in loras for p in lora.layers}):
    a_parts, b_parts, owner = [], [], []
    for i, lora in enumerate(loras):
      if path in lora.layers:
        a, b = (np.asarray(x, np.float32) for x in _factors(lora.layers[path]))
        if a_parts and (a.shape[1], b.shape[0]) != (a_parts[0].shape[1], b_parts[0].shape[0]):
          raise ValueError(f"LoRA {i} has a [{b.shape[0]}, {a.shape[1]}] update for {path}, an earlier one "
                           f"[{b_parts[0].shape[0]}, {a_parts[0].shape[1]}]")
        a_parts.append(a)
        b_parts.append(b)
        owner += [i] * a.shape[0]
    layers[path] = {"a": jnp.asarray(np.concatenate(a_parts), dtype),
                    "b": jnp.asarray(np.concatenate(b_parts, axis=1), dtype),
                    "owner": jnp.asarray(owner, jnp.int32)}
  bias: dict[str, Any] = {}
  for path in sorted({p for lora in loras for p in lora.bias}):
    rows = [(i, np.asarray(lora.bias[path], np.float32)) for i, lora in enumerate(loras) if path in lora.bias]
    if len({d.shape for _, d in rows}) > 1:
      raise ValueError(f"bias deltas for {path} have different shapes {[d.shape for _, d in rows]}")
    bias[path] = {"delta": jnp.asarray(np.stack([d for _, d in rows]), dtype),
                  "owner": jnp.asarray([i for i, _ in rows], jnp.int32)}
  norms = {}
  for lora in loras:  # a later LoRA's norm weight replaces an earlier one's
    norms.update({p: jnp.asarray(w, dtype) for p, w in lora.norms.items()})
  return {"strength": jnp.asarray(strengths, jnp.float32), "layers": layers, "bias": bias, "norms": norms}


def set_strengths(tree: Mapping[str, Any], strengths: Any) -> dict[str, Any]:
  """The same LoRAs with other strengths (same shapes: a jitted call does not recompile)."""
  strengths = jnp.asarray(strengths, jnp.float32)
  if strengths.shape != tree["strength"].shape:
    raise ValueError(f"{tree['strength'].shape[0]} LoRA(s) but strengths of shape {strengths.shape}")
  return {**tree, "strength": strengths}


def _branch(path: str, x: Array, y: Array, layer: Mapping[str, Array] | None, bias: Mapping[str, Array] | None,
            strength: Array) -> Array:
  """``y + Σ s·((x·Aᵀ)·Bᵀ + Δb)``: matmuls in the layer's dtype with float32 accumulation, the sum
  in float32, rounded once to ``y``'s dtype (a zero update gives ``y`` back exactly)."""
  dt = y.dtype
  delta = jnp.zeros((), jnp.float32)
  if layer is not None:
    a, b = layer["a"], layer["b"]
    if x.shape[-1] != a.shape[1] or y.shape[-1] != b.shape[0]:
      raise ValueError(f"LoRA for {path} is [{b.shape[0]}, {a.shape[1]}] (out, in) but the layer maps "
                       f"{x.shape[-1]} -> {y.shape[-1]} features")
    h = jnp.einsum("...k,rk->...r", x.astype(dt), a.astype(dt), preferred_element_type=jnp.float32)
    h = h * strength[layer["owner"]]
    delta = jnp.einsum("...r,nr->...n", h.astype(dt), b.astype(dt), preferred_element_type=jnp.float32)
  if bias is not None:
    d = bias["delta"]
    if y.shape[-1] != d.shape[1]:
      raise ValueError(f"LoRA bias delta for {path} has {d.shape[1]} entries, the layer {y.shape[-1]} outputs")
    delta = delta + strength[bias["owner"]] @ d.astype(jnp.float32)
  return (y.astype(jnp.float32) + delta).astype(dt)


@contextlib.contextmanager
def lora_branches(tree: Mapping[str, Any], *, check_paths: bool = True) -> Iterator[set[str]]:
  """Within the context, every layer at a path of ``tree`` gets its LoRA branch added.

  Works on any module called as ``layer(x)`` at that path (``nn.Dense``, or the quantized layer
  :func:`~svdquant_jax.nn.swap_dense` runs at the same path; either context may be entered
  first). Only the module's input and output are used.

  Args:
    tree: the LoRA pytree (:func:`lora_params`); its leaves may be tracers.
    check_paths: raise on exit (``ValueError``) if a path was never called, so that a LoRA is
      not silently left out.

  Yields:
    The set of paths that got their branch so far.
  """
  layers, biases, strength = tree.get("layers", {}), tree.get("bias", {}), tree["strength"]
  paths = set(layers) | set(biases)
  applied: set[str] = set()
  running: set[str] = set()  # a swapped layer is called inside the Dense call at the same path

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in context.module.path)
    if path not in paths or path in running:
      return next_fun(*args, **kwargs)
    if len(args) != 1 or kwargs:
      raise TypeError(f"LoRA at {path}: expected the layer to be called as layer(x), got {len(args)} positional "
                      f"and keyword(s) {sorted(kwargs)}")
    running.add(path)
    try:
      y = next_fun(*args, **kwargs)
    finally:
      running.discard(path)
    applied.add(path)
    return _branch(path, args[0], y, layers.get(path), biases.get(path), strength)

  with nn.intercept_methods(interceptor):
    yield applied
  if check_paths:
    missing = sorted(paths - applied)
    if missing:
      raise ValueError(f"lora_branches: no layer was called at path(s) {missing}")


def replace_norms(params: Mapping[str, Any], tree: Mapping[str, Any]) -> dict[str, Any]:
  """``params`` with each ``<path>/scale`` of ``tree["norms"]`` replaced (cast to its dtype).

  Raises:
    ValueError: a norm path the params do not have, or a weight of another shape.
  """
  norms = tree.get("norms") or {}
  if not norms:
    return dict(params)
  flat = trees.flatten(params)
  for path, w in norms.items():
    key = f"{path}/scale"
    if key not in flat:
      raise ValueError(f"LoRA norm weight for {path}: the model has no {key}")
    if tuple(w.shape) != tuple(flat[key].shape):
      raise ValueError(f"LoRA norm weight for {path} has shape {tuple(w.shape)}, {key} has {tuple(flat[key].shape)}")
    flat[key] = w.astype(flat[key].dtype)
  return trees.unflatten(flat)


def with_lora(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn(params, **inputs)`` -> ``g({"base": params, "lora": tree}, **inputs)`` with the LoRAs applied.

  ``fn`` must not be jitted itself: a jitted function's cached trace would run without the
  interceptor. Jit ``g`` instead (the pipelines do).
  """
  if hasattr(fn, "lower"):
    raise TypeError("with_lora needs the un-jitted transformer function (a jitted one's cached trace bypasses "
                    "the LoRA interceptor); jit the result instead")

  def run(params: Mapping[str, Any], **inputs: Any) -> Any:
    tree = params["lora"]
    with lora_branches(tree):
      return fn(replace_norms(params["base"], tree), **inputs)
  return run
