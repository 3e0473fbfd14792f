"""T5 v1.1 text encoder (the ``T5EncoderModel`` of FLUX.1 and PixArt-Sigma) in Flax.

Architecture (Raffel et al. 2020; v1.1 changes: gated-GELU FFN, no bias anywhere):

  x = shared[input_ids]                                        [B, L, D]
  bias = relative_attention_bias[bucket(k - q)]                [1, H, L, L]  (computed once, shared
                                                                by every block, as the first HF layer does)
  for each block:
    x = x + to_out(attention(to_qkv(rms_norm(x)), bias, mask))   (no 1/sqrt(d) scaling)
    x = x + wo(gelu_tanh(x wi_0) * (x wi_1))                     (on rms_norm(x); "relu": wo(relu(x wi)))
  last_hidden_state = rms_norm(x)

Parameter paths: ``shared/embedding`` ``[vocab, D]``, ``relative_attention_bias/embedding``
``[num_buckets, H]``, ``block_<i>/attn_norm/scale``, ``block_<i>/attn/to_qkv/kernel``
``[D, 3*H*d_kv]`` (q|k|v fused), ``block_<i>/attn/to_out/kernel``, ``block_<i>/ffn_norm/scale``,
``block_<i>/ffn/wi/kernel`` (``[D, 2*d_ff]`` = wi_0|wi_1 for gated-GELU, ``[D, d_ff]`` for
relu), ``block_<i>/ffn/wo/kernel``, ``final_norm/scale``.

Half precision, following transformers' ``T5EncoderModel.from_pretrained(..., dtype=...)``:

* **float16**: the FFN output projection ``wo`` keeps float32 weights and computes in float32
  (transformers' ``_keep_in_fp32_modules = ["wo"]`` applies to fp16 only), so the residual
  stream is promoted to float32 by the first FFN residual add and stays float32 (as it does in
  PyTorch); each block output that is still float16 is clamped to ``±(65504 - 1000 if any inf
  else 65504)`` as transformers does.
* **bfloat16**: weights and activations are bfloat16 everywhere (``wo`` included, as in
  transformers); no clamping (bf16 has the float32 exponent range).
* In every dtype the norms' mean square is computed in float32, and the attention logits,
  the position bias and the softmax are computed in float32 (the probabilities are rounded to
  the compute dtype before the value product). transformers adds the bias in the compute dtype
  (and its eager path also takes the softmax there), so ours is at least as precise; the tests
  measure both against float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.models.layers import RMSNorm, as_float_dtype, config_from_dict, config_from_preset, gelu_tanh
from svdquant_jax.utils.safetensors_io import CheckpointError

Array = jax.Array
Dtype = Any

T5_CLASS_NAMES = ("T5EncoderModel",)
FEED_FORWARD_PROJ = ("gated-gelu", "relu")
DEFAULT_DTYPE = jnp.bfloat16  # design notes: T5 runs in bf16, as the original FLUX/PixArt pipelines.

SHARED_EMBEDDING = "shared.weight"
ENCODER_EMBEDDING = "encoder.embed_tokens.weight"


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 encoder (the fields of transformers' ``T5Config`` that matter).

  Attributes:
    vocab_size: rows of the shared token embedding.
    d_model: model width D.
    d_kv: width of one attention head.
    d_ff: FFN hidden width.
    num_layers: encoder blocks.
    num_heads: attention heads H (the attention inner width is ``H * d_kv``, not necessarily D).
    relative_attention_num_buckets: buckets of the relative position bias (half per direction).
    relative_attention_max_distance: distances at or beyond this share the last bucket.
    layer_norm_epsilon: epsilon of the RMS norms.
    feed_forward_proj: ``"gated-gelu"`` (T5 v1.1: ``wo(gelu_tanh(x wi_0) * x wi_1)``) or
      ``"relu"`` (original T5: ``wo(relu(x wi))``).
    dtype: activation / compute dtype.
    param_dtype: parameter dtype (``wo`` is float32 whenever this is float16, see the module doc).
  """
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"
  dtype: Dtype = DEFAULT_DTYPE
  param_dtype: Dtype = DEFAULT_DTYPE

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                 "relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"T5Config.{name} must be a positive integer, got {value!r}")
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                       f"expected one of {list(FEED_FORWARD_PROJ)}")
    max_exact = self.relative_attention_num_buckets // 4
    if max_exact < 1 or self.relative_attention_max_distance <= max_exact:
      raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 and "
                       "relative_attention_max_distance > num_buckets // 4, got "
                       f"{self.relative_attention_num_buckets} and {self.relative_attention_max_distance}")
    if not self.layer_norm_epsilon > 0:
      raise ValueError(f"T5Config.layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")
    object.__setattr__(self, "dtype", as_float_dtype(self.dtype, "T5Config.dtype"))
    object.__setattr__(self, "param_dtype", as_float_dtype(self.param_dtype, "T5Config.param_dtype"))

  @property
  def inner_dim(self) -> int:
    """Attention inner width ``num_heads * d_kv``."""
    return self.num_heads * self.d_kv

  @property
  def wo_dtype(self) -> jnp.dtype:
    """Compute dtype of the FFN output projection (float32 when ``dtype`` is float16)."""
    return jnp.dtype(jnp.float32) if self.dtype == jnp.float16 else self.dtype

  @property
  def wo_param_dtype(self) -> jnp.dtype:
    """Parameter dtype of ``wo`` (float32 when ``param_dtype`` is float16)."""
    return jnp.dtype(jnp.float32) if self.param_dtype == jnp.float16 else self.param_dtype

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides: Any) -> "T5Config":
    """Builds a config from a transformers ``T5Config`` dict (``config.json``).

    Missing optional keys take transformers' defaults (32 buckets, max distance 128, eps 1e-6,
    ``feed_forward_proj="relu"``). ``overrides`` replace any field (e.g. ``dtype``).

    Raises:
      ValueError: naming a missing required key, an unknown override or an unsupported value.
    """
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
    defaults = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu"}
    return config_from_dict(cls, config, required=required, defaults=defaults, overrides=overrides, what="T5")

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "T5Config":
    """One of :data:`T5_PRESETS` with ``overrides`` applied."""
    return config_from_preset(T5_PRESETS, name, overrides, "T5")


