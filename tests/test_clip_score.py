"""CLIP vision tower, CLIP score and CLIP-IQA against transformers and torchmetrics (fp32).

The reference is a tiny *random* ``transformers.CLIPModel`` (real CLIP weights are not available
offline) saved with ``save_pretrained`` beside a ``CLIPProcessor`` made of a hand-built
``CLIPTokenizer`` and transformers' PIL ``CLIPImageProcessorPil``.

The tokenizer is a real ``CLIPTokenizer`` (CLIP's lower-casing normalizer, its split regex, byte
level BPE with the ``</w>`` word-end suffix) over a tiny vocabulary laid out as CLIP's: the 256
byte symbols, the same with ``</w>``, a few merges, then ``<|startoftext|>`` and
``<|endoftext|>`` (the largest id, as in the real vocabulary). No vocabulary file is downloaded.

torchmetrics (test-only, ``pip install --no-deps torchmetrics==1.9.0 lightning-utilities``) calls
``model.get_image_features(...)`` / ``get_text_features(...)`` and expects tensors; transformers 5
returns ``BaseModelOutputWithPooling``, so :class:`_TorchmetricsCLIP` hands torchmetrics the
``pooler_output`` (the projected embedding).
"""

import json
import logging
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import torch_refs
from svdquant_jax.eval import clip_score as cs
from svdquant_jax.models import clip_vision
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.utils.trees import flatten

torch_refs.import_torchvision()  # transformers' CLIPModel and torchmetrics import torchvision
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

PARITY_TOL = 1e-5
IMAGE_SIZE, PATCH = 32, 8
MERGES = [("t", "h"), ("th", "e</w>"), ("p", "h"), ("o", "t"), ("ph", "ot"), ("phot", "o</w>"), ("g", "o"),
          ("go", "od</w>"), ("o", "d</w>"), ("c", "at</w>"), ("a", "t</w>")]
PROMPTS = ["a photo of the cat", "Good photo.", "THE  dog", "x", "a bad photo, the end"]
LONG_PROMPT = "the photo of a cat " * 20  # 100 content tokens: more than 77 with the special tokens


def rel_l2(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def tiny_clip_tokenizer() -> transformers.CLIPTokenizer:
  chars = [tok_lib._byte_to_unicode()[b] for b in range(256)]
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": i + 256 for i, c in enumerate(chars)})
  for a, b in MERGES:
    vocab.setdefault(a + b, len(vocab))
  vocab[tok_lib.CLIP_BOS] = len(vocab)
  vocab[tok_lib.CLIP_EOS] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=MERGES)


class _TorchmetricsCLIP(torch.nn.Module):
  """``CLIPModel`` whose feature methods return tensors, as torchmetrics 1.9 expects."""

  def __init__(self, model):
    super().__init__()
    self.model = model
    self.config = model.config

  def get_image_features(self, pixel_values):
    return self.model.get_image_features(pixel_values=pixel_values).pooler_output

  def get_text_features(self, input_ids, attention_mask=None):
    return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def _images(seed: int = 0) -> list[np.ndarray]:
  """uint8 RGB images of several sizes: landscape, portrait, square = tower size, smaller (upscaled)."""
  rng = np.random.default_rng(seed)
  shapes = [(40, 56), (77, 33), (32, 32), (20, 24), (64, 64)]
  out = []
  for h, w in shapes:
    # Smooth content plus noise, so that resampling matters.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / (3 + c) + yy / 5) for c in range(3)], -1)
    out.append(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def _same_size_images(seed: int, count: int) -> list[np.ndarray]:
  """``count`` landscape 40x56 images (torchmetrics takes one [B, 3, H, W] tensor per update)."""
  return [_images(seed + i)[0] for i in range(count)]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  tokenizer = tiny_clip_tokenizer()
  eos = tokenizer.convert_tokens_to_ids(tok_lib.CLIP_EOS)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos, pad_token_id=eos,
                       bos_token_id=tokenizer.convert_tokens_to_ids(tok_lib.CLIP_BOS)),
      vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                         image_size=IMAGE_SIZE, patch_size=PATCH),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  torch_refs.perturb_norms_and_biases(model, 1)
  processor = transformers.CLIPProcessor(
      image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
      tokenizer=tokenizer)
  folder = str(tmp_path_factory.mktemp("clip") / "clip")
  model.save_pretrained(folder)
  processor.save_pretrained(folder)
  return folder, model, processor


