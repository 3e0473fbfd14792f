"""FLUX and PixArt-Sigma pipelines against diffusers (fp32, tiny random components), loading, saving, presets."""

import inspect
import json
import logging
import math
import os
import shutil

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from svdquant_jax.models import checkpoint
from svdquant_jax.pipelines import presets
from svdquant_jax.models import tokenizers as tok_lib
from svdquant_jax.models.checkpoint import Rule
from svdquant_jax.models.flux import FluxDoubleBlock, FluxTransformer2DModel, init_flux_params
from svdquant_jax.models.pixart import PixArtTransformer2DModel
from svdquant_jax.pipelines import loading, schedulers
from svdquant_jax.pipelines.flux import FluxPipeline, PipelineInputError, pack_latents, unpack_latents
from svdquant_jax.pipelines.pixart import PixArtSigmaPipeline
from svdquant_jax.quant.taps import apply_with_taps
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.eval.metrics import relative_error
from svdquant_jax.utils import trees

# Measured relative L2 errors on CPU (jax 0.10.2 / torch 2.13, fp32, 2 steps): FLUX dev-like latents 9.2e-7,
# images 6.4e-7; schnell-like 3.7e-7 / 4.5e-7; PixArt CFG 1.5e-6 / 9.2e-7. The bound is the task's 1e-4.
PARITY_RTOL = 1e-4
HEIGHT, WIDTH = 64, 48          # non-square: 4x3 packed FLUX tokens, 4x3 PixArt patches
STEPS = 2
T5_LENGTH = 24                  # < the second prompt's length: exercises truncation
FLUX_PROMPTS = ["A Red Bicycle", "two zebras grazing in a dry savanna at sunset"]
PIXART_PROMPTS = ["  A Red CUBE on a Table ", "a photo of an astronaut riding a horse on the moon"]


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _randomize(module: torch.nn.Module, seed: int) -> None:
  """Seeded weights everywhere (diffusers zero-inits some layers; norms default to 1 / 0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim >= 2:
        p.copy_(noise / math.sqrt(p[0].numel()))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


def _text_encoders():
  clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      max_position_embeddings=77, bos_token_id=256, eos_token_id=257, pad_token_id=257)).eval()
  t5 = transformers.T5EncoderModel(transformers.T5Config(
      vocab_size=260, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
      relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
  _randomize(clip, 1)
  _randomize(t5, 2)
  return clip, t5


def _vae(latent_channels: int, flux: bool, seed: int) -> diffusers.AutoencoderKL:
  kwargs = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=latent_channels,
                norm_num_groups=4, sample_size=64)
  if flux:
    kwargs.update(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
  else:
    kwargs.update(scaling_factor=0.13025)
  vae = diffusers.AutoencoderKL(**kwargs).eval()
  _randomize(vae, seed)
  return vae


def _flux_transformer(guidance_embeds: bool, seed: int) -> diffusers.FluxTransformer2DModel:
  model = diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
      joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
      axes_dims_rope=(4, 6, 6)).eval()
  _randomize(model, seed)
  return model


@pytest.fixture(scope="module")
def flux_cases(tmp_path_factory):
  """Per case ("dev": guidance embedding + dynamic shift; "schnell": neither): the saved diffusers
  folder, the initial packed latents, and diffusers' final latents and images."""
  clip, t5 = _text_encoders()
  vae = _vae(16, flux=True, seed=3)
  schedulers_ = {
      "dev": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
      "schnell": diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
  }
  latents = np.random.default_rng(0).standard_normal((2, (HEIGHT // 16) * (WIDTH // 16), 64)).astype(np.float32)
  out = {}
  for i, (case, scheduler) in enumerate(schedulers_.items()):
    pipe = diffusers.FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip,
                                  tokenizer=tok_lib.byte_level_clip_tokenizer(), text_encoder_2=t5,
                                  tokenizer_2=tok_lib.byte_level_t5_tokenizer(),
                                  transformer=_flux_transformer(case == "dev", seed=10 + i))
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp(f"flux_{case}")
    pipe.save_pretrained(folder)
    final = {}

    def keep(pipeline, step, t, kwargs, final=final):
      final["latents"] = kwargs["latents"].clone()
      return kwargs
    with torch.no_grad():
      images = pipe(FLUX_PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=3.5,
                    latents=torch.from_numpy(latents), max_sequence_length=T5_LENGTH, output_type="np",
                    callback_on_step_end=keep).images
    out[case] = dict(folder=str(folder), latents=latents, ref_latents=final["latents"].numpy(), ref_images=images)
  return out


@pytest.fixture(scope="module")
def flux_dev(flux_cases):
  return loading.load_pipeline(flux_cases["dev"]["folder"], dtype="float32")


@pytest.mark.parametrize("case", ["dev", "schnell"])
def test_flux_matches_diffusers(case, flux_cases, caplog):
  c = flux_cases[case]
  pipe = loading.load_pipeline(c["folder"], dtype="float32")
  assert isinstance(pipe, FluxPipeline) and pipe.transformer_config.guidance_embeds == (case == "dev")
  with caplog.at_level(logging.WARNING):
    latents = pipe(FLUX_PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, guidance=3.5 if case == "dev" else None,
                   latents=c["latents"], max_sequence_length=T5_LENGTH, output_type="latent", progress=False)
  # The second prompt is longer than the T5 length: truncated, with a warning naming prompt 1.
  assert any("prompt 1" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
  err = relative_error(latents, c["ref_latents"])
  assert err <= PARITY_RTOL, err
  images = np.clip(np.asarray(pipe.decode(latents, HEIGHT, WIDTH)) * 0.5 + 0.5, 0, 1)
  err_images = relative_error(images, c["ref_images"])
  print(f"FLUX {case}: latents rel L2 {err:.2e}, images {err_images:.2e}")
  assert err_images <= PARITY_RTOL, err_images
  assert relative_error(c["ref_latents"], c["latents"]) > 0.1  # the denoising did move the latents


@pytest.fixture(scope="module")
def pixart_case(tmp_path_factory):
  _, t5 = _text_encoders()
  transformer = diffusers.PixArtTransformer2DModel(
      num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
      cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=32, norm_type="ada_norm_single",
      use_additional_conditions=False).eval()
  _randomize(transformer, 20)
  pipe = diffusers.PixArtSigmaPipeline(tokenizer=tok_lib.byte_level_t5_tokenizer(), text_encoder=t5,
                                       vae=_vae(4, flux=False, seed=21), transformer=transformer,
                                       scheduler=diffusers.DPMSolverMultistepScheduler())
  pipe.set_progress_bar_config(disable=True)
  folder = tmp_path_factory.mktemp("pixart")
  pipe.save_pretrained(folder)
  latents = np.random.default_rng(1).standard_normal((2, HEIGHT // 8, WIDTH // 8, 4)).astype(np.float32)  # NHWC
  final = {}
  with torch.no_grad():
    images = pipe(PIXART_PROMPTS, negative_prompt="", num_inference_steps=STEPS, guidance_scale=4.5, height=HEIGHT,
                  width=WIDTH, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()), output_type="np",
                  clean_caption=False, use_resolution_binning=False, max_sequence_length=T5_LENGTH,
                  callback=lambda step, t, lat: final.update(latents=lat.clone())).images
  return dict(folder=str(folder), latents=latents, ref_latents=final["latents"].numpy().transpose(0, 2, 3, 1),
              ref_images=images)


def test_pixart_cfg_with_padding_mask_matches_diffusers(pixart_case):
  c = pixart_case
  pipe = loading.load_pipeline(c["folder"], dtype="float32")
  assert isinstance(pipe, PixArtSigmaPipeline)
  calls = []
  latents = pipe(PIXART_PROMPTS, height=HEIGHT, width=WIDTH, num_steps=STEPS, guidance=4.5, latents=c["latents"],
                 max_sequence_length=T5_LENGTH, output_type="latent", progress=False,
                 on_step=lambda i, inputs, output, branch: calls.append((i, inputs, branch)))
  err = relative_error(latents, c["ref_latents"])
  assert err <= PARITY_RTOL, err
  images = np.clip(np.asarray(pipe.decode(latents)) * 0.5 + 0.5, 0, 1)
  err_images = relative_error(images, c["ref_images"])
  print(f"PixArt CFG: latents rel L2 {err:.2e}, images {err_images:.2e}")
  assert err_images <= PARITY_RTOL, err_images
  # CFG: one batched [uncond; cond] call per step; the first prompt is padded, the empty prompt is one token.
  assert [i for i, _, _ in calls] == list(range(STEPS))
  _, inputs, branch = calls[0]
  assert branch == ["uncond", "uncond", "cond", "cond"]
  assert set(inputs) <= set(inspect.signature(PixArtTransformer2DModel.__call__).parameters)
  mask = np.asarray(inputs["encoder_attention_mask"])
  assert mask.shape == (4, T5_LENGTH) and mask[:2].sum(1).tolist() == [1, 1]
  assert mask[2].sum() == len("a red cube on a table") + 1 and mask[3].all()


def test_flux_hooks_record_and_replace_the_transformer(flux_cases, flux_dev):
  c, pipe = flux_cases["dev"], flux_dev
  calls = []
  kwargs = dict(height=HEIGHT, width=WIDTH, num_steps=STEPS, latents=c["latents"], max_sequence_length=T5_LENGTH,
                output_type="latent", progress=False)
  out = pipe(FLUX_PROMPTS, on_step=lambda i, inputs, output: calls.append((i, inputs, output)), **kwargs)
  assert [i for i, _, _ in calls] == list(range(STEPS))
  names = set(inspect.signature(FluxTransformer2DModel.__call__).parameters) - {"self"}
  assert set(calls[0][1]) == names
  sigmas, _ = schedulers.flux_sigmas(pipe.scheduler_config, STEPS, c["latents"].shape[1])
  np.testing.assert_allclose(np.asarray(calls[1][1]["timestep"]), sigmas[1], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(calls[0][1]["guidance"]), [3.5, 3.5])
  # Replaying the recorded inputs through transformer_fn gives the recorded output.
  replay = pipe.transformer_fn(pipe.transformer_params, **calls[1][1])
  np.testing.assert_array_equal(np.asarray(replay), np.asarray(calls[1][2]))
  # A replacement transformer is used: zero velocity leaves the noise unchanged.
  unchanged = pipe(FLUX_PROMPTS, transformer_fn=_zero_velocity, **kwargs)
  np.testing.assert_array_equal(np.asarray(unchanged), c["latents"])
  assert relative_error(out, c["latents"]) > 0.1


def _zero_velocity(params, *, hidden_states, **unused):
  return jnp.zeros_like(hidden_states)


# ----------------------------------------------------------------------------- bad input
def test_bad_call_arguments_are_named(flux_dev, pixart_case):
  pipe = flux_dev
  with pytest.raises(PipelineInputError, match=r"height=100 is not a multiple of 16.*use 96 or 112"):
    pipe(["a"], height=100, width=64)
  with pytest.raises(PipelineInputError, match="width=40"):
    pipe(["a"], height=64, width=40)
  with pytest.raises(PipelineInputError, match="prompts is empty"):
    pipe([])
  with pytest.raises(PipelineInputError, match=r"prompts\[1\] is a int"):
    pipe(["a", 3])
  with pytest.raises(PipelineInputError, match="output_type"):
    pipe(["a"], output_type="pil")
  with pytest.raises(PipelineInputError, match="latents has shape"):
    pipe(["a"], height=HEIGHT, width=WIDTH, latents=np.zeros((1, 5, 64), np.float32))
  pixart = loading.load_pipeline(pixart_case["folder"], dtype="float32")
  assert pixart.size_multiple == 16  # VAE 8 x patch 2
  with pytest.raises(PipelineInputError, match="height=72 is not a multiple of 16"):
    pixart(["a"], height=72, width=64)
  with pytest.raises(PipelineInputError, match="prompts is empty"):
    pixart([])


def test_guidance_on_a_model_without_guidance_embedding_is_refused(flux_cases):
  schnell = loading.load_pipeline(flux_cases["schnell"]["folder"], dtype="float32")
  with pytest.raises(PipelineInputError, match="no guidance embedding"):
    schnell(["a"], guidance=3.5)
  assert schnell.resolve_guidance(None) is None and schnell.resolve_guidance(0) is None
  assert schnell.defaults == presets.inferred_defaults("FluxPipeline", False)  # schnell-like: 4 steps, 256 tokens
  assert (schnell.defaults.num_steps, schnell.defaults.max_sequence_length) == (4, 256)


def test_loading_errors_name_the_problem(flux_cases, pixart_case, tmp_path):
  flux_folder = flux_cases["dev"]["folder"]
  with pytest.raises(CheckpointError, match="pass path= to a local diffusers folder"):
    loading.load_pipeline("flux-dev")
  with pytest.raises(ValueError, match="neither a model preset"):
    loading.load_pipeline("flux-medium")
  with pytest.raises(CheckpointError, match="no model_index.json"):
    loading.load_pipeline(str(tmp_path))
  broken = tmp_path / "broken"
  shutil.copytree(flux_folder, broken)
  shutil.rmtree(broken / "vae")
  with pytest.raises(CheckpointError, match=r"missing component folder\(s\) \['vae'\]"):
    loading.load_pipeline(str(broken))
  other = tmp_path / "other"
  shutil.copytree(flux_folder, other)
  index = json.loads((other / "model_index.json").read_text())
  (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
  with pytest.raises(CheckpointError, match="holds a 'StableDiffusionPipeline' pipeline"):
    loading.load_pipeline(str(other))
  with pytest.raises(CheckpointError, match="preset 'pixart-sigma' is a PixArtSigmaPipeline"):
    loading.load_pipeline("pixart-sigma", path=flux_folder)
  with pytest.raises(CheckpointError, match="without a guidance embedding"):
    loading.load_pipeline("flux-schnell", path=flux_folder, dtype="float32")
  swapped = tmp_path / "swapped"
  shutil.copytree(pixart_case["folder"], swapped)
  shutil.rmtree(swapped / "vae")
  shutil.copytree(os.path.join(flux_folder, "transformer"), swapped / "vae")
  with pytest.raises(CheckpointError, match="holds a FluxTransformer2DModel, expected one of \\['AutoencoderKL'\\]"):
    loading.load_pipeline(str(swapped))


# ----------------------------------------------------------------------------- save / load
def _assert_same_params(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape, k
    assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), k


def _components(pipe):
  names = ["transformer", "vae", "t5"] + (["clip"] if isinstance(pipe, FluxPipeline) else [])
  return {n: getattr(pipe, f"{n}_params") for n in names}


@pytest.mark.parametrize("name,dtype", [("flux-tiny", None), ("pixart-tiny", None), ("flux-tiny", "bfloat16")])
def test_save_pipeline_round_trip_is_bit_identical(name, dtype, tmp_path):
  pipe = loading.load_pipeline(name, dtype=dtype)
  folder = loading.save_pipeline(pipe, tmp_path / name)
  back = loading.load_pipeline(folder)
  assert type(back) is type(pipe) and back.name == name and back.defaults == pipe.defaults
  assert back.scheduler_config == pipe.scheduler_config
  for component, params in _components(pipe).items():
    _assert_same_params(params, _components(back)[component])
  assert back.transformer_config == pipe.transformer_config and back.vae_config == pipe.vae_config
  with pytest.raises(ValueError, match="exists and is not empty"):
    loading.save_pipeline(pipe, folder)
  # The same folder through the preset name and path=.
  via_preset = loading.load_pipeline(name, path=folder)
  assert via_preset.name == name
  _assert_same_params(via_preset.transformer_params, pipe.transformer_params)


def test_diffusers_reads_what_save_pipeline_writes(tmp_path):
  pipe = loading.load_pipeline("flux-tiny")
  ours = loading.save_pipeline(pipe, tmp_path / "ours")
  reloaded = diffusers.FluxPipeline.from_pretrained(ours)  # every tensor must be found (else it is re-initialized)
  reloaded.save_pretrained(tmp_path / "diffusers")
  again = loading.load_pipeline(str(tmp_path / "diffusers"), dtype="float32")
  for component, params in _components(pipe).items():
    _assert_same_params(params, _components(again)[component])


def test_unmap_params_inverts_every_kind_of_rule():
  rng = np.random.default_rng(0)
  store = {"lin.weight": rng.standard_normal((3, 5)), "q.weight": rng.standard_normal((4, 5)),
           "k.weight": rng.standard_normal((4, 5)), "q.bias": rng.standard_normal(4), "k.bias": rng.standard_normal(4),
           "conv.weight": rng.standard_normal((6, 2, 3, 3)), "split.weight": rng.standard_normal((5, 7)),
           "emb": rng.standard_normal((9, 5))}
  rules = (checkpoint.dense_rules("lin", "lin", bias=False) + checkpoint.fused_dense_rules("qk", ["q", "k"])
           + checkpoint.conv_rules("conv", "conv", bias=False) + [Rule("emb/embedding", ("emb",))]
           + [Rule("split_a/kernel", ("split.weight",), checkpoint.linear_in_slice(0, 3)),
              Rule("split_b/kernel", ("split.weight",), checkpoint.linear_in_slice(3, 7))])
  abstract = trees.unflatten({r.target: jax.ShapeDtypeStruct(r.convert([store[s] for s in r.sources]).shape,
                                                                  jnp.float32) for r in rules})
  params = checkpoint.load_params(store, rules, abstract, to_device=False)
  back = loading.unmap_params(params, rules)
  assert back.keys() == store.keys()
  for k in store:
    np.testing.assert_array_equal(back[k], store[k].astype(np.float32))
  with pytest.raises(CheckpointError, match="cannot invert"):
    loading.unmap_params({"s": np.ones(3, np.float32)}, [Rule("s", ("a", "b"), lambda xs: xs[0] + xs[1])])


# ----------------------------------------------------------------------------- tiny presets
def _channel_absmax_ratio(x) -> float:
  absmax = np.abs(np.asarray(x, np.float32)).reshape(-1, x.shape[-1]).max(0)
  return float(absmax.max() / np.median(absmax))


def test_tiny_weights_have_spectrum_and_outliers():
  """The structure docs/quantization.md ("Tiny models") records, against the plain (i.i.d.) init of the same model."""
  pipe = loading.load_pipeline("flux-tiny")
  config = pipe.transformer_config
  plain = init_flux_params(config, presets.TINY_SEED)
  sv = lambda p: np.linalg.svd(np.asarray(p["transformer_blocks_0"]["ff"]["fc1"]["kernel"]), compute_uv=False)  # noqa
  ours, iid = sv(pipe.transformer_params), sv(plain)
  print("fc1 singular values", np.round(ours[:5], 2), "median", round(float(np.median(ours)), 2),
        "top/median", round(float(ours[0] / np.median(ours)), 2), "iid", round(float(iid[0] / np.median(iid)), 2))
  assert ours[0] / np.median(ours) > 2.5 * iid[0] / np.median(iid)
  recorded = {}
  pipe(["a red bicycle", "two zebras"], height=64, width=64, num_steps=1, output_type="latent", progress=False,
       on_step=lambda i, inputs, output: recorded.update(inputs))

  def block_inputs(params, inputs):
    e = FluxTransformer2DModel(config).apply({"params": params}, **inputs, method="embed")
    _, taps = apply_with_taps(FluxDoubleBlock(config), {"params": params["transformer_blocks_0"]},
                              e["hidden_states"], e["encoder_hidden_states"], e["temb"], e["image_rotary_emb"],
                              record_inputs=[("ff", "fc1"), ("ff", "fc2"), ("attn", "to_out")])
    return {"/".join(k): v for k, v in taps["inputs"].items()}
  block_inputs = jax.jit(block_inputs)
  ratios = {label: {k: _channel_absmax_ratio(v) for k, v in block_inputs(params, recorded).items()}
            for label, params in (("structured", pipe.transformer_params), ("iid", plain))}
  print("channel absmax max/median", ratios)
  for layer in ("ff/fc1", "ff/fc2", "attn/to_out"):
    assert ratios["structured"][layer] > 4 and ratios["structured"][layer] > 1.8 * ratios["iid"][layer], layer


def test_tiny_weights_are_deterministic():
  a = presets.tiny_components("pixart-tiny", seed=0)
  b = loading.load_pipeline("pixart-tiny")
  _assert_same_params(a.components["transformer"][1], b.transformer_params)
  c = presets.structure_pixart_params(a.components["transformer"][0], a.components["transformer"][1], seed=1)
  assert not np.array_equal(np.asarray(c["proj_out"]["kernel"]), np.asarray(b.transformer_params["proj_out"]["kernel"]))


def test_pack_unpack_matches_diffusers_layout():
  x = np.random.default_rng(0).standard_normal((2, 6, 4, 16)).astype(np.float32)  # NHWC
  packed = np.asarray(pack_latents(jnp.asarray(x)))
  ref = diffusers.FluxPipeline._pack_latents(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), 2, 16, 6, 4).numpy()
  np.testing.assert_array_equal(packed, ref)
  np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), 3, 2)), x)


