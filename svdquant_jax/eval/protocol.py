"""The evaluation protocol of deepcompressor's diffusion benchmarks: dataset layouts, the sampled
subset, per-image seeds and file names, and reading image files as RGB.

Benchmarks (a prompt file plus, optionally, a folder of real images):

* ``mjhq`` (MJHQ-30K, ``playgroundai/MJHQ-30K``): ``meta_data.json`` maps each image name to
  ``{"category": ..., "prompt": ...}``; the real image of ``name`` is
  ``<images>/<category>/<name>.jpg`` (the layout of the unpacked ``mjhq30k_imgs.zip``).
* ``sdci`` (summarized DCI, ``mit-han-lab/svdquant-datasets``): ``sDCI.yaml`` maps each name to its
  prompt; the real image is ``<images>/<name>.jpg`` (the unpacked ``sDCI.gz``).
* ``prompts`` (any other list): a ``.yaml`` / ``.json`` mapping name -> prompt, or a list of
  prompts (``.txt`` one per line, ``.json`` / ``.yaml`` list) named ``00000``, ``00001``, ...;
  the real image is ``<images>/<name>.jpg`` or ``.png``.

Names keep the order of the file. The subset of ``num`` samples (:func:`select_samples`) is
deepcompressor's: the names shuffled with ``random.Random(0)``, the first ``num`` kept, then sorted;
``num <= 0`` keeps every sample in file order, unshuffled. The image of sample ``name`` is
``<name>.png`` (:func:`image_file`), generated from the seed :func:`image_seed` ``(name)``: the
31-polynomial hash of the name modulo 1e9+7, deepcompressor's ``hash_str_to_int`` for ASCII names
(the seed does not depend on the prompt, the batch, or the other samples). deepcompressor stores
the images of a subset in a folder named ``<benchmark>-<count>`` (:func:`subset_name`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any, Sequence

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError


LAYOUTS = ("mjhq", "sdci", "prompts")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
SHUFFLE_SEED = 0
SEED_MODULUS = 1_000_000_007


class BenchmarkError(ValueError):
  """A benchmark's prompt file or real image folder is missing or malformed (the file is named)."""


