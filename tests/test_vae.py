"""The Flax AutoencoderKL against diffusers' (fp32 parity), its loader, presets and latent scaling."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from svdquant_jax.models import checkpoint
from svdquant_jax.models import vae
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.eval.metrics import relative_error
from svdquant_jax.utils import trees

PARITY_TOL = 1e-5
# bf16 (params and activations) decode vs our fp32 decode, relative L2, on the FLUX-like tiny model
# below: measured 1.74e-2 / 1.80e-2 / 1.74e-2 for three latent seeds, while diffusers' own bf16
# decode of the same model deviates 1.81e-2 / 2.00e-2 / 1.75e-2 from its fp32 decode (bf16 unit
# roundoff 2^-9 = 2e-3, compounded over ~25 convolutions of a random network). The bound is 3e-2
# absolute and at most 1.5x diffusers' bf16 error: headroom for other XLA versions and backends,
# while a wrong layer or a lost fp32 statistic gives O(1) or several-times-larger errors.
BF16_TOL = 3e-2
BF16_TOL_VS_DIFFUSERS = 1.5

# A PixArt-like config that differs from the presets: two resnets per level, 4 groups, uneven
# widths (shortcuts in both directions), quant convs on.
PIXART_LIKE = dict(
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 24, 24], layers_per_block=2, latent_channels=4, norm_num_groups=4,
    sample_size=64, scaling_factor=0.13025, use_quant_conv=True, use_post_quant_conv=True)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _build_reference(config_kwargs, seed, folder):
  """A diffusers AutoencoderKL with random weights (GroupNorm affines randomized too), saved."""
  torch.manual_seed(seed)
  model = TorchAutoencoderKL(**config_kwargs).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:  # diffusers inits GroupNorm to identity; make the affines matter
        base = 1.0 if name.endswith("weight") else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
  model.save_pretrained(folder)
  return model


class _Case:
  """A saved reference model, our loaded config/params, and our jitted encode/decode."""

  def __init__(self, config_kwargs, seed, folder):
    self.torch_model = _build_reference(config_kwargs, seed, folder)
    self.folder = folder
    self.config, self.params = vae.load_vae(folder)
    model = vae.AutoencoderKL(self.config)
    self.decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))
    self.encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=vae.AutoencoderKL.encode))


@pytest.fixture(scope="module")
def flux_like(tmp_path_factory):
  cfg = vae.vae_preset("vae-tiny-16").to_diffusers()
  return _Case(cfg, 0, str(tmp_path_factory.mktemp("flux_like_vae")))


@pytest.fixture(scope="module")
def pixart_like(tmp_path_factory):
  return _Case(PIXART_LIKE, 10, str(tmp_path_factory.mktemp("pixart_like_vae")))


def _latents(config, seed=0):
  # batch 2, non-square 3x5 latents -> 24x40 images
  return np.random.default_rng(seed).standard_normal((2, 3, 5, config.latent_channels)).astype(np.float32)


def _images(config, seed=1):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 24, 40, config.in_channels)).astype(np.float32)


@pytest.mark.parametrize("case_name", ["flux_like", "pixart_like"])
def test_decode_matches_diffusers(case_name, request):
  case = request.getfixturevalue(case_name)
  z = _latents(case.config)
  ours = np.asarray(case.decode(case.params, z))
  with torch.no_grad():
    ref = _nhwc(case.torch_model.decode(_nchw(z)).sample)
  assert ours.shape == ref.shape == (2, 24, 40, 3)
  assert relative_error(ours, ref) <= PARITY_TOL


@pytest.mark.parametrize("case_name", ["flux_like", "pixart_like"])
def test_encode_matches_diffusers(case_name, request):
  case = request.getfixturevalue(case_name)
  x = _images(case.config)
  mean, logvar = case.encode(case.params, x)
  with torch.no_grad():
    dist = case.torch_model.encode(_nchw(x)).latent_dist
  ref_mean, ref_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
  assert mean.shape == logvar.shape == ref_mean.shape == (2, 3, 5, case.config.latent_channels)
  assert relative_error(mean, ref_mean) <= PARITY_TOL
  assert relative_error(logvar, ref_logvar) <= PARITY_TOL


def test_encode_clamps_logvar_as_diffusers(pixart_like):
  """Push the log-variance channels out of [-30, 20] through quant_conv's bias on both sides."""
  case = pixart_like
  c = case.config.latent_channels
  offset = np.zeros(2 * c, np.float32)
  offset[c:c + 2] = 60.0  # above 20
  offset[c + 2:] = -60.0  # below -30
  params = jax.tree_util.tree_map(lambda x: x, case.params)
  params["quant_conv"]["bias"] = case.params["quant_conv"]["bias"] + offset
  x = _images(case.config, seed=2)
  mean, logvar = case.encode(params, x)
  bias = case.torch_model.quant_conv.bias
  original = bias.detach().clone()
  try:
    with torch.no_grad():
      bias.add_(torch.from_numpy(offset))
      dist = case.torch_model.encode(_nchw(x)).latent_dist
  finally:
    with torch.no_grad():
      bias.copy_(original)
  logvar = np.asarray(logvar)
  assert np.all(logvar[..., :2] == 20.0) and np.all(logvar[..., 2:] == -30.0)
  assert relative_error(logvar, _nhwc(dist.logvar)) <= PARITY_TOL
  assert relative_error(mean, _nhwc(dist.mean)) <= PARITY_TOL


