"""Gemma-2 decoder stack as a text encoder (transformers ``Gemma2Model``, SANA's Gemma-2-2B-it), in Flax,
with its checkpoint loader.

Architecture (the last hidden state is the text feature; no LM head)::

  x = embed_tokens[input_ids] * sqrt(hidden_size)          (the scale rounded to the param dtype)
  for each layer:
    x = x + post_attention_norm(o_proj(attention(rope(q), rope(k), v)))    on input_norm(x)
    x = x + post_feedforward_norm(down(gelu_tanh(gate(h)) * up(h)))         h = pre_feedforward_norm(x)
  last_hidden_state = norm(x)

* Gemma RMS norms multiply by ``1 + weight`` (the stored weight is the offset), in float32.
* Attention: grouped-query (``num_key_value_heads`` k/v heads, each shared by
  ``num_attention_heads / num_key_value_heads`` query heads), RoPE (``rope_theta``, rotate-half
  convention) on q and k, logits scaled by ``query_pre_attn_scalar ** -0.5`` and soft-capped
  ``c * tanh(l / c)`` with ``c = attn_logit_softcapping``; causal, with the key padding mask, and
  on ``"sliding_attention"`` layers only the last ``sliding_window`` positions.
* Logits, soft cap and softmax are float32; probabilities are rounded to the compute dtype before
  the value product (transformers' eager path computes the logits in the compute dtype, so ours
  is at least as precise; the tests state the bf16 bound against float32).

Parameter paths: ``embed_tokens/embedding`` ``[vocab, D]``, ``layers_<i>/{input_norm, post_attention_norm,
pre_feedforward_norm, post_feedforward_norm}/scale``, ``layers_<i>/attn/{q,k,v,o}_proj/kernel``
(not fused: q and k/v differ in width under grouped-query attention), ``layers_<i>/mlp/{gate_up,
down}/kernel`` (gate|up fused), ``norm/scale``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.models.layers import as_float_dtype, config_from_preset, gelu_tanh
from svdquant_jax.utils import trees

Array = jax.Array
Dtype = Any

GEMMA2_CLASS_NAMES = ("Gemma2Model", "Gemma2ForCausalLM")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
DEFAULT_DTYPE = jnp.bfloat16   # SANA runs its text encoder in bf16


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """Hyper-parameters of a Gemma-2 text encoder (transformers ``Gemma2Config`` fields that matter).

  ``layer_types`` defaults to transformers' alternation (sliding, full, sliding, ...);
  ``sliding_window`` / ``attn_logit_softcapping`` ``None`` switch those off.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  attention_bias: bool = False
  query_pre_attn_scalar: float = 256
  sliding_window: int | None = 4096
  attn_logit_softcapping: float | None = 50.0
  layer_types: tuple[str, ...] | None = None
  dtype: Dtype = DEFAULT_DTYPE
  param_dtype: Dtype = DEFAULT_DTYPE

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"Gemma2Config.{name} must be a positive integer, got {value!r}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"Gemma2Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                       f"num_key_value_heads ({self.num_key_value_heads})")
    if self.head_dim % 2:
      raise ValueError(f"Gemma2Config.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
    for name in ("rms_norm_eps", "rope_theta", "query_pre_attn_scalar"):
      if not getattr(self, name) > 0:
        raise ValueError(f"Gemma2Config.{name} must be positive, got {getattr(self, name)!r}")
    if self.sliding_window is not None and int(self.sliding_window) < 1:
      raise ValueError(f"Gemma2Config.sliding_window must be positive or None, got {self.sliding_window!r}")
    if self.attn_logit_softcapping is not None and not self.attn_logit_softcapping > 0:
      raise ValueError(f"Gemma2Config.attn_logit_softcapping must be positive or None, "
                       f"got {self.attn_logit_softcapping!r}")
    types = self.layer_types
    if types is None:
      types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.num_hidden_layers))
    types = tuple(types)
    if len(types) != self.num_hidden_layers or any(t not in LAYER_TYPES for t in types):
      raise ValueError(f"Gemma2Config.layer_types must list {self.num_hidden_layers} of {LAYER_TYPES}, got {types}")
    object.__setattr__(self, "layer_types", types)
    object.__setattr__(self, "dtype", as_float_dtype(self.dtype, "Gemma2Config.dtype"))
    object.__setattr__(self, "param_dtype", as_float_dtype(self.param_dtype, "Gemma2Config.param_dtype"))

  @property
  def kv_groups(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any], **overrides: Any) -> "Gemma2Config":
    """From a transformers ``Gemma2Config`` dict (``config.json``); other keys (token ids, the LM
    head's soft cap, cache settings, ...) do not change the encoder and are ignored.

    Raises:
      ValueError: a missing required key, an unknown override, or a setting not implemented
        (a RoPE type other than ``default``, bidirectional attention, another activation).
    """
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in config and k not in overrides]
    if missing:
      raise ValueError(f"Gemma2 config lacks required key(s) {missing}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ValueError(f"Gemma2 config key 'rope_parameters.rope_type' = {rope_type!r} is not supported "
                       "(expected 'default')")
    if config.get("use_bidirectional_attention"):
      raise ValueError("Gemma2 config key 'use_bidirectional_attention' = true is not supported (causal only)")
    act = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
      raise ValueError(f"Gemma2 config key 'hidden_activation' = {act!r} is not supported (expected one of "
                       f"{ACTIVATIONS})")
    heads = int(config.get("num_attention_heads", 8))
    values: dict[str, Any] = {k: config[k] for k in required if k in config}
    values.update(
        num_key_value_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or int(config.get("hidden_size", 0)) // max(heads, 1),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        attention_bias=bool(config.get("attention_bias", False)),
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
        sliding_window=config.get("sliding_window", 4096),
        attn_logit_softcapping=config.get("attn_logit_softcapping", 50.0),
        layer_types=tuple(config["layer_types"]) if config.get("layer_types") else None,
    )
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
      raise ValueError(f"unknown Gemma2Config override(s) {bad}; fields are {sorted(fields)}")
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_preset(cls, name: str, **overrides: Any) -> "Gemma2Config":
    return config_from_preset(GEMMA2_PRESETS, name, overrides, "Gemma-2")

  def to_transformers(self) -> dict[str, Any]:
    """A transformers ``Gemma2Config`` dict for this encoder (``architectures: [Gemma2Model]``)."""
    return {"architectures": ["Gemma2Model"], "model_type": "gemma2", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_parameters": {"rope_type": "default",
                                                                   "rope_theta": self.rope_theta},
            "attention_bias": self.attention_bias, "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "sliding_window": self.sliding_window, "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": 30.0, "layer_types": list(self.layer_types),
            "hidden_activation": "gelu_pytorch_tanh", "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "max_position_embeddings": 8192, "attention_dropout": 0.0, "tie_word_embeddings": True}


