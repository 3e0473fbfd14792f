"""Comparison sheets: each method image beside its reference and a per-pixel difference heatmap.

:func:`comparison_sheet` lays out one row per image: the reference, the method's image and the
heatmap of ``|method − reference|`` (the mean over R, G, B, in 0–255 levels), drawn with
matplotlib's ``inferno`` colormap on a fixed scale (0 black … :data:`DIFF_SCALE` levels and above
bright yellow), so that sheets of different methods can be compared by eye. A caption under each
row names the file and its per-image metrics; a colour bar at the bottom gives the scale. Images
larger than ``max_side`` are box-downsampled by an integer factor (the difference is computed at
full resolution, then averaged over the same boxes); images smaller than :data:`MIN_SIDE` are
enlarged by an integer factor (pixel replication). Drawn with Pillow (ASCII text only: the
default font has no other glyphs everywhere); written atomically.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from svdquant_jax.pipelines.images import write_png

DIFF_SCALE = 64.0
COLORMAP = "inferno"
MAX_SIDE = 256
MIN_SIDE = 128
PAD = 6
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def _font(size: int = 12) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow without FreeType sizes
    return ImageFont.load_default()


def difference_map(method: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """float32 ``[H, W]``: ``mean_c |method − reference|`` of two uint8 ``[H, W, 3]`` images (0–255)."""
  method, reference = np.asarray(method), np.asarray(reference)
  if method.shape != reference.shape or method.ndim != 3:
    raise ValueError(f"difference_map: images of shapes {method.shape} and {reference.shape}; expected the same "
                     "[H, W, 3]")
  return np.abs(method.astype(np.float32) - reference.astype(np.float32)).mean(axis=-1)


def heatmap(diff: np.ndarray, scale: float = DIFF_SCALE) -> np.ndarray:
  """uint8 ``[H, W, 3]``: ``diff / scale`` (clipped to [0, 1]) through the colormap."""
  if not scale > 0:
    raise ValueError(f"scale must be positive, got {scale}")
  rgba = matplotlib.colormaps[COLORMAP](np.clip(np.asarray(diff, np.float32) / scale, 0.0, 1.0))
  return np.round(rgba[..., :3] * 255).astype(np.uint8)


def _factor(h: int, w: int, max_side: int) -> int:
  """A box-downsampling factor, or minus an enlargement factor for images under MIN_SIDE."""
  if max(h, w) < MIN_SIDE:
    return -(-(-MIN_SIDE // max(h, w)))
  return max(1, -(-max(h, w) // max_side))


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> list[str]:
  """``text`` cut into lines that fit ``width`` pixels, at its double spaces (else anywhere)."""
  lines, current = [], ""
  for part in text.split("  "):
    candidate = f"{current}  {part}" if current else part
    if draw.textlength(candidate, font=font) <= width or not current:
      current = candidate
    else:
      lines.append(current)
      current = part
  lines.append(current)
  out = []
  for line in lines:  # a single part wider than the sheet: cut it by characters
    while draw.textlength(line, font=font) > width and len(line) > 1:
      cut = len(line) - 1
      while cut > 1 and draw.textlength(line[:cut], font=font) > width:
        cut -= 1
      out.append(line[:cut])
      line = line[cut:]
    out.append(line)
  return out


def _box(x: np.ndarray, f: int) -> np.ndarray:
  if f < 0:  # enlarge by -f
    return np.repeat(np.repeat(x, -f, axis=0), -f, axis=1)
  if f == 1:
    return x
  h2, w2 = x.shape[0] // f, x.shape[1] // f
  return x[:h2 * f, :w2 * f].reshape(h2, f, w2, f, *x.shape[2:]).astype(np.float32).mean(axis=(1, 3))


def comparison_sheet(reference: Sequence[np.ndarray], method: Sequence[np.ndarray], captions: Sequence[str],
                     method_name: str = "method", scale: float = DIFF_SCALE, max_side: int = MAX_SIDE) -> np.ndarray:
  """The sheet as uint8 ``[H, W, 3]`` (layout in the module docstring).

  Args:
    reference, method: uint8 ``[H, W, 3]`` images, pairwise of the same size.
    captions: one line per pair (file name, metrics).
    method_name: the middle column's title.
    scale: difference (0–255 levels) shown at the top of the colormap.
    max_side: thumbnails are downsampled to at most this many pixels per side.

  Raises:
    ValueError: no images, different counts, or a pair of different sizes (the pair is named).
  """
  reference, method, captions = list(reference), list(method), list(captions)
  if not reference or len(reference) != len(method) or len(captions) != len(reference):
    raise ValueError(f"comparison_sheet needs equal, non-zero counts: {len(reference)} reference, {len(method)} "
                     f"method images, {len(captions)} captions")
  rows = []
  for i, (ref, img) in enumerate(zip(reference, method)):
    ref, img = np.asarray(ref), np.asarray(img)
    if ref.shape != img.shape or ref.ndim != 3 or ref.shape[2] != 3:
      raise ValueError(f"pair {i} ({captions[i]}): reference {ref.shape} and method {img.shape} differ or are not "
                       "[H, W, 3]")
    f = _factor(ref.shape[0], ref.shape[1], max_side)
    diff = heatmap(_box(difference_map(img, ref), f), scale)
    rows.append([np.round(_box(ref, f)).astype(np.uint8), np.round(_box(img, f)).astype(np.uint8), diff])
  font = _font(12)
  line = 15
  cell_w = max(r[0].shape[1] for r in rows)
  width = 3 * cell_w + 4 * PAD
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  wrapped = [_wrap(measure, caption, font, width - 2 * PAD) for caption in captions]
  titles = ["reference", method_name, f"|{method_name} - reference|"]
  height = PAD + line + sum(r[0].shape[0] + len(w) * line + PAD for r, w in zip(rows, wrapped)) + 3 * line + 2 * PAD
  sheet = Image.new("RGB", (width, height), BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  for c, title in enumerate(titles):
    draw.text((PAD + c * (cell_w + PAD), PAD), _wrap(draw, title, font, cell_w)[0], fill=TEXT, font=font)
  y = PAD + line
  for cells, caption_lines in zip(rows, wrapped):
    for c, cell in enumerate(cells):
      sheet.paste(Image.fromarray(cell), (PAD + c * (cell_w + PAD), y))
    y += cells[0].shape[0]
    for text in caption_lines:
      draw.text((PAD, y + 1), text, fill=TEXT, font=font)
      y += line
    y += PAD
  draw.text((PAD, y), "mean |difference| over RGB, 0-255 levels:", fill=TEXT, font=font)
  y += line
  bar_w = width - 2 * PAD
  bar = heatmap(np.tile(np.linspace(0, scale, bar_w, dtype=np.float32), (line // 2, 1)), scale)
  sheet.paste(Image.fromarray(bar), (PAD, y))
  y += line // 2 + 2
  for value, x in ((0, PAD), (scale / 2, PAD + bar_w // 2), (scale, PAD + bar_w - 1)):
    label = f">={value:g}" if value == scale else f"{value:g}"
    tw = draw.textlength(label, font=font)
    draw.text((min(max(PAD, x - tw / 2), width - PAD - tw), y), label, fill=TEXT, font=font)
  return np.asarray(sheet, dtype=np.uint8)


def save_comparison_sheet(path: str | os.PathLike, reference: Sequence[np.ndarray], method: Sequence[np.ndarray],
                          captions: Sequence[str], method_name: str = "method", scale: float = DIFF_SCALE,
                          max_side: int = MAX_SIDE) -> str:
  """Writes :func:`comparison_sheet` as a PNG at ``path`` (atomically); returns the path."""
  write_png(path, comparison_sheet(reference, method, captions, method_name, scale, max_side))
  return os.fspath(path)


__all__ = ["COLORMAP", "DIFF_SCALE", "comparison_sheet", "difference_map", "heatmap", "save_comparison_sheet"]
