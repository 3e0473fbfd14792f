"""Loading a diffusers ``FluxTransformer2DModel`` folder into the Flax FLUX model.

The mapping is a declarative table (:func:`flux_mapping`) of :class:`~svdquant_jax.models.checkpoint.Rule`
built from the config. Every rule also checks the shape of each checkpoint tensor it reads
against the shape the config implies, so a misshaped tensor is reported by its checkpoint name
(also where the conversion concatenates or slices, which would otherwise hide it).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from svdquant_jax.models import checkpoint
from svdquant_jax.models.checkpoint import Convert, Rule
from svdquant_jax.models.flux import TIMESTEP_CHANNELS, FluxConfig, abstract_flux_params, as_dtype
from svdquant_jax.utils.safetensors_io import CheckpointError

FLUX_CLASS_NAMES = ("FluxTransformer2DModel",)
Shape = tuple[int, ...]


def _checked(convert: Convert, sources: Sequence[str], shapes: Sequence[Shape]) -> Convert:
  """Wraps ``convert`` so that each source tensor's shape is checked first, by name."""
  expected = dict(zip(sources, shapes))

  def checked(xs):
    for name, x in zip(sources, xs):
      if tuple(x.shape) != expected[name]:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(x.shape)}, expected {expected[name]}")
    return convert(xs)
  return checked


def _linear(target: str, source: str, fan_in: int, fan_out: int, bias: bool = True) -> list[Rule]:
  """``source`` ``nn.Linear(fan_in, fan_out)`` -> Dense ``target``."""
  weight = f"{source}.weight"
  rules = [Rule(f"{target}/kernel", (weight,), _checked(checkpoint.linear, [weight], [(fan_out, fan_in)]))]
  if bias:
    rules.append(Rule(f"{target}/bias", (f"{source}.bias",),
                      _checked(checkpoint.identity, [f"{source}.bias"], [(fan_out,)])))
  return rules


def _fused(target: str, sources: Sequence[str], fan_in: int, fan_out: int) -> list[Rule]:
  """Several ``nn.Linear(fan_in, fan_out)`` sharing an input -> one Dense (q/k/v -> qkv)."""
  weights = [f"{s}.weight" for s in sources]
  biases = [f"{s}.bias" for s in sources]
  return [Rule(f"{target}/kernel", tuple(weights),
               _checked(checkpoint.concat_linear, weights, [(fan_out, fan_in)] * len(sources))),
          Rule(f"{target}/bias", tuple(biases), _checked(checkpoint.concat, biases, [(fan_out,)] * len(sources)))]


def _rms_norm(target: str, source: str, dim: int) -> list[Rule]:
  weight = f"{source}.weight"
  return [Rule(f"{target}/scale", (weight,), _checked(checkpoint.identity, [weight], [(dim,)]))]


