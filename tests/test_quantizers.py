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


def np_int4_act(x, group, unsigned=False):
  g = x.astype(np.float64).reshape(*x.shape[:-1], x.shape[-1] // group, group)
  qmax = 15 if unsigned else 7
  scale = (np.abs(g).max(axis=-1) / qmax).astype(np.float32)
  s = scale.astype(np.float64)[..., None]
  ratio = np.divide(g, s, out=np.zeros_like(g), where=s != 0)
  return np.clip(np.round(ratio), 0 if unsigned else -7, qmax).reshape(x.shape), scale, ratio.reshape(x.shape)


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
  g = x.astype(np.float32).reshape(*x.shape[:-1], x.shape[-1] // group, group)
  scale = np.minimum(np.abs(g).max(axis=-1) / np.float32(6), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
  s = scale.astype(np.float32)[..., None]
  v = np.clip(np.divide(g, s, out=np.zeros_like(g), where=s != 0), -6, 6)
  return np_e2m1_code(v).reshape(x.shape), scale


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
  ref_codes, ref_scales, ratio = np_int4_act(x, 64)
  np.testing.assert_array_equal(np.asarray(scales), ref_scales)
  _assert_codes_match(codes, ref_codes, ratio)
  np.testing.assert_array_equal(np.asarray(qz.fake_int4_act(jnp.asarray(x), 64)),
                                np.asarray(qz.dequantize_act(codes, scales)))
  # GELU(tanh) outputs are >= -0.1700: shifted by 0.171875 they are >= 0 and use [0, 15]
  z = rng.standard_normal((5, 128)).astype(np.float32) * 3
  gelu = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
  shifted = (gelu + qz.GELU_SHIFT).astype(np.float32)
  assert shifted.min() >= 0
  ucodes, uscales = qz.quantize_int4_act(jnp.asarray(shifted), 64, unsigned=True)
  ref_codes, ref_scales, ratio = np_int4_act(shifted, 64, unsigned=True)
  np.testing.assert_array_equal(np.asarray(uscales), ref_scales)
  _assert_codes_match(ucodes, ref_codes, ratio)
  assert int(ucodes.min()) == 0 and int(ucodes.max()) == 15
  # below-zero inputs clip to code 0 in the unsigned quantizer
  neg = np.full((5, 128), -0.5, np.float32)
  neg[0, 0] = 3.0
  ncodes, _ = qz.quantize_int4_act(jnp.asarray(neg), 64, unsigned=True)
  assert int(ncodes[0, 1]) == 0 and int(ncodes[0, 0]) == 15


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
