"""``WeightOnlyDense``: 4-bit weights, 16-bit activations (W4A16), a drop-in for ``nn.Dense``.

Used for the FLUX adaLN modulation linears (INT4 g64 weight-only in SVDQuant models, as
deepcompressor; ``docs/quantization.md``, "deepcompressor's recipe", layer coverage)
and for the weight-only baselines (INT4 g64, NF4 g64). The forward dequantizes the packed
weight to the activation dtype and runs a 16-bit matmul; XLA fuses the dequantization.

INT4 is held in the Nunchaku engine's AWQ (W4A16) form: unsigned codes ``u`` with a scale and a
zero point per group, ``w = u·s + z`` computed in float32 and rounded once to the activation dtype
(the engine's fused multiply-add). Our PTQ writes symmetric RTN codes ``q in [-7, 7]`` as
``u = q + 7``, ``s = absmax/7`` and ``z = -dtype(7·s)`` (``quantizers.quantize_awq_weight``);
an imported layer may carry any zeros.

Parameters (collection ``params``), ``K`` inputs, ``N`` outputs, group size ``G``:

=============  ============================  ================================================
``qweight``    ``uint8 [N, K/2]``            packed unsigned 4-bit codes, K-major, split-half
                                             nibble order (``formats/packing.py``); int4: ``u``
                                             in [0, 15]; nf4: index into NF4_VALUES
``wscales``    ``[K/G, N]`` ``param_dtype``  group scales (int4: ``s``; nf4: absmax)
``wzeros``     ``[K/G, N]`` ``param_dtype``  int4 only: group zero points ``z``
``bias``       ``[N]``                       optional
=============  ============================  ================================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from svdquant_jax.formats import WEIGHT_ONLY_FORMATS, packing
from svdquant_jax.formats import quantizers as q
from svdquant_jax.utils import trees

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WeightOnlySpec:
  """Static settings of a weight-only layer (the :func:`~svdquant_jax.nn.swap_dense` selector value)."""
  fmt: str = "int4"
  group_size: int = 64

  def __post_init__(self):
    if self.fmt not in WEIGHT_ONLY_FORMATS:
      raise ValueError(f"weight-only format must be one of {WEIGHT_ONLY_FORMATS}, got {self.fmt!r}")


def weight_only_shapes(in_features: int, features: int, spec: WeightOnlySpec, use_bias: bool,
                       param_dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The layer's parameters (name -> shape/dtype); validates K against packing and groups."""
  k, n = in_features, features
  if k % packing.PACK_BLOCK or k % spec.group_size:
    raise packing.QuantizedLinearError(f"WeightOnlyDense: {k} input features is not a multiple of "
                                       f"{max(packing.PACK_BLOCK, spec.group_size)}")
  sd = jax.ShapeDtypeStruct
  groups = sd((k // spec.group_size, n), jnp.dtype(param_dtype))
  shapes = {"qweight": sd((n, k // 2), jnp.uint8), "wscales": groups}
  if spec.fmt == "int4":
    shapes["wzeros"] = groups
  if use_bias:
    shapes["bias"] = sd((n,), jnp.dtype(param_dtype))
  return shapes


def dequantize(params: Mapping[str, Array], spec: WeightOnlySpec, dtype: Any = jnp.float32) -> Array:
  """The float kernel ``[K, N]`` of a weight-only layer's params (int4: ``u·s + z`` in float32,
  one rounding to ``dtype``)."""
  codes = packing.unpack(params["qweight"], layout="KN", signed=False)
  if spec.fmt == "int4":
    return q.dequantize_awq_weight(codes, params["wscales"], params["wzeros"], dtype)
  return q.dequantize_nf4_weight(codes, params["wscales"], dtype)


def awq_params(codes: Array, scales: Array, bias: Array | None, dtype: Any = None) -> dict[str, Array]:
  """INT4 weight-only params from symmetric codes ``q int [K, N]`` in [-7, 7] and their group
  scales ``[K/G, N]`` (e.g. GPTQ's): ``u = q + 7``, ``z = awq_zeros(s)``, all in ``dtype``
  (default the scales' dtype; the scales must be exactly representable in it)."""
  dtype = jnp.dtype(scales.dtype if dtype is None else dtype)
  scales = jnp.asarray(scales)
  if jnp.promote_types(scales.dtype, dtype) != dtype:
    raise packing.QuantizedLinearError(f"awq_params: {jnp.dtype(scales.dtype).name} scales would be rounded to "
                                       f"{dtype.name}; quantize with scales in {dtype.name}")
  scales = scales.astype(dtype)
  u = (jnp.asarray(codes).astype(jnp.int32) + q.INT4_MAX).astype(jnp.uint8)
  out = {"qweight": packing.pack(u, layout="KN", signed=False), "wscales": scales, "wzeros": q.awq_zeros(scales)}
  if bias is not None:
    out["bias"] = jnp.asarray(bias).astype(dtype)
  return out


def weight_only_params(kernel: Array, bias: Array | None, spec: WeightOnlySpec, dtype: Any = None) -> dict[str, Array]:
  """Quantizes a float kernel ``[K, N]`` (RTN, scales in ``dtype``, default the kernel's); int4 in
  the AWQ form (:func:`awq_params`)."""
  dtype = jnp.dtype(kernel.dtype if dtype is None else dtype)
  if spec.fmt == "int4":
    codes, scales = q.quantize_int4_weight(kernel, spec.group_size, scale_dtype=dtype)
    return awq_params(codes, scales, bias, dtype)
  codes, scales = q.quantize_nf4_weight(kernel, spec.group_size, scale_dtype=dtype)
  out = {"qweight": packing.pack(codes, layout="KN", signed=False), "wscales": scales.astype(dtype)}
  if bias is not None:
    out["bias"] = jnp.asarray(bias).astype(dtype)
  return out


class WeightOnlyDense(nn.Module):
  """W4A16 linear layer; same attributes as ``nn.Dense`` plus the spec.

  ``wrapped``: set by :func:`~svdquant_jax.nn.swap_dense`, the ``nn.Dense`` replaced; the two
  share a scope so that the parameters live at the Dense's path.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  spec: WeightOnlySpec = WeightOnlySpec()
  wrapped: nn.Module | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.wrapped is not None and self.scope is not None:
      nn.share_scope(self, self.wrapped)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``x [..., K] -> [..., features]`` in ``dtype`` (or the promoted input/param dtype)."""
    shapes = weight_only_shapes(x.shape[-1], self.features, self.spec, self.use_bias, self.param_dtype)
    values = {name: self.param(name, lambda _, s=s: jnp.zeros(s.shape, s.dtype)) for name, s in shapes.items()}
    dtype = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(x.dtype, self.param_dtype)
    y = jnp.dot(x.astype(dtype), dequantize(values, self.spec, dtype))
    if self.use_bias:
      y = y + values["bias"].astype(dtype)
    return y

  def check_params(self, params: Mapping[str, Any], in_features: int) -> None:
    want = weight_only_shapes(in_features, self.features, self.spec, self.use_bias, self.param_dtype)
    trees.validate_tree(dict(params), want, what="WeightOnlyDense params")
