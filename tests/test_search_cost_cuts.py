"""The search cost cuts (issue 13 item 2): bf16 loss evaluations, successive halving of the smoothing
grid, the exact mode, and the cost model's counts of them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.flows import ptq_config
from svdquant_jax.formats.quantizers import FORMATS, GELU_SHIFT
from svdquant_jax.quant import cost_model as cm
from svdquant_jax.quant import smooth
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.quant.svdquant import fake_forward, quantize_linear_group

# Small and fast: 7 smoothing pairs, rank 8, 6 SVD steps.
_SMALL = dict(rank=8, num_grids=4, lowrank_iters=3, svd_iters=6, candidate_batch=2)


def _outlier_group(seed=0, tokens=512, k=64, n=128):
  """A group with activation outlier channels (the smoothing grid's losses differ by orders of magnitude)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  scale = jnp.where(jnp.arange(k) % 13 == 0, 40.0, 1.0)
  x = jax.random.normal(keys[0], (tokens, k)) * scale
  w = jax.random.normal(keys[1], (k, n)) / math.sqrt(k)
  w = w * jnp.exp(0.5 * jax.random.normal(keys[2], (k, 1)))
  return x, w


def _arrays(layers):
  return [np.asarray(a) for l in layers for a in (l.smooth, l.residual, l.lora_a, l.lora_b)]


def test_exact_mode_reproduces_the_default_search_bit_for_bit():
  x, w = _outlier_group(0)
  w2 = _outlier_group(1)[1][:, :64]
  default = PTQSettings(fmt=FORMATS["int4"], gptq=True, **_SMALL)
  assert default.exact_search  # the dataclass defaults are today's search
  fast = default.replace(loss_dtype="bfloat16", halving_tokens=64, halving_keep=0.4)
  assert not fast.exact_search and fast.exact() == default
  # The config's exact mode gives the same settings whatever the other search fields say.
  config = ptq_config.compose("flux-tiny,int4")
  config.quant.search.mode = "exact"
  assert PTQSettings.from_config(config).replace(**_SMALL, gptq=True, fmt=default.fmt) == default
  shifts = [GELU_SHIFT, GELU_SHIFT]
  want, want_info = quantize_linear_group([w, w2], None, x, default, shifts=shifts, return_info=True)
  got, got_info = quantize_linear_group([w, w2], None, x, fast.exact(), shifts=shifts, return_info=True)
  for a, b in zip(_arrays(want), _arrays(got)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(want, got):  # the GPTQ codes and scales
    np.testing.assert_array_equal(np.asarray(a.residual_q.codes), np.asarray(b.residual_q.codes))
    np.testing.assert_array_equal(np.asarray(a.residual_q.scales), np.asarray(b.residual_q.scales))
  np.testing.assert_array_equal(np.asarray(want_info.smooth_losses), np.asarray(got_info.smooth_losses))
  # The exhaustive losses are the linear-level loss of each one-shot candidate (the search's definition).
  grid = default.smoothing_grid
  loss = smooth.linear_output_loss(x, [w, w2], None, default.fmt, [GELU_SHIFT] * 2)
  lam = smooth.smooth_scale(smooth.activation_absmax(x, [GELU_SHIFT]), smooth.weight_absmax([w, w2]), *grid[3])
  cands = [smooth.one_shot_candidate(k, lam, jnp.zeros((k.shape[1],)), 8, 6) for k in (w, w2)]
  assert float(loss(cands)) == pytest.approx(float(got_info.smooth_losses[3]), rel=1e-5)


def test_bf16_loss_picks_the_same_candidate_where_the_gaps_are_large():
  x, w = _outlier_group(2)
  exact = PTQSettings(fmt=FORMATS["int4"], **_SMALL)
  (we,), ie = quantize_linear_group([w], None, x, exact, shifts=[GELU_SHIFT], return_info=True)
  (wb,), ib = quantize_linear_group([w], None, x, exact.replace(loss_dtype="bfloat16"), shifts=[GELU_SHIFT],
                                    return_info=True)
  le, lb = np.asarray(ie.smooth_losses), np.asarray(ib.smooth_losses)
  assert le.max() / le.min() > 10  # large gaps between the candidates
  np.testing.assert_allclose(lb, le, rtol=0.02)  # the bf16 loss is within 2% of the float32 one
  assert not np.array_equal(lb, le)  # ... and really computed differently
  assert int(ib.smooth_index) == int(ie.smooth_index)
  np.testing.assert_array_equal(np.asarray(wb.smooth), np.asarray(we.smooth))
  # The chosen candidate's quantities are float32 as before: same λ, and the same branch when the
  # alternating loop keeps the same iteration.
  if int(ib.lowrank_best[0]) == int(ie.lowrank_best[0]):
    np.testing.assert_array_equal(np.asarray(wb.lora_a), np.asarray(we.lora_a))
  # The bf16 forward is fake_forward with bf16 operands: close, not equal.
  y32 = fake_forward(x, we, exact.fmt, GELU_SHIFT)
  y16 = smooth.loss_forward(x, we, exact.fmt, GELU_SHIFT, "bfloat16")
  rel = float(jnp.linalg.norm(y16 - y32) / jnp.linalg.norm(y32))
  assert 1e-5 < rel < 1e-2
  with pytest.raises(ValueError, match="loss_dtype"):
    exact.replace(loss_dtype="float16")


def test_halving_schedule_numbers():
  assert smooth.halving_schedule(39, 131072, 4096, 0.5) == (
      (39, 4096), (20, 8192), (10, 16384), (5, 32768), (3, 65536), (2, 131072))
  assert smooth.halving_schedule(7, 100, 10, 1 / 3) == ((7, 10), (3, 30))
  assert smooth.halving_schedule(9, 100, 10, 1 / 3) == ((9, 10), (3, 30))
  assert smooth.halving_schedule(3, 50, 40, 0.9) == ((3, 40), (2, 45))  # at least one fewer per round
  assert smooth.halving_schedule(1, 50, 40) == ()
  with pytest.raises(smooth.QuantizationError, match="keep"):
    smooth.halving_schedule(5, 50, 10, 1.0)


def test_halving_is_deterministic_and_finds_the_clear_winner():
  x, w = _outlier_group(8, tokens=1024)
  exact = PTQSettings(fmt=FORMATS["int4"], **_SMALL).replace(lowrank_iters=1)
  halving = exact.replace(halving_tokens=64, halving_keep=0.5)  # rounds (7, 64), (4, 128), (2, 256)
  (we,), ie = quantize_linear_group([w], None, x, exact, return_info=True)
  le = np.asarray(ie.smooth_losses)
  best = int(ie.smooth_index)
  assert np.sort(le)[1] > 1.2 * le[best]  # a clear winner (the runner-up 20% above it)
  (w1,), i1 = quantize_linear_group([w], None, x, halving, return_info=True)
  (w2,), i2 = quantize_linear_group([w], None, x, halving, return_info=True)
  assert int(i1.smooth_index) == best
  np.testing.assert_array_equal(np.asarray(i1.smooth_losses), np.asarray(i2.smooth_losses))
  np.testing.assert_array_equal(np.asarray(w1.residual), np.asarray(w2.residual))
  np.testing.assert_array_equal(np.asarray(w1.smooth), np.asarray(we.smooth))
  # Rounds (7, 64), (4, 128), (2, 256): the winner's loss is its loss on the last round's 256 tokens
  # scaled by 1024 / 256; the candidates dropped after round 1 keep their scaled round-1 loss.
  l1 = np.asarray(i1.smooth_losses)
  assert l1[best] == pytest.approx(le[best], rel=0.5) and l1[best] != le[best]
  # Another seed draws other tokens: still the winner, other losses.
  (_,), i3 = quantize_linear_group([w], None, x, halving.replace(token_seed=7), return_info=True)
  assert int(i3.smooth_index) == best and not np.array_equal(np.asarray(i3.smooth_losses), l1)
  # With the subset covering every token the exhaustive search runs, bit for bit.
  (_,), i4 = quantize_linear_group([w], None, x, exact.replace(halving_tokens=1024), return_info=True)
  np.testing.assert_array_equal(np.asarray(i4.smooth_losses), le)


def test_halving_with_a_shared_branch_matches_its_candidates():
  x, w = _outlier_group(5, tokens=512)
  w2 = _outlier_group(6)[1][:, :32]
  fmt, grid = FORMATS["nvfp4"], smooth.alpha_beta_grid(4)
  loss = smooth.linear_output_loss(x, [w, w2], None, fmt)
  x_absmax = smooth.activation_absmax(x)
  found = smooth.search_smoothing([w, w2], x_absmax, loss, fmt, rank=8, grid=grid, svd_iters=6, shared_branch=True,
                                  halving_tokens=128, halving_keep=0.5)
  # Rounds (7, 128), (4, 256), (2, 512): the winner's loss is its full loss, recomputed here from the
  # shared-branch candidates of its λ; a candidate dropped after round 1 has its round-1 loss x 4.
  index = int(found.index)
  lam = smooth.smooth_scale(x_absmax, smooth.weight_absmax([w, w2]), *grid[index])
  np.testing.assert_allclose(np.asarray(found.smooth), np.asarray(lam), rtol=1e-6)  # jitted pow: 1 ulp
  zeros = [jnp.zeros((128,)), jnp.zeros((32,))]
  cands = smooth.shared_one_shot_candidates([w, w2], lam, zeros, 8, 6)
  assert float(found.losses[index]) == pytest.approx(float(loss(cands)), rel=1e-4)
  losses = np.asarray(found.losses)
  dropped = [i for i in range(len(grid)) if losses[i] > np.sort(losses)[3]]  # not among the 4 best
  i = dropped[0]
  lam_i = smooth.smooth_scale(x_absmax, smooth.weight_absmax([w, w2]), *grid[i])
  first = loss.take_tokens(128, 0)(smooth.shared_one_shot_candidates([w, w2], lam_i, zeros, 8, 6))
  assert losses[i] == pytest.approx(4 * float(first), rel=1e-4)


def test_cost_model_counts_the_cuts_from_the_shapes():
  k, n, t, r = 64, 256, 1024, 4
  group = cm.GroupShape("g", ((k, n),), (t,))
  full = cm.group_flops(group, rank=r, candidates=7, lowrank_iters=2, svd_iters=1)
  cut = cm.group_flops(group, rank=r, candidates=7, lowrank_iters=2, svd_iters=1, halving_tokens=128,
                       halving_keep=0.5)
  # rounds (7, 128), (4, 256), (2, 512): 7/8 + 4/4 + 2/2 = 2.875 full loss evaluations instead of 7
  assert cm.smoothing_rounds(group, 7, 128, 0.5) == ((7, 0.125), (4, 0.25), (2, 0.5))
  per_token = 2 * k * n + 2 * k * r + 2 * r * n
  assert full["smooth_loss"] == 7 * t * per_token
  assert cut["smooth_loss"] == (7 * 128 + 4 * 256 + 2 * 512) * per_token
  # the 7 SVDs stay, and rounds 2 and 3 recompute 4 + 2 residuals
  assert cut["smooth_svd"] == full["smooth_svd"] + (4 + 2) * 2 * k * r * n
  assert cut["lowrank_loss"] == full["lowrank_loss"] and cut["lowrank_svd"] == full["lowrank_svd"]
  # A module-level loss over 2048 tokens: its forward scales with the subset; without module cuts
  # it stays exhaustive.
  module = cm.GroupShape("m", ((k, n),), (t,), eval_flops=1e9, eval_tokens=2048)
  assert cm.group_flops(module, rank=r, candidates=7, halving_tokens=128)["smooth_loss"] == pytest.approx(
      (7 / 16 + 4 / 8 + 2 / 4) * 1e9)
  assert cm.group_flops(module, rank=r, candidates=7, halving_tokens=128, module_cuts=False)["smooth_loss"] == 7e9
  # bf16 losses: the same FLOPs, the loss part at the bf16 rate.
  flops = cm.block_flops([group], 0.0, rank=r, candidates=7, lowrank_iters=2, svd_iters=1)
  loss = flops["smooth_loss"] + flops["lowrank_loss"]
  assert cm.estimate_mixed_seconds(flops, "bfloat16", 1e9, 1e10) == pytest.approx(
      (flops["total"] - loss) / 1e9 + loss / 1e10)
  assert cm.estimate_mixed_seconds(flops, "float32", 1e9, 1e10) == pytest.approx(flops["total"] / 1e9)


def test_block_level_losses_take_the_options():
  """The PTQ flow's own losses (quant/block_calib.py) run at the loss dtype and on token subsets."""
  from svdquant_jax.quant import block_calib
  rng = np.random.default_rng(7)
  fmt = FORMATS["int4"]
  xs = [jnp.asarray(rng.standard_normal((t, 128)), jnp.float32) for t in (96, 40)]   # different inputs per layer
  kernels = [jnp.asarray(rng.standard_normal((128, 64)) / 11, jnp.float32) for _ in xs]
  loss = block_calib.layer_outputs_loss(xs, kernels, [None, None], fmt, [0.0, 0.0])
  lam = jnp.ones((128,), jnp.float32)
  cands = [smooth.one_shot_candidate(w, lam, jnp.zeros((64,), jnp.float32), 8) for w in kernels]
  full = float(loss(cands))
  want = sum(float(jnp.sum(jnp.square(fake_forward(x, c, fmt) - x @ w))) for x, w, c in zip(xs, kernels, cands))
  assert abs(full - want) <= 1e-5 * want
  low = float(smooth.with_loss_dtype(loss, "bfloat16")(cands))
  assert low != full and abs(low - full) <= 0.02 * full
  assert loss.num_tokens == 96
  sub = loss.take_tokens(32, seed=3)
  assert [x.shape[0] for x in sub.xs] == [32, 32]
  rows = smooth.seeded_rows(40, 32, 3)
  np.testing.assert_array_equal(np.asarray(sub.xs[1]), np.asarray(xs[1])[np.asarray(rows)])
  assert loss.take_tokens(96, seed=3) is loss
