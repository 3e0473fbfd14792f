"""On-disk calibration set: the transformer inputs of every denoising step, sharded by prompt.

Layout of a calibration folder::

    manifest.json                 model fingerprint, collection settings, one entry per sample
    prompt-00000.safetensors      all samples of prompt 0: "<sample>/<input name>" tensors
    prompt-00001.safetensors      ...

One *sample* is one transformer call for one batch element: one (prompt, denoising step,
CFG branch). Its tensors carry no batch axis. Shards are written atomically and the manifest
is rewritten (atomically) after every shard, so an interrupted collection resumes at the
first prompt without a shard. Reading streams shard by shard: host memory holds one batch.

Deepcompressor draws ``num_samples`` (prompt, step, branch) caches at random (seed 0) out of
all of them (deepcompressor ``dataset/calib.py``; ``docs/quantization.md``,
"deepcompressor's recipe", calibration data); :meth:`CalibrationSet.select` does the same with an explicit seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np

from svdquant_jax.utils.files import atomic_write_text, read_json
from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile, save_safetensors

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_SAMPLE_BYTES = 4096


class CalibrationError(ValueError):
  """A calibration set is missing, incomplete, corrupt, or belongs to another model/config."""


def model_fingerprint(config: Mapping[str, Any], params: Any) -> str:
  """A stable identifier of a model: its config plus a strided sample of every param leaf.

  Hashing every byte of a 12B model would take minutes; a strided subsample of each leaf
  (up to 4096 elements, taken on device), plus every leaf's path, shape and dtype, tells
  different checkpoints apart while staying cheap.

  Args:
    config: JSON-serializable model config.
    params: the params tree.

  Returns:
    A hex sha256 digest (first 16 characters).
  """
  h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in leaves:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
    flat = leaf.reshape(-1)
    stride = max(1, flat.shape[0] // _SAMPLE_BYTES)
    h.update(np.ascontiguousarray(np.asarray(flat[::stride][:_SAMPLE_BYTES])).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SampleInfo:
  """Where one calibration sample lives and what it is."""
  index: int          # position in the manifest
  prompt_index: int
  prompt: str
  step: int           # denoising step (0-based)
  branch: str         # "cond" / "uncond" (CFG) or "cond" only
  timestep: float
  shard: str          # file name inside the folder
  key: str            # tensor-name prefix inside the shard


class CalibrationWriter:
  """Writes a calibration folder prompt by prompt; resumes an interrupted collection.

  Args:
    folder: destination folder.
    fingerprint: :func:`model_fingerprint` of the model being run.
    settings: JSON-serializable collection settings (model name, steps, guidance, size,
      seed, prompt list...). An existing folder must have been written with the same
      fingerprint and settings, else :class:`CalibrationError`.
  """

  def __init__(self, folder: str, fingerprint: str, settings: Mapping[str, Any]):
    self.folder = folder
    os.makedirs(folder, exist_ok=True)
    self._manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                      "settings": json.loads(json.dumps(settings, default=str)),
                      "complete": False, "prompts": {}}
    path = os.path.join(folder, MANIFEST)
    if os.path.exists(path):
      old = _read_manifest(folder)
      if old["fingerprint"] != fingerprint:
        raise CalibrationError(f"{folder} holds calibration data of another model (fingerprint "
                               f"{old['fingerprint']}, this model is {fingerprint}); use another folder")
      if old["settings"] != self._manifest["settings"]:
        diff = sorted(k for k in set(old["settings"]) | set(self._manifest["settings"])
                      if old["settings"].get(k) != self._manifest["settings"].get(k))
        raise CalibrationError(f"{folder} was collected with other settings ({', '.join(diff)} differ); "
                               "use another folder")
      self._manifest["prompts"] = {k: v for k, v in old["prompts"].items()
                                   if os.path.isfile(os.path.join(folder, v["shard"]))}

  def has_prompt(self, prompt_index: int) -> bool:
    return str(prompt_index) in self._manifest["prompts"]

  @property
  def num_done(self) -> int:
    return len(self._manifest["prompts"])

  def write_prompt(self, prompt_index: int, prompt: str, samples: Sequence[Mapping[str, np.ndarray]],
                   metas: Sequence[Mapping[str, Any]]) -> None:
    """Writes all samples of one prompt as one shard and records them in the manifest.

    Args:
      prompt_index: index of the prompt in the collection's prompt list.
      prompt: the prompt text.
      samples: per sample, the transformer inputs without batch axis (name -> array).
      metas: per sample, ``{"step": int, "branch": str, "timestep": float}``.
    """
    if len(samples) != len(metas):
      raise ValueError(f"{len(samples)} samples but {len(metas)} metadata entries")
    tensors = {}
    entries = []
    for j, (sample, meta) in enumerate(zip(samples, metas)):
      for name, value in sample.items():
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value.astype(np.float32))):
          raise CalibrationError(f"prompt {prompt_index} ({prompt!r}), step {meta['step']}, {meta['branch']}: "
                                 f"transformer input {name!r} holds NaN/Inf; the full-precision model "
                                 "diverged (check dtype and guidance)")
        tensors[f"{j}/{name}"] = value
      entries.append({"step": int(meta["step"]), "branch": str(meta["branch"]),
                      "timestep": float(meta["timestep"]), "key": str(j)})
    shard = f"prompt-{prompt_index:05d}.safetensors"
    save_safetensors(os.path.join(self.folder, shard), tensors)
    self._manifest["prompts"][str(prompt_index)] = {"prompt": prompt, "shard": shard, "samples": entries}
    self._write_manifest()

  def finalize(self) -> None:
    """Marks the collection complete."""
    self._manifest["complete"] = True
    self._write_manifest()

  def _write_manifest(self) -> None:
    atomic_write_text(os.path.join(self.folder, MANIFEST), json.dumps(self._manifest, indent=1, sort_keys=True))


def _read_manifest(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, MANIFEST)
  manifest = read_json(path, CalibrationError,
                       f"{folder}: no {MANIFEST}; not a calibration folder (run the collection first)")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise CalibrationError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
  return manifest


class CalibrationSet:
  """Reads a calibration folder written by :class:`CalibrationWriter`.

  Args:
    folder: the calibration folder.
    fingerprint: if given, the model being quantized; a different one is an error.
    settings: if given, settings that must match the collection's (e.g. model name).
    require_complete: refuse a collection that was interrupted.
  """

  def __init__(self, folder: str, fingerprint: str | None = None,
               settings: Mapping[str, Any] | None = None, require_complete: bool = True):
    self.folder = folder
    self.manifest = _read_manifest(folder)
    if fingerprint is not None and self.manifest["fingerprint"] != fingerprint:
      raise CalibrationError(f"calibration set {folder} was collected from another model or config "
                             f"(fingerprint {self.manifest['fingerprint']}; the model being quantized is "
                             f"{fingerprint}); collect calibration data for this model")
    for k, v in (settings or {}).items():
      if self.manifest["settings"].get(k) != v:
        raise CalibrationError(f"calibration set {folder} has {k}={self.manifest['settings'].get(k)!r}, "
                               f"expected {v!r}")
    if require_complete and not self.manifest["complete"]:
      raise CalibrationError(f"calibration set {folder} is incomplete ({len(self.manifest['prompts'])} prompts "
                             "written); rerun the collection to finish it")
    self.samples: list[SampleInfo] = []
    for p in sorted(self.manifest["prompts"], key=int):
      entry = self.manifest["prompts"][p]
      for s in entry["samples"]:
        self.samples.append(SampleInfo(len(self.samples), int(p), entry["prompt"], s["step"], s["branch"],
                                       s["timestep"], entry["shard"], s["key"]))
    if not self.samples:
      raise CalibrationError(f"calibration set {folder} holds no samples")
    self._open: dict[str, SafetensorsFile] = {}

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]

  @property
  def settings(self) -> dict[str, Any]:
    return self.manifest["settings"]

  def __len__(self) -> int:
    return len(self.samples)

  def select(self, n: int, seed: int = 0) -> list[int]:
    """A seeded random subset of ``n`` sample indices (all of them, in order, if n >= size)."""
    if n <= 0:
      raise ValueError(f"number of calibration samples must be positive, got {n}")
    if n >= len(self.samples):
      return list(range(len(self.samples)))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(self.samples), size=n, replace=False).tolist())

  def _file(self, shard: str) -> SafetensorsFile:
    if shard not in self._open:
      path = os.path.join(self.folder, shard)
      try:
        self._open[shard] = SafetensorsFile(path)
      except CheckpointError as e:
        raise CalibrationError(f"calibration shard unreadable: {e}") from e
    return self._open[shard]

  def load(self, index: int) -> dict[str, np.ndarray]:
    """One sample's tensors (no batch axis), checked for NaN/Inf."""
    info = self.samples[index]
    f = self._file(info.shard)
    prefix = info.key + "/"
    out = {k[len(prefix):]: np.array(f.get(k)) for k in f.keys() if k.startswith(prefix)}
    if not out:
      raise CalibrationError(f"{info.shard}: no tensors for sample {info.key}")
    for name, value in out.items():
      if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value.astype(np.float32))):
        raise CalibrationError(f"{info.shard}: sample {info.key} (prompt {info.prompt_index}, step {info.step}) "
                               f"tensor {name!r} holds NaN/Inf")
    return out

  def batches(self, indices: Sequence[int], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Streams the samples ``indices`` stacked into batches along a new leading axis."""
    if batch_size <= 0:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(indices), batch_size):
      items = [self.load(i) for i in indices[start:start + batch_size]]
      names = set(items[0])
      for i, item in zip(indices[start:start + batch_size], items):
        if set(item) != names:
          raise CalibrationError(f"sample {i} has inputs {sorted(item)}, expected {sorted(names)}")
      yield {k: np.stack([item[k] for item in items]) for k in sorted(names)}
