"""The evaluation step: every metric of every method against the reference images and a benchmark.

:class:`Evaluator` runs the metrics of :mod:`svdquant_jax.flows.eval_metrics` over the images of
one method after another (one pass over the images per method, batch by batch, data-parallel over
the local devices, with a progress display); :func:`run` is ``launch/evaluate.py``, which evaluates
image folders already on disk, and the PTQ flow runs the same step after generating each method's
images. :func:`generate_samples` generates a benchmark's images by its protocol (``<name>.png``,
seeded by the name; :mod:`svdquant_jax.eval.protocol`), data-parallel.

Inputs of :func:`run` (``configs/evaluate.py``):

* the images: a PTQ run folder (``run_dir``: its ``reference/`` and every ``<method>/samples/``),
  or ``reference`` plus ``methods`` (``"name=folder,name=folder"``);
* which images: with a benchmark (``eval.benchmark``, its prompt file; ``eval.benchmark_images``,
  its real images), the protocol's subset of ``eval.num_prompts`` samples (0: as many as the
  reference folder holds), files ``<name>.png``; without, the files listed in the reference
  folder's ``generation.json`` (written by the generate command and the PTQ flow, which also gives
  the prompts), else every image file of the reference folder.

Outputs (``output_dir``): ``results.md`` / ``results.json`` (a row per method; the reference row
has the ground-truth metrics of the full-precision images; per-image values in the JSON), a
comparison sheet ``<method>.comparison.png`` per method (:mod:`svdquant_jax.flows.contact_sheet`),
and ``block_errors.png`` when the run folder's ``results.json`` has per-block errors. A metric that
cannot be computed (no weights, too few images for FID, no benchmark) is named in a note under
the table with the reason; none is left out silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import ml_collections
import numpy as np
from absl import logging

from svdquant_jax.eval import feature_cache, protocol
from svdquant_jax.flows import contact_sheet, eval_metrics, plots, ptq_config
from svdquant_jax.flows.eval_metrics import GROUND_TRUTH, REFERENCE, ImageSet, Inputs, Metric, MetricResult
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.utils import compile_cache, sharding
from svdquant_jax.utils.files import atomic_write_text
from svdquant_jax.utils.progress import Progress

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SHEET_SUFFIX = ".comparison.png"
BLOCK_ERRORS_PNG = "block_errors.png"
PROTOCOL_JSON = "protocol.json"
REFERENCE_ROW = "full precision"
_NEEDS = {"reference": "no reference images", "prompts": "no prompts (a benchmark, or a generation.json beside the "
          "images, gives them)", "real": "no real images (eval.benchmark and eval.benchmark_images)"}


class Evaluator:
  """The metrics of one evaluation, loaded once and run on each method's images.

  Args:
    settings: the ``eval`` config section (fields in :func:`ptq_config.add_metric_fields`).
    num_images: images per method (FID needs enough of them; batches never exceed it).
    available: which inputs exist: a subset of ``{"reference", "prompts", "real"}``.
    progress: show a progress display over batches.
  """

  def __init__(self, settings: Any, num_images: int, available: Sequence[str], progress: bool = True):
    self.settings = settings
    self.progress = progress
    mesh = sharding.batch_mesh() if settings.get("data_parallel", True) else sharding.single_device_mesh()
    batch_size = int(settings.get("batch_size", 16))
    if batch_size < 1:
      raise ValueError(f"eval.batch_size must be positive, got {batch_size}")
    self.context = eval_metrics.Context(settings, mesh, int(num_images), batch_size,
                                        feature_cache.resolve(settings.get("feature_cache", feature_cache.AUTO)))
    self.metrics: list[Metric] = eval_metrics.select(settings.get("metrics", "all"))
    self.starts: dict[str, Any] = {}
    self.notes: dict[str, str] = {}
    for metric in self.metrics:
      missing = [need for need in metric.needs if need not in available]
      if missing:
        self.notes[metric.name] = f"not computed: {_NEEDS[missing[0]]}"
        continue
      try:
        self.starts[metric.name] = metric.setup(self.context)
      except eval_metrics.Unavailable as e:
        self.notes[metric.name] = str(e)
    logging.info("evaluation on %d device(s): %s; not computed: %s", mesh.size, ", ".join(self.starts) or "none",
                 ", ".join(self.notes) or "none")

  @property
  def active(self) -> list[Metric]:
    return [m for m in self.metrics if m.name in self.starts]

  def evaluate(self, inputs: Inputs, label: str = "") -> dict[str, MetricResult]:
    """Every active metric whose inputs ``inputs`` has (the reference row: no reference metrics)."""
    n = len(inputs.method.files)
    for other in (inputs.reference, inputs.real):
      if other is not None and len(other.files) != n:
        raise ValueError(f"{inputs.method.folder}: {n} images, but {other.role} {other.folder}: {len(other.files)}")
    if inputs.prompts is not None and len(inputs.prompts) != n:
      raise ValueError(f"{inputs.method.folder}: {n} images but {len(inputs.prompts)} prompts")
    have = {"reference": inputs.reference is not None, "prompts": inputs.prompts is not None,
            "real": inputs.real is not None}
    accs = {m.name: self.starts[m.name](inputs) for m in self.active if all(have[need] for need in m.needs)}
    if not accs:
      return {}
    size = self.context.padded_batch
    batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    with Progress(len(batches), f"evaluate {label or inputs.method.folder}", enabled=self.progress) as bar:
      for rows in batches:
        batch = eval_metrics.Batch(self.context, inputs, rows)
        for acc in accs.values():
          acc.update(batch)
        bar.update(note=f"images {rows[0] + 1}-{rows[-1] + 1}/{n}")
    return {name: acc.result() for name, acc in accs.items()}

  def note_lines(self) -> list[str]:
    labels = {m.name: m.label for m in self.metrics}
    return [f"{bare_label(labels[name])}: {reason}" for name, reason in self.notes.items()]


def bare_label(label: str) -> str:
  """A column label without its ↑ / ↓."""
  return label.replace(" ↑", "").replace(" ↓", "")


def result_fields(results: dict[str, MetricResult]) -> dict[str, Any]:
  """A results row's metric fields: ``<name>: value``, ``per_image`` and ``value_notes`` (e.g. FID
  from few images)."""
  row: dict[str, Any] = {name: r.value for name, r in results.items()}
  per_image = {name: np.asarray(r.per_image).tolist() for name, r in results.items() if r.per_image is not None}
  if per_image:
    row["per_image"] = per_image
  notes = {name: r.note for name, r in results.items() if r.note}
  if notes:
    row["value_notes"] = notes
  return row


def format_value(metric: Metric, row: dict[str, Any]) -> str:
  value = row.get(metric.name)
  if value is None:
    return "-"
  mark = " †" if metric.name in row.get("value_notes", {}) else ""
  return f"{value:.{metric.digits}f}{mark}"


def metrics_table(rows: Sequence[dict[str, Any]], notes: Sequence[str] = (), metrics: Sequence[Metric] | None = None
                  ) -> str:
  """Markdown: a column per metric present in any row (registry order), then the notes.

  ``rows``: dicts with ``method`` and the metric values (:func:`result_fields`); a row with
  ``identity=True`` (the reference) shows each reference metric's value for identical images.
  """
  metrics = [m for m in (metrics or eval_metrics.REGISTRY.values()) if any(m.name in r for r in rows)]
  lines = ["| method | " + " | ".join(m.label for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
  daggers = []
  for r in rows:
    cells = [m.identity if r.get("identity") and m.against == REFERENCE and m.name not in r else format_value(m, r)
             for m in metrics]
    lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    for m in metrics:
      note = r.get("value_notes", {}).get(m.name)
      line = f"† {bare_label(m.label)}: {note}"
      if note and line not in daggers:  # one line per metric and note, not per row
        daggers.append(line)
  return "\n".join(lines + [""] * bool(daggers or notes) + daggers + [f"- {n}" for n in notes])


# ----------------------------------------------------------------------------- image sets
@dataclasses.dataclass
class ImageList:
  """Which images an evaluation reads: file names (shared by every folder), prompts, real images,
  and for a benchmark its subset's name (``MJHQ-1024``) and samples."""
  files: list[str]
  prompts: list[str] | None = None
  real: ImageSet | None = None
  benchmark: str = ""
  samples: list[protocol.Sample] | None = None


