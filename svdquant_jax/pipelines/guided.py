"""The part PixArt-Sigma and SANA share: a DPM-Solver loop with classifier-free guidance over a
text-conditioned NHWC latent transformer, the latent decode and the generation call.

A family subclasses :class:`GuidedDPMPipeline` and provides its components (``transformer_config``,
``transformer_params``, ``vae_config``, ``vae_params``, ``scheduler_config``, ``defaults``, ``name``),
``encode_prompts``, ``prepare_latents``, ``transformer_fn`` and the class attributes below; the
hooks say where the two families' numerics differ (diffusers casts differently in each).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import schedulers
from svdquant_jax.pipelines.flux import (OUTPUT_TYPES, PipelineInputError, TransformerFn, as_jitted, check_prompts,
                                         check_size, check_steps, jitted_apply, prompt_seeds, step_progress)
from svdquant_jax.utils.progress import Progress

Array = jax.Array
NEGATIVE_PROMPT = ""


class GuidedDPMPipeline:
  """Base of the CFG + DPM-Solver pipelines (PixArt-Sigma, SANA).

  Class attributes:
    family: the name in size errors (``"PixArt"``).
    vae_model: the Flax autoencoder class whose ``decode`` turns latents into images.
    float32_latents: the latents stay float32 and the transformer's output is upcast before the
      guidance (SANA, as diffusers); otherwise they are in the transformer dtype and the guidance is
      taken in the output dtype (PixArt).
  """
  family: str = ""
  vae_model: Any = None
  transformer_model: Any = None
  float32_latents: bool = False

  # ----------------------------------------------------------------------------- components
  @property
  def size_multiple(self) -> int:
    """Height and width must be multiples of this: the autoencoder's factor x the patch size."""
    return self.vae_config.vae_scale_factor * self.transformer_config.patch_size

  @property
  def transformer_fn(self) -> TransformerFn:
    """The default (jitted) transformer: ``fn(params, **inputs) -> [N, h, w, out_channels]``."""
    return jitted_apply(self.transformer_model, self.transformer_config)

  def _component_problems(self, text_dim: int, text_name: str, vae_name: str) -> list[str]:
    """What the two families check alike: the scheduler, the text width the transformer reads and
    the latent channels it maps."""
    tc, vc = self.transformer_config, self.vae_config
    problems = []
    if not isinstance(self.scheduler_config, schedulers.DPMSolverConfig):
      problems.append(f"scheduler_config is a {type(self.scheduler_config).__name__}, expected DPMSolverConfig")
    if tc.caption_channels != text_dim:
      problems.append(f"transformer caption_channels={tc.caption_channels} != {text_name}={text_dim}")
    if tc.in_channels != vc.latent_channels:
      problems.append(f"transformer in_channels={tc.in_channels} != {vae_name} latent_channels={vc.latent_channels}")
    if tc.out_channels not in (tc.in_channels, 2 * tc.in_channels):
      problems.append(f"transformer out_channels={tc.out_channels}: expected in_channels ({tc.in_channels}) or "
                      "twice that (learned sigma)")
    return problems

  def _sequence_length(self, max_sequence_length: int | None) -> int:
    """``max_sequence_length`` checked (an int >= 2), or the defaults' one."""
    length = self.defaults.max_sequence_length if max_sequence_length is None else max_sequence_length
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 2:
      raise PipelineInputError(f"max_sequence_length must be an int >= 2, got {length!r}")
    return int(length)

  # ----------------------------------------------------------------------------- family hooks
  def encode_negative(self, count: int, length: int) -> tuple[Array, Array]:
    """The negative (empty) prompt encoded ``count`` times at ``length`` tokens."""
    return self.encode_prompts([NEGATIVE_PROMPT] * count, length)

  def model_inputs(self, latents: Array, context: Array, mask: Array, timestep: float) -> dict[str, Array]:
    """The transformer's keyword arguments for one step (``timestep``: the scheduler's value)."""
    return dict(hidden_states=latents, encoder_hidden_states=context,
                timestep=jnp.full((latents.shape[0],), float(timestep), jnp.float32), encoder_attention_mask=mask)

  def conditioning(self, context: Array, mask: Array) -> tuple[Array, Array]:
    """The batched text conditioning as the transformer takes it."""
    return context, mask

  # ----------------------------------------------------------------------------- shared
  def uses_cfg(self, guidance: float) -> bool:
    """Classifier-free guidance runs when ``guidance > 1`` (as diffusers)."""
    return guidance > 1.0

  def resolve_guidance(self, guidance: float | None) -> float:
    if guidance is None:
      return float(self.defaults.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.floating)) or not np.isfinite(guidance):
      raise PipelineInputError(f"guidance must be a finite number or None, got {guidance!r}")
    return float(guidance)

  def _latents_dtype(self) -> Any:
    return jnp.float32 if self.float32_latents else self.transformer_config.dtype

  def _batched_condition(self, batch: int, guidance: float, prompt_embeds: Array, prompt_mask: Array,
                         negative_embeds: Array | None, negative_mask: Array | None) -> tuple[Array, Array, list[str]]:
    """``(context, mask, branch)`` of the transformer batch: ``[uncond; cond]`` under CFG."""
    if prompt_embeds.shape[0] != batch or prompt_mask.shape != prompt_embeds.shape[:2]:
      raise PipelineInputError(f"prompt_embeds {tuple(prompt_embeds.shape)} / prompt_mask {tuple(prompt_mask.shape)} "
                               f"do not match a batch of {batch}")
    if not self.uses_cfg(guidance):
      return prompt_embeds, prompt_mask, ["cond"] * batch
    if negative_embeds is None or negative_mask is None:
      raise PipelineInputError(f"guidance={guidance} > 1 runs classifier-free guidance and needs negative_embeds "
                               "and negative_mask (the encoded empty prompt)")
    if negative_embeds.shape[0] != batch or negative_embeds.shape[2:] != prompt_embeds.shape[2:] \
        or negative_mask.shape != negative_embeds.shape[:2]:
      raise PipelineInputError(f"negative_embeds {tuple(negative_embeds.shape)} / negative_mask "
                               f"{tuple(negative_mask.shape)} do not match prompt_embeds {tuple(prompt_embeds.shape)}")
    if negative_embeds.shape[1] != prompt_embeds.shape[1]:
      raise PipelineInputError(f"negative_embeds has {negative_embeds.shape[1]} tokens, prompt_embeds "
                               f"{prompt_embeds.shape[1]}: encode both at one max_sequence_length")
    context = jnp.concatenate([negative_embeds, prompt_embeds], axis=0)
    mask = jnp.concatenate([negative_mask, prompt_mask], axis=0)
    return context, mask, ["uncond"] * batch + ["cond"] * batch

  def denoise(self, latents: Array, prompt_embeds: Array, prompt_mask: Array,
              negative_embeds: Array | None = None, negative_mask: Array | None = None, *,
              num_steps: int | None = None, guidance: float | None = None,
              transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
              on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Array:
    """The DPM-Solver loop, with classifier-free guidance when ``guidance > 1``.

    Args:
      latents: initial noise ``[B, h, w, C]`` (NHWC).
      prompt_embeds, prompt_mask: from ``encode_prompts``.
      negative_embeds, negative_mask: the encoded empty prompt (required under CFG).
      num_steps, guidance: default from ``defaults``.
      transformer_fn, transformer_params, on_step, progress: the hooks (the family module's docstring).

    Returns:
      Denoised latents ``[B, h, w, C]`` (float32 with ``float32_latents``, else ``latents.dtype``).
    """
    num_steps = check_steps(self.defaults.num_steps if num_steps is None else num_steps)
    guidance = self.resolve_guidance(guidance)
    c = self.transformer_config.in_channels
    if latents.ndim != 4 or latents.shape[-1] != c:
      raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected [B, h, w, {c}] (NHWC)")
    if self.float32_latents:
      latents = jnp.asarray(latents, jnp.float32)
    cfg = self.uses_cfg(guidance)
    context, mask, branch = self._batched_condition(latents.shape[0], guidance, prompt_embeds, prompt_mask,
                                                    negative_embeds, negative_mask)
    context, mask = self.conditioning(context, mask)
    fn = as_jitted(transformer_fn) if transformer_fn is not None else self.transformer_fn
    params = self.transformer_params if transformer_params is None else transformer_params
    timesteps, _ = schedulers.dpm_timesteps(self.scheduler_config, num_steps)
    state = schedulers.dpm_init_state(self.scheduler_config, num_steps, tuple(latents.shape))
    with step_progress(progress, num_steps, f"{self.name} denoise") as bar:
      for i in range(num_steps):
        model_input = jnp.concatenate([latents, latents], axis=0) if cfg else latents
        inputs = self.model_inputs(model_input, context, mask, timesteps[i])
        output = fn(params, **inputs)
        if on_step is not None:
          on_step(i, inputs, output, list(branch))
        latents, state = _guided_dpm_step(self.scheduler_config, state, latents, output, jnp.int32(i),
                                          jnp.float32(guidance), cfg=cfg, channels=c, upcast=self.float32_latents)
        if bar is not None:
          bar.update()
    return latents

  def decode(self, latents: Array) -> Array:
    """Latents ``[B, h, w, C]`` -> images ``[B, f h, f w, 3]`` (``f``: the autoencoder's factor) in
    the autoencoder dtype, nominally in [-1, 1]."""
    if latents.ndim != 4 or latents.shape[-1] != self.vae_config.latent_channels:
      raise PipelineInputError(f"latents has shape {tuple(latents.shape)}, expected [B, h, w, "
                               f"{self.vae_config.latent_channels}]")
    z = self.vae_config.from_latent(latents.astype(self.vae_config.dtype))
    return jitted_apply(self.vae_model, self.vae_config, "decode")(self.vae_params, z)

  def __call__(self, prompts: Sequence[str], *, height: int | None = None, width: int | None = None,
               num_steps: int | None = None, guidance: float | None = None, seed: int = 0,
               latents: Array | None = None, max_sequence_length: int | None = None, output_type: str = "uint8",
               transformer_fn: TransformerFn | None = None, transformer_params: Any = None,
               on_step: Callable[..., None] | None = None, progress: bool | Progress = True) -> Any:
    """Generates one image per prompt (arguments as ``FluxPipeline.__call__``; ``latents`` is NHWC
    ``[B, H/f, W/f, C]``, ``f`` the autoencoder's factor)."""
    prompts = check_prompts(prompts)
    if output_type not in OUTPUT_TYPES:
      raise PipelineInputError(f"output_type={output_type!r}; expected one of {OUTPUT_TYPES}")
    height = self.defaults.height if height is None else height
    width = self.defaults.width if width is None else width
    check_size(height, width, self.size_multiple, self.family)
    guidance = self.resolve_guidance(guidance)
    prompt_embeds, prompt_mask = self.encode_prompts(prompts, max_sequence_length)
    negative_embeds = negative_mask = None
    if self.uses_cfg(guidance):
      negative_embeds, negative_mask = self.encode_negative(len(prompts), prompt_embeds.shape[1])
    f = self.vae_config.vae_scale_factor
    if latents is None:
      latents = self.prepare_latents(prompt_seeds(prompts, seed), height, width)
    else:
      latents = jnp.asarray(latents, self._latents_dtype())
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


@functools.partial(jax.jit, static_argnames=("config", "cfg", "channels", "upcast"))
def _guided_dpm_step(config: schedulers.DPMSolverConfig, state: schedulers.DPMSolverState, latents: Array,
                     output: Array, step_index: Array, guidance: Array, *, cfg: bool, channels: int,
                     upcast: bool) -> tuple[Array, schedulers.DPMSolverState]:
  """CFG combination (in float32 with ``upcast``, else in the output dtype), learned-sigma drop and
  one DPM-Solver++ step."""
  if upcast:
    output = output.astype(jnp.float32)
  if cfg:
    uncond, cond = jnp.split(output, 2, axis=0)
    output = uncond + guidance.astype(output.dtype) * (cond - uncond)
  if output.shape[-1] == 2 * channels:
    output = output[..., :channels]
  return schedulers.dpm_step(config, state, latents, output, step_index)
