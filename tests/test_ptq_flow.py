"""The PTQ flow end to end on flux-tiny (small settings): results, resume, saved model."""

import json
import os

import numpy as np
import pytest

from svdquant_jax.flows import generation, ptq_benchmark, ptq_config
from svdquant_jax.flows import ptq as ptq_flow
from svdquant_jax.quant import ptq
from svdquant_jax.quant.adapters import adapter_for_pipeline
from svdquant_jax.quant import quantized_model as qmodel
from svdquant_jax.quant.quantized_model import QuantizedCheckpointError
from svdquant_jax.pipelines.images import read_png


def _config(tmp_path, parts="flux-tiny"):
  c = ptq_config.compose(parts)
  c.output_root = str(tmp_path / "runs")
  c.pipeline.num_steps = 2
  c.pipeline.height = c.pipeline.width = 64
  c.pipeline.batch_size = 2
  c.eval.num_prompts = 2
  c.eval.baselines = ("rtn-int4",)
  c.calib.num_prompts = 2
  c.calib.num_samples = 4
  c.calib.batch_size = 4
  c.quant.smooth.num_grids = 2
  c.quant.lowrank.num_iters = 2
  c.calib.offload_transformer = "true"  # the path GPUs take ("auto"), exercised on the CPU
  return c


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ptq")
  config = _config(tmp)
  return tmp, config, ptq_flow.run(config)


def test_results_table_and_files(first_run):
  _, config, results = first_run
  rows = {r["method"]: r for r in results["rows"]}
  assert list(rows) == ["svdq-int4", "rtn-int4"]
  svdq, rtn = rows["svdq-int4"], rows["rtn-int4"]
  # SVDQuant's last-block error on the calibration samples is well below RTN W4A4's.
  assert svdq["final_block_error"] < 0.8 * rtn["final_block_error"], (svdq, rtn)
  for r in (svdq, rtn):
    assert np.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
    assert [name for name, _ in r["block_errors"]] == [  # flux-tiny: two double and two single blocks
        "transformer_blocks_0", "transformer_blocks_1", "single_transformer_blocks_0", "single_transformer_blocks_1"]
  assert svdq["weight_mb"] > rtn["weight_mb"]  # the low-rank branch costs bytes
  root = os.path.dirname(results["reference"])
  with open(os.path.join(root, "results.json")) as f:
    assert json.load(f)["rows"][0]["method"] == "svdq-int4"
  with open(os.path.join(root, "results.md")) as f:
    table = f.read()
  assert "| svdq-int4 | int4 | 32 |" in table and "| rtn-int4 |" in table
  assert table.count("| full precision |") == 1
  plot = read_png(os.path.join(root, ptq_flow.BLOCK_ERRORS_PNG))
  assert plot.ndim == 3 and plot.shape[0] > 200 and plot.shape[1] > 300


def test_rerun_reuses_every_step(first_run, monkeypatch):
  tmp, config, results = first_run

  def fail(*a, **k):
    raise AssertionError("a finished block was quantized again")

  monkeypatch.setattr(ptq, "quantize_block", fail)
  again = ptq_flow.run(config)
  for a, b in zip(results["rows"], again["rows"]):
    assert a["psnr"] == b["psnr"] and a["final_block_error"] == b["final_block_error"]


def test_saved_model_regenerates_the_same_images(first_run, tmp_path):
  _, config, results = first_run
  root = os.path.dirname(results["reference"])
  model_dir = os.path.join(root, "svdq-int4", "model")
  c = generation.default_config()
  c.model = "flux-tiny"
  c.quantized_model = model_dir
  c.output_dir = str(tmp_path / "gen")
  c.num_steps, c.height, c.width, c.batch_size = 2, 64, 64, 2
  c.seed = config.seed
  c.num_prompts = 2
  c.progress = False
  generation.run(c)
  samples = os.path.join(root, "svdq-int4", "samples")
  for i in range(2):
    np.testing.assert_array_equal(read_png(os.path.join(c.output_dir, generation.image_file(i))),
                                  read_png(os.path.join(samples, generation.image_file(i))))


def test_saved_model_refuses_another_model(first_run):
  _, _, results = first_run
  from svdquant_jax.pipelines.loading import load_pipeline
  adapter = adapter_for_pipeline(load_pipeline("pixart-tiny"))
  model_dir = os.path.join(os.path.dirname(results["reference"]), "svdq-int4", "model")
  with pytest.raises(QuantizedCheckpointError, match="family"):
    qmodel.load_for_model(model_dir, adapter)


def test_unknown_output_dirname_is_an_error(tmp_path):
  c = _config(tmp_path)
  c.output_dirname = "bogus"
  with pytest.raises(ValueError, match="output_dirname"):
    ptq_flow.run(c)


def test_ptq_benchmark_runs_at_small_shapes():
  settings = ptq_benchmark.settings_for(["int4"], "float32", num_grids=2, lowrank_iters=2, batch_size=2,
                                        candidates_per_batch=3)
  assert (settings.num_grids, settings.lowrank_iters, settings.batch_size, settings.candidate_batch) == (2, 2, 2, 3)
  result = ptq_benchmark.run_benchmark("flux-tiny", settings, samples=2, img_tokens=16, txt_tokens=8,
                                       dtype="float32")
  rows = {r["kind"]: r for r in result["rows"]}
  # 7 W4A4 groups (8 linears) + 2 adaLN in a double block; 3 linears + 1 adaLN in a single block.
  assert rows["flux_double"]["layers"] == 10 and rows["flux_single"]["layers"] == 5
  assert rows["flux_double"]["count"] == 2 and rows["flux_single"]["count"] == 2  # flux-tiny's blocks
  for r in rows.values():
    assert r["first_s"] > 0 and r["steady_s"] > 0
  assert result["model_estimate_s"] >= sum(r["first_s"] for r in rows.values())
  assert "whole model" in ptq_benchmark.format_table(result)
