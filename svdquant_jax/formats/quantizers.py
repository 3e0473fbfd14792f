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
  * Weight scales are computed in float32, rounded to their storage dtype, and the codes are
    computed with the *rounded* scale, so ``codes * scale`` reproduces the fake form exactly.
  * Activation quantizers compute what the Nunchaku engine computes (``docs/quantization.md``,
    "Activation quantizers"): scale ``s = absmax · fl(1/qmax)`` in float32, codes
    ``rint(x · fl(1/s))`` with the reciprocal of the *unrounded* scale, dequantization with ``s``
    rounded to its storage dtype (INT4: the model dtype; NVFP4: fp8 e4m3).
  * Rounding is round-half-to-even (``jnp.round``), as ``torch.round`` in deepcompressor and
    ``cvt.rni`` in the engine.
  * A zero scale (all-zero group, or an NVFP4 micro-scale that underflows fp8) gives code 0.
  * :class:`QuantFormat` names a W/A format; ``fake_quant_weight`` / ``fake_quant_act`` dispatch on
    it, and :class:`QuantizedWeight` with ``quantize_weight`` / ``quantize_weight_with_scales`` /
    ``dequantize_weight`` is the format-generic real weight form (used by GPTQ, whose scales are
    fixed before the codes are chosen).

K not divisible by the group size is refused with a :class:`QuantizationError` (a ``ValueError``;
we do not pad: padding changes the layer and must be the caller's explicit choice).

Reference: deepcompressor ``quantizer/impl`` with the configs ``svdquant/int4.yaml`` and
``svdquant/nvfp4.yaml`` (NVFP4 two-level scales), summarized in ``docs/quantization.md``
("Quantizers", "deepcompressor's recipe"); NF4 from QLoRA (Dettmers et al. 2023, Appendix E).
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


class QuantizationError(ValueError):
  """Bad input to a quantizer or a quantization transform (the message names the argument/layer)."""


def _check_groups(k: int, group_size: int, what: str) -> None:
  if group_size <= 0:
    raise QuantizationError(f"group_size must be positive, got {group_size}")
  if k % group_size:
    raise QuantizationError(f"{what}: input dimension K={k} is not divisible by the group size {group_size}; "
                            "pad K to a multiple of the group size or keep this layer in 16-bit")


def _split(v: Array) -> tuple[Array, Array]:
  """Veltkamp split of float32 ``v`` into ``hi + lo`` with 12-bit halves (products of halves are exact).

  The product is materialized behind an optimization barrier so that no backend contracts
  ``c - v`` into an FMA (which would break the split)."""
  c = jax.lax.optimization_barrier(v * 4097.0)
  hi = c - (c - v)
  return hi, v - hi


def true_divide(a: Array, b: Array) -> Array:
  """Correctly rounded float32 ``a / b`` (``b`` finite and nonzero; broadcasting as ``/``).

  XLA:CPU lowers a division to a multiply by the reciprocal (up to 1 ulp off the IEEE quotient),
  which would move scales and round-half-to-even ties away from torch's. One Newton correction
  with the exact residual ``a - q b`` (Dekker's product) restores the IEEE result; where the
  backend divides exactly (GPU) the correction is a no-op.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  q = a / b
  # p = fl(q b) materialized: an FMA contraction of ``a - q b`` would double-count its error.
  p = jax.lax.optimization_barrier(q * b)
  qh, ql = _split(q)
  bh, bl = _split(b)
  err = ((qh * bh - p) + qh * bl + ql * bh) + ql * bl  # q * b = p + err exactly
  corrected = q + ((a - p) - err) / b
  return jnp.where(jnp.isfinite(corrected), corrected, q)


_true_divide = true_divide  # the name used before it became public


def _divide(values: Array, scale: Array) -> Array:
  """``values / scale`` with 0 where the scale is 0 (all-zero groups, or fp8 scale underflow)."""
  zero = scale == 0
  return jnp.where(zero, 0.0, true_divide(values, jnp.where(zero, 1.0, scale)))


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
  scale = true_divide(jnp.max(jnp.abs(g), axis=1), INT4_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(_divide(g, scale.astype(jnp.float32)[:, None, :])), -INT4_MAX, INT4_MAX)
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
def _inverse_qmax(qmax: float) -> Array:
  """``fl(1/qmax)``: the float32 constant the engine multiplies the absmax by."""
  return jnp.asarray(np.float32(1) / np.float32(qmax))


def reciprocal(s: Array) -> Array:
  """Correctly rounded float32 ``1/s`` of a non-negative scale; 0 where ``s`` is 0 (or so small
  that ``1/s`` overflows), so that an all-zero group gets codes 0."""
  s = jnp.asarray(s, jnp.float32)
  ok = s > 0
  r = true_divide(jnp.ones_like(s), jnp.where(ok, s, 1.0))
  return jnp.where(ok & jnp.isfinite(r), r, 0.0)


def quantize_int4_act(x: Array, group_size: int = 64, unsigned: bool = False,
                      scale_dtype: Any = None) -> tuple[Array, Array]:
  """Dynamic per-token, per-group INT4 activation quantization (the engine's quantizer).

  Per group: ``s = absmax · fl(1/qmax)`` in float32 (qmax 7, or 15 unsigned), codes
  ``clip(rint(x · fl(1/s)))`` (reciprocal of the unrounded ``s``; saturated to [-8, 7] or
  [0, 15]), returned scale ``s`` rounded to ``scale_dtype``.

  Args:
    x: activations ``[..., K]``. For ``unsigned=True`` the caller has already added
      :data:`GELU_SHIFT` and divided by λ (the values must be >= 0; negatives clip to 0).
    group_size: channels per scale (64).
    unsigned: quantize to [0, 15] with ``absmax / 15`` instead of [-7, 7].
    scale_dtype: storage dtype of the scales (default ``x.dtype``).

  Returns:
    ``(codes int8 [..., K], scales [..., K // G])``.
  """
  scale_dtype = x.dtype if scale_dtype is None else scale_dtype
  g = _group_act(x, group_size)
  qmax = UINT4_MAX if unsigned else INT4_MAX
  s = jnp.max(jnp.abs(g), axis=-1) * _inverse_qmax(qmax)
  q = jnp.round(g * reciprocal(s)[..., None])
  q = jnp.clip(q, 0 if unsigned else -INT4_MAX - 1, qmax)
  return q.astype(jnp.int8).reshape(x.shape), s.astype(scale_dtype)


def dequantize_act(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  """Inverse of the per-group activation quantizers (INT4/INT8 codes, ``[..., K]``)."""
  k = codes.shape[-1]
  g = k // scales.shape[-1]
  x = codes.astype(jnp.float32).reshape(*codes.shape[:-1], k // g, g) * scales.astype(jnp.float32)[..., None]
  return x.reshape(codes.shape).astype(dtype)


def fake_int4_act(x: Array, group_size: int = 64, unsigned: bool = False, scale_dtype: Any = None) -> Array:
  """``dequantize(quantize(x))`` for dynamic INT4 activations, in ``x.dtype``."""
  codes, scales = quantize_int4_act(x, group_size, unsigned, scale_dtype)
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
  """Real NVFP4 weight: E2M1 codes with two-level scales (``docs/quantization.md``, "Quantizers").

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
  ``tensor_scale_dtype``, the model dtype, *before* the micro-scales are formed, so that the
  deployed per-tensor scale is exactly representable there), ``s_16 = fp8_e4m3(s_g / s_t)``,
  codes = E2M1(w / (s_t * s_16)).
  """
  g = _group_weight(w, group_size)
  s_g = true_divide(jnp.max(jnp.abs(g), axis=1), FP4_MAX)
  s_t = true_divide(jnp.max(s_g), FP8_E4M3_MAX).astype(tensor_scale_dtype).astype(jnp.float32)
  s_16 = _fp8_scale(_divide(s_g, s_t))
  eff = s_t * s_16.astype(jnp.float32)
  # A micro-scale that underflows fp8 dequantizes its whole group to 0: its codes are 0 too.
  codes = _e2m1_encode(jnp.clip(_divide(g, eff[:, None, :]), -FP4_MAX, FP4_MAX))
  return NVFP4Weight(codes.reshape(w.shape), s_16, s_t)


def dequantize_nvfp4_weight(q: NVFP4Weight, dtype: Any = jnp.float32) -> Array:
  k, n = q.codes.shape
  g = k // q.scales.shape[0]
  eff = q.tensor_scale * q.scales.astype(jnp.float32)
  w = e2m1_decode(q.codes).reshape(k // g, g, n) * eff[:, None, :]
  return w.reshape(k, n).astype(dtype)


def fake_nvfp4_weight(w: Array, group_size: int = 16, tensor_scale_dtype: Any = jnp.bfloat16) -> Array:
  return dequantize_nvfp4_weight(quantize_nvfp4_weight(w, group_size, tensor_scale_dtype), w.dtype)


def quantize_nvfp4_act(x: Array, group_size: int = 16) -> tuple[Array, Array]:
  """Dynamic NVFP4 activations (the engine's quantizer), per token per 16 channels:
  ``s = min(absmax · fl(1/6), 448)`` in float32, codes = E2M1 (round to nearest even,
  saturating at ±6) of ``x · fl(1/s)`` with the unrounded ``s``, scale stored as ``fp8_e4m3(s)``
  (round to nearest even). No per-tensor scale.

  Returns:
    ``(codes uint8 [..., K], scales float8_e4m3fn [..., K // 16])``.
  """
  g = _group_act(x, group_size)
  s = jnp.minimum(jnp.max(jnp.abs(g), axis=-1) * _inverse_qmax(FP4_MAX), FP8_E4M3_MAX)
  codes = _e2m1_encode(jnp.clip(g * reciprocal(s)[..., None], -FP4_MAX, FP4_MAX))
  return codes.reshape(x.shape), _fp8_scale(s)


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
  scale = true_divide(jnp.max(jnp.abs(wf), axis=0), INT8_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(_divide(wf, scale.astype(jnp.float32))), -INT8_MAX, INT8_MAX)
  return codes.astype(jnp.int8), scale


def quantize_int8_act(x: Array, scale_dtype: Any = jnp.float32) -> tuple[Array, Array]:
  """Dynamic per-token symmetric INT8: ``codes int8 [..., K]``, ``scales [..., 1]``."""
  xf = x.astype(jnp.float32)
  scale = true_divide(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), INT8_MAX).astype(scale_dtype)
  codes = jnp.clip(jnp.round(_divide(xf, scale.astype(jnp.float32))), -INT8_MAX, INT8_MAX)
  return codes.astype(jnp.int8), scale


def fake_int8_weight(w: Array, scale_dtype: Any = jnp.float32) -> Array:
  codes, scale = quantize_int8_weight(w, scale_dtype)
  return (codes.astype(jnp.float32) * scale.astype(jnp.float32)).astype(w.dtype)


def fake_int8_act(x: Array, scale_dtype: Any = jnp.float32) -> Array:
  codes, scale = quantize_int8_act(x, scale_dtype)
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
  v = _divide(g, scale.astype(jnp.float32)[:, None, :])
  table = jnp.asarray(NF4_VALUES)
  codes = jnp.argmin(jnp.abs(v[..., None] - table), axis=-1).astype(jnp.uint8)
  return codes.reshape(w.shape), scale


def dequantize_nf4_weight(codes: Array, scales: Array, dtype: Any = jnp.float32) -> Array:
  k, n = codes.shape
  g = k // scales.shape[0]
  w = jnp.asarray(NF4_VALUES)[codes.astype(jnp.int32)].reshape(k // g, g, n)
  return (w * scales.astype(jnp.float32)[:, None, :]).reshape(k, n).astype(dtype)


def fake_nf4_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> Array:
  codes, scales = quantize_nf4_weight(w, group_size, scale_dtype)
  return dequantize_nf4_weight(codes, scales, w.dtype)


# ----------------------------------------------------------------------------- INT4 weight-only (AWQ form)
def awq_zeros(scales: Array) -> Array:
  """Zero points of symmetric INT4 in the engine's unsigned form: ``z = -dtype(7 · s)`` (the
  product in float32, then one rounding to the scales' dtype; not always exactly ``-7 s``)."""
  return (-(jnp.float32(INT4_MAX) * scales.astype(jnp.float32))).astype(scales.dtype)


def quantize_awq_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> tuple[Array, Array, Array]:
  """Weight-only INT4 as the engine's W4A16 (AWQ) layers hold it: symmetric RTN codes
  ``q in [-7, 7]`` with ``s = absmax / 7`` (:func:`quantize_int4_weight`), stored unsigned
  ``u = q + 7`` with zero points :func:`awq_zeros`.

  Returns:
    ``(u uint8 [K, N] in [0, 14], scales [K // G, N], zeros [K // G, N])`` (scales and zeros in
    ``scale_dtype``, default ``w.dtype``).
  """
  codes, scales = quantize_int4_weight(w, group_size, scale_dtype)
  return (codes + INT4_MAX).astype(jnp.uint8), scales, awq_zeros(scales)


def dequantize_awq_weight(u: Array, scales: Array, zeros: Array, dtype: Any = jnp.float32) -> Array:
  """``w = u · s + z`` per group, in float32, then one rounding to ``dtype``: ``[K, N]``.

  With 16-bit scales ``u · s`` is exact in float32, so this is the engine's single-rounding
  fused multiply-add into the activation dtype whenever ``u · s + z`` is exact in float32 (always
  for the zeros :func:`awq_zeros` makes).
  """
  k, n = u.shape
  g = k // scales.shape[0]
  v = u.astype(jnp.float32).reshape(k // g, g, n)
  w = v * scales.astype(jnp.float32)[:, None, :] + zeros.astype(jnp.float32)[:, None, :]
  return w.reshape(k, n).astype(dtype)


def fake_awq_weight(w: Array, group_size: int = 64, scale_dtype: Any = None) -> Array:
  """``dequantize(quantize(w))`` of weight-only INT4 in the AWQ form, in ``w.dtype``."""
  return dequantize_awq_weight(*quantize_awq_weight(w, group_size, scale_dtype), w.dtype)


# ----------------------------------------------------------------------------- dispatch
WEIGHT_FORMATS = ("int4", "nvfp4", "int8", "nf4")
ACT_FORMATS = ("int4", "nvfp4", "int8", None)
SCALE_DTYPES = (None, "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QuantFormat:
  """A W/A quantization format (hashable: usable as a static ``jax.jit`` argument).

  Attributes:
    weight: one of :data:`WEIGHT_FORMATS`.
    act: one of :data:`ACT_FORMATS` (``None``: weight-only, activations stay 16-bit).
    group_size: weight and activation group size along K (64 INT4, 16 NVFP4; ignored for INT8,
      whose weights are per output channel and activations per token).
    scale_dtype: storage dtype of the INT4 / NF4 / INT8 weight scales and of the INT4 / INT8
      activation scales (``"bfloat16"`` for FLUX, ``"float16"`` for PixArt, as the deployed model
      stores them); ``None`` keeps each quantizer's default (the dtype of the quantized tensor;
      float32 for INT8). NVFP4 scales are always fp8 e4m3 (+ a bf16 per-tensor weight scale).
  """
  weight: str = "int4"
  act: str | None = "int4"
  group_size: int = 64
  scale_dtype: str | None = None

  def __post_init__(self):
    if self.weight not in WEIGHT_FORMATS:
      raise QuantizationError(f"unknown weight format {self.weight!r}; expected one of {WEIGHT_FORMATS}")
    if self.act not in ACT_FORMATS:
      raise QuantizationError(f"unknown activation format {self.act!r}; expected one of {ACT_FORMATS}")
    if self.scale_dtype not in SCALE_DTYPES:
      raise QuantizationError(f"unknown scale_dtype {self.scale_dtype!r}; expected one of {SCALE_DTYPES}")
    if self.uses_groups and self.group_size <= 0:
      raise QuantizationError(f"format {self.weight}/{self.act} needs a positive group_size, got {self.group_size}")

  @property
  def uses_groups(self) -> bool:
    """Whether weights or activations are quantized in groups of ``group_size`` along K."""
    return self.weight in ("int4", "nvfp4", "nf4") or self.act in ("int4", "nvfp4")

  def check_k(self, k: int, what: str) -> None:
    """Raises :class:`QuantizationError` naming ``what`` if K is not a multiple of the group size."""
    if self.uses_groups:
      _check_groups(k, self.group_size, what)


INT4 = QuantFormat("int4", "int4", 64)
NVFP4 = QuantFormat("nvfp4", "nvfp4", 16)
W8A8 = QuantFormat("int8", "int8", 0)
W4A16_INT4 = QuantFormat("int4", None, 64)
W4A16_NF4 = QuantFormat("nf4", None, 64)
FORMATS = {"int4": INT4, "nvfp4": NVFP4, "w8a8": W8A8, "w4a16": W4A16_INT4, "nf4": W4A16_NF4}


def _resolve_scale_dtype(fmt: QuantFormat, default: Any) -> Any:
  return default if fmt.scale_dtype is None else jnp.dtype(fmt.scale_dtype)


def tensor_scale_dtype(fmt: QuantFormat) -> Any:
  """Dtype the NVFP4 per-tensor weight scale is rounded to: ``fmt.scale_dtype`` (the model dtype)
  when set, else bfloat16."""
  return _resolve_scale_dtype(fmt, jnp.bfloat16)


def is_awq(fmt: QuantFormat) -> bool:
  """Weight-only INT4: stored and dequantized in the AWQ form ``u · s + z`` (``u = q + 7``)."""
  return fmt.weight == "int4" and fmt.act is None


def fake_quant_weight(w: Array, fmt: QuantFormat) -> Array:
  """Fake-quantizes a kernel ``[K, N]`` in format ``fmt`` (dtype preserved)."""
  if is_awq(fmt):
    return fake_awq_weight(w, fmt.group_size, _resolve_scale_dtype(fmt, None))
  if fmt.weight == "int4":
    return fake_int4_weight(w, fmt.group_size, _resolve_scale_dtype(fmt, None))
  if fmt.weight == "nvfp4":
    return fake_nvfp4_weight(w, fmt.group_size, tensor_scale_dtype(fmt))
  if fmt.weight == "int8":
    return fake_int8_weight(w, _resolve_scale_dtype(fmt, jnp.float32))
  return fake_nf4_weight(w, fmt.group_size, _resolve_scale_dtype(fmt, None))


def fake_quant_act(x: Array, fmt: QuantFormat, unsigned: bool = False) -> Array:
  """Fake-quantizes activations ``[..., K]`` in format ``fmt`` (identity when weight-only).

  ``unsigned`` selects the [0, 15] INT4 quantizer for shifted GELU outputs; it is ignored by
  the other formats (Nunchaku shifts only in the INT4 path).
  """
  if fmt.act is None:
    return x
  if fmt.act == "int4":
    return fake_int4_act(x, fmt.group_size, unsigned, _resolve_scale_dtype(fmt, None))
  if fmt.act == "nvfp4":
    return fake_nvfp4_act(x, fmt.group_size)
  return fake_int8_act(x, _resolve_scale_dtype(fmt, jnp.float32))


# ----------------------------------------------------------------------------- generic weight form
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedWeight:
  """The real form of a quantized kernel in any weight format (a pytree).

  ``dequantize = decode(codes) * scales[k // G] * tensor_scale`` for row k of K, where G is
  :func:`weight_group_size` (INT8: G = K, one scale per output channel).

  Attributes:
    codes: ``[K, N]``: ``int8`` for INT4 ([-7, 7]) and INT8 ([-127, 127]); ``uint8`` 4-bit codes
      for NVFP4 (E2M1 bit patterns) and NF4 (indices into :data:`NF4_VALUES`).
    scales: ``[K // G, N]`` group scales in their storage dtype (NVFP4: ``float8_e4m3fn``).
    tensor_scale: ``float32 []``: the NVFP4 per-tensor scale; 1 for the other formats.
  """
  codes: Array
  scales: Array
  tensor_scale: Array


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["codes", "scales", "tensor_scale"],
                                 meta_fields=[])


def weight_group_size(fmt: QuantFormat, k: int) -> int:
  """Rows of K that share one weight scale: K for INT8 (per output channel), else the group size."""
  return k if fmt.weight == "int8" else fmt.group_size


def weight_scales(w: Array, fmt: QuantFormat) -> tuple[Array, Array]:
  """The scales RTN uses for kernel ``w [K, N]``: ``(scales [K // G, N], tensor_scale f32 [])``.

  Identical to the scales of the per-format ``quantize_*_weight`` functions. GPTQ computes them
  once from the full residual and keeps them (static groups).
  """
  k, n = w.shape
  group = weight_group_size(fmt, k)
  g = _group_weight(w, group)
  absmax = jnp.max(jnp.abs(g), axis=1)
  one = jnp.ones((), jnp.float32)
  if fmt.weight == "int4":
    return true_divide(absmax, INT4_MAX).astype(_resolve_scale_dtype(fmt, w.dtype)), one
  if fmt.weight == "nf4":
    return absmax.astype(_resolve_scale_dtype(fmt, w.dtype)), one
  if fmt.weight == "int8":
    return true_divide(absmax, INT8_MAX).astype(_resolve_scale_dtype(fmt, jnp.float32)), one
  s_g = true_divide(absmax, FP4_MAX)
  s_t = true_divide(jnp.max(s_g), FP8_E4M3_MAX).astype(tensor_scale_dtype(fmt)).astype(jnp.float32)
  return _fp8_scale(_divide(s_g, s_t)), s_t


def encode_scaled(v: Array, fmt: QuantFormat) -> Array:
  """Codes for values already divided by their effective scale (round to nearest, ties to even;
  clipped to the format's range)."""
  if fmt.weight == "int4":
    return jnp.clip(jnp.round(v), -INT4_MAX, INT4_MAX).astype(jnp.int8)
  if fmt.weight == "int8":
    return jnp.clip(jnp.round(v), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  if fmt.weight == "nvfp4":
    return _e2m1_encode(jnp.clip(v, -FP4_MAX, FP4_MAX))
  return jnp.argmin(jnp.abs(v[..., None] - jnp.asarray(NF4_VALUES)), axis=-1).astype(jnp.uint8)


def decode_codes(codes: Array, fmt: QuantFormat) -> Array:
  """Codes -> float32 values in units of the effective scale."""
  if fmt.weight in ("int4", "int8"):
    return codes.astype(jnp.float32)
  if fmt.weight == "nvfp4":
    return e2m1_decode(codes)
  return jnp.asarray(NF4_VALUES)[codes.astype(jnp.int32)]


def effective_scales(scales: Array, tensor_scale: Array) -> Array:
  """``scales * tensor_scale`` in float32 (``[K // G, N]``)."""
  return scales.astype(jnp.float32) * tensor_scale.astype(jnp.float32)


def quantize_weight_with_scales(w: Array, scales: Array, tensor_scale: Array, fmt: QuantFormat) -> QuantizedWeight:
  """Codes of ``w [K, N]`` for given (static) scales; a zero effective scale gives code 0."""
  k, n = w.shape
  group = k // scales.shape[0]
  g = w.astype(jnp.float32).reshape(k // group, group, n)
  codes = encode_scaled(_divide(g, effective_scales(scales, tensor_scale)[:, None, :]), fmt)
  return QuantizedWeight(codes.reshape(k, n), scales, jnp.asarray(tensor_scale, jnp.float32))


def quantize_weight(w: Array, fmt: QuantFormat) -> QuantizedWeight:
  """RTN quantization of a kernel ``[K, N]`` in ``fmt`` (same codes and scales as the per-format
  ``quantize_*_weight`` functions)."""
  scales, tensor_scale = weight_scales(w, fmt)
  return quantize_weight_with_scales(w, scales, tensor_scale, fmt)


def dequantize_weight(q: QuantizedWeight, fmt: QuantFormat, dtype: Any = jnp.float32) -> Array:
  """``decode(codes) * effective scale`` as ``[K, N]`` in ``dtype`` (weight-only INT4: the AWQ form
  ``(q + 7) · s + awq_zeros(s)``)."""
  if is_awq(fmt):
    u = (q.codes.astype(jnp.int32) + INT4_MAX).astype(jnp.uint8)
    return dequantize_awq_weight(u, q.scales, awq_zeros(q.scales), dtype)
  k, n = q.codes.shape
  group = k // q.scales.shape[0]
  v = decode_codes(q.codes, fmt).reshape(k // group, group, n)
  return (v * effective_scales(q.scales, q.tensor_scale)[:, None, :]).reshape(k, n).astype(dtype)
