"""Crash-safe file writing: write to a temporary sibling, then rename over the target.

A partially written file never replaces a good one: if the process dies mid-write, the
target keeps its previous contents and only a ``.tmp-*`` sibling is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import IO, Any, Iterator


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """Opens a temporary file next to ``path``; renames it onto ``path`` on success.

  Args:
    path: destination file.
    mode: ``"wb"`` or ``"w"``.

  Yields:
    The open temporary file. On an exception the temporary file is removed and
    ``path`` is left untouched.
  """
  if mode not in ("wb", "w"):
    raise ValueError(f"atomic_open supports modes 'wb' and 'w', got {mode!r}")
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file an ordinary file's mode
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_open(path, "wb") as f:
    f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
  """Builds a directory under a temporary name and renames it onto ``path``.

  An existing directory at ``path`` is replaced only after the new one is complete.

  Yields:
    The temporary directory to fill.
  """
  path = os.path.abspath(os.fspath(path))
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
  try:
    yield tmp
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    if os.path.isdir(path):
      old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(path)}-", dir=parent)
      os.rmdir(old)
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


@contextlib.contextmanager
def quiet_info_logs() -> Iterator[None]:
  """absl logging at WARNING and above inside the block (orbax logs ~25 INFO lines per checkpoint
  save, which would bury the progress lines of a run)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  old = logging.get_verbosity()
  logging.set_verbosity(min(old, logging.WARNING))  # absl: larger is more verbose (INFO 0, WARNING -1)
  try:
    yield
  finally:
    logging.set_verbosity(old)


def read_json(path: str | os.PathLike, error: type[Exception], missing: str) -> Any:
  """The parsed JSON file at ``path``; ``error(missing)`` if there is no such file, and
  ``error`` naming the file if it is not valid JSON (e.g. truncated)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise error(missing)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise error(f"{path}: malformed JSON: {e}") from e
