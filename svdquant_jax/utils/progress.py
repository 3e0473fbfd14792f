"""Progress display for long loops (prompts x steps, calibration samples, blocks).

Two styles:
  * ``bar`` (default on a terminal): one line rewritten in place with ``\\r``.
  * ``lines`` (default when stderr is not a terminal, e.g. logs and CI): one line per
    update, rate-limited by ``min_interval`` except for the first and last update.

Every line shows ``done/total``, the elapsed time and an estimate of the time remaining.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator, TypeVar

T = TypeVar("T")


def format_duration(seconds: float) -> str:
  """Formats seconds as ``H:MM:SS`` (or ``M:SS`` under an hour)."""
  if seconds != seconds or seconds == float("inf"):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
  """Counts work items and reports elapsed time and time remaining.

  Args:
    total: number of items, or ``None`` if unknown (no estimate then).
    desc: label printed first on each line.
    style: ``"bar"``, ``"lines"`` or ``None`` (pick by whether ``stream`` is a tty).
    stream: where to write (stderr by default).
    min_interval: seconds between printed lines in ``lines`` style (0: print every update).
    enabled: ``False`` silences the display entirely.
  """

  def __init__(self, total: int | None, desc: str = "", *, style: str | None = None,
               stream: IO[str] | None = None, min_interval: float = 0.0, enabled: bool = True):
    self.total = total
    self.desc = desc
    self.stream = stream if stream is not None else sys.stderr
    if style is None:
      style = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
    if style not in ("bar", "lines"):
      raise ValueError(f"style must be 'bar' or 'lines', got {style!r}")
    self.style = style
    self.min_interval = min_interval
    self.enabled = enabled
    self.done = 0
    self.start = time.monotonic()
    self._last_print = -float("inf")
    self._initial = 0

  def skip(self, n: int) -> None:
    """Marks ``n`` items as already done (e.g. resumed) without counting them in the rate."""
    self.done += n
    self._initial += n

  def eta(self) -> float:
    """Estimated seconds remaining (``nan`` before the first timed item)."""
    worked = self.done - self._initial
    if self.total is None or worked <= 0:
      return float("nan")
    per_item = (time.monotonic() - self.start) / worked
    return per_item * max(self.total - self.done, 0)

  def line(self, note: str = "") -> str:
    elapsed = time.monotonic() - self.start
    count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
    parts = [p for p in (self.desc, count) if p]
    text = " ".join(parts) + f"  elapsed {format_duration(elapsed)}"
    if self.total is not None:
      text += f"  eta {format_duration(self.eta())}"
    if note:
      text += f"  {note}"
    return text

  def update(self, n: int = 1, note: str = "") -> None:
    """Advances by ``n`` items and prints a line (subject to ``min_interval``)."""
    self.done += n
    if not self.enabled:
      return
    now = time.monotonic()
    finished = self.total is not None and self.done >= self.total
    if self.style == "lines" and not finished and self.done > 1 and now - self._last_print < self.min_interval:
      return
    self._last_print = now
    if self.style == "bar":
      self.stream.write("\r" + self.line(note) + "\033[K")
      if finished:
        self.stream.write("\n")
    else:
      self.stream.write(self.line(note) + "\n")
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.style == "bar" and not (self.total is not None and self.done >= self.total):
      self.stream.write("\n")
      self.stream.flush()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def progress(items: Iterable[T], desc: str = "", total: int | None = None, **kwargs) -> Iterator[T]:
  """Iterates over ``items`` while showing a :class:`Progress` display."""
  if total is None:
    try:
      total = len(items)  # type: ignore[arg-type]
    except TypeError:
      total = None
  with Progress(total, desc, **kwargs) as p:
    for item in items:
      yield item
      p.update()
