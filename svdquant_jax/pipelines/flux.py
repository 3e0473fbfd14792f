"""The FLUX.1 text-to-image pipeline (diffusers ``FluxPipeline``) in JAX.

Steps, as diffusers (``guidance_scale`` embedded, no true CFG):

1. :meth:`FluxPipeline.encode_prompts`: CLIP pooled output (77 tokens, no attention mask) and
   the T5 last hidden state (``max_sequence_length`` tokens, 512 dev / 256 schnell, no mask);
   ``text_ids`` are zeros ``[L, 3]``.
2. :meth:`FluxPipeline.prepare_latents`: per-prompt Gaussian noise ``[H/8, W/8, 16]`` from
   ``jax.random.key(prompts.prompt_seed(prompt, seed))`` (an image does not depend on the batch
   it is generated in), packed 2x2 into ``[B, (H/16)(W/16), 64]``; ``latent_image_ids`` are
   ``(0, row, column)`` of each packed token.
3. :meth:`FluxPipeline.denoise`: flow-matching Euler over ``schedulers.flux_sigmas`` (with the
   dev resolution-dependent shift ``mu`` when the scheduler config asks for it), one jitted
   transformer call per step with ``timestep = t / 1000`` (``t`` rounded to the latents' dtype
   first, as diffusers) and ``guidance`` for models with a guidance embedding.
4. :meth:`FluxPipeline.decode`: unpack, ``z / scaling_factor + shift_factor``, VAE decode.

Hooks for quantization (both on :meth:`denoise` and ``__call__``):

* ``transformer_fn(params, **inputs) -> output`` replaces the transformer; ``inputs`` are the
  keyword arguments of ``FluxTransformer2DModel.__call__``: ``hidden_states [B, S, 64]``,
  ``encoder_hidden_states [B, L, 4096]``, ``pooled_projections [B, 768]``, ``timestep [B]``
  (float32, in [0, 1]), ``img_ids [S, 3]``, ``txt_ids [L, 3]`` and, only for models with a
  guidance embedding, ``guidance [B]`` (float32). It is wrapped in ``jax.jit`` unless it is
  already jitted; pass a module-level function or a jitted one so that it is compiled once.
  ``transformer_params`` (default: the pipeline's) is its first argument.
* ``on_step(step_index, inputs, output)`` is called after each transformer call with the same
  ``inputs`` dict and the output ``[B, S, 64]`` (e.g. to record calibration data). The PixArt
  pipeline adds a fourth argument ``branch``; a hook serving both takes ``branch=None``.

Guidance on a model without a guidance embedding (FLUX.1-schnell): ``guidance`` must be ``None``
or 0; any other value is refused (diffusers silently ignores it, which hides a wrong setting).

The helpers at the end (prompt and size checks, jitted component calls, per-prompt noise, the
progress display) are shared with :mod:`svdquant_jax.pipelines.pixart`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import tokenizers as tokenizers_lib
from svdquant_jax.models.clip import CLIPTextConfig, CLIPTextModel
from svdquant_jax.models.flux import FluxConfig, FluxTransformer2DModel
from svdquant_jax.pipelines.presets import GenerationDefaults
from svdquant_jax.models.t5 import T5Config, T5Encoder
from svdquant_jax.models.vae import AutoencoderKL, VAEConfig
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import prompts as prompts_lib
from svdquant_jax.pipelines import schedulers
from svdquant_jax.utils.progress import Progress

Array = jax.Array
TransformerFn = Callable[..., Array]
OUTPUT_TYPES = ("uint8", "float", "latent")
_MAX_T5_LENGTH = 512


class PipelineInputError(ValueError):
  """A pipeline was called with bad arguments (prompts, size, steps, guidance, latents)."""


class PipelineConfigError(ValueError):
  """A pipeline's components do not fit together (widths, channels, scheduler kind)."""


