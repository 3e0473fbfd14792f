"""Smoothing: the per-input-channel divisor λ, its (α, β) grid search, and the linear-level loss.

``λ_j = max|X_j|^α / max|W_j,:|^β`` moves activation outliers into the weights (x̂ = x / λ,
Ŵ = diag(λ) W); the low-rank branch then absorbs the weight outliers. As deepcompressor (spec §1.2):

  * spans: absmax of the activations per input channel over all calibration tokens, and absmax of
    the weights per input channel over the concatenated output channels of every layer that reads
    the input (``w_absmax`` runs over axis 1 of each ``[K, N_i]`` kernel). For a shifted (fc2)
    input the activation span is that of ``x + δ``, the tensor λ divides
    (:func:`activation_absmax` with ``shifts``);
  * ``α = 0`` gives ``w_absmax^-β``; zero entries of λ become 1; a non-finite λ becomes all ones
    (deepcompressor asserts instead; inside a jitted search we cannot raise, and ones is the
    (0, 0) candidate, which is always in the grid);
  * grid (``alpha 0.5, beta -2, num_grids 20``): ``[(0, 0)] + [(a, 0)] + [(a, 1 - a)]`` for
    ``a = i / num_grids``, i = 1 .. num_grids - 1: 39 pairs (19 for num_grids 10);
  * each candidate is scored with one-shot SVDQuant applied (rank-r SVD of every Ŵ_i, RTN of the
    residual, activation quantization) by the caller's loss, the squared output error of the
    enclosing module; the minimum wins, ties going to the later pair (deepcompressor's ``<=``).
    With a shared branch (``shared_branch=True``, deepcompressor's ``exclusive: false``) the
    candidates carry the branch structure that is deployed: one rank-r SVD of the concatenation
    ``[Ŵ_1 | ... | Ŵ_n]``, split by columns (:func:`shared_one_shot_candidates`).

The search evaluates ``candidate_batch`` candidates at a time with ``lax.map`` (a sequential loop
of vmapped chunks) so that memory stays that of ``candidate_batch`` candidates at FLUX size, and
compiles once per shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from svdquant_jax.quant.lowrank import DEFAULT_SVD_ITERS, split_columns, svd_lowrank
from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError
from svdquant_jax.quant.weights import PRECISION, SVDQuantWeights, as_traceable_loss, fake_forward

Array = jax.Array


def alpha_beta_grid(num_grids: int = 20) -> tuple[tuple[float, float], ...]:
  """deepcompressor's grid for ``alpha=0.5, beta=-2``: ``2 (num_grids - 1) + 1`` (α, β) pairs."""
  if num_grids < 2:
    raise QuantizationError(f"num_grids must be >= 2, got {num_grids}")
  choices = [i / num_grids for i in range(1, num_grids)]
  return ((0.0, 0.0),) + tuple((a, 0.0) for a in choices) + tuple((a, 1.0 - a) for a in choices)


def activation_absmax(x: Array, shifts: Sequence[float] = ()) -> Array:
  """``max |x + δ|`` per input channel over all tokens: ``[..., K] -> [K]`` float32.

  ``shifts``: the activation shifts δ of the layers reading ``x`` (their quantized path divides
  ``x + δ`` by λ); the span is the largest over the distinct shifts (no shifts, or all 0: ``max |x|``).
  """
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  deltas = sorted({float(d) for d in shifts}) or [0.0]
  return jnp.max(jnp.stack([jnp.max(jnp.abs(rows + jnp.float32(d) if d else rows), axis=0) for d in deltas]),
                 axis=0)


def weight_absmax(kernels: Sequence[Array]) -> Array:
  """``max |W|`` per input channel over the output channels of all kernels: ``[K]`` float32."""
  return jnp.max(jnp.stack([jnp.max(jnp.abs(w.astype(jnp.float32)), axis=1) for w in kernels]), axis=0)


def smooth_scale(x_absmax: Array, w_absmax: Array, alpha: Any, beta: Any) -> Array:
  """``λ = x_absmax^α / w_absmax^β`` ``[K]`` (α, β may be traced scalars).

  ``α = 0`` gives ``w_absmax^-β`` (``0^0 = 1``, so one formula covers it); zeros -> 1; any
  non-finite entry -> all ones.
  """
  x_absmax = x_absmax.astype(jnp.float32)
  w_absmax = w_absmax.astype(jnp.float32)
  lam = jnp.power(x_absmax, alpha) / jnp.power(w_absmax, beta)
  lam = jnp.where(lam == 0, 1.0, lam)
  return jnp.where(jnp.all(jnp.isfinite(lam)), lam, jnp.ones_like(lam))


