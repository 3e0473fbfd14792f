"""SANA diffusion transformer in Flax (diffusers ``SanaTransformer2DModel``).

Layout and numerics follow diffusers' ``SanaTransformer2DModel`` (SANA 1.0: no guidance embedding,
no q/k norm):

* patch embedding: a ``patch x patch`` convolution with stride ``patch``; with an
  ``interpolation_scale`` a 2-D sin-cos position embedding is added (as PixArt), without one
  (SANA-1.6B) there is none;
* adaLN-single: a sinusoidal timestep embedding (256 channels, ``[cos, sin]``) through an MLP,
  then ``Dense(6D)`` of its SiLU;
* the caption projection ``Dense -> GELU(tanh) -> Dense`` from ``caption_channels`` to ``D``,
  then an RMS norm (eps 1e-5, with a weight);
* ``num_layers`` blocks: modulated LayerNorm -> **linear attention** (ReLU kernel, float32) ->
  gate; cross-attention to the caption tokens (no norm, key padding mask; softmax attention);
  modulated LayerNorm -> **GLUMBConv** (Mix-FFN: 1x1 conv up to ``2H``, SiLU, 3x3 depthwise conv,
  GLU ``h * SiLU(gate)``, 1x1 conv down to ``D``, no bias) -> gate;
* the head: LayerNorm, the final shift/scale modulation, ``Dense`` and unpatchify.

Linear attention (per head, ``q, k = relu(q), relu(k)`` and everything in float32)::

  out_n = (sum_m v_m (k_m . q_n)) / (sum_m k_m . q_n + 1e-15)

computed as ``(V K^T) q_n`` and ``(sum_m k_m) . q_n``: cost linear in the number of tokens.

Public images are **NHWC**: ``hidden_states [B, H, W, C_in]`` -> ``[B, H, W, C_out]`` (diffusers
uses NCHW). Inside, the image tokens stay on their patch grid: a block reads and writes
``[B, h, w, D]``, so the depthwise convolution needs no reshape and a block's input shape carries
the grid (block-level calibration needs no static height/width argument). Every linear layer is
an ``nn.Dense``, including the GLUMBConv 1x1 convolutions ``ff/conv_inverted`` and
``ff/conv_point`` (a 1x1 convolution over NHWC is a Dense over the channel axis); the depthwise
``ff/conv_depth`` is an ``nn.Conv`` with one group per channel. Self-attention q/k/v are fused
into ``attn1/to_qkv`` and cross-attention k/v into ``attn2/to_kv`` (the loader concatenates them).

Block-level use: :meth:`SanaTransformer2DModel.embed`, :class:`SanaBlock` per
``transformer_blocks_<i>`` subtree, :meth:`SanaTransformer2DModel.head`. The loader is
:mod:`svdquant_jax.models.sana_loader`.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models.layers import (ATTENTION_IMPLEMENTATIONS, RMSNorm, TimestepMLP, as_float_dtype, attention,
                                        gelu_tanh, layer_norm, timestep_embedding)
from svdquant_jax.models.pixart import sincos_pos_embed_2d
from svdquant_jax.utils import trees

Array = jax.Array
Dtype = Any

TIMESTEP_PROJ_DIM = 256     # width of the sinusoidal timestep projection
FINAL_NORM_EPS = 1e-6       # diffusers' norm_out eps (fixed)
CAPTION_NORM_EPS = 1e-5     # diffusers' caption_norm eps (fixed)
LINEAR_ATTENTION_EPS = 1e-15
FP16_MAX = 65504.0


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SanaConfig:
  """Hyper-parameters of a SANA transformer (the fields of diffusers' config that SANA 1.0 uses).

  Attributes:
    in_channels, out_channels: latent channels in and out (32 for the DC-AE latents).
    num_attention_heads, attention_head_dim: self-attention heads and width; ``D = heads * dim``.
    num_layers: transformer blocks.
    num_cross_attention_heads, cross_attention_head_dim: cross-attention heads and width.
    cross_attention_dim: width of the (projected) caption tokens; must equal ``D``.
    caption_channels: width of the text-encoder features (Gemma-2-2B: 2304).
    mlp_ratio: GLUMBConv expansion; hidden width ``int(mlp_ratio * D)`` (as diffusers).
    attention_bias: whether the self-attention q/k/v projections have biases.
    sample_size: training latent size (sets the position embedding's ``base_size``).
    patch_size: patch edge (conv kernel and stride).
    norm_eps: eps of the two LayerNorms in each block.
    interpolation_scale: position-embedding grid divisor; ``None``: no position embedding.
    timestep_scale: the pipeline multiplies the timesteps by this before the call.
    dtype: activation / compute dtype; param_dtype: parameter dtype.
    attention_impl: cross-attention implementation (:func:`svdquant_jax.models.layers.attention`).
  """
  in_channels: int = 32
  out_channels: int = 32
  num_attention_heads: int = 70
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  cross_attention_dim: int = 2240
  caption_channels: int = 2304
  mlp_ratio: float = 2.5
  attention_bias: bool = False
  sample_size: int = 32
  patch_size: int = 1
  norm_eps: float = 1e-6
  interpolation_scale: float | None = None
  timestep_scale: float = 1.0
  dtype: Dtype = jnp.bfloat16
  param_dtype: Dtype = jnp.bfloat16
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      object.__setattr__(self, name, as_float_dtype(getattr(self, name), f"SanaConfig.{name}"))
    for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
                 "num_cross_attention_heads", "cross_attention_head_dim", "cross_attention_dim",
                 "caption_channels", "sample_size", "patch_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"SanaConfig.{name} must be a positive integer, got {value!r}")
    for name in ("mlp_ratio", "norm_eps", "timestep_scale"):
      if not getattr(self, name) > 0:
        raise ValueError(f"SanaConfig.{name} must be positive, got {getattr(self, name)!r}")
    if self.ffn_hidden_dim <= 0:
      raise ValueError(f"SanaConfig.mlp_ratio={self.mlp_ratio} gives no GLUMBConv hidden channels")
    if self.interpolation_scale is not None:
      object.__setattr__(self, "interpolation_scale", float(self.interpolation_scale))
      if not self.interpolation_scale > 0:
        raise ValueError(f"SanaConfig.interpolation_scale must be positive or None, got {self.interpolation_scale!r}")
      if self.inner_dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4; "
                         f"num_attention_heads * attention_head_dim = {self.inner_dim}")
    if self.cross_attention_dim != self.inner_dim:
      raise ValueError(f"SanaConfig.cross_attention_dim ({self.cross_attention_dim}) must equal "
                       f"num_attention_heads * attention_head_dim ({self.inner_dim}): the caption projection "
                       "maps the captions to the model width")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"SanaConfig.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention_impl!r}")

  @property
  def inner_dim(self) -> int:
    """Model width ``D = num_attention_heads * attention_head_dim``."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def cross_inner_dim(self) -> int:
    """Cross-attention width ``num_cross_attention_heads * cross_attention_head_dim``."""
    return self.num_cross_attention_heads * self.cross_attention_head_dim

  @property
  def ffn_hidden_dim(self) -> int:
    """GLUMBConv hidden width ``H = int(mlp_ratio * D)`` (its up-projection has ``2H`` outputs)."""
    return int(self.mlp_ratio * self.inner_dim)

  @property
  def base_size(self) -> int:
    return self.sample_size // self.patch_size

  def replace(self, **changes: Any) -> "SanaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "SanaConfig":
    """Builds a config from a diffusers ``SanaTransformer2DModel`` ``config.json`` dict.

    ``out_channels`` null means ``in_channels`` (as diffusers); ``dropout`` has no effect at
    inference and ``guidance_embeds_scale`` none without a guidance embedding.

    Raises:
      ValueError: naming the key, for settings not implemented (a guidance embedding (SANA
        Sprint), q/k norms (SANA 1.5), affine block norms), unknown keys and unknown overrides.
    """
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    required = {"guidance_embeds": (False,), "qk_norm": (None,), "norm_elementwise_affine": (False,)}
    for key, allowed in required.items():
      if key in cfg and cfg[key] not in allowed:
        raise ValueError(f"SANA config key {key!r} = {cfg[key]!r} is not supported (expected "
                         f"{' or '.join(repr(a) for a in allowed)})")
    if cfg.get("cross_attention_dim", 2240) is None:
      raise ValueError("SANA config key 'cross_attention_dim' is null: models without cross-attention are not "
                       "supported")
    own = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype", "attention_impl"}
    accepted = own | set(required) | {"dropout", "guidance_embeds_scale"}
    unknown = sorted(set(cfg) - accepted)
    if unknown:
      raise ValueError(f"SANA config has unsupported key(s) {unknown}")
    fields = {k: cfg[k] for k in own if k in cfg}
    if fields.get("out_channels", 32) is None:
      fields["out_channels"] = cfg.get("in_channels", 32)
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
      raise ValueError(f"unknown SanaConfig override(s) {bad}; fields are {sorted(names)}")
    fields.update(overrides)
    return cls(**fields)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers ``SanaTransformer2DModel`` constructor arguments of this config."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("dtype", "param_dtype", "attention_impl")}
    out.update(dropout=0.0, norm_elementwise_affine=False, guidance_embeds=False, qk_norm=None)
    return out


SANA_PRESETS: dict[str, SanaConfig] = {
    # Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers transformer/config.json.
    "sana-1.6b": SanaConfig(),
    # The same architecture at a small width: D = 4 x 32 (the real head width), cross-attention
    # 2 x 64, GLUMBConv hidden 320; every quantized linear's input width is a multiple of 64.
    "sana-tiny": SanaConfig(num_attention_heads=4, attention_head_dim=32, num_layers=2, num_cross_attention_heads=2,
                            cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=64,
                            sample_size=8),
}


# ----------------------------------------------------------------------------- attention
def linear_attention(q: Array, k: Array, v: Array, out_dtype: Any) -> Array:
  """SANA's ReLU linear attention over ``[B, N, H, d]`` (q, k, v); returns ``[B, N, H, d]``.

  ``q, k`` go through ReLU, then everything is float32 (as diffusers):
  ``out_n = (V K^T) q_n / ((sum_m k_m) . q_n + 1e-15)``.
  """
  hi = jax.lax.Precision.HIGHEST
  q, k = jax.nn.relu(q).astype(jnp.float32), jax.nn.relu(k).astype(jnp.float32)
  v = v.astype(jnp.float32)
  vk = jnp.einsum("bnhd,bnhe->bhde", v, k, precision=hi)
  num = jnp.einsum("bhde,bnhe->bnhd", vk, q, precision=hi)
  den = jnp.einsum("bhe,bnhe->bnh", jnp.sum(k, axis=1), q, precision=hi)
  return (num / (den[..., None] + LINEAR_ATTENTION_EPS)).astype(out_dtype)


def _dense(features: int, config: SanaConfig, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def _check_shape(name: str, x: Array, shape: tuple[int | None, ...]) -> None:
  """Raises ``ValueError`` unless ``x.shape`` matches ``shape`` (``None`` = any size)."""
  ok = len(x.shape) == len(shape) and all(w is None or g == w for g, w in zip(x.shape, shape))
  if not ok:
    want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")


class LinearSelfAttention(nn.Module):
  """Fused ``to_qkv`` -> linear attention -> ``to_out``: ``[B, h, w, D]`` -> ``[B, h, w, D]``."""
  config: SanaConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    b, h, w, d = x.shape
    qkv = _dense(3 * d, c, "to_qkv", use_bias=c.attention_bias)(x)
    q, k, v = (t.reshape(b, h * w, c.num_attention_heads, c.attention_head_dim) for t in jnp.split(qkv, 3, axis=-1))
    out = linear_attention(q, k, v, c.dtype).reshape(b, h, w, d)
    out = _dense(d, c, "to_out")(out)
    if out.dtype == jnp.float16:  # as diffusers
      out = jnp.clip(out, -FP16_MAX, FP16_MAX)
    return out


class CrossAttention(nn.Module):
  """Softmax attention from image tokens ``[B, h, w, D]`` to caption tokens ``[B, T, D]``.

  ``mask``: boolean ``[B, T]`` key padding mask (``True`` = attend) or ``None``.
  """
  config: SanaConfig

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
    c = self.config
    b, h, w, d = x.shape
    t = context.shape[1]
    heads, hd = c.num_cross_attention_heads, c.cross_attention_head_dim
    q = _dense(c.cross_inner_dim, c, "to_q")(x).reshape(b, h * w, heads, hd)
    kv = _dense(2 * c.cross_inner_dim, c, "to_kv")(context)
    k, v = (y.reshape(b, t, heads, hd) for y in jnp.split(kv, 2, axis=-1))
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = attention(q, k, v, mask=attn_mask, implementation=c.attention_impl).reshape(b, h, w, c.cross_inner_dim)
    return _dense(d, c, "to_out")(out)


class GLUMBConv(nn.Module):
  """Mix-FFN: ``conv_point(h * SiLU(g))`` with ``[h, g] = conv_depth(SiLU(conv_inverted(x)))``.

  ``[B, H, W, C] -> [B, H, W, out_channels]`` (NHWC). The 1x1 convolutions are ``nn.Dense``
  (``conv_inverted``: ``C -> 2 hidden`` with bias; ``conv_point``: ``hidden -> out``, no bias);
  ``conv_depth`` is a 3x3 depthwise ``nn.Conv`` (padding 1, bias). With ``norm`` an RMS norm
  (eps 1e-5, weight and bias) follows ``conv_point`` (the DC-AE's GLUMBConv), with ``residual``
  the input is added (``out_channels`` must then equal ``C``).
  """
  hidden_channels: int
  out_channels: int
  norm: bool = False
  residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    hid = self.hidden_channels
    dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype,  # noqa: E731
                                           param_dtype=self.param_dtype, name=name)
    y = nn.silu(dense(2 * hid, "conv_inverted", True)(x))
    y = nn.Conv(2 * hid, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=2 * hid, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv_depth")(y)
    value, gate = jnp.split(y, 2, axis=-1)
    y = dense(self.out_channels, "conv_point", False)(value * nn.silu(gate))
    if self.norm:
      y = BiasRMSNorm(eps=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(y)
    return y + x if self.residual else y


class BiasRMSNorm(nn.Module):
  """diffusers ``RMSNorm(elementwise_affine=True, bias=True)`` over the last axis.

  ``x * rsqrt(mean(x^2) + eps)`` in float32, then (cast to the weight dtype when that is half
  precision, as diffusers) ``* scale + bias``; output in ``dtype``.
  """
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (n,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (n,), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if scale.dtype in (jnp.float16, jnp.bfloat16):
      y = y.astype(scale.dtype)
    return (y * scale + bias).astype(self.dtype)


class SanaBlock(nn.Module):
  """One SANA transformer block (diffusers ``SanaTransformerBlock``).

  Call with ``hidden_states [B, h, w, D]`` (image tokens on their patch grid),
  ``encoder_hidden_states [B, T, D]`` (projected, normed captions), ``timestep_emb [B, 6D]``
  (adaLN-single output) and ``encoder_attention_mask`` (boolean ``[B, T]``, ``True`` = attend,
  or ``None``); returns ``[B, h, w, D]`` in ``config.dtype``.
  Params: ``scale_shift_table [6, D]``, ``attn1/{to_qkv,to_out}``, ``attn2/{to_q,to_kv,to_out}``,
  ``ff/{conv_inverted,conv_depth,conv_point}``.
  """
  config: SanaConfig

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, timestep_emb: Array,
               encoder_attention_mask: Array | None = None) -> Array:
    c = self.config
    d = c.inner_dim
    _check_shape("hidden_states", hidden_states, (None, None, None, d))
    b = hidden_states.shape[0]
    _check_shape("encoder_hidden_states", encoder_hidden_states, (b, None, d))
    _check_shape("timestep_emb", timestep_emb, (b, 6 * d))
    if encoder_attention_mask is not None:
      _check_shape("encoder_attention_mask", encoder_attention_mask, (b, encoder_hidden_states.shape[1]))
      if encoder_attention_mask.dtype != jnp.bool_:
        raise ValueError(f"encoder_attention_mask must be boolean (True = attend), got {encoder_attention_mask.dtype}")
    table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(d)), (6, d), c.param_dtype)
    modulation = table.astype(c.dtype)[None] + timestep_emb.astype(c.dtype).reshape(b, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        m.reshape(b, 1, 1, d) for m in jnp.split(modulation, 6, axis=1))

    x = hidden_states.astype(c.dtype)
    normed = layer_norm(x, c.norm_eps) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * LinearSelfAttention(c, name="attn1")(normed)
    # SANA applies no norm before the cross-attention.
    x = CrossAttention(c, name="attn2")(x, encoder_hidden_states.astype(c.dtype), encoder_attention_mask) + x
    normed = layer_norm(x, c.norm_eps) * (1 + scale_mlp) + shift_mlp
    ff = GLUMBConv(c.ffn_hidden_dim, d, dtype=c.dtype, param_dtype=c.param_dtype, name="ff")(normed)
    return x + gate_mlp * ff


class SanaTransformer2DModel(nn.Module):
  """The SANA denoising transformer.

  ``__call__(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask=None)``
  (diffusers' forward arguments; its ``attention_mask`` is ignored by the linear self-attention
  and its ``guidance`` needs a guidance embedding, which SANA 1.0 has not):

  * ``hidden_states``: latents ``[B, H, W, in_channels]`` (**NHWC**), ``H``, ``W`` multiples of
    ``patch_size``.
  * ``encoder_hidden_states``: caption features ``[B, T, caption_channels]``.
  * ``timestep``: ``[B]`` (or a scalar), any real values (the training timestep, 0..1000).
  * ``encoder_attention_mask``: ``[B, T]``, nonzero / ``True`` = keep (a caption with no kept
    token attends to all its tokens, as diffusers' additive mask does).

  Returns ``[B, H, W, out_channels]`` in ``config.dtype`` (NHWC); exactly ``head(blocks(embed(...)))``.
  """
  config: SanaConfig

  def setup(self):
    c = self.config
    self.patch_embed = nn.Conv(c.inner_dim, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                               padding="VALID", dtype=c.dtype, param_dtype=c.param_dtype)
    self.time_embed = AdaLayerNormSingle(c)
    self.caption_projection = CaptionProjection(c)
    self.caption_norm = RMSNorm(CAPTION_NORM_EPS, dtype=c.dtype, param_dtype=c.param_dtype)
    self.transformer_blocks = [SanaBlock(c) for _ in range(c.num_layers)]  # transformer_blocks_<i>
    self.scale_shift_table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(c.inner_dim)),
                                        (2, c.inner_dim), c.param_dtype)
    self.proj_out = _dense(c.patch_size * c.patch_size * c.out_channels, c, "proj_out")

  def embed(self, hidden_states: Array, encoder_hidden_states: Array, timestep: Array,
            encoder_attention_mask: Array | None = None) -> dict[str, Any]:
    """The model inputs (as :meth:`__call__`) -> the first block's inputs and what ``head`` needs.

    Returns:
      ``{"hidden_states": [B, h, w, D], "encoder_hidden_states": [B, T, D], "timestep_emb": [B, 6D],
      "embedded_timestep": [B, D], "encoder_attention_mask": bool [B, T] or None}`` in
      ``config.dtype``; ``h, w`` is the patch grid.
    """
    c = self.config
    _check_shape("hidden_states", hidden_states, (None, None, None, c.in_channels))
    b, h, w, _ = hidden_states.shape
    if h % c.patch_size or w % c.patch_size:
      raise ValueError(f"hidden_states spatial size {h}x{w} is not a multiple of patch_size {c.patch_size}")
    _check_shape("encoder_hidden_states", encoder_hidden_states, (b, None, c.caption_channels))
    t = encoder_hidden_states.shape[1]
    timestep = jnp.asarray(timestep)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, (b,))
    _check_shape("timestep", timestep, (b,))
    mask = None
    if encoder_attention_mask is not None:
      encoder_attention_mask = jnp.asarray(encoder_attention_mask)
      _check_shape("encoder_attention_mask", encoder_attention_mask, (b, t))
      mask = encoder_attention_mask != 0
      # diffusers adds the mask as a -10000 bias: on a caption with no kept token that is a
      # constant shift of the logits, i.e. no mask at all.
      mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)

    tokens = self.patch_embed(hidden_states.astype(c.dtype))
    if c.interpolation_scale is not None:
      gh, gw, d = tokens.shape[1:]
      pos = sincos_pos_embed_2d(d, gh, gw, c.base_size, c.interpolation_scale).reshape(gh, gw, d)
      tokens = (tokens.astype(jnp.float32) + pos[None]).astype(c.dtype)
    timestep_emb, embedded_timestep = self.time_embed(timestep)
    captions = self.caption_norm(self.caption_projection(encoder_hidden_states))
    return {"hidden_states": tokens, "encoder_hidden_states": captions, "timestep_emb": timestep_emb,
            "embedded_timestep": embedded_timestep, "encoder_attention_mask": mask}

  def head(self, hidden_states: Array, embedded_timestep: Array) -> Array:
    """Final modulated norm, projection and unpatchify: ``[B, h, w, D]`` -> ``[B, h p, w p, out]`` (NHWC)."""
    c = self.config
    _check_shape("hidden_states", hidden_states, (None, None, None, c.inner_dim))
    b, h, w, d = hidden_states.shape
    modulation = self.scale_shift_table.astype(c.dtype)[None] + embedded_timestep.astype(c.dtype)[:, None]
    shift, scale = (m.reshape(b, 1, 1, d) for m in jnp.split(modulation, 2, axis=1))
    x = layer_norm(hidden_states.astype(c.dtype), FINAL_NORM_EPS) * (1 + scale) + shift
    x = self.proj_out(x)
    p = c.patch_size
    x = x.reshape(b, h, w, p, p, c.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c.out_channels)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, timestep: Array,
               encoder_attention_mask: Array | None = None) -> Array:
    e = self.embed(hidden_states, encoder_hidden_states, timestep, encoder_attention_mask)
    x = e["hidden_states"]
    for block in self.transformer_blocks:
      x = block(x, e["encoder_hidden_states"], e["timestep_emb"], e["encoder_attention_mask"])
    return self.head(x, e["embedded_timestep"])


