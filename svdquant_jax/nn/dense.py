"""``SVDQuantDense``: a drop-in for ``flax.linen.Dense`` (and an nnx twin) running the fused
SVDQuant linear (:func:`svdquant_jax.pallas.svdquant_linear`: the reference on CPU, a Pallas
kernel on a GPU).

Parameters (collection ``params``), for ``K`` inputs, ``N = features`` outputs, rank ``r``:

=============  =======================================  =====================================
name           shape / dtype                            meaning (``pallas/packing.py``)
=============  =======================================  =====================================
``qweight``    ``uint8 [N, K/2]`` (int8: ``int8 [N, K]``)  packed residual codes, K-major
``wscales``    ``[K/G, N]`` ``param_dtype``              group scales (nvfp4: float8_e4m3fn)
``wtscale``    ``float32 [1]``                          nvfp4 only: per-tensor scale
``wcscales``   ``float32 [N]``                          nvfp4 with ``channel_scales`` only:
                                                        per-output-channel scales
``smooth``     ``[K]``                                  λ
``lora_down``  ``[K, r]``                               ``diag(1/λ)·A``
``lora_up``    ``[r, N]``                               ``B``
``bias``       ``[N]``                                  ``b_eff``; present when ``use_bias`` or
                                                        a shift δ > 0 (its compensation)
=============  =======================================  =====================================

The layer computes ``Qa((x + δ)/λ)·Qw(R)·wtscale·wcscales + (x·lora_down)·lora_up + bias``
(``docs/design.md``). A rotated layer (static ``rotation_block > 0``, from PTQ with
``quant.rotation``) first replaces ``x`` by ``x Q`` (seeded block Hadamard, fast transform in
float32, cast back to the computation dtype; ``formats/rotation.py``); the fused kernels then run
unchanged on the rotated input (the rotation is not fused into them yet). Whether ``wcscales``
exists is the static attribute ``channel_scales`` (``QuantSpec.channel_scales`` when swapped in),
so that the parameter shapes are known before the values.

A freshly initialized layer holds zero codes, unit scales and smoothing, zero low-rank
factors and bias (it computes zeros); real values come from :meth:`SVDQuantDense.from_float`,
:meth:`SVDQuantDense.from_quantized` or :meth:`SVDQuantDense.from_params`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from svdquant_jax.formats import PACKED_FORMATS, packed_group_size, packing
from svdquant_jax.formats.packing import QuantizedLinear
from svdquant_jax.formats.rotation import HadamardRotation, rotate_inputs
from svdquant_jax.pallas.registry import svdquant_linear
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import CheckpointError

Array = jax.Array
PARAM_NAMES = ("qweight", "wscales", "wtscale", "wcscales", "smooth", "lora_down", "lora_up", "bias")


def param_shapes(in_features: int, features: int, *, rank: int, fmt: str, shift: float, use_bias: bool,
                 param_dtype: Any, channel_scales: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The layer's parameters (name -> shape/dtype) for a format; validates the combination.

  ``channel_scales``: the layer has per-output-channel weight scales ``wcscales`` (nvfp4 only).
  """
  if fmt not in PACKED_FORMATS:
    raise packing.QuantizedLinearError(f"SVDQuantDense: unknown format {fmt!r}; expected one of {PACKED_FORMATS}")
  if channel_scales and fmt != "nvfp4":
    raise packing.QuantizedLinearError(f"SVDQuantDense: channel_scales (wcscales) exist for nvfp4 only, not "
                                       f"fmt={fmt!r}")
  k, n = in_features, features
  if fmt != "int8" and k % packing.PACK_BLOCK:
    raise packing.QuantizedLinearError(f"SVDQuantDense: {k} input features is not a multiple of "
                                       f"{packing.PACK_BLOCK} (4-bit packing)")
  if rank < 0:
    raise packing.QuantizedLinearError(f"SVDQuantDense: rank must be >= 0, got {rank}")
  pd = jnp.dtype(param_dtype)
  sd = jax.ShapeDtypeStruct
  shapes = {}
  if fmt == "int8":
    shapes["qweight"] = sd((n, k), jnp.int8)
    shapes["wscales"] = sd((1, n), pd)
  else:
    g = packed_group_size(fmt, k)
    shapes["qweight"] = sd((n, k // 2), jnp.uint8)
    shapes["wscales"] = sd((k // g, n), jnp.float8_e4m3fn if fmt == "nvfp4" else pd)
    if fmt == "nvfp4":
      shapes["wtscale"] = sd((1,), jnp.float32)
      if channel_scales:
        shapes["wcscales"] = sd((n,), jnp.float32)
  shapes["smooth"] = sd((k,), pd)
  shapes["lora_down"] = sd((k, rank), pd)
  shapes["lora_up"] = sd((rank, n), pd)
  if use_bias or shift:
    shapes["bias"] = sd((n,), pd)
  return shapes


def _init_value(name: str, shape: tuple[int, ...], dtype: Any) -> Array:
  if name in ("wscales", "wtscale", "wcscales", "smooth"):
    return jnp.ones(shape, dtype)
  return jnp.zeros(shape, dtype)


def quantized_linear(params: Mapping[str, Array], *, fmt: str, shift: float) -> QuantizedLinear:
  """The :class:`QuantizedLinear` held by a layer's params subtree."""
  group = packed_group_size(fmt, params["smooth"].shape[0])
  return QuantizedLinear(
      qweight=params["qweight"], wscales=params["wscales"], smooth=params["smooth"],
      lora_down=params["lora_down"], lora_up=params["lora_up"], bias=params.get("bias"),
      wtscale=params.get("wtscale"), wcscales=params.get("wcscales"), fmt=fmt, group_size=group,
      shift=float(shift))


def layer_params(ql: QuantizedLinear) -> dict[str, Array]:
  """A layer's params subtree from a :class:`QuantizedLinear` (inverse of :func:`quantized_linear`)."""
  ql.validate()
  out = {"qweight": ql.qweight, "wscales": ql.wscales, "smooth": ql.smooth, "lora_down": ql.lora_down,
         "lora_up": ql.lora_up}
  if ql.wtscale is not None:
    out["wtscale"] = ql.wtscale
  if ql.wcscales is not None:
    out["wcscales"] = ql.wcscales
  if ql.bias is not None:
    out["bias"] = ql.bias
  return out


def _compute_dtype(x: Array, dtype: Any, param_dtype: Any) -> Any:
  return jnp.dtype(dtype) if dtype is not None else jnp.result_type(x.dtype, param_dtype)


def _rotated(x: Array, block: int, seed: int) -> Array:
  """``x Q`` in float32 (from the input's own precision) when the layer is rotated, else ``x``."""
  return rotate_inputs(x, HadamardRotation(int(x.shape[-1]), block, seed)) if block else x


class SVDQuantDense(nn.Module):
  """SVDQuant W4A4 (or NVFP4 / W8A8) linear layer, a drop-in for ``nn.Dense``.

  Attributes:
    features: N, the number of outputs.
    use_bias: whether the layer has a bias (a shifted layer always stores ``b_eff``).
    dtype: computation (activation) dtype; ``None``: promote the input and ``param_dtype``
      as ``nn.Dense`` does. The output has this dtype.
    param_dtype: the model dtype of scales, smoothing, low-rank factors and bias.
    rank: r of the low-rank branch (0: none).
    fmt: ``"int4"``, ``"nvfp4"`` or ``"int8"``.
    shift: δ (``quantizers.GELU_SHIFT`` for unsigned fc2 inputs; int4 only).
    channel_scales: the layer has per-output-channel weight scales ``wcscales`` (nvfp4 only; a
      fused layer whose members had different per-tensor scales).
    backend: ``svdquant_linear`` backend (``None``: best available).
    interpret: run Pallas backends in interpret mode (CPU tests).
    rotation_block, rotation_seed: the online input rotation (block 0: none).
    wrapped: set by :func:`svdquant_jax.nn.swap_dense`: the ``nn.Dense`` this layer replaces;
      the two share a scope so that the parameters live at the Dense's path.
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  rank: int = 32
  fmt: str = "int4"
  shift: float = 0.0
  channel_scales: bool = False
  backend: str | None = None
  interpret: bool = False
  rotation_block: int = 0
  rotation_seed: int = 0
  wrapped: nn.Module | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.wrapped is not None and self.scope is not None:
      nn.share_scope(self, self.wrapped)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """``x [..., K] -> y [..., features]`` in the computation dtype."""
    shapes = param_shapes(x.shape[-1], self.features, rank=self.rank, fmt=self.fmt, shift=self.shift,
                          use_bias=self.use_bias, param_dtype=self.param_dtype, channel_scales=self.channel_scales)
    values = {name: self.param(name, lambda _, s=s, name=name: _init_value(name, s.shape, s.dtype))
              for name, s in shapes.items()}
    ql = quantized_linear(values, fmt=self.fmt, shift=self.shift)
    x = _rotated(x, self.rotation_block, self.rotation_seed).astype(_compute_dtype(x, self.dtype, self.param_dtype))
    return svdquant_linear(x, ql, backend=self.backend, interpret=self.interpret)

  # ---------------------------------------------------------------- constructors
  @classmethod
  def from_quantized(cls, ql: QuantizedLinear, *, use_bias: bool | None = None, dtype: Any = None,
                     backend: str | None = None, interpret: bool = False) -> tuple[SVDQuantDense, dict[str, Any]]:
    """``(module, variables)`` for a :class:`QuantizedLinear`; ``module.apply(variables, x)``."""
    ql.validate()
    module = cls(features=ql.out_features, use_bias=ql.bias is not None if use_bias is None else use_bias,
                 dtype=dtype, param_dtype=ql.dtype, rank=ql.rank, fmt=ql.fmt, shift=ql.shift,
                 channel_scales=ql.wcscales is not None, backend=backend, interpret=interpret,
                 rotation_block=ql.rotation_block, rotation_seed=ql.rotation_seed)
    params = layer_params(ql)
    module.check_params(params, ql.in_features)
    return module, {"params": params}

  @classmethod
  def from_float(cls, kernel: Array, bias: Array | None, smooth: Array, lora_down_s: Array, lora_up: Array, *,
                 fmt: str = "int4", shift: float = 0.0, residual: Array | None = None, dtype: Any = None,
                 backend: str | None = None, interpret: bool = False) -> tuple[SVDQuantDense, dict[str, Any]]:
    """From a float ``nn.Dense`` kernel ``[K, N]``/bias plus the SVDQuant pieces (λ, A, B and
    optionally the residual); see :func:`svdquant_jax.pallas.from_float`."""
    ql = packing.from_float(kernel, bias, smooth, lora_down_s, lora_up, fmt=fmt, shift=shift, residual=residual)
    return cls.from_quantized(ql, use_bias=bias is not None, dtype=dtype, backend=backend, interpret=interpret)

  @classmethod
  def from_params(cls, params: Mapping[str, Any], *, fmt: str = "int4", shift: float = 0.0,
                  use_bias: bool | None = None, dtype: Any = None, backend: str | None = None,
                  interpret: bool = False) -> tuple[SVDQuantDense, dict[str, Any]]:
    """From saved quantized params (a layer's subtree, e.g. read from safetensors).

    Raises:
      CheckpointError: a missing, unexpected or misshaped tensor (all named).
    """
    for name in ("wscales", "smooth", "lora_down"):
      if name not in params:
        raise CheckpointError(f"SVDQuantDense params: missing {name!r}; got {sorted(params)}")
    n, k = params["wscales"].shape[-1], params["smooth"].shape[0]
    module = cls(features=int(n), use_bias=("bias" in params) if use_bias is None else use_bias, dtype=dtype,
                 param_dtype=params["smooth"].dtype, rank=int(params["lora_down"].shape[-1]), fmt=fmt,
                 shift=shift, channel_scales="wcscales" in params, backend=backend, interpret=interpret)
    params = {name: jnp.asarray(v) for name, v in params.items()}
    module.check_params(params, int(k))
    return module, {"params": params}

  def check_params(self, params: Mapping[str, Any], in_features: int) -> None:
    """Checks a params subtree against this layer's parameters (paths, shapes, dtypes)."""
    want = param_shapes(in_features, self.features, rank=self.rank, fmt=self.fmt, shift=self.shift,
                        use_bias=self.use_bias, param_dtype=self.param_dtype, channel_scales=self.channel_scales)
    trees.validate_tree(dict(params), want, what="SVDQuantDense params")


class SVDQuantDenseNNX(nnx.Module):
  """The nnx twin of :class:`SVDQuantDense` (same parameters and numerics).

  Args:
    in_features, out_features: K and N.
    rank, fmt, shift, channel_scales, use_bias, dtype, param_dtype, backend, interpret,
      rotation_block, rotation_seed: as in :class:`SVDQuantDense`.
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int = 32, fmt: str = "int4",
               shift: float = 0.0, use_bias: bool = True, dtype: Any = None, param_dtype: Any = jnp.float32,
               backend: str | None = None, interpret: bool = False, channel_scales: bool = False,
               rotation_block: int = 0, rotation_seed: int = 0):
    shapes = param_shapes(in_features, out_features, rank=rank, fmt=fmt, shift=shift, use_bias=use_bias,
                          param_dtype=param_dtype, channel_scales=channel_scales)
    self.in_features, self.out_features = in_features, out_features
    self.fmt, self.shift, self.dtype, self.param_dtype = fmt, float(shift), dtype, param_dtype
    self.backend, self.interpret = backend, interpret
    self.rotation_block, self.rotation_seed = int(rotation_block), int(rotation_seed)
    if self.rotation_block:
      HadamardRotation(in_features, self.rotation_block, self.rotation_seed)  # validates the block
    for name in PARAM_NAMES:
      s = shapes.get(name)
      setattr(self, name, None if s is None else nnx.Param(_init_value(name, s.shape, s.dtype)))

  @classmethod
  def from_quantized(cls, ql: QuantizedLinear, *, dtype: Any = None, backend: str | None = None,
                     interpret: bool = False) -> SVDQuantDenseNNX:
    ql.validate()
    layer = cls(ql.in_features, ql.out_features, rank=ql.rank, fmt=ql.fmt, shift=ql.shift,
                use_bias=ql.bias is not None, dtype=dtype, param_dtype=ql.dtype, backend=backend,
                interpret=interpret, channel_scales=ql.wcscales is not None, rotation_block=ql.rotation_block,
                rotation_seed=ql.rotation_seed)
    for name, value in layer_params(ql).items():
      setattr(layer, name, nnx.Param(value))
    return layer

  @classmethod
  def from_float(cls, kernel: Array, bias: Array | None, smooth: Array, lora_down_s: Array, lora_up: Array, *,
                 fmt: str = "int4", shift: float = 0.0, residual: Array | None = None, dtype: Any = None,
                 backend: str | None = None, interpret: bool = False) -> SVDQuantDenseNNX:
    ql = packing.from_float(kernel, bias, smooth, lora_down_s, lora_up, fmt=fmt, shift=shift, residual=residual)
    return cls.from_quantized(ql, dtype=dtype, backend=backend, interpret=interpret)

  def quantized(self) -> QuantizedLinear:
    """The layer's current parameters as a :class:`QuantizedLinear` (with its rotation)."""
    values = {name: getattr(self, name)[...] for name in PARAM_NAMES if getattr(self, name) is not None}
    return quantized_linear(values, fmt=self.fmt, shift=self.shift).replace(
        rotation_block=self.rotation_block, rotation_seed=self.rotation_seed)

  def __call__(self, x: Array) -> Array:
    """``x [..., K] -> y [..., N]`` in the computation dtype."""
    x = _rotated(x, self.rotation_block, self.rotation_seed).astype(_compute_dtype(x, self.dtype, self.param_dtype))
    return svdquant_linear(x, self.quantized().unrotated(), backend=self.backend, interpret=self.interpret)
