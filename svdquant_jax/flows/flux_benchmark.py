"""Times one FLUX.1 transformer forward: ours (jitted Flax) against diffusers' PyTorch model.

The command is ``launch/benchmark_flux.py``. Both run random weights at the same config, dtype
and inputs on the same device, in one process, so that the ratio is measured side by side: at
``config_name="flux-dev"`` (12B parameters, bf16) and 1024x1024 that is 4096 image tokens + 512
text tokens, batch 1. For each implementation: ``warmup`` untimed calls (ours includes the jit
compile), then ``repeats`` timed calls, each synchronized (``block_until_ready`` / CUDA events);
the table gives the median and the minimum, and the peak device memory (weights + forward):
``device.memory_stats()["peak_bytes_in_use"]`` for jax and ``torch.cuda.max_memory_allocated()``
for torch ("n/a" on CPU).

PyTorch runs first and releases its memory (``torch.cuda.empty_cache``) before jax touches the
device; for jax's peak to be what it uses, the process must run with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` set before jax starts its backend (the command does so).
The torch model is built directly in the benchmark dtype on the device (no float32 copy).

torch and diffusers are test-only references that the package never imports: the caller imports
them and hands them in as a :class:`TorchReference`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models.flux import FLUX_PRESETS, FluxConfig, FluxTransformer2DModel, init_flux_params
from svdquant_jax.utils.files import atomic_write_text


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  """What to run (the command's flags of the same names).

  ``height`` / ``width`` / ``text_len`` ``None``: 1024 / 1024 / 512 (flux-tiny: 128 / 128 / 64).
  ``quick``: at most 2 double and 4 single blocks. ``torch``: also time diffusers' model.
  """
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


@dataclasses.dataclass(frozen=True)
class TorchReference:
  """diffusers' PyTorch FLUX transformer, imported by the caller.

  ``torch``: the ``torch`` module; ``model_class``: ``diffusers.FluxTransformer2DModel``.
  """
  torch: Any
  model_class: Any


def benchmark_config(s: BenchmarkSettings) -> FluxConfig:
  """The preset ``s.config_name`` in ``s.dtype`` (``s.quick``: at most 2 + 4 blocks)."""
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
  """Times our jitted forward: median / min / every time (ms), peak device bytes, parameter count."""
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


def run_torch(config: FluxConfig, inputs: dict[str, np.ndarray], s: BenchmarkSettings,
              reference: TorchReference) -> dict[str, Any]:
  """Times diffusers' forward at the same config (CUDA if available), then frees its memory."""
  torch = reference.torch
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
      model = reference.model_class(**kwargs).eval()
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


def run(s: BenchmarkSettings, reference: TorchReference | None = None) -> dict[str, Any]:
  """Runs torch (if ``s.torch``; needs ``reference``) then ours, in this order.

  Returns the settings, the token and block counts, the device and the summary of each
  implementation (``"torch"``, ``"ours"``: ``median_ms``, ``min_ms``, ``times_ms``,
  ``peak_bytes``, ``params``).
  """
  if s.torch and reference is None:
    raise ValueError("torch=True needs reference=TorchReference(torch, diffusers.FluxTransformer2DModel)")
  config = benchmark_config(s)
  inputs = make_inputs(config, s)
  rows, cols, text_len = _shapes(s)
  result: dict[str, Any] = {"settings": dataclasses.asdict(s), "image_tokens": rows * cols, "text_tokens": text_len,
                            "num_layers": config.num_layers, "num_single_layers": config.num_single_layers}
  if s.torch:
    result["torch"] = run_torch(config, inputs, s, reference)
  result["ours"] = run_ours(config, inputs, s)
  result["device"] = str(jax.devices()[0].device_kind)
  return result


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f}"


def headline(result: dict[str, Any]) -> str:
  """One line: config, dtype, batch, tokens, blocks and device."""
  s = result["settings"]
  return (f"FLUX transformer forward, {s['config_name']}{' (quick)' if s['quick'] else ''}, {s['dtype']}, "
          f"batch {s['batch']}, {result['image_tokens']} image + {result['text_tokens']} text tokens, "
          f"{result['num_layers']} + {result['num_single_layers']} blocks, on {result['device']}")


def format_table(result: dict[str, Any]) -> str:
  """Median, min, peak memory, parameters and the time ratio to torch, one row per implementation."""
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


def write_results(result: dict[str, Any], path: str) -> None:
  """Writes the result as JSON to ``path``."""
  atomic_write_text(path, json.dumps(result, indent=1) + "\n")
