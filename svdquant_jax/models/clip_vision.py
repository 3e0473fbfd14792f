"""CLIP vision tower, the joint CLIP model (both towers and their projections) and CLIP's image
preprocessing, in Flax / numpy; loaded from a transformers ``CLIPModel`` folder.

Vision tower (Radford et al. 2021, ViT; transformers' ``CLIPVisionTransformer``), NHWC::

  p = patch_embedding(pixels)            conv P x P, stride P, no bias: [B, S/P, S/P, H] -> [B, N, H]
  x = [class_embedding; p] + position_embedding[0:N+1]                     [B, N + 1, H]
  x = pre_layernorm(x)
  for each layer: CLIPEncoderLayer (shared with the text tower, ``clip.py``), no mask
  last_hidden_state = x;  pooler_output = post_layernorm(x[:, 0])          [B, H]

Joint model (transformers' ``CLIPModel``)::

  image_embeds = visual_projection(vision pooler_output)                  [B, projection_dim]
  text_embeds  = text_projection(text pooler_output)                      [B, projection_dim]

both projections without bias; ``logit_scale`` (a scalar, log scale) is loaded and kept but unused
by the metrics.

Parameter paths of :class:`CLIPModel`: ``text_model/...`` (the tree of ``clip.CLIPTextModel``),
``vision_model/patch_embedding/kernel [P, P, C, H]``, ``vision_model/class_embedding [H]``,
``vision_model/position_embedding/embedding [N + 1, H]``, ``vision_model/pre_layernorm``,
``vision_model/layers_<i>/...`` (as the text layers), ``vision_model/post_layernorm``,
``visual_projection/kernel``, ``text_projection/kernel``, ``logit_scale``.

Image preprocessing (:class:`CLIPImageProcessing`) reproduces transformers' PIL-backend
``CLIPImageProcessor`` (``CLIPImageProcessorPil`` in transformers 5, the default
``CLIPImageProcessor`` of transformers 4 that torchmetrics and deepcompressor ran) for uint8 RGB
input, bit for bit: Pillow resize of the shortest edge to ``size`` (the long edge
``int(size * long / short)``, truncated) with the configured filter (bicubic for CLIP), center
crop (``top = (h - crop) // 2``; zero padding when the crop is larger), ``x * rescale_factor`` in
float64 then float32, ``(x - mean) / std`` in float32. transformers 5's default torchvision
``CLIPImageProcessor`` resizes differently (torch bicubic with antialiasing) and is not what is
reproduced here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.models import clip as clip_lib
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.models.layers import as_float_dtype, config_from_dict
from svdquant_jax.utils.files import read_json
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.utils.trees import validate_tree

Array = jax.Array
Dtype = Any

CLIP_MODEL_CLASS_NAMES = ("CLIPModel",)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 keeps the image processor's settings here
# Defaults of transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig, for keys that a config
# saved as a diff against those defaults leaves out.
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 49407}
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                   "layer_norm_eps": 1e-5}
PROJECTION_DIM_DEFAULT = 512
LOGIT_SCALE_INIT_DEFAULT = 2.6592


def _positive_int(value: Any, name: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of a CLIP vision transformer (fields of transformers' ``CLIPVisionConfig``).

  The encoder fields are those of :class:`clip.CLIPTextConfig`, so that the encoder layer is
  shared. ``image_size`` must be a multiple of ``patch_size``.
  """
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                 "patch_size", "num_channels"):
      _positive_int(getattr(self, name), f"CLIPVisionConfig.{name}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPVisionConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"CLIPVisionConfig.image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.hidden_act not in clip_lib.HIDDEN_ACTS:
      raise ValueError(f"CLIPVisionConfig.hidden_act={self.hidden_act!r} is not supported; "
                       f"expected one of {list(clip_lib.HIDDEN_ACTS)}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"CLIPVisionConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
    object.__setattr__(self, "dtype", as_float_dtype(self.dtype, "CLIPVisionConfig.dtype"))
    object.__setattr__(self, "param_dtype", as_float_dtype(self.param_dtype, "CLIPVisionConfig.param_dtype"))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides: Any) -> "CLIPVisionConfig":
    """From a transformers ``CLIPVisionConfig`` dict; missing keys take transformers' defaults.

    ``image_size`` / ``patch_size`` may be given as a square ``[n, n]`` pair.
    """
    config = {**VISION_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    for key in ("image_size", "patch_size"):
      value = config[key]
      if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
          raise ValueError(f"vision_config.{key}={value!r}: only square sizes are supported")
        config[key] = value[0]
    return config_from_dict(cls, config, required=tuple(VISION_DEFAULTS), defaults={}, overrides=overrides,
                            what="CLIP vision")


class CLIPVisionModel(nn.Module):
  """CLIP vision transformer.

  ``__call__(pixel_values [B, S, S, C] float (preprocessed, NHWC)) -> (last_hidden_state
  [B, N + 1, H], pooler_output [B, H])``; ``S = config.image_size`` (no position interpolation).
  """
  config: CLIPVisionConfig

  def setup(self):
    cfg = self.config
    self.patch_embedding = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                                   strides=(cfg.patch_size, cfg.patch_size), padding="VALID", use_bias=False,
                                   dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.class_embedding = self.param("class_embedding", nn.initializers.normal(cfg.hidden_size ** -0.5),
                                      (cfg.hidden_size,), cfg.param_dtype)
    self.position_embedding = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype)
    self.pre_layernorm = clip_lib.layer_norm_module(cfg, None)
    self.layers = [clip_lib.CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.post_layernorm = clip_lib.layer_norm_module(cfg, None)

  def __call__(self, pixel_values: Array) -> tuple[Array, Array]:
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, preprocessed), "
                       f"got {tuple(pixel_values.shape)}")
    batch = pixel_values.shape[0]
    patches = self.patch_embedding(pixel_values.astype(cfg.dtype)).reshape(batch, cfg.num_patches, cfg.hidden_size)
    cls = jnp.broadcast_to(self.class_embedding.astype(cfg.dtype), (batch, 1, cfg.hidden_size))
    hidden = jnp.concatenate([cls, patches], axis=1)
    hidden = hidden + self.position_embedding(jnp.arange(cfg.num_patches + 1))[None]
    hidden = self.pre_layernorm(hidden)
    for layer in self.layers:
      hidden = layer(hidden, None)
    return hidden, self.post_layernorm(hidden[:, 0])


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A joint CLIP model: both towers and the shared embedding width ``projection_dim``."""
  text: clip_lib.CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = PROJECTION_DIM_DEFAULT
  logit_scale_init_value: float = LOGIT_SCALE_INIT_DEFAULT

  def __post_init__(self):
    _positive_int(self.projection_dim, "CLIPConfig.projection_dim")

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], dtype: Any = jnp.float32) -> "CLIPConfig":
    """From a transformers ``CLIPConfig`` dict (``config.json`` of a ``CLIPModel``).

    ``text_config_dict`` / ``vision_config_dict`` (old openai configs) override ``text_config`` /
    ``vision_config`` as in transformers; keys missing from both take transformers' defaults.

    Raises:
      ValueError: naming an unsupported or malformed value.
    """
    sub = {}
    for name in ("text", "vision"):
      merged = dict(config.get(f"{name}_config") or {})
      merged.update(config.get(f"{name}_config_dict") or {})
      sub[name] = merged
    text = {**TEXT_DEFAULTS, **{k: v for k, v in sub["text"].items() if v is not None}}
    if isinstance(text.get("eos_token_id"), (list, tuple)):
      raise ValueError(f"text_config.eos_token_id={text['eos_token_id']!r}: expected one integer")
    text_config = clip_lib.CLIPTextConfig.from_transformers(text, dtype=dtype, param_dtype=dtype)
    vision_config = CLIPVisionConfig.from_transformers(sub["vision"], dtype=dtype, param_dtype=dtype)
    projection_dim = config.get("projection_dim")
    logit_scale = config.get("logit_scale_init_value")
    return cls(text_config, vision_config,
               PROJECTION_DIM_DEFAULT if projection_dim is None else projection_dim,
               LOGIT_SCALE_INIT_DEFAULT if logit_scale is None else float(logit_scale))


class CLIPModel(nn.Module):
  """Both CLIP towers with their projections (transformers' ``CLIPModel``).

  :meth:`get_image_features` (``pixel_values [B, S, S, C]`` -> ``[B, projection_dim]``) and
  :meth:`get_text_features` (``input_ids [B, L]``, ``attention_mask`` -> ``[B, projection_dim]``)
  return the projected, *unnormalized* embeddings, as transformers' methods of the same names.
  """
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    self.text_model = clip_lib.CLIPTextModel(cfg.text)
    self.vision_model = CLIPVisionModel(cfg.vision)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.vision.dtype,
                                      param_dtype=cfg.vision.param_dtype)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=cfg.text.dtype,
                                    param_dtype=cfg.text.param_dtype)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (),
                                  cfg.text.param_dtype)

  def get_image_features(self, pixel_values: Array) -> Array:
    return self.visual_projection(self.vision_model(pixel_values)[1])

  def get_text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    return self.text_projection(self.text_model(input_ids, attention_mask)[1])

  def __call__(self, input_ids: Array, attention_mask: Array | None, pixel_values: Array) -> tuple[Array, Array]:
    """``(image_embeds, text_embeds)``; also creates every parameter at ``init``."""
    _ = self.logit_scale
    return self.get_image_features(pixel_values), self.get_text_features(input_ids, attention_mask)


# ----------------------------------------------------------------------------- preprocessing
@dataclasses.dataclass(frozen=True)
class CLIPImageProcessing:
  """transformers' PIL ``CLIPImageProcessor`` for uint8 RGB images (see the module docstring).

  Attributes:
    shortest_edge: resize the shorter side to this (keeping the aspect ratio), or ``None``.
    resize_hw: resize to exactly ``(height, width)`` instead (``size: {height, width}``), or ``None``.
    resample: the Pillow filter id (3 = bicubic, CLIP's).
    crop_hw: center crop ``(height, width)``, or ``None`` for no crop.
    rescale_factor: multiplier to [0, 1] (``None``: no rescaling).
    mean, std: per-channel normalization (``None``: none).
  """
  shortest_edge: int | None = 224
  resize_hw: tuple[int, int] | None = None
  resample: int = 3
  crop_hw: tuple[int, int] | None = (224, 224)
  rescale_factor: float | None = 1 / 255
  mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
  std: tuple[float, ...] | None = OPENAI_CLIP_STD

  @classmethod
  def default(cls, image_size: int) -> "CLIPImageProcessing":
    """CLIP's preprocessing for a tower of input size ``image_size`` (shortest edge = crop = it)."""
    return cls(shortest_edge=image_size, crop_hw=(image_size, image_size))

  @classmethod
  def from_preprocessor_config(cls, config: Mapping[str, Any], source: str = PREPROCESSOR_CONFIG
                               ) -> "CLIPImageProcessing":
    """From a ``preprocessor_config.json`` dict (transformers' keys and defaults for CLIP).

    An integer ``size`` is the shortest edge and an integer ``crop_size`` a square, as in
    transformers. Raises ``ValueError`` naming ``source`` and the key on anything else.
    """
    def bad(key: str, why: str) -> ValueError:
      return ValueError(f"{source}: {key}={config.get(key)!r}: {why}")

    def pair(key: str, value: Any) -> tuple[int, int]:
      if isinstance(value, Mapping) and set(value) >= {"height", "width"}:
        value = (value["height"], value["width"])
      elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (value, value)
      if not (isinstance(value, tuple) and all(isinstance(v, (int, np.integer)) and v > 0 for v in value)):
        raise bad(key, "expected a positive integer or {height, width}")
      return int(value[0]), int(value[1])

    shortest = resize_hw = crop = None
    if config.get("do_resize", True):
      size = config.get("size", {"shortest_edge": 224})
      if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size > 0:
        shortest = int(size)
      elif isinstance(size, Mapping) and set(size) - {"longest_edge"} == {"shortest_edge"}:
        if size.get("longest_edge") is not None:
          raise bad("size", "longest_edge is not supported")
        shortest = pair("size", size["shortest_edge"])[0]
      else:
        resize_hw = pair("size", size)
    if config.get("do_center_crop", True):
      crop = pair("crop_size", config.get("crop_size", {"height": 224, "width": 224}))
    resample = config.get("resample", 3)
    if isinstance(resample, bool) or not isinstance(resample, (int, np.integer)) or not 0 <= resample <= 5:
      raise bad("resample", "expected a Pillow filter id 0-5")
    rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
    mean = std = None
    if config.get("do_normalize", True):
      mean = config.get("image_mean", OPENAI_CLIP_MEAN)
      std = config.get("image_std", OPENAI_CLIP_STD)
      for key, value in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
          raise bad(key, "expected 3 per-channel values")
      mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return cls(shortest, resize_hw, int(resample), crop, rescale, mean, std)

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    """The ``(height, width)`` an input of that size comes out with."""
    if self.crop_hw is not None:
      return self.crop_hw
    return self._resized_hw(height, width)

  def _resized_hw(self, height: int, width: int) -> tuple[int, int]:
    if self.resize_hw is not None:
      return self.resize_hw
    if self.shortest_edge is None:
      return height, width
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def __call__(self, image: np.ndarray) -> np.ndarray:
    """One uint8 RGB image ``[H, W, 3]`` -> float32 ``[h, w, 3]`` (NHWC model input)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected a uint8 RGB image [H, W, 3], got {image.dtype}{image.shape}")
    height, width = image.shape[:2]
    if self.shortest_edge is not None or self.resize_hw is not None:
      out_h, out_w = self._resized_hw(height, width)
      # PIL returns a copy when the size does not change, as transformers relies on.
      image = np.asarray(Image.fromarray(image).resize((out_w, out_h), resample=Image.Resampling(self.resample)))
    if self.crop_hw is not None:
      image = _center_crop(image, self.crop_hw)
    if self.rescale_factor is not None:
      out = (image.astype(np.float64) * self.rescale_factor).astype(np.float32)
    else:
      out = image.astype(np.float32)
    if self.mean is not None:
      out = (out - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return out


def _center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """transformers' ``center_crop``: top/left ``(n - crop) // 2``; zero padding (centered, extra
  row/column at the start) where the crop is larger than the image."""
  height, width = image.shape[:2]
  crop_h, crop_w = size
  top, left = (height - crop_h) // 2, (width - crop_w) // 2
  if top >= 0 and left >= 0 and top + crop_h <= height and left + crop_w <= width:
    return image[top:top + crop_h, left:left + crop_w]
  new_h, new_w = max(crop_h, height), max(crop_w, width)
  padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  top_pad, left_pad = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
  padded[top_pad:top_pad + height, left_pad:left_pad + width] = image
  top, left = top + top_pad, left + left_pad
  return padded[max(0, top):min(new_h, top + crop_h), max(0, left):min(new_w, left + crop_w)]


# ----------------------------------------------------------------------------- loading
@dataclasses.dataclass(frozen=True)
class LoadedCLIP:
  """A loaded ``CLIPModel`` folder: config, params, image preprocessing and tokenizer."""
  config: CLIPConfig
  params: dict[str, Any]
  image_processing: CLIPImageProcessing
  tokenizer: Any
  source: str = ""


def abstract_clip_model_params(config: CLIPConfig) -> dict[str, Any]:
  """The params tree of :class:`CLIPModel` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  model = CLIPModel(config)
  size, channels = config.vision.image_size, config.vision.num_channels
  ids = jnp.zeros((1, 1), jnp.int32)
  pixels = jnp.zeros((1, size, size, channels), config.vision.dtype)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, None, pixels))["params"]


