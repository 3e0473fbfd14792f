"""The KL autoencoder (diffusers ``AutoencoderKL``) of FLUX.1 and PixArt-Sigma, in Flax, NHWC.

Layout: every image, latent and feature map is **NHWC** (``[B, H, W, C]``), at the interface
and inside; diffusers is NCHW, so its convolution weights ``[O, I, kh, kw]`` become Flax
kernels ``[kh, kw, I, O]`` at load time and the tests transpose activations when comparing.

Architecture (``block_out_channels = (c_0, ..., c_{L-1})``, ``f = 2 ** (L - 1)``):

* encoder: ``conv_in`` (3x3) -> ``down_blocks_i`` (``layers_per_block`` resnets, then a stride-2
  3x3 conv on the input zero-padded by one row/column at the bottom/right, except in the last
  block) -> ``mid_block`` (resnet, single-head self-attention over the ``H*W`` positions with a
  GroupNorm in front and a residual, resnet) -> GroupNorm -> SiLU -> ``conv_out`` to
  ``2 * latent_channels`` (mean and log-variance) -> optional 1x1 ``quant_conv``;
* decoder: optional 1x1 ``post_quant_conv`` -> ``conv_in`` -> ``mid_block`` -> ``up_blocks_i``
  (``layers_per_block + 1`` resnets over the reversed widths, then nearest 2x upsampling and a
  3x3 conv, except in the last block) -> GroupNorm -> SiLU -> ``conv_out``.

Every GroupNorm uses eps 1e-6 and is computed in float32; all residual rescale factors are 1.
A resnet is ``x' = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with a 1x1
``conv_shortcut`` where the width changes. The mid-block attention scales logits by
``1/sqrt(C)`` (one head of width ``C``) and runs through :func:`layers.attention`; its q/k/v
linears are fused into one ``to_qkv`` ``nn.Dense`` at load time (docs/design.md).

Parameter paths (without ``params``): ``encoder/conv_in``, ``encoder/down_blocks_{i}/resnets_{j}/
{norm1,conv1,norm2,conv2,conv_shortcut}``, ``encoder/down_blocks_{i}/downsample/conv``,
``{encoder,decoder}/mid_block/{resnets_0,attention,resnets_1}`` with ``attention/{group_norm,
to_qkv,to_out}``, ``encoder/{conv_norm_out,conv_out}``, ``quant_conv``, ``post_quant_conv``,
``decoder/conv_in``, ``decoder/up_blocks_{i}/resnets_{j}``, ``decoder/up_blocks_{i}/upsample/conv``,
``decoder/{conv_norm_out,conv_out}``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import zlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint
from svdquant_jax.models.checkpoint import Rule
from svdquant_jax.models.layers import ATTENTION_IMPLEMENTATIONS, as_float_dtype, attention
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.utils import trees

Array = jax.Array
Dtype = Any

GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the log-variance
DOWN_BLOCK_TYPE = "DownEncoderBlock2D"
UP_BLOCK_TYPE = "UpDecoderBlock2D"
_ACTIVATIONS = ("silu", "swish")


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers ``AutoencoderKL`` config (same field names and defaults) plus dtypes.

  ``dtype`` is the activation/compute dtype (GroupNorm and softmax statistics are float32
  regardless), ``param_dtype`` the dtype of the parameters. ``latents_mean``/``latents_std``
  are carried for completeness; FLUX and PixArt-Sigma leave them ``None`` and no code here
  uses them.
  """
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = (DOWN_BLOCK_TYPE,)
  up_block_types: tuple[str, ...] = (UP_BLOCK_TYPE,)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | tuple[int, ...] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention_impl: str | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    def set_(name, value):
      object.__setattr__(self, name, value)
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      set_(name, tuple(getattr(self, name)))
    for name in ("latents_mean", "latents_std"):
      if getattr(self, name) is not None:
        set_(name, tuple(float(v) for v in getattr(self, name)))
    if isinstance(self.sample_size, (list, tuple)):
      set_("sample_size", tuple(int(s) for s in self.sample_size))
    set_("dtype", as_float_dtype(self.dtype, "dtype"))
    set_("param_dtype", as_float_dtype(self.param_dtype, "param_dtype"))

    n = len(self.block_out_channels)
    if n == 0 or any(int(c) <= 0 for c in self.block_out_channels):
      raise ValueError(f"block_out_channels={self.block_out_channels} must be a non-empty list of positive ints")
    for name, types, allowed in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPE),
                                 ("up_block_types", self.up_block_types, UP_BLOCK_TYPE)):
      if len(types) != n:
        raise ValueError(f"{name} has {len(types)} entries but block_out_channels has {n}")
      for i, t in enumerate(types):
        if t != allowed:
          raise ValueError(f"{name}[{i}]={t!r} is not supported; this AutoencoderKL supports only {allowed!r}")
    if self.act_fn not in _ACTIVATIONS:
      raise ValueError(f"act_fn={self.act_fn!r} is not supported; expected one of {_ACTIVATIONS}")
    for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"{name}={getattr(self, name)} must be a positive int")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
    if self.scaling_factor == 0:
      raise ValueError("scaling_factor must be non-zero")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> "VAEConfig":
    """Builds a config from a diffusers ``AutoencoderKL`` ``config.json`` dict.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are metadata and
    ignored; any other key this class does not know raises, as it may change the model.
    ``overrides`` (e.g. ``dtype=jnp.bfloat16``) replace fields after reading.

    Raises:
      ValueError: naming unknown keys, unsupported block types or activations.
    """
    own = {f.name for f in dataclasses.fields(cls)}
    # attention_impl, dtype and param_dtype are ours, not diffusers'.
    diffusers_keys = own - {"attention_impl", "dtype", "param_dtype"}
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(fields) - diffusers_keys)
    if unknown:
      raise ValueError(f"AutoencoderKL config has unsupported key(s) {unknown}")
    bad_overrides = sorted(set(overrides) - own)
    if bad_overrides:
      raise ValueError(f"unknown VAEConfig override(s) {bad_overrides}")
    fields.update(overrides)
    return cls(**fields)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers ``AutoencoderKL`` constructor arguments of this config."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("attention_impl", "dtype", "param_dtype")}
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      out[name] = list(out[name])
    return out

  def replace(self, **changes: Any) -> "VAEConfig":
    return dataclasses.replace(self, **changes)

  @property
  def vae_scale_factor(self) -> int:
    """Spatial factor between images and latents: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def shift(self) -> float:
    """``shift_factor``, or 0 when it is ``None``."""
    return 0.0 if self.shift_factor is None else float(self.shift_factor)

  def to_latent(self, mean: Any) -> Any:
    """Encoder mean -> diffusion latent: ``(mean - shift) * scaling_factor``."""
    return (mean - self.shift) * self.scaling_factor

  def from_latent(self, z: Any) -> Any:
    """Diffusion latent -> decoder input: ``z / scaling_factor + shift``."""
    return z / self.scaling_factor + self.shift


_DOWN4 = (DOWN_BLOCK_TYPE,) * 4
_UP4 = (UP_BLOCK_TYPE,) * 4
VAE_PRESETS: dict[str, VAEConfig] = {
    # FLUX.1 (dev and schnell) ``vae/config.json``; FLUX decodes in bf16.
    "flux-vae": VAEConfig(down_block_types=_DOWN4, up_block_types=_UP4, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, latent_channels=16, norm_num_groups=32, sample_size=1024,
                          scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
    # PixArt-Sigma's VAE (the SDXL VAE). Its config sets force_upcast: it overflows in fp16. bf16
    # has float32's exponent range, so the preset runs in bf16; pass dtype=float32 for the
    # original's fp32 decode.
    "sdxl-vae": VAEConfig(down_block_types=_DOWN4, up_block_types=_UP4, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                          scaling_factor=0.13025, shift_factor=None, use_quant_conv=True,
                          use_post_quant_conv=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),
    # The same architectures, small: four levels keep the real 8x spatial factor, 16 -> 32 widths
    # exercise the 1x1 conv shortcuts in both directions, 8 groups of 2-4 channels each.
    "vae-tiny-16": VAEConfig(down_block_types=_DOWN4, up_block_types=_UP4, block_out_channels=(16, 16, 32, 32),
                             layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=64,
                             scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                             use_post_quant_conv=False),
    "vae-tiny-4": VAEConfig(down_block_types=_DOWN4, up_block_types=_UP4, block_out_channels=(16, 16, 32, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                            scaling_factor=0.13025, shift_factor=None, use_quant_conv=True,
                            use_post_quant_conv=True),
}


def vae_preset(name: str, **overrides: Any) -> VAEConfig:
  """A preset from :data:`VAE_PRESETS` with fields replaced by ``overrides``."""
  if name not in VAE_PRESETS:
    raise ValueError(f"unknown VAE preset {name!r}; expected one of {sorted(VAE_PRESETS)}")
  return VAE_PRESETS[name].replace(**overrides)


# ----------------------------------------------------------------------------- layers
class GroupNorm(nn.Module):
  """GroupNorm over ``[B, H, W, C]`` (statistics per sample and group over H, W and the group's
  channels), computed in float32 with a two-pass variance, optionally followed by SiLU.

  Params ``scale``/``bias`` ``[C]`` in ``param_dtype``; output ``[B, H, W, C]`` in ``dtype``.
  """
  num_groups: int
  epsilon: float = GROUP_NORM_EPS
  silu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, channels // self.num_groups)
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # spatial axes and the within-group axis
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    if self.silu:
      y = nn.silu(y)
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, name: str, config: VAEConfig, stride: int = 1,
          padding: Any = None) -> nn.Conv:
  """A 2-D convolution over NHWC; ``padding`` defaults to ``kernel // 2`` on every side."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=config.dtype,
                 param_dtype=config.param_dtype, name=name)


