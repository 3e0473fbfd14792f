"""A low-rank branch shared by the layers that read one input (deepcompressor's ``exclusive: false``).

q, k, v kept as three kernels: ``quantize_linear_group(..., shared_branch=True)`` refines one
branch on the concatenated ``[K, N_q + N_k + N_v]`` smoothed kernel; every layer carries the same
``lora_a`` and its columns of ``lora_b``, residual and bias, and the smoothing search scores its
candidates with that structure.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.formats import quantizers as qz
from svdquant_jax.quant import lowrank, smooth
from svdquant_jax.quant import svdquant as sq

K, NS, RANK = 128, (64, 64, 64), 16
SETTINGS = dict(rank=RANK, grid=smooth.alpha_beta_grid(2), lowrank_iters=4, svd_iters=12)
_fake_forward = jax.jit(sq.fake_forward, static_argnums=(2, 3))


def _qkv(seed, rows=256):
  """Attention-like inputs with 10-50x outlier channels, and three kernels with heavy-tailed rows
  and a decaying spectrum (q, k, v of one input)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, K))
  x[:, rng.choice(K, 6, replace=False)] *= rng.uniform(10, 50, 6)
  rows_scale = np.exp(0.5 * rng.standard_t(3, size=(K, 1)).clip(-6, 6))
  kernels, biases = [], []
  for n in NS:
    u, _ = np.linalg.qr(rng.standard_normal((K, 32)))
    v, _ = np.linalg.qr(rng.standard_normal((n, 32)))
    w = ((u * 0.9 ** np.arange(32)) @ v.T + 0.03 * rng.standard_normal((K, n))) * rows_scale
    kernels.append(jnp.asarray(w, jnp.float32))
    biases.append(jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32))
  return jnp.asarray(x, jnp.float32), kernels, biases


def _group_error(x, kernels, biases, layers, fmt=qz.INT4):
  """Relative output error of the group: sqrt(Σ_i ||y_i - ŷ_i||² / Σ_i ||y_i||²)."""
  x64 = np.asarray(x, np.float64)
  num = den = 0.0
  for w, b, layer in zip(kernels, biases, layers):
    y = x64 @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    num += np.sum((np.asarray(_fake_forward(x, layer, fmt, 0.0), np.float64) - y) ** 2)
    den += np.sum(y ** 2)
  return float(np.sqrt(num / den))


@pytest.fixture(scope="module")
def qkv_runs():
  x, kernels, biases = _qkv(0)
  shared, info = sq.quantize_linear_group(kernels, biases, x, qz.INT4, shared_branch=True, return_info=True,
                                          **SETTINGS)
  separate = sq.quantize_linear_group(kernels, biases, x, qz.INT4, shared_branch=False, **SETTINGS)
  return x, kernels, biases, shared, info, separate


def test_shared_branch_splits_one_factorization_of_the_concatenated_kernel(qkv_runs):
  _, kernels, biases, shared, info, separate = qkv_runs
  a = np.asarray(shared[0].lora_a)
  assert a.shape == (K, RANK)
  for layer, w, b in zip(shared, kernels, biases):
    np.testing.assert_array_equal(np.asarray(layer.lora_a), a)
    np.testing.assert_array_equal(np.asarray(layer.smooth), np.asarray(shared[0].smooth))
    np.testing.assert_array_equal(np.asarray(layer.bias), np.asarray(b))
    assert layer.lora_b.shape == (RANK, w.shape[1]) and layer.residual.shape == w.shape
  assert not np.array_equal(np.asarray(separate[0].lora_a), np.asarray(separate[1].lora_a))
  # diag(λ) W_concat = R + A B with R, B the column-wise concatenations of the layers' pieces
  lam = np.asarray(shared[0].smooth, np.float64)
  w_hat = lam[:, None] * np.concatenate([np.asarray(w, np.float64) for w in kernels], axis=1)
  recon = (np.concatenate([np.asarray(l.residual, np.float64) for l in shared], axis=1)
           + a.astype(np.float64) @ np.concatenate([np.asarray(l.lora_b, np.float64) for l in shared], axis=1))
  assert np.linalg.norm(recon - w_hat) / np.linalg.norm(w_hat) < 1e-6
  # one refinement for the group: its losses are reported for every kernel
  for losses, best in zip(info.lowrank_losses, info.lowrank_best):
    np.testing.assert_array_equal(np.asarray(losses), np.asarray(info.lowrank_losses[0]))
    assert int(best) == int(info.lowrank_best[0])


def test_shared_branch_error_against_separate_branches_and_rtn(qkv_runs):
  x, kernels, biases, shared, _, separate = qkv_runs
  err_shared = _group_error(x, kernels, biases, shared)
  err_separate = _group_error(x, kernels, biases, separate)
  err_rtn = _group_error(x, kernels, biases, [sq.plain_weights(w, b) for w, b in zip(kernels, biases)])
  print(f"W4A4 rank {RANK} q/k/v output error: shared {err_shared:.4f}, separate {err_separate:.4f}, "
        f"RTN without branch {err_rtn:.4f}")
  # one rank-16 branch for three layers has a third of the down-projections of three branches
  assert err_shared < 1.5 * err_separate, (err_shared, err_separate)
  assert err_shared < 0.5 * err_rtn, (err_shared, err_rtn)


