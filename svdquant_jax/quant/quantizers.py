"""Weight and activation quantizers: pure jnp, jit-able, each with a real and a fake form.

Conventions (used throughout the project):
  * Weights are Flax ``Dense`` kernels ``w: [K, N]`` (in, out); the layer computes
    ``y = x @ w``. Groups run along the **input** dimension K (axis 0), so group scales are
    ``[K // G, N]`` (the Nunchaku ``wscales`` layout).
  * Activations are ``x: [..., K]``; dynamic group scales are ``[..., K // G]``.
  * The *real* form returns integer (or 4-bit code) arrays plus scales; the *fake* form
    (``fake_*``) returns ``dequantize(quantize(x))`` in the input dtype, for error analysis
    and for the PTQ searches.
  * Codes: INT4 ``int8`` in [-7, 7]; unsigned INT4 ``int8`` in [0, 15]; INT8 ``int8`` in
    [-127, 127]; NVFP4 and NF4 ``uint8`` 4-bit codes in [0, 15] (NVFP4: the E2M1 bit
    pattern ``sign<<3 | magnitude``; NF4: index into :data:`NF4_VALUES`).
  * Scales are computed in float32, rounded to their storage dtype, and the codes are
    computed with the *rounded* scale, so ``codes * scale`` reproduces the fake form exactly.
  * Rounding is round-half-to-even (``jnp.round``), as ``torch.round`` in deepcompressor.

K not divisible by the group size is refused with a ``ValueError`` (we do not pad: padding
changes the layer and must be the caller's explicit choice).

Reference: SVDQuant spec §1.4-1.5 (deepcompressor ``quantizer/impl``), NVFP4 two-level
scales §1.4, NF4 from QLoRA (Dettmers et al. 2023, Appendix E).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

INT4_MAX = 7
UINT4_MAX = 15
INT8_MAX = 127
FP4_MAX = 6.0
FP8_E4M3_MAX = 448.0
GELU_SHIFT = 0.171875  # fc2 inputs (after GELU-tanh, >= -0.1700) are shifted by this and quantized unsigned.

# E2M1 magnitudes; the index of a magnitude is its 3-bit E2M1 pattern (exp<<1 | mantissa).
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
# NormalFloat4 code book (QLoRA): quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

Array = jax.Array


def _check_groups(k: int, group_size: int, what: str) -> None:
  if group_size <= 0:
    raise ValueError(f"group_size must be positive, got {group_size}")
  if k % group_size:
    raise ValueError(f"{what}: input dimension K={k} is not divisible by the group size {group_size}; "
                     "pad K to a multiple of the group size or keep this layer in 16-bit")


def _safe(scale: Array) -> Array:
  """Scale for division: zero scales (all-zero groups) divide by one instead."""
  return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def _group_weight(w: Array, group_size: int) -> Array:
  k, n = w.shape
  _check_groups(k, group_size, f"weight of shape {w.shape}")
  return w.astype(jnp.float32).reshape(k // group_size, group_size, n)


def _group_act(x: Array, group_size: int) -> Array:
  k = x.shape[-1]
  _check_groups(k, group_size, f"activation of shape {x.shape}")
  return x.astype(jnp.float32).reshape(*x.shape[:-1], k // group_size, group_size)


# ----------------------------------------------------------------------------- INT4 weights
def quantize_int4_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> tuple[Array, Array]:
  """Symmetric INT4 per-group weight quantization (RTN, range [-7, 7]).

  Args:
    w: kernel ``[K, N]``.
    group_size: channels of K per scale (64 for SVDQuant INT4).
    scale_dtype: storage dtype of the scales (default ``w.dtype``: bf16 for FLUX).

  Returns:
    ``(codes, scales)``: ``int8 [K, N]`` in [-7, 7] and ``[K // G, N]`` scales with
    ``scale = absmax(group) / 7``.
  """
  scale_dtype = w.dtype if scale_dtype is None else scale_dtype
  g = _group_weight(w, group_size)
  scale = (jnp.max(jnp.abs(g), axis=1) / INT4_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(g / _safe(scale.astype(jnp.float32))[:, None, :]), -INT4_MAX, INT4_MAX)
  return codes.astype(jnp.int8).reshape(w.shape), scale


def dequantize_int4_weight(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  """Inverse of :func:`quantize_int4_weight`: ``[K, N]`` in ``dtype``."""
  k, n = codes.shape
  g = k // scales.shape[0]
  w = codes.astype(jnp.float32).reshape(k // g, g, n) * scales.astype(jnp.float32)[:, None, :]
  return w.reshape(k, n).astype(dtype)


def fake_int4_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> Array:
  """``dequantize(quantize(w))`` for INT4 g``group_size`` weights, in ``w.dtype``."""
  codes, scales = quantize_int4_weight(w, group_size, scale_dtype)
  return dequantize_int4_weight(codes, scales, w.dtype)


# ----------------------------------------------------------------------------- INT4 activations
def quantize_int4_act(x: Array, group_size: int = 64, unsigned: bool = False,
                      scale_dtype: Any = None) -> tuple[Array, Array]:
  """Dynamic per-token, per-group INT4 activation quantization.

  Args:
    x: activations ``[..., K]``. For ``unsigned=True`` the caller has already added
      :data:`GELU_SHIFT` (the values must be >= 0; negatives clip to 0).
    group_size: channels per scale (64).
    unsigned: quantize to [0, 15] with ``scale = absmax / 15`` instead of [-7, 7].
    scale_dtype: storage dtype of the scales (default ``x.dtype``).

  Returns:
    ``(codes int8 [..., K], scales [..., K // G])``.
  """
  scale_dtype = x.dtype if scale_dtype is None else scale_dtype
  g = _group_act(x, group_size)
  qmax = UINT4_MAX if unsigned else INT4_MAX
  scale = (jnp.max(jnp.abs(g), axis=-1) / qmax).astype(scale_dtype)
  q = jnp.round(g / _safe(scale.astype(jnp.float32))[..., None])
  q = jnp.clip(q, 0 if unsigned else -INT4_MAX, qmax)
  return q.astype(jnp.int8).reshape(x.shape), scale


def dequantize_act(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  """Inverse of the per-group activation quantizers (INT4/INT8 codes, ``[..., K]``)."""
  k = codes.shape[-1]
  g = k // scales.shape[-1]
  x = codes.astype(jnp.float32).reshape(*codes.shape[:-1], k // g, g) * scales.astype(jnp.float32)[..., None]
  return x.reshape(codes.shape).astype(dtype)


def fake_int4_act(x: Array, group_size: int = 64, unsigned: bool = False) -> Array:
  """``dequantize(quantize(x))`` for dynamic INT4 activations, in ``x.dtype``."""
  codes, scales = quantize_int4_act(x, group_size, unsigned)
  return dequantize_act(codes, scales, x.dtype)


# ----------------------------------------------------------------------------- NVFP4
def _e2m1_encode(v: Array) -> Array:
  """f32 values (already scaled to [-6, 6]) -> 4-bit E2M1 codes (round to nearest, ties even)."""
  mag = jnp.abs(v).astype(jnp.float4_e2m1fn).astype(jnp.float32)
  idx = jnp.searchsorted(jnp.asarray(E2M1_VALUES), mag).astype(jnp.uint8)
  sign = (v < 0) & (idx > 0)
  return idx | (sign.astype(jnp.uint8) << 3)


def e2m1_decode(codes: Array) -> Array:
  """4-bit E2M1 codes -> float32 values."""
  mag = jnp.asarray(E2M1_VALUES)[(codes & 7).astype(jnp.int32)]
  return jnp.where((codes & 8) != 0, -mag, mag)


def _fp8_scale(s: Array) -> Array:
  return jnp.minimum(s, FP8_E4M3_MAX).astype(jnp.float8_e4m3fn)


@dataclasses.dataclass(frozen=True)
class NVFP4Weight:
  """Real NVFP4 weight: E2M1 codes with two-level scales (spec §1.4).

  Attributes:
    codes: ``uint8 [K, N]`` E2M1 codes.
    scales: ``float8_e4m3fn [K // 16, N]`` micro-scales.
    tensor_scale: ``float32 []`` per-tensor scale; effective scale = tensor_scale * scales.
  """
  codes: Array
  scales: Array
  tensor_scale: Array


jax.tree_util.register_dataclass(NVFP4Weight, data_fields=["codes", "scales", "tensor_scale"], meta_fields=[])


def quantize_nvfp4_weight(w: Array, group_size: int = 16, tensor_scale_dtype: Any = jnp.bfloat16) -> NVFP4Weight:
  """NVFP4 weights: ``s_g = absmax_16 / 6``, ``s_t = max(s_g) / 448`` (rounded to
  ``tensor_scale_dtype``), ``s_16 = fp8_e4m3(s_g / s_t)``, codes = E2M1(w / (s_t * s_16)).
  """
  g = _group_weight(w, group_size)
  s_g = jnp.max(jnp.abs(g), axis=1) / FP4_MAX
  s_t = (jnp.max(s_g) / FP8_E4M3_MAX).astype(tensor_scale_dtype).astype(jnp.float32)
  s_16 = _fp8_scale(s_g / _safe(s_t))
  eff = s_t * s_16.astype(jnp.float32)
  codes = _e2m1_encode(jnp.clip(g / _safe(eff)[:, None, :], -FP4_MAX, FP4_MAX))
  return NVFP4Weight(codes.reshape(w.shape), s_16, s_t)


def dequantize_nvfp4_weight(q: NVFP4Weight, dtype: Any = jnp.float32) -> Array:
  k, n = q.codes.shape
  g = k // q.scales.shape[0]
  eff = q.tensor_scale * q.scales.astype(jnp.float32)
  w = e2m1_decode(q.codes).reshape(k // g, g, n) * eff[:, None, :]
  return w.reshape(k, n).astype(dtype)


def fake_nvfp4_weight(w: Array, group_size: int = 16) -> Array:
  return dequantize_nvfp4_weight(quantize_nvfp4_weight(w, group_size), w.dtype)


def quantize_nvfp4_act(x: Array, group_size: int = 16) -> tuple[Array, Array]:
  """Dynamic NVFP4 activations: per token per 16 channels, ``scale = fp8(absmax / 6)``
  (clamped to 448), no per-tensor scale.

  Returns:
    ``(codes uint8 [..., K], scales float8_e4m3fn [..., K // 16])``.
  """
  g = _group_act(x, group_size)
  scale = _fp8_scale(jnp.max(jnp.abs(g), axis=-1) / FP4_MAX)
  codes = _e2m1_encode(jnp.clip(g / _safe(scale.astype(jnp.float32))[..., None], -FP4_MAX, FP4_MAX))
  return codes.reshape(x.shape), scale


def dequantize_nvfp4_act(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  k = codes.shape[-1]
  g = k // scales.shape[-1]
  x = e2m1_decode(codes).reshape(*codes.shape[:-1], k // g, g) * scales.astype(jnp.float32)[..., None]
  return x.reshape(codes.shape).astype(dtype)


def fake_nvfp4_act(x: Array, group_size: int = 16) -> Array:
  codes, scales = quantize_nvfp4_act(x, group_size)
  return dequantize_nvfp4_act(codes, scales, x.dtype)


# ----------------------------------------------------------------------------- INT8 (W8A8)
def quantize_int8_weight(w: Array, scale_dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Per-output-channel symmetric INT8: ``codes int8 [K, N]``, ``scales [N]`` (absmax / 127)."""
  wf = w.astype(jnp.float32)
  scale = (jnp.max(jnp.abs(wf), axis=0) / INT8_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(wf / _safe(scale.astype(jnp.float32))), -INT8_MAX, INT8_MAX)
  return codes.astype(jnp.int8), scale


def quantize_int8_act(x: Array, scale_dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Dynamic per-token symmetric INT8: ``codes int8 [..., K]``, ``scales [..., 1]``."""
  xf = x.astype(jnp.float32)
  scale = (jnp.max(jnp.abs(xf), axis=-1, keepdims=True) / INT8_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(xf / _safe(scale.astype(jnp.float32))), -INT8_MAX, INT8_MAX)
  return codes.astype(jnp.int8), scale


def fake_int8_weight(w: Array) -> Array:
  codes, scale = quantize_int8_weight(w)
  return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(w.dtype)


def fake_int8_act(x: Array) -> Array:
  codes, scale = quantize_int8_act(x)
  return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- NF4 (W4A16)
def quantize_nf4_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> tuple[Array, Array]:
  """NF4 weight-only quantization: per-group absmax scale, nearest NF4 code.

  Returns:
    ``(codes uint8 [K, N] in [0, 15], scales [K // G, N])``.
  """
  scale_dtype = w.dtype if scale_dtype is None else scale_dtype
  g = _group_weight(w, group_size)
  scale = jnp.max(jnp.abs(g), axis=1).astype(scale_dtype)
  v = g / _safe(scale.astype(jnp.float32))[:, None, :]
  table = jnp.asarray(NF4_VALUES)
  codes = jnp.argmin(jnp.abs(v[..., None] - table), axis=-1).astype(jnp.uint8)
  return codes.reshape(w.shape), scale


def dequantize_nf4_weight(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  k, n = codes.shape
  g = k // scales.shape[0]
  w = jnp.asarray(NF4_VALUES)[codes.astype(jnp.int32)].reshape(k // g, g, n)
  return (w * scales.astype(jnp.float32)[:, None, :]).reshape(k, n).astype(dtype)


def fake_nf4_weight(w: Array, group_size: int = 64) -> Array:
  codes, scales = quantize_nf4_weight(w, group_size)
  return dequantize_nf4_weight(codes, scales, w.dtype)


# ----------------------------------------------------------------------------- dispatch
WEIGHT_FORMATS = ("int4", "nvfp4", "int8", "nf4")
ACT_FORMATS = ("int4", "nvfp4", "int8", None)


@dataclasses.dataclass(frozen=True)
class QuantFormat:
  """A W/A quantization format.

  Attributes:
    weight: one of :data:`WEIGHT_FORMATS`.
    act: one of :data:`ACT_FORMATS` (``None``: weight-only, activations stay 16-bit).
    group_size: weight and activation group size (64 INT4, 16 NVFP4; ignored for INT8).
  """
  weight: str = "int4"
  act: str | None = "int4"
  group_size: int = 64

  def __post_init__(self):
    if self.weight not in WEIGHT_FORMATS:
      raise ValueError(f"unknown weight format {self.weight!r}; expected one of {WEIGHT_FORMATS}")
    if self.act not in ACT_FORMATS:
      raise ValueError(f"unknown activation format {self.act!r}; expected one of {ACT_FORMATS}")


INT4 = QuantFormat("int4", "int4", 64)
NVFP4 = QuantFormat("nvfp4", "nvfp4", 16)
W8A8 = QuantFormat("int8", "int8", 0)
W4A16_INT4 = QuantFormat("int4", None, 64)
W4A16_NF4 = QuantFormat("nf4", None, 64)
FORMATS = {"int4": INT4, "nvfp4": NVFP4, "w8a8": W8A8, "w4a16": W4A16_INT4, "nf4": W4A16_NF4}


def fake_quant_weight(w: Array, fmt: QuantFormat) -> Array:
  """Fake-quantizes a kernel ``[K, N]`` in format ``fmt`` (dtype preserved)."""
  if fmt.weight == "int4":
    return fake_int4_weight(w, fmt.group_size)
  if fmt.weight == "nvfp4":
    return fake_nvfp4_weight(w, fmt.group_size)
  if fmt.weight == "int8":
    return fake_int8_weight(w)
  return fake_nf4_weight(w, fmt.group_size)


def fake_quant_act(x: Array, fmt: QuantFormat, unsigned: bool = False) -> Array:
  """Fake-quantizes activations ``[..., K]`` in format ``fmt`` (identity when weight-only).

  ``unsigned`` selects the [0, 15] INT4 quantizer for shifted GELU outputs; it is ignored by
  the other formats (Nunchaku shifts only in the INT4 path).
  """
  if fmt.act is None:
    return x
  if fmt.act == "int4":
    return fake_int4_act(x, fmt.group_size, unsigned)
  if fmt.act == "nvfp4":
    return fake_nvfp4_act(x, fmt.group_size)
  return fake_int8_act(x)