def one_shot_candidate(kernel: Array, smooth: Array, bias: Array, rank: int, svd_iters: int = DEFAULT_SVD_ITERS,
                       oversample: int | None = None, precision: Any = PRECISION) -> SVDQuantWeights:
  """Plain SVDQuant of one kernel for a given λ: ``A B = SVD_r(Ŵ)``, ``R = Ŵ - A B``."""
  w_hat = smooth[:, None] * kernel.astype(jnp.float32)
  a, b = svd_lowrank(w_hat, rank, svd_iters, oversample, precision)
  return SVDQuantWeights(smooth, w_hat - jnp.dot(a, b, precision=precision), a, b, bias)


def shared_one_shot_candidates(kernels: Sequence[Array], smooth: Array, biases: Sequence[Array], rank: int,
                               svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None,
                               precision: Any = PRECISION) -> list[SVDQuantWeights]:
  """Plain SVDQuant of kernels sharing one branch: ``A B = SVD_r([Ŵ_1 | ... | Ŵ_n])``; each layer
  gets the common ``A``, its columns of ``B`` and ``R_i = Ŵ_i - A B_i``."""
  w_hat = jnp.concatenate([smooth[:, None] * w.astype(jnp.float32) for w in kernels], axis=1)
  a, b = svd_lowrank(w_hat, rank, svd_iters, oversample, precision)
  whole = SVDQuantWeights(smooth, w_hat - jnp.dot(a, b, precision=precision), a, b,
                          jnp.concatenate([jnp.asarray(bias, jnp.float32) for bias in biases]))
  return split_columns(whole, [w.shape[1] for w in kernels])


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothingResult:
  """Result of :func:`search_smoothing` (a pytree).

  Attributes:
    smooth: the chosen λ ``[K]``.
    index: ``int32 []`` index of the chosen pair in the grid.
    losses: ``[P]`` loss of every pair.
  """
  smooth: Array
  index: Array
  losses: Array


jax.tree_util.register_dataclass(SmoothingResult, data_fields=["smooth", "index", "losses"], meta_fields=[])


def search_smoothing(kernels: Sequence[Array], x_absmax: Array, loss_fn: Callable, fmt: QuantFormat, *,
                     biases: Sequence[Array] | None = None, rank: int = 32,
                     grid: Sequence[tuple[float, float]] | None = None, candidate_batch: int = 1,
                     svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None,
                     shared_branch: bool = False, precision: Any = PRECISION) -> SmoothingResult:
  """Grid search of λ for the kernels sharing one input (spec §1.2).

  Args:
    kernels: ``[K, N_i]`` (unsmoothed) kernels.
    x_absmax: ``[K]`` activation absmax (:func:`activation_absmax`).
    loss_fn: ``loss_fn(candidates: list[SVDQuantWeights]) -> scalar`` (one candidate per kernel,
      in order), e.g. :func:`linear_output_loss`; a pytree callable keeps one compilation.
    fmt: quantization format (used for the candidates' residuals by the loss).
    biases: ``[N_i]`` (default zeros).
    rank: branch rank of the candidates (0: smoothing only).
    grid: (α, β) pairs (default :func:`alpha_beta_grid` ``(20)``).
    candidate_batch: candidates evaluated together.
    svd_iters, oversample, precision: SVD settings.
    shared_branch: score each candidate with one branch shared by all kernels
      (:func:`shared_one_shot_candidates`) instead of one branch per kernel.

  Returns:
    :class:`SmoothingResult`.
  """
  if not kernels:
    raise QuantizationError("search_smoothing: kernels is empty")
  biases = [jnp.zeros((w.shape[1],), jnp.float32) for w in kernels] if biases is None else list(biases)
  grid = alpha_beta_grid() if grid is None else tuple(tuple(float(v) for v in p) for p in grid)
  if candidate_batch < 1:
    raise QuantizationError(f"candidate_batch must be >= 1, got {candidate_batch}")
  return _search_smoothing(list(kernels), x_absmax, as_traceable_loss(loss_fn), biases, fmt=fmt, rank=rank,
                           grid=grid, candidate_batch=candidate_batch, svd_iters=svd_iters,
                           oversample=oversample, shared_branch=bool(shared_branch and rank and len(kernels) > 1),
                           precision=precision)


