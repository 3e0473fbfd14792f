"""The metrics of the evaluation step, one registry entry each, computed batch by batch, data-parallel.

A :class:`Metric` names its result key, its table column, what it compares against
(``reference``: the full-precision images of the same prompts and seeds; ``ground_truth``: the
benchmark's real images or prompts) and what it needs, and builds one accumulator per method
(``update(batch)`` per batch of images, then ``result()``). :data:`REGISTRY` holds them in table
order; :func:`register` adds one. A metric whose weights are not configured, or whose inputs are
missing, raises :class:`Unavailable` with the reason, which the results table prints as a note.

Registered: ``psnr``, ``ssim``, ``lpips``, ``fid_ref`` (FID against the reference images) and the
ground-truth metrics ``fid`` (against the benchmark's real images), ``clip_score``, ``clip_iqa``,
``image_reward``. A metric that scores each image with its prompt plugs in with one line through
:func:`prompt_image_metric` (the config fields naming its weights, ``load(*paths) -> model`` and
``score(model, images uint8 [B, H, W, 3], prompts) -> [B]``), as ImageReward does at the end of
this file.

Data parallelism: parameters are replicated over a :func:`~svdquant_jax.utils.sharding.batch_mesh`
and each batch is padded to a fixed size (a multiple of the device count) and split over it; the
per-image numbers are the single-device ones (tests/test_sharding.py runs both on 4 CPU devices).

Weights (``eval.lpips_weights``, ``eval.inception_weights``, ``eval.clip_model``, ...): a path, ``""``
(off), or ``"auto"``: the file or folder of that name in ``$XDG_CACHE_HOME/svdquant_jax/weights/``
(:data:`AUTO_WEIGHTS`) if it exists. The package never downloads; docs/metrics.md says where each
set of weights comes from and how to convert it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.eval import clip_score as clip_lib
from svdquant_jax.eval import fid as fid_lib
from svdquant_jax.eval import image_reward
from svdquant_jax.eval import inception
from svdquant_jax.eval import lpips as lpips_lib
from svdquant_jax.eval import metrics as metrics_lib
from svdquant_jax.eval.protocol import read_rgb
from svdquant_jax.flows.eval_features import (FeatureExtractor, FeatureSource, clip_extractor, clip_scorer,
                                              clip_text_features, inception_extractor)
from svdquant_jax.utils import sharding

REFERENCE = "reference"
GROUND_TRUTH = "ground_truth"
AUTO = "auto"
AUTO_WEIGHTS = {"lpips_weights": "lpips_{net}.safetensors", "inception_weights": "inception_fid.safetensors",
                "clip_model": "clip-vit-large-patch14", "image_reward_weights": "image_reward.safetensors",
                "image_reward_tokenizer": "bert-base-uncased"}
HELP = {"lpips_weights": "convert them with launch/convert_lpips.py",
        "inception_weights": "convert them with launch/convert_inception.py",
        "clip_model": "a transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14",
        "image_reward_weights": "convert ImageReward.pt with launch/convert_image_reward.py",
        "image_reward_tokenizer": "a bert-base-uncased tokenizer folder"}


class Unavailable(Exception):
  """The metric cannot be computed in this run; the message (the reason) goes into the table's notes."""


@dataclasses.dataclass
class MetricResult:
  """``value`` (the reported number), ``per_image`` values (or None), and a ``note`` for the table."""
  value: float
  per_image: np.ndarray | None = None
  note: str = ""


class Accumulator(Protocol):
  def update(self, batch: "Batch") -> None: ...
  def result(self) -> MetricResult: ...


@dataclasses.dataclass(frozen=True)
class Metric:
  """A registry entry.

  ``setup(context)`` loads what the metric needs once per evaluation (raising :class:`Unavailable`
  with the reason) and returns ``start(inputs) -> Accumulator``, called once per method.
  ``identity`` is the table entry of the reference images against themselves (reference metrics).
  """
  name: str
  label: str
  against: str
  needs: tuple[str, ...]
  setup: Callable[["Context"], Callable[["Inputs"], Accumulator]]
  higher_is_better: bool = True
  digits: int = 3
  identity: str = "-"


