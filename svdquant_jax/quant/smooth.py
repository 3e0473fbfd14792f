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

Cheaper searches (off by default; ``docs/benchmarks.md``, "PTQ search cost cuts"):

  * ``loss_dtype="bfloat16"`` (:func:`with_loss_dtype`): the loss's token-sized matmuls run with
    bfloat16 operands and float32 accumulation (:func:`loss_forward`); the reference outputs, the
    SVDs and the chosen candidate's quantities stay float32 ``HIGHEST``;
  * successive halving (``halving_tokens > 0``, :func:`halving_schedule`): every candidate is scored
    on a seeded subset of ``halving_tokens`` tokens, the best ``halving_keep`` fraction is kept and
    rescored on ``1 / halving_keep`` times more tokens (nested prefixes of one seeded permutation),
    until one remains. The SVD factors of round 1 are kept (``[P, K, r]``, small), so no SVD is
    repeated. It needs a loss with ``take_tokens`` (:class:`LinearOutputLoss` has it); otherwise,
    or when the subset would hold every token, the exhaustive search runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from svdquant_jax.quant.lowrank import DEFAULT_SVD_ITERS, split_columns, svd_lowrank
from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError, fake_quant_act, true_divide
from svdquant_jax.formats.rotation import rotate_inputs
from svdquant_jax.quant.weights import (PRECISION, SVDQuantWeights, act_shift, as_traceable_loss, fake_forward,
                                        quantized_residual, shift_compensation)

