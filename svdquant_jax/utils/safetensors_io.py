"""Reading and writing safetensors files with numpy only (no torch).

Why not the ``safetensors`` package: its numpy API (checked with 0.8.0) cannot read fp8 tensors
(``safe_open(..., framework="np")`` looks for ``numpy.float8_*``, which numpy lacks) and knows
single files only; sharded indexes and diffusers weight variants are resolved by the torch-side
diffusers / transformers loaders. This module reads all of them with numpy + ``ml_dtypes``.

bf16 and fp8 tensors come back as ``ml_dtypes`` arrays, so a bf16 checkpoint loads without
an fp32 round trip. Reading is lazy (``np.memmap``): a 24 GB checkpoint is not pulled into
host memory at once. Sharded checkpoints (``*.safetensors.index.json``) and folders holding
one or several ``.safetensors`` files are handled by :class:`TensorStore`.

File layout (https://github.com/huggingface/safetensors): 8-byte little-endian header
length N, N bytes of JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}}``
(offsets relative to the end of the header), then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from svdquant_jax.utils.files import atomic_open

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
  """A checkpoint file is missing, truncated, malformed or does not match the model."""


class SafetensorsFile:
  """One ``.safetensors`` file, read lazily.

  Raises:
    CheckpointError: if the file is missing, its header is malformed, or the data section
      is shorter than the header says (a truncated download or an interrupted write).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise CheckpointError(f"safetensors file not found: {self.path}")
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) < 8:
        raise CheckpointError(f"{self.path}: file is {size} bytes, too short for a safetensors header")
      (n,) = struct.unpack("<Q", raw)
      if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{self.path}: header length {n} does not fit in a file of {size} bytes "
                              "(truncated or not a safetensors file)")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{self.path}: malformed safetensors header: {e}") from e
    self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      if info["dtype"] not in _DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
      dtype = _DTYPES[info["dtype"]]
      shape = tuple(int(d) for d in info["shape"])
      begin, end = (int(o) for o in info["data_offsets"])
      expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if end - begin != expected:
        raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                              f"of {info['dtype']} (expected {expected})")
      if self._data_start + end > size:
        raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {self._data_start + end} "
                              f"but the file has {size} bytes (truncated file)")
      self._entries[name] = (dtype, shape, begin, end)
    self._mmap: np.memmap | None = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def get(self, name: str) -> np.ndarray:
    """Returns tensor ``name`` as a read-only array backed by the file."""
    if name not in self._entries:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    dtype, shape, begin, end = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    buf = self._mmap[self._data_start + begin:self._data_start + end]
    return buf.view(dtype).reshape(shape)

  def read(self, name: str) -> np.ndarray:
    """Returns a private, writable copy of tensor ``name`` read with ``pread``.

    Unlike :meth:`get`, no page of the file stays mapped afterwards, so a loader that converts
    tensors one by one holds one copy of the model, not the file's pages as well.
    """
    if name not in self._entries:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    dtype, shape, begin, end = self._entries[name]
    raw = np.empty(end - begin + 64, np.uint8)  # not zero-filled; 64-byte aligned, so that jax's CPU
    out = raw[-raw.ctypes.data % 64:][:end - begin]  # backend can adopt the buffer without a copy
    view = memoryview(out)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      done = 0
      while done < len(out):
        chunk = os.preadv(fd, [view[done:]], self._data_start + begin + done)
        if chunk <= 0:
          raise CheckpointError(f"{self.path}: tensor {name!r}: the file ended while reading (truncated?)")
        done += chunk
    finally:
      os.close(fd)
    return out.view(dtype).reshape(shape)


_INDEX_RE = re.compile(r"^(?P<stem>.+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")
_WEIGHTS_RE = re.compile(r"^(?P<stem>[^.]+)(?:\.(?P<variant>[^.-]+))?(?:-\d+-of-\d+)?\.safetensors$")


def _variant_of(name: str) -> tuple[bool, str | None] | None:
  """Classifies a file name of a diffusers/transformers weight folder.

  Returns ``(is_index, variant)`` or ``None`` for other files. Names: ``model.safetensors``,
  ``model-00001-of-00002.safetensors``, ``model.fp16.safetensors``,
  ``model.fp16-00001-of-00002.safetensors``, ``model.safetensors.index.json``,
  ``model.safetensors.index.fp16.json`` (diffusers' variant index) and
  ``model.fp16.safetensors.index.json``.
  """
  m = _INDEX_RE.match(name)
  if m:
    variant = m.group("variant")
    if variant is None and "." in m.group("stem"):
      variant = m.group("stem").rsplit(".", 1)[1]
    return True, variant
  m = _WEIGHTS_RE.match(name)
  if m:
    return False, m.group("variant")
  return None


def _variant_files(names: list[str], variant: str | None, folder: str) -> list[str]:
  by_variant: dict[str | None, list[str]] = {}
  for n in names:
    kind = _variant_of(n)
    if kind is not None:
      by_variant.setdefault(kind[1], []).append(n)
  if variant is not None:
    if variant not in by_variant:
      raise CheckpointError(f"{folder}: no weight files of variant {variant!r} "
                            f"(found variants {sorted(str(v) for v in by_variant)})")
    return by_variant[variant]
  if None in by_variant:
    return by_variant[None]
  if len(by_variant) > 1:
    raise CheckpointError(f"{folder}: only variant weight files {sorted(by_variant)}; choose one with variant=")
  return next(iter(by_variant.values()), [])