def test_default_is_one_branch_per_kernel(qkv_runs):
  x, kernels, biases, _, _, separate = qkv_runs
  default = sq.quantize_linear_group(kernels, biases, x, qz.INT4, **SETTINGS)
  for got, want in zip(default, separate):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_one_compilation_per_shapes(qkv_runs):
  del qkv_runs  # has compiled the shared-branch core for these shapes and settings
  if not hasattr(sq._quantize_group_core, "_cache_size"):
    pytest.skip("this jax version does not expose the jit cache size")
  compiled = sq._quantize_group_core._cache_size()
  x2, kernels2, biases2 = _qkv(1)
  again = sq.quantize_linear_group(kernels2, biases2, x2, qz.INT4, shared_branch=True, **SETTINGS)
  assert sq._quantize_group_core._cache_size() == compiled
  np.testing.assert_array_equal(np.asarray(again[0].lora_a), np.asarray(again[2].lora_a))


def test_smoothing_candidates_are_scored_with_the_shared_branch():
  x, kernels, biases = _qkv(2, rows=128)
  fmt, rank, grid = qz.INT4, 8, smooth.alpha_beta_grid(2)
  loss = smooth.linear_output_loss(x, kernels, biases, fmt)
  found = smooth.search_smoothing(kernels, smooth.activation_absmax(x), loss, fmt, biases=biases, rank=rank,
                                  grid=grid, shared_branch=True)
  # float64 reference: one numpy SVD of the concatenated smoothed kernel per (α, β) pair, vs one per kernel
  x64 = np.asarray(x, np.float64)
  ax = np.abs(x64).max(axis=0)
  aw = np.max([np.abs(np.asarray(w, np.float64)).max(axis=1) for w in kernels], axis=0)
  bounds = np.cumsum((0,) + NS)

  def loss_of(parts):
    total = 0.0
    for (a, b_up, r), w, bias in zip(parts, kernels, biases):
      cand = sq.SVDQuantWeights(jnp.asarray(lam, jnp.float32), jnp.asarray(r, jnp.float32), jnp.asarray(a, jnp.float32),
                                jnp.asarray(b_up, jnp.float32), bias)
      y = x64 @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)
      total += np.sum((np.asarray(_fake_forward(x, cand, fmt, 0.0), np.float64) - y) ** 2)
    return total

  def svd(m):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank, None] * vt[:rank]

  want_shared, want_separate = [], []
  for alpha, beta in grid:
    lam = np.ones_like(ax) if alpha == beta == 0 else ax ** alpha / aw ** beta
    w_hat = lam[:, None] * np.concatenate([np.asarray(w, np.float64) for w in kernels], axis=1)
    a, b_up = svd(w_hat)
    res = w_hat - a @ b_up
    want_shared.append(loss_of([(a, b_up[:, i:j], res[:, i:j]) for i, j in itertools.pairwise(bounds)]))
    separate = []
    for i, j in itertools.pairwise(bounds):
      a_i, b_i = svd(w_hat[:, i:j])
      separate.append((a_i, b_i, w_hat[:, i:j] - a_i @ b_i))
    want_separate.append(loss_of(separate))
  np.testing.assert_allclose(np.asarray(found.losses), want_shared, rtol=1e-4)
  assert np.all(np.abs(np.asarray(want_separate) / np.asarray(want_shared) - 1) > 1e-3)  # the structures differ


def test_each_layer_keeps_its_own_nvfp4_tensor_scale():
  rng = np.random.default_rng(3)
  r = jnp.asarray(np.concatenate([rng.standard_normal((K, 32)), 20 * rng.standard_normal((K, 48))], axis=1),
                  jnp.float32)
  columns = jax.jit(lowrank.quantize_columns, static_argnums=(1, 2))
  whole = jax.jit(qz.fake_quant_weight, static_argnums=1)
  per_layer = np.asarray(columns(r, qz.NVFP4, (32, 48)))
  np.testing.assert_array_equal(per_layer, np.concatenate([whole(r[:, :32], qz.NVFP4), whole(r[:, 32:], qz.NVFP4)],
                                                          axis=1))
  assert not np.array_equal(per_layer, np.asarray(whole(r, qz.NVFP4)))
  # INT4 groups run along K within one column: splitting the columns changes nothing
  np.testing.assert_array_equal(np.asarray(columns(r, qz.INT4, (32, 48))), np.asarray(whole(r, qz.INT4)))


def test_shared_rank_is_bounded_by_the_concatenated_width():
  x, kernels, biases = _qkv(4, rows=16)
  sq.validate_group_inputs(kernels, biases, x, qz.INT4, rank=100, shared_branch=True)
  with pytest.raises(qz.QuantizationError, match="rank 100 must be in"):
    sq.validate_group_inputs(kernels, biases, x, qz.INT4, rank=100)
  with pytest.raises(qz.QuantizationError, match="rank 129 of the shared branch"):
    sq.validate_group_inputs(kernels, biases, x, qz.INT4, rank=129, shared_branch=True)
  whole = sq.SVDQuantWeights(jnp.ones(K), jnp.zeros((K, 192)), jnp.zeros((K, 4)), jnp.zeros((4, 192)), jnp.zeros(192))
  with pytest.raises(qz.QuantizationError, match="do not split"):
    lowrank.split_columns(whole, (64, 64))
