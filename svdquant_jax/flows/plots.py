"""Report plots, drawn with matplotlib and written as PNG files atomically.

Every function draws one :class:`matplotlib.figure.Figure` on its own Agg canvas (no pyplot and no
global backend switch, so nothing here touches the process-wide matplotlib state), writes it to
``path`` through a temporary sibling that is renamed into place (a failed write leaves no partial
file), and returns the figure so that callers and tests can inspect what was drawn
(``fig.axes[0].get_lines()``: one line per curve).

  * :func:`plot_spectra`: singular values of W, Ŵ = diag(λ) W and the residual R (log y axis).
  * :func:`plot_rank_sweep`: relative output error against the low-rank branch's rank.
  * :func:`plot_block_errors`: relative output error of each transformer block, one line per method.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from svdquant_jax.utils.files import atomic_open

DPI = 110
SPECTRUM_LABELS = {"W": "W (original weight)", "W_hat": "Ŵ = diag(λ) W (smoothed weight)",
                   "R": "R = Ŵ − L (residual after the rank-r branch)"}
FORMAT_LABELS = {"int4": "W4A4 INT4 (g64)", "nvfp4": "W4A4 NVFP4 (g16)"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _figure(width: float = 8.0, height: float = 5.0) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.grid(True, which="major", color="0.85", linewidth=0.8)
  ax.grid(True, which="minor", axis="y", color="0.93", linewidth=0.5)
  return fig, ax


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
  """Writes ``fig`` as a PNG at ``path`` atomically (folder created if missing); returns the path.

  The PNG carries no "Software" text chunk, so the same figure gives the same bytes whatever the
  matplotlib version.
  """
  path = os.fspath(path)
  with atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=DPI, metadata={"Software": None})
  return path


def plot_spectra(spectra: Mapping[str, Sequence[float]], path: str | os.PathLike, rank: int | None = None,
                 title: str = "Singular values of the weight before and after SVDQuant") -> Figure:
  """Singular values (descending) of each matrix in ``spectra`` against their index, log y axis.

  Args:
    spectra: name -> singular values; the names ``W``, ``W_hat`` and ``R`` get descriptive labels,
      others are shown as they are.
    path: the PNG to write.
    rank: the low-rank branch's rank r; marked with a dashed vertical line at index r + 1 (the
      largest singular value the residual keeps).
    title: the plot title.

  Returns:
    The figure (one line per spectrum, plus the rank marker).
  """
  if not spectra:
    raise ValueError("plot_spectra needs at least one spectrum")
  fig, ax = _figure()
  for name, values in spectra.items():
    values = np.asarray(values, np.float64)
    ax.plot(np.arange(1, len(values) + 1), values, linewidth=1.8, label=SPECTRUM_LABELS.get(name, name))
  if rank:
    ax.axvline(rank + 1, color="0.3", linestyle="--", linewidth=1.0,
               label=f"index r + 1 = {rank + 1} (rank r = {rank})")
  ax.set_yscale("log")
  ax.set_xlim(left=0)
  ax.set_xlabel("index i (singular values in descending order)")
  ax.set_ylabel("singular value σᵢ (log scale)")
  ax.set_title(title)
  ax.legend(loc="upper right")
  save_figure(fig, path)
  return fig


def plot_rank_sweep(sweep: Mapping[str, Mapping[int, float]], path: str | os.PathLike, note: str = "",
                    title: str = "SVDQuant: output error against the low-rank branch's rank") -> Figure:
  """Relative output error against rank, one line per format; log y axis.

  Args:
    sweep: format name (``int4``, ``nvfp4``, or any label) -> {rank: relative error}.
    path: the PNG to write.
    note: how each rank was quantized, shown under the title.
    title: the plot title.

  Returns:
    The figure (one line per format).
  """
  if not sweep or not any(sweep.values()):
    raise ValueError("plot_rank_sweep needs at least one format with at least one rank")
  fig, ax = _figure()
  ranks = sorted({int(r) for errors in sweep.values() for r in errors})
  for (name, errors), marker in zip(sweep.items(), itertools.cycle(_MARKERS)):
    xs = sorted(int(r) for r in errors)
    ax.plot(xs, [float(errors[r]) for r in xs], marker=marker, linewidth=1.8, label=FORMAT_LABELS.get(name, name))
  # Ranks usually double (0, 8, 16, ..., 128): a symmetric log axis spaces them evenly and keeps 0.
  linthresh = min([r for r in ranks if r > 0], default=1)
  ax.set_xscale("symlog", base=2, linthresh=linthresh, linscale=1.0)
  ax.set_xticks(ranks, [str(r) for r in ranks])
  ax.xaxis.set_minor_locator(NullLocator())  # no minor ticks between the ranks
  ax.set_yscale("log")
  ax.set_xlabel("rank r of the low-rank branch (0 = smoothing only)")
  ax.set_ylabel("relative output error ‖xW − ŷ‖ / ‖xW‖ (log scale)")
  ax.set_title(title + (f"\n{note}" if note else ""), fontsize=11)
  ax.legend(loc="upper right")
  save_figure(fig, path)
  return fig


def plot_block_errors(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                      title: str = "Relative output error per block") -> Figure:
  """Relative output error of each block, one line per method; log y axis.

  Args:
    rows: one dict per method: ``{"method": str, "block_errors": [(block name, relative error), ...]}``;
      other keys are ignored (the rows of the PTQ results can be passed as they are). A row without
      ``block_errors`` (missing or None: the method was run without them) gets no line. Blocks are
      placed on the x axis in the order they first appear (a method that skips a block has no point
      there): x = block index, labelled with the block names. Errors <= 0 or NaN cannot be shown
      on the log axis: their points are masked (a gap in the line).
    path: the PNG to write.
    title: the plot title.

  Returns:
    The figure: exactly one line per row that has ``block_errors`` (in the order of ``rows``,
    labelled with its method in the legend).

  Raises:
    ValueError: no rows, a row without ``method``, or a malformed ``block_errors`` entry.
  """
  rows = list(rows)
  if not rows:
    raise ValueError("plot_block_errors needs at least one row")
  blocks: dict[str, int] = {}
  series = []
  for i, row in enumerate(rows):
    if "method" not in row:
      raise ValueError(f"row {i} has no 'method'; each row needs 'method' and 'block_errors'")
    if row.get("block_errors") is None:
      continue
    try:
      pairs = [(str(name), float(error)) for name, error in row["block_errors"]]
    except (TypeError, ValueError) as e:
      raise ValueError(f"row {i} ({row['method']}): block_errors must be (block name, error) pairs ({e})") from None
    for name, _ in pairs:
      blocks.setdefault(name, len(blocks))
    series.append((str(row["method"]), pairs))
  width = min(max(8.0, 3.5 + 0.22 * len(blocks)), 40.0)
  fig, ax = _figure(width, 5.5)
  for (method, pairs), marker in zip(series, itertools.cycle(_MARKERS)):
    ax.plot([blocks[name] for name, _ in pairs], [error for _, error in pairs], marker=marker, markersize=4,
            linewidth=1.5, label=method)
  ax.set_xticks(range(len(blocks)), list(blocks), rotation=60, ha="right", rotation_mode="anchor",
                fontsize=8 if len(blocks) > 24 else 9)
  ax.set_xlim(-0.5, max(len(blocks), 1) - 0.5)
  ax.set_yscale("log")
  if not blocks:
    ax.text(0.5, 0.5, "no block errors recorded", transform=ax.transAxes, ha="center", va="center")
  ax.set_xlabel("block (in model order)")
  ax.set_ylabel("relative output error (log scale)")
  ax.set_title(title)
  if series:
    ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  save_figure(fig, path)
  return fig


__all__ = ["DPI", "FORMAT_LABELS", "SPECTRUM_LABELS", "plot_block_errors", "plot_rank_sweep", "plot_spectra",
           "save_figure"]
