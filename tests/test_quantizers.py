"""Quantizers (svdquant_jax/quant/quantizers.py) against independent numpy implementations."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from svdquant_jax.formats import quantizers as qz

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _heavy(rng, shape, outliers=True):
  x = rng.standard_normal(shape)
  if outliers:
    x = x * np.exp(rng.standard_normal(shape[-1:]))  # per-channel scale spread
  return x.astype(np.float32)


# ----------------------------------------------------------------------------- numpy references
def np_int4_weight(w, group, scale_dtype=np.float32):
  k, n = w.shape
  g = w.astype(np.float64).reshape(k // group, group, n)
  scale = (np.abs(g).max(axis=1) / 7).astype(scale_dtype)
  s = scale.astype(np.float64)[:, None, :]
  ratio = np.divide(g, s, out=np.zeros_like(g), where=s != 0)
  return np.clip(np.round(ratio), -7, 7).reshape(k, n), scale, ratio.reshape(k, n)


def _np_reciprocal(s):
  """IEEE float32 1/s (numpy divides correctly rounded), 0 where s == 0 (all-zero group)."""
  with np.errstate(divide="ignore", over="ignore"):
    r = np.float32(1) / s
  return np.where((s > 0) & np.isfinite(r), r, np.float32(0)).astype(np.float32)


def np_int4_act(x, group, unsigned=False, scale_dtype=np.float32):
  """The engine's INT4 activation quantizer (spec §3.1) in numpy float32: ``s = absmax · fl(1/qmax)``,
  codes ``sat(rint(x · fl(1/s)))`` in [-8, 7] / [0, 15], scale returned rounded to ``scale_dtype``."""
  g = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
  qmax = 15 if unsigned else 7
  s = np.abs(g).max(axis=-1) * (np.float32(1) / np.float32(qmax))
  assert s.dtype == np.float32
  v = g * _np_reciprocal(s)[..., None]
  codes = np.clip(np.rint(v), 0 if unsigned else -8, qmax)
  return codes.reshape(x.shape).astype(np.int8), s.astype(scale_dtype), v.reshape(x.shape)


def np_e2m1_code(v):
  """Nearest E2M1 value to each entry of v (|v| <= 6), ties to the even (mantissa 0) code."""
  mag = np.abs(v)[..., None]
  dist = np.abs(mag - E2M1)
  best = dist.min(axis=-1, keepdims=True)
  candidates = np.where(dist == best, np.arange(8), 99)
  even = np.where(candidates % 2 == 0, candidates, 99).min(axis=-1)
  idx = np.where(even < 99, even, candidates.min(axis=-1))
  sign = (v < 0) & (idx > 0)
  return (idx | (sign.astype(np.int64) << 3)).astype(np.uint8)


def np_e2m1_value(codes):
  mag = E2M1[codes & 7]
  return np.where(codes & 8, -mag, mag)


def np_nvfp4_weight(w, group=16):
  k, n = w.shape
  g = w.astype(np.float32).reshape(k // group, group, n)
  s_g = np.abs(g).max(axis=1) / np.float32(6)
  s_t = np.float32(ml_dtypes.bfloat16(s_g.max() / np.float32(448)))
  s_16 = np.minimum(s_g / s_t, np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
  eff = s_t * s_16.astype(np.float32)
  v = np.clip(np.divide(g, eff[:, None, :], out=np.zeros_like(g), where=eff[:, None, :] != 0), -6, 6)
  return np_e2m1_code(v).reshape(k, n), s_16, s_t


def np_nvfp4_act(x, group=16):
  """The engine's NVFP4 activation quantizer (spec §3.2) in numpy float32: ``s = min(absmax · fl(1/6), 448)``,
  codes = E2M1 (nearest, ties to even, saturating) of ``x · fl(1/s)``, scale ``fp8_e4m3(s)`` (RNE)."""
  g = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
  s = np.minimum(np.abs(g).max(axis=-1) * (np.float32(1) / np.float32(6)), np.float32(448))
  assert s.dtype == np.float32
  v = np.clip(g * _np_reciprocal(s)[..., None], -6, 6)
  return np_e2m1_code(v.astype(np.float64)).reshape(x.shape), s.astype(ml_dtypes.float8_e4m3fn)


def _assert_codes_match(codes, ref_codes, ratio):
  """Codes equal except where the float64 ratio is within 1e-5 of a rounding tie (float32 vs
  float64 division may land on either side); such cases must be rare."""
  codes, ref_codes = np.asarray(codes, np.int64), np.asarray(ref_codes, np.int64)
  near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
  assert np.all((codes == ref_codes) | near_tie)
  assert near_tie.mean() < 1e-3


# ----------------------------------------------------------------------------- INT4
@pytest.mark.parametrize("scale_dtype", [None, jnp.bfloat16])
def test_int4_weight_matches_numpy(scale_dtype):
  rng = np.random.default_rng(0)
  w = _heavy(rng, (128, 48))
  codes, scales = qz.quantize_int4_weight(jnp.asarray(w), 64, scale_dtype)
  ref_codes, ref_scales, ratio = np_int4_weight(w, 64, ml_dtypes.bfloat16 if scale_dtype else np.float32)
  assert codes.dtype == jnp.int8 and codes.shape == (128, 48) and scales.shape == (2, 48)
  np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32)), ref_scales.astype(np.float32))
  _assert_codes_match(codes, ref_codes, ratio)
  assert int(jnp.max(jnp.abs(codes))) == 7  # the absmax element of each group reaches the range
  # codes * scales reproduces the fake form exactly
  fake = qz.fake_int4_weight(jnp.asarray(w), 64, scale_dtype)
  recon = np.asarray(codes, np.float32).reshape(2, 64, 48) * np.asarray(scales.astype(jnp.float32))[:, None, :]
  np.testing.assert_array_equal(np.asarray(fake), recon.reshape(128, 48))


def test_int4_round_half_to_even_and_zero_groups():
  w = np.zeros((128, 48), np.float32)
  # group 0 of column 0: scale exactly 1 (absmax 7) and exact ties
  w[:8, 0] = [7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -6.5]
  codes, scales = qz.quantize_int4_weight(jnp.asarray(w), 64)
  np.testing.assert_array_equal(np.asarray(codes[:8, 0]), [7, 0, 2, 2, 0, -2, 4, -6])
  # all-zero groups: scale 0, codes 0, fake 0, no NaN
  assert float(scales[1, 0]) == 0 and float(scales[0, 1]) == 0
  fake = qz.fake_int4_weight(jnp.asarray(w), 64)
  assert np.all(np.isfinite(np.asarray(fake)))
  np.testing.assert_array_equal(np.asarray(fake[64:, :]), 0)
  np.testing.assert_array_equal(np.asarray(codes[:, 1:]), 0)


def test_int4_act_signed_and_unsigned_shift():
  rng = np.random.default_rng(1)
  x = _heavy(rng, (5, 128))
  codes, scales = qz.quantize_int4_act(jnp.asarray(x), 64)
  ref_codes, ref_scales, _ = np_int4_act(x, 64)
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)
  np.testing.assert_array_equal(np.asarray(qz.fake_int4_act(jnp.asarray(x), 64)),
                                np.asarray(qz.dequantize_act(codes, scales)))
  # GELU(tanh) outputs are >= -0.1700: shifted by 0.171875 they are >= 0 and use [0, 15]
  z = rng.standard_normal((5, 128)).astype(np.float32) * 3
  gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  shifted = (gelu + qz.GELU_SHIFT).astype(np.float32)
  assert shifted.min() >= 0
  ucodes, uscales = qz.quantize_int4_act(jnp.asarray(shifted), 64, unsigned=True)
  ref_codes, ref_scales, _ = np_int4_act(shifted, 64, unsigned=True)
  np.testing.assert_array_equal(np.asarray(uscales), ref_scales)
  np.testing.assert_array_equal(np.asarray(ucodes), ref_codes)
  assert int(ucodes.min()) == 0 and int(ucodes.max()) == 15
  # below-zero inputs clip to code 0 in the unsigned quantizer
  neg = np.full((5, 128), -0.5, np.float32)
  neg[0, 0] = 3.0
  ncodes, _ = qz.quantize_int4_act(jnp.asarray(neg), 64, unsigned=True)
  assert int(ncodes[0, 1]) == 0 and int(ncodes[0, 0]) == 15


def _edge_groups():
  """bf16-exact rows of 64-wide groups: exact .5 ties (absmax 14: s = 2, 1/s = 0.5), an all-zero
  group, a negative absmax, values that differ in the last bits, random data."""
  rng = np.random.default_rng(12)
  ties = np.array([14.0, 1, 3, 5, 7, 9, 11, 13, -1, -3, -5, -7, -9, -11, -13, 0] * 4, np.float32)
  neg = (-ties).copy()
  zero = np.zeros(64, np.float32)
  fine = (1.0 + np.arange(64) * 2.0 ** -7).astype(np.float32) * np.where(np.arange(64) % 2, -1, 1)
  rand = (rng.standard_normal(64) * np.exp(rng.standard_normal(64))).astype(np.float32)
  rows = np.stack([np.concatenate([ties, zero, neg, fine]), np.concatenate([rand, ties * 2.0 ** -20, fine * 3, zero])])
  return rows.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_int4_act_is_the_engine_quantizer_bit_for_bit(unsigned):
  """Spec §3.1: ``s = absmax · fl(1/qmax)`` in float32, codes from the reciprocal of the unrounded
  scale, dequantized with ``s`` rounded to the model dtype; eager and jitted; ties, zero groups."""
  x = _edge_groups()
  if unsigned:  # absmax 15 gives s = 1 and ties at k + 0.5; negatives saturate to 0
    x = np.concatenate([x, np.array([[15.0, 2.5, 3.5, 0.5, -0.5, -3.0] + [0.0] * 58 + [0.0] * 192] * 2, np.float32)],
                       axis=1)
  ref_codes, ref_scales, v = np_int4_act(x, 64, unsigned, ml_dtypes.bfloat16)
  assert np.sum(np.abs(v - np.trunc(v)) == 0.5) >= 20, "the edge data must contain exact .5 ties"
  for fn in (qz.quantize_int4_act, jax.jit(qz.quantize_int4_act, static_argnums=(1, 2, 3))):
    codes, scales = fn(jnp.asarray(x), 64, unsigned, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32)), ref_scales.astype(np.float32))
  # ties round to even: 2.5 -> 2, 3.5 -> 4, 0.5 -> 0, -2.5 -> -2 (first group: x / 2)
  if not unsigned:
    np.testing.assert_array_equal(np.asarray(codes)[0, :16], [7, 0, 2, 2, 4, 4, 6, 6, 0, -2, -2, -4, -4, -6, -6, 0])
  else:
    np.testing.assert_array_equal(np.asarray(codes)[0, 256:262], [15, 2, 4, 0, 0, 0])
  assert not np.any(np.asarray(codes)[0, 64:128]) and float(scales[0, 1]) == 0  # all-zero group
  fake = np.asarray(qz.fake_quant_act(jnp.asarray(x), qz.QuantFormat("int4", "int4", 64, "bfloat16"), unsigned))
  want = (ref_codes.reshape(2, -1, 64).astype(np.float32) * ref_scales.astype(np.float32)[..., None]).reshape(x.shape)
  np.testing.assert_array_equal(fake, want)


def test_nvfp4_act_is_the_engine_quantizer_bit_for_bit():
  """Spec §3.2: ``s = min(absmax · fl(1/6), 448)``, codes E2M1 (ties to even, saturating) of
  ``x · fl(1/s)`` with the unrounded s, dequantized with ``fp8_e4m3(s)``: ties, zero groups,
  saturation past the 448 clamp."""
  rng = np.random.default_rng(13)
  ties = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, 0.0])
  clamp = np.array([6000.0, 448 * 2.5, 448 * 7, -448 * 9, 448 * 0.75, 100.0, -3000.0, 448 * 5] * 2)
  zero = np.zeros(16)
  rand = rng.standard_normal(16) * 3
  tiny = rng.standard_normal(16) * 1e-4  # fp8(s) underflows: dequantized to 0, codes still follow x · fl(1/s)
  x = np.stack([np.concatenate([ties, clamp, zero, rand]), np.concatenate([rand * 100, tiny, ties * 2.0 ** -6, ties])])
  x = x.astype(ml_dtypes.bfloat16).astype(np.float32)
  ref_codes, ref_scales = np_nvfp4_act(x)
  for fn in (qz.quantize_nvfp4_act, jax.jit(qz.quantize_nvfp4_act, static_argnums=1)):
    codes, scales = fn(jnp.asarray(x), 16)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32)), ref_scales.astype(np.float32))
  np.testing.assert_array_equal(np_e2m1_value(np.asarray(codes)[0, :16]),
                                [6, 0, 1, 1, 2, 2, 4, 4, 0, -1, -1, -2, -2, -4, -4, 0])
  assert float(scales[0, 1].astype(jnp.float32)) == 448.0  # the clamp
  np.testing.assert_array_equal(np_e2m1_value(np.asarray(codes)[0, 16:24]), [6, 2, 6, -6, 1, 0, -6, 4])
  assert not np.any(np.asarray(codes)[0, 32:48]) and float(scales[0, 2].astype(jnp.float32)) == 0
  fake = np.asarray(qz.fake_quant_act(jnp.asarray(x), qz.NVFP4))
  want = np_e2m1_value(ref_codes).reshape(2, 4, 16) * ref_scales.astype(np.float32)[..., None]
  np.testing.assert_array_equal(fake, want.reshape(x.shape).astype(np.float32))


def test_true_divide_is_ieee():
  """XLA:CPU multiplies by the reciprocal for a broadcast divisor; true_divide gives numpy's IEEE
  float32 quotient (the quantizers' scales and codes depend on it)."""
  rng = np.random.default_rng(8)
  a = (rng.standard_normal((64, 128)) * np.exp(3 * rng.standard_normal((64, 128)))).astype(np.float32)
  b = np.exp(rng.standard_normal(128)).astype(np.float32)
  divide = jax.jit(qz.true_divide)
  np.testing.assert_array_equal(np.asarray(divide(a, b)), a / b)
  np.testing.assert_array_equal(np.asarray(divide(a, np.float32(7))), a / np.float32(7))


def test_k_not_divisible_raises():
  with pytest.raises(qz.QuantizationError, match="not divisible"):
    qz.quantize_int4_weight(jnp.ones((96, 4)), 64)
  with pytest.raises(ValueError, match="K=40"):
    qz.fake_quant_act(jnp.ones((2, 40)), qz.NVFP4)
  with pytest.raises(ValueError, match="not divisible"):
    qz.quantize_weight(jnp.ones((80, 4)), qz.INT4)
  with pytest.raises(ValueError, match="unknown weight format"):
    qz.QuantFormat("int3")
  with pytest.raises(ValueError, match="scale_dtype"):
    qz.QuantFormat("int4", "int4", 64, "float64")


# ----------------------------------------------------------------------------- NVFP4
def test_e2m1_encoding_ties_and_range():
  v = np.array([0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -5.0, 6.0, -6.0, 0.3, 4.9, 0.74],
               np.float32)
  codes = np.asarray(qz._e2m1_encode(jnp.asarray(v)))
  np.testing.assert_array_equal(codes, np_e2m1_code(v.astype(np.float64)))
  np.testing.assert_array_equal(np_e2m1_value(codes),
                                [0, 0, 1, 1, 2, 2, 4, 4, 0, -1, -4, 6, -6, 0.5, 4, 0.5])
  all_codes = jnp.arange(16, dtype=jnp.uint8)
  np.testing.assert_array_equal(np.asarray(qz.e2m1_decode(all_codes)), np_e2m1_value(np.arange(16)))


def test_nvfp4_weight_matches_numpy_two_level_scales():
  rng = np.random.default_rng(2)
  w = _heavy(rng, (128, 48))
  w[:16, 3] = 0.0  # a zero group
  w[16:32, 5] *= 1e-6  # a group whose fp8 micro-scale underflows to 0
  q = qz.quantize_nvfp4_weight(jnp.asarray(w))
  ref_codes, ref_s16, ref_st = np_nvfp4_weight(w)
  assert q.scales.dtype == jnp.float8_e4m3fn and q.codes.dtype == jnp.uint8
  assert float(q.tensor_scale) == float(ref_st)
  np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)), ref_s16.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(q.codes), ref_codes)
  assert float(q.scales[1, 5].astype(jnp.float32)) == 0 and not np.any(np.asarray(q.codes[16:32, 5]))
  deq = np.asarray(qz.dequantize_nvfp4_weight(q))
  eff = ref_st * ref_s16.astype(np.float32)
  np.testing.assert_array_equal(deq, (np_e2m1_value(ref_codes).reshape(8, 16, 48) * eff[:, None, :]).reshape(128, 48))
  np.testing.assert_array_equal(np.asarray(qz.fake_nvfp4_weight(jnp.asarray(w))), deq)
  # fp8 rounding of the micro-scale can push |w| / scale above 6: those clip to the largest code
  ratio = np.abs(w.reshape(8, 16, 48)) / np.where(eff == 0, np.inf, eff)[:, None, :]
  assert ratio.max() > 6.0 and np.all(np.abs(deq) <= 6 * eff.max() + 1e-12)


