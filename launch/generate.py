"""Images for a list of prompts (:func:`svdquant_jax.flows.generation.run`).

    python launch/generate.py                               # flux-tiny, the first 4 built-in prompts
    python launch/generate.py --config.prompts="a red cube|a blue sphere" --config.num_steps=2
    python launch/generate.py --config.model=pixart-sigma --config.model_path=/data/PixArt-Sigma \
        --config.prompts_path=prompts.yaml --config.num_prompts=0 --config.output_dir=runs/ref
    python launch/generate.py --config.quantized_model=runs/flux-tiny/<protocol>/svdq-int4/model
    python launch/generate.py --config.loras=style.safetensors:0.8,detail.safetensors:0.5  # FLUX LoRAs

Writes ``00000.png``, ... (one per prompt), ``contact_sheet.png`` with its text index and
``generation.json`` into ``output_dir``. An image depends only on the model, the settings, the
seed and its own prompt.
"""

import os

from svdquant_jax.flows import generation
from svdquant_jax.utils import cli

_CONFIG = cli.define_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "generate.py"),
                                  "Generation settings (configs/generate.py); override with --config.<field>=...")


def main(argv):
  del argv
  generation.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