def _norm(config: VAEConfig, name: str, silu: bool = False) -> GroupNorm:
  return GroupNorm(config.norm_num_groups, silu=silu, dtype=config.dtype, param_dtype=config.param_dtype,
                   name=name)


class ResnetBlock(nn.Module):
  """diffusers ``ResnetBlock2D`` without time embedding: ``[B, H, W, C_in] -> [B, H, W, out_channels]``."""
  config: VAEConfig
  out_channels: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    h = _norm(cfg, "norm1", silu=True)(x)
    h = _conv(self.out_channels, 3, "conv1", cfg)(h)
    h = _norm(cfg, "norm2", silu=True)(h)
    h = _conv(self.out_channels, 3, "conv2", cfg)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "conv_shortcut", cfg)(x)
    return x.astype(cfg.dtype) + h


class Downsample(nn.Module):
  """Stride-2 3x3 conv after zero padding one row at the bottom and one column at the right
  (diffusers ``Downsample2D`` with ``padding=0``): ``[B, H, W, C] -> [B, H // 2, W // 2, C]``."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _conv(x.shape[-1], 3, "conv", self.config, stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 conv: ``[B, H, W, C] -> [B, 2H, 2W, C]``."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return _conv(c, 3, "conv", self.config)(x)


class MidBlockAttention(nn.Module):
  """Single-head self-attention over the ``H*W`` positions with a residual:
  ``x + to_out(attention(to_qkv(group_norm(x))))``, ``[B, H, W, C] -> [B, H, W, C]``."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    b, h, w, c = x.shape
    y = _norm(cfg, "group_norm")(x).reshape(b, h * w, c)
    qkv = nn.Dense(3 * c, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_qkv")(y)
    q, k, v = (t.reshape(b, h * w, 1, c) for t in jnp.split(qkv, 3, axis=-1))
    y = attention(q, k, v, implementation=cfg.attention_impl).reshape(b, h * w, c)
    y = nn.Dense(c, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="to_out")(y)
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """``resnets_0 -> attention (if mid_block_add_attention) -> resnets_1`` at constant width."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(self.config, c, name="resnets_0")(x)
    if self.config.mid_block_add_attention:
      x = MidBlockAttention(self.config, name="attention")(x)
    return ResnetBlock(self.config, c, name="resnets_1")(x)


class DownBlock(nn.Module):
  """diffusers ``DownEncoderBlock2D``: ``layers_per_block`` resnets (the first changes the width to
  ``out_channels``), then :class:`Downsample` when ``add_downsample``."""
  config: VAEConfig
  out_channels: int
  add_downsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.config.layers_per_block):
      x = ResnetBlock(self.config, self.out_channels, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.config, name="downsample")(x)
    return x


class UpBlock(nn.Module):
  """diffusers ``UpDecoderBlock2D``: ``layers_per_block + 1`` resnets (the first changes the width to
  ``out_channels``), then :class:`Upsample` when ``add_upsample``."""
  config: VAEConfig
  out_channels: int
  add_upsample: bool

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.config.layers_per_block + 1):
      x = ResnetBlock(self.config, self.out_channels, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.config, name="upsample")(x)
    return x


class Encoder(nn.Module):
  """Images ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]`` (before
  ``quant_conv``)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    widths = cfg.block_out_channels
    x = _conv(widths[0], 3, "conv_in", cfg)(x.astype(cfg.dtype))
    for i, width in enumerate(widths):
      x = DownBlock(cfg, width, add_downsample=i < len(widths) - 1, name=f"down_blocks_{i}")(x)
    x = MidBlock(cfg, name="mid_block")(x)
    x = _norm(cfg, "conv_norm_out", silu=True)(x)
    return _conv(2 * cfg.latent_channels, 3, "conv_out", cfg)(x)


