"""ImageReward against the original ``image-reward`` package (fp32, random weights, tiny towers).

The reference is the package's own ``ImageReward`` class (``ImageReward.score``, its torchvision
preprocessing, ``MLP`` head and normalization constants), built with
``ImageReward(med_config=...)``; only the sizes are small: BLIP's ``create_vit`` is replaced by a
2-layer ViT of width 48 (still 224 px, patch 16, so the package's ``_transform(224)`` applies),
and ``med_config.json`` describes a 2-layer BERT of width 768 (the head is ``MLP(768)``). The
tokenizer is a real ``BertTokenizer`` over a small hand-written word-piece vocabulary, to which
BLIP's own ``init_tokenizer`` adds ``[DEC]`` and ``[ENC]``. No weights are downloaded (there are
no real ImageReward weights offline).

The package (``pip install --no-deps image-reward==1.5 timm==0.6.13``) targets transformers 4;
:func:`_import_reference` lets its modules import beside transformers 5 without running its
``__init__`` (which imports diffusers, datasets, ...): it provides the three helpers ``med.py``
imports from ``transformers.modeling_utils`` (moved to ``pytorch_utils`` or removed), the
``get_head_mask`` / ``invert_attention_mask`` / ``init_weights`` methods transformers 5 dropped from
``PreTrainedModel`` (as transformers 4 defined them), the tokenizer's
``additional_special_tokens_ids``, and a stand-in for fairscale's ``checkpoint_wrapper`` (used for
gradient checkpointing only). The model code itself is the package's.

``python tests/test_image_reward.py`` times ours against the package at the real size (random
weights, ViT-L/16 + BERT-base); see docs/benchmarks.md.
"""

import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
import torch

from svdquant_jax.eval import image_reward as ir
from svdquant_jax.eval import image_reward_convert as irc
from svdquant_jax.models import blip
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.utils import safetensors_io
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.utils.trees import flatten

import torch_refs

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # timm 0.6

ROOT = pathlib.Path(__file__).resolve().parent.parent
PARITY_TOL = 1e-5
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "cat", "dog", "good", "bad", "red",
         "blue", "sky", "over", "mountain", "lake", "at", "night", "city", "end", "x", ",", ".", "!", "##s", "##y",
         "##ing", "paint", "house", "tree"]
PROMPTS = ["a photo of the cat", "Good dogs at night!", "a red house, blue sky over the lake", "x",
           "zebra painting [ENC] a tree"]
LONG_PROMPT = "a photo of the red cat over the city at night, " * 4  # more than 35 tokens
REAL_VIT = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16)  # create_vit('large')
REAL_MED = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
            "encoder_width": 768, "add_cross_attention": True}  # BLIP's med_config.json
TINY_VIT = dict(img_size=224, patch_size=16, embed_dim=48, depth=2, num_heads=3)
TINY_MED = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": 768, "intermediate_size": 96,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 3,
            "encoder_width": 768, "add_cross_attention": True, "attention_probs_dropout_prob": 0.1,
            "hidden_dropout_prob": 0.1, "initializer_range": 0.02}


