"""DC-AE (diffusers AutoencoderDC): encoder and decoder parity on tiny random models, bf16, loader."""

import copy
import functools
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
from diffusers import AutoencoderDC as TorchDCAE  # noqa: E402

from svdquant_jax.eval.metrics import relative_error  # noqa: E402
from svdquant_jax.models.dc_ae import (DC_AE_PRESETS, AutoencoderDC, DCAEConfig, abstract_dc_ae_params,  # noqa: E402
                                       dc_ae_mapping, load_dc_ae, pixel_shuffle, pixel_unshuffle)
from svdquant_jax.utils import trees  # noqa: E402
from svdquant_jax.utils.safetensors_io import CheckpointError, TensorStore, save_safetensors  # noqa: E402

PARITY_RTOL = 1e-5
# bf16: a dozen normed residual layers of random tiny weights in bf16 drift far from fp32. Measured against
# diffusers' fp32 output: diffusers' own bf16 run 2.9e-2 on the decode below and 8.5e-2 on the encode (whose
# last stages attend quadratically over 8 and 2 tokens), ours 3.1e-2 and 8.7e-2. The test bounds our error
# by 1.25x diffusers' (plus 1e-3).
BF16_VS_DIFFUSERS = 1.25
_TYPES = ("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock")
# Four stages (8x) at tiny widths, attention heads of 8; the last two stages attend (scales 3 and 5).
TINY = dict(in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=_TYPES,
            decoder_block_types=_TYPES, encoder_block_out_channels=(8, 16, 16, 32),
            decoder_block_out_channels=(8, 16, 16, 32), encoder_qkv_multiscales=((), (), (3,), (5,)),
            decoder_qkv_multiscales=((), (), (3,), (5,)), scaling_factor=0.41407)
LAYOUTS = {
    # SANA's DC-AE layout: stride-2 conv down, nearest-interpolation up, layers in every stage.
    "sana": dict(downsample_block_type="Conv", upsample_block_type="interpolate",
                 encoder_layers_per_block=(1, 1, 2, 1), decoder_layers_per_block=(1, 2, 1, 1)),
    # Pixel (un)shuffle, and no layers in stage 0: conv_in / conv_out are shortcut-free DC blocks.
    "shuffle": dict(downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
                    encoder_layers_per_block=(0, 1, 1, 1), decoder_layers_per_block=(0, 1, 1, 1)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


_CASES: dict = {}


def _case(layout: str, tmp_path_factory) -> tuple:
  """(layout, torch model, folder, our fp32 config and params), built once per layout."""
  if layout not in _CASES:
    model = TorchDCAE(**TINY, **LAYOUTS[layout]).eval()
    _randomize(model, seed=len(layout))
    folder = str(tmp_path_factory.mktemp(f"dcae_{layout}"))
    model.save_pretrained(folder)
    _CASES[layout] = (layout, model, folder, *load_dc_ae(folder))
  return _CASES[layout]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def case(request, tmp_path_factory):
  return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def sana_layout(tmp_path_factory):
  return _case("sana", tmp_path_factory)


@functools.lru_cache(maxsize=None)
def _apply(config: DCAEConfig, method: str):
  model = AutoencoderDC(config)
  return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.numpy().transpose(0, 2, 3, 1)


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("latent_hw", [(3, 2), (1, 1)])
def test_decoder_matches_diffusers(case, latent_hw):
  """(3, 2): the attention stages run linear attention above 8 tokens and quadratic at 6; (1, 1): quadratic."""
  layout, model, _, config, params = case
  z = np.random.default_rng(0).standard_normal((2, *latent_hw, 8)).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(model.decode(_nchw(z)).sample)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_apply(config, "decode")(params, z))
  assert got.shape == (2, 8 * latent_hw[0], 8 * latent_hw[1], 3)
  err = relative_error(got, want)
  print(f"DC-AE {layout} decode {latent_hw}: {err:.2e}")
  assert err <= PARITY_RTOL


@pytest.mark.parametrize("image_hw", [(32, 48), (16, 8)])
def test_encoder_matches_diffusers(case, image_hw):
  layout, model, _, config, params = case
  x = np.random.default_rng(1).uniform(-1, 1, (2, *image_hw, 3)).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(model.encode(_nchw(x)).latent)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(_apply(config, "encode")(params, x))
  assert got.shape == (2, image_hw[0] // 8, image_hw[1] // 8, 8)
  err = relative_error(got, want)
  print(f"DC-AE {layout} encode {image_hw}: {err:.2e}")
  assert err <= PARITY_RTOL


def test_bf16_as_close_to_fp32_as_diffusers_bf16(sana_layout):
  _, model, folder, config, params = sana_layout
  config16, params16 = load_dc_ae(folder, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params16))
  torch16 = copy.deepcopy(model).to(torch.bfloat16)
  rng = np.random.default_rng(2)
  z = rng.standard_normal((2, 3, 2, 8)).astype(np.float32)     # the parity tests' shapes: fp32 compiled once
  x = rng.uniform(-1, 1, (2, 16, 8, 3)).astype(np.float32)
  for method, arg in (("decode", z), ("encode", x)):
    with torch.no_grad():
      run = (lambda m, a: m.decode(a).sample) if method == "decode" else (lambda m, a: m.encode(a).latent)
      want = _nhwc(run(model, _nchw(arg)))
      theirs = relative_error(_nhwc(run(torch16, _nchw(arg).bfloat16()).float()), want)
    got = _apply(config16, method)(params16, arg)
    assert got.dtype == jnp.bfloat16
    ours = relative_error(got, want)
    print(f"DC-AE bf16 {method} vs fp32: ours {ours:.2e}, diffusers {theirs:.2e}")
    assert ours <= BF16_VS_DIFFUSERS * theirs + 1e-3


def test_pixel_shuffle_layout():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  down = np.asarray(pixel_unshuffle(jnp.asarray(x)))
  want = _nhwc(torch.nn.functional.pixel_unshuffle(_nchw(x), 2))
  np.testing.assert_array_equal(down, want)
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(down))), x)


