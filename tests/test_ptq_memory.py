"""Bounded PTQ memory: only the chosen calibration tokens are recorded, finished blocks leave the device."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from svdquant_jax.quant import block_calib
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.quant.taps import parse_path

from test_ptq import _flux_setup


@pytest.mark.parametrize("samples,tokens,count,seed", [(4, 80, 100, 3), (8, 64, 7, 0), (3, 50, 149, 11)])
def test_token_rows_compact_to_the_flat_subset(samples, tokens, count, seed):
  x = np.random.default_rng(seed).standard_normal((samples, tokens, 5)).astype(np.float32)
  rows = block_calib.TokenRows.make(samples, tokens, count, seed)
  recorded = np.stack([x[s, rows.per_sample[s]] for s in range(samples)])
  np.testing.assert_array_equal(rows.compact(jnp.asarray(recorded)),
                                block_calib.subsample_tokens(jnp.asarray(x), count, seed))
  counts = np.bincount(block_calib.subset_rows(samples * tokens, count, seed) // tokens, minlength=samples)
  assert counts.max() <= rows.per_sample.shape[1] <= tokens


def test_the_recorded_subset_equals_recording_everything_then_subsampling():
  ad, params, state = _flux_setup()
  block = ad.blocks()[0]
  path = parse_path("attn/to_qkv")
  _, full = block_calib.run_block(ad, block.kind, params[block.name], state, record_inputs=(path,), batch_size=2)
  x = full["inputs"][path]
  samples, tokens = x.shape[0], x.shape[1]
  rows = block_calib.TokenRows.make(samples, tokens, 37, seed=5)
  _, part = block_calib.run_block(ad, block.kind, params[block.name], state, record_inputs=(path,), batch_size=2,
                                  record_rows={path: rows.per_sample})
  assert part["inputs"][path].shape == (samples, rows.per_sample.shape[1], x.shape[-1])
  assert rows.per_sample.shape[1] < tokens
  np.testing.assert_array_equal(rows.compact(part["inputs"][path]), block_calib.subsample_tokens(x, 37, 5))


def test_chunked_losses_equal_the_whole_sums():
  from svdquant_jax.formats.quantizers import FORMATS
  from svdquant_jax.quant import smooth
  from svdquant_jax.quant.svdquant import plain_weights
  from test_search_cost_cuts import _outlier_group
  x, w = _outlier_group(0, tokens=1000)
  fmt = FORMATS["int4"]
  cand = [plain_weights(w, None)]
  whole = smooth.linear_output_loss(x, [w], None, fmt)(cand)
  for chunk in (300, 1000):
    got = smooth.linear_output_loss(x, [w], None, fmt, chunk_tokens=chunk)(cand)
    assert float(got) == pytest.approx(float(whole), rel=1e-6)
  layer = block_calib.layer_outputs_loss([x, x[:700]], [w, w], [None, None], fmt, [0.0, 0.0])
  chunked = block_calib.layer_outputs_loss([x, x[:700]], [w, w], [None, None], fmt, [0.0, 0.0], chunk_tokens=256)
  assert float(chunked(cand * 2)) == pytest.approx(float(layer(cand * 2)), rel=1e-6)
  assert float(chunked(cand * 2)) == pytest.approx(float(whole) + float(smooth.linear_output_loss(
      x[:700], [w], None, fmt)(cand)), rel=1e-6)


def test_exact_mode_has_no_chunks_and_fast_mode_chunks():
  from svdquant_jax.flows import ptq_config
  config = ptq_config.compose("flux-tiny,int4")
  fast = PTQSettings.from_config(config)
  assert fast.loss_chunk_tokens == 2048 and not fast.exact_search
  assert fast.exact().loss_chunk_tokens == 0 and "loss_chunk_tokens" not in fast.exact().to_json()
  config.quant.search.mode = "exact"
  assert PTQSettings.from_config(config).loss_chunk_tokens == 0


# ----------------------------------------------------------------------------- real widths, compiled only
def _flux_dev_block():
  from svdquant_jax.models import flux
  from svdquant_jax.quant import adapters
  cfg = flux.FLUX_PRESETS["flux-dev"].replace(num_layers=1, num_single_layers=1)
  return adapters.adapter_for("flux", cfg), flux.abstract_flux_params(cfg), cfg


def _abstract_state(samples, img, txt, dim, dtype):
  sds = jax.ShapeDtypeStruct
  return {"hidden_states": sds((samples, img, dim), dtype), "encoder_hidden_states": sds((samples, txt, dim), dtype),
          "temb": sds((samples, dim), dtype), "rope_cos": sds((samples, img + txt, 128), jnp.float32),
          "rope_sin": sds((samples, img + txt, 128), jnp.float32)}


def _nbytes(tree):
  return sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


@pytest.mark.slow
def test_recording_only_the_chosen_tokens_bounds_the_pass_at_flux_dev_width():
  """FLUX.1-dev double block (D = 3072, fc2 K = 12288, bf16), 8 samples x 4608 tokens, compiled, not run:
  the pass's outputs are the next state plus exactly the recorded rows."""
  ad, params, cfg = _flux_dev_block()
  samples, img, txt, count = 8, 4096, 512, 8192
  state = _abstract_state(samples, img, txt, cfg.inner_dim, jnp.dtype(cfg.dtype))
  path = parse_path("ff/fc2")
  rows = block_calib.TokenRows.make(samples, img, count, seed=0)
  out = {}
  for name, record_rows in (("all", {}), ("chosen", {path: rows.per_sample})):
    compiled = block_calib.run_block.lower(ad, ad.blocks()[0].kind, params["transformer_blocks_0"], state,
                                           record_inputs=(path,), batch_size=1, record_rows=record_rows).compile()
    out[name] = compiled.memory_analysis().output_size_in_bytes
  new_state = _nbytes(state)
  k, e = 4 * cfg.inner_dim, 2
  # (up to XLA's few bytes of tuple bookkeeping)
  assert abs(out["all"] - (new_state + samples * img * k * e)) < 1024
  assert abs(out["chosen"] - (new_state + samples * rows.per_sample.shape[1] * k * e)) < 1024
  assert rows.per_sample.shape[1] <= 2 * count // samples  # ~count/S tokens per sample, not 4096


