"""Loading diffusers ``SanaTransformer2DModel`` checkpoints into :mod:`svdquant_jax.models.sana`.

The mapping is a :class:`~svdquant_jax.models.checkpoint.Rule` table built from the config
(:func:`sana_mapping`). PyTorch ``[out, in]`` linear weights become ``[in, out]`` kernels;
self-attention ``to_q/to_k/to_v`` are concatenated into ``attn1/to_qkv`` and cross-attention
``to_k/to_v`` into ``attn2/to_kv``; the GLUMBConv 1x1 convolutions ``[O, I, 1, 1]`` become
``nn.Dense`` kernels ``[I, O]`` (:func:`conv1x1_dense`), the depthwise ``[C, 1, 3, 3]`` an NHWC
kernel ``[3, 3, 1, C]``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from svdquant_jax.models import checkpoint
from svdquant_jax.models.checkpoint import Rule, conv_rules, dense_rules, fused_dense_rules, norm_rules
from svdquant_jax.models.sana import SanaConfig, abstract_sana_params
from svdquant_jax.utils.safetensors_io import CheckpointError

SANA_CLASS_NAMES = ("SanaTransformer2DModel",)


def conv1x1_dense(xs: Sequence[np.ndarray]) -> np.ndarray:
  """A 1x1 ``Conv2d.weight`` ``[O, I, 1, 1]`` -> ``nn.Dense.kernel`` ``[I, O]``."""
  (x,) = xs
  x = np.asarray(x)
  if x.ndim != 4 or x.shape[2:] != (1, 1):
    raise CheckpointError(f"expected a 1x1 convolution weight [O, I, 1, 1], got shape {x.shape}")
  return x[:, :, 0, 0].T


def check_conv1x1_shapes(store: Any, rules: Sequence[Rule], source: str) -> None:
  """Raises ``CheckpointError`` naming the tensor, the folder and the shape when a weight mapped by
  :func:`conv1x1_dense` is not ``[O, I, 1, 1]`` (checked from the file headers, before loading)."""
  for rule in rules:
    if rule.convert is not conv1x1_dense:
      continue
    (name,) = rule.sources
    if name not in store:
      continue   # reported as missing by checkpoint.load_params
    shape = tuple(store.shape(name)) if hasattr(store, "shape") else tuple(np.shape(store[name]))
    if len(shape) != 4 or shape[2:] != (1, 1):
      raise CheckpointError(f"{source}: {name} has shape {shape}, expected a 1x1 convolution weight [O, I, 1, 1] "
                            f"(for {rule.target})")


def glumbconv_rules(target: str, source: str) -> list[Rule]:
  """Rules for a GLUMBConv (``conv_inverted``, ``conv_depth``, ``conv_point`` without bias)."""
  return [Rule(f"{target}/conv_inverted/kernel", (f"{source}.conv_inverted.weight",), conv1x1_dense),
          Rule(f"{target}/conv_inverted/bias", (f"{source}.conv_inverted.bias",)),
          *conv_rules(f"{target}/conv_depth", f"{source}.conv_depth"),
          Rule(f"{target}/conv_point/kernel", (f"{source}.conv_point.weight",), conv1x1_dense)]


def sana_block_mapping(config: SanaConfig, index: int) -> list[Rule]:
  """Rules for ``transformer_blocks_<index>`` (diffusers ``transformer_blocks.<index>``)."""
  t, s = f"transformer_blocks_{index}", f"transformer_blocks.{index}"
  return [
      Rule(f"{t}/scale_shift_table", (f"{s}.scale_shift_table",)),
      *fused_dense_rules(f"{t}/attn1/to_qkv", [f"{s}.attn1.to_q", f"{s}.attn1.to_k", f"{s}.attn1.to_v"],
                         config.attention_bias),
      *dense_rules(f"{t}/attn1/to_out", f"{s}.attn1.to_out.0"),
      *dense_rules(f"{t}/attn2/to_q", f"{s}.attn2.to_q"),
      *fused_dense_rules(f"{t}/attn2/to_kv", [f"{s}.attn2.to_k", f"{s}.attn2.to_v"]),
      *dense_rules(f"{t}/attn2/to_out", f"{s}.attn2.to_out.0"),
      *glumbconv_rules(f"{t}/ff", f"{s}.ff"),
  ]


def sana_mapping(config: SanaConfig) -> list[Rule]:
  """The full mapping table (Flax param path <- diffusers tensor names) for ``config``."""
  rules = conv_rules("patch_embed", "patch_embed.proj")
  rules += dense_rules("time_embed/timestep_embedder/linear_1", "time_embed.emb.timestep_embedder.linear_1")
  rules += dense_rules("time_embed/timestep_embedder/linear_2", "time_embed.emb.timestep_embedder.linear_2")
  rules += dense_rules("time_embed/linear", "time_embed.linear")
  rules += dense_rules("caption_projection/linear_1", "caption_projection.linear_1")
  rules += dense_rules("caption_projection/linear_2", "caption_projection.linear_2")
  rules += norm_rules("caption_norm", "caption_norm", bias=False)
  for i in range(config.num_layers):
    rules += sana_block_mapping(config, i)
  rules.append(Rule("scale_shift_table", ("scale_shift_table",)))
  rules += dense_rules("proj_out", "proj_out")
  return rules


def read_sana_config(folder: str | os.PathLike, **overrides: Any) -> SanaConfig:
  """The :class:`SanaConfig` of a transformer folder (``CheckpointError`` naming the file on a bad value)."""
  return checkpoint.read_model_config(folder, SANA_CLASS_NAMES, SanaConfig.from_diffusers, **overrides)


def load_sana_transformer(folder: str | os.PathLike, dtype: Any = None, param_dtype: Any = None, *,
                          variant: str | None = None) -> tuple[SanaConfig, dict[str, Any]]:
  """Loads a diffusers SANA transformer folder (``config.json`` + safetensors, single or sharded).

  Args:
    folder: the ``transformer`` component folder.
    dtype: compute dtype (default: the config default, bfloat16).
    param_dtype: parameter dtype (default: ``dtype`` when given, else bfloat16).
    variant: diffusers weight variant (``diffusion_pytorch_model.<variant>.safetensors``, e.g.
      ``"bf16"``); by default the files without a variant.

  Returns:
    ``(config, params)`` for ``SanaTransformer2DModel(config)`` (without the ``params`` collection).

  Raises:
    CheckpointError: wrong model class, unsupported config (naming the key), or missing,
      unexpected or misshaped tensors (each by name).
  """
  overrides: dict[str, Any] = {}
  if dtype is not None:
    overrides["dtype"] = overrides["param_dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  config = read_sana_config(folder, **overrides)
  store = checkpoint.open_store(folder, variant)
  rules = sana_mapping(config)
  check_conv1x1_shapes(store, rules, os.fspath(folder))
  params = checkpoint.load_params(store, rules, abstract_sana_params(config), source=os.fspath(folder))
  return config, params