@dataclasses.dataclass(frozen=True)
class Sample:
  """One benchmark entry: ``name`` (the file stem), its ``prompt`` and real image path (or None)."""
  name: str
  prompt: str
  real_path: str | None = None
  category: str | None = None

  @property
  def seed(self) -> int:
    return image_seed(self.name)

  @property
  def file(self) -> str:
    return image_file(self.name)


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A loaded benchmark: every sample in file order (select a subset with :meth:`select`)."""
  name: str
  layout: str
  prompts_path: str
  images_root: str | None
  samples: tuple[Sample, ...]

  def select(self, num: int, seed: int = SHUFFLE_SEED) -> list[Sample]:
    return select_samples(self.samples, num, seed)


def image_seed(name: str) -> int:
  """The generation seed of the image called ``name``: the 31-polynomial hash of its code points
  modulo 1e9+7 (deepcompressor's ``hash_str_to_int``), in [0, 2**31)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"an image name must be a non-empty string, got {name!r}")
  h = 0
  for char in name:  # code points, as deepcompressor (prompts.prompt_hash hashes UTF-8 bytes: same for ASCII)
    h = (31 * h + ord(char)) % SEED_MODULUS
  return h


def image_file(name: str) -> str:
  """``<name>.png``, the file the image of sample ``name`` is written to."""
  if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
    raise ValueError(f"image name {name!r} must be a non-empty file name without path separators")
  return f"{name}.png"


def subset_name(benchmark: str, count: int) -> str:
  """deepcompressor's folder name of a subset: ``<benchmark>-<count>`` (e.g. ``MJHQ-5000``)."""
  return f"{benchmark}-{count}"


def select_samples(samples: Sequence[Sample], num: int, seed: int = SHUFFLE_SEED) -> list[Sample]:
  """deepcompressor's subset: shuffle the names with ``Random(seed)``, keep ``num``, sort by name.

  ``num <= 0`` keeps all samples in their file order (deepcompressor shuffles only for a positive
  size); ``num`` larger than the benchmark keeps all of them, sorted.
  """
  if isinstance(num, bool) or not isinstance(num, (int, np.integer)):
    raise ValueError(f"num must be an int, got {num!r}")
  samples = list(samples)
  if num <= 0:
    return samples
  by_name = {s.name: s for s in samples}
  names = [s.name for s in samples]
  random.Random(seed).shuffle(names)
  return [by_name[n] for n in sorted(names[:int(num)])]


# ----------------------------------------------------------------------------- loading
def _read_mapping(path: str) -> Any:
  ext = os.path.splitext(path)[1].lower()
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise BenchmarkError(f"benchmark prompt file not found: {path}") from None
  if ext == ".json":
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise BenchmarkError(f"{path}: invalid JSON ({e})") from None
  if ext in (".yaml", ".yml"):
    import yaml  # a dependency of ml_collections
    try:
      return yaml.safe_load(text)
    except yaml.YAMLError as e:
      raise BenchmarkError(f"{path}: invalid YAML ({e})") from None
  if ext == ".txt":
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
  raise BenchmarkError(f"{path}: unknown benchmark prompt file extension {ext!r} (.json, .yaml or .txt)")


def detect_layout(data: Any, path: str) -> str:
  """``mjhq`` for a mapping to ``{"prompt", "category"}`` records, else ``sdci`` for a file named
  ``sDCI.yaml``, else ``prompts``."""
  if isinstance(data, dict) and data:
    first = next(iter(data.values()))
    if isinstance(first, dict) and "prompt" in first:
      return "mjhq"
    if os.path.basename(path).lower().startswith("sdci"):
      return "sdci"
  return "prompts"


def _default_name(layout: str, path: str) -> str:
  if layout == "mjhq":
    return "MJHQ"
  if layout == "sdci":
    return "sDCI"
  return os.path.splitext(os.path.basename(path))[0]


def _real_path(layout: str, root: str | None, name: str, category: str | None) -> str | None:
  if root is None:
    return None
  if layout == "mjhq":
    return os.path.join(root, category or "", f"{name}.jpg")
  jpg = os.path.join(root, f"{name}.jpg")
  if layout == "prompts" and not os.path.exists(jpg) and os.path.exists(os.path.join(root, f"{name}.png")):
    return os.path.join(root, f"{name}.png")
  return jpg


def load_benchmark(prompts_path: str | os.PathLike, images_root: str | os.PathLike | None = None,
                   layout: str = "auto", name: str = "") -> Benchmark:
  """Reads a benchmark's prompt file (and notes where its real images are).

  Args:
    prompts_path: MJHQ-30K's ``meta_data.json``, ``sDCI.yaml``, or a prompt list (module doc).
    images_root: the folder of the real images (None or "": no real images; FID against real
      images is then unavailable).
    layout: ``"auto"`` (from the file's content and name) or one of :data:`LAYOUTS`.
    name: the benchmark's name in folder names and tables (default ``MJHQ`` / ``sDCI`` / the
      file's stem).

  Raises:
    BenchmarkError: the file is missing, malformed (the entry is named), empty, or the images
      folder does not exist.
  """
  path = os.fspath(prompts_path)
  data = _read_mapping(path)
  if layout == "auto":
    layout = detect_layout(data, path)
  if layout not in LAYOUTS:
    raise BenchmarkError(f"unknown benchmark layout {layout!r}; expected 'auto' or one of {LAYOUTS}")
  root = os.fspath(images_root) if images_root else None
  if root is not None and not os.path.isdir(root):
    raise BenchmarkError(f"benchmark images folder not found: {root}")
  samples = []
  if isinstance(data, dict):
    items = list(data.items())
  elif isinstance(data, list) and layout == "prompts":
    items = [(f"{i:05d}", p) for i, p in enumerate(data)]
  else:
    raise BenchmarkError(f"{path}: expected a mapping of image names for layout {layout!r}, "
                         f"got a {type(data).__name__}")
  for key, value in items:
    key = str(key)
    category = None
    if layout == "mjhq":
      if not isinstance(value, dict) or not isinstance(value.get("prompt"), str) or \
          not isinstance(value.get("category"), str):
        raise BenchmarkError(f"{path}: entry {key!r} must be {{'category': str, 'prompt': str}}, got {value!r}")
      prompt, category = value["prompt"], value["category"]
    else:
      if not isinstance(value, str):
        raise BenchmarkError(f"{path}: the prompt of entry {key!r} must be a string, got {value!r}")
      prompt = value
    image_file(key)  # a name that cannot be a file name is refused here, with the entry named
    samples.append(Sample(key, prompt, _real_path(layout, root, key, category), category))
  if not samples:
    raise BenchmarkError(f"{path}: no entries")
  if len({s.name for s in samples}) != len(samples):
    raise BenchmarkError(f"{path}: image names are not unique")
  return Benchmark(name or _default_name(layout, path), layout, path, root, tuple(samples))


# ----------------------------------------------------------------------------- image files
def image_files(folder: str | os.PathLike, exclude_prefixes: Sequence[str] = ("contact_sheet", "comparison")
                ) -> list[str]:
  """The image file names (``.png``, ``.jpg``, ``.jpeg``) of ``folder``, sorted; files whose name
  starts with one of ``exclude_prefixes`` (our contact sheets) are left out.

  Raises:
    FileNotFoundError: the folder does not exist.
    ValueError: it holds no image.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder not found: {folder}")
  names = sorted(n for n in os.listdir(folder)
                 if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(tuple(exclude_prefixes))
                 and not n.startswith("."))
  if not names:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
  return names


def read_rgb(path: str | os.PathLike) -> np.ndarray:
  """An image file as uint8 ``[H, W, 3]`` RGB, as deepcompressor reads them (PIL ``.convert("RGB")``).

  A grayscale, palette or RGBA file is converted with a warning that names the file (an alpha
  channel is dropped, not composited).

  Raises:
    FileNotFoundError: naming the file.
    ValueError: the file is not a readable image (named).
  """
  path = os.fspath(path)
  try:
    with Image.open(path) as im:
      im.load()
      mode = im.mode
      if mode != "RGB":
        what = {"L": "grayscale", "LA": "grayscale + alpha", "RGBA": "RGBA", "P": "palette", "I;16": "16-bit gray",
                "I": "32-bit gray", "F": "float", "CMYK": "CMYK"}.get(mode, f"mode {mode}")
        alpha = "A" in mode or (mode == "P" and "transparency" in im.info)
        dropped = " (its alpha channel is dropped)" if alpha else ""
        logging.warning("%s is a %s image; converted to RGB%s as PIL .convert('RGB') does", path, what, dropped)
        im = im.convert("RGB")
      array = np.asarray(im, dtype=np.uint8)
  except FileNotFoundError:
    raise FileNotFoundError(f"image file not found: {path}") from None
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise ValueError(f"{path}: not a readable image ({e})") from None
  if array.ndim != 3 or array.shape[2] != 3 or 0 in array.shape:
    raise ValueError(f"{path}: decoded to shape {array.shape}, expected [H, W, 3]")
  return array


__all__ = ["Benchmark", "BenchmarkError", "IMAGE_EXTENSIONS", "LAYOUTS", "Sample", "detect_layout", "image_file",
           "image_files", "image_seed", "load_benchmark", "read_rgb", "select_samples", "subset_name"]
