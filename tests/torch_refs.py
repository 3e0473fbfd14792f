"""Helpers for the torch-side references of the tests (torch is a test-only dependency).

``import_torchvision()``: torchvision 0.28 (the release that matches torch 2.13) registers fake-tensor
kernels for its compiled ops ``torchvision::nms`` / ``torchvision::qnms`` at import time. With the
CPU torch wheel beside a torchvision wheel whose C++ extension does not load, those operators are
never defined and ``import torchvision`` fails with ``operator torchvision::nms does not exist``.
Defining the two schemas first (nothing here calls them) lets torchvision's Python models import;
packages that import torchvision (``lpips``) work after this has run.
"""

from __future__ import annotations

import importlib
import sys
import warnings

_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # kept alive: dropping the Library object would remove the definitions


def import_torchvision():
  """``import torchvision``, defining its missing ``nms``/``qnms`` operator schemas if needed."""
  global _LIBRARY
  if "torchvision" in sys.modules:
    return sys.modules["torchvision"]
  import torch
  missing = [name for name in _OPS if not _has_op(torch, name)]
  if missing and _LIBRARY is None:
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for name in missing:
      _LIBRARY.define(_OPS[name])
  return importlib.import_module("torchvision")


def _has_op(torch, name: str) -> bool:
  try:
    torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    return True
  except RuntimeError:
    return False


def import_lpips():
  """The reference ``lpips`` package (imports torchvision through :func:`import_torchvision`)."""
  import_torchvision()
  return importlib.import_module("lpips")


def torch_lpips(state: dict, net: str):
  """``lpips.LPIPS(net, version="0.1")`` in eval mode holding ``state`` (name -> numpy array).

  The trunk is built without ImageNet weights (``pnet_rand=True``: nothing is downloaded) and the
  lin layers without lpips' bundled files (``pretrained=False``); ``state`` provides both, strictly.
  """
  import torch
  lpips = import_lpips()
  with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=`` argument
    warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
    model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False)
  tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  own = model.state_dict()
  expected = {k for k in own if not k.startswith(("scaling_layer.", "lins."))}
  if set(tensors) != expected:
    raise KeyError(f"state does not match lpips.LPIPS({net!r}): missing {sorted(expected - set(tensors))}, "
                   f"unexpected {sorted(set(tensors) - expected)}")
  model.load_state_dict(tensors, strict=False)
  return model.eval()


def perturb_norms_and_biases(model, seed: int, keep: tuple[str, ...] = ()) -> None:
  """Random norm weights and biases (but parameters whose name contains a ``keep`` entry), so that a
  mis-mapped scale or bias cannot go unnoticed in a parity test."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if any(k in name for k in keep):
        continue
      if "norm" in name and name.endswith("weight"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