T5_PRESETS: dict[str, T5Config] = {
    # google/t5-v1_1-xxl, the FLUX.1 ``text_encoder_2`` and the PixArt-Sigma ``text_encoder``.
    "t5-v1_1-xxl": T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                            num_heads=64),
    # For tests and smoke runs; the vocabulary holds the byte-level tokenizer's 259 ids
    # (``tokenizers.byte_level_t5_tokenizer``).
    "t5-tiny": T5Config(vocab_size=384, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2),
}


# ----------------------------------------------------------------------------- position bias
def relative_position_bucket(relative_position: Array, num_buckets: int = 32, max_distance: int = 128) -> Array:
  """Bidirectional T5 bucket of ``relative_position = key_position - query_position``.

  Half of the buckets are for keys before the query and half for keys after it (offset
  ``num_buckets // 2``). Within a half, distances ``n < num_buckets // 4`` get one bucket each;
  larger distances get logarithmically wider buckets up to ``max_distance``, beyond which
  all share the last bucket:

    bucket(n) = m + floor(log(n / m) / log(max_distance / m) * (half - m)),  m = half // 2

  computed in float32 in the same operation order as Mesh TensorFlow / transformers, so that
  distances landing exactly on a bucket edge round the same way.

  Args:
    relative_position: integer array of any shape.

  Returns:
    int32 array of the same shape with values in ``[0, num_buckets)``.
  """
  half = num_buckets // 2
  relative_position = jnp.asarray(relative_position, jnp.int32)
  offset = jnp.where(relative_position > 0, half, 0).astype(jnp.int32)
  distance = jnp.abs(relative_position)
  max_exact = half // 2
  is_small = distance < max_exact
  # max(distance, 1) keeps log() finite on the (unused) small branch.
  scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
  scaled = scaled / jnp.float32(math.log(max_distance / max_exact)) * jnp.float32(half - max_exact)
  large = jnp.minimum(max_exact + scaled.astype(jnp.int32), half - 1)
  return offset + jnp.where(is_small, distance, large)


def _check_ids(input_ids: Array, attention_mask: Array | None) -> None:
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{tuple(input_ids.shape)}")
  if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
    raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                     f"{tuple(input_ids.shape)}")


def _clamp_float16(x: Array) -> Array:
  """transformers' fp16 guard: clamp to the finite range (1000 below it if anything overflowed)."""
  if x.dtype != jnp.float16:
    return x
  top = float(jnp.finfo(jnp.float16).max)
  limit = jnp.where(jnp.isinf(x).any(), top - 1000.0, top).astype(x.dtype)
  return jnp.clip(x, -limit, limit)


