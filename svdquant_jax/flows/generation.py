"""Image generation for a list of prompts: the reference and evaluation images of the PTQ flow.

:func:`generate_images` writes into ``out_dir``: ``00000.png``, ``00001.png``, ... (one per
prompt, in prompt order), ``contact_sheet.png`` with its text index ``contact_sheet.png.txt``
(row, column, index, prompt), and ``generation.json`` (model, settings with the defaults filled
in, per prompt its text, seed and file, timings). Every file is written atomically.

Each prompt's noise comes from ``jax.random.key(prompt_seed(prompt, seed))``, and every pipeline
call has the same batch size (the last batch is padded by repeating its last prompt), so an
image depends only on the model, the settings, the seed and its own prompt: not on its position
in the list or on the other prompts.

:func:`run` is the generate command (``launch/generate.py``): a model by name or folder, its
prompts and settings from a :func:`default_config` ConfigDict, optionally with a quantized
transformer saved by the PTQ flow and with FLUX LoRAs (``loras="a.safetensors:0.8,b.safetensors"``;
``docs/lora.md``), applied at run time as branches beside the float or quantized layers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

from absl import logging
import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

from svdquant_jax.models.flux_lora import is_nunchaku_format, load_flux_lora
from svdquant_jax.models.flux_lora import parse_lora_spec as parse_loras
from svdquant_jax.nn import lora_params, with_lora
from svdquant_jax.flows import nunchaku as nunchaku_flow
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import prompts as prompts_lib
from svdquant_jax.pipelines.flux import prompt_seeds
from svdquant_jax.pipelines.loading import load_pipeline
from svdquant_jax.quant import quantized_model
from svdquant_jax.quant.nunchaku import lora as nunchaku_lora
from svdquant_jax.quant.adapters import adapter_for_pipeline
from svdquant_jax.utils import compile_cache, sharding
from svdquant_jax.utils.files import atomic_write_text
from svdquant_jax.utils.safetensors_io import SafetensorsFile
from svdquant_jax.utils.progress import Progress

CONTACT_SHEET = "contact_sheet.png"
GENERATION_JSON = "generation.json"
SHEET_MAX_IMAGES = 64      # the contact sheet shows the first 64 images ...
SHEET_MAX_SIDE = 256       # ... each box-downsampled by an integer factor to at most 256 pixels


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
  """Settings of a generation run; ``None`` fields take the pipeline's defaults (:meth:`resolved`)."""
  seed: int = 0
  num_steps: int | None = None
  guidance: float | None = None
  height: int | None = None
  width: int | None = None
  max_sequence_length: int | None = None
  batch_size: int = 4
  contact_sheet_columns: int | None = None

  def resolved(self, pipeline: Any) -> "GenerationSettings":
    """A copy with every ``None`` (but the contact-sheet columns) replaced by the pipeline default."""
    d = pipeline.defaults
    pick = lambda value, default: default if value is None else value  # noqa: E731
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
    return dataclasses.replace(self, num_steps=pick(self.num_steps, d.num_steps),
                               guidance=pick(self.guidance, d.guidance), height=pick(self.height, d.height),
                               width=pick(self.width, d.width),
                               max_sequence_length=pick(self.max_sequence_length, d.max_sequence_length))


def image_file(index: int) -> str:
  return f"{index:05d}.png"


