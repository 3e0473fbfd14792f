"""Jitted calibration passes over one transformer block, and the losses the searches minimize.

Every pass runs the block on all calibration samples with ``jax.lax.map`` over samples in
device batches of ``batch_size``, so device memory holds the block state of all samples
(``[S, ...]``, e.g. 3.6 GB for FLUX.1 at 1024^2 with S = 128) plus one batch of intermediates.

The losses are registered dataclass pytrees: their arrays are traced arguments, their layout is
static, so ``quantize_linear_group`` compiles once per group kind and serves every block of
that kind (19 FLUX double blocks share one compilation per group).

Data parallel: given a ``mesh`` (static; ``None`` or one device: the single-device path), the
state ``[S, ...]`` is split over its devices (``utils.sharding.shard_samples``), every pass runs
each device's samples with the single-device program (``utils.sharding.map_samples``), and the
losses gather the per-sample (per-row) squared errors in sample order before summing them, so
that the sums are the single-device ones, not a per-device partial sum plus an all-reduce.
Everything else a search computes (activation maxima, SVDs, Hessians) gets whole, replicated
inputs (``quant/ptq.py``), so XLA has nothing to partition there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.quant.adapters import ModelAdapter, State
from svdquant_jax.formats.quantizers import QuantFormat
from svdquant_jax.quant.smooth import chunked_row_sum, loss_forward, seeded_rows
from svdquant_jax.quant.weights import PRECISION, SVDQuantWeights, fake_forward
from svdquant_jax.quant.taps import Path, apply_with_taps
from svdquant_jax.utils import sharding

Array = jax.Array
# (layer path, format, shift) of each replaced layer: static.
ReplaceSpec = tuple[tuple[Path, QuantFormat, float], ...]


def _replacements(spec: ReplaceSpec, weights: Sequence[SVDQuantWeights], loss_dtype: str = "float32") -> dict:
  if loss_dtype == "float32":
    return {path: functools.partial(fake_forward, w=w, fmt=fmt, shift=shift)
            for (path, fmt, shift), w in zip(spec, weights)}
  return {path: functools.partial(loss_forward, w=w, fmt=fmt, shift=shift, loss_dtype=loss_dtype)
          for (path, fmt, shift), w in zip(spec, weights)}


def _apply_one(adapter: ModelAdapter, kind: str, params: Any, sample: State, spec: ReplaceSpec,
               weights: Sequence[SVDQuantWeights], record_inputs: tuple[Path, ...],
               record_outputs: tuple[Path, ...], loss_dtype: str = "float32") -> tuple[State, dict]:
  """Runs the block on one sample (no batch axis); returns the new state and recordings."""
  batched = {k: v[None] for k, v in sample.items()}
  out, rec = apply_with_taps(adapter.block_module(kind), {"params": params}, *adapter.block_args(batched),
                             replace=_replacements(spec, weights, loss_dtype), record_inputs=record_inputs,
                             record_outputs=record_outputs)
  new_state = adapter.update_state(batched, out)
  unbatch = functools.partial(jax.tree_util.tree_map, lambda a: a[0])
  return unbatch(new_state), unbatch(rec)


@functools.partial(jax.jit, static_argnames=("adapter", "kind", "spec", "record_inputs", "record_outputs",
                                             "batch_size", "mesh"))
def run_block(adapter: ModelAdapter, kind: str, params: Any, state: State, weights: Sequence[SVDQuantWeights] = (),
              *, spec: ReplaceSpec = (), record_inputs: tuple[Path, ...] = (),
              record_outputs: tuple[Path, ...] = (), batch_size: int = 8,
              mesh: jax.sharding.Mesh | None = None,
              record_rows: dict[Path, Array] | None = None) -> tuple[State, dict]:
  """One block over all samples: ``state [S, ...] -> (state after the block, recordings [S, ...])``.

  Args:
    adapter, kind: which model and block kind (static).
    params: the block's params subtree.
    state: per-sample block inputs, leading axis S.
    weights, spec: layers replaced by their fake-quantized SVDQuant form.
    record_inputs / record_outputs: layer inputs / module outputs to return, per sample.
    batch_size: samples per device batch.
    mesh: split the samples over this mesh (state and recordings stay split; ``None``: one device).
    record_rows: for some ``record_inputs`` paths, ``int32 [S, M]`` token rows of each sample to
      keep (:class:`TokenRows`): that path's recording is ``[S, M, K]`` instead of ``[S, T, K]``,
      so the full inputs of all samples never exist at once (traced: every block of a kind with
      the same ``M`` shares one program).
  """
  rows = dict(record_rows or {})

  def body(xs):
    sample, picks = xs
    new_state, rec = _apply_one(adapter, kind, params, sample, spec, weights, record_inputs, record_outputs)
    for path, r in picks.items():
      x = rec["inputs"][path]
      rec["inputs"][path] = x.reshape(-1, x.shape[-1])[r]
    return new_state, rec
  return sharding.map_samples(body, (state, rows), mesh, batch_size)


@dataclasses.dataclass(frozen=True)
class TokenRows:
  """A seeded subset of the ``S x T`` token rows of a recorded layer input, split by sample.

  The subset is the one :func:`subsample_tokens` takes from the flattened ``[S*T, K]`` input: the
  first ``count`` of a seeded permutation, in increasing order (so sample by sample). ``per_sample``
  ``int32 [S, M]`` lists each sample's chosen tokens padded to a common ``M`` (padding: token 0,
  dropped later); ``M`` is rounded up to a coarse step so that blocks of one kind usually share a
  compiled pass. ``positions`` ``int32 [count]`` are the chosen rows' places in the flattened
  ``[S*M]`` recording: ``recording.reshape(S*M, K)[positions]`` equals the subset bit for bit.
  """
  per_sample: Any
  positions: Any

  @classmethod
  def make(cls, samples: int, tokens: int, count: int, seed: int) -> "TokenRows":
    rows = subset_rows(samples * tokens, count, seed)
    sample, token = rows // tokens, rows % tokens
    counts = np.bincount(sample, minlength=samples)
    step = 2 ** max(3, int(np.log2(max(1, count // samples))) - 2)
    m = min(tokens, -(-int(counts.max()) // step) * step)
    slot = np.arange(rows.size) - np.concatenate([[0], np.cumsum(counts)[:-1]])[sample]
    per_sample = np.zeros((samples, m), np.int32)
    per_sample[sample, slot] = token
    return cls(per_sample, (sample * m + slot).astype(np.int32))

  def compact(self, recording: Array) -> Array:
    """``[S, M, K]`` recording -> ``[count, K]``, the subset in :func:`subsample_tokens`' order."""
    return recording.reshape(-1, recording.shape[-1])[self.positions]