GEMMA2_PRESETS: dict[str, Gemma2Config] = {
    # google/gemma-2-2b-it (SANA's text_encoder folder).
    "gemma-2-2b": Gemma2Config(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=256),
    # For tests and the tiny pipeline; the vocabulary holds the byte-level Gemma tokenizer's 260 ids.
    "gemma2-tiny": Gemma2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32),
}


# ----------------------------------------------------------------------------- modules
def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """float32 ``(cos, sin)`` ``[length, head_dim]`` of positions ``0..length-1`` (transformers' default
  RoPE: ``inv_freq = 1 / theta^(2i / d)`` in float32, ``[freqs, freqs]``)."""
  inv_freq = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                         / np.float32(head_dim)))).astype(np.float32)
  freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
  return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def _rotate(x: Array, cos: Array, sin: Array) -> Array:
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


class GemmaRMSNorm(nn.Module):
  """``x * rsqrt(mean(x^2) + eps) * (1 + scale)`` in float32, returned in the input dtype."""
  eps: float
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


class Gemma2Attention(nn.Module):
  """``x [B, L, D]``, ``cos/sin [L, head_dim]``, ``mask`` bool ``[B, 1, L, L]`` -> ``[B, L, D]``."""
  config: Gemma2Config

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    c = self.config
    b, length, _ = x.shape
    hd, h, kv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    dense = lambda n, name: nn.Dense(n, use_bias=c.attention_bias, dtype=c.dtype,  # noqa: E731
                                     param_dtype=c.param_dtype, name=name)
    q, k, v = dense(h * hd, "q_proj")(x), dense(kv * hd, "k_proj")(x), dense(kv * hd, "v_proj")(x)
    cos, sin = cos.astype(c.dtype)[None, :, None], sin.astype(c.dtype)[None, :, None]
    q = _rotate(q.reshape(b, length, h, hd), cos, sin).reshape(b, length, kv, c.kv_groups, hd)
    k = _rotate(k.reshape(b, length, kv, hd), cos, sin)
    v = v.reshape(b, length, kv, hd)
    logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(c.query_pre_attn_scalar ** -0.5)
    if c.attn_logit_softcapping is not None:
      cap = jnp.float32(c.attn_logit_softcapping)
      logits = jnp.tanh(logits / cap) * cap
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(c.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, length, h * hd)
    return nn.Dense(c.hidden_size, use_bias=c.attention_bias, dtype=c.dtype, param_dtype=c.param_dtype,
                    name="o_proj")(out)


