"""SVDQuant transforms: the canonical forward, smoothing, the low-rank SVD and refinement, GPTQ and
the whole-layer entry point, against float64 numpy references."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from svdquant_jax.formats import quantizers as qz
from svdquant_jax.quant import gptq, lowrank, smooth, svdquant as sq
from svdquant_jax.eval.metrics import relative_error

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _layer(seed, rows, k, ns, outlier_channels=4):
  """Inputs with a few 10-60x outlier channels and correlated columns; kernels with heavy-tailed
  rows (input channels) and a fast-decaying spectrum."""
  rng = np.random.default_rng(seed)
  mix = rng.standard_normal((k, k)) * np.exp(-np.arange(k) / 16)[:, None] + np.eye(k)
  x = rng.standard_normal((rows, k)) @ mix / 4
  x[:, rng.choice(k, outlier_channels, replace=False)] *= rng.uniform(10, 60, outlier_channels)
  kernels = []
  for n in ns:
    r = min(k, n) // 2
    u, _ = np.linalg.qr(rng.standard_normal((k, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    w = (u * (0.85 ** np.arange(r))) @ v.T + 0.02 * rng.standard_normal((k, n))
    w *= np.exp(0.5 * rng.standard_t(3, size=(k, 1)).clip(-6, 6))
    kernels.append(jnp.asarray(w, jnp.float32))
  return jnp.asarray(x, jnp.float32), kernels


_fake_forward = jax.jit(sq.fake_forward, static_argnums=(2, 3))
_call = jax.jit(lambda fn, arg: fn(arg))  # a pytree callable applied to a pytree, compiled once


# ----------------------------------------------------------------------------- canonical forward
@pytest.mark.parametrize("fmt,shift", [(qz.INT4, 0.0), (qz.INT4, qz.GELU_SHIFT), (qz.NVFP4, qz.GELU_SHIFT),
                                       (qz.W4A16_INT4, 0.0), (qz.W8A8, 0.0)], ids=str)
def test_fake_forward_is_the_canonical_formula(fmt, shift):
  rng = np.random.default_rng(0)
  k, n, r = 128, 48, 4
  x = rng.standard_normal((2, 5, k)).astype(np.float32)
  if shift:
    x = np.maximum(x, -0.17).astype(np.float32)  # GELU-like range: x + δ >= 0
  lam = np.exp(rng.standard_normal(k)).astype(np.float32)
  w = sq.SVDQuantWeights(jnp.asarray(lam), jnp.asarray(rng.standard_normal((k, n)), jnp.float32),
                         jnp.asarray(rng.standard_normal((k, r)), jnp.float32),
                         jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
                         jnp.asarray(rng.standard_normal(n), jnp.float32))
  y = np.asarray(_fake_forward(jnp.asarray(x), w, fmt, shift))
  # float64 evaluation of y = Qa((x + δ)/λ) Qw(R) + ((x/λ) A) B + b - Σ_k (δ/λ_k) Qw(R)[k, :]
  delta = shift if fmt.act == "int4" else 0.0
  x_hat = x.astype(np.float64) / lam
  x_tilde = ((x + np.float32(delta)) / lam).astype(np.float32)  # float32 sum and IEEE quotient, as fake_forward
  qa = np.asarray(qz.fake_quant_act(jnp.asarray(x_tilde), fmt, unsigned=delta > 0), np.float64)
  qw = np.asarray(qz.fake_quant_weight(w.residual, fmt), np.float64)
  compensation = (delta / lam.astype(np.float64)) @ qw
  ref = (qa @ qw + (x_hat @ np.asarray(w.lora_a, np.float64)) @ np.asarray(w.lora_b, np.float64)
         + np.asarray(w.bias, np.float64) - compensation)
  assert relative_error(y, ref) < 1e-6
  if delta:  # the shifted activations really use the unsigned [0, 15] quantizer
    codes, _ = qz.quantize_int4_act(jnp.asarray(x_tilde), 64, unsigned=True)
    assert int(codes.min()) == 0 and int(codes.max()) == 15
  # deployed form: the branch reads the raw x through diag(1/λ) A, and b_eff carries the shift
  lora_down = np.asarray(sq.to_lora_down(w), np.float64)
  np.testing.assert_allclose(x @ lora_down, x_hat @ np.asarray(w.lora_a, np.float64), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(sq.effective_bias(w, fmt, shift)),
                             np.asarray(w.bias, np.float64) - compensation, rtol=1e-5, atol=1e-5)


def test_shifted_formula_without_quantization_is_the_float_layer(monkeypatch):
  """With identity quantizers the canonical forward is exactly ``x W + b``: the shift δ enters the
  quantized path only as ``(x + δ)/λ``, the bias removes ``Σ_k (δ/λ_k) R[k, :]``, and the branch
  reads the unshifted ``x/λ``."""
  from svdquant_jax.quant import weights as wmod
  monkeypatch.setattr(wmod, "fake_quant_act", lambda x, fmt, unsigned=False: x)
  monkeypatch.setattr(wmod, "quantized_residual", lambda w, fmt: w.residual.astype(jnp.float32))
  rng = np.random.default_rng(31)
  k, n, r = 128, 48, 8
  x = np.asarray(jax.nn.gelu(jnp.asarray(rng.standard_normal((64, k)) * 2, jnp.float32), approximate=True))
  kernel = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
  bias = rng.standard_normal(n).astype(np.float32)
  lam = np.exp(rng.uniform(-2, 2, k)).astype(np.float32)
  w_hat = lam.astype(np.float64)[:, None] * kernel
  u, sv, vt = np.linalg.svd(w_hat, full_matrices=False)
  a, b = u[:, :r] * sv[:r], vt[:r]
  w = sq.SVDQuantWeights(*(jnp.asarray(v, jnp.float32) for v in (lam, w_hat - a @ b, a, b, bias)))
  ref = x.astype(np.float64) @ kernel.astype(np.float64) + bias
  y = np.asarray(wmod.fake_forward(jnp.asarray(x), w, qz.INT4, qz.GELU_SHIFT), np.float64)
  err = np.abs(y - ref).max() / np.abs(ref).max()
  assert err <= 1e-6, err
  # the shift was applied and compensated (not ignored): without the compensation y is far off
  uncompensated = y + np.asarray(wmod.shift_compensation(w.smooth, w.residual, qz.GELU_SHIFT), np.float64)
  assert np.abs(uncompensated - ref).max() / np.abs(ref).max() > 1e-2


# ----------------------------------------------------------------------------- smoothing
def test_smooth_scale_and_grid():
  rng = np.random.default_rng(1)
  ax = np.abs(rng.standard_normal(64)).astype(np.float32) * 10
  aw = np.abs(rng.standard_normal(64)).astype(np.float32)
  ax[3] = 0.0
  for alpha, beta in [(0.5, 0.5), (0.3, 0.0), (0.0, 0.4), (0.0, 0.0), (0.95, 0.05)]:
    lam = np.asarray(smooth.smooth_scale(jnp.asarray(ax), jnp.asarray(aw), alpha, beta))
    if alpha == 0:
      ref = aw.astype(np.float64) ** -beta
    else:
      ref = ax.astype(np.float64) ** alpha / aw.astype(np.float64) ** beta
    ref[ref == 0] = 1.0
    np.testing.assert_allclose(lam, ref, rtol=2e-6)
  # a zero weight span with beta > 0 gives an infinite entry: all ones (the (0, 0) candidate)
  aw0 = aw.copy()
  aw0[5] = 0.0
  np.testing.assert_array_equal(np.asarray(smooth.smooth_scale(jnp.asarray(ax), jnp.asarray(aw0), 0.5, 0.5)), 1.0)
  grid = smooth.alpha_beta_grid(20)
  assert len(grid) == 39 and len(smooth.alpha_beta_grid(10)) == 19
  assert grid[0] == (0.0, 0.0) and grid[1] == (0.05, 0.0) and grid[19] == (0.95, 0.0)
  assert grid[20] == (0.05, 0.95) and grid[38] == (0.95, 1 - 0.95)
  # w_absmax runs over the concatenated output channels of the kernels sharing the input
  w1, w2 = rng.standard_normal((64, 10)), rng.standard_normal((64, 30))
  spans = smooth.weight_absmax([jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32)])
  np.testing.assert_array_equal(np.asarray(spans),
                                np.abs(np.concatenate([w1, w2], axis=1)).max(axis=1).astype(np.float32))


@pytest.fixture(scope="module")
def group_layer():
  return _layer(2, 128, 128, (96, 64))


def test_search_smoothing_matches_direct_evaluation(group_layer):
  x, kernels = group_layer
  fmt, rank = qz.INT4, 8
  grid = smooth.alpha_beta_grid(4)
  loss = smooth.linear_output_loss(x, kernels, None, fmt)
  ax = smooth.activation_absmax(x)
  # candidates in vmapped chunks of 3 (7 pairs: the last chunk is partial)
  found = smooth.search_smoothing(kernels, ax, loss, fmt, rank=rank, grid=grid, candidate_batch=3)
  # every candidate against an independent float64 evaluation: numpy λ and SVD, the quantizers'
  # fake forward, numpy output error
  x64 = np.asarray(x, np.float64)
  ax64 = np.abs(x64).max(axis=0)
  aw64 = np.max([np.abs(np.asarray(w, np.float64)).max(axis=1) for w in kernels], axis=0)
  ref_losses = []
  for alpha, beta in grid:
    lam = np.ones_like(ax64) if alpha == beta == 0 else ax64 ** alpha / aw64 ** beta
    total = 0.0
    for w in kernels:
      w_hat = lam[:, None] * np.asarray(w, np.float64)
      u, s, vt = np.linalg.svd(w_hat, full_matrices=False)
      a, b = u[:, :rank], s[:rank, None] * vt[:rank]
      cand = sq.SVDQuantWeights(jnp.asarray(lam, jnp.float32), jnp.asarray(w_hat - a @ b, jnp.float32),
                                jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), jnp.zeros(w.shape[1]))
      y_hat = np.asarray(_fake_forward(x, cand, fmt, 0.0), np.float64)
      total += np.sum((y_hat - x64 @ np.asarray(w, np.float64)) ** 2)
    ref_losses.append(total)
  np.testing.assert_allclose(np.asarray(found.losses), ref_losses, rtol=1e-4)
  best = int(found.index)
  assert best == len(grid) - 1 - int(np.argmin(np.asarray(found.losses)[::-1]))
  assert float(found.losses[best]) < float(found.losses[0])  # smoothing beats λ = 1 on outlier inputs
  alpha, beta = grid[best]
  np.testing.assert_allclose(np.asarray(found.smooth), ax64 ** alpha / aw64 ** beta, rtol=1e-5)


# ----------------------------------------------------------------------------- low-rank SVD
@pytest.mark.parametrize("spectrum", ["bulk", "dominant"])
@pytest.mark.parametrize("shape", [(384, 2688), (1536, 384)], ids=str)
def test_svd_lowrank_truncation_error_matches_float64(shape, spectrum):
  """FLUX single-block input (3072 x 21504) and fc2 (12288 x 3072) aspect ratios scaled by 1/8.
  ``bulk``: a geometric spectrum over min(K, N) / 2 directions plus a noise floor, cut at r = 32
  inside the noise bulk (slow subspace convergence); ``dominant``: four directions 1000x the noise
  bulk, as after smoothing with strong activation outliers (a float32 Gram matrix would lose the
  bulk directions)."""
  rng = np.random.default_rng(3)
  k, n = shape
  m = min(shape) // 2 if spectrum == "bulk" else 4
  u, _ = np.linalg.qr(rng.standard_normal((k, m)))
  v, _ = np.linalg.qr(rng.standard_normal((n, m)))
  sig = 20 * 0.85 ** np.arange(m) if spectrum == "bulk" else 1000 * np.array([1.0, 0.7, 0.5, 0.3])
  w = (u * sig) @ v.T + 0.03 * rng.standard_normal(shape)
  s = np.linalg.svd(w, compute_uv=False)
  optimal = np.sqrt(np.sum(s[32:] ** 2))
  a, b = lowrank.svd_lowrank(jnp.asarray(w, jnp.float32), 32)
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err = np.linalg.norm(w - a64 @ b64)
  assert abs(err / optimal - 1) < 1e-5
  np.testing.assert_allclose(np.linalg.norm(b64, axis=1), s[:32], rtol=1e-4)  # B = S Vᵀ
  np.testing.assert_allclose(a64.T @ a64, np.eye(32), atol=1e-4)  # A = U: orthonormal columns


# ----------------------------------------------------------------------------- alternating refinement
def _reference_alternating(w_hat, rank, fmt, loss_fn, num_iters, early_stop):
  """deepcompressor's alternating loop ("deepcompressor's recipe" in docs/quantization.md) in Python,
  with a cold SVD each iteration."""
  losses, best, best_loss, q_prev = [], 0, np.inf, jnp.zeros_like(w_hat)
  for t in range(num_iters):
    a, b = lowrank.svd_lowrank(w_hat - q_prev, rank)
    residual = w_hat - jnp.dot(a, b, precision=sq.PRECISION)
    cand = sq.SVDQuantWeights(jnp.ones(w_hat.shape[0]), residual, a, b, jnp.zeros(w_hat.shape[1]))
    loss = float(_call(loss_fn, cand))
    losses.append(loss)
    q_prev = qz.fake_quant_weight(residual, fmt)
    if loss <= best_loss:
      best, best_loss = t, loss
    elif early_stop:
      break
  return losses, best


def test_alternating_lowrank_follows_the_reference_loop(group_layer):
  x, kernels = group_layer
  w, fmt, rank = kernels[0], qz.INT4, 8
  loss = smooth.linear_output_loss(x, [w], None, fmt)
  one = sq._OneLayerLoss(loss, 0, 1)
  full = lowrank.alternating_lowrank(w, rank, fmt, one, 6, early_stop=False)
  ref_losses, _ = _reference_alternating(w, rank, fmt, one, 6, False)
  np.testing.assert_allclose(np.asarray(full.losses), ref_losses, rtol=1e-4)
  assert int(full.iters_run) == 6
  losses = np.asarray(full.losses)
  assert int(full.best_iter) == 5 - int(np.argmin(losses[::-1]))
  assert losses[int(full.best_iter)] <= losses[0]  # never worse than plain SVDQuant
  np.testing.assert_allclose(np.asarray(full.residual), np.asarray(w - full.lora_a @ full.lora_b), atol=1e-5)
  # early stop: the loop ends at the first iteration whose loss exceeds the best so far
  stopped = lowrank.alternating_lowrank(w, rank, fmt, one, 12, early_stop=True)
  ref_losses, ref_best = _reference_alternating(w, rank, fmt, one, 12, True)
  run = int(stopped.iters_run)
  assert run == len(ref_losses) < 12 and int(stopped.best_iter) == ref_best
  losses = np.asarray(stopped.losses)
  np.testing.assert_allclose(losses[:run], ref_losses, rtol=1e-4)
  assert np.all(np.diff(losses[:run - 1]) <= 0) and losses[run - 1] > losses[run - 2]  # the first increase stops
  assert np.all(np.isnan(losses[run:]))
  # the first iteration is plain SVDQuant: L = SVD_r(Ŵ)
  plain = smooth.one_shot_candidate(w, jnp.ones(w.shape[0]), jnp.zeros(w.shape[1]), rank)
  np.testing.assert_allclose(float(full.losses[0]), float(_call(one, plain)), rtol=1e-6)


# ----------------------------------------------------------------------------- GPTQ
def _np_scales(w, fmt):
  k, n = w.shape
  g = w.reshape(k // fmt.group_size, fmt.group_size, n)
  if fmt.weight == "int4":
    return (np.abs(g).max(axis=1) / np.float32(7)).astype(np.float32).astype(np.float64)
  s_g = np.abs(g).max(axis=1) / np.float32(6)
  s_t = np.float32(ml_dtypes.bfloat16(s_g.max() / np.float32(448)))
  s16 = np.minimum(s_g / s_t, np.float32(448)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  return (s_t * s16).astype(np.float64)


def _np_encode(v, fmt):
  if fmt.weight == "int4":
    c = np.clip(np.round(v), -7, 7)
    return c, c
  mag = np.abs(np.clip(v, -6, 6))[..., None]
  dist = np.abs(mag - E2M1)
  best = dist.min(axis=-1, keepdims=True)
  idx = np.where(dist == best, np.arange(8), 99)
  even = np.where(idx % 2 == 0, idx, 99).min(axis=-1)
  idx = np.where(even < 99, even, idx.min(axis=-1))
  code = idx | (((v < 0) & (idx > 0)).astype(np.int64) << 3)
  return code, np.where(v < 0, -E2M1[idx], E2M1[idx])


def _np_gptq(w, hess, fmt, block=128, damp=0.01, max_tries=250):
  """GPTQ as deepcompressor's gptq_quantize, in float64, our [K, N] orientation."""
  w, h = w.astype(np.float64).copy(), hess.astype(np.float64).copy()
  k, n = w.shape
  eff = _np_scales(w.astype(np.float32), fmt)
  dead = np.diag(h) == 0
  h[dead, dead] = 1
  w[dead] = 0
  perm = np.argsort(-np.diag(h), kind="stable")
  h, w = h[perm][:, perm], w[perm]
  mean = np.mean(np.diag(h))
  h += damp * mean * np.eye(k)
  for tries in range(1, max_tries + 1):
    try:
      np.linalg.cholesky(h)  # raises unless positive definite
      u = np.linalg.cholesky(np.linalg.inv(h)).T
      break
    except np.linalg.LinAlgError:
      h += 0.1 * damp * mean * np.eye(k)
  codes = np.zeros((k, n), np.int64)
  for start in range(0, k, block):
    end = min(start + block, k)
    wb, errs = w[start:end].copy(), np.zeros((end - start, n))
    for j in range(end - start):
      s = eff[perm[start + j] // fmt.group_size]
      code, value = _np_encode(wb[j] / s, fmt)
      err = (wb[j] - value * s) / u[start + j, start + j]
      wb[j:] -= np.outer(u[start + j, start + j:end], err)
      errs[j], codes[start + j] = err, code
    w[end:] -= u[start:end, end:].T @ errs
  return codes[np.argsort(perm)], tries


@pytest.mark.parametrize("fmt", [qz.INT4, qz.NVFP4], ids=["int4", "nvfp4"])
def test_gptq_matches_float64_numpy(fmt):
  rng = np.random.default_rng(4)
  k, n, rows = 256, 64, 512
  x, (w,) = _layer(5, rows, k, (n,))
  x = x.at[:, 7].set(0.0)  # a dead input channel
  lam = jnp.asarray(np.exp(0.3 * rng.standard_normal(k)), jnp.float32)
  hess = gptq.hessian_from_inputs(x, lam, block_rows=96)  # rows not a multiple of the chunk
  x_hat = np.asarray(x, np.float64) / np.asarray(lam, np.float64)
  ref_h = 2 / rows * x_hat.T @ x_hat
  np.testing.assert_allclose(np.asarray(hess), ref_h, rtol=1e-4, atol=1e-6 * np.abs(ref_h).max())
  res = gptq.gptq_quantize(w, hess, fmt)
  ref_codes, ref_tries = _np_gptq(np.asarray(w), ref_h, fmt)
  codes = np.asarray(res.qweight.codes, np.int64)
  assert bool(res.stable) and int(res.inv_tries) == ref_tries == 1
  same = np.mean(codes == ref_codes)
  assert same > 0.995, same
  np.testing.assert_array_equal(codes[7], 0)
  # static groups: the scales are RTN's scales of the full kernel
  rtn = qz.quantize_weight(w, fmt)
  np.testing.assert_array_equal(np.asarray(res.qweight.scales.astype(jnp.float32)),
                                np.asarray(rtn.scales.astype(jnp.float32)))
  # GPTQ lowers the output error on these correlated inputs
  y = x_hat @ np.asarray(w, np.float64)
  err_gptq = relative_error(x_hat @ np.asarray(qz.dequantize_weight(res.qweight, fmt), np.float64), y)
  err_rtn = relative_error(x_hat @ np.asarray(qz.dequantize_weight(rtn, fmt), np.float64), y)
  assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)


