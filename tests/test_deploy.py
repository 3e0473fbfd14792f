"""Deployment: the packed layer built by quant.deploy.to_quantized_linear runs what was calibrated.

For every method (SVDQuant INT4 with and without the fc2 shift, NVFP4, NVFP4 members fused with
per-channel scales, W8A8, rank 0 = RTN), with GPTQ on and off, the deployed layer through the
reference op equals ``fake_forward`` (the function every search minimised) in float32, and GPTQ's
codes survive deployment, which ``from_components(residual=...)`` (RTN of the float residual)
would silently replace. The deployment constants are host float64 values rounded once.
"""

import dataclasses

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.formats import packed_format, packing
from svdquant_jax.formats import quantizers as qz
from svdquant_jax.pallas import svdquant_linear
from svdquant_jax.quant import smooth
from svdquant_jax.quant import svdquant as sq
from svdquant_jax.quant.deploy import to_quantized_linear
from svdquant_jax.quant.ptq import QuantizedLayer
from svdquant_jax.quant.quantized_model import layer_to_params

# Deployed (reference op, fp32) vs fake_forward: same codes, scales and shift; only the summation
# order differs (exact integer group dots vs a float32 matmul of the dequantized operands).
# Measured max |Δ| / max |y| <= 4e-7 on these layers.
TOLERANCE = 2e-6
SETTINGS = dict(grid=smooth.alpha_beta_grid(2), lowrank_iters=2, svd_iters=12, gptq=True)


def _inputs(seed, rows, k, gelu):
  """Tokens with a few 10-50x outlier channels (GELU outputs for an fc2 input: >= -0.17)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, k))
  x[:, rng.choice(k, 6, replace=False)] *= rng.uniform(10, 50, 6)
  x = jnp.asarray(x, jnp.float32)
  return jax.nn.gelu(x, approximate=True) if gelu else x


def _kernel(seed, k, n):
  """Heavy-tailed input-channel rows, and a bias."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((k, n)) * np.exp(0.5 * rng.standard_t(3, size=(k, 1)).clip(-6, 6)) / np.sqrt(k)
  return jnp.asarray(w, jnp.float32), jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32)


# method -> (format, shift, rank, smoothing, kernel index in its group); "int4" and "int4-fc2" are
# two kernels of one group (one calibration run) reading GELU outputs, with shifts 0 and δ.
# NVFP4 is given the fc2 shift too: act_shift ignores it outside INT4, and so must the deployment.
METHODS = {
    "int4": (qz.INT4, 0.0, 16, True, 0),
    "int4-fc2": (qz.INT4, qz.GELU_SHIFT, 16, True, 1),
    "nvfp4": (qz.NVFP4, qz.GELU_SHIFT, 16, True, 0),
    "w8a8": (qz.W8A8, 0.0, 16, True, 0),
    "rank0-rtn": (qz.INT4, 0.0, 0, False, 0),
}


@pytest.fixture(scope="module")
def calibrated():
  """``method -> (x, kernel, bias, weights with GPTQ codes)``, one calibration run per group."""
  cache = {}

  def get(method):
    fmt, shift, rank, smoothing, index = METHODS[method]
    key = "int4" if method.startswith("int4") else method
    if key not in cache:
      x = _inputs(0, 256, 128, gelu=key in ("int4", "nvfp4"))
      if key == "int4":
        params = [_kernel(1, 128, 64), _kernel(2, 128, 96)]
        shifts = [0.0, qz.GELU_SHIFT]
      else:
        params, shifts = [_kernel(1, 128, 64)], [shift]
      layers = sq.quantize_linear_group([w for w, _ in params], [b for _, b in params], x, fmt, rank=rank,
                                        smooth=smoothing, shifts=shifts, **SETTINGS)
      cache[key] = (x, params, layers)
    x, params, layers = cache[key]
    return x, params[index][0], params[index][1], layers[index]
  return get


