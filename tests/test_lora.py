"""FLUX LoRAs: every key format, and their application at run time to float and quantized FLUX.

References: diffusers' own LoRA conversion (``FluxLoraLoaderMixin.lora_state_dict``) for the key
formats, and diffusers + PEFT (``load_lora_weights`` + ``fuse_lora``: the LoRA merged into the float
weights) for the model outputs.
"""

import contextlib
import copy
import functools
import json
import logging
import math
import pathlib
import subprocess
import sys

import diffusers
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_refs

torch_refs.import_torchvision()  # peft imports transformers' models, whose import needs torchvision
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin  # noqa: E402

from svdquant_jax.eval.metrics import relative_error  # noqa: E402
from svdquant_jax.flows import generation  # noqa: E402
from svdquant_jax.formats import quantizers as qz  # noqa: E402
from svdquant_jax.models import flux_lora  # noqa: E402
from svdquant_jax.models.flux import FLUX_PRESETS, FluxTransformer2DModel  # noqa: E402
from svdquant_jax.models.flux_loader import load_flux_transformer  # noqa: E402
from svdquant_jax.nn import (QuantSpec, WeightOnlySpec, lora_branches, lora_params, replace_dense_params,  # noqa: E402
                             set_strengths, swap_dense, with_lora)
from svdquant_jax.pipelines.loading import load_pipeline  # noqa: E402
from svdquant_jax.quant import adapters, quantized_model  # noqa: E402
from svdquant_jax.quant.deploy import to_quantized_linear  # noqa: E402
from svdquant_jax.quant.ptq import QuantizedLayer  # noqa: E402
from svdquant_jax.quant.weights import SVDQuantWeights, plain_weights  # noqa: E402
from svdquant_jax.utils import trees  # noqa: E402
from svdquant_jax.utils.safetensors_io import save_safetensors  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = FLUX_PRESETS["flux-tiny"]
DIM, HEAD = TINY.inner_dim, TINY.attention_head_dim   # 128, 64
_DIFFUSERS_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                   "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                   "guidance_embeds", "axes_dims_rope")


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _rand(rng, *shape, std=1.0):
  return (std * rng.standard_normal(shape)).astype(np.float32)


# ----------------------------------------------------------------------------- one LoRA, every format
def _bfl_modules(cfg):
  """Original FLUX module -> (out, in) and its diffusers members with their row counts (written out
  here independently of the code under test)."""
  d, m = cfg.inner_dim, cfg.mlp_dim
  out = {}
  for i in range(cfg.num_layers):
    b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    out[f"{b}.img_attn.qkv"] = ((3 * d, d), [(f"{t}.attn.to_{p}", d) for p in "qkv"])
    out[f"{b}.txt_attn.qkv"] = ((3 * d, d), [(f"{t}.attn.add_{p}_proj", d) for p in "qkv"])
    out[f"{b}.img_attn.proj"] = ((d, d), [(f"{t}.attn.to_out.0", d)])
    out[f"{b}.txt_attn.proj"] = ((d, d), [(f"{t}.attn.to_add_out", d)])
    out[f"{b}.img_mlp.0"] = ((m, d), [(f"{t}.ff.net.0.proj", m)])
    out[f"{b}.img_mlp.2"] = ((d, m), [(f"{t}.ff.net.2", d)])
    out[f"{b}.txt_mlp.0"] = ((m, d), [(f"{t}.ff_context.net.0.proj", m)])
    out[f"{b}.txt_mlp.2"] = ((d, m), [(f"{t}.ff_context.net.2", d)])
    out[f"{b}.img_mod.lin"] = ((6 * d, d), [(f"{t}.norm1.linear", 6 * d)])
    out[f"{b}.txt_mod.lin"] = ((6 * d, d), [(f"{t}.norm1_context.linear", 6 * d)])
  for i in range(cfg.num_single_layers):
    b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    out[f"{b}.linear1"] = ((3 * d + m, d), [(f"{t}.attn.to_{p}", d) for p in "qkv"] + [(f"{t}.proj_mlp", m)])
    out[f"{b}.linear2"] = ((d, d + m), [(f"{t}.proj_out", d)])
    out[f"{b}.modulation.lin"] = ((3 * d, d), [(f"{t}.norm.linear", 3 * d)])
  out["img_in"] = ((d, cfg.in_channels), [("x_embedder", d)])
  out["txt_in"] = ((d, cfg.joint_attention_dim), [("context_embedder", d)])
  for bfl, ours, k in (("time_in", "timestep_embedder", 256), ("vector_in", "text_embedder", cfg.pooled_projection_dim),
                       ("guidance_in", "guidance_embedder", 256)):
    out[f"{bfl}.in_layer"] = ((d, k), [(f"time_text_embed.{ours}.linear_1", d)])
    out[f"{bfl}.out_layer"] = ((d, d), [(f"time_text_embed.{ours}.linear_2", d)])
  out["final_layer.linear"] = ((cfg.out_features, d), [("proj_out", cfg.out_features)])
  out["final_layer.adaLN_modulation.1"] = ((2 * d, d), [("norm_out.linear", 2 * d)])
  return out


def _canonical(cfg, seed=0, rank=4):
  """A random LoRA on every original-FLUX module: ``{module: (down [r, K], up [N, r], alpha)}``.

  alpha / rank is 0.75 or 2 (>= 0.5: sd-scripts then puts the whole scale on ``down``, so every
  format yields the same factors, not only the same products).
  """
  rng = np.random.default_rng(seed)
  out = {}
  for j, (name, ((n, k), _)) in enumerate(_bfl_modules(cfg).items()):
    out[name] = (_rand(rng, rank, k, std=k ** -0.5), _rand(rng, n, rank, std=0.3), float(rank * (0.75, 2.0)[j % 2]))
  return out


def _swap(up):
  half = up.shape[0] // 2
  return np.concatenate([up[half:], up[:half]])