def _generation_records(folder: str) -> list[dict[str, Any]] | None:
  for name in ("generation.json", PROTOCOL_JSON):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        meta = json.load(f)
      records = meta.get("images")
      if isinstance(records, list) and all(isinstance(r, dict) and "file" in r for r in records):
        return records
  return None


def benchmark_images(settings: Any, num: int) -> ImageList:
  """The benchmark's subset of ``num`` samples (``settings.benchmark``, ``benchmark_images``)."""
  bench = protocol.load_benchmark(settings.benchmark, settings.get("benchmark_images", "") or None,
                                  settings.get("benchmark_layout", "auto"))
  samples = bench.select(num)
  real = None
  if bench.images_root:
    missing = [s.real_path for s in samples if not os.path.isfile(s.real_path)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} real image(s) of {bench.name} missing, e.g. {missing[0]} "
                              f"(eval.benchmark_images={bench.images_root})")
    real = ImageSet(bench.images_root, [os.path.relpath(s.real_path, bench.images_root) for s in samples], "real")
  return ImageList([s.file for s in samples], [s.prompt for s in samples], real,
                   protocol.subset_name(bench.name, len(samples)), samples)


def folder_images(folder: str) -> ImageList:
  """The images of a folder: from its ``generation.json`` / ``protocol.json`` (with prompts), else
  every image file."""
  records = _generation_records(folder)
  if records:
    prompts = [r.get("prompt") for r in records]
    return ImageList([r["file"] for r in records], prompts if all(isinstance(p, str) for p in prompts) else None)
  return ImageList(protocol.image_files(folder))


