"""Randomized Hadamard rotation of a linear group's input space, on the PTQ side.

The rotation itself (``Q = diag(s) · blockdiag(H_b)``, the fast transform, ``make_rotation``) is
in :mod:`svdquant_jax.formats.rotation`, below the deployed layer that applies it online; it is
re-exported here. This module adds :func:`rotate_group` (rotate a group's kernels and calibration
inputs before the smoothing search), :class:`RotationSettings` (``quant.rotation``) and
:func:`group_seed` (the per-group seed of a PTQ run).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import jax
import numpy as np

from svdquant_jax.formats.quantizers import QuantizationError
from svdquant_jax.formats.rotation import (MIN_BLOCK, HadamardRotation, largest_power_of_two_divisor, make_rotation,
                                           online_flops, rotate_inputs, rotate_kernel, rotate_online, unrotate_inputs,
                                           walsh_hadamard)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RotationSettings:
  """Whether and how PTQ rotates each W/A layer group's input (hashable: part of the static
  :class:`~svdquant_jax.quant.settings.PTQSettings`; config section ``quant.rotation``).

  Attributes:
    enabled: rotate (off by default: the exact SVDQuant pipeline).
    seed: run seed; each group's sign seed is :func:`group_seed` of it and the group's kind (the
      last part of its name, ``qkv`` of ``transformer_blocks_3/qkv``): the groups of one kind share
      one rotation in every block, so that (the seed being static) they share one compiled search.
    block: Hadamard block size (0: the largest power of two dividing K).
    min_block: smallest accepted block; a group whose K has none is refused (naming it).
  """
  enabled: bool = False
  seed: int = 0
  block: int = 0
  min_block: int = MIN_BLOCK

  def __post_init__(self):
    if self.seed < 0 or self.block < 0 or self.min_block < 1:
      raise ValueError(f"quant.rotation: seed and block must be >= 0 and min_block >= 1, got seed={self.seed}, "
                       f"block={self.block}, min_block={self.min_block}")

  def rotation(self, k: int, name: str) -> HadamardRotation:
    """The rotation of the group ``name`` (``"<block>/<group>"`` or ``"<group>"``) reading a ``K``-wide input.

    Raises:
      QuantizationError: no valid block (names the group, K and the fix).
    """
    return make_rotation(k, group_seed(self.seed, name.rsplit("/", 1)[-1]), self.block or None, self.min_block,
                         name=name)


def group_seed(seed: int, name: str) -> int:
  """The sign seed of the group ``name`` in a run seeded ``seed``: a stable hash (not Python's
  salted ``hash``), so the same run rotates the same group the same way on every machine."""
  digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
  return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def rotate_group(kernels: Sequence[Array], x: Array, seed: int = 0, block: int | None = None,
                 name: str = "linear", min_block: int = MIN_BLOCK) -> tuple[list[Array], Array, HadamardRotation]:
  """Rotates a linear group that reads ``x [..., K]``: ``(kernels', x', rot)`` with
  ``x' W'_i = x W_i`` (to float32 rounding). The hook before the smoothing search: quantize the
  returned kernels on ``x'``, store ``rot`` (K, block, seed) with the layer, and rotate the input
  online (or fold ``Q`` into the previous op) at inference."""
  if not kernels:
    raise QuantizationError(f"{name}: kernels is empty")
  k = int(np.shape(kernels[0])[0])
  for i, w in enumerate(kernels):
    if np.ndim(w) != 2 or np.shape(w)[0] != k:
      raise QuantizationError(f"{name}: kernel {i} has shape {np.shape(w)}, expected [K={k}, N]")
  if np.shape(x)[-1] != k:
    raise QuantizationError(f"{name}: x has shape {np.shape(x)}, expected [..., K={k}]")
  rot = make_rotation(k, seed, block, min_block, name=name)
  return [rotate_kernel(w, rot) for w in kernels], rotate_inputs(x, rot), rot


__all__ = ["MIN_BLOCK", "HadamardRotation", "walsh_hadamard", "largest_power_of_two_divisor", "make_rotation",
           "rotate_inputs", "rotate_kernel", "unrotate_inputs", "rotate_online", "rotate_group", "group_seed",
           "RotationSettings", "online_flops"]
