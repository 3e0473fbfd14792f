"""BLIP's image encoder (ViT) and its BERT text encoder with cross-attention to image tokens, in Flax.

These are the two towers of BLIP (Li et al. 2022) as ImageReward uses them: the text encoder reads
the prompt while attending to the image tokens, and its first token is the joint feature.

Vision transformer (timm's ``VisionTransformer`` as BLIP builds it), NHWC::

  p = patch_embedding(pixels)        conv P x P, stride P, with bias: [B, S, S, C] -> [B, N, Hv]
  x = [cls_token; p] + pos_embed                                            [B, N + 1, Hv]
  for each layer (pre-LN, no mask):
    x = x + to_out(attention(to_qkv(layer_norm1(x))))
    x = x + fc2(gelu(fc1(layer_norm2(x))))                    gelu: exact (erf)
  image_embeds = norm(x)                                                    [B, N + 1, Hv]

LayerNorm epsilon 1e-6; a layer is ``clip.CLIPEncoderLayer`` (the same math, q|k|v fused).

Text encoder (BLIP's "med" ``BertModel`` in its multimodal mode, no pooler), post-LN::

  x = embeddings_layer_norm(word_embeddings[ids] + position_embeddings[0:L])   [B, L, Ht]
  for each layer:
    x = layer_norm(x + to_out(attention(q, k, v = to_qkv(x), + self_bias)))    "attention"
    x = layer_norm(x + to_out(attention(to_q(x), to_kv(image_embeds))))        "crossattention"
    x = output_layer_norm(x + output(gelu(intermediate(x))))
  last_hidden_state = x                                                        [B, L, Ht]

There are no token-type embeddings (BLIP's ``BertEmbeddings`` has none). ``self_bias`` is BLIP's
additive mask ``(1 - attention_mask) * -10000``; every image token is attended (ImageReward passes
an all-ones image mask). Attention logits are ``q k^T / sqrt(head_dim)``, softmax in float32.

Parameter paths (``/``-joined; tensor names of our safetensors files):

* vision: ``patch_embedding/{kernel [P, P, C, Hv], bias}``, ``cls_token [Hv]``, ``pos_embed
  [N + 1, Hv]``, ``layers_<i>/{layer_norm1, attn/to_qkv [Hv, 3 Hv], attn/to_out, layer_norm2,
  mlp/fc1, mlp/fc2}``, ``norm``;
* text: ``word_embeddings/embedding [V, Ht]``, ``position_embeddings/embedding [P, Ht]``,
  ``embeddings_layer_norm``, ``layers_<i>/attention/{to_qkv [Ht, 3 Ht], to_out, layer_norm}``,
  ``layers_<i>/crossattention/{to_q [Ht, Ht], to_kv [Hv, 2 Ht], to_out, layer_norm}``,
  ``layers_<i>/{intermediate, output, output_layer_norm}``.

:func:`vision_mapping` / :func:`text_mapping` map BLIP's PyTorch parameter names onto these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.models import clip as clip_lib
from svdquant_jax.models.layers import as_float_dtype

Array = jax.Array
Dtype = Any

MASK_BIAS = -10000.0  # BLIP's additive attention bias for padding tokens


def _check_positive(cls_name: str, obj: Any, names: tuple[str, ...]) -> None:
  for name in names:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{cls_name}.{name} must be a positive integer, got {value!r}")


def _check_heads_and_dtypes(cls_name: str, obj: Any) -> None:
  if obj.hidden_size % obj.num_attention_heads:
    raise ValueError(f"{cls_name}.hidden_size={obj.hidden_size} is not divisible by "
                     f"num_attention_heads={obj.num_attention_heads}")
  if not obj.layer_norm_eps > 0:
    raise ValueError(f"{cls_name}.layer_norm_eps must be positive, got {obj.layer_norm_eps!r}")
  object.__setattr__(obj, "dtype", as_float_dtype(obj.dtype, f"{cls_name}.dtype"))
  object.__setattr__(obj, "param_dtype", as_float_dtype(obj.param_dtype, f"{cls_name}.param_dtype"))


@dataclasses.dataclass(frozen=True)
class BLIPVisionConfig:
  """BLIP's ViT; the defaults are ViT-L/16 at 224 (BLIP ``vit='large'``, ImageReward's encoder)."""
  hidden_size: int = 1024
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  intermediate_size: int = 4096
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_positive("BLIPVisionConfig", self, ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "intermediate_size", "image_size", "patch_size", "num_channels"))
    if self.image_size % self.patch_size:
      raise ValueError(f"BLIPVisionConfig.image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    _check_heads_and_dtypes("BLIPVisionConfig", self)

  @property
  def hidden_act(self) -> str:
    """timm's ``nn.GELU`` (exact); read by ``clip.CLIPEncoderLayer``."""
    return "gelu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class BLIPTextConfig:
  """BLIP's text encoder; the defaults are BLIP's ``med_config.json`` (BERT-base, vocabulary of
  bert-base-uncased plus ``[DEC]`` and ``[ENC]``) with cross-attention to ViT-L tokens."""
  vocab_size: int = 30524
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  encoder_width: int = 1024
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_positive("BLIPTextConfig", self, ("vocab_size", "hidden_size", "num_hidden_layers",
                                             "num_attention_heads", "intermediate_size", "max_position_embeddings",
                                             "encoder_width"))
    _check_heads_and_dtypes("BLIPTextConfig", self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_med_config(cls, config: Mapping[str, Any], encoder_width: int, source: str = "med_config.json"
                      ) -> "BLIPTextConfig":
    """From BLIP's ``med_config.json`` (a BERT config dict); ``encoder_width`` is the ViT width,
    which BLIP sets in place of the file's ``encoder_width``.

    Raises:
      ValueError: naming ``source`` and the key: a missing size, an activation other than
        ``gelu``, relative position embeddings, or no cross-attention.
    """
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in config]
    if missing:
      raise ValueError(f"{source}: missing key(s) {missing}")
    checks = (("hidden_act", "gelu"), ("position_embedding_type", "absolute"), ("add_cross_attention", True))
    for key, want in checks:
      if config.get(key, want) != want:
        raise ValueError(f"{source}: {key}={config[key]!r} is not supported (BLIP's text encoder has {want!r})")
    values = {k: config[k] for k in required}
    values["max_position_embeddings"] = config.get("max_position_embeddings", 512)
    values["layer_norm_eps"] = float(config.get("layer_norm_eps", 1e-12))
    try:
      return cls(**values, encoder_width=encoder_width)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from e


