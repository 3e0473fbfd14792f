"""SANA transformer: parity with diffusers' SanaTransformer2DModel, loader, params."""

import json
import os
import shutil

import torch_refs

torch_refs.import_torchvision()  # diffusers imports peft, whose transformers import needs torchvision

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import SanaTransformer2DModel as TorchSana  # noqa: E402

from svdquant_jax.eval.metrics import relative_error  # noqa: E402
from svdquant_jax.models.sana import (SANA_PRESETS, SanaBlock, SanaConfig, SanaTransformer2DModel,  # noqa: E402
                                      abstract_sana_params, init_sana_params)
from svdquant_jax.models.sana_loader import load_sana_transformer, sana_mapping  # noqa: E402
from svdquant_jax.pipelines import loading  # noqa: E402
from svdquant_jax.quant import adapters, block_calib, ptq  # noqa: E402
from svdquant_jax.utils import trees  # noqa: E402
from svdquant_jax.utils.safetensors_io import CheckpointError, TensorStore, save_safetensors  # noqa: E402

# Tiny diffusers configs: D = 2 x 16, cross-attention 2 x 16, GLUMBConv hidden int(2.5 * 32) = 80.
TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
            mlp_ratio=2.5, sample_size=8, patch_size=1, attention_bias=False, interpolation_scale=None)
PARITY_RTOL = 1e-5
# Measured bf16-vs-fp32 relative L2 error of our model on the tiny checkpoint: 7.9e-3 (bf16 eps 7.8e-3);
# the bound leaves 2.5x head room.
BF16_RTOL = 2e-2

# Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers transformer/config.json.
SANA_1600M_CONFIG = {
    "_class_name": "SanaTransformer2DModel", "_diffusers_version": "0.32.0.dev0", "attention_bias": False,
    "attention_head_dim": 32, "caption_channels": 2304, "cross_attention_dim": 2240, "cross_attention_head_dim": 112,
    "dropout": 0.0, "in_channels": 32, "interpolation_scale": None, "mlp_ratio": 2.5, "norm_elementwise_affine": False,
    "norm_eps": 1e-06, "num_attention_heads": 70, "num_cross_attention_heads": 20, "num_layers": 20,
    "out_channels": 32, "patch_size": 1, "sample_size": 32,
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Seeded values for every parameter (diffusers inits norms to 1 and some biases to 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("scale_shift_table"):
        p.copy_(0.5 * noise)
      elif p.ndim >= 2:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


def _build(folder, seed: int, max_shard_size=None, variant=None, **overrides) -> TorchSana:
  model = TorchSana(**{**TINY, **overrides}).eval()
  _randomize(model, seed)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(folder, safe_serialization=True, variant=variant, **kwargs)
  return model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """(torch model, folder, our config, fp32 params, jitted apply): SANA-1.6B's layout (patch 1, no
  position embedding, no q/k/v bias)."""
  folder = str(tmp_path_factory.mktemp("sana_plain"))
  model = _build(folder, seed=0)
  config, params = load_sana_transformer(folder, dtype=jnp.float32)
  return model, folder, config, params, jax.jit(SanaTransformer2DModel(config).apply)


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
  """Patch 2, a sin-cos position embedding and q/k/v biases; a sharded checkpoint of a weight variant."""
  folder = str(tmp_path_factory.mktemp("sana_patched"))
  model = _build(folder, seed=1, max_shard_size="30KB", variant="bf16", patch_size=2, interpolation_scale=1.0,
                 attention_bias=True)
  assert sum(n.startswith("diffusion_pytorch_model.bf16-0") for n in os.listdir(folder)) > 1
  config, params = load_sana_transformer(folder, dtype=jnp.float32, variant="bf16")
  return model, folder, config, params, jax.jit(SanaTransformer2DModel(config).apply)


def _inputs(seed: int, batch: int, height: int, width: int, tokens: int, valid: list[int]):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, height, width, TINY["in_channels"])).astype(np.float32)
  captions = rng.standard_normal((batch, tokens, TINY["caption_channels"])).astype(np.float32)
  timestep = np.array([999.0, 17.0, 500.0][:batch], np.float32)
  mask = (np.arange(tokens)[None, :] < np.array(valid)[:, None]).astype(np.int64)
  return latents, captions, timestep, mask


