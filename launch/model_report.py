"""Every method on the tiny models, as one table (:func:`svdquant_jax.flows.model_report.run`).

    python launch/model_report.py                       # flux-tiny, pixart-tiny and sana-tiny, all methods
    python launch/model_report.py --models=flux-tiny --methods=int4,rtn-int4 --num_prompts=4

Writes ``<output_root>/model_report.md`` (PSNR, SSIM, last-block error, size, time per model and
method) and a per-block error plot per model.
"""

from absl import flags

from svdquant_jax.flows import model_report
from svdquant_jax.utils import cli

_MODELS = flags.DEFINE_list("models", ["flux-tiny", "pixart-tiny", "sana-tiny"], "Model parts (svdquant_jax/flows/ptq_config.py).")
_METHODS = flags.DEFINE_list("methods", list(model_report.ALL_METHODS),
                             "Method parts (svdquant_jax/flows/ptq_config.py); join parts with '+' (int4+gptq).")
_OUTPUT_ROOT = flags.DEFINE_string("output_root", "runs", "Where the runs and the report go.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "Evaluation prompts per model (default: the model's).")
_CALIB_SAMPLES = flags.DEFINE_integer("calib_samples", None, "Calibration samples (default: the model's).")
_NUM_GRIDS = flags.DEFINE_integer("num_grids", None, "Smoothing grid size (default 20: 39 candidates).")


def main(argv):
  del argv
  model_report.run(_MODELS.value, _METHODS.value, _OUTPUT_ROOT.value, num_prompts=_NUM_PROMPTS.value,
                   calib_samples=_CALIB_SAMPLES.value, num_grids=_NUM_GRIDS.value)


if __name__ == "__main__":
  cli.run(main)