def config_dict(config: Any) -> dict[str, Any]:
  """The size fields of a config (no dtypes), for JSON."""
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("dtype", "param_dtype")}


# ----------------------------------------------------------------------------- vision
class BLIPVisionModel(nn.Module):
  """``__call__(pixel_values [B, S, S, C] float, preprocessed NHWC) -> image_embeds [B, N + 1, Hv]``."""
  config: BLIPVisionConfig

  def setup(self):
    cfg = self.config
    self.patch_embedding = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                                   strides=(cfg.patch_size, cfg.patch_size), padding="VALID", dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype)
    init = nn.initializers.truncated_normal(0.02)
    self.cls_token = self.param("cls_token", init, (cfg.hidden_size,), cfg.param_dtype)
    self.pos_embed = self.param("pos_embed", init, (cfg.num_patches + 1, cfg.hidden_size), cfg.param_dtype)
    self.layers = [clip_lib.CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.norm = clip_lib.layer_norm_module(cfg, None)

  def __call__(self, pixel_values: Array) -> Array:
    cfg = self.config
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
      raise ValueError(f"pixel_values must be [B, {want[0]}, {want[1]}, {want[2]}] (NHWC, preprocessed), "
                       f"got {tuple(pixel_values.shape)}")
    batch = pixel_values.shape[0]
    patches = self.patch_embedding(pixel_values.astype(cfg.dtype)).reshape(batch, cfg.num_patches, cfg.hidden_size)
    cls = jnp.broadcast_to(self.cls_token.astype(cfg.dtype), (batch, 1, cfg.hidden_size))
    hidden = jnp.concatenate([cls, patches], axis=1) + self.pos_embed.astype(cfg.dtype)[None]
    for layer in self.layers:
      hidden = layer(hidden, None)
    return self.norm(hidden)


# ----------------------------------------------------------------------------- text
def _dense(cfg: BLIPTextConfig, features: int, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _layer_norm(cfg: BLIPTextConfig, name: str | None) -> nn.LayerNorm:
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      use_fast_variance=False, name=name)


def _attend(q: Array, k: Array, v: Array, heads: int, bias: Array | None) -> Array:
  """``q [B, Lq, H]``, ``k``/``v [B, Lk, H]``, ``bias`` ``[B, 1, 1, Lk]`` (added to the logits)
  -> ``[B, Lq, H]``."""
  batch, lq, width = q.shape
  head_dim = width // heads
  q, k, v = (t.reshape(batch, -1, heads, head_dim) for t in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(head_dim)
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, lq, width)


class BertAttention(nn.Module):
  """Self- (``context=None``) or cross-attention with BERT's residual and post-LayerNorm.

  ``x [B, L, Ht]``, ``context [B, M, Hv]`` (cross) or ``None``, ``bias [B, 1, 1, L]`` (self) or
  ``None`` -> ``[B, L, Ht]``.
  """
  config: BLIPTextConfig
  cross: bool = False

  @nn.compact
  def __call__(self, x: Array, context: Array | None, bias: Array | None) -> Array:
    cfg = self.config
    if self.cross:
      q = _dense(cfg, cfg.hidden_size, "to_q")(x)
      k, v = jnp.split(_dense(cfg, 2 * cfg.hidden_size, "to_kv")(context.astype(cfg.dtype)), 2, axis=-1)
    else:
      q, k, v = jnp.split(_dense(cfg, 3 * cfg.hidden_size, "to_qkv")(x), 3, axis=-1)
    out = _dense(cfg, cfg.hidden_size, "to_out")(_attend(q, k, v, cfg.num_attention_heads, bias))
    return _layer_norm(cfg, "layer_norm")(out + x)


class BertLayer(nn.Module):
  """Self-attention, cross-attention to the image tokens, feed-forward: ``[B, L, Ht]`` -> same."""
  config: BLIPTextConfig

  @nn.compact
  def __call__(self, x: Array, self_bias: Array, image_embeds: Array) -> Array:
    cfg = self.config
    x = BertAttention(cfg, name="attention")(x, None, self_bias)
    x = BertAttention(cfg, cross=True, name="crossattention")(x, image_embeds, None)
    h = jax.nn.gelu(_dense(cfg, cfg.intermediate_size, "intermediate")(x), approximate=False)
    return _layer_norm(cfg, "output_layer_norm")(_dense(cfg, cfg.hidden_size, "output")(h) + x)


class BLIPTextEncoder(nn.Module):
  """BLIP's BERT in multimodal mode.

  ``__call__(input_ids [B, L] int, attention_mask [B, L] (1 = token, 0 = padding) | None,
  image_embeds [B, M, encoder_width]) -> last_hidden_state [B, L, Ht]``;
  ``L <= max_position_embeddings``.
  """
  config: BLIPTextConfig

  def setup(self):
    cfg = self.config
    self.word_embeddings = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.position_embeddings = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                                        param_dtype=cfg.param_dtype)
    self.embeddings_layer_norm = _layer_norm(cfg, None)
    self.layers = [BertLayer(cfg) for _ in range(cfg.num_hidden_layers)]

  def __call__(self, input_ids: Array, attention_mask: Array | None, image_embeds: Array) -> Array:
    cfg = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings="
                       f"{cfg.max_position_embeddings}")
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(batch, length)}")
    if image_embeds.ndim != 3 or image_embeds.shape[0] != batch or image_embeds.shape[2] != cfg.encoder_width:
      raise ValueError(f"image_embeds must be [{batch}, M, {cfg.encoder_width}] (batch of input_ids, "
                       f"encoder_width), got {tuple(image_embeds.shape)}")
    hidden = self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(length))[None]
    hidden = self.embeddings_layer_norm(hidden)
    if attention_mask is None:
      bias = jnp.zeros((batch, 1, 1, length), jnp.float32)
    else:
      bias = ((1.0 - attention_mask.astype(jnp.float32)) * MASK_BIAS)[:, None, None, :]
    for layer in self.layers:
      hidden = layer(hidden, bias, image_embeds)
    return hidden


