"""Hadamard rotation inside the PTQ pipeline and the deployed layers (quant.rotation): the rotated
float form equals the deployed SVDQuantDense, a rotated flux-tiny PTQ run is deterministic and
survives the progress store and the quantized-model files, rotation off changes nothing, Nunchaku
export refuses a rotated model, and bad widths / shifts are named."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.flows import ptq_config
from svdquant_jax.models import flux
from svdquant_jax.formats import packing
from svdquant_jax.formats import quantizers as qz
from svdquant_jax.nn import QuantSpec, SVDQuantDense, SVDQuantDenseNNX
from svdquant_jax.pallas import svdquant_linear
from svdquant_jax.quant import adapters, nunchaku, ptq, quantized_model, rotation
from svdquant_jax.quant import svdquant as sq
from svdquant_jax.quant.calib_cache import model_fingerprint
from svdquant_jax.quant.deploy import to_quantized_linear
from svdquant_jax.quant.settings import PTQSettings

from test_deploy import TOLERANCE, _inputs, _kernel
from test_ptq import FAST, FLUX_CFG, _with_outliers, flux_inputs

ROTATED = PTQSettings(**{**FAST, "num_grids": 2, "lowrank_iters": 2, "candidate_batch": 3}, shift_activations=False,
                      rotation=rotation.RotationSettings(enabled=True, seed=3))


# ----------------------------------------------------------------------------- one layer group
@functools.lru_cache(maxsize=None)
def _rotated_group(fmt_name):
  fmt = {"int4": qz.INT4, "nvfp4": qz.NVFP4}[fmt_name]
  x = _inputs(0, 256, 128, gelu=False)
  params = [_kernel(1, 128, 64), _kernel(2, 128, 96)]
  settings = PTQSettings(fmt=fmt, rank=16, grid=((0.5, 0.5),), lowrank_iters=1, svd_iters=12, gptq=True,
                         candidate_batch=1, shift_activations=False,
                         rotation=rotation.RotationSettings(enabled=True, seed=5))
  layers = sq.quantize_linear_group([w for w, _ in params], [b for _, b in params], x, settings, name="blk/qkv")
  return fmt, x, params, layers


@pytest.mark.parametrize("fmt_name", ["int4", "nvfp4"])
def test_rotated_fake_forward_equals_the_deployed_layer(fmt_name):
  fmt, x, params, layers = _rotated_group(fmt_name)
  rot = layers[0].rotation
  assert rot == rotation.HadamardRotation(128, 128, rotation.group_seed(5, "qkv"))
  assert layers[1].rotation == rot and layers[0].residual_q is not None
  # The pieces live in the rotated space: the same layer without the rotation, fed x Q, agrees.
  plain = dataclasses.replace(layers[0], rotation=None)
  np.testing.assert_allclose(np.asarray(sq.fake_forward(x, layers[0], fmt)),
                             np.asarray(sq.fake_forward(rotation.rotate_inputs(x, rot), plain, fmt)), rtol=0, atol=0)
  for (w, _), layer in zip(params, layers):
    ql = to_quantized_linear(layer, fmt, dtype=jnp.float32)
    assert (ql.rotation_block, ql.rotation_seed) == (128, rot.seed) and QuantSpec.of(ql).rotation_block == 128
    want = np.asarray(sq.fake_forward(x, layer, fmt), np.float64)
    module, variables = SVDQuantDense.from_quantized(ql, backend="reference")
    y = np.asarray(module.apply(variables, x), np.float64)
    assert np.abs(y - want).max() / np.abs(want).max() < TOLERANCE  # as the unrotated deploy test
    y_nnx = np.asarray(SVDQuantDenseNNX.from_quantized(ql, backend="reference")(x), np.float64)
    assert np.abs(y_nnx - want).max() / np.abs(want).max() < TOLERANCE
    # Without its online rotation the same arrays compute something else entirely.
    wrong = np.asarray(svdquant_linear(x, ql.unrotated(), backend="reference"), np.float64)
    assert np.abs(wrong - want).max() / np.abs(want).max() > 0.3
    # and the fused ops refuse a rotated layer instead of silently skipping the rotation.
    with pytest.raises(packing.QuantizedLinearError, match="rotated input .*rotation_block=128"):
      svdquant_linear(x, ql, backend="reference")
    # The quantized layer still approximates x W + b (the rotation is exact in float).
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert np.linalg.norm(want - ref - np.asarray(layer.bias)) / np.linalg.norm(ref) < 0.2


def test_bad_width_and_shift_are_named():
  x = _inputs(0, 64, 200, gelu=False)  # K = 200 = 8 * 25: largest power-of-two block 8
  w = jnp.ones((200, 32), jnp.float32)
  settings = PTQSettings(fmt=qz.W8A8, rank=0, smooth=False, candidate_batch=1,
                         rotation=rotation.RotationSettings(enabled=True))
  with pytest.raises(qz.QuantizationError, match=r"blk/proj: K=200 has no power-of-two Hadamard block >= 16.*"
                                                  r"quant\.skips.*quant\.rotation\.min_block"):
    sq.quantize_linear_group([w], None, x, settings, name="blk/proj")
  # With min_block lowered the same group rotates in blocks of 8.
  small = settings.replace(rotation=rotation.RotationSettings(enabled=True, min_block=8))
  assert sq.quantize_linear_group([w], None, x, small, name="blk/proj")[0].rotation.block == 8
  x = _inputs(0, 64, 128, gelu=True)
  int4 = PTQSettings(fmt=qz.INT4, rank=0, smooth=False, candidate_batch=1, shift_activations=False,
                     rotation=rotation.RotationSettings(enabled=True))
  with pytest.raises(qz.QuantizationError, match="blk/fc2: a rotated input is signed.*shift 0"):
    sq.quantize_linear_group([jnp.ones((128, 64))], None, x, int4, shifts=[qz.GELU_SHIFT], name="blk/fc2")
  with pytest.raises(ValueError, match="quant.shift_activations=False"):
    PTQSettings(rotation=rotation.RotationSettings(enabled=True))
  with pytest.raises(packing.QuantizedLinearError, match="rotation_block=48 must be 0 .* power of two dividing K=128"):
    to_quantized_linear(sq.plain_weights(jnp.ones((128, 64))), qz.INT4).replace(rotation_block=48).validate()


# ----------------------------------------------------------------------------- settings and config
def test_rotation_off_by_default_and_identity_unchanged():
  default = PTQSettings()
  assert not default.rotation.enabled and "rotation" not in default.to_json()
  config = PTQSettings.from_config(ptq_config.compose("flux-tiny"))
  assert config.rotation == rotation.RotationSettings() and "rotation" not in config.to_json()
  # An unrotated layer's quant_config.json entry has exactly the keys it had before rotation existed.
  assert sorted(quantized_model._spec_json(QuantSpec(rank=8))) == ["channel_scales", "fmt", "kind", "rank", "shift"]
  ql = to_quantized_linear(sq.plain_weights(jnp.ones((128, 64))), qz.INT4)
  x = jnp.ones((2, 128), jnp.bfloat16)
  assert (ql.rotation_block, ql.rotation_seed) == (0, 0) and not ql.rotated and ql.rotate_input(x) is x
  c = ptq_config.compose("flux-tiny,int4,rotate")
  s = PTQSettings.from_config(c)
  assert c.quant.name == "svdq-int4-rotated" and s.rotation.enabled and not s.shift_activations
  assert s.to_json()["rotation"] == {"enabled": True, "seed": 0, "block": 0, "min_block": 16}
  assert ptq_config.compose("flux-tiny,int4-rotated").quant.name == "svdq-int4-rotated"
  c.eval.baselines = ("int4+rotate+refine",)
  base_rr = ptq_config.method_configs(c)[1]
  assert base_rr.quant.name == "svdq-int4-rotated-refined"
  assert PTQSettings.from_config(base_rr).rotation.enabled and PTQSettings.from_config(base_rr).refine.enabled


# ----------------------------------------------------------------------------- whole model
# Two single blocks of flux-tiny: same shapes (one compilation per group), two blocks to resume.
SINGLE_CFG = FLUX_CFG.replace(num_layers=0, num_single_layers=2)


@functools.lru_cache(maxsize=None)
def _single_flux():
  """``(adapter, params, inputs, state, rotated PTQ result)``; inputs drawn as test_ptq's."""
  params = _with_outliers(flux.init_flux_params(SINGLE_CFG, 0))
  ad = adapters.adapter_for("flux", SINGLE_CFG)
  inputs = flux_inputs(SINGLE_CFG)
  state = jax.jit(ad.embed)(params, inputs)
  layers = ptq.quantize_transformer(ad, params, state, ROTATED, log=lambda s: None)
  return ad, params, inputs, state, layers


