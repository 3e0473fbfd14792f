"""The pipeline preset registry: generation defaults per model and the built-in tiny models.

This module is the one place that lists the text-to-image models the project knows by name
(:data:`PIPELINE_PRESETS`) and their generation defaults (:data:`GENERATION_DEFAULTS`);
``svdquant_jax.pipelines.loading.load_pipeline`` resolves names through it.

=============  ===================  =====  ========  ==========  =======  =======================
preset         pipeline             steps  guidance  resolution  T5 len   weights
=============  ===================  =====  ========  ==========  =======  =======================
flux-dev       FluxPipeline            50       3.5   1024x1024      512  a local folder (path=)
flux-schnell   FluxPipeline             4       0     1024x1024      256  a local folder (path=)
pixart-sigma   PixArtSigmaPipeline     20       4.5   1024x1024      300  a local folder (path=)
flux-tiny      FluxPipeline             4       3.5    128x128       128  built in memory (seeded)
pixart-tiny    PixArtSigmaPipeline      4       4.5    128x128       128  built in memory (seeded)
sana-1.6b      SanaPipeline            20       4.5   1024x1024      300  a local folder (path=)
sana-tiny      SanaPipeline             4       4.5    256x256       128  built in memory (seeded)
=============  ===================  =====  ========  ==========  =======  =======================

The tiny presets have the real architectures (FLUX.1-dev with guidance embedding and dynamic
shift; PixArt-Sigma with learned sigma and a padding mask; SANA with Gemma-2, the instruction
prefix, the 32x DC-AE and the flow DPM-Solver) at a small width, byte-level tokenizers
(:mod:`svdquant_jax.models.tokenizers`) and the tiny autoencoders (8x with 16 / 4 latent
channels; SANA: 32x with 32). The "T5 len" column is the text length of every model's encoder
(SANA: Gemma-2, after the instruction prefix is dropped). They run in float32 by default (CPU
smoke runs; pass a dtype to mirror the real precision). One difference from the real model, on
purpose: ``pixart-tiny``'s scheduler uses ``prediction_type="v_prediction"`` instead of
``"epsilon"``. DPM-Solver turns a noise prediction into a data prediction
``x0 = (x - sigma_t eps) / alpha_t``, which amplifies any error of an *untrained* noise predictor
by ``1 / alpha_t`` (156 at t = 999) and makes the latents diverge; with v-prediction
``x0 = alpha_t x - sigma_t v`` stays bounded. The epsilon path itself is what
the real preset uses and what the pipeline parity tests check against diffusers.

Tiny weights (:func:`tiny_components`): deterministic from a seed, created in memory, never
written to the repository, and shaped like trained DiT weights rather than i.i.d. noise, which
SVDQuant results would be meaningless on. After the seeded init (``init_flux_params`` /
``init_pixart_params``), every transformer ``Dense`` kernel ``W [K, N]`` becomes

  ``W = (W_iid + U diag(s) V^T) * c[:, None]``, rescaled to its original Frobenius norm,

with a rank-8 spike of singular values ``s_i = 3 e / (i + 1)`` (``e = 1 + sqrt(N / K)``, the top
singular value of the i.i.d. part) and heavy-tailed input-channel (row) scales ``c`` (log-normal,
sigma 0.6). Activation outliers are planted where trained DiTs have them: a few hidden channels
get large adaLN shift / scale biases (so the inputs of ``to_qkv``, ``add_qkv_proj``, ``fc1``,
``proj_mlp`` carry large per-channel values), a few value channels get large biases (inputs of
``to_out`` / ``to_add_out`` / ``proj_out_attn``), and a few MLP hidden units get large ``fc1``
biases (inputs of ``fc2`` / ``proj_out_mlp`` after the GELU); SANA has no q/k/v biases, so its
value outliers are planted in the cross-attention ``to_kv`` bias and its MLP outliers in the value
half of the GLUMBConv ``conv_inverted`` bias (inputs of ``conv_point`` after the GLU). The tiny VAE
decoder's output layer is halved (:func:`_tiny_vae_params`) so that the images stay in range.

The measured effect (singular-value spikes, per-channel absmax ratios of the layer inputs, image
statistics, each against the plain init) and the commands that reproduce it are in
``docs/quantization.md``, section "Tiny models: how their weights are shaped, and what was
measured"; ``tests/test_pipelines.py::test_tiny_weights_have_spectrum_and_outliers`` checks the
structure.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from svdquant_jax.models.clip import CLIPTextConfig, abstract_clip_params
from svdquant_jax.models.dc_ae import DCAEConfig, dc_ae_preset, init_dc_ae_params
from svdquant_jax.models.flux import FLUX_PRESETS, FluxConfig, init_flux_params
from svdquant_jax.models.gemma2 import GEMMA2_PRESETS, init_gemma2_params
from svdquant_jax.models.pixart import PIXART_PRESETS, PixArtConfig, init_pixart_params
from svdquant_jax.models.sana import SANA_PRESETS, SanaConfig, init_sana_params
from svdquant_jax.models.t5 import T5Config, abstract_t5_params
from svdquant_jax.models.vae import VAEConfig, init_vae_params, vae_preset
from svdquant_jax.pipelines import schedulers
from svdquant_jax.utils import trees

FLUX_PIPELINE = "FluxPipeline"
PIXART_SIGMA_PIPELINE = "PixArtSigmaPipeline"
SANA_PIPELINE = "SanaPipeline"
PIPELINE_CLASSES = (FLUX_PIPELINE, PIXART_SIGMA_PIPELINE, SANA_PIPELINE)
TINY_SEED = 0


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
  """What a pipeline call uses when an argument is left out.

  Attributes:
    num_steps: denoising steps.
    guidance: FLUX-dev: the embedded guidance scale; PixArt: the classifier-free guidance scale
      (CFG runs when > 1); 0 for models without guidance (FLUX-schnell).
    height, width: image size in pixels.
    max_sequence_length: T5 token length (prompts are padded / truncated to it).
  """
  num_steps: int
  guidance: float
  height: int
  width: int
  max_sequence_length: int

  def __post_init__(self):
    for name in ("num_steps", "height", "width", "max_sequence_length"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"GenerationDefaults.{name} must be a positive int, got {value!r}")
    if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or self.guidance < 0:
      raise ValueError(f"GenerationDefaults.guidance must be a non-negative number, got {self.guidance!r}")
    object.__setattr__(self, "guidance", float(self.guidance))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> "GenerationDefaults":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    missing = sorted(fields - set(data))
    if unknown or missing:
      raise ValueError(f"generation defaults: unknown key(s) {unknown}, missing key(s) {missing}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class PipelinePreset:
  """A named model.

  Attributes:
    name: the preset name.
    pipeline_class: ``"FluxPipeline"``, ``"PixArtSigmaPipeline"`` or ``"SanaPipeline"`` (diffusers' name).
    defaults: generation defaults.
    builtin: weights are created in memory by :func:`tiny_components` (else they are read from
      a local diffusers folder).
    source: where the real weights come from (named in errors; nothing is downloaded).
    guidance_embeds: FLUX only: whether the transformer must have a guidance embedding.
  """
  name: str
  pipeline_class: str
  defaults: GenerationDefaults
  builtin: bool
  source: str
  guidance_embeds: bool | None = None


GENERATION_DEFAULTS: dict[str, GenerationDefaults] = {
    "flux-dev": GenerationDefaults(num_steps=50, guidance=3.5, height=1024, width=1024, max_sequence_length=512),
    "flux-schnell": GenerationDefaults(num_steps=4, guidance=0.0, height=1024, width=1024, max_sequence_length=256),
    "pixart-sigma": GenerationDefaults(num_steps=20, guidance=4.5, height=1024, width=1024,
                                       max_sequence_length=300),
    "flux-tiny": GenerationDefaults(num_steps=4, guidance=3.5, height=128, width=128, max_sequence_length=128),
    "pixart-tiny": GenerationDefaults(num_steps=4, guidance=4.5, height=128, width=128, max_sequence_length=128),
    "sana-1.6b": GenerationDefaults(num_steps=20, guidance=4.5, height=1024, width=1024, max_sequence_length=300),
    "sana-tiny": GenerationDefaults(num_steps=4, guidance=4.5, height=256, width=256, max_sequence_length=128),
}

PIPELINE_PRESETS: dict[str, PipelinePreset] = {
    "flux-dev": PipelinePreset("flux-dev", FLUX_PIPELINE, GENERATION_DEFAULTS["flux-dev"], False,
                               "black-forest-labs/FLUX.1-dev", guidance_embeds=True),
    "flux-schnell": PipelinePreset("flux-schnell", FLUX_PIPELINE, GENERATION_DEFAULTS["flux-schnell"], False,
                                   "black-forest-labs/FLUX.1-schnell", guidance_embeds=False),
    "pixart-sigma": PipelinePreset("pixart-sigma", PIXART_SIGMA_PIPELINE, GENERATION_DEFAULTS["pixart-sigma"], False,
                                   "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"),
    "flux-tiny": PipelinePreset("flux-tiny", FLUX_PIPELINE, GENERATION_DEFAULTS["flux-tiny"], True,
                                "built in (svdquant_jax.pipelines.presets.tiny_components)", guidance_embeds=True),
    "pixart-tiny": PipelinePreset("pixart-tiny", PIXART_SIGMA_PIPELINE, GENERATION_DEFAULTS["pixart-tiny"], True,
                                  "built in (svdquant_jax.pipelines.presets.tiny_components)"),
    # deepcompressor quantizes the "_ch5632" conversion, whose GLUMBConv hidden width is padded from
    # 5600 to 5632 (a multiple of 64, as the INT4 activation groups need); both load.
    "sana-1.6b": PipelinePreset("sana-1.6b", SANA_PIPELINE, GENERATION_DEFAULTS["sana-1.6b"], False,
                                "Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers"),
    "sana-tiny": PipelinePreset("sana-tiny", SANA_PIPELINE, GENERATION_DEFAULTS["sana-tiny"], True,
                                "built in (svdquant_jax.pipelines.presets.tiny_components)"),
}


def get_preset(name: str) -> PipelinePreset:
  """The preset called ``name``; ``ValueError`` listing the known names otherwise."""
  if name not in PIPELINE_PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known presets are {sorted(PIPELINE_PRESETS)}")
  return PIPELINE_PRESETS[name]


def inferred_defaults(pipeline_class: str, guidance_embeds: bool | None = None,
                      height: int = 1024, width: int = 1024) -> GenerationDefaults:
  """Defaults for a diffusers folder that records none: dev-like (guidance embedding) or
  schnell-like FLUX, PixArt-Sigma, SANA; the resolution is the model's native one."""
  if pipeline_class == FLUX_PIPELINE:
    base = GENERATION_DEFAULTS["flux-dev" if guidance_embeds else "flux-schnell"]
  elif pipeline_class == PIXART_SIGMA_PIPELINE:
    base = GENERATION_DEFAULTS["pixart-sigma"]
  elif pipeline_class == SANA_PIPELINE:
    base = GENERATION_DEFAULTS["sana-1.6b"]
  else:
    raise ValueError(f"pipeline_class={pipeline_class!r}; expected one of {PIPELINE_CLASSES}")
  return dataclasses.replace(base, height=int(height), width=int(width))


# ----------------------------------------------------------------------------- tiny components
# flux-tiny: FLUX_PRESETS["flux-tiny"] (width 128, joint_attention_dim 128, pooled 64), so the T5
# is t5-tiny at width 128 and the CLIP is clip-tiny (width 64).
TINY_FLUX_T5 = T5Config(vocab_size=384, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4,
                        dtype=jnp.float32, param_dtype=jnp.float32)
TINY_CLIP = CLIPTextConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, max_position_embeddings=77, eos_token_id=257,
                           dtype=jnp.float32, param_dtype=jnp.float32)
