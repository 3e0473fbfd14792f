"""Deployment: the packed, runnable layer of a calibrated :class:`SVDQuantWeights`.

:func:`to_quantized_linear` is the one way from the quantization code's float form to the packed
:class:`~svdquant_jax.formats.packing.QuantizedLinear` that the fused op (``svdquant_jax.pallas``)
and ``SVDQuantDense`` run. It keeps the calibrated residual codes: GPTQ's ``residual_q`` when set,
else the RTN codes of ``residual`` with the format's scales, i.e. exactly the ``Qw(R)`` that
:func:`~svdquant_jax.quant.weights.fake_forward` (the function every search minimised) evaluates.
``packing.from_components(residual=...)`` instead re-quantizes a float residual with RTN and would
drop GPTQ's codes.

Deployment runs on the host: with concrete values, ``lora_down = dtype(A / λ)`` and the shift
compensation of the bias are computed in float64 and rounded once (as deepcompressor's exporter
computes them), and ``smooth = dtype(λ)``.

Several calibrated layers that read one input through one λ and one shared branch (e.g. q, k, v
calibrated with ``shared_branch=True``) deploy as one fused layer (their output channels
concatenated). In NVFP4 each member keeps its own per-tensor weight scale: the fused layer holds
them as per-channel scales ``wcscales`` (and ``wtscale = 1``), as Nunchaku's fused qkv layers do.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats import packed_format, packing
from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError, QuantizedWeight, quantize_weight
from svdquant_jax.quant.weights import SVDQuantWeights, act_shift


def _quantized(w: SVDQuantWeights, fmt: QuantFormat) -> QuantizedWeight:
  return w.residual_q if w.residual_q is not None else quantize_weight(w.residual, fmt)


def _check_members(members: Sequence[SVDQuantWeights]) -> None:
  """Fused members must share λ and the branch's down factor (bitwise)."""
  first = members[0]
  for i, w in enumerate(members[1:], 1):
    if w.in_features != first.in_features or w.rank != first.rank:
      raise QuantizationError(f"to_quantized_linear: member {i} is [K={w.in_features}, r={w.rank}], member 0 is "
                              f"[K={first.in_features}, r={first.rank}]; fused members share the input and branch")
    if not np.array_equal(np.asarray(w.smooth), np.asarray(first.smooth)):
      raise QuantizationError(f"to_quantized_linear: member {i} has another smoothing λ than member 0; fused members "
                              "read one input through one λ (calibrate them as one group)")
    if w.rotation != first.rotation:
      raise QuantizationError(f"to_quantized_linear: member {i} has input rotation {w.rotation}, member 0 has "
                              f"{first.rotation}; fused members read one (rotated) input")
    if not np.array_equal(np.asarray(w.lora_a), np.asarray(first.lora_a)):
      raise QuantizationError(f"to_quantized_linear: member {i} has another branch down factor A than member 0; "
                              "fuse only layers calibrated with shared_branch=True")


def to_quantized_linear(weights: SVDQuantWeights | Sequence[SVDQuantWeights], fmt: QuantFormat, *,
                        shift: float = 0.0, dtype: Any = None) -> packing.QuantizedLinear:
  """The deployed (packed) form of one calibrated SVDQuant linear, or of several fused into one.

  In float32 (``dtype=float32``) the result run through the reference op equals
  ``fake_forward(x, weights, fmt, shift)`` (for members: their outputs concatenated) up to float
  rounding (the codes, scales and shift are the same; only the summation order differs).

  Args:
    weights: one layer (``[K, N]`` residual; index a vmapped group first), as returned by
      :func:`~svdquant_jax.quant.svdquant.quantize_linear_group`; or a sequence of layers sharing
      λ and the branch's ``A`` (one group calibrated with ``shared_branch=True``), fused along N.
    fmt: the format it was calibrated in: W4A4 INT4 (-> packed ``"int4"``, group size
      ``fmt.group_size``), NVFP4 (-> ``"nvfp4"``) or W8A8 (-> ``"int8"``).
    shift: the activation shift δ used in calibration (``GELU_SHIFT`` for an fc2 input); applied,
      as in :func:`~svdquant_jax.quant.weights.act_shift`, for INT4 activations only and ignored
      (δ = 0) for the other formats.
    dtype: model dtype of λ, the low-rank factors, the bias and the INT4/INT8 weight scales
      (default float32). The weight scales must be storable in it without rounding (their dtype is
      ``fmt.scale_dtype``, float32 when unset): calibrate with ``fmt.scale_dtype`` equal to the
      deployment dtype, as the PTQ flow does.

  Returns:
    A validated :class:`~svdquant_jax.formats.packing.QuantizedLinear` whose bias is
    ``b - Σ_k (δ/λ_k) Qw(R)[k, :]``; fused NVFP4 members carry ``wcscales``; a rotated layer
    (``weights.rotation``) carries ``rotation_block``/``rotation_seed``.

  Raises:
    QuantizationError: a weight-only format (use :func:`svdquant_jax.nn.weight_only_params`), a
      W/A combination without packed form, a residual that is not ``[K, N]``, weight scales
      that ``dtype`` would round, or members that do not share λ and ``A``.
  """
  fmt_name = packed_format(fmt)
  members = [weights] if isinstance(weights, SVDQuantWeights) else list(weights)
  if not members:
    raise QuantizationError("to_quantized_linear: no layers given")
  for w in members:
    if w.residual.ndim != 2:
      raise QuantizationError(f"to_quantized_linear: weights.residual must be [K, N], got shape "
                              f"{tuple(w.residual.shape)} (index a vmapped group of layers first)")
  _check_members(members)
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  rqs = [_quantized(w, fmt) for w in members]
  if fmt_name != "nvfp4" and jnp.promote_types(rqs[0].scales.dtype, dtype) != dtype:
    raise QuantizationError(
        f"to_quantized_linear: the layer's weight scales are {jnp.dtype(rqs[0].scales.dtype).name} "
        f"(fmt.scale_dtype={fmt.scale_dtype!r}); storing them in {dtype.name} would round them and change the "
        f"calibrated layer. Calibrate with scale_dtype={dtype.name!r} or deploy in a wider dtype")
  first = members[0]
  codes = jnp.concatenate([rq.codes for rq in rqs], axis=1)
  scales = jnp.concatenate([rq.scales for rq in rqs], axis=1)
  lora_b = jnp.concatenate([w.lora_b for w in members], axis=1)
  bias = jnp.concatenate([w.bias for w in members])
  tensor_scale = channel_scales = None
  if fmt_name == "nvfp4":
    if len(members) == 1:
      tensor_scale = rqs[0].tensor_scale
    else:
      tensor_scale = jnp.ones((), jnp.float32)
      channel_scales = jnp.concatenate([jnp.full((w.out_features,), rq.tensor_scale, jnp.float32)
                                        for w, rq in zip(members, rqs)])
  ql = packing.from_components(
      first.smooth, first.lora_a, lora_b, bias, codes=codes, scales=scales, tensor_scale=tensor_scale,
      channel_scales=channel_scales, fmt=fmt_name, shift=act_shift(fmt, shift),
      group_size=fmt.group_size if fmt_name == "int4" else None, dtype=dtype)
  if first.rotation is not None:  # the pieces live in the rotated space; the layer rotates x online
    ql = ql.replace(rotation_block=first.rotation.block, rotation_seed=first.rotation.seed)
    ql.validate()
  return ql


__all__ = ["to_quantized_linear"]
