"""The deployable quantized transformer: packed layers in the model's params tree, orbax on disk.

A quantized model is the full-precision params tree in which every quantized ``nn.Dense``'s
``kernel``/``bias`` are replaced, at the same path, by the parameters of
:class:`~svdquant_jax.nn.SVDQuantDense` (W4A4 / NVFP4 / W8A8: packed codes, group scales, λ,
low-rank factors, bias) or :class:`~svdquant_jax.nn.WeightOnlyDense` (W4A16 INT4 / NF4), plus a
``{path: spec}`` table. Running it is ``model.apply`` inside :func:`~svdquant_jax.nn.swap_dense`.

On disk (written to a temporary folder, then renamed)::

    quant_config.json   format version, model family/config/fingerprint, the PTQ settings,
                        and every quantized layer's spec (a rotated layer's spec adds
                        rotation_block/rotation_seed; files without them load unrotated)
    params/             orbax checkpoint of the params tree (integer codes, scales, λ, factors)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from svdquant_jax.formats.packing import QuantizedLinear
from svdquant_jax.nn import QuantSpec, WeightOnlySpec, awq_params, replace_dense_params, swap_dense, weight_only_params
from svdquant_jax.quant.adapters import ModelAdapter
from svdquant_jax.quant.deploy import to_quantized_linear
from svdquant_jax.quant.ptq import QuantizedLayer
from svdquant_jax.quant.svdquant import quantized_residual
from svdquant_jax.utils.files import atomic_directory, atomic_write_text, quiet_info_logs, read_json
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import CheckpointError

# 2: shift before smoothing ((x + δ)/λ), the engine's activation quantizer, nvfp4 wcscales,
#    weight-only INT4 in the AWQ form (u, wscales, wzeros).
FORMAT_VERSION = 2
CONFIG_FILE = "quant_config.json"
Spec = QuantSpec | WeightOnlySpec


class QuantizedCheckpointError(CheckpointError):
  """A saved quantized model is missing, truncated, or was made for another model/config."""


def layer_to_params(layer: QuantizedLayer, dtype: Any) -> tuple[Spec, dict[str, Any]]:
  """The deployed form of one quantized layer: ``(spec, params subtree)``.

  W4A4/NVFP4/W8A8 layers are packed by :func:`~svdquant_jax.quant.deploy.to_quantized_linear`
  (GPTQ's codes when set, else the RTN codes of ``R``); weight-only layers quantize ``R = W``
  (λ = 1, no branch) with scales in ``dtype``, INT4 in the AWQ form (GPTQ's codes and scales
  when set).
  """
  w, fmt = layer.weights, layer.fmt
  if fmt.act is None:
    if w.rank or not bool(jnp.all(w.smooth == 1)) or w.rotation is not None:
      raise ValueError("a weight-only layer cannot have smoothing, a low-rank branch or an input rotation")
    spec = WeightOnlySpec("int4" if fmt.weight == "int4" else "nf4", fmt.group_size)
    if spec.fmt == "int4" and w.residual_q is not None:
      return spec, awq_params(w.residual_q.codes, w.residual_q.scales, w.bias, dtype)
    kernel = w.residual if w.residual_q is None else quantized_residual(w, fmt)
    return spec, weight_only_params(kernel, w.bias, spec, dtype)
  ql = to_quantized_linear(w, fmt, shift=layer.shift, dtype=dtype)
  return QuantSpec.of(ql), ql


def quantize_params(params: Mapping[str, Any], layers: Mapping[str, QuantizedLayer],
                    dtype: Any) -> tuple[dict[str, Any], dict[str, Spec]]:
  """Full-precision params + quantized layers -> ``(quantized params tree, {path: spec})``."""
  specs, subtrees = {}, {}
  flat = trees.flatten(params)
  for path, layer in layers.items():
    specs[path], subtrees[path] = layer_to_params(layer, dtype)
    # A Dense without bias keeps none unless the shift needs one for its compensation.
    if f"{path}/bias" not in flat and not getattr(specs[path], "shift", 0.0):
      sub = subtrees[path]
      subtrees[path] = (dataclasses.replace(sub, bias=None) if isinstance(sub, QuantizedLinear)
                        else {k: v for k, v in sub.items() if k != "bias"})
  return replace_dense_params(params, subtrees), specs


def transformer_fn(adapter: ModelAdapter, specs: Mapping[str, Spec]) -> Callable[..., Any]:
  """``fn(params, **inputs)`` running the quantized transformer (the pipelines' hook)."""
  model = adapter.model
  specs = dict(specs)

  def fn(params: Any, **inputs: Any) -> Any:
    with swap_dense(specs):
      return model.apply({"params": params}, **inputs)
  return fn


def weight_bytes(params: Any) -> int:
  """Bytes of all params (what the quantized transformer holds on device)."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


# ----------------------------------------------------------------------------- disk
def _spec_json(spec: Spec) -> dict[str, Any]:
  kind = "svdquant" if isinstance(spec, QuantSpec) else "weight_only"
  fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("backend", "interpret")}
  if not fields.get("rotation_block"):  # unrotated specs are written as before rotation existed
    fields.pop("rotation_block", None)
    fields.pop("rotation_seed", None)
  return {"kind": kind, **fields}


def _spec_from_json(d: Mapping[str, Any]) -> Spec:
  d = dict(d)
  kind = d.pop("kind")
  return QuantSpec(**d) if kind == "svdquant" else WeightOnlySpec(**d)


def save_quantized(folder: str, params: Mapping[str, Any], specs: Mapping[str, Spec], *,
                   metadata: Mapping[str, Any]) -> None:
  """Writes a quantized model (replacing ``folder`` only once the new one is complete).

  Args:
    folder: destination.
    params: the quantized params tree.
    specs: ``{path: spec}``.
    metadata: JSON-serializable identity: at least ``family``, ``model_config`` and
      ``fingerprint`` of the full-precision model, and the PTQ settings.
  """
  flat = trees.flatten(params)
  # orbax cannot store zero-size arrays (rank-0 branches); their shapes go to the config.
  empty = {k: [list(v.shape), str(v.dtype)] for k, v in flat.items() if int(np.prod(v.shape)) == 0}
  arrays = trees.unflatten({k: v for k, v in flat.items() if k not in empty})
  config = {"format_version": FORMAT_VERSION, **json.loads(json.dumps(metadata, default=str)),
            "layers": {p: _spec_json(s) for p, s in sorted(specs.items())}, "empty_params": empty}
  with atomic_directory(folder) as tmp:
    with quiet_info_logs():
      ckptr = ocp.StandardCheckpointer()
      ckptr.save(os.path.join(tmp, "params"), arrays)
      ckptr.wait_until_finished()
    atomic_write_text(os.path.join(tmp, CONFIG_FILE), json.dumps(config, indent=1, sort_keys=True))


def read_quantized_config(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, CONFIG_FILE)
  config = read_json(path, QuantizedCheckpointError, f"{folder}: no {CONFIG_FILE}; not a quantized model folder")
  version = config.get("format_version")
  if version != FORMAT_VERSION:
    if isinstance(version, int) and version < FORMAT_VERSION:
      raise QuantizedCheckpointError(
          f"{path}: format version {version} was written by an older svdquant_jax whose quantized layers compute "
          f"differently (version {FORMAT_VERSION}: shift before smoothing, the engine's activation quantizer, "
          "weight-only INT4 with zero points); re-run PTQ (launch/ptq.py) to write this model again")
    raise QuantizedCheckpointError(f"{path}: format version {version}, expected {FORMAT_VERSION}")
  return config


def load_quantized(folder: str, *, expect: Mapping[str, Any] | None = None,
                   abstract: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Spec], dict]:
  """Reads a quantized model written by :func:`save_quantized`.

  Args:
    folder: the model folder.
    expect: metadata entries that must match (e.g. ``family``, ``model_config``,
      ``fingerprint`` of the model it is loaded into); a mismatch names the entry.
    abstract: if given, the expected params tree (shapes/dtypes); checked after loading.

  Returns:
    ``(params, specs, config)``.
  """
  config = read_quantized_config(folder)
  for key, value in (expect or {}).items():
    saved = config.get(key)
    if json.loads(json.dumps(value, default=str)) != saved:
      raise QuantizedCheckpointError(f"{folder} was quantized for a different model: {key} is {saved!r} there, "
                                     f"{value!r} here")
  try:
    with quiet_info_logs():
      arrays = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(folder, "params")))
  except Exception as e:  # orbax raises several types for missing/corrupt data
    raise QuantizedCheckpointError(f"{folder}/params: cannot restore the quantized params: {e}") from e
  flat = trees.flatten(arrays)
  for k, (shape, dtype) in config["empty_params"].items():
    flat[k] = jnp.zeros(shape, jnp.dtype(dtype))
  params = trees.unflatten(flat)
  if abstract is not None:
    trees.validate_tree(params, abstract, what=f"quantized params in {folder}")
  specs = {p: _spec_from_json(s) for p, s in config["layers"].items()}
  return params, specs, config


def load_for_model(folder: str, adapter: ModelAdapter) -> tuple[Callable[..., Any], dict[str, Any], dict]:
  """A saved quantized transformer for the pipeline whose transformer ``adapter`` describes.

  Returns:
    ``(transformer_fn, params, config)``: pass the first two to a pipeline call.

  Raises:
    QuantizedCheckpointError: the folder is not a quantized model, or was made for another
      model family or transformer config (named).
  """
  params, specs, config = load_quantized(folder, expect={"family": adapter.family,
                                                          "model_config": repr(adapter.config)})
  return transformer_fn(adapter, specs), params, config
