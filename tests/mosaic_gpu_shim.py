"""Two gaps of jax 0.10.2's Mosaic GPU interpreter that the SVDQuant Mosaic GPU GEMM needs filled.

Pinned to jax 0.10.2 (private ``jax._src`` modules; :func:`install` checks the version). Both are
test-only; the kernel itself is the one that lowers for CUDA:

* ``plgpu.layout_cast`` has no CPU rule. Layouts only exist on the GPU, so it is the identity.
* an 8-bit ``wgmma`` wants its B operand K-major, ``transpose_ref(w_smem [N, K], (1, 0))``; the
  interpreter's wgmma callback only reads plain ``[K, N]`` buffers. The wrapper drops the
  transpose from B's transforms and transposes the buffer it reads instead.

The transpose is thread-local: the interpreter runs each simulated warpgroup in its own thread,
and the callbacks' module-level ``np`` is shared. (A first version swapped ``np`` for the duration
of the call, under a lock that only the patched callback took: with two compute warpgroups, one
warpgroup's untransposed low-rank wgmma can run during the other's transposed int8 wgmma and then
computes ``a @ b.T``, silently where ``b`` is square. The most likely cause of one failed run of
the two-warpgroup interpreter test, relative error 0.69; it did not recur in 4 reruns.)
"""

from __future__ import annotations

import threading

import jax
import numpy

SUPPORTED_JAX = ("0.10.2",)
_INSTALLED = False
_LOCAL = threading.local()


class _Numpy:
  """``numpy``, except that ``matmul(a, b)`` computes ``a @ b.T`` in a thread that is inside a
  transposed-B wgmma callback (installed as the callbacks' ``np``)."""

  def __getattr__(self, name):
    return getattr(numpy, name)

  @staticmethod
  def matmul(a, b, **kwargs):
    if getattr(_LOCAL, "transpose_b", False):
      b = numpy.swapaxes(b, -1, -2)
    return numpy.matmul(a, b, **kwargs)


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
    _LOCAL.transpose_b = True
    try:
      return original(b_transforms=tuple(b_transforms[:-1]), **kwargs)
    finally:
      _LOCAL.transpose_b = False

  gpu_callbacks.np = _Numpy()
  gpu_callbacks.wgmma = wgmma
  _INSTALLED = True
