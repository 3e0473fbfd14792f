"""Decoded images to uint8, PNG files and contact sheets.

All functions here run on the host with numpy (jax arrays are accepted and copied to host).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np

from svdquant_jax.utils.files import atomic_write_text
from svdquant_jax.utils.png import write_png


def to_uint8(images) -> np.ndarray:
  """Maps decoded images in [-1, 1] to uint8, as diffusers' ``VaeImageProcessor`` does.

  diffusers denormalizes in the tensor's own dtype (``(x * 0.5 + 0.5).clamp(0, 1)``, rounding
  after each op for bf16/fp16), converts to float32, then ``round(x * 255)`` (round half to
  even) in ``numpy_to_pil``. Same here, so bf16 VAE outputs give the same bytes.

  Args:
    images: float array (float16, bfloat16, float32 or float64), any shape, typically
      [B, H, W, 3] (NHWC), nominally in [-1, 1]; values outside are clipped.

  Returns:
    uint8 array of the same shape.
  """
  x = np.asarray(images)
  if not np.issubdtype(x.dtype, np.floating) and x.dtype.name != "bfloat16":
    raise ValueError(f"images must be a float array in [-1, 1], got dtype {x.dtype}")
  half, zero, one = x.dtype.type(0.5), x.dtype.type(0), x.dtype.type(1)
  unit = np.clip(x * half + half, zero, one).astype(np.float32)
  return np.round(unit * np.float32(255)).astype(np.uint8)


def _check_uint8_batch(images, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"{name} must be uint8 (use to_uint8 first), got {images.dtype}")
  if images.ndim != 4 or images.shape[-1] not in (1, 3, 4) or 0 in images.shape:
    raise ValueError(f"{name} must be [B, H, W, C] with C in (1, 3, 4) and no empty axis, "
                     f"got shape {images.shape}")
  return images


def _check_name(name: str) -> str:
  if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
      or "\0" in name:
    raise ValueError(f"image name {name!r} must be a non-empty file name without path separators")
  return name if name.lower().endswith(".png") else name + ".png"


def save_images(folder: str | os.PathLike, images, names: Sequence[str]) -> list[str]:
  """Writes each image of a batch as ``<folder>/<name>.png`` (atomically, one file each).

  Args:
    folder: output directory (created if missing).
    images: uint8 [B, H, W, C], C in (1, 3, 4).
    names: B distinct file names; ``.png`` is appended unless present.

  Returns:
    The B written paths.
  """
  images = _check_uint8_batch(images)
  names = list(names)
  if len(names) != images.shape[0]:
    raise ValueError(f"got {len(names)} names for {images.shape[0]} images")
  files = [_check_name(n) for n in names]
  if len(set(files)) != len(files):
    raise ValueError(f"image names must be distinct, got {names}")
  os.makedirs(folder, exist_ok=True)
  paths = []
  for image, file in zip(images, files):
    path = os.path.join(os.fspath(folder), file)
    write_png(path, image)
    paths.append(path)
  return paths


def contact_sheet(images, columns: int | None = None, pad: int = 4, background: int = 255) -> np.ndarray:
  """Tiles a batch of images into one grid image, row-major.

  Cell (row, column) holds image ``row * columns + column``; cells past the last image and the
  ``pad``-pixel gutters (around every cell, borders included) are filled with ``background``.

  Args:
    images: uint8 [B, H, W, C].
    columns: images per row; default ``ceil(sqrt(B))``.
    pad: gutter width in pixels (>= 0).
    background: gutter/empty-cell gray level, 0-255.

  Returns:
    uint8 [rows * H + (rows + 1) * pad, columns * W + (columns + 1) * pad, C] with
    ``rows = ceil(B / columns)``.
  """
  images = _check_uint8_batch(images)
  b, h, w, c = images.shape
  if columns is None:
    columns = math.ceil(math.sqrt(b))
  if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
    raise ValueError(f"columns must be a positive int, got {columns!r}")
  if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
    raise ValueError(f"pad must be a non-negative int, got {pad!r}")
  if not 0 <= background <= 255:
    raise ValueError(f"background must be in 0..255, got {background}")
  columns = min(columns, b)
  rows = math.ceil(b / columns)
  sheet = np.full((rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad, c), background,
                  np.uint8)
  for k in range(b):
    r, col = divmod(k, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    sheet[top:top + h, left:left + w] = images[k]
  return sheet


def save_contact_sheet(path: str | os.PathLike, images, captions: Sequence[str],
                       columns: int | None = None, pad: int = 4) -> tuple[str, str]:
  """Writes :func:`contact_sheet` as a PNG at ``path`` and a text index at ``<path>.txt``.

  The index has a header line and one tab-separated line per image:
  ``row<TAB>column<TAB>index<TAB>caption``, rows and columns counted from 0. Each run of
  whitespace in a caption (newlines and tabs included) is written as one space, so that every
  caption stays on its own line.

  Args:
    path: the PNG path.
    images: uint8 [B, H, W, C].
    captions: B captions (the prompts).
    columns, pad: as :func:`contact_sheet`.

  Returns:
    (png path, index path).
  """
  images = _check_uint8_batch(images)
  captions = list(captions)
  if len(captions) != images.shape[0]:
    raise ValueError(f"got {len(captions)} captions for {images.shape[0]} images")
  sheet = contact_sheet(images, columns, pad)
  used_columns = min(columns if columns is not None else math.ceil(math.sqrt(len(captions))),
                     len(captions))
  lines = ["row\tcolumn\tindex\tcaption"]
  for k, caption in enumerate(captions):
    if not isinstance(caption, str):
      raise ValueError(f"caption {k} must be a string, got {type(caption).__name__}")
    r, col = divmod(k, used_columns)
    lines.append(f"{r}\t{col}\t{k}\t{' '.join(caption.split())}")
  path = os.fspath(path)
  index_path = path + ".txt"
  write_png(path, sheet)
  atomic_write_text(index_path, "\n".join(lines) + "\n")
  return path, index_path