def test_nvfp4_act_matches_numpy():
  rng = np.random.default_rng(3)
  x = _heavy(rng, (5, 128))
  codes, scales = qz.quantize_nvfp4_act(jnp.asarray(x))
  ref_codes, ref_scales = np_nvfp4_act(x)
  np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32)), ref_scales.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)
  fake = np.asarray(qz.fake_nvfp4_act(jnp.asarray(x)))
  ref = np_e2m1_value(ref_codes).reshape(5, 8, 16) * ref_scales.astype(np.float32)[..., None]
  np.testing.assert_array_equal(fake, ref.reshape(5, 128).astype(np.float32))


def test_nvfp4_tensor_scale_is_rounded_to_the_scale_dtype():
  """The per-tensor scale is rounded to the model dtype before the micro-scales are formed, so a
  16-bit ``wtscale`` holds it exactly (bf16 by default, fp16 for fp16 models)."""
  rng = np.random.default_rng(14)
  w = jnp.asarray(_heavy(rng, (64, 32)))
  for scale_dtype, np_dtype in [(None, ml_dtypes.bfloat16), ("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)]:
    fmt = qz.QuantFormat("nvfp4", "nvfp4", 16, scale_dtype)
    q = qz.quantize_weight(w, fmt)
    s_t = np.float32(q.tensor_scale)
    assert np.float32(np.float32(s_t).astype(np_dtype)) == s_t
    g = np.asarray(w).reshape(4, 16, 32)
    s_g = np.abs(g).max(axis=1) / np.float32(6)
    assert s_t == np.float32((s_g.max() / np.float32(448)).astype(np_dtype))
    np.testing.assert_array_equal(np.asarray(q.scales.astype(jnp.float32)),
                                  np.minimum(s_g / s_t, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(qz.dequantize_weight(q, fmt)), np.asarray(qz.fake_quant_weight(w, fmt)))


@pytest.mark.parametrize("scale_dtype", [jnp.bfloat16, jnp.float16])
def test_awq_weight_only_int4_matches_numpy(scale_dtype):
  """Weight-only INT4 in the engine's AWQ form: RTN codes q, ``u = q + 7``, ``s = dtype(absmax/7)``,
  ``z = -dtype(7 · s)`` (product in float32), dequantized ``u · s + z`` then one rounding."""
  rng = np.random.default_rng(15)
  w = _heavy(rng, (128, 48))
  w[64:, 3] = 0.0  # an all-zero group
  np_dtype = ml_dtypes.bfloat16 if scale_dtype == jnp.bfloat16 else np.float16
  u, s, z = qz.quantize_awq_weight(jnp.asarray(w), 64, scale_dtype)
  ref_q, ref_s, ratio = np_int4_weight(w, 64, np_dtype)
  ref_s32 = ref_s.astype(np.float32)
  _assert_codes_match(np.asarray(u, np.int64) - 7, ref_q, ratio)
  assert u.dtype == jnp.uint8 and int(u.min()) == 0 and int(u.max()) == 14
  np.testing.assert_array_equal(np.asarray(s.astype(jnp.float32)), ref_s32)
  ref_z = (-(np.float32(7) * ref_s32)).astype(np_dtype)
  np.testing.assert_array_equal(np.asarray(z.astype(jnp.float32)), ref_z.astype(np.float32))
  assert np.any(ref_z.astype(np.float64) != -7 * ref_s32.astype(np.float64)), "z is not always exactly -7 s"
  deq = np.asarray(qz.dequantize_awq_weight(u, s, z, scale_dtype).astype(jnp.float32))
  u64 = np.asarray(u, np.float64).reshape(2, 64, 48)
  exact = u64 * ref_s32.astype(np.float64)[:, None, :] + ref_z.astype(np.float64)[:, None, :]
  np.testing.assert_array_equal(deq, exact.astype(np_dtype).astype(np.float32).reshape(128, 48))
  fmt = qz.QuantFormat("int4", None, 64, jnp.dtype(scale_dtype).name)
  fake = np.asarray(qz.fake_quant_weight(jnp.asarray(w), fmt))
  np.testing.assert_array_equal(fake, exact.astype(np.float32).reshape(128, 48))
  np.testing.assert_array_equal(np.asarray(qz.dequantize_weight(qz.quantize_weight(jnp.asarray(w), fmt), fmt)), fake)


# ----------------------------------------------------------------------------- INT8 and NF4
def test_int8_weight_and_act():
  rng = np.random.default_rng(4)
  w = _heavy(rng, (128, 48))
  codes, scales = qz.quantize_int8_weight(jnp.asarray(w))
  ref_scale = (np.abs(w.astype(np.float64)).max(axis=0) / 127).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(scales), ref_scale)
  ratio = w / ref_scale.astype(np.float64)
  _assert_codes_match(codes, np.clip(np.round(ratio), -127, 127), ratio)
  x = _heavy(rng, (5, 128))
  acodes, ascales = qz.quantize_int8_act(jnp.asarray(x))
  ref_ascale = (np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / 127).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(ascales), ref_ascale)
  ratio = x / ref_ascale.astype(np.float64)
  _assert_codes_match(acodes, np.clip(np.round(ratio), -127, 127), ratio)
  np.testing.assert_array_equal(np.asarray(qz.fake_int8_weight(jnp.asarray(w))),
                                np.asarray(codes, np.float32) * np.asarray(scales))


def test_nf4_nearest_code():
  rng = np.random.default_rng(5)
  w = _heavy(rng, (128, 48))
  codes, scales = qz.quantize_nf4_weight(jnp.asarray(w), 64)
  g = w.reshape(2, 64, 48)
  ref_scales = np.abs(g).max(axis=1)
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  v = g / ref_scales[:, None, :]
  dist = np.abs(v[..., None].astype(np.float64) - qz.NF4_VALUES.astype(np.float64))
  ref_codes = dist.argmin(axis=-1).reshape(128, 48)
  # no near-ties in this data: the nearest code is unambiguous
  sorted_dist = np.sort(dist, axis=-1)
  assert np.all(sorted_dist[..., 1] - sorted_dist[..., 0] > 1e-6)
  np.testing.assert_array_equal(np.asarray(codes), ref_codes)
  deq = np.asarray(qz.dequantize_nf4_weight(codes, scales))
  ref_deq = qz.NF4_VALUES[ref_codes].reshape(2, 64, 48) * ref_scales[:, None, :]
  np.testing.assert_array_equal(deq, ref_deq.reshape(128, 48))
  assert set(np.unique(np.asarray(codes))) <= set(range(16)) and 0 in np.asarray(codes) and 15 in np.asarray(codes)


# ----------------------------------------------------------------------------- generic form, jit and vmap
@pytest.mark.parametrize("fmt", [qz.INT4, qz.NVFP4, qz.W8A8, qz.W4A16_NF4,
                                 qz.QuantFormat("int4", "int4", 64, "bfloat16")], ids=str)
def test_generic_weight_form_matches_fake(fmt):
  rng = np.random.default_rng(6)
  w = jnp.asarray(_heavy(rng, (128, 48)))
  q = qz.quantize_weight(w, fmt)
  np.testing.assert_array_equal(np.asarray(qz.dequantize_weight(q, fmt)), np.asarray(qz.fake_quant_weight(w, fmt)))
  scales, tscale = qz.weight_scales(w, fmt)
  again = qz.quantize_weight_with_scales(w, scales, tscale, fmt)
  np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(q.codes))
  if fmt.weight == "int4":
    codes, ref_scales = qz.quantize_int4_weight(w, 64, None if fmt.scale_dtype is None else jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(codes))
    assert q.scales.dtype == ref_scales.dtype
  if fmt.weight == "nvfp4":
    ref = qz.quantize_nvfp4_weight(w)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    assert float(q.tensor_scale) == float(ref.tensor_scale)