def _thumbnail(image: np.ndarray) -> np.ndarray:
  h, w, c = image.shape
  f = max(1, -(-max(h, w) // SHEET_MAX_SIDE))
  if f == 1:
    return image
  h2, w2 = h // f, w // f
  boxes = image[:h2 * f, :w2 * f].reshape(h2, f, w2, f, c).astype(np.float32)
  return np.round(boxes.mean(axis=(1, 3))).astype(np.uint8)


def generate_images(pipeline: Any, prompts: Sequence[str], settings: GenerationSettings, out_dir: str, *,
                    transformer_fn: Callable[..., Any] | None = None, transformer_params: Any = None,
                    on_step: Callable[..., None] | None = None, progress: bool = True,
                    extra: Mapping[str, Any] | None = None, mesh: Any = None) -> dict[str, Any]:
  """Generates one PNG per prompt plus a contact sheet and ``generation.json`` in ``out_dir``.

  Data-parallel: each batch (``settings.batch_size``, at most the number of prompts, rounded up to
  the device count of ``mesh``; the last batch is padded with its last prompt) is split over the
  mesh's batch axis, with the transformer parameters replicated. Image ``i`` starts from the noise
  of ``prompt_seed(prompts[i], seed)`` whatever the batch or device count; XLA's numbers on CPU
  depend on the per-device batch, so a different device count may round a few pixels one level
  differently.

  Args:
    pipeline: a ``FluxPipeline`` or ``PixArtSigmaPipeline``.
    prompts: the prompts (non-empty).
    settings: see :class:`GenerationSettings`.
    out_dir: output folder (created).
    transformer_fn, transformer_params, on_step: passed to the pipeline (e.g. a quantized transformer).
    progress: show a progress display over prompts and steps.
    extra: more JSON entries for ``generation.json`` (e.g. the LoRAs applied).
    mesh: a :func:`~svdquant_jax.utils.sharding.batch_mesh` (default: every local device).

  Returns:
    The content of ``generation.json``.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts is empty; nothing to generate")
  s = settings.resolved(pipeline)
  mesh = sharding.batch_mesh() if mesh is None else mesh
  batch_size = sharding.padded_size(min(s.batch_size, len(prompts)), mesh)
  params = sharding.replicate(transformer_params if transformer_params is not None else pipeline.transformer_params,
                              mesh)
  batches = [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
  os.makedirs(out_dir, exist_ok=True)
  sheet, records = [], []
  start = time.monotonic()
  bar = Progress(len(batches) * s.num_steps, "generate", enabled=progress)
  with bar:
    for indices in batches:
      bar.desc = f"generate prompts {indices[0] + 1}-{indices[-1] + 1}/{len(prompts)}"
      batch = [prompts[i] for i in indices]
      padded = batch + [batch[-1]] * (batch_size - len(batch))
      noise = pipeline.prepare_latents(prompt_seeds(padded, s.seed), s.height, s.width)
      latents = sharding.shard_batch(np.asarray(noise[0] if isinstance(noise, tuple) else noise), mesh, batch_size)
      images = pipeline(padded, height=s.height, width=s.width, num_steps=s.num_steps, guidance=s.guidance,
                        latents=latents, max_sequence_length=s.max_sequence_length, transformer_fn=transformer_fn,
                        transformer_params=params, on_step=on_step, progress=bar)
      images = np.asarray(images)[:len(batch)]
      images_lib.save_images(out_dir, images, [image_file(i) for i in indices])
      for i, image in zip(indices, images):
        records.append({"index": i, "prompt": prompts[i], "seed": prompts_lib.prompt_seed(prompts[i], s.seed),
                        "file": image_file(i)})
        if len(sheet) < SHEET_MAX_IMAGES:
          sheet.append(_thumbnail(image))
  elapsed = time.monotonic() - start
  sheet_path, index_path = images_lib.save_contact_sheet(os.path.join(out_dir, CONTACT_SHEET), np.stack(sheet),
                                                         prompts[:len(sheet)], columns=s.contact_sheet_columns)
  result = {"model": pipeline.name, "pipeline_class": pipeline.pipeline_class,
            "settings": dataclasses.asdict(s), "num_images": len(prompts), "images": records,
            "contact_sheet": os.path.basename(sheet_path), "contact_sheet_index": os.path.basename(index_path),
            "seconds": round(elapsed, 3), "seconds_per_image": round(elapsed / len(prompts), 4), **(extra or {})}
  atomic_write_text(os.path.join(out_dir, GENERATION_JSON), json.dumps(result, indent=1) + "\n")
  logging.info("wrote %d images, %s and %s to %s (%.1f s)", len(prompts), CONTACT_SHEET, GENERATION_JSON, out_dir,
               elapsed)
  return result


# ----------------------------------------------------------------------------- the generate command
def default_config() -> ml_collections.ConfigDict:
  """The generate command's settings; ``None`` fields take the model's defaults."""
  c = ml_collections.ConfigDict()
  c.model = "flux-tiny"          # preset name (flux-dev, flux-schnell, pixart-sigma, sana-1.6b, flux-tiny, pixart-tiny, sana-tiny) or folder
  c.model_path = ""              # folder with the weights of a real-size preset
  c.quantized_model = ""         # a quantized transformer saved by the PTQ flow (runs/<model>/<protocol>/<method>/model)
  c.nunchaku = ""                # a Nunchaku FLUX.1 checkpoint (svdq-int4_r32-*.safetensors) as the transformer
  c.loras = ""                   # FLUX LoRAs "a.safetensors:0.8,b.safetensors" (file:strength, default 1)
  c.lora_partial = False         # allow LoRA keys that match no layer (a warning lists them) instead of an error
  c.dtype = ""                   # "": each component's default precision; else e.g. "bfloat16", "float32"
  c.prompts = ""                 # prompts separated by "|"
  c.prompts_path = ""            # a .txt / .json / .yaml prompt file (used when `prompts` is empty)
  c.num_prompts = 4              # the first N prompts of the file or the built-in list (0: all)
  c.seed = 0                     # base seed; each prompt's noise comes from prompt_seed(prompt, seed)
  c.num_steps = config_dict.placeholder(int)
  c.guidance = config_dict.placeholder(float)
  c.height = config_dict.placeholder(int)
  c.width = config_dict.placeholder(int)
  c.max_sequence_length = config_dict.placeholder(int)
  c.batch_size = 4               # images per pipeline call (the last batch is padded to this size)
  c.contact_sheet_columns = config_dict.placeholder(int)
  c.output_dir = "outputs/generate"
  c.progress = True
  c.data_parallel = True         # split each batch over every local device (False: the first device only)
  c.compilation_cache = "auto"   # JAX persistent compilation cache: "auto" (user cache folder), a folder, or "" (off)
  return c


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


def _load_lora(path: str, config: Any, params: Any, partial: bool, quantized: bool) -> Any:
  """A LoRA file on our layer paths: any published format, or a Nunchaku-format LoRA when the
  transformer is the 4-bit checkpoint it was made for (its base branch is checked)."""
  if quantized and is_nunchaku_format(SafetensorsFile(path).keys()):
    return nunchaku_lora.load_nunchaku_lora(path, params, config, partial=partial)
  return load_flux_lora(path, config, partial=partial)


def apply_loras(pipeline: Any, loras: Sequence[tuple[str, float]], *, partial: bool = False,
                transformer_fn: Callable[..., Any] | None = None,
                transformer_params: Any = None) -> tuple[Callable[..., Any], Any, list[dict[str, Any]]]:
  """A FLUX pipeline's transformer (float, or the quantized ``transformer_fn``/``transformer_params``)
  with LoRA branches: ``(jitted fn, params, description)`` for :func:`generate_images`.

  The strengths are arrays in the returned params: ``params["lora"]`` with other strengths
  (:func:`~svdquant_jax.nn.set_strengths`) runs the same compiled program.

  Raises:
    ValueError: the pipeline is not FLUX.
    LoraError: a LoRA file that does not fit the transformer (see ``load_flux_lora``), or a
      Nunchaku-format LoRA on a float transformer or on another checkpoint than its own (see
      ``svdquant_jax.quant.nunchaku.lora``).
  """
  adapter = adapter_for_pipeline(pipeline)
  if adapter.family != "flux":
    raise ValueError(f"LoRAs are supported for FLUX transformers, not {adapter.family!r} ({pipeline.name})")
  quantized = transformer_fn is not None
  if not quantized:
    model = adapter.model
    transformer_fn = lambda params, **inputs: model.apply({"params": params}, **inputs)  # noqa: E731
    transformer_params = pipeline.transformer_params
  files = [_load_lora(path, adapter.config, transformer_params, partial, quantized) for path, _ in loras]
  for lora in files:
    logging.info("LoRA %s", lora.summary())
  tree = lora_params(files, [s for _, s in loras], dtype=adapter.config.param_dtype)
  described = [{"path": path, "strength": s, "layers": len(f.layers)} for (path, s), f in zip(loras, files)]
  return jax.jit(with_lora(transformer_fn)), {"base": transformer_params, "lora": tree}, described


def run(config: Any) -> dict[str, Any]:
  """Loads the model named by ``config`` and generates its images (see :func:`generate_images`)."""
  compile_cache.configure(config.get("compilation_cache", compile_cache.AUTO))
  prompts = prompts_from_config(config)
  settings = settings_from_config(config)
  loras = parse_loras(config.get("loras", "")) if config.get("loras", "") else []
  nunchaku_file = config.get("nunchaku", "")
  if nunchaku_file and config.quantized_model:
    raise ValueError("set one of --config.quantized_model and --config.nunchaku, not both")
  pipeline = load_pipeline(config.model, path=config.model_path or None, dtype=config.dtype or None,
                           transformer_weights=not nunchaku_file)
  transformer_fn = transformer_params = None
  if nunchaku_file:
    transformer_fn, transformer_params, model = nunchaku_flow.load_transformer(nunchaku_file, pipeline)
    logging.info("Nunchaku %s rank-%d transformer from %s", model.fmt, model.rank, nunchaku_file)
  if config.quantized_model:
    transformer_fn, transformer_params, meta = quantized_model.load_for_model(
        config.quantized_model, adapter_for_pipeline(pipeline))
    logging.info("quantized transformer %r from %s", meta.get("name"), config.quantized_model)
  extra = {}
  if loras:
    transformer_fn, transformer_params, extra["loras"] = apply_loras(
        pipeline, loras, partial=config.get("lora_partial", False), transformer_fn=transformer_fn,
        transformer_params=transformer_params)
  mesh = sharding.batch_mesh() if config.get("data_parallel", True) else sharding.single_device_mesh()
  return generate_images(pipeline, prompts, settings, config.output_dir, progress=config.progress,
                         transformer_fn=transformer_fn, transformer_params=transformer_params, extra=extra,
                         mesh=mesh)
