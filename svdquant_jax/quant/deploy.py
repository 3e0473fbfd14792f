"""Deployment: the packed, runnable layer of a calibrated :class:`SVDQuantWeights`.

:func:`to_quantized_linear` is the one way from the quantization code's float form to the packed
:class:`~svdquant_jax.formats.packing.QuantizedLinear` that the fused op (``svdquant_jax.pallas``)
and ``SVDQuantDense`` run. It keeps the calibrated residual codes: GPTQ's ``residual_q`` when set,
else the RTN codes of ``residual`` with the format's scales, i.e. exactly the ``Qw(R)`` that
:func:`~svdquant_jax.quant.weights.fake_forward` (the function every search minimised) evaluates.
``packing.from_components(residual=...)`` instead re-quantizes a float residual with RTN and would
drop GPTQ's codes.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from svdquant_jax.formats import packed_format, packing
from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError, quantize_weight
from svdquant_jax.quant.weights import SVDQuantWeights, act_shift


def to_quantized_linear(weights: SVDQuantWeights, fmt: QuantFormat, *, shift: float = 0.0,
                        dtype: Any = None) -> packing.QuantizedLinear:
  """The deployed (packed) form of one calibrated SVDQuant linear.

  In float32 (``dtype=float32``) the result run through the reference op equals
  ``fake_forward(x, weights, fmt, shift)`` up to float rounding (the codes, scales and shift are
  the same; only the summation order differs).

  Args:
    weights: one layer (``[K, N]`` residual; index a vmapped group first), as returned by
      :func:`~svdquant_jax.quant.svdquant.quantize_linear_group`.
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
    ``b - δ 1ᵀ Qw(R)``.

  Raises:
    QuantizationError: a weight-only format (use :func:`svdquant_jax.nn.weight_only_params`), a
      W/A combination without packed form, a residual that is not ``[K, N]``, or weight scales
      that ``dtype`` would round.
  """
  fmt_name = packed_format(fmt)
  if weights.residual.ndim != 2:
    raise QuantizationError(f"to_quantized_linear: weights.residual must be [K, N], got shape "
                            f"{tuple(weights.residual.shape)} (index a vmapped group of layers first)")
  dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
  rq = weights.residual_q if weights.residual_q is not None else quantize_weight(weights.residual, fmt)
  if fmt_name != "nvfp4" and jnp.promote_types(rq.scales.dtype, dtype) != dtype:
    raise QuantizationError(
        f"to_quantized_linear: the layer's weight scales are {jnp.dtype(rq.scales.dtype).name} "
        f"(fmt.scale_dtype={fmt.scale_dtype!r}); storing them in {dtype.name} would round them and change the "
        f"calibrated layer. Calibrate with scale_dtype={dtype.name!r} or deploy in a wider dtype")
  return packing.from_components(
      weights.smooth, weights.lora_a, weights.lora_b, weights.bias, codes=rq.codes, scales=rq.scales,
      tensor_scale=rq.tensor_scale if fmt_name == "nvfp4" else None, fmt=fmt_name, shift=act_shift(fmt, shift),
      group_size=fmt.group_size if fmt_name == "int4" else None, dtype=dtype)


__all__ = ["to_quantized_linear"]