class Gemma2MLP(nn.Module):
  """``down(gelu_tanh(gate(x)) * up(x))`` with ``gate|up`` fused in ``gate_up``."""
  config: Gemma2Config

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    h = nn.Dense(2 * c.intermediate_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                 name="gate_up")(x)
    gate, up = jnp.split(h, 2, axis=-1)
    return nn.Dense(c.hidden_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                    name="down")(gelu_tanh(gate) * up)


class Gemma2Layer(nn.Module):
  """One decoder layer with Gemma-2's four norms (pre and post attention, pre and post MLP)."""
  config: Gemma2Config

  @nn.compact
  def __call__(self, x: Array, cos: Array, sin: Array, mask: Array) -> Array:
    c = self.config
    norm = lambda name: GemmaRMSNorm(c.rms_norm_eps, c.param_dtype, name=name)  # noqa: E731
    h = Gemma2Attention(c, name="attn")(norm("input_norm")(x), cos, sin, mask)
    x = x + norm("post_attention_norm")(h)
    h = Gemma2MLP(c, name="mlp")(norm("pre_feedforward_norm")(x))
    return x + norm("post_feedforward_norm")(h)


class Gemma2Model(nn.Module):
  """The Gemma-2 stack: ``__call__(input_ids [B, L] int, attention_mask [B, L] | None)`` ->
  ``last_hidden_state [B, L, hidden_size]`` in ``config.dtype``.

  ``attention_mask`` (1 = token, 0 = padding) masks padded *keys*; padded positions still get
  outputs, as in transformers. Ids outside ``[0, vocab_size)`` give NaN rows (traced ids cannot
  raise under ``jit``).
  """
  config: Gemma2Config

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
    c = self.config
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"input_ids must be an integer array [B, L], got {input_ids.dtype}{tuple(input_ids.shape)}")
    b, length = input_ids.shape
    if attention_mask is not None and tuple(attention_mask.shape) != (b, length):
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {(b, length)}")
    x = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.param_dtype, param_dtype=c.param_dtype,
                 name="embed_tokens")(input_ids)
    x = (x * jnp.asarray(math.sqrt(c.hidden_size), c.param_dtype)).astype(c.dtype)
    positions = np.arange(length)
    causal = positions[None, :] <= positions[:, None]                       # [q, k]
    keys = jnp.ones((b, length), bool) if attention_mask is None else attention_mask != 0
    full = jnp.asarray(causal)[None, None] & keys[:, None, None, :]           # [B, 1, q, k]
    window = causal
    if c.sliding_window is not None:
      window = causal & (positions[None, :] > positions[:, None] - int(c.sliding_window))
    sliding = jnp.asarray(window)[None, None] & keys[:, None, None, :]
    cos, sin = (jnp.asarray(t) for t in rope_tables(length, c.head_dim, c.rope_theta))
    for i, kind in enumerate(c.layer_types):
      x = Gemma2Layer(c, name=f"layers_{i}")(x, cos, sin, sliding if kind == "sliding_attention" else full)
    return GemmaRMSNorm(c.rms_norm_eps, c.param_dtype, name="norm")(x)