# pixart-tiny: PIXART_PRESETS["pixart-tiny"] (caption_channels 64) reads t5-tiny (width 64).
TINY_PIXART_T5 = T5Config(vocab_size=384, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2,
                          dtype=jnp.float32, param_dtype=jnp.float32)
TINY_PIXART_SCHEDULER = dataclasses.replace(schedulers.PIXART_SIGMA_SCHEDULER, prediction_type="v_prediction")

_F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
_SPIKE_RANK = 8
_SPIKE_SCALE = 3.0
_ROW_SCALE_SIGMA = 0.6
_SHIFT_OUTLIER = 8.0      # adaLN shift bias on outlier channels
_SCALE_OUTLIER = 3.0      # adaLN scale bias on outlier channels (LN(x) * (1 + scale))
_VALUE_OUTLIER = 16.0    # value-projection bias on a few channels (attention output outliers)
_MLP_OUTLIER = 6.0        # fc1 bias on a few hidden units (GELU output outliers)


def _rng(seed: int, *labels: str) -> np.random.Generator:
  return np.random.default_rng([int(seed)] + [zlib.crc32(label.encode()) for label in labels])


def structured_kernel(kernel: np.ndarray, rng: np.random.Generator, rank: int = _SPIKE_RANK) -> np.ndarray:
  """An i.i.d. kernel ``[K, N]`` -> the same Frobenius norm with a spiked spectrum and heavy-tailed rows.

  ``W + U diag(s) V^T`` with orthonormal random ``U [K, r]``, ``V [N, r]`` and
  ``s_i = 3 (1 + sqrt(N/K)) / (i + 1)``, then row ``k`` (input channel) times
  ``c_k = exp(0.6 z_k)`` (log-normal), then rescaled to the input's Frobenius norm. float32.
  """
  w = np.asarray(kernel, np.float32)
  k, n = w.shape
  r = min(rank, k, n)
  edge = (math.sqrt(n) + math.sqrt(k)) * float(np.std(w))  # top singular value of an i.i.d. matrix
  u, _ = np.linalg.qr(rng.standard_normal((k, r)))
  v, _ = np.linalg.qr(rng.standard_normal((n, r)))
  s = _SPIKE_SCALE * edge / np.arange(1, r + 1)
  out = w + (u * s) @ v.T
  out *= np.exp(_ROW_SCALE_SIGMA * rng.standard_normal(k))[:, None]
  out *= np.linalg.norm(w) / np.linalg.norm(out)
  return out.astype(np.float32)