def _reference(model, latents, captions, timestep, mask) -> np.ndarray:
  """diffusers forward in fp32 on NCHW, returned as NHWC."""
  with torch.no_grad():
    out = model(torch.from_numpy(latents.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(captions),
                timestep=torch.from_numpy(timestep), encoder_attention_mask=torch.from_numpy(mask)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _ours(apply, params, latents, captions, timestep, mask) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    return np.asarray(apply({"params": params}, latents, captions, timestep, mask))


# ----------------------------------------------------------------------------- parity
def test_matches_diffusers_with_padding_mask(plain):
  model, _, config, params, apply = plain
  assert config.interpolation_scale is None and config.ffn_hidden_dim == 80
  latents, captions, timestep, mask = _inputs(0, 2, 8, 6, tokens=6, valid=[3, 6])
  want = _reference(model, latents, captions, timestep, mask)
  got = _ours(apply, params, latents, captions, timestep, mask)
  assert got.shape == (2, 8, 6, 8)
  err = relative_error(got, want)
  print(f"SANA transformer fp32 vs diffusers: {err:.2e}")
  assert err <= PARITY_RTOL
  # The mask matters, and the padded tokens' values are ignored.
  ones = np.ones_like(mask)
  unmasked = _ours(apply, params, latents, captions, timestep, ones)
  assert relative_error(unmasked, _reference(model, latents, captions, timestep, ones)) <= PARITY_RTOL
  assert relative_error(unmasked[0], want[0]) > 1e-3
  noisy = captions.copy()
  noisy[0, 3:] = 100.0
  np.testing.assert_allclose(_ours(apply, params, latents, noisy, timestep, mask)[0], got[0], rtol=0, atol=1e-5)
  # A caption with no kept token: diffusers' additive -10000 mask is a constant shift there, i.e. no
  # mask; diffusers' own result carries the fp32 rounding of logits - 10000.
  empty = mask.copy()
  empty[0] = 0
  got_empty = _ours(apply, params, latents, captions, timestep, empty)
  assert relative_error(got_empty[0], unmasked[0]) <= 1e-6
  assert relative_error(got_empty[0], _reference(model, latents, captions, timestep, empty)[0]) <= 2e-4


def test_matches_diffusers_patch2_position_embedding_other_resolution(patched):
  model, _, config, params, apply = patched
  assert config.patch_size == 2 and config.interpolation_scale == 1.0 and config.attention_bias
  # 12x6 latents: a 6x3 patch grid instead of the 4x4 of sample_size 8 (the embedding is recomputed).
  latents, captions, timestep, mask = _inputs(1, 2, 12, 6, tokens=5, valid=[5, 2])
  want = _reference(model, latents, captions, timestep, mask)
  got = _ours(apply, params, latents, captions, timestep, mask)
  assert got.shape == (2, 12, 6, 8)
  assert relative_error(got, want) <= PARITY_RTOL


def test_bf16_run_close_to_fp32(plain):
  _, folder, _, params32, apply32 = plain
  config16, params16 = load_sana_transformer(folder)  # bf16 by default
  assert config16.dtype == jnp.bfloat16 and config16.param_dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
  latents, captions, timestep, mask = _inputs(3, 2, 8, 8, tokens=6, valid=[2, 6])
  got16 = jax.jit(SanaTransformer2DModel(config16).apply)({"params": params16}, latents, captions, timestep, mask)
  assert got16.dtype == jnp.bfloat16
  err = relative_error(got16, _ours(apply32, params32, latents, captions, timestep, mask))
  print(f"bf16 vs fp32 relative L2 error: {err:.3e}")
  assert np.isfinite(np.asarray(got16, np.float32)).all()
  assert err <= BF16_RTOL


def test_embed_blocks_head_reproduce_call_exactly(plain):
  _, _, config, params, _ = plain
  model = SanaTransformer2DModel(config)
  latents, captions, timestep, mask = _inputs(4, 2, 8, 6, tokens=5, valid=[5, 3])
  variables = {"params": params}
  full = model.apply(variables, latents, captions, timestep, mask)
  e = model.apply(variables, latents, captions, timestep, mask, method="embed")
  assert e["hidden_states"].shape == (2, 8, 6, config.inner_dim)   # tokens on their patch grid
  assert e["encoder_hidden_states"].shape == (2, 5, config.inner_dim)
  assert e["timestep_emb"].shape == (2, 6 * config.inner_dim)
  assert e["encoder_attention_mask"].dtype == jnp.bool_
  x = e["hidden_states"]
  for i in range(config.num_layers):
    x = SanaBlock(config).apply({"params": params[f"transformer_blocks_{i}"]}, x, e["encoder_hidden_states"],
                                e["timestep_emb"], e["encoder_attention_mask"])
  out = model.apply(variables, x, e["embedded_timestep"], method="head")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(full))


def test_bad_inputs_raise_naming_the_argument(plain):
  _, _, config, params, _ = plain
  model = SanaTransformer2DModel(config)
  v = {"params": params}
  latents, captions, timestep, mask = _inputs(5, 2, 8, 8, tokens=4, valid=[4, 2])
  with pytest.raises(ValueError, match=r"hidden_states has shape \(2, 8, 8, 4\), expected \[\*, \*, \*, 8\]"):
    model.apply(v, latents[..., :4], captions, timestep, mask)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    model.apply(v, latents, captions[:, :, :8], timestep, mask)
  with pytest.raises(ValueError, match="timestep"):
    model.apply(v, latents, captions, timestep[:1], mask)
  with pytest.raises(ValueError, match="encoder_attention_mask"):
    model.apply(v, latents, captions, timestep, mask[:, :3])
  d = config.inner_dim
  with pytest.raises(ValueError, match="timestep_emb"):
    SanaBlock(config).apply({"params": params["transformer_blocks_0"]}, jnp.zeros((2, 4, 4, d)),
                            jnp.zeros((2, 4, d)), jnp.zeros((2, d)))
  with pytest.raises(ValueError, match="cross_attention_dim"):
    SanaConfig(**{**TINY, "cross_attention_dim": 48})


# ----------------------------------------------------------------------------- loader
def _copy_with(src: str, dst: str, tensors: dict) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  save_safetensors(os.path.join(dst, "diffusion_pytorch_model.safetensors"), tensors)
  return dst


def test_loader_reports_bad_tensors_and_configs(plain, tmp_path):
  _, folder, _, _, _ = plain
  tensors = {k: np.array(v) for k, v in TensorStore(folder).items()}
  key = "transformer_blocks.1.ff.conv_point.weight"
  missing = _copy_with(folder, str(tmp_path / "missing"), {k: v for k, v in tensors.items() if k != key})
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer_blocks\.1\.ff\.conv_point\.weight"):
    load_sana_transformer(missing, dtype=jnp.float32)
  extra = _copy_with(folder, str(tmp_path / "extra"), dict(tensors, **{"transformer_blocks.1.ff.conv_point.bias":
                                                                       np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) transformer_blocks\.1\.ff\.conv_point\.bias"):
    load_sana_transformer(extra, dtype=jnp.float32)
  bad = dict(tensors, **{"transformer_blocks.0.ff.conv_inverted.weight": np.zeros((160, 32, 3, 3), np.float32)})
  with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.ff\.conv_inverted\.weight has shape "
                                            r"\(160, 32, 3, 3\), expected a 1x1"):
    load_sana_transformer(_copy_with(folder, str(tmp_path / "misshaped"), bad), dtype=jnp.float32)

  with open(os.path.join(folder, "config.json")) as f:
    raw = json.load(f)
  for name, change, pattern in [("qk", {"qk_norm": "rms_norm_across_heads"}, "qk_norm"),
                                ("guidance", {"guidance_embeds": True}, "guidance_embeds"),
                                ("affine", {"norm_elementwise_affine": True}, "norm_elementwise_affine"),
                                ("unknown", {"frobnicate": 1}, "frobnicate"),
                                ("class", {"_class_name": "PixArtTransformer2DModel"}, "PixArtTransformer2DModel")]:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    with open(dst / "config.json", "w") as f:
      json.dump({**raw, **change}, f)
    with pytest.raises(CheckpointError, match=pattern):
      load_sana_transformer(dst)


def test_1600m_mapping_covers_the_real_diffusers_state_dict():
  """The real-size table maps exactly the tensors of diffusers' model onto our tree, shapes included."""
  config = SanaConfig.from_diffusers(SANA_1600M_CONFIG)
  assert config == SANA_PRESETS["sana-1.6b"]
  with torch.device("meta"):
    reference = TorchSana.from_config(SANA_1600M_CONFIG)
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  rules = sana_mapping(config)
  assert {s for r in rules for s in r.sources} == set(shapes)
  abstract = trees.flatten(abstract_sana_params(config))
  assert {r.target for r in rules} == set(abstract)
  for r in rules:
    sources = [np.broadcast_to(np.zeros((), np.float16), shapes[s]) for s in r.sources]
    assert r.convert(sources).shape == abstract[r.target].shape, r.target
  n_params = sum(int(np.prod(v.shape)) for v in abstract.values())
  assert n_params == sum(int(np.prod(s)) for s in shapes.values())
  print(f"SANA-1.6B transformer: {n_params / 1e9:.3f}B parameters")
  assert 1.5e9 < n_params < 1.7e9


def test_tiny_preset_params_run_and_are_deterministic():
  c = SANA_PRESETS["sana-tiny"].replace(dtype=jnp.float32, param_dtype=jnp.float32)
  a, b, other = init_sana_params(c, 7), init_sana_params(c, 7), init_sana_params(c, 8)
  flat_a, flat_b, flat_o = trees.flatten(a), trees.flatten(b), trees.flatten(other)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))
    assert not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_o[k])), k
  # Every quantized linear's input width is a multiple of 64 (INT4 activation groups).
  for layer in ("attn1/to_qkv", "attn1/to_out", "attn2/to_q", "attn2/to_out", "ff/conv_inverted", "ff/conv_point"):
    assert flat_a[f"transformer_blocks_0/{layer}/kernel"].shape[0] % 64 == 0, layer
  assert flat_a["transformer_blocks_0/ff/conv_depth/kernel"].shape == (3, 3, 1, 640)
  out = jax.jit(SanaTransformer2DModel(c).apply)({"params": a}, jnp.ones((1, 4, 4, 32)), jnp.ones((1, 3, 64)),
                                                 jnp.array([10.0]))
  assert out.shape == (1, 4, 4, 32) and bool(jnp.isfinite(out).all())


