"""PNG encoding and decoding for 8-bit images, with numpy and zlib only.

Supported: bit depth 8, non-interlaced, colour types grayscale (0), RGB (2), grayscale + alpha (4)
and RGBA (6), i.e. ``uint8 [H, W, C]`` with C = 1, 3, 2, 4. Palette images, other bit depths and
Adam7 interlacing are refused with :class:`PNGError`, as are truncated or corrupt files (every
chunk's CRC is checked, the zlib stream must end exactly where the image data ends).

Ancillary chunks (gAMA, sRGB, pHYs, tEXt, tRNS, ...) are CRC-checked and otherwise ignored: the
decoder returns the stored samples as they are.

Writing picks a filter per scanline the way libpng's default heuristic does (the filter whose
output has the smallest sum of absolute values, bytes read as signed), computed for all rows at
once since the encoder knows every unfiltered byte.
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from svdquant_jax.utils.files import atomic_open

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Colour type <-> number of channels (8-bit samples only).
_CHANNELS_BY_COLOR_TYPE = {0: 1, 2: 3, 4: 2, 6: 4}
_COLOR_TYPE_BY_CHANNELS = {c: t for t, c in _CHANNELS_BY_COLOR_TYPE.items()}


class PNGError(ValueError):
  """A PNG file is unsupported, truncated or corrupt, or an image cannot be encoded."""


def _chunk(kind: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(kind + data) & 0xFFFFFFFF
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _as_hwc(image: np.ndarray, name: str = "image") -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise PNGError(f"{name} must be uint8, got {image.dtype} (convert floats with to_uint8 first)")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in _COLOR_TYPE_BY_CHANNELS:
    raise PNGError(f"{name} must be [H, W] or [H, W, C] with C in (1, 2, 3, 4), got shape {image.shape}")
  if image.shape[0] == 0 or image.shape[1] == 0:
    raise PNGError(f"{name} must be non-empty, got shape {image.shape}")
  return np.ascontiguousarray(image)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
  """The Paeth predictor on int16 arrays: whichever of a, b, c is closest to a + b - c (ties: a, b)."""
  p = a + b - c
  pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
  return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


# |byte| when the byte is read as a signed int8: the per-byte cost of libpng's filter heuristic.
_SIGNED_MAGNITUDE = np.minimum(np.arange(256), 256 - np.arange(256)).astype(np.uint8)


def _filter_rows(image: np.ndarray, filter_type: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Filters every scanline with the heuristically best of the five PNG filters.

  Args:
    image: uint8 [H, W, C].
    filter_type: use this filter (0-4) for every row instead of choosing per row.

  Returns:
    (filter types uint8 [H], filtered bytes uint8 [H, W * C]).
  """
  h, w, c = image.shape
  x = image.reshape(h, w * c)
  a = np.zeros_like(x)  # left neighbour (same channel of the previous pixel)
  a[:, c:] = x[:, :-c]
  b = np.zeros_like(x)  # the byte above
  b[1:] = x[:-1]
  up_left = np.zeros_like(x)
  up_left[1:, c:] = x[:-1, :-c]
  average = (a >> 1) + (b >> 1) + (a & b & 1)  # floor((a + b) / 2) without leaving uint8
  paeth = _paeth(a.astype(np.int16), b.astype(np.int16), up_left.astype(np.int16)).astype(np.uint8)
  # uint8 subtraction wraps, which is the mod-256 residue PNG stores.
  candidates = [x, x - a, x - b, x - average, x - paeth]
  if filter_type is not None:
    return np.full(h, filter_type, np.uint8), candidates[filter_type]
  cost = np.stack([_SIGNED_MAGNITUDE[f].sum(axis=1, dtype=np.int64) for f in candidates])  # [5, H]
  types = np.argmin(cost, axis=0).astype(np.uint8)
  filtered = np.empty_like(x)
  for t, f in enumerate(candidates):
    rows = types == t
    filtered[rows] = f[rows]
  return types, filtered


