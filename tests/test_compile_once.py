"""Blocks of identical shapes reuse one compiled program of the group core (no recompilation per block)."""

import logging

import jax
import jax.numpy as jnp

from svdquant_jax.flows import ptq_benchmark
from svdquant_jax.models import flux
from svdquant_jax.quant import adapters, ptq, svdquant

# Two identical double blocks; fp32, every linear K a multiple of 64.
CFG = flux.FLUX_PRESETS["flux-tiny"].replace(num_layers=2, num_single_layers=0, dtype=jnp.float32,
                                             param_dtype=jnp.float32)
KEPT = ("qkv", "out")  # a module-output loss (captures the block's params and inputs) and a layer-outputs loss


class _Compiles(logging.Handler):
  """Counts ``Compiling jit(<name>)`` log records while ``jax.log_compiles`` is on."""

  def __init__(self, name):
    super().__init__(logging.DEBUG)
    self.name, self.count = name, 0

  def emit(self, record):
    if f"Compiling jit({self.name})" in record.getMessage():
      self.count += 1


def _setup(samples=2):
  params = flux.init_flux_params(CFG, 0)
  ad = adapters.adapter_for("flux", CFG)
  return ad, params, ptq_benchmark.random_state(ad, params, samples, img_tokens=64, txt_tokens=16, dtype=jnp.float32)


def test_identical_blocks_compile_the_group_core_once():
  ad, params, state = _setup()
  skips = tuple(g.name for g in ad.blocks()[0].policy.groups if g.name not in KEPT)
  # Settings no other test uses (token_seed), so the count starts from nothing in a shared session.
  settings = ptq.PTQSettings(num_grids=2, lowrank_iters=2, rank=8, batch_size=2, candidate_batch=3,
                             weight_only_adaln=False, skips=skips, token_seed=97)
  skipped = ad.resolve_skips(settings.skips)
  blocks = ad.blocks()
  assert [b.policy.kind for b in blocks] == ["flux_double", "flux_double"]
  core = svdquant._quantize_group_core
  counter = _Compiles("_quantize_group_core")
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  per_block = []
  try:
    with jax.log_compiles(True):
      for index, block in enumerate(blocks):
        before = counter.count
        layers = ptq.quantize_block(ad, block, params[block.name], state, settings, skipped, index)
        per_block.append(counter.count - before)
        assert sorted(layers) == ["attn/to_add_out", "attn/to_out", "attn/to_qkv"]
        state = ptq.replay_block(ad, block, params[block.name], state, layers, settings)
  finally:
    logger.removeHandler(counter)
  # One program per group kind in the first block, none in the second (same shapes and settings).
  assert per_block == [len(KEPT), 0], per_block
  assert core._cache_size() >= len(KEPT)
