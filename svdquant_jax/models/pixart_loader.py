"""Loading diffusers ``PixArtTransformer2DModel`` checkpoints into :mod:`svdquant_jax.models.pixart`.

The mapping is a declarative :class:`~svdquant_jax.models.checkpoint.Rule` table built from the
config (:func:`pixart_mapping`). PyTorch ``[out, in]`` linear weights become ``[in, out]``
kernels; self-attention ``to_q/to_k/to_v`` are concatenated into ``attn1/to_qkv`` and
cross-attention ``to_k/to_v`` into ``attn2/to_kv``; the patch conv ``[O, I, p, p]`` becomes an
NHWC kernel ``[p, p, I, O]``.
"""

from __future__ import annotations

import os
from typing import Any

from svdquant_jax.models import checkpoint
from svdquant_jax.models.checkpoint import Rule, conv_rules, dense_rules, fused_dense_rules
from svdquant_jax.models.pixart import PixArtConfig, abstract_pixart_params
from svdquant_jax.utils.safetensors_io import CheckpointError

PIXART_CLASS_NAMES = ("PixArtTransformer2DModel",)
# The position-embedding buffer is recomputed from the config (older exports may contain it).
PIXART_IGNORED_TENSORS = (r"pos_embed\.pos_embed",)


def _timestep_mlp_rules(target: str, source: str) -> list[Rule]:
  return dense_rules(f"{target}/linear_1", f"{source}.linear_1") + dense_rules(f"{target}/linear_2",
                                                                                f"{source}.linear_2")


def pixart_block_mapping(config: PixArtConfig, index: int) -> list[Rule]:
  """Rules for ``transformer_blocks_<index>`` (diffusers ``transformer_blocks.<index>``)."""
  t, s = f"transformer_blocks_{index}", f"transformer_blocks.{index}"
  bias = config.attention_bias
  return [
      Rule(f"{t}/scale_shift_table", (f"{s}.scale_shift_table",)),
      *fused_dense_rules(f"{t}/attn1/to_qkv", [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"], bias),
      *dense_rules(f"{t}/attn1/to_out", f"{s}.attn1.to_out.0"),
      *dense_rules(f"{t}/attn2/to_q", f"{s}.attn2.to_q", bias),
      *fused_dense_rules(f"{t}/attn2/to_kv", [f"{s}.attn2.to_k", f"{s}.attn2.to_v"], bias),
      *dense_rules(f"{t}/attn2/to_out", f"{s}.attn2.to_out.0"),
      *dense_rules(f"{t}/ff/fc1", f"{s}.ff.net.0.proj"),
      *dense_rules(f"{t}/ff/fc2", f"{s}.ff.net.2"),
  ]


def pixart_mapping(config: PixArtConfig) -> list[Rule]:
  """The full mapping table (Flax param path <- diffusers tensor names) for ``config``."""
  rules = conv_rules("pos_embed/proj", "pos_embed.proj")
  rules += _timestep_mlp_rules("adaln_single/emb/timestep_embedder", "adaln_single.emb.timestep_embedder")
  if config.use_additional_conditions:
    rules += _timestep_mlp_rules("adaln_single/emb/resolution_embedder", "adaln_single.emb.resolution_embedder")
    rules += _timestep_mlp_rules("adaln_single/emb/aspect_ratio_embedder",
                                 "adaln_single.emb.aspect_ratio_embedder")
  rules += dense_rules("adaln_single/linear", "adaln_single.linear")
  rules += dense_rules("caption_projection/linear_1", "caption_projection.linear_1")
  rules += dense_rules("caption_projection/linear_2", "caption_projection.linear_2")
  for i in range(config.num_layers):
    rules += pixart_block_mapping(config, i)
  rules.append(Rule("scale_shift_table", ("scale_shift_table",)))
  rules += dense_rules("proj_out", "proj_out")
  return rules


def load_pixart_transformer(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None, *,
                            variant: str | None = None) -> tuple[PixArtConfig, dict[str, Any]]:
  """Loads a diffusers PixArt transformer folder (``config.json`` + safetensors, single or sharded).

  Args:
    folder: the ``transformer`` component folder.
    dtype: compute dtype (default: the config default, float16).
    param_dtype: parameter dtype (default: ``dtype`` when given, else float16).
    variant: diffusers weight variant to read (``diffusion_pytorch_model.<variant>.safetensors``,
      e.g. ``"fp16"``); by default the files without a variant.

  Returns:
    ``(config, params)``; ``params`` is the tree for ``PixArtTransformer2DModel(config)``
    (without the ``params`` collection), every leaf in ``config.param_dtype``.

  Raises:
    CheckpointError: wrong model class, unsupported config (naming the key), or missing,
      unexpected or misshaped tensors (each by name).
  """
  raw = checkpoint.read_config(folder, PIXART_CLASS_NAMES)
  overrides: dict[str, Any] = {}
  if dtype is not None:
    overrides["dtype"] = dtype
    overrides["param_dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  try:
    config = PixArtConfig.from_diffusers(raw, **overrides)
  except CheckpointError:
    raise
  except ValueError as e:
    raise CheckpointError(f"{os.path.join(os.fspath(folder), 'config.json')}: {e}") from e
  store = checkpoint.open_store(folder, variant)
  params = checkpoint.load_params(store, pixart_mapping(config), abstract_pixart_params(config),
                                  ignore=PIXART_IGNORED_TENSORS, source=os.fspath(folder))
  return config, params
