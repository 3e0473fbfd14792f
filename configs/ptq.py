"""Configuration of the PTQ command (`launch/ptq.py`), composed from named parts.

`--config=configs/ptq.py:<parts>`, where `<parts>` is a comma-separated list applied in order:
a model (`flux-tiny`, `pixart-tiny`, `sana-tiny`, `flux-dev`, `flux-schnell`, `pixart-sigma`, `sana-1.6b`) and any
quantization parts (`int4`, `nvfp4`, `w8a8`, `fast`, `gptq`; baselines `rtn-int4`, `rtn-nvfp4`,
`rtn-w8a8`, `w4a16`, `nf4`). The parts and every field with its default are in
`svdquant_jax/flows/ptq_config.py`. Example::

    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq \
        --config.model_path=/data/FLUX.1-schnell --config.quant.rank=16

Every field can be overridden with `--config.<field>=...`; an unknown field is an error.
"""

from svdquant_jax.flows import ptq_config


def get_config(parts: str = "flux-tiny"):
  return ptq_config.compose(parts)