def _members(cfg, name, down, up):
  """An original module's (down, up) -> [(diffusers member, down, up rows)]; adaLN halves swapped."""
  members = _bfl_modules(cfg)[name][1]
  if name == "final_layer.adaLN_modulation.1":
    up = _swap(up)
  rows = np.cumsum([0] + [n for _, n in members])
  return [(m, down, up[rows[j]:rows[j + 1]]) for j, (m, _) in enumerate(members)]


def _in_format(cfg, canonical, fmt):
  """The canonical LoRA written in one file format (tensor name -> array)."""
  out = {}
  for name, (down, up, alpha) in canonical.items():
    scale = alpha / down.shape[0]
    if fmt in ("kohya", "comfyui", "fal"):
      key = {"kohya": "lora_unet_" + name.replace(".", "_"), "comfyui": f"diffusion_model.{name}",
             "fal": f"base_model.model.{name}"}[fmt]
      if fmt == "fal":  # PEFT names, no alpha: the scale is in A
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = down * np.float32(scale), up
      else:
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
        out[f"{key}.alpha"] = np.array(alpha, np.float32)
      continue
    for member, a, b in _members(cfg, name, down, up):
      if fmt == "diffusers":
        out[f"transformer.{member}.lora_A.weight"] = a * np.float32(scale)
        out[f"transformer.{member}.lora_B.weight"] = b
      elif fmt == "diffusers-alpha":
        out[f"transformer.{member}.lora_A.weight"], out[f"transformer.{member}.lora_B.weight"] = a, b
        out[f"transformer.{member}.alpha"] = np.array(alpha, np.float32)
      elif fmt == "lora_transformer":
        key = "lora_transformer_" + member.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b
        out[f"{key}.alpha"] = np.array(alpha, np.float32)
  return out


def _expected_ours(cfg, canonical):
  """The canonical LoRA on our paths, written out by hand: A scaled, fused and split layers."""
  d = cfg.inner_dim
  out = {}
  for name, (down, up, alpha) in canonical.items():
    a = down * np.float32(alpha / down.shape[0])
    kind = name.split(".")
    if name.startswith("double_blocks."):
      t = f"transformer_blocks_{kind[1]}"
      path = {"img_attn.qkv": "attn/to_qkv", "txt_attn.qkv": "attn/add_qkv_proj", "img_attn.proj": "attn/to_out",
              "txt_attn.proj": "attn/to_add_out", "img_mlp.0": "ff/fc1", "img_mlp.2": "ff/fc2",
              "txt_mlp.0": "ff_context/fc1", "txt_mlp.2": "ff_context/fc2", "img_mod.lin": "norm1/linear",
              "txt_mod.lin": "norm1_context/linear"}[".".join(kind[2:])]
      out[f"{t}/{path}"] = (a, up)
    elif name.startswith("single_blocks."):
      t = f"single_transformer_blocks_{kind[1]}"
      if kind[2] == "linear1":
        out[f"{t}/attn/to_qkv"], out[f"{t}/proj_mlp"] = (a, up[:3 * d]), (a, up[3 * d:])
      elif kind[2] == "linear2":
        out[f"{t}/proj_out_attn"], out[f"{t}/proj_out_mlp"] = (a[:, :d], up), (a[:, d:], up)
      else:
        out[f"{t}/norm/linear"] = (a, up)
    else:
      path = {"img_in": "x_embedder", "txt_in": "context_embedder", "final_layer.linear": "proj_out",
              "final_layer.adaLN_modulation.1": "norm_out/linear"}.get(name)
      if path is None:
        bfl, layer = name.split(".")
        ours = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}[bfl]
        path = f"time_text_embed/{ours}/linear_{1 if layer == 'in_layer' else 2}"
      out[path] = (a, _swap(up) if name == "final_layer.adaLN_modulation.1" else up)
  return out


FORMATS = ("diffusers", "diffusers-alpha", "kohya", "comfyui", "lora_transformer", "fal")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_factors(fmt):
  canonical = _canonical(TINY)
  lora = flux_lora.load_flux_lora(_in_format(TINY, canonical, fmt), TINY, source=fmt)
  expected = _expected_ours(TINY, canonical)
  assert sorted(lora.layers) == sorted(expected)
  for path, (a, b) in expected.items():
    got = lora.layers[path]
    np.testing.assert_allclose(got.a, a, rtol=1e-6, atol=1e-7, err_msg=f"{fmt} {path} A")
    np.testing.assert_allclose(got.b, b, rtol=1e-6, atol=1e-7, err_msg=f"{fmt} {path} B")
  assert not lora.bias and not lora.norms and not lora.unmatched


def test_kohya_scale_split_between_down_and_up():
  # alpha / rank = 1/8 < 1/2: sd-scripts keeps the product but moves factors of 2 onto up: A/4, B/2.
  rng = np.random.default_rng(1)
  down, up = _rand(rng, 4, DIM), _rand(rng, DIM, 4)
  lora = flux_lora.normalize({"lora_unet_double_blocks_1_img_attn_proj.lora_down.weight": down,
                              "lora_unet_double_blocks_1_img_attn_proj.lora_up.weight": up,
                              "lora_unet_double_blocks_1_img_attn_proj.alpha": np.array(0.5, np.float32)}, TINY)
  f = lora.layers["transformer_blocks.1.attn.to_out.0"]
  np.testing.assert_array_equal(f.a, down * np.float32(0.25))
  np.testing.assert_array_equal(f.b, up * np.float32(0.5))


# ----------------------------------------------------------------------------- against diffusers' conversion
def _as_diffusers_dict(lora):
  out = {}
  for m, f in lora.layers.items():
    out[f"{m}.lora_A.weight"], out[f"{m}.lora_B.weight"] = f.a, f.b
  out.update({f"{m}.lora_B.bias": d for m, d in lora.bias.items()})
  return out


def _diffusers_conversion(tensors):
  state, alphas = FluxLoraLoaderMixin.lora_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()},
                                                      return_alphas=True)
  state = {k: v.float().numpy() for k, v in state.items()}
  for key, alpha in (alphas or {}).items():  # diffusers/PEFT: scaling = alpha / r, applied to A here
    a = key.removesuffix(".alpha") + ".lora_A.weight"
    state[a] = state[a] * np.float32(float(alpha) / state[a].shape[0])
  return state


