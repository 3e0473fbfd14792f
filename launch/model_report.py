"""Model-level comparison of every method on the tiny models, as one table.

    python launch/model_report.py                       # flux-tiny and pixart-tiny, all methods
    python launch/model_report.py --models=flux-tiny --methods=int4,rtn-int4 --num_prompts=4

For each model this runs the PTQ flow of ``launch/ptq.py`` (reference images, calibration, then
each method; every step reuses what an earlier run left on disk) and collects one row per
(model, method): PSNR and SSIM of the generated images against the full-precision ones, the
relative error of the last block's output on the calibration samples, the weight size and the
quantization time. The table is printed and written to ``<output_root>/model_report.md``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402

from launch import ptq as ptq_launch  # noqa: E402
from svdquant_jax.utils.files import atomic_write_text  # noqa: E402

ALL_METHODS = ("int4", "int4+gptq", "nvfp4", "w8a8", "rtn-int4", "rtn-nvfp4", "rtn-w8a8", "w4a16", "nf4")

_MODELS = flags.DEFINE_list("models", ["flux-tiny", "pixart-tiny"], "Model presets (configs/models/).")
_METHODS = flags.DEFINE_list("methods", list(ALL_METHODS),
                             "Config parts of the methods (configs/svdquant/, configs/baselines/); join parts "
                             "with '+' (int4+gptq).")
_OUTPUT_ROOT = flags.DEFINE_string("output_root", "runs", "Where the runs and the report go.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Evaluation prompts per model (default: the preset's).")
_CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", None, "Calibration samples (default: the preset's).")
_NUM_GRIDS = flags.DEFINE_integer("num_grids", None, "Smoothing grid size (default 20: 39 candidates).")


def model_config(model: str, methods: Sequence[str], output_root: str, *, num_prompts: int | None = None,
                 calib_samples: int | None = None, num_grids: int | None = None) -> Any:
  """The ``launch/ptq.py`` config of one model: the first method, the others as baselines."""
  if not methods:
    raise ValueError("no methods given")
  config = ptq_launch._config_module().compose(model)
  for part in methods[0].split("+"):
    ptq_launch._config_module()._part(part).update(config)
  config.eval.baselines = tuple(methods[1:])
  config.output_root = output_root
  if num_prompts is not None:
    config.eval.num_prompts = num_prompts
  if calib_samples is not None:
    config.calib.num_samples = calib_samples
  if num_grids is not None:
    config.quant.smooth.num_grids = num_grids
  return config


def report_table(results: Sequence[dict[str, Any]]) -> str:
  lines = ["| model | method | format | rank | PSNR (dB) ↑ | SSIM ↑ | last-block rel. err ↓ | weights (MB) | "
           "quantize (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for res in results:
    for r in res["rows"]:
      err = f"{r['final_block_error']:.4f}" if "final_block_error" in r else "-"
      lines.append(f"| {res['model']} | {r['method']} | {r['format']} | {r['rank']} | {r['psnr']:.2f} | "
                   f"{r['ssim']:.3f} | {err} | {r['weight_mb']:.2f} | {r['quant_seconds']:.1f} |")
  return "\n".join(lines)


def run(models: Sequence[str], methods: Sequence[str], output_root: str, **overrides: Any) -> str:
  results = [ptq_launch.run(model_config(m, methods, output_root, **overrides)) for m in models]
  header = ("Quantized vs full-precision, per model and method. PSNR/SSIM of the images against the "
            "full-precision images (same prompts and seeds); last-block error: relative error of the last "
            "transformer block's output on the calibration samples, all quantized layers applied.")
  settings = "\n".join(f"- {r['model']}: {json.dumps(r['settings'])}" for r in results)
  text = f"{header}\n\n{report_table(results)}\n\nGeneration settings:\n{settings}\n"
  atomic_write_text(os.path.join(output_root, "model_report.md"), text)
  print(text)
  return text


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  run(_MODELS.value, _METHODS.value, _OUTPUT_ROOT.value, num_prompts=_NUM_PROMPTS.value,
      calib_samples=_CALIB_SAMPLES.value, num_grids=_NUM_GRIDS.value)


if __name__ == "__main__":
  app.run(main)
