"""Deployment: the packed layer built by quant.deploy.to_quantized_linear runs what was calibrated.

For every method (SVDQuant INT4 with and without the fc2 shift, NVFP4, W8A8, rank 0 = RTN), with
GPTQ on and off, the deployed layer through the reference op equals ``fake_forward`` (the
function every search minimised) in float32, and GPTQ's codes survive deployment, which
``from_components(residual=...)`` (RTN of the float residual) would silently replace.
"""

import dataclasses

import jax
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