@pytest.mark.parametrize("fmt", [qz.INT4, qz.NVFP4, qz.W8A8, qz.W4A16_NF4], ids=str)
def test_jit_and_vmap_match_eager(fmt):
  rng = np.random.default_rng(7)
  ws = jnp.asarray(_heavy(rng, (2, 128, 48)))
  xs = jnp.asarray(_heavy(rng, (2, 5, 128)))
  eager_w = np.stack([np.asarray(qz.fake_quant_weight(w, fmt)) for w in ws])
  eager_x = np.stack([np.asarray(qz.fake_quant_act(x, fmt)) for x in xs])
  jit_w = jax.jit(qz.fake_quant_weight, static_argnums=1)
  np.testing.assert_array_equal(np.stack([np.asarray(jit_w(w, fmt)) for w in ws]), eager_w)
  np.testing.assert_array_equal(np.asarray(jax.vmap(lambda w: qz.fake_quant_weight(w, fmt))(ws)), eager_w)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(lambda x: qz.fake_quant_act(x, fmt)))(xs)), eager_x)
  q_eager = [qz.quantize_weight(w, fmt) for w in ws]
  q_vmap = jax.vmap(lambda w: qz.quantize_weight(w, fmt))(ws)
  np.testing.assert_array_equal(np.asarray(q_vmap.codes), np.stack([np.asarray(q.codes) for q in q_eager]))
  np.testing.assert_array_equal(np.asarray(q_vmap.scales.astype(jnp.float32)),
                                np.stack([np.asarray(q.scales.astype(jnp.float32)) for q in q_eager]))
