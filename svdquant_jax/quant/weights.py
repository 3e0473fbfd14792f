"""The SVDQuant linear in float form and its fake-quantized forward.

One linear layer ``y = x @ W + b`` (kernel ``W [K, N]``) becomes (``docs/design.md``, canonical
formula; paper Eq. 5-6; the shift before the smoothing, as deepcompressor and Nunchaku)::

  x̃ = (x + δ) / λ,   Ŵ = diag(λ) W = R + A B,
  y = Qa(x̃) · Qw(R) + ((x / λ) · A) · B + b_eff,   b_eff = b - Σ_k (δ / λ_k) · Qw(R)[k, :]

Without quantization this is exactly ``x W + b``: the δ term of the main path is compensated by
``b_eff`` and the branch reads the unshifted ``x / λ``.

:class:`SVDQuantWeights` holds the float pieces (λ, R, A, B, b), :func:`fake_forward` evaluates
the formula with fake quantizers, :func:`to_lora_down` gives the deployed ``lora_down = diag(1/λ) A``
that reads the raw input. The transforms that produce these pieces (``smooth.py``,
``lowrank.py``, ``gptq.py``) and the whole-layer entry point (``svdquant.py``) build on this module.

Everything here works on float32 copies of the kernels (the searches compare small error
differences); the scales of the quantizers follow ``QuantFormat.scale_dtype``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from svdquant_jax.formats.quantizers import (
    QuantFormat, QuantizedWeight, dequantize_weight, fake_quant_act,
    fake_quant_weight, true_divide)
from svdquant_jax.formats.rotation import HadamardRotation, rotate_inputs

Array = jax.Array
# Matmul precision of every quantization computation: on GPU, DEFAULT may run f32 matmuls in
# TF32 (10-bit mantissa), which would blur the small loss differences the searches compare.
PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, eq=False)
class SVDQuantWeights:
  """Float form of one SVDQuant linear (a pytree; all arrays float32).

  Attributes:
    smooth: ``λ [K]``: the input divisor (``x̂ = x / λ``); ones when not smoothed.
    residual: ``R [K, N] = diag(λ) W - A B``, not quantized.
    lora_a: ``A [K, r]``: the branch down-projection acting on the smoothed ``x̂`` (orthonormal
      columns, deepcompressor's ``a`` transposed).
    lora_b: ``B [r, N]``: the branch up-projection (singular values folded in).
    bias: ``b [N]``: the original bias (the shift compensation is applied by the forward).
    residual_q: optional real quantized residual. ``None`` (the usual case): the quantized
      residual is ``Qw(R)`` (RTN with the format's absmax scales). Set by GPTQ (whose codes are not
      an RTN of any float tensor we keep) and by error-compensation baselines: then it replaces
      ``Qw(R)`` everywhere, and ``residual`` keeps the float R it was computed from.
    rotation: optional Hadamard rotation of the input (static metadata; ``None``: none). When
      set, every piece lives in the rotated space: the layer reads ``x' = x Q`` (Q of
      :class:`~svdquant_jax.formats.rotation.HadamardRotation`) and the forwards rotate ``x``
      first; the deployed layer rotates online.
  """
  smooth: Array
  residual: Array
  lora_a: Array
  lora_b: Array
  bias: Array
  residual_q: QuantizedWeight | None = None
  rotation: HadamardRotation | None = None

  @property
  def rank(self) -> int:
    return self.lora_a.shape[-1]

  @property
  def in_features(self) -> int:
    return self.residual.shape[-2]

  @property
  def out_features(self) -> int:
    return self.residual.shape[-1]


jax.tree_util.register_dataclass(
    SVDQuantWeights, data_fields=["smooth", "residual", "lora_a", "lora_b", "bias", "residual_q"],
    meta_fields=["rotation"])


def plain_weights(kernel: Array, bias: Array | None = None, smooth: Array | None = None) -> SVDQuantWeights:
  """A layer without low-rank branch (rank 0): ``R = diag(λ) W`` (λ = ones by default)."""
  k, n = kernel.shape
  lam = jnp.ones((k,), jnp.float32) if smooth is None else smooth.astype(jnp.float32)
  b = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  return SVDQuantWeights(lam, lam[:, None] * kernel.astype(jnp.float32), jnp.zeros((k, 0), jnp.float32),
                         jnp.zeros((0, n), jnp.float32), b)


def act_shift(fmt: QuantFormat, shift: float) -> float:
  """The activation shift δ actually applied: ``shift`` for INT4 activations, else 0.

  Nunchaku shifts the fc2 input (GELU output) only in its INT4 path; other formats quantize the
  signed input directly.
  """
  return float(shift) if fmt.act == "int4" else 0.0


def quantized_residual(w: SVDQuantWeights, fmt: QuantFormat) -> Array:
  """``Qw(R) [K, N]`` in float32 (from ``residual_q`` when set)."""
  if w.residual_q is not None:
    return dequantize_weight(w.residual_q, fmt, jnp.float32)
  return fake_quant_weight(w.residual.astype(jnp.float32), fmt)


def effective_bias(w: SVDQuantWeights, fmt: QuantFormat, shift: float = 0.0) -> Array:
  """``b_eff = b - Σ_k (δ / λ_k) Qw(R)[k, :]`` ``[N]`` (float32): the bias with the shift of the
  quantized path compensated exactly."""
  delta = act_shift(fmt, shift)
  if not delta:
    return w.bias
  return w.bias - shift_compensation(w.smooth, quantized_residual(w, fmt), delta)


def shift_compensation(smooth: Array, qw: Array, delta: float, precision: Any = PRECISION) -> Array:
  """``Σ_k (δ / λ_k) · Qw(R)[k, :]`` ``[N]`` in float32: what the shift δ adds to the quantized
  path ``((x + δ)/λ) · Qw(R)`` (``qw [K, N]``)."""
  shifted = true_divide(jnp.full(smooth.shape, delta, jnp.float32), smooth.astype(jnp.float32))
  return jnp.dot(shifted, qw.astype(jnp.float32), precision=precision)


def to_lora_down(w: SVDQuantWeights) -> Array:
  """The deployed down-projection ``diag(1/λ) A [K, r]``: reads the raw (unsmoothed) input."""
  return true_divide(w.lora_a, w.smooth[:, None])


def fake_forward(x: Array, w: SVDQuantWeights, fmt: QuantFormat, shift: float = 0.0,
                 precision: Any = PRECISION) -> Array:
  """The canonical SVDQuant linear with fake quantizers.

  ``y = Qa(x̃) Qw(R) + ((x / λ) A) B + b - Σ_k (δ / λ_k) Qw(R)[k, :]``, ``x̃ = (x + δ) / λ``
  (correctly rounded division); with ``w.rotation``, ``x`` is first rotated (``x Q``, float32).
  The branch reads the unshifted, unquantized ``x / λ``; everything is computed in float32.

  Args:
    x: ``[..., K]``.
    w: the layer.
    fmt: quantization format (``fmt.act is None``: weight-only, ``Qa`` is the identity).
    shift: δ for the unsigned INT4 fc2 input (:data:`GELU_SHIFT`); a static Python float,
      ignored (δ = 0) unless ``fmt.act == "int4"``.
    precision: matmul precision.

  Returns:
    ``[..., N]`` in ``x.dtype``.
  """
  delta = act_shift(fmt, shift)
  xf = x.astype(jnp.float32)
  if w.rotation is not None:
    xf = rotate_inputs(xf, w.rotation)
  x_hat = true_divide(xf, w.smooth)  # IEEE, as the deployed kernels divide
  x_tilde = true_divide(xf + jnp.float32(delta), w.smooth) if delta else x_hat
  qa = fake_quant_act(x_tilde, fmt, unsigned=delta > 0)
  qw = quantized_residual(w, fmt)
  y = jnp.dot(qa, qw, precision=precision)
  if w.rank:
    y = y + jnp.dot(jnp.dot(x_hat, w.lora_a, precision=precision), w.lora_b, precision=precision)
  y = y + w.bias
  if delta:
    y = y - shift_compensation(w.smooth, qw, delta, precision)
  return y.astype(x.dtype)


def as_traceable_loss(loss_fn: Callable) -> Callable:
  """Makes ``loss_fn`` a valid ``jax.jit`` argument.

  A pytree callable (``jax.tree_util.Partial`` of a module-level function, or a registered
  dataclass with ``__call__`` such as :class:`~svdquant_jax.quant.smooth.LinearOutputLoss`) passes
  through: its arrays are traced, so one compilation serves every call with the same shapes.
  A plain function or closure is wrapped in ``Partial``; it is then part of the compilation cache
  key (a new closure object recompiles, and arrays it closes over become constants).
  """
  leaves = jax.tree_util.tree_leaves(loss_fn)
  if any(callable(leaf) for leaf in leaves):
    return jax.tree_util.Partial(loss_fn)
  return loss_fn
