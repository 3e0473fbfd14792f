"""SVDQuant post-training quantization, end to end (:func:`svdquant_jax.flows.ptq.run`).

    python launch/ptq.py                                            # flux-tiny, SVDQuant INT4 + baselines
    python launch/ptq.py --config=configs/ptq.py:pixart-tiny,int4
    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq --config.model_path=/data/FLUX.1-schnell
    python launch/ptq.py --config=configs/ptq.py:flux-dev --config.model_path=... --config.output_dirname=reference

Reference images, calibration set, the method and its baselines (resumable block by block), the
quantized models, their images and a results table under ``runs/<model>/<protocol>/``.
"""

import os

from svdquant_jax.flows import ptq
from svdquant_jax.utils import cli

_CONFIG = cli.define_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "ptq.py"),
                                  "PTQ settings: configs/ptq.py:<model>,<method>,... then --config.<field>=...")


def main(argv):
  del argv
  ptq.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