def test_shifted_input_statistics():
  """For a shifted (fc2) input the smoothing span and the GPTQ Hessian are those of ``x + δ``, the
  tensor λ divides (zero padding rows of the Hessian chunks added after the shift: no effect)."""
  rng = np.random.default_rng(41)
  x = jax.nn.gelu(jnp.asarray(rng.standard_normal((100, 128)) * 2, jnp.float32), approximate=True)
  lam = np.exp(rng.uniform(-1, 1, 128)).astype(np.float32)
  xs = np.asarray(x) + np.float32(qz.GELU_SHIFT)
  np.testing.assert_array_equal(np.asarray(smooth.activation_absmax(x, [qz.GELU_SHIFT])), np.abs(xs).max(axis=0))
  np.testing.assert_array_equal(np.asarray(smooth.activation_absmax(x, [0.0, qz.GELU_SHIFT, qz.GELU_SHIFT])),
                                np.maximum(np.abs(xs), np.abs(np.asarray(x))).max(axis=0))
  np.testing.assert_array_equal(np.asarray(smooth.activation_absmax(x)), np.abs(np.asarray(x)).max(axis=0))
  hess = gptq.hessian_from_inputs(x, jnp.asarray(lam), block_rows=48, shift=qz.GELU_SHIFT)
  x_tilde = xs.astype(np.float64) / lam
  ref = 2 / 100 * x_tilde.T @ x_tilde
  np.testing.assert_allclose(np.asarray(hess), ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_gptq_damping_retries():
  k = 128
  e = np.zeros(k)
  e[3] = e[90] = np.sqrt(0.5)
  hess = np.eye(k) - 1.0255 * np.outer(e, e)  # one eigenvalue -0.0255: 17 dampings needed
  w = np.random.default_rng(6).standard_normal((k, 32)).astype(np.float32)
  res = gptq.gptq_quantize(jnp.asarray(w), jnp.asarray(hess, jnp.float32), qz.INT4)
  _, ref_tries = _np_gptq(w, hess, qz.INT4)
  assert bool(res.stable) and int(res.inv_tries) == ref_tries == 17
  hopeless = gptq.gptq_quantize(jnp.asarray(w), -jnp.eye(k), qz.INT4)
  assert not bool(hopeless.stable) and int(hopeless.inv_tries) == 250
  # without a usable inverse the static-scale RTN codes are returned
  rtn_codes = qz.quantize_weight(jnp.asarray(w), qz.INT4).codes
  np.testing.assert_array_equal(np.asarray(hopeless.qweight.codes), np.asarray(rtn_codes))


# ----------------------------------------------------------------------------- whole-layer entry point
GROUP_SETTINGS = dict(rank=8, grid=smooth.alpha_beta_grid(3), lowrank_iters=4, gptq=True)


def test_quantize_linear_group_vmap_matches_loop():
  xs, kernels = [], [[], []]
  for seed in (7, 8):
    x, ks = _layer(seed, 64, 128, (96, 64))
    xs.append(x)
    for i, w in enumerate(ks):
      kernels[i].append(w)
  xs = jnp.stack(xs)
  stacked = [jnp.stack(ks) for ks in kernels]
  biases = [jnp.linspace(-1, 1, 96), None]
  looped = [sq.quantize_linear_group([stacked[0][g], stacked[1][g]], [biases[0], None], xs[g], qz.INT4,
                                     return_info=True, name=f"block_{g}", **GROUP_SETTINGS) for g in range(2)]
  batched, info = sq.quantize_linear_groups(stacked, [jnp.stack([biases[0]] * 2), None], xs, qz.INT4,
                                            names=["block_0", "block_1"], return_info=True, **GROUP_SETTINGS)
  for g, (layers, linfo) in enumerate(looped):
    assert int(info.smooth_index[g]) == int(linfo.smooth_index)
    assert [int(b[g]) for b in info.lowrank_best] == [int(b) for b in linfo.lowrank_best]
    for i, layer in enumerate(layers):
      got = jax.tree.map(lambda a: a[g], batched[i])
      for field in ("smooth", "residual", "lora_a", "lora_b", "bias"):
        np.testing.assert_allclose(np.asarray(getattr(got, field)), np.asarray(getattr(layer, field)),
                                   rtol=1e-4, atol=1e-4 * float(jnp.abs(getattr(layer, field)).max()) + 1e-12)
      assert np.mean(np.asarray(got.residual_q.codes) == np.asarray(layer.residual_q.codes)) > 0.999
  # the pipeline works: each stage improves the first group's output error
  x, w_qkv = xs[0], stacked[0][0]
  layers = looped[0][0]
  y = np.asarray(x, np.float64) @ np.asarray(w_qkv, np.float64) + np.asarray(biases[0])
  err_svdq = relative_error(_fake_forward(x, layers[0], qz.INT4, 0.0), y)
  err_rtn = relative_error(_fake_forward(x, sq.plain_weights(w_qkv, biases[0]), qz.INT4, 0.0), y)
  assert err_svdq < 0.5 * err_rtn, (err_svdq, err_rtn)


def test_quantize_linear_group_rejects_bad_input():
  x, (w,) = _layer(9, 16, 128, (64,))
  with pytest.raises(qz.QuantizationError, match="attn.to_qkv: x_samples contains NaN"):
    sq.quantize_linear_group([w], None, x.at[3, 5].set(jnp.nan), qz.INT4, name="attn.to_qkv")
  with pytest.raises(qz.QuantizationError, match="ff.net.2: x_samples contains NaN or Inf"):
    sq.quantize_linear_group([w], None, x.at[0, 0].set(jnp.inf), qz.INT4, name="ff.net.2")
  with pytest.raises(ValueError, match="proj_out: input dimension K=96 is not divisible by the group size 64"):
    sq.quantize_linear_group([w[:96]], None, x[:, :96], qz.INT4, name="proj_out")
  with pytest.raises(qz.QuantizationError, match="same K"):
    sq.quantize_linear_group([w, w[:64]], None, x, qz.INT4, name="mixed")
  with pytest.raises(qz.QuantizationError, match="rank 100"):
    sq.quantize_linear_group([w], None, x, qz.INT4, rank=100, name="tiny")
  xs = jnp.stack([x, x.at[2, 2].set(jnp.nan)])
  with pytest.raises(qz.QuantizationError, match="single_1: x_samples contains NaN"):
    sq.quantize_linear_groups([jnp.stack([w, w])], None, xs, qz.INT4, names=["single_0", "single_1"])