# ----------------------------------------------------------------------------- quantization
def test_adapter_replays_the_model_block_by_block(plain):
  _, _, config, params, _ = plain
  ad = adapters.adapter_for("sana", config)
  assert adapters.ADAPTERS["sana"] is type(ad) and ad.pipeline_class == "SanaPipeline"
  latents, captions, timestep, mask = _inputs(6, 2, 6, 4, tokens=5, valid=[5, 2])
  state = ad.embed(params, dict(hidden_states=jnp.asarray(latents), encoder_hidden_states=jnp.asarray(captions),
                                timestep=jnp.asarray(timestep), encoder_attention_mask=jnp.asarray(mask)))
  embedded = SanaTransformer2DModel(config).apply({"params": params}, latents, captions, timestep, mask,
                                                  method="embed")["embedded_timestep"]
  for block in ad.blocks():
    state = ad.update_state(state, block.module.apply({"params": params[block.name]}, *ad.block_args(state)))
  model = SanaTransformer2DModel(config)
  out = model.apply({"params": params}, state["hidden_states"], embedded, method="head")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(model.apply({"params": params}, latents, captions,
                                                                        timestep, mask)))
  assert ad.resolve_skips(["ff.conv_point"]) == {(f"transformer_blocks_{i}", "ff/conv_point") for i in range(2)}
  with pytest.raises(ValueError, match=r"unknown layer 'attn2/to_kv'.*ff/conv_inverted"):
    ad.resolve_skips(["attn2/to_kv"])   # 16-bit by policy: not a quantized layer


