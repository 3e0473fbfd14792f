"""SVDQuant for one group of linear layers that share an input: the whole-layer entry point.

:func:`quantize_linear_group` runs the pipeline for the layers that read one input: smoothing
search (``smooth.py``) -> low-rank branch with alternating refinement (``lowrank.py``) ->
optional GPTQ on the residual (``gptq.py``) -> optional learned refinement of λ and the branch
(``refine.py``, ``PTQSettings.refine``). The float form it returns and the fake-quantized
forward live in ``weights.py`` (re-exported here).

Each kernel gets its own low-rank branch by default. With ``shared_branch=True`` (deepcompressor's
``exclusive: false``) the kernels share one: the branch is refined on the concatenation
``[Ŵ_1 | ... | Ŵ_n]`` along N, so every layer carries the same ``A [K, r]`` and its column slice of
``B``, the residual and the bias; the smoothing candidates are scored with that structure, and
GPTQ still quantizes each layer's residual separately. This is what fusing the kernels into one
``Dense`` (q/k/v -> ``to_qkv``) gives, for models that keep them apart.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats.quantizers import GELU_SHIFT, QuantFormat, QuantizationError
from svdquant_jax.quant import gptq as gptq_lib
from svdquant_jax.quant import lowrank as lowrank_lib
from svdquant_jax.quant import refine as refine_lib
from svdquant_jax.quant import rotation as rotation_lib
from svdquant_jax.quant import smooth as smooth_lib
from svdquant_jax.quant.settings import PTQSettings
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
      iterations not run after an early stop); with a shared branch, the one refinement's losses
      (of the whole group) repeated for every kernel.
    lowrank_best: per kernel, ``int32 []`` index of the kept iteration (0 = plain SVDQuant).
    gptq_inv_tries: per kernel, ``int32 []`` Cholesky attempts GPTQ needed (0 without GPTQ).
    gptq_stable: per kernel, ``bool []`` whether the damped Hessian inverse succeeded.
    refine: :class:`~svdquant_jax.quant.refine.RefineInfo` of the learned refinement (``None``
      when off).
  """
  smooth_index: Array
  smooth_losses: Array
  lowrank_losses: tuple
  lowrank_best: tuple
  gptq_inv_tries: tuple
  gptq_stable: tuple
  refine: Any = None


jax.tree_util.register_dataclass(
    GroupQuantInfo, data_fields=["smooth_index", "smooth_losses", "lowrank_losses", "lowrank_best",
                                 "gptq_inv_tries", "gptq_stable", "refine"], meta_fields=[])


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


@dataclasses.dataclass(frozen=True, eq=False)
class _SharedBranchLoss:
  """Adapts a group loss to one candidate over the concatenated kernels (a shared branch): the
  candidate is split by columns into the layers' candidates."""
  group_loss: Callable
  sizes: tuple

  def __call__(self, candidate: SVDQuantWeights) -> Array:
    return self.group_loss(lowrank_lib.split_columns(candidate, self.sizes))


jax.tree_util.register_dataclass(_SharedBranchLoss, data_fields=["group_loss"], meta_fields=["sizes"])


@dataclasses.dataclass(frozen=True, eq=False)
class _RotatedLoss:
  """Adapts a group loss that reads the unrotated input (e.g. the enclosing module's output
  error) to candidates built in the rotated space: each candidate gets the rotation attached, so
  its forward rotates ``x`` first. Token subsets (successive halving) pass through."""
  group_loss: Callable
  rotation: rotation_lib.HadamardRotation

  def __call__(self, candidates: Sequence[SVDQuantWeights | None]) -> Array:
    return self.group_loss([None if c is None else dataclasses.replace(c, rotation=self.rotation)
                            for c in candidates])

  @property
  def num_tokens(self) -> int:
    return self.group_loss.num_tokens

  @property
  def take_tokens(self) -> Callable:
    take = self.group_loss.take_tokens  # AttributeError when the loss has none: no halving
    return lambda count, seed: _RotatedLoss(take(count, seed), self.rotation)


jax.tree_util.register_dataclass(_RotatedLoss, data_fields=["group_loss"], meta_fields=["rotation"])


