"""Configuration of the PTQ command (`launch/ptq.py`), composed from named parts.

`--config=configs/ptq.py:<parts>`, where `<parts>` is a comma-separated list applied in order:
a model (`flux-tiny`, `pixart-tiny`, `sana-tiny`, `flux-dev`, `flux-schnell`, `pixart-sigma`, `sana-1.6b`) and any
quantization parts (`int4`, `nvfp4`, `w8a8`, `fast`, `gptq`; baselines `rtn-int4`, `rtn-nvfp4`,
`rtn-w8a8`, `w4a16`, `nf4`). The parts and every field with its default are in
`svdquant_jax/flows/ptq_config.py`. Example::

    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq \
        --config.model_path=/data/FLUX.1-schnell --config.quant.rank=16

The part `exact` (anywhere in the list) sets `quant.search.mode=exact`: float32 loss evaluations
and the exhaustive smoothing grid, the choices and codes of the search before its cost cuts
(`configs/ptq.py:flux-tiny,int4,exact`; same as `--config.quant.search.mode=exact`).

Every field can be overridden with `--config.<field>=...`; an unknown field is an error.
"""

from svdquant_jax.flows import ptq_config

EXACT = "exact"


def get_config(parts: str = "flux-tiny"):
  names = [p.strip() for p in parts.split(",")]
  config = ptq_config.compose(",".join(p for p in names if p != EXACT))
  if EXACT in names:
    config.quant.search.mode = "exact"
  return config
