"""The deep-compression autoencoder (diffusers ``AutoencoderDC``, SANA's 32x / 32-channel DC-AE) in
Flax, NHWC, with its checkpoint loader.

Architecture (``block_out_channels = (c_0, ..., c_{n-1})``, spatial factor ``f = 2 ** (n - 1)``;
the encoder and the decoder have their own lists, block types and layer counts):

* encoder: ``conv_in`` (3x3; a shortcut-free :class:`DCDownBlock` when stage 0 has no layers) ->
  per stage ``i``: ``layers_per_block[i]`` blocks, then (not after the last stage) a
  :class:`DCDownBlock` to ``c_{i+1}`` -> ``conv_out`` to ``latent_channels`` plus, with
  ``encoder_out_shortcut``, the channel-group mean of its input;
* decoder: ``conv_in`` to ``c_{n-1}`` plus, with ``decoder_in_shortcut``, the latents with each
  channel repeated -> per stage from the last: a :class:`DCUpBlock` to ``c_i`` (not before the
  last stage), then the blocks -> RMS norm -> ``decoder_conv_act_fn`` -> ``conv_out`` (3x3; a
  shortcut-free :class:`DCUpBlock` when stage 0 has no layers).

Blocks: ``ResBlock`` (``x + norm(conv2(act(conv1(x))))``, conv2 without bias) and
``EfficientViTBlock`` (multi-scale ReLU linear attention with a residual, then a
:class:`~svdquant_jax.models.sana.GLUMBConv` with RMS norm and residual). The attention
(diffusers ``SanaMultiscaleLinearAttention``): fused ``to_qkv`` (no bias) over the channels, then
per kernel size ``s`` a depthwise ``s x s`` conv and a grouped 1x1 conv (``3 * heads`` groups) of
the ``[q | k | v]`` channels, all concatenated; consecutive groups of ``3 * head_dim`` channels
form one head's ``(q, k, v)``; heads attend linearly in float32 when ``H * W > head_dim`` (as in
the SANA transformer), else quadratically (``softmax``-free: ``relu`` scores normalized over the
keys); ``to_out`` (no bias) -> RMS norm -> residual.

Every RMS norm is over the channels (eps 1e-5, weight and bias) and computed in float32. Down and
up sampling with ``pixel_unshuffle`` / ``pixel_shuffle`` (channel ``4 c + 2 i + j`` <-> pixel
``(2h + i, 2w + j)`` of channel ``c``) or a stride-2 conv / nearest 2x interpolation, each with
the channel-averaging / channel-repeating shortcut. Activations are NHWC; diffusers' ``[O, I, kh,
kw]`` conv weights become ``[kh, kw, I / groups, O]`` kernels at load time, the 1x1 convs of the
GLUMBConv ``nn.Dense`` kernels.

Latents: ``encode`` returns the raw latent; the diffusion latent is ``latent * scaling_factor``
and ``decode`` takes ``latent / scaling_factor`` (SANA's pipeline), see :meth:`DCAEConfig.to_latent`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint
from svdquant_jax.models.checkpoint import Rule
from svdquant_jax.models.layers import as_float_dtype
from svdquant_jax.models.sana import LINEAR_ATTENTION_EPS, BiasRMSNorm, GLUMBConv
from svdquant_jax.models.sana_loader import check_conv1x1_shapes, glumbconv_rules
from svdquant_jax.utils import trees

Array = jax.Array
Dtype = Any

DC_AE_CLASS_NAMES = ("AutoencoderDC",)
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm",)
ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "relu": jax.nn.relu, "relu6": jax.nn.relu6}
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "Conv", "conv")   # anything but pixel_unshuffle: a stride-2 conv
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
RMS_EPS = 1e-5
GLUMBCONV_EXPAND = 4


# ----------------------------------------------------------------------------- config
def _per_block(value: Any, n: int, name: str) -> tuple:
  """A string (same for every stage) or a sequence of ``n`` -> a tuple of ``n``."""
  if isinstance(value, str):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"{name} has {len(value)} entries but block_out_channels has {n}")
  return value


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
  """diffusers ``AutoencoderDC`` config (same field names and defaults) plus dtypes.

  Per-stage fields accept one string for every stage (as diffusers). ``downsample_block_type``
  ``"pixel_unshuffle"`` is the shuffle down block, anything else diffusers accepts (``"Conv"``)
  a stride-2 conv; ``upsample_block_type`` ``"interpolate"`` is nearest 2x then conv, else
  ``"pixel_shuffle"``. Only RMS norms are implemented (``decoder_norm_types``).
  """
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: Any = "ResBlock"
  decoder_block_types: Any = "ResBlock"
  encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: Any = "rms_norm"
  decoder_act_fns: Any = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    set_("dtype", as_float_dtype(self.dtype, "DCAEConfig.dtype"))
    set_("param_dtype", as_float_dtype(self.param_dtype, "DCAEConfig.param_dtype"))
    for side in ("encoder", "decoder"):
      widths = tuple(int(c) for c in getattr(self, f"{side}_block_out_channels"))
      n = len(widths)
      if n < 2 or any(c <= 0 for c in widths):
        raise ValueError(f"{side}_block_out_channels={widths} must list at least 2 positive widths")
      set_(f"{side}_block_out_channels", widths)
      layers = tuple(int(v) for v in _per_block(getattr(self, f"{side}_layers_per_block"), n,
                                                f"{side}_layers_per_block"))
      if any(v < 0 for v in layers):
        raise ValueError(f"{side}_layers_per_block={layers} must be non-negative")
      set_(f"{side}_layers_per_block", layers)
      types = _per_block(getattr(self, f"{side}_block_types"), n, f"{side}_block_types")
      for i, t in enumerate(types):
        if t not in BLOCK_TYPES:
          raise ValueError(f"{side}_block_types[{i}]={t!r} is not supported; expected one of {BLOCK_TYPES}")
      set_(f"{side}_block_types", types)
      scales = tuple(tuple(int(k) for k in s) for s in _per_block(getattr(self, f"{side}_qkv_multiscales"), n,
                                                                    f"{side}_qkv_multiscales"))
      set_(f"{side}_qkv_multiscales", scales)
      for i, (t, width) in enumerate(zip(types, widths)):
        if t == "EfficientViTBlock" and width // self.attention_head_dim < 1:
          raise ValueError(f"{side} stage {i}: width {width} < attention_head_dim {self.attention_head_dim} "
                           "leaves no attention head")
    if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
      raise ValueError("encoder_block_out_channels and decoder_block_out_channels differ in length "
                       f"({len(self.encoder_block_out_channels)} vs {len(self.decoder_block_out_channels)})")
    n = len(self.decoder_block_out_channels)
    norms = _per_block(self.decoder_norm_types, n, "decoder_norm_types")
    for i, t in enumerate(norms):
      if t not in NORM_TYPES:
        raise ValueError(f"decoder_norm_types[{i}]={t!r} is not supported; expected one of {NORM_TYPES}")
    set_("decoder_norm_types", norms)
    acts = _per_block(self.decoder_act_fns, n, "decoder_act_fns")
    for i, a in enumerate(acts + (self.decoder_conv_act_fn,)):
      if a not in ACTIVATIONS:
        raise ValueError(f"decoder activation {a!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
    set_("decoder_act_fns", acts)
    if self.downsample_block_type not in DOWNSAMPLE_TYPES:
      raise ValueError(f"downsample_block_type={self.downsample_block_type!r}; expected one of {DOWNSAMPLE_TYPES}")
    if self.upsample_block_type not in UPSAMPLE_TYPES:
      raise ValueError(f"upsample_block_type={self.upsample_block_type!r}; expected one of {UPSAMPLE_TYPES}")
    for name in ("in_channels", "latent_channels", "attention_head_dim"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be a positive int")
    if self.encoder_out_shortcut and self.encoder_block_out_channels[-1] % self.latent_channels:
      raise ValueError(f"encoder_out_shortcut averages groups of channels: the last encoder width "
                       f"{self.encoder_block_out_channels[-1]} must be a multiple of latent_channels "
                       f"{self.latent_channels}")
    if self.decoder_in_shortcut and self.decoder_block_out_channels[-1] % self.latent_channels:
      raise ValueError(f"decoder_in_shortcut repeats channels: the last decoder width "
                       f"{self.decoder_block_out_channels[-1]} must be a multiple of latent_channels "
                       f"{self.latent_channels}")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "DCAEConfig":
    """From a diffusers ``AutoencoderDC`` ``config.json`` dict; unknown keys and overrides raise."""
    own = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - (own - {"dtype", "param_dtype"}))
    if unknown:
      raise ValueError(f"AutoencoderDC config has unsupported key(s) {unknown}")
    bad = sorted(set(overrides) - own)
    if bad:
      raise ValueError(f"unknown DCAEConfig override(s) {bad}")
    fields.update(overrides)
    return cls(**fields)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers ``AutoencoderDC`` constructor arguments (lists for tuples)."""
    def plain(v):
      return [plain(x) for x in v] if isinstance(v, tuple) else v
    return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)
            if f.name not in ("dtype", "param_dtype")}

  def replace(self, **changes: Any) -> "DCAEConfig":
    return dataclasses.replace(self, **changes)

  @property
  def vae_scale_factor(self) -> int:
    """Spatial factor between images and latents: ``2 ** (len(encoder_block_out_channels) - 1)``."""
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  @property
  def latent_dtype(self) -> Any:
    return self.dtype

  def to_latent(self, latent: Any) -> Any:
    """Encoder output -> diffusion latent: ``latent * scaling_factor``."""
    return latent * self.scaling_factor

  def from_latent(self, z: Any) -> Any:
    """Diffusion latent -> decoder input: ``z / scaling_factor``."""
    return z / self.scaling_factor


