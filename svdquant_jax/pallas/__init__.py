"""The fused SVDQuant linear op: packed format, pure-jnp reference, Pallas GPU backends.

Public API::

  y = svdquant_linear(x, params, backend=None)   # x [..., K] -> y [..., N]

``params`` is a :class:`QuantizedLinear` (``packing.py`` documents the packed format); build
one with :func:`from_components` (from the quantization code's float pieces) or
:func:`from_float` (from a float ``nn.Dense`` kernel). Backends: ``"reference"`` (pure jnp,
everywhere) and ``"triton"`` (Pallas-Triton, NVIDIA GPUs; ``interpret=True`` on CPU).
"""

from svdquant_jax.formats.packing import (
    FORMATS,
    QuantizedLinear,
    QuantizedLinearError,
    check_inputs,
    from_components,
    from_float,
    pack,
    pack_int4,
    unpack,
    unpack_int4,
)
from svdquant_jax.pallas.reference import svdquant_linear_reference
from svdquant_jax.pallas.registry import (
    Backend,
    get_backend,
    register_backend,
    registered_backends,
    select_backend,
    svdquant_linear,
)

__all__ = [
    "FORMATS", "QuantizedLinear", "QuantizedLinearError", "check_inputs", "from_components", "from_float", "pack",
    "pack_int4", "unpack", "unpack_int4", "svdquant_linear_reference", "Backend", "get_backend",
    "register_backend", "registered_backends", "select_backend", "svdquant_linear",
]
