"""Learned refinement (quant/refine.py): never worse than its start, deterministic, off by default,
deployable as calibrated, and GPTQ codes untouched.

The layers are a small group of two kernels reading GELU outputs with a few 10-50x outlier channels
(kernel 1 with the fc2 shift δ), calibrated on 256 tokens and checked on 256 held-out ones.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.flows import ptq_config
from svdquant_jax.formats import quantizers as qz
from svdquant_jax.pallas import svdquant_linear
from svdquant_jax.quant import smooth
from svdquant_jax.quant import svdquant as sq
from svdquant_jax.quant.deploy import to_quantized_linear
from svdquant_jax.quant.refine import RefineSettings, ste_forward
from svdquant_jax.quant.settings import PTQSettings

BASE = dict(rank=8, grid=smooth.alpha_beta_grid(2), lowrank_iters=2, svd_iters=12)
SHIFTS = (0.0, qz.GELU_SHIFT)
REFINE = RefineSettings(steps=40, lr=1e-2)


def _group(seed=0, rows=256, k=128):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * rows, k))
  x[:, rng.choice(k, 6, replace=False)] *= rng.uniform(10, 50, 6)
  x = jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=True)
  kernels, biases = [], []
  for n in (64, 96):
    w = rng.standard_normal((k, n)) * np.exp(0.5 * rng.standard_t(3, size=(k, 1)).clip(-6, 6)) / np.sqrt(k)
    kernels.append(jnp.asarray(w, jnp.float32))
    biases.append(jnp.asarray(0.1 * rng.standard_normal(n), jnp.float32))
  return x[:rows], x[rows:], kernels, biases


@pytest.fixture(scope="module")
def group():
  return _group()


def _run(group, fmt=qz.INT4, **overrides):
  x, _, kernels, biases = group
  return sq.quantize_linear_group(kernels, biases, x, fmt, shifts=SHIFTS, return_info=True,
                                  **{**BASE, **overrides})


def _loss(group, layers, fmt=qz.INT4, held_out=False):
  x, x_eval, kernels, biases = group
  loss = smooth.linear_output_loss(x_eval if held_out else x, kernels, biases, fmt, SHIFTS)
  return float(loss(list(layers)))


@pytest.mark.parametrize("fmt", [qz.INT4, qz.NVFP4], ids=["int4", "nvfp4"])
def test_refinement_lowers_the_loss_it_optimizes_and_never_raises_it(group, fmt):
  exact, _ = _run(group, fmt)
  refined, info = _run(group, fmt, refine=REFINE)
  before, after = _loss(group, exact, fmt), _loss(group, refined, fmt)
  np.testing.assert_allclose(float(info.refine.loss_before), before, rtol=1e-5)
  np.testing.assert_allclose(float(info.refine.loss_after), after, rtol=1e-5)
  assert bool(info.refine.accepted) and after < 0.97 * before, (before, after)
  losses = np.asarray(info.refine.losses)
  assert losses.shape == (REFINE.steps + 1,) and losses[int(info.refine.best_step)] == losses.min() <= losses[0]
  # The start of the scan is the exact layer: its STE objective is the (relative) fake-quant loss.
  x, _, kernels, biases = group
  norm = sum(float(jnp.sum((x @ w + b) ** 2)) for w, b in zip(kernels, biases))
  np.testing.assert_allclose(losses[0], before / norm, rtol=1e-4)


def test_refinement_that_cannot_help_returns_the_start_unchanged(group):
  """A learning rate so large every step overshoots: the start (step 0) is kept, bit for bit, with
  the RTN codes of its residual in ``residual_q`` (the same function and deployed codes)."""
  exact, _ = _run(group)
  refined, info = _run(group, refine=RefineSettings(steps=5, lr=50.0))
  assert int(info.refine.best_step) == 0 and not bool(info.refine.accepted)
  assert float(info.refine.loss_after) == float(info.refine.loss_before) == _loss(group, refined)
  rtn = [dataclasses.replace(w, residual_q=qz.quantize_weight(w.residual, qz.INT4)) for w in exact]
  for a, b in zip(jax.tree_util.tree_leaves(rtn), jax.tree_util.tree_leaves(refined)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  x = group[0]
  for w, r, shift in zip(exact, refined, SHIFTS):
    np.testing.assert_array_equal(np.asarray(sq.fake_forward(x, w, qz.INT4, shift)),
                                  np.asarray(sq.fake_forward(x, r, qz.INT4, shift)))


def test_refinement_is_deterministic_given_the_seed(group):
  settings = RefineSettings(steps=20, tokens=64, seed=3)
  one, _ = _run(group, refine=settings)
  two, _ = _run(group, refine=settings)
  other, _ = _run(group, refine=dataclasses.replace(settings, seed=4))
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(two)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(one[0].lora_b), np.asarray(other[0].lora_b))


def test_refinement_is_off_by_default_and_in_the_exact_presets():
  for parts in ("flux-tiny,int4", "flux-tiny,nvfp4", "flux-tiny,int4,gptq", "flux-dev,int4"):
    assert PTQSettings.from_config(ptq_config.compose(parts)).refine == RefineSettings()
  assert PTQSettings().refine.steps == 0 and not PTQSettings().refine.enabled
  c = ptq_config.compose("flux-tiny,int4-refined")
  s = PTQSettings.from_config(c)
  assert c.quant.name == "svdq-int4-refined" and s.refine.steps == ptq_config.REFINE_STEPS > 0
  assert s.fmt.weight == "int4" and s.rank == 32
  assert ptq_config.compose("flux-tiny,nvfp4,gptq,refine").quant.name == "svdq-nvfp4-gptq-refined"
  with pytest.raises(ValueError, match="shared_branch"):
    PTQSettings(shared_branch=True, refine=RefineSettings(steps=1))
  with pytest.raises(ValueError, match="pieces"):
    RefineSettings(pieces=("clipping",))


def test_steps_zero_reproduces_the_exact_pipeline_bit_for_bit(group):
  exact, info = _run(group)
  zero, _ = _run(group, refine=RefineSettings(steps=0, lr=0.5, seed=9))
  assert info.refine is None
  for a, b in zip(jax.tree_util.tree_leaves(exact), jax.tree_util.tree_leaves(zero)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("gptq", [True, False], ids=["gptq", "rtn"])
def test_refined_layer_keeps_its_codes_and_deploys_as_calibrated(group, gptq):
  """The residual codes are those the search (RTN) or GPTQ left; deployed == fake_forward."""
  x, _, _, _ = group
  start, _ = _run(group, gptq=gptq)
  refined, info = _run(group, gptq=gptq, refine=REFINE)
  assert bool(info.refine.accepted)
  for s, r, shift in zip(start, refined, SHIFTS):
    codes = s.residual_q if gptq else qz.quantize_weight(s.residual, qz.INT4)
    np.testing.assert_array_equal(np.asarray(codes.codes), np.asarray(r.residual_q.codes))
    np.testing.assert_array_equal(np.asarray(s.residual), np.asarray(r.residual))
    assert not np.array_equal(np.asarray(s.lora_a), np.asarray(r.lora_a))
    assert not np.array_equal(np.asarray(s.smooth), np.asarray(r.smooth))
    ql = to_quantized_linear(r, qz.INT4, shift=shift, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(ql.weight_codes()), np.asarray(r.residual_q.codes))
    y = np.asarray(svdquant_linear(x, ql, backend="reference"), np.float64)
    want = np.asarray(sq.fake_forward(x, r, qz.INT4, shift), np.float64)
    assert np.abs(y - want).max() / np.abs(want).max() < 2e-6


def test_ste_forward_value_is_fake_forward(group):
  x, _, _, _ = group
  layers, _ = _run(group)
  for w, shift in zip(layers, SHIFTS):
    w = dataclasses.replace(w, residual_q=qz.quantize_weight(w.residual, qz.INT4))
    got = np.asarray(ste_forward(x, w, qz.INT4, sq.act_shift(qz.INT4, shift)))
    want = np.asarray(sq.fake_forward(x, w, qz.INT4, shift))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