_SANA_TYPES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_SANA_SCALES = ((), (), (), (5,), (5,), (5,))
DC_AE_PRESETS: dict[str, DCAEConfig] = {
    # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (SANA's VAE): runs in bf16 by default.
    "dc-ae-f32c32-sana-1.0": DCAEConfig(
        latent_channels=32, attention_head_dim=32, encoder_block_types=_SANA_TYPES, decoder_block_types=_SANA_TYPES,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024), encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3), encoder_qkv_multiscales=_SANA_SCALES,
        decoder_qkv_multiscales=_SANA_SCALES, upsample_block_type="interpolate", downsample_block_type="Conv",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
        dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
    # The same architecture small: six stages (32x), 32 latent channels, one layer per stage,
    # attention heads of 16 in the last three stages.
    "dc-ae-tiny": DCAEConfig(
        latent_channels=32, attention_head_dim=16, encoder_block_types=_SANA_TYPES, decoder_block_types=_SANA_TYPES,
        encoder_block_out_channels=(8, 16, 16, 32, 32, 64), decoder_block_out_channels=(8, 16, 16, 32, 32, 64),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=_SANA_SCALES, decoder_qkv_multiscales=_SANA_SCALES,
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407),
}


def dc_ae_preset(name: str, **overrides: Any) -> DCAEConfig:
  """A preset from :data:`DC_AE_PRESETS` with fields replaced by ``overrides``."""
  if name not in DC_AE_PRESETS:
    raise ValueError(f"unknown DC-AE preset {name!r}; expected one of {sorted(DC_AE_PRESETS)}")
  return DC_AE_PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------- layers
