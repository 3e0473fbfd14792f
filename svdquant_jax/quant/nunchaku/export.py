"""Our quantized FLUX -> a Nunchaku checkpoint (single file, or the legacy folder).

The exporter only re-lays-out what the quantized model already holds: integer codes, group
scales, λ, the branch factors and the deployed bias are written as they are, in Nunchaku's
packed layouts (``svdquant_jax.formats.nunchaku``). The engine then computes the same layer as
ours (``docs/nunchaku.md``, "Semantics"): ``Qa((x + δ)/λ)·Qw(R) + x·lora_down·lora_up + bias``,
with δ = 0.171875 on the INT4 fc2 inputs. What the format cannot express is refused with the
layer and the reason (:class:`NunchakuExportError`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import ml_dtypes
import numpy as np

from svdquant_jax.formats import nunchaku as layout
from svdquant_jax.formats import packing
from svdquant_jax.formats.quantizers import GELU_SHIFT
from svdquant_jax.models.flux import FluxConfig
from svdquant_jax.models.flux_lora import FluxLora
from svdquant_jax.nn import QuantSpec, WeightOnlySpec
from svdquant_jax.quant.nunchaku import flux_layout
from svdquant_jax.quant.nunchaku.flux_layout import Layer
from svdquant_jax.utils import trees
from svdquant_jax.utils.files import atomic_directory, atomic_write_text
from svdquant_jax.utils.progress import Progress
from svdquant_jax.utils.safetensors_io import SafetensorsWriter

EXPORT_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
LEGACY_BLOCKS_FILE = "transformer_blocks.safetensors"
LEGACY_REST_FILE = "unquantized_layers.safetensors"


class NunchakuExportError(ValueError):
  """The model cannot be written in Nunchaku's format (the message names the layer and why)."""


def _np(x: Any) -> np.ndarray:
  return np.asarray(jax.device_get(x))


class _Rounding:
  """Counts 16-bit tensors whose values change when cast to the export dtype (one warning at the end)."""

  def __init__(self, dtype: Any):
    self.dtype = dtype
    self.changed: list[str] = []

  def __call__(self, name: str, x: Any) -> np.ndarray:
    x = _np(x)
    out = x.astype(self.dtype)
    if x.dtype != out.dtype and not np.array_equal(out.astype(np.float32), x.astype(np.float32), equal_nan=True):
      self.changed.append(name)
    return out

  def warn(self) -> None:
    if self.changed:
      warnings.warn(f"{len(self.changed)} tensors were rounded to {np.dtype(self.dtype).name} for the export "
                    f"(the model was quantized with another parameter dtype), e.g. {self.changed[:3]}; the exported "
                    "model differs from yours by that rounding. Quantize with a bfloat16 model for an exact export.",
                    stacklevel=3)


@dataclasses.dataclass
class LoraExtras:
  """LoRAs merged for export (strengths folded into ``A``), by our param path.

  Attributes:
    layers: ``path -> (A [r, K], B [N, r])``, the LoRAs of a layer rank-stacked; fc1/fc2 pairs
      padded with zero ranks to equal extra ranks (the engine computes fc2's branch input in
      fc1's epilogue with a buffer sized by fc1's rank).
    bias: ``path -> Δb [N]`` (summed over the LoRAs, times their strengths).
    norms: ``RMSNorm path -> weight`` (a LoRA's norm vector replaces the weight, as Nunchaku).
  """
  layers: dict[str, tuple[np.ndarray, np.ndarray]]
  bias: dict[str, np.ndarray]
  norms: dict[str, np.ndarray]


def _fc_pairs(config: FluxConfig) -> list[tuple[str, str]]:
  pairs = []
  for i in range(config.num_layers):
    pairs += [(f"transformer_blocks_{i}/{ff}/fc1", f"transformer_blocks_{i}/{ff}/fc2") for ff in ("ff", "ff_context")]
  pairs += [(f"single_transformer_blocks_{j}/proj_mlp", f"single_transformer_blocks_{j}/proj_out_mlp")
            for j in range(config.num_single_layers)]
  return pairs


