"""A model saved by the PTQ flow as a Nunchaku checkpoint (:func:`svdquant_jax.flows.nunchaku.export_run`).

    python launch/export_nunchaku.py --config.quantized_model=runs/flux-tiny/<protocol>/svdq-int4/model \
        --config.output=svdq-int4_r32-flux-tiny.safetensors
    python launch/export_nunchaku.py --config.quantized_model=... --config.output=out_folder --config.legacy=true

The single file runs in Nunchaku (and ComfyUI-Nunchaku) as the published svdq-int4_r32 /
svdq-fp4_r32 files do; docs/nunchaku.md says what the format cannot express.
"""

import os

from svdquant_jax.flows import nunchaku
from svdquant_jax.utils import cli

_CONFIG = cli.define_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "export_nunchaku.py"),
                                  "Export settings (configs/export_nunchaku.py); override with --config.<field>=...")


def main(argv):
  del argv
  nunchaku.export_run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