def pixel_unshuffle(x: Array) -> Array:
  """``[B, H, W, C] -> [B, H/2, W/2, 4C]``; output channel ``4c + 2i + j`` is pixel ``(2h+i, 2w+j)`` of ``c``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // 2, w // 2, 4 * c)


def pixel_shuffle(x: Array) -> Array:
  """The inverse of :func:`pixel_unshuffle`: ``[B, H, W, 4C] -> [B, 2H, 2W, C]``."""
  b, h, w, c4 = x.shape
  x = x.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, 2 * h, 2 * w, c4 // 4)


def _conv(features: int, kernel: int, name: str, cfg: DCAEConfig, *, stride: int = 1, bias: bool = True,
          groups: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 feature_group_count=groups, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


def _norm(cfg: DCAEConfig, name: str) -> BiasRMSNorm:
  return BiasRMSNorm(RMS_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class ResBlock(nn.Module):
  """``x + norm(conv2(act(conv1(x))))`` at constant width (conv2 has no bias)."""
  config: DCAEConfig
  act: str

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = ACTIVATIONS[self.act](_conv(c, 3, "conv1", self.config)(x))
    h = _conv(c, 3, "conv2", self.config, bias=False)(h)
    return _norm(self.config, "norm")(h) + x


class MultiscaleLinearAttention(nn.Module):
  """diffusers ``SanaMultiscaleLinearAttention`` (residual, RMS norm): ``[B, H, W, C] -> [B, H, W, C]``."""
  config: DCAEConfig
  scales: tuple[int, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, h, w, c = x.shape
    hd = cfg.attention_head_dim
    heads = c // hd
    inner = heads * hd
    qkv = nn.Dense(3 * inner, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_qkv")(x)
    parts = [qkv]
    for s, k in enumerate(self.scales):
      y = _conv(3 * inner, k, f"multiscale_{s}_proj_in", cfg, bias=False, groups=3 * inner)(qkv)
      parts.append(_conv(3 * inner, 1, f"multiscale_{s}_proj_out", cfg, bias=False, groups=3 * heads)(y))
    y = jnp.concatenate(parts, axis=-1).reshape(b, h * w, -1, 3 * hd)   # [B, N, G, 3 hd]
    q, k, v = jnp.split(y, 3, axis=-1)
    if h * w > hd:
      out = _linear_heads(q, k, v).astype(cfg.dtype)
    else:
      out = _quadratic_heads(q, k, v)
    out = out.reshape(b, h, w, -1)
    out = nn.Dense(c, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_out")(out)
    return _norm(cfg, "norm_out")(out) + x


def _linear_heads(q: Array, k: Array, v: Array) -> Array:
  """ReLU linear attention in float32 over ``[B, N, G, d]``; float32 ``[B, N, G, d]``."""
  hi = jax.lax.Precision.HIGHEST
  q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
  q, k = jax.nn.relu(q), jax.nn.relu(k)
  vk = jnp.einsum("bngd,bnge->bgde", v, k, precision=hi)
  num = jnp.einsum("bgde,bnge->bngd", vk, q, precision=hi)
  den = jnp.einsum("bge,bnge->bng", jnp.sum(k, axis=1), q, precision=hi)
  return num / (den[..., None] + LINEAR_ATTENTION_EPS)


def _quadratic_heads(q: Array, k: Array, v: Array) -> Array:
  """``out_n = sum_m v_m s_mn / (sum_m s_mn + eps)`` with ``s_mn = relu(k_m) . relu(q_n)`` (few tokens)."""
  hi = jax.lax.Precision.HIGHEST
  q, k = jax.nn.relu(q), jax.nn.relu(k)
  scores = jnp.einsum("bmge,bnge->bgmn", k, q, preferred_element_type=jnp.float32, precision=hi)
  scores = scores / (jnp.sum(scores, axis=2, keepdims=True) + LINEAR_ATTENTION_EPS)
  return jnp.einsum("bmgd,bgmn->bngd", v, scores.astype(v.dtype), precision=hi)


class EfficientViTBlock(nn.Module):
  """Multi-scale linear attention then a GLUMBConv (expansion 4, RMS norm, residual)."""
  config: DCAEConfig
  scales: tuple[int, ...]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    c = x.shape[-1]
    x = MultiscaleLinearAttention(cfg, self.scales, name="attn")(x)
    return GLUMBConv(GLUMBCONV_EXPAND * c, c, norm=True, residual=True, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     name="conv_out")(x)


class DCDownBlock(nn.Module):
  """Halves the resolution: ``[B, H, W, C_in] -> [B, H/2, W/2, out_channels]``.

  ``pixel_unshuffle``: a 3x3 conv to ``out/4`` channels then :func:`pixel_unshuffle`; else a
  stride-2 3x3 conv. ``shortcut``: plus the unshuffled input averaged over channel groups.
  """
  config: DCAEConfig
  out_channels: int
  shortcut: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    if cfg.downsample_block_type == "pixel_unshuffle":
      y = pixel_unshuffle(_conv(self.out_channels // 4, 3, "conv", cfg)(x))
    else:
      y = _conv(self.out_channels, 3, "conv", cfg, stride=2)(x)
    if self.shortcut:
      s = pixel_unshuffle(x)
      b, h, w, c4 = s.shape
      y = y + jnp.mean(s.reshape(b, h, w, self.out_channels, c4 // self.out_channels), axis=-1)
    return y


class DCUpBlock(nn.Module):
  """Doubles the resolution: ``[B, H, W, C_in] -> [B, 2H, 2W, out_channels]``.

  ``interpolate``: nearest 2x then a 3x3 conv; else a 3x3 conv to ``4 out`` channels then
  :func:`pixel_shuffle`. ``shortcut``: plus the input with each channel repeated, shuffled.
  """
  config: DCAEConfig
  out_channels: int
  shortcut: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, h, w, c = x.shape
    if cfg.upsample_block_type == "interpolate":
      up = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
      y = _conv(self.out_channels, 3, "conv", cfg)(up)
    else:
      y = pixel_shuffle(_conv(4 * self.out_channels, 3, "conv", cfg)(x))
    if self.shortcut:
      y = y + pixel_shuffle(jnp.repeat(x, 4 * self.out_channels // c, axis=-1))
    return y


def _block(cfg: DCAEConfig, kind: str, scales: tuple[int, ...], act: str, name: str) -> nn.Module:
  if kind == "ResBlock":
    return ResBlock(cfg, act, name=name)
  return EfficientViTBlock(cfg, scales, name=name)


class Encoder(nn.Module):
  """Images ``[B, H, W, in_channels]`` -> latents ``[B, H/f, W/f, latent_channels]``."""
  config: DCAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
    n = len(widths)
    x = x.astype(cfg.dtype)
    if layers[0] > 0:
      x = _conv(widths[0], 3, "conv_in", cfg)(x)
    else:
      x = DCDownBlock(cfg, widths[1], shortcut=False, name="conv_in")(x)
    for i in range(n):
      for j in range(layers[i]):
        x = _block(cfg, cfg.encoder_block_types[i], cfg.encoder_qkv_multiscales[i], "silu",
                   f"down_blocks_{i}_layers_{j}")(x)
      if i < n - 1 and layers[i] > 0:
        x = DCDownBlock(cfg, widths[i + 1], name=f"down_blocks_{i}_downsample")(x)
    y = _conv(cfg.latent_channels, 3, "conv_out", cfg)(x)
    if cfg.encoder_out_shortcut:
      b, h, w, c = x.shape
      y = y + jnp.mean(x.reshape(b, h, w, cfg.latent_channels, c // cfg.latent_channels), axis=-1)
    return y


class Decoder(nn.Module):
  """Latents ``[B, h, w, latent_channels]`` -> images ``[B, f h, f w, in_channels]``."""
  config: DCAEConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
    n = len(widths)
    z = z.astype(cfg.dtype)
    x = _conv(widths[-1], 3, "conv_in", cfg)(z)
    if cfg.decoder_in_shortcut:
      x = x + jnp.repeat(z, widths[-1] // cfg.latent_channels, axis=-1)
    for i in reversed(range(n)):
      if i < n - 1 and layers[i] > 0:
        x = DCUpBlock(cfg, widths[i], name=f"up_blocks_{i}_upsample")(x)
      for j in range(layers[i]):
        x = _block(cfg, cfg.decoder_block_types[i], cfg.decoder_qkv_multiscales[i], cfg.decoder_act_fns[i],
                   f"up_blocks_{i}_layers_{j}")(x)
    x = ACTIVATIONS[cfg.decoder_conv_act_fn](_norm(cfg, "norm_out")(x))
    if layers[0] > 0:
      return _conv(cfg.in_channels, 3, "conv_out", cfg)(x)
    return DCUpBlock(cfg, cfg.in_channels, shortcut=False, name="conv_out")(x)


class AutoencoderDC(nn.Module):
  """diffusers ``AutoencoderDC`` in NHWC. Use ``encode`` / ``decode`` through ``apply(..., method=...)``;
  ``__call__`` (encode then decode) exists to initialize all params."""
  config: DCAEConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, images: Array) -> Array:
    """Images ``[B, H, W, in_channels]`` (``H``, ``W`` multiples of ``vae_scale_factor``, values in
    [-1, 1]) -> raw latents ``[B, H/f, W/f, latent_channels]`` in ``dtype``."""
    cfg = self.config
    f = cfg.vae_scale_factor
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (NHWC), got shape {images.shape}")
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images height and width must be multiples of vae_scale_factor={f}, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    return self.encoder(images)

  def decode(self, latents: Array) -> Array:
    """Raw latents ``[B, h, w, latent_channels]`` (already divided by ``scaling_factor``) -> images
    ``[B, f h, f w, in_channels]`` in ``dtype``, nominally in [-1, 1] (not clipped)."""
    cfg = self.config
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
      raise ValueError(f"latents must be [B, h, w, {cfg.latent_channels}] (NHWC), got shape {latents.shape}")
    return self.decoder(latents)

  def __call__(self, images: Array) -> Array:
    return self.decode(self.encode(images))


# ----------------------------------------------------------------------------- params
@functools.lru_cache(maxsize=16)
def _abstract_params(config: DCAEConfig) -> dict[str, Any]:
  f = config.vae_scale_factor
  images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), config.dtype)
  return jax.eval_shape(AutoencoderDC(config).init, jax.random.key(0), images)["params"]


def abstract_dc_ae_params(config: DCAEConfig) -> dict[str, Any]:
  """The params tree as ``jax.ShapeDtypeStruct`` leaves (cached trace; a fresh tree per call)."""
  return jax.tree_util.tree_map(lambda leaf: leaf, _abstract_params(config))


def init_dc_ae_params(config: DCAEConfig, seed: int) -> dict[str, Any]:
  """Deterministic random params (per leaf from ``(seed, crc32(path))``): kernels ~ N(0, 1/fan_in),
  norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2); in ``config.param_dtype``."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative int")
  out = {}
  for path, leaf in trees.flatten(abstract_dc_ae_params(config)).items():
    noise = np.random.default_rng([int(seed), zlib.crc32(path.encode())]).standard_normal(leaf.shape,
                                                                                          dtype=np.float32)
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
      value = noise / np.float32(np.sqrt(np.prod(leaf.shape[:-1])))
    elif name == "scale":
      value = 1.0 + np.float32(0.1) * noise
    else:
      value = np.float32(0.05) * noise
    out[path] = jnp.asarray(value.astype(leaf.dtype))
  return trees.unflatten(out)


