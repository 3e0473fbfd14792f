"""The FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) in Flax linen.

Layout follows ``docs/design.md``: every linear is an ``nn.Dense`` (``[K, N]`` kernels), q/k/v
are fused into ``to_qkv`` (image / joint stream) and ``add_qkv_proj`` (text stream), and the
single block's ``proj_out`` over ``[attn_out; mlp_hidden]`` is split into ``proj_out_attn``
(first ``dim`` input columns, with the bias) and ``proj_out_mlp`` (no bias), whose outputs are
summed. Blocks are standalone modules (:class:`FluxDoubleBlock`, :class:`FluxSingleBlock`) and the
model exposes ``embed`` / ``head`` so that calibration can replay it block by block.

Numerics follow diffusers: LayerNorm / RMSNorm statistics, the sinusoidal timestep embedding and
RoPE are computed in float32; everything else runs in ``config.dtype``. The timestep and
guidance are cast to ``config.dtype`` *before* the ``* 1000`` (as diffusers does, which rounds
them in bf16). diffusers computes the RoPE angles in float64; :func:`flux_rope` reproduces them in
float32 to within ~2e-7 by an exact range reduction (see there).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models.layers import (ATTENTION_IMPLEMENTATIONS, RMSNorm, TimestepMLP, attention, gelu_tanh,
                                        layer_norm, timestep_embedding)
from svdquant_jax.models.layers import as_float_dtype as as_dtype
from svdquant_jax.utils import trees

Array = jax.Array
RotaryEmbedding = tuple[Array, Array]

_ROPE_THETA = 10000.0
_NORM_EPS = 1e-6
TIMESTEP_CHANNELS = 256  # width of the sinusoidal timestep / guidance embedding
_MLP_RATIO = 4


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class FluxConfig:
  """diffusers ``FluxTransformer2DModel`` config plus compute settings.

  The first eleven fields are diffusers' (same names, same defaults). ``dtype`` is the
  activation/compute dtype, ``param_dtype`` the parameter dtype (strings or dtypes, stored as
  ``jnp.dtype``), ``attention_impl`` one of ``layers.ATTENTION_IMPLEMENTATIONS``.
  """
  patch_size: int = 1
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  dtype: Any = "bfloat16"
  param_dtype: Any = "bfloat16"
  attention_impl: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "dtype", as_dtype(self.dtype, "dtype"))
    object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype, "param_dtype"))
    if not isinstance(self.axes_dims_rope, (tuple, list)):
      raise ValueError(f"axes_dims_rope={self.axes_dims_rope!r}: expected a sequence of ints")
    object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
    is_int = lambda v, least: isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= least
    for name in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                 "pooled_projection_dim", "num_layers", "num_single_layers"):
      least = 0 if name in ("num_layers", "num_single_layers") else 1
      if not is_int(getattr(self, name), least):
        raise ValueError(f"{name}={getattr(self, name)!r}: expected an int >= {least}")
    if self.out_channels is not None and not is_int(self.out_channels, 1):
      raise ValueError(f"out_channels={self.out_channels!r}: expected an int >= 1 or None")
    if not isinstance(self.guidance_embeds, (bool, np.bool_)):
      raise ValueError(f"guidance_embeds={self.guidance_embeds!r}: expected a bool")
    axes = self.axes_dims_rope
    if not axes or not all(is_int(d, 2) and d % 2 == 0 for d in axes):
      raise ValueError(f"axes_dims_rope={axes!r}: expected positive even ints (RoPE rotates pairs)")
    if sum(axes) != self.attention_head_dim:
      raise ValueError(f"axes_dims_rope={axes!r} sums to {sum(axes)}, but attention_head_dim is "
                       f"{self.attention_head_dim}; RoPE must cover the whole head")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")

  @property
  def inner_dim(self) -> int:
    """Hidden width ``num_attention_heads * attention_head_dim``."""
    return self.num_attention_heads * self.attention_head_dim

  @property
  def mlp_dim(self) -> int:
    """MLP hidden width (4x, in the double-block feed-forwards and the single-block ``proj_mlp``)."""
    return _MLP_RATIO * self.inner_dim

  @property
  def out_features(self) -> int:
    """Width of the model output: ``patch_size**2 * (out_channels or in_channels)``."""
    return self.patch_size ** 2 * (self.out_channels or self.in_channels)

  def replace(self, **changes: Any) -> "FluxConfig":
    return dataclasses.replace(self, **changes)

  def to_diffusers(self) -> dict[str, Any]:
    """The diffusers ``config.json`` dict (inverse of :meth:`from_diffusers` up to the compute settings)."""
    skip = {"dtype", "param_dtype", "attention_impl"}
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
    out["axes_dims_rope"] = list(self.axes_dims_rope)
    out["guidance_embeds"] = bool(self.guidance_embeds)
    return {"_class_name": "FluxTransformer2DModel", **out}

  @classmethod
  def from_diffusers(cls, config_dict: Mapping[str, Any], **overrides: Any) -> "FluxConfig":
    """Builds a config from a diffusers ``config.json`` dict (keys starting with ``_`` are metadata).

    Args:
      config_dict: the diffusers config; missing keys take diffusers' defaults.
      **overrides: any :class:`FluxConfig` field (``dtype``, ``param_dtype``, ``attention_impl``, ...).

    Raises:
      ValueError: on a key that is not a ``FluxTransformer2DModel`` setting, an unknown override,
        or an unsupported value.
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    diffusers_fields = fields - {"dtype", "param_dtype", "attention_impl"}
    settings = {k: v for k, v in dict(config_dict).items() if not k.startswith("_")}
    unknown = sorted(set(settings) - diffusers_fields)
    if unknown:
      raise ValueError(f"unsupported FluxTransformer2DModel config key(s) {unknown}; "
                       f"known: {sorted(diffusers_fields)}")
    bad_overrides = sorted(set(overrides) - fields)
    if bad_overrides:
      raise ValueError(f"unknown FluxConfig override(s) {bad_overrides}; known: {sorted(fields)}")
    settings.update(overrides)
    return cls(**settings)