def lora_extras(loras: Sequence[tuple[FluxLora, float]], config: FluxConfig) -> LoraExtras:
  """Merges LoRAs (each with its strength) into per-layer extra branches, bias deltas and norms."""
  stacks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
  bias: dict[str, np.ndarray] = {}
  norms: dict[str, np.ndarray] = {}
  for lora, strength in loras:
    for path, f in lora.layers.items():
      stacks.setdefault(path, []).append((np.float32(strength) * np.asarray(f.a, np.float32),
                                          np.asarray(f.b, np.float32)))
    for path, delta in lora.bias.items():
      bias[path] = bias.get(path, 0) + np.float32(strength) * np.asarray(delta, np.float32)
    norms.update({path: np.asarray(w, np.float32) for path, w in lora.norms.items()})
  layers = {p: (np.concatenate([a for a, _ in fs], axis=0), np.concatenate([b for _, b in fs], axis=1))
            for p, fs in stacks.items()}
  for fc1, fc2 in _fc_pairs(config):
    if fc1 not in layers and fc2 not in layers:
      continue
    r = max(layers[p][0].shape[0] if p in layers else 0 for p in (fc1, fc2))
    for p in (fc1, fc2):
      k, n = (config.inner_dim, config.mlp_dim) if p == fc1 else (config.mlp_dim, config.inner_dim)
      a, b = layers.get(p, (np.zeros((0, k), np.float32), np.zeros((n, 0), np.float32)))
      layers[p] = (np.concatenate([a, np.zeros((r - a.shape[0], a.shape[1]), np.float32)], axis=0),
                   np.concatenate([b, np.zeros((b.shape[0], r - b.shape[1]), np.float32)], axis=1))
  return LoraExtras(layers, bias, norms)


def _check_w4a4_spec(name: str, layer: Layer, spec: QuantSpec, fmt: str) -> None:
  if spec.rotation_block:
    raise NunchakuExportError(f"{name}: quantized with a Hadamard input rotation (block {spec.rotation_block}), which "
                              "the Nunchaku engine does not apply; export a model quantized without quant.rotation")
  if spec.fmt != fmt:
    raise NunchakuExportError(f"{name}: format {spec.fmt!r}, but the model's other layers are {fmt!r}; a Nunchaku "
                              "file holds one 4-bit format")
  want_shift = GELU_SHIFT if (fmt == "int4" and layer.shifted) else 0.0
  if float(spec.shift) != want_shift:
    if want_shift:
      raise NunchakuExportError(
          f"{name}: the engine shifts this INT4 fc2 input by {GELU_SHIFT} and quantizes it unsigned, but the layer "
          f"was quantized with shift {spec.shift}; re-quantize with the shift on (the default for FLUX INT4)")
    raise NunchakuExportError(f"{name}: quantized with an input shift {spec.shift}, which the engine applies only "
                              "to INT4 fc2 inputs")


