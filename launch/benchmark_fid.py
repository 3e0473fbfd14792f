"""Times our FID Inception (JAX) against the TorchScript it was converted from, side by side.

Both run the network only, on the same 299x299 inputs in [0, 255] (the resize is excluded), after
warm-up calls (jit compilation, TorchScript profiling); the median of ``--iters`` calls is reported
per image, with the largest feature difference as a check.

  python launch/benchmark_fid.py --torchscript=.cache/test-weights/default_1.pt --batch_size=8
"""

import statistics
import time

import jax
import numpy as np
from absl import flags

from svdquant_jax.eval import fid, inception_convert
from svdquant_jax.utils import cli, trees

_TORCHSCRIPT = flags.DEFINE_string("torchscript", None, "Inception TorchScript file (.pt).", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per call.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls per implementation (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first.")


def _median_seconds(fn, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  import torch  # deferred: only the reference side needs torch

  module = torch.jit.load(_TORCHSCRIPT.value, map_location="cpu").eval()
  net = getattr(module, "net", module)
  state = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  params = trees.unflatten(inception_convert.convert_inception_state(state))
  trees.validate_tree(params, fid.abstract_params(), what=f"tensors of {_TORCHSCRIPT.value}")
  params = jax.device_put(params)
  x = np.random.default_rng(0).uniform(0, 255, (_BATCH.value, 299, 299, 3)).astype(np.float32)
  x_jax = jax.device_put(x)
  x_torch = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() - 128) / 128

  def ours():
    return fid.features_resized(params, x_jax).block_until_ready()

  def reference():
    with torch.no_grad():
      return net.layers(x_torch).reshape(-1, 2048)

  diff = np.abs(np.asarray(ours()) - reference().numpy()).max()
  t_ours = _median_seconds(ours, _WARMUP.value, _ITERS.value)
  t_ref = _median_seconds(reference, _WARMUP.value, _ITERS.value)
  n = _BATCH.value
  print(f"device: {jax.devices()[0].device_kind}; torch threads: {torch.get_num_threads()}; batch {n}")
  print(f"ours (JAX):       {1e3 * t_ours / n:8.1f} ms/image")
  print(f"TorchScript:      {1e3 * t_ref / n:8.1f} ms/image")
  print(f"ours / torch:     {t_ours / t_ref:8.2f}   (max |feature diff| {diff:.2e})")


if __name__ == "__main__":
  cli.run(main)
