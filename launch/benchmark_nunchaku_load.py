"""Load time and peak host memory of a full-size Nunchaku FLUX.1 checkpoint (synthetic weights).

    python launch/benchmark_nunchaku_load.py                       # FLUX.1-dev, INT4, in /tmp
    python launch/benchmark_nunchaku_load.py --fmt=nvfp4 --model=flux-schnell --folder=/data/tmp
    python launch/benchmark_nunchaku_load.py --blocks=1,1 --profile=25     # one block of each kind, profiled

Writes a FLUX.1-sized quantized model with random codes, scales and branches through our exporter
(the published files cannot be downloaded here), then loads it with ``load_flux`` in a fresh
process and reports the wall time, the CPU time (user + system) and the peak resident memory
(``ru_maxrss``) against the file size. Goal (``docs/benchmarks.md``): under 60 s and under 1.5x
the file size.

By default the exporter writes one double and one single block at full width, and their tensors
are copied under every block name of the model (the 16-bit layers and metadata as for the full
model): the same file layout, size and tensor shapes as a full export, in minutes instead of the
exporter's 10 min to hours on a loaded 2-core machine (``--full_export`` exports every block).
``--blocks=D,S`` keeps the full layer widths but only D double and S single blocks (a quick run
to extrapolate from); ``--profile=N`` runs the load under cProfile and prints its N most
expensive functions (decoding on one thread); ``--keep`` keeps the file (and reuses it when it
already exists).
"""

import cProfile
import dataclasses
import gc
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
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
from svdquant_jax.utils.safetensors_io import SafetensorsFile, SafetensorsWriter

_MODEL = flags.DEFINE_enum("model", "flux-dev", ["flux-dev", "flux-schnell", "flux-tiny"], "FLUX preset (shapes)")
_FMT = flags.DEFINE_enum("fmt", "int4", ["int4", "nvfp4"], "4-bit format")
_FOLDER = flags.DEFINE_string("folder", "/tmp", "where the synthetic checkpoint is written (and removed)")
_BLOCKS = flags.DEFINE_string("blocks", "", "D,S: only D double and S single blocks (full widths); default all")
_PROFILE = flags.DEFINE_integer("profile", 0, "profile the load (on one thread) and print this many functions")
_FULL_EXPORT = flags.DEFINE_bool("full_export", False, "export every block (slow) instead of copying one of each")
_KEEP = flags.DEFINE_bool("keep", False, "keep the synthetic file (and reuse it if it exists)")
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


def replicate_blocks(small_path: str, config, fmt: str, rank: int, path: str) -> int:
  """Writes ``path``: the tensors of a 1+1-block export with block 0 copied to every block of ``config``.

  Returns the number of tensors written.
  """
  small = SafetensorsFile(small_path)
  meta = dict(small.metadata)
  meta.update(flux_layout.metadata(config, fmt, rank))  # the full model's config (block counts)
  count = {"transformer_blocks.0.": config.num_layers, "single_transformer_blocks.0.": config.num_single_layers}
  written = 0
  with SafetensorsWriter(path, meta) as writer:
    for key in small.keys():
      prefix = next((p for p in count if key.startswith(p)), None)
      if prefix is None:
        writer.add(key, small.get(key))
        written += 1
        continue
      value = small.get(key)
      for i in range(count[prefix]):
        writer.add(prefix.replace(".0.", f".{i}.") + key[len(prefix):], value)
        written += 1
  return written


def write_synthetic(config, fmt: str, path: str) -> int:
  """Exports the synthetic model of ``config`` to ``path`` (one block of each kind copied unless
  ``--full_export``); returns the number of tensors."""
  specs = synthetic_specs(config, fmt)
  if _FULL_EXPORT.value or (config.num_layers <= 1 and config.num_single_layers <= 1):
    return nunchaku.export_flux(synthetic_params(config, specs), specs, config, path)["tensors"]
  one = dataclasses.replace(config, num_layers=min(config.num_layers, 1),
                            num_single_layers=min(config.num_single_layers, 1))
  one_specs = synthetic_specs(one, fmt)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
    small = os.path.join(tmp, "one-block.safetensors")
    nunchaku.export_flux(synthetic_params(one, one_specs), one_specs, one, small)
    rank = json.loads(SafetensorsFile(small).metadata["quantization_config"])["rank"]
    return replicate_blocks(small, config, fmt, rank, path)


def measure_load(path: str, profile: int) -> None:
  profiler = cProfile.Profile() if profile else None
  usage = resource.getrusage(resource.RUSAGE_SELF)
  cpu0 = usage.ru_utime + usage.ru_stime  # the imports
  start = time.perf_counter()
  if profiler:
    profiler.enable()
  model = nunchaku.load_flux(path, progress=False, threads=1 if profiler else 2)  # cProfile sees one thread
  jax.block_until_ready(model.params)
  if profiler:
    profiler.disable()
  seconds = time.perf_counter() - start
  if profiler:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(profile)
    print(text.getvalue(), file=sys.stderr)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  print(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu0,
                    "peak_rss_bytes": usage.ru_maxrss * 1024, "file_bytes": os.path.getsize(path)}))


def main(argv):
  del argv
  if _LOAD.value:
    measure_load(_LOAD.value, _PROFILE.value)
    return
  config = FLUX_PRESETS[_MODEL.value]
  blocks = ""
  if _BLOCKS.value:
    double, single = (int(x) for x in _BLOCKS.value.split(","))
    config = dataclasses.replace(config, num_layers=double, num_single_layers=single)
    blocks = f"-{double}+{single}"
  path = os.path.join(_FOLDER.value, f"synthetic-svdq-{_FMT.value}_r32-{_MODEL.value}{blocks}.safetensors")
  start = time.perf_counter()
  if _KEEP.value and os.path.exists(path):
    tensors, how = len(SafetensorsFile(path).keys()), "reused"
  else:
    tensors = write_synthetic(config, _FMT.value, path)
    how = "full export" if _FULL_EXPORT.value else "export of one block of each kind, copied"
  export_s = time.perf_counter() - start
  gc.collect()
  try:
    result = subprocess.run([sys.executable, __file__, f"--load={path}", f"--profile={_PROFILE.value}"], check=True,
                            stdout=subprocess.PIPE, text=True)  # stderr (the profile) passes through
    m = json.loads(result.stdout.strip().splitlines()[-1])
  finally:
    if os.path.exists(path) and not _KEEP.value:
      os.remove(path)
  gb = 1e9
  blocks = f" ({config.num_layers}+{config.num_single_layers} blocks)" if _BLOCKS.value else ""
  print(f"{_MODEL.value}{blocks} {_FMT.value}: {tensors} tensors, file {m['file_bytes'] / gb:.2f} GB "
        f"(written in {export_s:.1f} s: {how})")
  print(f"load: {m['seconds']:.1f} s (CPU time {m['cpu_seconds']:.1f} s, load average {os.getloadavg()[0]:.1f}), "
        f"peak RSS {m['peak_rss_bytes'] / gb:.2f} GB = "
        f"{m['peak_rss_bytes'] / m['file_bytes']:.2f}x the file (goal: < 60 s, < 1.5x)")


if __name__ == "__main__":
  app.run(main)
