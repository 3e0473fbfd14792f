"""Every method on several models, as one table: :func:`run`.

For each model this runs the PTQ flow (:func:`svdquant_jax.flows.ptq.run`: reference images,
calibration, then each method; every step reuses what an earlier run left on disk) and collects
one row per (model, method): PSNR and SSIM of the generated images against the full-precision
ones, the relative error of the last block's output on the calibration samples, the weight size
and the quantization time. The table goes to ``<output_root>/model_report.md``, the per-block
errors of every method to ``<output_root>/<model>_block_errors.png``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from svdquant_jax.flows import plots, ptq, ptq_config
from svdquant_jax.utils import compile_cache
from svdquant_jax.utils.files import atomic_write_text

ALL_METHODS = ("int4", "int4+gptq", "nvfp4", "w8a8", "rtn-int4", "rtn-nvfp4", "rtn-w8a8", "w4a16", "nf4")
REPORT_MD = "model_report.md"


def model_config(model: str, methods: Sequence[str], output_root: str, *, num_prompts: int | None = None,
                 calib_samples: int | None = None, num_grids: int | None = None,
                 compilation_cache: str = compile_cache.AUTO) -> Any:
  """The PTQ config of one model: the first method, the others as its baselines (``compilation_cache``:
  see :mod:`svdquant_jax.utils.compile_cache`)."""
  if not methods:
    raise ValueError("no methods given")
  config = ptq_config.compose(model)
  ptq_config.apply(config, methods[0], sep="+")
  config.eval.baselines = tuple(methods[1:])
  config.output_root = output_root
  config.compilation_cache = compilation_cache
  if num_prompts is not None:
    config.eval.num_prompts = num_prompts
  if calib_samples is not None:
    config.calib.num_samples = calib_samples
  if num_grids is not None:
    config.quant.smooth.num_grids = num_grids
  return config


def run(models: Sequence[str], methods: Sequence[str], output_root: str, **overrides: Any) -> str:
  """Runs every method on every model; returns (and writes, and prints) the report."""
  compile_cache.configure(overrides.get("compilation_cache", compile_cache.AUTO))
  results = [ptq.run(model_config(m, methods, output_root, **overrides)) for m in models]
  for res in results:
    if any("block_errors" in r for r in res["rows"]):
      plots.plot_block_errors(res["rows"], os.path.join(output_root, f"{res['model']}_block_errors.png"))
  header = ("Quantized vs full-precision, per model and method. PSNR/SSIM of the images against the "
            "full-precision images (same prompts and seeds); last-block error: relative error of the last "
            "transformer block's output on the calibration samples, all quantized layers applied.")
  settings = "\n".join(f"- {r['model']}: {json.dumps(r['settings'])}" for r in results)
  text = f"{header}\n\n{ptq.results_table(results)}\n\nGeneration settings:\n{settings}\n"
  atomic_write_text(os.path.join(output_root, REPORT_MD), text)
  print(text)
  return text