def check_folder(folder: str, files: Sequence[str], what: str) -> None:
  """``folder`` holds exactly the image files ``files`` (else an error naming the difference)."""
  have = protocol.image_files(folder)
  missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
  extra = sorted(set(have) - set(files))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if extra:
      parts.append(f"not in the reference set {len(extra)}: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
    raise ValueError(f"{what} {folder} has {len(have)} images, the evaluation expects {len(files)} "
                     f"({'; '.join(parts)})")


# ----------------------------------------------------------------------------- comparison sheets
def write_comparison(path: str, method: ImageSet, reference: ImageSet, name: str, count: int,
                     results: dict[str, MetricResult]) -> str | None:
  """The comparison sheet of the first ``count`` images (None when ``count`` is 0)."""
  count = min(int(count), len(method.files))
  if count <= 0:
    return None
  refs = [protocol.read_rgb(reference.path(i)) for i in range(count)]
  imgs = [protocol.read_rgb(method.path(i)) for i in range(count)]
  captions = []
  for i in range(count):
    parts = [method.files[i]]
    for key, unit, digits in (("psnr", " dB", 2), ("ssim", "", 3), ("lpips", "", 3)):
      if key in results and results[key].per_image is not None:
        parts.append(f"{key.upper()} {results[key].per_image[i]:.{digits}f}{unit}")
    captions.append("  ".join(parts))
  return contact_sheet.save_comparison_sheet(path, refs, imgs, captions, method_name=name)


# ----------------------------------------------------------------------------- the evaluate command
def default_config() -> ml_collections.ConfigDict:
  """The evaluate command's settings."""
  c = ml_collections.ConfigDict()
  c.run_dir = ""            # a PTQ run folder (runs/<model>/<protocol>): its reference/ and <method>/samples/
  c.reference = ""          # the reference (full-precision) image folder, with `methods`
  c.methods = ""            # "name=folder,name=folder": the methods' image folders
  c.output_dir = ""         # "": <run_dir>/evaluation, else outputs/evaluate
  c.progress = True
  c.compilation_cache = "auto"
  c.eval = ml_collections.ConfigDict()
  c.eval.num_prompts = 0    # benchmark samples (the protocol's subset); 0: as many as the reference folder has
  ptq_config.add_metric_fields(c.eval)
  return c


def _method_folders(config: Any) -> tuple[str, list[tuple[str, str]], list[dict[str, Any]]]:
  """``(reference folder, [(method, folder)], PTQ result rows or [])``."""
  if config.run_dir:
    if config.methods or config.reference:
      raise ValueError("give run_dir, or reference and methods, not both")
    root = config.run_dir
    reference = os.path.join(root, "reference")
    if not os.path.isdir(reference):
      raise FileNotFoundError(f"run_dir={root}: no reference/ folder (a PTQ run folder holds reference/ and "
                              "<method>/samples/)")
    rows = []
    results = os.path.join(root, RESULTS_JSON)
    if os.path.isfile(results):
      with open(results, encoding="utf-8") as f:
        rows = json.load(f).get("rows", [])
    names = [r["method"] for r in rows] or sorted(
        d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "samples")))
    methods = [(n, os.path.join(root, n, "samples")) for n in names]
    if not methods:
      raise ValueError(f"run_dir={root}: no <method>/samples/ folders")
    return reference, methods, rows
  if not config.reference or not config.methods:
    raise ValueError("give run_dir, or reference and methods (\"name=folder,name=folder\")")
  methods = []
  for item in config.methods.split(","):
    name, sep, folder = item.strip().partition("=")
    if not sep or not name or not folder:
      raise ValueError(f"methods entry {item!r} is not name=folder")
    methods.append((name.strip(), folder.strip()))
  return config.reference, methods, []