def _compare_with_diffusers(ours, tensors, drop_prefix=True):
  ref = _diffusers_conversion(tensors)
  text = sorted(k for k in ref if k.startswith("text_encoder."))
  ref = {k.removeprefix("transformer.") if drop_prefix else k: v for k, v in ref.items() if k not in text}
  mine = _as_diffusers_dict(ours)
  assert sorted(mine) == sorted(ref)
  for k in ref:
    np.testing.assert_allclose(mine[k], ref[k], rtol=1e-6, atol=1e-8, err_msg=k)
  return text


def _dev_subset(fmt, seed=2):
  """A kohya / ComfyUI / lora_transformer LoRA at FLUX.1-dev widths on a few blocks, with the
  cases diffusers' converter distinguishes: fused q/k/v with block-diagonal up (A chunked by rank)
  and dense up (A shared), single-block linear1 both ways, a scale below 1/2 (split between down
  and up), the final adaLN (halves swapped), text-encoder keys (dropped)."""
  cfg = FLUX_PRESETS["flux-dev"]
  rng = np.random.default_rng(seed)
  modules = _bfl_modules(cfg)
  picked = [n for n in modules if n.split(".")[0] in ("double_blocks", "single_blocks") and n.split(".")[1] in
            ("0", "18", "37")] + ["img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer",
                                  "guidance_in.in_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"]
  out = {}
  for j, name in enumerate(picked):
    (n, k), members = modules[name]
    rank = len(members) if len(members) > 1 else 2
    down, up = _rand(rng, rank, k, std=k ** -0.5), _rand(rng, n, rank, std=0.3)
    if name in ("double_blocks.0.img_attn.qkv", "single_blocks.37.linear1"):  # block diagonal
      rows = np.cumsum([0] + [r for _, r in members])
      mask = np.zeros_like(up)
      for i in range(len(members)):
        mask[rows[i]:rows[i + 1], i] = 1
      up = up * mask
    alpha = 0.5 if name.endswith("img_attn.proj") else float(rank * (1, 2)[j % 2])
    if name.startswith("final_layer"):
      alpha = float(rank)  # diffusers ignores the final layer's alpha (a TODO in its converter); we apply it
    if fmt == "lora_transformer":
      if name.startswith(("double_blocks", "single_blocks")) and "attn" not in name:
        continue  # diffusers' converter maps only attention layers inside the blocks in this format
      for member, a, b in _members(cfg, name, down, up):
        key = "lora_transformer_" + member.replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b
        out[f"{key}.alpha"] = np.array(alpha, np.float32)
      continue
    key = "lora_unet_" + name.replace(".", "_") if fmt == "kohya" else f"diffusion_model.{name}"
    out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = down, up
    out[f"{key}.alpha"] = np.array(alpha, np.float32)
  te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
  out[f"{te}.lora_down.weight"], out[f"{te}.lora_up.weight"] = _rand(rng, 2, 768), _rand(rng, 768, 2)
  out[f"{te}.alpha"] = np.array(2.0, np.float32)
  return cfg, out


@pytest.mark.parametrize("fmt", ["kohya", "comfyui", "lora_transformer"])
def test_kohya_style_formats_match_diffusers_conversion(fmt):
  cfg, tensors = _dev_subset(fmt)
  ours = flux_lora.normalize(tensors, cfg, source=fmt)
  assert not ours.unmatched
  text = _compare_with_diffusers(ours, tensors)
  assert text and any("text-encoder" in note for note in ours.notes)
  if fmt != "lora_transformer":  # the block-diagonal up was detected: A chunked by rank, as diffusers does
    assert ours.layers["transformer_blocks.0.attn.to_k"].rank == 1
    assert ours.layers["single_transformer_blocks.37.proj_mlp"].rank == 1
    assert ours.layers["transformer_blocks.0.attn.add_k_proj"].rank == 3


def test_xlabs_format_matches_diffusers_conversion():
  cfg = FLUX_PRESETS["flux-dev"]
  d, m = cfg.inner_dim, cfg.mlp_dim
  rng = np.random.default_rng(15)
  shapes = {"double_blocks.3.processor.qkv_lora1": (3 * d, d), "double_blocks.3.processor.proj_lora1": (d, d),
            "double_blocks.18.processor.qkv_lora2": (3 * d, d), "double_blocks.18.processor.proj_lora2": (d, d),
            "single_blocks.5.processor.qkv_lora": (3 * d, d), "single_blocks.5.processor.proj_lora": (d, d + m)}
  tensors = {}
  for name, (n, k) in shapes.items():
    tensors[f"{name}.down.weight"], tensors[f"{name}.up.weight"] = _rand(rng, 4, k), _rand(rng, n, 4)
  ours = flux_lora.normalize(tensors, cfg)
  assert not ours.unmatched and len(ours.layers) == 3 + 1 + 3 + 1 + 3 + 1
  _compare_with_diffusers(ours, tensors)


def test_fal_peft_and_diffusers_alpha_formats_match_diffusers_conversion():
  # fal's converter (base_model.model.*) needs every block of FLUX.1: rank 1 on all of them.
  cfg = FLUX_PRESETS["flux-dev"]
  rng = np.random.default_rng(3)
  tensors = {}
  for name, ((n, k), _) in _bfl_modules(cfg).items():
    if name.startswith(("double_blocks", "single_blocks")) or name == "final_layer.linear":
      tensors[f"base_model.model.{name}.lora_A.weight"] = _rand(rng, 1, k, std=k ** -0.5)
      tensors[f"base_model.model.{name}.lora_B.weight"] = _rand(rng, n, 1)
  tensors["base_model.model.double_blocks.4.img_mlp.0.lora_B.bias"] = _rand(rng, cfg.mlp_dim)
  ours = flux_lora.normalize(tensors, cfg)
  assert not ours.unmatched and len(ours.layers) == 19 * 14 + 38 * 6 + 1 and len(ours.bias) == 1
  _compare_with_diffusers(ours, tensors)

  # diffusers / PEFT names with per-module alphas (diffusers returns them separately).
  canonical = {k: v for k, v in _canonical(TINY, seed=4).items() if not k.startswith("final_layer")}
  tensors = _in_format(TINY, canonical, "diffusers-alpha")
  _compare_with_diffusers(flux_lora.normalize(tensors, TINY), tensors)


