"""Generates images for a list of prompts: the reference images of the quantization flow.

    python launch/generate.py                               # flux-tiny, the first 4 built-in prompts
    python launch/generate.py --config.prompts="a red cube|a blue sphere" --config.num_steps=2
    python launch/generate.py --config.model=pixart-sigma --config.model_path=/data/PixArt-Sigma \
        --config.prompts_path=prompts.yaml --config.num_prompts=0 --config.output_dir=runs/ref

Writes into ``output_dir``: ``00000.png``, ``00001.png``, ... (one per prompt, in prompt order),
``contact_sheet.png`` with its text index ``contact_sheet.png.txt`` (row, column, index, prompt),
and ``generation.json`` (model, settings with the defaults filled in, per prompt its text, seed
and file, timings). Every file is written atomically.

Each prompt's noise comes from ``jax.random.key(prompt_seed(prompt, seed))``, and every pipeline
call has the same batch size (the last batch is padded by repeating its last prompt), so an
image depends only on the model, the settings, the seed and its own prompt: not on its position
in the list or on the other prompts.

The core is :func:`svdquant_jax.flows.generation.generate_images`, which the PTQ command
calls with the full-precision and the quantized transformer. ``--config.quantized_model`` runs a
quantized transformer saved by ``launch/ptq.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from svdquant_jax.pipelines import prompts as prompts_lib  # noqa: E402
from svdquant_jax.flows.generation import (  # noqa: E402,F401  (re-exported for callers of this module)
    CONTACT_SHEET, GENERATION_JSON, GenerationSettings, generate_images, image_file)
from svdquant_jax.pipelines.loading import load_pipeline  # noqa: E402
from svdquant_jax.quant import quantized_model as qmodel  # noqa: E402
from svdquant_jax.quant.adapters import adapter_for  # noqa: E402
from svdquant_jax.quant.collect import pipeline_family  # noqa: E402

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "generate.py")


def define_flags() -> None:
  """Defines ``--config`` (once per process; the entry point and tests call it)."""
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Generation settings (configs/generate.py).",
                                    lock_config=True)


def prompts_from_config(config: Any) -> list[str]:
  """``config.prompts`` (``|``-separated), else ``config.prompts_path``, else the built-in list;
  the first ``config.num_prompts`` of a file or the built-in list (0: all)."""
  if config.prompts:
    prompts = [p.strip() for p in config.prompts.split("|")]
    if not all(prompts):
      raise ValueError(f"config.prompts={config.prompts!r} holds an empty prompt (check the '|' separators)")
    return prompts
  prompts = prompts_lib.load_prompts(config.prompts_path) if config.prompts_path else list(
      prompts_lib.BUILTIN_PROMPTS)
  n = config.num_prompts
  if isinstance(n, bool) or not isinstance(n, int) or n < 0:
    raise ValueError(f"config.num_prompts must be an int >= 0, got {n!r}")
  return prompts[:n] if n else prompts


def settings_from_config(config: Any) -> GenerationSettings:
  return GenerationSettings(seed=config.seed, num_steps=config.num_steps, guidance=config.guidance,
                            height=config.height, width=config.width,
                            max_sequence_length=config.max_sequence_length, batch_size=config.batch_size,
                            contact_sheet_columns=config.contact_sheet_columns)


def run(config: Any) -> dict[str, Any]:
  """Loads the model named by ``config`` and generates its images (see :func:`generate_images`)."""
  prompts = prompts_from_config(config)
  settings = settings_from_config(config)
  pipeline = load_pipeline(config.model, path=config.model_path or None, dtype=config.dtype or None)
  transformer_fn = transformer_params = None
  if config.quantized_model:
    adapter = adapter_for(pipeline_family(pipeline), pipeline.transformer_config)
    transformer_fn, transformer_params, meta = qmodel.load_for_model(config.quantized_model, adapter)
    logging.info("quantized transformer %r from %s", meta.get("name"), config.quantized_model)
  return generate_images(pipeline, prompts, settings, config.output_dir, progress=config.progress,
                         transformer_fn=transformer_fn, transformer_params=transformer_params)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; settings go through --config.<field>=...")
  run(flags.FLAGS.config)


if __name__ == "__main__":
  define_flags()
  app.run(main)
