"""Configuration of the generate command (`launch/generate.py`): images for a list of prompts.

    python launch/generate.py                                   # flux-tiny, 4 built-in prompts
    python launch/generate.py --config.model=flux-dev --config.model_path=/data/FLUX.1-dev \
        --config.num_prompts=64 --config.output_dir=runs/flux-dev/reference
    python launch/generate.py --config.model=flux-dev --config.model_path=/data/FLUX.1-dev \
        --config.quantized_model=runs/flux-dev/<protocol>/svdq-int4/model \
        --config.loras=/data/loras/style.safetensors:0.8,/data/loras/detail.safetensors:0.5

`loras` applies FLUX LoRA files (diffusers/PEFT, kohya, ComfyUI, ...; docs/lora.md) at run time
beside the float or quantized layers; `lora_partial=True` allows keys that match no layer.

Every field with its default is in `svdquant_jax.flows.generation.default_config`; fields left
unset (None) take the model's defaults (`svdquant_jax.pipelines.presets`).
"""

from svdquant_jax.flows import generation


def get_config():
  return generation.default_config()