# ----------------------------------------------------------------------------- models: ours vs diffusers + PEFT
_BATCH, _TEXT_LEN, _GRID = 2, 7, (4, 5)
STRENGTH = 0.7


class _Pipeline(FluxLoraLoaderMixin):
  """The attributes ``load_lora_weights`` / ``fuse_lora`` use of a FluxPipeline (no text encoder)."""
  hf_device_map = None

  def __init__(self, transformer):
    self.transformer, self.text_encoder = transformer, None
    self.components = {"transformer": transformer}


def _randomize(model, seed):
  """Random weights everywhere (diffusers zero-inits some): kernels N(0, 1/fan_in), norms near 1."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      p.copy_(noise / math.sqrt(p.shape[1]) if p.ndim == 2 else
              (1.0 + 0.2 * noise if ".norm_" in name else 0.1 * noise))


def _inputs(cfg, seed=0):
  rng = np.random.default_rng(seed)
  h, w = _GRID
  rows, cols = np.meshgrid(np.arange(h) + 60.0, np.arange(w) + 27.0, indexing="ij")
  img_ids = np.stack([np.ones(h * w), rows.ravel(), cols.ravel()], -1).astype(np.float32)
  return dict(hidden_states=_rand(rng, _BATCH, h * w, cfg.in_channels),
              encoder_hidden_states=_rand(rng, _BATCH, _TEXT_LEN, cfg.joint_attention_dim),
              pooled_projections=_rand(rng, _BATCH, cfg.pooled_projection_dim),
              timestep=np.array([0.3, 0.85], np.float32), img_ids=img_ids,
              txt_ids=np.zeros((_TEXT_LEN, 3), np.float32), guidance=np.array([3.5, 1.0], np.float32))


def _torch_forward(model, inputs):
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()


def _linear_shapes(model):
  return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _peft_lora(shapes, seed, *, modules=None, bias=(), norms=(), members_apart=()):
  """A diffusers/PEFT-format LoRA (``transformer.`` prefix, an alpha for every module, PEFT's
  ``lora_B.bias`` on ``bias``, norm weights for ``norms``). ``members_apart``: q/k/v modules that get
  their own A (our fused layer then takes the rank-stacked, block-diagonal form); every other
  q/k/v triple shares one A."""
  rng = np.random.default_rng(seed)
  out, shared = {}, {}
  for j, name in enumerate(sorted(modules or shapes)):
    n, k = shapes[name]
    rank = (2, 3, 4)[j % 3]
    group = name.rsplit(".", 1)[0] if name.endswith(("to_q", "to_k", "to_v", "_proj")) and "proj_" not in name else None
    if group is not None and name not in members_apart:
      if (group, name.startswith("single") or "add_" in name) not in shared:
        shared[(group, name.startswith("single") or "add_" in name)] = _rand(rng, 3, k, std=k ** -0.5)
      a = shared[(group, name.startswith("single") or "add_" in name)]
    else:
      a = _rand(rng, rank, k, std=k ** -0.5)
    out[f"transformer.{name}.lora_A.weight"] = a
    out[f"transformer.{name}.lora_B.weight"] = _rand(rng, n, a.shape[0], std=0.1)
    out[f"transformer.{name}.alpha"] = np.array(a.shape[0] * (0.5, 1.0, 2.0)[j % 3], np.float32)
    if name in bias:
      out[f"transformer.{name}.lora_B.bias"] = _rand(rng, n, std=0.1)
  for name in norms:
    out[f"transformer.{name}.weight"] = (1.0 + _rand(rng, HEAD, std=0.3)).astype(np.float32)
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The diffusers model (fp32, random), ours loaded from its folder, inputs, a LoRA on every linear
  layer and the diffusers outputs without and with it (merged by PEFT at STRENGTH)."""
  model = diffusers.FluxTransformer2DModel(**{k: getattr(TINY, k) for k in _DIFFUSERS_KEYS})
  _randomize(model, 0)
  folder = tmp_path_factory.mktemp("flux") / "transformer"
  model.save_pretrained(folder)
  model = model.eval()
  cfg, params = load_flux_transformer(folder, dtype="float32", param_dtype="float32")
  inputs = _inputs(cfg)
  shapes = _linear_shapes(model)
  tensors = _peft_lora(
      shapes, seed=5, members_apart=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"),
      bias=("transformer_blocks.1.attn.add_k_proj", "single_transformer_blocks.0.proj_out",
            "transformer_blocks.0.norm1_context.linear", "proj_out"),
      norms=("transformer_blocks.1.attn.norm_added_k", "single_transformer_blocks.0.attn.norm_q"))
  del tensors["transformer.transformer_blocks.0.attn.to_v.lora_A.weight"]  # q, k apart and v missing
  del tensors["transformer.transformer_blocks.0.attn.to_v.lora_B.weight"]
  del tensors["transformer.transformer_blocks.0.attn.to_v.alpha"]
  fused = copy.deepcopy(model)
  pipe = _Pipeline(fused)
  pipe.load_lora_weights({k: torch.from_numpy(v.copy()) for k, v in tensors.items()})
  pipe.fuse_lora(lora_scale=STRENGTH)
  model_fn = FluxTransformer2DModel(cfg)
  float_fn = lambda p, **kw: model_fn.apply({"params": p}, **kw)  # noqa: E731
  return dict(model=model, cfg=cfg, params=params, inputs=inputs, shapes=shapes, tensors=tensors,
              ref=_torch_forward(model, inputs), ref_lora=_torch_forward(fused, inputs), float_fn=float_fn,
              float_jit=jax.jit(float_fn), float_lora_jit=jax.jit(with_lora(float_fn)))