class TensorStore(Mapping[str, np.ndarray]):
  """All tensors of a model component: one file, a sharded index, or a folder of files.

  Args:
    path: a ``.safetensors`` file, a ``*.safetensors.index.json`` file, or a folder. A
      folder with an index file uses the index; otherwise every ``*.safetensors`` file in
      it is read (duplicate tensor names across files are an error).
    variant: in a folder, read the files of this diffusers weight variant
      (``model.<variant>.safetensors``, e.g. ``"fp16"``); by default the files without a
      variant are read, as diffusers does, and the variant files are used only if there are
      no others.
  """

  def __init__(self, path: str | os.PathLike, variant: str | None = None):
    path = os.fspath(path)
    self.path = path
    self._files: dict[str, SafetensorsFile] = {}
    self._where: dict[str, str] = {}
    if os.path.isdir(path):
      names = _variant_files(sorted(os.listdir(path)), variant, path)
      index = [n for n in names if _variant_of(n)[0]]
      shards = [n for n in names if not _variant_of(n)[0]]
      if len(index) > 1:
        raise CheckpointError(f"{path}: several index files {index}; expected one")
      if index:
        self._load_index(os.path.join(path, index[0]))
      elif shards:
        for n in shards:
          self._add_file(os.path.join(path, n))
      else:
        raise CheckpointError(f"{path}: no .safetensors files in this folder")
    elif path.endswith(".json"):
      self._load_index(path)
    else:
      self._add_file(path)

  def _load_index(self, index_path: str) -> None:
    if not os.path.isfile(index_path):
      raise CheckpointError(f"index file not found: {index_path}")
    with open(index_path) as f:
      try:
        weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index_path}: not a safetensors index (no 'weight_map'): {e}") from e
    folder = os.path.dirname(index_path)
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(folder, shard)
      if not os.path.isfile(shard_path):
        raise CheckpointError(f"{index_path}: shard {shard} is listed but missing")
      self._files[shard_path] = SafetensorsFile(shard_path)
    for name, shard in weight_map.items():
      f = self._files[os.path.join(folder, shard)]
      if name not in f:
        raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard} but that shard lacks it")
      self._where[name] = f.path

  def _add_file(self, file_path: str) -> None:
    f = SafetensorsFile(file_path)
    self._files[f.path] = f
    for name in f.keys():
      if name in self._where:
        raise CheckpointError(f"tensor {name!r} appears in both {self._where[name]} and {f.path}")
      self._where[name] = f.path

  @property
  def metadata(self) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in self._files.values():
      out.update(f.metadata)
    return out

  def shape(self, name: str) -> tuple[int, ...]:
    return self._files[self._where[name]].shape(name)

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise KeyError(f"{self.path}: no tensor named {name!r}")
    return self._files[self._where[name]].get(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
  """Writes ``tensors`` to ``path`` atomically (temporary file, then rename).

  Args:
    path: destination ``.safetensors`` file.
    tensors: name -> array (numpy or anything ``np.asarray`` accepts, incl. jax arrays and
      ``ml_dtypes`` bf16/fp8). Arrays are written C-contiguous, little-endian.
    metadata: optional string -> string metadata.
  """
  # np.ascontiguousarray would turn 0-d tensors into shape [1]; keep the shape.
  arrays = {k: np.array(v, copy=None, order="C") for k, v in tensors.items()}
  header: dict[str, object] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  offset = 0
  for name in sorted(arrays):
    a = arrays[name]
    if a.dtype not in _NAMES:
      raise TypeError(f"cannot save tensor {name!r}: dtype {a.dtype} has no safetensors name")
    header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)
  with atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in sorted(arrays):
      a = arrays[name]
      if a.dtype.byteorder == ">":
        a = a.byteswap().view(a.dtype.newbyteorder("<"))
      f.write(a.tobytes())


class SafetensorsWriter:
  """Writes a ``.safetensors`` file one tensor at a time, in bounded memory, atomically.

  The tensors go to a temporary data file as they are added; :meth:`close` writes the header
  (which needs every shape and offset) and the data into a second temporary file and renames it
  onto ``path``. Use as a context manager: on an exception nothing is written to ``path``.
  """

  def __init__(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None):
    self.path = os.fspath(path)
    self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    parent = os.path.dirname(os.path.abspath(self.path))
    os.makedirs(parent, exist_ok=True)
    fd, self._data_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.data-", dir=parent)
    self._data = os.fdopen(fd, "wb")
    self._header: dict[str, object] = {}
    self._offset = 0

  def add(self, name: str, array: Any) -> None:
    """Appends tensor ``name`` (numpy / jax / ml_dtypes array)."""
    if name in self._header:
      raise ValueError(f"{self.path}: tensor {name!r} added twice")
    a = np.array(array, copy=None, order="C")
    if a.dtype not in _NAMES:
      raise TypeError(f"cannot save tensor {name!r}: dtype {a.dtype} has no safetensors name")
    if a.dtype.byteorder == ">":
      a = a.byteswap().view(a.dtype.newbyteorder("<"))
    self._header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                          "data_offsets": [self._offset, self._offset + a.nbytes]}
    self._data.write(a.tobytes())
    self._offset += a.nbytes

  def close(self) -> None:
    self._data.close()
    header = dict(self._header)
    if self.metadata:
      header = {"__metadata__": self.metadata, **header}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_open(self.path, "wb") as f, open(self._data_path, "rb") as data:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      shutil.copyfileobj(data, f, 64 << 20)
    os.remove(self._data_path)

  def abort(self) -> None:
    self._data.close()
    if os.path.exists(self._data_path):
      os.remove(self._data_path)

  def __enter__(self) -> "SafetensorsWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()