def run(config: Any) -> dict[str, Any]:
  """Evaluates the image folders of ``config`` (:func:`default_config`); writes and returns the results."""
  compile_cache.configure(config.get("compilation_cache", compile_cache.AUTO))
  settings = config.eval
  reference, methods, ptq_rows = _method_folders(config)
  if settings.benchmark:
    num = settings.num_prompts or len(protocol.image_files(reference))
    images = benchmark_images(settings, num)
  else:
    images = folder_images(reference)
  check_folder(reference, images.files, "reference folder")
  for name, folder in methods:
    check_folder(folder, images.files, f"method {name!r}: folder")
  out = config.output_dir or (os.path.join(config.run_dir, "evaluation") if config.run_dir else "outputs/evaluate")
  available = ["reference"] + ["prompts"] * (images.prompts is not None) + ["real"] * (images.real is not None)
  evaluator = Evaluator(settings, len(images.files), available, config.progress)
  ref_set = ImageSet(reference, images.files, "reference")
  rows = []
  if any(m.against == GROUND_TRUTH for m in evaluator.active):
    results = evaluator.evaluate(Inputs(ImageSet(reference, images.files), None, images.real, images.prompts),
                                 REFERENCE_ROW)
    rows.append({"method": REFERENCE_ROW, "folder": reference, "identity": True, **result_fields(results)})
  else:
    rows.append({"method": REFERENCE_ROW, "folder": reference, "identity": True})
  for name, folder in methods:
    method = ImageSet(folder, images.files)
    results = evaluator.evaluate(Inputs(method, ref_set, images.real, images.prompts), name)
    row = {"method": name, "folder": folder, **result_fields(results)}
    sheet = write_comparison(os.path.join(out, name + SHEET_SUFFIX), method, ref_set, name,
                             settings.get("contact_sheet_images", 8), results)
    if sheet:
      row["comparison"] = sheet
    rows.append(row)
  if any(r.get("block_errors") for r in ptq_rows):
    plots.plot_block_errors(ptq_rows, os.path.join(out, BLOCK_ERRORS_PNG))
  header = (f"{len(images.files)} images per method{' from ' + images.benchmark if images.benchmark else ''}; "
            f"reference metrics against {reference}; evaluated on {evaluator.context.mesh.size} device(s).")
  table = metrics_table(rows, evaluator.note_lines(), evaluator.metrics)
  result = {"rows": rows, "notes": evaluator.note_lines(), "files": images.files, "benchmark": images.benchmark,
            "reference": reference, "config": json.loads(config.to_json_best_effort())}
  atomic_write_text(os.path.join(out, RESULTS_JSON), json.dumps(result, indent=1, default=str))
  atomic_write_text(os.path.join(out, RESULTS_MD), header + "\n\n" + table + "\n")
  print(header + "\n\n" + table + f"\n\nresults and comparison sheets under {out}")
  return result


