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
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from svdquant_jax.quant.lowrank import DEFAULT_SVD_ITERS, basis_size

STAGES = ("smooth", "lowrank", "gptq", "replay")


@dataclasses.dataclass(frozen=True)
class GroupShape:
  """The shapes of one linear group.

  Attributes:
    name: group name.
    kernels: ``(K, N_i)`` per layer (one K).
    tokens: ``T_i`` calibration tokens each layer's linear-level loss reads.
    eval_flops: FLOPs of one module-level loss evaluation (0: the loss is linear-level).
    hessian_inputs: distinct GPTQ inputs (1 when the layers share one input).
  """
  name: str
  kernels: tuple[tuple[int, int], ...]
  tokens: tuple[int, ...]
  eval_flops: float = 0.0
  hessian_inputs: int = 1

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


def group_flops(group: GroupShape, *, rank: int = 32, candidates: int = 39, lowrank_iters: int = 100,
                shared_branch: bool = False, gptq: bool = False, svd_iters: int = DEFAULT_SVD_ITERS,
                oversample: int | None = None) -> dict[str, float]:
  """FLOPs of one group per stage: ``{"smooth_svd", "smooth_loss", "lowrank_svd", "lowrank_loss", "gptq"}``.

  ``candidates``: smoothing pairs (0: no smoothing); ``lowrank_iters``: alternating iterations per
  branch (each kernel runs its own loop unless the branch is shared).
  """
  one = candidate_flops(group, rank, shared_branch, svd_iters, oversample)
  out = {"smooth_svd": candidates * one["svd"], "smooth_loss": candidates * one["loss"]}
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
    groups = [GroupShape("qkv", ((d, 3 * d),), (t_img,), eval_flops=attn),
              GroupShape("add_qkv", ((d, 3 * d),), (t_txt,), eval_flops=attn),
              GroupShape("out", ((d, d), (d, d)), (cap(t_img), cap(t_txt)), hessian_inputs=2),
              GroupShape("ff.fc1", ((d, h),), (cap(t_img),)), GroupShape("ff.fc2", ((h, d),), (cap(t_img),)),
              GroupShape("ff_context.fc1", ((d, h),), (cap(t_txt),)),
              GroupShape("ff_context.fc2", ((h, d),), (cap(t_txt),))]
    return groups, attention(samples) + mlp(t_img) + mlp(t_txt)
  if kind == "flux_single":
    forward = single(samples)
    groups = [GroupShape("qkv_mlp", ((d, 3 * d), (d, h)), (t_all, t_all), eval_flops=single(ev)),
              GroupShape("proj_out_attn", ((d, d),), (cap(t_all),)),
              GroupShape("proj_out_mlp", ((h, d),), (cap(t_all),))]
    return groups, forward
  raise ValueError(f"unknown FLUX block kind {kind!r}; expected 'flux_double' or 'flux_single'")


def block_flops(groups: Sequence[GroupShape], forward_flops: float, *, rank: int = 32, candidates: int = 39,
                lowrank_iters: int = 100, shared_branch: bool = False, gptq: bool = False,
                svd_iters: int = DEFAULT_SVD_ITERS, oversample: int | None = None) -> dict[str, float]:
  """FLOPs of one block per stage (:data:`STAGES`, plus the ``*_svd`` / ``*_loss`` split and ``total``)."""
  out = dict.fromkeys(("smooth_svd", "smooth_loss", "lowrank_svd", "lowrank_loss", "gptq"), 0.0)
  for g in groups:
    for key, value in group_flops(g, rank=rank, candidates=candidates, lowrank_iters=lowrank_iters,
                                  shared_branch=shared_branch, gptq=gptq, svd_iters=svd_iters,
                                  oversample=oversample).items():
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


__all__ = ["STAGES", "GroupShape", "matmul_flops", "svd_flops", "linear_loss_flops", "candidate_flops",
           "group_flops", "flux_block_groups", "block_flops", "estimate_seconds"]