@pytest.mark.slow
def test_loss_chunks_bound_the_search_at_flux_dev_width():
  """The fc2 group's search (K = 12288, N = 3072) over 32768 tokens with 8 candidates per batch,
  compiled, not run: chunks of 4096 tokens cut the temporaries at least 4x (float32 losses,
  exhaustive grid: 24.8 GB -> 4.5 GB in XLA's CPU analysis)."""
  from svdquant_jax.quant import svdquant
  sds = jax.ShapeDtypeStruct
  k, n, tokens = 12288, 3072, 32768
  temp = {}
  for chunk in (0, 4096):
    settings = PTQSettings(loss_chunk_tokens=chunk, candidate_batch=8, num_grids=4, lowrank_iters=1)
    lowered = svdquant._quantize_group_core.lower([sds((k, n), jnp.bfloat16)], [sds((n,), jnp.bfloat16)],
                                                  sds((tokens, k), jnp.float32), None, None, settings=settings,
                                                  shifts=(0.0,))
    temp[chunk] = lowered.compile().memory_analysis().temp_size_in_bytes
  assert temp[4096] * 4 < temp[0], temp


def test_memory_report_command_at_tiny_width():
  from svdquant_jax.flows import ptq_benchmark, ptq_memory
  totals = {}
  for max_tokens in (64, 256):
    settings = ptq_benchmark.settings_for(["int4"], "float32", max_tokens=max_tokens, batch_size=1)
    report = ptq_memory.memory_report("flux-tiny", settings, samples=4, img_tokens=64, txt_tokens=16,
                                      dtype="float32", groups=("ff.fc1",))
    assert [(r["kind"], r["program"]) for r in report["rows"]] == [("flux_double", "pass"), ("flux_double", "search")]
    totals[max_tokens] = report["rows"][1]["argument"]
  # The search's arguments hold the chosen tokens (x [n, D] and targets [n, 4D] in float32) and the kernel;
  # x counts twice (the loss's input and the search's x are one buffer in the flow, two arguments here).
  from svdquant_jax.models import flux
  d = flux.FLUX_PRESETS["flux-tiny"].inner_dim
  assert (totals[256] - totals[64]) * 1e9 == pytest.approx(192 * (2 * d + 4 * d) * 4, rel=1e-6)
  assert "| flux_double | ff.fc1 | search |" in ptq_memory.format_report(report, "tiny")


def test_compiled_programs_are_dropped_past_the_mapping_limit():
  from svdquant_jax.utils import compile_cache
  f = jax.jit(lambda x: x * 2.0)
  f(jnp.ones(3))
  assert compile_cache.memory_mappings() > 0  # Linux
  assert f._cache_size() == 1
  assert not compile_cache.release_compiled_programs(limit=10 ** 9) and f._cache_size() == 1
  assert compile_cache.release_compiled_programs(limit=0) and f._cache_size() == 0
