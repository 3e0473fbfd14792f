"""Image features for the evaluation's metrics: FID's Inception features and CLIP embeddings,
computed data-parallel and cached per image folder.

A :class:`FeatureExtractor` maps a list of uint8 ``[H, W, 3]`` images to float32 ``[n, dim]``; its
``fingerprint`` (weights and preprocessing) keys the on-disk cache
(:mod:`svdquant_jax.eval.feature_cache`). A :class:`FeatureSource` holds the features of one image
set: rows found in the cache are read, the others computed batch by batch as the evaluation passes
over the images, and the cache is rewritten once at the end. The extractors take the evaluation
context (``flows.eval_metrics.Context``: settings, mesh, batch size, loaded resources): parameters
are replicated on its mesh and each batch is padded to its fixed size and split over the devices.

* :func:`inception_extractor`: clean-fid's "clean" resize and the 2015 Inception (``eval.fid``),
  fused in one jitted call when the images of a batch share a size, else resized one by one;
* :func:`clip_extractor`, :func:`clip_text_features`: L2-normalized CLIP image / text embeddings,
  as ``eval.clip_score.CLIPScorer`` computes them, at ``Precision.HIGHEST``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from svdquant_jax.eval import clip_score as clip_lib
from svdquant_jax.eval import feature_cache as cache_lib
from svdquant_jax.eval import fid as fid_lib
from svdquant_jax.eval import inception
from svdquant_jax.models import clip_vision
from svdquant_jax.utils import sharding

Context = Any  # flows.eval_metrics.Context (not imported: that module imports this one)
Batch = Any    # flows.eval_metrics.Batch


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """``compute(images: list of uint8 [H, W, 3]) -> float32 [n, dim]``; ``fingerprint`` keys its cache."""
  name: str
  fingerprint: str
  dim: int
  compute: Callable[[list[np.ndarray]], np.ndarray]


class FeatureSource:
  """The features of one :class:`ImageSet` for one extractor: read from the cache, the missing rows
  computed batch by batch, the cache rewritten at :meth:`finish`."""

  def __init__(self, context: Context, extractor: FeatureExtractor, images: Any):
    self.extractor, self.images = extractor, images
    self.cache = cache_lib.FeatureCache(context.cache_root, extractor.name, extractor.fingerprint)
    cached, self.done = self.cache.lookup(images.folder, images.files)
    self.features = cached if cached is not None else np.zeros((len(images.files), extractor.dim), np.float32)
    self.cached_rows = int(self.done.sum())
    self._dirty = False

  def update(self, batch: Batch, role: str) -> None:
    missing = [i for i in batch.rows if not self.done[i]]
    if missing:
      self.features[missing] = self.extractor.compute(batch.images(role, missing))
      self.done[missing] = True
      self._dirty = True

  def finish(self) -> np.ndarray:
    """All rows (every batch must have been seen); writes the cache; refuses non-finite rows."""
    if not self.done.all():
      raise RuntimeError(f"{self.extractor.name} features of {self.images.folder}: {int((~self.done).sum())} rows "
                         "were never computed")
    bad = np.flatnonzero(~np.isfinite(self.features).all(axis=1))
    if bad.size:
      files = ", ".join(self.images.path(i) for i in bad[:5])
      raise ValueError(f"{self.extractor.name} features are NaN/inf for {bad.size} image(s): {files}"
                       f"{' ...' if bad.size > 5 else ''}")
    if self._dirty:
      self.cache.store(self.images.folder, self.images.files, self.features)
      logging.info("%s features of %s: %d of %d read from the cache", self.extractor.name, self.images.folder,
                   self.cached_rows, len(self.images.files))
      self._dirty = False
    return self.features


_resize_one = jax.jit(fid_lib.clean_resize)


@jax.jit
def _inception_uint8(params: Any, images: jax.Array) -> jax.Array:
  return fid_lib.features_resized(params, fid_lib.clean_resize(images))


def inception_extractor(context: Context) -> FeatureExtractor:
  """The FID Inception features (clean-fid "clean" mode) of ``eval.inception_weights``."""
  def load() -> FeatureExtractor:
    path = context.weights("inception_weights")
    params = fid_lib.load_inception_params(path)
    fingerprint = cache_lib.tree_fingerprint(params, "inception-2015-12-05 clean-resize")
    replicated = context.replicate(params)

    def compute(images: list[np.ndarray]) -> np.ndarray:
      size = context.padded_batch
      out = []
      for start in range(0, len(images), size):
        chunk = images[start:start + size]
        if len({im.shape for im in chunk}) == 1:
          x = sharding.shard_batch(np.stack(chunk), context.mesh, size)
          feats = _inception_uint8(replicated, x)
        else:  # sizes differ (real images): resize one by one, then one batched network call
          resized = np.stack([np.asarray(_resize_one(im[None]))[0] for im in chunk])
          feats = fid_lib.features_resized(replicated, sharding.shard_batch(resized, context.mesh, size))
        out.append(np.asarray(feats)[:len(chunk)])
      return np.concatenate(out)
    return FeatureExtractor("inception", fingerprint, inception.FEATURE_DIM, compute)
  return context.resource("inception", load)


def clip_scorer(context: Context) -> clip_lib.CLIPScorer:
  """The CLIP model of ``eval.clip_model`` (tokenizer from ``eval.clip_tokenizer`` or the folder)."""
  def load() -> clip_lib.CLIPScorer:
    folder = context.weights("clip_model")
    tokenizer = str(context.setting("clip_tokenizer", "") or "") or None
    # A folder without tokenizer files is refused by the loader with the folder and the files named.
    return clip_lib.CLIPScorer.from_folder(folder, batch_size=context.padded_batch, tokenizer_folder=tokenizer)
  return context.resource("clip", load)


def _clip_params(context: Context) -> Any:
  return context.resource("clip-params", lambda: context.replicate(clip_scorer(context).clip.params))


def clip_extractor(context: Context) -> FeatureExtractor:
  """L2-normalized CLIP image embeddings, as ``CLIPScorer.image_features``, data-parallel."""
  def load() -> FeatureExtractor:
    scorer = clip_scorer(context)
    model, params = scorer.model, _clip_params(context)
    fingerprint = cache_lib.tree_fingerprint(scorer.clip.params, repr(scorer.clip.image_processing))

    @jax.jit
    def embed(params, pixels):
      f = model.apply({"params": params}, pixels, method=clip_vision.CLIPModel.get_image_features).astype(jnp.float32)
      return f / jnp.linalg.norm(f, axis=-1, keepdims=True)

    def compute(images: list[np.ndarray]) -> np.ndarray:
      pixels = scorer.preprocess(images)
      with jax.default_matmul_precision("highest"):
        return sharding.map_batches(embed, [pixels], context.mesh, context.padded_batch, replicated_args=(params,))
    return FeatureExtractor("clip-image", fingerprint, scorer.clip.config.projection_dim, compute)
  return context.resource("clip-image", load)


def clip_text_features(context: Context, prompts: Sequence[str]) -> np.ndarray:
  """L2-normalized CLIP text embeddings ``[N, D]`` of ``prompts``, as ``CLIPScorer.text_features``."""
  scorer = clip_scorer(context)

  def load():
    model, params = scorer.model, _clip_params(context)

    @jax.jit
    def embed(params, ids, mask):
      f = model.apply({"params": params}, ids, mask, method=clip_vision.CLIPModel.get_text_features)
      f = f.astype(jnp.float32)
      return f / jnp.linalg.norm(f, axis=-1, keepdims=True)
    return embed, params
  embed, params = context.resource("clip-text", load)

  def compute() -> np.ndarray:
    ids, mask = scorer.tokenize(list(prompts))
    with jax.default_matmul_precision("highest"):
      return sharding.map_batches(embed, [ids, mask], context.mesh, context.padded_batch, replicated_args=(params,))
  return context.resource(("clip-text", tuple(prompts)), compute)


__all__ = ["FeatureExtractor", "FeatureSource", "clip_extractor", "clip_scorer", "clip_text_features",
           "inception_extractor"]
