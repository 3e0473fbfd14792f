"""How long SVDQuant PTQ takes per block at real FLUX shapes (:mod:`svdquant_jax.flows.ptq_benchmark`).

    python launch/benchmark_ptq.py                              # GPU: FLUX.1-dev shapes, 128 samples
    python launch/benchmark_ptq.py --method=int4,gptq           # with GPTQ
    python launch/benchmark_ptq.py --config_name=flux-tiny --samples=4 --img_tokens=64 --txt_tokens=16 \
        --num_grids=2 --lowrank_iters=2                         # CPU code-path check

Times one double and one single block (random weights at real widths, random inputs), first call
(with compilation) and steady state, and extrapolates to the whole model.
"""

from absl import flags

from svdquant_jax.flows import ptq_benchmark
from svdquant_jax.utils import cli

_CONFIG_NAME = flags.DEFINE_string("config_name", "flux-dev", "FLUX preset whose widths are used.")
_METHOD = flags.DEFINE_list("method", ["int4"], "Method parts (svdquant_jax/flows/ptq_config.py).")
_SAMPLES = flags.DEFINE_integer("samples", 128, "Calibration samples.")
_IMG_TOKENS = flags.DEFINE_integer("img_tokens", 4096, "Image tokens per sample (1024x1024: 4096).")
_TXT_TOKENS = flags.DEFINE_integer("txt_tokens", 512, "Text tokens per sample (FLUX.1-dev: 512).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Model dtype.")
_OVERRIDES = {name: flags.DEFINE_integer(name, None, f"Override the method's {name}.")
              for name in ("num_grids", "lowrank_iters", "batch_size", "candidates_per_batch", "max_tokens")}
_NUM_DOUBLE = flags.DEFINE_integer("num_double", None, "Double blocks of the model (default: the preset's).")
_NUM_SINGLE = flags.DEFINE_integer("num_single", None, "Single blocks of the model (default: the preset's).")


def main(argv):
  del argv
  settings = ptq_benchmark.settings_for(_METHOD.value, _DTYPE.value,
                                        **{name: flag.value for name, flag in _OVERRIDES.items()})
  result = ptq_benchmark.run_benchmark(_CONFIG_NAME.value, settings, samples=_SAMPLES.value,
                                       img_tokens=_IMG_TOKENS.value, txt_tokens=_TXT_TOKENS.value,
                                       dtype=_DTYPE.value, num_double=_NUM_DOUBLE.value, num_single=_NUM_SINGLE.value)
  print(ptq_benchmark.format_table(result))


if __name__ == "__main__":
  cli.run(main)
