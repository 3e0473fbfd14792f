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

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from svdquant_jax.models import tokenizers as tokenizers_lib
from svdquant_jax.models.pixart import PixArtConfig, PixArtTransformer2DModel
from svdquant_jax.pipelines.presets import GenerationDefaults
from svdquant_jax.models.t5 import T5Config, T5Encoder
from svdquant_jax.models.vae import AutoencoderKL, VAEConfig
from svdquant_jax.pipelines import schedulers
from svdquant_jax.pipelines.flux import (PipelineConfigError, check_prompts, check_size, gaussian_noise,
                                         jitted_apply)
from svdquant_jax.pipelines.guided import GuidedDPMPipeline

Array = jax.Array
INIT_NOISE_SIGMA = 1.0  # DPMSolverMultistepScheduler.init_noise_sigma


def preprocess_prompt(prompt: str) -> str:
  """diffusers' PixArt text preprocessing without caption cleaning: ``prompt.lower().strip()``."""
  return prompt.lower().strip()


class PixArtSigmaPipeline(GuidedDPMPipeline):
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
  family = "PixArt"
  vae_model = AutoencoderKL
  transformer_model = PixArtTransformer2DModel

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
    problems = self._component_problems(self.t5_config.d_model, "T5 d_model", "VAE")
    if self.transformer_config.use_additional_conditions:
      problems.append("the transformer uses resolution / aspect-ratio micro-conditions (PixArt-alpha), which "
                      "the PixArt-Sigma pipeline does not provide")
    if problems:
      raise PipelineConfigError(f"PixArt-Sigma pipeline {self.name!r}: " + "; ".join(problems))

  def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> tuple[Array, Array]:
    """T5 conditioning: ``(prompt_embeds [B, L, d_t5] in the T5 dtype, attention_mask int32 [B, L])``."""
    prompts = check_prompts(prompts)
    length = self._sequence_length(max_sequence_length)
    ids, mask = tokenizers_lib.tokenize(self.t5_tokenizer, [preprocess_prompt(p) for p in prompts], length)
    embeds = jitted_apply(T5Encoder, self.t5_config)(self.t5_params, jnp.asarray(ids), jnp.asarray(mask))
    return embeds, jnp.asarray(mask)

  def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> Array:
    """Initial noise ``[B, H/8, W/8, C]`` (NHWC) in the transformer dtype, one key per seed."""
    check_size(height, width, self.size_multiple, "PixArt")
    f = self.vae_config.vae_scale_factor
    noise = gaussian_noise(seeds, (height // f, width // f, self.vae_config.latent_channels))
    return (noise * INIT_NOISE_SIGMA).astype(self.transformer_config.dtype)