def _w4a4_tensors(name: str, layer: Layer, p: Mapping[str, Any], spec: QuantSpec, fmt: str, cast: _Rounding,
                  extra: tuple[np.ndarray, np.ndarray] | None = None, bias_delta: Any = None) -> dict[str, np.ndarray]:
  k = int(p["smooth"].shape[0])
  signed = fmt == "int4"
  codes = _np(packing.unpack(_np(p["qweight"]), layout="NK", signed=signed))
  if not signed:
    codes = np.where(codes == 8, 0, codes).astype(codes.dtype)  # -0.0 and +0.0 are one value; Nunchaku writes +0
  scales = _np(p["wscales"]).T
  n = codes.shape[0]
  if scales.shape[1] * (64 if signed else 16) != k:
    raise NunchakuExportError(f"{name}: {scales.shape[1]} scale groups for K={k}; Nunchaku needs group size "
                              f"{64 if signed else 16} for {fmt}")
  wtscale = wcscales = None
  if fmt == "nvfp4":
    scales = scales.astype(np.float32)
    t = float(_np(p["wtscale"]).reshape(-1)[0])
    channel = _np(p["wcscales"]).astype(np.float32) if "wcscales" in p else None
    if layer.fused_members > 1:
      wcscales = cast(f"{name}.wcscales", (np.full((n,), t, np.float32) if channel is None else t * channel))
    else:
      wtscale = cast(f"{name}.wtscale", np.float32(t))
      if channel is not None and not np.all(channel == 1):
        wcscales = cast(f"{name}.wcscales", channel)
  else:
    scales = cast(f"{name}.wscales", scales)
  bias = cast(f"{name}.bias", p["bias"]) if "bias" in p else np.zeros((n,), cast.dtype)
  if bias_delta is not None:
    bias = (bias.astype(np.float32) + bias_delta).astype(cast.dtype)
  down = cast(f"{name}.lora_down", _np(p["lora_down"]).T)
  up = cast(f"{name}.lora_up", _np(p["lora_up"]).T)
  if extra is not None:
    r_p = layout.ceil_to(down.shape[0], 16)  # the base's padded rank comes first, as Nunchaku's converters do
    down = np.concatenate([down, np.zeros((r_p - down.shape[0], k), down.dtype)], axis=0)
    up = np.concatenate([up, np.zeros((n, r_p - up.shape[1]), up.dtype)], axis=1)
    down, up = layout.lora_concat(down, up, extra[0], extra[1])
  return layout.w4a4_tensors(
      codes=codes, wscales=scales, fmt=fmt, smooth=cast(f"{name}.smooth", p["smooth"]), lora_down=down,
      lora_up=up, bias=bias, wtscale=wtscale, wcscales=wcscales, dtype=cast.dtype)


def _check_awq_spec(name: str, spec: WeightOnlySpec) -> None:
  if spec.fmt != "int4" or spec.group_size != 64:
    raise NunchakuExportError(f"{name}: the engine runs this adaLN layer as AWQ W4A16 INT4 with group size 64 and "
                              f"zero points; the layer is weight-only {spec.fmt} g{spec.group_size}")


def _awq_tensors(name: str, layer: Layer, p: Mapping[str, Any], spec: WeightOnlySpec, cast: _Rounding,
                 extra: tuple[np.ndarray, np.ndarray] | None = None, bias_delta: Any = None) -> dict[str, np.ndarray]:
  u = _np(packing.unpack(_np(p["qweight"]), layout="NK", signed=False))
  bias = cast(f"{name}.bias", p["bias"])
  if bias_delta is not None:
    bias = (bias.astype(np.float32) + bias_delta).astype(cast.dtype)
  out = layout.awq_tensors(u=u, wscales=cast(f"{name}.wscales", _np(p["wscales"]).T),
                           wzeros=cast(f"{name}.wzeros", _np(p["wzeros"]).T), bias=bias, S=layer.chunks,
                           dtype=cast.dtype)
  if extra is not None:
    out.update(layout.awq_lora_tensors(extra[0], extra[1], layer.chunks, cast.dtype))
  return out


def model_format(specs: Mapping[str, Any], config: FluxConfig) -> tuple[str, int]:
  """``(fmt, rank)`` of a quantized FLUX: the 4-bit format of its W4A4 layers and the largest rank."""
  fmts, ranks = set(), [0]
  for _, ours, layers, _ in flux_layout.blocks(config):
    for layer in layers:
      spec = specs.get(f"{ours}/{layer.path}")
      if layer.kind == "w4a4" and isinstance(spec, QuantSpec):
        fmts.add(spec.fmt)
        ranks.append(spec.rank)
  fmts &= {"int4", "nvfp4", "int8"}
  if not fmts:
    raise NunchakuExportError("the model has no W4A4 layers in its transformer blocks; nothing to export")
  if len(fmts) > 1:
    raise NunchakuExportError(f"the model mixes formats {sorted(fmts)}; a Nunchaku file holds one 4-bit format")
  fmt = fmts.pop()
  if fmt == "int8":
    raise NunchakuExportError("W8A8 (int8) layers have no Nunchaku W4A4 form; export INT4 or NVFP4 models")
  return fmt, max(ranks)