@functools.partial(jax.jit, static_argnames=("settings", "shifts", "rotation"))
def _quantize_group_core(kernels, biases, x_samples, loss_fn, gptq_inputs, *, settings: PTQSettings, shifts,
                         rotation=None):
  fmt, rank = settings.fmt, settings.rank
  svd_iters = settings.svd_iters or lowrank_lib.DEFAULT_SVD_ITERS
  shared_branch = bool(settings.shared_branch and rank and len(kernels) > 1)
  k = kernels[0].shape[0]
  x = x_samples.reshape(-1, k).astype(jnp.float32)
  kernels = [w.astype(jnp.float32) for w in kernels]
  biases = [b.astype(jnp.float32) for b in biases]
  if rotation is not None:
    # Everything below works in the rotated space x' = x Q, W' = Qᵀ W (x' W' = x W); a caller's
    # loss reads unrotated inputs, so its candidates carry the rotation.
    kernels = [rotation_lib.rotate_kernel(w, rotation) for w in kernels]
    x = rotation_lib.rotate_inputs(x, rotation)
    if gptq_inputs is not None:
      gptq_inputs = [rotation_lib.rotate_inputs(g, rotation) for g in gptq_inputs]
  search_loss = None
  if loss_fn is None:
    loss_fn = smooth_lib.linear_output_loss(x, kernels, biases, fmt, shifts, chunk_tokens=settings.loss_chunk_tokens)
  elif rotation is not None:
    search_loss = _RotatedLoss(smooth_lib.with_loss_dtype(loss_fn, settings.loss_dtype), rotation)
    loss_fn = _RotatedLoss(loss_fn, rotation)
  # The searches' loss at the search precision (where the loss supports it); refinement keeps loss_fn.
  if search_loss is None:
    search_loss = smooth_lib.with_loss_dtype(loss_fn, settings.loss_dtype)
  deltas = [act_shift(fmt, s) for s in shifts]
  if settings.smooth:
    found = smooth_lib.search_smoothing(
        kernels, smooth_lib.activation_absmax(x, deltas), search_loss, fmt, biases=biases, rank=rank,
        grid=settings.smoothing_grid, candidate_batch=settings.candidate_batch, svd_iters=svd_iters,
        oversample=settings.oversample, shared_branch=shared_branch, halving_tokens=settings.halving_tokens,
        halving_keep=settings.halving_keep, halving_seed=settings.token_seed)
    lam, smooth_index, smooth_losses = found.smooth, found.index, found.losses
  else:
    lam = jnp.ones((k,), jnp.float32)
    smooth_index, smooth_losses = jnp.asarray(-1, jnp.int32), jnp.zeros((0,), jnp.float32)

  layers, lr_losses, lr_best = [], [], []
  if shared_branch:  # one branch for the concatenated kernels (rank >= 1 and >= 2 kernels here)
    sizes = tuple(w.shape[1] for w in kernels)
    w_hat = jnp.concatenate([lam[:, None] * w for w in kernels], axis=1)
    b_cat = jnp.concatenate(biases)
    result = lowrank_lib.alternating_lowrank(
        w_hat, rank, fmt, _SharedBranchLoss(search_loss, sizes), settings.lowrank_iters, settings.early_stop,
        smooth=lam, bias=b_cat, svd_iters=svd_iters, oversample=settings.oversample, column_splits=sizes)
    layers = lowrank_lib.split_columns(
        SVDQuantWeights(lam, result.residual, result.lora_a, result.lora_b, b_cat), sizes)
    lr_losses = [result.losses] * len(kernels)
    lr_best = [result.best_iter] * len(kernels)
  else:
    for i, (w, b) in enumerate(zip(kernels, biases)):
      w_hat = lam[:, None] * w
      if rank:
        result = lowrank_lib.alternating_lowrank(
            w_hat, rank, fmt, _OneLayerLoss(search_loss, i, len(kernels)), settings.lowrank_iters,
            settings.early_stop, smooth=lam, bias=b, svd_iters=svd_iters, oversample=settings.oversample)
        layers.append(SVDQuantWeights(lam, result.residual, result.lora_a, result.lora_b, b))
        lr_losses.append(result.losses)
        lr_best.append(result.best_iter)
      else:
        layers.append(plain_weights(w, b, lam))
        lr_losses.append(jnp.zeros((0,), jnp.float32))
        lr_best.append(jnp.asarray(0, jnp.int32))

  tries = [jnp.asarray(0, jnp.int32)] * len(layers)
  stable = [jnp.asarray(True)] * len(layers)
  if settings.gptq:
    # The Hessian of the tensor the quantized path reads: (x + δ) / λ.
    rows = settings.hessian_block_rows
    shared = {}
    if gptq_inputs is None:
      for delta in sorted(set(deltas)):
        shared[delta] = gptq_lib.hessian_from_inputs(x, lam, block_rows=rows, shift=delta)
    for i, layer in enumerate(layers):
      hess = shared[deltas[i]] if gptq_inputs is None else gptq_lib.hessian_from_inputs(
          gptq_inputs[i], lam, block_rows=rows, shift=deltas[i])
      res = gptq_lib.gptq_quantize(layer.residual, hess, fmt, block_size=settings.gptq_block_size,
                                   damp=settings.gptq_damp, max_inv_tries=settings.gptq_max_inv_tries)
      layers[i] = dataclasses.replace(layer, residual_q=res.qweight)
      tries[i], stable[i] = res.inv_tries, res.stable
  refine_info = None
  if settings.refine.enabled:  # GPTQ codes, when present, stay fixed (see refine.py)
    layers, refine_info = refine_lib.refine_group(layers, kernels, x, fmt, deltas, settings.refine, loss_fn)
  info = GroupQuantInfo(smooth_index, smooth_losses, tuple(lr_losses), tuple(lr_best), tuple(tries), tuple(stable),
                        refine_info)
  if rotation is not None:
    layers = [dataclasses.replace(layer, rotation=rotation) for layer in layers]
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
                          batch_dims: int = 0, check_values: bool = True,
                          shared_branch: bool = False) -> tuple[list[Array | None], tuple[float, ...]]:
  """Checks the inputs of :func:`quantize_linear_group`; raises :class:`QuantizationError` naming
  ``name``.

  Shapes, group divisibility and ranks (``rank <= min(K, N_i)``; with ``shared_branch``,
  ``rank <= min(K, N_1 + ... + N_n)``) are always checked; NaN/Inf in ``x_samples`` and the
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
  if shared_branch:
    if rank < 0 or rank > min(k, sum(s[-1] for s in shapes)):
      raise QuantizationError(f"{name}: rank {rank} of the shared branch must be in [0, min(K, N_1 + ... + N_n)] "
                              f"for kernels {shapes}")
  elif rank < 0 or rank > min(min(k, s[-1]) for s in shapes):
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


def as_settings(settings: PTQSettings | QuantFormat, **overrides: Any) -> PTQSettings:
  """``settings`` with ``overrides`` applied; a bare format means ``PTQSettings(fmt=..., candidate_batch=1)``."""
  if isinstance(settings, QuantFormat):
    settings = PTQSettings(fmt=settings, candidate_batch=1)
  if not isinstance(settings, PTQSettings):
    raise QuantizationError(f"settings must be a PTQSettings or a QuantFormat, got {type(settings).__name__}")
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(PTQSettings)})
  if unknown:
    raise QuantizationError(f"unknown setting(s) {unknown}; PTQSettings fields are "
                            f"{[f.name for f in dataclasses.fields(PTQSettings)]}")
  return settings.replace(**overrides) if overrides else settings


def _group_rotation(settings: PTQSettings, k: int, shifts: Sequence[float],
                    name: str) -> rotation_lib.HadamardRotation | None:
  """The group's rotation (``None`` when off); its sign seed derives from the run seed and ``name``."""
  if not settings.rotation.enabled:
    return None
  # A rotated input x Q is signed (a GELU output's channels are mixed with signs), so the shifted
  # unsigned INT4 path does not apply: a rotated group is quantized with shift 0.
  if any(act_shift(settings.fmt, s) for s in shifts):
    raise QuantizationError(f"{name}: a rotated input is signed, so it cannot use the unsigned activation shift "
                            f"{max(shifts)}; quantize rotated groups with shift 0 (quant.shift_activations=False)")
  return settings.rotation.rotation(k, name)


