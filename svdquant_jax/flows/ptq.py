"""SVDQuant post-training quantization end to end: :func:`run` (the seed's three steps plus evaluation).

Steps (each resumes what an earlier, interrupted run left on disk):
  1. reference images of the full-precision model for the evaluation prompts;
  2. calibration set: the transformer inputs of every denoising step over the calibration prompts;
  3. quantization of the configured method and of each baseline (``config.eval.baselines``),
     block by block, with per-block progress saved (orbax);
  4. the quantized model saved (orbax, ``config.save_model``), images generated with it, and the
     evaluation step (:mod:`svdquant_jax.flows.evaluate`): PSNR, SSIM, LPIPS and FID against the
     reference images, and with a benchmark or a CLIP model the ground-truth metrics (FID against
     real images, CLIP score, CLIP-IQA); a metric without weights or with too few images for FID
     is listed under the table with the reason. The table (also per-block output error, weight
     size, quantization time) is written as ``results.md`` / ``results.json``, with a plot of the
     per-block error of every method (``block_errors.png``) and a comparison sheet per method
     (``<method>/comparison.png``: its images beside the reference with a difference heatmap).

Prompts: the first ``eval.num_prompts`` of the built-in list or ``eval.prompts_path`` (images
``00000.png``, ... seeded by prompt, :mod:`~svdquant_jax.flows.generation`), or with
``eval.benchmark`` the benchmark's protocol subset of ``eval.num_prompts`` samples (images
``<name>.png`` seeded by name, :func:`~svdquant_jax.flows.evaluate.generate_samples`), so that the
numbers are comparable with deepcompressor's.

Everything goes under ``<output_root>/<model>/<protocol>/``. The config is
:mod:`svdquant_jax.flows.ptq_config`'s.

Data parallel (``calib.data_parallel``, default on): the quantization splits the calibration
samples over every device (of every process, after ``jax.distributed.initialize``; see
``launch/ptq.py``). With several processes, process 0 alone makes the reference images and the
calibration set (the others wait, then read it from the shared output folder), writes the
progress files, and saves, evaluates and reports; every process takes part in the quantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import jax.numpy as jnp

from svdquant_jax.eval import protocol
from svdquant_jax.flows import eval_metrics, evaluate, plots, ptq_config
from svdquant_jax.flows.eval_metrics import ImageSet, Inputs
from svdquant_jax.flows.generation import GENERATION_JSON, GenerationSettings, generate_images, image_file
from svdquant_jax.pipelines import prompts as prompts_lib
from svdquant_jax.pipelines.loading import load_pipeline
from svdquant_jax.quant import collect, ptq
from svdquant_jax.quant import quantized_model
from svdquant_jax.quant.adapters import adapter_for_pipeline
from svdquant_jax.quant.calib_cache import CalibrationSet
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.utils import compile_cache, sharding
from svdquant_jax.utils.files import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
BLOCK_ERRORS_PNG = "block_errors.png"
COMPARISON_PNG = "comparison.png"


def generation_settings(config: Any, pipeline: Any) -> GenerationSettings:
  """The evaluation protocol of ``config.pipeline`` with the model's defaults filled in."""
  p = config.pipeline
  pick = lambda v: None if v is None or v < 0 else v  # noqa: E731
  return GenerationSettings(seed=config.seed, num_steps=pick(p.num_steps), guidance=pick(p.guidance),
                            height=pick(p.height), width=pick(p.width), batch_size=p.batch_size).resolved(pipeline)


def protocol_name(s: GenerationSettings) -> str:
  """Folder name of an evaluation protocol (deepcompressor: e.g. ``fmeuler50-g3.5``)."""
  return f"{s.num_steps}steps-g{s.guidance:g}-{s.height}x{s.width}-seed{s.seed}"


def benchmark_samples(config: Any) -> list[protocol.Sample] | None:
  """The protocol's subset of ``eval.num_prompts`` samples of ``eval.benchmark`` (None without one)."""
  if not config.eval.get("benchmark", ""):
    return None
  if config.eval.prompts_path:
    raise ValueError("give eval.prompts_path or eval.benchmark, not both")
  if config.eval.num_prompts <= 0:
    raise ValueError("eval.num_prompts must be positive (the benchmark subset's size)")
  return evaluate.benchmark_images(config.eval, config.eval.num_prompts).samples


