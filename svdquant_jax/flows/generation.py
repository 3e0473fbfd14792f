"""Image generation for a list of prompts: the reference and evaluation images of the PTQ flow.

:func:`generate_images` writes into ``out_dir``: ``00000.png``, ``00001.png``, ... (one per
prompt, in prompt order), ``contact_sheet.png`` with its text index ``contact_sheet.png.txt``
(row, column, index, prompt), and ``generation.json`` (model, settings with the defaults filled
in, per prompt its text, seed and file, timings). Every file is written atomically.

Each prompt's noise comes from ``jax.random.key(prompt_seed(prompt, seed))``, and every pipeline
call has the same batch size (the last batch is padded by repeating its last prompt), so an
image depends only on the model, the settings, the seed and its own prompt: not on its position
in the list or on the other prompts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import prompts as prompts_lib
from svdquant_jax.utils.files import atomic_write_text
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
                    on_step: Callable[..., None] | None = None, progress: bool = True) -> dict[str, Any]:
  """Generates one PNG per prompt plus a contact sheet and ``generation.json`` in ``out_dir``.

  Args:
    pipeline: a ``FluxPipeline`` or ``PixArtSigmaPipeline``.
    prompts: the prompts (non-empty).
    settings: see :class:`GenerationSettings`.
    out_dir: output folder (created).
    transformer_fn, transformer_params, on_step: passed to the pipeline (e.g. a quantized transformer).
    progress: show a progress display over prompts and steps.

  Returns:
    The content of ``generation.json``.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("prompts is empty; nothing to generate")
  s = settings.resolved(pipeline)
  batch_size = min(s.batch_size, len(prompts))
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
      images = pipeline(padded, height=s.height, width=s.width, num_steps=s.num_steps, guidance=s.guidance,
                        seed=s.seed, max_sequence_length=s.max_sequence_length, transformer_fn=transformer_fn,
                        transformer_params=transformer_params, on_step=on_step, progress=bar)
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
            "seconds": round(elapsed, 3), "seconds_per_image": round(elapsed / len(prompts), 4)}
  atomic_write_text(os.path.join(out_dir, GENERATION_JSON), json.dumps(result, indent=1) + "\n")
  logging.info("wrote %d images, %s and %s to %s (%.1f s)", len(prompts), CONTACT_SHEET, GENERATION_JSON, out_dir,
               elapsed)
  return result
