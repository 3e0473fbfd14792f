"""The PTQ cost model (quant/cost_model.py): FLOP formulas against hand counts and XLA's own count."""

import jax
import jax.numpy as jnp
import pytest

from svdquant_jax.formats.quantizers import FORMATS
from svdquant_jax.quant import cost_model as cm
from svdquant_jax.quant import lowrank, smooth


def _xla_flops(fn, *args) -> float:
  """XLA's FLOP count of the compiled function (a while loop's body is counted once)."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_linear_loss_flops_hand_count():
  group = cm.GroupShape("g", ((8, 4), (8, 6)), (5, 3))
  # layer 1: x W 2*5*8*4, branch 2*5*8*2 + 2*5*2*4; layer 2: 2*3*8*6, 2*3*8*2 + 2*3*2*6
  assert cm.linear_loss_flops(group, rank=2) == 320 + 160 + 80 + 288 + 96 + 72
  assert cm.linear_loss_flops(group, rank=0) == 320 + 288


def test_svd_flops_hand_count_per_step():
  k, n, r = 64, 256, 4  # m = r + oversample = 8
  per_step = 2 * (2 * 64 * 256 * 8) + 3 * (3 * 256 * 8 * 8) + 3 * (3 * 64 * 8 * 8)
  assert cm.svd_flops(k, n, r, 3, 4) - cm.svd_flops(k, n, r, 2, 4) == per_step
  # no steps: projection Qᵀ W and the Ritz basis only
  assert cm.svd_flops(k, n, r, 0, 4) == 2 * 8 * 64 * 256 + 2 * 64 * 8 * 8
  assert cm.svd_flops(k, n, 0) == 0
  # m = min(K, N): the basis spans everything, no iteration
  assert cm.svd_flops(8, 16, 4, 40, 4) == cm.svd_flops(8, 16, 4, 0, 4)


def test_svd_flops_matches_xla_count():
  w = jax.random.normal(jax.random.key(0), (64, 256), jnp.float32)
  xla = _xla_flops(lambda a: lowrank.svd_lowrank(a, 4, 1, 4), w)
  model = cm.svd_flops(64, 256, 4, 1, 4)
  assert 0.9 * xla <= model <= xla  # the model leaves out the Householder QR and the small SVD


def test_linear_loss_flops_matches_xla_count():
  k, n, t, r = 64, 256, 512, 4
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32)
  x = jax.random.normal(jax.random.key(1), (t, k), jnp.float32)
  loss = smooth.linear_output_loss(x, [w], None, FORMATS["int4"])
  cand = smooth.one_shot_candidate(w, jnp.ones((k,)), jnp.zeros((n,)), r)
  xla = _xla_flops(lambda fn, c: fn([c]), loss, cand)
  model = cm.linear_loss_flops(cm.GroupShape("g", ((k, n),), (t,)), r)
  assert 0.8 * xla <= model <= xla  # the rest is the quantizers' elementwise work


def test_group_flops_stages():
  group = cm.GroupShape("g", ((8, 4), (8, 6)), (5, 3))
  one = cm.candidate_flops(group, 2, svd_iters=1)
  assert one["svd"] == (cm.svd_flops(8, 4, 2, 1) + 2 * 8 * 2 * 4) + (cm.svd_flops(8, 6, 2, 1) + 2 * 8 * 2 * 6)
  out = cm.group_flops(group, rank=2, candidates=3, lowrank_iters=5, svd_iters=1, gptq=True)
  assert out["smooth_svd"] == 3 * one["svd"] and out["smooth_loss"] == 3 * one["loss"]
  # the alternating loop runs per kernel, each scored by its own layer's loss
  assert out["lowrank_svd"] == 5 * one["svd"] and out["lowrank_loss"] == 5 * one["loss"]
  assert out["gptq"] == 2 * 8 * 5 * 8 + 2 * 8 * 8 * 4 + 2 * 8 * 8 * 6
  shared = cm.candidate_flops(group, 2, shared_branch=True, svd_iters=1)
  assert shared["svd"] == cm.svd_flops(8, 10, 2, 1) + 2 * 8 * 2 * 10
  # a module-level loss is the module's forward, once per kernel's iteration
  mod = cm.group_flops(cm.GroupShape("g", group.kernels, group.tokens, eval_flops=1000.0), rank=2, candidates=3,
                       lowrank_iters=5)
  assert mod["smooth_loss"] == 3000.0 and mod["lowrank_loss"] == 2 * 5 * 1000.0


def test_flux_block_groups_shapes_and_token_cap():
  d, s, img, txt = 16, 2, 9, 4
  groups, forward = cm.flux_block_groups("flux_double", d, s, img, txt)
  assert [g.name for g in groups] == ["qkv", "add_qkv", "out", "ff.fc1", "ff.fc2", "ff_context.fc1",
                                      "ff_context.fc2"]
  by_name = {g.name: g for g in groups}
  assert by_name["out"].kernels == ((16, 16), (16, 16)) and by_name["out"].tokens == (18, 8)
  assert by_name["ff.fc2"].kernels == ((64, 16),)
  t, length = s * (img + txt), img + txt
  attn = 2 * t * 16 * 48 + 2 * (2 * s * length * 16 * length) + 2 * t * 16 * 16
  assert by_name["qkv"].eval_flops == attn
  assert forward == attn + 2 * (2 * 18 * 16 * 64) + 2 * (2 * 8 * 16 * 64)
  capped, _ = cm.flux_block_groups("flux_double", d, s, img, txt, max_tokens=10)
  capped = {g.name: g for g in capped}
  assert capped["out"].tokens == (10, 8) and capped["qkv"].eval_flops == attn  # module losses are not capped
  single, fwd = cm.flux_block_groups("flux_single", d, s, img, txt)
  assert single[0].kernels == ((16, 48), (16, 64)) and single[0].eval_flops == fwd
  with pytest.raises(ValueError, match="flux_triple"):
    cm.flux_block_groups("flux_triple", d, s, img, txt)


def test_block_flops_total_and_estimate():
  groups, forward = cm.flux_block_groups("flux_single", 16, 1, 4, 4)
  out = cm.block_flops(groups, forward, rank=2, candidates=3, lowrank_iters=2)
  assert out["total"] == out["smooth"] + out["lowrank"] + out["gptq"] + out["replay"]
  assert out["replay"] == forward and out["gptq"] == 0
  assert cm.estimate_seconds(2e12, 1e12, 0.5) == 4.0
  with pytest.raises(ValueError, match="efficiency"):
    cm.estimate_seconds(1.0, 1e12, 0.0)
  with pytest.raises(ValueError, match="one K"):
    cm.GroupShape("bad", ((8, 4), (16, 4)), (1, 1))


def test_flux_eval_samples_scales_module_losses_only():
  full, fwd = cm.flux_block_groups("flux_single", 16, 8, 9, 4)
  part, fwd_part = cm.flux_block_groups("flux_single", 16, 8, 9, 4, eval_samples=2)
  assert fwd_part == fwd  # the replay still runs every sample
  assert part[0].eval_flops * 4 == full[0].eval_flops  # a module forward is linear in the samples
  assert part[1:] == full[1:]


def test_benchmark_model_estimate_uses_settings():
  from svdquant_jax.flows import ptq_benchmark  # noqa: PLC0415

  settings = ptq_benchmark.settings_for(["int4"], "bfloat16", lowrank_iters=3, max_tokens=1024)
  est = ptq_benchmark.model_estimate("flux-dev", settings, 1e12, 0.5)
  assert est["counts"] == {"flux_double": 19, "flux_single": 38}
  groups, fwd = cm.flux_block_groups("flux_single", 3072, 128, 4096, 512, max_tokens=1024)
  # the config's search cost cuts: bf16 losses, successive halving from 4096 tokens keeping 1/2
  assert (settings.loss_dtype, settings.halving_tokens, settings.halving_keep) == ("bfloat16", 4096, 0.5)
  single = cm.block_flops(groups, fwd, rank=32, candidates=39, lowrank_iters=3, halving_tokens=4096)
  assert est["flops"]["flux_single"] == single
  total = sum(est["counts"][k] * est["flops"][k]["total"] for k in est["counts"])
  assert est["seconds"] == pytest.approx(total / 0.5e12)
  mixed = ptq_benchmark.model_estimate("flux-dev", settings, 1e12, 0.5, bf16_flops_per_s=1e13)
  assert mixed["seconds"] == pytest.approx(sum(est["counts"][k] * cm.estimate_mixed_seconds(
      est["flops"][k], "bfloat16", 1e12, 1e13, 0.5) for k in est["counts"]))
  assert mixed["seconds"] < est["seconds"]
  exact = ptq_benchmark.settings_for(["int4", "exact"], "bfloat16", lowrank_iters=3, max_tokens=1024)
  assert exact.exact_search
  est_exact = ptq_benchmark.model_estimate("flux-dev", exact, 1e12, 0.5)
  assert est_exact["flops"]["flux_single"] == cm.block_flops(groups, fwd, rank=32, candidates=39, lowrank_iters=3)
  assert est_exact["flops"]["flux_single"]["smooth_loss"] > 10 * single["smooth_loss"]
  no_smooth = ptq_benchmark.block_flops("flux_single", settings.replace(smooth=False), 3072, 1, 16, 4)
  assert no_smooth["smooth"] == 0 and no_smooth["lowrank"] > 0