def test_decode_without_mid_attention_matches_diffusers(tmp_path):
  kwargs = dict(PIXART_LIKE, mid_block_add_attention=False, layers_per_block=1, use_quant_conv=False,
                block_out_channels=[8, 8, 16, 16])
  torch_model = _build_reference(kwargs, 20, str(tmp_path))
  config, params = vae.load_vae(tmp_path)
  assert not config.mid_block_add_attention and "attention" not in params["decoder"]["mid_block"]
  z = _latents(config, seed=3)[:, :2, :3]
  model = vae.AutoencoderKL(config)
  ours = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))(params, z)
  with torch.no_grad():
    ref = _nhwc(torch_model.decode(_nchw(z)).sample)
  assert relative_error(ours, ref) <= PARITY_TOL


def test_bf16_decode_close_to_fp32(flux_like):
  config, params = vae.load_vae(flux_like.folder, dtype=jnp.bfloat16)
  assert config.dtype == jnp.bfloat16 and config.param_dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
  z = _latents(config, seed=4)
  model = vae.AutoencoderKL(config)
  out = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vae.AutoencoderKL.decode))(params, z)
  assert out.dtype == jnp.bfloat16
  err = relative_error(out.astype(jnp.float32), flux_like.decode(flux_like.params, z))
  torch_bf16 = copy.deepcopy(flux_like.torch_model).to(torch.bfloat16)
  with torch.no_grad():
    ref_bf16 = torch_bf16.decode(_nchw(z).to(torch.bfloat16)).sample.float()
    ref_fp32 = flux_like.torch_model.decode(_nchw(z)).sample
  diffusers_err = relative_error(_nhwc(ref_bf16), _nhwc(ref_fp32))
  assert 0 < err <= BF16_TOL, err
  assert err <= BF16_TOL_VS_DIFFUSERS * diffusers_err, (err, diffusers_err)


