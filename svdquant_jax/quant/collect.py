"""Calibration collection: run the full-precision pipeline and record the transformer inputs.

Mirrors deepcompressor's ``dataset/collect/calib.py``: every prompt runs through the
whole pipeline at the evaluation protocol (steps, guidance, resolution), and the transformer's
call arguments at every denoising step and CFG branch are stored, one sample per batch row.
Each prompt's image noise comes from its own seed, so a sample does not depend on which other
prompts shared its batch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np

from svdquant_jax.quant.adapters import adapter_for_pipeline
from svdquant_jax.quant.calib_cache import CalibrationSet, CalibrationWriter, model_fingerprint
from svdquant_jax.utils.progress import Progress


def transformer_fingerprint(pipeline: Any) -> str:
  """:func:`model_fingerprint` of the pipeline's transformer (config + weights)."""
  adapter = adapter_for_pipeline(pipeline)
  return model_fingerprint({"family": adapter.family, "config": repr(adapter.config)}, pipeline.transformer_params)


def collection_settings(model: str, prompts: Sequence[str], *, num_steps: int, guidance: float | None,
                        height: int, width: int, seed: int) -> dict[str, Any]:
  """What a calibration set was collected with (stored in, and checked against, its manifest)."""
  digest = hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]
  return {"model": model, "num_steps": int(num_steps), "guidance": guidance, "height": int(height),
          "width": int(width), "seed": int(seed), "num_prompts": len(prompts), "prompts_sha256": digest}


def collect_calibration(pipeline: Any, prompts: Sequence[str], folder: str, *, num_steps: int,
                        guidance: float | None, height: int, width: int, seed: int, batch_size: int = 4,
                        model_name: str | None = None, log=print) -> CalibrationSet:
  """Runs ``pipeline`` over ``prompts`` and stores the transformer inputs of every step in ``folder``.

  Resumes an interrupted collection (prompts already written are skipped); refuses a folder
  collected from another model or with other settings.

  Returns:
    The finished :class:`CalibrationSet`.
  """
  if not prompts:
    raise ValueError("calibration needs at least one prompt")
  shared = adapter_for_pipeline(pipeline).shared_inputs
  fingerprint = transformer_fingerprint(pipeline)
  settings = collection_settings(model_name or pipeline.name, prompts, num_steps=num_steps, guidance=guidance,
                                 height=height, width=width, seed=seed)
  writer = CalibrationWriter(folder, fingerprint, settings)
  todo = [i for i in range(len(prompts)) if not writer.has_prompt(i)]
  bar = Progress(len(prompts), "[calib] prompts", style="lines")
  bar.skip(len(prompts) - len(todo))
  if len(todo) < len(prompts):
    log(f"[calib] resuming: {len(prompts) - len(todo)} of {len(prompts)} prompts already collected in {folder}")
  for start in range(0, len(todo), batch_size):
    chunk = todo[start:start + batch_size]
    samples: dict[int, list[dict[str, np.ndarray]]] = {i: [] for i in chunk}
    metas: dict[int, list[dict[str, Any]]] = {i: [] for i in chunk}

    def on_step(step: int, inputs: Mapping[str, Any], output: Any, branch: Sequence[str] | None = None,
                chunk=chunk, samples=samples, metas=metas) -> None:
      host = {k: np.asarray(v) for k, v in inputs.items()}
      rows = len(branch) if branch is not None else len(chunk)
      for row in range(rows):
        prompt_index = chunk[row % len(chunk)]
        sample = {k: (v if k in shared else v[row]) for k, v in host.items()}
        samples[prompt_index].append(sample)
        metas[prompt_index].append({"step": step, "branch": branch[row] if branch is not None else "cond",
                                    "timestep": float(host["timestep"][row])})

    pipeline([prompts[i] for i in chunk], height=height, width=width, num_steps=num_steps, guidance=guidance,
             seed=seed, output_type="latent", on_step=on_step, progress=False)
    for i in chunk:
      writer.write_prompt(i, prompts[i], samples[i], metas[i])
      bar.update()
  writer.finalize()
  return CalibrationSet(folder, fingerprint=fingerprint)