def quantize_linear_group(kernels: Sequence[Array], biases: Sequence[Array | None] | None, x_samples: Array,
                          settings: PTQSettings | QuantFormat, *, shifts: Sequence[float] | None = None,
                          loss_fn: Callable | None = None, name: str = "linear",
                          gptq_inputs: Sequence[Array] | None = None, return_info: bool = False, **overrides: Any):
  """SVDQuant for the linear layers that read one input (one λ, one branch per kernel or one shared).

  Smoothing search over the (α, β) grid -> per kernel (or, with ``shared_branch``, once for the
  concatenated kernels), low-rank branch by alternating refinement (``lowrank_iters=1`` is
  one-shot SVDQuant) -> optionally GPTQ on each residual (``docs/quantization.md``).
  Jitted once per shapes and static settings; vmappable over a leading axis of same-shaped groups
  (see :func:`quantize_linear_groups`).

  Args:
    kernels: ``[K, N_i]`` kernels sharing the input (e.g. FLUX single block ``to_qkv`` and
      ``proj_mlp``).
    biases: ``[N_i]`` biases or ``None`` entries (or ``None``: no biases).
    x_samples: calibration inputs ``[..., K]`` (tokens of all samples).
    settings: how to quantize (:class:`~svdquant_jax.quant.settings.PTQSettings`: format, rank,
      smoothing grid, low-rank iterations, GPTQ, shared branch, ...), or just a
      :class:`QuantFormat`, for ``PTQSettings(fmt=..., candidate_batch=1)``. The object reaches the
      jitted core unchanged, as one static argument.
    **overrides: :class:`PTQSettings` fields replacing those of ``settings`` (``rank=16``,
      ``gptq=True``, ``grid=...``, ``shared_branch=True``, ...).
    shifts: per kernel δ for the default loss (GELU_SHIFT for fc2 inputs, INT4 only).
    loss_fn: ``loss_fn(candidates: list[SVDQuantWeights | None]) -> scalar``, the squared output
      error of the enclosing module; a ``None`` entry means that layer stays in full precision.
      Default: :func:`~svdquant_jax.quant.smooth.linear_output_loss` of these layers. Pass a pytree
      callable (see :func:`as_traceable_loss`) to keep one compilation across calls.
    name: layer name for error messages.
    gptq_inputs: per kernel ``[..., K]`` inputs for its GPTQ Hessian, for groups whose layers share λ
      but read different tensors (FLUX ``to_out`` / ``to_add_out``); default: ``x_samples`` for all.
    return_info: also return :class:`GroupQuantInfo`.

  With ``settings.rotation.enabled`` the group's input space is first rotated by a seeded block
  Hadamard ``Q`` (sign seed from ``settings.rotation.seed`` and ``name``): the kernels become
  ``Qᵀ W_i``, the calibration (and GPTQ) inputs ``x Q``, and the searches run in that space; the
  returned layers carry ``rotation`` (their forwards rotate ``x`` first), and ``loss_fn`` sees
  candidates carrying it. ``shifts`` must then be 0 (a rotated input is signed). Under
  :func:`quantize_linear_groups` all G groups share the rotation of the first name.

  With ``shared_branch`` (for layers that read this input but are kept as separate kernels, such
  as q, k, v as three ``Dense``), the smoothing candidates and the alternating refinement use the
  rank-r SVD of the concatenated ``[K, N_1 + ... + N_n]`` smoothed kernel; every returned layer
  carries the same ``lora_a`` with its own columns of ``lora_b``, residual and bias (one
  down-projection instead of n once the layers run as one), and ``rank`` may be up to
  ``min(K, N_1 + ... + N_n)``. No effect with one kernel or rank 0.

  Returns:
    ``list[SVDQuantWeights]`` (one per kernel), and the info if ``return_info``.

  Raises:
    QuantizationError: bad shapes, K not divisible by the group size, NaN/Inf inputs, (GPTQ)
      a Hessian that stays singular after all damping retries, or (rotation) a K without a
      power-of-two block >= ``min_block`` or a nonzero shift, naming ``name``.
  """
  settings = as_settings(settings, **overrides)
  biases, shifts = validate_group_inputs(kernels, biases, x_samples, settings.fmt, rank=settings.rank,
                                         lowrank_iters=settings.lowrank_iters, shifts=shifts, name=name,
                                         shared_branch=settings.shared_branch)
  if gptq_inputs is not None:
    gptq_inputs = list(gptq_inputs)
    k = np.shape(kernels[0])[0]
    if len(gptq_inputs) != len(kernels) or any(np.shape(g)[-1] != k for g in gptq_inputs):
      raise QuantizationError(f"{name}: gptq_inputs must be one [..., K={k}] array per kernel")
    if _is_concrete(gptq_inputs) and not all(bool(jnp.all(jnp.isfinite(g))) for g in gptq_inputs):
      raise QuantizationError(f"{name}: gptq_inputs contains NaN or Inf")
  rotation = _group_rotation(settings, int(np.shape(kernels[0])[-2]), shifts, name)
  layers, info = _quantize_group_core(
      list(kernels), _zero_biases(kernels, biases), x_samples,
      None if loss_fn is None else as_traceable_loss(loss_fn), gptq_inputs, settings=settings, shifts=shifts,
      rotation=rotation)
  if settings.gptq and _is_concrete(info):
    bad = [i for i, ok in enumerate(info.gptq_stable) if not bool(ok)]
    if bad:
      raise QuantizationError(f"{name}: GPTQ Hessian not positive definite after damping retries for kernels {bad}")
  return (layers, info) if return_info else layers


