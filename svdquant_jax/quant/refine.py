"""Learned refinement of the continuous SVDQuant pieces (after the search, and after GPTQ).

The smoothing search, the alternating low-rank loop and GPTQ each fix one piece while choosing
another. Refinement then moves the continuous pieces of a layer group jointly by gradient descent
on the group's output error over the calibration tokens:

  * ``"lowrank"``: the branch factors ``A_i [K, r]`` and ``B_i [r, N_i]`` of every layer;
  * ``"smooth"``: the shared smoothing vector λ ``[K]``, in log space (``λ = λ₀ · exp(s)``).

The objective is ``Σ_i ||x W_i + b_i - ŷ_i||² / Σ_i ||x W_i + b_i||²`` with ``ŷ_i`` the canonical
formula of ``weights.py``. The residual's codes stay fixed: the RTN codes of the residual the
search left (``residual_q = Qw(R₀)``), or GPTQ's codes when GPTQ ran; the refined layer carries
them in ``residual_q`` (``residual`` keeps ``R₀``), so the deployed layer is exactly the one
optimized. The activation quantizer is passed by a straight-through estimator
``v + stop_gradient(Qa(v) - v)`` on ``x̃ = (x + δ)/λ``. Refining *through* the residual's RTN with
an STE (``R = diag(λ) W - A B`` re-quantized) was tried first: its gradient with respect to ``A B``
is ``x̂ - Qa(x̃)`` only (the weight STE hides how ``AB`` moves the codes), and the loss rose from the
first step on every layer we measured (docs/quantization.md), so the codes are frozen instead;
with them fixed, the branch is a least-squares fit of the quantized path's error, and λ rescales
the quantized path's input channels.

The pieces are parametrized relative to their start (``A = A₀ + rms(A₀) · dA``), so one Adam
learning rate fits every layer; the schedule is a cosine decay over ``steps``, all steps run in
one ``lax.scan`` inside the caller's ``jit``. The parameters with the lowest objective seen
(step 0 = the unrefined layers) are kept, and the result is accepted only if the group's own loss
(``loss_fn``, e.g. the enclosing module's output error) is not higher than before, so refinement
can never end worse than where it started. With ``tokens > 0`` each step's gradient uses that
many calibration tokens drawn from ``seed`` (the objective used for keeping the best is still
over all tokens); everything is deterministic given the seed.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from svdquant_jax.formats.quantizers import QuantFormat, dequantize_weight, fake_quant_act, quantize_weight
from svdquant_jax.quant.weights import PRECISION, SVDQuantWeights

Array = jax.Array
PIECES = ("lowrank", "smooth")


@dataclasses.dataclass(frozen=True)
class RefineSettings:
  """How to refine (hashable: part of the static :class:`~svdquant_jax.quant.settings.PTQSettings`).

  Attributes:
    steps: optimizer steps (0: no refinement; the exact SVDQuant pipeline).
    lr: peak Adam learning rate of the relative parameters (cosine decay to 0 over ``steps``).
    pieces: which pieces move, some of :data:`PIECES`.
    tokens: calibration tokens per gradient step (0: all of them, full-batch).
    seed: seed of the token draws.
  """
  steps: int = 0
  lr: float = 3e-3
  pieces: tuple[str, ...] = PIECES
  tokens: int = 0
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "pieces", tuple(self.pieces))
    if self.steps < 0 or self.tokens < 0:
      raise ValueError(f"quant.refine.steps and quant.refine.tokens must be >= 0, got {self.steps}, {self.tokens}")
    if not self.lr > 0:
      raise ValueError(f"quant.refine.lr must be positive, got {self.lr}")
    unknown = sorted(set(self.pieces) - set(PIECES))
    if unknown or not self.pieces:
      raise ValueError(f"quant.refine.pieces must be a non-empty subset of {PIECES}, got {self.pieces}")

  @property
  def enabled(self) -> bool:
    return self.steps > 0


@dataclasses.dataclass(frozen=True, eq=False)
class RefineInfo:
  """Diagnostics of :func:`refine_group` (a pytree).

  Attributes:
    losses: ``[steps + 1]`` the relative STE objective at the start of each step and after the last.
    best_step: ``int32 []`` index into ``losses`` of the kept parameters (0: the start).
    loss_before, loss_after: the group loss (``loss_fn``) of the input and of the returned layers.
    accepted: ``bool []`` whether the refined layers were kept (``loss_after < loss_before``).
  """
  losses: Array
  best_step: Array
  loss_before: Array
  loss_after: Array
  accepted: Array


jax.tree_util.register_dataclass(
    RefineInfo, data_fields=["losses", "best_step", "loss_before", "loss_after", "accepted"], meta_fields=[])


def _ste(v: Array, q: Array) -> Array:
  return v + jax.lax.stop_gradient(q - v)


def _rms(a: Array) -> Array:
  return jnp.maximum(jnp.sqrt(jnp.mean(a * a)) if a.size else jnp.ones((), jnp.float32), 1e-12)


def _apply(params, start: Sequence[SVDQuantWeights]) -> list[SVDQuantWeights]:
  """The layers at ``params`` (relative offsets from ``start``; the residual codes unchanged)."""
  lam = start[0].smooth * jnp.exp(params["log_smooth"])
  return [dataclasses.replace(w0, smooth=lam, lora_a=w0.lora_a + _rms(w0.lora_a) * da,
                              lora_b=w0.lora_b + _rms(w0.lora_b) * db)
          for w0, da, db in zip(start, params["a"], params["b"])]


def ste_forward(x: Array, w: SVDQuantWeights, fmt: QuantFormat, delta: float) -> Array:
  """``fake_forward``'s formula with a straight-through activation quantizer and fixed residual
  codes (``w.residual_q``, required): ``x [T, K]`` -> ``[T, N]`` float32."""
  x_hat = x / w.smooth
  x_tilde = (x + delta) / w.smooth if delta else x_hat
  qa = _ste(x_tilde, fake_quant_act(x_tilde, fmt, unsigned=delta > 0))
  qw = dequantize_weight(w.residual_q, fmt, jnp.float32)
  y = jnp.dot(qa, qw, precision=PRECISION) + w.bias
  if w.rank:
    y = y + jnp.dot(jnp.dot(x_hat, w.lora_a, precision=PRECISION), w.lora_b, precision=PRECISION)
  if delta:
    y = y - jnp.dot(delta / w.smooth, qw, precision=PRECISION)
  return y


def refine_group(layers: Sequence[SVDQuantWeights], kernels: Sequence[Array], x: Array, fmt: QuantFormat,
                 deltas: Sequence[float], settings: RefineSettings,
                 loss_fn: Callable) -> tuple[list[SVDQuantWeights], RefineInfo]:
  """Refines the pieces of one layer group (traceable; call inside ``jit``).

  Args:
    layers: per kernel the quantized layer (one shared λ, own branch; float32).
    kernels: per kernel ``W_i [K, N_i]`` float32.
    x: ``[T, K]`` float32 calibration inputs.
    fmt: quantization format.
    deltas: per kernel the applied activation shift δ (``act_shift``).
    settings: :class:`RefineSettings` with ``steps > 0``.
    loss_fn: the group loss ``loss_fn(list of layers) -> scalar`` deciding acceptance.

  Returns:
    ``(layers, info)``: the refined layers, or, when refinement did not lower ``loss_fn``, the
    input layers; either way with ``residual_q`` set (``Qw(R₀)`` for an RTN start: the same
    function and the same deployed codes as ``residual_q=None``).
  """
  original = list(layers)
  layers = [w if w.residual_q is not None else dataclasses.replace(w, residual_q=quantize_weight(w.residual, fmt))
            for w in original]
  targets = [jnp.dot(x, w, precision=PRECISION) + l.bias for w, l in zip(kernels, layers)]
  norm = sum(jnp.sum(t * t) for t in targets)
  norm = jnp.where(norm > 0, norm, 1.0)

  def objective(params, idx=None):
    total = jnp.zeros((), jnp.float32)
    xs = x if idx is None else x[idx]
    for layer, target, delta in zip(_apply(params, layers), targets, deltas):
      t = target if idx is None else target[idx]
      err = t - ste_forward(xs, layer, fmt, delta)
      total = total + jnp.sum(err * err)
    return total / (norm if idx is None else norm * xs.shape[0] / x.shape[0])

  params = {"log_smooth": jnp.zeros_like(layers[0].smooth),
            "a": [jnp.zeros_like(l.lora_a) for l in layers], "b": [jnp.zeros_like(l.lora_b) for l in layers]}
  frozen = {"log_smooth": "smooth" not in settings.pieces, "a": "lowrank" not in settings.pieces,
            "b": "lowrank" not in settings.pieces}
  labels = {key: (["frozen" if frozen[key] else "train"] * len(v) if isinstance(v, list)
                  else ("frozen" if frozen[key] else "train")) for key, v in params.items()}
  schedule = optax.cosine_decay_schedule(settings.lr, settings.steps)
  opt = optax.multi_transform({"train": optax.adam(schedule), "frozen": optax.set_to_zero()}, labels)
  batch = settings.tokens if 0 < settings.tokens < x.shape[0] else 0
  key = jax.random.PRNGKey(settings.seed)

  def step(carry, i):
    p, state, best_p, best_loss, best_i = carry
    if batch:
      full = objective(p)
      idx = jax.random.choice(jax.random.fold_in(key, i), x.shape[0], (batch,), replace=False)
      grads = jax.grad(objective)(p, idx)
    else:
      full, grads = jax.value_and_grad(objective)(p)
    better = full < best_loss
    best_p = jax.tree_util.tree_map(lambda new, old: jnp.where(better, new, old), p, best_p)
    best_loss, best_i = jnp.where(better, full, best_loss), jnp.where(better, i, best_i)
    updates, state = opt.update(grads, state, p)
    return (optax.apply_updates(p, updates), state, best_p, best_loss, best_i), full

  init = (params, opt.init(params), params, jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32))
  (p, _, best_p, best_loss, best_i), losses = jax.lax.scan(
      step, init, jnp.arange(settings.steps, dtype=jnp.int32))
  last = objective(p)
  use_last = last < best_loss
  best_p = jax.tree_util.tree_map(lambda new, old: jnp.where(use_last, new, old), p, best_p)
  best_i = jnp.where(use_last, settings.steps, best_i)
  losses = jnp.concatenate([losses, last[None]])

  refined = _apply(best_p, layers)
  before, after = loss_fn(original), loss_fn(refined)
  accepted = after < before
  kept = [jax.tree_util.tree_map(lambda new, old: jnp.where(accepted, new, old), r, w)
          for r, w in zip(refined, layers)]
  info = RefineInfo(losses, best_i.astype(jnp.int32), before, jnp.where(accepted, after, before), accepted)
  return kept, info


__all__ = ["PIECES", "RefineSettings", "RefineInfo", "ste_forward", "refine_group"]
