"""Per-image feature caches on disk (Inception features, CLIP image embeddings), per image folder.

A rerun of an evaluation reads the features of unchanged images back instead of recomputing them.
One ``.npz`` file per (extractor, weight fingerprint, image folder) holds, for each image, its
file name (relative to the folder), size in bytes, modification time (ns) and feature row. A row
is reused only while the file's name, size and mtime are unchanged and the extractor's weights
have the same fingerprint (:func:`tree_fingerprint`: a hash of every parameter's path, dtype,
shape and bytes, plus the preprocessing settings); anything else is computed again and the file
rewritten (temporary sibling, then rename: an interrupted write leaves the old file). A cache file
that cannot be read is reported with a warning and ignored.

Layout: ``<root>/<extractor>-<fingerprint[:16]>/<hash of the folder path>-<folder name>.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from svdquant_jax.utils.files import atomic_open

AUTO = "auto"
FORMAT = "svdquant_jax.feature_cache.v1"


def default_dir() -> str:
  """``$XDG_CACHE_HOME/svdquant_jax/features`` (``~/.cache/...`` without ``XDG_CACHE_HOME``)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "svdquant_jax", "features")


def resolve(setting: str | None) -> str | None:
  """The cache root of a ``feature_cache`` setting: ``"auto"`` -> :func:`default_dir`, a folder, or
  ``""`` / None -> off."""
  if setting is None or not str(setting).strip():
    return None
  setting = str(setting).strip()
  return default_dir() if setting == AUTO else os.path.abspath(os.path.expanduser(setting))


def tree_fingerprint(tree: Any, extra: str = "") -> str:
  """sha256 hex digest of a parameter tree's paths, dtypes, shapes and bytes, and ``extra``."""
  digest = hashlib.sha256(extra.encode("utf-8"))
  leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for name in sorted(leaves):
    leaf = np.ascontiguousarray(np.asarray(leaves[name]))
    digest.update(f"\0{name}\0{leaf.dtype.str}\0{leaf.shape}\0".encode("utf-8"))
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def file_signatures(folder: str, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """``(sizes, mtimes_ns)`` int64 ``[N]`` of ``folder/files`` (a missing file: -1, -1)."""
  sizes, mtimes = np.full(len(files), -1, np.int64), np.full(len(files), -1, np.int64)
  for i, name in enumerate(files):
    try:
      st = os.stat(os.path.join(folder, name))
    except FileNotFoundError:
      continue
    sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
  return sizes, mtimes


class FeatureCache:
  """The cached features of one extractor (``name``, weights ``fingerprint``) under ``root``.

  ``root=None`` is a cache that never hits and never writes.
  """

  def __init__(self, root: str | None, name: str, fingerprint: str):
    self.root = root
    self.name = name
    self.fingerprint = fingerprint

  def path(self, folder: str) -> str | None:
    """The cache file of an image folder (None when the cache is off)."""
    if self.root is None:
      return None
    folder = os.path.abspath(os.fspath(folder))
    key = hashlib.sha256(folder.encode("utf-8")).hexdigest()[:16]
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(folder))[:60]
    return os.path.join(self.root, f"{self.name}-{self.fingerprint[:16]}", f"{key}-{base}.npz")

  def _read(self, path: str) -> dict[str, np.ndarray] | None:
    try:
      with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in ("names", "sizes", "mtimes", "features", "meta")}
      meta = json.loads(str(data["meta"]))
      if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
        return None
      n = data["names"].shape[0]
      if any(data[k].shape[0] != n for k in ("sizes", "mtimes", "features")) or data["features"].ndim != 2:
        raise ValueError("arrays of different lengths")
      return data
    except FileNotFoundError:
      return None
    except Exception as e:  # noqa: BLE001 - a damaged cache must never stop an evaluation
      logging.warning("feature cache %s is unreadable (%s); recomputing its features", path, e)
      return None

  def lookup(self, folder: str, files: Sequence[str]) -> tuple[np.ndarray | None, np.ndarray]:
    """The cached rows of ``files`` in ``folder``.

    Returns:
      ``(features float32 [N, D] or None, hit bool [N])``; rows where ``hit`` is False are zeros.
    """
    hit = np.zeros(len(files), bool)
    path = self.path(folder)
    data = None if path is None else self._read(path)
    if data is None:
      return None, hit
    rows = {str(n): i for i, n in enumerate(data["names"])}
    sizes, mtimes = file_signatures(folder, files)
    feats = np.zeros((len(files), data["features"].shape[1]), np.float32)
    for i, name in enumerate(files):
      j = rows.get(name)
      if j is not None and sizes[i] >= 0 and data["sizes"][j] == sizes[i] and data["mtimes"][j] == mtimes[i]:
        feats[i] = data["features"][j]
        hit[i] = True
    return feats, hit

  def store(self, folder: str, files: Sequence[str], features: np.ndarray, valid: np.ndarray | None = None) -> None:
    """Writes the rows of ``files`` (where ``valid``) merged with the file's other still-valid rows."""
    path = self.path(folder)
    if path is None:
      return
    features = np.asarray(features, np.float32)
    valid = np.ones(len(files), bool) if valid is None else np.asarray(valid, bool)
    sizes, mtimes = file_signatures(folder, files)
    keep = valid & (sizes >= 0)
    names = [f for f, k in zip(files, keep) if k]
    new = {"names": names, "sizes": list(sizes[keep]), "mtimes": list(mtimes[keep]), "features": list(features[keep])}
    old = self._read(path)
    if old is not None and old["features"].shape[1] == features.shape[1]:
      taken = set(names)
      others = [str(n) for n in old["names"] if str(n) not in taken]
      if others:
        now_sizes, now_mtimes = file_signatures(folder, others)
        index = {str(n): i for i, n in enumerate(old["names"])}
        for name, s, m in zip(others, now_sizes, now_mtimes):
          j = index[name]
          if s >= 0 and old["sizes"][j] == s and old["mtimes"][j] == m:
            for key, value in (("names", name), ("sizes", s), ("mtimes", m), ("features", old["features"][j])):
              new[key].append(value)
    meta = json.dumps({"format": FORMAT, "extractor": self.name, "fingerprint": self.fingerprint,
                       "folder": os.path.abspath(folder)})
    dim = features.shape[1]
    with atomic_open(path, "wb") as f:
      np.savez(f, names=np.asarray(new["names"], dtype=str), sizes=np.asarray(new["sizes"], np.int64),
               mtimes=np.asarray(new["mtimes"], np.int64),
               features=np.asarray(new["features"], np.float32).reshape(-1, dim), meta=np.asarray(meta))


__all__ = ["AUTO", "FeatureCache", "default_dir", "file_signatures", "resolve", "tree_fingerprint"]