def prompt_sets(config: Any) -> tuple[list[str], list[str]]:
  """``(evaluation prompts, calibration prompts)``.

  Evaluation: the first ``eval.num_prompts`` of its source (with ``eval.benchmark``, the
  protocol's subset of that size). Calibration: a seeded random ``calib.num_prompts`` of its
  source; when both come from the built-in list, calibration draws only from prompts not used
  for evaluation, as deepcompressor calibrates on COCO and evaluates on MJHQ.
  """
  builtin = list(prompts_lib.BUILTIN_PROMPTS)
  samples = benchmark_samples(config)
  eval_source = prompts_lib.load_prompts(config.eval.prompts_path) if config.eval.prompts_path else builtin
  eval_prompts = [s.prompt for s in samples] if samples is not None else eval_source[:config.eval.num_prompts]
  if not eval_prompts:
    raise ValueError("no evaluation prompts: eval.num_prompts must be positive")
  if config.calib.prompts_path:
    calib_source = prompts_lib.load_prompts(config.calib.prompts_path)
  else:
    own = not config.eval.prompts_path and samples is None
    calib_source = [p for p in builtin if p not in eval_prompts] if own else builtin
  n = min(config.calib.num_prompts, len(calib_source))
  if n <= 0:
    raise ValueError("no calibration prompts: calib.num_prompts must be positive and the prompt list non-empty")
  return eval_prompts, prompts_lib.select_prompts(calib_source, n, seed=config.calib.seed)