@pytest.fixture(scope="module")
def scorer(clip_folder):
  return cs.CLIPScorer.from_folder(clip_folder[0], batch_size=2)  # 5 images: batches 2, 2, 1 (+1 padding)


def test_loader_tree_and_config(clip_folder, scorer):
  config = scorer.clip.config
  assert (config.vision.image_size, config.vision.patch_size, config.projection_dim) == (IMAGE_SIZE, PATCH, 16)
  assert config.text.eos_token_id == clip_folder[2].tokenizer.eos_token_id
  abstract = clip_vision.abstract_clip_model_params(config)
  got = {k: (v.shape, v.dtype) for k, v in flatten(scorer.clip.params).items()}
  assert got == {k: (v.shape, v.dtype) for k, v in flatten(abstract).items()}
  assert got["vision_model/patch_embedding/kernel"][0] == (PATCH, PATCH, 3, 48)
  assert got["vision_model/position_embedding/embedding"][0] == ((IMAGE_SIZE // PATCH) ** 2 + 1, 48)
  assert got["logit_scale"][0] == ()


def test_openai_style_config():
  """Old openai config.json: ``*_config_dict`` override ``*_config``; missing keys take transformers' defaults."""
  raw = {"architectures": ["CLIPModel"], "projection_dim": 768,
         "text_config": {"hidden_size": 512, "eos_token_id": 2, "vocab_size": 49408},
         "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                              "num_hidden_layers": 12},
         "vision_config": {"image_size": 224}, "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                                                                      "num_attention_heads": 16,
                                                                      "num_hidden_layers": 24, "patch_size": 14}}
  config = clip_vision.CLIPConfig.from_transformers(raw)
  assert (config.text.hidden_size, config.text.eos_token_id, config.text.max_position_embeddings) == (768, 2, 77)
  assert (config.vision.hidden_size, config.vision.patch_size, config.vision.num_patches) == (1024, 14, 256)
  assert config.projection_dim == 768
  with pytest.raises(ValueError, match="patch_size"):
    clip_vision.CLIPConfig.from_transformers({"vision_config": {"image_size": 224, "patch_size": 15}})


def test_preprocessing_matches_transformers_pil_processor(clip_folder, scorer):
  images = _images()
  want = clip_folder[2].image_processor(images=images, return_tensors="np")["pixel_values"]
  got = scorer.preprocess(images)
  np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("settings", [
    dict(size=20, crop_size=24),  # legacy integer sizes; crop larger than the resized image: zero padding
    dict(size={"height": 30, "width": 18}, crop_size={"height": 16, "width": 12}, resample=2),
    dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_normalize=False),
])
def test_preprocessor_config_variants(settings):
  reference = CLIPImageProcessorPil(**settings)
  ours = clip_vision.CLIPImageProcessing.from_preprocessor_config(reference.to_dict())
  images = _images(1)
  want = [reference(images=[im], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0) for im in images]
  for im, w in zip(images, want):
    np.testing.assert_array_equal(ours(im), w)


def test_image_and_text_features_match_transformers(clip_folder, scorer):
  _, model, processor = clip_folder
  images = _images()
  pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
  with torch.no_grad():
    want_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
  flax_model = clip_vision.CLIPModel(scorer.clip.config)
  got_img = flax_model.apply({"params": scorer.clip.params}, jnp.asarray(pixels.numpy().transpose(0, 2, 3, 1)),
                             method=clip_vision.CLIPModel.get_image_features)
  err_img = rel_l2(got_img, want_img)

  prompts = PROMPTS + [LONG_PROMPT]
  ids, mask = scorer.tokenize(prompts)
  with torch.no_grad():
    want_txt = model.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                       attention_mask=torch.from_numpy(mask).long()).pooler_output.numpy()
  got_txt = flax_model.apply({"params": scorer.clip.params}, jnp.asarray(ids), jnp.asarray(mask),
                             method=clip_vision.CLIPModel.get_text_features)
  err_txt = rel_l2(got_txt, want_txt)
  logging.info("CLIP fp32 relative L2: image features %.2e, text features %.2e", err_img, err_txt)
  assert err_img <= PARITY_TOL and err_txt <= PARITY_TOL

  # The batched, jitted scorer (normalized features; padded last batch) gives the same.
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  assert rel_l2(scorer.image_features(images), unit(want_img)) <= PARITY_TOL
  assert rel_l2(scorer.text_features(prompts), unit(want_txt)) <= PARITY_TOL


