"""Samplers as pure functions: flow-matching Euler (FLUX) and DPM-Solver++ 2M (PixArt-Sigma; with
flow sigmas and flow predictions, SANA's flow-matching DPM-Solver).

Schedules (sigmas, timesteps) are computed once on the host with numpy, in float32 where
diffusers computes in float32, following ``FlowMatchEulerDiscreteScheduler`` (as driven by
``FluxPipeline``) and ``DPMSolverMultistepScheduler`` operation by operation. The step functions
are ``jnp`` and jit-able; the DPM solver's multistep memory is an explicit state, so a pipeline
can run the steps in a Python loop or in ``lax.scan`` with a traced ``step_index``.

Precision: a step upcasts the sample and the model output to float32, computes the update in
float32 and casts the result to the sample's dtype. diffusers casts to the model output's dtype
instead (the same dtype in the FLUX and PixArt pipelines), and with half-precision inputs it
rounds some intermediate products to that half dtype (``dt * model_output`` in the Euler step;
the data prediction and ``D1`` in DPM-Solver), which we do not: in float32 the two agree to
rounding, in bf16/fp16 ours is the more accurate of the two.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# diffusers' bookkeeping keys in a scheduler_config.json; not options.
_META_KEYS = frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values"})


class SchedulerConfigError(ValueError):
  """A scheduler config names an unknown or unimplemented option, or an invalid value."""


def _check_steps(num_steps: Any, name: str = "num_steps") -> int:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"{name} must be a positive int, got {num_steps!r}")
  return int(num_steps)


def _parse_diffusers(cls, config: Mapping[str, Any], class_name: str,
                     fixed: Mapping[str, Any], unused: frozenset[str]) -> Any:
  """Builds a dataclass from a diffusers scheduler config dict.

  Args:
    cls: the dataclass.
    config: the diffusers config (scheduler_config.json contents).
    class_name: the diffusers scheduler class the config must belong to.
    fixed: options implemented only at one value (key -> the only accepted value).
    unused: options whose value has no effect given ``fixed`` (accepted and ignored).
  """
  if not isinstance(config, Mapping):
    raise SchedulerConfigError(f"config must be a mapping, got {type(config).__name__}")
  found_class = config.get("_class_name", class_name)
  if found_class != class_name:
    raise SchedulerConfigError(f"config is for {found_class!r}, expected {class_name!r}")
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in config.items():
    if key in _META_KEYS or key in unused:
      continue
    if key in fields:
      kwargs[key] = value
    elif key in fixed:
      allowed = fixed[key]
      same = (value == allowed) or (isinstance(allowed, float) and isinstance(value, (int, float))
                                    and float(value) == allowed)
      if not same:
        raise SchedulerConfigError(
            f"{class_name} option {key}={value!r} is not implemented (only {key}={allowed!r})")
    else:
      raise SchedulerConfigError(f"{class_name} option {key!r} is unknown to this implementation")
  return cls(**kwargs)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise SchedulerConfigError(f"{name}={value!r} is not implemented (choose from {choices})")


# --------------------------------------------------------------------------- flow matching


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
  """The options of diffusers' ``FlowMatchEulerDiscreteScheduler`` that FLUX uses.

  ``shift`` applies when ``use_dynamic_shifting`` is off; with it on, the shift comes from the
  image sequence length: ``mu`` interpolates linearly from ``base_shift`` at
  ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len`` and sigmas become
  ``e^mu / (e^mu + 1/s - 1)`` (exponential) or ``mu / (mu + 1/s - 1)`` (linear).
  """
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096
  time_shift_type: str = "exponential"

  def __post_init__(self):
    _check_steps(self.num_train_timesteps, "num_train_timesteps")
    _check_choice("time_shift_type", self.time_shift_type, ("exponential", "linear"))
    if self.use_dynamic_shifting:
      for name in ("base_shift", "max_shift"):
        if not isinstance(getattr(self, name), (int, float)):
          raise SchedulerConfigError(f"{name} must be a number with use_dynamic_shifting, "
                                     f"got {getattr(self, name)!r}")
      if self.max_image_seq_len == self.base_image_seq_len:
        raise SchedulerConfigError("max_image_seq_len must differ from base_image_seq_len")
    elif self.shift <= 0:
      raise SchedulerConfigError(f"shift must be positive, got {self.shift}")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "FlowMatchConfig":
    """From a ``FlowMatchEulerDiscreteScheduler`` config dict; unimplemented options raise."""
    fixed = {"invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False,
             "stochastic_sampling": False}
    return _parse_diffusers(cls, config, "FlowMatchEulerDiscreteScheduler", fixed, frozenset())


# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json ("shift" 3.0 is unused there).
FLUX_DEV_SCHEDULER = FlowMatchConfig(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json.
FLUX_SCHNELL_SCHEDULER = FlowMatchConfig(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLOW_MATCH_PRESETS = {"flux.1-dev": FLUX_DEV_SCHEDULER, "flux.1-schnell": FLUX_SCHNELL_SCHEDULER}


def flux_mu(config: FlowMatchConfig, image_seq_len: int) -> float:
  """The dynamic shift ``mu`` for ``image_seq_len`` tokens (FluxPipeline's calculate_shift, float64)."""
  slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
  intercept = config.base_shift - slope * config.base_image_seq_len
  return image_seq_len * slope + intercept


def flux_sigmas(config: FlowMatchConfig, num_steps: int,
                image_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The sigma and timestep schedule FluxPipeline sets for ``num_steps`` steps.

  The pipeline passes ``sigmas = linspace(1, 1/num_steps, num_steps)`` (and ``mu`` from the
  image sequence length) to the scheduler, which casts them to float32, shifts them, scales
  them by ``num_train_timesteps`` to get the timesteps and appends a final sigma of 0.

  Args:
    config: the scheduler config.
    num_steps: number of denoising steps.
    image_seq_len: packed latent tokens, ``(height // 16) * (width // 16)`` for FLUX; required
      with dynamic shifting, unused otherwise.

  Returns:
    ``(sigmas float32 [num_steps + 1], timesteps float32 [num_steps])``. The transformer takes
    ``timesteps / 1000`` (in the model dtype), the Euler step ``sigmas[i], sigmas[i + 1]``.
  """
  num_steps = _check_steps(num_steps)
  f32 = np.float32
  sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(f32)
  if config.use_dynamic_shifting:
    if image_seq_len is None or isinstance(image_seq_len, bool) or image_seq_len < 1:
      raise ValueError(f"image_seq_len must be a positive int with dynamic shifting, got {image_seq_len!r}")
    mu = flux_mu(config, image_seq_len)
    stretch = f32(1) / sigmas - f32(1)  # (1/t - 1) ** 1.0: the pipeline's exponent is 1
    if config.time_shift_type == "exponential":
      exp_mu = f32(math.exp(mu))
      sigmas = exp_mu / (exp_mu + stretch)
    else:
      sigmas = f32(mu) / (f32(mu) + stretch)
  else:
    sigmas = f32(config.shift) * sigmas / (f32(1) + f32(config.shift - 1) * sigmas)
  timesteps = (sigmas * f32(config.num_train_timesteps)).astype(f32)
  sigmas = np.concatenate([sigmas, np.zeros(1, f32)]).astype(f32)
  return sigmas, timesteps


def flow_euler_step(sample: jax.Array, model_output: jax.Array, sigma: jax.Array | float,
                    sigma_next: jax.Array | float) -> jax.Array:
  """One Euler step of the flow ODE: ``sample + (sigma_next - sigma) * model_output``.

  Args:
    sample: the current latents, any shape and float dtype.
    model_output: the predicted velocity, same shape.
    sigma, sigma_next: float32 scalars, ``sigmas[i]`` and ``sigmas[i + 1]``.

  Returns:
    The next latents, computed in float32, in ``sample.dtype``.
  """
  if sample.shape != model_output.shape:
    raise ValueError(f"sample {sample.shape} and model_output {model_output.shape} differ in shape")
  dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
  prev = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
  return prev.astype(sample.dtype)


# --------------------------------------------------------------------------- DPM-Solver++


@dataclasses.dataclass(frozen=True)
class DPMSolverConfig:
  """The options of diffusers' ``DPMSolverMultistepScheduler`` implemented here.

  Implemented: ``beta_schedule`` linear / scaled_linear, ``prediction_type`` epsilon /
  v_prediction / sample / flow_prediction, ``algorithm_type`` dpmsolver++ only, ``solver_order``
  1 or 2, ``solver_type`` midpoint / heun, ``lower_order_final``, ``euler_at_final``,
  ``final_sigmas_type`` zero / sigma_min, ``timestep_spacing`` linspace / leading / trailing,
  ``steps_offset``, and flow sigmas (``use_flow_sigmas`` with ``flow_shift``: SANA's
  flow-matching DPM-Solver, see :func:`dpm_timesteps`). Not implemented (refused by
  ``from_diffusers``): trained betas, thresholding, Karras/exponential/beta/Lu sigmas, clipped
  lambdas, learned variance, zero-terminal-SNR rescaling, dynamic shifting, the SDE and non-++
  variants, order 3.

  With flow sigmas, ``sigma`` is the flow time: ``x_sigma = (1 - sigma) x0 + sigma noise``, i.e.
  ``alpha_t = 1 - sigma``, ``sigma_t = sigma`` in the solver, and a ``flow_prediction`` output
  ``v`` gives ``x0 = x - sigma v``. Flow sigmas need ``prediction_type="flow_prediction"`` and
  flow predictions need flow sigmas (diffusers accepts the other pairs but they are not models).
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  prediction_type: str = "epsilon"
  algorithm_type: str = "dpmsolver++"
  solver_order: int = 2
  solver_type: str = "midpoint"
  lower_order_final: bool = True
  euler_at_final: bool = False
  final_sigmas_type: str = "zero"
  timestep_spacing: str = "linspace"
  steps_offset: int = 0
  use_flow_sigmas: bool = False
  flow_shift: float = 1.0

  def __post_init__(self):
    _check_steps(self.num_train_timesteps, "num_train_timesteps")
    _check_choice("beta_schedule", self.beta_schedule, ("linear", "scaled_linear"))
    _check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample", "flow_prediction"))
    _check_choice("algorithm_type", self.algorithm_type, ("dpmsolver++",))
    _check_choice("solver_order", self.solver_order, (1, 2))
    _check_choice("solver_type", self.solver_type, ("midpoint", "heun"))
    _check_choice("final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
    _check_choice("timestep_spacing", self.timestep_spacing, ("linspace", "leading", "trailing"))
    if not 0 < self.beta_start < self.beta_end < 1:
      raise SchedulerConfigError(
          f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
    if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int):
      raise SchedulerConfigError(f"steps_offset must be an int, got {self.steps_offset!r}")
    if not isinstance(self.use_flow_sigmas, bool):
      raise SchedulerConfigError(f"use_flow_sigmas must be a bool, got {self.use_flow_sigmas!r}")
    if self.use_flow_sigmas != (self.prediction_type == "flow_prediction"):
      raise SchedulerConfigError(f"use_flow_sigmas={self.use_flow_sigmas} with prediction_type="
                                 f"{self.prediction_type!r}: flow sigmas go with flow_prediction only")
    if isinstance(self.flow_shift, bool) or not isinstance(self.flow_shift, (int, float)) or not self.flow_shift > 0:
      raise SchedulerConfigError(f"flow_shift must be a positive number, got {self.flow_shift!r}")

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "DPMSolverConfig":
    """From a ``DPMSolverMultistepScheduler`` config dict; unimplemented options raise."""
    fixed = {"trained_betas": None, "thresholding": False, "use_karras_sigmas": False,
             "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
             "lambda_min_clipped": -math.inf, "variance_type": None,
             "rescale_betas_zero_snr": False, "use_dynamic_shifting": False}
    # Only read by thresholding and dynamic shifting, both refused above.
    unused = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "time_shift_type"})
    config = dict(config)
    if "flow_shift" in config and not config.get("use_flow_sigmas", False):
      config.pop("flow_shift")   # read only with flow sigmas
    return _parse_diffusers(cls, config, "DPMSolverMultistepScheduler", fixed, unused)


# PixArt-Sigma (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, 512-MS, ...): diffusers'
# scripts/convert_pixart_sigma_to_diffusers.py builds the shipped scheduler as
# `DPMSolverMultistepScheduler()`, i.e. all defaults: linear betas 1e-4..0.02 over 1000 steps,
# epsilon, dpmsolver++, order 2, midpoint, lower_order_final, final sigma zero, "linspace"
# spacing (steps_offset 0, which linspace ignores anyway).
PIXART_SIGMA_SCHEDULER = DPMSolverConfig()
# SANA (Efficient-Large-Model/Sana_1600M_1024px*_diffusers scheduler/scheduler_config.json): the
# defaults above with flow sigmas, flow_shift 3 and flow predictions (deepcompressor's "flowdpm").
SANA_SCHEDULER = DPMSolverConfig(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _alphas_cumprod(config: DPMSolverConfig) -> np.ndarray:
  """float32 [num_train_timesteps], the cumulative product of 1 - beta.

  The betas are the float64 linspace rounded to float32 (torch's float32 linspace differs from
  it by at most an ulp in places, depending on its vector width); torch accumulates the float32
  cumprod in float64, as here.
  """
  n = config.num_train_timesteps
  if config.beta_schedule == "linear":
    betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
  else:
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32)
    betas = np.square(betas)
  alphas = np.float32(1) - betas
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def dpm_timesteps(config: DPMSolverConfig, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """The timesteps and sigmas ``DPMSolverMultistepScheduler.set_timesteps(num_steps)`` sets.

  Returns:
    ``(timesteps int32 [num_steps], sigmas float32 [num_steps + 1])``: the discrete training
    timesteps the model is evaluated at (descending) and ``sqrt((1 - ᾱ_t) / ᾱ_t)`` at each of
    them (with flow sigmas: the shifted flow times ``s t / (1 + (s - 1) t)`` of
    ``t = 1 - linspace(1, 1/N, num_steps + 1)``, descending, and the timesteps ``int(sigma N)``),
    followed by the final sigma (0, or sigma at t = 0 for ``final_sigmas_type="sigma_min"``).

  Raises:
    ValueError: a step count for which the spacing yields repeated or out-of-range timesteps
      (e.g. diffusers' "trailing" spacing yields num_steps + 1 timesteps ending at -1 for some
      counts such as 61).
  """
  num_steps = _check_steps(num_steps)
  n_train = config.num_train_timesteps
  if num_steps > n_train:
    raise ValueError(f"num_steps={num_steps} exceeds num_train_timesteps={n_train}")
  if config.use_flow_sigmas:
    # diffusers: shifted flow times from 1 - linspace(1, 1/N, n + 1) in float64, the largest first;
    # the timesteps are sigma * N truncated to integers (timestep_spacing does not apply).
    t = 1.0 - np.linspace(1.0, 1.0 / n_train, num_steps + 1)
    shift = float(config.flow_shift)
    flow = np.flip(shift * t / (1.0 + (shift - 1.0) * t))[:-1].copy()
    timesteps = (flow * n_train).astype(np.int64)
    if np.any(np.diff(timesteps) >= 0):
      raise ValueError(f"flow sigmas with num_steps={num_steps} give repeated timesteps {timesteps.tolist()}")
    final = _final_sigma(config)
    return timesteps.astype(np.int32), np.concatenate([flow, [final]]).astype(np.float32)
  last = n_train  # lambda_min_clipped = -inf clips nothing
  if config.timestep_spacing == "linspace":
    timesteps = np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
  elif config.timestep_spacing == "leading":
    ratio = last // (num_steps + 1)
    timesteps = (np.arange(num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
    timesteps = timesteps + config.steps_offset
  else:
    ratio = n_train / num_steps
    timesteps = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
  if (len(timesteps) != num_steps or timesteps.min() < 0 or timesteps.max() >= n_train
      or np.any(np.diff(timesteps) >= 0)):
    raise ValueError(
        f"timestep_spacing={config.timestep_spacing!r} with num_steps={num_steps} gives the "
        f"timesteps {timesteps.tolist()}, not {num_steps} distinct descending values in "
        f"[0, {n_train}); choose another num_steps")
  alphas_cumprod = _alphas_cumprod(config)
  sigma_table = np.sqrt((np.float32(1) - alphas_cumprod) / alphas_cumprod)
  sigmas = np.concatenate([sigma_table[timesteps], [_final_sigma(config)]]).astype(np.float32)
  return timesteps.astype(np.int32), sigmas


def _final_sigma(config: DPMSolverConfig) -> np.float32:
  """0, or with ``final_sigmas_type="sigma_min"`` the VP sigma at t = 0 (also with flow sigmas, as diffusers)."""
  if config.final_sigmas_type != "sigma_min":
    return np.float32(0)
  a0 = _alphas_cumprod(config)[0]
  return np.float32(np.sqrt((np.float32(1) - a0) / a0))


class DPMSolverState(NamedTuple):
  """The multistep solver's memory (a pytree, usable as a ``lax.scan`` carry).

  Attributes:
    sigmas: float32 [num_steps + 1], from :func:`dpm_timesteps`.
    prev_x0: float32, the sample's shape: the previous step's data prediction (zeros before
      the first step; not read by the first step).
  """
  sigmas: jax.Array
  prev_x0: jax.Array


def dpm_init_state(config: DPMSolverConfig, num_steps: int,
                   sample_shape: tuple[int, ...]) -> DPMSolverState:
  """The state before step 0 of a ``num_steps`` run on samples of ``sample_shape``."""
  _, sigmas = dpm_timesteps(config, num_steps)
  return DPMSolverState(sigmas=jnp.asarray(sigmas), prev_x0=jnp.zeros(sample_shape, jnp.float32))


def _alpha_sigma(sigma: jax.Array, flow: bool = False) -> tuple[jax.Array, jax.Array]:
  """VP parameterization: alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t; flow sigmas:
  alpha_t = 1 - sigma, sigma_t = sigma."""
  if flow:
    return 1.0 - sigma, sigma
  alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
  return alpha, sigma * alpha


def dpm_step(config: DPMSolverConfig, state: DPMSolverState, sample: jax.Array,
             model_output: jax.Array, step_index: int | jax.Array) -> tuple[jax.Array, DPMSolverState]:
  """One DPM-Solver++ step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``.

  As ``DPMSolverMultistepScheduler.step``: the model output is converted to a data prediction
  x0; step 0 is first order (no previous x0 yet), later steps are second order (``solver_order``
  2) except the last step, which is first order when ``final_sigmas_type`` is "zero",
  ``euler_at_final`` is set, or ``lower_order_final`` is set and ``num_steps < 15``.
  Steps must be taken in order 0, 1, ..., num_steps - 1 starting from :func:`dpm_init_state`.

  Args:
    config: the solver config (static).
    state: the solver state.
    sample: the current latents (any shape, float dtype).
    model_output: the model's prediction (epsilon, v or x0 per ``prediction_type``), same shape.
    step_index: Python int or int32 scalar (may be traced).

  Returns:
    ``(next sample in sample.dtype, new state)``.
  """
  if sample.shape != model_output.shape or sample.shape != state.prev_x0.shape:
    raise ValueError(f"sample {sample.shape}, model_output {model_output.shape} and the state's "
                     f"prev_x0 {state.prev_x0.shape} must have the same shape")
  num_steps = state.sigmas.shape[0] - 1
  if isinstance(step_index, (int, np.integer)) and not 0 <= step_index < num_steps:
    raise ValueError(f"step_index={step_index} is outside [0, {num_steps})")
  i = jnp.asarray(step_index, jnp.int32)
  sigmas = state.sigmas
  flow = config.use_flow_sigmas
  alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1], flow)
  alpha_s0, sigma_s0 = _alpha_sigma(sigmas[i], flow)
  alpha_s1, sigma_s1 = _alpha_sigma(sigmas[jnp.maximum(i - 1, 0)], flow)

  x = sample.astype(jnp.float32)
  out = model_output.astype(jnp.float32)
  if config.prediction_type == "epsilon":
    x0 = (x - sigma_s0 * out) / alpha_s0
  elif config.prediction_type == "v_prediction":
    x0 = alpha_s0 * x - sigma_s0 * out
  elif config.prediction_type == "flow_prediction":
    x0 = x - sigma_s0 * out
  else:
    x0 = out

  # lambda = log(alpha / sigma), the half log-SNR; h is the step in lambda.
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
  h = lambda_t - lambda_s0
  r0 = (lambda_s0 - lambda_s1) / h
  first_order = (i == 0) | (config.solver_order == 1)
  if (config.euler_at_final or (config.lower_order_final and num_steps < 15)
      or config.final_sigmas_type == "zero"):
    first_order = first_order | (i == num_steps - 1)

  decay = jnp.exp(-h) - 1.0
  prev = (sigma_t / sigma_s0) * x - (alpha_t * decay) * x0
  # Second-order correction with D1 = (x0 - prev_x0) / r0. Its coefficients are zeroed (as
  # scalars, before they touch the tensors) on first-order steps, where they may be inf/nan
  # (h0 = 0 at step 0; h = inf when the final sigma is 0).
  inv_r0 = jnp.where(first_order, 0.0, 1.0 / r0)
  if config.solver_type == "midpoint":
    coeff = jnp.where(first_order, 0.0, 0.5 * (alpha_t * decay))
    prev = prev - coeff * (inv_r0 * (x0 - state.prev_x0))
  else:
    coeff = jnp.where(first_order, 0.0, alpha_t * (decay / h + 1.0))
    prev = prev + coeff * (inv_r0 * (x0 - state.prev_x0))
  return prev.astype(sample.dtype), DPMSolverState(sigmas=sigmas, prev_x0=x0)