class Decoder(nn.Module):
  """Latents ``[B, h, w, latent_channels]`` (after ``post_quant_conv``) -> images
  ``[B, f*h, f*w, out_channels]``."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg = self.config
    widths = tuple(reversed(cfg.block_out_channels))
    x = _conv(widths[0], 3, "conv_in", cfg)(z.astype(cfg.dtype))
    x = MidBlock(cfg, name="mid_block")(x)
    for i, width in enumerate(widths):
      x = UpBlock(cfg, width, add_upsample=i < len(widths) - 1, name=f"up_blocks_{i}")(x)
    x = _norm(cfg, "conv_norm_out", silu=True)(x)
    return _conv(cfg.out_channels, 3, "conv_out", cfg)(x)


class AutoencoderKL(nn.Module):
  """diffusers ``AutoencoderKL`` in NHWC. Use ``encode`` / ``decode`` through ``apply(...,
  method=...)``; ``__call__`` (encode, then decode the mean) exists to initialize all params."""
  config: VAEConfig

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if cfg.use_quant_conv:
      self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", cfg)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", cfg)

  def encode(self, images: Array) -> tuple[Array, Array]:
    """Posterior of images ``[B, H, W, in_channels]`` (``H``, ``W`` multiples of ``vae_scale_factor``,
    values in [-1, 1]) -> ``(mean, logvar)``, each ``[B, H/f, W/f, latent_channels]`` in ``dtype``;
    ``logvar`` clamped to [-30, 20] as diffusers' ``latent_dist.logvar``."""
    cfg = self.config
    f = cfg.vae_scale_factor
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (NHWC), got shape {images.shape}")
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"images height and width must be multiples of vae_scale_factor={f}, "
                       f"got {images.shape[1]}x{images.shape[2]}")
    moments = self.encoder(images)
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, latents: Array) -> Array:
    """Latents ``[B, h, w, latent_channels]`` (already ``from_latent``-unscaled) -> images
    ``[B, f*h, f*w, out_channels]`` in ``dtype``, nominally in [-1, 1] (not clipped)."""
    cfg = self.config
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
      raise ValueError(f"latents must be [B, h, w, {cfg.latent_channels}] (NHWC), got shape {latents.shape}")
    z = latents.astype(cfg.dtype)
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: Array) -> tuple[Array, Array, Array]:
    """``images -> (reconstruction of the posterior mean, mean, logvar)``."""
    mean, logvar = self.encode(images)
    return self.decode(mean), mean, logvar


