"""Configuration of `launch/export_nunchaku.py`: a PTQ result as a Nunchaku checkpoint.

    python launch/export_nunchaku.py --config.quantized_model=runs/flux-tiny/<protocol>/svdq-int4/model \
        --config.output=svdq-int4_r32-flux-tiny.safetensors

Every field with its default is in `svdquant_jax.flows.nunchaku.default_config`.
"""

from svdquant_jax.flows import nunchaku


def get_config():
  return nunchaku.default_config()