# ----------------------------------------------------------------------------- checkpoint maps
def _drop_leading_ones(xs) -> np.ndarray:
  """timm's ``cls_token [1, 1, H]`` / ``pos_embed [1, N, H]`` -> ``[H]`` / ``[N, H]`` (other shapes
  are passed on unchanged, so that a mismatch is reported with the checkpoint's shape)."""
  (x,) = xs
  x = np.asarray(x)
  while x.ndim > 1 and x.shape[0] == 1:
    x = x[0]
  return x


def vision_mapping(config: BLIPVisionConfig, prefix: str = "visual_encoder.") -> list[ckpt.Rule]:
  """Rules from BLIP's ``VisionTransformer`` state dict (names under ``prefix``) to :class:`BLIPVisionModel`."""
  p = prefix
  rules = ckpt.conv_rules("patch_embedding", f"{p}patch_embed.proj")
  rules += [ckpt.Rule("cls_token", (f"{p}cls_token",), _drop_leading_ones),
            ckpt.Rule("pos_embed", (f"{p}pos_embed",), _drop_leading_ones)]
  for i in range(config.num_hidden_layers):
    src, dst = f"{p}blocks.{i}", f"layers_{i}"
    rules += ckpt.norm_rules(f"{dst}/layer_norm1", f"{src}.norm1")
    rules += ckpt.dense_rules(f"{dst}/attn/to_qkv", f"{src}.attn.qkv")  # timm's fused q|k|v
    rules += ckpt.dense_rules(f"{dst}/attn/to_out", f"{src}.attn.proj")
    rules += ckpt.norm_rules(f"{dst}/layer_norm2", f"{src}.norm2")
    rules += ckpt.dense_rules(f"{dst}/mlp/fc1", f"{src}.mlp.fc1")
    rules += ckpt.dense_rules(f"{dst}/mlp/fc2", f"{src}.mlp.fc2")
  rules += ckpt.norm_rules("norm", f"{p}norm")
  return rules