def encode_png(image: np.ndarray, compress_level: int = 6, filter_type: int | None = None) -> bytes:
  """Encodes an 8-bit image as PNG bytes.

  Args:
    image: uint8 ``[H, W]`` or ``[H, W, C]``, C = 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA).
    compress_level: zlib level 0-9.
    filter_type: ``None`` chooses a filter per row; 0-4 (None, Sub, Up, Average, Paeth) forces one.

  Returns:
    The PNG file contents.
  """
  image = _as_hwc(image)
  if not 0 <= compress_level <= 9:
    raise PNGError(f"compress_level must be in 0..9, got {compress_level}")
  if filter_type is not None and filter_type not in range(5):
    raise PNGError(f"filter_type must be None or 0..4, got {filter_type!r}")
  h, w, c = image.shape
  if h >= 2**31 or w >= 2**31:
    raise PNGError(f"image of shape {image.shape} is too large for PNG")
  types, rows = _filter_rows(image, filter_type)
  raw = np.concatenate([types[:, None], rows], axis=1).tobytes()
  header = struct.pack(">IIBBBBB", w, h, 8, _COLOR_TYPE_BY_CHANNELS[c], 0, 0, 0)
  return b"".join([
      PNG_SIGNATURE,
      _chunk(b"IHDR", header),
      _chunk(b"IDAT", zlib.compress(raw, compress_level)),
      _chunk(b"IEND", b""),
  ])


def write_png(path: str | os.PathLike, image: np.ndarray, compress_level: int = 6,
              filter_type: int | None = None) -> None:
  """Writes an 8-bit image to ``path`` as PNG, atomically (see :func:`encode_png`)."""
  data = encode_png(image, compress_level, filter_type)
  with atomic_open(path, "wb") as f:
    f.write(data)


def _unfilter(raw: np.ndarray, types: np.ndarray, bpp: int, source: str) -> np.ndarray:
  """Reverses the scanline filters.

  Average and Paeth make each pixel depend on its reconstructed left, upper and upper-left
  neighbours, so no row and no column can be done in one vector step. Pixels on one
  anti-diagonal (row + column = k) only depend on the two previous anti-diagonals, so the
  reconstruction sweeps the H + W - 1 anti-diagonals, each as one vector step over its pixels
  (every pixel predicted with its own row's filter). Images whose rows use only None/Sub/Up
  take a cheaper row-by-row path.

  Args:
    raw: uint8 [H, W, bpp] filtered bytes (filter-type bytes removed).
    types: uint8 [H] filter type of each row.
    bpp: bytes per pixel.
    source: file name for error messages.

  Returns:
    uint8 [H, W, bpp], the image.
  """
  h, w, _ = raw.shape
  bad = np.nonzero(types > 4)[0]
  if bad.size:
    raise PNGError(f"{source}: row {int(bad[0])} has invalid filter type {int(types[bad[0]])}")
  if not np.any(types >= 3):
    out = np.empty_like(raw)
    previous = np.zeros((w, bpp), np.uint8)
    for r in range(h):
      t = types[r]
      if t == 0:
        row = raw[r]
      elif t == 1:
        row = np.cumsum(raw[r], axis=0, dtype=np.uint8)  # wraps mod 256
      else:
        row = raw[r] + previous
      out[r] = row
      previous = out[r]
    return out

  # padded[r + 1, c + 1] holds pixel (r, c); the zero first row/column are the PNG "outside" bytes.
  padded = np.zeros((h + 1, w + 1, bpp), np.int16)
  raw16 = raw.astype(np.int16)
  row_types = types.astype(np.int16)
  for k in range(h + w - 1):
    r = np.arange(max(0, k - w + 1), min(h - 1, k) + 1)
    c = k - r
    left = padded[r + 1, c]
    above = padded[r, c + 1]
    above_left = padded[r, c]
    t = row_types[r][:, None]
    prediction = np.where(t == 1, left, 0)
    prediction = np.where(t == 2, above, prediction)
    prediction = np.where(t == 3, (left + above) >> 1, prediction)
    prediction = np.where(t == 4, _paeth(left, above, above_left), prediction)
    padded[r + 1, c + 1] = (raw16[r, c] + prediction) & 0xFF
  return padded[1:, 1:].astype(np.uint8)