def quantize_linear_groups(kernels: Sequence[Array], biases: Sequence[Array | None] | None, x_samples: Array,
                           settings: PTQSettings | QuantFormat, names: Sequence[str] | None = None, *,
                           shifts: Sequence[float] | None = None, loss_fn: Callable | None = None,
                           return_info: bool = False, **overrides: Any):
  """:func:`quantize_linear_group` over a leading axis of G same-shaped groups, as one ``vmap``.

  Args:
    kernels: ``[G, K, N_i]`` per kernel; ``biases``: ``[G, N_i]`` or ``None`` entries.
    x_samples: ``[G, ..., K]``.
    settings, **overrides: as :func:`quantize_linear_group`.
    names: G layer names for error messages (default ``group_<g>``).
    shifts, loss_fn, return_info: as :func:`quantize_linear_group` (``loss_fn`` leaves carry the
      leading axis too).

  Returns:
    ``list[SVDQuantWeights]`` whose arrays carry the leading axis G (and the info if requested).
  """
  g = np.shape(kernels[0])[0]
  names = list(names) if names is not None else [f"group_{i}" for i in range(g)]
  if len(names) != g:
    raise QuantizationError(f"{len(names)} names for {g} groups")
  settings = as_settings(settings, **overrides)
  biases, _ = validate_group_inputs(kernels, biases, x_samples, settings.fmt, rank=settings.rank,
                                    lowrank_iters=settings.lowrank_iters, shifts=shifts, name=names[0],
                                    batch_dims=1, check_values=False, shared_branch=settings.shared_branch)
  if _is_concrete(x_samples, kernels):
    finite_x = np.asarray(jnp.all(jnp.isfinite(x_samples.reshape(g, -1)), axis=1))
    finite_w = np.all([np.asarray(jnp.all(jnp.isfinite(w.reshape(g, -1)), axis=1)) for w in kernels], axis=0)
    for i in range(g):
      if not finite_x[i]:
        raise QuantizationError(f"{names[i]}: x_samples contains NaN or Inf")
      if not finite_w[i]:
        raise QuantizationError(f"{names[i]}: a kernel contains NaN or Inf")
  biases = _zero_biases(kernels, biases, batch_dims=1)

  def one(ks, bs, x, lf):
    return quantize_linear_group(ks, bs, x, settings, shifts=shifts, loss_fn=lf, return_info=True, name=names[0])

  layers, info = jax.vmap(one)(list(kernels), biases, x_samples, loss_fn)
  if settings.gptq and _is_concrete(info):
    stable = np.all([np.asarray(s) for s in info.gptq_stable], axis=0)
    for i in range(g):
      if not stable[i]:
        raise QuantizationError(f"{names[i]}: GPTQ Hessian not positive definite after damping retries")
  return (layers, info) if return_info else layers


__all__ = [
    "GELU_SHIFT", "PRECISION", "SVDQuantWeights", "GroupQuantInfo", "plain_weights", "act_shift",
    "quantized_residual", "effective_bias", "to_lora_down", "fake_forward", "as_traceable_loss",
    "validate_group_inputs", "as_settings", "quantize_linear_group", "quantize_linear_groups",
]