def rel_l2(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ----------------------------------------------------------------------------- the reference package
def _stub(name: str, path: list[str] | None = None, **attrs) -> types.ModuleType:
  module = types.ModuleType(name)
  if path is not None:
    module.__path__ = path
  module.__dict__.update(attrs)
  sys.modules[name] = module
  return module


def _import_reference() -> types.SimpleNamespace:
  """The package's ``ImageReward``, ``blip``, ``blip_pretrain``, ``med`` and ``vit`` modules (see the
  module docstring for what is shimmed)."""
  if importlib.util.find_spec("ImageReward") is None or importlib.util.find_spec("timm") is None:
    pytest.skip("pip install --no-deps image-reward==1.5 timm==0.6.13")
  torch_refs.import_torchvision()  # timm and the package's transforms import torchvision
  root = importlib.util.find_spec("ImageReward").submodule_search_locations[0]
  if not getattr(sys.modules.get("ImageReward"), "_svdquant_stub", False):
    for name in ("ImageReward", "ImageReward.models", "ImageReward.models.BLIP"):
      _stub(name, [os.path.join(root, *name.split(".")[1:])], _svdquant_stub=True)
  if importlib.util.find_spec("fairscale") is None:
    def checkpoint_wrapper(module, *args, **kwargs):
      raise NotImplementedError("gradient checkpointing is not part of the reference")
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
      _stub(name, [])
    _stub("fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=checkpoint_wrapper)
  from transformers import modeling_utils, pytorch_utils

  def find_pruneable_heads_and_indices(*args, **kwargs):
    raise NotImplementedError("head pruning is not part of the reference")
  for name, fn in (("apply_chunking_to_forward", pytorch_utils.apply_chunking_to_forward),
                   ("prune_linear_layer", pytorch_utils.prune_linear_layer),
                   ("find_pruneable_heads_and_indices", find_pruneable_heads_and_indices)):
    if not hasattr(modeling_utils, name):
      setattr(modeling_utils, name, fn)
  med = importlib.import_module("ImageReward.models.BLIP.med")
  model_cls = med.BertModel
  if not hasattr(modeling_utils.PreTrainedModel, "get_head_mask"):  # transformers >= 5
    def invert_attention_mask(self, mask):  # as transformers 4
      ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
      ext = ext.to(dtype=self.dtype)
      return (1.0 - ext) * torch.finfo(self.dtype).min
    model_cls.get_head_mask = lambda self, head_mask, num_layers: [None] * num_layers
    model_cls.invert_attention_mask = invert_attention_mask
    # transformers 5's init_weights needs attributes that only post_init sets; 4's applied _init_weights.
    model_cls.init_weights = lambda self: self.apply(self._init_weights)
  return types.SimpleNamespace(
      med=med, vit=importlib.import_module("ImageReward.models.BLIP.vit"),
      blip=importlib.import_module("ImageReward.models.BLIP.blip"),
      blip_pretrain=importlib.import_module("ImageReward.models.BLIP.blip_pretrain"),
      ImageReward=importlib.import_module("ImageReward.ImageReward"))


def _tokenizer_class(ref, folder: str):
  """``BertTokenizer`` whose ``from_pretrained('bert-base-uncased')`` reads ``folder`` and which has
  transformers 4's ``additional_special_tokens_ids``."""
  class Tokenizer(ref.blip.BertTokenizer):
    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
      del name
      return super().from_pretrained(folder, *args, **kwargs)

    @property
    def additional_special_tokens_ids(self):
      extra = getattr(self, "extra_special_tokens", None) or getattr(self, "additional_special_tokens", [])
      return self.convert_tokens_to_ids(list(extra))
  return Tokenizer


def build_reference(tmp: pathlib.Path, real_size: bool = False, seed: int = 0):
  """The package's ``ImageReward`` with random weights (norms and biases too): tiny towers, or
  (``real_size``) its own ViT-L/16 and BLIP's BERT-base ``med_config.json``.

  Returns ``(model, tokenizer_folder, our config)``.
  """
  ref = _import_reference()
  vit_kwargs = dict(REAL_VIT if real_size else TINY_VIT)
  med = dict(REAL_MED if real_size else TINY_MED)
  vocab_dir = tmp / "vocab"
  vocab_dir.mkdir(parents=True, exist_ok=True)
  (vocab_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  tokenizer_dir = tmp / "bert_tokenizer"  # a plain BERT tokenizer folder, as a user has (no [DEC]/[ENC])
  ref.blip.BertTokenizer.from_pretrained(str(vocab_dir)).save_pretrained(tokenizer_dir)
  (tmp / "med_config.json").write_text(json.dumps(med))

  def create_vit(vit, image_size, *args, **kwargs):
    del vit, args, kwargs
    assert image_size == vit_kwargs["img_size"]
    return ref.vit.VisionTransformer(**vit_kwargs), vit_kwargs["embed_dim"]

  torch.manual_seed(seed)
  with pytest.MonkeyPatch.context() as mp:
    if not real_size:
      mp.setattr(ref.blip_pretrain, "create_vit", create_vit)
    mp.setattr(ref.blip, "BertTokenizer", _tokenizer_class(ref, str(tokenizer_dir)))
    model = ref.ImageReward.ImageReward(med_config=str(tmp / "med_config.json"), device="cpu").eval()
  torch_refs.perturb_norms_and_biases(model, seed + 1)
  g = torch.Generator().manual_seed(seed + 2)
  with torch.no_grad():
    visual = model.blip.visual_encoder
    visual.cls_token.copy_(0.5 * torch.randn(visual.cls_token.shape, generator=g))
    visual.pos_embed.copy_(0.5 * torch.randn(visual.pos_embed.shape, generator=g))
    for layer in model.mlp.layers:  # O(1) rewards that depend on the features
      if isinstance(layer, torch.nn.Linear):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) / layer.in_features ** 0.5)
  vision = blip.BLIPVisionConfig(hidden_size=vit_kwargs["embed_dim"], num_hidden_layers=vit_kwargs["depth"],
                                 num_attention_heads=vit_kwargs["num_heads"],
                                 intermediate_size=4 * vit_kwargs["embed_dim"], image_size=vit_kwargs["img_size"],
                                 patch_size=vit_kwargs["patch_size"])
  return model, tokenizer_dir, irc.config_from_med_config(med, vision)


def torch_state(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _images(seed: int = 0) -> list[np.ndarray]:
  """uint8 RGB images: odd center-crop offsets (227, 229, 231 px long edges), portrait, upscaled."""
  rng = np.random.default_rng(seed)
  out = []
  for h, w in [(224, 227), (229, 224), (224, 231), (150, 97), (300, 260), (224, 224)]:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([128 + 100 * np.sin(xx / (5 + c) + yy / 7) for c in range(3)], -1)
    out.append(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  # One torch thread: at these sizes two threads on a shared 2-core machine are up to 20x slower.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield build_reference(tmp_path_factory.mktemp("image_reward"))
  torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(reference, tmp_path_factory):
  model, _, config = reference
  path = tmp_path_factory.mktemp("ir_weights") / "image_reward.safetensors"
  ir.save_image_reward(path, irc.convert_image_reward_state(torch_state(model), config), config)
  return path


@pytest.fixture(scope="module")
def scorer(reference, weights):
  return ir.ImageRewardScorer.from_files(weights, reference[1], batch_size=4)  # 6 images: 4 + 2 (+2 padding)


# ----------------------------------------------------------------------------- tests
def test_constants_and_head_are_the_packages(reference):
  model = reference[0]
  assert (model.mean, model.std) == (ir.SCORE_MEAN, ir.SCORE_STD)
  linears = [(i, m) for i, m in enumerate(model.mlp.layers) if isinstance(m, torch.nn.Linear)]
  assert tuple(i for i, _ in linears) == irc.MLP_TORCH_INDICES
  assert tuple(m.out_features for _, m in linears) == ir.MLP_DIMS and linears[0][1].in_features == 768
  assert not any(isinstance(m, torch.nn.ReLU) for m in model.mlp.layers)


def test_preprocessing_matches_the_package(reference, scorer):
  from PIL import Image
  model = reference[0]
  images = _images()
  got = scorer.preprocess(images)
  for im, g in zip(images, got):
    want = model.preprocess(Image.fromarray(im)).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(g, want)


def test_tokenization_matches_blip_tokenizer(reference, scorer, caplog):
  model = reference[0]
  prompts = PROMPTS + [LONG_PROMPT]
  with caplog.at_level(logging.WARNING):
    ids, mask = scorer.tokenize(prompts)
  want = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="np")
  np.testing.assert_array_equal(ids, want["input_ids"])
  np.testing.assert_array_equal(mask, want["attention_mask"])
  tok = model.blip.tokenizer
  assert ids[-1, 0] == tok.cls_token_id and ids[-1, -1] == tok.sep_token_id and mask[-1].all()  # truncated
  assert tok.convert_tokens_to_ids("[ENC]") in ids[4] and tok.unk_token_id in ids[4]
  assert "this part was truncated" in caplog.text


def test_features_and_scores_match_the_package(reference, scorer):
  from PIL import Image
  model = reference[0]
  images, prompts = _images(), PROMPTS + [LONG_PROMPT]
  got = scorer.features(images, prompts, keep_image_embeds=True)
  pixels = torch.from_numpy(scorer.preprocess(images).transpose(0, 3, 1, 2).copy())
  ids, mask = (torch.from_numpy(a).long() for a in scorer.tokenize(prompts))
  with torch.no_grad():
    image_embeds = model.blip.visual_encoder(pixels)
    hidden = model.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                     encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                                     return_dict=True).last_hidden_state
    reward = model.mlp(hidden[:, 0]).numpy()[:, 0]
    # The package's own scoring path, one image at a time (PIL in, preprocessing, tokenizer, head).
    want_scores = np.array([model.score(p, Image.fromarray(im)) for p, im in zip(prompts, images)])
  errors = {"image_embeds": rel_l2(got["image_embeds"], image_embeds.numpy()),
            "text_features": rel_l2(got["text_features"], hidden[:, 0].numpy()),
            "reward": rel_l2(got["reward"], reward),
            "scores": float(np.max(np.abs(got["scores"] - want_scores)) / np.max(np.abs(want_scores)))}
  logging.info("ImageReward fp32 relative errors: %s; scores %s", errors, np.round(want_scores, 4))
  assert all(e <= PARITY_TOL for e in errors.values()), errors
  assert np.ptp(want_scores) > 0.1  # the random model's scores depend on image and prompt

  result = ir.image_reward(images, prompts, scorer)  # the reported value: the mean over the images
  np.testing.assert_array_equal(result.scores, got["scores"].astype(np.float64))
  assert abs(result.mean - np.mean(want_scores)) <= PARITY_TOL * np.max(np.abs(want_scores))


def test_converter_errors_name_the_tensor(reference):
  model, _, config = reference
  state = torch_state(model)
  assert {k for k in state if k.startswith(("blip.vision_proj", "blip.text_proj"))}  # present, ignored
  params = irc.convert_image_reward_state(state, config)
  assert flatten(params)["visual_encoder/cls_token"].shape == (48,)
  assert flatten(params)["text_encoder/layers_1/crossattention/to_kv/kernel"].shape == (48, 2 * 768)

  missing = {k: v for k, v in state.items() if k != "blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"}
  with pytest.raises(CheckpointError, match=r"my\.pt .*missing tensor\(s\) blip\.text_encoder\.encoder\.layer\.1\."
                                            r"crossattention\.self\.key\.bias"):
    irc.convert_image_reward_state(missing, config, source="my.pt")
  extra = dict(state, **{"blip.text_encoder.pooler.dense.weight": np.zeros((768, 768), np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) blip\.text_encoder\.pooler\.dense\.weight"):
    irc.convert_image_reward_state(extra, config)
  bad = dict(state, **{"mlp.layers.4.weight": np.zeros((64, 127), np.float32)})
  with pytest.raises(CheckpointError, match=r"mlp\.layers\.4\.weight -> mlp_2/kernel: shape \(127, 64\) != "
                                            r"expected \(128, 64\)"):
    irc.convert_image_reward_state(bad, config)
  # A config of other widths: every misshaped tensor is reported with both shapes.
  wider = ir.ImageRewardConfig(dataclasses.replace(config.vision, hidden_size=60, intermediate_size=240),
                               dataclasses.replace(config.text, encoder_width=60))
  with pytest.raises(CheckpointError, match=r"blip\.visual_encoder\.pos_embed -> visual_encoder/pos_embed: "
                                            r"shape \(197, 48\) != expected \(197, 60\)"):
    irc.convert_image_reward_state(state, wider)
  with pytest.raises(CheckpointError, match=r"ImageReward\.pt does not match the model: missing tensor\(s\) "
                                            r"blip\.text_encoder\.encoder\.layer\.10\."):
    irc.convert_image_reward_state(state)  # the real-size default: 24 + 12 layers


def test_loader_errors_name_the_file(reference, weights, tmp_path):
  with pytest.raises(CheckpointError, match="safetensors file not found: .*nowhere.safetensors"):
    ir.load_image_reward(tmp_path / "nowhere.safetensors")
  plain = tmp_path / "plain.safetensors"
  safetensors_io.save_safetensors(plain, {"x": np.zeros(2, np.float32)})
  with pytest.raises(CheckpointError, match="plain.safetensors: not an ImageReward file in our layout"):
    ir.load_image_reward(plain)
  f = safetensors_io.SafetensorsFile(weights)
  tensors = {k: np.asarray(f.get(k)) for k in f.keys()}
  tensors["text_encoder/layers_0/attention/to_qkv/kernel"] = np.zeros((768, 2 * 768), np.float32)
  del tensors["mlp_4/bias"]
  broken = tmp_path / "broken.safetensors"
  safetensors_io.save_safetensors(broken, tensors, f.metadata)
  with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing 1 leaf/leaves: mlp_4/bias.*"
                                            r"to_qkv/kernel: shape \(768, 1536\) != expected \(768, 2304\)"):
    ir.load_image_reward(broken)
  safetensors_io.save_safetensors(broken, tensors, dict(f.metadata, config="{}"))
  with pytest.raises(CheckpointError, match="broken.safetensors metadata: not an ImageReward config"):
    ir.load_image_reward(broken)


def test_bad_inputs(reference, scorer, tmp_path):
  rgb = np.zeros((2, 32, 32, 3), np.uint8)
  cases = [
      (lambda: scorer.score(rgb, ["a"]), "prompts has 1 entries but images has 2"),
      (lambda: scorer.score(rgb, "a cat"), "prompts must be a list"),
      (lambda: scorer.score(rgb[..., :1], ["a", "b"]), "grayscale"),
      (lambda: scorer.score(rgb.astype(np.float32), ["a", "b"]), "dtype float32"),
      (lambda: scorer.score([], []), "images is empty"),
      (lambda: ir.image_reward(rgb, ["a", "b"], 42), "model must be"),
      (lambda: ir.image_reward(rgb, ["a", "b"], "w.safetensors"), "tokenizer is required"),
      (lambda: ir.image_reward(rgb, ["a", "b"], scorer, batch_size=0), "batch_size"),
  ]
  for fn, message in cases:
    with pytest.raises(ValueError, match=message):
      fn()
  small_vocab = ir.LoadedImageReward(
      ir.ImageRewardConfig(scorer.model.config.vision, blip.BLIPTextConfig(
          **dict(blip.config_dict(scorer.model.config.text), vocab_size=len(VOCAB)))), {}, "small.safetensors")
  with pytest.raises(ValueError, match=r"tokenizer has 35 tokens \(with \[DEC\] and \[ENC\]\) but the text encoder of "
                                       r"small.safetensors has 33 embeddings"):
    ir.ImageRewardScorer(small_vocab, tok_lib.load_tokenizer(reference[1]))
  with pytest.raises(ValueError, match="BLIPTextConfig.hidden_size=770 is not divisible by num_attention_heads=12"):
    blip.BLIPTextConfig(hidden_size=770)
  with pytest.raises(ValueError, match=r"m\.json: hidden_act='relu' is not supported"):
    blip.BLIPTextConfig.from_med_config(dict(TINY_MED, hidden_act="relu"), 48, source="m.json")
  with pytest.raises(ValueError, match="text.encoder_width=768 must equal the ViT width vision.hidden_size=1024"):
    ir.ImageRewardConfig(text=blip.BLIPTextConfig(encoder_width=768))


def test_real_size_tree_by_eval_shape():
  """ImageReward-v1.0's parameter tree (jax.eval_shape, nothing allocated)."""
  assert irc.config_from_med_config(json.dumps(REAL_MED)) == ir.ImageRewardConfig()  # BLIP's file = our default
  tree = flatten(ir.abstract_params(ir.ImageRewardConfig()))
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in tree.values())
  assert tree["visual_encoder/pos_embed"].shape == (197, 1024)
  assert tree["visual_encoder/patch_embedding/kernel"].shape == (16, 16, 3, 1024)
  assert tree["text_encoder/word_embeddings/embedding"].shape == (30524, 768)
  assert tree["text_encoder/layers_11/crossattention/to_kv/kernel"].shape == (1024, 1536)
  assert "visual_encoder/layers_23/mlp/fc1/kernel" in tree and "mlp_4/kernel" in tree
  count = sum(int(np.prod(v.shape)) for v in tree.values())
  # BLIP ViT-L/16 303,301,632 + med BERT-base with cross-attention 141,977,088 + head 927,969; the
  # package's model also has vision_proj / text_proj (459,264), which the score never uses.
  assert count == 303_301_632 + 141_977_088 + 927_969


def test_convert_command(reference, weights, tmp_path):
  model, tokenizer_dir, config = reference
  torch.save(model.state_dict(), tmp_path / "ImageReward.pt")
  (tmp_path / "config.json").write_text(config.to_json())
  out = tmp_path / "converted.safetensors"
  cmd = [sys.executable, str(ROOT / "launch" / "convert_image_reward.py"),
         f"--checkpoint={tmp_path / 'ImageReward.pt'}", f"--config_json={tmp_path / 'config.json'}", f"--out={out}"]
  start = time.perf_counter()
  done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180, check=False)
  logging.info("convert command: %.1f s", time.perf_counter() - start)
  assert done.returncode == 0, done.stderr
  a, b = safetensors_io.SafetensorsFile(out), safetensors_io.SafetensorsFile(weights)
  assert sorted(a.keys()) == sorted(b.keys()) and a.metadata["config"] == b.metadata["config"]
  for name in a.keys():
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)


