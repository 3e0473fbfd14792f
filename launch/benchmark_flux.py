"""Times one FLUX.1 transformer forward, ours against diffusers' PyTorch model
(:mod:`svdquant_jax.flows.flux_benchmark`).

    python launch/benchmark_flux.py                          # GPU: FLUX.1-dev, 1024x1024
    python launch/benchmark_flux.py --quick                  # GPU smoke run: 2 + 4 blocks
    python launch/benchmark_flux.py --config_name=flux-tiny --dtype=float32   # CPU code-path check

Prints a table (median, min, peak memory, time / torch); ``--out`` also writes it as JSON.
"""

import os

from absl import flags

from svdquant_jax.flows import flux_benchmark
from svdquant_jax.models.flux import FLUX_PRESETS
from svdquant_jax.utils import cli

_CONFIG_NAME = flags.DEFINE_string("config_name", "flux-dev", f"Transformer config: one of {sorted(FLUX_PRESETS)}.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: at most 2 double and 4 single blocks.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Weights and activations dtype of both implementations.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height in pixels (default: 1024, flux-tiny 128).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width in pixels (default: 1024, flux-tiny 128).")
_TEXT_LEN = flags.DEFINE_integer("text_len", None, "T5 tokens (default: 512, flux-tiny 64).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls first (ours: includes the compile).")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls; the median is reported.")
_TORCH = flags.DEFINE_bool("torch", True, "Also run diffusers' PyTorch FluxTransformer2DModel.")
_OUT = flags.DEFINE_string("out", "", "Optional path of a JSON file with the results.")


def main(argv):
  del argv
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before jax starts its backend
  s = flux_benchmark.BenchmarkSettings(
      config_name=_CONFIG_NAME.value, quick=_QUICK.value, dtype=_DTYPE.value, height=_HEIGHT.value,
      width=_WIDTH.value, text_len=_TEXT_LEN.value, batch=_BATCH.value, warmup=_WARMUP.value,
      repeats=_REPEATS.value, torch=_TORCH.value)
  reference = None
  if s.torch:  # test-only references: imported here, never by the package
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import FluxTransformer2DModel  # pylint: disable=g-import-not-at-top
    reference = flux_benchmark.TorchReference(torch, FluxTransformer2DModel)
  result = flux_benchmark.run(s, reference)
  print(flux_benchmark.headline(result))
  print(flux_benchmark.format_table(result))
  if _OUT.value:
    flux_benchmark.write_results(result, _OUT.value)


if __name__ == "__main__":
  cli.run(main)