FAST = dict(num_grids=3, lowrank_iters=4, batch_size=4, candidate_batch=5, rank=16)


@pytest.fixture(scope="module")
def one_block_calibration():
  """sana-tiny's first block (its structured weights) and that block's inputs over real calibration
  samples: the transformer inputs of 2 prompts x 2 steps x CFG branches of the sana-tiny pipeline."""
  pipe = loading.load_pipeline("sana-tiny")
  samples = []
  pipe(["A red bicycle leaning against a brick wall.", "A bowl of ripe oranges on a wooden table."], height=128,
       width=128, num_steps=2, progress=False, output_type="latent",
       on_step=lambda i, inputs, output, branch: samples.append(inputs))
  inputs = {k: jnp.concatenate([s[k] for s in samples], axis=0) for k in samples[0]}
  config = pipe.transformer_config.replace(num_layers=1)
  params = {k: v for k, v in pipe.transformer_params.items() if k != "transformer_blocks_1"}
  adapter = adapters.adapter_for("sana", config)
  return adapter, params, jax.jit(adapter.embed)(params, inputs)


_IN_SUBPROCESS = "SVDQUANT_SANA_BLOCK_TEST"


@pytest.mark.slow   # ~1.5 min on 2 CPU cores: six group searches, each compiled for its shapes
def test_svdquant_beats_rtn_on_one_sana_block_in_its_own_process():
  # In a fresh process: once, late in a whole-suite run (700 tests in one process), XLA's CPU
  # compiler crashed (SIGSEGV) on one of these programs; alone the test passes. Not diagnosed.
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         f"{__file__}::test_svdquant_beats_rtn_on_one_sana_block"],
                        env={**os.environ, _IN_SUBPROCESS: "1"}, capture_output=True, text=True, timeout=1200)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(not os.environ.get(_IN_SUBPROCESS),
                    reason="runs in its own process (test_svdquant_beats_rtn_on_one_sana_block_in_its_own_process)")
