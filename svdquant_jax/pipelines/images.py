"""Decoded images to uint8, PNG files (read and written with Pillow) and contact sheets.

All functions here run on the host with numpy (jax arrays are accepted and copied to host).

PNG files hold 8-bit samples only, as ``uint8 [H, W, C]`` arrays with one channel per stored
sample: C = 1 (gray, mode ``L``), 2 (gray + alpha, ``LA``), 3 (RGB) or 4 (RGBA). :func:`read_png`
returns the samples exactly as stored and never converts: palette images, 16-bit or 1/2/4-bit
samples, animated PNGs, truncated or corrupt files (every chunk's CRC is checked) and files that
are not PNGs raise :class:`PNGError` naming the file. :func:`write_png` writes atomically, so a
failed or interrupted write never leaves a partial file at the target path.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from svdquant_jax.utils.files import atomic_open, atomic_write_text

# Channels <-> Pillow mode of 8-bit images. A PNG decoded to one of these modes is accepted only if
# its samples were stored that way too (Pillow's raw mode equals the mode): Pillow silently widens
# 1/2/4-bit gray to ``L`` (raw modes ``1``, ``L;2``, ``L;4``) and narrows 16-bit RGB(A) to 8 bits.
_MODE_BY_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_CHANNELS_BY_MODE = {m: c for c, m in _MODE_BY_CHANNELS.items()}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The end chunk: length 0, type IEND and its (constant) CRC. Pillow's verify() stops at the IEND
# type without reading its CRC, so a file cut in the last 4 bytes is caught by looking for this.
_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"


class PNGError(ValueError):
  """A PNG file is missing, unsupported, truncated or corrupt, or an image cannot be encoded."""


def _as_hwc(image, name: str = "image") -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise PNGError(f"{name} must be uint8, got {image.dtype} (convert floats with to_uint8 first)")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in _MODE_BY_CHANNELS:
    raise PNGError(f"{name} must be [H, W] or [H, W, C] with C in (1, 2, 3, 4), got shape {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise PNGError(f"{name} must be non-empty, got shape {image.shape}")
  return np.ascontiguousarray(image)


def _to_pil(image: np.ndarray) -> Image.Image:
  """uint8 [H, W, C] (checked by :func:`_as_hwc`) as a Pillow image of the matching mode."""
  pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
  assert pil.mode == _MODE_BY_CHANNELS[image.shape[2]], (pil.mode, image.shape)
  return pil


def write_png(path: str | os.PathLike, image, compress_level: int = 6) -> None:
  """Writes an 8-bit image to ``path`` as PNG, atomically (temporary sibling, then rename).

  Args:
    path: the destination; its folder is created if missing.
    image: uint8 ``[H, W]`` or ``[H, W, C]``, C = 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA).
    compress_level: zlib level 0-9 (PNG is lossless at every level).

  Raises:
    PNGError: ``image`` is not uint8, has another shape or is empty, or ``compress_level`` is out
      of range; nothing is written then.
  """
  image = _as_hwc(image)
  if isinstance(compress_level, bool) or not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
    raise PNGError(f"compress_level must be an int in 0..9, got {compress_level!r}")
  pil = _to_pil(image)
  with atomic_open(path, "wb") as f:
    pil.save(f, format="PNG", compress_level=compress_level)


def _check_stored_format(pil: Image.Image, source: str) -> None:
  """Refuses anything :func:`read_png` would have to convert (see the module docstring)."""
  rawmode = pil.tile[0][3] if pil.tile and len(pil.tile[0]) > 3 else None
  if pil.mode == "P" or rawmode == "P" or str(rawmode).startswith("P;"):
    raise PNGError(f"{source}: palette (indexed-colour) PNGs are not supported; save it as RGB or RGBA")
  if pil.mode not in _CHANNELS_BY_MODE or rawmode != pil.mode:
    depth = "16-bit" if "16" in str(rawmode) or pil.mode.startswith("I") else "sub-byte (1/2/4-bit)"
    raise PNGError(f"{source}: {depth} samples (Pillow mode {pil.mode!r}, stored as {rawmode!r}) are not "
                   "supported; only 8-bit gray, gray + alpha, RGB and RGBA PNGs are read")
  if getattr(pil, "n_frames", 1) != 1:
    raise PNGError(f"{source}: animated PNG with {pil.n_frames} frames; only still images are read")


# What Pillow raises for broken files: OSError / UnidentifiedImageError (truncated, not an image),
# SyntaxError (bad chunk, CRC mismatch), and a few lower-level errors for malformed headers.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
               Image.DecompressionBombError)


def decode_png(data: bytes, source: str = "<bytes>", channels: int | None = None) -> np.ndarray:
  """Decodes PNG bytes (see :func:`read_png`); ``source`` names them in error messages."""
  try:
    # verify() walks every chunk up to IEND and checks its CRC (it catches truncated and corrupt
    # files that the image decoder alone would accept); a verified image must be reopened to load.
    with Image.open(io.BytesIO(data), formats=["PNG"]) as pil:
      pil.verify()
    with Image.open(io.BytesIO(data), formats=["PNG"]) as pil:
      _check_stored_format(pil, source)
      pil.load()
      image = np.array(pil, dtype=np.uint8)
    if _IEND_CHUNK not in data:
      raise PNGError(f"{source}: truncated PNG file (no complete IEND chunk)")
  except PNGError:
    raise
  except UnidentifiedImageError:
    if not data:
      raise PNGError(f"{source}: empty file, not a PNG") from None
    if not data.startswith(_PNG_SIGNATURE):
      raise PNGError(f"{source}: not a PNG file (no PNG signature)") from None
    raise PNGError(f"{source}: truncated or corrupt PNG file (no readable header)") from None
  except _PIL_ERRORS as e:
    raise PNGError(f"{source}: truncated or corrupt PNG file ({type(e).__name__}: {e})") from None
  if image.ndim == 2:
    image = image[:, :, None]
  if channels is not None and image.shape[2] != channels:
    raise PNGError(f"{source}: expected {channels} channel(s), the file has {image.shape[2]} "
                   f"({_MODE_BY_CHANNELS[image.shape[2]]})")
  return image


def read_png(path: str | os.PathLike, channels: int | None = None) -> np.ndarray:
  """Reads an 8-bit PNG file, the samples exactly as stored.

  Args:
    path: the file.
    channels: if given, the number of channels the file must have (e.g. 3 for RGB images); no
      conversion is ever made.

  Returns:
    uint8 ``[H, W, C]``: C = 3 for RGB, 4 for RGBA, 1 for gray, 2 for gray + alpha.

  Raises:
    PNGError (a ValueError) naming ``path``: the file is missing or unreadable, not a PNG,
      truncated or corrupt, palette-based, not 8-bit, animated, or has another channel count
      than ``channels``.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise PNGError(f"PNG file not found: {path}") from None
  except OSError as e:
    raise PNGError(f"{path}: cannot read PNG file ({e})") from None
  return decode_png(data, path, channels)


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
  fill = int(background) if c == 1 else (int(background),) * c
  sheet = Image.new(_MODE_BY_CHANNELS[c], (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), fill)
  for k in range(b):
    r, col = divmod(k, columns)
    sheet.paste(_to_pil(images[k]), (pad + col * (w + pad), pad + r * (h + pad)))
  return np.array(sheet, dtype=np.uint8).reshape(sheet.height, sheet.width, c)


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
