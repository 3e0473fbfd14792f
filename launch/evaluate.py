"""Image metrics of methods against their reference images and a benchmark (:func:`svdquant_jax.flows.evaluate.run`).

    python launch/evaluate.py --config.run_dir=runs/flux-tiny/<protocol>        # every method of a PTQ run
    python launch/evaluate.py --config.reference=ref/ --config.methods="svdq=svdq/,rtn=rtn/"
    python launch/evaluate.py --config.run_dir=... --config.eval.benchmark=/data/MJHQ-30K/meta_data.json \
        --config.eval.benchmark_images=/data/MJHQ-30K/imgs --config.eval.num_prompts=1024

PSNR, SSIM, LPIPS and FID against the reference images; FID against the benchmark's real images,
CLIP score and CLIP-IQA; metrics without weights are listed under the table with the reason
(docs/metrics.md). Writes ``results.md``, ``results.json`` and a comparison sheet per method into
``output_dir`` (default ``<run_dir>/evaluation``). Runs data-parallel over all local devices.
"""

import os

from svdquant_jax.flows import evaluate
from svdquant_jax.utils import cli

_CONFIG = cli.define_config_file(os.path.join(os.path.dirname(__file__), "..", "configs", "evaluate.py"),
                                  "Evaluation settings (configs/evaluate.py); override with --config.<field>=...")


def main(argv):
  del argv
  evaluate.run(_CONFIG.value)


if __name__ == "__main__":
  cli.run(main)
