"""Nunchaku 4-bit checkpoints, layer level: per-layer quantities <-> the named Nunchaku tensors.

Two layer kinds (numpy in, numpy out; the single-tensor layouts are in
:mod:`svdquant_jax.formats.nunchaku_layout`, re-exported here):

* W4A4 SVDQuant linear (:func:`w4a4_tensors` / :func:`decode_w4a4`): tensors ``qweight wscales
  bias smooth smooth_orig`` + ``lora_down lora_up`` (rank > 0) + NVFP4 ``wtscale`` (one source
  layer) or ``wcscales`` (fused q/k/v with a per-member tensor scale). The engine computes
  ``y = Q(W)·Qa((x + δ)/λ) (·wtscale | ·wcscales) + bias + (x·Dnᵀ)·Uᵀ`` where the low-rank branch
  reads the **raw** input ``x`` (``Dn = a/λ``) and ``δ`` (0.171875 on the INT4 fc2 layers, else 0)
  is hard-coded in the engine, not stored. :func:`branch_to_engine` turns a branch held in the
  smoothed (and shifted) domain, deepcompressor's form, into this one.
* AWQ W4A16 adaLN modulation linear (:func:`awq_tensors` / :func:`decode_awq`): ``qweight
  wscales wzeros bias`` with interleaved output rows and the ``+1`` folded into the scale-chunk
  bias; dequantized as ``W = u·wscales + wzeros`` per 64-group.

LoRA export helpers: :func:`fuse_member_loras` (q/k/v members into one branch),
:func:`lora_concat` (base branch + extra ranks, padded to 16) and :func:`awq_lora_tensors`
(adaLN LoRA, plain layout with interleaved up rows).

Every result is byte-identical to deepcompressor's converter (``deepcompressor-toolkit`` 0.1.0)
for the same quantities, except where a docstring says otherwise (NVFP4 scale rows for
``K % 128`` in (0, 64], AWQ scale rows for ``K % 1024 != 0``: we follow the engine's shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from svdquant_jax.formats.nunchaku_layout import (AWQ_GROUP, BF16, FP4_GROUP, FP8, FP8_MAX, FP16, INT4_GROUP,
                                                  MODEL_DTYPES, RANK_ALIGN, TILE, NunchakuFormatError,
                                                  adaln_scale_chunks, ceil_to, check_splits, deinterleave_rows,
                                                  floats, fold_adaln_bias, interleave_rows, ints, model_dtype,
                                                  pack_awq_qweight, pack_lora_down, pack_lora_up,
                                                  pack_microscales, pack_qweight, pack_vector, pack_wscales,
                                                  repack_awq_qweight, repack_qweight, to_dtype,
                                                  unfold_adaln_bias, unpack_awq_qweight,
                                                  unpack_lora_down, unpack_lora_up, unpack_microscales,
                                                  unpack_qweight, unpack_vector, unpack_wscales)

FORMATS = ("int4", "nvfp4")
W4A4_KEYS = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up", "wtscale", "wcscales")
AWQ_KEYS = ("qweight", "wscales", "wzeros", "bias")
E2M1_NEG_ZERO = 8


def _check_fmt(fmt: str, what: str) -> None:
  if fmt not in FORMATS:
    raise NunchakuFormatError(f"{what}: fmt must be one of {FORMATS}, got {fmt!r}")


def _lowrank(lora_down: Any, lora_up: Any, n: int, k: int, what: str) -> tuple[np.ndarray, np.ndarray] | None:
  """Checked ``(Dn [r, K], U [N, r])`` or ``None`` for rank 0 / no branch."""
  if lora_down is None and lora_up is None:
    return None
  if lora_down is None or lora_up is None:
    raise NunchakuFormatError(f"{what}: pass both lora_down and lora_up, or neither")
  dn = floats(lora_down, f"{what}: lora_down", 2, (None, k))
  up = floats(lora_up, f"{what}: lora_up", 2, (n, dn.shape[0]))
  return None if dn.shape[0] == 0 else (dn, up)


# ----------------------------------------------------------------------------- W4A4 layer
def w4a4_tensors(*, codes: Any, wscales: Any, fmt: str, smooth: Any, lora_down: Any = None, lora_up: Any = None,
                 bias: Any = None, wtscale: float | None = None, wcscales: Any = None,
                 dtype: Any) -> dict[str, np.ndarray]:
  """One W4A4 layer's Nunchaku tensors.

  Args:
    codes: weight codes ``[N, K]``: INT4 in [-8, 7] or NVFP4 E2M1 patterns in [0, 15]. Code 8
      (E2M1 -0) is written as code 0 (+0, the same value; deepcompressor does the same).
    wscales: INT4 group scales ``[N, K/64]`` (stored in ``dtype``) or NVFP4 micro-scales
      ``[N, K/16]`` (float8 e4m3 values, stored as ``float8_e4m3fn``).
    fmt: ``"int4"`` or ``"nvfp4"``.
    smooth: λ ``[K]`` (the input is divided by it); stored as ``smooth`` and ``smooth_orig``.
    lora_down, lora_up: the low-rank branch in the engine's form, ``Dn [r, K]`` acting on the raw
      input and ``U [N, r]`` (see :func:`branch_to_engine`); ``None`` or rank 0: no ``lora_*`` keys.
    bias: ``[N]`` or ``None`` (zeros). For shifted layers it must already hold the shift terms.
    wtscale: NVFP4 per-tensor scale (single-source layers), stored as ``dtype [1]``.
    wcscales: NVFP4 per-channel scales ``[N]`` (fused q/k/v with per-member tensor scales).
    dtype: the model dtype of the 16-bit tensors (bfloat16 or float16).

  Returns:
    ``{name: array}`` with ``qweight int8 [N_p, K_p/2]``, ``wscales`` (``dtype [K_p/64, N_p]`` or
    ``float8_e4m3fn [K_p/16, N_p]``), ``bias smooth smooth_orig [N_p]/[K_p]``, ``lora_down [K_p, r_p]``,
    ``lora_up [N_p, r_p]``, ``wtscale [1]``, ``wcscales [N_p]`` (the last four when present).
  """
  what = "w4a4_tensors"
  _check_fmt(fmt, what)
  dt = model_dtype(dtype, f"{what}: dtype")
  if fmt == "int4":
    c = ints(codes, f"{what}: codes (int4)", 2, -8, 7)
  else:
    c = ints(codes, f"{what}: codes (nvfp4 E2M1)", 2, 0, 15)
    c = np.where(c == E2M1_NEG_ZERO, 0, c)
  n, k = c.shape
  group = INT4_GROUP if fmt == "int4" else FP4_GROUP
  if k % group:
    raise NunchakuFormatError(f"{what}: K={k} (codes {list(c.shape)}) is not a multiple of the {fmt} group {group}")
  s = floats(wscales, f"{what}: wscales ({fmt})", 2, (n, k // group))
  out = {"qweight": pack_qweight(c)}
  out["wscales"] = pack_wscales(s, dt) if fmt == "int4" else pack_microscales(s)
  if fmt == "int4" and (wtscale is not None or wcscales is not None):
    raise NunchakuFormatError(f"{what}: wtscale/wcscales are NVFP4 tensor scales; int4 layers have none")
  if wtscale is not None:
    ts = np.asarray(wtscale)
    if ts.size != 1 or not np.isfinite(ts.astype(np.float32)).all():
      raise NunchakuFormatError(f"{what}: wtscale must be one finite number, got shape {list(ts.shape)}")
    out["wtscale"] = to_dtype(ts.reshape(1), dt)
  if wcscales is not None:
    out["wcscales"] = pack_vector(floats(wcscales, f"{what}: wcscales", 1, (n,)), dt)
  b = np.zeros(n, np.float32) if bias is None else floats(bias, f"{what}: bias", 1, (n,))
  out["bias"] = pack_vector(b, dt)
  lam = floats(smooth, f"{what}: smooth", 1, (k,))
  out["smooth"] = pack_vector(lam, dt)
  out["smooth_orig"] = out["smooth"].copy()
  branch = _lowrank(lora_down, lora_up, n, k, what)
  if branch is not None:
    out["lora_down"] = pack_lora_down(branch[0], dt)
    out["lora_up"] = pack_lora_up(branch[1], dt)
  return out


def decode_w4a4(tensors: dict[str, Any], n: int, k: int, fmt: str, *, repack: bool = False,
                overwrite: bool = False) -> dict[str, Any]:
  """Inverse of :func:`w4a4_tensors` for one layer's tensors (keys without the layer prefix).

  Args:
    repack: return ``packed`` (the codes as ``uint8 [N, K/2]`` in the split-half layout of
      :func:`svdquant_jax.formats.packing.pack_int4`, :func:`repack_qweight`) instead of ``codes``;
      several times faster than unpacking and packing again.
    overwrite: with ``repack``, build ``packed`` in the buffer of ``tensors["qweight"]`` (clobbered).

  Returns:
    ``codes`` (``int8 [N, K]``: INT4 [-8, 7] or E2M1 [0, 15]) or ``packed``, ``wscales`` (INT4 ``[N, K/64]`` in the
    stored dtype; NVFP4 ``float32 [N, K/16]``), ``smooth``, ``smooth_orig`` ``[K]``, ``bias [N]``,
    ``lora_down [r_p, K]``, ``lora_up [N, r_p]`` (rank padding kept, zero), ``wtscale`` (float) and
    ``wcscales [N]``; an absent optional tensor (``smooth_orig``, ``lora_*``, ``wtscale``,
    ``wcscales``) is ``None``.
  """
  what = "decode_w4a4"
  _check_fmt(fmt, what)
  unknown = sorted(set(tensors) - set(W4A4_KEYS))
  if unknown:
    raise NunchakuFormatError(f"{what}: unexpected tensors {unknown}; a W4A4 layer has {list(W4A4_KEYS)}")
  missing = [key for key in ("qweight", "wscales", "bias", "smooth") if key not in tensors]
  if missing:
    raise NunchakuFormatError(f"{what}: missing required tensors {missing} (have {sorted(tensors)})")
  if repack:
    out: dict[str, Any] = {"packed": repack_qweight(tensors["qweight"], n, k, overwrite=overwrite)}
  else:
    out = {"codes": unpack_qweight(tensors["qweight"], n, k, signed=fmt == "int4")}
  ws = np.asarray(tensors["wscales"])
  if (ws.dtype == FP8) != (fmt == "nvfp4"):
    raise NunchakuFormatError(f"{what}: wscales dtype {ws.dtype} does not match fmt={fmt!r} "
                              "(nvfp4 micro-scales are float8_e4m3fn, int4 group scales 16-bit)")
  out["wscales"] = unpack_wscales(ws, n, k) if fmt == "int4" else unpack_microscales(ws, n, k)
  out["smooth"] = unpack_vector(tensors["smooth"], k)
  out["smooth_orig"] = unpack_vector(tensors["smooth_orig"], k) if "smooth_orig" in tensors else None
  out["bias"] = unpack_vector(tensors["bias"], n)
  if ("lora_down" in tensors) != ("lora_up" in tensors):
    raise NunchakuFormatError(f"{what}: lora_down and lora_up come together, got only one of them")
  out["lora_down"] = out["lora_up"] = None
  if "lora_down" in tensors:
    dn, up = unpack_lora_down(tensors["lora_down"], k), unpack_lora_up(tensors["lora_up"], n)
    if dn.shape[0] != up.shape[1]:
      raise NunchakuFormatError(f"{what}: lora_down rank {dn.shape[0]} != lora_up rank {up.shape[1]}")
    out["lora_down"], out["lora_up"] = dn, up
  if fmt == "int4" and ("wtscale" in tensors or "wcscales" in tensors):
    raise NunchakuFormatError(f"{what}: an int4 layer has no wtscale/wcscales, got {sorted(tensors)}")
  out["wtscale"] = None
  if "wtscale" in tensors:
    ts = np.asarray(tensors["wtscale"])
    if ts.size != 1:
      raise NunchakuFormatError(f"{what}: wtscale must hold one value, got shape {list(ts.shape)}")
    out["wtscale"] = float(ts.astype(np.float32).reshape(()))
  out["wcscales"] = unpack_vector(tensors["wcscales"], n) if "wcscales" in tensors else None
  return out


def branch_to_engine(a: Any, b: Any, smooth: Any, bias0: Any, shift: Any, dtype: Any
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """deepcompressor's branch (smoothed, shifted domain) -> the engine's (raw input).

  deepcompressor's layer is ``y = Q(R)·Qa((x + δ)/λ) + b·a·((x + δ)/λ) + b0``; the engine feeds
  the branch the raw ``x``, so ``down = a/λ`` (columnwise) and, for ``δ > 0``, the branch's
  shift term ``b·(a/λ)·(δ·1_K)`` moves into the bias. Computed in float64, rounded once to ``dtype``
  (``(b @ down) @ shift``, the product order of deepcompressor, so the bias bytes match).

  Args:
    a: ``[r, K]``; b: ``[N, r]``; smooth: λ ``[K]`` (full precision); bias0: ``[N]`` or ``None``
      (zeros); shift: δ, a number or ``[K]``; dtype: bfloat16 or float16.

  Returns:
    ``(lora_down [r, K], lora_up [N, r], bias [N])`` in ``dtype``.
  """
  what = "branch_to_engine"
  dt = model_dtype(dtype, f"{what}: dtype")
  a = floats(a, f"{what}: a", 2)
  r, k = a.shape
  b = floats(b, f"{what}: b", 2, (None, r))
  n = b.shape[0]
  lam = floats(smooth, f"{what}: smooth", 1, (k,))
  down = a.astype(np.float64) / lam.astype(np.float64)[None, :]
  bias = np.zeros(n, np.float64) if bias0 is None else floats(bias0, f"{what}: bias0", 1, (n,)).astype(np.float64)
  d = np.asarray(shift, np.float64)
  if d.ndim > 1 or (d.ndim == 1 and d.shape != (k,)):
    raise NunchakuFormatError(f"{what}: shift must be a number or [K={k}], got shape {list(d.shape)}")
  if np.any(d != 0):
    bias = bias + ((b.astype(np.float64) @ down) @ np.broadcast_to(d, (k,))[:, None])[:, 0]
  return to_dtype(down, dt), to_dtype(b, dt), to_dtype(bias, dt)


# ----------------------------------------------------------------------------- AWQ (adaLN) layer
def awq_symmetric_zeros(wscales: Any, dtype: Any) -> np.ndarray:
  """The zeros of symmetric INT4 stored as ``u = q + 7``: ``−round16(7·s)`` (float32 product, not
  always exactly ``−7·s`` in 16 bits)."""
  dt = model_dtype(dtype, "awq_symmetric_zeros: dtype")
  s = np.asarray(to_dtype(floats(wscales, "awq_symmetric_zeros: wscales", 2), dt), np.float32)
  return -to_dtype(np.float32(7) * s, dt)


def awq_tensors(*, u: Any, wscales: Any, wzeros: Any = None, bias: Any = None, S: int, dtype: Any,  # noqa: N803
                fold_bias: bool = True) -> dict[str, np.ndarray]:
  """One AWQ W4A16 (adaLN modulation) layer's Nunchaku tensors.

  Args:
    u: unsigned codes ``[N, K]`` in [0, 15], rows in diffusers (chunk-major) order; ``W = u·s + z``.
    wscales: ``s [N, K/64]``; wzeros: the additive zeros ``z [N, K/64]`` (``None``: symmetric INT4,
      :func:`awq_symmetric_zeros`). bias: ``[N]`` or ``None`` (zeros).
    S: adaLN chunks (6: double-block ``norm1[_context].linear``, 3: single-block ``norm.linear``,
      1: no interleave).
    fold_bias: add the ``+1`` of ``x·(1 + scale)`` to the scale chunks (what the engine expects).

  Returns:
    ``qweight int32 [N/4, K/2]``, ``wscales``, ``wzeros`` ``dtype [K/64, N]`` (exactly ``K/64``
    rows, the engine's shape; deepcompressor pads to a multiple of 16 rows with zeros, the same
    when ``K % 1024 == 0``), ``bias dtype [N]``, all rows interleaved.
  """
  what = "awq_tensors"
  dt = model_dtype(dtype, f"{what}: dtype")
  u = ints(u, f"{what}: u", 2, 0, 15)
  n, k = u.shape
  if n % 4 or k % AWQ_GROUP:
    raise NunchakuFormatError(f"{what}: u must be [N, K] with N % 4 == 0 and K % {AWQ_GROUP} == 0, got {list(u.shape)}")
  check_splits(n, S, what)
  s = floats(wscales, f"{what}: wscales", 2, (n, k // AWQ_GROUP))
  z = awq_symmetric_zeros(s, dt) if wzeros is None else floats(wzeros, f"{what}: wzeros", 2, (n, k // AWQ_GROUP))
  b = np.zeros(n, np.float32) if bias is None else floats(bias, f"{what}: bias", 1, (n,))
  return {
      "qweight": pack_awq_qweight(interleave_rows(u, S)),
      "wscales": np.ascontiguousarray(interleave_rows(to_dtype(s, dt), S).T),
      "wzeros": np.ascontiguousarray(interleave_rows(to_dtype(z, dt), S).T),
      "bias": fold_adaln_bias(b, S, dt) if fold_bias else interleave_rows(to_dtype(b, dt), S),
  }


def decode_awq(tensors: dict[str, Any], S: int, *, unfold_bias: bool = False,  # noqa: N803
               repack: bool = False) -> dict[str, np.ndarray]:
  """Inverse of :func:`awq_tensors`, in diffusers (de-interleaved) row order.

  Returns ``u uint8 [N, K]`` (or, with ``repack=True``, ``packed``: the same codes as split-half
  ``uint8 [N, K/2]``, :func:`repack_awq_qweight`), ``wscales``, ``wzeros`` ``[N, K/64]`` (stored dtype; only the first
  ``K/64`` stored rows are read, so deepcompressor's zero-padded rows are accepted) and ``bias [N]``.
  The bias keeps the folded ``+1`` (stored dtype, the value the engine adds) unless
  ``unfold_bias=True``, which returns ``float32`` with the ``+1`` removed (:func:`unfold_adaln_bias`).
  """
  what = "decode_awq"
  missing = [key for key in AWQ_KEYS if key not in tensors]
  if missing:
    raise NunchakuFormatError(f"{what}: missing tensors {missing} (have {sorted(tensors)})")
  if repack:
    packed = repack_awq_qweight(tensors["qweight"], S)
    n, k = packed.shape[0], 2 * packed.shape[1]
    out = {"packed": packed}
  else:
    u = unpack_awq_qweight(tensors["qweight"])
    n, k = u.shape
    out = {"u": deinterleave_rows(u, S)}
  for key in ("wscales", "wzeros"):
    v = floats(tensors[key], f"{what}: {key}", 2)
    if v.shape[1] != n or v.shape[0] < k // AWQ_GROUP:
      raise NunchakuFormatError(f"{what}: {key} must be [K/64={k // AWQ_GROUP}, N={n}] (qweight "
                                f"{list(np.shape(tensors['qweight']))}), got {list(v.shape)}")
    out[key] = deinterleave_rows(np.ascontiguousarray(v[:k // AWQ_GROUP].T), S)
  bias = floats(tensors["bias"], f"{what}: bias", 1, (n,))
  out["bias"] = unfold_adaln_bias(bias, S) if unfold_bias else deinterleave_rows(bias, S)
  return out


def dequantize_awq(u: Any, wscales: Any, wzeros: Any) -> np.ndarray:
  """``W = u·s + z`` per 64-group as ``float32 [N, K]`` (any consistent row order)."""
  u = ints(u, "dequantize_awq: u", 2, 0, 15)
  n, k = u.shape
  s = floats(wscales, "dequantize_awq: wscales", 2, (n, k // AWQ_GROUP)).astype(np.float32)
  z = floats(wzeros, "dequantize_awq: wzeros", 2, (n, k // AWQ_GROUP)).astype(np.float32)
  w = u.astype(np.float32).reshape(n, k // AWQ_GROUP, AWQ_GROUP) * s[..., None] + z[..., None]
  return w.reshape(n, k)


# ----------------------------------------------------------------------------- LoRA export
def fuse_member_loras(members: Sequence[tuple[Any, Any] | None], rows: Sequence[int] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """One branch ``(A_e [r, K], B_e [ΣN_i, r])`` for a fused layer (q, k, v) from its members' LoRAs.

  A member without a LoRA (``None``) gets ``A`` = the first present member's ``A`` and ``B = 0``
  (``rows[i]`` rows; default: the first present member's row count). If all members' ``A`` are
  equal (by value, like deepcompressor's ``torch.equal``), ``A_e`` is that ``A`` and ``B_e`` stacks
  the ``B`` rows; otherwise ``A_e`` stacks the ``A`` ranks and ``B_e`` is block-diagonal. The dtype
  is the first present member's.
  """
  what = "fuse_member_loras"
  present = [(i, m) for i, m in enumerate(members) if m is not None]
  if not present:
    raise NunchakuFormatError(f"{what}: no member has a LoRA")
  if rows is not None and len(rows) != len(members):
    raise NunchakuFormatError(f"{what}: {len(rows)} row counts for {len(members)} members")
  a0 = floats(present[0][1][0], f"{what}: member {present[0][0]} A", 2)
  b0 = floats(present[0][1][1], f"{what}: member {present[0][0]} B", 2, (None, a0.shape[0]))
  pairs = []
  for i, m in enumerate(members):
    if m is None:
      pairs.append((a0, np.zeros((b0.shape[0] if rows is None else rows[i], a0.shape[0]), b0.dtype)))
      continue
    a = floats(m[0], f"{what}: member {i} A", 2, (None, a0.shape[1]))
    b = floats(m[1], f"{what}: member {i} B", 2, (None if rows is None else rows[i], a.shape[0]))
    pairs.append((a.astype(a0.dtype), b.astype(b0.dtype)))
  if all(p[0].shape == a0.shape and np.array_equal(p[0], a0) for p in pairs):
    return a0, np.concatenate([p[1] for p in pairs], axis=0)
  a_e = np.concatenate([p[0] for p in pairs], axis=0)
  b_e = np.zeros((sum(p[1].shape[0] for p in pairs), a_e.shape[0]), b0.dtype)
  r0 = c0 = 0
  for _, b in pairs:
    b_e[r0:r0 + b.shape[0], c0:c0 + b.shape[1]] = b
    r0, c0 = r0 + b.shape[0], c0 + b.shape[1]
  return a_e, b_e


def lora_concat(dn0: Any, up0: Any, extra_a: Any, extra_b: Any, *, dtype: Any = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Base branch + extra LoRA ranks -> ``(Dn [r_p, K], U [N, r_p])``, total rank padded to 16 with zeros.

  ``Dn = [dn0; extra_a]``, ``U = [up0 | extra_b]``: the extra factors are cast to the base dtype
  (``dtype``, default bfloat16, when there is no base: ``dn0 = up0 = None``). ``extra_a`` acts on
  the raw input, like ``dn0``. Pass ``dn0``/``up0`` as :func:`unpack_lora_down`/``up`` return them
  (rank padding kept) so that the extra ranks land after the base's padded rank: the engine scales
  ranks per 16-rank chunk, and nunchaku/deepcompressor place them the same way. Pack the result with
  :func:`pack_lora_down`/:func:`pack_lora_up`.
  """
  what = "lora_concat"
  ea = floats(extra_a, f"{what}: extra_a", 2)
  r1, k = ea.shape
  eb = floats(extra_b, f"{what}: extra_b", 2, (None, r1))
  n = eb.shape[0]
  if (dn0 is None) != (up0 is None):
    raise NunchakuFormatError(f"{what}: pass both dn0 and up0, or neither")
  if dn0 is None:
    dt = model_dtype(BF16 if dtype is None else dtype, f"{what}: dtype")
    dn, up = to_dtype(ea, dt), to_dtype(eb, dt)
  else:
    dn0 = floats(dn0, f"{what}: dn0", 2, (None, k))
    up0 = floats(up0, f"{what}: up0", 2, (n, dn0.shape[0]))
    dn = np.concatenate([dn0, to_dtype(ea, dn0.dtype)], axis=0)
    up = np.concatenate([up0, to_dtype(eb, up0.dtype)], axis=1)
  r_p = ceil_to(dn.shape[0], RANK_ALIGN)
  dn = np.concatenate([dn, np.zeros((r_p - dn.shape[0], k), dn.dtype)], axis=0)
  up = np.concatenate([up, np.zeros((n, r_p - up.shape[1]), up.dtype)], axis=1)
  return dn, up


def awq_lora_tensors(a: Any, b: Any, S: int, dtype: Any) -> dict[str, np.ndarray]:  # noqa: N803
  """An adaLN (AWQ) layer's LoRA: ``lora_down [r_p, K]`` = ``a`` with zero rank rows, ``lora_up [N, r_p]``
  = ``b`` with interleaved rows and zero rank columns; plain layouts (no fragment packing), ``dtype``."""
  what = "awq_lora_tensors"
  dt = model_dtype(dtype, f"{what}: dtype")
  a = floats(a, f"{what}: a", 2)
  r, k = a.shape
  b = floats(b, f"{what}: b", 2, (None, r))
  r_p = ceil_to(r, RANK_ALIGN)
  down = np.zeros((r_p, k), dt)
  down[:r] = to_dtype(a, dt)
  up = np.zeros((b.shape[0], r_p), dt)
  up[:, :r] = interleave_rows(to_dtype(b, dt), S)
  return {"lora_down": down, "lora_up": up}


__all__ = [
    "AWQ_GROUP", "AWQ_KEYS", "BF16", "E2M1_NEG_ZERO", "FORMATS", "FP4_GROUP", "FP8", "FP8_MAX", "FP16", "INT4_GROUP",
    "MODEL_DTYPES", "RANK_ALIGN", "TILE", "W4A4_KEYS", "NunchakuFormatError", "adaln_scale_chunks", "awq_lora_tensors",
    "awq_symmetric_zeros", "awq_tensors", "branch_to_engine", "ceil_to", "decode_awq", "decode_w4a4",
    "deinterleave_rows", "dequantize_awq", "fold_adaln_bias", "fuse_member_loras", "interleave_rows", "lora_concat",
    "model_dtype", "pack_awq_qweight", "pack_lora_down", "pack_lora_up", "pack_microscales", "pack_qweight",
    "pack_vector", "pack_wscales", "repack_awq_qweight", "repack_qweight", "to_dtype", "unfold_adaln_bias",
    "unpack_awq_qweight", "unpack_lora_down",
    "unpack_lora_up", "unpack_microscales", "unpack_qweight", "unpack_vector", "unpack_wscales", "w4a4_tensors",
]