REGISTRY: dict[str, Metric] = {}
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def register(metric: Metric) -> Metric:
  """Adds ``metric`` to :data:`REGISTRY` (after the others; its name must be new)."""
  if metric.name in REGISTRY:
    raise ValueError(f"metric {metric.name!r} is already registered")
  if metric.against not in (REFERENCE, GROUND_TRUTH):
    raise ValueError(f"metric {metric.name!r}: against must be {REFERENCE!r} or {GROUND_TRUTH!r}")
  REGISTRY[metric.name] = metric
  return metric


# ----------------------------------------------------------------------------- inputs and batches
@dataclasses.dataclass
class ImageSet:
  """Image files ``folder/files[i]`` (``files`` relative to ``folder``, row i = sample i)."""
  folder: str
  files: list[str]
  role: str = "method"
  shape: tuple[int, ...] | None = None   # the first image's shape; every image must match (not for "real")

  def path(self, i: int) -> str:
    return os.path.join(self.folder, self.files[i])


@dataclasses.dataclass
class Inputs:
  """What one method's evaluation reads: its images, the reference images, the benchmark's real
  images and the prompts (each None when absent), row i of each being sample i."""
  method: ImageSet
  reference: ImageSet | None = None
  real: ImageSet | None = None
  prompts: list[str] | None = None


class Batch:
  """Rows ``rows`` of :class:`Inputs`; images are read on first use (once) and placed on the mesh."""

  def __init__(self, context: "Context", inputs: Inputs, rows: Sequence[int]):
    self.context, self.inputs, self.rows = context, inputs, list(rows)
    self._images: dict[tuple[str, int], np.ndarray] = {}
    self._sharded: dict[str, jax.Array] = {}

  @property
  def size(self) -> int:
    return len(self.rows)

  @property
  def prompts(self) -> list[str]:
    if self.inputs.prompts is None:
      raise ValueError("this metric needs prompts, and none were given")
    return [self.inputs.prompts[i] for i in self.rows]

  def image_set(self, role: str) -> ImageSet:
    images = getattr(self.inputs, role)
    if images is None:
      raise ValueError(f"this metric needs {role} images, and none were given")
    return images

  def images(self, role: str, rows: Sequence[int] | None = None) -> list[np.ndarray]:
    """uint8 ``[H, W, 3]`` images of ``rows`` (default: the batch) of ``role`` (method, reference, real)."""
    images = self.image_set(role)
    rows = self.rows if rows is None else list(rows)
    todo = [i for i in rows if (role, i) not in self._images]
    for i, image in zip(todo, self.context.pool.map(lambda i: read_rgb(images.path(i)), todo)):
      if role != "real":
        if images.shape is None:
          images.shape = image.shape
        elif image.shape != images.shape:
          raise ValueError(f"{images.path(i)} is {image.shape[0]}x{image.shape[1]} but {images.path(0)} (the "
                           f"first {role} image) is {images.shape[0]}x{images.shape[1]}; every {role} image must "
                           "have the same size")
      self._images[(role, i)] = image
    return [self._images[(role, i)] for i in rows]

  def stacked(self, role: str) -> np.ndarray:
    return np.stack(self.images(role))

  def sharded(self, role: str) -> jax.Array:
    """The batch's ``role`` images, uint8 ``[padded, H, W, 3]``, padded and split over the mesh."""
    if role not in self._sharded:
      self._sharded[role] = sharding.shard_batch(self.stacked(role), self.context.mesh, self.context.padded_batch)
    return self._sharded[role]

  def check_pairs(self) -> None:
    """Method and reference images of the batch have the same size (else an error naming both)."""
    self.images("method")
    self.images("reference")
    method, reference = self.image_set("method"), self.image_set("reference")
    if method.shape != reference.shape:
      i = self.rows[0]
      raise ValueError(f"{method.path(i)} is {method.shape[0]}x{method.shape[1]} but the reference image "
                       f"{reference.path(i)} is {reference.shape[0]}x{reference.shape[1]}; reference metrics "
                       "compare images of the same size")


