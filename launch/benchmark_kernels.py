"""Checks and times the fused SVDQuant linear against XLA baselines at FLUX.1 1024² shapes
(:mod:`svdquant_jax.flows.kernel_benchmark`).

  python launch/benchmark_kernels.py --out_dir=/tmp/bench            # GPU
  python launch/benchmark_kernels.py --smoke --out_dir=/tmp/bench    # CPU: tiny shapes, interpret mode

Prints a short table; writes ``results.json`` and ``results.md`` to ``--out_dir``. Exit status 1
if a check fails or a table config fails to run.
"""

import sys

from absl import flags

from svdquant_jax.flows import kernel_benchmark
from svdquant_jax.utils import cli

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results.json / results.md are written.", required=True)
_LAYERS = flags.DEFINE_list("layers", ["qkv", "out", "fc1", "fc2", "single_in", "single_out"], "Layers (see LAYERS).")
_TOKENS = flags.DEFINE_list("tokens", [], "Token counts M for every layer (default: the layer's FLUX values).")
_RANKS = flags.DEFINE_list("ranks", ["32", "0"], "Low-rank branch ranks of our kernels.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Warm-up calls per implementation.")
_ITERS = flags.DEFINE_integer("iters", 20, "Back-to-back calls per timing round.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timing rounds (the median is reported).")
_ROTATE = flags.DEFINE_integer("rotate", 4, "Input sets cycled through (defeats L2 reuse across calls).")
_SWEEP = flags.DEFINE_bool("sweep", False, "Also time every tile candidate of the tuning module.")
_CHECK = flags.DEFINE_bool("check", True, "Check our kernels against the reference.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Time the XLA baselines.")
_SMOKE = flags.DEFINE_bool("smoke", False, "CPU smoke test: tiny shapes, Pallas interpret mode, one call.")


def main(argv):
  del argv
  settings = kernel_benchmark.KernelBenchmarkSettings(
      layers=tuple(_LAYERS.value), tokens=tuple(int(t) for t in _TOKENS.value),
      ranks=tuple(int(r) for r in _RANKS.value), warmup=_WARMUP.value, iters=_ITERS.value, rounds=_ROUNDS.value,
      rotate=_ROTATE.value, sweep=_SWEEP.value, check=_CHECK.value, baselines=_BASELINES.value, smoke=_SMOKE.value)
  result = kernel_benchmark.run(settings)
  kernel_benchmark.write_results(result, _OUT_DIR.value)
  print(kernel_benchmark.format_table(result))
  for line in kernel_benchmark.error_lines(result):
    print(line)
  if kernel_benchmark.failed(result):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