def test_float_model_with_lora_matches_diffusers_peft(tiny):
  lora = flux_lora.load_flux_lora(tiny["tensors"], tiny["cfg"])
  # The fused q/k/v of block 0: rank-stacked A (q: 2, k: 3) and block-diagonal B with zero v rows.
  qkv = lora.layers["transformer_blocks_0/attn/to_qkv"]
  assert qkv.a.shape[0] == 5 and not qkv.b[:DIM, 2:].any() and not qkv.b[DIM:2 * DIM, :2].any()
  assert not qkv.b[2 * DIM:].any()
  assert set(lora.norms) == {"transformer_blocks_1/attn/norm_added_k", "single_transformer_blocks_0/attn/norm_q"}
  assert "single_transformer_blocks_0/proj_out_attn" in lora.bias  # our proj_out bias lives there
  fn = tiny["float_lora_jit"]
  tree = lora_params([lora], [STRENGTH])
  out = np.asarray(fn({"base": tiny["params"], "lora": tree}, **tiny["inputs"]))
  effect = relative_error(tiny["ref_lora"], tiny["ref"])
  err = relative_error(out, tiny["ref_lora"])
  print(f"float + LoRA vs diffusers + PEFT (fused): relative L2 {err:.2e} (the LoRA moves the output by {effect:.2f})")
  assert effect > 0.1 and err <= 1e-5, (effect, err)

  # Strength is a runtime array: another strength runs the same compiled program.
  compiled = fn._cache_size()
  out2 = np.asarray(fn({"base": tiny["params"], "lora": set_strengths(tree, [0.2])}, **tiny["inputs"]))
  assert fn._cache_size() == compiled
  assert relative_error(out2, out) > 0.05


def _two_loras(tiny):
  shapes = tiny["shapes"]
  one = _peft_lora(shapes, seed=6, modules=[m for m in shapes if "transformer_blocks.1" not in m],
                   bias=("transformer_blocks.0.ff.net.2",))
  two = _peft_lora(shapes, seed=7, modules=[m for m in shapes if "transformer_blocks.0" not in m
                                            and not m.startswith("time_text_embed")],
                   bias=("transformer_blocks.1.ff.net.2", "proj_out"))
  return [flux_lora.load_flux_lora(t, tiny["cfg"], source=s) for t, s in ((one, "one"), (two, "two"))]


def test_two_loras_equal_one_lora_holding_both_branches_and_strength_zero_is_no_lora(tiny):
  (one, two), (s1, s2) = _two_loras(tiny), (0.6, -1.3)
  fn, base = tiny["float_lora_jit"], {"base": tiny["params"]}
  both = fn({**base, "lora": lora_params([one, two], [s1, s2])}, **tiny["inputs"])
  layers = {}
  for path in set(one.layers) | set(two.layers):
    parts = [(f.a * np.float32(s), f.b) for lora, s in ((one, s1), (two, s2)) if (f := lora.layers.get(path))]
    layers[path] = (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts], axis=1))
  bias = {p: s1 * one.bias.get(p, 0) + s2 * two.bias.get(p, 0) for p in set(one.bias) | set(two.bias)}
  merged = flux_lora.FluxLora("merged", layers, bias, {})
  single = fn({**base, "lora": lora_params([merged], [1.0])}, **tiny["inputs"])
  err = relative_error(both, single)
  print(f"two LoRAs (s1, s2) vs one LoRA holding both branches: relative L2 {err:.2e}")
  assert err < 1e-6, err
  assert relative_error(both, tiny["ref"]) > 0.1

  # Strength 0 for both: bit for bit the model without LoRA (no norm weights in these LoRAs).
  zero = fn({**base, "lora": lora_params([one, two], [0.0, 0.0])}, **tiny["inputs"])
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(tiny["float_jit"](tiny["params"], **tiny["inputs"])))


# ----------------------------------------------------------------------------- quantized layers
def _smooth(kernel):
  """A smoothing λ [K] far from 1 (per input channel), so that a branch fed the smoothed input fails."""
  lam = np.sqrt(np.abs(kernel).max(axis=1))
  return (lam / lam.mean()).astype(np.float32)


def _svdquant_layer(kernel, bias, rank, shift):
  """SVDQuant INT4 without calibration: λ from the weights, rank-``rank`` SVD branch of diag(λ)·W."""
  w = np.asarray(kernel, np.float64)
  lam = _smooth(w)
  scaled = lam[:, None] * w
  u, s, vt = np.linalg.svd(scaled, full_matrices=False)
  a, b = u[:, :rank] * s[:rank], vt[:rank]
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  bias = np.zeros(w.shape[1], np.float32) if bias is None else bias
  weights = SVDQuantWeights(smooth=f32(lam), residual=f32(scaled - a @ b), lora_a=f32(a), lora_b=f32(b), bias=f32(bias))
  return QuantizedLayer(weights, qz.INT4, shift)


@functools.lru_cache(maxsize=None)
def _deploy(shift):
  """``to_quantized_linear`` jitted (one compile per shape instead of many small eager ones)."""
  return jax.jit(lambda w: to_quantized_linear(w, qz.INT4, shift=shift, dtype=jnp.float32))


def _quantize(params, cfg, rank=16):
  """Every block linear W4A4 (fc2 inputs shifted), adaLN W4A16, as the FLUX policy; 16-bit elsewhere."""
  adapter = adapters.adapter_for("flux", cfg)
  flat = trees.flatten(params)
  subtrees, specs = {}, {}
  for block in adapter.blocks():
    for group in block.policy.groups:
      for layer in group.layers:
        path = f"{block.name}/{layer}"
        shift = qz.GELU_SHIFT if group.unsigned else 0.0
        ql = _deploy(shift)(_svdquant_layer(flat[f"{path}/kernel"], flat.get(f"{path}/bias"), rank, shift).weights)
        subtrees[path], specs[path] = ql, QuantSpec.of(ql)
    for layer in block.policy.weight_only:
      path = f"{block.name}/{layer}"
      specs[path], subtrees[path] = quantized_model.layer_to_params(
          QuantizedLayer(plain_weights(flat[f"{path}/kernel"], flat[f"{path}/bias"]), qz.W4A16_INT4), jnp.float32)
  return adapter, replace_dense_params(params, subtrees), specs


