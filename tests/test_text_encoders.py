"""T5 encoder, CLIP text model and tokenizers against transformers (fp32 parity on tiny random models)."""

import functools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch_refs
import transformers

from svdquant_jax.models import clip as clip_lib
from svdquant_jax.models import t5 as t5_lib
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.models.checkpoint import flatten
from svdquant_jax.utils.safetensors_io import CheckpointError

PARITY_TOL = 1e-5
# Half precision against our fp32 run, relative L2, measured on CPU (jax 0.10.2, torch 2.13):
# T5 bf16 8.9e-3 (transformers bf16: 9.4e-3), T5 fp16 1.04e-3 (transformers fp16: 1.08e-3),
# CLIP fp16 last 1.18e-3 / pooled 1.18e-3 (transformers fp16 last: 1.03e-3).
# The bounds leave ~2x headroom for other backends.
T5_BF16_BOUND = 2e-2
HALF_BOUND = 3e-3

T5_PROMPTS = ["a photo of an astronaut riding a horse on the moon", "a red cube"]
CLIP_PROMPTS = ["a cat", "a dog on a mat"]


def rel_l2(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _rewrite_single_file(folder, tensors: dict) -> None:
  """Replaces a folder's weights by one ``model.safetensors`` holding ``tensors``."""
  for name in os.listdir(folder):
    if name.endswith(".safetensors") or name.endswith(".index.json"):
      os.remove(os.path.join(folder, name))
  safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()},
                              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def _read_tensors(folder) -> dict:
  out = {}
  for name in sorted(os.listdir(folder)):
    if name.endswith(".safetensors"):
      out.update(safetensors.torch.load_file(os.path.join(folder, name)))
  return out


@functools.lru_cache(maxsize=None)
def _jitted_apply(module_type, config):
  return jax.jit(module_type(config).apply)


def _apply(model, params, ids, mask=None):
  """``model.apply`` jitted once per (model class, config), in full fp32 matmul precision."""
  with jax.default_matmul_precision("highest"):
    fn = _jitted_apply(type(model), model.config)
    return fn({"params": params}, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))


def _random_params(abstract, seed):
  """Standard-normal / sqrt(fan-in) params for an abstract tree (cheaper than compiling ``init``)."""
  rng = np.random.default_rng(seed)
  def draw(leaf):
    scale = 1.0 / np.sqrt(leaf.shape[0]) if len(leaf.shape) == 2 else 0.1
    return jnp.asarray((scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype))
  return jax.tree_util.tree_map(draw, abstract)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def t5_gated(tmp_path_factory):
  """Tiny gated-GELU T5 encoder, saved sharded; inputs from the byte-level tokenizer (L=64 > 16)."""
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", dropout_rate=0.0)
  model = transformers.T5EncoderModel(config).eval()
  torch_refs.perturb_norms_and_biases(model, 1, keep=("relative_attention",))
  folder = tmp_path_factory.mktemp("t5_gated")
  model.save_pretrained(folder, max_shard_size="40KB")
  ids, mask = tok_lib.tokenize(tok_lib.byte_level_t5_tokenizer(), T5_PROMPTS, 64)
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  return dict(folder=folder, torch_model=model, ids=ids, mask=mask, want=want.last_hidden_state.numpy())


@pytest.fixture(scope="module")
def t5_relu(tmp_path_factory):
  """Tiny ReLU T5 encoder whose checkpoint holds the embedding only as ``encoder.embed_tokens.weight``."""
  torch.manual_seed(1)
  config = transformers.T5Config(vocab_size=300, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=32, relative_attention_max_distance=20,
                                 feed_forward_proj="relu", dropout_rate=0.0)
  model = transformers.T5EncoderModel(config).eval()
  torch_refs.perturb_norms_and_biases(model, 2, keep=("relative_attention",))
  folder = tmp_path_factory.mktemp("t5_relu")
  model.save_pretrained(folder)
  tensors = _read_tensors(folder)
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  _rewrite_single_file(folder, tensors)
  ids = np.random.default_rng(0).integers(0, 300, (2, 45)).astype(np.int32)
  with torch.no_grad():
    want = model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
  return dict(folder=folder, ids=ids, want=want, tensors=tensors)