def _assert_same_layers(a, b):
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].weights.rotation == b[name].weights.rotation and a[name].shift == b[name].shift, name
    x, y = jax.tree_util.tree_leaves(a[name].weights), jax.tree_util.tree_leaves(b[name].weights)
    assert len(x) == len(y)
    for u, v in zip(x, y):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)


@pytest.mark.slow  # shares one rotated PTQ run (~30-60 s on 2 loaded CPU cores, compilation)
def test_rotated_ptq_is_deterministic_and_resumes_bit_identically(tmp_path):
  ad, params, _, state, full = _single_flux()
  rotated = {n: q.weights.rotation for n, q in full.items() if q.fmt.act is not None}
  assert sorted(rotated) == sorted(f"single_transformer_blocks_{i}/{l}" for i in (0, 1)
                                   for l in ("attn/to_qkv", "proj_mlp", "proj_out_attn", "proj_out_mlp"))
  assert rotated["single_transformer_blocks_0/proj_out_mlp"].block == 512  # the whole K: one Hadamard block
  assert all(r is not None and r.block == r.k for r in rotated.values())
  # per group-kind seeds: the layers of one group share its rotation, other groups differ, and the
  # same group in another block has the same one (one compiled search per group kind)
  qkv = rotated["single_transformer_blocks_0/attn/to_qkv"]
  assert qkv == rotated["single_transformer_blocks_0/proj_mlp"] == rotated["single_transformer_blocks_1/proj_mlp"]
  assert qkv.seed == rotation.group_seed(3, "qkv_mlp")
  assert len({r.seed for r in rotated.values()}) == 3  # 3 group kinds
  assert all(q.shift == 0.0 for q in full.values())
  assert all(q.weights.rotation is None for q in full.values() if q.fmt.act is None)  # adaLN W4A16
  identity = ptq.run_identity(ROTATED, model_fingerprint({"c": "flux"}, params), "calib", list(range(4)))
  store = ptq.ProgressStore(str(tmp_path / "progress"), identity, resume=True)
  with pytest.raises(KeyboardInterrupt):
    ptq.quantize_transformer(ad, params, state, ROTATED, progress=store, stop_after=1, log=lambda s: None)
  meta = json.loads((tmp_path / "progress/blocks/000-single_transformer_blocks_0/layers.json").read_text())
  want = dataclasses.asdict(full["single_transformer_blocks_0/proj_out_mlp"].weights.rotation)
  assert meta["proj_out_mlp"]["rotation"] == want and "rotation" not in meta["norm/linear"]
  store = ptq.ProgressStore(str(tmp_path / "progress"), identity, resume=True)
  lines = []
  resumed = ptq.quantize_transformer(ad, params, state, ROTATED, progress=store, log=lines.append)
  assert any("single_transformer_blocks_0: resumed" in l for l in lines)
  # block 0 restored from the store, block 1 computed again: both equal the first run bit for bit
  _assert_same_layers(full, resumed)
  # a different rotation seed is another run
  other = ptq.run_identity(ROTATED.replace(rotation=rotation.RotationSettings(enabled=True, seed=4)),
                           identity["model"], "calib", list(range(4)))
  with pytest.raises(ptq.ResumeError, match="settings differ"):
    ptq.ProgressStore(str(tmp_path / "progress"), other, resume=True)


