"""Two gaps of jax 0.10.2's Mosaic GPU interpreter that the SVDQuant Mosaic GPU GEMM needs filled.

Pinned to jax 0.10.2 (private ``jax._src`` modules; :func:`install` checks the version). Both are
test-only; the kernel itself is the one that lowers for CUDA:

* ``plgpu.layout_cast`` has no CPU rule. Layouts only exist on the GPU, so it is the identity.
* an 8-bit ``wgmma`` wants its B operand K-major, ``transpose_ref(w_smem [N, K], (1, 0))``; the
  interpreter's wgmma callback only reads plain ``[K, N]`` buffers. The wrapper drops the
  transpose from B's transforms and transposes the buffer it reads instead.
"""

from __future__ import annotations

import threading

import jax
import numpy

SUPPORTED_JAX = ("0.10.2",)
_LOCK = threading.Lock()
_INSTALLED = False


class _TransposingNumpy:
  """``numpy`` with ``matmul(a, b)`` computing ``a @ b.T`` (swapped in for one callback)."""

  def __getattr__(self, name):
    return getattr(numpy, name)

  @staticmethod
  def matmul(a, b, **kwargs):
    return numpy.matmul(a, numpy.swapaxes(b, -1, -2), **kwargs)


def install() -> None:
  """Idempotent. Raises ``RuntimeError`` on a jax version the shim was not checked against."""
  global _INSTALLED
  if _INSTALLED:
    return
  if jax.__version__ not in SUPPORTED_JAX:
    raise RuntimeError(f"tests/mosaic_gpu_shim.py was checked against jax {SUPPORTED_JAX}, found {jax.__version__}")
  from jax._src.interpreters import mlir
  from jax._src.pallas.mosaic_gpu import core as gpu_core
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.state.types import TransposeTransform

  mlir.register_lowering(gpu_core.layout_cast_p, mlir.lower_fun(lambda x, new_layout: x, multiple_results=False),
                         platform="cpu")
  original = gpu_callbacks.wgmma

  def wgmma(*, b_transforms, **kwargs):
    transposes = [t for t in b_transforms if isinstance(t, TransposeTransform)]
    if not transposes:
      return original(b_transforms=b_transforms, **kwargs)
    if len(transposes) > 1 or not isinstance(b_transforms[-1], TransposeTransform) \
        or tuple(transposes[0].permutation) != (1, 0):
      raise NotImplementedError(f"mosaic_gpu_shim: B transforms {b_transforms}")
    with _LOCK:
      gpu_callbacks.np = _TransposingNumpy()
      try:
        return original(b_transforms=tuple(b_transforms[:-1]), **kwargs)
      finally:
        gpu_callbacks.np = numpy

  gpu_callbacks.wgmma = wgmma
  _INSTALLED = True
