"""SVDQuant post-training quantization, end to end (the seed's three steps plus evaluation).

    python launch/ptq.py                                            # flux-tiny, SVDQuant INT4 + baselines
    python launch/ptq.py --config=configs/ptq.py:pixart-tiny,int4
    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq --config.model_path=/data/FLUX.1-schnell
    python launch/ptq.py --config=configs/ptq.py:flux-dev --config.model_path=... --config.output_dirname=reference

Steps (each resumes what an earlier, interrupted run left on disk):
  1. reference images of the full-precision model for the evaluation prompts;
  2. calibration set: the transformer inputs of every denoising step over the calibration prompts;
  3. quantization of the configured method and of each baseline (``config.eval.baselines``),
     block by block, with per-block progress saved (orbax);
  4. the quantized model saved (orbax, ``--config.save_model``), images generated with it, and a
     table of image similarity (PSNR, SSIM vs the reference images), per-block output error,
     weight size and quantization time, printed and written as ``results.md`` / ``results.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import sys
import time
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app, flags, logging  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from svdquant_jax.eval import metrics  # noqa: E402
from svdquant_jax.pipelines import prompts as prompts_lib  # noqa: E402
from svdquant_jax.flows.generation import GENERATION_JSON, GenerationSettings, generate_images, image_file  # noqa: E402,E501
from svdquant_jax.pipelines.loading import load_pipeline  # noqa: E402
from svdquant_jax.quant import collect, ptq  # noqa: E402
from svdquant_jax.quant import quantized_model as qmodel  # noqa: E402
from svdquant_jax.quant.adapters import adapter_for  # noqa: E402
from svdquant_jax.utils.files import atomic_write_text  # noqa: E402
from svdquant_jax.utils.png import read_png  # noqa: E402



def define_flags() -> None:
  """Defines ``--config`` (once per process; the entry point and tests call it)."""
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file("config", os.path.join(_REPO, "configs", "ptq.py"),
                                    "PTQ settings (configs/ptq.py:<parts>).", lock_config=True)


def _config_module():
  spec = importlib.util.spec_from_file_location("svdquant_ptq_config", os.path.join(_REPO, "configs", "ptq.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _generation_settings(config: Any, pipeline: Any) -> GenerationSettings:
  p = config.pipeline
  pick = lambda v: None if v is None or v < 0 else v  # noqa: E731
  return GenerationSettings(seed=config.seed, num_steps=pick(p.num_steps), guidance=pick(p.guidance),
                            height=pick(p.height), width=pick(p.width), batch_size=p.batch_size).resolved(pipeline)


def _protocol(s: GenerationSettings) -> str:
  """Folder name of an evaluation protocol (deepcompressor: e.g. ``fmeuler50-g3.5``)."""
  return f"{s.num_steps}steps-g{s.guidance:g}-{s.height}x{s.width}-seed{s.seed}"


def prompt_sets(config: Any) -> tuple[list[str], list[str]]:
  """``(evaluation prompts, calibration prompts)``.

  Evaluation: the first ``eval.num_prompts`` of its source. Calibration: a seeded random
  ``calib.num_prompts`` of its source; when both come from the built-in list, calibration
  draws only from prompts not used for evaluation, as deepcompressor calibrates on COCO and
  evaluates on MJHQ.
  """
  builtin = list(prompts_lib.BUILTIN_PROMPTS)
  eval_source = prompts_lib.load_prompts(config.eval.prompts_path) if config.eval.prompts_path else builtin
  eval_prompts = eval_source[:config.eval.num_prompts]
  if not eval_prompts:
    raise ValueError("no evaluation prompts: eval.num_prompts must be positive")
  if config.calib.prompts_path:
    calib_source = prompts_lib.load_prompts(config.calib.prompts_path)
  else:
    calib_source = [p for p in builtin if p not in eval_prompts] if not config.eval.prompts_path else builtin
  n = min(config.calib.num_prompts, len(calib_source))
  if n <= 0:
    raise ValueError("no calibration prompts: calib.num_prompts must be positive and the prompt list non-empty")
  return eval_prompts, prompts_lib.select_prompts(calib_source, n, seed=config.calib.seed)


def _reference_images(pipeline: Any, prompts: list[str], settings: GenerationSettings, folder: str) -> None:
  """Generates the full-precision images unless ``folder`` already holds them for these settings."""
  meta_path = os.path.join(folder, GENERATION_JSON)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta["settings"] == dataclasses.asdict(settings) and [r["prompt"] for r in meta["images"]] == prompts:
      logging.info("reference images: reusing %s", folder)
      return
  logging.info("reference images: generating %d images into %s", len(prompts), folder)
  generate_images(pipeline, prompts, settings, folder)


def _read_images(folder: str, count: int) -> np.ndarray:
  return np.stack([read_png(os.path.join(folder, image_file(i))) for i in range(count)])


def method_configs(config: Any) -> list[Any]:
  """The configured method followed by each baseline (a copy with its quant section replaced).

  A baseline is a config part name or several joined by ``+`` (``nvfp4+gptq``), applied to the
  base quant section in order.
  """
  module = _config_module()
  out = [config]
  for name in config.eval.baselines:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.quant = module.base().quant
    for part in name.split("+"):
      module._part(part).update(c)
    out.append(c)
  names = [c.quant.name for c in out]
  if len(set(names)) != len(names):
    raise ValueError(f"two methods share a name (their runs would share a folder): {names}")
  return out


def quantize_and_evaluate(config: Any, pipeline: Any, state: Any, identity_base: dict, eval_prompts: list[str],
                          settings: GenerationSettings, reference: np.ndarray, root: str) -> dict[str, Any]:
  """One method: quantize (resumable), save, generate, compare. Returns its results row."""
  s = ptq.PTQSettings.from_config(config)
  adapter = adapter_for(collect.pipeline_family(pipeline), pipeline.transformer_config)
  run_dir = os.path.join(root, config.quant.name)
  identity = ptq.run_identity(s, identity_base["model"], identity_base["calibration"], identity_base["samples"])
  store = ptq.ProgressStore(os.path.join(run_dir, "progress"), identity, resume=config.resume)
  start = time.monotonic()
  layers = ptq.quantize_transformer(adapter, pipeline.transformer_params, state, s, progress=store,
                                    log=logging.info)
  seconds = time.monotonic() - start
  dtype = jnp.dtype(pipeline.transformer_config.param_dtype)
  params, specs = qmodel.quantize_params(pipeline.transformer_params, layers, dtype)
  if config.save_model:
    qmodel.save_quantized(os.path.join(run_dir, "model"), params, specs, metadata={
        "family": adapter.family, "model": config.model, "model_config": repr(adapter.config),
        "fingerprint": identity_base["model"], "settings": s.to_json(), "name": config.quant.name})
  samples = os.path.join(run_dir, "samples")
  generate_images(pipeline, eval_prompts, settings, samples, transformer_fn=qmodel.transformer_fn(adapter, specs),
                  transformer_params=params)
  images = _read_images(samples, len(eval_prompts))
  row = {"method": config.quant.name, "format": s.format, "rank": s.rank, "smooth": s.smooth, "gptq": s.gptq,
         "psnr": float(np.mean(np.asarray(metrics.psnr(images, reference)))),
         "ssim": float(np.mean(np.asarray(metrics.ssim(images, reference)))),
         "weight_mb": qmodel.weight_bytes(params) / 2 ** 20, "quant_seconds": round(seconds, 1),
         "samples": samples}
  if config.eval.block_errors:
    errs = ptq.block_errors(adapter, pipeline.transformer_params, state, layers, s.batch_size)
    row["block_errors"] = errs
    row["final_block_error"] = errs[-1][1]
  return row


def results_table(rows: list[dict[str, Any]], fp_mb: float) -> str:
  lines = ["| method | format | rank | PSNR (dB) ↑ | SSIM ↑ | last-block rel. err ↓ | weights (MB) | quantize (s) |",
           "|---|---|---|---|---|---|---|---|",
           f"| full precision | - | - | ∞ | 1.000 | 0 | {fp_mb:.2f} | - |"]
  for r in rows:
    err = f"{r['final_block_error']:.4f}" if "final_block_error" in r else "-"
    lines.append(f"| {r['method']} | {r['format']} | {r['rank']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {err} | "
                 f"{r['weight_mb']:.2f} | {r['quant_seconds']:.1f} |")
  return "\n".join(lines)


def run(config: Any) -> dict[str, Any]:
  """Runs the whole flow for ``config``; returns the results (also written to disk)."""
  if config.output_dirname not in ("", "reference"):
    raise ValueError(f"output_dirname={config.output_dirname!r}: only 'reference' (or empty) is supported")
  pipeline = load_pipeline(config.model, path=config.model_path or None)
  settings = _generation_settings(config, pipeline)
  root = os.path.join(config.output_root, config.model, _protocol(settings))
  eval_prompts, calib_prompts = prompt_sets(config)

  # 1. reference images
  ref_dir = os.path.join(root, "reference")
  _reference_images(pipeline, eval_prompts, settings, ref_dir)
  if config.output_dirname == "reference":
    print(f"reference images in {ref_dir}")
    return {"reference": ref_dir}
  reference = _read_images(ref_dir, len(eval_prompts))

  # 2. calibration set
  calib_dir = config.calib.path or os.path.join(root, "calib")
  calib = collect.collect_calibration(pipeline, calib_prompts, calib_dir, num_steps=settings.num_steps,
                                      guidance=settings.guidance, height=settings.height, width=settings.width,
                                      seed=settings.seed, batch_size=settings.batch_size, model_name=config.model,
                                      log=logging.info)
  indices = calib.select(config.calib.num_samples, config.calib.seed)
  logging.info("calibration: %d of %d samples from %s", len(indices), len(calib), calib_dir)
  adapter = adapter_for(collect.pipeline_family(pipeline), pipeline.transformer_config)
  state = ptq.initial_state(adapter, pipeline.transformer_params, calib, indices, config.calib.batch_size)
  identity_base = {"model": calib.fingerprint, "calibration": calib.fingerprint + str(calib.settings),
                   "samples": indices}

  # 3-4. the method and its baselines
  rows = [quantize_and_evaluate(c, pipeline, state, identity_base, eval_prompts, settings, reference, root)
          for c in method_configs(config)]
  table = results_table(rows, qmodel.weight_bytes(pipeline.transformer_params) / 2 ** 20)
  header = (f"{config.model}: {len(eval_prompts)} evaluation prompts, {settings.num_steps} steps, guidance "
            f"{settings.guidance:g}, {settings.height}x{settings.width}; calibration {len(indices)} samples "
            f"from {len(calib_prompts)} prompts. PSNR/SSIM against the full-precision images; last-block error "
            "on the calibration samples.")
  results = {"model": config.model, "settings": dataclasses.asdict(settings), "reference": ref_dir,
             "rows": rows, "config": json.loads(config.to_json_best_effort())}
  atomic_write_text(os.path.join(root, "results.json"), json.dumps(results, indent=1, default=str))
  atomic_write_text(os.path.join(root, "results.md"), header + "\n\n" + table + "\n")
  print(header + "\n\n" + table + f"\n\nimages, models and results under {root}")
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; settings go through --config.<field>=...")
  run(flags.FLAGS.config)


if __name__ == "__main__":
  define_flags()
  app.run(main)
