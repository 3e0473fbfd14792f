"""SANA's flow DPM-Solver and pipeline against diffusers (fp32, tiny random components), loading, saving, presets."""

import inspect
import logging
import math

import torch_refs

torch_refs.import_torchvision()  # diffusers imports peft, whose transformers import needs torchvision

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from svdquant_jax.eval.metrics import relative_error  # noqa: E402
from svdquant_jax.models import tokenizers as tok_lib  # noqa: E402
from svdquant_jax.models.gemma2 import Gemma2Model  # noqa: E402
from svdquant_jax.models.sana import SanaTransformer2DModel  # noqa: E402
from svdquant_jax.pipelines import loading, presets, schedulers  # noqa: E402
from svdquant_jax.pipelines.flux import PipelineConfigError, PipelineInputError  # noqa: E402
from svdquant_jax.pipelines.sana import COMPLEX_HUMAN_INSTRUCTION, SanaPipeline  # noqa: E402
from svdquant_jax.utils import trees  # noqa: E402

# Measured relative L2 errors on CPU (jax 0.10.2 / torch 2.13, fp32): 1-step latents 9.4e-7, 2-step latents
# 1.0e-6, images 4.2e-7. The bound is the task's 1e-4.
PARITY_RTOL = 1e-4
HEIGHT, WIDTH = 64, 96          # with the 8x tiny DC-AE: an 8x12 latent grid
TEXT_LENGTH = 24                # < the second prompt's length: exercises truncation
PROMPTS = ["  A Red CUBE on a Table ", "a photo of an astronaut riding a horse on the moon"]
# sana-tiny in bf16 against fp32, 4 steps from the same noise, measured: latents 9.2e-3. Bound 3x.
BF16_PIPELINE_RTOL = 3e-2


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _randomize(module: torch.nn.Module, seed: int, gemma: bool = False) -> None:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("scale_shift_table"):
        p.copy_(0.5 * noise)
      elif "embed_tokens" in name:
        p.copy_(noise)
      elif p.ndim >= 2:
        p.copy_(noise / math.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_((0.0 if gemma else 1.0) + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


# ----------------------------------------------------------------------------- the sampler
def test_flow_dpm_solver_schedule_and_trajectory_match_diffusers():
  ref = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
  assert schedulers.DPMSolverConfig.from_diffusers(dict(ref.config)) == schedulers.SANA_SCHEDULER
  cfg = schedulers.SANA_SCHEDULER
  for n in (1, 2, 4, 20):
    ref.set_timesteps(n)
    timesteps, sigmas = schedulers.dpm_timesteps(cfg, n)
    np.testing.assert_array_equal(timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
  # 20 steps (first order, second order midpoint, first-order last step to sigma 0).
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  state, ours, theirs = schedulers.dpm_init_state(cfg, 20, x.shape), jnp.asarray(x), torch.from_numpy(x)
  ref.set_timesteps(20)
  step = jax.jit(schedulers.dpm_step, static_argnums=0)
  for i in range(20):
    out = rng.standard_normal(x.shape).astype(np.float32)
    theirs = ref.step(torch.from_numpy(out), ref.timesteps[i], theirs).prev_sample
    ours, state = step(cfg, state, ours, jnp.asarray(out), i)
  err = relative_error(ours, theirs.numpy())
  print(f"flow DPM-Solver, 20 steps: rel L2 {err:.2e}")
  assert err <= 1e-6
  # Flow sigmas and flow predictions come together.
  with pytest.raises(schedulers.SchedulerConfigError, match="flow_prediction"):
    schedulers.DPMSolverConfig(use_flow_sigmas=True)
  with pytest.raises(schedulers.SchedulerConfigError, match="flow sigmas go with flow_prediction"):
    schedulers.DPMSolverConfig.from_diffusers({"prediction_type": "flow_prediction"})


# ----------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def sana_case(tmp_path_factory):
  """A diffusers SanaPipeline of tiny random components, saved, and its results from fixed noise:
  1 and 2 steps (latents) with CFG and the default instruction prefix, and the 2-step images."""
  gemma = transformers.Gemma2Model(transformers.Gemma2Config(
      vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16)).eval()
  _randomize(gemma, 1, gemma=True)
  types = ("ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock")
  vae = diffusers.AutoencoderDC(
      in_channels=3, latent_channels=8, attention_head_dim=8, encoder_block_types=types, decoder_block_types=types,
      encoder_block_out_channels=(8, 16, 16, 32), decoder_block_out_channels=(8, 16, 16, 32),
      encoder_layers_per_block=(1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
      encoder_qkv_multiscales=((), (), (5,), (5,)), decoder_qkv_multiscales=((), (), (5,), (5,)),
      downsample_block_type="Conv", upsample_block_type="interpolate", scaling_factor=0.41407).eval()
  _randomize(vae, 2)
  transformer = diffusers.SanaTransformer2DModel(
      in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
      num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
      mlp_ratio=2.5, sample_size=8, patch_size=1).eval()
  _randomize(transformer, 3)
  scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                    flow_shift=3.0)
  pipe = diffusers.SanaPipeline(tokenizer=tok_lib.byte_level_gemma_tokenizer(), text_encoder=gemma, vae=vae,
                                transformer=transformer, scheduler=scheduler)
  pipe.set_progress_bar_config(disable=True)
  folder = tmp_path_factory.mktemp("sana")
  pipe.save_pretrained(folder)
  latents = np.random.default_rng(4).standard_normal((2, HEIGHT // 8, WIDTH // 8, 8)).astype(np.float32)  # NHWC
  out = {"folder": str(folder), "latents": latents}
  for steps in (1, 2):
    final = {}

    def keep(pipeline, step, t, kwargs, final=final):
      final["latents"] = kwargs["latents"].clone()
      return kwargs
    with torch.no_grad():
      images = pipe(PROMPTS, negative_prompt="", num_inference_steps=steps, guidance_scale=4.5, height=HEIGHT,
                    width=WIDTH, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
                    clean_caption=False, use_resolution_binning=False, max_sequence_length=TEXT_LENGTH,
                    callback_on_step_end=keep).images
    out[steps] = final["latents"].numpy().transpose(0, 2, 3, 1)
    out[f"images{steps}"] = images
  return out


@pytest.mark.parametrize("steps", [1, 2])
def test_cfg_pipeline_with_instruction_prefix_matches_diffusers(steps, sana_case, caplog):
  c = sana_case
  pipe = loading.load_pipeline(c["folder"], dtype="float32")
  assert isinstance(pipe, SanaPipeline) and pipe.scheduler_config == schedulers.SANA_SCHEDULER
  assert pipe.complex_human_instruction == COMPLEX_HUMAN_INSTRUCTION
  calls = []
  with caplog.at_level(logging.WARNING):
    latents = pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_steps=steps, guidance=4.5, latents=c["latents"],
                   max_sequence_length=TEXT_LENGTH, output_type="latent", progress=False,
                   on_step=lambda i, inputs, output, branch: calls.append((i, inputs, branch)))
  assert any("prompt 1" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
  assert latents.dtype == jnp.float32
  err = relative_error(latents, c[steps])
  print(f"SANA {steps}-step CFG latents vs diffusers: {err:.2e}")
  assert err <= PARITY_RTOL
  assert relative_error(c[steps], c["latents"]) > 0.1   # the sampler did move the latents
  if steps == 2:
    images = np.clip(np.asarray(pipe.decode(latents)) * 0.5 + 0.5, 0, 1)
    err_images = relative_error(images, c["images2"])
    print(f"SANA images vs diffusers: {err_images:.2e}")
    assert err_images <= PARITY_RTOL
  # One batched [uncond; cond] call per step. The instruction is dropped except its last token (the
  # trailing space of "User Prompt: "): the kept tokens are BOS, that space and the prompt's bytes.
  assert [i for i, _, _ in calls] == list(range(steps))
  _, inputs, branch = calls[0]
  assert branch == ["uncond", "uncond", "cond", "cond"]
  assert set(inputs) <= set(inspect.signature(SanaTransformer2DModel.__call__).parameters)
  mask = np.asarray(inputs["encoder_attention_mask"])
  assert mask.shape == (4, TEXT_LENGTH) and mask[:2].sum(1).tolist() == [1, 1]
  assert mask[2].sum() == 2 + len("a red cube on a table") and mask[3].all()
  assert inputs["timestep"].dtype == jnp.float32 and float(inputs["timestep"][0]) == 999.0


def test_save_pipeline_round_trip_is_read_by_diffusers_and_transformers(tmp_path):
  pipe = loading.load_pipeline("sana-tiny")
  folder = tmp_path / "saved"
  loading.save_pipeline(pipe, folder)
  again = loading.load_pipeline(str(folder))
  assert again.transformer_config == pipe.transformer_config and again.vae_config == pipe.vae_config
  assert isinstance(again, SanaPipeline) and again.name == "sana-tiny" and again.defaults == pipe.defaults
  for a, b in ((pipe.transformer_params, again.transformer_params), (pipe.vae_params, again.vae_params),
               (pipe.text_encoder_params, again.text_encoder_params)):
    fa, fb = trees.flatten(a), trees.flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
      np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
  # The reference libraries read every component and compute what we compute.
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 4, 4, 32)).astype(np.float32)
  captions = rng.standard_normal((1, 5, 64)).astype(np.float32)
  theirs = diffusers.SanaTransformer2DModel.from_pretrained(folder / "transformer").eval()
  with torch.no_grad():
    want = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(captions),
                  timestep=torch.tensor([500.0])).sample.numpy().transpose(0, 2, 3, 1)
  got = jax.jit(SanaTransformer2DModel(pipe.transformer_config).apply)({"params": pipe.transformer_params}, x,
                                                                       captions, jnp.array([500.0]))
  assert relative_error(got, want) <= 1e-5
  assert diffusers.AutoencoderDC.from_pretrained(folder / "vae").config.latent_channels == 32
  ids = np.array([[2, 70, 80, 90]])
  gemma = transformers.Gemma2Model.from_pretrained(folder / "text_encoder").eval()
  with torch.no_grad():
    want = gemma(torch.from_numpy(ids)).last_hidden_state.numpy()
  got = jax.jit(Gemma2Model(pipe.text_encoder_config).apply)({"params": pipe.text_encoder_params}, jnp.asarray(ids))
  assert relative_error(got, want) <= 1e-5


def test_sana_tiny_preset_bf16_close_to_fp32():
  fp32 = loading.load_pipeline("sana-tiny")
  bf16 = loading.load_pipeline("sana-tiny", dtype="bfloat16")
  assert bf16.transformer_config.dtype == jnp.bfloat16 and bf16.vae_config.dtype == jnp.bfloat16
  kwargs = dict(num_steps=4, seed=3, height=128, width=128, output_type="latent", progress=False)
  a = fp32(PROMPTS, **kwargs)
  b = bf16(PROMPTS, **kwargs)
  assert a.dtype == b.dtype == jnp.float32   # the latents stay float32 in every precision, as diffusers
  err = relative_error(b, a)
  print(f"sana-tiny bf16 vs fp32 latents after 4 steps: {err:.2e}")
  assert err <= BF16_PIPELINE_RTOL
  images = np.asarray(fp32.decode(a), np.float32)
  assert images.shape == (2, 128, 128, 3) and 0.05 < images.std() < 0.6 and np.mean(np.abs(images) > 1) < 0.01


def test_presets_and_bad_inputs():
  preset = presets.get_preset("sana-1.6b")
  assert preset.pipeline_class == "SanaPipeline" and not preset.builtin
  assert preset.defaults == presets.GenerationDefaults(num_steps=20, guidance=4.5, height=1024, width=1024,
                                                       max_sequence_length=300)
  with pytest.raises(Exception, match="pass path="):
    loading.load_pipeline("sana-1.6b")
  pipe = loading.load_pipeline("sana-tiny")
  assert pipe.size_multiple == 32
  with pytest.raises(PipelineInputError, match="multiple of 32"):
    pipe(["a"], height=100, width=64, progress=False)
  with pytest.raises(PipelineInputError, match="latents has shape"):
    pipe(["a"], latents=np.zeros((1, 8, 8, 4), np.float32), progress=False)
  with pytest.raises(PipelineConfigError, match="caption_channels"):
    SanaPipeline(transformer_config=pipe.transformer_config.replace(caption_channels=32, dtype=jnp.float32),
                 transformer_params=None, text_encoder_config=pipe.text_encoder_config, text_encoder_params=None,
                 vae_config=pipe.vae_config, vae_params=None, tokenizer=pipe.tokenizer,
                 scheduler_config=pipe.scheduler_config, defaults=pipe.defaults)
