"""Matmul FLOPs of each PTQ stage, from the shapes and the settings (no arrays, no device).

Counts only matrix products (``2 M K N`` per ``[M, K] x [K, N]``); the elementwise work
(quantizers, absmax, the loss's squares) is O(T K) per layer against O(T K N) for its matmuls,
and the small m x m factorizations are listed separately by :func:`svd_flops`. Stages, per linear
group (one λ; kernels ``[K, N_i]`` each read by ``T_i`` calibration tokens):

  * ``smooth``: per (α, β) candidate, one rank-r SVD per kernel (one of the concatenation with a
    shared branch), the residual ``Ŵ - A B`` and one loss evaluation;
  * ``lowrank``: per alternating iteration the same (SVD, residual, loss); ``lowrank_iters`` is
    the upper bound (the early stop usually ends sooner: pass the observed count);
  * ``gptq``: the Hessian ``Xᵀ X`` per distinct input and the column sweep ``~2 K² N`` per kernel;
  * ``replay``: one full-precision forward of the block (its linears and attention).

A loss evaluation is either linear-level (the group's own fake-quantized outputs: ``2 T_i K N_i``
for the main path plus ``2 T_i r (K + N_i)`` for the branch) or module-level (the forward of the
enclosing module over all its tokens, given as ``eval_flops``; ``calib.max_tokens`` does not cut it).

The search cost cuts (``PTQSettings.loss_dtype``, ``halving_tokens``, ``halving_keep``):

  * successive halving of the smoothing grid (``halving_tokens > 0``): round i scores ``n_i``
    candidates on ``t_i`` of the group's ``T`` tokens (:func:`~svdquant_jax.quant.smooth.halving_schedule`),
    so the smoothing losses cost ``Σ_i n_i t_i / T`` full evaluations instead of ``P``; the P SVDs stay
    and every later round recomputes its candidates' residuals (``2 K r N`` each). ``T`` is the
    largest per-layer token count of a linear-level group and ``eval_tokens`` of a module-level one
    (a module forward is linear in its samples); ``module_cuts=False`` models module losses that
    cannot take subsets (the search then stays exhaustive for them);
  * ``loss_dtype="bfloat16"``: the same FLOPs at the bf16 rate (:func:`estimate_mixed_seconds`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from svdquant_jax.quant.lowrank import DEFAULT_SVD_ITERS, basis_size
from svdquant_jax.quant.smooth import halving_schedule

STAGES = ("smooth", "lowrank", "gptq", "replay")
LOSS_KEYS = ("smooth_loss", "lowrank_loss")


@dataclasses.dataclass(frozen=True)
class GroupShape:
  """The shapes of one linear group.

  Attributes:
    name: group name.
    kernels: ``(K, N_i)`` per layer (one K).
    tokens: ``T_i`` calibration tokens each layer's linear-level loss reads.
    eval_flops: FLOPs of one module-level loss evaluation (0: the loss is linear-level).
    hessian_inputs: distinct GPTQ inputs (1 when the layers share one input).
    eval_tokens: tokens the module-level loss runs over (for successive halving; 0: unknown, no
      halving of the module loss).
  """
  name: str
  kernels: tuple[tuple[int, int], ...]
  tokens: tuple[int, ...]
  eval_flops: float = 0.0
  hessian_inputs: int = 1
  eval_tokens: int = 0

  def __post_init__(self):
    if not self.kernels or len(self.kernels) != len(self.tokens):
      raise ValueError(f"group {self.name}: {len(self.kernels)} kernels for {len(self.tokens)} token counts")
    if len({k for k, _ in self.kernels}) != 1:
      raise ValueError(f"group {self.name}: kernels sharing one λ must have one K, got {self.kernels}")


def matmul_flops(m: int, k: int, n: int) -> float:
  """``[m, k] x [k, n]``: ``2 m k n``."""
  return 2.0 * m * k * n


def svd_flops(k: int, n: int, rank: int, svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None) -> float:
  """Matmul FLOPs of :func:`~svdquant_jax.quant.lowrank.subspace_svd` of a ``[K, N]`` kernel.

  Per step two products with W (``2 x 2 K N m``) and two CholeskyQR3 passes (on the larger and
  the smaller side), each three Gram products ``2 d m²`` and three triangular solves ``d m²``;
  then the projection ``Qᵀ W`` (``2 m K N``) and the Ritz basis ``2 d m²`` (d = min(K, N)).
  The Householder QR and the small SVD (O(m² max(K, N))) are not matmuls and are left out.
  """
  if rank == 0:
    return 0.0
  m = basis_size((k, n), rank, oversample)
  small, large = min(k, n), max(k, n)
  steps = svd_iters if m < small else 0
  ortho = lambda d: 3 * (2.0 * d * m * m + d * m * m)  # noqa: E731
  per_step = 2 * matmul_flops(k, n, m) + ortho(large) + ortho(small)
  return steps * per_step + (ortho(small) if steps else 0.0) + matmul_flops(m, k, n) + matmul_flops(small, m, m)


def linear_loss_flops(group: GroupShape, rank: int) -> float:
  """One linear-level loss evaluation: ``Σ_i 2 T_i K N_i + 2 T_i r (K + N_i)``."""
  return sum(matmul_flops(t, k, n) + matmul_flops(t, k, rank) + matmul_flops(t, rank, n)
             for (k, n), t in zip(group.kernels, group.tokens))


def candidate_flops(group: GroupShape, rank: int, shared_branch: bool = False, svd_iters: int = DEFAULT_SVD_ITERS,
                    oversample: int | None = None) -> dict[str, float]:
  """One candidate (a smoothing pair or an alternating iteration): ``{"svd", "loss"}`` FLOPs."""
  k = group.kernels[0][0]
  ns = [n for _, n in group.kernels]
  shared = shared_branch and rank and len(ns) > 1
  widths = [sum(ns)] if shared else ns
  svd = sum(svd_flops(k, n, rank, svd_iters, oversample) + matmul_flops(k, rank, n) for n in widths)
  loss = group.eval_flops if group.eval_flops else linear_loss_flops(group, rank)
  return {"svd": svd, "loss": loss}


def smoothing_rounds(group: GroupShape, candidates: int, halving_tokens: int = 0, halving_keep: float = 0.5,
                     module_cuts: bool = True) -> tuple[tuple[int, float], ...]:
  """The smoothing search of one group as ``((candidates, token fraction), ...)`` rounds: one round
  ``(P, 1.0)`` for the exhaustive grid, else the successive-halving schedule with ``t_i / T``."""
  if candidates <= 1 or not halving_tokens:
    return ((candidates, 1.0),)
  total = (group.eval_tokens if module_cuts else 0) if group.eval_flops else max(group.tokens)
  if not total or halving_tokens >= total:
    return ((candidates, 1.0),)
  return tuple((n, t / total) for n, t in halving_schedule(candidates, total, halving_tokens, halving_keep))


def group_flops(group: GroupShape, *, rank: int = 32, candidates: int = 39, lowrank_iters: int = 100,
                shared_branch: bool = False, gptq: bool = False, svd_iters: int = DEFAULT_SVD_ITERS,
                oversample: int | None = None, halving_tokens: int = 0, halving_keep: float = 0.5,
                module_cuts: bool = True) -> dict[str, float]:
  """FLOPs of one group per stage: ``{"smooth_svd", "smooth_loss", "lowrank_svd", "lowrank_loss", "gptq"}``.

  ``candidates``: smoothing pairs (0: no smoothing); ``lowrank_iters``: alternating iterations per
  branch (each kernel runs its own loop unless the branch is shared); ``halving_tokens``,
  ``halving_keep``, ``module_cuts``: successive halving of the smoothing grid (module docstring).
  """
  one = candidate_flops(group, rank, shared_branch, svd_iters, oversample)
  rounds = smoothing_rounds(group, candidates, halving_tokens, halving_keep, module_cuts)
  if len(rounds) == 1:
    out = {"smooth_svd": candidates * one["svd"], "smooth_loss": candidates * one["loss"]}
  else:
    k, ns = group.kernels[0][0], [n for _, n in group.kernels]
    widths = [sum(ns)] if (shared_branch and rank and len(ns) > 1) else ns
    residual = sum(matmul_flops(k, rank, n) for n in widths)
    if group.eval_flops:
      loss = sum(n * frac * group.eval_flops for n, frac in rounds)
    else:  # each layer reads min(T_l, t_i) tokens of round i
      total = max(group.tokens)
      loss = sum(n * linear_loss_flops(dataclasses.replace(
          group, tokens=tuple(min(t, math.ceil(frac * total)) for t in group.tokens)), rank) for n, frac in rounds)
    out = {"smooth_svd": candidates * one["svd"] + sum(n for n, _ in rounds[1:]) * residual, "smooth_loss": loss}
  if rank:
    shared = shared_branch and len(group.kernels) > 1
    loops = [group] if shared else [
        dataclasses.replace(group, kernels=(kn,), tokens=(t,)) for kn, t in zip(group.kernels, group.tokens)]
    lr = [candidate_flops(g, rank, shared, svd_iters, oversample) for g in loops]
    # A one-layer loss of a module-level group still runs the whole module.
    out["lowrank_svd"] = lowrank_iters * sum(c["svd"] for c in lr)
    out["lowrank_loss"] = lowrank_iters * (len(loops) * group.eval_flops if group.eval_flops
                                           else sum(c["loss"] for c in lr))
  else:
    out["lowrank_svd"] = out["lowrank_loss"] = 0.0
  out["gptq"] = 0.0
  if gptq:
    k = group.kernels[0][0]
    tokens = sum(group.tokens) if group.hessian_inputs > 1 else group.tokens[0]
    out["gptq"] = matmul_flops(k, tokens, k) + sum(matmul_flops(k, k, n) for _, n in group.kernels)
  return out


def flux_block_groups(kind: str, dim: int, samples: int, img_tokens: int, txt_tokens: int,
                      max_tokens: int = 0, mlp_ratio: int = 4,
                      eval_samples: int | None = None) -> tuple[list[GroupShape], float]:
  """The W4A4 groups of a FLUX block (``quant/adapters/flux.py``) and the FLOPs of its forward.

  Args:
    kind: ``"flux_double"`` or ``"flux_single"``.
    dim: model width D (FLUX.1: 3072); the MLP is ``mlp_ratio`` x D wide.
    samples, img_tokens, txt_tokens: calibration samples and tokens per sample.
    max_tokens: ``calib.max_tokens`` (0: all): caps the tokens of each linear-level loss.
    eval_samples: samples the module-level losses run on (``None``: all ``samples``; today's
      driver uses all, this is for what-if estimates of a sample cap).

  Returns:
    ``(groups, forward_flops)``: the groups with their loss costs, and one full-precision forward
    of the block over all samples (the replay).
  """
  d, h = dim, mlp_ratio * dim
  t_img, t_txt = samples * img_tokens, samples * txt_tokens
  t_all = t_img + t_txt
  cap = (lambda t: min(t, max_tokens)) if max_tokens else (lambda t: t)
  length = img_tokens + txt_tokens
  attention = lambda s: (matmul_flops(s * length, d, 3 * d) + 2 * matmul_flops(s * length, d, length)  # noqa: E731
                         + matmul_flops(s * length, d, d))  # projections, QKᵀ and PV, output projections
  single = lambda s: (matmul_flops(s * length, d, 3 * d + h) + 2 * matmul_flops(s * length, d, length)  # noqa: E731
                      + matmul_flops(s * length, d + h, d))
  ev = samples if eval_samples is None else min(eval_samples, samples)
  if kind == "flux_double":
    attn = attention(ev)
    mlp = lambda t: matmul_flops(t, d, h) + matmul_flops(t, h, d)  # noqa: E731
    groups = [GroupShape("qkv", ((d, 3 * d),), (t_img,), eval_flops=attn, eval_tokens=ev * length),
              GroupShape("add_qkv", ((d, 3 * d),), (t_txt,), eval_flops=attn, eval_tokens=ev * length),
              GroupShape("out", ((d, d), (d, d)), (cap(t_img), cap(t_txt)), hessian_inputs=2),
              GroupShape("ff.fc1", ((d, h),), (cap(t_img),)), GroupShape("ff.fc2", ((h, d),), (cap(t_img),)),
              GroupShape("ff_context.fc1", ((d, h),), (cap(t_txt),)),
              GroupShape("ff_context.fc2", ((h, d),), (cap(t_txt),))]
    return groups, attention(samples) + mlp(t_img) + mlp(t_txt)
  if kind == "flux_single":
    forward = single(samples)
    groups = [GroupShape("qkv_mlp", ((d, 3 * d), (d, h)), (t_all, t_all), eval_flops=single(ev),
                         eval_tokens=ev * length),
              GroupShape("proj_out_attn", ((d, d),), (cap(t_all),)),
              GroupShape("proj_out_mlp", ((h, d),), (cap(t_all),))]
    return groups, forward
  raise ValueError(f"unknown FLUX block kind {kind!r}; expected 'flux_double' or 'flux_single'")


def block_flops(groups: Sequence[GroupShape], forward_flops: float, *, rank: int = 32, candidates: int = 39,
                lowrank_iters: int = 100, shared_branch: bool = False, gptq: bool = False,
                svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None, halving_tokens: int = 0,
                halving_keep: float = 0.5, module_cuts: bool = True) -> dict[str, float]:
  """FLOPs of one block per stage (:data:`STAGES`, plus the ``*_svd`` / ``*_loss`` split and ``total``)."""
  out = dict.fromkeys(("smooth_svd", "smooth_loss", "lowrank_svd", "lowrank_loss", "gptq"), 0.0)
  for g in groups:
    for key, value in group_flops(g, rank=rank, candidates=candidates, lowrank_iters=lowrank_iters,
                                  shared_branch=shared_branch, gptq=gptq, svd_iters=svd_iters,
                                  oversample=oversample, halving_tokens=halving_tokens,
                                  halving_keep=halving_keep, module_cuts=module_cuts).items():
      out[key] += value
  out["smooth"] = out["smooth_svd"] + out["smooth_loss"]
  out["lowrank"] = out["lowrank_svd"] + out["lowrank_loss"]
  out["replay"] = float(forward_flops)
  out["total"] = sum(out[s] for s in STAGES)
  return out


def estimate_seconds(flops: float, matmul_flops_per_s: float, efficiency: float = 1.0) -> float:
  """Time at ``efficiency`` x the device's plain matmul rate (an estimate: FLOPs / rate)."""
  if matmul_flops_per_s <= 0 or not 0 < efficiency <= 1:
    raise ValueError(f"need a positive matmul rate and 0 < efficiency <= 1, got {matmul_flops_per_s}, {efficiency}")
  return flops / (matmul_flops_per_s * efficiency)


def estimate_mixed_seconds(flops: dict[str, float], loss_dtype: str, f32_flops_per_s: float,
                           bf16_flops_per_s: float, efficiency: float = 1.0) -> float:
  """Time of one block's stage FLOPs (:func:`block_flops`) when the loss evaluations
  (:data:`LOSS_KEYS`) run at ``loss_dtype`` and everything else at the float32 rate."""
  low = sum(flops[k] for k in LOSS_KEYS) if loss_dtype == "bfloat16" else 0.0
  return (estimate_seconds(flops["total"] - low, f32_flops_per_s, efficiency)
          + estimate_seconds(low, bf16_flops_per_s, efficiency))


__all__ = ["STAGES", "LOSS_KEYS", "GroupShape", "matmul_flops", "svd_flops", "linear_loss_flops", "candidate_flops",
           "smoothing_rounds", "group_flops", "flux_block_groups", "block_flops", "estimate_seconds",
           "estimate_mixed_seconds"]