# ----------------------------------------------------------------------------- modules
class T5Attention(nn.Module):
  """Bidirectional multi-head self-attention with an additive position bias and no scaling.

  ``x [B, L, D]``, ``position_bias`` float32 ``[1, H, L, L]``, ``mask`` bool ``[B, 1, 1, L]``
  (``True`` = attend) or ``None`` -> ``[B, L, D]`` in ``config.dtype``.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, position_bias: Array, mask: Array | None) -> Array:
    cfg = self.config
    batch, length, _ = x.shape
    qkv = nn.Dense(3 * cfg.inner_dim, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                   name="to_qkv")(x)
    q, k, v = (t.reshape(batch, length, cfg.num_heads, cfg.d_kv) for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits + position_bias.astype(jnp.float32)
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, cfg.inner_dim)
    return nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    name="to_out")(out)


class T5FeedForward(nn.Module):
  """Gated-GELU (``wo(gelu_tanh(x wi_0) * x wi_1)``, ``wi`` = wi_0|wi_1) or ReLU FFN.

  ``[B, L, D]`` -> ``[B, L, D]`` in ``config.wo_dtype`` (float32 when the model is float16).
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    gated = cfg.feed_forward_proj == "gated-gelu"
    h = nn.Dense(2 * cfg.d_ff if gated else cfg.d_ff, use_bias=False, dtype=cfg.dtype,
                 param_dtype=cfg.param_dtype, name="wi")(x)
    if gated:
      gate, linear = jnp.split(h, 2, axis=-1)
      h = gelu_tanh(gate) * linear
    else:
      h = jax.nn.relu(h)
    h = h.astype(cfg.wo_dtype)
    return nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.wo_dtype, param_dtype=cfg.wo_param_dtype,
                    name="wo")(h)


class T5Block(nn.Module):
  """One encoder block: pre-norm self-attention and pre-norm FFN, each with a residual.

  ``x [B, L, D]`` (``config.dtype``, or float32 after the first FFN when the model is float16),
  ``position_bias [1, H, L, L]``, ``mask [B, 1, 1, L]`` or ``None`` -> ``[B, L, D]``.
  """
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, position_bias: Array, mask: Array | None) -> Array:
    cfg = self.config
    h = RMSNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="attn_norm")(x)
    x = _clamp_float16(x + T5Attention(cfg, name="attn")(h, position_bias, mask))
    h = RMSNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="ffn_norm")(x)
    return _clamp_float16(x + T5FeedForward(cfg, name="ffn")(h))


class T5Encoder(nn.Module):
  """The T5 encoder stack (transformers' ``T5EncoderModel``).

  ``__call__(input_ids [B, L] int, attention_mask [B, L] | None) -> last_hidden_state
  [B, L, d_model]`` in ``config.dtype``. ``attention_mask`` (1 = token, 0 = padding) masks
  padded *keys*; padded positions still get (meaningless) outputs, as in transformers. Token
  ids outside ``[0, vocab_size)`` produce NaN rows (``jnp.take`` fill mode), not an error,
  because the ids are traced values under ``jit``.

  Block-level use: :meth:`embed` -> ``T5Block`` per ``block_<i>`` subtree -> :meth:`head`.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.shared = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.relative_attention_bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                            param_dtype=cfg.param_dtype)
    self.block = [T5Block(cfg) for _ in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def position_bias(self, length: int) -> Array:
    """float32 ``[1, H, length, length]``: ``bias[0, h, q, k] = table[bucket(k - q), h]``."""
    positions = jnp.arange(length, dtype=jnp.int32)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None],
                                       self.config.relative_attention_num_buckets,
                                       self.config.relative_attention_max_distance)
    values = self.relative_attention_bias(buckets).astype(jnp.float32)  # [L, L, H]
    return jnp.transpose(values, (2, 0, 1))[None]

  def embed(self, input_ids: Array, attention_mask: Array | None = None) -> tuple[Array, Array, Array | None]:
    """Returns ``(hidden [B, L, D], position_bias [1, H, L, L], mask [B, 1, 1, L] bool | None)``."""
    _check_ids(input_ids, attention_mask)
    hidden = self.shared(input_ids)
    mask = None if attention_mask is None else (attention_mask != 0)[:, None, None, :]
    return hidden, self.position_bias(input_ids.shape[1]), mask

  def head(self, hidden: Array) -> Array:
    """Final RMS norm: ``[B, L, D]`` -> ``[B, L, D]`` in ``config.dtype``."""
    return self.final_norm(hidden)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    hidden, bias, mask = self.embed(input_ids, attention_mask)
    for block in self.block:
      hidden = block(hidden, bias, mask)
    return self.head(hidden)


# ----------------------------------------------------------------------------- loading
def abstract_t5_params(config: T5Config) -> dict[str, Any]:
  """The params tree of :class:`T5Encoder` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  model = T5Encoder(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]


