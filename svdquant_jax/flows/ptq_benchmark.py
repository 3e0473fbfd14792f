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

Next to the times it prints the matmul FLOPs of each stage (:mod:`svdquant_jax.quant.cost_model`)
for the benchmarked shapes, the device's plain matmul rate measured in the same run (a
``[4096, D] x [D, 3D]`` float32 product at ``Precision.HIGHEST``, the searches' precision, and in
bfloat16), and the achieved rate of each block's quantization against it (the efficiency ratio;
the FLOPs assume ``--lowrank_iters`` iterations per branch, an upper bound under the early stop).
:func:`model_estimate` extrapolates the whole FLUX.1 run at 128 x (4096 + 512) tokens from FLOPs
and a given matmul rate: an estimate, not a measurement.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.flows import ptq_config
from svdquant_jax.models import flux
from svdquant_jax.quant import cost_model, ptq
from svdquant_jax.quant.adapters import ModelAdapter, adapter_for
from svdquant_jax.quant.settings import PTQSettings

DEEPCOMPRESSOR_HOURS = 12.0  # reported for FLUX.1 on one H100 (deepcompressor's README)


def settings_for(method: Sequence[str], dtype: Any, **overrides: Any) -> PTQSettings:
  """The settings of the method parts (``ptq_config``) with field overrides (``None``: keep).

  Overrides: ``num_grids``, ``lowrank_iters``, ``batch_size``, ``candidates_per_batch``, ``max_tokens``,
  and the search cost cuts ``mode`` (``"fast"`` / ``"exact"``), ``loss_dtype``, ``halving_tokens``,
  ``halving_keep`` (``quant.search``). The method part ``exact`` sets ``mode="exact"``.
  """
  config = ptq_config.base()
  for part in method:
    if part == "exact":
      config.quant.search.mode = "exact"
    else:
      ptq_config.apply(config, part, sep="+")
  fields = {"num_grids": config.quant.smooth, "candidates_per_batch": config.quant.smooth,
            "lowrank_iters": config.quant.lowrank, "batch_size": config.calib, "max_tokens": config.calib,
            "mode": config.quant.search, "loss_dtype": config.quant.search,
            "halving_tokens": config.quant.search, "halving_keep": config.quant.search}
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


def matmul_rate(dim: int, dtype: Any, precision: Any = jax.lax.Precision.HIGHEST, rows: int = 4096,
                repeats: int = 3) -> float:
  """Plain matmul FLOP/s of this device: the best of ``repeats`` ``[rows, D] x [D, 3D]`` products."""
  keys = jax.random.split(jax.random.key(1))
  x = jax.random.normal(keys[0], (rows, dim), dtype)
  w = jax.random.normal(keys[1], (dim, 3 * dim), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32))
  jax.block_until_ready(dot(x, w))
  best = min(_timed(dot, x, w)[1] for _ in range(repeats))
  return cost_model.matmul_flops(rows, dim, 3 * dim) / best


def block_flops(kind: str, settings: PTQSettings, dim: int, samples: int, img_tokens: int,
                txt_tokens: int, module_cuts: bool = True) -> dict[str, float]:
  """Matmul FLOPs per stage of one FLUX block under ``settings`` (:func:`cost_model.block_flops`).

  ``module_cuts``: whether the module-level losses take the successive-halving token subsets
  (the cost model's what-if; see :mod:`svdquant_jax.quant.cost_model`).
  """
  groups, forward = cost_model.flux_block_groups(kind, dim, samples, img_tokens, txt_tokens, settings.max_tokens)
  return cost_model.block_flops(
      groups, forward, rank=settings.rank, candidates=len(settings.smoothing_grid) if settings.smooth else 0,
      lowrank_iters=settings.lowrank_iters, shared_branch=settings.shared_branch, gptq=settings.gptq,
      svd_iters=settings.svd_iters or cost_model.DEFAULT_SVD_ITERS, oversample=settings.oversample,
      halving_tokens=settings.halving_tokens, halving_keep=settings.halving_keep, module_cuts=module_cuts)


