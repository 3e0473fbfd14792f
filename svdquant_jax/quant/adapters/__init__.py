"""Per-family model adapters: the one place that knows how each transformer is quantized.

Adding a model family: a model file and a loader under ``models/``, a preset under
``pipelines/``, and one adapter file here, registered in :data:`ADAPTERS` (``docs/design.md``).
"""

from __future__ import annotations

from typing import Any

from svdquant_jax.quant.adapters.base import Array, BlockPolicy, BlockRef, LinearGroup, ModelAdapter, State
from svdquant_jax.quant.adapters.flux import FluxAdapter
from svdquant_jax.quant.adapters.pixart import PixArtAdapter
from svdquant_jax.quant.adapters.sana import SanaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {a.family: a for a in (FluxAdapter, PixArtAdapter, SanaAdapter)}


def adapter_for(family: str, config: Any) -> ModelAdapter:
  """The adapter of a family (``"flux"``, ``"pixart"``) for a transformer config."""
  if family not in ADAPTERS:
    raise ValueError(f"unknown model family {family!r}; expected one of {sorted(ADAPTERS)}")
  return ADAPTERS[family](config)


def adapter_for_pipeline(pipeline: Any) -> ModelAdapter:
  """The adapter of a loaded pipeline's transformer (by the pipeline's ``pipeline_class``)."""
  name = getattr(pipeline, "pipeline_class", type(pipeline).__name__)
  for adapter in ADAPTERS.values():
    if adapter.pipeline_class == name:
      return adapter(pipeline.transformer_config)
  raise ValueError(f"no quantization adapter for pipeline {name!r}; supported: "
                   f"{sorted(a.pipeline_class for a in ADAPTERS.values())}")


__all__ = ["ADAPTERS", "Array", "BlockPolicy", "BlockRef", "FluxAdapter", "LinearGroup", "ModelAdapter",
           "PixArtAdapter", "SanaAdapter", "State", "adapter_for", "adapter_for_pipeline"]
