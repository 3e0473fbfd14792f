"""The PixArt-Sigma text-to-image pipeline (diffusers ``PixArtSigmaPipeline``) in JAX.

Steps, as diffusers:

1. :meth:`PixArtSigmaPipeline.encode_prompts`: each prompt is lower-cased and stripped (diffusers'
   preprocessing when caption cleaning is off or its optional ``bs4`` / ``ftfy`` dependencies are
   missing; the full caption cleaning is not implemented), tokenized to ``max_sequence_length``
   (300) and encoded by T5 with the attention mask; the mask also goes to the transformer.
2. :meth:`PixArtSigmaPipeline.prepare_latents`: per-prompt noise ``[H/8, W/8, 4]`` (NHWC) from
   ``jax.random.key(prompts.prompt_seed(prompt, seed))`` times the scheduler's initial sigma (1).
3. :meth:`PixArtSigmaPipeline.denoise`: DPM-Solver++ 2M over ``schedulers.dpm_timesteps``. With
   ``guidance > 1``, classifier-free guidance: the batch ``[uncond; cond]`` (uncond = the empty
   prompt) goes through the transformer at once and ``uncond + g (cond - uncond)`` is taken (in
   the output dtype); with a learned-sigma transformer (``out_channels = 2 in_channels``) the
   variance channels are dropped. The transformer gets the integer training timestep as float32.
4. :meth:`PixArtSigmaPipeline.decode`: ``latents / scaling_factor`` and the VAE decode. The SDXL
   VAE overflows in float16 (its config sets ``force_upcast``), so the loader runs it in bfloat16
   or float32 (see ``svdquant_jax.models.vae``).

The height and width must be multiples of 16: the VAE factor 8 times the transformer patch size 2
(diffusers checks only 8, and then fails inside the transformer). Resolution binning
(diffusers' ``use_resolution_binning``) is not done: the image is generated at the requested size,
which equals diffusers with binning for the sizes of its aspect-ratio table (e.g. 1024x1024).

Hooks: as :mod:`svdquant_jax.pipelines.flux`. ``transformer_fn(params, **inputs)`` gets the keyword
arguments of ``PixArtTransformer2DModel.__call__``: ``hidden_states [N, h, w, 4]`` (NHWC),
``encoder_hidden_states [N, L, 4096]``, ``timestep [N]`` (float32) and ``encoder_attention_mask
[N, L]`` (int32), with ``N = 2B`` under CFG. ``on_step(step_index, inputs, output, branch)``
gets those batched inputs, the output ``[N, h, w, out_channels]`` and ``branch``, a list of
``"uncond"`` / ``"cond"`` per row (``["uncond"] * B + ["cond"] * B`` under CFG).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import tokenizers as tokenizers_lib
from svdquant_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from svdquant_jax.pipelines.presets import GenerationDefaults
from svdquant_jax.models.t5 import T5Config, T5Encoder
from svdquant_jax.models.vae import AutoencoderKL, VAEConfig
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import schedulers
from svdquant_jax.pipelines.flux import (OUTPUT_TYPES, PipelineConfigError, PipelineInputError, TransformerFn,
                                         as_jitted, check_prompts, check_size, check_steps, gaussian_noise,
                                         jitted_apply, prompt_seeds, step_progress)
from svdquant_jax.utils.progress import Progress

Array = jax.Array
NEGATIVE_PROMPT = ""
INIT_NOISE_SIGMA = 1.0  # DPMSolverMultistepScheduler.init_noise_sigma


def preprocess_prompt(prompt: str) -> str:
  """diffusers' PixArt text preprocessing without caption cleaning: ``prompt.lower().strip()``."""
  return prompt.lower().strip()


