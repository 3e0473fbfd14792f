"""Layer-level evidence for SVDQuant: error tables, singular spectra and a rank sweep on a synthetic layer.

Quantizes one seeded FLUX-like linear layer (scaled down; a few 10-100x activation outlier
channels, heavy-tailed weight rows) with RTN, smoothing only, SVD only, LoRC, smoothing + LoRC,
SVDQuant one-shot / + alternating refinement / + GPTQ (INT4 g64 and NVFP4 g16), the W4A16 and
W8A8 baselines, and a rank sweep; prints the tables and writes ``layer_report.md``,
``spectra.png`` (singular values of W, diag(λ) W and the residual R) and ``rank_sweep.png`` to
``--out_dir``. The work is :func:`svdquant_jax.flows.layer_report.make_and_write_report`.

    python launch/layer_report.py --out_dir=outputs/layer_report
    python launch/layer_report.py --format=int4 --rows=2048 --k=512 --n=1536 --seed=1

With ``--variants`` it instead tabulates SVDQuant (exact), + learned refinement, + Hadamard
rotation and + both, with and without GPTQ, on real-weight conv layers (VGG16 / AlexNet as im2col
linears on a real photo) and the synthetic layer, plus a calibration-token sweep, and writes
``variants_report.md`` (:func:`svdquant_jax.flows.layer_report.run_variant_report`)::

    python launch/layer_report.py --variants --rows=1024 --num_grids=10 --lowrank_iters=20
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from absl import app, flags

from svdquant_jax.flows import layer_report as rp
from svdquant_jax.utils.files import atomic_write_text

flags.DEFINE_string("out_dir", "outputs/layer_report", "Directory for layer_report.md, spectra.png, rank_sweep.png.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic layer.")
flags.DEFINE_integer("rows", 512, "Calibration tokens (the same number of held-out tokens is drawn).")
flags.DEFINE_integer("k", 256, "Input features K (FLUX: 3072; default: / 12).")
flags.DEFINE_integer("n", 768, "Output features N (FLUX qkv: 9216; default: FLUX qkv / 12).")
flags.DEFINE_enum("format", "both", ["int4", "nvfp4", "both"],
                  "W4A4 format(s) of the method table; the rank sweep runs for the first (int4 with 'both').")
flags.DEFINE_bool("sweep_all_formats", False, "Run the rank sweep for every format of --format.")
flags.DEFINE_integer("rank", 32, "Low-rank branch rank of the method table.")
flags.DEFINE_integer("lowrank_iters", 100, "Alternating refinement iterations (early stop).")
flags.DEFINE_integer("num_grids", 20, "Smoothing grid: 2 * (num_grids - 1) + 1 (alpha, beta) pairs.")
flags.DEFINE_list("ranks", [str(r) for r in rp.RANKS], "Ranks of the sweep (empty: no sweep).")
flags.DEFINE_integer("sweep_lowrank_iters", 1, "Alternating iterations per rank in the sweep (1: one-shot "
                     "SVDQuant, which keeps the report under a minute on a CPU; 100 refines each rank).")
flags.DEFINE_bool("variants", False, "Run the refinement / rotation variant report instead (variants_report.md).")
flags.DEFINE_list("real_layers", list(rp.DEFAULT_REAL_LAYERS), "--variants: real conv layers <net>/conv<i> "
                  f"(net: {', '.join(rp.REAL_NETS)}).")
flags.DEFINE_string("weights_dir", ".cache/test-weights", "--variants: folder with vgg16.ckpt / alexnet.ckpt.")
flags.DEFINE_integer("eval_rows", 1024, "--variants: held-out tokens of the real layers.")
flags.DEFINE_list("synthetic_seeds", ["0"], "--variants: seeds of the synthetic layers (--rows, --k, --n).")
flags.DEFINE_list("sweep_layers", ["vgg16/conv2"], "--variants: real layers of the calibration-token sweep.")
flags.DEFINE_list("sweep_tokens", [str(t) for t in rp.SWEEP_TOKENS], "--variants: calibration tokens of the sweep.")
flags.DEFINE_integer("refine_steps", 200, "--variants: learned refinement steps.")
flags.DEFINE_integer("rotation_seed", 0, "--variants: seed of the Hadamard rotation's signs.")
FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # only to print the command relative to it


def main(argv):
  del argv
  start = time.time()
  command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], _REPO)] + sys.argv[1:])
  formats = ("int4", "nvfp4") if FLAGS.format == "both" else (FLAGS.format,)
  if FLAGS.variants:
    _variants(command, formats, start)
    return
  report, paths = rp.make_and_write_report(
      FLAGS.out_dir, seed=FLAGS.seed, rows=FLAGS.rows, k=FLAGS.k, n=FLAGS.n,
      formats=formats, rank=FLAGS.rank,
      lowrank_iters=FLAGS.lowrank_iters, num_grids=FLAGS.num_grids, ranks=[int(r) for r in FLAGS.ranks],
      sweep_lowrank_iters=FLAGS.sweep_lowrank_iters, sweep_all_formats=FLAGS.sweep_all_formats, command=command)
  print(rp.report_markdown(report, command))
  print(f"wrote {', '.join(paths.values())} in {time.time() - start:.1f} s")


def _variants(command, formats, start):
  tokens = [int(t) for t in FLAGS.sweep_tokens]
  layers = rp.real_layers(FLAGS.real_layers, FLAGS.rows, FLAGS.eval_rows, FLAGS.weights_dir)
  layers += [rp.make_synthetic_layer(int(s), FLAGS.rows, FLAGS.k, FLAGS.n) for s in FLAGS.synthetic_seeds]
  sweep = rp.real_layers(FLAGS.sweep_layers, max(tokens), FLAGS.eval_rows, FLAGS.weights_dir) if tokens else []
  report = rp.run_variant_report(layers, sweep, tokens, formats, formats[:1], FLAGS.rank, FLAGS.num_grids,
                                 FLAGS.lowrank_iters, FLAGS.refine_steps, FLAGS.rotation_seed,
                                 log=lambda m: print(m, flush=True))
  text = rp.variant_markdown(report, command)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  path = os.path.join(FLAGS.out_dir, "variants_report.md")
  atomic_write_text(path, text + "\n")
  print(text)
  print(f"wrote {path} in {time.time() - start:.1f} s")


if __name__ == "__main__":
  app.run(main)