# ----------------------------------------------------------------------------- the evaluation context
@dataclasses.dataclass
class Context:
  """What the metrics share in one evaluation: settings (the ``eval`` config section), the mesh,
  the number of images, loaded weights (:meth:`resource`) and feature sources (:meth:`features`)."""
  config: Any
  mesh: jax.sharding.Mesh
  num_images: int
  batch_size: int
  cache_root: str | None = None
  resources: dict[Any, Any] = dataclasses.field(default_factory=dict)
  sources: dict[tuple, FeatureSource] = dataclasses.field(default_factory=dict)

  @property
  def pool(self) -> concurrent.futures.ThreadPoolExecutor:
    """The threads that decode image files (shared by every evaluation of the process)."""
    global _POOL
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                    thread_name_prefix="read-images")
    return _POOL

  @property
  def padded_batch(self) -> int:
    return sharding.padded_size(min(self.batch_size, max(self.num_images, 1)), self.mesh)

  def setting(self, name: str, default: Any = None) -> Any:
    return self.config.get(name, default) if hasattr(self.config, "get") else getattr(self.config, name, default)

  def resource(self, key: Any, load: Callable[[], Any]) -> Any:
    if key not in self.resources:
      self.resources[key] = load()
    return self.resources[key]

  def weights(self, field: str, **fmt: str) -> str:
    """The path of weights setting ``eval.<field>`` (a file or folder); :class:`Unavailable` if off or
    not found under ``"auto"``, FileNotFoundError if an explicit path does not exist."""
    setting = str(self.setting(field, AUTO) or "").strip()
    if not setting:
      raise Unavailable(f"off (eval.{field} is empty)")
    if setting == AUTO:
      path = os.path.join(weights_dir(), AUTO_WEIGHTS.get(field, field).format(**fmt))
      if not os.path.exists(path):
        raise Unavailable(f"no weights (eval.{field}=auto looked for {path}; {HELP.get(field, 'see docs/metrics.md')}, "
                          "see docs/metrics.md)")
      return path
    path = os.path.abspath(os.path.expanduser(setting))
    if not os.path.exists(path):
      raise FileNotFoundError(f"eval.{field}={setting}: no such file or folder")
    return path

  def replicate(self, tree: Any) -> Any:
    return sharding.replicate(tree, self.mesh)

  def features(self, extractor: FeatureExtractor, images: ImageSet) -> FeatureSource:
    key = (extractor.name, extractor.fingerprint, os.path.abspath(images.folder), tuple(images.files))
    if key not in self.sources:
      self.sources[key] = FeatureSource(self, extractor, images)
    return self.sources[key]