# ----------------------------------------------------------------------------- loader errors
def _copy_with_tensors(src, dst, edit, config_edit=None):
  os.makedirs(dst)
  tensors = safetensors.torch.load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
  edit(tensors)
  safetensors.torch.save_file(tensors, os.path.join(dst, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  if config_edit:
    config_edit(cfg)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


def test_loader_names_missing_extra_and_misshaped_tensors(pixart_like, tmp_path):
  src = pixart_like.folder

  def drop(t):
    del t["decoder.up_blocks.1.resnets.2.conv2.bias"]
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) decoder\.up_blocks\.1\.resnets\.2\.conv2\.bias"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "missing"), drop))

  def add(t):
    t["decoder.mid_block.attentions.0.extra.weight"] = torch.zeros(3)
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) decoder\.mid_block\.attentions\.0\.extra\.weight"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "extra"), add))

  def reshape(t):
    t["encoder.down_blocks.2.resnets.0.conv_shortcut.weight"] = torch.zeros(24, 16, 3, 3)
  with pytest.raises(CheckpointError, match=r"encoder\.down_blocks\.2\.resnets\.0\.conv_shortcut\.weight -> "
                     r"encoder/down_blocks_2/resnets_0/conv_shortcut/kernel: shape \(3, 3, 16, 24\) != expected "
                     r"\(1, 1, 16, 24\)"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "misshaped"), reshape))


def test_loader_refuses_wrong_class_legacy_names_and_unsupported_blocks(pixart_like, tmp_path):
  src = pixart_like.folder

  def other_class(cfg):
    cfg["_class_name"] = "UNet2DConditionModel"
  with pytest.raises(CheckpointError, match="UNet2DConditionModel.*expected one of \\['AutoencoderKL'\\]"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "class"), lambda t: None, other_class))

  def legacy(t):
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
      for kind in ("weight", "bias"):
        t[f"encoder.mid_block.attentions.0.{old}.{kind}"] = t.pop(f"encoder.mid_block.attentions.0.{new}.{kind}")
  with pytest.raises(CheckpointError,
                     match=r"legacy VAE attention naming \(encoder\.mid_block\.attentions\.0\.key\.bias"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "legacy"), legacy))

  def attn_block(cfg):
    cfg["down_block_types"][1] = "AttnDownEncoderBlock2D"
  with pytest.raises(CheckpointError,
                     match=r"config\.json: down_block_types\[1\]='AttnDownEncoderBlock2D' is not supported"):
    vae.load_vae(_copy_with_tensors(src, str(tmp_path / "blocks"), lambda t: None, attn_block))

  with pytest.raises(CheckpointError, match="component folder not found"):
    vae.load_vae(tmp_path / "nowhere")


def test_config_from_diffusers_validation():
  base = dict(TorchAutoencoderKL(**PIXART_LIKE).config)
  config = vae.VAEConfig.from_diffusers(base, dtype="bf16")
  assert config.block_out_channels == (8, 16, 24, 24) and config.dtype == jnp.bfloat16
  assert config.vae_scale_factor == 8 and config.shift_factor is None
  with pytest.raises(ValueError, match=r"unsupported key\(s\) \['norm_type'\]"):
    vae.VAEConfig.from_diffusers(dict(base, norm_type="spatial"))
  with pytest.raises(ValueError, match=r"up_block_types\[0\]='UpBlock2D' is not supported"):
    vae.VAEConfig.from_diffusers(dict(base, up_block_types=["UpBlock2D"] + ["UpDecoderBlock2D"] * 3))
  with pytest.raises(ValueError, match="act_fn='gelu'"):
    vae.VAEConfig.from_diffusers(dict(base, act_fn="gelu"))
  with pytest.raises(ValueError, match=r"up_block_types has 3 entries but block_out_channels has 4"):
    vae.VAEConfig.from_diffusers(dict(base, up_block_types=["UpDecoderBlock2D"] * 3))
  with pytest.raises(ValueError, match=r"\[8, 16\] are not divisible by norm_num_groups=12"):
    vae.VAEConfig.from_diffusers(dict(base, norm_num_groups=12))
  with pytest.raises(ValueError, match=r"unknown VAEConfig override\(s\) \['dtypes'\]"):
    vae.VAEConfig.from_diffusers(base, dtypes="bf16")


