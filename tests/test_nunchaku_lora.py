"""Nunchaku-format LoRAs: accepted on the 4-bit checkpoint they were made for, refused elsewhere.

The Nunchaku-format LoRA is made by deepcompressor's own LoRA converter (the oracle) from our
exported base checkpoint and a diffusers LoRA; loading it back onto our quantized model must give
the diffusers LoRA's updates on every block layer.
"""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import pytest
import torch

from svdquant_jax.models.flux_lora import LoraError, load_flux_lora
from svdquant_jax.quant import nunchaku
from svdquant_jax.utils.safetensors_io import save_safetensors

from test_nunchaku import SMALL_CONFIG, dc_lowrank_dicts, random_diffusers_lora, random_quantized_flux


def _numpy(t: torch.Tensor) -> np.ndarray:
  if t.dtype == torch.bfloat16:
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def _nunchaku_lora(base_file: str, state: dict) -> dict[str, np.ndarray]:
  """The Nunchaku-format LoRA deepcompressor's converter makes (numpy, stored dtypes)."""
  return {k: _numpy(v) for k, v in dc_lowrank_dicts(base_file, state).items()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
  config = SMALL_CONFIG
  qparams, specs, _ = random_quantized_flux(config, "int4", rank=32, seed=5)
  base = str(tmp_path_factory.mktemp("nunchaku_lora") / "base.safetensors")
  nunchaku.export_flux(qparams, specs, config, base, progress=False)
  state = random_diffusers_lora(config)
  return config, qparams, state, _nunchaku_lora(base, state), base


def test_on_its_own_checkpoint_it_is_the_diffusers_lora(made, tmp_path, capsys):
  config, qparams, state, tensors, base = made
  capsys.readouterr()
  path = str(tmp_path / "nunchaku_lora.safetensors")
  save_safetensors(path, tensors)
  got = nunchaku.load_nunchaku_lora(path, qparams, config)
  want = load_flux_lora(dict(state), config)
  block_paths = {p for p in want.layers if p.startswith(("transformer_blocks", "single_transformer_blocks"))}
  assert set(got.layers) == block_paths and len(block_paths) == 15
  worst = 0.0
  for p in sorted(block_paths):
    d_got, d_want = got.layers[p].delta(), want.layers[p].delta()
    err = float(np.abs(d_got - d_want).max() / np.abs(d_want).max())
    worst = max(worst, err)
    assert err < 1e-6, (p, err)   # the factors are bf16-exact: only float32 sums differ
  logging.info("Nunchaku-format LoRA vs the diffusers LoRA: worst relative update difference %.2e", worst)
  # Every LoRA rank was found after the base's 32: the fused q/k/v updates keep the LoRA's rank (shared
  # lora_A of the add_* members: one stacked B), the others stack their members' ranks.
  assert got.layers["transformer_blocks_0/attn/add_qkv_proj"].rank == 16
  assert got.layers["transformer_blocks_0/attn/to_qkv"].rank == 48
  assert got.layers["transformer_blocks_0/norm1/linear"].rank == 16
  # The same file on the base checkpoint imported from its Nunchaku file (the generate command's
  # --config.nunchaku path): the same LoRA, bit for bit.
  imported = nunchaku.load_flux(base, progress=False)
  again = nunchaku.load_nunchaku_lora(path, imported.params, config)
  for p in block_paths:
    assert np.array_equal(again.layers[p].a, got.layers[p].a) and np.array_equal(again.layers[p].b, got.layers[p].b)


def test_refused_on_another_checkpoint_and_on_a_float_model(made):
  config, _, _, tensors, _ = made
  other, _, _ = random_quantized_flux(config, "int4", rank=32, seed=6)
  with pytest.raises(LoraError, match=r"made for another quantized checkpoint: its base branch at "
                                      r"transformer_blocks\.0\.qkv_proj"):
    nunchaku.load_nunchaku_lora(tensors, other, config)
  from svdquant_jax.models import flux as flux_lib
  float_params = flux_lib.init_flux_params(config, 0)
  with pytest.raises(LoraError, match="is not the 4-bit AWQ adaLN layer|is not a 4-bit SVDQuant layer"):
    nunchaku.load_nunchaku_lora(tensors, float_params, config)
  # The float path names the format and where it applies.
  with pytest.raises(LoraError, match="Nunchaku-format LoRA .* the 4-bit checkpoint it was converted from"):
    load_flux_lora(tensors, config)


def test_bad_files(made):
  config, qparams, _, tensors, _ = made
  extra = dict(tensors, **{"transformer_blocks.0.mlp_fc1.bias": np.zeros(8, np.float32)})
  with pytest.raises(LoraError, match=r"1 key\(s\) are not block LoRA factors .*mlp_fc1\.bias"):
    nunchaku.load_nunchaku_lora(extra, qparams, config)
  assert len(nunchaku.load_nunchaku_lora(extra, qparams, config, partial=True).layers) == 15
  missing = {k: v for k, v in tensors.items() if k != "transformer_blocks.0.mlp_fc2.lora_up"}
  with pytest.raises(LoraError, match=r"mlp_fc2\.lora_up is missing beside .*mlp_fc2\.lora_down"):
    nunchaku.load_nunchaku_lora(missing, qparams, config)
  short = dict(tensors)
  short["transformer_blocks.0.out_proj.lora_down"] = tensors["transformer_blocks.0.out_proj.lora_down"][:, :16]
  short["transformer_blocks.0.out_proj.lora_up"] = tensors["transformer_blocks.0.out_proj.lora_up"][:, :16]
  with pytest.raises(LoraError, match="stores rank 16, less than this model's base branch"):
    nunchaku.load_nunchaku_lora(short, qparams, config)
  with pytest.raises(LoraError, match="not a Nunchaku-format LoRA"):
    nunchaku.load_nunchaku_lora({"transformer.x_embedder.lora_A.weight": np.zeros((4, 4), np.float32)}, qparams,
                                config)
