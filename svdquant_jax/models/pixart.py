"""PixArt-Sigma diffusion transformer in Flax (diffusers ``PixArtTransformer2DModel``).

Layout and numerics follow diffusers' ``PixArtTransformer2DModel`` (``norm_type="ada_norm_single"``):

* patch embedding: a ``patch x patch`` convolution with stride ``patch`` plus a fixed 2-D sin-cos
  position embedding whose grid is ``arange(n) / (n / base_size) / interpolation_scale`` with
  ``base_size = sample_size // patch``; it is computed for the actual patch grid of the input, so
  inputs of another resolution or aspect ratio get the same embedding diffusers recomputes;
* adaLN-single: a sinusoidal timestep embedding (256 channels, ``[cos, sin]``) through an MLP,
  optionally plus resolution / aspect-ratio embeddings, then ``Dense(6D)`` of its SiLU;
* the caption projection ``Dense -> GELU(tanh) -> Dense`` from ``caption_channels`` to ``D``;
* ``num_layers`` blocks: modulated LayerNorm -> self-attention -> gate; cross-attention to the
  caption tokens (no norm, key padding mask); modulated LayerNorm -> GELU(tanh) FFN -> gate;
* the head: LayerNorm, the final shift/scale modulation, ``Dense`` and unpatchify.

Public images are **NHWC**: ``hidden_states [B, H, W, C_in]`` -> ``[B, H, W, C_out]`` (diffusers
uses NCHW). Every linear layer is an ``nn.Dense``; self-attention q/k/v are fused into
``attn1/to_qkv`` and cross-attention k/v into ``attn2/to_kv`` (the loader concatenates them).

For calibration the model is also usable block by block: :meth:`PixArtTransformer2DModel.embed`
(inputs -> the first block's inputs), :class:`PixArtBlock` (one block, applied to its own params
subtree ``params["transformer_blocks_<i>"]``) and :meth:`PixArtTransformer2DModel.head`.

The checkpoint loader lives in :mod:`svdquant_jax.models.pixart_loader`.
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

from svdquant_jax.models.layers import (ATTENTION_IMPLEMENTATIONS, TimestepMLP, as_float_dtype, attention, gelu_tanh,
                                        layer_norm, timestep_embedding)
from svdquant_jax.utils import trees

Array = jax.Array
Dtype = Any

TIMESTEP_PROJ_DIM = 256   # width of the sinusoidal timestep / size projections
FINAL_NORM_EPS = 1e-6     # diffusers' norm_out eps (fixed, independent of norm_eps)
FFN_MULT = 4


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class PixArtConfig:
  """Hyper-parameters of a PixArt transformer (the fields of diffusers' config that PixArt uses).

  Attributes:
    num_attention_heads, attention_head_dim: heads and per-head width; ``D = heads * head_dim``.
    in_channels, out_channels: latent channels in and out (PixArt-Sigma predicts noise and
      variance: ``out = 2 * in``).
    num_layers: number of transformer blocks.
    cross_attention_dim: width of the (projected) caption tokens; must equal ``D``.
    sample_size: training latent size; sets ``base_size = sample_size // patch_size`` of the
      position embedding.
    patch_size: patch edge (conv kernel and stride).
    caption_channels: width of the text-encoder features (T5-XXL: 4096).
    interpolation_scale: position-embedding interpolation scale (grid divisor).
    use_additional_conditions: add resolution / aspect-ratio embeddings to the timestep embedding
      (PixArt-alpha 1024; PixArt-Sigma does not); requires ``D % 3 == 0``.
    norm_eps: eps of the two LayerNorms in each block.
    attention_bias: whether q/k/v projections have biases (output projections always do).
    dtype: activation / compute dtype; param_dtype: parameter dtype.
    attention_impl: passed to :func:`svdquant_jax.models.layers.attention` (``None`` = automatic).
  """
  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: int = 8
  num_layers: int = 28
  cross_attention_dim: int = 1152
  sample_size: int = 128
  patch_size: int = 2
  caption_channels: int = 4096
  interpolation_scale: float = 2.0
  use_additional_conditions: bool = False
  norm_eps: float = 1e-6
  attention_bias: bool = True
  dtype: Dtype = jnp.float16
  param_dtype: Dtype = jnp.float16
  attention_impl: str | None = None

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):   # canonical numpy dtypes: equal configs compare equal
      object.__setattr__(self, name, as_float_dtype(getattr(self, name), f"PixArtConfig.{name}"))
    for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                 "cross_attention_dim", "sample_size", "patch_size", "caption_channels"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"PixArtConfig.{name} must be a positive integer, got {value!r}")
    if not self.interpolation_scale > 0:
      raise ValueError(f"PixArtConfig.interpolation_scale must be positive, got {self.interpolation_scale!r}")
    if not self.norm_eps > 0:
      raise ValueError(f"PixArtConfig.norm_eps must be positive, got {self.norm_eps!r}")
    if self.sample_size % self.patch_size:
      raise ValueError(f"PixArtConfig.sample_size ({self.sample_size}) must be a multiple of "
                       f"patch_size ({self.patch_size})")
    if self.inner_dim % 4:
      raise ValueError(f"the 2-D sin-cos position embedding needs a width divisible by 4; "
                       f"num_attention_heads * attention_head_dim = {self.inner_dim}")
    if self.cross_attention_dim != self.inner_dim:
      raise ValueError(f"PixArtConfig.cross_attention_dim ({self.cross_attention_dim}) must equal "
                       f"num_attention_heads * attention_head_dim ({self.inner_dim}): the caption "
                       "projection maps the captions to the model width")
    if self.use_additional_conditions and self.inner_dim % 3:
      raise ValueError(f"use_additional_conditions needs a width divisible by 3 (the resolution and "
                       f"aspect-ratio embeddings are D/3 wide each); got D = {self.inner_dim}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"PixArtConfig.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention_impl!r}")

  @property
  def inner_dim(self) -> int:
    """Model width ``D = num_attention_heads * attention_head_dim``."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def ffn_dim(self) -> int:
    """FFN hidden width ``4 D``."""
    return FFN_MULT * self.inner_dim

  @property
  def base_size(self) -> int:
    """Patch-grid edge at training resolution (position-embedding ``base_size``)."""
    return self.sample_size // self.patch_size

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "PixArtConfig":
    """Builds a config from a diffusers ``PixArtTransformer2DModel`` ``config.json`` dict.

    diffusers' ``None`` defaults are resolved as diffusers does: ``out_channels`` -> ``in_channels``,
    ``interpolation_scale`` -> ``max(sample_size // 64, 1)``, ``use_additional_conditions`` ->
    ``sample_size == 128``. ``dropout``, ``norm_num_groups`` and ``upcast_attention`` do not affect
    inference here (no dropout at inference, no group norm, attention logits and softmax are
    float32 anyway) and are accepted with any value.

    Args:
      config: the parsed ``config.json``.
      **overrides: field values that replace the converted ones (e.g. ``dtype``, ``param_dtype``,
        ``attention_impl``).

    Raises:
      ValueError: naming the key, for settings this implementation does not support (a
        ``norm_type`` other than ``ada_norm_single``, another activation or attention type,
        affine block norms, no caption projection, ...), unknown keys and unknown overrides.
    """
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    required = {
        "norm_type": ("ada_norm_single",),
        "activation_fn": ("gelu-approximate",),
        "attention_type": ("default",),
        "norm_elementwise_affine": (False,),
        # Legacy Transformer2DModel keys still found in PixArt configs.
        "double_self_attention": (False,),
        "only_cross_attention": (False,),
        "num_vector_embeds": (None,),
        "use_linear_projection": (False,),
    }
    for key, allowed in required.items():
      if key in cfg and cfg[key] not in allowed:
        raise ValueError(f"PixArt config key {key!r} = {cfg[key]!r} is not supported (expected "
                         f"{' or '.join(repr(a) for a in allowed)})")
    if "num_embeds_ada_norm" in cfg and cfg["num_embeds_ada_norm"] is None:
      raise ValueError("PixArt config key 'num_embeds_ada_norm' must not be null with "
                       "norm_type 'ada_norm_single'")
    if cfg.get("caption_channels", None) is None:
      raise ValueError("PixArt config key 'caption_channels' is null: models without a caption "
                       "projection are not supported")
    if cfg.get("cross_attention_dim", 1152) is None:
      raise ValueError("PixArt config key 'cross_attention_dim' is null: models without "
                       "cross-attention are not supported")
    accepted = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                "cross_attention_dim", "sample_size", "patch_size", "caption_channels",
                "interpolation_scale", "use_additional_conditions", "norm_eps", "attention_bias",
                "upcast_attention", "dropout", "norm_num_groups", "num_embeds_ada_norm"} | set(required)
    unknown = sorted(set(cfg) - accepted)
    if unknown:
      raise ValueError(f"PixArt config has unsupported key(s) {unknown}")

    sample_size = int(cfg.get("sample_size", 128))
    in_channels = int(cfg.get("in_channels", 4))
    out_channels = cfg.get("out_channels", 8)
    interpolation_scale = cfg.get("interpolation_scale", None)
    use_additional = cfg.get("use_additional_conditions", None)
    fields = dict(
        num_attention_heads=int(cfg.get("num_attention_heads", 16)),
        attention_head_dim=int(cfg.get("attention_head_dim", 72)),
        in_channels=in_channels,
        out_channels=in_channels if out_channels is None else int(out_channels),
        num_layers=int(cfg.get("num_layers", 28)),
        cross_attention_dim=int(cfg.get("cross_attention_dim", 1152)),
        sample_size=sample_size,
        patch_size=int(cfg.get("patch_size", 2)),
        caption_channels=int(cfg["caption_channels"]),
        interpolation_scale=float(max(sample_size // 64, 1) if interpolation_scale is None
                                  else interpolation_scale),
        use_additional_conditions=bool(sample_size == 128 if use_additional is None else use_additional),
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        attention_bias=bool(cfg.get("attention_bias", True)),
    )
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
      raise ValueError(f"unknown PixArtConfig override(s) {bad}; fields are {sorted(names)}")
    fields.update(overrides)
    return cls(**fields)


PIXART_PRESETS: dict[str, PixArtConfig] = {
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json.
    "pixart-sigma": PixArtConfig(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=128, patch_size=2, caption_channels=4096,
        interpolation_scale=2.0, use_additional_conditions=False, norm_eps=1e-6),
    # The same architecture at a small width; every linear input width is a multiple of 64.
    "pixart-tiny": PixArtConfig(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=128, sample_size=32, patch_size=2, caption_channels=64,
        interpolation_scale=2.0, use_additional_conditions=False, norm_eps=1e-6),
}


# ----------------------------------------------------------------------------- position embedding
def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """``[sin(p * w), cos(p * w)]`` with ``w_i = 10000^(-i / (dim/2))``; float64 ``[M, dim]``."""
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000.0 ** omega
  angles = positions.astype(np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int,
                        interpolation_scale: float) -> np.ndarray:
  """PixArt's 2-D sin-cos position embedding for a ``height x width`` patch grid.

  Grid coordinates are ``arange(n) / (n / base_size) / interpolation_scale`` (float32, as
  diffusers) for ``n`` = height and width, so any grid spans the same coordinate range as the
  training grid. Channels ``[:dim/2]`` embed the column (x) coordinate, ``[dim/2:]`` the row (y).

  Returns:
    float32 ``[height * width, dim]``, row-major over (row, column).
  """
  ys = (np.arange(height, dtype=np.float32) / np.float32(height / base_size)
        / np.float32(interpolation_scale))
  xs = (np.arange(width, dtype=np.float32) / np.float32(width / base_size)
        / np.float32(interpolation_scale))
  grid_x = np.broadcast_to(xs[None, :], (height, width)).reshape(-1)
  grid_y = np.broadcast_to(ys[:, None], (height, width)).reshape(-1)
  emb = np.concatenate([_sincos_1d(dim // 2, grid_x), _sincos_1d(dim // 2, grid_y)], axis=1)
  return emb.astype(np.float32)


# ----------------------------------------------------------------------------- modules
def _dense(features: int, config: PixArtConfig, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


class PatchEmbed(nn.Module):
  """Patchify conv + sin-cos position embedding: ``[B, H, W, C_in]`` -> ``[B, (H/p)(W/p), D]``."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, latents: Array) -> Array:
    c = self.config
    p = c.patch_size
    x = nn.Conv(c.inner_dim, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=c.dtype,
                param_dtype=c.param_dtype, name="proj")(latents)
    b, h, w, d = x.shape
    pos = sincos_pos_embed_2d(d, h, w, c.base_size, c.interpolation_scale)
    # As diffusers: the (float32) position embedding is added in float32, then cast back.
    return (x.reshape(b, h * w, d).astype(jnp.float32) + pos[None]).astype(c.dtype)


class CombinedTimestepSizeEmbeddings(nn.Module):
  """Timestep (+ resolution and aspect-ratio) embedding ``[B] -> [B, D]`` (``adaln_single.emb``)."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, timestep: Array, resolution: Array | None, aspect_ratio: Array | None) -> Array:
    c = self.config
    d = c.inner_dim
    t_proj = timestep_embedding(timestep, TIMESTEP_PROJ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0.0)
    emb = TimestepMLP(d, dtype=c.dtype, param_dtype=c.param_dtype, name="timestep_embedder")(t_proj.astype(c.dtype))
    if not c.use_additional_conditions:
      return emb
    b = timestep.shape[0]
    size_dim = d // 3
    res_proj = timestep_embedding(resolution.reshape(-1), TIMESTEP_PROJ_DIM, flip_sin_to_cos=True,
                                  downscale_freq_shift=0.0).astype(c.dtype)
    res_emb = TimestepMLP(size_dim, dtype=c.dtype, param_dtype=c.param_dtype,
                          name="resolution_embedder")(res_proj).reshape(b, -1)
    ar_proj = timestep_embedding(aspect_ratio.reshape(-1), TIMESTEP_PROJ_DIM, flip_sin_to_cos=True,
                                 downscale_freq_shift=0.0).astype(c.dtype)
    ar_emb = TimestepMLP(size_dim, dtype=c.dtype, param_dtype=c.param_dtype,
                         name="aspect_ratio_embedder")(ar_proj).reshape(b, -1)
    return emb + jnp.concatenate([res_emb, ar_emb], axis=1)


class AdaLayerNormSingle(nn.Module):
  """adaLN-single: returns ``(Dense(6D)(silu(e)) [B, 6D], e [B, D])`` for the embedding ``e``."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, timestep: Array, resolution: Array | None = None,
               aspect_ratio: Array | None = None) -> tuple[Array, Array]:
    embedded = CombinedTimestepSizeEmbeddings(self.config, name="emb")(timestep, resolution, aspect_ratio)
    modulation = _dense(6 * self.config.inner_dim, self.config, "linear")(nn.silu(embedded))
    return modulation, embedded


class CaptionProjection(nn.Module):
  """``Dense -> GELU(tanh) -> Dense``: ``[B, T, caption_channels]`` -> ``[B, T, D]``."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, captions: Array) -> Array:
    c = self.config
    x = _dense(c.inner_dim, c, "linear_1")(captions)
    return _dense(c.inner_dim, c, "linear_2")(gelu_tanh(x))


class SelfAttention(nn.Module):
  """Multi-head self-attention with fused ``to_qkv``: ``[B, S, D]`` -> ``[B, S, D]``."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    b, s, _ = x.shape
    qkv = _dense(3 * c.inner_dim, c, "to_qkv", use_bias=c.attention_bias)(x)
    q, k, v = (t.reshape(b, s, c.num_attention_heads, c.attention_head_dim) for t in jnp.split(qkv, 3, axis=-1))
    out = attention(q, k, v, implementation=c.attention_impl).reshape(b, s, c.inner_dim)
    return _dense(c.inner_dim, c, "to_out")(out)


class CrossAttention(nn.Module):
  """Attention from image tokens ``[B, S, D]`` to caption tokens ``[B, T, D]`` with fused ``to_kv``.

  ``mask`` is a boolean ``[B, T]`` key padding mask (``True`` = attend) or ``None``.
  """
  config: PixArtConfig

  @nn.compact
  def __call__(self, x: Array, context: Array, mask: Array | None) -> Array:
    c = self.config
    b, s, _ = x.shape
    t = context.shape[1]
    h, hd = c.num_attention_heads, c.attention_head_dim
    q = _dense(c.inner_dim, c, "to_q", use_bias=c.attention_bias)(x).reshape(b, s, h, hd)
    kv = _dense(2 * c.inner_dim, c, "to_kv", use_bias=c.attention_bias)(context)
    k, v = (y.reshape(b, t, h, hd) for y in jnp.split(kv, 2, axis=-1))
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = attention(q, k, v, mask=attn_mask, implementation=c.attention_impl).reshape(b, s, c.inner_dim)
    return _dense(c.inner_dim, c, "to_out")(out)


class FeedForward(nn.Module):
  """``fc1 (D -> 4D) -> GELU(tanh) -> fc2 (4D -> D)``."""
  config: PixArtConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    return _dense(c.inner_dim, c, "fc2")(gelu_tanh(_dense(c.ffn_dim, c, "fc1")(x)))


def _check_shape(name: str, x: Array, shape: tuple[int | None, ...]) -> None:
  """Raises ``ValueError`` unless ``x.shape`` matches ``shape`` (``None`` = any size)."""
  ok = len(x.shape) == len(shape) and all(w is None or g == w for g, w in zip(x.shape, shape))
  if not ok:
    want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {want}")


class PixArtBlock(nn.Module):
  """One PixArt transformer block (diffusers ``BasicTransformerBlock``, ``ada_norm_single``).

  Call with ``hidden_states [B, S, D]``, ``encoder_hidden_states [B, T, D]`` (projected captions),
  ``timestep_emb [B, 6D]`` (adaLN-single output) and ``encoder_attention_mask`` (boolean
  ``[B, T]``, ``True`` = attend, or ``None``); returns ``[B, S, D]`` in ``config.dtype``.
  Params: ``scale_shift_table [6, D]``, ``attn1/{to_qkv,to_out}``, ``attn2/{to_q,to_kv,to_out}``,
  ``ff/{fc1,fc2}``.
  """
  config: PixArtConfig

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, timestep_emb: Array,
               encoder_attention_mask: Array | None = None) -> Array:
    c = self.config
    d = c.inner_dim
    _check_shape("hidden_states", hidden_states, (None, None, d))
    b = hidden_states.shape[0]
    _check_shape("encoder_hidden_states", encoder_hidden_states, (b, None, d))
    _check_shape("timestep_emb", timestep_emb, (b, 6 * d))
    if encoder_attention_mask is not None:
      _check_shape("encoder_attention_mask", encoder_attention_mask, (b, encoder_hidden_states.shape[1]))
      if encoder_attention_mask.dtype != jnp.bool_:
        raise ValueError(f"encoder_attention_mask must be boolean (True = attend), got {encoder_attention_mask.dtype}")
    table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(d)), (6, d), c.param_dtype)
    modulation = table.astype(c.dtype)[None] + timestep_emb.astype(c.dtype).reshape(b, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=1)

    x = hidden_states.astype(c.dtype)
    normed = layer_norm(x, c.norm_eps) * (1 + scale_msa) + shift_msa
    x = gate_msa * SelfAttention(c, name="attn1")(normed) + x
    # PixArt applies no norm before the cross-attention.
    x = CrossAttention(c, name="attn2")(x, encoder_hidden_states.astype(c.dtype), encoder_attention_mask) + x
    normed = layer_norm(x, c.norm_eps) * (1 + scale_mlp) + shift_mlp
    return gate_mlp * FeedForward(c, name="ff")(normed) + x


class PixArtTransformer2DModel(nn.Module):
  """The PixArt(-Sigma) denoising transformer.

  ``__call__(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs=None,
  encoder_attention_mask=None)``:

  * ``hidden_states``: latents ``[B, H, W, in_channels]`` (**NHWC**), ``H`` and ``W`` multiples
    of ``patch_size``; any resolution (the position embedding follows the patch grid).
  * ``encoder_hidden_states``: caption features ``[B, T, caption_channels]``.
  * ``timestep``: ``[B]`` (or a scalar, broadcast to the batch), any real values.
  * ``added_cond_kwargs``: ``{"resolution": [B, 2] (height, width), "aspect_ratio": [B, 1]}``;
    required when ``config.use_additional_conditions``, ignored otherwise (as diffusers).
  * ``encoder_attention_mask``: ``[B, T]`` caption padding mask, nonzero / ``True`` = keep (a
    caption with no kept token attends to all its tokens, as diffusers' additive mask does).

  Returns ``[B, H, W, out_channels]`` in ``config.dtype`` (NHWC).

  ``__call__`` is exactly ``head(blocks(embed(...)))``; see :meth:`embed`, :class:`PixArtBlock`,
  :meth:`head`.
  """
  config: PixArtConfig

  def setup(self):
    c = self.config
    self.pos_embed = PatchEmbed(c)
    self.adaln_single = AdaLayerNormSingle(c)
    self.caption_projection = CaptionProjection(c)
    self.transformer_blocks = [PixArtBlock(c) for _ in range(c.num_layers)]  # transformer_blocks_<i>
    self.scale_shift_table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(c.inner_dim)),
                                        (2, c.inner_dim), c.param_dtype)
    self.proj_out = _dense(c.patch_size * c.patch_size * c.out_channels, c, "proj_out")

  def embed(self, hidden_states: Array, encoder_hidden_states: Array, timestep: Array,
            added_cond_kwargs: Mapping[str, Array] | None = None,
            encoder_attention_mask: Array | None = None) -> dict[str, Any]:
    """The model inputs (as :meth:`__call__`) -> the first block's inputs and what ``head`` needs.

    Returns:
      ``{"hidden_states": [B, S, D], "encoder_hidden_states": [B, T, D], "timestep_emb": [B, 6D],
      "embedded_timestep": [B, D], "encoder_attention_mask": bool [B, T] or None,
      "height": int, "width": int}`` with ``S = height * width`` patches; arrays in ``config.dtype``.
      ``height``/``width`` are the patch grid as Python ints (a jitted ``embed`` returns them as
      arrays; pass them to :meth:`head` as static ints).
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
    resolution = aspect_ratio = None
    if c.use_additional_conditions:
      if not added_cond_kwargs or added_cond_kwargs.get("resolution") is None \
          or added_cond_kwargs.get("aspect_ratio") is None:
        raise ValueError("added_cond_kwargs with 'resolution' [B, 2] and 'aspect_ratio' [B, 1] is required "
                         "when config.use_additional_conditions is true")
      resolution = jnp.asarray(added_cond_kwargs["resolution"])
      aspect_ratio = jnp.asarray(added_cond_kwargs["aspect_ratio"])
      if resolution.size != 2 * b:
        raise ValueError(f"added_cond_kwargs['resolution'] has shape {tuple(resolution.shape)}, expected [{b}, 2]")
      if aspect_ratio.size != b:
        raise ValueError(f"added_cond_kwargs['aspect_ratio'] has shape {tuple(aspect_ratio.shape)}, "
                         f"expected [{b}, 1]")
    mask = None
    if encoder_attention_mask is not None:
      encoder_attention_mask = jnp.asarray(encoder_attention_mask)
      _check_shape("encoder_attention_mask", encoder_attention_mask, (b, t))
      mask = encoder_attention_mask != 0
      # diffusers adds the mask as a -10000 bias; on a caption with no valid token that is a
      # constant shift, i.e. no mask at all. Reproduce that instead of a uniform average.
      mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)

    tokens = self.pos_embed(hidden_states)
    timestep_emb, embedded_timestep = self.adaln_single(timestep, resolution, aspect_ratio)
    captions = self.caption_projection(encoder_hidden_states)
    return {"hidden_states": tokens, "encoder_hidden_states": captions, "timestep_emb": timestep_emb,
            "embedded_timestep": embedded_timestep, "encoder_attention_mask": mask,
            "height": h // c.patch_size, "width": w // c.patch_size}

  def head(self, hidden_states: Array, embedded_timestep: Array, height: int, width: int) -> Array:
    """Final modulated norm, projection and unpatchify.

    Args:
      hidden_states: the last block's output ``[B, height * width, D]``.
      embedded_timestep: ``[B, D]`` from :meth:`embed`.
      height, width: the patch grid (static Python ints, from :meth:`embed`).

    Returns:
      ``[B, height * patch, width * patch, out_channels]`` (NHWC) in ``config.dtype``.
    """
    c = self.config
    try:
      height, width = int(height), int(width)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
      raise ValueError("head: height and width must be static Python ints (the patch grid from embed)") from e
    b, s, d = hidden_states.shape
    if s != height * width:
      raise ValueError(f"head: hidden_states has {s} tokens, expected height*width = {height}*{width}")
    modulation = self.scale_shift_table.astype(c.dtype)[None] + embedded_timestep.astype(c.dtype)[:, None]
    shift, scale = jnp.split(modulation, 2, axis=1)
    x = layer_norm(hidden_states.astype(c.dtype), FINAL_NORM_EPS) * (1 + scale) + shift
    x = self.proj_out(x)
    p = c.patch_size
    x = x.reshape(b, height, width, p, p, c.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height * p, width * p, c.out_channels)

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, timestep: Array,
               added_cond_kwargs: Mapping[str, Array] | None = None,
               encoder_attention_mask: Array | None = None) -> Array:
    e = self.embed(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, encoder_attention_mask)
    x = e["hidden_states"]
    for block in self.transformer_blocks:
      x = block(x, e["encoder_hidden_states"], e["timestep_emb"], e["encoder_attention_mask"])
    return self.head(x, e["embedded_timestep"], e["height"], e["width"])


# ----------------------------------------------------------------------------- params
def _dummy_inputs(config: PixArtConfig) -> tuple[Any, ...]:
  """Smallest valid inputs (one patch, one caption token) for ``init`` / ``eval_shape``."""
  p = config.patch_size
  inputs = (jax.ShapeDtypeStruct((1, p, p, config.in_channels), config.dtype),
            jax.ShapeDtypeStruct((1, 1, config.caption_channels), config.dtype),
            jax.ShapeDtypeStruct((1,), jnp.float32))
  added = None
  if config.use_additional_conditions:
    added = {"resolution": jax.ShapeDtypeStruct((1, 2), jnp.float32),
             "aspect_ratio": jax.ShapeDtypeStruct((1, 1), jnp.float32)}
  return inputs + (added,)


def abstract_pixart_params(config: PixArtConfig) -> dict[str, Any]:
  """The params tree (without the ``params`` collection) as ``jax.ShapeDtypeStruct`` leaves."""
  model = PixArtTransformer2DModel(config)
  variables = jax.eval_shape(lambda *args: model.init(jax.random.key(0), *args), *_dummy_inputs(config))
  return variables["params"]


def _leaf_std(path: str, shape: tuple[int, ...]) -> float:
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":      # Dense [K, N] / Conv [kh, kw, I, O]: unit-variance outputs for unit inputs
    return 1.0 / math.sqrt(int(np.prod(shape[:-1])))
  if name == "bias":
    return 0.02
  if name == "scale_shift_table":   # as diffusers: randn / sqrt(D)
    return 1.0 / math.sqrt(shape[-1])
  raise ValueError(f"init_pixart_params: no initializer for param {path!r}")


def init_pixart_params(config: PixArtConfig, seed: int) -> dict[str, Any]:
  """Deterministic random params (bit-identical for the same ``seed`` and config).

  Each leaf of ``jax.eval_shape(init)`` is drawn on its own from ``N(0, std^2)`` in float32 (then
  cast to ``param_dtype``) by a numpy ``Generator`` keyed by ``(seed, crc32(path))``, so a leaf's
  values depend only on the seed and its path, there is no forward pass, and no per-shape
  compilation (the real 0.6B-parameter model initializes in seconds). ``std``: ``1/sqrt(fan_in)``
  for kernels, 0.02 for biases, ``1/sqrt(D)`` for the scale-shift tables.

  Returns:
    Nested dict of ``jax.Array`` (without the ``params`` collection).
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"init_pixart_params: seed must be a non-negative integer, got {seed!r}")
  flat = {}
  for path, leaf in trees.flatten(abstract_pixart_params(config)).items():
    rng = np.random.Generator(np.random.PCG64([int(seed), zlib.crc32(path.encode("utf-8"))]))
    std = np.float32(_leaf_std(path, tuple(leaf.shape)))
    flat[path] = jnp.asarray((rng.standard_normal(leaf.shape, dtype=np.float32) * std).astype(leaf.dtype))
  return trees.unflatten(flat)