def _reference_images(pipeline: Any, prompts: list[str], settings: GenerationSettings, folder: str,
                      samples: list[protocol.Sample] | None = None, mesh: Any = None) -> None:
  """Generates the full-precision images unless ``folder`` already holds them for these settings."""
  if samples is not None:
    evaluate.generate_samples(pipeline, samples, settings, folder, mesh=mesh)
    return
  meta_path = os.path.join(folder, GENERATION_JSON)
  if os.path.isfile(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if meta["settings"] == dataclasses.asdict(settings) and [r["prompt"] for r in meta["images"]] == prompts:
      logging.info("reference images: reusing %s", folder)
      return
  logging.info("reference images: generating %d images into %s", len(prompts), folder)
  generate_images(pipeline, prompts, settings, folder)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What every method of one run shares."""
  pipeline: Any
  state: Any
  identity: dict[str, Any]
  eval_prompts: list[str]
  generation: GenerationSettings
  root: str
  evaluator: evaluate.Evaluator
  images: evaluate.ImageList
  reference: str
  samples: list[protocol.Sample] | None = None
  mesh: Any = None


def quantize_and_evaluate(config: Any, run: _Run) -> dict[str, Any] | None:
  """One method: quantize (resumable), save, generate, compare. Returns its results row (``None``
  on the processes other than 0 of a multi-process run, which only quantize)."""
  pipeline = run.pipeline
  adapter = adapter_for_pipeline(pipeline)
  settings = PTQSettings.from_config(config, adapter.config.param_dtype)
  run_dir = os.path.join(run.root, config.quant.name)
  identity = ptq.run_identity(settings, run.identity["model"], run.identity["calibration"], run.identity["samples"])
  store = ptq.ProgressStore(os.path.join(run_dir, "progress"), identity, resume=config.resume)
  start = time.monotonic()
  blocks = _PackedBlocks(pipeline.transformer_params, jnp.dtype(adapter.config.param_dtype))
  ptq.quantize_transformer(adapter, pipeline.transformer_params, run.state, settings, progress=store,
                           log=logging.info, mesh=run.mesh, on_block=blocks.pack)
  seconds = time.monotonic() - start
  if not sharding.is_main_process():
    return None
  params, specs = jax.device_put({**pipeline.transformer_params, **blocks.trees}), blocks.specs
  if config.save_model:
    quantized_model.save_quantized(os.path.join(run_dir, "model"), params, specs, metadata={
        "family": adapter.family, "model": config.model, "model_config": repr(adapter.config),
        "fingerprint": run.identity["model"], "settings": settings.to_json(), "name": config.quant.name,
        **_transformer_config(adapter.config)})
  samples = os.path.join(run_dir, "samples")
  transformer_fn = quantized_model.transformer_fn(adapter, specs)
  if run.samples is not None:
    evaluate.generate_samples(pipeline, run.samples, run.generation, samples, transformer_fn=transformer_fn,
                              transformer_params=params, mesh=run.evaluator.context.mesh, reuse=False)
  else:
    generate_images(pipeline, run.eval_prompts, run.generation, samples, transformer_fn=transformer_fn,
                    transformer_params=params)
  method = ImageSet(samples, run.images.files)
  reference = ImageSet(run.reference, run.images.files, "reference")
  results = run.evaluator.evaluate(Inputs(method, reference, run.images.real, run.images.prompts), config.quant.name)
  row = {"method": config.quant.name, "format": config.quant.format, "rank": settings.rank,
         "smooth": settings.smooth, "gptq": settings.gptq, **evaluate.result_fields(results),
         "weight_mb": quantized_model.weight_bytes(params) / 2 ** 20, "quant_seconds": round(seconds, 1),
         "samples": samples}
  sheet = evaluate.write_comparison(os.path.join(run_dir, COMPARISON_PNG), method, reference, config.quant.name,
                                    config.eval.get("contact_sheet_images", 8), results)
  if sheet:
    row["comparison"] = sheet
  if config.eval.block_errors:
    state = run.state
    if jax.process_count() > 1:
      state = jax.tree_util.tree_map(lambda a: jnp.asarray(sharding.to_host(a)), state)
    errs = ptq.block_errors(adapter, pipeline.transformer_params, state, store.load, settings.batch_size)
    row["block_errors"] = errs
    row["final_block_error"] = errs[-1][1]
  return row


@dataclasses.dataclass
class _PackedBlocks:
  """Packs each block's quantized layers as soon as the block is done (``on_block`` of
  :func:`~svdquant_jax.quant.ptq.quantize_transformer`), so that only the deployed form (4-bit codes,
  scales, branch in the param dtype) accumulates; the float layers stay on disk in the progress store."""
  params: Any
  dtype: Any
  trees: dict[str, Any] = dataclasses.field(default_factory=dict)
  specs: dict[str, Any] = dataclasses.field(default_factory=dict)

  def pack(self, name: str, layers: dict[str, ptq.QuantizedLayer]) -> None:
    if not sharding.is_main_process():
      return
    if jax.process_count() > 1:  # process-local copies of the (replicated) weights
      local = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(sharding.to_host(a)), tree)  # noqa: E731
      layers = {k: dataclasses.replace(q, weights=local(q.weights)) for k, q in layers.items()}
    self.trees[name], specs = quantized_model.quantize_params(self.params[name], layers, self.dtype)
    self.specs.update({f"{name}/{k}": v for k, v in specs.items()})


def _transformer_config(model_config: Any) -> dict[str, Any]:
  """The transformer's diffusers config and dtypes, for tools that rebuild the model from the saved folder
  (``launch/export_nunchaku.py``); only for configs that can write one."""
  if not hasattr(model_config, "to_diffusers"):
    return {}
  return {"transformer_config": {"diffusers": model_config.to_diffusers(), "dtype": model_config.dtype.name,
                                 "param_dtype": model_config.param_dtype.name}}


def results_table(results: Sequence[dict[str, Any]]) -> str:
  """One markdown table over the results of one or more :func:`run` calls (a row per model and method).

  Columns: PSNR and SSIM, then every other metric that some row has (LPIPS, FID, ...), the
  last-block error, weights and quantization time; the full-precision row shows the reference
  metrics of identical images and its own ground-truth metrics. Notes (metrics not computed and
  why, values marked †) follow the table.
  """
  psnr, ssim = eval_metrics.REGISTRY["psnr"], eval_metrics.REGISTRY["ssim"]
  rows = [r for res in results for r in res["rows"] + [res.get("reference_row", {})]]
  extra = [m for m in eval_metrics.REGISTRY.values()
           if m.name not in ("psnr", "ssim") and any(m.name in r for r in rows)]
  head = ["model", "method", "format", "rank", psnr.label, ssim.label] + [m.label for m in extra] + [
      "last-block rel. err ↓", "weights (MB)", "quantize (s)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  notes, daggers = [], []
  for res in results:
    fp = {**res.get("reference_row", {}), "method": "full precision", "identity": True}
    cells = [m.identity if m.against == eval_metrics.REFERENCE else evaluate.format_value(m, fp) for m in extra]
    lines.append("| " + " | ".join([res["model"], "full precision", "-", "-", psnr.identity, ssim.identity] + cells
                                   + ["0", f"{res['fp_weight_mb']:.2f}", "-"]) + " |")
    for r in res["rows"]:
      err = f"{r['final_block_error']:.4f}" if "final_block_error" in r else "-"
      cells = [evaluate.format_value(m, r) for m in [psnr, ssim] + extra]
      lines.append("| " + " | ".join([res["model"], r["method"], r["format"], str(r["rank"])] + cells
                                     + [err, f"{r['weight_mb']:.2f}", f"{r['quant_seconds']:.1f}"]) + " |")
    for r in [fp] + list(res["rows"]):
      for m in extra:
        note = r.get("value_notes", {}).get(m.name)
        line = f"† {evaluate.bare_label(m.label)}: {note}"
        if note and line not in daggers:
          daggers.append(line)
    notes += [n for n in res.get("notes", []) if n not in notes]
  return "\n".join(lines + [""] * bool(daggers or notes) + daggers + [f"- {n}" for n in notes])


def _offload_transformer(setting: Any) -> bool:
  """``calib.offload_transformer``: ``"true"`` / ``"false"``, or ``"auto"`` (on unless the backend is
  the CPU, whose device memory is the host's)."""
  value = str(setting).strip().lower()
  if value == "auto":
    return jax.default_backend() != "cpu"
  if value not in ("true", "false"):
    raise ValueError(f"calib.offload_transformer must be 'auto', 'true' or 'false', got {setting!r}")
  return value == "true"


def _sync(what: str) -> None:
  """Waits for every process (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(what)


def run(config: Any) -> dict[str, Any]:
  """Runs the whole flow for ``config`` (:mod:`~svdquant_jax.flows.ptq_config`).

  Returns:
    The results (also written to ``results.json``): ``model``, ``settings`` (generation),
    ``reference`` (the reference image folder), ``fp_weight_mb``, ``rows`` (one per method:
    ``method, format, rank, smooth, gptq, psnr, ssim, weight_mb, quant_seconds, samples`` and,
    with ``eval.block_errors``, ``block_errors`` and ``final_block_error``) and ``config``.
    With ``output_dirname="reference"`` only ``{"reference": folder}``. On the processes other
    than 0 of a multi-process run: ``model``, empty ``rows`` and ``process_index``.
  """
  if config.output_dirname not in ("", "reference"):
    raise ValueError(f"output_dirname={config.output_dirname!r}: only 'reference' (or empty) is supported")
  compile_cache.configure(config.get("compilation_cache", compile_cache.AUTO))
  methods = ptq_config.method_configs(config)
  main = sharding.is_main_process()
  mesh = sharding.global_batch_mesh() if config.calib.get("data_parallel", True) else None
  pipeline = load_pipeline(config.model, path=config.model_path or None)
  generation = generation_settings(config, pipeline)
  root = os.path.join(config.output_root, config.model, protocol_name(generation))
  eval_prompts, calib_prompts = prompt_sets(config)
  samples = benchmark_samples(config)
  if samples is not None:
    images = evaluate.benchmark_images(config.eval, config.eval.num_prompts)
  else:
    images = evaluate.ImageList([image_file(i) for i in range(len(eval_prompts))], eval_prompts)
  available = ["reference", "prompts"] + ["real"] * (images.real is not None)
  evaluator = evaluate.Evaluator(config.eval, len(images.files), available)

  # 1. reference images (process 0)
  ref_dir = os.path.join(root, "reference")
  if main:
    _reference_images(pipeline, eval_prompts, generation, ref_dir, samples, evaluator.context.mesh)
  if config.output_dirname == "reference":
    print(f"reference images in {ref_dir}")
    return {"reference": ref_dir}

  # 2. calibration set (process 0 collects; the others read it once it is complete)
  calib_dir = config.calib.path or os.path.join(root, "calib")
  if main:
    calib = collect.collect_calibration(pipeline, calib_prompts, calib_dir, num_steps=generation.num_steps,
                                        guidance=generation.guidance, height=generation.height,
                                        width=generation.width, seed=generation.seed,
                                        batch_size=generation.batch_size, model_name=config.model, log=logging.info)
  _sync("calibration set")
  if not main:
    calib = CalibrationSet(calib_dir, fingerprint=collect.transformer_fingerprint(pipeline))
  indices = calib.select(config.calib.num_samples, config.calib.seed)
  logging.info("calibration: %d of %d samples from %s", len(indices), len(calib), calib_dir)
  adapter = adapter_for_pipeline(pipeline)
  state = ptq.initial_state(adapter, pipeline.transformer_params, calib, indices, config.calib.batch_size)
  if _offload_transformer(config.calib.get("offload_transformer", "auto")):
    # The float transformer is only read block by block from here on (quantization, packing, the
    # error table); the device keeps one block at a time (ptq.quantize_transformer puts it there).
    pipeline.transformer_params = jax.device_get(pipeline.transformer_params)
    logging.info("float transformer moved to host memory (%.2f GB) for the quantization",
                 quantized_model.weight_bytes(pipeline.transformer_params) / 1e9)
  shared = _Run(pipeline, state, {"model": calib.fingerprint, "calibration": calib.fingerprint + str(calib.settings),
                                  "samples": indices}, eval_prompts, generation, root, evaluator, images, ref_dir,
                samples, mesh)

  # 3-4. the method and its baselines
  rows = []
  for c in methods:
    rows.append(quantize_and_evaluate(c, shared))
    # Many methods in one process compile thousands of programs; bound their memory mappings.
    if compile_cache.release_compiled_programs():
      logging.info("dropped the in-memory compiled programs (over %d memory mappings)", compile_cache.MAX_MAPPINGS)
  if not main:
    return {"model": config.model, "rows": [], "process_index": jax.process_index()}
  reference_row = {}
  if any(m.against == eval_metrics.GROUND_TRUTH for m in evaluator.active):
    reference_row = evaluate.result_fields(evaluator.evaluate(
        Inputs(ImageSet(ref_dir, images.files), None, images.real, images.prompts), "full precision"))
  results = {"model": config.model, "settings": dataclasses.asdict(generation), "reference": ref_dir,
             "fp_weight_mb": quantized_model.weight_bytes(pipeline.transformer_params) / 2 ** 20, "rows": rows,
             "reference_row": reference_row, "notes": evaluator.note_lines(),
             "config": json.loads(config.to_json_best_effort())}
  source = f"the {images.benchmark} subset" if images.benchmark else "evaluation prompts"
  header = (f"{config.model}: {len(eval_prompts)} {source}, {generation.num_steps} steps, guidance "
            f"{generation.guidance:g}, {generation.height}x{generation.width}; calibration {len(indices)} samples "
            f"from {len(calib_prompts)} prompts. Reference metrics (PSNR, SSIM, LPIPS, FID vs ref) against the "
            "full-precision images; last-block error on the calibration samples.")
  atomic_write_text(os.path.join(root, RESULTS_JSON), json.dumps(results, indent=1, default=str))
  atomic_write_text(os.path.join(root, RESULTS_MD), header + "\n\n" + results_table([results]) + "\n")
  if config.eval.block_errors:
    plots.plot_block_errors(rows, os.path.join(root, BLOCK_ERRORS_PNG))
  print(header + "\n\n" + results_table([results]) + f"\n\nimages, models and results under {root}")
  return results