@pytest.fixture(scope="module")
def quantized(tiny):
  """The tiny model quantized (~10 s): ``(adapter, params, specs)``."""
  return _quantize(tiny["params"], tiny["cfg"])


@pytest.mark.slow  # ~25 s on an idle 2-core CPU: quantizing (~10 s) and compiling the quantized model
def test_quantized_model_with_lora_is_as_close_to_diffusers_as_without(tiny, quantized):
  adapter, qparams, specs = quantized
  assert {type(s) for s in specs.values()} == {QuantSpec, WeightOnlySpec}
  qfn = quantized_model.transformer_fn(adapter, specs)
  lora = flux_lora.load_flux_lora(tiny["tensors"], tiny["cfg"])
  tree = lora_params([lora], [STRENGTH])
  fn = jax.jit(with_lora(qfn))
  out_lora = fn({"base": qparams, "lora": tree}, **tiny["inputs"])
  # Without the LoRA, from the same compiled program (a compile of the quantized model costs ~10 s
  # here): strength 0 (bit for bit no branch, see the float test) and the model's own norm weights.
  flat = trees.flatten(qparams)
  off = {**set_strengths(tree, [0.0]), "norms": {p: flat[f"{p}/scale"] for p in tree["norms"]}}
  out = fn({"base": qparams, "lora": off}, **tiny["inputs"])
  assert fn._cache_size() == 1
  err, err_lora = relative_error(out, tiny["ref"]), relative_error(out_lora, tiny["ref_lora"])
  print(f"quantized vs diffusers float: {err:.4f}; quantized + LoRA vs diffusers float + LoRA: {err_lora:.4f}")
  # The LoRA adds no error of its own: the quantized model's own error, up to how it propagates.
  assert err < 0.2 and err_lora < 1.25 * err, (err, err_lora)
  # ... and the LoRA acts on the quantized model as on the float one (up to the quantization error).
  effect_err = relative_error(np.asarray(out_lora) - np.asarray(out), tiny["ref_lora"] - tiny["ref"])
  print(f"LoRA effect on the quantized model vs on diffusers float: {effect_err:.4f}")
  assert effect_err < 2 * err, effect_err


class _OneLayer(flax_nn.Module):
  features: int

  @flax_nn.compact
  def __call__(self, x):
    return flax_nn.Dense(self.features, name="layer")(x)


@pytest.mark.parametrize("kind", ["dense", "svdquant", "svdquant-shifted", "weight_only"])
def test_branch_is_s_x_At_Bt_on_the_raw_input(kind):
  # y(LoRA) - y(no LoRA) = s·((x·Aᵀ)·Bᵀ + Δb) in float64, for every layer type (the branch sees x, not x/λ).
  k, n, r, s = 128, 96, 8, 0.7
  rng = np.random.default_rng(8)
  x = rng.standard_normal((3, 5, k))
  x[..., rng.choice(k, 4, replace=False)] *= 20  # outlier channels, as smoothing expects
  if kind == "svdquant-shifted":
    x = np.asarray(jax.nn.gelu(x, approximate=True))
  x = x.astype(np.float32)
  kernel, bias = _rand(rng, k, n, std=k ** -0.5), _rand(rng, n, std=0.1)
  params = {"layer": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
  module = _OneLayer(n)
  spec = None
  if kind.startswith("svdquant"):
    spec, ql = quantized_model.layer_to_params(
        _svdquant_layer(kernel, bias, 16, qz.GELU_SHIFT if kind == "svdquant-shifted" else 0.0), jnp.float32)
    params = replace_dense_params(params, {"layer": ql})
  elif kind == "weight_only":
    spec, sub = quantized_model.layer_to_params(QuantizedLayer(plain_weights(kernel, bias), qz.W4A16_INT4),
                                                jnp.float32)
    params = replace_dense_params(params, {"layer": sub})
  a, b, delta = _rand(rng, r, k, std=k ** -0.5), _rand(rng, n, r, std=0.3), _rand(rng, n, std=0.1)
  tree = lora_params([flux_lora.FluxLora("x", {"layer": flux_lora.LoraFactors(a, b)}, {"layer": delta}, {})], [s])

  def run(lora_first):
    swap = swap_dense({"layer": spec}) if spec is not None else contextlib.nullcontext()
    branches = lora_branches(tree) if lora_first is not None else contextlib.nullcontext()
    outer, inner = (branches, swap) if lora_first else (swap, branches)
    with outer, inner:
      y = module.apply({"params": params}, jnp.asarray(x))
    if spec is not None:  # the quantized layer did run (its parameter names, not the Dense's)
      assert "kernel" not in params["layer"]
    return np.asarray(y, np.float64)

  want = s * ((x.astype(np.float64) @ a.T.astype(np.float64)) @ b.T.astype(np.float64) + delta)
  base = run(None)
  for lora_first in (True, False):  # either context may be entered first
    err = relative_error(run(lora_first) - base, want)
    print(f"{kind} (LoRA context {'outside' if lora_first else 'inside'}): branch vs float64 {err:.2e}")
    assert err < 1e-5, (kind, lora_first, err)


# ----------------------------------------------------------------------------- files, metadata, bad input
def test_bf16_and_fp8_files_are_read_as_float32(tmp_path):
  import ml_dtypes
  canonical = {k: v for k, v in _canonical(TINY, seed=9).items() if k.startswith("double_blocks.1")}
  tensors = _in_format(TINY, canonical, "kohya")
  for dtype in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn):
    path = tmp_path / f"{np.dtype(dtype).name}.safetensors"
    stored = {k: v.astype(dtype) for k, v in tensors.items()}
    save_safetensors(path, stored)
    got = flux_lora.load_flux_lora(path, TINY)
    want = flux_lora.load_flux_lora({k: v.astype(np.float32) for k, v in stored.items()}, TINY)
    assert got.source == str(path) and sorted(got.layers) == sorted(want.layers) and len(got.layers) == 10
    for p in want.layers:
      assert got.layers[p].a.dtype == np.float32
      np.testing.assert_array_equal(got.layers[p].a, want.layers[p].a)
      np.testing.assert_array_equal(got.layers[p].b, want.layers[p].b)


