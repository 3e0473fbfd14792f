"""Which Nunchaku FLUX.1 tensor is which layer of our Flax FLUX (``docs/nunchaku.md``).

Nunchaku keeps diffusers' block names (``transformer_blocks.{i}``, ``single_transformer_blocks.{j}``)
but fuses and renames the layers inside them. Our model already fuses the same way (q;k;v in one
``to_qkv`` Dense, the single block's ``proj_out`` split by input columns into ``proj_out_attn`` /
``proj_out_mlp``), so every Nunchaku layer is exactly one of our Dense layers:

============================  ==========================  ======  =====================================
Nunchaku layer                our Dense (block-relative)  kind    notes
============================  ==========================  ======  =====================================
``norm1.linear``              ``norm1/linear``            awq     adaLN, 6 chunks interleaved
``norm1_context.linear``      ``norm1_context/linear``    awq     adaLN, 6 chunks
``qkv_proj``                  ``attn/to_qkv``             w4a4    q;k;v rows, one branch
``qkv_proj_context``          ``attn/add_qkv_proj``       w4a4
``out_proj``                  ``attn/to_out``             w4a4    shares λ with ``out_proj_context``
``out_proj_context``          ``attn/to_add_out``         w4a4
``mlp_fc1`` / ``mlp_fc2``     ``ff/fc1`` / ``ff/fc2``     w4a4    fc2: INT4 input shifted (unsigned)
``mlp_context_fc{1,2}``       ``ff_context/fc{1,2}``      w4a4    fc2: shifted
single ``norm.linear``        ``norm/linear``             awq     3 chunks
single ``qkv_proj``           ``attn/to_qkv``             w4a4
single ``mlp_fc1``            ``proj_mlp``                w4a4    shares λ with ``qkv_proj``
single ``out_proj``           ``proj_out_attn``           w4a4
single ``mlp_fc2``            ``proj_out_mlp``            w4a4    shifted; Nunchaku puts the whole
                                                                  ``proj_out`` bias here
============================  ==========================  ======  =====================================

plus the q/k RMSNorm weights (``norm_q.weight`` ... <-> ``attn/norm_q/scale``) and, outside the
blocks, the 16-bit layers under their diffusers names.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping

import jax

from svdquant_jax.models import flux as flux_lib
from svdquant_jax.models.flux import FluxConfig
from svdquant_jax.nn import swap_dense

MODEL_CLASS = "NunchakuFluxTransformer2dModel"
SVD_RANK = 32  # the rank Nunchaku's runtime LoRA strength assumes for the base branch


@dataclasses.dataclass(frozen=True)
class Layer:
  """One quantized layer of a block.

  Attributes:
    name: the Nunchaku layer name inside the block (``qkv_proj``).
    path: our Dense path inside the block (``attn/to_qkv``).
    kind: ``"w4a4"`` or ``"awq"``.
    shifted: an INT4 fc2 layer: the engine adds δ to its input and quantizes it unsigned.
    chunks: adaLN chunk count S (awq layers).
    fused_members: how many diffusers linears the layer's rows come from (3 for q;k;v): NVFP4
      then stores per-channel scales (``wcscales``) instead of one ``wtscale``.
    diffusers: the diffusers module(s) of the rows (block-relative), for LoRA targets and errors.
  """
  name: str
  path: str
  kind: str
  shifted: bool = False
  chunks: int = 0
  fused_members: int = 1
  diffusers: tuple[str, ...] = ()


DOUBLE_LAYERS = (
    Layer("norm1.linear", "norm1/linear", "awq", chunks=6, diffusers=("norm1.linear",)),
    Layer("norm1_context.linear", "norm1_context/linear", "awq", chunks=6, diffusers=("norm1_context.linear",)),
    Layer("qkv_proj", "attn/to_qkv", "w4a4", fused_members=3,
          diffusers=("attn.to_q", "attn.to_k", "attn.to_v")),
    Layer("qkv_proj_context", "attn/add_qkv_proj", "w4a4", fused_members=3,
          diffusers=("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    Layer("out_proj", "attn/to_out", "w4a4", diffusers=("attn.to_out.0",)),
    Layer("out_proj_context", "attn/to_add_out", "w4a4", diffusers=("attn.to_add_out",)),
    Layer("mlp_fc1", "ff/fc1", "w4a4", diffusers=("ff.net.0.proj",)),
    Layer("mlp_fc2", "ff/fc2", "w4a4", shifted=True, diffusers=("ff.net.2",)),
    Layer("mlp_context_fc1", "ff_context/fc1", "w4a4", diffusers=("ff_context.net.0.proj",)),
    Layer("mlp_context_fc2", "ff_context/fc2", "w4a4", shifted=True, diffusers=("ff_context.net.2",)),
)
DOUBLE_NORMS = (("norm_q", "attn/norm_q"), ("norm_k", "attn/norm_k"), ("norm_added_q", "attn/norm_added_q"),
                ("norm_added_k", "attn/norm_added_k"))

SINGLE_LAYERS = (
    Layer("norm.linear", "norm/linear", "awq", chunks=3, diffusers=("norm.linear",)),
    Layer("qkv_proj", "attn/to_qkv", "w4a4", fused_members=3, diffusers=("attn.to_q", "attn.to_k", "attn.to_v")),
    Layer("mlp_fc1", "proj_mlp", "w4a4", diffusers=("proj_mlp",)),
    Layer("out_proj", "proj_out_attn", "w4a4", diffusers=("proj_out",)),
    Layer("mlp_fc2", "proj_out_mlp", "w4a4", shifted=True, diffusers=("proj_out",)),
)
SINGLE_NORMS = (("norm_q", "attn/norm_q"), ("norm_k", "attn/norm_k"))


def blocks(config: FluxConfig) -> list[tuple[str, str, tuple[Layer, ...], tuple[tuple[str, str], ...]]]:
  """``(nunchaku prefix, our prefix, layers, norms)`` for every block, in model order."""
  out = [(f"transformer_blocks.{i}", f"transformer_blocks_{i}", DOUBLE_LAYERS, DOUBLE_NORMS)
         for i in range(config.num_layers)]
  out += [(f"single_transformer_blocks.{j}", f"single_transformer_blocks_{j}", SINGLE_LAYERS, SINGLE_NORMS)
          for j in range(config.num_single_layers)]
  return out


def unquantized_layers(config: FluxConfig) -> list[tuple[str, str]]:
  """``(diffusers module, our Dense path)`` of the 16-bit linears outside the blocks."""
  names = ["x_embedder", "context_embedder"]
  embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if config.guidance_embeds else [])
  layers = [(n, n) for n in names]
  for e in embedders:
    layers += [(f"time_text_embed.{e}.linear_{i}", f"time_text_embed/{e}/linear_{i}") for i in (1, 2)]
  layers += [("norm_out.linear", "norm_out/linear"), ("proj_out", "proj_out")]
  return layers


@functools.lru_cache(maxsize=16)
def _abstract_init_lru(config: FluxConfig, specs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
  return _abstract_init(config, specs)


def _abstract_init_cached(config: FluxConfig, specs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
  """:func:`_abstract_init`, remembered for hashable configs and specs (read-only results)."""
  try:
    hash((config, specs))
  except TypeError:
    return _abstract_init(config, specs)
  return _abstract_init_lru(config, specs)


def _abstract_init(config: FluxConfig, specs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
  """``jax.eval_shape`` of ``init`` with the ``specs`` layers swapped (the whole model of ``config``)."""
  model = flux_lib.FluxTransformer2DModel(config)
  inputs = flux_lib.example_inputs(config)

  def init(key, inputs):
    with swap_dense(dict(specs)):
      return model.init(key, **inputs)["params"]
  return jax.eval_shape(init, jax.random.key(0), inputs)


def expected_params(config: FluxConfig, specs: Mapping[str, Any]) -> dict[str, Any]:
  """The quantized params tree's shapes/dtypes (``jax.eval_shape`` of ``init`` with the layers swapped).

  Equal to tracing the whole model, but built from one traced block per distinct (block kind,
  block specs) and one trace without blocks for the rest: all blocks of a kind are the same
  module, and tracing FLUX.1's 57 blocks takes seconds.
  """
  by_block: dict[str, dict[str, Any]] = {}
  rest = []
  prefixes = {ours: ours + "/" for _, ours, _, _ in blocks(config)}
  for path, spec in specs.items():
    block = path.split("/", 1)[0]
    if block in prefixes and path.startswith(prefixes[block]):
      by_block.setdefault(block, {})[path[len(prefixes[block]):]] = spec
    else:
      rest.append((path, spec))
  empty = dataclasses.replace(config, num_layers=0, num_single_layers=0)
  out = dict(_abstract_init_cached(empty, tuple(rest)))
  traced: dict[tuple, Any] = {}
  for _, ours, _, _ in blocks(config):
    double = ours.startswith("transformer_blocks_")
    first = "transformer_blocks_0" if double else "single_transformer_blocks_0"
    key = (double, tuple(sorted(by_block.get(ours, {}).items())))
    if key not in traced:
      one = dataclasses.replace(empty, num_layers=1) if double else dataclasses.replace(empty, num_single_layers=1)
      traced[key] = _abstract_init_cached(one, tuple((f"{first}/{p}", spec) for p, spec in key[1]))[first]
    out[ours] = traced[key]
  # a fresh tree (the cached traces stay unshared), in the key order of a whole-model trace
  return jax.tree.map(lambda leaf: leaf, dict(sorted(out.items())))



# ----------------------------------------------------------------------------- metadata (all JSON strings)
def diffusers_config(config: FluxConfig) -> dict[str, Any]:
  """The diffusers ``config.json`` of the transformer (what Nunchaku's loaders build the model from)."""
  return config.to_diffusers()


def quantization_config(fmt: str, rank: int) -> dict[str, Any]:
  """``quantization_config``: what the v1 loader checks against the GPU and v2 reads the rank from."""
  if fmt == "int4":
    w = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
    a = {"dtype": "int4", "scale_dtype": None, "group_size": 64}
  else:
    w = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": 16}
    a = {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}
  return {"method": "svdquant", "weight": w, "activation": a, "rank": int(rank)}


def comfy_config(config: FluxConfig) -> dict[str, Any]:
  """ComfyUI's model description (``Flux`` / ``FluxSchnell`` by the guidance embedder)."""
  channels = config.in_channels // 4 if config.in_channels % 4 == 0 else config.in_channels
  return {"model_class": "Flux" if config.guidance_embeds else "FluxSchnell",
          "model_config": {"axes_dim": list(config.axes_dims_rope), "context_in_dim": config.joint_attention_dim,
                           "depth": config.num_layers, "depth_single_blocks": config.num_single_layers,
                           "disable_unet_model_creation": True, "guidance_embed": bool(config.guidance_embeds),
                           "hidden_size": config.inner_dim, "image_model": "flux", "in_channels": channels,
                           "mlp_ratio": config.mlp_dim / config.inner_dim, "num_heads": config.num_attention_heads,
                           "out_channels": channels, "patch_size": 2, "qkv_bias": True, "theta": 10000,
                           "vec_in_dim": config.pooled_projection_dim}}


def metadata(config: FluxConfig, fmt: str, rank: int) -> dict[str, str]:
  """The four metadata entries of a single-file checkpoint, each a JSON string."""
  return {"config": json.dumps(diffusers_config(config)), "quantization_config": json.dumps(quantization_config(fmt, rank)),
          "comfy_config": json.dumps(comfy_config(config)), "model_class": MODEL_CLASS}


__all__ = ["Layer", "DOUBLE_LAYERS", "SINGLE_LAYERS", "DOUBLE_NORMS", "SINGLE_NORMS", "blocks", "unquantized_layers",
           "diffusers_config", "quantization_config", "comfy_config", "metadata", "MODEL_CLASS", "SVD_RANK", "expected_params"]