# ----------------------------------------------------------------------------- loading
def abstract_gemma2_params(config: Gemma2Config) -> dict[str, Any]:
  """The params tree of :class:`Gemma2Model` as ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda i: Gemma2Model(config).init(jax.random.key(0), i), ids)["params"]


def gemma2_mapping(config: Gemma2Config, prefix: str = "") -> list[ckpt.Rule]:
  """Mapping table from a transformers ``Gemma2Model`` checkpoint (``prefix="model."`` for a
  ``Gemma2ForCausalLM`` one) to :class:`Gemma2Model`."""
  p = prefix
  bias = config.attention_bias
  rules = [ckpt.Rule("embed_tokens/embedding", (f"{p}embed_tokens.weight",))]
  for i in range(config.num_hidden_layers):
    s, t = f"{p}layers.{i}", f"layers_{i}"
    for ours, theirs in (("input_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
                         ("pre_feedforward_norm", "pre_feedforward_layernorm"),
                         ("post_feedforward_norm", "post_feedforward_layernorm")):
      rules += ckpt.norm_rules(f"{t}/{ours}", f"{s}.{theirs}", bias=False)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
      rules += ckpt.dense_rules(f"{t}/attn/{n}", f"{s}.self_attn.{n}", bias=bias)
    rules += ckpt.fused_dense_rules(f"{t}/mlp/gate_up", [f"{s}.mlp.gate_proj", f"{s}.mlp.up_proj"], bias=False)
    rules += ckpt.dense_rules(f"{t}/mlp/down", f"{s}.mlp.down_proj", bias=False)
  rules += ckpt.norm_rules("norm", f"{p}norm", bias=False)
  return rules


def load_gemma2_encoder(folder: str | os.PathLike, dtype: Any = None) -> tuple[Gemma2Config, dict[str, Any]]:
  """Loads a transformers ``Gemma2Model`` (or ``Gemma2ForCausalLM``, whose ``lm_head`` is ignored)
  folder (``config.json`` + safetensors, sharded or not).

  Args:
    folder: the component folder (SANA's ``text_encoder``).
    dtype: compute and parameter dtype; ``None`` = bfloat16.

  Raises:
    CheckpointError: wrong model class, unsupported config, missing/unexpected/misshaped tensors.
  """
  folder = os.fspath(folder)
  dtype = DEFAULT_DTYPE if dtype is None else dtype
  config = ckpt.read_model_config(folder, GEMMA2_CLASS_NAMES, Gemma2Config.from_transformers, dtype=dtype,
                                  param_dtype=dtype)
  store = ckpt.open_store(folder)
  prefix = "model." if any(k.startswith("model.") for k in store) else ""
  params = ckpt.load_params(store, gemma2_mapping(config, prefix), abstract_gemma2_params(config),
                            ignore=(re.escape("lm_head.weight"),), source=folder)
  return config, params


def init_gemma2_params(config: Gemma2Config, seed: int) -> dict[str, Any]:
  """Seeded params (per leaf from ``(seed, crc32(path))``): token embedding ~ N(0, 1), kernels ~
  N(0, 1/fan_in), norm weights (offsets from 1) ~ N(0, 0.1^2); in ``config.param_dtype``."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative int")
  out = {}
  for path, leaf in trees.flatten(abstract_gemma2_params(config)).items():
    noise = np.random.default_rng([int(seed), zlib.crc32(path.encode())]).standard_normal(leaf.shape,
                                                                                          dtype=np.float32)
    name = path.rsplit("/", 1)[-1]
    scale = {"embedding": 1.0, "scale": 0.1, "bias": 0.02}.get(name, 1.0 / math.sqrt(leaf.shape[0]))
    out[path] = jnp.asarray((noise * np.float32(scale)).astype(leaf.dtype))
  return trees.unflatten(out)