@functools.partial(jax.jit, static_argnames=("fmt", "rank", "grid", "candidate_batch", "svd_iters", "oversample",
                                             "shared_branch", "precision"))
def _search_smoothing(kernels, x_absmax, loss_fn, biases, *, fmt, rank, grid, candidate_batch, svd_iters,
                      oversample, shared_branch, precision) -> SmoothingResult:
  del fmt  # the loss quantizes; kept static so that a format change recompiles explicitly
  w_absmax = weight_absmax(kernels)
  pairs = jnp.asarray(grid, jnp.float32)

  def evaluate(pair):
    lam = smooth_scale(x_absmax, w_absmax, pair[0], pair[1])
    if shared_branch:
      candidates = shared_one_shot_candidates(kernels, lam, biases, rank, svd_iters, oversample, precision)
    else:
      candidates = [one_shot_candidate(w, lam, b, rank, svd_iters, oversample, precision)
                    for w, b in zip(kernels, biases)]
    return jnp.asarray(loss_fn(candidates), jnp.float32)

  losses = jax.lax.map(evaluate, pairs, batch_size=candidate_batch if candidate_batch > 1 else None)
  finite = jnp.where(jnp.isnan(losses), jnp.inf, losses)
  # The last minimum (deepcompressor keeps a candidate whose error is <= the best).
  index = (len(grid) - 1 - jnp.argmin(finite[::-1])).astype(jnp.int32)
  lam = smooth_scale(x_absmax, w_absmax, pairs[index, 0], pairs[index, 1])
  return SmoothingResult(lam, index, losses)


# ----------------------------------------------------------------------------- linear-level loss
@dataclasses.dataclass(frozen=True, eq=False)
class LinearOutputLoss:
  """Squared output error of a group of linears sharing one input (a pytree callable).

  ``loss(candidates) = Σ_i ||x W_i + b_i - fake_forward(x, candidate_i)||²`` over the entries
  that are not ``None`` (a ``None`` layer is exact). The reference outputs are computed once, at
  construction.

  Attributes:
    x: ``[T, K]`` float32 calibration inputs.
    targets: per layer ``[T, N_i]`` float32 reference outputs.
    fmt: quantization format (static).
    shifts: per layer δ (static).
    precision: matmul precision (static).
  """
  x: Array
  targets: tuple
  fmt: QuantFormat
  shifts: tuple
  precision: Any = PRECISION

  def __call__(self, candidates: Sequence[SVDQuantWeights | None]) -> Array:
    if len(candidates) != len(self.targets):
      raise QuantizationError(f"LinearOutputLoss: {len(candidates)} candidates for {len(self.targets)} layers")
    total = jnp.zeros((), jnp.float32)
    for cand, target, shift in zip(candidates, self.targets, self.shifts):
      if cand is not None:
        err = target - fake_forward(self.x, cand, self.fmt, shift, self.precision)
        total = total + jnp.sum(err * err)
    return total


jax.tree_util.register_dataclass(LinearOutputLoss, data_fields=["x", "targets"],
                                 meta_fields=["fmt", "shifts", "precision"])


def linear_output_loss(x_samples: Array, kernels: Sequence[Array], biases: Sequence[Array | None] | None,
                       fmt: QuantFormat, shifts: Sequence[float] | None = None,
                       precision: Any = PRECISION) -> LinearOutputLoss:
  """The linear-level loss (granularity ``Layer``) for kernels sharing the input ``x_samples [..., K]``."""
  k = kernels[0].shape[0]
  x = x_samples.reshape(-1, k).astype(jnp.float32)
  biases = [None] * len(kernels) if biases is None else biases
  shifts = tuple(float(s) for s in (shifts if shifts is not None else [0.0] * len(kernels)))
  targets = []
  for w, b in zip(kernels, biases):
    y = jnp.dot(x, w.astype(jnp.float32), precision=precision)
    targets.append(y if b is None else y + b.astype(jnp.float32))
  return LinearOutputLoss(x, tuple(targets), fmt, shifts, precision)


__all__ = ["alpha_beta_grid", "activation_absmax", "weight_absmax", "smooth_scale", "one_shot_candidate",
           "shared_one_shot_candidates", "SmoothingResult", "search_smoothing", "LinearOutputLoss", "linear_output_loss"]