def test_svdquant_beats_rtn_on_one_sana_block(one_block_calibration):
  adapter, params, state = one_block_calibration
  assert adapter.family == "sana" and state["hidden_states"].shape == (8, 4, 4, 128)
  # The GLU product that conv_point reads is signed (no lower bound, unlike a GELU output).
  _, rec = block_calib.run_block(adapter, "sana", params["transformer_blocks_0"], state,
                                 record_inputs=(("ff", "conv_point"),), batch_size=4)
  glu = np.asarray(rec["inputs"][("ff", "conv_point")])
  print(f"conv_point input: min {glu.min():.3f}, max {glu.max():.3f}, {np.mean(glu < 0):.0%} negative")
  assert glu.min() < -1.0 and glu.max() > 1.0
  svdq = ptq.quantize_transformer(adapter, params, state, ptq.PTQSettings(**FAST), log=lambda s: None)
  rtn = ptq.quantize_transformer(adapter, params, state, ptq.PTQSettings(**{**FAST, "rank": 0, "smooth": False}),
                                 log=lambda s: None)
  e_svdq = ptq.block_errors(adapter, params, state, svdq)[-1][1]
  e_rtn = ptq.block_errors(adapter, params, state, rtn)[-1][1]
  print(f"SANA block output, relative error: SVDQuant INT4 {e_svdq:.4f}, RTN W4A4 {e_rtn:.4f}")
  assert e_svdq < 0.3 * e_rtn   # measured 0.030 vs 0.225 (ratio 0.13)
  layers = ("attn1/to_qkv", "attn1/to_out", "attn2/to_q", "attn2/to_out", "ff/conv_inverted", "ff/conv_point")
  assert sorted(svdq) == sorted(f"transformer_blocks_0/{l}" for l in layers)   # to_kv, conv_depth stay 16-bit
  assert all(q.shift == 0.0 for q in svdq.values())   # no unsigned (shifted) input in a SANA block
  assert svdq["transformer_blocks_0/ff/conv_point"].weights.residual.shape == (320, 128)