def flux_mapping(config: FluxConfig) -> list[Rule]:
  """The diffusers -> Flax mapping table for ``config`` (one rule per Flax parameter leaf)."""
  dim, mlp, head = config.inner_dim, config.mlp_dim, config.attention_head_dim
  rules = _linear("x_embedder", "x_embedder", config.in_channels, dim)
  rules += _linear("context_embedder", "context_embedder", config.joint_attention_dim, dim)
  embedders = {"timestep_embedder": TIMESTEP_CHANNELS, "text_embedder": config.pooled_projection_dim}
  if config.guidance_embeds:
    embedders["guidance_embedder"] = TIMESTEP_CHANNELS
  for name, fan_in in embedders.items():
    rules += _linear(f"time_text_embed/{name}/linear_1", f"time_text_embed.{name}.linear_1", fan_in, dim)
    rules += _linear(f"time_text_embed/{name}/linear_2", f"time_text_embed.{name}.linear_2", dim, dim)

  for i in range(config.num_layers):
    t, s = f"transformer_blocks_{i}", f"transformer_blocks.{i}"
    rules += _linear(f"{t}/norm1/linear", f"{s}.norm1.linear", dim, 6 * dim)
    rules += _linear(f"{t}/norm1_context/linear", f"{s}.norm1_context.linear", dim, 6 * dim)
    rules += _fused(f"{t}/attn/to_qkv", [f"{s}.attn.to_{p}" for p in "qkv"], dim, dim)
    rules += _fused(f"{t}/attn/add_qkv_proj", [f"{s}.attn.add_{p}_proj" for p in "qkv"], dim, dim)
    for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
      rules += _rms_norm(f"{t}/attn/{norm}", f"{s}.attn.{norm}", head)
    rules += _linear(f"{t}/attn/to_out", f"{s}.attn.to_out.0", dim, dim)
    rules += _linear(f"{t}/attn/to_add_out", f"{s}.attn.to_add_out", dim, dim)
    for ff in ("ff", "ff_context"):
      rules += _linear(f"{t}/{ff}/fc1", f"{s}.{ff}.net.0.proj", dim, mlp)
      rules += _linear(f"{t}/{ff}/fc2", f"{s}.{ff}.net.2", mlp, dim)

  for i in range(config.num_single_layers):
    t, s = f"single_transformer_blocks_{i}", f"single_transformer_blocks.{i}"
    rules += _linear(f"{t}/norm/linear", f"{s}.norm.linear", dim, 3 * dim)
    rules += _fused(f"{t}/attn/to_qkv", [f"{s}.attn.to_{p}" for p in "qkv"], dim, dim)
    rules += _rms_norm(f"{t}/attn/norm_q", f"{s}.attn.norm_q", head)
    rules += _rms_norm(f"{t}/attn/norm_k", f"{s}.attn.norm_k", head)
    rules += _linear(f"{t}/proj_mlp", f"{s}.proj_mlp", dim, mlp)
    # proj_out acts on [attn_out (dim); mlp_hidden (mlp)]: split by input columns, bias on the attention part.
    proj_out = f"{s}.proj_out.weight"
    proj_out_shape = [(dim, dim + mlp)]
    rules += [
        Rule(f"{t}/proj_out_attn/kernel", (proj_out,),
             _checked(checkpoint.linear_in_slice(0, dim), [proj_out], proj_out_shape)),
        Rule(f"{t}/proj_out_attn/bias", (f"{s}.proj_out.bias",),
             _checked(checkpoint.identity, [f"{s}.proj_out.bias"], [(dim,)])),
        Rule(f"{t}/proj_out_mlp/kernel", (proj_out,),
             _checked(checkpoint.linear_in_slice(dim, dim + mlp), [proj_out], proj_out_shape)),
    ]

  rules += _linear("norm_out/linear", "norm_out.linear", dim, 2 * dim)
  rules += _linear("proj_out", "proj_out", dim, config.out_features)
  return rules


def read_flux_config(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None) -> FluxConfig:
  """The :class:`FluxConfig` of a diffusers ``transformer`` folder, without reading its weights."""
  overrides = {}
  if dtype is not None:
    overrides["dtype"] = as_dtype(dtype, "dtype")
  if param_dtype is not None:
    overrides["param_dtype"] = as_dtype(param_dtype, "param_dtype")
  return checkpoint.read_model_config(folder, FLUX_CLASS_NAMES, FluxConfig.from_diffusers, **overrides)


def load_flux_transformer(folder: str | os.PathLike, dtype: Any = None,
                          param_dtype: Any = None) -> tuple[FluxConfig, dict[str, Any]]:
  """Loads a diffusers ``FluxTransformer2DModel`` folder (``config.json`` + safetensors, single or sharded).

  Args:
    folder: the ``transformer`` component folder.
    dtype: compute dtype override (default: the config default, bfloat16).
    param_dtype: parameter dtype override (default bfloat16); checkpoint tensors are cast to it.

  Returns:
    ``(config, params)`` with ``params`` the Flax params tree (without the ``params`` collection).

  Raises:
    CheckpointError: wrong model class, unsupported config, or a missing, unexpected or
      misshaped tensor (named).
    ValueError: an invalid ``dtype`` / ``param_dtype`` argument.
  """
  config = read_flux_config(folder, dtype, param_dtype)
  store = checkpoint.open_store(folder)
  source = os.fspath(folder)
  try:
    params = checkpoint.load_params(store, flux_mapping(config), abstract_flux_params(config), source=source)
  except CheckpointError as e:
    if source in str(e):
      raise
    raise CheckpointError(f"{source}: {e}") from e
  return config, params