def test_peft_metadata_alpha_matches_peft(tiny, tmp_path):
  # diffusers-trained files keep PEFT's lora_alpha in the safetensors metadata instead of .alpha keys.
  shapes = tiny["shapes"]
  modules = ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.1.proj_out", "x_embedder"]
  tensors = {k: v for k, v in _peft_lora(shapes, seed=10, modules=modules).items() if not k.endswith(".alpha")}
  ranks = {m: tensors[f"transformer.{m}.lora_A.weight"].shape[0] for m in modules}
  meta = {"transformer.r": ranks[modules[0]], "transformer.lora_alpha": 6,
          "transformer.rank_pattern": {m: r for m, r in ranks.items() if r != ranks[modules[0]]},
          "transformer.alpha_pattern": {"x_embedder": 1}, "transformer.target_modules": modules}
  path = tmp_path / "meta.safetensors"
  save_safetensors(path, tensors, metadata={"lora_adapter_metadata": json.dumps(meta)})
  ours = flux_lora.normalize(flux_lora.read_lora(path)[0], TINY, metadata=flux_lora.read_lora(path)[1])
  model = copy.deepcopy(tiny["model"])
  before = {m: model.get_submodule(m).weight.detach().clone() for m in modules}
  pipe = _Pipeline(model)
  pipe.load_lora_weights(str(path))
  pipe.fuse_lora(lora_scale=1.0)
  for m in modules:
    peft_delta = (model.get_submodule(m).weight.detach() - before[m]).double().numpy()
    np.testing.assert_allclose(ours.layers[m].delta(), peft_delta, rtol=1e-5, atol=1e-6, err_msg=m)
  plain = tensors["transformer.x_embedder.lora_B.weight"] @ tensors["transformer.x_embedder.lora_A.weight"]
  assert not np.allclose(ours.layers["x_embedder"].delta(), plain)  # alpha_pattern gave it its own scale


def _small_lora():
  rng = np.random.default_rng(11)
  return {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": _rand(rng, 4, DIM),
          "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": _rand(rng, DIM, 4)}


def test_unmatched_keys_are_an_error_unless_partial(caplog):
  tensors = {**_small_lora(),
             "lora_unet_double_blocks_7_img_attn_proj.lora_down.weight": np.zeros((4, DIM), np.float32),
             "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight": np.zeros((DIM, 4), np.float32),
             "transformer.transformer_blocks.0.attn.to_out.0.lora_A.default.weight": np.zeros((4, DIM), np.float32),
             "transformer.transformer_blocks.0.attn.to_out.0.weight": np.zeros((DIM, DIM), np.float32)}
  unmatched = sorted(k for k in tensors if "blocks_7" in k or "default" in k or k.endswith("0.weight"))
  assert len(unmatched) == 4
  with pytest.raises(flux_lora.LoraError, match="4 key.*match no layer") as e:
    flux_lora.load_flux_lora(tensors, TINY, source="mixed.safetensors")
  assert all(k in str(e.value) for k in unmatched) and "lora_partial" in str(e.value)
  with caplog.at_level(logging.WARNING):
    lora = flux_lora.load_flux_lora(tensors, TINY, partial=True, source="mixed.safetensors")
  assert list(lora.unmatched) == unmatched and list(lora.layers) == ["transformer_blocks_0/attn/to_out"]
  assert "blocks_7_img_attn_proj" in caplog.text and "ignored" in caplog.text


def test_shapes_that_do_not_fit_name_the_layer_and_both_shapes():
  rng = np.random.default_rng(12)
  dev = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": _rand(rng, 4, 3072),
         "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": _rand(rng, 3072, 4)}
  with pytest.raises(flux_lora.LoraError, match=r"to_out\.0 is \[3072, 3072\].*transformer_blocks_0/attn/to_out.*"
                                                r"\(3072, 3072\), expected \(128, 128\)"):
    flux_lora.load_flux_lora(dev, TINY)
  member = {"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": _rand(rng, 4, DIM),
            "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": _rand(rng, 2 * DIM, 4)}
  with pytest.raises(flux_lora.LoraError, match=r"attn\.to_k is \[256, 128\].*single_transformer_blocks_0/attn/"
                                                r"to_qkv.*\[128, 128\] part"):
    flux_lora.load_flux_lora(member, TINY)
  fused = {"lora_unet_single_blocks_0_linear1.lora_down.weight": _rand(rng, 4, DIM),
           "lora_unet_single_blocks_0_linear1.lora_up.weight": _rand(rng, 3 * 3072 + 12288, 4)}
  with pytest.raises(flux_lora.LoraError, match=r"linear1.*21504 output rows.*896 \(128 \+ 128 \+ 128 \+ 512\)"):
    flux_lora.load_flux_lora(fused, TINY)
  ranks = {"transformer.proj_out.lora_A.weight": _rand(rng, 4, DIM),
           "transformer.proj_out.lora_B.weight": _rand(rng, 64, 3)}
  with pytest.raises(flux_lora.LoraError, match=r"ranks differ.*\(4, 128\).*\(64, 3\)"):
    flux_lora.load_flux_lora(ranks, TINY)
  alone = {"transformer.proj_out.lora_A.weight": _rand(rng, 4, DIM)}
  with pytest.raises(flux_lora.LoraError, match=r"proj_out\.lora_A\.weight.*no matching lora_B"):
    flux_lora.load_flux_lora(alone, TINY)


@pytest.mark.parametrize("key,family", [
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", "SDXL"),
    ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight", "SDXL"),
    ("transformer.transformer_blocks.3.attn2.to_q.lora_A.weight", "PixArt"),
    ("lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight", "Stable Diffusion 3"),
])
def test_a_lora_for_another_family_is_refused(key, family):
  tensors = {key: np.zeros((4, 64), np.float32), key.replace("down", "up").replace("lora_A", "lora_B"):
             np.zeros((64, 4), np.float32)}
  with pytest.raises(flux_lora.LoraError, match=f"LoRA for .*{family}.*not for FLUX"):
    flux_lora.load_flux_lora(tensors, TINY)


