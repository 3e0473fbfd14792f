"""Killing the PTQ command (SIGKILL) mid-quantization and rerunning it ends with the same bits.

The command runs as a user runs it (``launch/ptq.py`` in a subprocess, tiny settings as
``--config.*`` overrides); it is killed once the first method's ``progress.json`` lists a finished
block, rerun to completion, and its saved quantized params and images are compared bit for bit
with those of an uninterrupted run.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.formats.quantizers import W4A16_INT4
from svdquant_jax.pipelines.images import read_png
from svdquant_jax.quant import ptq
from svdquant_jax.quant import quantized_model as qmodel
from svdquant_jax.quant.svdquant import plain_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "ptq.py")
METHOD = "svdq-int4"
TINY = ("--config.pipeline.num_steps=2", "--config.pipeline.height=64", "--config.pipeline.width=64",
        "--config.pipeline.batch_size=2", "--config.eval.num_prompts=2", "--config.eval.baselines=()",
        "--config.eval.block_errors=false", "--config.calib.num_prompts=2", "--config.calib.num_samples=4",
        "--config.calib.batch_size=4", "--config.quant.smooth.num_grids=2", "--config.quant.lowrank.num_iters=2")
TIMEOUT = 1200


def _argv(output_root):
  return [sys.executable, LAUNCH, *TINY, f"--config.output_root={output_root}"]


def _run_to_completion(output_root, log_path):
  with open(log_path, "a") as log:
    done = subprocess.run(_argv(output_root), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=TIMEOUT)
  with open(log_path) as f:
    text = f.read()
  assert done.returncode == 0, text[-4000:]
  return text


def _method_dir(output_root):
  found = glob.glob(os.path.join(output_root, "flux-tiny", "*", METHOD))
  return found[0] if len(found) == 1 else None


def _listed_blocks(output_root):
  method = _method_dir(output_root)
  if method is None:
    return []
  try:
    with open(os.path.join(method, "progress", ptq.PROGRESS_FILE)) as f:
      return json.load(f)["done"]
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_same_outputs(a_root, b_root):
  a, b = _method_dir(a_root), _method_dir(b_root)
  pa, sa, _ = qmodel.load_quantized(os.path.join(a, "model"))
  pb, sb, _ = qmodel.load_quantized(os.path.join(b, "model"))
  assert sa == sb
  fa, fb = _flat(pa), _flat(pb)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
    assert fa[key].tobytes() == fb[key].tobytes(), f"quantized param {key} differs"
  images_a = sorted(os.path.basename(p) for p in glob.glob(os.path.join(a, "samples", "*.png")))
  images_b = sorted(os.path.basename(p) for p in glob.glob(os.path.join(b, "samples", "*.png")))
  assert images_a == images_b and images_a
  for name in images_a:
    ia, ib = read_png(os.path.join(a, "samples", name)), read_png(os.path.join(b, "samples", name))
    assert ia.dtype == ib.dtype and np.array_equal(ia, ib), f"image {name} differs"


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_is_bit_identical(tmp_path):
  whole, killed = tmp_path / "whole", tmp_path / "killed"
  _run_to_completion(whole, tmp_path / "whole.log")
  num_blocks = len(_listed_blocks(whole))
  assert num_blocks >= 2

  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen(_argv(killed), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + TIMEOUT
    try:
      while not _listed_blocks(killed):
        assert proc.poll() is None, "the run ended before a block was listed"
        assert time.monotonic() < deadline, "no block finished in time"
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
    finally:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  at_kill = _listed_blocks(killed)
  assert 1 <= len(at_kill) < num_blocks, at_kill  # killed inside the quantization loop
  assert not os.path.exists(os.path.join(_method_dir(killed), "model"))

  text = _run_to_completion(killed, tmp_path / "killed.log")
  assert f"{at_kill[0]}: resumed from" in text
  assert len(_listed_blocks(killed)) == num_blocks
  _assert_same_outputs(whole, killed)


def _layers(value):
  kernel = jnp.full((64, 8), value, jnp.float32)
  return {"ff/fc1": ptq.QuantizedLayer(plain_weights(kernel, jnp.zeros((8,), jnp.float32)), W4A16_INT4, 0.0)}


def test_a_half_written_block_of_an_unlisted_block_is_replaced(tmp_path):
  """What a kill during a block's save leaves (its folder, no progress entry) is never trusted."""
  folder = str(tmp_path / "progress")
  store = ptq.ProgressStore(folder, {"run": 1}, resume=True)
  store.save(0, "block_a", _layers(1.0))
  # A kill while block_b was being saved: a partial orbax write and a stale layers.json.
  partial = os.path.join(folder, "blocks", "001-block_b")
  os.makedirs(os.path.join(partial, "arrays.orbax-checkpoint-tmp-0"))
  with open(os.path.join(partial, "layers.json"), "w") as f:
    f.write("{not json")
  os.makedirs(os.path.join(partial, "arrays"))

  resumed = ptq.ProgressStore(folder, {"run": 1}, resume=True)
  assert resumed.done == ["block_a"]
  np.testing.assert_array_equal(resumed.load(0, "block_a")["ff/fc1"].weights.residual, 1.0)
  resumed.save(1, "block_b", _layers(2.0))
  again = ptq.ProgressStore(folder, {"run": 1}, resume=True)
  assert again.done == ["block_a", "block_b"]
  np.testing.assert_array_equal(again.load(1, "block_b")["ff/fc1"].weights.residual, 2.0)
  assert sorted(os.listdir(os.path.join(folder, "blocks"))) == ["000-block_a", "001-block_b"]
