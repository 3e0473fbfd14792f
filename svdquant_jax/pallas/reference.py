"""Pure-jnp reference of the fused SVDQuant linear op: it runs everywhere and defines correctness.

The op is split as Nunchaku splits it (``docs/kernels.md`` §1), so that each GPU kernel has a reference:

* **kernel 1** (:func:`quantize_activations`): one read of ``x``: shift, then smoothing,
  ``x̃ = (x + δ)/λ``, each step rounded to the activation dtype as the engine's 16-bit
  arithmetic does (``x + δ`` rounded; the correctly rounded float32 quotient rounded), dynamic
  per-token per-group quantization with the project's quantizers
  (:mod:`svdquant_jax.formats.quantizers`, the engine's activation quantizer: scale
  ``s = absmax · fl(1/qmax)`` in float32, codes ``rint(x̃ · fl(1/s))`` saturated, 0 where ``s``
  is 0, ``s`` stored in its storage dtype), and the low-rank down-projection
  ``lora_act = x · lora_down`` on the raw ``x``, accumulated in float32. Every step is an IEEE
  operation, so a kernel that performs the same operations reproduces the codes and scales bit
  for bit.
* **kernel 2** (:func:`gemm`): the group-scaled integer GEMM computed exactly: the int32 dot of
  each quantization group, converted to float32 and scaled by ``s_x[m, g] · s_w[g, n]`` and
  accumulated over groups in order; then the epilogue: ``· wtscale`` and ``· wcscales[n]`` (NVFP4
  per-tensor and per-channel weight scales, when present), ``+ lora_act · lora_up + b_eff``, and
  one rounding to the activation dtype. ``lora_act`` is rounded to the activation dtype before
  its product with ``lora_up`` (as Nunchaku's fp16/bf16 MMA epilogue does; no rounding for
  float32 activations).

NVFP4 group sums are exact too: E2M1 values are multiples of 1/2 up to 6, so twice the codes'
values are integers and their group dot is an exact int32, scaled by 1/4. INT8 (W8A8) has one
group per row (per-token x per-channel scales).

Compute dtype: the activation dtype. ``lora_down`` / ``lora_up`` are cast to it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from svdquant_jax.formats.packing import QuantizedLinear, check_inputs
from svdquant_jax.formats import quantizers as q

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST
# The quantizers' correctly rounded division (public name if it gets one). Without it, plain
# division (then XLA on CPU may be 1 ulp off under jit, and the exactness tests say so).
_QUANTIZER_DIVIDE = (getattr(q, "true_divide", None) or getattr(q, "_true_divide", None)
                     or (lambda a, b: jnp.asarray(a, jnp.float32) / jnp.asarray(b, jnp.float32)))


@dataclasses.dataclass(frozen=True)
class QuantizedActivations:
  """Output of kernel 1 in the reference (unpacked) form.

  Attributes:
    codes: ``[M, K]``: int4 ``int8`` in [-8, 7] (or [0, 15] when shifted); nvfp4 ``uint8``
      E2M1 codes; int8 ``int8`` in [-127, 127].
    scales: ``[M, K/G]``: int4 in the activation dtype, nvfp4 ``float8_e4m3fn``, int8
      ``float32 [M, 1]``.
    lora_act: ``float32 [M, r]``.
  """
  codes: Array
  scales: Array
  lora_act: Array


jax.tree_util.register_dataclass(QuantizedActivations, data_fields=["codes", "scales", "lora_act"], meta_fields=[])


def true_divide(a: Any, b: Any) -> Array:
  """Correctly rounded float32 ``a / b``: the quantizers' division (XLA on CPU turns a division
  by a broadcast into a product with the reciprocal, up to 1 ulp off; the quantizers correct it).
  """
  return _QUANTIZER_DIVIDE(a, b)


def smooth_input(x: Array, params: QuantizedLinear) -> Array:
  """``x̃ = (x + δ)/λ`` ``[..., K]`` as float32 values of ``x.dtype``: ``x + δ`` rounded to
  ``x.dtype``, then the correctly rounded quotient rounded to ``x.dtype`` (no rounding for float32
  activations)."""
  xs = x.astype(jnp.float32)
  if params.shift:
    xs = (xs + jnp.float32(params.shift)).astype(x.dtype).astype(jnp.float32)
  xs = true_divide(xs, params.smooth.astype(jnp.float32))
  return xs.astype(x.dtype).astype(jnp.float32)


def lora_down_projection(x: Array, params: QuantizedLinear) -> Array:
  """``x · lora_down`` with float32 accumulation: ``float32 [..., r]``."""
  return jnp.dot(x, params.lora_down.astype(x.dtype), preferred_element_type=jnp.float32, precision=_HIGHEST)


def quantize_activations(x: Array, params: QuantizedLinear) -> QuantizedActivations:
  """Kernel 1 of the reference: ``x [M, K]`` -> codes, scales, ``lora_act``."""
  xs = smooth_input(x, params)
  if params.fmt == "int4":
    codes, scales = q.quantize_int4_act(xs, params.group_size, unsigned=params.act_unsigned, scale_dtype=x.dtype)
  elif params.fmt == "nvfp4":
    codes, scales = q.quantize_nvfp4_act(xs, params.group_size)
  else:
    codes, scales = q.quantize_int8_act(xs)
  return QuantizedActivations(codes, scales, lora_down_projection(x, params))


def _integer_operands(acts: QuantizedActivations, params: QuantizedLinear) -> tuple[Array, Array, Array, Array]:
  """Integer activation/weight operands ``[M, K]``, ``[K, N]`` (int8) and the float32 scales
  ``[M, K/G]``, ``[K/G, N]`` whose product scales each group's integer dot."""
  if params.fmt == "nvfp4":
    # 2 * E2M1 value is an integer in [-12, 12]; the 1/4 goes into the activation scale.
    a = (2.0 * q.e2m1_decode(acts.codes)).astype(jnp.int8)
    w = (2.0 * q.e2m1_decode(params.weight_codes())).astype(jnp.int8)
    sa = acts.scales.astype(jnp.float32) * 0.25
    return a, w, sa, params.wscales.astype(jnp.float32)
  return (acts.codes.astype(jnp.int8), params.weight_codes().astype(jnp.int8), acts.scales.astype(jnp.float32),
          params.wscales.astype(jnp.float32))


