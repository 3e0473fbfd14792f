"""CLIP text transformer (transformers' ``CLIPTextModel``, FLUX.1's pooled prompt embedding) in Flax.

Architecture (Radford et al. 2021, text tower):

  x = token_embedding[input_ids] + position_embedding[0:L]         [B, L, H]
  for each layer (pre-LN, causal):
    x = x + to_out(attention(to_qkv(layer_norm1(x)), causal & padding mask))
    x = x + fc2(act(fc1(layer_norm2(x))))                          act: quick_gelu or gelu
  last_hidden_state = final_layer_norm(x)
  pooler_output = last_hidden_state[b, eos_position(b)]

Pooling follows the installed transformers (``modeling_clip.CLIPTextModel.forward``): when the
config's ``eos_token_id == 2`` (the legacy value in openai/clip-vit-large-patch14 and FLUX.1's
``text_encoder`` configs) the position is ``argmax(input_ids)`` (the end token has the largest
id of the original vocabulary); otherwise it is the *first* position whose id equals
``eos_token_id`` (0 when there is none). ``argmax`` returns the first maximum, as in PyTorch.

Parameter paths: ``token_embedding/embedding``, ``position_embedding/embedding``,
``layers_<i>/layer_norm1/{scale,bias}``, ``layers_<i>/attn/to_qkv/{kernel,bias}`` (q|k|v fused,
``[H, 3H]``), ``layers_<i>/attn/to_out``, ``layers_<i>/layer_norm2``, ``layers_<i>/mlp/fc1``,
``layers_<i>/mlp/fc2``, ``final_layer_norm``.

Precision: LayerNorm statistics, attention logits and softmax are float32 in every dtype
(transformers also takes the CLIP softmax in float32); everything else runs in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.models.layers import as_float_dtype, config_from_dict, config_from_preset

Array = jax.Array
Dtype = Any

CLIP_CLASS_NAMES = ("CLIPTextModel",)
HIDDEN_ACTS = ("quick_gelu", "gelu")
LEGACY_EOS_TOKEN_ID = 2
DEFAULT_DTYPE = jnp.float16  # design notes: CLIP runs in fp16, as the original pipelines.
# transformers >= 5 saves CLIPTextModel without the "text_model." prefix that older checkpoints
# (including FLUX.1's text_encoder) have; both layouts load.
LEGACY_PREFIX = "text_model."


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of a CLIP text transformer (fields of transformers' ``CLIPTextConfig``).

  Attributes:
    vocab_size: token embedding rows.
    hidden_size: model width H.
    intermediate_size: MLP hidden width.
    num_hidden_layers: encoder layers.
    num_attention_heads: heads (``hidden_size`` must be divisible by it).
    max_position_embeddings: learned positions; the longest accepted sequence.
    hidden_act: ``"quick_gelu"`` (``x * sigmoid(1.702 x)``) or ``"gelu"`` (exact, erf).
    layer_norm_eps: LayerNorm epsilon.
    eos_token_id: selects the pooled position (see the module docstring; 2 = legacy argmax).
    dtype: activation / compute dtype.
    param_dtype: parameter dtype.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Dtype = DEFAULT_DTYPE
  param_dtype: Dtype = DEFAULT_DTYPE

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"CLIPTextConfig.{name} must be a positive integer, got {value!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")
    if self.hidden_act not in HIDDEN_ACTS:
      raise ValueError(f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported; "
                       f"expected one of {list(HIDDEN_ACTS)}")
    if isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, (int, np.integer)):
      raise ValueError(f"CLIPTextConfig.eos_token_id must be one integer, got {self.eos_token_id!r}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"CLIPTextConfig.layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
    object.__setattr__(self, "dtype", as_float_dtype(self.dtype, "CLIPTextConfig.dtype"))
    object.__setattr__(self, "param_dtype", as_float_dtype(self.param_dtype, "CLIPTextConfig.param_dtype"))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides: Any) -> "CLIPTextConfig":
    """Builds a config from a transformers ``CLIPTextConfig`` dict (``config.json``).

    A ``CLIPConfig`` dict (with a ``text_config`` entry) is accepted too. Missing optional keys
    take the installed transformers' defaults (77 positions, quick_gelu, eps 1e-5,
    ``eos_token_id`` 49407).

    Raises:
      ValueError: naming a missing required key, an unknown override or an unsupported value.
    """
    if "text_config" in config and "hidden_size" not in config:
      config = config["text_config"]
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    defaults = {"max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                "eos_token_id": 49407}
    return config_from_dict(cls, config, required=required, defaults=defaults, overrides=overrides, what="CLIP text")

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "CLIPTextConfig":
    """One of :data:`CLIP_PRESETS` with ``overrides`` applied."""
    return config_from_preset(CLIP_PRESETS, name, overrides, "CLIP")


CLIP_PRESETS: dict[str, CLIPTextConfig] = {
    # openai/clip-vit-large-patch14 text tower = FLUX.1 ``text_encoder``; its config.json has the
    # legacy eos_token_id 2 (argmax pooling).
    "clip-vit-large-patch14": CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                             num_hidden_layers=12, num_attention_heads=12,
                                             max_position_embeddings=77, eos_token_id=LEGACY_EOS_TOKEN_ID),
    # For tests and smoke runs, matching ``tokenizers.byte_level_clip_tokenizer`` (bytes 0-255,
    # <|startoftext|> 256, <|endoftext|> 257).
    "clip-tiny": CLIPTextConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=77, eos_token_id=257),
}


def _activation(name: str, x: Array) -> Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
  """Multi-head self-attention, ``1/sqrt(head_dim)`` scaling, with biases.

  ``x [B, L, H]``, ``mask`` bool broadcastable to ``[B, heads, L, L]`` (or ``None``: every key,
  as in the vision tower) -> ``[B, L, H]``.

  Shared by the text and the vision tower (``clip_vision``): ``config`` is any config with the
  encoder fields ``hidden_size``, ``num_attention_heads``, ``head_dim``, ``intermediate_size``,
  ``hidden_act``, ``layer_norm_eps``, ``dtype`` and ``param_dtype``.
  """
  config: Any  # CLIPTextConfig or clip_vision.CLIPVisionConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    cfg = self.config
    batch, length, _ = x.shape
    qkv = nn.Dense(3 * cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_qkv")(x)
    q, k, v = (t.reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    # Explicit float32 logits and softmax: jax.nn.dot_product_attention requests an F16_F16_F32
    # dot for float16 inputs, which XLA:CPU cannot compile under jit.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * (cfg.head_dim ** -0.5)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, cfg.hidden_size)
    return nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_out")(out)


class CLIPMLP(nn.Module):
  """``fc2(act(fc1(x)))``: ``[B, L, H]`` -> ``[B, L, H]`` (config: see :class:`CLIPAttention`)."""
  config: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = nn.Dense(cfg.intermediate_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc1")(x)
    h = _activation(cfg.hidden_act, h)
    return nn.Dense(cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="fc2")(h)


def layer_norm_module(cfg: Any, name: str | None) -> nn.LayerNorm:
  """The LayerNorm of both CLIP towers (``cfg``: see :class:`CLIPAttention`)."""
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch, not E[x^2] - mean^2.
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      use_fast_variance=False, name=name)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN transformer layer: ``x [B, L, H]``, ``mask`` (or ``None``) -> ``[B, L, H]``.

  Used by the text tower (causal mask) and the vision tower (``mask=None``); ``config``: see
  :class:`CLIPAttention`.
  """
  config: Any

  @nn.compact
  def __call__(self, x: Array, mask: Array | None) -> Array:
    cfg = self.config
    x = x + CLIPAttention(cfg, name="attn")(layer_norm_module(cfg, "layer_norm1")(x), mask)
    return x + CLIPMLP(cfg, name="mlp")(layer_norm_module(cfg, "layer_norm2")(x))


