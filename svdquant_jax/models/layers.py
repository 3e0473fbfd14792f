"""Building blocks shared by the diffusion transformers: attention, norms, timestep embeddings."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def as_float_dtype(value: Any, name: str = "dtype") -> jnp.dtype:
  """``"bf16"`` / ``"bfloat16"`` / ``jnp.bfloat16`` / ... -> one of the supported model dtypes
  (float32, bfloat16, float16), or a ``ValueError`` naming ``name``."""
  if isinstance(value, str):
    value = _DTYPE_NAMES.get(value.lower(), value)
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name}={value!r} is not a dtype") from e
  if dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"{name}={value!r} is not supported; expected float32, bfloat16 or float16")
  return dtype

Array = jax.Array
Dtype = Any

# None: jax picks (cuDNN flash attention on GPU for fp16/bf16 when it can, XLA otherwise).
ATTENTION_IMPLEMENTATIONS = (None, "cudnn", "xla", "reference")


def attention(q: Array, k: Array, v: Array, mask: Array | None = None,
              implementation: str | None = None) -> Array:
  """Scaled dot-product attention.

  Args:
    q: queries ``[B, Tq, H, D]``.
    k: keys ``[B, Tk, H, D]``.
    v: values ``[B, Tk, H, D]``.
    mask: optional boolean mask broadcastable to ``[B, H, Tq, Tk]``; ``True`` = attend.
    implementation: ``None`` (automatic: cuDNN on GPU where supported, else XLA),
      ``"cudnn"``, ``"xla"`` or ``"reference"`` (explicit einsum + float32 softmax).

  Returns:
    ``[B, Tq, H, D]`` in ``q.dtype``.
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"expected one of {ATTENTION_IMPLEMENTATIONS}")
  if implementation == "reference":
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)
  if implementation is None and jax.default_backend() != "gpu":
    implementation = "xla"
  if implementation == "xla" and q.dtype == jnp.float16 and jax.default_backend() == "cpu":
    # XLA:CPU has no fp16 x fp16 -> fp32 dot; compute in fp32 (CPU has no fast fp16 anyway).
    out = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                       mask=mask, implementation="xla")
    return out.astype(q.dtype)
  try:
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  except (ValueError, NotImplementedError, TypeError):
    if implementation is not None:
      raise
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def timestep_embedding(t: Array, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep embedding (DDPM / diffusers ``get_timestep_embedding``).

  ``freq_i = exp(-log(max_period) * i / (dim/2 - downscale_freq_shift))``, the embedding is
  ``[sin(scale*t*freq), cos(scale*t*freq)]`` (or ``[cos, sin]`` when ``flip_sin_to_cos``).

  Args:
    t: timesteps ``[B]`` (any real values).
    dim: embedding width.

  Returns:
    ``float32 [B, dim]`` (zero-padded by one column when ``dim`` is odd).
  """
  half = dim // 2
  # The frequency table is a host constant computed in float64 and rounded once: XLA's float32
  # exp is off by an ulp on some entries, which t ~ 1000 magnifies in the sin/cos arguments.
  # The exponent is rounded to float32 step by step as diffusers does, then exp is taken exactly.
  exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
              / np.float32(half - downscale_freq_shift))
  freqs = np.exp(exponent.astype(np.float64))
  args = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs.astype(np.float32))[None, :] * scale
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepMLP(nn.Module):
  """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding``).

  Input ``[B, in]`` -> output ``[B, features]`` in ``dtype``.
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
    x = nn.silu(x)
    return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(x)


class RMSNorm(nn.Module):
  """RMS norm over the last axis, computed in float32: ``x * rsqrt(mean(x^2) + eps) * scale``.

  Input ``[..., D]`` -> output ``[..., D]`` in ``dtype`` (input dtype when ``None``).
  """
  eps: float = 1e-6
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if scale.dtype in (jnp.float16, jnp.bfloat16):
      # As diffusers: cast to the (half) weight dtype before scaling.
      y = y.astype(scale.dtype) * scale
    else:
      y = y * scale
    return y.astype(self.dtype or x.dtype)


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
  """LayerNorm without affine parameters over the last axis, in float32; returns ``x.dtype``."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def gelu_tanh(x: Array) -> Array:
  """GELU with the tanh approximation (``approximate="tanh"``)."""
  return jax.nn.gelu(x, approximate=True)


# ----------------------------------------------------------------------------- configs from files
def config_from_dict(cls: type, config: Mapping[str, Any], *, required: tuple[str, ...],
                     defaults: Mapping[str, Any], overrides: Mapping[str, Any], what: str) -> Any:
  """A config dataclass from a transformers ``config.json`` dict.

  Args:
    cls: the config dataclass.
    config: the parsed file.
    required: keys the file must have (unless overridden).
    defaults: optional keys with the reference implementation's defaults.
    overrides: field values that replace the file's.
    what: the model's name for error messages (``"T5"``).

  Raises:
    ValueError: naming a missing required key or an unknown override.
  """
  missing = [k for k in required if k not in config and k not in overrides]
  if missing:
    raise ValueError(f"{what} config lacks required key(s) {missing}")
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"unknown {cls.__name__} override(s) {unknown}; fields are {sorted(fields)}")
  values: dict[str, Any] = {k: config[k] for k in required if k in config}
  values.update({k: config.get(k, default) for k, default in defaults.items()})
  values.update(overrides)
  return cls(**values)


def config_from_preset(presets: Mapping[str, Any], name: str, overrides: Mapping[str, Any], what: str) -> Any:
  """``presets[name]`` with ``overrides`` applied; a clear error for an unknown name or field."""
  if name not in presets:
    raise ValueError(f"unknown {what} preset {name!r}; known presets are {sorted(presets)}")
  try:
    return dataclasses.replace(presets[name], **overrides)
  except TypeError as e:
    raise ValueError(f"bad override for {what} preset {name!r}: {e}") from e
