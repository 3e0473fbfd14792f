"""The Mosaic GPU backend through the shared kernel tests (``kernel_test_base``), compiled on a GPU.

These run with ``SVDQUANT_KERNEL_TESTS=native`` on a Hopper GPU (``launch/gpu_check.sh`` does), one
class per kernel form: the tile table's one-warpgroup tile, two compute warpgroups, and the 4-bit
weight unpacked in the kernel. On CPU they skip: there the kernel is checked in jax's GPU
interpreter (``tests/test_mosaic_gpu.py``, subprocesses with the interpreter shim) and by lowering.
Kernel 1 of this backend is the reference's (jnp), so only kernel 2 and the public op are tested.
"""

from __future__ import annotations

from typing import Any

import jax
import pytest

from kernel_test_base import NATIVE, KernelTestBase
from svdquant_jax.pallas import mosaic_gpu

pytestmark = pytest.mark.skipif(
    not NATIVE, reason="compiled Mosaic GPU kernels need a Hopper GPU (SVDQUANT_KERNEL_TESTS=native); "
                       "the CPU checks are tests/test_mosaic_gpu.py")


class _MosaicForm(KernelTestBase):
  BACKEND = mosaic_gpu.NAME
  TILE: mosaic_gpu.MosaicTile | None = None   # None: the tile table's entry for the device

  test_kernel1_matches_reference_exactly = None   # kernel 1 is the reference's own (jnp)

  def run_kernel2(self, codes: jax.Array, scales: jax.Array, lora_act: jax.Array | None, params: Any,
                  out_dtype: Any) -> jax.Array:
    try:
      mosaic_gpu.check_supported(params, out_dtype)
    except NotImplementedError as e:
      pytest.skip(str(e))
    tile = self.TILE or mosaic_gpu.mosaic_tile()
    return mosaic_gpu.gemm(codes, scales, lora_act, params, out_dtype, tile)


class TestMosaicGpuTableTile(_MosaicForm):
  pass


class TestMosaicGpuTwoWarpgroups(_MosaicForm):
  TILE = mosaic_gpu.MosaicTile(128, 128, 4, compute_wgs=2)
  test_public_op_matches_reference = None   # the public op runs the table's tile (the class above)


class TestMosaicGpuPackedWeight(_MosaicForm):
  TILE = mosaic_gpu.MosaicTile(128, 64, 4, packed_weight=True)
  test_public_op_matches_reference = None