class AdaLayerNormSingle(nn.Module):
  """adaLN-single (``time_embed``): ``t [B] -> (Dense(6D)(silu(e)) [B, 6D], e [B, D])``."""
  config: SanaConfig

  @nn.compact
  def __call__(self, timestep: Array) -> tuple[Array, Array]:
    c = self.config
    proj = timestep_embedding(timestep, TIMESTEP_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    embedded = TimestepMLP(c.inner_dim, dtype=c.dtype, param_dtype=c.param_dtype,
                           name="timestep_embedder")(proj.astype(c.dtype))
    return _dense(6 * c.inner_dim, c, "linear")(nn.silu(embedded)), embedded


class CaptionProjection(nn.Module):
  """``Dense -> GELU(tanh) -> Dense``: ``[B, T, caption_channels]`` -> ``[B, T, D]``."""
  config: SanaConfig

  @nn.compact
  def __call__(self, captions: Array) -> Array:
    c = self.config
    x = _dense(c.inner_dim, c, "linear_1")(captions.astype(c.dtype))
    return _dense(c.inner_dim, c, "linear_2")(gelu_tanh(x))


# ----------------------------------------------------------------------------- params
def abstract_sana_params(config: SanaConfig) -> dict[str, Any]:
  """The params tree (without the ``params`` collection) as ``jax.ShapeDtypeStruct`` leaves."""
  p = config.patch_size
  args = (jax.ShapeDtypeStruct((1, p, p, config.in_channels), config.dtype),
          jax.ShapeDtypeStruct((1, 1, config.caption_channels), config.dtype),
          jax.ShapeDtypeStruct((1,), jnp.float32))
  model = SanaTransformer2DModel(config)
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)["params"]