_FLUX_1 = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
               axes_dims_rope=(16, 56, 56))
FLUX_PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(**_FLUX_1, guidance_embeds=True),
    "flux-schnell": FluxConfig(**_FLUX_1, guidance_embeds=False),
    # Same architecture, small: every linear's input width is a multiple of 64 (INT4 g64 / NVFP4
    # g16 groups), head_dim 64 (cuDNN-friendly), 2 heads (exercises the head split), guidance on
    # (the superset of dev/schnell paths), unequal RoPE axes (an axis mix-up changes the output),
    # and 2 blocks of each kind (exercises block-to-block hand-over in both stacks).
    "flux-tiny": FluxConfig(patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
                            attention_head_dim=64, num_attention_heads=2, joint_attention_dim=128,
                            pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(8, 28, 28)),
}


# ----------------------------------------------------------------------------- rotary embedding
def _fp32_pieces(values: np.ndarray, count: int) -> np.ndarray:
  """Splits float64 ``values`` into ``count`` float32 pieces; all but the last have 12 significant bits."""
  rest = np.asarray(values, np.float64)
  pieces = []
  for _ in range(count - 1):
    mantissa, exponent = np.frexp(rest)
    head = np.ldexp(np.round(np.ldexp(mantissa, 12)), exponent - 12)
    pieces.append(head.astype(np.float32))
    rest = rest - head
  pieces.append(rest.astype(np.float32))
  return np.stack(pieces)


