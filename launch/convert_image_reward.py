"""Converts the original ImageReward checkpoint (``ImageReward.pt``) to our safetensors layout.

``ImageReward.pt`` is the torch state dict that ``ImageReward.load("ImageReward-v1.0")`` reads (from
the THUDM/ImageReward model repository, with ``med_config.json`` beside it)::

  python launch/convert_image_reward.py --checkpoint=ImageReward.pt --med_config=med_config.json \
      --out=weights/image_reward.safetensors

Without ``--med_config`` the text encoder is BLIP's BERT-base (the values of that file). The ViT is
ViT-L/16 at 224, as the original builds it. ``--config_json`` instead gives every size in our
format (the ``config`` metadata entry of a converted file), for other BLIP sizes. The output loads with
:func:`svdquant_jax.eval.image_reward.load_image_reward`; score with a bert-base-uncased tokenizer
folder (``ImageRewardScorer.from_files``). torch is needed here only (the package never imports it).
"""

import os

from absl import flags, logging

from svdquant_jax.eval import image_reward as ir
from svdquant_jax.eval import image_reward_convert
from svdquant_jax.utils import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The original ImageReward.pt (a torch state dict).")
_MED_CONFIG = flags.DEFINE_string("med_config", None, "BLIP's med_config.json (default: BERT-base, its values).")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "Instead of --med_config: all tower sizes, our JSON format.")
_OUT = flags.DEFINE_string("out", None, "Output .safetensors file.")


def read_torch_state(path: str) -> dict:
  """The tensors of a torch state dict file as float32 numpy arrays (``weights_only``: no code runs)."""
  import torch  # deferred: only this command needs torch
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--checkpoint: no such file {path}")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a file that is not a state dict
    raise ValueError(f"{path}: cannot read a torch state dict: {type(e).__name__}: {e}") from e
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict) or not all(hasattr(v, "numpy") for v in state.values()):
    raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.detach().numpy() for k, v in state.items()}


def convert(checkpoint: str, out: str, config: ir.ImageRewardConfig | None = None) -> ir.ImageRewardConfig:
  """``ImageReward.pt`` -> our file at ``out`` (read back and checked). Returns the config used."""
  config = config or ir.ImageRewardConfig()
  params = image_reward_convert.convert_image_reward_state(read_torch_state(checkpoint), config, source=checkpoint)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  ir.save_image_reward(out, params, config, source=os.path.basename(checkpoint))
  ir.load_image_reward(out)  # reads back and re-checks
  return config


def main(argv):
  del argv
  if not _CHECKPOINT.value or not _OUT.value:
    raise ValueError("--checkpoint and --out are required")
  if _MED_CONFIG.value and _CONFIG_JSON.value:
    raise ValueError("give at most one of --med_config and --config_json")
  config = None
  for flag, parse in ((_MED_CONFIG, image_reward_convert.config_from_med_config),
                      (_CONFIG_JSON, ir.ImageRewardConfig.from_json)):
    if flag.value:
      if not os.path.isfile(flag.value):
        raise FileNotFoundError(f"--{flag.name}: no such file {flag.value}")
      with open(flag.value, encoding="utf-8") as f:
        config = parse(f.read(), source=flag.value)
  convert(_CHECKPOINT.value, _OUT.value, config)
  logging.info("converted %s", _CHECKPOINT.value)
  print(f"wrote {_OUT.value}: {os.path.getsize(_OUT.value)} bytes")


if __name__ == "__main__":
  cli.run(main)