def group_efficiency(k: int, n: int, tokens: int, settings: PTQSettings, seed: int = 0) -> dict[str, float]:
  """Times :func:`~svdquant_jax.quant.svdquant.quantize_linear_group` of one random ``[K, N]`` kernel on
  ``tokens`` random inputs (linear-level loss; steady state, after a compiling call) and its
  achieved FLOP/s against the plain float32 HIGHEST matmul rate measured just before.

  The FLOPs count the iterations that actually ran (the early stop) and leave out the loss's
  reference outputs (computed once).
  """
  from svdquant_jax.quant.svdquant import quantize_linear_group  # noqa: PLC0415 (flows may import quant)
  keys = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(keys[0], (k, n), jnp.float32) / k ** 0.5
  x = jax.random.normal(keys[1], (tokens, k), jnp.float32)
  run = lambda: quantize_linear_group([w], None, x, settings, return_info=True)  # noqa: E731
  _, info = jax.block_until_ready(run())
  (_, info), seconds = _timed(run)
  iters = int(np.sum(np.isfinite(np.asarray(info.lowrank_losses[0])))) if settings.rank else 0
  group = cost_model.GroupShape("g", ((k, n),), (tokens,))
  flops = cost_model.group_flops(group, rank=settings.rank, candidates=len(settings.smoothing_grid),
                                 lowrank_iters=iters, gptq=settings.gptq,
                                 svd_iters=settings.svd_iters or cost_model.DEFAULT_SVD_ITERS,
                                 oversample=settings.oversample, halving_tokens=settings.halving_tokens,
                                 halving_keep=settings.halving_keep)
  total = sum(flops.values())
  rate = matmul_rate(k, jnp.float32)
  return {"flops": total, "seconds": seconds, "flops_per_s": total / seconds, "matmul_flops_per_s": rate,
          "efficiency": total / seconds / rate, "lowrank_iters_run": iters,
          "loss_share": (flops["smooth_loss"] + flops["lowrank_loss"]) / total,
          "smooth_index": int(info.smooth_index), "loss_dtype": settings.loss_dtype,
          "halving_tokens": settings.halving_tokens}