def weights_dir() -> str:
  """``$XDG_CACHE_HOME/svdquant_jax/weights`` (``~/.cache/...`` without it): where ``"auto"`` looks."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "svdquant_jax", "weights")


# ----------------------------------------------------------------------------- accumulators
class _PerImage:
  """Per-image values of ``fn(batch)`` concatenated; the reported value is their mean (float32, as
  ``np.mean`` of the single call over all images)."""

  def __init__(self, fn: Callable[[Batch], Any], reduce: Callable[[np.ndarray], float] | None = None):
    self.fn, self.reduce, self.values = fn, reduce, []

  def update(self, batch: Batch) -> None:
    self.values.append(np.asarray(self.fn(batch))[:batch.size])

  def result(self) -> MetricResult:
    values = np.concatenate(self.values)
    value = self.reduce(values) if self.reduce else float(np.mean(values))
    return MetricResult(value, values)


def _pair_metric(fn: Callable[[Context, jax.Array, jax.Array], jax.Array]
                 ) -> Callable[[Context], Callable[[Inputs], Accumulator]]:
  def setup(context: Context) -> Callable[[Inputs], Accumulator]:
    prepared = fn(context)

    def per_batch(batch: Batch):
      batch.check_pairs()
      return prepared(batch.sharded("method"), batch.sharded("reference"))
    return lambda inputs: _PerImage(per_batch)
  return setup


def _psnr(context: Context):
  return metrics_lib.psnr


def _ssim(context: Context):
  return metrics_lib.ssim


_LPIPS_FNS: dict[str, Callable] = {}


def _lpips_fn(net: str) -> Callable:
  if net not in _LPIPS_FNS:
    model = lpips_lib.LPIPS(net)

    @jax.jit
    def distance(params, a, b):
      return model.apply({"params": params}, a.astype(jnp.float32) / 255.0, b.astype(jnp.float32) / 255.0)
    _LPIPS_FNS[net] = distance
  return _LPIPS_FNS[net]


def _lpips(context: Context):
  net = str(context.setting("lpips_net", "alex"))
  if net not in lpips_lib.NETS:
    raise ValueError(f"eval.lpips_net={net!r}; expected one of {lpips_lib.NETS}")
  path = context.weights("lpips_weights", net=net)
  params = context.resource(f"lpips-{net}", lambda: context.replicate(lpips_lib.load_lpips_params(path, net)))
  fn = _lpips_fn(net)

  def distance(a: jax.Array, b: jax.Array) -> jax.Array:
    if min(a.shape[1:3]) < lpips_lib.MIN_SIZE[net]:
      raise ValueError(f"images of {a.shape[1]}x{a.shape[2]} are too small for LPIPS net={net!r} (at least "
                       f"{lpips_lib.MIN_SIZE[net]}x{lpips_lib.MIN_SIZE[net]})")
    return fn(params, a, b)
  return distance


class _FID:
  """FID between the method's features and those of ``other`` (reference or real images)."""

  def __init__(self, context: Context, inputs: Inputs, other: str):
    extractor = inception_extractor(context)
    self.other = other
    self.method = context.features(extractor, inputs.method)
    self.against = context.features(extractor, getattr(inputs, other))

  def update(self, batch: Batch) -> None:
    self.method.update(batch, "method")
    self.against.update(batch, self.other)

  def result(self) -> MetricResult:
    a, b = self.method.finish(), self.against.finish()
    note = ""
    if a.shape[0] < inception.FEATURE_DIM:
      note = (f"from {a.shape[0]} images, fewer than the Inception feature dimension {inception.FEATURE_DIM}: "
              "biased, not comparable with FIDs of other image counts")
    return MetricResult(fid_lib.fid(a, b), None, note)


def _fid_setup(other: str) -> Callable[[Context], Callable[[Inputs], Accumulator]]:
  def setup(context: Context) -> Callable[[Inputs], Accumulator]:
    minimum = int(context.setting("fid_min_images", inception.FEATURE_DIM))
    if context.num_images < max(minimum, 2):
      raise Unavailable(f"not computed: {context.num_images} images < eval.fid_min_images={minimum}; FID from fewer "
                        f"images than the Inception feature dimension ({inception.FEATURE_DIM}) is biased and not "
                        "comparable (lower eval.fid_min_images to compute it anyway)")
    inception_extractor(context)
    return lambda inputs: _FID(context, inputs, other)
  return setup


class _CLIP:
  """CLIP score (``max(mean(100 cos), 0)``) or CLIP-IQA (mean probability of "Good photo.")."""

  def __init__(self, context: Context, inputs: Inputs, kind: str):
    self.context, self.inputs, self.kind = context, inputs, kind
    self.images = context.features(clip_extractor(context), inputs.method)

  def update(self, batch: Batch) -> None:
    self.images.update(batch, "method")

  def result(self) -> MetricResult:
    img = self.images.finish()
    if self.kind == "clip_score":
      if self.inputs.prompts is None or len(self.inputs.prompts) != img.shape[0]:
        raise ValueError(f"CLIP score needs one prompt per image: {img.shape[0]} images, "
                         f"{0 if self.inputs.prompts is None else len(self.inputs.prompts)} prompts")
      txt = clip_text_features(self.context, self.inputs.prompts)
      scores = (100 * np.sum(img * txt, axis=-1)).astype(np.float64)
      return MetricResult(max(float(np.mean(scores)), 0.0), scores)
    anchors = clip_scorer(self.context).text_features(list(clip_lib.DEFAULT_IQA_PROMPTS))
    logits = 100 * (img @ anchors.T).astype(np.float64)
    probs = 1.0 / (1.0 + np.exp(logits[:, 1] - logits[:, 0]))
    return MetricResult(float(np.mean(probs)), probs)


