"""Nunchaku FLUX checkpoints: byte equality with deepcompressor's converter, round trips, bad input.

The oracle is deepcompressor's own FLUX converter (``deepcompressor-toolkit`` 0.1.0 on CPU torch,
installed by ``scripts/setup.sh test``): it is fed the same integer codes, scales, λ, branch
factors and bias as our exporter, in its own input form (``model.pt`` / ``scale.pt`` /
``smooth.pt`` / ``branch.pt`` dictionaries), and every tensor must come out byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from deepcompressor.backend.nunchaku import convert as dc_convert

from svdquant_jax.formats import packing
from svdquant_jax.formats import quantizers as q
from svdquant_jax.formats.quantizers import GELU_SHIFT
from svdquant_jax.models import flux as flux_lib
from svdquant_jax.nn import QuantSpec, WeightOnlySpec
from svdquant_jax.quant import nunchaku, quantized_model
from svdquant_jax.quant.adapters.flux import FluxAdapter
from svdquant_jax.quant.nunchaku import flux_layout
from svdquant_jax.quant.ptq import QuantizedLayer
from svdquant_jax.quant.weights import SVDQuantWeights, plain_weights
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import SafetensorsFile

# K = 1024 for every adaLN layer (deepcompressor pads AWQ scale rows to a multiple of 16 groups).
ORACLE_CONFIG = flux_lib.FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=8,
                                    joint_attention_dim=256, pooled_projection_dim=128, in_channels=64,
                                    guidance_embeds=True, axes_dims_rope=(16, 56, 56), dtype="bfloat16",
                                    param_dtype="bfloat16")
SMALL_CONFIG = flux_lib.FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
                                   joint_attention_dim=128, pooled_projection_dim=64, in_channels=64,
                                   guidance_embeds=True, axes_dims_rope=(8, 28, 28), dtype="bfloat16",
                                   param_dtype="bfloat16")
# deepcompressor's module names where they differ from diffusers' (its ConcatLinear for proj_out).
_DC_SINGLE = {"out_proj": ("proj_out.linears.0",), "mlp_fc2": ("proj_out.linears.1",)}
# Which member's smoothing / branch deepcompressor reads for a layer (its convert.py name maps).
_SMOOTH_FROM = {("double", "qkv_proj"): "attn.to_q", ("double", "qkv_proj_context"): "attn.add_k_proj",
                ("double", "out_proj_context"): "attn.to_out.0", ("single", "qkv_proj"): "attn.to_q",
                ("single", "mlp_fc1"): "attn.to_q"}
_BRANCH_FROM = {("double", "qkv_proj"): "attn.to_q", ("double", "qkv_proj_context"): "attn.add_k_proj",
                ("single", "qkv_proj"): "attn.to_q"}
# Layers sharing one λ (as our FLUX policy): (block kind, layer) -> the layer whose λ it uses.
_SHARED_LAMBDA = {("double", "out_proj_context"): "out_proj", ("single", "mlp_fc1"): "qkv_proj"}


def _fmt(name: str) -> q.QuantFormat:
  return dataclasses.replace(q.INT4 if name == "int4" else q.NVFP4, scale_dtype="bfloat16")


def random_quantized_flux(config: flux_lib.FluxConfig, fmt_name: str, rank: int = 32, seed: int = 0):
  """A quantized FLUX with random SVDQuant pieces (not calibrated: this tests the format only).

  Returns ``(params, specs, layers)``: the deployed tree, specs, and the float pieces by path.
  """
  params = flux_lib.init_flux_params(config, seed)
  flat = trees.flatten(params)
  rng = np.random.default_rng(seed)
  fmt = _fmt(fmt_name)
  layers: dict[str, QuantizedLayer] = {}
  for theirs, ours, block_layers, _ in flux_layout.blocks(config):
    kind = "double" if theirs.startswith("transformer") else "single"
    lambdas: dict[str, np.ndarray] = {}
    for layer in block_layers:
      path = f"{ours}/{layer.path}"
      w = np.asarray(flat[f"{path}/kernel"], np.float32)
      b = flat.get(f"{path}/bias")
      noise = 0.0 if b is None else rng.standard_normal(w.shape[1]).astype(np.float32) * 0.01
      b = np.zeros((w.shape[1],), np.float32) if b is None else np.asarray(b, np.float32)
      if layer.kind == "awq":
        layers[path] = QuantizedLayer(plain_weights(jnp.asarray(w), jnp.asarray(b)),
                                      dataclasses.replace(q.W4A16_INT4, scale_dtype="bfloat16"))
        continue
      k, n = w.shape
      shared = _SHARED_LAMBDA.get((kind, layer.name))
      lam = lambdas[shared] if shared else np.exp(rng.uniform(-1, 1, k)).astype(np.float32)
      lambdas[layer.name] = lam
      a = (rng.standard_normal((k, rank)) / np.sqrt(k)).astype(np.float32)
      bb = (rng.standard_normal((rank, n)) * 0.05).astype(np.float32)
      residual = lam[:, None] * w - a @ bb
      weights = SVDQuantWeights(jnp.asarray(lam), jnp.asarray(residual), jnp.asarray(a), jnp.asarray(bb),
                                jnp.asarray(b + noise))
      layers[path] = QuantizedLayer(weights, fmt, shift=GELU_SHIFT if layer.shifted else 0.0)
  qparams, specs = quantized_model.quantize_params(params, layers, config.param_dtype)
  return qparams, specs, layers


def _t(x: np.ndarray, dtype=torch.bfloat16) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32))).to(dtype)


def deepcompressor_inputs(config, qparams, specs, layers, fmt_name):
  """deepcompressor's converter inputs (model/scale/smooth/branch dicts) for the same quantities."""
  flat = {k: np.asarray(v) for k, v in trees.flatten(qparams).items()}
  state, scale, smooth, branch = {}, {}, {"proj.fuse_when_possible": False}, {}
  for theirs, ours, block_layers, norms in flux_layout.blocks(config):
    kind = "double" if theirs.startswith("transformer") else "single"
    for layer in block_layers:
      path = f"{ours}/{layer.path}"
      members = _DC_SINGLE.get(layer.name, layer.diffusers) if kind == "single" else layer.diffusers
      if layer.kind == "awq":
        u = np.asarray(packing.unpack(jnp.asarray(flat[f"{path}/qweight"]), layout="NK", signed=False), np.float32)
        s = flat[f"{path}/wscales"].astype(np.float32).T
        w = (u - 7) * np.repeat(s, 64, axis=1)
        state[f"{theirs}.{members[0]}.weight"] = _t(w)
        state[f"{theirs}.{members[0]}.bias"] = _t(flat[f"{path}/bias"])
        scale[f"{theirs}.{members[0]}.weight.scale.0"] = _t(s)[:, None, :, None]
        continue
      signed = fmt_name == "int4"
      codes = np.asarray(packing.unpack(jnp.asarray(flat[f"{path}/qweight"]), layout="NK", signed=signed))
      if signed:
        s = flat[f"{path}/wscales"].astype(np.float32).T
        w = codes.astype(np.float32) * np.repeat(s, 64, axis=1)
      else:
        micro = flat[f"{path}/wscales"].astype(np.float32).T
        t = float(flat[f"{path}/wtscale"][0])
        w = np.asarray(q.e2m1_decode(jnp.asarray(codes))) * np.repeat(micro, 16, axis=1) * t
      bias = flat.get(f"{path}/bias", np.zeros((codes.shape[0],), np.float32))
      rows = codes.shape[0] // len(members)
      for i, m in enumerate(members):
        sl = slice(i * rows, (i + 1) * rows)
        state[f"{theirs}.{m}.weight"] = _t(w[sl])
        state[f"{theirs}.{m}.bias"] = _t(bias[sl])
        if signed:
          scale[f"{theirs}.{m}.weight.scale.0"] = _t(s[sl])[:, None, :, None]
        else:
          scale[f"{theirs}.{m}.weight.scale.0"] = _t(np.float32(t)).reshape(1)
          scale[f"{theirs}.{m}.weight.scale.1"] = _t(micro[sl])[:, None, :, None]
      lw = layers[path].weights
      smooth[f"{theirs}.{_SMOOTH_FROM.get((kind, layer.name), members[0])}"] = torch.from_numpy(
          np.asarray(lw.smooth, np.float32))
      branch[f"{theirs}.{_BRANCH_FROM.get((kind, layer.name), members[0])}"] = {
          "a.weight": torch.from_numpy(np.asarray(lw.lora_a, np.float32).T.copy()),
          "b.weight": _t(np.asarray(lw.lora_b, np.float32).T)}
    for norm, our_norm in norms:
      state[f"{theirs}.attn.{norm}.weight"] = _t(flat[f"{ours}/{our_norm}/scale"])
  for theirs, ours in flux_layout.unquantized_layers(config):
    state[f"{theirs}.weight"] = _t(flat[f"{ours}/kernel"].astype(np.float32).T)
    if f"{ours}/bias" in flat:
      state[f"{theirs}.bias"] = _t(flat[f"{ours}/bias"])
  return state, scale, smooth, branch