# ----------------------------------------------------------------------------- protocol generation
def generate_samples(pipeline: Any, samples: Sequence[protocol.Sample], settings: Any, folder: str, *,
                     transformer_fn: Any = None, transformer_params: Any = None, mesh: Any = None,
                     reuse: bool = True, progress: bool = True) -> dict[str, Any]:
  """Generates ``<name>.png`` for each benchmark sample, seeded by its name, data-parallel.

  Each batch of prompts (``settings.batch_size`` rounded up to the device count; every batch is
  padded to that size with its last sample, since XLA's numbers on CPU depend on the batch size)
  starts from the noise of ``jax.random.key(image_seed(name))`` per image, split over ``mesh``
  (default: every local device), with the transformer parameters replicated. An image depends on
  its name, prompt, model and settings only (and, by at most one level on a few pixels, on the
  device count). ``protocol.json`` records the settings and samples; with ``reuse``, a rerun with
  the same model and settings keeps the images already written (pass ``reuse=False`` when the
  transformer may have changed, e.g. a re-quantized method).

  Args:
    pipeline: a FLUX or PixArt pipeline.
    samples: from :func:`svdquant_jax.eval.protocol.select_samples`.
    settings: a resolved ``GenerationSettings`` (``num_steps``, ``guidance``, ``height``, ``width``,
      ``max_sequence_length``, ``batch_size``).
    folder: output folder.
    transformer_fn, transformer_params: a quantized transformer, as for the pipeline.
    mesh: a :func:`~svdquant_jax.utils.sharding.batch_mesh`.
    reuse: keep the images of an earlier run with the same model and settings.

  Returns:
    The content of ``protocol.json``.
  """
  samples = list(samples)
  if not samples:
    raise ValueError("no samples to generate")
  mesh = sharding.batch_mesh() if mesh is None else mesh
  meta_settings = {k: getattr(settings, k) for k in ("num_steps", "guidance", "height", "width",
                                                     "max_sequence_length")}
  meta = {"model": getattr(pipeline, "name", ""), "settings": meta_settings,
          "images": [{"name": s.name, "prompt": s.prompt, "seed": s.seed, "file": s.file} for s in samples]}
  meta_path = os.path.join(folder, PROTOCOL_JSON)
  keep = False
  if reuse and os.path.isfile(meta_path):
    with open(meta_path, encoding="utf-8") as f:
      old = json.load(f)
    keep = old.get("settings") == meta_settings and old.get("model") == meta["model"]
  todo = [s for s in samples if not (keep and os.path.isfile(os.path.join(folder, s.file)))]
  os.makedirs(folder, exist_ok=True)
  atomic_write_text(meta_path, json.dumps(meta, indent=1) + "\n")
  if not todo:
    logging.info("protocol images: reusing the %d images in %s", len(samples), folder)
    return meta
  params = sharding.replicate(transformer_params if transformer_params is not None else pipeline.transformer_params,
                              mesh)
  size = sharding.padded_size(int(settings.batch_size), mesh)  # always full: XLA's results depend on the batch size
  batches = [todo[i:i + size] for i in range(0, len(todo), size)]
  with Progress(len(batches) * settings.num_steps, "generate", enabled=progress) as bar:
    for batch in batches:
      bar.desc = f"generate {len(batch)} of {len(todo)} images ({batch[0].name}, ...)"
      padded = batch + [batch[-1]] * (size - len(batch))
      noise = pipeline.prepare_latents([s.seed for s in padded], settings.height, settings.width)
      latents = sharding.shard_batch(np.asarray(noise[0] if isinstance(noise, tuple) else noise), mesh, size)
      images = pipeline([s.prompt for s in padded], height=settings.height, width=settings.width,
                        num_steps=settings.num_steps, guidance=settings.guidance, latents=latents,
                        max_sequence_length=settings.max_sequence_length, transformer_fn=transformer_fn,
                        transformer_params=params, progress=bar)
      images_lib.save_images(folder, np.asarray(images)[:len(batch)], [s.file for s in batch])
  return meta


__all__ = ["BLOCK_ERRORS_PNG", "Evaluator", "bare_label", "ImageList", "RESULTS_JSON", "RESULTS_MD", "SHEET_SUFFIX",
           "benchmark_images", "check_folder", "default_config", "folder_images", "generate_samples",
           "metrics_table", "result_fields", "run", "write_comparison"]