def test_nunchaku_format_dora_and_text_encoder_keys():
  nunchaku = {"transformer_blocks.0.mlp_fc1.lora_down": np.zeros((128, 48), np.float32),
              "transformer_blocks.0.mlp_fc1.lora_up": np.zeros((512, 48), np.float32)}
  with pytest.raises(flux_lora.LoraError, match="Nunchaku-format.*base model's own SVD branch"):
    flux_lora.load_flux_lora(nunchaku, TINY)
  dora = {**_small_lora(),
          "transformer.transformer_blocks.0.attn.to_out.0.lora_magnitude_vector": np.ones(DIM, np.float32),
          "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 64), np.float32)}
  lora = flux_lora.load_flux_lora(dora, TINY)
  assert list(lora.layers) == ["transformer_blocks_0/attn/to_out"]
  assert any("to_out.0.lora_magnitude_vector" in w and "DoRA" in w for w in lora.warnings)
  assert any("text-encoder" in n for n in lora.notes)
  only_text = {k: v for k, v in dora.items() if k.startswith("lora_te1")}
  with pytest.raises(flux_lora.LoraError, match="nothing left for the transformer"):
    flux_lora.load_flux_lora(only_text, TINY)


# ----------------------------------------------------------------------------- the generate command
PROMPT = "A red bicycle leaning against a brick wall."
GEN = dict(seed=3, num_steps=2, height=64, width=64, batch_size=1)


def _lora_files(tmp_path):
  """Two LoRA files for flux-tiny: kohya (bf16) on every layer, and diffusers + alpha on the double blocks."""
  import ml_dtypes
  a, b = tmp_path / "kohya.safetensors", tmp_path / "diffusers.safetensors"
  save_safetensors(a, {k: v.astype(ml_dtypes.bfloat16) for k, v in
                       _in_format(TINY, _canonical(TINY, seed=13), "kohya").items()})
  double = {k: v for k, v in _canonical(TINY, seed=14).items() if k.startswith("double_blocks")}
  save_safetensors(b, _in_format(TINY, double, "diffusers-alpha"))
  return str(a), str(b)


def _png_bytes(folder):
  return (folder / "00000.png").read_bytes()


def test_parse_loras_and_non_flux_pipelines():
  assert generation.parse_loras("a.safetensors:0.8, /x/b:c.safetensors , c.safetensors:-1e-1") == [
      ("a.safetensors", 0.8), ("/x/b:c.safetensors", 1.0), ("c.safetensors", -0.1)]
  for bad, message in (("a.safetensors:0.5,,b", "empty entry"), ("a.safetensors:nan", "finite")):
    with pytest.raises(ValueError, match=message):
      generation.parse_loras(bad)
  with pytest.raises(ValueError, match="LoRAs are supported for FLUX"):
    generation.apply_loras(load_pipeline("pixart-tiny"), [("x.safetensors", 1.0)])


@pytest.mark.slow  # ~40 s on an idle 2-core CPU: the command in a subprocess, and one in-process pipeline
def test_generate_command_applies_loras_to_a_quantized_flux(tmp_path, quantized):
  # The quantized tiny model of the parity tests, run in the flux-tiny pipeline (same transformer config).
  pipeline = load_pipeline("flux-tiny")
  adapter, qparams, specs = quantized
  assert adapters.adapter_for_pipeline(pipeline).config == adapter.config
  folder = tmp_path / "model"
  quantized_model.save_quantized(str(folder), qparams, specs, metadata={
      "family": adapter.family, "model_config": repr(adapter.config), "fingerprint": "test", "name": "lora-test"})
  a, b = _lora_files(tmp_path)
  cli = tmp_path / "cli"
  argv = [sys.executable, str(ROOT / "launch" / "generate.py"), f"--config.output_dir={cli}",
          f"--config.quantized_model={folder}", f"--config.loras={a}:0.8,{b}:-0.5", f"--config.prompts={PROMPT}",
          "--config.progress=false"] + [f"--config.{k}={v}" for k, v in GEN.items()]
  done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((cli / generation.GENERATION_JSON).read_text())
  assert result["loras"] == [{"path": a, "strength": 0.8, "layers": 40}, {"path": b, "strength": -0.5, "layers": 20}]

  # In process, the library path gives the same bytes; other strengths run the same compiled program.
  qfn, qp, _ = quantized_model.load_for_model(str(folder), adapter)
  settings = generation.GenerationSettings(**GEN)
  fn, params, _ = generation.apply_loras(pipeline, [(a, 0.8), (b, -0.5)], transformer_fn=qfn, transformer_params=qp)
  run = lambda out, **kw: generation.generate_images(pipeline, [PROMPT], settings, str(tmp_path / out),  # noqa: E731
                                                     progress=False, **kw)
  run("lora", transformer_fn=fn, transformer_params=params)
  compiled = fn._cache_size()
  run("other", transformer_fn=fn, transformer_params={**params, "lora": set_strengths(params["lora"], [0.3, 0.0])})
  assert fn._cache_size() == compiled
  assert _png_bytes(tmp_path / "lora") == _png_bytes(cli) != _png_bytes(tmp_path / "other")


def test_generate_with_a_lora_on_the_float_flux(tmp_path):
  pipeline = load_pipeline("flux-tiny")
  a, _ = _lora_files(tmp_path)
  settings = generation.GenerationSettings(**GEN)
  fn, params, described = generation.apply_loras(pipeline, [(a, 0.0)])
  assert described == [{"path": a, "strength": 0.0, "layers": 40}]
  run = lambda out, **kw: generation.generate_images(pipeline, [PROMPT], settings, str(tmp_path / out),  # noqa: E731
                                                     progress=False, **kw)
  run("zero", transformer_fn=fn, transformer_params=params)
  run("lora", transformer_fn=fn, transformer_params={**params, "lora": set_strengths(params["lora"], [0.8])})
  run("plain")
  assert _png_bytes(tmp_path / "zero") == _png_bytes(tmp_path / "plain") != _png_bytes(tmp_path / "lora")
