"""Number formats: the quantizers (``quantizers.py``) and the packed SVDQuant linear (``packing.py``).

The vocabulary both share lives here, in one place:

* :data:`PACKED_FORMATS`: the formats of the fused W/A op's packed layer
  (:class:`~svdquant_jax.formats.packing.QuantizedLinear` ``fmt``) and their weight group sizes
  along K (:data:`PACKED_GROUP_SIZE`; INT8 has one group per output channel, i.e. K);
* :data:`WEIGHT_ONLY_FORMATS`: the packed weight-only (W4A16) layer formats;
* :func:`packed_format`: which packed format runs a quantization code's
  :class:`~svdquant_jax.formats.quantizers.QuantFormat`.
"""

from __future__ import annotations

from svdquant_jax.formats.quantizers import QuantFormat, QuantizationError

PACKED_FORMATS = ("int4", "nvfp4", "int8")
PACKED_GROUP_SIZE = {"int4": 64, "nvfp4": 16}
WEIGHT_ONLY_FORMATS = ("int4", "nf4")


def packed_group_size(fmt: str, k: int) -> int:
  """The weight group size along K of a packed format (``k`` for INT8's per-channel scales)."""
  if fmt not in PACKED_FORMATS:
    raise QuantizationError(f"unknown packed format {fmt!r}; expected one of {PACKED_FORMATS}")
  return PACKED_GROUP_SIZE.get(fmt, k)


def packed_format(fmt: QuantFormat) -> str:
  """The :class:`~svdquant_jax.formats.packing.QuantizedLinear` format name (``"int4"``, ``"nvfp4"``,
  ``"int8"``) of a W/A format.

  Raises:
    QuantizationError: ``fmt`` is weight-only (deployed with :func:`svdquant_jax.nn.weight_only_params`
      as a ``WeightOnlyDense``), or its weights and activations use different formats (no packed
      op runs them).
  """
  if fmt.act is None:
    raise QuantizationError(f"{fmt} is weight-only (W4A16): it has no packed SVDQuant form; deploy it with "
                            "svdquant_jax.nn.weight_only_params (a WeightOnlyDense layer)")
  if fmt.weight not in PACKED_FORMATS or fmt.act != fmt.weight:
    raise QuantizationError(f"{fmt}: the packed SVDQuant linear runs weights and activations in the same format, "
                            f"one of {list(PACKED_FORMATS)}; got weights {fmt.weight!r}, activations {fmt.act!r}")
  return fmt.weight


__all__ = ["PACKED_FORMATS", "PACKED_GROUP_SIZE", "WEIGHT_ONLY_FORMATS", "packed_format", "packed_group_size"]