def _clip_inputs():
  """Three rows of 16 ids: two byte-level prompts (right padded with eos) and one that holds an id
  (299) above eos (257) before its eos, so that the two pooling rules pick different positions."""
  ids, mask = tok_lib.tokenize(tok_lib.byte_level_clip_tokenizer(), CLIP_PROMPTS, 16)
  row = np.array([256, 10, 299, 20, 257] + [257] * 11, np.int32)
  row_mask = np.array([1] * 5 + [0] * 11, np.int32)
  return np.concatenate([ids, row[None]]), np.concatenate([mask, row_mask[None]])


def _clip_model(tmp_path_factory, name, eos_token_id, hidden_act, legacy_layout, seed):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=24, hidden_act=hidden_act,
                                       eos_token_id=eos_token_id, bos_token_id=256, pad_token_id=257)
  model = transformers.CLIPTextModel(config).eval()
  torch_refs.perturb_norms_and_biases(model, seed + 1, keep=("relative_attention",))
  folder = tmp_path_factory.mktemp(name)
  model.save_pretrained(folder)
  if legacy_layout:  # transformers < 5 layout (FLUX.1's text_encoder): prefixed, with the position_ids buffer.
    tensors = {f"text_model.{k}": v for k, v in _read_tensors(folder).items()}
    tensors["text_model.embeddings.position_ids"] = torch.arange(24, dtype=torch.int64)[None]
    _rewrite_single_file(folder, tensors)
  ids, mask = _clip_inputs()
  outs = {}
  with torch.no_grad():
    for key, m in (("nomask", None), ("mask", torch.from_numpy(mask).long())):
      o = model(input_ids=torch.from_numpy(ids).long(), attention_mask=m)
      outs[key] = (o.last_hidden_state.numpy(), o.pooler_output.numpy())
  return dict(folder=folder, ids=ids, mask=mask, want=outs, eos_token_id=eos_token_id)


@pytest.fixture(scope="module")
def clip_legacy(tmp_path_factory):
  return _clip_model(tmp_path_factory, "clip_legacy", 2, "quick_gelu", legacy_layout=True, seed=3)


@pytest.fixture(scope="module")
def clip_eos(tmp_path_factory):
  return _clip_model(tmp_path_factory, "clip_eos", 257, "gelu", legacy_layout=False, seed=5)


# ----------------------------------------------------------------------------- T5
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16), (16, 20)])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance):
  rel = np.arange(-600, 601)
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(rel), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance).numpy()
  got = np.asarray(t5_lib.relative_position_bucket(jnp.asarray(rel), num_buckets, max_distance))
  np.testing.assert_array_equal(got, want)
  # Every bucket is reached (the log ones included) except "distance 0, key after the query".
  assert len(np.unique(got)) == num_buckets - 1


def test_t5_gated_gelu_sharded_matches_transformers(t5_gated):
  assert len([n for n in os.listdir(t5_gated["folder"]) if n.endswith(".safetensors")]) > 1
  config, params = t5_lib.load_t5_encoder(t5_gated["folder"], dtype=jnp.float32)
  assert config.feed_forward_proj == "gated-gelu" and config.relative_attention_max_distance == 16
  assert t5_gated["ids"].shape == (2, 64) and t5_gated["mask"][1].sum() < 64  # padded row
  got = _apply(t5_lib.T5Encoder(config), params, t5_gated["ids"], t5_gated["mask"])
  assert got.dtype == jnp.float32 and got.shape == (2, 64, 32)
  err = rel_l2(got, t5_gated["want"])
  assert err <= PARITY_TOL, err
  # The mask matters: without it the padded row changes.
  unmasked = _apply(t5_lib.T5Encoder(config), params, t5_gated["ids"])
  assert rel_l2(unmasked[1], t5_gated["want"][1]) > 1e-3


def test_t5_relu_with_encoder_embed_tokens_only_matches_transformers(t5_relu):
  config, params = t5_lib.load_t5_encoder(t5_relu["folder"], dtype=jnp.float32)
  assert config.feed_forward_proj == "relu"
  got = _apply(t5_lib.T5Encoder(config), params, t5_relu["ids"])
  err = rel_l2(got, t5_relu["want"])
  assert err <= PARITY_TOL, err