def model_estimate(config_name: str, settings: PTQSettings, flops_per_s: float, efficiency: float = 1.0, *,
                   samples: int = 128, img_tokens: int = 4096, txt_tokens: int = 512,
                   bf16_flops_per_s: float | None = None, module_cuts: bool = True) -> dict[str, Any]:
  """Estimated whole-model PTQ time from FLOPs at ``efficiency`` x ``flops_per_s`` (no compile time).

  ``bf16_flops_per_s``: with ``settings.loss_dtype == "bfloat16"``, the rate of the loss
  evaluations (``None``: everything at ``flops_per_s``); ``module_cuts``: see :func:`block_flops`.

  Returns ``{"flops": {kind: per-block stage FLOPs}, "seconds": total, "counts": {kind: blocks}}``.
  """
  full = flux.FLUX_PRESETS[config_name]
  dim = full.num_attention_heads * full.attention_head_dim
  counts = {"flux_double": full.num_layers, "flux_single": full.num_single_layers}
  flops = {kind: block_flops(kind, settings, dim, samples, img_tokens, txt_tokens, module_cuts) for kind in counts}
  if bf16_flops_per_s is None:
    total = sum(counts[k] * flops[k]["total"] for k in counts)
    seconds = cost_model.estimate_seconds(total, flops_per_s, efficiency)
  else:
    seconds = sum(counts[k] * cost_model.estimate_mixed_seconds(flops[k], settings.loss_dtype, flops_per_s,
                                                                bf16_flops_per_s, efficiency) for k in counts)
  return {"flops": flops, "counts": counts, "seconds": seconds}


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
  dim = cfg.num_attention_heads * cfg.attention_head_dim
  rates = {"f32_highest": matmul_rate(dim, jnp.float32), "bf16": matmul_rate(dim, jnp.bfloat16)}
  rows = []
  for index, block in enumerate(adapter.blocks()):
    quantize = lambda s, b=block, i=index: ptq.quantize_block(  # noqa: E731
        adapter, b, params[b.name], s, settings, set(), i)
    layers, first = _timed(quantize, state)
    _, steady = _timed(quantize, state)
    replay = lambda s, b=block, l=layers: ptq.replay_block(adapter, b, params[b.name], s, l, settings)  # noqa: E731
    new_state, replay_first = _timed(replay, state)
    _, replay_steady = _timed(replay, state)
    flops = block_flops(block.kind, settings, dim, samples, img_tokens, txt_tokens)
    rows.append({"kind": block.kind, "count": counts[block.kind], "first_s": first, "steady_s": steady,
                 "replay_first_s": replay_first, "replay_steady_s": replay_steady,
                 "layers": len(layers), "flops": flops,
                 "quantize_flops_per_s": (flops["total"] - flops["replay"]) / steady,
                 "replay_flops_per_s": flops["replay"] / replay_steady})
    state = new_state
  total = sum(r["first_s"] + r["replay_first_s"] + (r["count"] - 1) * (r["steady_s"] + r["replay_steady_s"])
              for r in rows)
  return {"config": config_name, "samples": samples, "img_tokens": img_tokens, "txt_tokens": txt_tokens,
          "dtype": dtype, "settings": settings.to_json(), "embed_s": t_embed, "rows": rows,
          "model_estimate_s": total, "device": str(jax.devices()[0].device_kind), "matmul_rates": rates}