# ----------------------------------------------------------------------------- params
@functools.lru_cache(maxsize=16)
def _abstract_params(config: VAEConfig) -> dict[str, Any]:
  f = config.vae_scale_factor
  images = jax.ShapeDtypeStruct((1, f, f, config.in_channels), config.dtype)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)["params"]


def abstract_vae_params(config: VAEConfig) -> dict[str, Any]:
  """The params tree as ``jax.ShapeDtypeStruct`` leaves (nothing is computed or allocated;
  the trace is cached per config, each call returns a fresh tree)."""
  return jax.tree_util.tree_map(lambda leaf: leaf, _abstract_params(config))


def init_vae_params(config: VAEConfig, seed: int) -> dict[str, Any]:
  """Deterministic random params: bit-identical for the same ``config`` and ``seed``.

  Each leaf draws from its own numpy ``Generator`` seeded with ``(seed, crc32(path))``, so no
  full ``model.init`` is traced and the cost is one float32 normal draw per parameter. Conv
  and Dense kernels ~ N(0, 1/fan_in) (fan_in = product of all but the last axis), GroupNorm
  scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.05^2).

  Returns:
    Nested dict of ``jax.Array`` in ``config.param_dtype``, matching :func:`abstract_vae_params`.
  """
  if int(seed) < 0:
    raise ValueError(f"seed={seed} must be a non-negative int")
  flat = trees.flatten(abstract_vae_params(config))
  out = {}
  for path, leaf in flat.items():
    rng = np.random.default_rng([int(seed), zlib.crc32(path.encode())])
    noise = rng.standard_normal(leaf.shape, dtype=np.float32)
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
_LEGACY_ATTENTION = re.compile(
    r"(encoder|decoder)\.mid_block\.attentions\.0\.(query|key|value|proj_attn)\.(weight|bias)")


