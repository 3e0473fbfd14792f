"""The SANA text-to-image pipeline (diffusers ``SanaPipeline``) in JAX.

Steps, as diffusers:

1. :meth:`SanaPipeline.encode_prompts`: each prompt is lower-cased and stripped (diffusers'
   preprocessing without caption cleaning), prefixed with the *complex human instruction*
   (:data:`COMPLEX_HUMAN_INSTRUCTION`, SANA's instruction prefix for Gemma-2-2B-it, lines joined by
   newlines), tokenized (BOS, right padding) to ``n_chi + L - 2`` tokens (``n_chi``: the
   instruction's own token count with BOS, ``L = max_sequence_length``, 300) and encoded by
   Gemma-2 with the attention mask; of the result, token 0 (BOS) and the last ``L - 1`` tokens
   are kept (embeddings and mask), which drops the instruction. The negative (empty) prompt is
   encoded without the instruction at length ``L``.
2. :meth:`SanaPipeline.prepare_latents`: per-prompt float32 noise ``[H/32, W/32, 32]`` (NHWC) from
   ``jax.random.key(prompts.prompt_seed(prompt, seed))``; the latents stay float32 throughout.
3. :meth:`SanaPipeline.denoise`: the flow-matching DPM-Solver++ 2M (``schedulers.SANA_SCHEDULER``:
   flow sigmas, shift 3). The transformer gets the latents and the prompt embeddings in its dtype,
   the integer timestep times ``timestep_scale`` as float32, and the mask; its output is upcast to
   float32. With ``guidance > 1``, classifier-free guidance over the batch ``[uncond; cond]``:
   ``uncond + g (cond - uncond)`` in float32.
4. :meth:`SanaPipeline.decode`: ``latents / scaling_factor`` and the DC-AE decode.

The height and width must be multiples of 32 (the DC-AE factor times the patch size 1).
Resolution binning is not done (the image is generated at the requested size).

Hooks: as :mod:`svdquant_jax.pipelines.pixart`: ``transformer_fn(params, **inputs)`` gets the
keyword arguments of ``SanaTransformer2DModel.__call__``: ``hidden_states [N, h, w, 32]`` (NHWC),
``encoder_hidden_states [N, L, 2304]``, ``timestep [N]`` (float32) and ``encoder_attention_mask
[N, L]`` (int32), ``N = 2B`` under CFG; ``on_step(step_index, inputs, output, branch)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import tokenizers as tokenizers_lib
from svdquant_jax.models.dc_ae import AutoencoderDC, DCAEConfig
from svdquant_jax.models.gemma2 import Gemma2Config, Gemma2Model
from svdquant_jax.models.sana import SanaConfig, SanaTransformer2DModel
from svdquant_jax.pipelines import schedulers
from svdquant_jax.pipelines.flux import (PipelineConfigError, check_prompts, check_size, gaussian_noise,
                                         jitted_apply)
from svdquant_jax.pipelines.guided import NEGATIVE_PROMPT, GuidedDPMPipeline
from svdquant_jax.pipelines.presets import GenerationDefaults

Array = jax.Array

# diffusers SanaPipeline's default ``complex_human_instruction`` (from SANA's app config).
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)


def preprocess_prompt(prompt: str) -> str:
  """diffusers' SANA text preprocessing without caption cleaning: ``prompt.lower().strip()``."""
  return prompt.lower().strip()