def test_bad_inputs_named(flux_like):
  model, params = vae.AutoencoderKL(flux_like.config), flux_like.params
  with pytest.raises(ValueError, match="multiples of vae_scale_factor=8, got 20x40"):
    model.apply({"params": params}, np.zeros((1, 20, 40, 3), np.float32), method=vae.AutoencoderKL.encode)
  with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\] \(NHWC\), got shape \(1, 3, 24, 40\)"):
    model.apply({"params": params}, np.zeros((1, 3, 24, 40), np.float32), method=vae.AutoencoderKL.encode)
  with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 16\] \(NHWC\), got shape \(1, 4, 3, 5\)"):
    model.apply({"params": params}, np.zeros((1, 4, 3, 5), np.float32), method=vae.AutoencoderKL.decode)
  with pytest.raises(ValueError, match="unknown VAE preset 'flux'"):
    vae.vae_preset("flux")


# ----------------------------------------------------------------------------- presets, scaling, init
@pytest.mark.parametrize("name", ["flux-vae", "sdxl-vae"])
def test_real_presets_map_onto_diffusers_architecture(name):
  """Our real-size tree, the mapping table and diffusers' AutoencoderKL agree tensor by tensor."""
  config = vae.vae_preset(name)
  with torch.device("meta"):
    ref = TorchAutoencoderKL(**config.to_diffusers())
  # zero-stride views: the table's conversions run on the real shapes without real tensors
  store = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in ref.state_dict().items()}
  abstract = vae.abstract_vae_params(config)
  params = checkpoint.load_params(store, vae.vae_mapping(config), abstract, source=name, to_device=False)
  n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  assert n_ours == sum(p.numel() for p in ref.parameters())
  assert config.vae_scale_factor == 8
  assert ("quant_conv" in params) == config.use_quant_conv == (name == "sdxl-vae")


def test_latent_scaling_against_formula():
  z = np.random.default_rng(5).standard_normal((2, 3, 4, 16))
  flux = vae.vae_preset("flux-vae")
  np.testing.assert_allclose(flux.to_latent(z), (z - 0.1159) * 0.3611, rtol=1e-15)
  np.testing.assert_allclose(flux.from_latent(z), z / 0.3611 + 0.1159, rtol=1e-15)
  np.testing.assert_allclose(flux.from_latent(flux.to_latent(z)), z, rtol=1e-12, atol=1e-14)
  sdxl = vae.vae_preset("sdxl-vae")
  assert sdxl.shift_factor is None and sdxl.shift == 0.0
  np.testing.assert_allclose(sdxl.to_latent(z), z * 0.13025, rtol=1e-15)
  np.testing.assert_allclose(sdxl.from_latent(z), z / 0.13025, rtol=1e-15)
  zj = jnp.asarray(z, jnp.float32)
  np.testing.assert_allclose(np.asarray(flux.from_latent(flux.to_latent(zj))), z, rtol=1e-5, atol=1e-6)


def test_init_vae_params_deterministic_and_shaped():
  config = vae.vae_preset("vae-tiny-4")
  a, b = vae.init_vae_params(config, 3), vae.init_vae_params(config, 3)
  c = vae.init_vae_params(config, 4)
  trees.validate_tree(a, vae.abstract_vae_params(config))
  fa, fb, fc = trees.flatten(a), trees.flatten(b), trees.flatten(c)
  assert all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)
  assert all(not np.array_equal(np.asarray(fa[k]), np.asarray(fc[k])) for k in fa)
  k1, k2 = fa["decoder/up_blocks_0/resnets_0/conv1/kernel"], fa["decoder/up_blocks_0/resnets_1/conv1/kernel"]
  assert not np.array_equal(np.asarray(k1), np.asarray(k2))  # same shape, distinct per-leaf streams
  with torch.device("meta"):
    ref = TorchAutoencoderKL(**config.to_diffusers())
  assert sum(x.size for x in fa.values()) == sum(p.numel() for p in ref.parameters())
  bf16 = vae.init_vae_params(config.replace(param_dtype=jnp.bfloat16), 3)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16))
