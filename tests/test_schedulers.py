"""Samplers against diffusers' schedulers (CPU torch, float32)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from svdquant_jax.pipelines import schedulers as S

# The scheduler_config.json files of the real checkpoints.
FLUX_DEV_JSON = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}
FLUX_SCHNELL_JSON = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
}


def _diffusers_dpm(config: S.DPMSolverConfig) -> DPMSolverMultistepScheduler:
  return DPMSolverMultistepScheduler(**dataclasses.asdict(config))


def _flux_reference(json_config, num_steps, image_seq_len):
  """What FluxPipeline does: custom sigmas plus mu, through retrieve_timesteps."""
  scheduler = FlowMatchEulerDiscreteScheduler.from_config(json_config)
  mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                       scheduler.config.get("max_image_seq_len", 4096),
                       scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
  return scheduler


def test_presets_equal_the_checkpoint_configs():
  assert S.FlowMatchConfig.from_diffusers(FLUX_DEV_JSON) == S.FLUX_DEV_SCHEDULER
  assert S.FlowMatchConfig.from_diffusers(FLUX_SCHNELL_JSON) == S.FLUX_SCHNELL_SCHEDULER
  # PixArt-Sigma ships DPMSolverMultistepScheduler() with default settings; a full saved config
  # (every key diffusers writes) must parse to the preset.
  saved = dict(DPMSolverMultistepScheduler().config)
  assert S.DPMSolverConfig.from_diffusers(saved) == S.PIXART_SIGMA_SCHEDULER
  saved = dict(FlowMatchEulerDiscreteScheduler.from_config(FLUX_DEV_JSON).config)
  assert S.FlowMatchConfig.from_diffusers(saved) == S.FLUX_DEV_SCHEDULER


@pytest.mark.parametrize("num_steps,image_seq_len", [(50, 4096), (28, 1024), (20, 6144), (4, 256), (1, 64)])
def test_flux_dev_sigmas_match_diffusers(num_steps, image_seq_len):
  ref = _flux_reference(FLUX_DEV_JSON, num_steps, image_seq_len)
  sigmas, timesteps = S.flux_sigmas(S.FLUX_DEV_SCHEDULER, num_steps, image_seq_len)
  assert sigmas.dtype == np.float32 and sigmas.shape == (num_steps + 1,)
  assert timesteps.dtype == np.float32 and timesteps.shape == (num_steps,)
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())  # same float32 ops: bit-identical
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  assert sigmas[-1] == 0 and sigmas[0] == 1


def test_flux_dev_shift_depends_on_resolution():
  low, _ = S.flux_sigmas(S.FLUX_DEV_SCHEDULER, 10, 256)
  high, _ = S.flux_sigmas(S.FLUX_DEV_SCHEDULER, 10, 4096)
  assert np.all(high[1:-1] > low[1:-1])  # more tokens -> larger shift -> more time at high noise
  # mu(256) = base_shift: sigma' = e^0.5 / (e^0.5 + 1/s - 1), checked in float64.
  s = np.linspace(1.0, 0.1, 10)
  np.testing.assert_allclose(low[:-1], np.exp(0.5) / (np.exp(0.5) + 1 / s - 1), rtol=1e-6)


def test_flux_schnell_sigmas_match_diffusers():
  ref = _flux_reference(FLUX_SCHNELL_JSON, 4, 4096)
  sigmas, timesteps = S.flux_sigmas(S.FLUX_SCHNELL_SCHEDULER, 4)
  np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  np.testing.assert_array_equal(sigmas, [1.0, 0.75, 0.5, 0.25, 0.0])
  # A static shift (SD3-style) and the linear time shift, against diffusers too.
  for json_config, seq in [({**FLUX_SCHNELL_JSON, "shift": 3.0}, 64),
                           ({**FLUX_DEV_JSON, "time_shift_type": "linear"}, 1024)]:
    ref = _flux_reference(json_config, 6, seq)
    sigmas, timesteps = S.flux_sigmas(S.FlowMatchConfig.from_diffusers(json_config), 6, seq)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())


def test_flow_euler_trajectory_matches_diffusers():
  rng = np.random.default_rng(0)
  shape = (2, 16, 64)  # packed FLUX latents [B, tokens, 64]
  ref = _flux_reference(FLUX_DEV_JSON, 4, shape[1])
  ref.set_begin_index(0)
  sigmas, timesteps = S.flux_sigmas(S.FLUX_DEV_SCHEDULER, 4, shape[1])
  step = jax.jit(S.flow_euler_step)
  x = rng.standard_normal(shape).astype(np.float32)
  x_ref, x_ours = torch.from_numpy(x), jnp.asarray(x)
  for i, t in enumerate(ref.timesteps):
    velocity = rng.standard_normal(shape).astype(np.float32)
    x_ref = ref.step(torch.from_numpy(velocity), t, x_ref).prev_sample
    x_ours = step(x_ours, jnp.asarray(velocity), sigmas[i], sigmas[i + 1])
    np.testing.assert_allclose(np.asarray(x_ours), x_ref.numpy(), rtol=1e-6, atol=1e-6)
  assert x_ours.dtype == jnp.float32


def test_flow_euler_step_bf16():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 64)).astype(ml_dtypes.bfloat16)
  v = rng.standard_normal((2, 16, 64)).astype(ml_dtypes.bfloat16)
  ref = _flux_reference(FLUX_DEV_JSON, 4, 16)
  ref.set_begin_index(0)
  sigmas, _ = S.flux_sigmas(S.FLUX_DEV_SCHEDULER, 4, 16)
  sigma, sigma_next = sigmas[0], sigmas[1]
  got = np.asarray(S.flow_euler_step(jnp.asarray(x), jnp.asarray(v), sigma, sigma_next))
  assert got.dtype == ml_dtypes.bfloat16
  exact = x.astype(np.float64) + (float(sigma_next) - float(sigma)) * v.astype(np.float64)
  # fp32 arithmetic, one final rounding: within half a bf16 ulp of the exact value (+ fp32 slack).
  ulp = np.abs(np.spacing(got.astype(np.float32))).astype(np.float64) * 2**16
  assert np.all(np.abs(got.astype(np.float64) - exact) <= 0.5 * ulp * (1 + 1e-3))
  # diffusers computes dt * v in bf16 (dt and the product rounded to bf16) before its fp32 add,
  # so it differs from us by at most one bf16 ulp of dt * v plus one ulp of the result.
  to_torch = lambda a: torch.from_numpy(a.astype(np.float32)).bfloat16()
  expected = ref.step(to_torch(v), ref.timesteps[0], to_torch(x)).prev_sample
  assert expected.dtype == torch.bfloat16
  update = np.abs((float(sigma_next) - float(sigma)) * v.astype(np.float32))
  update_ulp = np.abs(np.spacing(update.astype(ml_dtypes.bfloat16).astype(np.float32))) * 2.0**16
  diff = np.abs(got.astype(np.float64) - expected.float().numpy())
  assert np.all(diff <= ulp + update_ulp) and np.mean(diff == 0) > 0.8


def _dpm_trajectory(config, num_steps, shape=(2, 4, 8, 8), seed=0):
  """Runs diffusers and ours side by side; returns the per-step relative errors."""
  rng = np.random.default_rng(seed)
  ref = _diffusers_dpm(config)
  ref.set_timesteps(num_steps)
  timesteps, sigmas = S.dpm_timesteps(config, num_steps)
  np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=5e-7, atol=0)
  step = jax.jit(functools.partial(S.dpm_step, config))
  state = S.dpm_init_state(config, num_steps, shape)
  x = rng.standard_normal(shape).astype(np.float32)
  x_ref, x_ours = torch.from_numpy(x), jnp.asarray(x)
  errors, outputs = [], []
  for i, t in enumerate(ref.timesteps):
    model_output = rng.standard_normal(shape).astype(np.float32)
    outputs.append(model_output)
    x_ref = ref.step(torch.from_numpy(model_output), t, x_ref).prev_sample
    x_ours, state = step(state, x_ours, jnp.asarray(model_output), jnp.int32(i))
    ref_np = x_ref.numpy()
    errors.append(np.linalg.norm(np.asarray(x_ours) - ref_np) / np.linalg.norm(ref_np))
  return np.array(errors), x, outputs, np.asarray(x_ours)


@pytest.mark.parametrize("num_steps", [20, 5, 2])
def test_dpm_solver_pixart_matches_diffusers_every_step(num_steps):
  errors, *_ = _dpm_trajectory(S.PIXART_SIGMA_SCHEDULER, num_steps)
  assert errors.max() <= 1e-5, errors


@pytest.mark.parametrize("changes,num_steps", [
    # second-order last step (sigma_min final sigma, lower_order_final off), v-prediction, heun
    (dict(prediction_type="v_prediction", solver_type="heun", final_sigmas_type="sigma_min",
          lower_order_final=False), 10),
    # lower_order_final with sigma_min: the last step goes first order because num_steps < 15
    (dict(final_sigmas_type="sigma_min"), 6),
    (dict(solver_order=1, timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear",
          beta_start=0.00085, beta_end=0.012), 7),
    (dict(prediction_type="sample", timestep_spacing="trailing"), 8),
])
def test_dpm_solver_variants_match_diffusers(changes, num_steps):
  errors, *_ = _dpm_trajectory(dataclasses.replace(S.PIXART_SIGMA_SCHEDULER, **changes), num_steps)
  assert errors.max() <= 1e-5, errors


def test_dpm_solver_in_lax_scan_equals_loop():
  config = S.PIXART_SIGMA_SCHEDULER
  num_steps, shape = 5, (1, 4, 4, 4)
  _, x, outputs, x_loop = _dpm_trajectory(config, num_steps, shape, seed=3)

  @jax.jit
  def run(x, outputs):
    def body(carry, inputs):
      sample, state = carry
      model_output, i = inputs
      sample, state = S.dpm_step(config, state, sample, model_output, i)
      return (sample, state), None
    state = S.dpm_init_state(config, num_steps, shape)
    (sample, _), _ = jax.lax.scan(body, (x, state), (outputs, jnp.arange(num_steps, dtype=jnp.int32)))
    return sample

  x_scan = run(jnp.asarray(x), jnp.asarray(np.stack(outputs)))
  np.testing.assert_allclose(np.asarray(x_scan), x_loop, rtol=1e-6, atol=1e-6)


def test_dpm_step_keeps_sample_dtype_and_checks_index():
  config = S.PIXART_SIGMA_SCHEDULER
  state = S.dpm_init_state(config, 3, (2, 3))
  sample = jnp.ones((2, 3), jnp.float16)
  step = jax.jit(functools.partial(S.dpm_step, config))
  out, new_state = step(state, sample, jnp.zeros((2, 3), jnp.float16), 0)
  assert out.dtype == jnp.float16 and new_state.prev_x0.dtype == jnp.float32
  # Step 0 with zero noise prediction: x0 = x / alpha_s0, then DDIM to the next sigma.
  sigma_s, sigma_t = (float(s) for s in state.sigmas[:2])
  alpha_s, alpha_t = 1 / np.sqrt(sigma_s**2 + 1), 1 / np.sqrt(sigma_t**2 + 1)
  np.testing.assert_allclose(np.asarray(out, np.float32), alpha_t / alpha_s, rtol=1e-3)
  with pytest.raises(ValueError, match="step_index"):
    S.dpm_step(config, state, sample, sample, 3)
  with pytest.raises(ValueError, match="shape"):
    S.dpm_step(config, state, sample, jnp.zeros((3, 2)), 0)


def test_from_diffusers_refuses_unimplemented_options():
  with pytest.raises(S.SchedulerConfigError, match="use_karras_sigmas"):
    S.DPMSolverConfig.from_diffusers({"use_karras_sigmas": True})
  with pytest.raises(S.SchedulerConfigError, match="algorithm_type"):
    S.DPMSolverConfig.from_diffusers({"algorithm_type": "sde-dpmsolver++"})
  with pytest.raises(S.SchedulerConfigError, match="solver_order"):
    S.DPMSolverConfig.from_diffusers({"solver_order": 3})
  with pytest.raises(S.SchedulerConfigError, match="thresholding"):
    S.DPMSolverConfig.from_diffusers({"thresholding": True})
  with pytest.raises(S.SchedulerConfigError, match="beta_schedule"):
    S.DPMSolverConfig.from_diffusers({"beta_schedule": "squaredcos_cap_v2"})
  with pytest.raises(S.SchedulerConfigError, match="expected 'DPMSolverMultistepScheduler'"):
    S.DPMSolverConfig.from_diffusers(FLUX_DEV_JSON)
  with pytest.raises(S.SchedulerConfigError, match="shift_terminal"):
    S.FlowMatchConfig.from_diffusers({**FLUX_DEV_JSON, "shift_terminal": 0.1})
  with pytest.raises(S.SchedulerConfigError, match="stochastic_sampling"):
    S.FlowMatchConfig.from_diffusers({**FLUX_DEV_JSON, "stochastic_sampling": True})
  with pytest.raises(S.SchedulerConfigError, match="'frobnicate' is unknown"):
    S.FlowMatchConfig.from_diffusers({**FLUX_DEV_JSON, "frobnicate": 1})
  with pytest.raises(ValueError, match="image_seq_len"):
    S.flux_sigmas(S.FLUX_DEV_SCHEDULER, 4)
  with pytest.raises(ValueError, match="num_steps"):
    S.flux_sigmas(S.FLUX_SCHNELL_SCHEDULER, 0)


def test_dpm_timesteps_spacings_match_diffusers_or_refuse():
  for spacing, offset in [("linspace", 0), ("leading", 1), ("trailing", 0)]:
    config = dataclasses.replace(S.PIXART_SIGMA_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    for num_steps in (1, 3, 14, 15, 50, 100):
      ref = _diffusers_dpm(config)
      ref.set_timesteps(num_steps)
      timesteps, sigmas = S.dpm_timesteps(config, num_steps)
      np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
      np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=5e-7, atol=0)
  # diffusers' trailing spacing yields 62 timesteps ending in -1 for 61 steps: refused.
  config = dataclasses.replace(S.PIXART_SIGMA_SCHEDULER, timestep_spacing="trailing")
  ref = _diffusers_dpm(config)
  ref.set_timesteps(61)
  assert len(ref.timesteps) == 62 and int(ref.timesteps[-1]) == -1
  with pytest.raises(ValueError, match="num_steps=61"):
    S.dpm_timesteps(config, 61)