def _leaf_std(path: str, shape: tuple[int, ...]) -> float:
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":      # Dense [K, N] / Conv [kh, kw, I, O]: unit-variance outputs for unit inputs
    return 1.0 / math.sqrt(int(np.prod(shape[:-1])))
  if name == "bias":
    return 0.02
  if name == "scale_shift_table":
    return 1.0 / math.sqrt(shape[-1])
  if name == "scale":       # the caption RMS norm weight: 1 + N(0, 0.1^2)
    return 0.1
  raise ValueError(f"init_sana_params: no initializer for param {path!r}")


def init_sana_params(config: SanaConfig, seed: int) -> dict[str, Any]:
  """Deterministic random params (bit-identical for the same ``seed`` and config).

  Each leaf is drawn on its own from ``N(0, std^2)`` (norm weights: ``1 + N(0, 0.1^2)``) by a
  numpy ``Generator`` keyed by ``(seed, crc32(path))``: kernels ``1/sqrt(fan_in)``, biases 0.02,
  scale-shift tables ``1/sqrt(D)``.
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"init_sana_params: seed must be a non-negative integer, got {seed!r}")
  flat = {}
  for path, leaf in trees.flatten(abstract_sana_params(config)).items():
    rng = np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(path.encode("utf-8"))]))
    value = rng.standard_normal(leaf.shape, dtype=np.float32) * np.float32(_leaf_std(path, tuple(leaf.shape)))
    if path.endswith("/scale"):
      value = value + np.float32(1.0)
    flat[path] = jnp.asarray(value.astype(leaf.dtype))
  return trees.unflatten(flat)