def group_sums(a: Array, w: Array, group_size: int) -> Array:
  """Exact per-group integer dots: ``int8 [M, K] x int8 [K, N] -> int32 [K/G, M, N]``.

  Memory grows with ``K/G``: for tests and small shapes (the op itself scans over groups).
  """
  m, k = a.shape
  g = k // group_size
  ag = a.reshape(m, g, group_size).transpose(1, 0, 2)
  wg = w.reshape(g, group_size, -1)
  return jax.lax.dot_general(ag, wg, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.int32)


def gemm(acts: QuantizedActivations, params: QuantizedLinear, out_dtype: jnp.dtype) -> Array:
  """Kernel 2 of the reference: ``[M, N]`` in ``out_dtype``.

  ``y = (Σ_g (dot_int32(a_g, w_g) · s_x[:, g]) · s_w[g, :]) · wtscale · wcscales
  + cast(lora_act) · lora_up + b_eff``, the group terms added in group order in float32.
  """
  a, w, sa, sw = _integer_operands(acts, params)
  m, k = a.shape
  n = w.shape[1]
  g = sw.shape[0]
  gs = k // g
  ag = a.reshape(m, g, gs).transpose(1, 0, 2)
  wg = w.reshape(g, gs, n)

  def add_group(acc, xs):
    a_g, w_g, sa_g, sw_g = xs
    psum = jnp.dot(a_g, w_g, preferred_element_type=jnp.int32)
    return acc + psum.astype(jnp.float32) * sa_g[:, None] * sw_g[None, :], None

  acc, _ = jax.lax.scan(add_group, jnp.zeros((m, n), jnp.float32), (ag, wg, sa.T, sw))
  acc = apply_weight_scales(acc, params)
  if params.rank:
    lora_act = acts.lora_act.astype(out_dtype)
    acc = acc + jnp.dot(lora_act, params.lora_up.astype(out_dtype), preferred_element_type=jnp.float32,
                        precision=_HIGHEST)
  if params.bias is not None:
    acc = acc + params.bias.astype(jnp.float32)[None, :]
  return acc.astype(out_dtype)


def apply_weight_scales(acc: Array, params: QuantizedLinear) -> Array:
  """``acc · wtscale · wcscales[n]`` in float32 (each factor only when present)."""
  if params.wtscale is not None:
    acc = acc * params.wtscale.astype(jnp.float32).reshape(())
  if params.wcscales is not None:
    acc = acc * params.wcscales.astype(jnp.float32)[None, :]
  return acc


def svdquant_linear_reference(x: Array, params: QuantizedLinear) -> Array:
  """The fused SVDQuant linear in pure jnp: ``x [..., K] -> y [..., N]`` in ``x.dtype``."""
  check_inputs(x, params)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, params.in_features)
  y = gemm(quantize_activations(x2, params), params, x.dtype)
  return y.reshape(*lead, params.out_features)
