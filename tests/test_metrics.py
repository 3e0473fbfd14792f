"""PSNR and SSIM against direct float64 numpy evaluations of their definitions."""

import numpy as np
import pytest

from svdquant_jax.eval import metrics


def _ssim_direct(a, b):
  """SSIM with explicit 11x11 Gaussian windows, one window position at a time (float64)."""
  x = np.arange(11) - 5.0
  g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
  w2 = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  vals = []
  for c in range(a.shape[-1]):
    for i in range(a.shape[0] - 10):
      for j in range(a.shape[1] - 10):
        pa, pb = a[i:i + 11, j:j + 11, c], b[i:i + 11, j:j + 11, c]
        ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
        va = (w2 * (pa - ma) ** 2).sum()
        vb = (w2 * (pb - mb) ** 2).sum()
        cov = (w2 * (pa - ma) * (pb - mb)).sum()
        vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_psnr_and_ssim_match_definitions():
  rng = np.random.default_rng(0)
  ref = rng.integers(0, 256, (2, 16, 19, 3), dtype=np.uint8)
  noisy = np.clip(ref.astype(int) + rng.integers(-20, 21, ref.shape), 0, 255).astype(np.uint8)
  p = np.asarray(metrics.psnr(noisy, ref))
  for k in range(2):
    mse = np.mean((noisy[k] / 255.0 - ref[k] / 255.0) ** 2)
    assert p[k] == pytest.approx(10 * np.log10(1 / mse), rel=1e-5)
  s = np.asarray(metrics.ssim(noisy, ref))
  for k in range(2):
    assert s[k] == pytest.approx(_ssim_direct(noisy[k] / 255.0, ref[k] / 255.0), abs=2e-5)
  assert np.allclose(np.asarray(metrics.ssim(ref, ref)), 1.0, atol=1e-6)
  assert np.all(np.asarray(metrics.psnr(ref, ref)) == pytest.approx(100.0))


def test_metric_errors():
  a = np.zeros((1, 16, 16, 3), np.uint8)
  with pytest.raises(ValueError, match="different shapes"):
    metrics.psnr(a, np.zeros((1, 16, 17, 3), np.uint8))
  with pytest.raises(ValueError, match="at least 11x11"):
    metrics.ssim(a[:, :8, :8], a[:, :8, :8])
  assert metrics.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
