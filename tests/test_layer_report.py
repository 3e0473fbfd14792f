"""The layer-level evidence report (svdquant_jax/quant/report.py): expected orderings on a seeded
synthetic layer, and the written markdown / PNG."""

import numpy as np
import pytest

from svdquant_jax.flows import layer_report as rp
from svdquant_jax.quant import smooth
from svdquant_jax.utils.png import read_png

METHODS = ("RTN", "Smoothing only", "SVDQuant (one-shot)", "SVDQuant + alternating", "SVDQuant + GPTQ")


@pytest.fixture(scope="module")
def layer_report():
  layer = rp.make_synthetic_layer(seed=0, rows=512, k=256, n=512)
  # A 19-pair grid and one-shot SVDQuant per rank in the sweep keep this test short; the
  # command-line report uses the 39-pair grid and refines every rank with the alternating loop.
  return layer, rp.run_layer_report(layer, formats=("int4",), methods=METHODS, grid=smooth.alpha_beta_grid(10),
                                    sweep_lowrank_iters=1)


def test_synthetic_layer_has_the_outlier_structure():
  layer = rp.make_synthetic_layer(seed=3, rows=64, k=128, n=256)
  again = rp.make_synthetic_layer(seed=3, rows=64, k=128, n=256)
  np.testing.assert_array_equal(np.asarray(layer.kernel), np.asarray(again.kernel))  # seeded
  absmax = np.abs(np.asarray(layer.x)).max(axis=0)
  others = np.delete(absmax, layer.outlier_channels)
  assert len(layer.outlier_channels) == 2
  assert absmax[list(layer.outlier_channels)].min() > 5 * np.median(others)
  row_norms = np.linalg.norm(np.asarray(layer.kernel), axis=1)
  assert row_norms.max() > 3 * np.median(row_norms)  # heavy-tailed input channels
  assert not np.array_equal(np.asarray(layer.x), np.asarray(layer.x_eval))  # held-out tokens


def test_error_ordering(layer_report):
  _, report = layer_report
  err = report.w4a4["int4"]
  assert err["SVDQuant + alternating"] < err["Smoothing only"] < err["RTN"]
  assert err["SVDQuant (one-shot)"] < err["Smoothing only"]
  assert err["SVDQuant + alternating"] <= err["SVDQuant (one-shot)"]
  assert err["SVDQuant + GPTQ"] <= err["SVDQuant + alternating"]
  assert err["RTN"] > 0.1 and err["SVDQuant + GPTQ"] > 0  # a real quantization error, not a no-op


def test_rank_sweep_is_non_increasing(layer_report):
  _, report = layer_report
  sweep = report.sweep["int4"]
  assert sorted(sweep) == list(rp.RANKS)
  values = [sweep[r] for r in rp.RANKS]
  assert all(b <= a for a, b in zip(values, values[1:])), values
  assert values[-1] < 0.5 * values[0]


def test_spectra_and_written_report(layer_report, tmp_path):
  layer, report = layer_report
  spectra = report.spectra
  np.testing.assert_allclose(spectra["W"], np.linalg.svd(np.asarray(layer.kernel, np.float64), compute_uv=False))
  # smoothing migrates the activation outliers into Ŵ; the branch removes its top directions
  assert spectra["W_hat"][0] / spectra["W_hat"][32] > spectra["R"][0] / spectra["R"][32]
  assert spectra["R"][0] < spectra["W_hat"][0]
  paths = rp.write_report(report, str(tmp_path), command="python launch/layer_report.py --seed=0")
  text = open(paths["markdown"]).read()
  assert "| SVDQuant + GPTQ |" in text and f"{report.w4a4['int4']['RTN']:.4f}" in text
  assert "--seed=0" in text and "spectra.png" in text
  image = read_png(paths["png"])
  assert image.shape == (440, 720, 3) and image.dtype == np.uint8
  for color in rp._COLORS.values():  # each curve is drawn
    assert np.all(image == np.asarray(color, np.uint8), axis=-1).sum() > 100
