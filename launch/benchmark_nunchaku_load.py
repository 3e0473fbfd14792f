"""Load time and peak host memory of a full-size Nunchaku FLUX.1 checkpoint (synthetic weights).

    python launch/benchmark_nunchaku_load.py                       # FLUX.1-dev, INT4, in /tmp
    python launch/benchmark_nunchaku_load.py --fmt=nvfp4 --model=flux-schnell --folder=/data/tmp

Writes a FLUX.1-sized quantized model with random codes, scales and branches through our exporter
(the published files cannot be downloaded here), then loads it with ``load_flux`` in a fresh
process and reports the wall time and the peak resident memory (``ru_maxrss``) against the file
size. Goal (``docs/benchmarks.md``): under 60 s and under 1.5x the file size.
"""

import gc
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
import jax
import ml_dtypes
import numpy as np

from svdquant_jax.formats.quantizers import GELU_SHIFT
from svdquant_jax.models.flux import FLUX_PRESETS
from svdquant_jax.nn import QuantSpec, WeightOnlySpec
from svdquant_jax.quant import nunchaku
from svdquant_jax.quant.nunchaku import flux_layout
from svdquant_jax.utils import trees

_MODEL = flags.DEFINE_enum("model", "flux-dev", ["flux-dev", "flux-schnell", "flux-tiny"], "FLUX preset (shapes)")
_FMT = flags.DEFINE_enum("fmt", "int4", ["int4", "nvfp4"], "4-bit format")
_FOLDER = flags.DEFINE_string("folder", "/tmp", "where the synthetic checkpoint is written (and removed)")
_LOAD = flags.DEFINE_string("load", "", "internal: load this file and print the measurement")


def synthetic_specs(config, fmt: str, rank: int = 32) -> dict:
  specs = {}
  for _, ours, layers, _ in flux_layout.blocks(config):
    for layer in layers:
      path = f"{ours}/{layer.path}"
      if layer.kind == "awq":
        specs[path] = WeightOnlySpec("int4", 64)
      else:
        channel = {"channel_scales": True} if (fmt == "nvfp4" and layer.fused_members > 1) else {}
        specs[path] = QuantSpec(rank=rank, fmt=fmt, shift=GELU_SHIFT if (fmt == "int4" and layer.shifted) else 0.0,
                                **channel)
  return specs


def synthetic_params(config, specs, seed: int = 0) -> dict:
  """Random leaves of the right shapes and dtypes (valid codes, positive scales)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, leaf in trees.flatten(nunchaku.expected_params(config, specs)).items():
    name, shape, dtype = key.rsplit("/", 1)[-1], leaf.shape, np.dtype(leaf.dtype)
    if dtype in (np.uint8, np.int8):
      value = rng.integers(0, 256, shape, dtype=np.uint8).view(dtype)
    elif name in ("wscales", "wtscale", "wcscales", "smooth", "scale"):
      value = rng.uniform(0.5, 2.0, shape).astype(np.float32).astype(ml_dtypes.bfloat16).astype(dtype)
    else:
      value = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
    out[key] = value  # numpy: the exporter reads host arrays as they are
  return trees.unflatten(out)


def measure_load(path: str) -> None:
  start = time.perf_counter()
  model = nunchaku.load_flux(path, progress=False)
  jax.block_until_ready(model.params)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak, "file_bytes": os.path.getsize(path)}))


def main(argv):
  del argv
  if _LOAD.value:
    measure_load(_LOAD.value)
    return
  config = FLUX_PRESETS[_MODEL.value]
  specs = synthetic_specs(config, _FMT.value)
  start = time.perf_counter()
  params = synthetic_params(config, specs)
  path = os.path.join(_FOLDER.value, f"synthetic-svdq-{_FMT.value}_r32-{_MODEL.value}.safetensors")
  summary = nunchaku.export_flux(params, specs, config, path)
  export_s = time.perf_counter() - start
  del params
  gc.collect()
  try:
    result = subprocess.run([sys.executable, __file__, f"--load={path}"], check=True, capture_output=True, text=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
  finally:
    if os.path.exists(path):
      os.remove(path)
  gb = 1e9
  print(f"{_MODEL.value} {_FMT.value}: {summary['tensors']} tensors, file {m['file_bytes'] / gb:.2f} GB "
        f"(synthesize + export {export_s:.1f} s)")
  print(f"load: {m['seconds']:.1f} s, peak RSS {m['peak_rss_bytes'] / gb:.2f} GB = "
        f"{m['peak_rss_bytes'] / m['file_bytes']:.2f}x the file (goal: < 60 s, < 1.5x)")


if __name__ == "__main__":
  app.run(main)
