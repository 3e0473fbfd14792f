"""The original ``ImageReward.pt`` (a torch state dict of ``ImageReward.ImageReward``) -> our layout.

numpy only: ``launch/convert_image_reward.py`` reads the ``.pt`` file with torch and passes the
tensors here as numpy arrays (the package never imports torch).

The state dict names (``image-reward`` 1.5, as its ``ImageReward`` class builds them)::

  blip.visual_encoder.{cls_token [1, 1, Hv], pos_embed [1, N + 1, Hv], patch_embed.proj.*,
                       blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*}
  blip.text_encoder.{embeddings.{word_embeddings, position_embeddings, LayerNorm}.*,
                     encoder.layer.<i>.{attention, crossattention}.{self.{query, key, value},
                     output.{dense, LayerNorm}}.*, encoder.layer.<i>.{intermediate.dense,
                     output.dense, output.LayerNorm}.*}
  mlp.layers.{0, 2, 4, 6, 7}.{weight, bias}      (the Linear layers between the Dropouts)

``blip.vision_proj``, ``blip.text_proj`` (BLIP's contrastive projections, unused by the reward) and
the ``position_ids`` buffer are ignored, as ``ImageReward.score`` never reads them. Every other
tensor must map onto the model: the original loads with ``strict=False`` and would silently keep
random weights for a missing tensor; here a missing, unknown or misshaped tensor is an error.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import numpy as np

from svdquant_jax.eval.image_reward import ImageRewardConfig, abstract_params
from svdquant_jax.models import blip
from svdquant_jax.models import checkpoint as ckpt

MLP_TORCH_INDICES = (0, 2, 4, 6, 7)
IGNORED = (r"blip\.vision_proj\.(weight|bias)", r"blip\.text_proj\.(weight|bias)",
           r"blip\.text_encoder\.embeddings\.position_ids")


def _prefixed(rules: list[ckpt.Rule], target_prefix: str) -> list[ckpt.Rule]:
  return [dataclasses.replace(r, target=f"{target_prefix}{r.target}") for r in rules]


def image_reward_mapping(config: ImageRewardConfig) -> list[ckpt.Rule]:
  """Rules from the ``ImageReward.pt`` names to :class:`~svdquant_jax.eval.image_reward.ImageRewardModel`."""
  rules = _prefixed(blip.vision_mapping(config.vision, "blip.visual_encoder."), "visual_encoder/")
  rules += _prefixed(blip.text_mapping(config.text, "blip.text_encoder."), "text_encoder/")
  for k, index in enumerate(MLP_TORCH_INDICES):
    rules += ckpt.dense_rules(f"mlp_{k}", f"mlp.layers.{index}")
  return rules


def config_from_med_config(med_config: Mapping[str, Any] | str, vision: blip.BLIPVisionConfig | None = None,
                           source: str = "med_config.json") -> ImageRewardConfig:
  """The config for BLIP's ``med_config.json`` (a dict or its JSON text) and a ViT (default ViT-L/16
  at 224, which ``ImageReward`` always builds); as the original, the text encoder's
  ``encoder_width`` is the ViT width whatever the file says."""
  if isinstance(med_config, str):
    try:
      med_config = json.loads(med_config)
    except json.JSONDecodeError as e:
      raise ValueError(f"{source}: not JSON: {e}") from e
  vision = vision or blip.BLIPVisionConfig()
  return ImageRewardConfig(vision, blip.BLIPTextConfig.from_med_config(med_config, vision.hidden_size, source))


def convert_image_reward_state(state: Mapping[str, np.ndarray], config: ImageRewardConfig | None = None,
                               source: str = "ImageReward.pt") -> dict[str, Any]:
  """The original state dict (name -> numpy array) -> our params tree (float32 numpy leaves).

  Args:
    state: the tensors of ``ImageReward.pt``.
    config: the tower sizes (default ``ImageReward-v1.0``'s).
    source: the file's name for error messages.

  Raises:
    CheckpointError: naming ``source`` and every missing, unknown or misshaped tensor (with the
      checkpoint's and the expected shape).
  """
  config = config or ImageRewardConfig()
  store = {k: np.asarray(v) for k, v in state.items()}
  return ckpt.load_params(store, image_reward_mapping(config), abstract_params(config), ignore=IGNORED,
                          source=source, to_device=False)