class FluxPipeline:
  """FLUX.1 (dev or schnell) from its components.

  Args:
    transformer_config, transformer_params: the FLUX transformer.
    clip_config, clip_params: the CLIP text model (diffusers ``text_encoder``).
    t5_config, t5_params: the T5 encoder (diffusers ``text_encoder_2``).
    vae_config, vae_params: the autoencoder.
    clip_tokenizer, t5_tokenizer: transformers tokenizers (``tokenizer``, ``tokenizer_2``).
    scheduler_config: a :class:`schedulers.FlowMatchConfig`.
    defaults: generation defaults (steps, guidance, size, T5 length).
    name: a label (the preset name or folder) used in messages and saved metadata.

  Raises:
    PipelineConfigError: components that do not fit together, named.
  """
  pipeline_class = "FluxPipeline"

  def __init__(self, *, transformer_config: FluxConfig, transformer_params: Any, clip_config: CLIPTextConfig,
               clip_params: Any, t5_config: T5Config, t5_params: Any, vae_config: VAEConfig, vae_params: Any,
               clip_tokenizer: Any, t5_tokenizer: Any, scheduler_config: schedulers.FlowMatchConfig,
               defaults: GenerationDefaults, name: str = "flux"):
    self.transformer_config, self.transformer_params = transformer_config, transformer_params
    self.clip_config, self.clip_params = clip_config, clip_params
    self.t5_config, self.t5_params = t5_config, t5_params
    self.vae_config, self.vae_params = vae_config, vae_params
    self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
    self.scheduler_config, self.defaults, self.name = scheduler_config, defaults, name
    self._check_components()

  def _check_components(self) -> None:
    tc, vc = self.transformer_config, self.vae_config
    problems = []
    if not isinstance(self.scheduler_config, schedulers.FlowMatchConfig):
      problems.append(f"scheduler_config is a {type(self.scheduler_config).__name__}, expected FlowMatchConfig")
    if tc.patch_size != 1:
      problems.append(f"transformer patch_size={tc.patch_size}; FLUX packs 2x2 latent patches itself (patch_size 1)")
    if tc.in_channels != 4 * vc.latent_channels:
      problems.append(f"transformer in_channels={tc.in_channels} != 4 x VAE latent_channels={vc.latent_channels}")
    if tc.out_features != tc.in_channels:
      problems.append(f"transformer outputs {tc.out_features} channels per token, expected in_channels="
                      f"{tc.in_channels}")
    if len(tc.axes_dims_rope) != 3:
      problems.append(f"transformer axes_dims_rope={tc.axes_dims_rope} must have 3 axes (the ids are (0, row, col))")
    if tc.joint_attention_dim != self.t5_config.d_model:
      problems.append(f"transformer joint_attention_dim={tc.joint_attention_dim} != T5 d_model="
                      f"{self.t5_config.d_model}")
    if tc.pooled_projection_dim != self.clip_config.hidden_size:
      problems.append(f"transformer pooled_projection_dim={tc.pooled_projection_dim} != CLIP hidden_size="
                      f"{self.clip_config.hidden_size}")
    if problems:
      raise PipelineConfigError(f"FLUX pipeline {self.name!r}: " + "; ".join(problems))

  # ---------------------------------------------------------------- properties
  @property
  def size_multiple(self) -> int:
    """Height and width must be multiples of this: the VAE factor (8) x the 2x2 packing."""
    return 2 * self.vae_config.vae_scale_factor

  @property
  def clip_max_length(self) -> int:
    """CLIP token length: the tokenizer's ``model_max_length`` (77), capped by the model's positions."""
    return int(min(self.clip_tokenizer.model_max_length, self.clip_config.max_position_embeddings))

  @property
  def transformer_fn(self) -> TransformerFn:
    """The default (jitted) transformer: ``fn(params, **inputs) -> [B, S, 64]``."""
    return jitted_apply(FluxTransformer2DModel, self.transformer_config)

  # ---------------------------------------------------------------- steps
  def encode_prompts(self, prompts: Sequence[str],
                     max_sequence_length: int | None = None) -> tuple[Array, Array, Array]:
    """Text conditioning of a batch of prompts.

    Returns:
      ``(prompt_embeds [B, L, d_t5] in the T5 dtype, pooled [B, d_clip] in the CLIP dtype,
      text_ids float32 [L, 3] zeros)`` with ``L = max_sequence_length`` (default from
      :attr:`defaults`). Prompts longer than a tokenizer's length are truncated with a warning.
    """
    prompts = check_prompts(prompts)
    length = self.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 1 < length <= _MAX_T5_LENGTH:
      raise PipelineInputError(f"max_sequence_length must be an int in [2, {_MAX_T5_LENGTH}], got {length!r}")
    clip_ids, _ = tokenizers_lib.tokenize(self.clip_tokenizer, prompts, self.clip_max_length)
    _, pooled = jitted_apply(CLIPTextModel, self.clip_config)(self.clip_params, jnp.asarray(clip_ids))
    t5_ids, _ = tokenizers_lib.tokenize(self.t5_tokenizer, prompts, int(length))
    prompt_embeds = jitted_apply(T5Encoder, self.t5_config)(self.t5_params, jnp.asarray(t5_ids))
    return prompt_embeds, pooled, jnp.zeros((int(length), 3), jnp.float32)

  def latent_image_ids(self, height: int, width: int) -> Array:
    """float32 ``[(H/16)(W/16), 3]``: ``(0, row, column)`` of each packed token, row-major."""
    check_size(height, width, self.size_multiple, "FLUX")
    rows, cols = height // self.size_multiple, width // self.size_multiple
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return jnp.asarray(np.stack([np.zeros(rows * cols), r.ravel(), c.ravel()], -1).astype(np.float32))

  def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> tuple[Array, Array]:
    """Initial noise, one ``jax.random.key(seed)`` per image.

    Args:
      seeds: one seed per image (usually :func:`prompt_seeds`).
      height, width: image size, multiples of :attr:`size_multiple`.

    Returns:
      ``(latents [B, (H/16)(W/16), 64] in the transformer dtype, latent_image_ids [(H/16)(W/16), 3])``.
    """
    check_size(height, width, self.size_multiple, "FLUX")
    f = self.vae_config.vae_scale_factor
    noise = gaussian_noise(seeds, (height // f, width // f, self.vae_config.latent_channels))
    latents = pack_latents(noise).astype(self.transformer_config.dtype)
    return latents, self.latent_image_ids(height, width)

  def resolve_guidance(self, guidance: float | None) -> float | None:
    """The guidance value the transformer gets: a float for models with a guidance embedding
    (``None`` -> the default), ``None`` for models without one (which accept only ``None`` or 0)."""
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating))
                                 or not math.isfinite(guidance)):
      raise PipelineInputError(f"guidance must be a finite number or None, got {guidance!r}")
    if self.transformer_config.guidance_embeds:
      return float(self.defaults.guidance if guidance is None else guidance)
    if guidance not in (None, 0):
      raise PipelineInputError(
          f"guidance={guidance}: this FLUX model has no guidance embedding (FLUX.1-schnell style), so guidance "
          "would have no effect; pass guidance=None or 0")
    return None

  def denoise(self, latents: Array, prompt_embeds: Array, pooled_projections: Array, text_ids: Array,
              latent_image_ids: Array, *, num_steps: int | None = None, guidance: float | None = None,
              transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
              on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Array:
    """The flow-matching Euler loop.

    Args:
      latents: packed noise ``[B, S, 64]`` (from :meth:`prepare_latents`).
      prompt_embeds, pooled_projections, text_ids: from :meth:`encode_prompts` (batch B).
      latent_image_ids: ``[S, 3]``.
      num_steps: denoising steps (default from :attr:`defaults`).
      guidance: see :meth:`resolve_guidance`.
      transformer_fn, transformer_params, on_step: the hooks (module docstring).
      progress: show a progress display over the steps (or advance this ``Progress`` by one per step).

    Returns:
      The denoised packed latents ``[B, S, 64]`` in ``latents.dtype``.
    """
    num_steps = check_steps(self.defaults.num_steps if num_steps is None else num_steps)
    batch, seq_len = latents.shape[0], latents.shape[1]
    expected = (batch, seq_len, self.transformer_config.in_channels)
    if latents.ndim != 3 or tuple(latents.shape) != expected:
      raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected {list(expected)} (packed)")
    if tuple(latent_image_ids.shape) != (seq_len, 3):
      raise PipelineInputError(f"latent_image_ids has shape {tuple(latent_image_ids.shape)}, expected [{seq_len}, 3]")
    if prompt_embeds.shape[0] != batch or pooled_projections.shape[0] != batch:
      raise PipelineInputError(f"prompt_embeds / pooled_projections batch {prompt_embeds.shape[0]} / "
                               f"{pooled_projections.shape[0]} != latents batch {batch}")
    guidance = self.resolve_guidance(guidance)
    fn = as_jitted(transformer_fn) if transformer_fn is not None else self.transformer_fn
    params = self.transformer_params if transformer_params is None else transformer_params
    sigmas, timesteps = schedulers.flux_sigmas(self.scheduler_config, num_steps, seq_len)
    dtype = latents.dtype
    with step_progress(progress, num_steps, f"{self.name} denoise") as bar:
      for i in range(num_steps):
        # diffusers: t.to(latents.dtype) / 1000, rounded to the latents dtype.
        t = round_to_dtype(round_to_dtype(timesteps[i], dtype) / np.float32(1000), dtype)
        inputs = dict(hidden_states=latents, encoder_hidden_states=prompt_embeds,
                      pooled_projections=pooled_projections, timestep=jnp.full((batch,), t, jnp.float32),
                      img_ids=latent_image_ids, txt_ids=text_ids)
        if guidance is not None:
          inputs["guidance"] = jnp.full((batch,), guidance, jnp.float32)
        output = fn(params, **inputs)
        if on_step is not None:
          on_step(i, inputs, output)
        latents = _euler_step(latents, output, np.float32(sigmas[i]), np.float32(sigmas[i + 1]))
        if bar is not None:
          bar.update()
    return latents

  def decode(self, latents: Array, height: int | None = None, width: int | None = None) -> Array:
    """Packed latents ``[B, S, 64]`` -> images ``[B, H, W, 3]`` in the VAE dtype, nominally in [-1, 1].

    ``height`` / ``width`` default to a square image (``S`` must then be a square number).
    """
    batch, seq_len = latents.shape[:2]
    m = self.size_multiple
    if height is None and width is None:
      side = math.isqrt(seq_len)
      if side * side != seq_len:
        raise PipelineInputError(f"latents have {seq_len} tokens, not a square grid; pass height and width")
      height = width = side * m
    elif height is None or width is None:
      raise PipelineInputError("pass both height and width, or neither (square)")
    check_size(height, width, m, "FLUX")
    if seq_len != (height // m) * (width // m):
      raise PipelineInputError(f"latents have {seq_len} tokens, but {height}x{width} needs "
                               f"{(height // m) * (width // m)}")
    z = self.vae_config.from_latent(unpack_latents(latents, height // m, width // m))
    return jitted_apply(AutoencoderKL, self.vae_config, "decode")(self.vae_params, z)

  def __call__(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int | None = None, guidance: float | None = None, seed: int = 0,
               latents: Array | None = None, max_sequence_length: int | None = None, output_type: str = "uint8",
               transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
               on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Any:
    """Generates one image per prompt.

    Args:
      prompts: non-empty list of prompts (a single string is one prompt).
      height, width, num_steps, guidance, max_sequence_length: default from :attr:`defaults`.
      seed: base seed; image ``b`` starts from the noise of ``prompt_seed(prompts[b], seed)``.
      latents: packed initial latents ``[B, S, 64]`` instead of the seeded noise.
      output_type: ``"uint8"`` (``[B, H, W, 3]``), ``"float"`` (decoded, [-1, 1]) or ``"latent"``
        (packed, not decoded).
      transformer_fn, transformer_params, on_step, progress: see :meth:`denoise`.
    """
    prompts = check_prompts(prompts)
    if output_type not in OUTPUT_TYPES:
      raise PipelineInputError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    height = self.defaults.height if height is None else height
    width = self.defaults.width if width is None else width
    check_size(height, width, self.size_multiple, "FLUX")
    self.resolve_guidance(guidance)  # refuse a bad guidance before any work
    prompt_embeds, pooled, text_ids = self.encode_prompts(prompts, max_sequence_length)
    if latents is None:
      latents, image_ids = self.prepare_latents(prompt_seeds(prompts, seed), height, width)
    else:
      latents = jnp.asarray(latents, self.transformer_config.dtype)
      image_ids = self.latent_image_ids(height, width)
      expected = (len(prompts), image_ids.shape[0], self.transformer_config.in_channels)
      if tuple(latents.shape) != expected:
        raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected {list(expected)} for "
                                 f"{len(prompts)} prompts at {height}x{width}")
    latents = self.denoise(latents, prompt_embeds, pooled, text_ids, image_ids, num_steps=num_steps,
                           guidance=guidance, transformer_fn=transformer_fn, transformer_params=transformer_params,
                           on_step=on_step, progress=progress)
    if output_type == "latent":
      return latents
    images = self.decode(latents, height, width)
    return images if output_type == "float" else images_lib.to_uint8(images)


# ----------------------------------------------------------------------------- packing
def pack_latents(latents: Array) -> Array:
  """NHWC latents ``[B, h, w, C]`` -> FLUX tokens ``[B, (h/2)(w/2), 4C]``.

  Token ``(i, j)`` holds the 2x2 patch at rows ``2i, 2i+1`` and columns ``2j, 2j+1``, ordered as
  diffusers' ``_pack_latents`` (channel-major: feature ``4c + 2dy + dx``).
  """
  b, h, w, c = latents.shape
  if h % 2 or w % 2:
    raise PipelineInputError(f"latents {h}x{w} must have even height and width to pack 2x2")
  x = latents.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Array, rows: int, cols: int) -> Array:
  """Inverse of :func:`pack_latents`: ``[B, rows*cols, 4C]`` -> ``[B, 2 rows, 2 cols, C]``."""
  b, s, f = tokens.shape
  if s != rows * cols or f % 4:
    raise PipelineInputError(f"cannot unpack tokens of shape {tuple(tokens.shape)} to a {rows}x{cols} grid")
  x = tokens.reshape(b, rows, cols, f // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, 2 * rows, 2 * cols, f // 4)


_euler_step = jax.jit(schedulers.flow_euler_step)


# ----------------------------------------------------------------------------- shared helpers
@functools.lru_cache(maxsize=None)
def jitted_apply(module_cls: type, config: Any, method: str | None = None) -> Callable[..., Any]:
  """``jax.jit`` of ``module_cls(config).apply({"params": params}, *args, method=method, **kwargs)``
  as ``fn(params, *args, **kwargs)``; one function (and one compile per input shape) per config."""
  module = module_cls(config)

  def apply(params, *args, **kwargs):
    return module.apply({"params": params}, *args, method=method, **kwargs)
  return jax.jit(apply)


def as_jitted(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` if it is already jitted (has ``.lower``), else ``jax.jit(fn)`` (jax caches the
  compilation per function object, so a module-level function compiles once)."""
  if not callable(fn):
    raise PipelineInputError(f"transformer_fn must be callable, got {type(fn).__name__}")
  return fn if hasattr(fn, "lower") else jax.jit(fn)


def check_prompts(prompts: Any) -> list[str]:
  """A non-empty list of strings (a single string is one prompt)."""
  if isinstance(prompts, str):
    return [prompts]
  try:
    prompts = list(prompts)
  except TypeError:
    raise PipelineInputError(f"prompts must be a list of strings, got {type(prompts).__name__}") from None
  if not prompts:
    raise PipelineInputError("prompts is empty; pass at least one prompt (an empty string is a valid prompt)")
  for i, prompt in enumerate(prompts):
    if not isinstance(prompt, str):
      raise PipelineInputError(f"prompts[{i}] is a {type(prompt).__name__}, expected str")
  return prompts


def check_size(height: Any, width: Any, multiple: int, model: str) -> None:
  """Raises :class:`PipelineInputError` unless height and width are positive multiples of ``multiple``."""
  for name, value in (("height", height), ("width", width)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise PipelineInputError(f"{name} must be a positive int, got {value!r}")
    if value % multiple:
      lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
      suggestion = f"{lower} or {upper}" if lower else f"{upper}"
      raise PipelineInputError(f"{name}={value} is not a multiple of {multiple} ({model}: VAE factor x 2x2 "
                               f"patches); use {suggestion}")


def check_steps(num_steps: Any) -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise PipelineInputError(f"num_steps must be a positive int, got {num_steps!r}")
  return int(num_steps)


def prompt_seeds(prompts: Sequence[str], seed: int) -> list[int]:
  """One seed per prompt, ``prompts.prompt_seed(prompt, seed)`` (independent of the batch)."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise PipelineInputError(f"seed must be an int, got {seed!r}")
  return [prompts_lib.prompt_seed(p, int(seed)) for p in prompts]


@functools.lru_cache(maxsize=None)
def _normal(shape: tuple[int, ...]) -> Callable[[Array], Array]:
  return jax.jit(lambda key: jax.random.normal(key, shape, jnp.float32))


def gaussian_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Array:
  """float32 ``[len(seeds), *shape]``: row ``b`` is ``jax.random.normal(jax.random.key(seeds[b]), shape)``."""
  seeds = list(seeds)
  if not seeds:
    raise PipelineInputError("seeds is empty")
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**32:
      raise PipelineInputError(f"seeds must be ints in [0, 2**32), got {s!r}")
  draw = _normal(tuple(int(d) for d in shape))
  return jnp.stack([draw(jax.random.key(int(s))) for s in seeds])


def round_to_dtype(value: Any, dtype: Any) -> np.float32:
  """A float32 scalar rounded to the values of ``dtype`` (bf16 / fp16 / fp32)."""
  return np.float32(np.asarray(value, np.float32).astype(jnp.dtype(dtype)).astype(np.float32))


class _Borrowed:
  """Context manager yielding a given value and closing nothing (a shared ``Progress``, or None)."""

  def __init__(self, value: Progress | None):
    self.value = value

  def __enter__(self) -> Progress | None:
    return self.value

  def __exit__(self, *exc) -> None:
    return None


def step_progress(progress: bool | Progress, total: int, desc: str) -> Any:
  """A context manager yielding the ``Progress`` to advance per step: a new one (closed on exit)
  when ``progress`` is True, the given one when it is a ``Progress``, else None."""
  if isinstance(progress, Progress):
    return _Borrowed(progress)
  return Progress(total, desc) if progress else _Borrowed(None)