def subset_rows(num_rows: int, count: int, seed: int) -> np.ndarray:
  """The calibration token subset: the first ``count`` of a seeded permutation of ``num_rows``
  rows, sorted (``int64 [min(count, num_rows)]``; ``count <= 0``: all rows)."""
  if count <= 0 or num_rows <= count:
    return np.arange(num_rows)
  return np.sort(np.random.default_rng(seed).permutation(num_rows)[:count])


def subsample_tokens(x: Array, max_tokens: int, seed: int) -> Array:
  """``[..., K] -> [T, K]``; at most ``max_tokens`` rows (0: all), chosen by :func:`subset_rows`."""
  x = x.reshape(-1, x.shape[-1])
  if max_tokens and x.shape[0] > max_tokens:
    x = x[subset_rows(x.shape[0], max_tokens, seed)]
  return x


def _ordered_sum(values: Array) -> Array:
  """Sum of a ``[n]`` vector whole on every device; the barrier keeps XLA from fusing it with the
  reduction that produced ``values`` (which would change the order of the additions)."""
  return jnp.sum(jax.lax.optimization_barrier(values))


def _squared_error(out: Any, ref: Any) -> Array:
  errs = jax.tree_util.tree_map(
      lambda o, r: jnp.sum(jnp.square(o.astype(jnp.float32) - r.astype(jnp.float32))), out, ref)
  return sum(jax.tree_util.tree_leaves(errs))