def _outlier_channels(rng: np.random.Generator, width: int, count: int) -> np.ndarray:
  return np.sort(rng.choice(width, size=count, replace=False))


def _plant_modulation(bias: np.ndarray, dim: int, shift_chunks: tuple[int, ...], scale_chunks: tuple[int, ...],
                      channels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Large shift / scale biases on ``channels`` of the given chunks of an adaLN bias ``[chunks * dim]``."""
  bias = np.array(bias, np.float32)
  signs = rng.choice([-1.0, 1.0], size=channels.size)
  for c in shift_chunks:
    bias[c * dim + channels] = _SHIFT_OUTLIER * signs
  for c in scale_chunks:
    bias[c * dim + channels] = _SCALE_OUTLIER
  return bias


def _plant(bias: np.ndarray, start: int, width: int, count: int, value: float, rng: np.random.Generator,
           signed: bool = True) -> np.ndarray:
  bias = np.array(bias, np.float32)
  channels = start + _outlier_channels(rng, width, count)
  signs = rng.choice([-1.0, 1.0], size=count) if signed else np.ones(count)
  bias[channels] = value * signs
  return bias


def structure_flux_params(config: FluxConfig, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Spiked spectra, heavy-tailed rows and planted activation outliers (see the module doc) for FLUX."""
  flat = {k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()}
  dim, mlp = config.inner_dim, config.mlp_dim
  rng = _rng(seed, "flux-outliers")
  hidden_outliers = _outlier_channels(rng, dim, max(2, dim // 32))  # shared by all blocks, as in trained DiTs
  for path in sorted(flat):
    if path.endswith("/kernel"):
      flat[path] = structured_kernel(flat[path], _rng(seed, path))
  for i in range(config.num_layers):
    b = f"transformer_blocks_{i}"
    for norm in ("norm1", "norm1_context"):
      flat[f"{b}/{norm}/linear/bias"] = _plant_modulation(flat[f"{b}/{norm}/linear/bias"], dim, (0, 3), (1, 4),
                                                          hidden_outliers, rng)
    for qkv in ("attn/to_qkv", "attn/add_qkv_proj"):
      path = f"{b}/{qkv}/bias"
      flat[path] = _plant(flat[path], 2 * dim, dim, max(2, dim // 64), _VALUE_OUTLIER, rng)
    for ff in ("ff", "ff_context"):
      flat[f"{b}/{ff}/fc1/bias"] = _plant(flat[f"{b}/{ff}/fc1/bias"], 0, mlp, max(2, mlp // 64), _MLP_OUTLIER, rng,
                                          signed=False)
  for i in range(config.num_single_layers):
    b = f"single_transformer_blocks_{i}"
    flat[f"{b}/norm/linear/bias"] = _plant_modulation(flat[f"{b}/norm/linear/bias"], dim, (0,), (1,),
                                                      hidden_outliers, rng)
    flat[f"{b}/attn/to_qkv/bias"] = _plant(flat[f"{b}/attn/to_qkv/bias"], 2 * dim, dim, max(2, dim // 64),
                                           _VALUE_OUTLIER, rng)
    flat[f"{b}/proj_mlp/bias"] = _plant(flat[f"{b}/proj_mlp/bias"], 0, mlp, max(2, mlp // 64), _MLP_OUTLIER, rng,
                                        signed=False)
  return trees.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def structure_pixart_params(config: PixArtConfig, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """The same structure for PixArt: shift / scale rows of each block's ``scale_shift_table``
  (rows 0, 3 shift and 1, 4 scale), self- and cross-attention value biases, ``fc1`` biases."""
  flat = {k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()}
  dim, ffn = config.inner_dim, config.ffn_dim
  rng = _rng(seed, "pixart-outliers")
  hidden_outliers = _outlier_channels(rng, dim, max(2, dim // 32))
  for path in sorted(flat):
    if path.endswith("/kernel") and flat[path].ndim == 2:
      flat[path] = structured_kernel(flat[path], _rng(seed, path))
  for i in range(config.num_layers):
    b = f"transformer_blocks_{i}"
    table = flat[f"{b}/scale_shift_table"].reshape(-1)
    flat[f"{b}/scale_shift_table"] = _plant_modulation(table, dim, (0, 3), (1, 4), hidden_outliers,
                                                       rng).reshape(6, dim)
    if config.attention_bias:
      flat[f"{b}/attn1/to_qkv/bias"] = _plant(flat[f"{b}/attn1/to_qkv/bias"], 2 * dim, dim, max(2, dim // 64),
                                              _VALUE_OUTLIER, rng)
      flat[f"{b}/attn2/to_kv/bias"] = _plant(flat[f"{b}/attn2/to_kv/bias"], dim, dim, max(2, dim // 64),
                                             _VALUE_OUTLIER, rng)
    flat[f"{b}/ff/fc1/bias"] = _plant(flat[f"{b}/ff/fc1/bias"], 0, ffn, max(2, ffn // 64), _MLP_OUTLIER, rng,
                                      signed=False)
  return trees.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def structure_sana_params(config: SanaConfig, params: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """The same structure for SANA: shift / scale rows of each block's ``scale_shift_table``, the
  cross-attention value bias (``attn2/to_kv``) and the value half of the GLUMBConv up-projection
  bias (``ff/conv_inverted``: after SiLU, the depthwise conv and the GLU these reach ``conv_point``)."""
  flat = {k: np.asarray(v, np.float32) for k, v in trees.flatten(params).items()}
  dim, hidden, cross = config.inner_dim, config.ffn_hidden_dim, config.cross_inner_dim
  rng = _rng(seed, "sana-outliers")
  hidden_outliers = _outlier_channels(rng, dim, max(2, dim // 32))
  for path in sorted(flat):
    if path.endswith("/kernel") and flat[path].ndim == 2:
      flat[path] = structured_kernel(flat[path], _rng(seed, path))
  for i in range(config.num_layers):
    b = f"transformer_blocks_{i}"
    table = flat[f"{b}/scale_shift_table"].reshape(-1)
    flat[f"{b}/scale_shift_table"] = _plant_modulation(table, dim, (0, 3), (1, 4), hidden_outliers,
                                                       rng).reshape(6, dim)
    flat[f"{b}/attn2/to_kv/bias"] = _plant(flat[f"{b}/attn2/to_kv/bias"], cross, cross, max(2, cross // 64),
                                           _VALUE_OUTLIER, rng)
    flat[f"{b}/ff/conv_inverted/bias"] = _plant(flat[f"{b}/ff/conv_inverted/bias"], 0, hidden, max(2, hidden // 64),
                                                _MLP_OUTLIER, rng, signed=False)
  return trees.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def init_text_encoder_params(abstract: Mapping[str, Any], seed: int) -> dict[str, Any]:
  """Seeded params for a text encoder's abstract tree (each leaf from ``(seed, crc32(path))``).

  Dense kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1) (token) / N(0, 0.5^2) (positions and
  T5's relative position bias), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.02^2).
  """
  out = {}
  for path, leaf in trees.flatten(abstract).items():
    noise = _rng(seed, path).standard_normal(leaf.shape).astype(np.float32)
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
      value = noise / np.float32(math.sqrt(leaf.shape[0]))
    elif name == "embedding":
      value = noise * np.float32(1.0 if path.startswith(("shared", "token_embedding")) else 0.5)
    elif name == "scale":
      value = 1.0 + np.float32(0.1) * noise
    else:
      value = np.float32(0.02) * noise
    out[path] = jnp.asarray(value.astype(leaf.dtype))
  return trees.unflatten(out)


def _tiny_vae_params(config: VAEConfig, seed: int) -> dict[str, Any]:
  """``init_vae_params`` with the decoder output layer halved and unbiased: the decoder's last
  GroupNorm makes its output scale independent of the latents, and the plain init's images are
  too wide, with many saturated pixels; halving brings them near mean 0 with a moderate spread
  (measured in ``docs/quantization.md``, "Tiny models")."""
  params = init_vae_params(config, seed)
  conv_out = dict(params["decoder"]["conv_out"])
  conv_out["kernel"] = conv_out["kernel"] * 0.5
  conv_out["bias"] = jnp.zeros_like(conv_out["bias"])
  return {**params, "decoder": {**params["decoder"], "conv_out": conv_out}}


def _tiny_dc_ae_params(config: DCAEConfig, seed: int) -> dict[str, Any]:
  """``init_dc_ae_params`` with the decoder output layer scaled by 0.5 and unbiased, as
  :func:`_tiny_vae_params` (the decoder ends in an RMS norm and a ReLU, so its output scale does
  not depend on the latents)."""
  params = init_dc_ae_params(config, seed)
  conv_out = dict(params["decoder"]["conv_out"])
  conv_out["kernel"] = conv_out["kernel"] * 0.5
  conv_out["bias"] = jnp.zeros_like(conv_out["bias"])
  return {**params, "decoder": {**params["decoder"], "conv_out": conv_out}}


@dataclasses.dataclass
class TinyComponents:
  """Configs and float32 params of a tiny pipeline (component names as in diffusers).

  ``components`` maps ``"transformer"``, ``"vae"``, ``"text_encoder"`` (FLUX: CLIP; PixArt: T5;
  SANA: Gemma-2) and, for FLUX, ``"text_encoder_2"`` (T5) to ``(config, params)``; ``scheduler``
  is the scheduler config.
  """
  pipeline_class: str
  components: dict[str, tuple[Any, dict[str, Any]]]
  scheduler: Any


def tiny_components(name: str, seed: int = TINY_SEED) -> TinyComponents:
  """Builds the configs and deterministic params of ``"flux-tiny"``, ``"pixart-tiny"`` or ``"sana-tiny"``
  (float32).

  Same name and seed: bit-identical params. Tokenizers are the byte-level ones of
  :mod:`svdquant_jax.models.tokenizers` (built by the loader).
  """
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int, got {seed!r}")
  if name == "flux-tiny":
    config = FLUX_PRESETS["flux-tiny"].replace(**_F32)
    transformer = structure_flux_params(config, init_flux_params(config, seed), seed)
    vae_config = vae_preset("vae-tiny-16", **_F32)
    return TinyComponents(FLUX_PIPELINE, {
        "transformer": (config, transformer),
        "text_encoder": (TINY_CLIP, init_text_encoder_params(abstract_clip_params(TINY_CLIP), seed + 1)),
        "text_encoder_2": (TINY_FLUX_T5, init_text_encoder_params(abstract_t5_params(TINY_FLUX_T5), seed + 2)),
        "vae": (vae_config, _tiny_vae_params(vae_config, seed + 3)),
    }, schedulers.FLUX_DEV_SCHEDULER)
  if name == "pixart-tiny":
    config = dataclasses.replace(PIXART_PRESETS["pixart-tiny"], **_F32)
    transformer = structure_pixart_params(config, init_pixart_params(config, seed), seed)
    vae_config = vae_preset("vae-tiny-4", **_F32)
    return TinyComponents(PIXART_SIGMA_PIPELINE, {
        "transformer": (config, transformer),
        "text_encoder": (TINY_PIXART_T5, init_text_encoder_params(abstract_t5_params(TINY_PIXART_T5), seed + 2)),
        "vae": (vae_config, _tiny_vae_params(vae_config, seed + 3)),
    }, TINY_PIXART_SCHEDULER)
  if name == "sana-tiny":
    config = SANA_PRESETS["sana-tiny"].replace(**_F32)
    transformer = structure_sana_params(config, init_sana_params(config, seed), seed)
    gemma = dataclasses.replace(GEMMA2_PRESETS["gemma2-tiny"], **_F32)
    vae_config = dc_ae_preset("dc-ae-tiny", **_F32)
    return TinyComponents(SANA_PIPELINE, {
        "transformer": (config, transformer),
        "text_encoder": (gemma, init_gemma2_params(gemma, seed + 2)),
        "vae": (vae_config, _tiny_dc_ae_params(vae_config, seed + 3)),
    }, schedulers.SANA_SCHEDULER)
  raise ValueError(f"{name!r} is not a built-in tiny preset; built-in: "
                   f"{sorted(n for n, p in PIPELINE_PRESETS.items() if p.builtin)}")