class CLIPTextModel(nn.Module):
  """CLIP text transformer.

  ``__call__(input_ids [B, L] int, attention_mask [B, L] | None) -> (last_hidden_state
  [B, L, H], pooler_output [B, H])`` in ``config.dtype``; ``L <= max_position_embeddings``.
  Attention is causal; ``attention_mask`` (1 = token, 0 = padding) additionally masks padded
  keys. A query whose every key is masked (a sequence starting with padding) attends
  uniformly instead of producing NaN; use right padding, as the CLIP tokenizers do.

  Block-level use: :meth:`embed` -> ``CLIPEncoderLayer`` per ``layers_<i>`` subtree -> :meth:`head`.
  """
  config: CLIPTextConfig

  def setup(self):
    cfg = self.config
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype)
    self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
    self.final_layer_norm = layer_norm_module(cfg, None)

  def embed(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array]:
    """Returns ``(hidden [B, L, H], mask bool [B, 1, L, L])`` (causal & key padding)."""
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                       f"{tuple(input_ids.shape)}")
    hidden = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length))[None]
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask != 0)[:, None, None, :]
    return hidden, mask

  def head(self, hidden: Array, input_ids: Array) -> tuple[Array, Array]:
    """Final LayerNorm and EOS pooling: ``[B, L, H]`` -> ``([B, L, H], [B, H])``."""
    last = self.final_layer_norm(hidden)
    if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
      position = jnp.argmax(input_ids, axis=-1)
    else:
      position = jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, position[:, None, None], axis=1)[:, 0]
    return last, pooled

  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array]:
    hidden, mask = self.embed(input_ids, attention_mask)
    for layer in self.layers:
      hidden = layer(hidden, mask)
    return self.head(hidden, input_ids)