def format_cost_table(result: dict[str, Any]) -> str:
  """The FLOPs per stage and the achieved rate against the measured plain matmul rate."""
  rates = result["matmul_rates"]
  lines = [f"plain matmul on this device: f32 HIGHEST {rates['f32_highest'] / 1e9:.1f} GFLOP/s, "
           f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s",
           "| block | smooth SVD | smooth loss | low-rank SVD | low-rank loss | GPTQ | replay | "
           "quantize GFLOP/s | efficiency vs f32 matmul |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    f = r["flops"]
    lines.append(f"| {r['kind']} | " + " | ".join(f"{f[k]:.3g}" for k in (
        "smooth_svd", "smooth_loss", "lowrank_svd", "lowrank_loss", "gptq", "replay")) +
        f" | {r['quantize_flops_per_s'] / 1e9:.1f} | {r['quantize_flops_per_s'] / rates['f32_highest']:.2f} |")
  return "\n".join(lines)


def format_estimate(estimate: dict[str, Any], label: str) -> str:
  """One line: the whole-model estimate (FLOPs and time)."""
  flops = sum(estimate["counts"][k] * estimate["flops"][k]["total"] for k in estimate["counts"])
  return (f"ESTIMATE ({label}): {flops:.3g} FLOPs -> {estimate['seconds']:.0f} s = "
          f"{estimate['seconds'] / 3600:.2f} h")


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


# ----------------------------------------------------------------------------- search cost cuts: quality
SEARCH_VARIANTS = {  # name -> PTQSettings overrides (applied to the exact search)
    "exact": {},
    "bf16 loss": {"loss_dtype": "bfloat16"},
    "halving": {"halving_tokens": -32},  # negative: T / 32 tokens (FLUX: 4096 of 131072)
    "halving keep 1/3": {"halving_tokens": -32, "halving_keep": 1 / 3},
    "bf16 + halving": {"loss_dtype": "bfloat16", "halving_tokens": -32},
    "bf16 + halving T/8": {"loss_dtype": "bfloat16", "halving_tokens": -8},
}


def compare_search_cuts(seeds: Sequence[int] = (0, 1, 2), rows: int = 4096, k: int = 256, n: int = 768,
                        formats: Sequence[str] = ("int4", "nvfp4"), rank: int = 32, num_grids: int = 20,
                        lowrank_iters: int = 100, variants: dict[str, dict[str, Any]] | None = None,
                        log=lambda row: None) -> list[dict[str, Any]]:
  """Quality of each search cost cut against the exact search on seeded synthetic outlier layers
  (:func:`~svdquant_jax.flows.layer_report.make_synthetic_layer`: ``rows`` calibration and ``rows``
  held-out tokens).

  Per layer, format and variant: the held-out relative output error, its ratio to the exact
  search's, whether the chosen (α, β) pair and the kept alternating iteration agree with it, and the
  seconds of one :func:`~svdquant_jax.quant.svdquant.quantize_linear_group` call (compilation
  included: a quality comparison, not a timing). ``halving_tokens < 0`` in a variant means
  ``rows / |halving_tokens|`` tokens. ``log`` is called with each row as it is measured.
  """
  from svdquant_jax.flows import layer_report  # noqa: PLC0415
  from svdquant_jax.formats.quantizers import FORMATS  # noqa: PLC0415
  from svdquant_jax.quant.svdquant import fake_forward, quantize_linear_group  # noqa: PLC0415
  variants = SEARCH_VARIANTS if variants is None else variants
  out = []
  for seed in seeds:
    layer = layer_report.make_synthetic_layer(seed, rows=rows, k=k, n=n)
    for fmt_name in formats:
      base = PTQSettings(fmt=FORMATS[fmt_name], rank=rank, num_grids=num_grids, lowrank_iters=lowrank_iters)
      exact = None
      for name, changes in variants.items():
        changes = dict(changes)
        if changes.get("halving_tokens", 0) < 0:
          changes["halving_tokens"] = rows // -changes["halving_tokens"]
        settings = base.replace(**changes)
        run = lambda s=settings: quantize_linear_group([layer.kernel], None, layer.x, s, return_info=True)  # noqa: E731
        ((w,), info), seconds = _timed(run)
        row = {"seed": seed, "format": fmt_name, "variant": name, "seconds": seconds,
               "error": layer_report.relative_error(layer, fake_forward(layer.x_eval, w, settings.fmt)),
               "pair": settings.smoothing_grid[int(info.smooth_index)], "lowrank_best": int(info.lowrank_best[0])}
        exact = row if exact is None else exact
        row.update(error_ratio=row["error"] / exact["error"], same_pair=row["pair"] == exact["pair"],
                   same_lowrank=row["lowrank_best"] == exact["lowrank_best"])
        out.append(row)
        log(row)
  return out


def format_search_cuts(rows: Sequence[dict[str, Any]]) -> str:
  """Per variant over all layers and formats: mean and worst error ratio to the exact search, pair
  and iteration agreement, mean seconds (with compilation); then one line per layer."""
  lines = ["| variant | error / exact, mean | worst | same (α, β) | same kept iteration | mean s (with compile) |",
           "|---|---|---|---|---|---|"]
  for name in dict.fromkeys(r["variant"] for r in rows):
    sel = [r for r in rows if r["variant"] == name]
    ratios = [r["error_ratio"] for r in sel]
    lines.append(f"| {name} | {np.mean(ratios):.4f} | {max(ratios):.4f} | {sum(r['same_pair'] for r in sel)}/{len(sel)}"
                 f" | {sum(r['same_lowrank'] for r in sel)}/{len(sel)} | {np.mean([r['seconds'] for r in sel]):.1f} |")
  lines += ["", "| seed | format | variant | error | / exact | (α, β) | kept iteration |",
            "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['seed']} | {r['format']} | {r['variant']} | {r['error']:.5f} | {r['error_ratio']:.4f} | "
                 f"({r['pair'][0]:.2f}, {r['pair'][1]:.2f}) | {r['lowrank_best'] + 1} |")
  return "\n".join(lines)