@dataclasses.dataclass(frozen=True)
class ModuleOutputLoss:
  """``Σ_samples ||module(x; candidates) - module(x; full precision)||²`` for an eval module.

  Calling it with ``candidates`` (one :class:`SVDQuantWeights` or ``None`` per group layer) runs
  the block on every sample with those layers fake-quantized (``None``: left in full precision)
  and compares the output of ``eval_path`` (``()``: the whole block) with ``reference``.
  """
  params: Any
  state: State
  reference: Any
  adapter: ModelAdapter
  kind: str
  layer_paths: tuple[Path, ...]
  eval_path: Path
  fmt: QuantFormat
  shifts: tuple[float, ...]
  batch_size: int
  mesh: jax.sharding.Mesh | None = None
  loss_dtype: str = "float32"

  def __call__(self, candidates: Sequence[SVDQuantWeights | None]) -> Array:
    used = [(p, s, c) for p, s, c in zip(self.layer_paths, self.shifts, candidates) if c is not None]
    spec = tuple((p, self.fmt, s) for p, s, _ in used)
    weights = [c for _, _, c in used]

    def body(xs):
      sample, ref = xs
      _, rec = _apply_one(self.adapter, self.kind, self.params, sample, spec, weights, (), (self.eval_path,),
                          self.loss_dtype)
      return _squared_error(rec["outputs"][self.eval_path], ref)

    per_sample = sharding.map_samples(body, (self.state, self.reference), self.mesh, self.batch_size, gather=True)
    return _ordered_sum(per_sample)

  @property
  def _samples(self) -> int:
    return int(jax.tree_util.tree_leaves(self.reference)[0].shape[0])

  @property
  def num_tokens(self) -> int:
    """Samples x tokens per sample (of the first output leaf ``[S, T, ...]``)."""
    leaf = jax.tree_util.tree_leaves(self.reference)[0]
    return self._samples * (int(leaf.shape[1]) if leaf.ndim > 2 else 1)

  def take_tokens(self, count: int, seed: int) -> "ModuleOutputLoss":
    """The loss on whole samples holding at least ``count`` tokens, the prefix of a seeded
    permutation of the samples (successive halving, ``smooth.search_smoothing``). Split over a
    mesh the samples stay as they are (the subset would not divide evenly)."""
    per_sample = self.num_tokens // self._samples
    n = min(self._samples, -(-count // per_sample))
    if n >= self._samples or self.mesh is not None:
      return self
    rows = seeded_rows(self._samples, n, seed)
    take = functools.partial(jax.tree_util.tree_map, lambda a: a[rows])
    return dataclasses.replace(self, state=take(self.state), reference=take(self.reference))


jax.tree_util.register_dataclass(
    ModuleOutputLoss, data_fields=["params", "state", "reference"],
    meta_fields=["adapter", "kind", "layer_paths", "eval_path", "fmt", "shifts", "batch_size", "mesh", "loss_dtype"])


@dataclasses.dataclass(frozen=True)
class LayerOutputsLoss:
  """``Σ_i ||fake_forward(x_i; candidate_i) - (x_i W_i + b_i)||²``: each linear on its own input.

  Unlike the linear-level loss of ``smooth.py`` the layers may read *different* inputs (FLUX
  ``to_out`` reads image tokens, ``to_add_out`` text tokens, yet they share one λ).
  """
  xs: tuple
  targets: tuple
  fmt: QuantFormat
  shifts: tuple[float, ...]
  mesh: jax.sharding.Mesh | None = None
  loss_dtype: str = "float32"
  chunk_tokens: int = 0

  def __call__(self, candidates: Sequence[SVDQuantWeights | None]) -> Array:
    total = jnp.zeros((), jnp.float32)
    for x, target, shift, cand in zip(self.xs, self.targets, self.shifts, candidates):
      if cand is not None:
        def rows(xt, cand=cand, shift=shift):
          return jnp.sum(jnp.square(loss_forward(xt[0], cand, self.fmt, shift, self.loss_dtype) - xt[1]), axis=-1)
        if self.mesh is None:
          total = total + chunked_row_sum(lambda a, b: _ordered_sum(rows((a, b))), (x, target), self.chunk_tokens)
        else:
          total = total + _ordered_sum(sharding.per_device(rows, (x, target), self.mesh, gather=True))
    return total

  @property
  def num_tokens(self) -> int:
    return max(int(x.shape[0]) for x in self.xs)

  def take_tokens(self, count: int, seed: int) -> "LayerOutputsLoss":
    """The same loss on at most ``count`` rows of each layer's input (a seeded permutation's
    prefix; successive halving). Split over a mesh the rows stay as they are."""
    if count >= self.num_tokens or self.mesh is not None:
      return self
    picks = [seeded_rows(int(x.shape[0]), min(count, int(x.shape[0])), seed) for x in self.xs]
    return dataclasses.replace(self, xs=tuple(x[r] for x, r in zip(self.xs, picks)),
                               targets=tuple(t[r] for t, r in zip(self.targets, picks)))


jax.tree_util.register_dataclass(LayerOutputsLoss, data_fields=["xs", "targets"],
                                 meta_fields=["fmt", "shifts", "mesh", "loss_dtype", "chunk_tokens"])


@jax.jit
def _linear_targets(x: Array, kernel: Array, bias: Array | None) -> Array:
  y = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=PRECISION)
  return y if bias is None else y + bias.astype(jnp.float32)


def layer_outputs_loss(xs: Sequence[Array], kernels: Sequence[Array], biases: Sequence[Array | None],
                       fmt: QuantFormat, shifts: Sequence[float],
                       mesh: jax.sharding.Mesh | None = None, chunk_tokens: int = 0) -> LayerOutputsLoss:
  """Builds :class:`LayerOutputsLoss` from per-layer inputs ``[T_i, K]`` (float32 kept).

  With a ``mesh`` of more than one device the rows (and their targets, computed whole) are split
  over it when every ``T_i`` divides evenly; otherwise the loss runs whole on every device.
  """
  xs = tuple(x.astype(jnp.float32) for x in xs)
  targets = tuple(_linear_targets(x, w, b) for x, w, b in zip(xs, kernels, biases))
  if mesh is not None and (mesh.size == 1 or any(x.shape[0] % mesh.size for x in xs)):
    mesh = None
  if mesh is not None:
    xs = tuple(sharding.shard_samples(x, mesh, "layer loss inputs") for x in xs)
    targets = tuple(sharding.shard_samples(t, mesh, "layer loss targets") for t in targets)
  return LayerOutputsLoss(xs, targets, fmt, tuple(float(s) for s in shifts), mesh, chunk_tokens=chunk_tokens)