def _resnet_rules(target: str, source: str, in_channels: int, out_channels: int) -> list[Rule]:
  rules = (checkpoint.norm_rules(f"{target}/norm1", f"{source}.norm1")
           + checkpoint.conv_rules(f"{target}/conv1", f"{source}.conv1")
           + checkpoint.norm_rules(f"{target}/norm2", f"{source}.norm2")
           + checkpoint.conv_rules(f"{target}/conv2", f"{source}.conv2"))
  if in_channels != out_channels:
    rules += checkpoint.conv_rules(f"{target}/conv_shortcut", f"{source}.conv_shortcut")
  return rules


def _mid_block_rules(target: str, source: str, config: VAEConfig) -> list[Rule]:
  c = config.block_out_channels[-1]
  rules = _resnet_rules(f"{target}/resnets_0", f"{source}.resnets.0", c, c)
  if config.mid_block_add_attention:
    attn = f"{source}.attentions.0"
    rules += checkpoint.norm_rules(f"{target}/attention/group_norm", f"{attn}.group_norm")
    rules += checkpoint.fused_dense_rules(f"{target}/attention/to_qkv",
                                          [f"{attn}.to_q", f"{attn}.to_k", f"{attn}.to_v"])
    rules += checkpoint.dense_rules(f"{target}/attention/to_out", f"{attn}.to_out.0")
  rules += _resnet_rules(f"{target}/resnets_1", f"{source}.resnets.1", c, c)
  return rules


