"""CLIP score and CLIP-IQA in JAX, as deepcompressor evaluates them with torchmetrics.

deepcompressor reports torchmetrics' ``CLIPScore`` and ``CLIPImageQualityAssessment``, both with
``model_name_or_path="openai/clip-vit-large-patch14"``, on the generated uint8 RGB images (CLIP-IQA
gets them as float32 in [0, 255] with the default ``data_range=1.0``, which transformers' image
processor treats exactly as the uint8 values). This module computes the same numbers from any
transformers ``CLIPModel`` folder (``models.clip_vision.load_clip_model``), jitted and batched:

* preprocessing: transformers' PIL ``CLIPImageProcessor`` (``models.clip_vision.CLIPImageProcessing``);
* text: the folder's tokenizer with its start/end tokens, **no** truncation by the tokenizer, then
  the ids and mask cut to the text tower's ``max_position_embeddings`` (77): a longer caption loses
  its end token, exactly as in torchmetrics (which warns); the pooled position then follows the
  text tower's rule (``clip.CLIPTextModel``). Sequences are padded to that length (right padding;
  with causal attention the padding does not change the result);
* features: ``get_image_features`` / ``get_text_features`` (projected), each divided by its L2 norm;
* CLIP score: per image ``100 * cos(image, caption)`` (:attr:`CLIPScoreResult.scores`, not clamped);
  the reported value is ``max(mean over all images, 0)`` (:attr:`CLIPScoreResult.mean`), which is
  torchmetrics' ``CLIPScore.compute()`` after updates with the same images: it clamps the mean,
  not each image;
* CLIP-IQA: ``softmax(100 * [cos(image, positive), cos(image, negative)])[0]`` per image with the
  pair ``("Good photo.", "Bad photo.")`` (torchmetrics' default ``prompts=("quality",)``).

Matmuls and convolutions are traced under ``jax.default_matmul_precision("highest")``: float32
throughout, also on GPUs that would otherwise use TF32 (torchmetrics runs the model in float32).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from svdquant_jax.models import clip_vision

DEFAULT_IQA_PROMPTS = ("Good photo.", "Bad photo.")
DEFAULT_BATCH_SIZE = 32


@dataclasses.dataclass(frozen=True)
class CLIPScoreResult:
  """``scores``: ``100 * cos`` per image, float64 ``[B]``; ``mean``: ``max(mean(scores), 0)``."""
  scores: np.ndarray
  mean: float


def _check_images(images: Any, name: str = "images") -> list[np.ndarray]:
  """uint8 RGB images as a list of ``[H, W, 3]`` arrays (a batch array or a sequence of images)."""
  if isinstance(images, (list, tuple)):
    if not images:
      raise ValueError(f"{name} is empty; pass at least one image")
    items = [np.asarray(im) for im in images]
    where = [f"{name}[{i}]" for i in range(len(items))]
  else:
    batch = np.asarray(images)
    if batch.ndim != 4:
      hint = " (one image? add a batch axis: images[None])" if batch.ndim == 3 and batch.shape[-1] == 3 else ""
      if batch.ndim == 3 and batch.shape[-1] != 3:
        hint = " (grayscale images? convert them to RGB)"
      raise ValueError(f"{name} must be a uint8 batch [B, H, W, 3], got shape {batch.shape}{hint}")
    if batch.shape[0] == 0:
      raise ValueError(f"{name} is empty (batch size 0); pass at least one image")
    items = list(batch)
    where = [name] * len(items)
  out = []
  for label, im in zip(where, items):
    if im.ndim == 2 or (im.ndim == 3 and im.shape[-1] == 1):
      raise ValueError(f"{label} is grayscale (shape {im.shape}); convert it to RGB [H, W, 3] first")
    if im.ndim == 3 and im.shape[-1] == 4:
      raise ValueError(f"{label} has 4 channels (RGBA?); convert it to RGB [H, W, 3] first "
                       "(deepcompressor loads images with PIL .convert('RGB'))")
    if im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f"{label} must be RGB [H, W, 3] (channels last), got shape {im.shape}")
    if im.dtype != np.uint8:
      raise ValueError(f"{label} has dtype {im.dtype}; expected uint8 RGB values in [0, 255]")
    if im.shape[0] == 0 or im.shape[1] == 0:
      raise ValueError(f"{label} has an empty spatial size {im.shape[:2]}")
    out.append(im)
  return out


def _check_prompts(prompts: Any, name: str = "prompts") -> list[str]:
  if isinstance(prompts, str) or not isinstance(prompts, Sequence):
    raise ValueError(f"{name} must be a list of strings (one per image), got a {type(prompts).__name__}")
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f"{name} is empty; pass one prompt per image")
  for i, p in enumerate(prompts):
    if not isinstance(p, str):
      raise ValueError(f"{name}[{i}] is a {type(p).__name__}, expected str")
  return prompts


def _check_batch_size(batch_size: Any) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return int(batch_size)


class CLIPScorer:
  """A loaded CLIP model with jitted, batched feature functions (reuse it across calls).

  Args:
    clip: a loaded folder (``models.clip_vision.load_clip_model``).
    batch_size: images / prompts per jitted call; the last batch is padded to it (the padding
      rows are dropped), so one shape compiles once.
  """

  def __init__(self, clip: clip_vision.LoadedCLIP, batch_size: int = DEFAULT_BATCH_SIZE):
    self.clip = clip
    self.batch_size = _check_batch_size(batch_size)
    self.model = clip_vision.CLIPModel(clip.config)
    tokenizer = clip.tokenizer
    if tokenizer.pad_token_id is None:
      raise ValueError(f"{clip.source}: the tokenizer has no pad token")
    if getattr(tokenizer, "padding_side", "right") != "right":
      raise ValueError(f"{clip.source}: the tokenizer pads on the {tokenizer.padding_side}; CLIP needs right padding")

    def image_features(params, pixels):
      f = self.model.apply({"params": params}, pixels, method=clip_vision.CLIPModel.get_image_features)
      f = f.astype(jnp.float32)
      return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    def text_features(params, ids, mask):
      f = self.model.apply({"params": params}, ids, mask, method=clip_vision.CLIPModel.get_text_features)
      f = f.astype(jnp.float32)
      return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    self._image_fn = jax.jit(image_features)
    self._text_fn = jax.jit(text_features)

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, dtype: Any = jnp.float32, batch_size: int = DEFAULT_BATCH_SIZE,
                  tokenizer_folder: str | os.PathLike | None = None) -> "CLIPScorer":
    """Loads a transformers ``CLIPModel`` folder (see ``clip_vision.load_clip_model``)."""
    return cls(clip_vision.load_clip_model(folder, dtype=dtype, tokenizer_folder=tokenizer_folder), batch_size)

  @property
  def max_length(self) -> int:
    return self.clip.config.text.max_position_embeddings

  # --------------------------------------------------------------------------- inputs
  def preprocess(self, images: Any) -> np.ndarray:
    """uint8 RGB images -> float32 ``[B, S, S, 3]`` model input (transformers' PIL processor)."""
    return np.stack([self.clip.image_processing(im) for im in _check_images(images)])

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask ``int32 [B, max_length]`` as torchmetrics makes them (see module docstring)."""
    prompts = _check_prompts(prompts)
    length = self.max_length
    encoded = self.clip.tokenizer(prompts, padding="max_length", max_length=length, truncation=False,
                                  verbose=False)
    ids = np.asarray([row[:length] for row in encoded["input_ids"]], np.int32)
    mask = np.asarray([row[:length] for row in encoded["attention_mask"]], np.int32)
    long = [i for i, row in enumerate(encoded["input_ids"]) if len(row) > length]
    if long:
      logging.warning("%d prompt(s) (indices %s) have more than %d tokens; cut to %d tokens without an end token, "
                      "as torchmetrics does", len(long), long[:10], length, length)
    return ids, mask

  # --------------------------------------------------------------------------- features
  def _batched(self, fn, *arrays: np.ndarray) -> np.ndarray:
    total = arrays[0].shape[0]
    size = min(self.batch_size, total)
    outs = []
    with jax.default_matmul_precision("highest"):
      for start in range(0, total, size):
        chunk = [a[start:start + size] for a in arrays]
        n = chunk[0].shape[0]
        if n < size:
          chunk = [np.concatenate([c, np.repeat(c[-1:], size - n, axis=0)]) for c in chunk]
        outs.append(np.asarray(fn(self.clip.params, *chunk))[:n])
    return np.concatenate(outs)

  def image_features(self, images: Any) -> np.ndarray:
    """L2-normalized projected image embeddings, float32 ``[B, projection_dim]``."""
    return self._batched(self._image_fn, self.preprocess(images))

  def text_features(self, prompts: Sequence[str]) -> np.ndarray:
    """L2-normalized projected text embeddings, float32 ``[B, projection_dim]``."""
    ids, mask = self.tokenize(prompts)
    return self._batched(self._text_fn, ids, mask)

  # --------------------------------------------------------------------------- metrics
  def clip_score(self, images: Any, prompts: Sequence[str]) -> CLIPScoreResult:
    """See :func:`clip_score`."""
    images = _check_images(images)
    prompts = _check_prompts(prompts)
    if len(prompts) != len(images):
      raise ValueError(f"prompts has {len(prompts)} entries but images has {len(images)}; "
                       "pass one prompt per image")
    img = self.image_features(images)
    txt = self.text_features(prompts)
    scores = (100 * np.sum(img * txt, axis=-1)).astype(np.float64)
    return CLIPScoreResult(scores, max(float(np.mean(scores)), 0.0))

  def clip_iqa(self, images: Any, prompts: Sequence[str] = DEFAULT_IQA_PROMPTS) -> np.ndarray:
    """See :func:`clip_iqa`."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != 2 or \
        not all(isinstance(p, str) and p for p in prompts):
      raise ValueError(f"prompts must be a (positive, negative) pair of non-empty strings, got {prompts!r}")
    images = _check_images(images)
    anchors = self.text_features(list(prompts))
    img = self.image_features(images)
    logits = 100 * (img @ anchors.T).astype(np.float64)
    return 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))


