"""How long SVDQuant PTQ takes per transformer block at real shapes, extrapolated to the model.

The command is ``launch/benchmark_ptq.py``.
Builds one double-stream and one single-stream block of the named FLUX preset with random
weights (real widths), random calibration inputs of ``--samples`` samples with
``--img_tokens`` image and ``--txt_tokens`` text tokens (FLUX.1-dev at 1024x1024: 4096 + 512),
and times :func:`svdquant_jax.quant.ptq.quantize_block` (smoothing search + low-rank branch +
quantization of every group, and the W4A16 adaLN layers) and the replay of the block to the next
one's inputs. Each is timed twice: the first call includes compilation (paid once per block
kind in a real run), the second is the steady per-block cost. The estimate for the whole model
is ``compile + count x steady`` per kind, e.g. 19 double and 38 single blocks for FLUX.1.
Weights and inputs are random, so the smoothing and low-rank searches may stop at other
iterations than on real activations; the early stop makes real runs at most as long as
``--lowrank_iters`` iterations.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.flows import ptq_config
from svdquant_jax.models import flux
from svdquant_jax.quant import ptq
from svdquant_jax.quant.adapters import ModelAdapter, adapter_for
from svdquant_jax.quant.settings import PTQSettings

DEEPCOMPRESSOR_HOURS = 12.0  # reported for FLUX.1 on one H100 (deepcompressor's README)


def settings_for(method: Sequence[str], dtype: Any, **overrides: Any) -> PTQSettings:
  """The settings of the method parts (``ptq_config``) with field overrides (``None``: keep).

  Overrides: ``num_grids``, ``lowrank_iters``, ``batch_size``, ``candidates_per_batch``, ``max_tokens``.
  """
  config = ptq_config.base()
  for part in method:
    ptq_config.apply(config, part, sep="+")
  fields = {"num_grids": config.quant.smooth, "candidates_per_batch": config.quant.smooth,
            "lowrank_iters": config.quant.lowrank, "batch_size": config.calib, "max_tokens": config.calib}
  for name, value in overrides.items():
    if value is not None:
      fields[name][{"lowrank_iters": "num_iters"}.get(name, name)] = value
  return PTQSettings.from_config(config, dtype)


def random_state(adapter: ModelAdapter, params: Any, samples: int, img_tokens: int, txt_tokens: int,
                 dtype: Any) -> dict[str, jax.Array]:
  """The first block's inputs for random transformer inputs (a square image grid of ids)."""
  cfg = adapter.config
  side = int(round(img_tokens ** 0.5))
  if side * side != img_tokens:
    raise ValueError(f"--img_tokens={img_tokens} is not a square number of patches")
  keys = jax.random.split(jax.random.key(0), 4)
  grid = np.stack(np.meshgrid(np.zeros(1), np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 3)
  inputs = dict(
      hidden_states=jax.random.normal(keys[0], (samples, img_tokens, cfg.in_channels), dtype),
      encoder_hidden_states=jax.random.normal(keys[1], (samples, txt_tokens, cfg.joint_attention_dim), dtype),
      pooled_projections=jax.random.normal(keys[2], (samples, cfg.pooled_projection_dim), dtype),
      timestep=jax.random.uniform(keys[3], (samples,), jnp.float32),
      img_ids=jnp.asarray(grid, jnp.float32), txt_ids=jnp.zeros((txt_tokens, 3), jnp.float32),
      guidance=jnp.full((samples,), 3.5, jnp.float32) if cfg.guidance_embeds else None)
  return jax.jit(adapter.embed)(params, inputs)


def _timed(fn, *args) -> tuple[Any, float]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def run_benchmark(config_name: str, settings: PTQSettings, *, samples: int, img_tokens: int, txt_tokens: int,
                  dtype: str, num_double: int | None = None, num_single: int | None = None) -> dict[str, Any]:
  """Times one block of each kind; returns the measurements and the whole-model estimate."""
  if config_name not in flux.FLUX_PRESETS:
    raise ValueError(f"unknown FLUX preset {config_name!r}; expected one of {sorted(flux.FLUX_PRESETS)}")
  full = flux.FLUX_PRESETS[config_name]
  counts = {"flux_double": full.num_layers if num_double is None else num_double,
            "flux_single": full.num_single_layers if num_single is None else num_single}
  cfg = full.replace(num_layers=1, num_single_layers=1, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  adapter = adapter_for("flux", cfg)
  params = flux.init_flux_params(cfg, 0)
  state, t_embed = _timed(random_state, adapter, params, samples, img_tokens, txt_tokens, cfg.dtype)
  rows = []
  for index, block in enumerate(adapter.blocks()):
    quantize = lambda s, b=block, i=index: ptq.quantize_block(  # noqa: E731
        adapter, b, params[b.name], s, settings, set(), i)
    layers, first = _timed(quantize, state)
    _, steady = _timed(quantize, state)
    replay = lambda s, b=block, l=layers: ptq.replay_block(adapter, b, params[b.name], s, l, settings)  # noqa: E731
    new_state, replay_first = _timed(replay, state)
    _, replay_steady = _timed(replay, state)
    rows.append({"kind": block.kind, "count": counts[block.kind], "first_s": first, "steady_s": steady,
                 "replay_first_s": replay_first, "replay_steady_s": replay_steady,
                 "layers": len(layers)})
    state = new_state
  total = sum(r["first_s"] + r["replay_first_s"] + (r["count"] - 1) * (r["steady_s"] + r["replay_steady_s"])
              for r in rows)
  return {"config": config_name, "samples": samples, "img_tokens": img_tokens, "txt_tokens": txt_tokens,
          "dtype": dtype, "settings": settings.to_json(), "embed_s": t_embed, "rows": rows,
          "model_estimate_s": total, "device": str(jax.devices()[0].device_kind)}


def format_table(result: dict[str, Any]) -> str:
  lines = [f"device: {result['device']}; {result['config']} widths, {result['samples']} samples x "
           f"({result['img_tokens']} + {result['txt_tokens']}) tokens, {result['dtype']}",
           f"settings: {result['settings']}",
           "| block | count | quantize first (s) | quantize steady (s) | replay steady (s) | layers |",
           "|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(f"| {r['kind']} | {r['count']} | {r['first_s']:.1f} | {r['steady_s']:.1f} | "
                 f"{r['replay_steady_s']:.2f} | {r['layers']} |")
  hours = result["model_estimate_s"] / 3600
  line = (f"whole model (compile once per kind + count x steady): {result['model_estimate_s']:.0f} s = "
          f"{hours:.2f} h")
  if result["config"] in ("flux-dev", "flux-schnell"):  # the reported figure is for FLUX.1 itself
    line += (f"; deepcompressor (reported, H100): {DEEPCOMPRESSOR_HOURS:.0f} h -> "
             f"{DEEPCOMPRESSOR_HOURS / max(hours, 1e-9):.1f}x faster")
  lines.append(line)
  return "\n".join(lines)