# ----------------------------------------------------------------------------- loading
def _block_rules(target: str, source: str, kind: str, scales: tuple[int, ...]) -> list[Rule]:
  if kind == "ResBlock":
    return (checkpoint.conv_rules(f"{target}/conv1", f"{source}.conv1")
            + checkpoint.conv_rules(f"{target}/conv2", f"{source}.conv2", bias=False)
            + checkpoint.norm_rules(f"{target}/norm", f"{source}.norm"))
  a = f"{source}.attn"
  rules = checkpoint.fused_dense_rules(f"{target}/attn/to_qkv", [f"{a}.to_q", f"{a}.to_k", f"{a}.to_v"], bias=False)
  for s in range(len(scales)):
    rules += checkpoint.conv_rules(f"{target}/attn/multiscale_{s}_proj_in", f"{a}.to_qkv_multiscale.{s}.proj_in",
                                   bias=False)
    rules += checkpoint.conv_rules(f"{target}/attn/multiscale_{s}_proj_out", f"{a}.to_qkv_multiscale.{s}.proj_out",
                                   bias=False)
  rules += checkpoint.dense_rules(f"{target}/attn/to_out", f"{a}.to_out", bias=False)
  rules += checkpoint.norm_rules(f"{target}/attn/norm_out", f"{a}.norm_out")
  rules += glumbconv_rules(f"{target}/conv_out", f"{source}.conv_out")
  rules += checkpoint.norm_rules(f"{target}/conv_out/norm", f"{source}.conv_out.norm")
  return rules