# ----------------------------------------------------------------------------- loading
def abstract_clip_params(config: CLIPTextConfig) -> dict[str, Any]:
  """The params tree of :class:`CLIPTextModel` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  model = CLIPTextModel(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def clip_mapping(config: CLIPTextConfig, prefix: str = LEGACY_PREFIX) -> list[ckpt.Rule]:
  """Mapping table from a transformers ``CLIPTextModel`` checkpoint to :class:`CLIPTextModel`.

  Args:
    config: the model config (layer count).
    prefix: ``"text_model."`` for checkpoints saved by transformers < 5 (FLUX.1, openai),
      ``""`` for those saved by transformers >= 5.
  """
  p = prefix
  rules = [
      ckpt.Rule("token_embedding/embedding", (f"{p}embeddings.token_embedding.weight",)),
      ckpt.Rule("position_embedding/embedding", (f"{p}embeddings.position_embedding.weight",)),
  ]
  for i in range(config.num_hidden_layers):
    rules += encoder_layer_rules(f"layers_{i}", f"{p}encoder.layers.{i}")
  rules += ckpt.norm_rules("final_layer_norm", f"{p}final_layer_norm")
  return rules


def encoder_layer_rules(dst: str, src: str) -> list[ckpt.Rule]:
  """Rules for one :class:`CLIPEncoderLayer` (``dst``) from transformers' ``CLIPEncoderLayer`` (``src``)."""
  rules = ckpt.norm_rules(f"{dst}/layer_norm1", f"{src}.layer_norm1")
  rules += ckpt.fused_dense_rules(f"{dst}/attn/to_qkv", [f"{src}.self_attn.{n}_proj" for n in "qkv"])
  rules += ckpt.dense_rules(f"{dst}/attn/to_out", f"{src}.self_attn.out_proj")
  rules += ckpt.norm_rules(f"{dst}/layer_norm2", f"{src}.layer_norm2")
  rules += ckpt.dense_rules(f"{dst}/mlp/fc1", f"{src}.mlp.fc1")
  rules += ckpt.dense_rules(f"{dst}/mlp/fc2", f"{src}.mlp.fc2")
  return rules


def load_clip_text_model(folder: str | os.PathLike, dtype: Any = None) -> tuple[CLIPTextConfig, dict[str, Any]]:
  """Loads a transformers ``CLIPTextModel`` folder (``config.json`` + safetensors, sharded or not).

  The key layout (with or without the ``text_model.`` prefix) is detected from the tensor
  names. The ``embeddings.position_ids`` buffer that older checkpoints contain is ignored
  explicitly; any other unused tensor is an error.

  Args:
    folder: the component folder (e.g. ``<flux>/text_encoder``).
    dtype: compute and parameter dtype; ``None`` = float16 (the project default for CLIP).

  Returns:
    ``(config, params)``; apply with ``CLIPTextModel(config).apply({"params": params}, ids, mask)``.

  Raises:
    CheckpointError: wrong model class, missing/unexpected/misshaped tensors (each by name).
    ValueError: an unsupported config value (e.g. ``hidden_act``).
  """
  folder = os.fspath(folder)
  dtype = DEFAULT_DTYPE if dtype is None else dtype
  config = ckpt.read_model_config(folder, CLIP_CLASS_NAMES, CLIPTextConfig.from_transformers, dtype=dtype,
                                  param_dtype=dtype)
  store = ckpt.open_store(folder)
  prefix = LEGACY_PREFIX if any(k.startswith(LEGACY_PREFIX) for k in store) else ""
  params = ckpt.load_params(store, clip_mapping(config, prefix), abstract_clip_params(config),
                            ignore=(re.escape(f"{prefix}embeddings.position_ids"),), source=folder)
  return config, params