def t5_mapping(config: T5Config, embedding_source: str = SHARED_EMBEDDING) -> list[ckpt.Rule]:
  """Mapping table from a transformers ``T5EncoderModel`` checkpoint to :class:`T5Encoder`.

  Args:
    config: the model config (layer count and FFN kind).
    embedding_source: the checkpoint tensor holding the token embedding, ``"shared.weight"``
      or ``"encoder.embed_tokens.weight"`` (the two are tied in T5; see :func:`load_t5_encoder`).
  """
  if embedding_source not in (SHARED_EMBEDDING, ENCODER_EMBEDDING):
    raise ValueError(f"embedding_source must be {SHARED_EMBEDDING!r} or {ENCODER_EMBEDDING!r}, "
                     f"got {embedding_source!r}")
  rules = [
      ckpt.Rule("shared/embedding", (embedding_source,)),
      ckpt.Rule("relative_attention_bias/embedding",
                ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
  ]
  for i in range(config.num_layers):
    src, dst = f"encoder.block.{i}.layer", f"block_{i}"
    rules += ckpt.norm_rules(f"{dst}/attn_norm", f"{src}.0.layer_norm", bias=False)
    rules += ckpt.fused_dense_rules(f"{dst}/attn/to_qkv", [f"{src}.0.SelfAttention.{n}" for n in "qkv"],
                                    bias=False)
    rules += ckpt.dense_rules(f"{dst}/attn/to_out", f"{src}.0.SelfAttention.o", bias=False)
    rules += ckpt.norm_rules(f"{dst}/ffn_norm", f"{src}.1.layer_norm", bias=False)
    if config.feed_forward_proj == "gated-gelu":
      rules += ckpt.fused_dense_rules(f"{dst}/ffn/wi", [f"{src}.1.DenseReluDense.wi_0",
                                                        f"{src}.1.DenseReluDense.wi_1"], bias=False)
    else:
      rules += ckpt.dense_rules(f"{dst}/ffn/wi", f"{src}.1.DenseReluDense.wi", bias=False)
    rules += ckpt.dense_rules(f"{dst}/ffn/wo", f"{src}.1.DenseReluDense.wo", bias=False)
  rules += ckpt.norm_rules("final_norm", "encoder.final_layer_norm", bias=False)
  return rules


def _tied_embedding(store: Mapping[str, np.ndarray], source: str) -> tuple[str, tuple[str, ...]]:
  """Chooses the embedding tensor; returns ``(embedding_source, ignore_patterns)``."""
  has_shared, has_encoder = SHARED_EMBEDDING in store, ENCODER_EMBEDDING in store
  if has_shared and has_encoder:
    a, b = store[SHARED_EMBEDDING], store[ENCODER_EMBEDDING]
    same = a.shape == b.shape and (np.array_equal(a.view(np.uint8), b.view(np.uint8)) if a.dtype == b.dtype
                                   else np.array_equal(a.astype(np.float32), b.astype(np.float32)))
    if not same:
      raise CheckpointError(f"{source}: {SHARED_EMBEDDING!r} and {ENCODER_EMBEDDING!r} must be the same "
                            "(tied) tensor but differ")
    return SHARED_EMBEDDING, (re.escape(ENCODER_EMBEDDING),)
  if has_encoder:
    return ENCODER_EMBEDDING, ()
  return SHARED_EMBEDDING, ()  # a missing 'shared.weight' is then reported by load_params.


def load_t5_encoder(folder: str | os.PathLike, dtype: Any = None) -> tuple[T5Config, dict[str, Any]]:
  """Loads a transformers ``T5EncoderModel`` folder (``config.json`` + safetensors, sharded or not).

  Tied embeddings: T5 ties ``encoder.embed_tokens.weight`` to ``shared.weight``; checkpoints
  hold either or both. ``shared.weight`` is used when present; if
  ``encoder.embed_tokens.weight`` is also present it must be bit-identical (else
  :class:`CheckpointError`) and is then deliberately ignored; a checkpoint with only
  ``encoder.embed_tokens.weight`` uses that. Any other tensor that is not used (e.g. a decoder)
  is an error.

  Args:
    folder: the component folder (e.g. ``<flux>/text_encoder_2``).
    dtype: compute and parameter dtype; ``None`` = bfloat16 (the project default for T5).
      With float16 the ``wo`` weights stay float32 (see the module docstring).

  Returns:
    ``(config, params)``; apply with ``T5Encoder(config).apply({"params": params}, ids, mask)``.

  Raises:
    CheckpointError: wrong model class, missing/unexpected/misshaped tensors (each by name).
    ValueError: an unsupported config value (e.g. ``feed_forward_proj``).
  """
  folder = os.fspath(folder)
  dtype = DEFAULT_DTYPE if dtype is None else dtype
  config = ckpt.read_model_config(folder, T5_CLASS_NAMES, T5Config.from_transformers, dtype=dtype, param_dtype=dtype)
  store = ckpt.open_store(folder)
  embedding_source, ignore = _tied_embedding(store, folder)
  params = ckpt.load_params(store, t5_mapping(config, embedding_source), abstract_t5_params(config),
                            ignore=ignore, source=folder)
  return config, params