def block_tensors(params: Mapping[str, Any], specs: Mapping[str, Any], config: FluxConfig,
                  dtype: Any = ml_dtypes.bfloat16, check_only: bool = False,
                  extras: LoraExtras | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields ``(key, tensor)`` for every tensor of the quantized blocks, block by block.

  ``check_only``: only check that every block layer has a spec the format can express.
  ``extras``: LoRAs merged into the branches (:func:`lora_extras`).
  """
  extras = extras or LoraExtras({}, {}, {})
  flat = trees.flatten(params)
  fmt, _ = model_format(specs, config)
  cast = _Rounding(dtype)
  for theirs, ours, layers, norms in flux_layout.blocks(config):
    for layer in layers:
      path, name = f"{ours}/{layer.path}", f"{theirs}.{layer.name}"
      spec = specs.get(path)
      sub = {k[len(path) + 1:]: v for k, v in flat.items() if k.startswith(path + "/") and "/" not in k[len(path) + 1:]}
      if spec is None:
        raise NunchakuExportError(
            f"{name} (our {path}) is not quantized; Nunchaku runs every block linear in 4 bits "
            f"({'W4A16 AWQ' if layer.kind == 'awq' else 'W4A4'}): quantize it (for adaLN: "
            "--config.quant.weight_only_adaln=true)")
      if layer.kind == "awq":
        if not isinstance(spec, WeightOnlySpec):
          raise NunchakuExportError(f"{name}: an adaLN layer must be weight-only INT4 (AWQ) for Nunchaku, got {spec}")
        _check_awq_spec(name, spec)
        tensors = {} if check_only else _awq_tensors(name, layer, sub, spec, cast, extras.layers.get(path),
                                                     extras.bias.get(path))
      else:
        if not isinstance(spec, QuantSpec):
          raise NunchakuExportError(f"{name}: must be W4A4 (SVDQuant) for Nunchaku, got {spec}")
        _check_w4a4_spec(name, layer, spec, fmt)
        tensors = {} if check_only else _w4a4_tensors(name, layer, sub, spec, fmt, cast, extras.layers.get(path),
                                                      extras.bias.get(path))
      for key, value in tensors.items():
        yield f"{name}.{key}", value
    for norm, our_norm in norms:
      if not check_only:
        replaced = extras.norms.get(f"{ours}/{our_norm}")
        weight = flat[f"{ours}/{our_norm}/scale"] if replaced is None else replaced.astype(dtype)
        yield f"{theirs}.{norm}.weight", cast(f"{theirs}.{norm}", weight)
  cast.warn()


def unquantized_tensors(params: Mapping[str, Any], config: FluxConfig, dtype: Any = ml_dtypes.bfloat16,
                        extras: LoraExtras | None = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields the 16-bit tensors outside the blocks under their diffusers names (LoRAs merged:
  ``W + s·B·A``, ``b + s·Δb``)."""
  flat = trees.flatten(params)
  extras = extras or LoraExtras({}, {}, {})
  for theirs, ours in flux_layout.unquantized_layers(config):
    if f"{ours}/kernel" not in flat:
      raise NunchakuExportError(f"{theirs} (our {ours}) is quantized or missing; Nunchaku keeps it 16-bit")
    weight = _np(flat[f"{ours}/kernel"]).T
    if ours in extras.layers:
      a, b = extras.layers[ours]
      weight = weight.astype(np.float32) + b @ a
    yield f"{theirs}.weight", weight.astype(dtype)
    if f"{ours}/bias" in flat:
      bias = _np(flat[f"{ours}/bias"])
      if ours in extras.bias:
        bias = bias.astype(np.float32) + extras.bias[ours]
      yield f"{theirs}.bias", bias.astype(dtype)


def export_flux(params: Mapping[str, Any], specs: Mapping[str, Any], config: FluxConfig, path: str | os.PathLike, *,
                legacy: bool = False, dtype: str = "bfloat16", loras: Sequence[tuple[FluxLora, float]] = (),
                progress: bool = True) -> dict[str, Any]:
  """Writes a quantized FLUX as a Nunchaku checkpoint.

  Args:
    params: the quantized params tree (``quantized_model.load_quantized``).
    specs: ``{path: QuantSpec | WeightOnlySpec}``.
    config: the transformer config.
    path: a ``.safetensors`` file (single-file format) or, with ``legacy=True``, a folder
      (``transformer_blocks.safetensors``, ``unquantized_layers.safetensors``, ``config.json``,
      ``comfy_config.json``).
    dtype: the 16-bit dtype of the file (``bfloat16`` as the published FLUX files, or ``float16``).
    loras: ``(lora, strength)`` pairs merged into the file without requantization: block layers
      get rank-concatenated branches (strength folded into ``A``), the 16-bit layers ``W + s·BA``.
    progress: show a progress display over blocks.

  Returns:
    A summary: format, rank, tensor count, bytes.

  Raises:
    NunchakuExportError: naming the first layer the format cannot express.
  """
  if dtype not in EXPORT_DTYPES:
    raise NunchakuExportError(f"dtype {dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
  np_dtype = EXPORT_DTYPES[dtype]
  fmt, rank = model_format(specs, config)
  for _ in block_tensors({}, specs, config, np_dtype, check_only=True):
    pass
  try:
    trees.validate_tree(params, flux_layout.expected_params(config, specs), what="the quantized params")
  except ValueError as e:
    raise NunchakuExportError(f"the params do not match the model config and layer specs: {e}") from e
  meta = flux_layout.metadata(config, fmt, layout.ceil_to(rank, 16))
  path = os.fspath(path)
  nblocks = config.num_layers + config.num_single_layers
  count = nbytes = 0
  bar = Progress(nblocks, "export nunchaku", enabled=progress)

  def write(writer: SafetensorsWriter, items: Iterator[tuple[str, np.ndarray]], tick: bool) -> None:
    nonlocal count, nbytes
    last_block = None
    for key, value in items:
      writer.add(key, value)
      count, nbytes = count + 1, nbytes + value.nbytes
      block = key.split(".")[1] if tick else None
      if tick and last_block is not None and block != last_block:
        bar.update(1)
      last_block = block
    if tick and last_block is not None:
      bar.update(1)

  extras = lora_extras(loras, config)
  with bar:
    if legacy:
      with atomic_directory(path) as tmp:
        with SafetensorsWriter(os.path.join(tmp, LEGACY_BLOCKS_FILE)) as w:
          write(w, block_tensors(params, specs, config, np_dtype, extras=extras), True)
        with SafetensorsWriter(os.path.join(tmp, LEGACY_REST_FILE)) as w:
          write(w, unquantized_tensors(params, config, np_dtype, extras=extras), False)
        atomic_write_text(os.path.join(tmp, "config.json"), meta["config"])
        atomic_write_text(os.path.join(tmp, "comfy_config.json"), meta["comfy_config"])
    else:
      with SafetensorsWriter(path, meta) as w:
        write(w, unquantized_tensors(params, config, np_dtype, extras=extras), False)
        write(w, block_tensors(params, specs, config, np_dtype, extras=extras), True)
  return {"path": path, "format": fmt, "rank": rank, "legacy": legacy, "loras": len(loras), "tensors": count,
          "bytes": nbytes,
          "quantization_config": json.loads(meta["quantization_config"])}


__all__ = ["NunchakuExportError", "LoraExtras", "export_flux", "block_tensors", "unquantized_tensors", "lora_extras",
           "model_format"]