def test_loader_reports_bad_tensors_and_configs(sana_layout, tmp_path):
  _, _, folder, _, _ = sana_layout
  tensors = {k: np.array(v) for k, v in TensorStore(folder).items()}
  key = "decoder.up_blocks.2.1.attn.to_qkv_multiscale.0.proj_out.weight"
  assert key in tensors
  dst = tmp_path / "missing"
  os.makedirs(dst)
  shutil.copy(os.path.join(folder, "config.json"), dst)
  save_safetensors(str(dst / "diffusion_pytorch_model.safetensors"), {k: v for k, v in tensors.items() if k != key})
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) decoder\.up_blocks\.2\.1\.attn"):
    load_dc_ae(dst)
  with open(os.path.join(folder, "config.json")) as f:
    raw = json.load(f)
  for name, change, pattern in [("bn", {"decoder_norm_types": "batch_norm"}, "decoder_norm_types"),
                                ("act", {"decoder_act_fns": "gelu"}, "gelu"),
                                ("block", {"encoder_block_types": "Foo"}, "encoder_block_types"),
                                ("unknown", {"frobnicate": 1}, "frobnicate"),
                                ("class", {"_class_name": "AutoencoderKL"}, "AutoencoderKL")]:
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    with open(dst / "config.json", "w") as f:
      json.dump({**raw, **change}, f)
    with pytest.raises(CheckpointError, match=pattern):
      load_dc_ae(dst)


def test_sana_dc_ae_mapping_covers_the_real_diffusers_state_dict():
  """mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers: every tensor is mapped, shapes included."""
  config = DC_AE_PRESETS["dc-ae-f32c32-sana-1.0"]
  assert config.vae_scale_factor == 32 and config.latent_channels == 32
  kwargs = config.to_diffusers()
  assert DCAEConfig.from_diffusers(kwargs, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16) == config
  with torch.device("meta"):
    reference = TorchDCAE(**kwargs)
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  rules = dc_ae_mapping(config)
  assert {s for r in rules for s in r.sources} == set(shapes)
  abstract = trees.flatten(abstract_dc_ae_params(config))
  assert {r.target for r in rules} == set(abstract)
  for r in rules:
    sources = [np.broadcast_to(np.zeros((), np.float16), shapes[s]) for s in r.sources]
    assert r.convert(sources).shape == abstract[r.target].shape, r.target
  assert sum(int(np.prod(v.shape)) for v in abstract.values()) == sum(int(np.prod(s)) for s in shapes.values())
