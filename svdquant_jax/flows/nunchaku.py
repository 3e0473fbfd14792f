"""Nunchaku interop commands: export a model saved by the PTQ flow, load a published checkpoint.

:func:`export_run` is ``launch/export_nunchaku.py``; :func:`load_transformer` is what
``launch/generate.py --config.nunchaku=...`` runs. The format itself is in
``svdquant_jax.quant.nunchaku`` and ``docs/nunchaku.md``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import ml_collections

from svdquant_jax.models.flux import FluxConfig
from svdquant_jax.models.flux_lora import load_flux_lora, parse_lora_spec
from svdquant_jax.quant import nunchaku, quantized_model
from svdquant_jax.quant.adapters import adapter_for_pipeline


def default_config() -> ml_collections.ConfigDict:
  """Settings of the export command."""
  c = ml_collections.ConfigDict()
  c.quantized_model = ""   # a folder written by launch/ptq.py (runs/<model>/<protocol>/<method>/model)
  c.output = ""            # the .safetensors file to write (or, with legacy, a folder)
  c.legacy = False         # write the legacy folder (transformer_blocks + unquantized_layers + config.json)
  c.dtype = "bfloat16"     # 16-bit dtype of the file: bfloat16 (as the published FLUX files) or float16
  c.loras = ""             # FLUX LoRAs merged into the file, "a.safetensors:0.8,b.safetensors" (file:strength)
  c.lora_partial = False   # allow LoRA keys that match no layer (listed in a warning)
  c.model = ""             # only for models saved before the transformer config was recorded: preset or folder
  c.model_path = ""        # with a real-size preset: its diffusers folder
  c.progress = True
  return c


def saved_transformer_config(folder: str, model: str = "", model_path: str = "") -> FluxConfig:
  """The FLUX config of a quantized model folder (recorded by the PTQ flow, else from ``model``)."""
  meta = quantized_model.read_quantized_config(folder)
  if meta.get("family") != "flux":
    raise nunchaku.NunchakuExportError(
        f"{folder} is a quantized {meta.get('family')!r} model; Nunchaku has an engine and a file format for FLUX.1 "
        "only (PixArt-Sigma has none)")
  recorded = meta.get("transformer_config")
  if recorded:
    return FluxConfig.from_diffusers(recorded["diffusers"], dtype=recorded["dtype"],
                                     param_dtype=recorded["param_dtype"])
  if not model:
    raise nunchaku.NunchakuExportError(f"{folder} does not record its transformer config (saved by an older "
                                       "version): pass --config.model (and --config.model_path) it was made from")
  from svdquant_jax.pipelines.loading import load_pipeline  # noqa: PLC0415 (heavy; only for old folders)
  return adapter_for_pipeline(load_pipeline(model, path=model_path or None)).config


def export_run(config: Any) -> dict[str, Any]:
  """Exports ``config.quantized_model`` to ``config.output`` (see :func:`default_config`)."""
  if not config.quantized_model or not config.output:
    raise ValueError("set --config.quantized_model (a folder from launch/ptq.py) and --config.output "
                     "(a .safetensors file, or a folder with --config.legacy)")
  if not config.legacy and not config.output.endswith(".safetensors"):
    raise ValueError(f"--config.output={config.output!r}: the single-file format is a .safetensors file "
                     "(or pass --config.legacy=true for the folder format)")
  flux_config = saved_transformer_config(config.quantized_model, config.model, config.model_path)
  params, specs, meta = quantized_model.load_quantized(config.quantized_model,
                                                       expect={"model_config": repr(flux_config)})
  loras = []
  if config.loras:
    for path, strength in parse_lora_spec(config.loras):
      lora = load_flux_lora(path, flux_config, partial=config.lora_partial)
      logging.info("LoRA %s (strength %g)", lora.summary(), strength)
      loras.append((lora, strength))
  summary = nunchaku.export_flux(params, specs, flux_config, config.output, legacy=config.legacy, dtype=config.dtype,
                                 loras=loras, progress=config.progress)
  logging.info("wrote %s: %s rank %d, %d tensors, %.1f MB", summary["path"], summary["format"], summary["rank"],
               summary["tensors"], summary["bytes"] / 1e6)
  print(json.dumps({k: v for k, v in summary.items() if k != "quantization_config"}))
  return summary


def load_transformer(path: str, pipeline: Any) -> tuple[Any, Any, nunchaku.NunchakuModel]:
  """A Nunchaku checkpoint as the transformer of ``pipeline`` (text encoders and VAE stay the pipeline's).

  Returns:
    ``(transformer_fn, params, model)``.

  Raises:
    NunchakuFormatError: the checkpoint's transformer config differs from the pipeline's (named).
  """
  adapter = adapter_for_pipeline(pipeline)
  if adapter.family != "flux":
    raise nunchaku.NunchakuFormatError(f"a Nunchaku checkpoint is a FLUX.1 transformer; {pipeline.name!r} is a "
                                       f"{adapter.family} pipeline")
  ours = adapter.config
  model = nunchaku.load_flux(path, dtype=ours.dtype, param_dtype=ours.param_dtype)
  theirs = model.config.replace(attention_impl=ours.attention_impl)
  if theirs != ours:
    diff = {f: (getattr(theirs, f), getattr(ours, f)) for f in theirs.__dataclass_fields__
            if getattr(theirs, f) != getattr(ours, f)}
    raise nunchaku.NunchakuFormatError(f"{path}: its transformer config differs from the pipeline's "
                                       f"{pipeline.name!r}: {diff} (file, pipeline)")
  if model.fused_smoothing:
    logging.warning("%s: %d out_proj layers have smoothing folded into the previous layer; a LoRA on them would "
                    "be wrong (not on the others)", path, len(model.fused_smoothing))
  fn = quantized_model.transformer_fn(adapter, model.specs)
  return fn, model.params, model


__all__ = ["default_config", "export_run", "load_transformer", "saved_transformer_config"]
