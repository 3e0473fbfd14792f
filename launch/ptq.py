"""SVDQuant post-training quantization, end to end (:func:`svdquant_jax.flows.ptq.run`).

    python launch/ptq.py                                            # flux-tiny, SVDQuant INT4 + baselines
    python launch/ptq.py --config=configs/ptq.py:pixart-tiny,int4
    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq --config.model_path=/data/FLUX.1-schnell
    python launch/ptq.py --config=configs/ptq.py:flux-dev --config.model_path=... --config.output_dirname=reference

Reference images, calibration set, the method and its baselines (resumable block by block), the
quantized models, their images and a results table under ``runs/<model>/<protocol>/``.

The calibration samples are split over every local device (``--config.calib.data_parallel=false``:
one device). Over several hosts, start the same command on each with the coordinator flags
(``jax.distributed.initialize`` runs first; ``--distributed`` alone lets JAX read them from a
cluster environment such as SLURM), and an ``output_root`` every host can read:

    python launch/ptq.py --config=... --coordinator_address=host0:1234 --num_processes=2 --process_id=0
    python launch/ptq.py --config=... --coordinator_address=host0:1234 --num_processes=2 --process_id=1
"""

import os

from absl import flags

from svdquant_jax.flows import ptq
from svdquant_jax.utils import cli

_CONFIG = cli.define_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "ptq.py"),
                                  "PTQ settings: configs/ptq.py:<model>,<method>,... then --config.<field>=...")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize (multi-host); implied by "
                                 "--coordinator_address")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-host)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-host)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1 (multi-host)")


def initialize_distributed() -> bool:
  """``jax.distributed.initialize`` from the flags, before anything touches a device; returns
  whether it ran."""
  if not (_DISTRIBUTED.value or _COORDINATOR.value):
    if _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None:
      raise ValueError("--num_processes/--process_id need --coordinator_address (or --distributed)")
    return False
  import jax
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value or None, num_processes=_NUM_PROCESSES.value,
                             process_id=_PROCESS_ID.value)
  return True


def main(argv):
  del argv
  initialize_distributed()
  ptq.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
