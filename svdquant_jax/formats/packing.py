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
``QuantizedLinear`` holds one linear layer ``y = Qa(x/λ + δ)·Qw(R) + (x·lora_down)·lora_up +
b_eff`` (``docs/design.md``):

=============  ===============================  ============================================
field          shape / dtype                    meaning
=============  ===============================  ============================================
``qweight``    ``uint8 [N, K/2]`` (int4, nvfp4)  packed codes of the residual ``Qw(R)``;
               ``int8 [N, K]`` (int8)            int8: plain codes, K-major
``wscales``    ``[K/G, N]``                      int4: model dtype; nvfp4: ``float8_e4m3fn``
                                                 micro-scales; int8: ``[1, N]`` model dtype
``wtscale``    ``float32 [1]`` or ``None``       nvfp4 per-tensor scale (``None`` otherwise)
``smooth``     ``[K]`` model dtype               λ, the input divisor
``lora_down``  ``[K, r]`` model dtype            ``diag(1/λ)·A`` (reads the raw x)
``lora_up``    ``[r, N]`` model dtype            ``B``
``bias``       ``[N]`` model dtype or ``None``   ``b_eff = b - δ·1ᵀQw(R)``
=============  ===============================  ============================================

Static (pytree metadata) fields: ``fmt`` (``"int4"``, ``"nvfp4"``, ``"int8"``),
``group_size`` (64, 16, K) and ``shift`` (δ; 0.171875 for the unsigned fc2 input, INT4 only).
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
  """Packs 4-bit codes along the last axis in the split-half nibble order.

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
  nib = jnp.concatenate([p & 0xF, (p >> 4) & 0xF], axis=-2)
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
  fmt: str = "int4"
  group_size: int = 64
  shift: float = 0.0

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
    else:
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

  # ---------------------------------------------------------------- views used by references and tests
  def weight_codes(self) -> Array:
    """The residual's codes in the Flax orientation ``[K, N]``: int8 (int4, int8) or uint8 (nvfp4)."""
    if self.fmt == "int8":
      return self.qweight.T
    return unpack(self.qweight, layout="KN", signed=self.fmt == "int4")

  def dequantized_weight(self) -> Array:
    """``Qw(R)`` as ``float32 [K, N]``."""
    return _dequantized_weight(self)

  def replace(self, **changes: Any) -> QuantizedLinear:
    return dataclasses.replace(self, **changes)


jax.tree_util.register_dataclass(
    QuantizedLinear,
    data_fields=["qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wtscale"],
    meta_fields=["fmt", "group_size", "shift"])


@jax.jit
def _dequantized_weight(p: QuantizedLinear) -> Array:
  codes = p.weight_codes()
  if p.fmt == "int4":
    return q.dequantize_int4_weight(codes, p.wscales, jnp.float32)
  if p.fmt == "nvfp4":
    return q.dequantize_nvfp4_weight(q.NVFP4Weight(codes, p.wscales, p.wtscale.reshape(())), jnp.float32)
  return codes.astype(jnp.float32) * p.wscales.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "dtype"))
def _quantize_residual(residual: Array, *, fmt: str, group_size: int, dtype: Any) -> tuple[Array, Array, Array | None]:
  """The quantizers' real form of a float residual ``[K, N]``: (codes, scales, tensor scale)."""
  if fmt == "int4":
    codes, scales = q.quantize_int4_weight(residual, group_size, scale_dtype=dtype)
    return codes, scales, None
  if fmt == "nvfp4":
    w = q.quantize_nvfp4_weight(residual, group_size)
    return w.codes, w.scales, w.tensor_scale
  codes, scales = q.quantize_int8_weight(residual, scale_dtype=dtype)
  return codes, scales, None


# ----------------------------------------------------------------------------- constructors
def _float(x: Any) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


