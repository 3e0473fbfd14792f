"""Layer-level evidence for the SVDQuant transforms: error tables, singular spectra, rank sweeps.

The experiments behind ``docs/quantization.md``, "Layer-level evidence".

A seeded synthetic linear layer with the outlier structure of diffusion transformers (a few input
channels with 10-100x larger activations; heavy-tailed weight rows, i.e. input channels, and a
fast-decaying spectrum) is quantized by each method from calibration tokens, and the relative
output error ``||x W - ŷ||_F / ||x W||_F`` on held-out tokens is tabulated:

  W4A4 (INT4 g64 and NVFP4 g16): RTN; smoothing only (39-pair grid, no branch); SVD only (r = 32,
  no smoothing); LoRC (SVD_r of W - Q(W), Q(W) kept); smoothing + LoRC (λ of smoothing only);
  SVDQuant one-shot; + alternating refinement; + GPTQ on the residual; + learned refinement
  (``quant/refine.py``) of λ and the branch after the alternating loop and after GPTQ. Baselines: W4A16 INT4 g64
  and NF4 g64, W8A8 (per-channel / per-token INT8). A rank sweep of SVDQuant, and the singular
  values of W, Ŵ = diag(λ) W and R = Ŵ - L (the SVDQuant + alternating layer); both are also
  plotted with matplotlib (:mod:`svdquant_jax.flows.plots`) as ``rank_sweep.png`` and ``spectra.png``.

``launch/layer_report.py`` is the command-line entry point.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.flows import plots
from svdquant_jax.quant import gptq, lowrank, refine, smooth
from svdquant_jax.formats import quantizers as qz
from svdquant_jax.quant.svdquant import SVDQuantWeights, fake_forward, plain_weights, quantize_linear_group
from svdquant_jax.utils.files import atomic_write_text

W4A4_METHODS = ("RTN", "Smoothing only", "SVD only", "LoRC", "Smoothing + LoRC", "SVDQuant (one-shot)",
                "SVDQuant + alternating", "SVDQuant + GPTQ", "SVDQuant + refinement",
                "SVDQuant + GPTQ + refinement")
BASELINES = ("W4A16 INT4 g64", "W4A16 NF4 g64", "W8A8 INT8")
RANKS = (0, 8, 16, 32, 64, 128)
W4A4_FORMATS = {"int4": qz.INT4, "nvfp4": qz.NVFP4}


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticLayer:
  """A seeded linear layer ``y = x @ kernel`` (no bias).

  Attributes:
    x: ``[rows, K]`` float32 calibration inputs (the searches and GPTQ see only these).
    x_eval: ``[rows, K]`` float32 held-out inputs from the same distribution (the errors are
      measured on these).
    kernel: ``[K, N]`` float32.
    outlier_channels: indices of the input channels with 10-100x activations.
    seed: the generator seed.
  """
  x: jax.Array
  x_eval: jax.Array
  kernel: jax.Array
  outlier_channels: tuple
  seed: int


def make_synthetic_layer(seed: int = 0, rows: int = 512, k: int = 256, n: int = 768) -> SyntheticLayer:
  """A FLUX-like layer scaled down (qkv: 3072 x 9216 at 1/12 by default).

  Activations: Gaussian tokens with a shared low-rank component, per-channel scales spread
  log-normally, and ``max(2, K // 64)`` outlier channels scaled by 10-100x (log-uniform).
  Weights: a power-law spectrum (σ_i ∝ i^-0.5 over min(K, N) / 2 directions) plus a noise floor,
  with input-channel rows scaled by a heavy-tailed log-normal factor ``exp(0.3 t)``, t Student-t
  with 3 degrees of freedom (clipped to ±6).
  """
  if min(rows, k, n) < 1:
    raise qz.QuantizationError(f"rows, k and n must be positive, got {rows}, {k}, {n}")
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2 * rows, k)) * np.exp(0.4 * rng.standard_normal(k))
  x += 0.5 * rng.standard_normal((2 * rows, 8)) @ rng.standard_normal((8, k))
  count = max(2, k // 64)
  outliers = np.sort(rng.choice(k, count, replace=False))
  x[:, outliers] *= np.exp(rng.uniform(np.log(10), np.log(100), count))
  r = min(k, n) // 2
  u, _ = np.linalg.qr(rng.standard_normal((k, r)))
  v, _ = np.linalg.qr(rng.standard_normal((n, r)))
  w = (u * (1 + np.arange(r)) ** -0.5) @ v.T * 4 + 0.05 * rng.standard_normal((k, n))
  w *= np.exp(0.3 * np.clip(rng.standard_t(3, size=(k, 1)), -6, 6))
  w /= np.sqrt(k)
  return SyntheticLayer(jnp.asarray(x[:rows], jnp.float32), jnp.asarray(x[rows:], jnp.float32),
                        jnp.asarray(w, jnp.float32), tuple(int(i) for i in outliers), seed)


def relative_error(layer: SyntheticLayer, y_hat: jax.Array) -> float:
  """``||x W - ŷ||_F / ||x W||_F`` in float64 on the held-out inputs ``x_eval``."""
  y = np.asarray(layer.x_eval, np.float64) @ np.asarray(layer.kernel, np.float64)
  return float(np.linalg.norm(np.asarray(y_hat, np.float64) - y) / np.linalg.norm(y))


_forward = jax.jit(fake_forward, static_argnums=(2, 3))


@functools.partial(jax.jit, static_argnames=("fmt", "settings"))
def _refine(weights: SVDQuantWeights, kernel: jax.Array, x: jax.Array, fmt: qz.QuantFormat,
            settings: refine.RefineSettings) -> tuple[SVDQuantWeights, refine.RefineInfo]:
  """Learned refinement of one bias-free layer on its calibration tokens (the linear output loss)."""
  loss = smooth.linear_output_loss(x, [kernel], None, fmt)
  (out,), info = refine.refine_group([weights], [kernel], x, fmt, [0.0], settings, loss)
  return out, info


def _lorc(w_hat: jax.Array, smooth_scale: jax.Array, fmt: qz.QuantFormat, rank: int) -> SVDQuantWeights:
  """LoRC: quantize Ŵ, approximate its quantization error by SVD_r, keep Q(Ŵ) (``residual_q``)."""
  q = qz.quantize_weight(w_hat, fmt)
  a, b = lowrank.svd_lowrank(w_hat - qz.dequantize_weight(q, fmt), rank)
  return SVDQuantWeights(smooth_scale, w_hat, a, b, jnp.zeros((w_hat.shape[1],), jnp.float32), q)


def _pair(pair: Sequence[float]) -> tuple[float, ...]:
  return tuple(round(float(v), 4) for v in pair)


def evaluate_w4a4(layer: SyntheticLayer, fmt: qz.QuantFormat, rank: int = 32, grid: Sequence | None = None,
                  lowrank_iters: int = 100, methods: Sequence[str] = W4A4_METHODS,
                  refine_settings: refine.RefineSettings | None = None) -> tuple[dict, dict]:
  """Relative output error of each W4A4 method in ``methods``.

  ``refine_settings``: the learned refinement of the "+ refinement" methods (default: 200 steps).

  Returns:
    ``(errors {method: float}, details)``; ``details`` has the chosen (α, β) pairs, the alternating
    iterations, the SVDQuant + alternating layer (for the spectra) and the PTQ seconds of the
    search (``ptq_s``) and of each refinement when computed.
  """
  unknown = set(methods) - set(W4A4_METHODS)
  if unknown:
    raise qz.QuantizationError(f"unknown methods {sorted(unknown)}; expected some of {W4A4_METHODS}")
  grid = smooth.alpha_beta_grid() if grid is None else tuple(grid)
  x, w = layer.x, layer.kernel
  k = w.shape[0]
  ones = jnp.ones((k,), jnp.float32)
  errors, details = {}, {}

  def err(weights):
    return relative_error(layer, _forward(layer.x_eval, weights, fmt, 0.0))

  def group(**kwargs):
    return quantize_linear_group([w], None, x, fmt, grid=grid, return_info=True, name="synthetic", **kwargs)

  smooth_lam = None
  if {"Smoothing only", "Smoothing + LoRC"} & set(methods):
    (only,), info = group(rank=0)
    smooth_lam = only.smooth
    details["smoothing only (alpha, beta)"] = _pair(grid[int(info.smooth_index)])
  refine_settings = refine.RefineSettings(steps=200) if refine_settings is None else refine_settings
  svdquant = set(W4A4_METHODS[5:]) & set(methods)
  if svdquant:
    # One pipeline run: the search does not depend on the later stages, iteration 1 of the
    # alternating loop is the one-shot SVDQuant layer, and GPTQ works on the kept residual (as
    # quantize_linear_group(..., gptq=True) does).
    start = time.perf_counter()
    (refined,), info = group(rank=rank, lowrank_iters=lowrank_iters)
    jax.block_until_ready(refined.residual)
    details["ptq_s SVDQuant"] = round(time.perf_counter() - start, 2)
    details["SVDQuant (alpha, beta)"] = _pair(grid[int(info.smooth_index)])
    losses = np.asarray(info.lowrank_losses[0])
    details["alternating iterations (run, best)"] = (int(np.sum(np.isfinite(losses))), int(info.lowrank_best[0]) + 1)
    details["svdquant_layer"] = refined
  for method in methods:
    if method == "RTN":
      errors[method] = err(plain_weights(w))
    elif method == "Smoothing only":
      errors[method] = err(plain_weights(w, None, smooth_lam))
    elif method == "SVD only":
      errors[method] = err(smooth.one_shot_candidate(w, ones, jnp.zeros(w.shape[1]), rank))
    elif method == "LoRC":
      errors[method] = err(_lorc(w, ones, fmt, rank))
    elif method == "Smoothing + LoRC":
      errors[method] = err(_lorc(smooth_lam[:, None] * w, smooth_lam, fmt, rank))
    elif method == "SVDQuant (one-shot)":
      errors[method] = err(smooth.one_shot_candidate(w, refined.smooth, jnp.zeros(w.shape[1]), rank))
    elif method == "SVDQuant + alternating":
      errors[method] = err(refined)
    elif method in ("SVDQuant + GPTQ", "SVDQuant + GPTQ + refinement"):
      if "gptq_layer" not in details:
        hess = gptq.hessian_from_inputs(x, refined.smooth)
        result = gptq.gptq_quantize(refined.residual, hess, fmt)
        if not bool(result.stable):
          raise qz.QuantizationError("synthetic layer: GPTQ Hessian not positive definite after damping retries")
        details["gptq_layer"] = dataclasses.replace(refined, residual_q=result.qweight)
      if method == "SVDQuant + GPTQ":
        errors[method] = err(details["gptq_layer"])
      else:
        errors[method] = err(_timed_refine(details, method, details["gptq_layer"], w, x, fmt, refine_settings))
    elif method == "SVDQuant + refinement":
      errors[method] = err(_timed_refine(details, method, refined, w, x, fmt, refine_settings))
  return errors, details


def _timed_refine(details, method, weights, kernel, x, fmt, settings):
  start = time.perf_counter()
  out, info = _refine(weights, kernel, x, fmt, settings)
  jax.block_until_ready(out.lora_a)
  details[f"ptq_s {method}"] = round(time.perf_counter() - start, 2)
  details[f"{method} accepted"] = bool(info.accepted)
  return out


def evaluate_baselines(layer: SyntheticLayer) -> dict[str, float]:
  """W4A16 (INT4 g64, NF4 g64) and W8A8 RTN errors."""
  w = plain_weights(layer.kernel)
  return {
      "W4A16 INT4 g64": relative_error(layer, _forward(layer.x_eval, w, qz.W4A16_INT4, 0.0)),
      "W4A16 NF4 g64": relative_error(layer, _forward(layer.x_eval, w, qz.W4A16_NF4, 0.0)),
      "W8A8 INT8": relative_error(layer, _forward(layer.x_eval, w, qz.W8A8, 0.0)),
  }


def rank_sweep(layer: SyntheticLayer, fmt: qz.QuantFormat, ranks: Sequence[int] = RANKS, grid: Sequence | None = None,
               lowrank_iters: int = 100, known: Mapping[int, float] | None = None) -> dict[int, float]:
  """SVDQuant (smoothing search at each rank, then ``lowrank_iters`` alternating iterations) per rank.

  ``known``: errors already computed by the same pipeline (e.g. rank 0 = smoothing only), reused.
  """
  grid = smooth.alpha_beta_grid() if grid is None else tuple(grid)
  out = {}
  for r in ranks:
    if known and int(r) in known:
      out[int(r)] = known[int(r)]
      continue
    (layer_q,) = quantize_linear_group([layer.kernel], None, layer.x, fmt, rank=r, grid=grid,
                                       lowrank_iters=lowrank_iters if r else 1, name=f"synthetic rank {r}")
    out[int(r)] = relative_error(layer, _forward(layer.x_eval, layer_q, fmt, 0.0))
  return out


def singular_spectra(kernel: jax.Array, weights: SVDQuantWeights) -> dict[str, np.ndarray]:
  """Singular values (float64, descending) of W, Ŵ = diag(λ) W and R."""
  w = np.asarray(kernel, np.float64)
  lam = np.asarray(weights.smooth, np.float64)
  return {"W": np.linalg.svd(w, compute_uv=False),
          "W_hat": np.linalg.svd(lam[:, None] * w, compute_uv=False),
          "R": np.linalg.svd(np.asarray(weights.residual, np.float64), compute_uv=False)}


@dataclasses.dataclass
class LayerReport:
  """All numbers of one report run."""
  shape: tuple
  seed: int
  outlier_channels: tuple
  rank: int
  w4a4: dict  # format -> {method: error}
  details: dict  # format -> details
  baselines: dict
  sweep: dict  # format -> {rank: error}
  spectra: dict
  sweep_note: str = ""


def run_layer_report(layer: SyntheticLayer, formats: Sequence[str] = ("int4", "nvfp4"), rank: int = 32,
                     ranks: Sequence[int] = RANKS, grid: Sequence | None = None, lowrank_iters: int = 100,
                     sweep_lowrank_iters: int = 100, methods: Sequence[str] = W4A4_METHODS,
                     with_baselines: bool = True, sweep_formats: Sequence[str] | None = None) -> LayerReport:
  """Runs every table for ``layer``; the spectra come from the first format's SVDQuant + alternating.

  ``sweep_formats``: formats of the rank sweep (default: the first of ``formats``).
  """
  bad = [f for f in formats if f not in W4A4_FORMATS]
  if bad:
    raise qz.QuantizationError(f"unknown formats {bad}; expected some of {sorted(W4A4_FORMATS)}")
  sweep_formats = tuple(formats[:1]) if sweep_formats is None else tuple(sweep_formats)
  if set(sweep_formats) - set(formats):
    raise qz.QuantizationError(f"sweep_formats {sweep_formats} must be among formats {tuple(formats)}")
  w4a4, details, sweep = {}, {}, {}
  for name in formats:
    w4a4[name], details[name] = evaluate_w4a4(layer, W4A4_FORMATS[name], rank, grid, lowrank_iters, methods)
    if ranks and name in sweep_formats:
      # Reuse the method table where it ran the same pipeline as the sweep.
      known = {}
      if "Smoothing only" in w4a4[name]:
        known[0] = w4a4[name]["Smoothing only"]
      same = {1: "SVDQuant (one-shot)", lowrank_iters: "SVDQuant + alternating"}.get(sweep_lowrank_iters)
      if same in w4a4[name]:
        known[rank] = w4a4[name][same]
      sweep[name] = rank_sweep(layer, W4A4_FORMATS[name], ranks, grid, sweep_lowrank_iters, known)
  spectra = {}
  for name in formats:
    if "svdquant_layer" in details[name]:
      spectra = singular_spectra(layer.kernel, details[name]["svdquant_layer"])
      break
  baselines = evaluate_baselines(layer) if with_baselines else {}
  note = ("one-shot SVDQuant at each rank" if sweep_lowrank_iters == 1 else
          f"SVDQuant + up to {sweep_lowrank_iters} alternating iterations at each rank")
  return LayerReport(tuple(layer.x.shape) + (layer.kernel.shape[1],), layer.seed, layer.outlier_channels, rank,
                     w4a4, details, baselines, sweep, spectra, note + "; rank 0 = smoothing only")


def _row(cells: Sequence[Any]) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def report_markdown(report: LayerReport, command: str | None = None) -> str:
  """The tables as markdown."""
  rows, k, n = report.shape
  formats = list(report.w4a4)
  lines = [f"Synthetic layer: x [{rows}, {k}] (calibration) + [{rows}, {k}] held out, W [{k}, {n}], "
           f"seed {report.seed}, {len(report.outlier_channels)} outlier input channels (10-100x). "
           "Relative output error ||x W - y_hat||_F / ||x W||_F on the held-out tokens (lower is better).", ""]
  if command:
    lines += ["Command: `" + command + "`", ""]
  if formats:
    lines += [f"W4A4 methods (rank {report.rank}):", "", _row(["method"] + formats),
              _row(["---"] + ["---:"] * len(formats))]
    methods = [m for m in W4A4_METHODS if any(m in report.w4a4[f] for f in formats)]
    for m in methods:
      lines.append(_row([m] + [f"{report.w4a4[f][m]:.4f}" if m in report.w4a4[f] else "" for f in formats]))
    lines.append("")
    for f in formats:
      info = {key: val for key, val in report.details[f].items() if key not in ("svdquant_layer", "gptq_layer")}
      if info:
        lines.append(f"{f}: " + "; ".join(f"{key} = {val}" for key, val in info.items()))
    lines.append("")
  if report.baselines:
    lines += ["Baselines:", "", _row(["method", "error"]), _row(["---", "---:"])]
    lines += [_row([m, f"{e:.4f}"]) for m, e in report.baselines.items()] + [""]
  if report.sweep:
    ranks = sorted({r for s in report.sweep.values() for r in s})
    lines += [f"SVDQuant rank sweep ({report.sweep_note}):", "", _row(["rank"] + list(report.sweep)),
              _row(["---:"] + ["---:"] * len(report.sweep))]
    lines += [_row([r] + [f"{report.sweep[f][r]:.4f}" for f in report.sweep]) for r in ranks] + [""]
  if report.spectra:
    lines += ["Singular values (spectra.png): " + ", ".join(
        f"{name}: s1 {s[0]:.3g}, s{report.rank + 1} {s[min(report.rank, len(s) - 1)]:.3g}"
        for name, s in report.spectra.items()), ""]
  return "\n".join(lines)


def write_report(report: LayerReport, out_dir: str, command: str | None = None) -> dict[str, str]:
  """Writes ``layer_report.md`` and the plots to ``out_dir``; returns the paths.

  Plots (matplotlib, :mod:`svdquant_jax.flows.plots`): ``spectra.png`` when the report has spectra,
  ``rank_sweep.png`` when it has a rank sweep. Keys of the result: ``markdown``, and ``spectra`` /
  ``rank_sweep`` for the plots written.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {"markdown": os.path.join(out_dir, "layer_report.md")}
  text = report_markdown(report, command)
  if report.spectra:
    paths["spectra"] = os.path.join(out_dir, "spectra.png")
    plots.plot_spectra(report.spectra, paths["spectra"], rank=report.rank)
    text += "\n![singular values](spectra.png)\n"
  if report.sweep:
    paths["rank_sweep"] = os.path.join(out_dir, "rank_sweep.png")
    plots.plot_rank_sweep(report.sweep, paths["rank_sweep"], note=report.sweep_note)
    text += "\n![rank sweep](rank_sweep.png)\n"
  atomic_write_text(paths["markdown"], text)
  return paths


def make_and_write_report(out_dir: str, seed: int = 0, rows: int = 512, k: int = 256, n: int = 768,
                          formats: Sequence[str] = ("int4", "nvfp4"), rank: int = 32, lowrank_iters: int = 100,
                          num_grids: int = 20, ranks: Sequence[int] = RANKS, sweep_lowrank_iters: int = 1,
                          sweep_all_formats: bool = False, command: str | None = None,
                          ) -> tuple[LayerReport, dict[str, str]]:
  """The whole command-line report: builds the seeded synthetic layer, runs every table
  (:func:`run_layer_report`, smoothing grid ``smooth.alpha_beta_grid(num_grids)``; the rank sweep
  for the first format, or for every format with ``sweep_all_formats``) and writes it
  (:func:`write_report`). Returns ``(report, paths)``.
  """
  formats = tuple(formats)
  layer = make_synthetic_layer(seed, rows, k, n)
  report = run_layer_report(layer, formats=formats, rank=rank, ranks=tuple(int(r) for r in ranks),
                            grid=smooth.alpha_beta_grid(num_grids), lowrank_iters=lowrank_iters,
                            sweep_lowrank_iters=sweep_lowrank_iters,
                            sweep_formats=formats if sweep_all_formats else formats[:1])
  return report, write_report(report, out_dir, command)


__all__ = ["W4A4_METHODS", "BASELINES", "RANKS", "SyntheticLayer", "make_synthetic_layer", "relative_error",
           "evaluate_w4a4", "evaluate_baselines", "rank_sweep", "singular_spectra", "LayerReport",
           "run_layer_report", "report_markdown", "write_report", "make_and_write_report"]