def test_long_prompt_is_cut_without_end_token(clip_folder, scorer, caplog):
  tokenizer = clip_folder[2].tokenizer
  full = tokenizer(LONG_PROMPT)["input_ids"]
  assert len(full) > 77 and full[-1] == tokenizer.eos_token_id
  with caplog.at_level(logging.WARNING):
    ids, mask = scorer.tokenize(["a cat", LONG_PROMPT])
  assert ids.shape == (2, 77) and mask[1].all()
  np.testing.assert_array_equal(ids[1], full[:77])
  assert tokenizer.eos_token_id not in ids[1]
  assert ids[0, 3] == tokenizer.eos_token_id and mask[0].sum() == 4  # <bos> a cat <eos>, then padding
  assert "more than 77 tokens" in caplog.text


def test_legacy_eos_pooling(clip_folder, tmp_path):
  """openai configs have eos_token_id 2: pooling at argmax(input_ids), as transformers does."""
  folder, model, _ = clip_folder
  legacy = tmp_path / "legacy"
  shutil.copytree(folder, legacy)
  raw = json.loads((legacy / "config.json").read_text())
  raw["text_config"]["eos_token_id"] = 2
  (legacy / "config.json").write_text(json.dumps(raw))
  scorer = cs.CLIPScorer.from_folder(legacy, batch_size=4)
  assert scorer.clip.config.text.eos_token_id == 2
  ref = transformers.CLIPModel.from_pretrained(legacy).eval()
  prompts = ["a cat", LONG_PROMPT, "the photo"]
  ids, mask = scorer.tokenize(prompts)
  with torch.no_grad():
    want = ref.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                 attention_mask=torch.from_numpy(mask).long()).pooler_output.numpy()
  want = want / np.linalg.norm(want, axis=-1, keepdims=True)
  assert rel_l2(scorer.text_features(prompts), want) <= PARITY_TOL
  # With CLIP's vocabulary order (start and end tokens last) both pooling rules pick the end token
  # of a complete prompt and the start token (position 0) of a cut one: the same features.
  np.testing.assert_allclose(scorer.text_features(prompts), cs.CLIPScorer.from_folder(folder).text_features(prompts),
                             atol=1e-6)


@pytest.fixture(scope="module")
def torchmetrics_multimodal():
  tm = pytest.importorskip("torchmetrics.multimodal", reason="pip install --no-deps torchmetrics==1.9.0 "
                           "lightning-utilities")
  return tm


def _as_torch(images: list[np.ndarray]) -> torch.Tensor:
  """deepcompressor's layout: uint8 ``[B, 3, H, W]`` (all images must share a size)."""
  return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def test_clip_score_matches_torchmetrics(clip_folder, scorer, torchmetrics_multimodal):
  from torchmetrics.functional.multimodal.clip_score import _clip_score_update
  _, model, processor = clip_folder
  wrapped = _TorchmetricsCLIP(model)
  images = _same_size_images(2, 5)
  prompts = PROMPTS[:4] + [LONG_PROMPT]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
      want_each, _ = _clip_score_update(_as_torch(images), prompts, wrapped, processor)
  assert any("longer than" in str(w.message) for w in caught)  # torchmetrics cut the long prompt too
  want_each = want_each.numpy()
  got = scorer.clip_score(images, prompts)
  err = float(np.max(np.abs(got.scores - want_each)) / np.max(np.abs(want_each)))

  # The reported value: torchmetrics' CLIPScore over two updates (clamped mean), on all images and
  # on the images with a positive score (a random model scores both signs).
  def reported(idx):
    metric = torchmetrics_multimodal.CLIPScore(model_name_or_path=lambda: (wrapped, processor))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      for part in (idx[:2], idx[2:]):
        if part:
          metric.update(_as_torch([images[i] for i in part]), [prompts[i] for i in part])
    return float(metric.compute())

  everything = list(range(len(images)))
  positive = [i for i in everything if want_each[i] > 0]
  assert positive, "the seeded random model should score some image above 0"
  for idx in (everything, positive):
    want_mean = reported(idx)
    got_mean = cs.clip_score([images[i] for i in idx], [prompts[i] for i in idx], scorer).mean
    assert abs(got_mean - want_mean) <= PARITY_TOL * max(abs(want_mean), 1.0), (idx, got_mean, want_mean)
  logging.info("CLIP score: per-image max rel. error %.2e; scores %s", err, np.round(want_each, 3))
  assert err <= PARITY_TOL