def test_t5_tied_embedding_both_present(t5_relu, tmp_path):
  folder = tmp_path / "both"
  shutil.copytree(t5_relu["folder"], folder)
  tensors = dict(t5_relu["tensors"])
  tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"].clone()
  _rewrite_single_file(folder, tensors)
  config, params = t5_lib.load_t5_encoder(folder, dtype=jnp.float32)
  np.testing.assert_array_equal(np.asarray(params["shared"]["embedding"]), tensors["shared.weight"].numpy())
  tensors["shared.weight"] = tensors["shared.weight"] + 1.0
  _rewrite_single_file(folder, tensors)
  with pytest.raises(CheckpointError, match=r"shared\.weight.*encoder\.embed_tokens\.weight.*differ"):
    t5_lib.load_t5_encoder(folder, dtype=jnp.float32)


def _transformers_t5(folder, dtype, ids, mask):
  model = transformers.T5EncoderModel.from_pretrained(folder, dtype=dtype).eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  return model, out.last_hidden_state.float().numpy()


def test_t5_half_precision_against_fp32(t5_gated):
  """Ours in bf16 / fp16 against our fp32 run, and no less accurate than transformers in the same dtype."""
  folder, ids, mask = t5_gated["folder"], t5_gated["ids"], t5_gated["mask"]
  config32, params32 = t5_lib.load_t5_encoder(folder, dtype=jnp.float32)
  ref = np.asarray(_apply(t5_lib.T5Encoder(config32), params32, ids, mask))

  config_bf16, params_bf16 = t5_lib.load_t5_encoder(folder)  # default dtype: bf16
  assert config_bf16.dtype == jnp.bfloat16
  assert params_bf16["block_0"]["ffn"]["wo"]["kernel"].dtype == jnp.bfloat16
  got = _apply(t5_lib.T5Encoder(config_bf16), params_bf16, ids, mask)
  assert got.dtype == jnp.bfloat16
  err_bf16 = rel_l2(got, ref)
  _, torch_bf16 = _transformers_t5(folder, torch.bfloat16, ids, mask)
  torch_err_bf16 = rel_l2(torch_bf16, ref)
  assert 0 < err_bf16 <= T5_BF16_BOUND, err_bf16
  assert err_bf16 <= 1.5 * torch_err_bf16, (err_bf16, torch_err_bf16)

  # fp16: wo kept in fp32 as transformers does.
  config16, params16 = t5_lib.load_t5_encoder(folder, dtype=jnp.float16)
  assert params16["block_0"]["ffn"]["wo"]["kernel"].dtype == jnp.float32
  assert params16["block_0"]["ffn"]["wi"]["kernel"].dtype == jnp.float16
  got16 = _apply(t5_lib.T5Encoder(config16), params16, ids, mask)
  assert got16.dtype == jnp.float16
  err_fp16 = rel_l2(got16, ref)
  torch16, torch_fp16 = _transformers_t5(folder, torch.float16, ids, mask)
  assert torch16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
  torch_err_fp16 = rel_l2(torch_fp16, ref)
  assert 0 < err_fp16 <= HALF_BOUND, err_fp16
  assert err_fp16 <= 1.5 * torch_err_fp16, (err_fp16, torch_err_fp16)
  print(f"T5 vs fp32: ours bf16 {err_bf16:.2e} (transformers bf16 {torch_err_bf16:.2e}); "
        f"ours fp16 {err_fp16:.2e} (transformers fp16 {torch_err_fp16:.2e})")


def test_t5_float16_clamps_overflow_like_transformers():
  x = jnp.array([[1.0, 70000.0, -3.0]], jnp.float32).astype(jnp.float16)  # 70000 -> inf in fp16
  assert bool(jnp.isinf(x).any())
  got = np.asarray(t5_lib._clamp_float16(x), np.float32)
  want = torch.clamp(torch.tensor([[1.0, float("inf"), -3.0]], dtype=torch.float16),
                     min=-(65504.0 - 1000), max=65504.0 - 1000).float().numpy()
  np.testing.assert_array_equal(got, want)
  finite = jnp.array([65504.0, -65504.0], jnp.float16)
  np.testing.assert_array_equal(np.asarray(t5_lib._clamp_float16(finite)), np.asarray(finite))