def test_presets_table():
  assert {n: (p.defaults.num_steps, p.defaults.guidance, p.defaults.height) for n, p in
          presets.PIPELINE_PRESETS.items() if not p.builtin} == {
              "flux-dev": (50, 3.5, 1024), "flux-schnell": (4, 0.0, 1024), "pixart-sigma": (20, 4.5, 1024),
              "sana-1.6b": (20, 4.5, 1024)}
  assert presets.GENERATION_DEFAULTS["flux-dev"].max_sequence_length == 512
  assert presets.GENERATION_DEFAULTS["flux-schnell"].max_sequence_length == 256
  assert presets.GENERATION_DEFAULTS["pixart-sigma"].max_sequence_length == 300
  with pytest.raises(ValueError, match="unknown model preset"):
    presets.get_preset("sd3")


def test_benchmark_runs_on_cpu_with_the_tiny_config():
  from svdquant_jax.flows import flux_benchmark  # pylint: disable=g-import-not-at-top
  result = flux_benchmark.run(flux_benchmark.BenchmarkSettings(
      config_name="flux-tiny", dtype="float32", warmup=1, repeats=2, height=32, width=32, text_len=8),
      flux_benchmark.TorchReference(torch, diffusers.FluxTransformer2DModel))
  assert result["image_tokens"] == 4 and result["ours"]["params"] == result["torch"]["params"]
  assert all(t > 0 for t in result["ours"]["times_ms"] + result["torch"]["times_ms"])
  assert "time / torch" in flux_benchmark.format_table(result)