class PixArtSigmaPipeline:
  """PixArt-Sigma from its components.

  Args:
    transformer_config, transformer_params: the PixArt transformer (without micro-conditions).
    t5_config, t5_params: the T5 encoder (diffusers ``text_encoder``).
    vae_config, vae_params: the autoencoder (the SDXL VAE for the real model).
    t5_tokenizer: its tokenizer.
    scheduler_config: a :class:`schedulers.DPMSolverConfig`.
    defaults: generation defaults.
    name: a label used in messages and saved metadata.

  Raises:
    PipelineConfigError: components that do not fit together, named.
  """
  pipeline_class = "PixArtSigmaPipeline"

  def __init__(self, *, transformer_config: PixArtConfig, transformer_params: Any, t5_config: T5Config,
               t5_params: Any, vae_config: VAEConfig, vae_params: Any, t5_tokenizer: Any,
               scheduler_config: schedulers.DPMSolverConfig, defaults: GenerationDefaults, name: str = "pixart"):
    self.transformer_config, self.transformer_params = transformer_config, transformer_params
    self.t5_config, self.t5_params = t5_config, t5_params
    self.vae_config, self.vae_params = vae_config, vae_params
    self.t5_tokenizer = t5_tokenizer
    self.scheduler_config, self.defaults, self.name = scheduler_config, defaults, name
    self._check_components()

  def _check_components(self) -> None:
    tc, vc = self.transformer_config, self.vae_config
    problems = []
    if not isinstance(self.scheduler_config, schedulers.DPMSolverConfig):
      problems.append(f"scheduler_config is a {type(self.scheduler_config).__name__}, expected DPMSolverConfig")
    if tc.use_additional_conditions:
      problems.append("the transformer uses resolution / aspect-ratio micro-conditions (PixArt-alpha), which "
                      "the PixArt-Sigma pipeline does not provide")
    if tc.caption_channels != self.t5_config.d_model:
      problems.append(f"transformer caption_channels={tc.caption_channels} != T5 d_model={self.t5_config.d_model}")
    if tc.in_channels != vc.latent_channels:
      problems.append(f"transformer in_channels={tc.in_channels} != VAE latent_channels={vc.latent_channels}")
    if tc.out_channels not in (tc.in_channels, 2 * tc.in_channels):
      problems.append(f"transformer out_channels={tc.out_channels}: expected in_channels ({tc.in_channels}) or "
                      f"twice that (learned sigma)")
    if problems:
      raise PipelineConfigError(f"PixArt-Sigma pipeline {self.name!r}: " + "; ".join(problems))

  @property
  def size_multiple(self) -> int:
    """Height and width must be multiples of this: VAE factor (8) x patch size (2)."""
    return self.vae_config.vae_scale_factor * self.transformer_config.patch_size

  @property
  def transformer_fn(self) -> TransformerFn:
    """The default (jitted) transformer: ``fn(params, **inputs) -> [N, h, w, out_channels]``."""
    return jitted_apply(PixArtTransformer2DModel, self.transformer_config)

  def uses_cfg(self, guidance: float) -> bool:
    """Classifier-free guidance runs when ``guidance > 1`` (as diffusers)."""
    return guidance > 1.0

  def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> tuple[Array, Array]:
    """T5 conditioning: ``(prompt_embeds [B, L, d_t5] in the T5 dtype, attention_mask int32 [B, L])``."""
    prompts = check_prompts(prompts)
    length = self.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
      raise PipelineInputError(f"max_sequence_length must be an int >= 2, got {length!r}")
    ids, mask = tokenizers_lib.tokenize(self.t5_tokenizer, [preprocess_prompt(p) for p in prompts], int(length))
    embeds = jitted_apply(T5Encoder, self.t5_config)(self.t5_params, jnp.asarray(ids), jnp.asarray(mask))
    return embeds, jnp.asarray(mask)

  def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> Array:
    """Initial noise ``[B, H/8, W/8, C]`` (NHWC) in the transformer dtype, one key per seed."""
    check_size(height, width, self.size_multiple, "PixArt")
    f = self.vae_config.vae_scale_factor
    noise = gaussian_noise(seeds, (height // f, width // f, self.vae_config.latent_channels))
    return (noise * INIT_NOISE_SIGMA).astype(self.transformer_config.dtype)

  def resolve_guidance(self, guidance: float | None) -> float:
    if guidance is None:
      return float(self.defaults.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating)) or not np.isfinite(guidance):
      raise PipelineInputError(f"guidance must be a finite number or None, got {guidance!r}")
    return float(guidance)

  def denoise(self, latents: Array, prompt_embeds: Array, prompt_mask: Array,
              negative_embeds: Array | None = None, negative_mask: Array | None = None, *,
              num_steps: int | None = None, guidance: float | None = None,
              transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
              on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Array:
    """The DPM-Solver++ loop, with classifier-free guidance when ``guidance > 1``.

    Args:
      latents: initial noise ``[B, h, w, C]`` (NHWC).
      prompt_embeds, prompt_mask: from :meth:`encode_prompts`.
      negative_embeds, negative_mask: the encoded empty prompt (required under CFG).
      num_steps, guidance: default from :attr:`defaults`.
      transformer_fn, transformer_params, on_step, progress: the hooks (module docstring).

    Returns:
      Denoised latents ``[B, h, w, C]`` in ``latents.dtype``.
    """
    num_steps = check_steps(self.defaults.num_steps if num_steps is None else num_steps)
    guidance = self.resolve_guidance(guidance)
    c = self.transformer_config.in_channels
    if latents.ndim != 4 or latents.shape[-1] != c:
      raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected [B, h, w, {c}] (NHWC)")
    batch = latents.shape[0]
    if prompt_embeds.shape[0] != batch or prompt_mask.shape != prompt_embeds.shape[:2]:
      raise PipelineInputError(f"prompt_embeds {tuple(prompt_embeds.shape)} / prompt_mask {tuple(prompt_mask.shape)} "
                               f"do not match a batch of {batch}")
    cfg = self.uses_cfg(guidance)
    if cfg:
      if negative_embeds is None or negative_mask is None:
        raise PipelineInputError(f"guidance={guidance} > 1 runs classifier-free guidance and needs negative_embeds "
                                 "and negative_mask (the encoded empty prompt)")
      if negative_embeds.shape != prompt_embeds.shape or negative_mask.shape != prompt_mask.shape:
        raise PipelineInputError(f"negative_embeds {tuple(negative_embeds.shape)} must have the shape of prompt_embeds "
                                 f"{tuple(prompt_embeds.shape)}")
      context = jnp.concatenate([negative_embeds, prompt_embeds], axis=0)
      mask = jnp.concatenate([negative_mask, prompt_mask], axis=0)
      branch = ["uncond"] * batch + ["cond"] * batch
    else:
      context, mask, branch = prompt_embeds, prompt_mask, ["cond"] * batch
    fn = as_jitted(transformer_fn) if transformer_fn is not None else self.transformer_fn
    params = self.transformer_params if transformer_params is None else transformer_params
    timesteps, _ = schedulers.dpm_timesteps(self.scheduler_config, num_steps)
    state = schedulers.dpm_init_state(self.scheduler_config, num_steps, tuple(latents.shape))
    with step_progress(progress, num_steps, f"{self.name} denoise") as bar:
      for i in range(num_steps):
        model_input = jnp.concatenate([latents, latents], axis=0) if cfg else latents
        inputs = dict(hidden_states=model_input, encoder_hidden_states=context,
                      timestep=jnp.full((len(branch),), float(timesteps[i]), jnp.float32),
                      encoder_attention_mask=mask)
        output = fn(params, **inputs)
        if on_step is not None:
          on_step(i, inputs, output, list(branch))
        latents, state = _guided_dpm_step(self.scheduler_config, state, latents, output, jnp.int32(i),
                                          jnp.float32(guidance), cfg=cfg, channels=c)
        if bar is not None:
          bar.update()
    return latents

  def decode(self, latents: Array) -> Array:
    """Latents ``[B, h, w, C]`` -> images ``[B, 8h, 8w, 3]`` in the VAE dtype, nominally in [-1, 1]."""
    if latents.ndim != 4 or latents.shape[-1] != self.vae_config.latent_channels:
      raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected [B, h, w, "
                               f"{self.vae_config.latent_channels}]")
    z = self.vae_config.from_latent(latents.astype(self.vae_config.dtype))
    return jitted_apply(AutoencoderKL, self.vae_config, "decode")(self.vae_params, z)

  def __call__(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int | None = None, guidance: float | None = None, seed: int = 0,
               latents: Array | None = None, max_sequence_length: int | None = None, output_type: str = "uint8",
               transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
               on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Any:
    """Generates one image per prompt (arguments as ``FluxPipeline.__call__``; ``latents`` is
    NHWC ``[B, H/8, W/8, C]``)."""
    prompts = check_prompts(prompts)
    if output_type not in OUTPUT_TYPES:
      raise PipelineInputError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    height = self.defaults.height if height is None else height
    width = self.defaults.width if width is None else width
    check_size(height, width, self.size_multiple, "PixArt")
    guidance = self.resolve_guidance(guidance)
    prompt_embeds, prompt_mask = self.encode_prompts(prompts, max_sequence_length)
    negative_embeds = negative_mask = None
    if self.uses_cfg(guidance):
      negative_embeds, negative_mask = self.encode_prompts([NEGATIVE_PROMPT] * len(prompts), prompt_embeds.shape[1])
    f = self.vae_config.vae_scale_factor
    if latents is None:
      latents = self.prepare_latents(prompt_seeds(prompts, seed), height, width)
    else:
      latents = jnp.asarray(latents, self.transformer_config.dtype)
      expected = (len(prompts), height // f, width // f, self.vae_config.latent_channels)
      if tuple(latents.shape) != expected:
        raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected {list(expected)}")
    latents = self.denoise(latents, prompt_embeds, prompt_mask, negative_embeds, negative_mask, num_steps=num_steps,
                           guidance=guidance, transformer_fn=transformer_fn, transformer_params=transformer_params,
                           on_step=on_step, progress=progress)
    if output_type == "latent":
      return latents
    images = self.decode(latents)
    return images if output_type == "float" else images_lib.to_uint8(images)


@functools.partial(jax.jit, static_argnames=("config", "cfg", "channels"))
def _guided_dpm_step(config: schedulers.DPMSolverConfig, state: schedulers.DPMSolverState, latents: Array,
                     output: Array, step_index: Array, guidance: Array, *, cfg: bool,
                     channels: int) -> tuple[Array, schedulers.DPMSolverState]:
  """CFG combination (in the output dtype), learned-sigma drop and one DPM-Solver++ step."""
  if cfg:
    uncond, cond = jnp.split(output, 2, axis=0)
    output = uncond + guidance.astype(output.dtype) * (cond - uncond)
  if output.shape[-1] == 2 * channels:
    output = output[..., :channels]
  return schedulers.dpm_step(config, state, latents, output, step_index)