def from_components(smooth: Array, lora_down_s: Array, lora_up: Array, bias: Array | None = None, *,
                    residual: Array | None = None, codes: Array | None = None, scales: Array | None = None,
                    tensor_scale: Array | None = None, fmt: str = "int4", shift: float = 0.0,
                    group_size: int | None = None, dtype: Any = None) -> QuantizedLinear:
  """Builds a :class:`QuantizedLinear` from float pieces and a residual (float or already quantized).

  To deploy a layer calibrated by ``svdquant_jax.quant`` (an ``SVDQuantWeights``), use
  :func:`svdquant_jax.quant.deploy.to_quantized_linear`: it packs the codes the calibration chose
  (GPTQ's ``residual_q`` when set) with the calibration's scales. ``residual=`` here quantizes the
  float residual again with round-to-nearest, which silently replaces GPTQ's codes (and uses
  scales in ``dtype``, not ``QuantFormat.scale_dtype``): what runs is then not what was calibrated.

  Args:
    smooth: λ ``[K]``.
    lora_down_s: ``A [K, r]``, the low-rank down factor in the *smoothed* space (``L = A B``
      approximates ``diag(λ) W``); ``1/λ`` is folded in here.
    lora_up: ``B [r, N]``.
    bias: the layer's bias ``b [N]`` or ``None``.
    residual: the float residual ``R = diag(λ) W - A B`` ``[K, N]``, quantized here by RTN with
      :mod:`svdquant_jax.formats.quantizers` (scales in ``dtype``). Mutually exclusive with
      ``codes``/``scales``.
    codes, scales, tensor_scale: an already quantized residual in the quantizers' form:
      int4 ``int8 [K, N]`` + ``[K/G, N]``; nvfp4 ``uint8 [K, N]`` + ``float8 [K/16, N]`` +
      tensor scale (scalar or [1]); int8 ``int8 [K, N]`` + ``[N]`` or ``[1, N]``.
    fmt: ``"int4"``, ``"nvfp4"`` or ``"int8"``.
    shift: δ; ``quantizers.GELU_SHIFT`` for the unsigned fc2 input (int4 only), else 0.
    group_size: int4 weight group (default 64); fixed 16 for nvfp4 and K for int8.
    dtype: model dtype of smooth / lora / bias / int scales (default ``lora_up.dtype``).

  Returns:
    A validated :class:`QuantizedLinear`; its bias is ``b - δ·1ᵀQw(R)`` (``None`` when there
    is neither a bias nor a shift).
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
  if fmt == "int4":
    qweight = pack(codes, layout="KN", signed=True)
    wscales = jnp.asarray(scales)
  elif fmt == "nvfp4":
    if tensor_scale is None:
      raise QuantizedLinearError("from_components: nvfp4 codes need `tensor_scale`")
    qweight = pack(codes, layout="KN", signed=False)
    wscales = jnp.asarray(scales)
    wtscale = jnp.asarray(tensor_scale, jnp.float32).reshape(1)
  else:
    if codes.dtype != jnp.int8:
      raise QuantizedLinearError(f"from_components: int8 codes must be int8, got {codes.dtype}")
    qweight = codes.T
    wscales = jnp.asarray(scales).reshape(1, -1)
  if fmt != "nvfp4":
    wscales = wscales.astype(dtype)

  lora_down = (_float(lora_down_s) / _float(smooth)[:, None]).astype(dtype)
  partial = QuantizedLinear(qweight=qweight, wscales=wscales, smooth=smooth.astype(dtype), lora_down=lora_down,
                            lora_up=jnp.asarray(lora_up).astype(dtype), bias=None, wtscale=wtscale, fmt=fmt,
                            group_size=g, shift=float(shift))
  partial.validate()
  b_eff = None
  if shift:
    b_eff = -float(shift) * jnp.sum(partial.dequantized_weight(), axis=0)
  if bias is not None:
    b = _float(bias)
    b_eff = b if b_eff is None else b + b_eff
  out = partial.replace(bias=None if b_eff is None else b_eff.astype(dtype))
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
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) < 1:
    raise QuantizedLinearError(f"svdquant_linear: x must be an array [..., K], got {type(x).__name__} {shape}")
  if shape[-1] != params.in_features:
    raise QuantizedLinearError(f"svdquant_linear: x has {shape[-1]} input features (shape {tuple(shape)}), the "
                               f"params expect K={params.in_features}")
  if jnp.dtype(x.dtype) not in ACT_DTYPES:
    raise QuantizedLinearError(f"svdquant_linear: x dtype {x.dtype} is not one of "
                               f"{[d.name for d in ACT_DTYPES]}")