def _scorer(model: Any, batch_size: int | None) -> CLIPScorer:
  if isinstance(model, CLIPScorer):
    if batch_size is not None and _check_batch_size(batch_size) != model.batch_size:
      return CLIPScorer(model.clip, batch_size)
    return model
  batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
  if isinstance(model, clip_vision.LoadedCLIP):
    return CLIPScorer(model, batch_size)
  if isinstance(model, (str, os.PathLike)):
    return CLIPScorer.from_folder(model, batch_size=batch_size)
  raise ValueError(f"model must be a CLIP folder path, a LoadedCLIP or a CLIPScorer, got {type(model).__name__}")


def clip_score(images: Any, prompts: Sequence[str], model: Any, batch_size: int | None = None) -> CLIPScoreResult:
  """CLIP score of images against their captions (torchmetrics' ``CLIPScore``).

  Args:
    images: uint8 RGB, a batch ``[B, H, W, 3]`` or a sequence of ``[H, W, 3]`` (sizes may differ).
    prompts: one caption per image.
    model: a transformers ``CLIPModel`` folder, a ``LoadedCLIP`` or a :class:`CLIPScorer`.
    batch_size: images per jitted call (default: the scorer's, else 32).

  Returns:
    per-image ``100 * cos`` and their mean clamped at 0 (the reported CLIP score).

  Raises:
    ValueError: naming the argument: empty input, grayscale / RGBA / non-uint8 images, a
      prompt count that differs from the image count.
  """
  return _scorer(model, batch_size).clip_score(images, prompts)


def clip_iqa(images: Any, model: Any, prompts: Sequence[str] = DEFAULT_IQA_PROMPTS,
             batch_size: int | None = None) -> np.ndarray:
  """CLIP-IQA per image (torchmetrics' ``CLIPImageQualityAssessment`` with a HF CLIP model).

  Args:
    images: as :func:`clip_score`.
    model: as :func:`clip_score`.
    prompts: the (positive, negative) prompt pair; default torchmetrics' "quality" pair.
    batch_size: as :func:`clip_score`.

  Returns:
    float64 ``[B]``: the probability of the positive prompt (deepcompressor reports the mean).
  """
  return _scorer(model, batch_size).clip_iqa(images, prompts)