def _prefixed(rules: Sequence[ckpt.Rule], target_prefix: str) -> list[ckpt.Rule]:
  return [dataclasses.replace(r, target=f"{target_prefix}{r.target}") for r in rules]


def clip_model_mapping(config: CLIPConfig) -> list[ckpt.Rule]:
  """Mapping table from a transformers ``CLIPModel`` checkpoint to :class:`CLIPModel`."""
  rules = _prefixed(clip_lib.clip_mapping(config.text, prefix="text_model."), "text_model/")
  v, dst = "vision_model.", "vision_model/"
  rules += [
      ckpt.Rule(f"{dst}patch_embedding/kernel", (f"{v}embeddings.patch_embedding.weight",), ckpt.conv2d),
      ckpt.Rule(f"{dst}class_embedding", (f"{v}embeddings.class_embedding",)),
      ckpt.Rule(f"{dst}position_embedding/embedding", (f"{v}embeddings.position_embedding.weight",)),
  ]
  rules += ckpt.norm_rules(f"{dst}pre_layernorm", f"{v}pre_layrnorm")  # sic: transformers' name
  for i in range(config.vision.num_hidden_layers):
    rules += clip_lib.encoder_layer_rules(f"{dst}layers_{i}", f"{v}encoder.layers.{i}")
  rules += ckpt.norm_rules(f"{dst}post_layernorm", f"{v}post_layernorm")
  rules += ckpt.dense_rules("visual_projection", "visual_projection", bias=False)
  rules += ckpt.dense_rules("text_projection", "text_projection", bias=False)
  rules.append(ckpt.Rule("logit_scale", ("logit_scale",)))
  return rules


