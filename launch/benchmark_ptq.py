"""How long SVDQuant PTQ takes per transformer block at real shapes, extrapolated to the model.

    python launch/benchmark_ptq.py                              # GPU: FLUX.1-dev shapes, 128 samples
    python launch/benchmark_ptq.py --method=int4,gptq           # with GPTQ
    python launch/benchmark_ptq.py --config_name=flux-tiny --samples=4 --img_tokens=64 --txt_tokens=16 \
        --num_grids=2 --lowrank_iters=2                         # CPU code-path check

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

import os
import sys
import time
from typing import Any, Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from svdquant_jax.models import flux  # noqa: E402
from svdquant_jax.quant import adapters, ptq  # noqa: E402

DEEPCOMPRESSOR_HOURS = 12.0  # reported for FLUX.1 on one H100 (seed document)
FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command's flags (by the entry point only, so that importing this module defines
  nothing: other launch modules use some of the same names)."""
  flags.DEFINE_string("config_name", "flux-dev", "FLUX preset whose widths are used.")
  flags.DEFINE_list("method", ["int4"], "Config parts of the method (configs/svdquant/, configs/baselines/).")
  flags.DEFINE_integer("samples", 128, "Calibration samples.")
  flags.DEFINE_integer("img_tokens", 4096, "Image tokens per sample (1024x1024: 4096).")
  flags.DEFINE_integer("txt_tokens", 512, "Text tokens per sample (FLUX.1-dev: 512).")
  flags.DEFINE_string("dtype", "bfloat16", "Model dtype.")
  flags.DEFINE_integer("num_grids", None, "Override quant.smooth.num_grids.")
  flags.DEFINE_integer("lowrank_iters", None, "Override quant.lowrank.num_iters.")
  flags.DEFINE_integer("batch_size", None, "Override calib.batch_size (samples per pass).")
  flags.DEFINE_integer("candidates_per_batch", None, "Override quant.smooth.candidates_per_batch.")
  flags.DEFINE_integer("max_tokens", None, "Override calib.max_tokens.")
  flags.DEFINE_integer("num_double", None, "Double blocks of the model (default: the preset's).")
  flags.DEFINE_integer("num_single", None, "Single blocks of the model (default: the preset's).")


def settings_from_flags() -> ptq.PTQSettings:
  from launch import ptq as ptq_launch  # pylint: disable=g-import-not-at-top
  module = ptq_launch._config_module()
  config = module.base()
  for part in FLAGS.method:
    module._part(part).update(config)
  for flag, (section, field) in (("num_grids", ("quant.smooth", "num_grids")),
                                 ("lowrank_iters", ("quant.lowrank", "num_iters")),
                                 ("batch_size", ("calib", "batch_size")),
                                 ("candidates_per_batch", ("quant.smooth", "candidates_per_batch")),
                                 ("max_tokens", ("calib", "max_tokens"))):
    if getattr(FLAGS, flag) is not None:
      node = config
      for part in section.split("."):
        node = node[part]
      node[field] = getattr(FLAGS, flag)
  return ptq.PTQSettings.from_config(config)


def random_state(adapter: adapters.ModelAdapter, params: Any, samples: int, img_tokens: int, txt_tokens: int,
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


def run_benchmark(config_name: str, settings: ptq.PTQSettings, *, samples: int, img_tokens: int, txt_tokens: int,
                  dtype: str, num_double: int | None = None, num_single: int | None = None) -> dict[str, Any]:
  """Times one block of each kind; returns the measurements and the whole-model estimate."""
  if config_name not in flux.FLUX_PRESETS:
    raise ValueError(f"unknown FLUX preset {config_name!r}; expected one of {sorted(flux.FLUX_PRESETS)}")
  full = flux.FLUX_PRESETS[config_name]
  counts = {"flux_double": full.num_layers if num_double is None else num_double,
            "flux_single": full.num_single_layers if num_single is None else num_single}
  cfg = full.replace(num_layers=1, num_single_layers=1, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  adapter = adapters.adapter_for("flux", cfg)
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


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
  result = run_benchmark(FLAGS.config_name, settings_from_flags(), samples=FLAGS.samples,
                         img_tokens=FLAGS.img_tokens, txt_tokens=FLAGS.txt_tokens, dtype=FLAGS.dtype,
                         num_double=FLAGS.num_double, num_single=FLAGS.num_single)
  print(format_table(result))


if __name__ == "__main__":
  define_flags()
  app.run(main)