def text_mapping(config: BLIPTextConfig, prefix: str = "text_encoder.") -> list[ckpt.Rule]:
  """Rules from BLIP's med ``BertModel`` state dict (names under ``prefix``) to :class:`BLIPTextEncoder`.

  ``embeddings.position_ids`` (a buffer) is not a parameter; callers list it as ignored.
  """
  p = prefix
  rules = [ckpt.Rule("word_embeddings/embedding", (f"{p}embeddings.word_embeddings.weight",)),
           ckpt.Rule("position_embeddings/embedding", (f"{p}embeddings.position_embeddings.weight",))]
  rules += ckpt.norm_rules("embeddings_layer_norm", f"{p}embeddings.LayerNorm")
  for i in range(config.num_hidden_layers):
    src, dst = f"{p}encoder.layer.{i}", f"layers_{i}"
    rules += ckpt.fused_dense_rules(f"{dst}/attention/to_qkv", [f"{src}.attention.self.{n}"
                                                                for n in ("query", "key", "value")])
    rules += ckpt.dense_rules(f"{dst}/attention/to_out", f"{src}.attention.output.dense")
    rules += ckpt.norm_rules(f"{dst}/attention/layer_norm", f"{src}.attention.output.LayerNorm")
    rules += ckpt.dense_rules(f"{dst}/crossattention/to_q", f"{src}.crossattention.self.query")
    rules += ckpt.fused_dense_rules(f"{dst}/crossattention/to_kv", [f"{src}.crossattention.self.{n}"
                                                                    for n in ("key", "value")])
    rules += ckpt.dense_rules(f"{dst}/crossattention/to_out", f"{src}.crossattention.output.dense")
    rules += ckpt.norm_rules(f"{dst}/crossattention/layer_norm", f"{src}.crossattention.output.LayerNorm")
    rules += ckpt.dense_rules(f"{dst}/intermediate", f"{src}.intermediate.dense")
    rules += ckpt.dense_rules(f"{dst}/output", f"{src}.output.dense")
    rules += ckpt.norm_rules(f"{dst}/output_layer_norm", f"{src}.output.LayerNorm")
  return rules
