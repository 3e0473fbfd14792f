"""The packed SVDQuant linear format: :class:`QuantizedLinear` and the 4-bit nibble packing.

Packed 4-bit layout ("split-half" nibble order)
------------------------------------------------
4-bit codes are packed two per byte along K, the contraction axis, in blocks of
:data:`PACK_BLOCK` = 64 channels. Within block ``b`` (channels ``64b .. 64b+63``), byte
``32b + j`` (``0 <= j < 32``) holds

* channel ``64b + j``      in the **low** nibble  (bits 0-3),
* channel ``64b + 32 + j`` in the **high** nibble (bits 4-7).

Signed INT4 codes are stored as 4-bit two's complement (``-7 -> 0x9``), unsigned INT4
activation codes and NVFP4 E2M1 codes as their 4-bit value. The same order is used for the
weight (``qweight [N, K/2]``, K-major: one row per output channel) and, inside the kernels,
for the activations (``[M, K/2]``). Both operands pair byte ``j`` with byte ``j``, so a kernel
can contract the low nibbles of a 32-byte slice with each other and the high nibbles with each
other (two int8 dots of depth 32) and never has to re-interleave nibbles; a 64-channel
quantization group is exactly one 32-byte slice. Worked example in ``docs/kernels.md``.

The format
----------
``QuantizedLinear`` holds one linear layer ``y = Qa((x + δ)/λ)·Qw(R) + (x·lora_down)·lora_up +
b_eff`` (``docs/design.md``), with ``Qw(R)`` including the NVFP4 per-tensor and per-channel
scales:

=============  ===============================  ============================================
field          shape / dtype                    meaning
=============  ===============================  ============================================
``qweight``    ``uint8 [N, K/2]`` (int4, nvfp4)  packed codes of the residual ``Qw(R)``;
               ``int8 [N, K]`` (int8)            int8: plain codes, K-major
``wscales``    ``[K/G, N]``                      int4: model dtype; nvfp4: ``float8_e4m3fn``
                                                 micro-scales; int8: ``[1, N]`` model dtype
``wtscale``    ``float32 [1]`` or ``None``       nvfp4 per-tensor scale (``None`` otherwise)
``wcscales``   ``float32 [N]`` or ``None``       nvfp4 only, optional: per-output-channel scale
                                                 (a fused layer's members' tensor scales)
``smooth``     ``[K]`` model dtype               λ, the input divisor
``lora_down``  ``[K, r]`` model dtype            ``diag(1/λ)·A`` (reads the raw x)
``lora_up``    ``[r, N]`` model dtype            ``B``
``bias``       ``[N]`` model dtype or ``None``   ``b_eff = b - Σ_k (δ/λ_k)·Qw(R)[k, :]``
=============  ===============================  ============================================

Static (pytree metadata) fields: ``fmt`` (``"int4"``, ``"nvfp4"``, ``"int8"``),
``group_size`` (64, 16, K), ``shift`` (δ; 0.171875 for the unsigned fc2 input, INT4 only) and the
input rotation ``rotation_block``/``rotation_seed`` (0/0: none; else every field above lives in
the rotated input space and the layer reads ``x Q``, ``Q`` the seeded block Hadamard of
``formats/rotation.py``, applied online before the fused op: :meth:`QuantizedLinear.rotate_input`).
``act_unsigned`` (δ > 0) and ``rank`` (r) are derived properties.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats import PACKED_FORMATS, packed_group_size
from svdquant_jax.formats import quantizers as q
from svdquant_jax.formats.rotation import rotate_online

Array = jax.Array

FORMATS = PACKED_FORMATS
PACK_BLOCK = 64
HALF_BLOCK = PACK_BLOCK // 2


class QuantizedLinearError(ValueError):
  """Bad packed parameters or inputs for the SVDQuant linear op (names the offending field)."""


# ----------------------------------------------------------------------------- nibble packing
def _concrete_values(x: Any) -> np.ndarray | None:
  """``x`` as numpy if it has concrete values (``None`` under tracing, e.g. inside ``jit``)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def pack_int4(codes: Array, *, signed: bool = True) -> Array:
  """Packs 4-bit codes along the last axis in the split-half nibble order (numpy arrays stay numpy).

  Args:
    codes: integer codes ``[..., K]`` with ``K % 64 == 0``; signed codes in [-8, 7]
      (``signed=True``) or unsigned codes in [0, 15].
    signed: the range the codes are checked against (when they are concrete; under ``jit`` the
      values are unknown and out-of-range codes keep their low 4 bits).

  Returns:
    ``uint8 [..., K/2]``.
  """
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise QuantizedLinearError(f"pack_int4: codes must be integers, got dtype {codes.dtype}")
  k = codes.shape[-1]
  if k % PACK_BLOCK:
    raise QuantizedLinearError(f"pack_int4: K={k} (last axis of codes {codes.shape}) is not a multiple of "
                               f"{PACK_BLOCK}")
  c = _concrete_values(codes) if codes.size else None
  if c is not None:
    lo, hi = (-8, 7) if signed else (0, 15)
    if c.min() < lo or c.max() > hi:
      raise QuantizedLinearError(f"pack_int4: codes out of the {'signed' if signed else 'unsigned'} 4-bit range "
                                 f"[{lo}, {hi}]: min {c.min()}, max {c.max()}")
  if isinstance(codes, np.ndarray):  # host: byte arithmetic (two's complement wraps to the same low nibble)
    nib = codes.astype(np.int8 if signed else np.uint8).view(np.uint8) & np.uint8(0xF)
  else:
    nib = codes.astype(jnp.int32) & 0xF
  nib = nib.reshape(*codes.shape[:-1], k // PACK_BLOCK, 2, HALF_BLOCK)
  packed = nib[..., 0, :] | (nib[..., 1, :] << 4)
  return packed.reshape(*codes.shape[:-1], k // 2).astype(jnp.uint8)


def unpack_int4(packed: Array, *, signed: bool = True) -> Array:
  """Inverse of :func:`pack_int4`: ``uint8 [..., K/2]`` -> ``int8 [..., K]`` (signed codes,
  sign-extended) or ``uint8 [..., K]`` (unsigned codes)."""
  if packed.dtype != jnp.uint8:
    raise QuantizedLinearError(f"unpack_int4: packed codes must be uint8, got {packed.dtype}")
  kb = packed.shape[-1]
  if (2 * kb) % PACK_BLOCK:
    raise QuantizedLinearError(f"unpack_int4: {kb} bytes per row is not a multiple of {HALF_BLOCK}")
  p = packed.astype(jnp.int32).reshape(*packed.shape[:-1], kb // HALF_BLOCK, 1, HALF_BLOCK)
  xp = np if isinstance(packed, np.ndarray) else jnp  # numpy in, numpy out (host-side checkpoint conversion)
  nib = xp.concatenate([p & 0xF, (p >> 4) & 0xF], axis=-2)
  if signed:
    nib = (nib ^ 8) - 8
  out = nib.reshape(*packed.shape[:-1], 2 * kb)
  return out.astype(jnp.int8 if signed else jnp.uint8)


def pack(codes: Array, *, layout: str = "KN", signed: bool = True) -> Array:
  """Packs a weight's 4-bit codes into the K-major ``uint8 [N, K/2]`` layout.

  Args:
    codes: ``[K, N]`` (``layout="KN"``, the Flax kernel orientation the quantizers use) or
      ``[N, K]`` (``layout="NK"``).
    signed: INT4 codes (True) or unsigned 4-bit codes (NVFP4 E2M1 patterns).
  """
  if codes.ndim != 2:
    raise QuantizedLinearError(f"pack: codes must be 2-D, got shape {codes.shape}")
  if layout == "KN":
    codes = codes.T
  elif layout != "NK":
    raise QuantizedLinearError(f"pack: layout must be 'KN' or 'NK', got {layout!r}")
  return pack_int4(codes, signed=signed)


def unpack(packed: Array, *, layout: str = "KN", signed: bool = True) -> Array:
  """Inverse of :func:`pack`: ``uint8 [N, K/2]`` -> codes ``[K, N]`` (``"KN"``) or ``[N, K]``."""
  if packed.ndim != 2:
    raise QuantizedLinearError(f"unpack: packed codes must be 2-D, got shape {packed.shape}")
  if layout not in ("KN", "NK"):
    raise QuantizedLinearError(f"unpack: layout must be 'KN' or 'NK', got {layout!r}")
  codes = unpack_int4(packed, signed=signed)
  return codes.T if layout == "KN" else codes


# ----------------------------------------------------------------------------- the format
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedLinear:
  """One SVDQuant linear layer in packed form (see the module docstring for the fields)."""
  qweight: Array
  wscales: Array
  smooth: Array
  lora_down: Array
  lora_up: Array
  bias: Array | None = None
  wtscale: Array | None = None
  wcscales: Array | None = None
  fmt: str = "int4"
  group_size: int = 64
  shift: float = 0.0
  rotation_block: int = 0
  rotation_seed: int = 0

  @property
  def in_features(self) -> int:
    return int(self.smooth.shape[0])

  @property
  def out_features(self) -> int:
    return int(self.wscales.shape[-1])

  @property
  def rank(self) -> int:
    return int(self.lora_down.shape[-1])

  @property
  def act_unsigned(self) -> bool:
    """Activations are quantized unsigned ([0, 15]) after the shift δ."""
    return self.shift > 0

  @property
  def dtype(self) -> Any:
    """The model dtype (that of ``smooth``, ``lora_down``, ``lora_up``, ``bias``)."""
    return self.smooth.dtype

  def validate(self) -> None:
    """Checks the static format and every field's shape and dtype.

    Raises:
      QuantizedLinearError: naming the first inconsistent field.
    """
    fmt = self.fmt
    if fmt not in FORMATS:
      raise QuantizedLinearError(f"QuantizedLinear.fmt: unknown format {fmt!r}; expected one of {FORMATS}")
    for name in ("qweight", "wscales", "smooth", "lora_down", "lora_up"):
      if not hasattr(getattr(self, name), "shape"):
        raise QuantizedLinearError(f"QuantizedLinear.{name} must be an array, got {type(getattr(self, name))}")
    if self.smooth.ndim != 1:
      raise QuantizedLinearError(f"QuantizedLinear.smooth must be [K], got shape {self.smooth.shape}")
    k, n = self.in_features, self.out_features
    if self.wscales.ndim != 2:
      raise QuantizedLinearError(f"QuantizedLinear.wscales must be [K/G, N], got shape {self.wscales.shape}")
    g = self.group_size
    if not isinstance(g, int) or g <= 0 or k % g:
      raise QuantizedLinearError(f"QuantizedLinear.group_size={g!r} does not divide K={k}")
    if fmt == "int8":
      if g != k:
        raise QuantizedLinearError(f"QuantizedLinear: int8 uses one group per row (group_size=K={k}), got {g}")
      want_w, want_wdt = (n, k), jnp.int8
    else:
      if k % PACK_BLOCK:
        raise QuantizedLinearError(f"QuantizedLinear: K={k} is not a multiple of {PACK_BLOCK} (4-bit packing)")
      if fmt == "nvfp4" and g != packed_group_size(fmt, k):
        raise QuantizedLinearError(f"QuantizedLinear: nvfp4 uses group_size {packed_group_size(fmt, k)}, got {g}")
      want_w, want_wdt = (n, k // 2), jnp.uint8
    if tuple(self.qweight.shape) != want_w or self.qweight.dtype != want_wdt:
      raise QuantizedLinearError(f"QuantizedLinear.qweight: expected {jnp.dtype(want_wdt).name} {want_w} for "
                                 f"fmt={fmt!r}, K={k}, N={n}; got {self.qweight.dtype} {tuple(self.qweight.shape)}")
    if tuple(self.wscales.shape) != (k // g, n):
      raise QuantizedLinearError(f"QuantizedLinear.wscales: expected shape {(k // g, n)}, got "
                                 f"{tuple(self.wscales.shape)}")
    if fmt == "nvfp4":
      if self.wscales.dtype != jnp.float8_e4m3fn:
        raise QuantizedLinearError(f"QuantizedLinear.wscales: nvfp4 scales must be float8_e4m3fn, got "
                                   f"{self.wscales.dtype}")
      if self.wtscale is None or tuple(self.wtscale.shape) != (1,):
        raise QuantizedLinearError("QuantizedLinear.wtscale: nvfp4 needs the per-tensor scale as float32 [1], got "
                                   f"{None if self.wtscale is None else tuple(self.wtscale.shape)}")
      if self.wcscales is not None and (tuple(self.wcscales.shape) != (n,) or self.wcscales.dtype != jnp.float32):
        raise QuantizedLinearError(f"QuantizedLinear.wcscales: expected float32 {(n,)} (per output channel), got "
                                   f"{self.wcscales.dtype} {tuple(self.wcscales.shape)}")
    else:
      if self.wcscales is not None:
        raise QuantizedLinearError(f"QuantizedLinear.wcscales (per-channel scales) exist for nvfp4 only, not "
                                   f"fmt={fmt!r}")
      if not jnp.issubdtype(self.wscales.dtype, jnp.floating) or self.wscales.dtype == jnp.float8_e4m3fn:
        raise QuantizedLinearError(f"QuantizedLinear.wscales: {fmt} scales must be 16/32-bit floats, got "
                                   f"{self.wscales.dtype}")
      if self.wtscale is not None:
        raise QuantizedLinearError(f"QuantizedLinear.wtscale must be None for fmt={fmt!r}")
    r = self.rank
    if self.lora_down.ndim != 2 or self.lora_down.shape[0] != k:
      raise QuantizedLinearError(f"QuantizedLinear.lora_down: expected [K={k}, r], got {tuple(self.lora_down.shape)}")
    if tuple(self.lora_up.shape) != (r, n):
      raise QuantizedLinearError(f"QuantizedLinear.lora_up: expected {(r, n)}, got {tuple(self.lora_up.shape)}")
    if self.bias is not None and tuple(self.bias.shape) != (n,):
      raise QuantizedLinearError(f"QuantizedLinear.bias: expected {(n,)}, got {tuple(self.bias.shape)}")
    for name in ("smooth", "lora_down", "lora_up", "bias"):
      v = getattr(self, name)
      if v is not None and not jnp.issubdtype(v.dtype, jnp.floating):
        raise QuantizedLinearError(f"QuantizedLinear.{name} must be floating point, got {v.dtype}")
    if self.shift < 0:
      raise QuantizedLinearError(f"QuantizedLinear.shift must be >= 0, got {self.shift}")
    if self.shift > 0 and fmt != "int4":
      raise QuantizedLinearError(f"QuantizedLinear.shift={self.shift}: the shifted unsigned activation path exists "
                                 f"for int4 only, not {fmt!r}")
    b = self.rotation_block
    if not isinstance(b, int) or b < 0 or (b and (b & (b - 1) or k % b)):
      raise QuantizedLinearError(f"QuantizedLinear.rotation_block={b!r} must be 0 (no rotation) or a power of two "
                                 f"dividing K={k}")
    if b and self.shift:
      raise QuantizedLinearError(f"QuantizedLinear: a rotated input is signed; shift={self.shift} (unsigned "
                                 "activations) cannot be combined with rotation_block")
    if not isinstance(self.rotation_seed, int) or self.rotation_seed < 0:
      raise QuantizedLinearError(f"QuantizedLinear.rotation_seed must be an int >= 0, got {self.rotation_seed!r}")

  # ---------------------------------------------------------------- views used by references and tests
  def weight_codes(self) -> Array:
    """The residual's codes in the Flax orientation ``[K, N]``: int8 (int4, int8) or uint8 (nvfp4)."""
    if self.fmt == "int8":
      return self.qweight.T
    return unpack(self.qweight, layout="KN", signed=self.fmt == "int4")

  def dequantized_weight(self) -> Array:
    """``Qw(R)`` as ``float32 [K, N]`` (nvfp4: times ``wtscale`` and ``wcscales``)."""
    return _dequantized_weight(self)

  def replace(self, **changes: Any) -> QuantizedLinear:
    return dataclasses.replace(self, **changes)

  @property
  def rotated(self) -> bool:
    """The layer reads the rotated input ``x Q`` (``rotation_block > 0``)."""
    return self.rotation_block > 0

  def rotate_input(self, x: Array) -> Array:
    """``x [..., K]`` as this layer reads it: ``x Q`` computed in float32 and cast back to
    ``x.dtype`` when rotated, else ``x``."""
    return rotate_online(x, self.rotation_block, self.rotation_seed)

  def unrotated(self) -> QuantizedLinear:
    """The same arrays without the rotation: what the fused op runs on an already rotated input."""
    return self.replace(rotation_block=0, rotation_seed=0)


jax.tree_util.register_dataclass(
    QuantizedLinear,
    data_fields=["qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wtscale", "wcscales"],
    meta_fields=["fmt", "group_size", "shift", "rotation_block", "rotation_seed"])


@jax.jit
def _dequantized_weight(p: QuantizedLinear) -> Array:
  codes = p.weight_codes()
  if p.fmt == "int4":
    return q.dequantize_int4_weight(codes, p.wscales, jnp.float32)
  if p.fmt == "nvfp4":
    w = q.dequantize_nvfp4_weight(q.NVFP4Weight(codes, p.wscales, p.wtscale.reshape(())), jnp.float32)
    return w if p.wcscales is None else w * p.wcscales.astype(jnp.float32)[None, :]
  return codes.astype(jnp.float32) * p.wscales.astype(jnp.float32)


def _dequantized_weight_f64(p: QuantizedLinear) -> np.ndarray:
  """``Qw(R)`` ``[K, N]`` in float64 on the host (exact: codes times the stored scales)."""
  codes = np.asarray(p.weight_codes())
  if p.fmt == "nvfp4":
    values = np.asarray(q.e2m1_decode(jnp.asarray(codes)), np.float64)
    scales = np.asarray(p.wscales.astype(jnp.float32), np.float64) * float(np.asarray(p.wtscale)[0])
  else:
    values = codes.astype(np.float64)
    scales = np.asarray(p.wscales.astype(jnp.float32), np.float64)
  k, n = values.shape
  g = k // scales.shape[0]
  w = (values.reshape(k // g, g, n) * scales[:, None, :]).reshape(k, n)
  if p.wcscales is not None:
    w = w * np.asarray(p.wcscales, np.float64)[None, :]
  return w


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "dtype"))
def _quantize_residual(residual: Array, *, fmt: str, group_size: int, dtype: Any) -> tuple[Array, Array, Array | None]:
  """The quantizers' real form of a float residual ``[K, N]``: (codes, scales, tensor scale)."""
  if fmt == "int4":
    codes, scales = q.quantize_int4_weight(residual, group_size, scale_dtype=dtype)
    return codes, scales, None
  if fmt == "nvfp4":
    sixteen = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    w = q.quantize_nvfp4_weight(residual, group_size, dtype if sixteen else jnp.bfloat16)
    return w.codes, w.scales, w.tensor_scale
  codes, scales = q.quantize_int8_weight(residual, scale_dtype=dtype)
  return codes, scales, None


# ----------------------------------------------------------------------------- constructors
def _float(x: Any) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def _host_f64(*xs: Any) -> list[np.ndarray] | None:
  """The arrays as float64 numpy when all are concrete (``None`` entries stay ``None``); ``None``
  under tracing."""
  out = []
  for x in xs:
    if x is None:
      out.append(None)
      continue
    v = _concrete_values(jnp.asarray(x).astype(jnp.float32))
    if v is None:
      return None
    out.append(v.astype(np.float64))
  return out


def round_f64(v: np.ndarray, dtype: Any) -> Array:
  """A float64 host value rounded to ``dtype`` as torch does (``float64 -> float32 -> dtype``), so
  that deployment constants match deepcompressor's float64 arithmetic bit for bit."""
  return jnp.asarray(np.asarray(v, np.float64).astype(np.float32)).astype(dtype)


def from_components(smooth: Array, lora_down_s: Array, lora_up: Array, bias: Array | None = None, *,
                    residual: Array | None = None, codes: Array | None = None, scales: Array | None = None,
                    tensor_scale: Array | None = None, channel_scales: Array | None = None, fmt: str = "int4",
                    shift: float = 0.0, group_size: int | None = None, dtype: Any = None) -> QuantizedLinear:
  """Builds a :class:`QuantizedLinear` from float pieces and a residual (float or already quantized).

  To deploy a layer calibrated by ``svdquant_jax.quant`` (an ``SVDQuantWeights``), use
  :func:`svdquant_jax.quant.deploy.to_quantized_linear`: it packs the codes the calibration chose
  (GPTQ's ``residual_q`` when set) with the calibration's scales. ``residual=`` here quantizes the
  float residual again with round-to-nearest, which silently replaces GPTQ's codes (and uses
  scales in ``dtype``, not ``QuantFormat.scale_dtype``): what runs is then not what was calibrated.

  The deployment constants are computed on the host in float64 when the inputs are concrete
  (else in float32 under tracing) and rounded once (:func:`round_f64`):
  ``lora_down = dtype(A / λ)`` with the full-precision λ, and for a shift δ
  ``bias = dtype(b - Σ_k (δ / λ'_k) Qw(R)[k, :])`` with ``λ' = dtype(λ)``, the stored divisor the
  op uses, so that the shift cancels exactly in the deployed layer.

  Args:
    smooth: λ ``[K]`` (full precision; stored as ``dtype(λ)``).
    lora_down_s: ``A [K, r]``, the low-rank down factor in the *smoothed* space (``L = A B``
      approximates ``diag(λ) W``); ``1/λ`` is folded in here.
    lora_up: ``B [r, N]``.
    bias: the layer's bias ``b [N]`` or ``None``.
    residual: the float residual ``R = diag(λ) W - A B`` ``[K, N]``, quantized here by RTN with
      :mod:`svdquant_jax.formats.quantizers` (scales in ``dtype``; the nvfp4 tensor scale in
      ``dtype`` when 16-bit, else bfloat16). Mutually exclusive with ``codes``/``scales``.
    codes, scales, tensor_scale: an already quantized residual in the quantizers' form:
      int4 ``int8 [K, N]`` + ``[K/G, N]``; nvfp4 ``uint8 [K, N]`` + ``float8 [K/16, N]`` +
      tensor scale (scalar or [1]); int8 ``int8 [K, N]`` + ``[N]`` or ``[1, N]``.
    channel_scales: nvfp4 only: optional per-output-channel scales ``[N]`` (``wcscales``).
    fmt: ``"int4"``, ``"nvfp4"`` or ``"int8"``.
    shift: δ; ``quantizers.GELU_SHIFT`` for the unsigned fc2 input (int4 only), else 0.
    group_size: int4 weight group (default 64); fixed 16 for nvfp4 and K for int8.
    dtype: model dtype of smooth / lora / bias / int scales (default ``lora_up.dtype``).

  Returns:
    A validated :class:`QuantizedLinear`; its bias is ``b - Σ_k (δ/λ'_k)·Qw(R)[k, :]`` (``None``
    when there is neither a bias nor a shift).
  """
  if fmt not in FORMATS:
    raise QuantizedLinearError(f"from_components: unknown format {fmt!r}; expected one of {FORMATS}")
  if (residual is None) == (codes is None):
    raise QuantizedLinearError("from_components: pass exactly one of `residual` or `codes`/`scales`")
  dtype = jnp.dtype(lora_up.dtype if dtype is None else dtype)
  smooth = jnp.asarray(smooth)
  k = smooth.shape[0]
  g = packed_group_size(fmt, k)
  if fmt == "int4" and group_size is not None:  # INT4 weight groups may differ from 64; the others are fixed
    g = group_size
  if group_size is not None and group_size != g:
    raise QuantizedLinearError(f"from_components: group_size={group_size} is not valid for fmt={fmt!r} (uses {g})")
  if channel_scales is not None and fmt != "nvfp4":
    raise QuantizedLinearError(f"from_components: channel_scales exist for nvfp4 only, not fmt={fmt!r}")
  wtscale = None
  if residual is not None:
    if residual.ndim != 2 or residual.shape[0] != k:
      raise QuantizedLinearError(f"from_components: residual must be [K={k}, N], got {tuple(residual.shape)}")
    codes, scales, tensor_scale = _quantize_residual(jnp.asarray(residual), fmt=fmt, group_size=g, dtype=dtype)
  if scales is None:
    raise QuantizedLinearError("from_components: `codes` needs `scales`")
  codes = jnp.asarray(codes)
  if codes.ndim != 2 or codes.shape[0] != k:
    raise QuantizedLinearError(f"from_components: codes must be [K={k}, N], got {tuple(codes.shape)}")
  wcscales = None
  if fmt == "int4":
    qweight = pack(codes, layout="KN", signed=True)
    wscales = jnp.asarray(scales)
  elif fmt == "nvfp4":
    if tensor_scale is None:
      raise QuantizedLinearError("from_components: nvfp4 codes need `tensor_scale`")
    qweight = pack(codes, layout="KN", signed=False)
    wscales = jnp.asarray(scales)
    wtscale = jnp.asarray(tensor_scale, jnp.float32).reshape(1)
    if channel_scales is not None:
      wcscales = jnp.asarray(channel_scales, jnp.float32).reshape(-1)
  else:
    if codes.dtype != jnp.int8:
      raise QuantizedLinearError(f"from_components: int8 codes must be int8, got {codes.dtype}")
    qweight = codes.T
    wscales = jnp.asarray(scales).reshape(1, -1)
  if fmt != "nvfp4":
    wscales = wscales.astype(dtype)

  smooth_d = smooth.astype(dtype)
  host = _host_f64(smooth, lora_down_s, smooth_d, bias)
  if host is not None:  # deployment is host-side: float64, one rounding
    lam, a, lam_d, b = host
    lora_down = round_f64(a / lam[:, None], dtype)
  else:
    lora_down = (_float(lora_down_s) / _float(smooth)[:, None]).astype(dtype)
  partial = QuantizedLinear(qweight=qweight, wscales=wscales, smooth=smooth_d, lora_down=lora_down,
                            lora_up=jnp.asarray(lora_up).astype(dtype), bias=None, wtscale=wtscale, wcscales=wcscales,
                            fmt=fmt, group_size=g, shift=float(shift))
  partial.validate()
  if not shift and bias is None:
    return partial
  if host is not None:
    b_eff = np.zeros((partial.out_features,), np.float64) if b is None else b
    if shift:
      b_eff = b_eff - (float(shift) / lam_d) @ _dequantized_weight_f64(partial)
    b_eff = round_f64(b_eff, dtype)
  else:
    b_eff = jnp.zeros((partial.out_features,), jnp.float32) if bias is None else _float(bias)
    if shift:
      b_eff = b_eff - jnp.dot(q.true_divide(jnp.full((k,), shift, jnp.float32), _float(smooth_d)),
                              partial.dequantized_weight(), precision=jax.lax.Precision.HIGHEST)
    b_eff = b_eff.astype(dtype)
  out = partial.replace(bias=b_eff)
  out.validate()
  return out


@jax.jit
def _smoothed_residual(kernel: Array, smooth: Array, lora_down_s: Array, lora_up: Array) -> Array:
  """``diag(λ) W - A B`` in float32."""
  return (_float(smooth)[:, None] * _float(kernel)
          - jnp.dot(_float(lora_down_s), _float(lora_up), precision=jax.lax.Precision.HIGHEST))


def from_float(kernel: Array, bias: Array | None, smooth: Array, lora_down_s: Array, lora_up: Array, *,
               fmt: str = "int4", shift: float = 0.0, residual: Array | None = None,
               dtype: Any = None) -> QuantizedLinear:
  """Builds a :class:`QuantizedLinear` from a float ``nn.Dense`` kernel ``W [K, N]`` and bias.

  The residual is ``R = diag(λ) W - A B`` (computed in float32) unless given explicitly
  (e.g. after GPTQ or the alternating low-rank refinement). ``dtype`` defaults to
  ``kernel.dtype``.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise QuantizedLinearError(f"from_float: kernel must be [K, N], got {tuple(kernel.shape)}")
  if smooth.shape != (kernel.shape[0],):
    raise QuantizedLinearError(f"from_float: smooth must be [K={kernel.shape[0]}], got {tuple(smooth.shape)}")
  if residual is None:
    residual = _smoothed_residual(kernel, smooth, lora_down_s, lora_up)
  return from_components(smooth, lora_down_s, lora_up, bias, residual=residual, fmt=fmt, shift=shift,
                         dtype=kernel.dtype if dtype is None else dtype)


# ----------------------------------------------------------------------------- input checks
ACT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_inputs(x: Any, params: Any) -> None:
  """Validates an op call before anything is launched.

  Raises:
    QuantizedLinearError: ``params`` is not a valid :class:`QuantizedLinear`, or ``x`` is not a
      ``[..., K]`` bf16/fp16/fp32 array matching it.
  """
  if not isinstance(params, QuantizedLinear):
    raise QuantizedLinearError(f"svdquant_linear: params must be a QuantizedLinear, got {type(params).__name__}")
  params.validate()
  if params.rotated:
    raise QuantizedLinearError(
        f"svdquant_linear: the layer reads a rotated input (rotation_block={params.rotation_block}), which the fused "
        "ops do not apply; call op(params.rotate_input(x), params.unrotated()) (SVDQuantDense does)")
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) < 1:
    raise QuantizedLinearError(f"svdquant_linear: x must be an array [..., K], got {type(x).__name__} {shape}")
  if shape[-1] != params.in_features:
    raise QuantizedLinearError(f"svdquant_linear: x has {shape[-1]} input features (shape {tuple(shape)}), the "
                               f"params expect K={params.in_features}")
  if jnp.dtype(x.dtype) not in ACT_DTYPES:
    raise QuantizedLinearError(f"svdquant_linear: x dtype {x.dtype} is not one of "
                               f"{[d.name for d in ACT_DTYPES]}")