def dc_ae_mapping(config: DCAEConfig) -> list[Rule]:
  """The mapping table from diffusers ``AutoencoderDC`` tensor names to our params."""
  rules: list[Rule] = []
  widths, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
  n = len(widths)
  suffix = "" if layers[0] > 0 else "/conv"   # stage 0 without layers: conv_in is a DCDownBlock
  rules += checkpoint.conv_rules(f"encoder/conv_in{suffix}", f"encoder.conv_in{suffix.replace('/', '.')}")
  for i in range(n):
    for j in range(layers[i]):
      rules += _block_rules(f"encoder/down_blocks_{i}_layers_{j}", f"encoder.down_blocks.{i}.{j}",
                            config.encoder_block_types[i], config.encoder_qkv_multiscales[i])
    if i < n - 1 and layers[i] > 0:
      rules += checkpoint.conv_rules(f"encoder/down_blocks_{i}_downsample/conv",
                                     f"encoder.down_blocks.{i}.{layers[i]}.conv")
  rules += checkpoint.conv_rules("encoder/conv_out", "encoder.conv_out")

  widths, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
  rules += checkpoint.conv_rules("decoder/conv_in", "decoder.conv_in")
  for i in range(n):
    offset = 0
    if i < n - 1 and layers[i] > 0:
      rules += checkpoint.conv_rules(f"decoder/up_blocks_{i}_upsample/conv", f"decoder.up_blocks.{i}.0.conv")
      offset = 1
    for j in range(layers[i]):
      rules += _block_rules(f"decoder/up_blocks_{i}_layers_{j}", f"decoder.up_blocks.{i}.{j + offset}",
                            config.decoder_block_types[i], config.decoder_qkv_multiscales[i])
  rules += checkpoint.norm_rules("decoder/norm_out", "decoder.norm_out")
  suffix = "" if layers[0] > 0 else "/conv"   # stage 0 without layers: conv_out is a DCUpBlock
  rules += checkpoint.conv_rules(f"decoder/conv_out{suffix}", f"decoder.conv_out{suffix.replace('/', '.')}")
  return rules


def load_dc_ae(folder: str | os.PathLike, dtype: Any = None,
               param_dtype: Any = None) -> tuple[DCAEConfig, dict[str, Any]]:
  """Loads a diffusers ``AutoencoderDC`` folder (``config.json`` + safetensors).

  Args:
    folder: the ``vae`` folder.
    dtype: compute dtype; ``None`` keeps the config default (float32).
    param_dtype: parameter dtype; ``None`` uses ``dtype`` when given, else float32.

  Raises:
    CheckpointError: wrong model class, unsupported config (naming the key), or missing,
      unexpected or misshaped tensors (each named).
  """
  folder = os.fspath(folder)
  overrides = {}
  if dtype is not None:
    overrides["dtype"] = overrides["param_dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  config = checkpoint.read_model_config(folder, DC_AE_CLASS_NAMES, DCAEConfig.from_diffusers, **overrides)
  store = checkpoint.open_store(folder)
  rules = dc_ae_mapping(config)
  check_conv1x1_shapes(store, rules, folder)
  params = checkpoint.load_params(store, rules, abstract_dc_ae_params(config), source=folder)
  return config, params