def _bytes(x) -> bytes:
  if isinstance(x, torch.Tensor):
    x = x.contiguous()
    return x.view(torch.uint8).numpy().tobytes() if x.dtype != torch.uint8 else x.numpy().tobytes()
  return np.ascontiguousarray(x).tobytes()


@pytest.fixture(scope="module", params=["int4", "nvfp4"])
def oracle_model(request):
  qparams, specs, layers = random_quantized_flux(ORACLE_CONFIG, request.param)
  return request.param, qparams, specs, layers


def test_block_tensors_byte_identical_to_deepcompressor(oracle_model, capsys):
  fmt_name, qparams, specs, layers = oracle_model
  state, scale, smooth, branch = deepcompressor_inputs(ORACLE_CONFIG, qparams, specs, layers, fmt_name)
  theirs, other = dc_convert.convert_to_nunchaku_flux_state_dicts(state, scale, smooth, branch,
                                                                  float_point=fmt_name == "nvfp4")
  capsys.readouterr()  # deepcompressor prints one line per layer
  ours = dict(nunchaku.export.block_tensors(qparams, specs, ORACLE_CONFIG))
  assert sorted(ours) == sorted(theirs)
  mismatched = []
  for key, value in theirs.items():
    mine = ours[key]
    if tuple(mine.shape) != tuple(value.shape) or _bytes(mine) != _bytes(value):
      mismatched.append(f"{key}: ours {mine.dtype}{tuple(mine.shape)} theirs {value.dtype}{tuple(value.shape)}")
  assert not mismatched, "\n".join(mismatched)
  ours_rest = dict(nunchaku.export.unquantized_tensors(qparams, ORACLE_CONFIG))
  assert sorted(ours_rest) == sorted(other)
  for key, value in other.items():
    assert _bytes(ours_rest[key]) == _bytes(value), key


