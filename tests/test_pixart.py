"""PixArt-Sigma transformer: parity with diffusers' PixArtTransformer2DModel, loader, params."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel as TorchPixArt

from svdquant_jax.models.pixart import (PIXART_PRESETS, PixArtBlock, PixArtConfig, PixArtTransformer2DModel,
                                        abstract_pixart_params, init_pixart_params)
from svdquant_jax.models.pixart_loader import load_pixart_transformer, pixart_mapping
from svdquant_jax.utils.safetensors_io import CheckpointError, TensorStore, save_safetensors
from svdquant_jax.eval.metrics import relative_error
from svdquant_jax.utils import trees

# Tiny diffusers configs: 2 heads x 24 = 48 wide (divisible by 3 for the size embeddings and
# by 4 for the sin-cos position embedding), 2 blocks, a 4x4 patch grid at sample_size.
TINY = dict(num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=48, sample_size=8, patch_size=2, caption_channels=40, interpolation_scale=2,
            norm_eps=1e-6, norm_type="ada_norm_single", activation_fn="gelu-approximate",
            use_additional_conditions=False)
PARITY_RTOL = 1e-5
# Measured fp16-vs-fp32 relative L2 error of our model on tiny random checkpoints: 8e-4 to 1.2e-3
# (3 seeds x 3 inputs; fp16 eps is 9.8e-4). The bound leaves 4x head room.
FP16_RTOL = 5e-3

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json.
SIGMA_DIFFUSERS_CONFIG = {
    "_class_name": "PixArtTransformer2DModel", "_diffusers_version": "0.28.0.dev0",
    "activation_fn": "gelu-approximate", "attention_bias": True, "attention_head_dim": 72,
    "attention_type": "default", "caption_channels": 4096, "cross_attention_dim": 1152,
    "double_self_attention": False, "dropout": 0.0, "in_channels": 4, "interpolation_scale": 2,
    "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_num_groups": 32,
    "norm_type": "ada_norm_single", "num_attention_heads": 16, "num_embeds_ada_norm": 1000,
    "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False, "out_channels": 8,
    "patch_size": 2, "sample_size": 128, "upcast_attention": False, "use_additional_conditions": False,
    "use_linear_projection": False,
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Replaces every parameter (incl. the scale-shift tables) by seeded random values."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("scale_shift_table"):
        std = 0.5
      elif p.ndim >= 2:
        std = 1.0 / np.sqrt(np.prod(p.shape[1:]))
      else:
        std = 0.1
      p.copy_(torch.randn(p.shape, generator=g) * std)


def _build(folder, seed: int, max_shard_size=None, variant=None, **overrides) -> TorchPixArt:
  model = TorchPixArt(**{**TINY, **overrides}).eval()
  _randomize(model, seed)
  kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
  model.save_pretrained(folder, safe_serialization=True, variant=variant, **kwargs)
  return model


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  """(torch model, folder, our config, fp32 params, jitted apply) without additional conditions."""
  folder = str(tmp_path_factory.mktemp("pixart_plain"))
  model = _build(folder, seed=0)
  config, params = load_pixart_transformer(folder, dtype=jnp.float32)
  return model, folder, config, params, jax.jit(PixArtTransformer2DModel(config).apply)


@pytest.fixture(scope="module")
def conditioned(tmp_path_factory):
  """As ``plain`` with use_additional_conditions, saved as a sharded checkpoint of a weight variant."""
  folder = str(tmp_path_factory.mktemp("pixart_cond"))
  model = _build(folder, seed=1, max_shard_size="40KB", variant="v1", use_additional_conditions=True)
  assert sum(n.startswith("diffusion_pytorch_model.v1-0") for n in os.listdir(folder)) > 1
  config, params = load_pixart_transformer(folder, dtype=jnp.float32, variant="v1")
  return model, folder, config, params, jax.jit(PixArtTransformer2DModel(config).apply)


def _inputs(seed: int, batch: int, height: int, width: int, tokens: int, valid: list[int]):
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((batch, height, width, TINY["in_channels"])).astype(np.float32)
  captions = rng.standard_normal((batch, tokens, TINY["caption_channels"])).astype(np.float32)
  timestep = np.array([999.0, 17.0, 500.0, 250.0][:batch], np.float32)
  mask = (np.arange(tokens)[None, :] < np.array(valid)[:, None]).astype(np.int64)
  return latents, captions, timestep, mask


def _reference(model, latents, captions, timestep, mask, added=None) -> np.ndarray:
  """diffusers forward in fp32 on NCHW, returned as NHWC."""
  with torch.no_grad():
    out = model(torch.from_numpy(latents.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(captions),
                timestep=torch.from_numpy(timestep), encoder_attention_mask=torch.from_numpy(mask),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in (added or {}).items()} or None).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _ours(apply, params, latents, captions, timestep, mask, added=None) -> np.ndarray:
  with jax.default_matmul_precision("highest"):
    return np.asarray(apply({"params": params}, latents, captions, timestep, added, mask))


# ----------------------------------------------------------------------------- parity
def test_matches_diffusers_with_padding_mask(plain):
  model, _, config, params, apply = plain
  assert not config.use_additional_conditions
  latents, captions, timestep, mask = _inputs(0, 2, 8, 8, tokens=6, valid=[3, 6])
  want = _reference(model, latents, captions, timestep, mask)
  got = _ours(apply, params, latents, captions, timestep, mask)
  assert got.shape == (2, 8, 8, 8)
  assert relative_error(got, want) <= PARITY_RTOL
  # The mask matters: unmasked padding tokens change item 0 (item 1 has no padding).
  ones = np.ones_like(mask)
  unmasked = _ours(apply, params, latents, captions, timestep, ones)
  assert relative_error(unmasked, _reference(model, latents, captions, timestep, ones)) <= PARITY_RTOL
  assert relative_error(unmasked[0], want[0]) > 1e-3
  # The padded tokens' values are ignored.
  noisy = captions.copy()
  noisy[0, 3:] = 100.0
  np.testing.assert_allclose(_ours(apply, params, latents, noisy, timestep, mask)[0], got[0], rtol=0, atol=1e-5)
  # A caption with no valid token: diffusers' additive -10000 mask is then a constant shift of
  # the logits, i.e. no mask; we reproduce that (not a uniform average over the tokens, which is
  # off by 8e-2).
  # diffusers' own result carries the fp32 rounding of logits - 10000 (ulp 1e-3): 5e-5 here.
  empty = mask.copy()
  empty[0] = 0
  got_empty = _ours(apply, params, latents, captions, timestep, empty)
  assert relative_error(got_empty[0], unmasked[0]) <= 1e-6
  assert relative_error(got_empty[0], _reference(model, latents, captions, timestep, empty)[0]) <= 2e-4


def test_matches_diffusers_non_square_other_resolution(plain):
  model, _, config, params, apply = plain
  # 12x6 latents: a 6x3 patch grid instead of the 4x4 of sample_size 8 (pos-embed recomputation).
  latents, captions, timestep, mask = _inputs(1, 2, 12, 6, tokens=5, valid=[5, 2])
  want = _reference(model, latents, captions, timestep, mask)
  got = _ours(apply, params, latents, captions, timestep, mask)
  assert got.shape == (2, 12, 6, 8)
  assert relative_error(got, want) <= PARITY_RTOL


def test_matches_diffusers_with_additional_conditions(conditioned):
  model, _, config, params, apply = conditioned
  assert config.use_additional_conditions
  latents, captions, timestep, mask = _inputs(2, 2, 8, 8, tokens=4, valid=[4, 1])
  added = {"resolution": np.array([[1024.0, 512.0], [768.0, 768.0]], np.float32),
           "aspect_ratio": np.array([[2.0], [1.0]], np.float32)}
  want = _reference(model, latents, captions, timestep, mask, added)
  got = _ours(apply, params, latents, captions, timestep, mask, added)
  assert relative_error(got, want) <= PARITY_RTOL
  # The conditions are used.
  other = dict(added, aspect_ratio=np.array([[0.5], [1.0]], np.float32))
  assert relative_error(_ours(apply, params, latents, captions, timestep, mask, other)[0], want[0]) > 1e-3
  with pytest.raises(ValueError, match="added_cond_kwargs"):
    _ours(apply, params, latents, captions, timestep, mask, None)


def test_fp16_run_close_to_fp32(plain):
  _, folder, _, params32, apply32 = plain
  config16, params16 = load_pixart_transformer(folder)  # fp16 defaults
  assert config16.dtype == jnp.float16 and config16.param_dtype == jnp.float16
  assert all(x.dtype == jnp.float16 for x in jax.tree_util.tree_leaves(params16))
  latents, captions, timestep, mask = _inputs(3, 2, 8, 8, tokens=6, valid=[2, 6])
  got16 = jax.jit(PixArtTransformer2DModel(config16).apply)({"params": params16}, latents, captions, timestep,
                                                           None, mask)
  assert got16.dtype == jnp.float16
  want32 = _ours(apply32, params32, latents, captions, timestep, mask)
  err = relative_error(got16, want32)
  print(f"fp16 vs fp32 relative L2 error: {err:.3e}")
  assert np.isfinite(np.asarray(got16, np.float32)).all()
  assert err <= FP16_RTOL


def test_embed_blocks_head_reproduce_call_exactly(plain):
  _, _, config, params, _ = plain
  model = PixArtTransformer2DModel(config)
  latents, captions, timestep, mask = _inputs(4, 2, 8, 6, tokens=5, valid=[5, 3])
  variables = {"params": params}
  full = model.apply(variables, latents, captions, timestep, None, mask)
  e = model.apply(variables, latents, captions, timestep, None, mask, method="embed")
  assert e["hidden_states"].shape == (2, 12, config.inner_dim)
  assert e["encoder_hidden_states"].shape == (2, 5, config.inner_dim)
  assert e["timestep_emb"].shape == (2, 6 * config.inner_dim)
  assert e["embedded_timestep"].shape == (2, config.inner_dim)
  assert e["encoder_attention_mask"].dtype == jnp.bool_ and (e["height"], e["width"]) == (4, 3)
  x = e["hidden_states"]
  block = PixArtBlock(config)
  for i in range(config.num_layers):
    x = block.apply({"params": params[f"transformer_blocks_{i}"]}, x, e["encoder_hidden_states"],
                    e["timestep_emb"], e["encoder_attention_mask"])
  out = model.apply(variables, x, e["embedded_timestep"], e["height"], e["width"], method="head")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(full))


def test_bad_inputs_raise_naming_the_argument(plain):
  _, _, config, params, _ = plain
  model = PixArtTransformer2DModel(config)
  v = {"params": params}
  latents, captions, timestep, mask = _inputs(5, 2, 8, 8, tokens=4, valid=[4, 2])
  with pytest.raises(ValueError, match=r"hidden_states has shape \(2, 4, 8, 8\)"):   # NCHW by mistake
    model.apply(v, latents.transpose(0, 3, 1, 2), captions, timestep, None, mask)
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    model.apply(v, latents[:, :7], captions, timestep, None, mask)
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    model.apply(v, latents, captions[:, :, :8], timestep, None, mask)
  with pytest.raises(ValueError, match="timestep"):
    model.apply(v, latents, captions, timestep[:1], None, mask)
  with pytest.raises(ValueError, match="encoder_attention_mask"):
    model.apply(v, latents, captions, timestep, None, mask[:, :3])
  d = config.inner_dim
  with pytest.raises(ValueError, match="timestep_emb"):
    PixArtBlock(config).apply({"params": params["transformer_blocks_0"]}, jnp.zeros((2, 16, d)),
                              jnp.zeros((2, 4, d)), jnp.zeros((2, d)))
  with pytest.raises(ValueError, match="height and width must be static"):
    jax.jit(lambda x, t, h: model.apply(v, x, t, h, 4, method="head"))(jnp.zeros((2, 16, d)), jnp.zeros((2, d)), 4)


# ----------------------------------------------------------------------------- loader
def _copy_with(src: str, dst: str, tensors: dict) -> str:
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  save_safetensors(os.path.join(dst, "diffusion_pytorch_model.safetensors"), tensors)
  return dst


def test_loader_reports_missing_extra_and_misshaped_tensors(plain, tmp_path):
  _, folder, _, _, _ = plain
  tensors = {k: np.array(v) for k, v in TensorStore(folder).items()}
  key = "transformer_blocks.1.attn2.to_k.weight"

  missing = _copy_with(folder, str(tmp_path / "missing"), {k: v for k, v in tensors.items() if k != key})
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer_blocks\.1\.attn2\.to_k\.weight"):
    load_pixart_transformer(missing, dtype=jnp.float32)

  extra_tensors = dict(tensors, **{"transformer_blocks.2.ff.net.2.bias": np.zeros(48, np.float32)})
  extra = _copy_with(folder, str(tmp_path / "extra"), extra_tensors)
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) transformer_blocks\.2\.ff\.net\.2\.bias"):
    load_pixart_transformer(extra, dtype=jnp.float32)

  bad = dict(tensors, **{"caption_projection.linear_1.weight": np.zeros((48, 41), np.float32)})
  misshaped = _copy_with(folder, str(tmp_path / "misshaped"), bad)
  with pytest.raises(CheckpointError, match=r"caption_projection\.linear_1\.weight -> caption_projection/linear_1/"
                                            r"kernel: shape \(41, 48\) != expected \(40, 48\)"):
    load_pixart_transformer(misshaped, dtype=jnp.float32)


def test_loader_rejects_unsupported_config_and_wrong_class(plain, tmp_path):
  _, folder, _, _, _ = plain
  with open(os.path.join(folder, "config.json")) as f:
    raw = json.load(f)
  for name, change, pattern in [("zero", {"norm_type": "ada_norm_zero"}, "norm_type"),
                                ("class", {"_class_name": "SanaTransformer2DModel"}, "SanaTransformer2DModel")]:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    with open(dst / "config.json", "w") as f:
      json.dump({**raw, **change}, f)
    with pytest.raises(CheckpointError, match=pattern):
      load_pixart_transformer(dst)


def test_from_diffusers_resolves_defaults_and_rejects_unsupported():
  assert PixArtConfig.from_diffusers(SIGMA_DIFFUSERS_CONFIG) == PIXART_PRESETS["pixart-sigma"]
  cfg = dict(TINY, interpolation_scale=None, use_additional_conditions=None, out_channels=None, sample_size=128)
  resolved = PixArtConfig.from_diffusers(cfg, dtype=jnp.float32)
  assert resolved.interpolation_scale == 2.0 and resolved.use_additional_conditions
  assert resolved.out_channels == 4 and resolved.dtype == jnp.float32 and resolved.param_dtype == jnp.float16
  unsupported = [
      ({"norm_type": "ada_norm_zero"}, "norm_type"),
      ({"activation_fn": "geglu"}, "activation_fn"),
      ({"norm_elementwise_affine": True}, "norm_elementwise_affine"),
      ({"caption_channels": None}, "caption_channels"),
      ({"cross_attention_dim": 64}, "cross_attention_dim"),
      ({"attention_head_dim": 32, "cross_attention_dim": 64}, "use_additional_conditions"),  # D = 64
      ({"qk_norm": "rms_norm"}, "qk_norm"),
  ]
  for change, key in unsupported:
    with pytest.raises(ValueError, match=key):
      PixArtConfig.from_diffusers({**TINY, "use_additional_conditions": True, **change})
  with pytest.raises(ValueError, match="attn_impl"):
    PixArtConfig.from_diffusers(TINY, attn_impl="xla")


# ----------------------------------------------------------------------------- params
def test_pixart_tiny_param_tree_shapes():
  c = PIXART_PRESETS["pixart-tiny"]
  d, p = 128, 2
  want = {
      "pos_embed/proj/kernel": (p, p, 4, d), "pos_embed/proj/bias": (d,),
      "adaln_single/emb/timestep_embedder/linear_1/kernel": (256, d),
      "adaln_single/emb/timestep_embedder/linear_1/bias": (d,),
      "adaln_single/emb/timestep_embedder/linear_2/kernel": (d, d),
      "adaln_single/emb/timestep_embedder/linear_2/bias": (d,),
      "adaln_single/linear/kernel": (d, 6 * d), "adaln_single/linear/bias": (6 * d,),
      "caption_projection/linear_1/kernel": (64, d), "caption_projection/linear_1/bias": (d,),
      "caption_projection/linear_2/kernel": (d, d), "caption_projection/linear_2/bias": (d,),
      "scale_shift_table": (2, d), "proj_out/kernel": (d, p * p * 8), "proj_out/bias": (p * p * 8,),
  }
  for i in range(2):
    b = f"transformer_blocks_{i}"
    want.update({
        f"{b}/scale_shift_table": (6, d),
        f"{b}/attn1/to_qkv/kernel": (d, 3 * d), f"{b}/attn1/to_qkv/bias": (3 * d,),
        f"{b}/attn1/to_out/kernel": (d, d), f"{b}/attn1/to_out/bias": (d,),
        f"{b}/attn2/to_q/kernel": (d, d), f"{b}/attn2/to_q/bias": (d,),
        f"{b}/attn2/to_kv/kernel": (d, 2 * d), f"{b}/attn2/to_kv/bias": (2 * d,),
        f"{b}/attn2/to_out/kernel": (d, d), f"{b}/attn2/to_out/bias": (d,),
        f"{b}/ff/fc1/kernel": (d, 4 * d), f"{b}/ff/fc1/bias": (4 * d,),
        f"{b}/ff/fc2/kernel": (4 * d, d), f"{b}/ff/fc2/bias": (d,),
    })
  params = init_pixart_params(c, seed=0)
  got = {k: tuple(v.shape) for k, v in trees.flatten(params).items()}
  assert got == want
  assert all(v.dtype == jnp.float16 for v in jax.tree_util.tree_leaves(params))
  # Every Dense input width (K) is a multiple of 64.
  assert all(s[0] % 64 == 0 for k, s in want.items() if k.endswith("kernel") and len(s) == 2)
  # And the params run.
  model = PixArtTransformer2DModel(c)
  out = jax.jit(model.apply)({"params": params}, jnp.ones((1, 8, 8, 4), jnp.float16),
                             jnp.ones((1, 3, 64), jnp.float16), jnp.array([10.0]))
  assert out.shape == (1, 8, 8, 8) and bool(jnp.isfinite(out).all())


def test_sigma_mapping_covers_the_real_diffusers_state_dict():
  """The real-size table maps exactly the tensors of diffusers' model onto our tree, shapes included."""
  config = PIXART_PRESETS["pixart-sigma"]
  with torch.device("meta"):
    reference = TorchPixArt.from_config(SIGMA_DIFFUSERS_CONFIG)
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  rules = pixart_mapping(config)
  assert {s for r in rules for s in r.sources} == set(shapes)
  abstract = trees.flatten(abstract_pixart_params(config))
  assert {r.target for r in rules} == set(abstract)
  for r in rules:
    sources = [np.broadcast_to(np.zeros((), np.float16), shapes[s]) for s in r.sources]
    assert r.convert(sources).shape == abstract[r.target].shape, r.target
  n_params = sum(int(np.prod(v.shape)) for v in abstract.values())
  assert n_params == sum(int(np.prod(s)) for s in shapes.values())
  assert all(v.dtype == jnp.float16 for v in abstract.values())


def test_init_is_deterministic():
  c = dataclasses.replace(PIXART_PRESETS["pixart-tiny"], num_layers=1)
  a, b, other = init_pixart_params(c, 7), init_pixart_params(c, 7), init_pixart_params(c, 8)
  flat_a, flat_b, flat_o = trees.flatten(a), trees.flatten(b), trees.flatten(other)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]))
    assert not np.array_equal(np.asarray(flat_a[k]), np.asarray(flat_o[k])), k
  # Leaves are distinct draws with the intended scale.
  qkv = np.asarray(flat_a["transformer_blocks_0/attn1/to_qkv/kernel"], np.float32)
  assert abs(qkv.std() * np.sqrt(128) - 1.0) < 0.05
  assert not np.array_equal(np.asarray(flat_a["transformer_blocks_0/attn1/to_out/kernel"]),
                            np.asarray(flat_a["transformer_blocks_0/attn2/to_q/kernel"]))
