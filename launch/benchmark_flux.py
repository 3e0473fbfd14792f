"""Times one FLUX.1 transformer forward: ours (jitted Flax) against diffusers' PyTorch model.

Both run random weights at the same config, dtype and inputs on the same device, in one
process: at ``--config_name=flux-dev`` (12B parameters, bf16) and 1024x1024 that is 4096 image
tokens + 512 text tokens, batch 1. For each implementation: ``--warmup`` untimed calls (ours
includes the jit compile), then ``--repeats`` timed calls, each synchronized (``block_until_ready``
/ CUDA events); the table gives the median and the minimum, and the peak device memory
(weights + forward): ``device.memory_stats()["peak_bytes_in_use"]`` for jax and
``torch.cuda.max_memory_allocated()`` for torch ("n/a" on CPU).

PyTorch runs first and releases its memory (``torch.cuda.empty_cache``) before jax touches
the device; jax runs with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that its peak is what it
uses. The torch model is built directly in the benchmark dtype on the device (no float32 copy).

    python launch/benchmark_flux.py                          # GPU: FLUX.1-dev, 1024x1024
    python launch/benchmark_flux.py --quick                  # GPU smoke run: 2 + 4 blocks
    python launch/benchmark_flux.py --config_name=flux-tiny --dtype=float32   # CPU code-path check
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from svdquant_jax.models.flux import FLUX_PRESETS, FluxConfig, FluxTransformer2DModel, init_flux_params  # noqa: E402
from svdquant_jax.utils.files import atomic_write_text  # noqa: E402

flags.DEFINE_string("config_name", "flux-dev", f"Transformer config: one of {sorted(FLUX_PRESETS)}.")
flags.DEFINE_bool("quick", False, "Smoke run: at most 2 double and 4 single blocks.")
flags.DEFINE_string("dtype", "bfloat16", "Weights and activations dtype of both implementations.")
flags.DEFINE_integer("height", None, "Image height in pixels (default: 1024, flux-tiny 128).")
flags.DEFINE_integer("width", None, "Image width in pixels (default: 1024, flux-tiny 128).")
flags.DEFINE_integer("text_len", None, "T5 tokens (default: 512, flux-tiny 64).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("warmup", 3, "Untimed calls first (ours: includes the compile).")
flags.DEFINE_integer("repeats", 10, "Timed calls; the median is reported.")
flags.DEFINE_bool("torch", True, "Also run diffusers' PyTorch FluxTransformer2DModel.")
flags.DEFINE_string("out", "", "Optional path of a JSON file with the results.")


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  config_name: str = "flux-dev"
  quick: bool = False
  dtype: str = "bfloat16"
  height: int | None = None
  width: int | None = None
  text_len: int | None = None
  batch: int = 1
  warmup: int = 3
  repeats: int = 10
  torch: bool = True


def benchmark_config(s: BenchmarkSettings) -> FluxConfig:
  if s.config_name not in FLUX_PRESETS:
    raise ValueError(f"config_name={s.config_name!r}; expected one of {sorted(FLUX_PRESETS)}")
  config = FLUX_PRESETS[s.config_name].replace(dtype=s.dtype, param_dtype=s.dtype)
  if s.quick:
    config = config.replace(num_layers=min(2, config.num_layers), num_single_layers=min(4, config.num_single_layers))
  return config


def _shapes(s: BenchmarkSettings) -> tuple[int, int, int]:
  tiny = s.config_name == "flux-tiny"
  height = s.height or (128 if tiny else 1024)
  width = s.width or (128 if tiny else 1024)
  if height % 16 or width % 16:
    raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
  return height // 16, width // 16, s.text_len or (64 if tiny else 512)


def make_inputs(config: FluxConfig, s: BenchmarkSettings) -> dict[str, np.ndarray]:
  """float32 host inputs (the same for both implementations): random latents and text states."""
  rows, cols, text_len = _shapes(s)
  rng = np.random.default_rng(0)
  r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
  inputs = dict(hidden_states=rng.standard_normal((s.batch, rows * cols, config.in_channels)),
                encoder_hidden_states=rng.standard_normal((s.batch, text_len, config.joint_attention_dim)),
                pooled_projections=rng.standard_normal((s.batch, config.pooled_projection_dim)),
                timestep=np.full((s.batch,), 0.5), img_ids=np.stack([np.zeros(rows * cols), r.ravel(), c.ravel()], -1),
                txt_ids=np.zeros((text_len, 3)))
  if config.guidance_embeds:
    inputs["guidance"] = np.full((s.batch,), 3.5)
  return {k: v.astype(np.float32) for k, v in inputs.items()}


def _summary(times: list[float], peak: int | None, params: int) -> dict[str, Any]:
  return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "times_ms": [1e3 * t for t in times],
          "peak_bytes": peak, "params": params}


def run_ours(config: FluxConfig, inputs: dict[str, np.ndarray], s: BenchmarkSettings) -> dict[str, Any]:
  params = init_flux_params(config, seed=0)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  model = FluxTransformer2DModel(config)
  forward = jax.jit(lambda p, **kw: model.apply({"params": p}, **kw))
  dt = config.dtype
  args = {k: jnp.asarray(v, jnp.float32 if k in ("timestep", "guidance", "img_ids", "txt_ids") else dt)
          for k, v in inputs.items()}
  for _ in range(s.warmup):
    forward(params, **args).block_until_ready()
  times = []
  for _ in range(s.repeats):
    start = time.perf_counter()
    forward(params, **args).block_until_ready()
    times.append(time.perf_counter() - start)
  stats = jax.devices()[0].memory_stats() or {}
  return _summary(times, stats.get("peak_bytes_in_use"), n_params)


def run_torch(config: FluxConfig, inputs: dict[str, np.ndarray], s: BenchmarkSettings) -> dict[str, Any]:
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import FluxTransformer2DModel as TorchFlux  # pylint: disable=g-import-not-at-top
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[jnp.dtype(config.dtype).name]
  kwargs = dict(patch_size=config.patch_size, in_channels=config.in_channels, out_channels=config.out_channels,
                num_layers=config.num_layers, num_single_layers=config.num_single_layers,
                attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
                joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
                guidance_embeds=config.guidance_embeds, axes_dims_rope=config.axes_dims_rope)
  previous = torch.get_default_dtype()
  torch.manual_seed(0)
  torch.set_default_dtype(dtype)
  try:
    with device:
      model = TorchFlux(**kwargs).eval()
  finally:
    torch.set_default_dtype(previous)
  n_params = sum(p.numel() for p in model.parameters())
  args = {k: torch.from_numpy(v).to(device, torch.float32 if k in ("img_ids", "txt_ids") else dtype)
          for k, v in inputs.items()}
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  with torch.inference_mode():
    for _ in range(s.warmup):
      model(**args, return_dict=False)
    sync()
    times = []
    for _ in range(s.repeats):
      if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        model(**args, return_dict=False)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
      else:
        start = time.perf_counter()
        model(**args, return_dict=False)
        times.append(time.perf_counter() - start)
  peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
  del model, args
  if device.type == "cuda":
    torch.cuda.empty_cache()
  return _summary(times, peak, n_params)


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f}"


def format_table(result: dict[str, Any]) -> str:
  rows = [("implementation", "median ms", "min ms", "peak GiB", "params", "time / torch")]
  torch_ms = result.get("torch", {}).get("median_ms")
  for name in ("torch", "ours"):
    if name not in result:
      continue
    r = result[name]
    ratio = f"{r['median_ms'] / torch_ms:.3f}" if torch_ms else "n/a"
    rows.append((name, f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", _gib(r["peak_bytes"]), f"{r['params']:,}", ratio))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
  return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


def run_benchmark(s: BenchmarkSettings) -> dict[str, Any]:
  """Runs torch (optional) then ours; returns the settings, shapes, device and both summaries."""
  config = benchmark_config(s)
  inputs = make_inputs(config, s)
  rows, cols, text_len = _shapes(s)
  result: dict[str, Any] = {"settings": dataclasses.asdict(s), "image_tokens": rows * cols, "text_tokens": text_len,
                            "num_layers": config.num_layers, "num_single_layers": config.num_single_layers}
  if s.torch:
    result["torch"] = run_torch(config, inputs, s)
  result["ours"] = run_ours(config, inputs, s)
  result["device"] = str(jax.devices()[0].device_kind)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  s = BenchmarkSettings(config_name=f.config_name, quick=f.quick, dtype=f.dtype, height=f.height, width=f.width,
                        text_len=f.text_len, batch=f.batch, warmup=f.warmup, repeats=f.repeats, torch=f.torch)
  result = run_benchmark(s)
  print(f"FLUX transformer forward, {s.config_name}{' (quick)' if s.quick else ''}, {s.dtype}, batch {s.batch}, "
        f"{result['image_tokens']} image + {result['text_tokens']} text tokens, {result['num_layers']} + "
        f"{result['num_single_layers']} blocks, on {result['device']}")
  print(format_table(result))
  if f.out:
    atomic_write_text(f.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