def _clip_setup(kind: str) -> Callable[[Context], Callable[[Inputs], Accumulator]]:
  def setup(context: Context) -> Callable[[Inputs], Accumulator]:
    clip_extractor(context)
    return lambda inputs: _CLIP(context, inputs, kind)
  return setup


def prompt_image_metric(name: str, label: str, weights_fields: str | Sequence[str], load: Callable[..., Any],
                        score: Callable[[Any, np.ndarray, list[str]], Any], higher_is_better: bool = True,
                        digits: int = 3) -> Metric:
  """A ground-truth metric that scores each image with its prompt, reported as the mean.

  Args:
    name, label: result key and table column.
    weights_fields: the ``eval.<field>`` (or fields) naming its weights files or folders
      (``"auto"``: ``AUTO_WEIGHTS[field]``, or the field's name, under :func:`weights_dir`).
    load: ``load(*paths) -> model`` (one path per field), called once per evaluation.
    score: ``score(model, images uint8 [B, H, W, 3], prompts [B]) -> [B]`` per batch (not sharded
      here: a model that wants the mesh shards inside).
  """
  fields = (weights_fields,) if isinstance(weights_fields, str) else tuple(weights_fields)

  def setup(context: Context) -> Callable[[Inputs], Accumulator]:
    paths = [context.weights(field) for field in fields]
    model = context.resource(name, lambda: load(*paths))
    return lambda inputs: _PerImage(lambda batch: np.asarray(score(model, batch.stacked("method"), batch.prompts)))
  return Metric(name, label, GROUND_TRUTH, ("prompts",), setup, higher_is_better, digits)


register(Metric("psnr", "PSNR (dB) ↑", REFERENCE, ("reference",), _pair_metric(_psnr), True, 2, "∞"))
register(Metric("ssim", "SSIM ↑", REFERENCE, ("reference",), _pair_metric(_ssim), True, 3, "1.000"))
register(Metric("lpips", "LPIPS ↓", REFERENCE, ("reference",), _pair_metric(_lpips), False, 3, "0"))
register(Metric("fid_ref", "FID vs ref ↓", REFERENCE, ("reference",), _fid_setup("reference"), False, 2, "0"))
register(Metric("fid", "FID ↓", GROUND_TRUTH, ("real",), _fid_setup("real"), False, 2))
register(Metric("clip_score", "CLIP score ↑", GROUND_TRUTH, ("prompts",), _clip_setup("clip_score"), True, 2))
register(Metric("clip_iqa", "CLIP-IQA ↑", GROUND_TRUTH, (), _clip_setup("clip_iqa"), True, 3))
register(prompt_image_metric("image_reward", "ImageReward ↑", ("image_reward_weights", "image_reward_tokenizer"),
                             image_reward.ImageRewardScorer.from_files, lambda m, x, p: m.score(x, p).scores))


def select(names: str) -> list[Metric]:
  """The metrics of a comma-separated list (``"all"``: every registered one), in registry order.

  Raises:
    ValueError: an unknown name (the known ones are listed).
  """
  wanted = [n.strip() for n in str(names).split(",") if n.strip()]
  if not wanted:
    raise ValueError("eval.metrics is empty; give 'all' or a comma-separated list of "
                     f"{list(REGISTRY)}")
  if wanted == ["all"]:
    return list(REGISTRY.values())
  unknown = [n for n in wanted if n not in REGISTRY]
  if unknown:
    raise ValueError(f"eval.metrics: unknown metric(s) {unknown}; known: {list(REGISTRY)} (or 'all')")
  return [m for m in REGISTRY.values() if m.name in wanted]


__all__ = ["AUTO", "Accumulator", "Batch", "Context", "FeatureExtractor", "FeatureSource", "GROUND_TRUTH",
           "ImageSet", "Inputs", "Metric", "MetricResult", "REFERENCE", "REGISTRY", "Unavailable",
           "clip_extractor", "clip_scorer", "clip_text_features", "inception_extractor", "prompt_image_metric",
           "register", "select", "weights_dir"]