def _adaln_bias_rounded(qparams, config):
  """Our params with each adaLN scale-chunk bias replaced by bf16(b + 1) - 1 (the format's fold)."""
  flat = dict(trees.flatten(qparams))
  for _, ours, block_layers, _ in flux_layout.blocks(config):
    for layer in block_layers:
      if layer.kind != "awq":
        continue
      key = f"{ours}/{layer.path}/bias"
      b = np.asarray(flat[key]).reshape(layer.chunks, -1).copy()
      for c in (1, layer.chunks - 2):
        b[c] = (b[c].astype(ml_dtypes.bfloat16) + ml_dtypes.bfloat16(1)).astype(np.float32) - 1
      flat[key] = jnp.asarray(b.reshape(-1).astype(flat[key].dtype))
  return trees.unflatten(flat)


@pytest.mark.parametrize("fmt_name,legacy", [("int4", False), ("nvfp4", True)])
def test_round_trip_reproduces_outputs_bit_for_bit(tmp_path, fmt_name, legacy):
  config = SMALL_CONFIG
  qparams, specs, _ = random_quantized_flux(config, fmt_name, rank=20, seed=1)
  out = str(tmp_path / ("model" if legacy else "model.safetensors"))
  summary = nunchaku.export_flux(qparams, specs, config, out, legacy=legacy, progress=False)
  assert summary["format"] == fmt_name and summary["rank"] == 20
  hugepages = np._core.multiarray._set_madvise_hugepage(True)  # the loader turns it off while it runs
  loaded = nunchaku.load_flux(out, progress=False)
  assert np._core.multiarray._set_madvise_hugepage(hugepages) is True  # and restores it
  assert loaded.config == config and loaded.fmt == fmt_name and loaded.rank == 20
  one_thread = trees.flatten(nunchaku.load_flux(out, progress=False, threads=1).params)
  assert all(np.array_equal(np.asarray(v).view(np.uint8), np.asarray(one_thread[k]).view(np.uint8))
             for k, v in trees.flatten(loaded.params).items()) and len(one_thread) == len(trees.flatten(loaded.params))
  expected = trees.flatten(_adaln_bias_rounded(qparams, config))
  got = trees.flatten(loaded.params)
  if fmt_name == "nvfp4":  # no shift: our proj_out_mlp has no bias; Nunchaku's goes to proj_out_attn
    for j in range(config.num_single_layers):
      expected.pop(f"single_transformer_blocks_{j}/proj_out_mlp/bias", None)
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype and np.array_equal(np.asarray(got[key]), np.asarray(value)), key
  assert {p: (type(s), s.fmt) for p, s in loaded.specs.items()} == {p: (type(s), s.fmt) for p, s in specs.items()}
  adapter = FluxAdapter(config)
  inputs = flux_lib.example_inputs(config, batch=1, image_len=16, text_len=8)
  inputs = {k: jax.random.normal(jax.random.key(i), x.shape, x.dtype) for i, (k, x) in enumerate(inputs.items())}
  ours = quantized_model.transformer_fn(adapter, specs)(_adaln_bias_rounded(qparams, config), **inputs)
  theirs = quantized_model.transformer_fn(adapter, loaded.specs)(loaded.params, **inputs)
  assert np.array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))