@pytest.mark.slow  # shares one rotated PTQ run (~30-60 s on 2 loaded CPU cores, compilation)
def test_rotated_model_deploys_saves_loads_and_refuses_nunchaku(tmp_path):
  ad, params, inputs, _, layers = _single_flux()
  qparams, specs = quantized_model.quantize_params(params, layers, jnp.float32)
  assert specs["single_transformer_blocks_0/attn/to_qkv"].rotation_block == 128
  quantized_model.save_quantized(str(tmp_path / "model"), qparams, specs, metadata={"family": "flux"})
  config = json.loads((tmp_path / "model" / quantized_model.CONFIG_FILE).read_text())
  assert config["layers"]["single_transformer_blocks_1/proj_out_mlp"]["rotation_block"] == 512
  assert "rotation_block" not in config["layers"]["single_transformer_blocks_1/norm/linear"]
  loaded, loaded_specs, _ = quantized_model.load_quantized(str(tmp_path / "model"))
  assert loaded_specs == specs
  fp = np.asarray(ad.model.apply({"params": params}, **inputs), np.float64)
  y = np.asarray(quantized_model.transformer_fn(ad, loaded_specs)(loaded, **inputs), np.float64)
  y0 = np.asarray(quantized_model.transformer_fn(ad, specs)(qparams, **inputs), np.float64)
  np.testing.assert_array_equal(y, y0)
  unrotated = {p: (dataclasses.replace(s, rotation_block=0, rotation_seed=0) if isinstance(s, QuantSpec) else s)
               for p, s in specs.items()}
  y_wrong = np.asarray(quantized_model.transformer_fn(ad, unrotated)(qparams, **inputs), np.float64)
  err, err_wrong = (np.linalg.norm(v - fp) / np.linalg.norm(fp) for v in (y, y_wrong))
  print(f"deployed rotated flux-tiny: relative output error {err:.4f}; without the online rotation {err_wrong:.4f}")
  assert err < 0.3 and err_wrong > 2 * err
  with pytest.raises(nunchaku.NunchakuExportError, match="Hadamard input rotation .*quant.rotation"):
    nunchaku.export_flux(qparams, specs, SINGLE_CFG, str(tmp_path / "x.safetensors"), progress=False)
