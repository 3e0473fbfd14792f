"""Nunchaku-format FLUX LoRAs on the 4-bit checkpoint they were made for.

A Nunchaku-format LoRA (keys ``<block>.<layer>.lora_down`` / ``lora_up``, e.g.
``transformer_blocks.0.mlp_fc1.lora_down``; what nunchaku's and deepcompressor's LoRA converters
write) stores each layer's *whole* low-rank branch: the quantized checkpoint's own SVD branch
first (its rank padded to 16), then the LoRA's ranks, in the engine's fragment layout. It
therefore belongs to one base checkpoint. :func:`load_nunchaku_lora` checks, layer by layer, that
the stored base part equals this model's branch bit for bit (in the file's 16-bit dtype) and
refuses the file otherwise, naming the first layer that differs; when it matches, the ranks after
the base are the LoRA, returned as a :class:`~svdquant_jax.models.flux_lora.FluxLora` on our
layer paths, so it runs as every other LoRA does: an extra branch on the raw input with a
runtime strength (the engine's ``set_lora_strength`` scales the same ranks). adaLN (AWQ) layers
have no base branch: their whole ``lora_down [r_p, K]`` / ``lora_up [N, r_p]`` (rows interleaved)
is the LoRA. Bias, norm and 16-bit weights are not part of this format; any other key is an
error (or, with ``partial``, a warning).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging
import numpy as np

from svdquant_jax.formats import nunchaku as layout
from svdquant_jax.models.flux import FluxConfig
from svdquant_jax.models.flux_lora import FluxLora, LoraError, LoraFactors, is_nunchaku_format
from svdquant_jax.quant.nunchaku import flux_layout
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import SafetensorsFile

_LISTED = 8


def _strip_zero_ranks(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drops ranks that are zero in both factors (padding, and fc1/fc2 rank equalization)."""
  keep = np.any(a != 0, axis=1) | np.any(b != 0, axis=0)
  return a[keep], b[:, keep]


def _same(stored: np.ndarray, ours: Any) -> bool:
  """Bit equality of a stored factor with ours rounded to the stored dtype."""
  return np.array_equal(stored.view(np.uint8), np.ascontiguousarray(np.asarray(ours).astype(stored.dtype)).view(
      np.uint8)) if stored.shape == np.shape(ours) else False


def _w4a4_extra(name: str, path: str, down: np.ndarray, up: np.ndarray, p: Mapping[str, Any],
                source: str) -> tuple[np.ndarray, np.ndarray]:
  """The LoRA ranks of a W4A4 layer: ``(a [r, K], b [N, r])`` after the base branch's padded rank."""
  base_down = np.asarray(p["lora_down"]).T   # ours: [K, r0] -> [r0, K]
  base_up = np.asarray(p["lora_up"]).T       # [r0, N] -> [N, r0]
  k, n = int(p["smooth"].shape[0]), int(base_up.shape[0])
  try:
    dn = layout.unpack_lora_down(down, k)
    un = layout.unpack_lora_up(up, n)
  except (ValueError, TypeError) as e:
    raise LoraError(f"{source}: {name} does not fit this model's layer {path} (K={k}, N={n}): {e}") from e
  if dn.shape[0] != un.shape[1]:
    raise LoraError(f"{source}: {name}.lora_down has rank {dn.shape[0]}, {name}.lora_up {un.shape[1]}")
  r0 = base_down.shape[0]
  r0p = layout.ceil_to(r0, 16)
  if dn.shape[0] < r0p:
    raise LoraError(f"{source}: {name} stores rank {dn.shape[0]}, less than this model's base branch ({r0}, padded "
                    f"to {r0p}) at {path}: it was made for another quantized checkpoint")
  if not (_same(dn[:r0], base_down) and _same(un[:, :r0], base_up) and not np.any(dn[r0:r0p])
          and not np.any(un[:, r0:r0p])):
    diff = float(np.max(np.abs(dn[:r0].astype(np.float32) - base_down.astype(np.float32)), initial=0.0))
    raise LoraError(
        f"{source} is a Nunchaku-format LoRA made for another quantized checkpoint: its base branch at {name} "
        f"(our {path}, rank {r0}) differs from this model's (max |Δ lora_down| {diff:.3g}). Such files carry the "
        "base model's SVD branch; apply them to the checkpoint they were converted from, or load the original "
        "LoRA (diffusers, kohya or ComfyUI format), which fits any base")
  return _strip_zero_ranks(dn[r0p:].astype(np.float32), un[:, r0p:].astype(np.float32))