def test_single_file_metadata(tmp_path):
  qparams, specs, _ = random_quantized_flux(SMALL_CONFIG, "nvfp4", rank=32, seed=2)
  out = str(tmp_path / "m.safetensors")
  nunchaku.export_flux(qparams, specs, SMALL_CONFIG, out, progress=False)
  meta = SafetensorsFile(out).metadata
  assert sorted(meta) == ["comfy_config", "config", "model_class", "quantization_config"]
  assert json.loads(meta["quantization_config"]) == {
      "method": "svdquant", "rank": 32,
      "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16},
      "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}}
  cfg = json.loads(meta["config"])
  assert cfg["_class_name"] == "FluxTransformer2DModel" and cfg["num_layers"] == 1 and cfg["guidance_embeds"]
  assert json.loads(meta["comfy_config"])["model_class"] == "Flux"
  keys = SafetensorsFile(out).keys()
  assert all(f"{p}.smooth_orig" in keys for p in ("transformer_blocks.0.qkv_proj", "single_transformer_blocks.0.mlp_fc2"))
  # Per-tensor NVFP4 scale on single-source layers, per-channel on the fused qkv.
  assert "transformer_blocks.0.out_proj.wtscale" in keys and "transformer_blocks.0.out_proj.wcscales" not in keys
  assert "transformer_blocks.0.qkv_proj.wcscales" in keys and "transformer_blocks.0.qkv_proj.wtscale" not in keys


# ----------------------------------------------------------------------------- bad input
def test_export_refuses_what_the_format_cannot_express(tmp_path):
  qparams, specs, _ = random_quantized_flux(SMALL_CONFIG, "int4", seed=3)
  out = str(tmp_path / "x.safetensors")
  no_shift = dict(specs)
  path = "transformer_blocks_0/ff/fc2"
  no_shift[path] = dataclasses.replace(specs[path], shift=0.0)
  with pytest.raises(nunchaku.NunchakuExportError, match=r"transformer_blocks\.0\.mlp_fc2.*shift"):
    nunchaku.export_flux(qparams, no_shift, SMALL_CONFIG, out, progress=False)
  nf4 = dict(specs)
  nf4["transformer_blocks_0/norm1/linear"] = WeightOnlySpec("nf4", 64)
  with pytest.raises(nunchaku.NunchakuExportError, match=r"norm1\.linear.*AWQ"):
    nunchaku.export_flux(qparams, nf4, SMALL_CONFIG, out, progress=False)
  missing = {k: v for k, v in specs.items() if k != "single_transformer_blocks_0/proj_mlp"}
  with pytest.raises(nunchaku.NunchakuExportError, match=r"single_transformer_blocks\.0\.mlp_fc1.*not quantized"):
    nunchaku.export_flux(qparams, missing, SMALL_CONFIG, out, progress=False)
  int8 = {k: (dataclasses.replace(v, fmt="int8") if isinstance(v, QuantSpec) else v) for k, v in specs.items()}
  with pytest.raises(nunchaku.NunchakuExportError, match="W8A8"):
    nunchaku.export_flux(qparams, int8, SMALL_CONFIG, out, progress=False)
  assert not os.path.exists(out)


def _rewrite(src: str, dst: str, *, drop=(), rename=None, metadata=None):
  from svdquant_jax.utils.safetensors_io import SafetensorsWriter
  f = SafetensorsFile(src)
  meta = dict(f.metadata) if metadata is None else metadata
  with SafetensorsWriter(dst, meta) as w:
    for k in f.keys():
      if any(d in k for d in drop):
        continue
      w.add((rename or (lambda x: x))(k), f.read(k))


def test_load_rejects_bad_files(tmp_path):
  qparams, specs, _ = random_quantized_flux(SMALL_CONFIG, "int4", seed=4)
  good = str(tmp_path / "good.safetensors")
  nunchaku.export_flux(qparams, specs, SMALL_CONFIG, good, progress=False)
  meta = SafetensorsFile(good).metadata
  cases = {
      "obsolete": (dict(drop=(".smooth",)), "obsolete pre-2025"),
      "missing": (dict(drop=("single_transformer_blocks.0.out_proj.bias",)), r"out_proj\.bias is missing"),
      "v2": (dict(rename=lambda k: k.replace("lora_down", "proj_down")), "v2 key style"),
      "other": (dict(metadata={**meta, "model_class": "NunchakuSanaTransformer2DModel"}), "only Nunchaku FLUX"),
      "noconfig": (dict(metadata={k: v for k, v in meta.items() if k != "config"}), "no 'config' metadata"),
      "extra": (dict(rename=lambda k: k.replace("transformer_blocks.0.norm_q", "transformer_blocks.0.norm_x")),
                r"norm_q\.weight' is missing"),
  }
  for name, (kwargs, message) in cases.items():
    bad = str(tmp_path / f"{name}.safetensors")
    _rewrite(good, bad, **kwargs)
    with pytest.raises(nunchaku.NunchakuFormatError, match=message):
      nunchaku.load_flux(bad, progress=False)
  truncated = str(tmp_path / "truncated.safetensors")
  with open(good, "rb") as f, open(truncated, "wb") as g:
    g.write(f.read()[:-1000])
  with pytest.raises(Exception, match="truncated"):
    nunchaku.load_flux(truncated, progress=False)


# ----------------------------------------------------------------------------- LoRA merged into the file
def _bf16_normal(rng, shape, scale):
  return (rng.standard_normal(shape) * scale).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def random_diffusers_lora(config, rank=16, seed=0):
  """A diffusers-format FLUX LoRA touching every block linear (bf16-exact values)."""
  rng = np.random.default_rng(seed)
  d, mlp = config.inner_dim, config.mlp_dim
  shapes = {"attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "attn.add_q_proj": (d, d),
            "attn.add_k_proj": (d, d), "attn.add_v_proj": (d, d), "attn.to_out.0": (d, d), "attn.to_add_out": (d, d),
            "ff.net.0.proj": (d, mlp), "ff.net.2": (mlp, d), "ff_context.net.0.proj": (d, mlp),
            "ff_context.net.2": (mlp, d), "norm1.linear": (d, 6 * d), "norm1_context.linear": (d, 6 * d)}
  single = {"attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "proj_mlp": (d, mlp),
            "proj_out": (d + mlp, d), "norm.linear": (d, 3 * d)}
  out = {}
  shared_a = _bf16_normal(rng, (rank, d), 0.1)
  for prefix, table in (("transformer_blocks.0", shapes), ("single_transformer_blocks.0", single)):
    for module, (k, n) in table.items():
      a = shared_a if "add_" in module else _bf16_normal(rng, (rank, k), 0.1)
      out[f"transformer.{prefix}.{module}.lora_A.weight"] = a
      out[f"transformer.{prefix}.{module}.lora_B.weight"] = _bf16_normal(rng, (n, rank), 0.05)
  out["transformer.x_embedder.lora_A.weight"] = _bf16_normal(rng, (rank, config.in_channels), 0.1)
  out["transformer.x_embedder.lora_B.weight"] = _bf16_normal(rng, (d, rank), 0.05)
  return out


def _torch_state(path):
  f = SafetensorsFile(path)
  return {k: torch.from_numpy(np.ascontiguousarray(f.read(k)).view(np.uint16)).view(torch.bfloat16)
          if f.dtype(k) == np.dtype(ml_dtypes.bfloat16) else torch.from_numpy(np.array(f.read(k)))
          for k in f.keys()}


def dc_lowrank_dicts(base_file: str, state: dict) -> dict:
  """deepcompressor's per-block LoRA conversion of a diffusers LoRA (``state``) onto the exported
  ``base_file`` (block 0 of each kind): the layers' whole branches, base + LoRA, packed, as torch
  tensors by Nunchaku key (what a Nunchaku-format LoRA file holds). 16-bit layers are left out."""
  from deepcompressor.backend.nunchaku import convert_lora as dc_lora
  orig = _torch_state(base_file)
  extra = {k[len("transformer."):]: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()
           if k.startswith(("transformer.transformer_blocks.", "transformer.single_transformer_blocks."))}
  n1 = orig["single_transformer_blocks.0.out_proj.qweight"].shape[1] * 2
  a, b = extra.pop("single_transformer_blocks.0.proj_out.lora_A.weight"), extra.pop(
      "single_transformer_blocks.0.proj_out.lora_B.weight")
  extra.update({"single_transformer_blocks.0.proj_out.linears.0.lora_A.weight": a[:, :n1].clone(),
                "single_transformer_blocks.0.proj_out.linears.0.lora_B.weight": b.clone(),
                "single_transformer_blocks.0.proj_out.linears.1.lora_A.weight": a[:, n1:].clone(),
                "single_transformer_blocks.0.proj_out.linears.1.lora_B.weight": b.clone()})
  theirs = {}
  for block, layers, members in (("transformer_blocks.0", flux_layout.DOUBLE_LAYERS, {}),
                                 ("single_transformer_blocks.0", flux_layout.SINGLE_LAYERS, _DC_SINGLE)):
    names = {layer.name: list(members.get(layer.name, layer.diffusers)) for layer in layers}
    kinds = {layer.name: ("linear" if layer.kind == "w4a4" else
                          "adanorm_zero" if layer.chunks == 6 else "adanorm_single") for layer in layers}
    got = dc_lora.convert_to_nunchaku_transformer_block_lowrank_dict(orig, extra, block, block, names, kinds)
    theirs.update({f"{block}.{k}": v for k, v in got.items()})
  return theirs


def test_lora_merged_export_byte_identical_to_deepcompressor(tmp_path, capsys):
  from svdquant_jax.models.flux_lora import load_flux_lora

  config = SMALL_CONFIG
  qparams, specs, _ = random_quantized_flux(config, "int4", rank=32, seed=5)
  base, merged = str(tmp_path / "base.safetensors"), str(tmp_path / "merged.safetensors")
  nunchaku.export_flux(qparams, specs, config, base, progress=False)
  state = random_diffusers_lora(config)
  lora = load_flux_lora(dict(state), config)
  nunchaku.export_flux(qparams, specs, config, merged, loras=[(lora, 1.0)], progress=False)
  theirs = dc_lowrank_dicts(base, state)
  capsys.readouterr()
  ours = SafetensorsFile(merged)
  assert len(theirs) == 2 * (len(flux_layout.DOUBLE_LAYERS) + len(flux_layout.SINGLE_LAYERS))
  for key, value in theirs.items():
    mine = ours.read(key)
    assert tuple(mine.shape) == tuple(value.shape), key
    assert _bytes(mine) == _bytes(value), key
  # The 16-bit x_embedder gets W + B·A.
  w = np.asarray(trees.flatten(qparams)["x_embedder/kernel"], np.float32).T
  want = (w + state["transformer.x_embedder.lora_B.weight"] @ state["transformer.x_embedder.lora_A.weight"])
  assert np.array_equal(ours.read("x_embedder.weight"), want.astype(ml_dtypes.bfloat16))
  # Every other tensor is the base file's, byte for byte.
  base_file = SafetensorsFile(base)
  for key in base_file.keys():
    if key not in theirs and key != "x_embedder.weight":
      assert _bytes(base_file.read(key)) == _bytes(ours.read(key)), key


# ----------------------------------------------------------------------------- the commands
@pytest.mark.slow  # ~1 min on an idle 2-core CPU: two command subprocesses and one generation
def test_export_command_then_generate_with_the_file(tmp_path):
  import subprocess
  import sys

  from svdquant_jax.flows import generation
  from svdquant_jax.pipelines.images import read_png
  from svdquant_jax.pipelines.loading import load_pipeline
  from svdquant_jax.quant.adapters import adapter_for_pipeline

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  adapter = adapter_for_pipeline(load_pipeline("flux-tiny"))
  qparams, specs, _ = random_quantized_flux(adapter.config, "int4", rank=16, seed=6)
  folder = tmp_path / "model"
  quantized_model.save_quantized(str(folder), qparams, specs, metadata={
      "family": "flux", "model_config": repr(adapter.config), "fingerprint": "test", "name": "nunchaku-test",
      "transformer_config": {"diffusers": flux_layout.diffusers_config(adapter.config),
                             "dtype": adapter.config.dtype.name, "param_dtype": adapter.config.param_dtype.name}})
  out = tmp_path / "svdq-int4_r16-flux-tiny.safetensors"
  run = lambda script, *args: subprocess.run(  # noqa: E731
      [sys.executable, os.path.join(root, "launch", script), *args], capture_output=True, text=True, timeout=600)
  done = run("export_nunchaku.py", f"--config.quantized_model={folder}", f"--config.output={out}",
             "--config.progress=false")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "rounded to bfloat16" in done.stderr  # flux-tiny is float32: the export says what it rounds
  gen = ["--config.prompts=a red cube", "--config.num_steps=2", "--config.height=64", "--config.width=64",
         "--config.progress=false"]
  done = run("generate.py", f"--config.nunchaku={out}", f"--config.output_dir={tmp_path / 'nunchaku'}", *gen)
  assert done.returncode == 0, done.stderr[-3000:]
  done = run("generate.py", f"--config.quantized_model={folder}", f"--config.output_dir={tmp_path / 'ours'}", *gen)
  assert done.returncode == 0, done.stderr[-3000:]
  a = read_png(str(tmp_path / "nunchaku" / "00000.png")).astype(np.float64)
  b = read_png(str(tmp_path / "ours" / "00000.png")).astype(np.float64)
  psnr = 10 * np.log10(255.0 ** 2 / max(np.mean((a - b) ** 2), 1e-12))
  assert psnr > 30, psnr  # only the bfloat16 rounding of the float32 model separates them
  bad = run("export_nunchaku.py", f"--config.quantized_model={folder}", f"--config.output={tmp_path / 'x.bin'}")
  assert bad.returncode != 0 and "Traceback" not in bad.stderr and ".safetensors file" in bad.stderr


def test_expected_params_equals_a_whole_model_trace():
  """Built block by block (one trace per distinct block), it must equal tracing the whole model."""
  from svdquant_jax.nn import swap_dense
  config = flux_lib.FLUX_PRESETS["flux-tiny"]  # 2 + 2 blocks
  specs = {}
  for _, ours, layers, _ in flux_layout.blocks(config):
    for layer in layers:
      rank = 8 if ours == "transformer_blocks_1" else 16  # one double block differs
      shift = GELU_SHIFT if layer.shifted else 0.0
      specs[f"{ours}/{layer.path}"] = (WeightOnlySpec("int4", 64) if layer.kind == "awq"
                                       else QuantSpec(rank=rank, fmt="int4", shift=shift))
  specs["proj_out"] = QuantSpec(rank=4, fmt="int4")  # outside the blocks
  model = flux_lib.FluxTransformer2DModel(config)

  def init(key, inputs):
    with swap_dense(specs):
      return model.init(key, **inputs)["params"]
  whole = trees.flatten(jax.eval_shape(init, jax.random.key(0), flux_lib.example_inputs(config)))
  fast = trees.flatten(flux_layout.expected_params(config, specs))
  assert list(fast) == list(whole)  # same leaves, same order
  assert {k: (v.shape, v.dtype) for k, v in fast.items()} == {k: (v.shape, v.dtype) for k, v in whole.items()}
  assert fast["transformer_blocks_1/attn/to_qkv/lora_down"].shape == (config.inner_dim, 8)
  assert fast["transformer_blocks_0/attn/to_qkv/lora_down"].shape == (config.inner_dim, 16)
  assert fast["proj_out/lora_up"].shape[0] == 4


def test_blocks_load_in_order_with_bounded_work():
  from svdquant_jax.quant.nunchaku import load as load_lib
  started = []

  def work(i):
    started.append(i)
    if i == 3:
      raise ValueError("block 3 is bad")
    return i * i

  assert list(load_lib._in_order(lambda i: i * i, range(10), 1)) == [i * i for i in range(10)]
  assert list(load_lib._in_order(lambda i: i * i, range(10), 2)) == [i * i for i in range(10)]
  got = []
  with pytest.raises(ValueError, match="block 3 is bad"):
    for value in load_lib._in_order(work, range(100), 2):
      got.append(value)
  assert got == [0, 1, 4]  # results in order up to the first error
  assert len(started) <= 3 + 2 + 1  # at most workers + 1 submitted past the last result taken