def _read_image_processing(folder: str, image_size: int) -> tuple[CLIPImageProcessing, str]:
  """``preprocessor_config.json``, else the ``image_processor`` entry of transformers 5's
  ``processor_config.json``, else CLIP's defaults for ``image_size``."""
  path = os.path.join(folder, PREPROCESSOR_CONFIG)
  if os.path.exists(path):
    return CLIPImageProcessing.from_preprocessor_config(read_json(path, CheckpointError, f"cannot read {path}"),
                                                        path), path
  path = os.path.join(folder, PROCESSOR_CONFIG)
  if os.path.exists(path):
    raw = read_json(path, CheckpointError, f"cannot read {path}")
    if isinstance(raw, Mapping) and isinstance(raw.get("image_processor"), Mapping):
      return CLIPImageProcessing.from_preprocessor_config(raw["image_processor"], f"{path} image_processor"), path
  return CLIPImageProcessing.default(image_size), os.path.join(folder, PREPROCESSOR_CONFIG)


def load_clip_model(folder: str | os.PathLike, dtype: Any = jnp.float32, tokenizer_folder: str | os.PathLike | None = None
                    ) -> LoadedCLIP:
  """Loads a transformers ``CLIPModel`` folder (e.g. a copy of ``openai/clip-vit-large-patch14``).

  Reads ``config.json`` (``text_config``, ``vision_config``, ``projection_dim``), the safetensors
  weights (single or sharded; the ``position_ids`` buffers of older checkpoints are ignored),
  ``preprocessor_config.json`` (or the ``image_processor`` entry of ``processor_config.json``;
  CLIP's defaults for the tower's ``image_size`` when neither exists) and the
  tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``) from ``tokenizer_folder``
  (default: ``folder``). The params are checked against ``jax.eval_shape`` of the model.

  Args:
    folder: the model folder.
    dtype: compute and parameter dtype (float32 = what torchmetrics runs).
    tokenizer_folder: where the tokenizer files are, if not beside the weights.

  Raises:
    CheckpointError: a missing folder/file (named), a model of another class, or
      missing/unexpected/misshaped tensors (each by name).
    ValueError: an unsupported config or preprocessor value (file and key named).
  """
  folder = os.fspath(folder)
  config = ckpt.read_model_config(folder, CLIP_MODEL_CLASS_NAMES, CLIPConfig.from_transformers, dtype=dtype)
  names = os.listdir(folder)
  if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
    others = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".msgpack", ".h5"))]
    hint = f" (found {sorted(others)}: convert them to safetensors)" if others else ""
    raise CheckpointError(f"{folder}: weight file model.safetensors (or a sharded *.safetensors.index.json) "
                          f"not found{hint}")
  store = ckpt.open_store(folder)
  abstract = abstract_clip_model_params(config)
  params = ckpt.load_params(store, clip_model_mapping(config), abstract,
                            ignore=(re.escape("text_model.embeddings.position_ids"),
                                    re.escape("vision_model.embeddings.position_ids")), source=folder)
  validate_tree(params, abstract, what=f"CLIP params loaded from {folder}")

  processing, preprocessor_path = _read_image_processing(folder, config.vision.image_size)
  out_h, out_w = processing.output_hw(config.vision.image_size, config.vision.image_size)
  if processing.crop_hw is None or (out_h, out_w) != (config.vision.image_size,) * 2:
    raise ValueError(f"{preprocessor_path}: the preprocessing must center crop to the vision tower's image_size "
                     f"{config.vision.image_size}, got crop_size {processing.crop_hw}")

  tok_folder = folder if tokenizer_folder is None else os.fspath(tokenizer_folder)
  tok_names = os.listdir(tok_folder) if os.path.isdir(tok_folder) else []
  if "tokenizer.json" not in tok_names and not {"vocab.json", "merges.txt"} <= set(tok_names):
    raise CheckpointError(f"{tok_folder}: CLIP tokenizer file tokenizer.json (or vocab.json + merges.txt) "
                          "not found")
  tokenizer = tok_lib.load_tokenizer(tok_folder)
  return LoadedCLIP(config, params, processing, tokenizer, folder)