def vae_mapping(config: VAEConfig) -> list[Rule]:
  """The mapping table from diffusers ``AutoencoderKL`` tensor names to our params."""
  widths = config.block_out_channels
  rules = checkpoint.conv_rules("encoder/conv_in", "encoder.conv_in")
  width = widths[0]
  for i, out in enumerate(widths):
    for j in range(config.layers_per_block):
      rules += _resnet_rules(f"encoder/down_blocks_{i}/resnets_{j}", f"encoder.down_blocks.{i}.resnets.{j}", width, out)
      width = out
    if i < len(widths) - 1:
      rules += checkpoint.conv_rules(f"encoder/down_blocks_{i}/downsample/conv",
                                     f"encoder.down_blocks.{i}.downsamplers.0.conv")
  rules += _mid_block_rules("encoder/mid_block", "encoder.mid_block", config)
  rules += checkpoint.norm_rules("encoder/conv_norm_out", "encoder.conv_norm_out")
  rules += checkpoint.conv_rules("encoder/conv_out", "encoder.conv_out")
  if config.use_quant_conv:
    rules += checkpoint.conv_rules("quant_conv", "quant_conv")
  if config.use_post_quant_conv:
    rules += checkpoint.conv_rules("post_quant_conv", "post_quant_conv")

  reversed_widths = tuple(reversed(widths))
  rules += checkpoint.conv_rules("decoder/conv_in", "decoder.conv_in")
  rules += _mid_block_rules("decoder/mid_block", "decoder.mid_block", config)
  width = reversed_widths[0]
  for i, out in enumerate(reversed_widths):
    for j in range(config.layers_per_block + 1):
      rules += _resnet_rules(f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}", width, out)
      width = out
    if i < len(widths) - 1:
      rules += checkpoint.conv_rules(f"decoder/up_blocks_{i}/upsample/conv", f"decoder.up_blocks.{i}.upsamplers.0.conv")
  rules += checkpoint.norm_rules("decoder/conv_norm_out", "decoder.conv_norm_out")
  rules += checkpoint.conv_rules("decoder/conv_out", "decoder.conv_out")
  return rules


def check_attention_naming(names: Sequence[str] | Mapping[str, Any], source: str = "checkpoint") -> None:
  """Refuses checkpoints with the legacy VAE attention names (``query/key/value/proj_attn``).

  Raises:
    CheckpointError: naming the legacy tensors found.
  """
  legacy = sorted(n for n in names if _LEGACY_ATTENTION.fullmatch(n))
  if legacy:
    raise CheckpointError(
        f"{source} uses the legacy VAE attention naming ({', '.join(legacy[:4])}"
        f"{', ...' if len(legacy) > 4 else ''}); only the current diffusers naming "
        "(attentions.0.to_q/to_k/to_v/to_out.0) is supported: load it once with diffusers "
        "AutoencoderKL.from_pretrained and save_pretrained it to convert")


def load_vae(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> tuple[VAEConfig, dict[str, Any]]:
  """Loads a diffusers ``AutoencoderKL`` component folder (``config.json`` + safetensors).

  Args:
    folder: the ``vae`` folder.
    dtype: compute dtype; ``None`` keeps the config default (float32).
    param_dtype: parameter dtype; ``None`` uses ``dtype`` when given, else float32.

  Returns:
    ``(config, params)`` with params validated against the model.

  Raises:
    CheckpointError: wrong model class, unsupported config, legacy attention naming, or
      missing/unexpected/misshaped tensors (each named).
  """
  folder = os.fspath(folder)
  raw = checkpoint.read_config(folder, ("AutoencoderKL",))
  overrides = {}
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None or dtype is not None:
    overrides["param_dtype"] = param_dtype if param_dtype is not None else dtype
  try:
    config = VAEConfig.from_diffusers(raw, **overrides)
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(folder, 'config.json')}: {e}") from e
  store = checkpoint.open_store(folder)
  check_attention_naming(store, source=folder)
  params = checkpoint.load_params(store, vae_mapping(config), abstract_vae_params(config), source=folder)
  return config, params