def _split_12_bits(x: Array) -> tuple[Array, Array]:
  """Splits float32 ``x`` exactly into ``hi`` (12 significant bits) + ``lo``.

  By masking the low 12 mantissa bits rather than Veltkamp's ``c - (c - x)``, which an FMA
  contraction by the compiler would break.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFF000)
  hi = jax.lax.bitcast_convert_type(bits, jnp.float32)
  return hi, x - hi


def flux_rope(ids: Array, axes_dims: Sequence[int], theta: float = _ROPE_THETA) -> RotaryEmbedding:
  """FLUX's 3-axis rotary tables (diffusers ``FluxPosEmbed``, interleaved pairs).

  Axis ``a`` covers ``axes_dims[a]`` head channels with frequencies ``theta**(-2j/axes_dims[a])``;
  column pair ``(2j, 2j+1)`` of the result holds ``cos/sin(ids[:, a] * freq_j)`` twice.

  diffusers evaluates ``pos * freq`` in float64. A plain float32 product is off by up to half an
  ulp of the angle (4e-6 at position 64, 1e-4 at 4096), so the angle is reduced modulo 2*pi
  exactly instead: position and frequency are split into 12-bit pieces whose products are exact
  in float32, and 2*pi is subtracted piecewise (Sterbenz-exact differences). The reduced angle
  is accurate to ~1e-7, and so are the tables, for |position| < 4096.

  Args:
    ids: positions ``[S, len(axes_dims)]`` (any real dtype; cast to float32 as diffusers does).
    axes_dims: channels per axis (even; summing to the head dim).

  Returns:
    ``(cos, sin)``, each ``float32 [S, sum(axes_dims)]``.
  """
  axes_dims = tuple(int(d) for d in axes_dims)
  if ids.ndim != 2 or ids.shape[1] != len(axes_dims):
    raise ValueError(f"ids must have shape [S, {len(axes_dims)}] (one column per RoPE axis), got {ids.shape}")
  freqs = np.concatenate([1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d) for d in axes_dims])
  axis_of_column = np.concatenate([np.full(d // 2, a) for a, d in enumerate(axes_dims)])
  freq_pieces = _fp32_pieces(freqs, 3)                       # [3, D/2]
  two_pi = _fp32_pieces(np.array(2.0 * np.pi), 3)            # [3]
  pos = ids.astype(jnp.float32)[:, axis_of_column]           # [S, D/2]
  pos_hi, pos_lo = _split_12_bits(pos)
  turns = jnp.round(pos * freqs.astype(np.float32) / two_pi.sum())
  angle = ((pos_hi * freq_pieces[0] - turns * two_pi[0]) + (pos_hi * freq_pieces[1] - turns * two_pi[1])
           + (pos_hi * freq_pieces[2] - turns * two_pi[2]) + pos_lo * freqs.astype(np.float32))
  cos = jnp.repeat(jnp.cos(angle), 2, axis=-1)
  sin = jnp.repeat(jnp.sin(angle), 2, axis=-1)
  return cos, sin


def apply_rope(x: Array, rope: RotaryEmbedding) -> Array:
  """Rotates interleaved pairs: ``x [B, S, H, D]`` with tables ``[S, D]``; computed in float32, returns ``x.dtype``."""
  cos, sin = rope
  xf = x.astype(jnp.float32)
  pairs = xf.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
  return out.astype(x.dtype)


# ----------------------------------------------------------------------------- modules
def _dense(config: FluxConfig, features: int, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype, name=name)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
  """``LayerNorm(x) * (1 + scale) + shift`` with per-sample ``shift/scale [B, D]``; x ``[B, S, D]``."""
  return layer_norm(x, _NORM_EPS) * (1 + scale[:, None]) + shift[:, None]


def _clip_fp16(x: Array) -> Array:
  """diffusers clips the residual stream to the fp16 range when running in fp16."""
  if x.dtype == jnp.float16:
    return jnp.clip(x, -65504, 65504)
  return x


class AdaLNModulation(nn.Module):
  """``linear(silu(temb))`` split into ``chunks`` vectors ``[B, dim]`` (adaLN shift/scale/gate)."""
  config: FluxConfig
  chunks: int

  @nn.compact
  def __call__(self, temb: Array) -> list[Array]:
    emb = _dense(self.config, self.chunks * self.config.inner_dim, "linear")(nn.silu(temb))
    return jnp.split(emb, self.chunks, axis=-1)


class FeedForward(nn.Module):
  """``fc2(gelu_tanh(fc1(x)))``, ``[B, S, dim] -> [B, S, dim]`` with a 4x hidden width."""
  config: FluxConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = gelu_tanh(_dense(self.config, self.config.mlp_dim, "fc1")(x))
    return _dense(self.config, self.config.inner_dim, "fc2")(x)


class FluxAttention(nn.Module):
  """FLUX attention with q/k RMSNorm and RoPE.

  ``joint=True`` (double block): image stream ``to_qkv`` and text stream ``add_qkv_proj``,
  attention over ``[text; image]``, outputs through ``to_out`` / ``to_add_out``; returns
  ``(image_out, text_out)``. ``joint=False`` (single block): ``to_qkv`` over the already
  concatenated sequence, no output projection; returns ``[B, S, dim]``.
  """
  config: FluxConfig
  joint: bool

  def _heads(self, x: Array, projection: str, norm_q: str, norm_k: str) -> tuple[Array, Array, Array]:
    cfg = self.config
    qkv = _dense(cfg, 3 * cfg.inner_dim, projection)(x)
    q, k, v = (t.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.attention_head_dim)
               for t in jnp.split(qkv, 3, axis=-1))
    q = RMSNorm(_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=norm_q)(q)
    k = RMSNorm(_NORM_EPS, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=norm_k)(k)
    return q, k, v

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array | None,
               rope: RotaryEmbedding) -> Array | tuple[Array, Array]:
    cfg = self.config
    q, k, v = self._heads(hidden_states, "to_qkv", "norm_q", "norm_k")
    text_len = 0
    if self.joint:
      cq, ck, cv = self._heads(encoder_hidden_states, "add_qkv_proj", "norm_added_q", "norm_added_k")
      text_len = encoder_hidden_states.shape[1]
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    out = attention(q, k, v, implementation=cfg.attention_impl)
    out = out.reshape(*out.shape[:2], cfg.inner_dim).astype(cfg.dtype)
    if not self.joint:
      return out
    image_out = _dense(cfg, cfg.inner_dim, "to_out")(out[:, text_len:])
    text_out = _dense(cfg, cfg.inner_dim, "to_add_out")(out[:, :text_len])
    return image_out, text_out


def _check_rope(rope: RotaryEmbedding, seq_len: int, head_dim: int, block: str) -> None:
  cos, sin = rope
  if cos.shape != (seq_len, head_dim) or sin.shape != (seq_len, head_dim):
    raise ValueError(f"{block}: image_rotary_emb tables have shapes {cos.shape}/{sin.shape}, expected "
                     f"({seq_len}, {head_dim}) for {seq_len} text+image tokens")


class FluxDoubleBlock(nn.Module):
  """Double-stream (MMDiT) block: separate weights per stream, joint attention.

  ``__call__(hidden_states [B, S_img, dim], encoder_hidden_states [B, S_txt, dim], temb [B, dim],
  image_rotary_emb (cos, sin) [S_txt + S_img, head_dim]) -> (encoder_hidden_states, hidden_states)``.
  """
  config: FluxConfig

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, temb: Array,
               image_rotary_emb: RotaryEmbedding) -> tuple[Array, Array]:
    cfg = self.config
    _check_rope(image_rotary_emb, hidden_states.shape[1] + encoder_hidden_states.shape[1], cfg.attention_head_dim,
                self.name or "FluxDoubleBlock")
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLNModulation(cfg, 6, name="norm1")(temb)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLNModulation(
        cfg, 6, name="norm1_context")(temb)
    attn_out, context_attn_out = FluxAttention(cfg, joint=True, name="attn")(
        _modulate(hidden_states, shift_msa, scale_msa), _modulate(encoder_hidden_states, c_shift_msa, c_scale_msa),
        image_rotary_emb)

    hidden_states = hidden_states + gate_msa[:, None] * attn_out
    ff_out = FeedForward(cfg, name="ff")(_modulate(hidden_states, shift_mlp, scale_mlp))
    hidden_states = hidden_states + gate_mlp[:, None] * ff_out

    encoder_hidden_states = encoder_hidden_states + c_gate_msa[:, None] * context_attn_out
    context_ff_out = FeedForward(cfg, name="ff_context")(_modulate(encoder_hidden_states, c_shift_mlp, c_scale_mlp))
    encoder_hidden_states = _clip_fp16(encoder_hidden_states + c_gate_mlp[:, None] * context_ff_out)
    return encoder_hidden_states, hidden_states


class FluxSingleBlock(nn.Module):
  """Single-stream block over ``[text; image]``: attention and MLP in parallel from one adaLN input.

  Same signature and return as :class:`FluxDoubleBlock`; the streams are concatenated inside and
  split again on return.
  """
  config: FluxConfig

  @nn.compact
  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, temb: Array,
               image_rotary_emb: RotaryEmbedding) -> tuple[Array, Array]:
    cfg = self.config
    text_len = encoder_hidden_states.shape[1]
    x = jnp.concatenate([encoder_hidden_states, hidden_states], axis=1)
    _check_rope(image_rotary_emb, x.shape[1], cfg.attention_head_dim, self.name or "FluxSingleBlock")
    shift, scale, gate = AdaLNModulation(cfg, 3, name="norm")(temb)
    normed = _modulate(x, shift, scale)
    mlp_hidden = gelu_tanh(_dense(cfg, cfg.mlp_dim, "proj_mlp")(normed))
    attn_out = FluxAttention(cfg, joint=False, name="attn")(normed, None, image_rotary_emb)
    out = (_dense(cfg, cfg.inner_dim, "proj_out_attn")(attn_out)
           + _dense(cfg, cfg.inner_dim, "proj_out_mlp", use_bias=False)(mlp_hidden))
    x = _clip_fp16(x + gate[:, None] * out)
    return x[:, :text_len], x[:, text_len:]


class FluxTimeTextEmbedding(nn.Module):
  """``timestep_embedder(sinusoid(t)) [+ guidance_embedder(sinusoid(g))] + text_embedder(pooled)``.

  Inputs already scaled by 1000: ``timestep [B]``, ``guidance [B] | None``, ``pooled [B, pooled_dim]``.
  Returns ``temb [B, dim]`` in ``config.dtype``.
  """
  config: FluxConfig

  @nn.compact
  def __call__(self, timestep: Array, guidance: Array | None, pooled: Array) -> Array:
    cfg = self.config
    mlp = functools.partial(TimestepMLP, cfg.inner_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    sinusoid = functools.partial(timestep_embedding, dim=TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                 downscale_freq_shift=0.0)
    temb = mlp(name="timestep_embedder")(sinusoid(timestep).astype(cfg.dtype))
    if cfg.guidance_embeds:
      temb = temb + mlp(name="guidance_embedder")(sinusoid(guidance).astype(cfg.dtype))
    return temb + mlp(name="text_embedder")(pooled)


def _round_to(x: Array, dtype: jnp.dtype) -> Array:
  """Rounds float32 ``x`` to the values of ``dtype``, kept in float32.

  ``lax.reduce_precision`` rather than a pair of casts: XLA drops ``f32 -> bf16 -> f32`` cast
  pairs under jit (``xla_allow_excess_precision``), which would skip the rounding.
  """
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _scale_by_1000(t: Any, dtype: jnp.dtype) -> Array:
  """diffusers' ``t.to(dtype) * 1000``, rounded to ``dtype`` at both steps; returns float32 ``[B]``.

  In bf16 this moves t = 0.3 to 300 and guidance 3.5 to 3504, which the sinusoidal embedding's
  high frequencies resolve; the original model is run (and calibrated) that way.
  """
  return _round_to(_round_to(jnp.asarray(t, jnp.float32), dtype) * 1000, dtype)


def _check_input(name: str, x: Any, shape: tuple[int | None, ...]) -> None:
  got = tuple(np.shape(x))
  if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
    want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
    raise ValueError(f"{name} has shape {list(got)}, expected {want}")


class FluxTransformer2DModel(nn.Module):
  """FLUX.1 transformer; ``__call__`` mirrors diffusers ``FluxTransformer2DModel.forward``.

  ``__call__(hidden_states [B, S_img, in_channels], encoder_hidden_states [B, S_txt, joint_attention_dim],
  pooled_projections [B, pooled_projection_dim], timestep [B] (in [0, 1]; multiplied by 1000 here),
  img_ids [S_img, 3], txt_ids [S_txt, 3], guidance [B] | None) -> [B, S_img, out_features]`` in
  ``config.dtype``. ``guidance`` is required iff ``config.guidance_embeds``.
  """
  config: FluxConfig

  def setup(self):
    cfg = self.config
    self.x_embedder = _dense(cfg, cfg.inner_dim, "x_embedder")
    self.context_embedder = _dense(cfg, cfg.inner_dim, "context_embedder")
    self.time_text_embed = FluxTimeTextEmbedding(cfg)
    self.transformer_blocks = [FluxDoubleBlock(cfg) for _ in range(cfg.num_layers)]
    self.single_transformer_blocks = [FluxSingleBlock(cfg) for _ in range(cfg.num_single_layers)]
    self.norm_out = AdaLNModulation(cfg, 2)
    self.proj_out = _dense(cfg, cfg.out_features, "proj_out")

  def embed(self, hidden_states: Array, encoder_hidden_states: Array, pooled_projections: Array, timestep: Array,
            img_ids: Array, txt_ids: Array, guidance: Array | None = None) -> dict[str, Any]:
    """Model inputs -> the first block's inputs.

    Returns:
      ``dict(hidden_states [B, S_img, dim], encoder_hidden_states [B, S_txt, dim], temb [B, dim],
      image_rotary_emb (cos, sin) float32 [S_txt + S_img, head_dim])``.
    """
    cfg = self.config
    batch, image_len = np.shape(hidden_states)[:2] if np.ndim(hidden_states) == 3 else (None, None)
    text_len = np.shape(encoder_hidden_states)[1] if np.ndim(encoder_hidden_states) == 3 else None
    n_axes = len(cfg.axes_dims_rope)
    _check_input("hidden_states", hidden_states, (None, None, cfg.in_channels))
    _check_input("encoder_hidden_states", encoder_hidden_states, (batch, None, cfg.joint_attention_dim))
    _check_input("pooled_projections", pooled_projections, (batch, cfg.pooled_projection_dim))
    _check_input("timestep", timestep, (batch,))
    _check_input("img_ids", img_ids, (image_len, n_axes))
    _check_input("txt_ids", txt_ids, (text_len, n_axes))
    if cfg.guidance_embeds and guidance is None:
      raise ValueError("guidance is required: this model has guidance_embeds=True (FLUX.1-dev style)")
    if not cfg.guidance_embeds and guidance is not None:
      raise ValueError("guidance must be None: this model has guidance_embeds=False (FLUX.1-schnell style)")
    if guidance is not None:
      _check_input("guidance", guidance, (batch,))
      guidance = _scale_by_1000(guidance, cfg.dtype)

    dt = cfg.dtype
    temb = self.time_text_embed(_scale_by_1000(timestep, dt), guidance,
                                jnp.asarray(pooled_projections, dt))
    ids = jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)], axis=0)
    return dict(hidden_states=self.x_embedder(jnp.asarray(hidden_states, dt)),
                encoder_hidden_states=self.context_embedder(jnp.asarray(encoder_hidden_states, dt)),
                temb=temb, image_rotary_emb=flux_rope(ids, cfg.axes_dims_rope))

  def head(self, hidden_states: Array, temb: Array) -> Array:
    """Last block's image stream ``[B, S_img, dim]`` -> output ``[B, S_img, out_features]``."""
    scale, shift = self.norm_out(temb)
    return self.proj_out(_modulate(hidden_states, shift, scale))

  def __call__(self, hidden_states: Array, encoder_hidden_states: Array, pooled_projections: Array,
               timestep: Array, img_ids: Array, txt_ids: Array, guidance: Array | None = None) -> Array:
    inputs = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                        guidance)
    x, context = inputs["hidden_states"], inputs["encoder_hidden_states"]
    for block in (*self.transformer_blocks, *self.single_transformer_blocks):
      context, x = block(x, context, inputs["temb"], inputs["image_rotary_emb"])
    return self.head(x, inputs["temb"])


