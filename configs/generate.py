"""Configuration of the generate command (`launch/generate.py`): reference images.

    python launch/generate.py                                   # flux-tiny, 4 built-in prompts
    python launch/generate.py --config.model=flux-dev --config.model_path=/data/FLUX.1-dev \
        --config.num_prompts=64 --config.output_dir=runs/flux-dev/reference

Fields left unset (None) take the model's defaults (``svdquant_jax.pipelines.presets``).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "flux-tiny"          # preset name (flux-dev, flux-schnell, pixart-sigma, flux-tiny, pixart-tiny) or folder
  c.model_path = ""              # folder with the weights of a real-size preset
  c.quantized_model = ""        # a quantized transformer saved by launch/ptq.py (runs/<model>/<protocol>/<method>/model)
  c.dtype = ""                   # "": each component's default precision; else e.g. "bfloat16", "float32"
  c.prompts = ""                 # prompts separated by "|"
  c.prompts_path = ""            # a .txt / .json / .yaml prompt file (used when `prompts` is empty)
  c.num_prompts = 4              # the first N prompts of the file or the built-in list (0: all)
  c.seed = 0                     # base seed; each prompt's noise comes from prompt_seed(prompt, seed)
  c.num_steps = config_dict.placeholder(int)
  c.guidance = config_dict.placeholder(float)
  c.height = config_dict.placeholder(int)
  c.width = config_dict.placeholder(int)
  c.max_sequence_length = config_dict.placeholder(int)
  c.batch_size = 4               # images per pipeline call (the last batch is padded to this size)
  c.contact_sheet_columns = config_dict.placeholder(int)
  c.output_dir = "outputs/generate"
  c.progress = True
  return c