Array = jax.Array
LOSS_DTYPES = ("float32", "bfloat16")


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
                     shared_branch: bool = False, precision: Any = PRECISION, halving_tokens: int = 0,
                     halving_keep: float = 0.5, halving_seed: int = 0) -> SmoothingResult:
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
    halving_tokens: successive halving from this many tokens (0: off, the exhaustive search; see
      :func:`halving_schedule`). Needs a loss with ``num_tokens`` and ``take_tokens``
      (:class:`LinearOutputLoss`); with another loss, or ``halving_tokens >= num_tokens``, the
      exhaustive search runs.
    halving_keep: fraction of the candidates kept after each round, in (0, 1).
    halving_seed: seed of the token permutation whose prefixes are the rounds' subsets.

  Returns:
    :class:`SmoothingResult`. With successive halving, ``losses`` holds each candidate's loss in
    the last round it was scored, scaled by ``num_tokens / tokens`` of that round (an estimate of
    its full loss).
  """
  if not kernels:
    raise QuantizationError("search_smoothing: kernels is empty")
  biases = [jnp.zeros((w.shape[1],), jnp.float32) for w in kernels] if biases is None else list(biases)
  grid = alpha_beta_grid() if grid is None else tuple(tuple(float(v) for v in p) for p in grid)
  if candidate_batch < 1:
    raise QuantizationError(f"candidate_batch must be >= 1, got {candidate_batch}")
  loss_fn = as_traceable_loss(loss_fn)
  shared_branch = bool(shared_branch and rank and len(kernels) > 1)
  if halving_tokens < 0 or (halving_tokens and not 0.0 < halving_keep < 1.0):
    raise QuantizationError(f"successive halving needs halving_tokens >= 0 and 0 < halving_keep < 1, got "
                            f"{halving_tokens}, {halving_keep}")
  total = getattr(loss_fn, "num_tokens", None) if hasattr(loss_fn, "take_tokens") else None
  if halving_tokens and total is not None and halving_tokens < total and len(grid) > 1:
    return _search_smoothing_halving(
        list(kernels), x_absmax, loss_fn, biases, fmt=fmt, rank=rank, grid=grid, candidate_batch=candidate_batch,
        svd_iters=svd_iters, oversample=oversample, shared_branch=shared_branch, precision=precision,
        schedule=halving_schedule(len(grid), int(total), halving_tokens, halving_keep), seed=int(halving_seed))
  return _search_smoothing(list(kernels), x_absmax, loss_fn, biases, fmt=fmt, rank=rank,
                           grid=grid, candidate_batch=candidate_batch, svd_iters=svd_iters,
                           oversample=oversample, shared_branch=shared_branch, precision=precision)


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


def halving_schedule(num_candidates: int, num_tokens: int, initial_tokens: int,
                     keep: float = 0.5) -> tuple[tuple[int, int], ...]:
  """The rounds of successive halving: ``((candidates, tokens), ...)``, static.

  Round 1 scores all ``num_candidates`` on ``min(initial_tokens, num_tokens)`` tokens; each next
  round keeps ``ceil(keep x candidates)`` (at least one fewer) and scores them on
  ``ceil(tokens / keep)`` tokens (at most ``num_tokens``). The best of the last round wins.
  E.g. 39 candidates from 4096 of 131072 tokens, keep 0.5:
  ``(39, 4096), (20, 8192), (10, 16384), (5, 32768), (3, 65536), (2, 131072)``.
  """
  if num_candidates < 1 or num_tokens < 1 or initial_tokens < 1 or not 0.0 < keep < 1.0:
    raise QuantizationError(f"halving_schedule needs positive counts and 0 < keep < 1, got {num_candidates} "
                            f"candidates, {num_tokens} tokens, {initial_tokens} initial tokens, keep {keep}")
  rounds, n, t = [], num_candidates, min(initial_tokens, num_tokens)
  while n > 1:
    rounds.append((n, t))
    n = min(n - 1, max(1, math.ceil(round(n * keep, 9))))  # round: 9 x (1/3) is 3, not 3 + 4e-16
    t = min(num_tokens, math.ceil(round(t / keep, 9)))
  return tuple(rounds)


def _candidate_factors(kernels, lam, rank, svd_iters, oversample, shared_branch, precision):
  """The rank-r SVD factors ``[(A, B)]`` of one λ: one pair per kernel, or one of the concatenation."""
  if shared_branch:
    w_hat = jnp.concatenate([lam[:, None] * w.astype(jnp.float32) for w in kernels], axis=1)
    return [svd_lowrank(w_hat, rank, svd_iters, oversample, precision)]
  return [svd_lowrank(lam[:, None] * w.astype(jnp.float32), rank, svd_iters, oversample, precision)
          for w in kernels]


def _candidates_from_factors(kernels, biases, lam, factors, shared_branch, precision) -> list[SVDQuantWeights]:
  """The one-shot candidates of :func:`one_shot_candidate` / :func:`shared_one_shot_candidates`
  from their SVD factors."""
  if shared_branch:
    (a, b), = factors
    w_hat = jnp.concatenate([lam[:, None] * w.astype(jnp.float32) for w in kernels], axis=1)
    whole = SVDQuantWeights(lam, w_hat - jnp.dot(a, b, precision=precision), a, b,
                            jnp.concatenate([jnp.asarray(bias, jnp.float32) for bias in biases]))
    return split_columns(whole, [w.shape[1] for w in kernels])
  out = []
  for w, bias, (a, b) in zip(kernels, biases, factors):
    w_hat = lam[:, None] * w.astype(jnp.float32)
    out.append(SVDQuantWeights(lam, w_hat - jnp.dot(a, b, precision=precision), a, b, bias))
  return out


def _best_first(indices: Array, losses: Array) -> Array:
  """``indices`` ordered by loss (NaN last), ties by larger index first (the exhaustive ``<=`` rule)."""
  finite = jnp.where(jnp.isnan(losses), jnp.inf, losses)
  return indices[jnp.lexsort((-indices, finite))]


@functools.partial(jax.jit, static_argnames=("fmt", "rank", "grid", "candidate_batch", "svd_iters", "oversample",
                                             "shared_branch", "precision", "schedule", "seed"))
def _search_smoothing_halving(kernels, x_absmax, loss_fn, biases, *, fmt, rank, grid, candidate_batch, svd_iters,
                              oversample, shared_branch, precision, schedule, seed) -> SmoothingResult:
  del fmt
  w_absmax = weight_absmax(kernels)
  pairs = jnp.asarray(grid, jnp.float32)
  total = loss_fn.num_tokens
  batch = candidate_batch if candidate_batch > 1 else None
  scale = lambda pair: smooth_scale(x_absmax, w_absmax, pair[0], pair[1])  # noqa: E731

  (_, t0), rest = schedule[0], schedule[1:]
  first_loss = loss_fn.take_tokens(t0, seed)

  def first(pair):
    lam = scale(pair)
    factors = _candidate_factors(kernels, lam, rank, svd_iters, oversample, shared_branch, precision)
    cands = _candidates_from_factors(kernels, biases, lam, factors, shared_branch, precision)
    return factors, jnp.asarray(first_loss(cands), jnp.float32)

  factors, round_losses = jax.lax.map(first, pairs, batch_size=batch)
  losses = round_losses * jnp.float32(total / t0)
  alive = jnp.arange(len(grid), dtype=jnp.int32)
  for n, t in rest:
    alive = _best_first(alive, round_losses)[:n]
    sub_loss = loss_fn.take_tokens(t, seed)

    def later(j, sub_loss=sub_loss):
      lam = scale(pairs[j])
      picked = jax.tree_util.tree_map(lambda f: f[j], factors)
      cands = _candidates_from_factors(kernels, biases, lam, picked, shared_branch, precision)
      return jnp.asarray(sub_loss(cands), jnp.float32)

    round_losses = jax.lax.map(later, alive, batch_size=batch)
    losses = losses.at[alive].set(round_losses * jnp.float32(total / t))
  index = _best_first(alive, round_losses)[0]
  return SmoothingResult(scale(pairs[index]), index, losses)


# ----------------------------------------------------------------------------- loss precision
def loss_forward(x: Array, w: SVDQuantWeights, fmt: QuantFormat, shift: float = 0.0, loss_dtype: str = "float32",
                 precision: Any = PRECISION) -> Array:
  """:func:`~svdquant_jax.quant.weights.fake_forward` with the token-sized matmuls at ``loss_dtype``.

  ``"float32"``: ``fake_forward`` itself (``precision``). ``"bfloat16"``: the same formula with the
  products ``Qa(x̃) Qw(R)``, ``x̂ A`` and ``(x̂ A) B`` taken with bfloat16 operands and float32
  accumulation (what a GPU runs at its bf16 rate); the quantizers, the division by λ and the
  ``[K] x [K, N]`` shift compensation stay float32. ``[..., K] -> [..., N]`` in ``x.dtype``.
  """
  if loss_dtype == "float32":
    return fake_forward(x, w, fmt, shift, precision)
  if loss_dtype not in LOSS_DTYPES:
    raise QuantizationError(f"loss_dtype must be one of {LOSS_DTYPES}, got {loss_dtype!r}")
  low = jnp.dtype(loss_dtype)
  dot = lambda a, b: jnp.dot(a.astype(low), b.astype(low), preferred_element_type=jnp.float32)  # noqa: E731
  delta = act_shift(fmt, shift)
  xf = x.astype(jnp.float32)
  if w.rotation is not None:  # rotated in float32, as fake_forward
    xf = rotate_inputs(xf, w.rotation)
  x_hat = true_divide(xf, w.smooth)
  x_tilde = true_divide(xf + jnp.float32(delta), w.smooth) if delta else x_hat
  qw = quantized_residual(w, fmt)
  y = dot(fake_quant_act(x_tilde, fmt, unsigned=delta > 0), qw)
  if w.rank:
    y = y + dot(dot(x_hat, w.lora_a), w.lora_b)
  y = y + w.bias
  if delta:
    y = y - shift_compensation(w.smooth, qw, delta, precision)
  return y.astype(x.dtype)


def with_loss_dtype(loss_fn: Callable, loss_dtype: str) -> Callable:
  """``loss_fn`` evaluated at ``loss_dtype`` when it supports it (a dataclass with a ``loss_dtype``
  field, such as :class:`LinearOutputLoss`); any other loss is returned unchanged."""
  if loss_dtype not in LOSS_DTYPES:
    raise QuantizationError(f"loss_dtype must be one of {LOSS_DTYPES}, got {loss_dtype!r}")
  if (dataclasses.is_dataclass(loss_fn) and not isinstance(loss_fn, type)
      and any(f.name == "loss_dtype" for f in dataclasses.fields(loss_fn)) and loss_fn.loss_dtype != loss_dtype):
    return dataclasses.replace(loss_fn, loss_dtype=loss_dtype)
  return loss_fn


def chunked_row_sum(fn: Callable[..., Array], rows: Sequence[Array], chunk: int) -> Array:
  """``fn(*rows)``, a scalar sum over the rows of ``rows`` (arrays ``[T, ...]``), computed in chunks.

  With ``0 < chunk < T`` the first ``chunk * (T // chunk)`` rows run as a ``lax.map`` over chunks
  (only one chunk's temporaries live at a time, also under a ``vmap`` over candidates) and the
  rest in one call; the chunk sums are then added in order. ``chunk = 0`` or ``T <= chunk``: one call
  (the unchunked sum, bit for bit).
  """
  t = rows[0].shape[0]
  if not chunk or t <= chunk:
    return fn(*rows)
  n = t // chunk
  head = tuple(r[:n * chunk].reshape((n, chunk) + r.shape[1:]) for r in rows)
  total = jnp.sum(jax.lax.map(lambda part: fn(*part), head))
  if t % chunk:
    total = total + fn(*(r[n * chunk:] for r in rows))
  return total


def seeded_rows(num_rows: int, count: int, seed: int) -> Array:
  """The first ``count`` of a seeded permutation of ``num_rows`` rows (``int32 [count]``): the
  token subsets of successive halving (one seed: nested prefixes)."""
  return jax.random.permutation(jax.random.key(seed), num_rows)[:count]


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
    loss_dtype: operand dtype of the candidates' token-sized matmuls (static; :func:`loss_forward`).
    chunk_tokens: evaluate in chunks of this many tokens (static; 0: all at once), which bounds the
      loss's temporaries (:func:`chunked_row_sum`).
  """
  x: Array
  targets: tuple
  fmt: QuantFormat
  shifts: tuple
  precision: Any = PRECISION
  loss_dtype: str = "float32"
  chunk_tokens: int = 0

  def __call__(self, candidates: Sequence[SVDQuantWeights | None]) -> Array:
    if len(candidates) != len(self.targets):
      raise QuantizationError(f"LinearOutputLoss: {len(candidates)} candidates for {len(self.targets)} layers")
    total = jnp.zeros((), jnp.float32)
    for cand, target, shift in zip(candidates, self.targets, self.shifts):
      if cand is not None:
        def squared_error(x, t, cand=cand, shift=shift):
          if self.loss_dtype == "float32":  # today's path, unchanged
            err = t - fake_forward(x, cand, self.fmt, shift, self.precision)
          else:
            err = t - loss_forward(x, cand, self.fmt, shift, self.loss_dtype, self.precision)
          return jnp.sum(err * err)
        total = total + chunked_row_sum(squared_error, (self.x, target), self.chunk_tokens)
    return total

  @property
  def num_tokens(self) -> int:
    return self.x.shape[0]

  def take_tokens(self, count: int, seed: int) -> LinearOutputLoss:
    """The same loss on ``count`` tokens, the prefix of a permutation seeded by ``seed``."""
    if count >= self.num_tokens:
      return self
    rows = seeded_rows(self.num_tokens, count, seed)
    return dataclasses.replace(self, x=self.x[rows], targets=tuple(t[rows] for t in self.targets))


jax.tree_util.register_dataclass(LinearOutputLoss, data_fields=["x", "targets"],
                                 meta_fields=["fmt", "shifts", "precision", "loss_dtype", "chunk_tokens"])


def linear_output_loss(x_samples: Array, kernels: Sequence[Array], biases: Sequence[Array | None] | None,
                       fmt: QuantFormat, shifts: Sequence[float] | None = None,
                       precision: Any = PRECISION, loss_dtype: str = "float32",
                       chunk_tokens: int = 0) -> LinearOutputLoss:
  """The linear-level loss (granularity ``Layer``) for kernels sharing the input ``x_samples [..., K]``
  (reference outputs float32 at ``precision``; candidates at ``loss_dtype``, :func:`loss_forward`)."""
  if loss_dtype not in LOSS_DTYPES:
    raise QuantizationError(f"loss_dtype must be one of {LOSS_DTYPES}, got {loss_dtype!r}")
  k = kernels[0].shape[0]
  x = x_samples.reshape(-1, k).astype(jnp.float32)
  biases = [None] * len(kernels) if biases is None else biases
  shifts = tuple(float(s) for s in (shifts if shifts is not None else [0.0] * len(kernels)))
  targets = []
  for w, b in zip(kernels, biases):
    y = jnp.dot(x, w.astype(jnp.float32), precision=precision)
    targets.append(y if b is None else y + b.astype(jnp.float32))
  return LinearOutputLoss(x, tuple(targets), fmt, shifts, precision, loss_dtype, chunk_tokens)


__all__ = ["LOSS_DTYPES", "alpha_beta_grid", "activation_absmax", "weight_absmax", "smooth_scale",
           "one_shot_candidate", "shared_one_shot_candidates", "SmoothingResult", "search_smoothing",
           "halving_schedule", "loss_forward", "with_loss_dtype", "seeded_rows", "LinearOutputLoss",
           "linear_output_loss"]
