"""The on-disk calibration set: writing, resuming, selecting, streaming, and its errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.quant.calib_cache import (CalibrationError, CalibrationSet, CalibrationWriter,
                                            model_fingerprint)

SETTINGS = {"model": "flux-tiny", "steps": 3}


def _samples(prompt_index, steps=3):
  rng = np.random.default_rng(prompt_index)
  samples = [{"hidden_states": rng.standard_normal((4, 8)).astype(np.float32),
              "timestep": np.float32(1.0 - s / steps)} for s in range(steps)]
  metas = [{"step": s, "branch": "cond", "timestep": 1.0 - s / steps} for s in range(steps)]
  return samples, metas


def _write(folder, prompts, fingerprint="abc", finalize=True):
  w = CalibrationWriter(str(folder), fingerprint, SETTINGS)
  for i in prompts:
    if not w.has_prompt(i):
      w.write_prompt(i, f"prompt {i}", *_samples(i))
  if finalize:
    w.finalize()
  return w


def test_round_trip_select_and_batches(tmp_path):
  _write(tmp_path, range(4))
  cs = CalibrationSet(str(tmp_path), fingerprint="abc", settings={"model": "flux-tiny"})
  assert len(cs) == 12
  s = cs.samples[7]
  assert (s.prompt_index, s.step, s.prompt) == (2, 1, "prompt 2")
  np.testing.assert_array_equal(cs.load(7)["hidden_states"], _samples(2)[0][1]["hidden_states"])
  sel = cs.select(5, seed=3)
  assert sel == cs.select(5, seed=3) and len(set(sel)) == 5 and sel != cs.select(5, seed=4)
  assert cs.select(100) == list(range(12))
  batches = list(cs.batches(sel, 2))
  assert [b["hidden_states"].shape for b in batches] == [(2, 4, 8), (2, 4, 8), (1, 4, 8)]
  np.testing.assert_array_equal(batches[2]["hidden_states"][0], cs.load(sel[4])["hidden_states"])


def test_resume_skips_written_prompts_and_refuses_other_model(tmp_path):
  _write(tmp_path, range(2), finalize=False)
  with pytest.raises(CalibrationError, match="incomplete"):
    CalibrationSet(str(tmp_path))
  w = CalibrationWriter(str(tmp_path), "abc", SETTINGS)
  assert w.num_done == 2 and w.has_prompt(1) and not w.has_prompt(2)
  mtime = os.path.getmtime(tmp_path / "prompt-00000.safetensors")
  _write(tmp_path, range(3))
  assert os.path.getmtime(tmp_path / "prompt-00000.safetensors") == mtime
  assert len(CalibrationSet(str(tmp_path))) == 9
  with pytest.raises(CalibrationError, match="another model"):
    CalibrationWriter(str(tmp_path), "zzz", SETTINGS)
  with pytest.raises(CalibrationError, match="steps differ"):
    CalibrationWriter(str(tmp_path), "abc", {"model": "flux-tiny", "steps": 4})
  with pytest.raises(CalibrationError, match="collected from another model or config"):
    CalibrationSet(str(tmp_path), fingerprint="zzz")


def test_nan_is_refused_on_write_and_on_read(tmp_path):
  w = CalibrationWriter(str(tmp_path), "abc", SETTINGS)
  samples, metas = _samples(0)
  samples[1]["hidden_states"][0, 0] = np.nan
  with pytest.raises(CalibrationError, match="step 1.*'hidden_states' holds NaN"):
    w.write_prompt(0, "p", samples, metas)
  _write(tmp_path, [0])
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  # Corrupt the stored data behind the writer's back (e.g. a bad disk).
  from svdquant_jax.utils.safetensors_io import save_safetensors
  bad, _ = _samples(0)
  bad[2]["hidden_states"][1, 1] = np.inf
  save_safetensors(tmp_path / manifest["prompts"]["0"]["shard"],
                   {f"{j}/{k}": v for j, s in enumerate(bad) for k, v in s.items()})
  cs = CalibrationSet(str(tmp_path))
  with pytest.raises(CalibrationError, match="sample 2 .*'hidden_states' holds NaN/Inf"):
    cs.load(2)


def test_truncated_shard_is_reported(tmp_path):
  _write(tmp_path, [0])
  path = tmp_path / "prompt-00000.safetensors"
  path.write_bytes(path.read_bytes()[:-16])
  with pytest.raises(CalibrationError, match="unreadable.*truncated"):
    CalibrationSet(str(tmp_path)).load(0)


def test_fingerprint_tracks_config_and_weights():
  params = {"a": jnp.arange(10000, dtype=jnp.float32).reshape(100, 100), "b": jnp.ones(3)}
  f0 = model_fingerprint({"layers": 2}, params)
  assert f0 == model_fingerprint({"layers": 2}, params)
  assert f0 != model_fingerprint({"layers": 3}, params)
  assert f0 != model_fingerprint({"layers": 2}, {**params, "b": jnp.ones(3) * 2})