# ----------------------------------------------------------------------------- params
def example_inputs(config: FluxConfig, batch: int = 1, image_len: int = 1, text_len: int = 1) -> dict[str, Any]:
  """``jax.ShapeDtypeStruct`` model inputs (keyword arguments of ``__call__``), e.g. for ``eval_shape``."""
  f32 = jnp.float32
  spec = dict(hidden_states=((batch, image_len, config.in_channels), f32),
              encoder_hidden_states=((batch, text_len, config.joint_attention_dim), f32),
              pooled_projections=((batch, config.pooled_projection_dim), f32), timestep=((batch,), f32),
              img_ids=((image_len, len(config.axes_dims_rope)), f32),
              txt_ids=((text_len, len(config.axes_dims_rope)), f32))
  if config.guidance_embeds:
    spec["guidance"] = ((batch,), f32)
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}


def abstract_flux_params(config: FluxConfig) -> dict[str, Any]:
  """The params tree as ``jax.ShapeDtypeStruct`` leaves (an abstract ``init``; nothing is allocated)."""
  model = FluxTransformer2DModel(config)
  inputs = example_inputs(config)
  return jax.eval_shape(model.init, jax.random.key(0), **inputs)["params"]


_INIT_CHUNK = 1 << 16


@functools.lru_cache(maxsize=None)
def _standard_normal(chunks: int):
  """Jitted ``key -> float32 [chunks * _INIT_CHUNK]`` standard normal (one compile per power-of-2 ``chunks``)."""
  return jax.jit(lambda key: jax.random.normal(key, (chunks * _INIT_CHUNK,), jnp.float32))