# ----------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("which", ["clip_legacy", "clip_eos"])
def test_clip_matches_transformers_both_pooling_rules(which, request):
  case = request.getfixturevalue(which)
  config, params = clip_lib.load_clip_text_model(case["folder"], dtype=jnp.float32)
  assert config.eos_token_id == case["eos_token_id"]
  model = clip_lib.CLIPTextModel(config)
  ids = case["ids"]
  if case["eos_token_id"] == 2:
    positions = ids.argmax(-1)  # legacy: the largest id
  else:
    positions = (ids == case["eos_token_id"]).argmax(-1)  # first eos
  assert positions[2] == (4 if case["eos_token_id"] != 2 else 2)  # the rules differ on row 2
  for key, mask in (("nomask", None), ("mask", case["mask"])):
    last, pooled = _apply(model, params, ids, mask)
    want_last, want_pooled = case["want"][key]
    err_last, err_pooled = rel_l2(last, want_last), rel_l2(pooled, want_pooled)
    assert err_last <= PARITY_TOL and err_pooled <= PARITY_TOL, (key, err_last, err_pooled)
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(last)[np.arange(3), positions])
  # The padding mask changes the padded positions of the padded rows.
  assert rel_l2(case["want"]["mask"][0][0], case["want"]["nomask"][0][0]) > 1e-3


