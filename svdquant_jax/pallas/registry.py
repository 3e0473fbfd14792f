"""Backend registry and the public op :func:`svdquant_linear`.

A backend registers a capability check and a run function. The check raises
``NotImplementedError`` with the reason when the backend cannot take a call (format, group
size, rank, dtype, device). ``svdquant_linear(..., backend=None)`` takes the highest-priority
backend whose check passes and otherwise falls back to the pure-jnp reference, logging each
distinct reason once (absl logging); an explicitly requested backend that cannot take the call
raises. NVFP4 and INT8 (W8A8) layers run on the reference path.

The device is the default device (``jax.devices()[0]``): the choice is made at trace time,
where a traced ``x`` has no device of its own.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable

import jax
from absl import logging

from svdquant_jax.pallas import mosaic_gpu, reference, triton
from svdquant_jax.formats.packing import QuantizedLinear, check_inputs

Array = jax.Array
REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class Backend:
  """A registered implementation of the op.

  Attributes:
    name: the ``backend=`` name.
    priority: higher is preferred when ``backend=None``.
    check: ``check(params, x_dtype, interpret) -> None``; raises ``NotImplementedError``
      with the reason when the backend cannot take the call.
    run: ``run(x, params, interpret) -> y`` with ``x [..., K]`` and ``y [..., N]``.
    supports_interpret: whether ``interpret=True`` runs it on CPU (Pallas interpret mode).
  """
  name: str
  priority: int
  check: Callable[[QuantizedLinear, Any, bool], None]
  run: Callable[[Array, QuantizedLinear, bool], Array]
  supports_interpret: bool = False


_BACKENDS: dict[str, Backend] = {}
_WARNED: set[str] = set()
_LOCK = threading.Lock()


def register_backend(backend: Backend, *, replace: bool = False) -> None:
  """Adds ``backend`` to the registry (``replace=True`` to overwrite a name)."""
  with _LOCK:
    if backend.name in _BACKENDS and not replace:
      raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def registered_backends() -> tuple[Backend, ...]:
  """All backends, highest priority first."""
  with _LOCK:
    return tuple(sorted(_BACKENDS.values(), key=lambda b: -b.priority))


def get_backend(name: str) -> Backend:
  with _LOCK:
    if name not in _BACKENDS:
      raise ValueError(f"unknown backend {name!r}; registered: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def _warn_once(reason: str) -> None:
  with _LOCK:
    if reason in _WARNED:
      return
    _WARNED.add(reason)
  logging.warning("svdquant_linear: falling back to the reference path: %s", reason)


def select_backend(params: QuantizedLinear, x_dtype: Any, *, backend: str | None = None,
                   interpret: bool = False) -> Backend:
  """The backend that runs a call.

  Raises:
    ValueError: ``backend`` names no registered backend.
    NotImplementedError: the requested ``backend`` cannot take this call (with the reason).
  """
  if backend is not None:
    chosen = get_backend(backend)
    chosen.check(params, x_dtype, interpret)
    return chosen
  reasons = []
  for candidate in registered_backends():
    if candidate.name == REFERENCE:
      continue
    try:
      candidate.check(params, x_dtype, interpret)
    except NotImplementedError as e:
      reasons.append(str(e))
      continue
    return candidate
  if reasons:  # one warning for the call, naming why each backend could not take it
    _warn_once("; ".join(reasons))
  return get_backend(REFERENCE)


def svdquant_linear(x: Array, params: QuantizedLinear, *, backend: str | None = None,
                    interpret: bool = False) -> Array:
  """The fused SVDQuant linear ``y = Qa((x + δ)/λ)·Qw(R) + (x·lora_down)·lora_up + b_eff``.

  Args:
    x: activations ``[..., K]`` (bf16, fp16 or fp32); the output has the same dtype.
    params: the packed layer.
    backend: ``None`` (best available, else the reference with a logged warning) or a
      registered name (``"reference"``, ``"triton"``, ``"mosaic_gpu"``).
    interpret: run Pallas backends in interpret mode (CPU; for tests).

  Returns:
    ``y [..., N]`` in ``x.dtype`` (float32 accumulation).

  Raises:
    QuantizedLinearError: shapes/dtypes that do not match the params, K not a multiple of 64
      (4-bit formats), an unknown format.
    NotImplementedError: an explicitly requested backend that cannot take the call.
  """
  check_inputs(x, params)
  chosen = select_backend(params, x.dtype, backend=backend, interpret=interpret)
  return chosen.run(x, params, interpret)


# ----------------------------------------------------------------------------- built-in backends
def _reference_check(params: QuantizedLinear, x_dtype: Any, interpret: bool) -> None:
  del params, x_dtype, interpret


_reference_jit = jax.jit(reference.svdquant_linear_reference)
_triton_jit = jax.jit(triton.svdquant_linear_triton, static_argnames=("config", "interpret"))


def _reference_run(x: Array, params: QuantizedLinear, interpret: bool) -> Array:
  del interpret
  return _reference_jit(x, params)


def _triton_check(params: QuantizedLinear, x_dtype: Any, interpret: bool) -> None:
  triton.check_supported(params, x_dtype, interpret=interpret)


def _triton_run(x: Array, params: QuantizedLinear, interpret: bool) -> Array:
  return _triton_jit(x, params, interpret=interpret)


register_backend(Backend(REFERENCE, 0, _reference_check, _reference_run, supports_interpret=True))
register_backend(Backend(triton.NAME, 10, _triton_check, _triton_run, supports_interpret=True))

_mosaic_jit = jax.jit(mosaic_gpu.svdquant_linear_mosaic_gpu, static_argnames=("tile", "interpret"))


def _mosaic_check(params: QuantizedLinear, x_dtype: Any, interpret: bool) -> None:
  mosaic_gpu.check_supported(params, x_dtype, interpret=interpret)


def _mosaic_run(x: Array, params: QuantizedLinear, interpret: bool) -> Array:
  return _mosaic_jit(x, params, interpret=interpret)


# Below Triton until timed on a GPU; in interpret mode only where tests/mosaic_gpu_shim.py is installed.
register_backend(Backend(mosaic_gpu.NAME, 5, _mosaic_check, _mosaic_run, supports_interpret=False))