class SanaPipeline(GuidedDPMPipeline):
  """SANA from its components.

  Args:
    transformer_config, transformer_params: the SANA transformer.
    text_encoder_config, text_encoder_params: the Gemma-2 encoder (diffusers ``text_encoder``).
    vae_config, vae_params: the DC-AE.
    tokenizer: the Gemma tokenizer (BOS first, right padding).
    scheduler_config: a :class:`schedulers.DPMSolverConfig` (flow sigmas for SANA).
    defaults: generation defaults.
    name: a label used in messages and saved metadata.
    complex_human_instruction: the instruction prefix lines, or ``()`` for none.

  Raises:
    PipelineConfigError: components that do not fit together, named.
  """
  pipeline_class = "SanaPipeline"
  family = "SANA"
  vae_model = AutoencoderDC
  transformer_model = SanaTransformer2DModel
  float32_latents = True

  def __init__(self, *, transformer_config: SanaConfig, transformer_params: Any, text_encoder_config: Gemma2Config,
               text_encoder_params: Any, vae_config: DCAEConfig, vae_params: Any, tokenizer: Any,
               scheduler_config: schedulers.DPMSolverConfig, defaults: GenerationDefaults, name: str = "sana",
               complex_human_instruction: Sequence[str] = COMPLEX_HUMAN_INSTRUCTION):
    self.transformer_config, self.transformer_params = transformer_config, transformer_params
    self.text_encoder_config, self.text_encoder_params = text_encoder_config, text_encoder_params
    self.vae_config, self.vae_params = vae_config, vae_params
    self.tokenizer = tokenizer
    self.scheduler_config, self.defaults, self.name = scheduler_config, defaults, name
    self.complex_human_instruction = tuple(complex_human_instruction or ())
    self._check_components()

  def _check_components(self) -> None:
    problems = self._component_problems(self.text_encoder_config.hidden_size, "Gemma-2 hidden_size", "DC-AE")
    if problems:
      raise PipelineConfigError(f"SANA pipeline {self.name!r}: " + "; ".join(problems))

  def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int | None = None, *,
                     instruction: bool = True) -> tuple[Array, Array]:
    """Gemma-2 conditioning: ``(prompt_embeds [B, L, hidden] in the encoder dtype, mask int32 [B, L])``.

    Args:
      prompts: the prompts.
      max_sequence_length: ``L`` (default from :attr:`defaults`).
      instruction: prefix the complex human instruction (the negative prompt is encoded without).
    """
    prompts = [preprocess_prompt(p) for p in check_prompts(prompts)]
    length = self._sequence_length(max_sequence_length)
    chi = "\n".join(self.complex_human_instruction) if instruction else ""
    if chi:
      total = len(self.tokenizer.encode(chi)) + length - 2
      prompts = [chi + p for p in prompts]
    else:
      total = length
    ids, mask = tokenizers_lib.tokenize(self.tokenizer, prompts, total)
    embeds = jitted_apply(Gemma2Model, self.text_encoder_config)(self.text_encoder_params, jnp.asarray(ids),
                                                                jnp.asarray(mask))
    if chi:   # keep BOS and the last L - 1 tokens (SANA paper, Section 3.1)
      keep = np.concatenate([[0], np.arange(total - length + 1, total)])
      embeds, mask = embeds[:, keep], mask[:, keep]
    return embeds, jnp.asarray(mask)

  def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> Array:
    """Initial float32 noise ``[B, H/32, W/32, C]`` (NHWC), one key per seed."""
    check_size(height, width, self.size_multiple, "SANA")
    f = self.vae_config.vae_scale_factor
    return gaussian_noise(seeds, (height // f, width // f, self.vae_config.latent_channels))

  # Where SANA's numerics differ from PixArt's (as diffusers' SanaPipeline): the text conditioning
  # and the latents enter the transformer in its dtype, the timestep is scaled.
  def encode_negative(self, count: int, length: int) -> tuple[Array, Array]:
    return self.encode_prompts([NEGATIVE_PROMPT] * count, length, instruction=False)

  def conditioning(self, context: Array, mask: Array) -> tuple[Array, Array]:
    return context.astype(self.transformer_config.dtype), jnp.asarray(mask, jnp.int32)

  def model_inputs(self, latents: Array, context: Array, mask: Array, timestep: float) -> dict[str, Array]:
    tc = self.transformer_config
    t = np.float32(np.float32(timestep) * np.float32(tc.timestep_scale))
    return dict(hidden_states=latents.astype(tc.dtype), encoder_hidden_states=context,
                timestep=jnp.full((latents.shape[0],), t, jnp.float32), encoder_attention_mask=mask)