def test_clip_fp16_against_fp32(clip_legacy):
  """Ours in fp16 against our fp32 run, and no less accurate than transformers in fp16."""
  folder, ids, mask = clip_legacy["folder"], clip_legacy["ids"], clip_legacy["mask"]
  config32, params32 = clip_lib.load_clip_text_model(folder, dtype=jnp.float32)
  config16, params16 = clip_lib.load_clip_text_model(folder)  # default dtype: fp16
  assert config16.dtype == jnp.float16
  assert params16["layers_0"]["attn"]["to_qkv"]["kernel"].dtype == jnp.float16
  ref_last, ref_pooled = _apply(clip_lib.CLIPTextModel(config32), params32, ids, mask)
  last, pooled = _apply(clip_lib.CLIPTextModel(config16), params16, ids, mask)
  assert last.dtype == jnp.float16 and pooled.dtype == jnp.float16
  err_last, err_pooled = rel_l2(last, ref_last), rel_l2(pooled, ref_pooled)
  torch16 = transformers.CLIPTextModel.from_pretrained(folder, dtype=torch.float16).eval()
  with torch.no_grad():
    out16 = torch16(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  torch_err_last = rel_l2(out16.last_hidden_state.float().numpy(), ref_last)
  print(f"CLIP fp16 vs fp32: last {err_last:.2e}, pooled {err_pooled:.2e} (transformers fp16 last "
        f"{torch_err_last:.2e})")
  assert 0 < err_last <= HALF_BOUND and 0 < err_pooled <= HALF_BOUND, (err_last, err_pooled)
  assert err_last <= 1.5 * torch_err_last, (err_last, torch_err_last)


def test_clip_rejects_too_long_input(clip_eos):
  config, params = clip_lib.load_clip_text_model(clip_eos["folder"], dtype=jnp.float32)
  with pytest.raises(ValueError, match="max_position_embeddings=24"):
    clip_lib.CLIPTextModel(config).apply({"params": params}, jnp.zeros((1, 25), jnp.int32))


# ----------------------------------------------------------------------------- loader errors
def test_loader_reports_missing_tensor(t5_relu, tmp_path):
  folder = tmp_path / "missing"
  shutil.copytree(t5_relu["folder"], folder)
  tensors = dict(t5_relu["tensors"])
  del tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"]
  _rewrite_single_file(folder, tensors)
  with pytest.raises(CheckpointError, match=r"missing tensor\(s\) encoder\.block\.0\.layer\.1\.DenseReluDense\.wo"):
    t5_lib.load_t5_encoder(folder, dtype=jnp.float32)


def test_loader_reports_extra_tensor(clip_legacy, tmp_path):
  folder = tmp_path / "extra"
  shutil.copytree(clip_legacy["folder"], folder)
  tensors = _read_tensors(folder)
  tensors["text_model.encoder.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
  _rewrite_single_file(folder, tensors)
  with pytest.raises(CheckpointError,
                     match=r"unexpected tensor\(s\) text_model\.encoder\.layers\.0\.self_attn\.extra"):
    clip_lib.load_clip_text_model(folder, dtype=jnp.float32)


def test_loader_reports_wrong_model_class(t5_relu, clip_eos):
  with pytest.raises(CheckpointError, match=r"CLIPTextModel.*T5EncoderModel"):
    t5_lib.load_t5_encoder(clip_eos["folder"])
  with pytest.raises(CheckpointError, match=r"T5EncoderModel.*CLIPTextModel"):
    clip_lib.load_clip_text_model(t5_relu["folder"])


def test_loader_reports_misshaped_tensor(t5_relu, tmp_path):
  folder = tmp_path / "shape"
  shutil.copytree(t5_relu["folder"], folder)
  tensors = dict(t5_relu["tensors"])
  tensors["encoder.final_layer_norm.weight"] = torch.ones(17)
  _rewrite_single_file(folder, tensors)
  with pytest.raises(CheckpointError, match=r"encoder\.final_layer_norm\.weight -> final_norm/scale: shape \(17,\)"):
    t5_lib.load_t5_encoder(folder, dtype=jnp.float32)


def test_configs_refuse_unsupported_values(t5_relu):
  raw = json.loads((t5_relu["folder"] / "config.json").read_text())
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
    t5_lib.T5Config.from_transformers({**raw, "feed_forward_proj": "gated-silu"})
  with pytest.raises(ValueError, match="lacks required key.*d_kv"):
    t5_lib.T5Config.from_transformers({k: v for k, v in raw.items() if k != "d_kv"})
  with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
    clip_lib.CLIPTextConfig.from_preset("clip-tiny", hidden_act="gelu_new")
  with pytest.raises(ValueError, match="unknown T5 preset 't5-xl'"):
    t5_lib.T5Config.from_preset("t5-xl")
  xxl = t5_lib.T5Config.from_preset("t5-v1_1-xxl")
  assert (xxl.d_model, xxl.d_kv, xxl.d_ff, xxl.num_layers, xxl.num_heads, xxl.vocab_size) == \
      (4096, 64, 10240, 24, 64, 32128)
  large = clip_lib.CLIPTextConfig.from_preset("clip-vit-large-patch14")
  assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size,
          large.max_position_embeddings, large.vocab_size) == (768, 12, 12, 3072, 77, 49408)


def test_tiny_presets_run_on_byte_level_tokens():
  t5_config = t5_lib.T5Config.from_preset("t5-tiny", dtype=jnp.float32, param_dtype=jnp.float32)
  clip_config = clip_lib.CLIPTextConfig.from_preset("clip-tiny", dtype=jnp.float32, param_dtype=jnp.float32)
  t5_ids, t5_mask = tok_lib.tokenize(tok_lib.byte_level_t5_tokenizer(), ["ünïcode ✓"], 24)
  clip_ids, clip_mask = tok_lib.tokenize(tok_lib.byte_level_clip_tokenizer(), ["ünïcode ✓"], 24)
  assert t5_ids.max() < t5_config.vocab_size and clip_ids.max() < clip_config.vocab_size
  t5_model, clip_model = t5_lib.T5Encoder(t5_config), clip_lib.CLIPTextModel(clip_config)
  t5_params = _random_params(t5_lib.abstract_t5_params(t5_config), 0)
  clip_params = _random_params(clip_lib.abstract_clip_params(clip_config), 1)
  out = _apply(t5_model, t5_params, t5_ids, t5_mask)
  last, pooled = _apply(clip_model, clip_params, clip_ids, clip_mask)
  assert out.shape == (1, 24, 64) and last.shape == (1, 24, 64) and pooled.shape == (1, 64)
  assert np.isfinite(np.asarray(out)).all() and np.isfinite(np.asarray(pooled)).all()
  eos_position = int(np.flatnonzero(clip_ids[0] == tok_lib.CLIP_EOS_ID)[0])
  np.testing.assert_array_equal(np.asarray(pooled[0]), np.asarray(last[0, eos_position]))


# ----------------------------------------------------------------------------- tokenizers
TEXT = "Héllo, wörld ✓ 🙂"


def test_byte_level_tokenizers_encode_utf8_bytes():
  utf8 = list(TEXT.encode("utf-8"))
  t5 = tok_lib.byte_level_t5_tokenizer()
  assert isinstance(t5, transformers.PreTrainedTokenizerFast)
  assert t5(TEXT).input_ids == [b + 3 for b in utf8] + [1]
  assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
  assert t5.decode(t5(TEXT).input_ids, skip_special_tokens=True) == TEXT
  clip = tok_lib.byte_level_clip_tokenizer()
  assert isinstance(clip, transformers.PreTrainedTokenizerFast)
  assert clip(TEXT).input_ids == [256] + utf8 + [257]
  assert (clip.bos_token_id, clip.eos_token_id, clip.pad_token_id) == (256, 257, 257)
  assert clip.decode(clip(TEXT).input_ids, skip_special_tokens=True) == TEXT
  assert len(t5) == 259 and len(clip) == 258


def test_tokenize_pads_and_masks():
  ids, mask = tok_lib.tokenize(tok_lib.byte_level_clip_tokenizer(), ["ab", "abcd"], 8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  np.testing.assert_array_equal(ids, [[256, 97, 98, 257, 257, 257, 257, 257],
                                      [256, 97, 98, 99, 100, 257, 257, 257]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
  ids, mask = tok_lib.tokenize(tok_lib.byte_level_t5_tokenizer(), "ab", 5)
  np.testing.assert_array_equal(ids, [[97 + 3, 98 + 3, 1, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0]])


def test_tokenize_warns_about_truncation(caplog):
  with caplog.at_level(logging.WARNING):
    ids, mask = tok_lib.tokenize(tok_lib.byte_level_t5_tokenizer(), ["short", "abcdefghij"], 8)
  np.testing.assert_array_equal(ids[1], [b + 3 for b in b"abcdefg"] + [1])  # eos kept
  assert mask[1].all()
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "prompt 1" in warnings[0] and "'hij'" in warnings[0], warnings
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    ids, _ = tok_lib.tokenize(tok_lib.byte_level_clip_tokenizer(), ["abcdefghij"], 8)
  np.testing.assert_array_equal(ids[0], [256] + list(b"abcdef") + [257])
  assert any("'ghij'" in r.getMessage() for r in caplog.records), caplog.records


def test_tokenize_rejects_bad_arguments():
  tok = tok_lib.byte_level_t5_tokenizer()
  with pytest.raises(ValueError, match="prompts is empty"):
    tok_lib.tokenize(tok, [], 8)
  with pytest.raises(ValueError, match=r"prompts\[1\] is a int"):
    tok_lib.tokenize(tok, ["a", 3], 8)
  with pytest.raises(ValueError, match="max_length"):
    tok_lib.tokenize(tok, ["a"], 1)


def test_tokenizer_save_and_load_round_trip(tmp_path):
  for sub, tok in (("tokenizer", tok_lib.byte_level_clip_tokenizer()),
                   ("tokenizer_2", tok_lib.byte_level_t5_tokenizer())):
    tok.save_pretrained(tmp_path / sub)
    loaded = tok_lib.load_tokenizer(tmp_path / sub)
    for max_length in (6, 32):
      got = tok_lib.tokenize(loaded, [TEXT, "x"], max_length)
      want = tok_lib.tokenize(tok, [TEXT, "x"], max_length)
      np.testing.assert_array_equal(got[0], want[0])
      np.testing.assert_array_equal(got[1], want[1])
    assert loaded.model_max_length == tok.model_max_length
  with pytest.raises(CheckpointError, match="tokenizer folder not found"):
    tok_lib.load_tokenizer(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="cannot load a tokenizer"):
    tok_lib.load_tokenizer(tmp_path / "empty")


def test_real_size_mapping_tables_cover_the_models():
  """The XXL / CLIP-L mapping tables produce exactly the params of the models (abstract, nothing allocated)."""
  xxl = t5_lib.T5Config.from_preset("t5-v1_1-xxl")
  abstract = flatten(t5_lib.abstract_t5_params(xxl))
  assert {r.target for r in t5_lib.t5_mapping(xxl)} == set(abstract)
  assert abstract["block_23/attn/to_qkv/kernel"].shape == (4096, 3 * 4096)
  assert abstract["block_23/ffn/wi/kernel"].shape == (4096, 2 * 10240)
  assert abstract["relative_attention_bias/embedding"].shape == (32, 64)
  assert abstract["shared/embedding"].dtype == jnp.bfloat16
  large = clip_lib.CLIPTextConfig.from_preset("clip-vit-large-patch14")
  abstract = flatten(clip_lib.abstract_clip_params(large))
  rules = clip_lib.clip_mapping(large)
  assert {r.target for r in rules} == set(abstract)
  assert all(s.startswith("text_model.") for r in rules for s in r.sources)
  assert abstract["layers_11/mlp/fc1/kernel"].shape == (768, 3072)
  assert abstract["position_embedding/embedding"].shape == (77, 768)
