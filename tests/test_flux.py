"""The Flax FLUX.1 transformer and its loader against diffusers' FluxTransformer2DModel (fp32 reference)."""

import functools
import json
import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from svdquant_jax.models.flux import (FLUX_PRESETS, FluxConfig, FluxDoubleBlock, FluxSingleBlock,
                                      FluxTransformer2DModel, abstract_flux_params, flux_rope, init_flux_params)
from svdquant_jax.models.flux_loader import flux_mapping, load_flux_transformer
from svdquant_jax.utils.safetensors_io import CheckpointError
from svdquant_jax.eval.metrics import relative_error
from svdquant_jax.utils import trees

_DIFFUSERS_KEYS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
                   "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                   "guidance_embeds", "axes_dims_rope")
# Case "guided": the flux-tiny preset itself, one fp32 file. Case "unguided": schnell-style, other
# RoPE split, out_channels != in_channels, sharded, bf16 on disk.
_TINY = {k: getattr(FLUX_PRESETS["flux-tiny"], k) for k in _DIFFUSERS_KEYS}
_CASES = {
    "guided": dict(config=_TINY, shards=None, torch_dtype=torch.float32),
    "unguided": dict(config={**_TINY, "guidance_embeds": False, "axes_dims_rope": (16, 24, 24), "out_channels": 32},
                     shards="600KB", torch_dtype=torch.bfloat16),
}
_BATCH, _TEXT_LEN, _GRID = 2, 7, (4, 5)


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
  """fp32 matmuls at full precision also on a GPU (where the default may use TF32); no-op on CPU."""
  with jax.default_matmul_precision("highest"):
    yield


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere (diffusers may zero-init adaLN / proj_out): kernels N(0, 1/fan_in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 2:
        p.copy_(noise / math.sqrt(p.shape[1]))
      elif ".norm_" in name:  # q/k RMSNorm scales
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


def _inputs(config: dict, seed: int = 0) -> dict:
  """Batch 2, 7 text tokens, a 4x5 latent grid at FLUX-like (large) positions; image axis 0 is 1."""
  rng = np.random.default_rng(seed)
  h, w = _GRID
  rows, cols = np.meshgrid(np.arange(h) + 60.0, np.arange(w) + 27.0, indexing="ij")
  img_ids = np.stack([np.ones(h * w), rows.ravel(), cols.ravel()], -1).astype(np.float32)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  inputs = dict(hidden_states=f32(_BATCH, h * w, config["in_channels"]),
                encoder_hidden_states=f32(_BATCH, _TEXT_LEN, config["joint_attention_dim"]),
                pooled_projections=f32(_BATCH, config["pooled_projection_dim"]),
                timestep=np.array([0.3, 0.85], np.float32), img_ids=img_ids,
                txt_ids=np.zeros((_TEXT_LEN, 3), np.float32))
  if config["guidance_embeds"]:
    inputs["guidance"] = np.array([3.5, 1.0], np.float32)
  return inputs


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Per case: the folder, the diffusers fp32 reference output and the inputs."""
  out = {}
  for name, case in _CASES.items():
    model = diffusers.FluxTransformer2DModel(**case["config"])
    _randomize(model, seed=len(out))
    folder = tmp_path_factory.mktemp(name) / "transformer"
    kwargs = {"max_shard_size": case["shards"]} if case["shards"] else {}
    model.to(case["torch_dtype"]).save_pretrained(folder, **kwargs)
    model = model.float().eval()  # the reference sees the weights as stored (bf16-rounded for "unguided")
    inputs = _inputs(case["config"])
    with torch.no_grad():
      ref = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, return_dict=False)[0].numpy()
      out[name] = dict(folder=folder, ref=ref, inputs=inputs)
      if case["torch_dtype"] == torch.float32:  # the weights of a bf16 run = the fp32 file rounded to bf16
        ref_bf16 = model.to(torch.bfloat16)(**{k: torch.from_numpy(v).to(torch.bfloat16) for k, v in inputs.items()},
                                            return_dict=False)[0]
        out[name]["ref_bf16"] = ref_bf16.float().numpy()
  return out


@pytest.fixture(scope="module")
def guided_fp32(saved):
  config, params = load_flux_transformer(saved["guided"]["folder"], dtype="float32", param_dtype="float32")
  return config, params


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: FluxConfig):
  """One compiled forward per config, shared by the tests (compiles dominate the runtime)."""
  return jax.jit(FluxTransformer2DModel(config).apply)


def _forward(config: FluxConfig, params, inputs: dict) -> np.ndarray:
  return np.asarray(_jitted_apply(config)({"params": params}, **inputs))


def test_rope_tables_match_diffusers_float64():
  # diffusers computes pos * freq in float64; flux_rope reduces the angle exactly in float32.
  axes = (16, 56, 56)
  pos = np.concatenate([np.arange(0, 512), [1000.0, 2047.5, 4095.0, -3.25]]).astype(np.float32)
  ids = np.stack([pos[::-1], pos, np.roll(pos, 7)], -1)
  ref_cos, ref_sin = (t.numpy() for t in FluxPosEmbed(10000, list(axes))(torch.from_numpy(ids)))
  cos, sin = jax.jit(flux_rope, static_argnums=1)(jnp.asarray(ids), axes)
  err = max(np.abs(np.asarray(cos) - ref_cos).max(), np.abs(np.asarray(sin) - ref_sin).max())
  # Measured 2.4e-7 (float32 cos/sin of an accurately reduced angle); a plain float32 angle is off by 1e-4.
  assert err < 5e-7, err


@pytest.mark.parametrize("case", list(_CASES))
def test_matches_diffusers_fp32(saved, case):
  folder, ref, inputs = saved[case]["folder"], saved[case]["ref"], saved[case]["inputs"]
  if _CASES[case]["shards"]:
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.index.json"))
  config, params = load_flux_transformer(folder, dtype="float32", param_dtype="float32")
  assert config.guidance_embeds == _CASES[case]["config"]["guidance_embeds"]
  assert config.axes_dims_rope == tuple(_CASES[case]["config"]["axes_dims_rope"])
  out = _forward(config, params, inputs)
  assert out.shape == ref.shape == (_BATCH, _GRID[0] * _GRID[1], config.out_features)
  err = relative_error(out, ref)
  print(f"{case}: relative L2 vs diffusers fp32 = {err:.2e}")
  assert err <= 1e-5, err


def test_bf16_run_close_to_fp32_run_and_to_diffusers_bf16(saved, guided_fp32):
  config16, params16 = load_flux_transformer(saved["guided"]["folder"])  # bf16 params and compute by default
  assert config16.dtype == jnp.bfloat16 and config16.param_dtype == jnp.bfloat16
  assert trees.flatten(params16)["proj_out/kernel"].dtype == jnp.bfloat16
  config32, params32 = guided_fp32

  # Timestep and guidance that bf16 holds exactly (also times 1000), so that only the arithmetic differs.
  exact = {**saved["guided"]["inputs"], "timestep": np.array([0.25, 0.5], np.float32),
           "guidance": np.array([4.0, 1.0], np.float32)}
  out16 = _forward(config16, params16, exact)
  assert out16.dtype == jnp.bfloat16
  err = relative_error(out16, _forward(config32, params32, exact))
  print(f"bf16 vs fp32 relative L2 = {err:.2e}")
  # Measured 1.1e-2: bf16 keeps 8 significant bits (unit roundoff 3.9e-3) and weights, activations
  # and every layer output are rounded through 4 blocks (~1e-2 per the per-block errors). Bound:
  # ~2x the measurement; a dtype bug (fp16 overflow, a lost fp32 norm) is far above it.
  assert err < 2e-2, err

  # With t = 0.3, 0.85 and guidance 3.5, bf16 rounds t*1000 to 300, 852 and 3504 in diffusers;
  # the high-frequency sinusoids see it (bf16 vs fp32 differs by ~0.14 here). Our bf16 run must
  # round likewise: vs diffusers' bf16 run it is measured at 1.1e-2, vs 0.25 without the rounding.
  err = relative_error(_forward(config16, params16, saved["guided"]["inputs"]), saved["guided"]["ref_bf16"])
  print(f"bf16 vs diffusers bf16 relative L2 = {err:.2e}")
  assert err < 2e-2, err


def _replay(config: FluxConfig, params, inputs: dict, jit_each: bool):
  """embed -> each block applied to its own params subtree -> head, as calibration replays the model."""
  model = FluxTransformer2DModel(config)
  wrap = jax.jit if jit_each else (lambda f: f)
  embed = wrap(lambda p, kw: model.apply({"params": p}, **kw, method=FluxTransformer2DModel.embed))
  head = wrap(lambda p, x, temb: model.apply({"params": p}, x, temb, method=FluxTransformer2DModel.head))
  double, single = wrap(FluxDoubleBlock(config).apply), wrap(FluxSingleBlock(config).apply)
  state = embed(params, inputs)
  x, context, temb, rope = (state[k] for k in ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"))
  for i in range(config.num_layers):
    context, x = double({"params": params[f"transformer_blocks_{i}"]}, x, context, temb, rope)
  for i in range(config.num_single_layers):
    context, x = single({"params": params[f"single_transformer_blocks_{i}"]}, x, context, temb, rope)
  assert x.shape == (_BATCH, _GRID[0] * _GRID[1], config.inner_dim)
  assert context.shape == (_BATCH, _TEXT_LEN, config.inner_dim)
  return head(params, x, temb)


def test_blockwise_replay_reproduces_call(saved, guided_fp32):
  config, params = guided_fp32
  inputs = saved["guided"]["inputs"]
  full = _forward(config, params, inputs)
  # Traced as one program, the replay is the same computation as __call__: bit-identical.
  replay = jax.jit(functools.partial(_replay, config, jit_each=False))(params, inputs)
  np.testing.assert_array_equal(np.asarray(replay), full)
  # One compiled program per block (as calibration runs it): XLA fuses differently across the
  # program boundaries (e.g. where the RoPE tables and adaLN inputs are computed), measured 1e-7.
  err = relative_error(_replay(config, params, inputs, jit_each=True), full)
  print(f"per-block jit replay vs __call__ relative L2 = {err:.2e}")
  assert err < 1e-6, err


def test_fp16_residual_is_clipped_to_the_fp16_range():
  # diffusers clips the single block's output (and the double block's text stream) to +-65504 in fp16.
  config = FLUX_PRESETS["flux-tiny"].replace(dtype="float16", param_dtype="float16")
  params = trees.cast_tree(init_flux_params(FLUX_PRESETS["flux-tiny"], 0), jnp.float16)
  params = params["single_transformer_blocks_0"]
  gate_bias = np.zeros(3 * config.inner_dim, np.float16)
  gate_bias[2 * config.inner_dim:] = 5000.0  # adaLN chunks: shift, scale, gate
  params = {**params, "norm": {"linear": {**params["norm"]["linear"], "bias": jnp.asarray(gate_bias)}}}
  rng = np.random.default_rng(0)
  big = lambda n: (6e4 * np.sign(rng.standard_normal((1, n, config.inner_dim)))).astype(np.float16)
  ids = np.zeros((_TEXT_LEN + 4, 3), np.float32)
  temb = rng.standard_normal((1, config.inner_dim)).astype(np.float16)
  context, x = jax.jit(FluxSingleBlock(config).apply)({"params": params}, big(4), big(_TEXT_LEN), temb,
                                                      flux_rope(jnp.asarray(ids), config.axes_dims_rope))
  both = np.concatenate([np.asarray(context), np.asarray(x)], axis=1).astype(np.float32)
  assert np.isfinite(both).all()
  assert (np.abs(both) == 65504).mean() > 0.1  # the update overflowed fp16 and was clipped, not turned to inf


# ----------------------------------------------------------------------------- loader errors
def _rewrite(src, dst, edit_tensors=None, edit_config=None):
  """Copies a single-file diffusers folder, editing its tensors / config."""
  dst.mkdir()
  config = json.loads((src / "config.json").read_text())
  if edit_config:
    edit_config(config)
  (dst / "config.json").write_text(json.dumps(config))
  tensors = safetensors.torch.load_file(str(src / "diffusion_pytorch_model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  safetensors.torch.save_file(tensors, str(dst / "diffusion_pytorch_model.safetensors"))
  return dst


def test_missing_tensor_is_named(saved, tmp_path):
  folder = _rewrite(saved["guided"]["folder"], tmp_path / "t",
                    lambda t: t.pop("single_transformer_blocks.1.attn.norm_k.weight"))
  with pytest.raises(CheckpointError, match=r"missing.*single_transformer_blocks\.1\.attn\.norm_k\.weight"):
    load_flux_transformer(folder)


def test_unexpected_tensor_is_named(saved, tmp_path):
  def add(t):
    t["transformer_blocks.0.attn.to_q.extra"] = torch.zeros(3)
  folder = _rewrite(saved["guided"]["folder"], tmp_path / "t", add)
  with pytest.raises(CheckpointError, match=r"unexpected.*transformer_blocks\.0\.attn\.to_q\.extra"):
    load_flux_transformer(folder)


@pytest.mark.parametrize("key,shape", [
    ("transformer_blocks.1.attn.to_k.weight", (128, 64)),  # hidden inside the q/k/v concatenation
    ("single_transformer_blocks.0.proj_out.weight", (128, 128 + 512 + 8)),  # extra columns a slice would drop
    ("proj_out.weight", (32, 128)),
])
def test_misshaped_tensor_is_named(saved, tmp_path, key, shape):
  def reshape(t):
    t[key] = torch.zeros(shape)
  folder = _rewrite(saved["guided"]["folder"], tmp_path / "t", reshape)
  with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + r".*shape"):
    load_flux_transformer(folder)


def test_other_model_class_and_unsupported_config_are_rejected(saved, tmp_path):
  def other(c):
    c["_class_name"] = "SD3Transformer2DModel"
  folder = _rewrite(saved["guided"]["folder"], tmp_path / "a", edit_config=other)
  with pytest.raises(CheckpointError, match="SD3Transformer2DModel"):
    load_flux_transformer(folder)

  def unsupported(c):
    c["qk_norm"] = "layer_norm"
  folder = _rewrite(saved["guided"]["folder"], tmp_path / "b", edit_config=unsupported)
  with pytest.raises(CheckpointError, match="qk_norm"):
    load_flux_transformer(folder)


# ----------------------------------------------------------------------------- config and params
def test_config_from_diffusers_and_errors():
  model_config = diffusers.FluxTransformer2DModel(**_TINY).config  # includes diffusers' metadata keys
  assert FluxConfig.from_diffusers(model_config) == FLUX_PRESETS["flux-tiny"]
  assert FluxConfig.from_diffusers(model_config, dtype="fp32").dtype == jnp.float32
  with pytest.raises(ValueError, match="sums to 60"):
    FluxConfig.from_diffusers({**_TINY, "axes_dims_rope": [4, 28, 28]})
  with pytest.raises(ValueError, match="even"):
    FluxConfig.from_diffusers({**_TINY, "axes_dims_rope": [9, 27, 28]})
  with pytest.raises(ValueError, match="unsupported.*mlp_ratio"):
    FluxConfig.from_diffusers({**_TINY, "mlp_ratio": 4.0})
  with pytest.raises(ValueError, match="override.*heads"):
    FluxConfig.from_diffusers(_TINY, heads=3)
  with pytest.raises(ValueError, match="attention_impl"):
    FLUX_PRESETS["flux-tiny"].replace(attention_impl="flash")
  with pytest.raises(ValueError, match="param_dtype"):
    FLUX_PRESETS["flux-tiny"].replace(param_dtype="int8")


def test_bad_inputs_are_named():
  config = FLUX_PRESETS["flux-tiny"]
  model = FluxTransformer2DModel(config)
  inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in _inputs(_TINY).items()}
  params = abstract_flux_params(config)
  apply = lambda model, p, kw: model.apply({"params": p}, **kw)
  run = lambda **kw: jax.eval_shape(functools.partial(apply, model), params, {**inputs, **kw})
  assert run().shape == (_BATCH, _GRID[0] * _GRID[1], 64)
  with pytest.raises(ValueError, match="guidance is required"):
    run(guidance=None)
  with pytest.raises(ValueError, match="img_ids"):
    run(img_ids=jax.ShapeDtypeStruct((1, _GRID[0] * _GRID[1], 3), jnp.float32))
  with pytest.raises(ValueError, match="encoder_hidden_states"):
    run(encoder_hidden_states=jax.ShapeDtypeStruct((_BATCH, _TEXT_LEN, 64), jnp.float32))
  with pytest.raises(ValueError, match="timestep"):
    run(timestep=jax.ShapeDtypeStruct((), jnp.float32))
  unguided = FluxTransformer2DModel(config.replace(guidance_embeds=False))
  with pytest.raises(ValueError, match="guidance must be None"):
    jax.eval_shape(functools.partial(apply, unguided), params, inputs)


def _block_shapes(dim, head, mlp):
  double = {
      "norm1/linear/kernel": (dim, 6 * dim), "norm1/linear/bias": (6 * dim,),
      "norm1_context/linear/kernel": (dim, 6 * dim), "norm1_context/linear/bias": (6 * dim,),
      "attn/to_qkv/kernel": (dim, 3 * dim), "attn/to_qkv/bias": (3 * dim,),
      "attn/add_qkv_proj/kernel": (dim, 3 * dim), "attn/add_qkv_proj/bias": (3 * dim,),
      "attn/norm_q/scale": (head,), "attn/norm_k/scale": (head,),
      "attn/norm_added_q/scale": (head,), "attn/norm_added_k/scale": (head,),
      "attn/to_out/kernel": (dim, dim), "attn/to_out/bias": (dim,),
      "attn/to_add_out/kernel": (dim, dim), "attn/to_add_out/bias": (dim,),
      "ff/fc1/kernel": (dim, mlp), "ff/fc1/bias": (mlp,), "ff/fc2/kernel": (mlp, dim), "ff/fc2/bias": (dim,),
      "ff_context/fc1/kernel": (dim, mlp), "ff_context/fc1/bias": (mlp,),
      "ff_context/fc2/kernel": (mlp, dim), "ff_context/fc2/bias": (dim,),
  }
  single = {
      "norm/linear/kernel": (dim, 3 * dim), "norm/linear/bias": (3 * dim,),
      "attn/to_qkv/kernel": (dim, 3 * dim), "attn/to_qkv/bias": (3 * dim,),
      "attn/norm_q/scale": (head,), "attn/norm_k/scale": (head,),
      "proj_mlp/kernel": (dim, mlp), "proj_mlp/bias": (mlp,),
      "proj_out_attn/kernel": (dim, dim), "proj_out_attn/bias": (dim,),
      "proj_out_mlp/kernel": (mlp, dim),
  }
  return double, single


def test_tiny_param_tree_shapes():
  expected = {
      "x_embedder/kernel": (64, 128), "x_embedder/bias": (128,),
      "context_embedder/kernel": (128, 128), "context_embedder/bias": (128,),
      "time_text_embed/timestep_embedder/linear_1/kernel": (256, 128),
      "time_text_embed/timestep_embedder/linear_1/bias": (128,),
      "time_text_embed/timestep_embedder/linear_2/kernel": (128, 128),
      "time_text_embed/timestep_embedder/linear_2/bias": (128,),
      "time_text_embed/guidance_embedder/linear_1/kernel": (256, 128),
      "time_text_embed/guidance_embedder/linear_1/bias": (128,),
      "time_text_embed/guidance_embedder/linear_2/kernel": (128, 128),
      "time_text_embed/guidance_embedder/linear_2/bias": (128,),
      "time_text_embed/text_embedder/linear_1/kernel": (64, 128),
      "time_text_embed/text_embedder/linear_1/bias": (128,),
      "time_text_embed/text_embedder/linear_2/kernel": (128, 128),
      "time_text_embed/text_embedder/linear_2/bias": (128,),
      "norm_out/linear/kernel": (128, 256), "norm_out/linear/bias": (256,),
      "proj_out/kernel": (128, 64), "proj_out/bias": (64,),
  }
  double, single = _block_shapes(dim=128, head=64, mlp=512)
  for i in range(2):
    expected.update({f"transformer_blocks_{i}/{k}": v for k, v in double.items()})
    expected.update({f"single_transformer_blocks_{i}/{k}": v for k, v in single.items()})
  got = trees.flatten(abstract_flux_params(FLUX_PRESETS["flux-tiny"]))
  assert {k: tuple(v.shape) for k, v in got.items()} == expected
  assert {v.dtype for v in got.values()} == {jnp.dtype(jnp.bfloat16)}
  # Every linear's input width is a multiple of 64 (the INT4 group size).
  assert all(v[0] % 64 == 0 for k, v in expected.items() if k.endswith("kernel"))
  # The mapping table produces exactly this tree.
  assert sorted(r.target for r in flux_mapping(FLUX_PRESETS["flux-tiny"])) == sorted(expected)


def test_init_flux_params_is_deterministic():
  config = FLUX_PRESETS["flux-tiny"]
  a, b, c = (trees.flatten(init_flux_params(config, seed)) for seed in (0, 0, 1))
  trees.validate_tree(trees.unflatten(a), abstract_flux_params(config))
  for path in a:
    assert np.asarray(a[path]).tobytes() == np.asarray(b[path]).tobytes(), path
    assert not np.array_equal(np.asarray(a[path]), np.asarray(c[path])), path
  # Kernels are N(0, 1/fan_in): the whitened values have unit variance.
  whitened = np.concatenate([np.asarray(v, np.float32).ravel() * math.sqrt(v.shape[0])
                             for k, v in a.items() if k.endswith("kernel")])
  assert abs(whitened.std() - 1.0) < 0.02 and abs(whitened.mean()) < 0.01
  # Leaves differ from each other (keys are folded in per path).
  assert not np.array_equal(np.asarray(a["transformer_blocks_0/ff/fc1/kernel"]),
                            np.asarray(a["transformer_blocks_1/ff/fc1/kernel"]))


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_real_presets_match_diffusers_parameter_count(preset):
  config = FLUX_PRESETS[preset]
  with torch.device("meta"):
    reference = diffusers.FluxTransformer2DModel(**{k: getattr(config, k) for k in _DIFFUSERS_KEYS})
  assert FluxConfig.from_diffusers(reference.config) == config
  ours = sum(math.prod(v.shape) for v in trees.flatten(abstract_flux_params(config)).values())
  assert ours == sum(p.numel() for p in reference.parameters())
  assert (config.num_layers, config.num_single_layers, config.inner_dim) == (19, 38, 3072)