def test_clip_iqa_matches_torchmetrics(clip_folder, scorer, torchmetrics_multimodal):
  _, model, processor = clip_folder
  images = _same_size_images(3, 6)
  # As deepcompressor: float32 [0, 255] with the default data_range=1.0, "quality" prompts.
  metric = torchmetrics_multimodal.CLIPImageQualityAssessment(
      model_name_or_path=lambda: (_TorchmetricsCLIP(model), processor))
  metric.update(_as_torch(images[:4]).float())
  metric.update(_as_torch(images[4:]).float())
  want = metric.compute().numpy()
  got = cs.clip_iqa(images, scorer)
  err = float(np.max(np.abs(got - want)))
  logging.info("CLIP-IQA: max abs error %.2e; values %s", err, np.round(want, 4))
  assert got.shape == (len(images),) and err <= PARITY_TOL
  # A custom pair in the other order gives the complement.
  np.testing.assert_allclose(cs.clip_iqa(images, scorer, prompts=("Bad photo.", "Good photo.")), 1 - got, atol=1e-6)


def test_bad_inputs(clip_folder, scorer, tmp_path):
  rgb = np.zeros((2, 16, 16, 3), np.uint8)
  cases = [
      (lambda: scorer.clip_score(rgb, ["a"]), "prompts has 1 entries but images has 2"),
      (lambda: scorer.clip_score(rgb[:0], []), "images is empty"),
      (lambda: scorer.clip_score([], []), "images is empty"),
      (lambda: scorer.clip_score(rgb, "a cat"), "prompts must be a list"),
      (lambda: scorer.clip_score(rgb, ["a", 3]), r"prompts\[1\] is a int"),
      (lambda: scorer.clip_score(rgb[..., :1], ["a", "b"]), "grayscale"),
      (lambda: scorer.clip_score(rgb[..., 0], ["a", "b"]), "grayscale"),
      (lambda: scorer.clip_iqa([rgb[0], np.zeros((8, 8, 4), np.uint8)]), r"images\[1\] has 4 channels"),
      (lambda: scorer.clip_iqa(rgb.astype(np.float32)), "dtype float32"),
      (lambda: scorer.clip_iqa(rgb[0]), "add a batch axis"),
      (lambda: scorer.clip_iqa(rgb, prompts=("Good photo.",)), "prompts must be a"),
      (lambda: cs.clip_score(rgb, ["a", "b"], 42), "model must be"),
      (lambda: cs.clip_score(rgb, ["a", "b"], scorer, batch_size=0), "batch_size"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()

  folder = clip_folder[0]
  no_tok = tmp_path / "no_tokenizer"
  shutil.copytree(folder, no_tok, ignore=shutil.ignore_patterns("tokenizer*"))
  with pytest.raises(CheckpointError, match="tokenizer.json"):
    clip_vision.load_clip_model(no_tok)
  no_weights = tmp_path / "no_weights"
  shutil.copytree(folder, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
  with pytest.raises(CheckpointError, match="model.safetensors"):
    clip_vision.load_clip_model(no_weights)
  text_only = tmp_path / "text_only"
  shutil.copytree(folder, text_only)
  raw = json.loads((text_only / "config.json").read_text())
  raw["architectures"] = ["CLIPTextModel"]
  (text_only / "config.json").write_text(json.dumps(raw))
  with pytest.raises(CheckpointError, match="CLIPModel"):
    clip_vision.load_clip_model(text_only)
  assert os.path.exists(os.path.join(folder, "model.safetensors"))


def test_jax_eval_shape_only(clip_folder, scorer):
  """The abstract tree needs no allocation and matches the model's own init shapes."""
  config = scorer.clip.config
  abstract = clip_vision.abstract_clip_model_params(config)
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flatten(abstract).values())