@pytest.mark.parametrize("gptq", [True, False], ids=["gptq", "rtn"])
@pytest.mark.parametrize("method", list(METHODS))
def test_deployed_layer_runs_what_was_calibrated(calibrated, method, gptq):
  fmt, shift, rank, _, _ = METHODS[method]
  x, _, _, w = calibrated(method)
  assert w.residual_q is not None and w.rank == rank
  if not gptq:  # what quantize_linear_group(gptq=False) returns: GPTQ does not touch λ, R, A, B
    w = dataclasses.replace(w, residual_q=None)
  ql = to_quantized_linear(w, fmt, shift=shift, dtype=jnp.float32)
  assert ql.fmt == packed_format(fmt) and ql.shift == sq.act_shift(fmt, shift) and ql.rank == rank
  want_q = w.residual_q if gptq else qz.quantize_weight(w.residual, fmt)
  np.testing.assert_array_equal(np.asarray(ql.weight_codes()), np.asarray(want_q.codes))
  y = np.asarray(svdquant_linear(x, ql, backend="reference"), np.float64)
  want = np.asarray(sq.fake_forward(x, w, fmt, shift), np.float64)
  diff = np.abs(y - want).max() / np.abs(want).max()
  assert diff < TOLERANCE, (method, gptq, diff)


def test_gptq_codes_survive_deployment(calibrated):
  """The old trap: from_components(residual=R) re-quantizes R by RTN and drops GPTQ's codes."""
  x, _, _, w = calibrated("int4")
  ql = to_quantized_linear(w, qz.INT4)
  np.testing.assert_array_equal(np.asarray(ql.weight_codes()), np.asarray(w.residual_q.codes))
  np.testing.assert_array_equal(np.asarray(ql.wscales), np.asarray(w.residual_q.scales))
  trap = packing.from_components(w.smooth, w.lora_a, w.lora_b, w.bias, residual=w.residual, fmt="int4")
  changed = float(np.mean(np.asarray(trap.weight_codes()) != np.asarray(w.residual_q.codes)))
  assert changed > 0.05, changed  # GPTQ moved many codes off RTN: the outlier channels are real
  calibrated_y = np.asarray(sq.fake_forward(x, w, qz.INT4), np.float64)
  y_trap = np.asarray(svdquant_linear(x, trap, backend="reference"), np.float64)
  assert np.abs(y_trap - calibrated_y).max() / np.abs(calibrated_y).max() > 100 * TOLERANCE
  # the PTQ flow's deployment is the same function
  spec, params = layer_to_params(QuantizedLayer(w, qz.INT4, 0.0), jnp.float32)
  assert spec.fmt == "int4" and spec.rank == w.rank
  for field in ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"):
    np.testing.assert_array_equal(np.asarray(getattr(params, field)), np.asarray(getattr(ql, field)))


def test_to_quantized_linear_refuses_what_it_cannot_deploy_as_calibrated():
  k, n = 128, 64
  w = sq.plain_weights(*_kernel(3, k, n))
  with pytest.raises(qz.QuantizationError, match="weight_only_params"):
    to_quantized_linear(w, qz.W4A16_INT4)
  with pytest.raises(qz.QuantizationError, match="same format"):
    to_quantized_linear(w, qz.QuantFormat("int4", "int8", 64))
  # float32 scales (scale_dtype unset) would be rounded by a bfloat16 deployment
  with pytest.raises(qz.QuantizationError, match="scale_dtype='bfloat16'"):
    to_quantized_linear(w, qz.INT4, dtype=jnp.bfloat16)
  # calibrated with bfloat16 scales: deployed in bfloat16 with exactly those scales
  fmt = dataclasses.replace(qz.INT4, scale_dtype="bfloat16")
  rq = qz.quantize_weight(w.residual, fmt)
  ql = to_quantized_linear(w, fmt, dtype=jnp.bfloat16)
  assert ql.wscales.dtype == jnp.bfloat16 and ql.smooth.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ql.wscales), np.asarray(rq.scales))
  np.testing.assert_array_equal(np.asarray(ql.weight_codes()), np.asarray(rq.codes))
  with pytest.raises(qz.QuantizationError, match=r"\[K, N\]"):
    to_quantized_linear(jax.tree.map(lambda a: a[None], w), qz.INT4)