@functools.lru_cache(maxsize=None)
def _shape_leaf(shape: tuple[int, ...], dtype: jnp.dtype, mean: float, std: float):
  size = math.prod(shape)
  return jax.jit(lambda noise: (mean + std * noise[:size].reshape(shape)).astype(dtype))


def init_flux_params(config: FluxConfig, seed: int) -> dict[str, Any]:
  """Deterministic random params (same config and seed: bit-identical), built leaf by leaf.

  Each leaf draws from its own key, ``fold_in(jax.random.key(seed), crc32(path))``, so no full ``init``
  trace runs and no float32 copy of the model exists (only one leaf at a time). The random
  generator is compiled per power-of-2 bucket of the leaf size (a handful of compiles even at
  FLUX.1 size), the cheap scale/reshape/cast per leaf shape. Kernels ``[K, N]`` ~ N(0, 1/K),
  biases ~ N(0, 0.02^2), RMSNorm scales ~ N(1, 0.1^2); leaves in ``config.param_dtype``.
  """
  root = jax.random.key(seed)
  leaves = {}
  for path, leaf in trees.flatten(abstract_flux_params(config)).items():
    kind = path.rsplit("/", 1)[-1]
    mean, std = {"kernel": (0.0, 1.0 / math.sqrt(leaf.shape[0])), "bias": (0.0, 0.02), "scale": (1.0, 0.1)}[kind]
    key = jax.random.fold_in(root, np.uint32(zlib.crc32(path.encode())))
    chunks = 1 << (-(-math.prod(leaf.shape) // _INIT_CHUNK) - 1).bit_length()
    noise = _standard_normal(chunks)(key)
    leaves[path] = _shape_leaf(tuple(leaf.shape), jnp.dtype(leaf.dtype), mean, std)(noise)
  return trees.unflatten(leaves)
