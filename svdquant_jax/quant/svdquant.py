"""SVDQuant for one group of linear layers that share an input: the whole-layer entry point.

:func:`quantize_linear_group` runs the pipeline for the layers that read one input: smoothing
search (``smooth.py``) -> low-rank branch with alternating refinement (``lowrank.py``) ->
optional GPTQ on the residual (``gptq.py``). The float form it returns and the fake-quantized
forward live in ``weights.py`` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats.quantizers import GELU_SHIFT, QuantFormat, QuantizationError
from svdquant_jax.quant import gptq as gptq_lib
from svdquant_jax.quant import lowrank as lowrank_lib
from svdquant_jax.quant import smooth as smooth_lib
from svdquant_jax.quant.weights import (PRECISION, SVDQuantWeights, act_shift, as_traceable_loss, effective_bias,
                                        fake_forward, plain_weights, quantized_residual, to_lora_down)

Array = jax.Array


# ----------------------------------------------------------------------------- whole-layer entry point
@dataclasses.dataclass(frozen=True, eq=False)
class GroupQuantInfo:
  """Diagnostics of :func:`quantize_linear_group` (a pytree of arrays).

  Attributes:
    smooth_index: ``int32 []`` index of the chosen (α, β) pair in the grid (-1: no smoothing).
    smooth_losses: ``[P]`` loss of every grid pair (empty without smoothing).
    lowrank_losses: per kernel, ``[lowrank_iters]`` loss of each alternating iteration (NaN for
      iterations not run after an early stop).
    lowrank_best: per kernel, ``int32 []`` index of the kept iteration (0 = plain SVDQuant).
    gptq_inv_tries: per kernel, ``int32 []`` Cholesky attempts GPTQ needed (0 without GPTQ).
    gptq_stable: per kernel, ``bool []`` whether the damped Hessian inverse succeeded.
  """
  smooth_index: Array
  smooth_losses: Array
  lowrank_losses: tuple
  lowrank_best: tuple
  gptq_inv_tries: tuple
  gptq_stable: tuple


jax.tree_util.register_dataclass(
    GroupQuantInfo, data_fields=["smooth_index", "smooth_losses", "lowrank_losses", "lowrank_best",
                                 "gptq_inv_tries", "gptq_stable"], meta_fields=[])


@dataclasses.dataclass(frozen=True, eq=False)
class _OneLayerLoss:
  """Adapts a group loss to one layer: the other layers of the group stay in full precision."""
  group_loss: Callable
  index: int
  count: int

  def __call__(self, candidate: SVDQuantWeights) -> Array:
    candidates = [None] * self.count
    candidates[self.index] = candidate
    return self.group_loss(candidates)


jax.tree_util.register_dataclass(_OneLayerLoss, data_fields=["group_loss"], meta_fields=["index", "count"])

_STATIC = ("fmt", "rank", "smooth", "grid", "lowrank_iters", "early_stop", "gptq", "shifts",
           "candidate_batch", "svd_iters", "oversample", "gptq_block_size", "gptq_damp",
           "hessian_block_rows")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _quantize_group_core(kernels, biases, x_samples, loss_fn, gptq_inputs, *, fmt, rank, smooth, grid,
                         lowrank_iters, early_stop, gptq, shifts, candidate_batch, svd_iters, oversample,
                         gptq_block_size, gptq_damp, hessian_block_rows):
  k = kernels[0].shape[0]
  x = x_samples.reshape(-1, k).astype(jnp.float32)
  kernels = [w.astype(jnp.float32) for w in kernels]
  biases = [b.astype(jnp.float32) for b in biases]
  if loss_fn is None:
    loss_fn = smooth_lib.linear_output_loss(x, kernels, biases, fmt, shifts)
  if smooth:
    found = smooth_lib.search_smoothing(
        kernels, smooth_lib.activation_absmax(x), loss_fn, fmt, biases=biases, rank=rank, grid=grid,
        candidate_batch=candidate_batch, svd_iters=svd_iters, oversample=oversample)
    lam, smooth_index, smooth_losses = found.smooth, found.index, found.losses
  else:
    lam = jnp.ones((k,), jnp.float32)
    smooth_index, smooth_losses = jnp.asarray(-1, jnp.int32), jnp.zeros((0,), jnp.float32)

  layers, lr_losses, lr_best = [], [], []
  for i, (w, b) in enumerate(zip(kernels, biases)):
    w_hat = lam[:, None] * w
    if rank:
      result = lowrank_lib.alternating_lowrank(
          w_hat, rank, fmt, _OneLayerLoss(loss_fn, i, len(kernels)), lowrank_iters, early_stop,
          smooth=lam, bias=b, svd_iters=svd_iters, oversample=oversample)
      layers.append(SVDQuantWeights(lam, result.residual, result.lora_a, result.lora_b, b))
      lr_losses.append(result.losses)
      lr_best.append(result.best_iter)
    else:
      layers.append(plain_weights(w, b, lam))
      lr_losses.append(jnp.zeros((0,), jnp.float32))
      lr_best.append(jnp.asarray(0, jnp.int32))

  tries = [jnp.asarray(0, jnp.int32)] * len(layers)
  stable = [jnp.asarray(True)] * len(layers)
  if gptq:
    shared = None if gptq_inputs is not None else gptq_lib.hessian_from_inputs(x, lam, block_rows=hessian_block_rows)
    for i, layer in enumerate(layers):
      hess = shared if shared is not None else gptq_lib.hessian_from_inputs(
          gptq_inputs[i], lam, block_rows=hessian_block_rows)
      res = gptq_lib.gptq_quantize(layer.residual, hess, fmt, block_size=gptq_block_size, damp=gptq_damp)
      layers[i] = dataclasses.replace(layer, residual_q=res.qweight)
      tries[i], stable[i] = res.inv_tries, res.stable
  info = GroupQuantInfo(smooth_index, smooth_losses, tuple(lr_losses), tuple(lr_best), tuple(tries), tuple(stable))
  return layers, info


try:
  _Tracer = jax.core.Tracer
except AttributeError:  # jax versions that no longer re-export it
  from jax._src.core import Tracer as _Tracer


def _is_concrete(*trees) -> bool:
  return not any(isinstance(leaf, _Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def validate_group_inputs(kernels: Sequence[Array], biases: Sequence[Array | None] | None, x_samples: Array,
                          fmt: QuantFormat, *, rank: int = 32, lowrank_iters: int = 100,
                          shifts: Sequence[float] | None = None, name: str = "linear",
                          batch_dims: int = 0,
                          check_values: bool = True) -> tuple[list[Array | None], tuple[float, ...]]:
  """Checks the inputs of :func:`quantize_linear_group`; raises :class:`QuantizationError` naming
  ``name``.

  Shapes, group divisibility and ranks are always checked; NaN/Inf in ``x_samples`` and the
  kernels only when the arrays are concrete (under a caller's ``jit``/``vmap`` they are tracers:
  use :func:`quantize_linear_groups` or call this on the concrete arrays first).

  Returns:
    ``(biases, shifts)`` normalized to one entry per kernel.
  """
  if not kernels:
    raise QuantizationError(f"{name}: kernels is empty")
  lead = tuple(np.shape(kernels[0])[:batch_dims])
  shapes = [tuple(np.shape(w)) for w in kernels]
  if any(len(s) != 2 + batch_dims or s[:batch_dims] != lead for s in shapes):
    raise QuantizationError(f"{name}: kernels must be [{'G, ' * batch_dims}K, N] with one leading shape, got {shapes}")
  k = shapes[0][batch_dims]
  if any(s[batch_dims] != k for s in shapes):
    raise QuantizationError(f"{name}: kernels sharing one input must have the same K, got {shapes}")
  x_shape = tuple(np.shape(x_samples))
  if len(x_shape) < 2 + batch_dims or x_shape[:batch_dims] != lead or x_shape[-1] != k:
    raise QuantizationError(f"{name}: x_samples must be [{'G, ' * batch_dims}..., K={k}], got {x_shape}")
  fmt.check_k(k, f"{name}")
  if biases is None:
    biases = [None] * len(kernels)
  if len(biases) != len(kernels):
    raise QuantizationError(f"{name}: {len(biases)} biases for {len(kernels)} kernels")
  for i, (b, s) in enumerate(zip(biases, shapes)):
    if b is not None and tuple(np.shape(b)) != lead + (s[-1],):
      raise QuantizationError(f"{name}: bias {i} has shape {np.shape(b)}, expected {lead + (s[-1],)}")
  shifts = tuple(float(s) for s in (shifts if shifts is not None else [0.0] * len(kernels)))
  if len(shifts) != len(kernels):
    raise QuantizationError(f"{name}: {len(shifts)} shifts for {len(kernels)} kernels")
  if rank < 0 or rank > min(min(k, s[-1]) for s in shapes):
    raise QuantizationError(f"{name}: rank {rank} must be in [0, min(K, N)] for kernels {shapes}")
  if rank and lowrank_iters < 1:
    raise QuantizationError(f"{name}: lowrank_iters must be >= 1 (1 = one-shot SVD), got {lowrank_iters}")
  if check_values and _is_concrete(x_samples, kernels):
    if not bool(jnp.all(jnp.isfinite(x_samples))):
      raise QuantizationError(f"{name}: x_samples contains NaN or Inf")
    for i, w in enumerate(kernels):
      if not bool(jnp.all(jnp.isfinite(w))):
        raise QuantizationError(f"{name}: kernel {i} contains NaN or Inf")
  return list(biases), shifts


def _zero_biases(kernels, biases, batch_dims=0):
  return [jnp.zeros(np.shape(w)[:batch_dims] + (np.shape(w)[-1],), jnp.float32) if b is None else b
          for w, b in zip(kernels, biases)]


def quantize_linear_group(kernels: Sequence[Array], biases: Sequence[Array | None] | None, x_samples: Array,
                          fmt: QuantFormat, rank: int = 32, smooth: bool = True,
                          grid: Sequence[tuple[float, float]] | None = None, lowrank_iters: int = 100,
                          early_stop: bool = True, gptq: bool = False, shifts: Sequence[float] | None = None,
                          loss_fn: Callable | None = None, name: str = "linear", candidate_batch: int = 1,
                          svd_iters: int | None = None, oversample: int | None = None,
                          gptq_block_size: int = 128, gptq_damp: float = 0.01, hessian_block_rows: int = 512,
                          gptq_inputs: Sequence[Array] | None = None, return_info: bool = False):
  """SVDQuant for the linear layers that read one input (one λ, one branch per kernel).

  Smoothing search over ``grid`` (§1.2) -> per kernel, low-rank branch by alternating refinement
  (§1.3; ``lowrank_iters=1`` is one-shot SVDQuant) -> optionally GPTQ on each residual (§1.6).
  Jitted once per shapes and static settings; vmappable over a leading axis of same-shaped groups
  (see :func:`quantize_linear_groups`).

  Args:
    kernels: ``[K, N_i]`` kernels sharing the input (e.g. FLUX single block ``to_qkv`` and
      ``proj_mlp``).
    biases: ``[N_i]`` biases or ``None`` entries (or ``None``: no biases).
    x_samples: calibration inputs ``[..., K]`` (tokens of all samples).
    fmt: quantization format.
    rank: branch rank r (0: no branch).
    smooth: search λ over ``grid``; False: λ = 1.
    grid: (α, β) pairs (default :func:`~svdquant_jax.quant.smooth.alpha_beta_grid` ``(20)``, 39 pairs).
    lowrank_iters: alternating iterations (deepcompressor: 100 with early stop).
    early_stop: stop at the first iteration whose loss exceeds the best.
    gptq: quantize the residuals with GPTQ (Hessian of the smoothed ``x_samples``).
    shifts: per kernel δ for the default loss (GELU_SHIFT for fc2 inputs, INT4 only).
    loss_fn: ``loss_fn(candidates: list[SVDQuantWeights | None]) -> scalar``, the squared output
      error of the enclosing module; a ``None`` entry means that layer stays in full precision.
      Default: :func:`~svdquant_jax.quant.smooth.linear_output_loss` of these layers. Pass a pytree
      callable (see :func:`as_traceable_loss`) to keep one compilation across calls.
    name: layer name for error messages.
    candidate_batch: smoothing candidates evaluated together (memory vs. parallelism).
    svd_iters, oversample: low-rank SVD settings (see :func:`~svdquant_jax.quant.lowrank.svd_lowrank`).
    gptq_block_size, gptq_damp, hessian_block_rows: GPTQ settings (128, 0.01, 512 as deepcompressor).
    gptq_inputs: per kernel ``[..., K]`` inputs for its GPTQ Hessian, for groups whose layers share λ
      but read different tensors (FLUX ``to_out`` / ``to_add_out``); default: ``x_samples`` for all.
    return_info: also return :class:`GroupQuantInfo`.

  Returns:
    ``list[SVDQuantWeights]`` (one per kernel), and the info if ``return_info``.

  Raises:
    QuantizationError: bad shapes, K not divisible by the group size, NaN/Inf inputs, or (GPTQ)
      a Hessian that stays singular after all damping retries, naming ``name``.
  """
  biases, shifts = validate_group_inputs(kernels, biases, x_samples, fmt, rank=rank, lowrank_iters=lowrank_iters,
                                         shifts=shifts, name=name)
  grid = tuple(tuple(float(v) for v in p) for p in (grid if grid is not None else smooth_lib.alpha_beta_grid()))
  if gptq_inputs is not None:
    gptq_inputs = list(gptq_inputs)
    k = np.shape(kernels[0])[0]
    if len(gptq_inputs) != len(kernels) or any(np.shape(g)[-1] != k for g in gptq_inputs):
      raise QuantizationError(f"{name}: gptq_inputs must be one [..., K={k}] array per kernel")
    if _is_concrete(gptq_inputs) and not all(bool(jnp.all(jnp.isfinite(g))) for g in gptq_inputs):
      raise QuantizationError(f"{name}: gptq_inputs contains NaN or Inf")
  layers, info = _quantize_group_core(
      list(kernels), _zero_biases(kernels, biases), x_samples,
      None if loss_fn is None else as_traceable_loss(loss_fn), gptq_inputs, fmt=fmt, rank=rank, smooth=smooth,
      grid=grid, lowrank_iters=lowrank_iters, early_stop=early_stop, gptq=gptq, shifts=shifts,
      candidate_batch=candidate_batch, svd_iters=svd_iters or lowrank_lib.DEFAULT_SVD_ITERS,
      oversample=oversample, gptq_block_size=gptq_block_size, gptq_damp=gptq_damp,
      hessian_block_rows=hessian_block_rows)
  if gptq and _is_concrete(info):
    bad = [i for i, ok in enumerate(info.gptq_stable) if not bool(ok)]
    if bad:
      raise QuantizationError(f"{name}: GPTQ Hessian not positive definite after damping retries for kernels {bad}")
  return (layers, info) if return_info else layers


def quantize_linear_groups(kernels: Sequence[Array], biases: Sequence[Array | None] | None, x_samples: Array,
                           fmt: QuantFormat, names: Sequence[str] | None = None, **kwargs):
  """:func:`quantize_linear_group` over a leading axis of G same-shaped groups, as one ``vmap``.

  Args:
    kernels: ``[G, K, N_i]`` per kernel; ``biases``: ``[G, N_i]`` or ``None`` entries.
    x_samples: ``[G, ..., K]``.
    names: G layer names for error messages (default ``group_<g>``).
    **kwargs: as :func:`quantize_linear_group` (``loss_fn`` leaves carry the leading axis too).

  Returns:
    ``list[SVDQuantWeights]`` whose arrays carry the leading axis G (and the info if requested).
  """
  g = np.shape(kernels[0])[0]
  names = list(names) if names is not None else [f"group_{i}" for i in range(g)]
  if len(names) != g:
    raise QuantizationError(f"{len(names)} names for {g} groups")
  check = {k: kwargs[k] for k in ("rank", "lowrank_iters", "shifts") if k in kwargs}
  biases, _ = validate_group_inputs(kernels, biases, x_samples, fmt, name=names[0], batch_dims=1,
                                    check_values=False, **check)
  if _is_concrete(x_samples, kernels):
    finite_x = np.asarray(jnp.all(jnp.isfinite(x_samples.reshape(g, -1)), axis=1))
    finite_w = np.all([np.asarray(jnp.all(jnp.isfinite(w.reshape(g, -1)), axis=1)) for w in kernels], axis=0)
    for i in range(g):
      if not finite_x[i]:
        raise QuantizationError(f"{names[i]}: x_samples contains NaN or Inf")
      if not finite_w[i]:
        raise QuantizationError(f"{names[i]}: a kernel contains NaN or Inf")
  biases = _zero_biases(kernels, biases, batch_dims=1)
  return_info = kwargs.pop("return_info", False)
  loss_fn = kwargs.pop("loss_fn", None)

  def one(ks, bs, x, lf):
    return quantize_linear_group(ks, bs, x, fmt, loss_fn=lf, return_info=True, name=names[0], **kwargs)

  layers, info = jax.vmap(one)(list(kernels), biases, x_samples, loss_fn)
  if kwargs.get("gptq") and _is_concrete(info):
    stable = np.all([np.asarray(s) for s in info.gptq_stable], axis=0)
    for i in range(g):
      if not stable[i]:
        raise QuantizationError(f"{names[i]}: GPTQ Hessian not positive definite after damping retries")
  return (layers, info) if return_info else layers


__all__ = [
    "GELU_SHIFT", "PRECISION", "SVDQuantWeights", "GroupQuantInfo", "plain_weights", "act_shift",
    "quantized_residual", "effective_bias", "to_lora_down", "fake_forward", "as_traceable_loss",
    "validate_group_inputs", "quantize_linear_group", "quantize_linear_groups",
]