@pytest.mark.parametrize("gptq", [True, False], ids=["gptq", "rtn"])
def test_fused_nvfp4_members_deploy_with_channel_scales(gptq):
  """q, k, v calibrated as one group with a shared branch, each with its own NVFP4 per-tensor
  scale, deploy as one layer whose per-channel scales ``wcscales`` hold the members' scales (as
  Nunchaku's fused qkv); it runs what the three calibrated layers compute."""
  x = _inputs(4, 256, 128, gelu=False)
  params = [_kernel(5 + i, 128, n) for i, n in enumerate((64, 32, 48))]
  kernels = [w * scale for (w, _), scale in zip(params, (1.0, 7.0, 0.2))]  # different tensor scales
  layers = sq.quantize_linear_group(kernels, [b for _, b in params], x, qz.NVFP4, rank=16, shared_branch=True,
                                    **SETTINGS)
  if not gptq:
    layers = [dataclasses.replace(w, residual_q=None) for w in layers]
  ql = to_quantized_linear(layers, qz.NVFP4, dtype=jnp.float32)
  scales = [float(qz.quantize_weight(w.residual, qz.NVFP4).tensor_scale if w.residual_q is None
                  else w.residual_q.tensor_scale) for w in layers]
  assert len(set(scales)) == 3 and float(ql.wtscale[0]) == 1.0
  np.testing.assert_array_equal(np.asarray(ql.wcscales), np.repeat(np.float32(scales), [64, 32, 48]))
  y = np.asarray(svdquant_linear(x, ql, backend="reference"), np.float64)
  want = np.concatenate([np.asarray(sq.fake_forward(x, w, qz.NVFP4), np.float64) for w in layers], axis=1)
  diff = np.abs(y - want).max() / np.abs(want).max()
  assert diff < TOLERANCE, diff
  # the same members deployed one by one hold the scale as wtscale
  single = to_quantized_linear(layers[1], qz.NVFP4)
  assert single.wcscales is None and float(single.wtscale[0]) == scales[1]
  with pytest.raises(qz.QuantizationError, match="smoothing"):
    to_quantized_linear([layers[0], dataclasses.replace(layers[1], smooth=layers[1].smooth * 2)], qz.NVFP4)


def test_deployment_constants_are_host_float64():
  """bf16 deployment: ``lora_down = bf16(f64(A)/f64(λ))``, ``smooth = bf16(λ)`` and the shift
  compensation ``bias = bf16(f64(b) - Σ_k (δ/λ'_k) Qw(R)[k, :])`` with the stored divisor
  ``λ' = bf16(λ)``, each rounded once as deepcompressor (float64 -> float32 -> bf16)."""
  rng = np.random.default_rng(9)
  k, n, r = 128, 64, 8
  lam = np.exp(rng.uniform(-2, 2, k)).astype(np.float32)
  a = rng.standard_normal((k, r)).astype(np.float32)
  w = sq.SVDQuantWeights(jnp.asarray(lam), jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32), jnp.asarray(a),
                         jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
                         jnp.asarray(rng.standard_normal(n), jnp.float32))
  fmt = dataclasses.replace(qz.INT4, scale_dtype="bfloat16")
  ql = to_quantized_linear(w, fmt, shift=qz.GELU_SHIFT, dtype=jnp.bfloat16)
  bf16 = lambda v: np.asarray(v, np.float64).astype(np.float32).astype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(np.asarray(ql.smooth), lam.astype(ml_dtypes.bfloat16))
  np.testing.assert_array_equal(np.asarray(ql.lora_down), bf16(a.astype(np.float64) / lam.astype(np.float64)[:, None]))
  rq = qz.quantize_weight(w.residual, fmt)
  qw = np.asarray(rq.codes, np.float64) * np.repeat(np.asarray(rq.scales.astype(jnp.float32), np.float64), 64, axis=0)
  lam_stored = lam.astype(ml_dtypes.bfloat16).astype(np.float64)
  want_bias = bf16(np.asarray(w.bias, np.float64) - (qz.GELU_SHIFT / lam_stored) @ qw)
  np.testing.assert_array_equal(np.asarray(ql.bias), want_bias)
  # float32 (under jit, traced values) gives the same layer up to float32 rounding of the constants
  traced = jax.jit(lambda w: to_quantized_linear(w, fmt, shift=qz.GELU_SHIFT, dtype=jnp.bfloat16))(w)
  got, want = np.asarray(traced.bias, np.float32), np.asarray(ql.bias, np.float32)
  assert np.all(np.abs(got - want) <= 2 ** -8 * np.abs(want))  # at most one bf16 rounding step apart