def decode_png(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes an 8-bit, non-interlaced gray / gray+alpha / RGB / RGBA PNG.

  Args:
    data: the file contents.
    source: name used in error messages.

  Returns:
    uint8 [H, W, C] with C = 1, 2, 3 or 4.

  Raises:
    PNGError: unsupported format (palette, 16-bit or sub-byte depths, interlacing), or a
      truncated/corrupt file (bad signature, CRC mismatch, missing chunks, bad zlib data,
      wrong amount of image data).
  """
  if data[:8] != PNG_SIGNATURE:
    raise PNGError(f"{source}: not a PNG file (bad signature)")
  pos = 8
  header = None
  idat = []
  ended = False
  while pos < len(data):
    if pos + 8 > len(data):
      raise PNGError(f"{source}: truncated chunk header at byte {pos}")
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    kind = data[pos + 4:pos + 8]
    end = pos + 12 + length
    if end > len(data):
      raise PNGError(f"{source}: truncated {kind!r} chunk at byte {pos}")
    body = data[pos + 8:pos + 8 + length]
    (crc,) = struct.unpack(">I", data[end - 4:end])
    if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
      raise PNGError(f"{source}: CRC mismatch in {kind!r} chunk at byte {pos} (corrupt file)")
    pos = end
    if header is None and kind != b"IHDR":
      raise PNGError(f"{source}: first chunk is {kind!r}, expected IHDR")
    if kind == b"IHDR":
      if header is not None or length != 13:
        raise PNGError(f"{source}: malformed or repeated IHDR chunk")
      header = struct.unpack(">IIBBBBB", body)
    elif kind == b"IDAT":
      idat.append(body)
    elif kind == b"IEND":
      ended = True
      break
    elif kind == b"PLTE":
      pass  # a suggested palette in a truecolour image; palette images are refused from IHDR
    elif not kind[0:1].isascii() or not kind[0:1].islower():
      raise PNGError(f"{source}: unknown critical chunk {kind!r}")
  if header is None:
    raise PNGError(f"{source}: missing IHDR chunk")
  if not ended:
    raise PNGError(f"{source}: truncated file (no IEND chunk)")
  width, height, depth, color_type, compression, filter_method, interlace = header
  if color_type == 3:
    raise PNGError(f"{source}: palette (indexed-colour) PNGs are not supported; convert to RGB")
  if color_type not in _CHANNELS_BY_COLOR_TYPE:
    raise PNGError(f"{source}: invalid colour type {color_type}")
  if depth != 8:
    raise PNGError(f"{source}: bit depth {depth} is not supported (only 8-bit)")
  if interlace != 0:
    raise PNGError(f"{source}: interlaced (Adam7) PNGs are not supported")
  if compression != 0 or filter_method != 0:
    raise PNGError(f"{source}: unknown compression/filter method {compression}/{filter_method}")
  if width == 0 or height == 0:
    raise PNGError(f"{source}: empty image {width}x{height}")
  if not idat:
    raise PNGError(f"{source}: no IDAT chunk")
  bpp = _CHANNELS_BY_COLOR_TYPE[color_type]
  expected = height * (1 + width * bpp)
  decompressor = zlib.decompressobj()
  try:
    raw = decompressor.decompress(b"".join(idat), expected + 1)
  except zlib.error as e:
    raise PNGError(f"{source}: corrupt image data ({e})") from None
  if len(raw) != expected or not decompressor.eof:
    raise PNGError(
        f"{source}: image data holds {len(raw)}{'+' if len(raw) > expected else ''} bytes "
        f"(zlib stream {'complete' if decompressor.eof else 'incomplete'}), expected {expected}")
  rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + width * bpp)
  image = _unfilter(rows[:, 1:].reshape(height, width, bpp), rows[:, 0], bpp, source)
  return image


def read_png(path: str | os.PathLike) -> np.ndarray:
  """Reads a PNG file (see :func:`decode_png`): uint8 [H, W, C], C in (1, 2, 3, 4)."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise PNGError(f"PNG file not found: {path}") from None
  return decode_png(data, path)