def _awq_extra(name: str, path: str, layer: flux_layout.Layer, down: np.ndarray, up: np.ndarray,
               p: Mapping[str, Any], source: str) -> tuple[np.ndarray, np.ndarray]:
  n, k = int(p["qweight"].shape[0]), 2 * int(p["qweight"].shape[1])
  if down.ndim != 2 or up.ndim != 2 or down.shape[1] != k or up.shape[0] != n or down.shape[0] != up.shape[1]:
    raise LoraError(f"{source}: {name}.lora_down {list(down.shape)} / lora_up {list(up.shape)} do not fit this "
                    f"model's adaLN layer {path} ([r, {k}] and [{n}, r])")
  b = layout.deinterleave_rows(up, layer.chunks)
  return _strip_zero_ranks(down.astype(np.float32), b.astype(np.float32))


def load_nunchaku_lora(lora: str | os.PathLike | Mapping[str, np.ndarray], params: Mapping[str, Any],
                       config: FluxConfig, *, partial: bool = False, source: str | None = None) -> FluxLora:
  """A Nunchaku-format LoRA on the quantized FLUX it was made for.

  Args:
    lora: the ``.safetensors`` file, or its tensors by name (in their stored dtypes).
    params: the quantized transformer's params (ours, or loaded from a Nunchaku checkpoint).
    config: its FLUX config.
    partial: allow keys that are not block LoRA factors (listed in a warning) instead of an error.
    source: a name for messages (default: the path).

  Returns:
    The LoRA ranks as a :class:`FluxLora` (``layers`` only).

  Raises:
    LoraError: not a Nunchaku-format LoRA; a layer of this model that is not 4-bit; a stored base
      branch that differs from this model's (the file belongs to another checkpoint); factors that
      do not fit; unmatched keys unless ``partial``.
  """
  if isinstance(lora, Mapping):
    tensors, source = dict(lora), source or "LoRA"
  else:
    source = source or os.fspath(lora)
    f = SafetensorsFile(lora)
    tensors = {k: f.read(k) for k in f.keys()}
  if not is_nunchaku_format(tensors):
    raise LoraError(f"{source} is not a Nunchaku-format LoRA (no .mlp_fc / mlp_context_fc1 keys)")
  flat = trees.flatten(params)
  used, layers = set(), {}
  for theirs, ours, block_layers, _ in flux_layout.blocks(config):
    for layer in block_layers:
      name, path = f"{theirs}.{layer.name}", f"{ours}/{layer.path}"
      keys = (f"{name}.lora_down", f"{name}.lora_up")
      present = [k in tensors for k in keys]
      if not any(present):
        continue
      if not all(present):
        raise LoraError(f"{source}: {keys[present.index(False)]} is missing beside {keys[present.index(True)]}")
      used.update(keys)
      p = {k[len(path) + 1:]: v for k, v in flat.items() if k.startswith(path + "/") and "/" not in k[len(path) + 1:]}
      down, up = (np.asarray(tensors[k]) for k in keys)
      if layer.kind == "awq":
        if "wzeros" not in p:
          raise LoraError(f"{source}: this model's {path} is not the 4-bit AWQ adaLN layer the file's {name} is for")
        a, b = _awq_extra(name, path, layer, down, up, p, source)
      else:
        if "qweight" not in p or "lora_down" not in p:
          raise LoraError(f"{source}: this model's {path} is not a 4-bit SVDQuant layer; a Nunchaku-format LoRA "
                          "applies to the quantized checkpoint it was made for only")
        a, b = _w4a4_extra(name, path, down, up, p, source)
      if a.shape[0]:
        layers[path] = LoraFactors(np.ascontiguousarray(a), np.ascontiguousarray(b))
  unmatched = sorted(set(tensors) - used)
  if unmatched:
    listed = ", ".join(repr(k) for k in unmatched[:_LISTED]) + (f" (+{len(unmatched) - _LISTED} more)"
                                                              if len(unmatched) > _LISTED else "")
    message = f"{source}: {len(unmatched)} key(s) are not block LoRA factors of this FLUX transformer: {listed}"
    if not partial:
      raise LoraError(message + " (set lora_partial=True to apply the rest)")
    logging.warning("%s; ignored (lora_partial)", message)
  if not layers:
    raise LoraError(f"{source}: every layer holds only the base branch; the file adds no LoRA ranks")
  return FluxLora(source, layers, {}, {}, tuple(unmatched))
