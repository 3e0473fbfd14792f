"""Nunchaku tensor layouts: numpy pack/unpack of single tensors (no model, no jax).

Nunchaku's 4-bit engine reads its weights in the order its CUDA kernels load them, so a stored
tensor's shape is nominal: it is a flat stream reshaped to the listed shape (row ``n`` of
``qweight`` is not output channel ``n``). ``N`` = out features, ``K`` = in features, ``r`` = rank;
``N_p = ceil_to(N, 128)``, ``K_p = ceil_to(K, 128)``, ``r_p = ceil_to(r, 16)``.

W4A4 linear (SVDQuant) tensors
------------------------------
``qweight`` ``int8 [N_p, K_p/2]``
  4-bit codes (INT4 two's complement, or E2M1 bit patterns), zero-padded. Split
  ``n = 128·bn + 16·p + 8·s + l`` and ``k = 64·bk + 32·t + 8·m + e``; 32-bit word
  ``(((((bn·K_p/64 + bk)·8 + p)·8 + l)·4 + m)·2 + s)·2 + t`` holds nibble ``e`` at bits
  ``[4e, 4e+4)``; words are little-endian (one 128×64 tile is 1024 consecutive words).
INT4 ``wscales`` ``[K_p/64, N_p]`` model dtype, and the vectors ``bias smooth smooth_orig wcscales`` ``[N_p]``
  one scale per (channel, 64-group), padded with 1.0 (groups to an even count). Inside each
  128-channel tile, slot ``16a + 4q + 2b + d`` holds channel ``16a + 8b + 2q + d``; tiles are
  ordered (channel tile, group). Vectors use the same order with one group.
NVFP4 ``wscales`` ``float8_e4m3fn [K_p/16, N_p]``
  micro-scales ``s16[n, j]`` (``j = k // 16 = 4g + kk``), padded with 1.0. With
  ``n = 128·bn + 32·sp + 8·a + b``, byte ``(bn·K_p/64 + g)·512 + 64b + 16a + 4sp + kk``.
``lora_down`` ``[K_p, r_p]`` and ``lora_up`` ``[N_p, r_p]``, model dtype
  16×16 fragments of ``Dn [r, K]`` (down, acting on the raw input) and ``U [N, r]`` (up), zero-padded
  (ranks to 16, K and N to 128). Split a matrix's row as ``16·rb + 8·ns + nl`` and its column as
  ``16·cb + 8·ks + 2·kl + e``; the element goes to ``(block·256) + (((nl·4 + kl)·2 + ns)·2 + ks)·2 + e``
  with ``block = cb·r_p/16 + rb`` for ``Dn`` (rows are ranks: stored K-major) and
  ``block = rb·r_p/16 + cb`` for ``U`` (columns are ranks).

AWQ W4A16 (adaLN modulation) tensors
------------------------------------
``qweight`` ``int32 [N/4, K/2]``: unsigned codes ``u ∈ [0, 15]``; with ``n = 4r + i`` and
``k = 64g + 32h + 8a + b`` the 16-bit word ``[r, 64g + 16i + 8h + b]`` holds ``u[n, k]`` at bits
``[4a, 4a+4)``; two consecutive 16-bit words make one little-endian int32. ``wscales`` /
``wzeros`` ``[K/64, N]`` (``W = u·s + z``). The output rows of an adaLN linear with ``S`` chunks
are interleaved (stored row ``d·S + c`` = chunk ``c``, channel ``d``) and the ``+1`` of
``x·(1 + scale)`` is folded into the bias of the scale chunks (``c = 1`` and ``c = S − 2``).

Straight to the split-half layout
---------------------------------
:func:`repack_qweight` and :func:`repack_awq_qweight` turn both ``qweight`` kinds directly into the
K-major split-half nibble layout of :func:`svdquant_jax.formats.packing.pack_int4` (``uint8
[N, K/2]``; in each 64-column block, byte ``j`` holds column ``j`` in its low nibble and column
``j + 32`` in its high one), with whole-word bit operations and one transposing copy instead of
unpacking every code: a loader's hot path. Their bytes equal ``pack_int4`` of the unpacked codes.

Casting: values are rounded once to nearest-even, except that float64 inputs are rounded to float32
first (as torch does), so the bytes equal those of deepcompressor's torch converter.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
FP16 = np.dtype(np.float16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
MODEL_DTYPES = (BF16, FP16)

TILE = 128  # N and K padding of the W4A4 tensors (one warp tile)
INT4_GROUP = 64
FP4_GROUP = 16
RANK_ALIGN = 16  # the low-rank kernel works on 16-rank fragments
AWQ_GROUP = 64
FP8_MAX = 448.0
_ML_FLOATS = {np.dtype(t) for t in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)}


class NunchakuFormatError(ValueError):
  """A tensor does not have the shape, dtype or values a Nunchaku layout needs (names the argument)."""


# ----------------------------------------------------------------------------- helpers
def ceil_to(x: int, m: int) -> int:
  """``x`` rounded up to a multiple of ``m`` (``m > 0``)."""
  if m <= 0:
    raise NunchakuFormatError(f"ceil_to: the multiple must be positive, got {m}")
  return -(-int(x) // m) * m


def model_dtype(dtype: Any, what: str = "dtype") -> np.dtype:
  """``dtype`` as a numpy dtype, checked to be a 16-bit model dtype (bfloat16 or float16)."""
  try:
    dt = np.dtype(dtype)
  except TypeError as e:
    raise NunchakuFormatError(f"{what}: {dtype!r} is not a dtype") from e
  if dt not in MODEL_DTYPES:
    raise NunchakuFormatError(f"{what}: Nunchaku stores 16-bit tensors as bfloat16 or float16, got {dt.name}")
  return dt


def is_float_dtype(dt: np.dtype) -> bool:
  return dt.kind == "f" or dt in _ML_FLOATS


def to_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
  """``x`` rounded (nearest-even) to ``dtype``; float64 goes through float32 first (torch's rounding)."""
  x = np.asarray(x)
  if x.dtype == np.float64 and np.dtype(dtype) != np.float64:
    x = x.astype(np.float32)
  return x.astype(dtype)


def _array(x: Any, what: str, ndim: int, shape: tuple | None = None) -> np.ndarray:
  if x is None:
    raise NunchakuFormatError(f"{what}: expected an array, got None")
  a = np.asarray(x)
  if a.ndim != ndim or (shape is not None and any(w is not None and w != s for w, s in zip(shape, a.shape))):
    want = "x".join("?" if w is None else str(w) for w in shape) if shape is not None else f"{ndim}-D"
    raise NunchakuFormatError(f"{what}: expected shape [{want}], got {list(a.shape)}")
  return a


def floats(x: Any, what: str, ndim: int, shape: tuple | None = None) -> np.ndarray:
  """``x`` as a floating numpy array with the given rank (and shape, ``None`` = any extent)."""
  a = _array(x, what, ndim, shape)
  if not is_float_dtype(a.dtype):
    raise NunchakuFormatError(f"{what}: expected floating point values, got dtype {a.dtype} (shape {list(a.shape)})")
  return a


def ints(x: Any, what: str, ndim: int, lo: int, hi: int, shape: tuple | None = None) -> np.ndarray:
  """``x`` as an integer numpy array with values in ``[lo, hi]``."""
  a = _array(x, what, ndim, shape)
  if a.dtype.kind not in "iu":
    raise NunchakuFormatError(f"{what}: expected integer codes, got dtype {a.dtype} (shape {list(a.shape)})")
  if a.size and (a.min() < lo or a.max() > hi):
    raise NunchakuFormatError(f"{what}: codes must lie in [{lo}, {hi}], got min {a.min()}, max {a.max()} "
                              f"(shape {list(a.shape)})")
  return a


def _pad2(x: np.ndarray, rows: int, cols: int, fill: float) -> np.ndarray:
  out = np.full((rows, cols), fill, dtype=x.dtype)
  out[:x.shape[0], :x.shape[1]] = x
  return out


def _packed(x: Any, what: str, shape: tuple[int, int], dtypes: tuple[np.dtype, ...]) -> np.ndarray:
  a = np.asarray(x)
  if tuple(a.shape) != shape:
    raise NunchakuFormatError(f"{what}: expected stored shape {list(shape)}, got {list(a.shape)}")
  if a.dtype not in dtypes:
    raise NunchakuFormatError(f"{what}: expected dtype {' or '.join(d.name for d in dtypes)}, got {a.dtype}")
  return a


# ----------------------------------------------------------------------------- W4A4 qweight
def pack_qweight(codes: Any) -> np.ndarray:
  """4-bit weight codes ``[N, K]`` -> Nunchaku ``qweight`` ``int8 [N_p, K_p/2]``.

  Args:
    codes: integer ``[N, K]``: INT4 codes in [-8, 7] (stored as two's complement nibbles) or
      E2M1 bit patterns in [0, 15]. Padding rows/columns are code 0. Codes are stored as given
      (E2M1 code 8, i.e. -0, stays 8; :func:`~svdquant_jax.formats.nunchaku.w4a4_tensors`
      writes it as +0 like deepcompressor).
  """
  c = ints(codes, "pack_qweight: codes", 2, -8, 15)
  if c.size and c.min() < 0 and c.max() > 7:
    raise NunchakuFormatError(f"pack_qweight: codes mix negative INT4 codes (min {c.min()}) with E2M1 codes > 7 "
                              f"(max {c.max()}); expected [-8, 7] or [0, 15]")
  n, k = c.shape
  n_p, k_p = ceil_to(n, TILE), ceil_to(k, TILE)
  nib = _pad2((c.astype(np.int16) & 0xF).astype(np.uint8), n_p, k_p, 0)
  # n -> (bn, p, s, l), k -> (bk, t, m, e); stored order (bn, bk, p, l, m, s, t, e).
  t = nib.reshape(n_p // TILE, 8, 2, 8, k_p // 64, 2, 4, 8).transpose(0, 4, 1, 3, 6, 2, 5, 7).reshape(-1, 2)
  return (t[:, 0] | (t[:, 1] << 4)).view(np.int8).reshape(n_p, k_p // 2)


def unpack_qweight(packed: Any, n: int, k: int, *, signed: bool) -> np.ndarray:
  """Inverse of :func:`pack_qweight`: ``int8 [N_p, K_p/2]`` -> ``int8`` codes ``[N, K]`` (padding stripped).

  ``signed=True`` sign-extends the nibbles (INT4, [-8, 7]); ``False`` returns E2M1 patterns [0, 15].
  """
  n_p, k_p = ceil_to(n, TILE), ceil_to(k, TILE)
  p = _packed(packed, "unpack_qweight: qweight", (n_p, k_p // 2), (np.dtype(np.int8), np.dtype(np.uint8)))
  b = np.ascontiguousarray(p).view(np.uint8).reshape(-1)
  nib = np.stack([b & 0xF, b >> 4], axis=-1)
  nib = nib.reshape(n_p // TILE, k_p // 64, 8, 8, 4, 2, 2, 8).transpose(0, 2, 5, 3, 1, 6, 4, 7)
  codes = nib.reshape(n_p, k_p)[:n, :k].astype(np.int8)
  return (codes ^ 8) - 8 if signed else codes


def _delta_swap(x: np.ndarray, tmp: np.ndarray, shift: int, mask: int) -> None:
  """In place on ``uint64`` ``x``: swaps the bits under ``mask`` with those ``shift`` bits above them."""
  sh = np.uint64(shift)
  np.right_shift(x, sh, out=tmp)
  np.bitwise_xor(tmp, x, out=tmp)
  np.bitwise_and(tmp, np.uint64(mask), out=tmp)
  np.bitwise_xor(x, tmp, out=x)
  np.left_shift(tmp, sh, out=tmp)
  np.bitwise_xor(x, tmp, out=x)


_CHUNK_BYTES = 1 << 19  # repack in slices of about this size: the word operations then run in cache


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
  """``np.empty`` at a 64-byte aligned address (what the CPU backend needs to adopt a host buffer
  without copying it)."""
  dt = np.dtype(dtype)
  nbytes = math.prod(shape) * dt.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  start = -raw.ctypes.data % 64
  return raw[start:start + nbytes].view(dt).reshape(shape)


def _slice_items(item_bytes: int) -> int:
  """How many items of ``item_bytes`` each make one slice of about :data:`_CHUNK_BYTES` (at least 1)."""
  return max(1, _CHUNK_BYTES // max(item_bytes, 1))


def repack_qweight(packed: Any, n: int, k: int, *, overwrite: bool = False) -> np.ndarray:
  """Nunchaku W4A4 ``qweight int8 [N_p, K_p/2]`` -> split-half ``uint8 [N, K/2]`` (padding stripped).

  Equals ``packing.pack_int4(unpack_qweight(packed, n, k, signed=...))`` for either signedness (the
  nibbles are moved, not interpreted). The two 32-bit words ``t = 0, 1`` of one (row, 8-column
  group ``m``) are adjacent, so each 64-bit pair holds the 16 codes that make our 8 bytes ``8m..8m+7``
  of that row and 64-column block: three delta swaps interleave them (byte ``e`` = nibble ``e`` of
  word 0 | nibble ``e`` of word 1 << 4), then a transposing copy orders the pairs as ``(n, bk, m)``.
  Done per slice of 128-row tiles, so that the word operations stay in cache.

  ``overwrite=True`` writes the result into ``packed``'s own buffer (a writable, C-contiguous numpy
  array, clobbered; 128-row tile ``i`` of the result replaces tile ``i`` of the input after it was
  read), so a loader allocates no second copy of the weight; the result then shares that buffer
  unless padding has to be stripped.
  """
  if k % 64:
    raise NunchakuFormatError(f"repack_qweight: K={k} is not a multiple of 64 (the split-half block)")
  n_p, k_p = ceil_to(n, TILE), ceil_to(k, TILE)
  p = _packed(packed, "repack_qweight: qweight", (n_p, k_p // 2), (np.dtype(np.int8), np.dtype(np.uint8)))
  in_place = overwrite and isinstance(packed, np.ndarray) and p.flags.c_contiguous and p.flags.writeable
  src = np.ascontiguousarray(p).view(np.uint64).reshape(n_p // TILE, k_p * TILE // 16)  # (bn, [bk, p, l, m, s])
  shape = (n_p // TILE, 8, 2, 8, k_p // 64, 4)  # (bn, p, s, l, bk, m)
  out = src.reshape(shape) if in_place else aligned_empty(shape, np.uint64)
  step = _slice_items(src.shape[1] * 8)
  buf, tmp = np.empty((step, src.shape[1]), np.uint64), np.empty((step, src.shape[1]), np.uint64)
  for lo in range(0, n_p // TILE, step):
    c = min(step, n_p // TILE - lo)
    x, t = buf[:c], tmp[:c]
    np.copyto(x, src[lo:lo + c])
    _delta_swap(x, t, 16, 0x00000000FFFF0000)  # bytes (a0 a1 a2 a3 b0 b1 b2 b3) -> (a0 a1 b0 b1 a2 a3 b2 b3)
    _delta_swap(x, t, 8, 0x0000FF000000FF00)  # -> (a0 b0 a1 b1 a2 b2 a3 b3)
    _delta_swap(x, t, 4, 0x00F000F000F000F0)  # (a_q, b_q) -> (a_q.lo | b_q.lo << 4, a_q.hi | b_q.hi << 4)
    out[lo:lo + c] = x.reshape(c, k_p // 64, 8, 8, 4, 2).transpose(0, 2, 5, 3, 1, 4)
  out = out.view(np.uint8).reshape(n_p, k_p // 2)
  return out if (n, k) == (n_p, k_p) else np.ascontiguousarray(out[:n, :k // 2])


# ----------------------------------------------------------------------------- scales and vectors
def _scale_order(s: np.ndarray) -> np.ndarray:
  """``[N_p, G]`` -> flat stream in the scale/vector order (channel tile, group, in-tile slot)."""
  n_p, g = s.shape
  return s.reshape(n_p // TILE, 8, 2, 4, 2, g).transpose(0, 5, 1, 3, 2, 4).reshape(-1)


def _scale_unorder(flat: np.ndarray, n_p: int, g: int) -> np.ndarray:
  return flat.reshape(n_p // TILE, g, 8, 4, 2, 2).transpose(0, 2, 4, 3, 5, 1).reshape(n_p, g)


def pack_wscales(s: Any, dtype: Any) -> np.ndarray:
  """INT4 group scales ``[N, K/64]`` -> ``wscales [K_p/64, N_p]`` in ``dtype`` (padding 1.0)."""
  dt = model_dtype(dtype, "pack_wscales: dtype")
  s = floats(s, "pack_wscales: s", 2)
  n, g = s.shape
  n_p, g_p = ceil_to(n, TILE), ceil_to(g, 2)
  return _scale_order(_pad2(to_dtype(s, dt), n_p, g_p, 1.0)).reshape(g_p, n_p)


def unpack_wscales(packed: Any, n: int, k: int) -> np.ndarray:
  """Inverse of :func:`pack_wscales`: ``[K_p/64, N_p]`` -> ``[N, K/64]`` in the stored dtype."""
  if k % INT4_GROUP:
    raise NunchakuFormatError(f"unpack_wscales: K={k} is not a multiple of the INT4 group {INT4_GROUP}")
  n_p, g_p = ceil_to(n, TILE), ceil_to(k, TILE) // INT4_GROUP
  p = _packed(packed, "unpack_wscales: wscales", (g_p, n_p), MODEL_DTYPES + (np.dtype(np.float32),))
  return _scale_unorder(p.reshape(-1), n_p, g_p)[:n, :k // INT4_GROUP]


def pack_microscales(s16: Any) -> np.ndarray:
  """NVFP4 micro-scales ``[N, K/16]`` -> ``wscales`` ``float8_e4m3fn [K_p/16, N_p]`` (padding 1.0).

  Values are rounded to float8 e4m3 (nearest-even; exact for scales that are already fp8 values)
  and must lie in [-448, 448]. The K padding follows the engine's allocation (``K_p/16`` rows);
  deepcompressor pads only to a multiple of 4 groups, which differs when ``K % 128`` is in (0, 64].
  """
  s = floats(s16, "pack_microscales: s16", 2)
  f = s.astype(np.float32)
  if f.size and not (np.all(np.isfinite(f)) and np.abs(f).max() <= FP8_MAX):
    raise NunchakuFormatError(f"pack_microscales: s16 must be finite and within ±{FP8_MAX:g} (float8 e4m3), got "
                              f"max |s| {np.abs(f).max()} (shape {list(s.shape)})")
  n, j = s.shape
  n_p, j_p = ceil_to(n, TILE), ceil_to(j * FP4_GROUP, TILE) // FP4_GROUP
  q = _pad2(f.astype(FP8), n_p, j_p, 1.0)
  # n -> (bn, sp, a, b), j -> (g, kk); stored order (bn, g, b, a, sp, kk).
  q = q.reshape(n_p // TILE, 4, 4, 8, j_p // 4, 4).transpose(0, 4, 3, 2, 1, 5)
  return q.reshape(j_p, n_p)


def unpack_microscales(packed: Any, n: int, k: int) -> np.ndarray:
  """Inverse of :func:`pack_microscales`: ``float8 [K_p/16, N_p]`` -> ``float32 [N, K/16]``."""
  if k % FP4_GROUP:
    raise NunchakuFormatError(f"unpack_microscales: K={k} is not a multiple of the NVFP4 group {FP4_GROUP}")
  n_p, j_p = ceil_to(n, TILE), ceil_to(k, TILE) // FP4_GROUP
  p = _packed(packed, "unpack_microscales: wscales", (j_p, n_p), (FP8,))
  q = p.reshape(n_p // TILE, j_p // 4, 8, 4, 4, 4).transpose(0, 4, 3, 2, 1, 5).reshape(n_p, j_p)
  return q[:n, :k // FP4_GROUP].astype(np.float32)


def pack_vector(v: Any, dtype: Any, fill: float = 1.0) -> np.ndarray:
  """A per-channel vector (bias, smooth, smooth_orig, wcscales) ``[N]`` -> ``[N_p]`` in ``dtype``.

  Padding is ``fill`` (deepcompressor writes 1.0, even for the bias; the padded channels are
  never read for FLUX, where no dimension needs padding).
  """
  dt = model_dtype(dtype, "pack_vector: dtype")
  v = floats(v, "pack_vector: v", 1)
  n_p = ceil_to(v.shape[0], TILE)
  return _scale_order(_pad2(to_dtype(v, dt)[:, None], n_p, 1, fill))


def unpack_vector(packed: Any, n: int) -> np.ndarray:
  """Inverse of :func:`pack_vector`: ``[N_p]`` -> ``[N]`` in the stored dtype."""
  n_p = ceil_to(n, TILE)
  p = _packed(packed, "unpack_vector", (n_p,), MODEL_DTYPES + (np.dtype(np.float32),))
  return _scale_unorder(p, n_p, 1)[:n, 0]


# ----------------------------------------------------------------------------- low-rank factors
def _fragments(m: np.ndarray, rank_rows: bool) -> np.ndarray:
  """Zero-padded ``[R, C]`` (both multiples of 16) -> the fragment stream viewed as ``[C, R]`` (down,
  ``rank_rows``: rows are ranks) or ``[R, C]`` (up: rows are channels, columns are ranks)."""
  r, c = m.shape
  t = m.reshape(r // 16, 2, 8, c // 16, 2, 4, 2)  # (rb, ns, nl, cb, ks, kl, e)
  if rank_rows:  # blocks ordered (k block, rank block); the rank is the fragment's n index
    return t.transpose(3, 0, 2, 5, 1, 4, 6).reshape(c, r)
  return t.transpose(0, 3, 2, 5, 1, 4, 6).reshape(r, c)


def _unfragments(p: np.ndarray, rank_rows: bool) -> np.ndarray:
  if rank_rows:
    c, r = p.shape
    return p.reshape(c // 16, r // 16, 8, 4, 2, 2, 2).transpose(1, 4, 2, 0, 5, 3, 6).reshape(r, c)
  r, c = p.shape
  return p.reshape(r // 16, c // 16, 8, 4, 2, 2, 2).transpose(0, 4, 2, 1, 5, 3, 6).reshape(r, c)


def pack_lora_down(dn: Any, dtype: Any) -> np.ndarray:
  """Low-rank down factor ``Dn [r, K]`` (acting on the raw input) -> ``lora_down [K_p, r_p]`` in ``dtype``."""
  dt = model_dtype(dtype, "pack_lora_down: dtype")
  dn = floats(dn, "pack_lora_down: dn", 2)
  r, k = dn.shape
  return _fragments(_pad2(to_dtype(dn, dt), ceil_to(r, RANK_ALIGN), ceil_to(k, TILE), 0), rank_rows=True)


def pack_lora_up(up: Any, dtype: Any) -> np.ndarray:
  """Low-rank up factor ``U [N, r]`` -> ``lora_up [N_p, r_p]`` in ``dtype``."""
  dt = model_dtype(dtype, "pack_lora_up: dtype")
  up = floats(up, "pack_lora_up: up", 2)
  n, r = up.shape
  return _fragments(_pad2(to_dtype(up, dt), ceil_to(n, TILE), ceil_to(r, RANK_ALIGN), 0), rank_rows=False)


def unpack_lora_down(packed: Any, k: int) -> np.ndarray:
  """Inverse of :func:`pack_lora_down`: ``[K_p, r_p]`` -> ``[r_p, K]`` (stored dtype).

  The rank padding is kept: its rows are zero, so the branch is unchanged, and keeping them keeps
  every rank at its stored position (the engine scales LoRA ranks per 16-rank chunk).
  """
  p = floats(packed, "unpack_lora_down: lora_down", 2)
  if p.shape[0] != ceil_to(k, TILE) or p.shape[1] % RANK_ALIGN:
    raise NunchakuFormatError(f"unpack_lora_down: expected stored shape [{ceil_to(k, TILE)}, r_p] (r_p a multiple "
                              f"of {RANK_ALIGN}) for K={k}, got {list(p.shape)}")
  return _unfragments(p, rank_rows=True)[:, :k]


def unpack_lora_up(packed: Any, n: int) -> np.ndarray:
  """Inverse of :func:`pack_lora_up`: ``[N_p, r_p]`` -> ``[N, r_p]`` (stored dtype; rank padding kept,
  zero columns, see :func:`unpack_lora_down`)."""
  p = floats(packed, "unpack_lora_up: lora_up", 2)
  if p.shape[0] != ceil_to(n, TILE) or p.shape[1] % RANK_ALIGN:
    raise NunchakuFormatError(f"unpack_lora_up: expected stored shape [{ceil_to(n, TILE)}, r_p] (r_p a multiple "
                              f"of {RANK_ALIGN}) for N={n}, got {list(p.shape)}")
  return _unfragments(p, rank_rows=False)[:n]


# ----------------------------------------------------------------------------- AWQ W4A16 (adaLN)
def check_splits(n: int, splits: int, what: str) -> None:
  """Raises unless ``splits`` is a valid adaLN chunk count (1 or >= 3) dividing ``n`` rows."""
  if not isinstance(splits, (int, np.integer)) or splits < 1 or splits == 2:
    raise NunchakuFormatError(f"{what}: S must be 1 (no interleave) or the number of adaLN chunks >= 3, got {splits!r}")
  if n % splits:
    raise NunchakuFormatError(f"{what}: N={n} rows are not divisible by S={splits} chunks")


def interleave_rows(x: Any, S: int) -> np.ndarray:  # noqa: N803 (S as in the format's notation)
  """adaLN row interleave: ``[N, ...]`` (S chunks of ``N/S`` rows, diffusers order) -> stored row
  ``d·S + c`` = original row ``c·N/S + d``."""
  x = np.asarray(x)
  if x.ndim < 1:
    raise NunchakuFormatError(f"interleave_rows: expected an array [N, ...], got shape {list(x.shape)}")
  check_splits(x.shape[0], S, "interleave_rows")
  return np.ascontiguousarray(x.reshape(S, x.shape[0] // S, *x.shape[1:]).swapaxes(0, 1)).reshape(x.shape)


def deinterleave_rows(x: Any, S: int) -> np.ndarray:  # noqa: N803
  """Inverse of :func:`interleave_rows`."""
  x = np.asarray(x)
  if x.ndim < 1:
    raise NunchakuFormatError(f"deinterleave_rows: expected an array [N, ...], got shape {list(x.shape)}")
  check_splits(x.shape[0], S, "deinterleave_rows")
  return np.ascontiguousarray(x.reshape(x.shape[0] // S, S, *x.shape[1:]).swapaxes(0, 1)).reshape(x.shape)


def pack_awq_qweight(u: Any) -> np.ndarray:
  """Unsigned 4-bit codes ``u [N, K]`` in [0, 15] (rows already in stored order) -> ``int32 [N/4, K/2]``."""
  u = ints(u, "pack_awq_qweight: u", 2, 0, 15)
  n, k = u.shape
  if n % 4 or k % AWQ_GROUP:
    raise NunchakuFormatError(f"pack_awq_qweight: u must be [N, K] with N % 4 == 0 and K % {AWQ_GROUP} == 0, "
                              f"got {list(u.shape)}")
  # n -> (r, i), k -> (g, h, a, b); 16-bit word [r, g, i, h, b] holds nibble a.
  t = u.astype(np.uint16).reshape(n // 4, 4, k // 64, 2, 4, 8).transpose(0, 2, 1, 3, 5, 4)
  w16 = (t << (4 * np.arange(4, dtype=np.uint16))).sum(axis=-1, dtype=np.uint16)
  return w16.reshape(n // 4, k).astype("<u2").view("<i4").astype(np.int32)


def unpack_awq_qweight(packed: Any) -> np.ndarray:
  """Inverse of :func:`pack_awq_qweight`: ``int32 [N/4, K/2]`` -> ``uint8 [N, K]`` (stored row order)."""
  p = _array(packed, "unpack_awq_qweight: qweight", 2)
  if p.dtype != np.int32 or p.shape[1] % (AWQ_GROUP // 2):
    raise NunchakuFormatError(f"unpack_awq_qweight: expected int32 [N/4, K/2] with K % {AWQ_GROUP} == 0, got "
                              f"{p.dtype} {list(p.shape)}")
  r, k = p.shape[0], 2 * p.shape[1]
  w16 = p.astype("<i4").view("<u2").reshape(r, k // 64, 4, 2, 8)
  nib = (w16[..., None] >> (4 * np.arange(4, dtype=np.uint16))) & 0xF  # (r, g, i, h, b, a)
  return nib.transpose(0, 2, 1, 3, 5, 4).reshape(4 * r, k).astype(np.uint8)


_LO_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_HI_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)


def repack_awq_qweight(packed: Any, S: int) -> np.ndarray:  # noqa: N803
  """AWQ ``qweight int32 [N/4, K/2]`` -> split-half ``uint8 [N, K/2]``, rows de-interleaved (``S`` chunks).

  Equals ``packing.pack_int4(deinterleave_rows(unpack_awq_qweight(packed), S), signed=False)``. Per
  (row group ``r``, 64-group ``g``, row ``i``) the 16-bit words ``h = 0, 1`` of column ``b`` hold
  nibble ``a`` of columns ``64g + 8a + b`` and ``+ 32``: masking them together gives our bytes
  ``8a + b`` (``a`` even in one 64-bit word, odd in the other), two delta swaps gather the bytes by
  ``a``, and one transposing copy per residue of the row modulo ``L = lcm(4, S)`` orders them by
  (de-interleaved row, ``g``, ``a``, ``b``). Done per slice of runs of ``L`` rows (in cache).
  """
  p = _array(packed, "repack_awq_qweight: qweight", 2)
  if p.dtype != np.int32 or p.shape[1] % (AWQ_GROUP // 2):
    raise NunchakuFormatError(f"repack_awq_qweight: expected int32 [N/4, K/2] with K % {AWQ_GROUP} == 0, got "
                              f"{p.dtype} {list(p.shape)}")
  r, k = p.shape[0], 2 * p.shape[1]
  n, g = 4 * r, k // AWQ_GROUP
  check_splits(n, S, "repack_awq_qweight")
  # Stored row 4·r + i = d·S + c goes to row c·N/S + d; within a run of L rows both splits are
  # fixed, so row v of each run is one strided copy.
  run = math.lcm(4, S)
  runs = n // run
  x = np.ascontiguousarray(p).view(np.uint64).reshape(runs, run // 4, g, 4, 2, 2)  # (w, r % (L/4), g, i, h, b // 4)
  out = aligned_empty((S, runs, run // S, g, 2, 2, 2), np.uint32)  # (c, w, d % (L/S), g, a // 2, a % 2, b // 4)
  step = _slice_items(run * k // 2)
  # pq[0] / pq[1]: bytes 2·(b % 4) + a // 2 of the even / odd a, per (w, r % (L/4), g, i, b // 4)
  inner = x.shape[1:4] + (2,)
  pq_buf, tmp_buf = np.empty(2 * step * math.prod(inner), np.uint64), np.empty(2 * step * math.prod(inner), np.uint64)
  for lo in range(0, runs, step):
    c = min(step, runs - lo)
    x0, x1 = x[lo:lo + c, :, :, :, 0], x[lo:lo + c, :, :, :, 1]
    size = 2 * c * math.prod(inner)  # contiguous views of the buffers
    pq, tmp = pq_buf[:size].reshape((2, c) + inner), tmp_buf[:size].reshape((2, c) + inner)
    np.bitwise_and(x0, _LO_NIBBLES, out=pq[0])
    np.left_shift(x1, np.uint64(4), out=tmp[0])
    tmp[0] &= _HI_NIBBLES
    pq[0] |= tmp[0]
    np.right_shift(x0, np.uint64(4), out=pq[1])
    pq[1] &= _LO_NIBBLES
    np.bitwise_and(x1, _HI_NIBBLES, out=tmp[0])
    pq[1] |= tmp[0]
    flat, t = pq.reshape(-1), tmp.reshape(-1)
    _delta_swap(flat, t, 8, 0x0000FF000000FF00)  # bytes (b0a0 b0a1 b1a0 b1a1 ...) -> (b0a0 b1a0 b0a1 b1a1 ...)
    _delta_swap(flat, t, 16, 0x00000000FFFF0000)  # -> (b0..b3 of a // 2 = 0, then of a // 2 = 1)
    src = pq.view(np.uint32).reshape(2, c, run // 4, g, 4, 2, 2)  # (a % 2, w, r % (L/4), g, i, b // 4, a // 2)
    for v in range(run):
      out[v % S, lo:lo + c, v // S] = src[:, :, v // 4, :, v % 4].transpose(1, 2, 4, 0, 3)
  return out.view(np.uint8).reshape(n, k // 2)


def adaln_scale_chunks(S: int) -> tuple[int, ...]:  # noqa: N803
  """The chunks whose bias carries the folded ``+1``: (1, S−2) (scale_msa, scale_mlp); none for S = 1."""
  check_splits(S, S, "adaln_scale_chunks")
  return () if S == 1 else tuple(sorted({1, S - 2}))


def fold_adaln_bias(bias: Any, S: int, dtype: Any) -> np.ndarray:  # noqa: N803
  """adaLN bias ``[N]`` (diffusers order) -> stored bias ``[N]`` in ``dtype``: interleaved, ``+1`` on
  the scale chunks, added in the 16-bit dtype's arithmetic (exact sum rounded once to ``dtype``)."""
  dt = model_dtype(dtype, "fold_adaln_bias: dtype")
  b = floats(bias, "fold_adaln_bias: bias", 1)
  check_splits(b.shape[0], S, "fold_adaln_bias")
  x = interleave_rows(to_dtype(b, dt), S)
  if S == 1:
    return x
  delta = np.zeros(S, np.float32)  # adding 0 elsewhere too: -0.0 becomes +0.0, as in deepcompressor
  delta[list(adaln_scale_chunks(S))] = 1
  return (x.astype(np.float32).reshape(-1, S) + delta).astype(dt).reshape(-1)


def unfold_adaln_bias(stored: Any, S: int) -> np.ndarray:  # noqa: N803
  """Inverse of :func:`fold_adaln_bias`: ``float32 [N]`` in diffusers order, ``−1`` on the scale chunks.

  The subtraction is exact in float32. A folded entry is ``v = round16(1 + b)`` for a 16-bit ``b``,
  so ``v = 0`` or ``|v| >= 2^-11`` (if ``|1 + b| < 1/2``, ``b`` lies in (−3/2, −1/2) where 16-bit
  numbers are multiples of 2^-11, and ``1 + b`` is exact). ``v`` and 1 are multiples of
  ``q = min(ulp(v), 1) >= 2^-21``, so ``v − 1`` is a multiple of ``q`` below ``2^24·q`` for
  ``|v| < 2^23``: float32 holds it. The result is thus ``round16(1 + b) − 1``, off from ``b`` by the
  fold's single rounding only (at most half an ulp of ``1 + b``).
  """
  v = floats(stored, "unfold_adaln_bias: stored", 1)
  check_splits(v.shape[0], S, "unfold_adaln_bias")
  x = v.astype(np.float32).reshape(-1, S)
  for c in adaln_scale_chunks(S):
    x[:, c] -= np.float32(1)
  return deinterleave_rows(x.reshape(-1), S)
