"""ImageReward (Xu et al. 2023, ``ImageReward-v1.0``) in JAX, as the ``image-reward`` package scores.

deepcompressor reports the mean ImageReward of the generated images against their prompts. The
package's ``ImageReward.score(prompt, image)`` computes, per image:

1. image: torchvision ``Resize(224, BICUBIC)`` of the PIL image (shortest edge to 224, the long
   edge ``int(224 * long / short)``, Pillow's bicubic filter), ``CenterCrop(224)`` (top/left
   ``int(round((n - 224) / 2))``, Python rounding), ``ToTensor`` (``x / 255`` in float32) and
   ``Normalize`` with CLIP's mean/std (float32);
2. prompt: BLIP's tokenizer (bert-base-uncased plus ``[DEC]`` as bos token and ``[ENC]`` as an
   additional special token), ``padding="max_length", truncation=True, max_length=35``: a longer
   prompt keeps ``[CLS]``, its first 33 word pieces and ``[SEP]``;
3. ``image_embeds = visual_encoder(image)`` (BLIP ViT-L/16, ``models.blip.BLIPVisionModel``);
4. ``text_encoder(ids, mask, image_embeds)`` (BLIP's BERT with cross-attention,
   ``models.blip.BLIPTextEncoder``), feature = its first token ``[B, 768]``;
5. reward = ``Linear(768, 1024) -> Linear(1024, 128) -> Linear(128, 64) -> Linear(64, 16) ->
   Linear(16, 1)`` (no activations; the dropouts are inactive), then ``(reward - 0.16717362830052426)
   / 1.0333394966054072``.

:class:`ImageRewardScorer` does the same, batched and jitted (the last batch is padded to the
batch size, so one shape compiles once), with matmuls at ``Precision.HIGHEST`` (float32 as the
original, also on GPUs that would use TF32). :attr:`ImageRewardResult.mean` is the reported number.

Weights: our safetensors layout, one file. Tensor names are the ``/``-joined parameter paths of
:class:`ImageRewardModel` (``visual_encoder/...`` and ``text_encoder/...`` as documented in
``models/blip.py``, ``mlp_<k>/{kernel, bias}`` for the five head layers), all float32; the
metadata holds ``format = "svdquant_jax.image_reward"`` and ``config`` (the tower sizes, JSON).
``launch/convert_image_reward.py`` writes it from the original ``ImageReward.pt``. The tokenizer
is a separate bert-base-uncased tokenizer folder (transformers' files); the BLIP tokens are added
on load when the folder lacks them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.eval.clip_score import _check_batch_size, _check_images, _check_prompts
from svdquant_jax.models import blip
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.models.clip_vision import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile, save_safetensors
from svdquant_jax.utils.trees import flatten, unflatten, validate_tree

Array = jax.Array
FORMAT = "svdquant_jax.image_reward"
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MAX_LENGTH = 35
MLP_DIMS = (1024, 128, 64, 16, 1)
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
DEFAULT_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
  """Tower sizes; the defaults are ``ImageReward-v1.0`` (ViT-L/16 at 224, BLIP's BERT-base)."""
  vision: blip.BLIPVisionConfig = blip.BLIPVisionConfig()
  text: blip.BLIPTextConfig = blip.BLIPTextConfig()

  def __post_init__(self):
    if self.text.encoder_width != self.vision.hidden_size:
      raise ValueError(f"text.encoder_width={self.text.encoder_width} must equal the ViT width "
                       f"vision.hidden_size={self.vision.hidden_size}")

  def to_json(self) -> str:
    return json.dumps({"vision": blip.config_dict(self.vision), "text": blip.config_dict(self.text)}, sort_keys=True)

  @classmethod
  def from_json(cls, text: str, source: str = "config") -> "ImageRewardConfig":
    """Inverse of :meth:`to_json`; ``ValueError`` naming ``source`` on a malformed value."""
    try:
      raw = json.loads(text)
      return cls(blip.BLIPVisionConfig(**raw["vision"]), blip.BLIPTextConfig(**raw["text"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      raise ValueError(f"{source}: not an ImageReward config: {type(e).__name__}: {e}") from e


class ImageRewardModel(nn.Module):
  """BLIP ViT + BLIP BERT + the reward head.

  ``__call__(pixel_values [B, S, S, 3] float32 (preprocessed), input_ids [B, L] int, attention_mask
  [B, L]) -> scores [B] float32`` (normalized, as ``ImageReward.score``); :meth:`features` also
  returns the intermediate tensors.
  """
  config: ImageRewardConfig

  def setup(self):
    self.visual_encoder = blip.BLIPVisionModel(self.config.vision)
    self.text_encoder = blip.BLIPTextEncoder(self.config.text)
    self.mlp = [nn.Dense(d, dtype=jnp.float32, param_dtype=jnp.float32) for d in MLP_DIMS]

  def features(self, pixel_values: Array, input_ids: Array, attention_mask: Array) -> dict[str, Array]:
    """``image_embeds [B, N + 1, Hv]``, ``text_features [B, Ht]`` (first token), ``reward [B]``
    (the head's output before normalization) and ``scores [B]``."""
    image_embeds = self.visual_encoder(pixel_values)
    hidden = self.text_encoder(input_ids, attention_mask, image_embeds)
    text_features = hidden[:, 0].astype(jnp.float32)
    reward = text_features
    for layer in self.mlp:
      reward = layer(reward)
    reward = reward[:, 0]
    return {"image_embeds": image_embeds, "text_features": text_features, "reward": reward,
            "scores": (reward - SCORE_MEAN) / SCORE_STD}

  def __call__(self, pixel_values: Array, input_ids: Array, attention_mask: Array) -> Array:
    return self.features(pixel_values, input_ids, attention_mask)["scores"]


# ----------------------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class LoadedImageReward:
  """A config and its params tree (float32)."""
  config: ImageRewardConfig
  params: dict[str, Any]
  source: str = ""


@functools.cache
def abstract_params(config: ImageRewardConfig) -> dict[str, Any]:
  """The params tree of :class:`ImageRewardModel` as ``jax.ShapeDtypeStruct`` (nothing allocated;
  cached per config: do not modify the returned tree)."""
  size = config.vision.image_size
  pixels = jax.ShapeDtypeStruct((1, size, size, config.vision.num_channels), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  return jax.eval_shape(ImageRewardModel(config).init, jax.random.key(0), pixels, ids, ids)["params"]


def save_image_reward(path: str | os.PathLike, params: Any, config: ImageRewardConfig, source: str = "") -> None:
  """Writes our safetensors layout (validated against ``config`` first)."""
  path = os.fspath(path)
  validate_tree(params, abstract_params(config), what=f"ImageReward params to save to {path}", check_dtype=False)
  metadata = {"format": FORMAT, "config": config.to_json()}
  if source:
    metadata["source"] = source
  save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}, metadata)


def load_image_reward(path: str | os.PathLike) -> LoadedImageReward:
  """Reads our safetensors file (see the module docstring).

  Raises:
    CheckpointError: naming the file: missing, not in our layout (e.g. the original ``.pt``; convert
      it with ``launch/convert_image_reward.py``), or a tensor missing, extra or misshaped against
      ``jax.eval_shape`` of the model its config describes.
  """
  path = os.fspath(path)
  f = SafetensorsFile(path)
  if f.metadata.get("format") != FORMAT:
    raise CheckpointError(f"{path}: not an ImageReward file in our layout (metadata format="
                          f"{f.metadata.get('format')!r}, expected {FORMAT!r}); convert the original "
                          "ImageReward.pt with launch/convert_image_reward.py")
  try:
    config = ImageRewardConfig.from_json(f.metadata.get("config", ""), source=f"{path} metadata")
  except ValueError as e:
    raise CheckpointError(str(e)) from e
  params = unflatten({name: np.asarray(f.get(name)) for name in f.keys()})
  validate_tree(params, abstract_params(config), what=f"ImageReward weights {path}")
  return LoadedImageReward(config, jax.tree_util.tree_map(jnp.asarray, params), path)


# ----------------------------------------------------------------------------- inputs
def preprocess_image(image: np.ndarray, size: int = 224) -> np.ndarray:
  """ImageReward's torchvision transform for one uint8 RGB image ``[H, W, 3]`` -> float32 ``[size, size, 3]``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  height, width = image.shape[:2]
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
  if (new_h, new_w) != (height, width):
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  x = image[top:top + size, left:left + size].astype(np.float32) / np.float32(255)
  return (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)


def blip_tokenizer(tokenizer: Any) -> Any:
  """A copy of a bert-base-uncased tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens added,
  as BLIP's ``init_tokenizer`` does (unchanged when it has them already)."""
  tokenizer = copy.deepcopy(tokenizer)
  if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
    raise ValueError(f"tokenizer {type(tokenizer).__name__} lacks BERT's [CLS] / [SEP] / [PAD] tokens; "
                     "ImageReward needs the bert-base-uncased tokenizer")
  if tokenizer.bos_token != DEC_TOKEN:
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
  if ENC_TOKEN not in tokenizer.all_special_tokens:
    tokenizer.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
  return tokenizer


@dataclasses.dataclass(frozen=True)
class ImageRewardResult:
  """``scores``: ImageReward per image, float64 ``[B]``; ``mean``: their mean (the reported value)."""
  scores: np.ndarray
  mean: float


class ImageRewardScorer:
  """Loaded weights and tokenizer with a jitted, batched forward (reuse it across calls).

  Args:
    model: from :func:`load_image_reward`.
    tokenizer: a bert-base-uncased transformers tokenizer (BLIP's tokens are added to a copy).
    batch_size: images per jitted call; the last batch is padded to it.
  """

  def __init__(self, model: LoadedImageReward, tokenizer: Any, batch_size: int = DEFAULT_BATCH_SIZE):
    self.model = model
    self.batch_size = _check_batch_size(batch_size)
    self.tokenizer = blip_tokenizer(tokenizer)
    vocab = model.config.text.vocab_size
    if len(self.tokenizer) > vocab:
      raise ValueError(f"the tokenizer has {len(self.tokenizer)} tokens (with [DEC] and [ENC]) but the text "
                       f"encoder of {model.source or 'the model'} has {vocab} embeddings; is it bert-base-uncased?")
    net = ImageRewardModel(model.config)
    self._features_fn = jax.jit(lambda p, x, i, m: net.apply({"params": p}, x, i, m, method=ImageRewardModel.features))

  @classmethod
  def from_files(cls, weights: str | os.PathLike, tokenizer_folder: str | os.PathLike,
                 batch_size: int = DEFAULT_BATCH_SIZE) -> "ImageRewardScorer":
    """Our safetensors file and a bert-base-uncased tokenizer folder."""
    return cls(load_image_reward(weights), tok_lib.load_tokenizer(tokenizer_folder), batch_size)

  def preprocess(self, images: Any) -> np.ndarray:
    """uint8 RGB images -> float32 ``[B, S, S, 3]`` (see :func:`preprocess_image`)."""
    size = self.model.config.vision.image_size
    return np.stack([preprocess_image(im, size) for im in _check_images(images)])

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``[B, 35]``; longer prompts are truncated (logged)."""
    return tok_lib.tokenize(self.tokenizer, _check_prompts(prompts), MAX_LENGTH)

  def features(self, images: Any, prompts: Sequence[str], keep_image_embeds: bool = False) -> dict[str, np.ndarray]:
    """The outputs of :meth:`ImageRewardModel.features` for images and one prompt per image, as
    numpy (``image_embeds`` only when ``keep_image_embeds``: ``[B, N + 1, Hv]`` is large)."""
    images = _check_images(images)
    prompts = _check_prompts(prompts)
    if len(prompts) != len(images):
      raise ValueError(f"prompts has {len(prompts)} entries but images has {len(images)}; pass one prompt per image")
    pixels = self.preprocess(images)
    ids, mask = self.tokenize(prompts)
    total, size = len(images), min(self.batch_size, len(images))
    outs: dict[str, list[np.ndarray]] = {}
    with jax.default_matmul_precision("highest"):
      for start in range(0, total, size):
        chunk = [a[start:start + size] for a in (pixels, ids, mask)]
        n = chunk[0].shape[0]
        if n < size:  # pad to the compiled shape; the padding rows are dropped
          chunk = [np.concatenate([c, np.repeat(c[-1:], size - n, axis=0)]) for c in chunk]
        result = self._features_fn(self.model.params, *chunk)
        for key, value in result.items():
          if key != "image_embeds" or keep_image_embeds:
            outs.setdefault(key, []).append(np.asarray(value)[:n])
    return {k: np.concatenate(v) for k, v in outs.items()}

  def score(self, images: Any, prompts: Sequence[str]) -> ImageRewardResult:
    """ImageReward of each image against its prompt, and the mean."""
    scores = self.features(images, prompts)["scores"].astype(np.float64)
    return ImageRewardResult(scores, float(np.mean(scores)))


def image_reward(images: Any, prompts: Sequence[str], model: Any, tokenizer: Any = None,
                 batch_size: int | None = None) -> ImageRewardResult:
  """ImageReward of images against their prompts (``ImageReward.score`` per image, then the mean).

  Args:
    images: uint8 RGB, a batch ``[B, H, W, 3]`` or a sequence of ``[H, W, 3]`` (sizes may differ).
    prompts: one prompt per image.
    model: an :class:`ImageRewardScorer`, or the path of our safetensors file (then ``tokenizer``
      is required).
    tokenizer: with a path ``model``: a bert-base-uncased tokenizer folder or tokenizer object.
    batch_size: images per jitted call (default: the scorer's, else 8).

  Raises:
    ValueError: naming the argument (empty input, grayscale / RGBA / non-uint8 images, a prompt
      count that differs from the image count); ``CheckpointError`` for a bad weights file.
  """
  if isinstance(model, ImageRewardScorer):
    if batch_size is not None and _check_batch_size(batch_size) != model.batch_size:
      model = ImageRewardScorer(model.model, model.tokenizer, batch_size)
    return model.score(images, prompts)
  if not isinstance(model, (str, os.PathLike)):
    raise ValueError(f"model must be an ImageRewardScorer or a weights path, got {type(model).__name__}")
  if tokenizer is None:
    raise ValueError("tokenizer is required with a weights path: a bert-base-uncased tokenizer folder")
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tok_lib.load_tokenizer(tokenizer)
  batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
  return ImageRewardScorer(load_image_reward(model), tokenizer, batch_size).score(images, prompts)