# ----------------------------------------------------------------------------- benchmark
def benchmark(images: int, batch_size: int, rounds: int, size: int, torch_threads: list[int]) -> None:
  """Times ours against the package at the real size (random weights): ``ImageReward.score`` per
  image (its own path: PIL preprocessing, tokenizer, forward) vs :meth:`ImageRewardScorer.score`
  on the same images and prompts, torch at each of ``torch_threads``. Compilation / first calls
  are excluded; medians over ``rounds``."""
  import tempfile
  from PIL import Image
  torch.set_grad_enabled(False)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    model, tokenizer_dir, config = build_reference(tmp, real_size=True)
    ir.save_image_reward(tmp / "w.safetensors", irc.convert_image_reward_state(torch_state(model), config), config)
    scorer = ir.ImageRewardScorer.from_files(tmp / "w.safetensors", tokenizer_dir, batch_size=batch_size)
  rng = np.random.default_rng(0)
  pictures = [np.clip(rng.normal(128, 60, (size, size, 3)), 0, 255).astype(np.uint8) for _ in range(images)]
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
  pil = [Image.fromarray(p) for p in pictures]

  def median(fn):
    out = fn()  # warm-up: compilation (ours), allocator and thread pool start (torch)
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return float(np.median(times)), out

  ours_s, got = median(lambda: scorer.score(pictures, prompts).scores)
  print(f"ImageReward-v1.0 size, random weights, {images} images {size}x{size}; jax {jax.__version__} "
        f"({jax.devices()[0].platform}, batch {batch_size}): {1e3 * ours_s / images:.0f} ms/image")
  for threads in torch_threads:
    torch.set_num_threads(threads)
    theirs_s, want = median(lambda: np.array([model.score(p, im) for p, im in zip(prompts, pil)]))
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"  torch {torch.__version__}, {threads} thread(s), ImageReward.score per image: "
          f"{1e3 * theirs_s / images:.0f} ms/image; ours/torch {ours_s / theirs_s:.2f}; "
          f"max |score diff| / max |score| {err:.1e}")


if __name__ == "__main__":
  import argparse
  parser = argparse.ArgumentParser(description="ImageReward speed: ours vs the image-reward package (real size).")
  parser.add_argument("--images", type=int, default=4)
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--size", type=int, default=512, help="image height and width (resized to 224 by both)")
  parser.add_argument("--torch_threads", default="1,2", help="comma-separated torch thread counts to time")
  args = parser.parse_args()
  benchmark(args.images, args.batch_size, args.rounds, args.size, [int(t) for t in args.torch_threads.split(",")])
