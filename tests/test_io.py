"""Safetensors I/O, atomic writes, the checkpoint mapping table and the progress display."""

import io
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from svdquant_jax.models import checkpoint as ckpt
from svdquant_jax.utils import files
from svdquant_jax.utils.progress import Progress, format_duration
from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile, TensorStore, save_safetensors
from svdquant_jax.utils import trees


def _torch_tensors():
  g = torch.Generator().manual_seed(0)
  return {
      "a.weight": torch.randn(5, 7, generator=g, dtype=torch.float32).to(torch.bfloat16),
      "a.bias": torch.randn(5, generator=g).to(torch.float16),
      "b": torch.randn(3, 2, 4, generator=g),
      "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
      "flag": torch.tensor([True, False]),
  }


def test_reads_torch_written_file_including_bf16(tmp_path):
  tensors = _torch_tensors()
  path = tmp_path / "m.safetensors"
  safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt"})
  f = SafetensorsFile(path)
  assert f.metadata == {"format": "pt"}
  assert sorted(f.keys()) == sorted(tensors)
  for name, t in tensors.items():
    got = f.get(name)
    want = t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()
    assert got.shape == tuple(t.shape)
    np.testing.assert_array_equal(got.astype(want.dtype), want)
  assert f.get("a.weight").dtype == ml_dtypes.bfloat16


def test_write_read_round_trip_matches_safetensors_library(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "x": rng.standard_normal((4, 3)).astype(np.float32),
      "y": rng.standard_normal((2,)).astype(ml_dtypes.bfloat16),
      "z": rng.integers(-8, 8, (3, 5)).astype(np.int8),
      "e": np.zeros((0, 4), np.float32),
  }
  path = tmp_path / "ours.safetensors"
  save_safetensors(path, tensors, {"note": "hi"})
  loaded = safetensors.torch.load_file(str(path))
  np.testing.assert_array_equal(loaded["x"].numpy(), tensors["x"])
  np.testing.assert_array_equal(loaded["z"].numpy(), tensors["z"])
  np.testing.assert_array_equal(loaded["y"].float().numpy(), tensors["y"].astype(np.float32))
  back = TensorStore(path)
  assert back.metadata == {"note": "hi"}
  for k, v in tensors.items():
    np.testing.assert_array_equal(back[k], v)


def test_truncated_file_is_an_error_naming_the_tensor(tmp_path):
  path = tmp_path / "t.safetensors"
  save_safetensors(path, {"w": np.ones((64, 64), np.float32)})
  data = path.read_bytes()
  path.write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match="'w'.*truncated"):
    SafetensorsFile(path)
  path.write_bytes(data[:5])
  with pytest.raises(CheckpointError, match="too short"):
    SafetensorsFile(path)
  path.write_bytes(b"\xff" * 8 + data[8:])
  with pytest.raises(CheckpointError, match="header length"):
    SafetensorsFile(path)


def test_sharded_index_and_folder(tmp_path):
  a = {"p.w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  b = {"q.w": np.ones((4,), np.float16)}
  save_safetensors(tmp_path / "model-00001-of-00002.safetensors", a)
  save_safetensors(tmp_path / "model-00002-of-00002.safetensors", b)
  index = {"metadata": {}, "weight_map": {"p.w": "model-00001-of-00002.safetensors",
                                          "q.w": "model-00002-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  store = TensorStore(tmp_path)
  assert sorted(store) == ["p.w", "q.w"]
  np.testing.assert_array_equal(store["p.w"], a["p.w"])
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is listed but missing"):
    TensorStore(tmp_path)


def test_duplicate_tensor_across_files(tmp_path):
  save_safetensors(tmp_path / "a.safetensors", {"w": np.ones(2, np.float32)})
  save_safetensors(tmp_path / "b.safetensors", {"w": np.ones(2, np.float32)})
  with pytest.raises(CheckpointError, match="'w' appears in both"):
    TensorStore(tmp_path)


def test_atomic_open_keeps_old_file_on_failure(tmp_path):
  path = tmp_path / "f.bin"
  files.atomic_write_bytes(path, b"good")
  with pytest.raises(RuntimeError):
    with files.atomic_open(path) as f:
      f.write(b"partial")
      raise RuntimeError("killed mid-write")
  assert path.read_bytes() == b"good"
  assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_directory_replaces_only_when_complete(tmp_path):
  target = tmp_path / "ckpt"
  with files.atomic_directory(target) as d:
    (open(os.path.join(d, "x"), "w")).write("1")
  with pytest.raises(RuntimeError):
    with files.atomic_directory(target) as d:
      (open(os.path.join(d, "x"), "w")).write("2")
      raise RuntimeError("interrupted")
  assert (target / "x").read_text() == "1"
  with files.atomic_directory(target) as d:
    (open(os.path.join(d, "x"), "w")).write("3")
  assert (target / "x").read_text() == "3"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# ----------------------------------------------------------------------------- mapping tables
def _abstract():
  return {"dense": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                    "bias": jax.ShapeDtypeStruct((4,), jnp.float32)},
          "qkv": {"kernel": jax.ShapeDtypeStruct((3, 6), jnp.bfloat16)}}


def _rules():
  return (ckpt.dense_rules("dense", "lin")
          + [ckpt.Rule("qkv/kernel", ("q.weight", "k.weight"), ckpt.concat_linear)])


def _store():
  rng = np.random.default_rng(1)
  return {"lin.weight": rng.standard_normal((4, 3)).astype(np.float32),
          "lin.bias": rng.standard_normal(4).astype(np.float32),
          "q.weight": rng.standard_normal((2, 3)).astype(np.float32),
          "k.weight": rng.standard_normal((4, 3)).astype(np.float32),
          "buf.position_ids": np.arange(3)}


def test_load_params_transposes_concatenates_and_casts():
  store = _store()
  params = ckpt.load_params(store, _rules(), _abstract(), ignore=[r"buf\..*"])
  np.testing.assert_array_equal(params["dense"]["kernel"], store["lin.weight"].T)
  assert params["qkv"]["kernel"].dtype == jnp.bfloat16
  want = np.concatenate([store["q.weight"].T, store["k.weight"].T], axis=1)
  np.testing.assert_array_equal(np.asarray(params["qkv"]["kernel"], np.float32),
                                want.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("lin.bias"), "missing tensor.*lin.bias"),
    (lambda s: s.update({"extra.weight": np.ones(2)}), "unexpected tensor.*extra.weight"),
    (lambda s: s.update({"k.weight": np.ones((5, 3), np.float32)}), r"q.weight\+k.weight -> qkv/kernel: shape \(3, 7\)"),
])
def test_load_params_errors_name_the_key(edit, message):
  store = _store()
  edit(store)
  with pytest.raises(CheckpointError, match=message):
    ckpt.load_params(store, _rules(), _abstract(), ignore=[r"buf\..*"])


def test_load_params_reports_unmapped_params_and_unused_tensor():
  with pytest.raises(CheckpointError, match="unexpected tensor.*buf.position_ids"):
    ckpt.load_params(_store(), _rules(), _abstract())
  with pytest.raises(CheckpointError, match="no checkpoint tensor maps to param.*qkv/kernel"):
    ckpt.load_params(_store(), _rules()[:2], _abstract(), ignore=[r"buf\..*", r"[qk]\.weight"])


def test_validate_tree():
  good = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), _abstract())
  trees.validate_tree(good, _abstract())
  bad = dict(good, dense={"kernel": jnp.zeros((3, 5))})
  with pytest.raises(CheckpointError, match=r"missing 1 leaf.*dense/bias.*dense/kernel: shape \(3, 5\)"):
    trees.validate_tree(bad, _abstract())


def test_read_config_checks_the_class(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
  assert ckpt.read_config(tmp_path, ("AutoencoderKL",))["_class_name"] == "AutoencoderKL"
  with pytest.raises(CheckpointError, match="holds a AutoencoderKL, expected one of \\['FluxTransformer2DModel'\\]"):
    ckpt.read_config(tmp_path, ("FluxTransformer2DModel",))
  with pytest.raises(CheckpointError, match="component folder not found"):
    ckpt.read_config(tmp_path / "nope")


# ----------------------------------------------------------------------------- progress
def test_progress_lines_show_count_elapsed_and_eta():
  out = io.StringIO()
  with Progress(3, "blocks", style="lines", stream=out) as p:
    for i in range(3):
      p.update(note=f"block_{i}")
  lines = out.getvalue().splitlines()
  assert len(lines) == 3
  assert lines[0].startswith("blocks 1/3  elapsed 0:00  eta ")
  assert lines[-1].startswith("blocks 3/3") and "eta 0:00" in lines[-1] and lines[-1].endswith("block_2")


def test_progress_skip_is_excluded_from_rate():
  p = Progress(10, style="lines", stream=io.StringIO())
  p.skip(5)
  assert p.eta() != p.eta()  # nan until an item is timed
  p.update()
  assert p.done == 6


def test_format_duration():
  assert format_duration(0) == "0:00"
  assert format_duration(61) == "1:01"
  assert format_duration(3725) == "1:02:05"
  assert format_duration(float("nan")) == "?"


def test_folder_with_weight_variants(tmp_path):
  save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", {"w": np.ones(2, np.float32)})
  save_safetensors(tmp_path / "diffusion_pytorch_model.fp16.safetensors", {"w": np.ones(2, np.float16)})
  assert TensorStore(tmp_path)["w"].dtype == np.float32
  assert TensorStore(tmp_path, variant="fp16")["w"].dtype == np.float16
  with pytest.raises(CheckpointError, match="no weight files of variant 'bf16'"):
    TensorStore(tmp_path, variant="bf16")
  os.remove(tmp_path / "diffusion_pytorch_model.safetensors")
  assert TensorStore(tmp_path)["w"].dtype == np.float16
  save_safetensors(tmp_path / "model.fp16-00001-of-00001.safetensors", {"v": np.ones(1, np.float16)})
  (tmp_path / "model.fp16.safetensors.index.json").write_text(
      json.dumps({"weight_map": {"v": "model.fp16-00001-of-00001.safetensors"}}))
  os.remove(tmp_path / "diffusion_pytorch_model.fp16.safetensors")
  assert list(TensorStore(tmp_path, variant="fp16")) == ["v"]


def test_diffusers_variant_index_name(tmp_path):
  save_safetensors(tmp_path / "diffusion_pytorch_model.fp16-00001-of-00002.safetensors", {"a": np.ones(1, np.float16)})
  save_safetensors(tmp_path / "diffusion_pytorch_model.fp16-00002-of-00002.safetensors", {"b": np.ones(1, np.float16)})
  (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(json.dumps({"weight_map": {
      "a": "diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
      "b": "diffusion_pytorch_model.fp16-00002-of-00002.safetensors"}}))
  assert sorted(TensorStore(tmp_path, variant="fp16")) == ["a", "b"]
  os.remove(tmp_path / "diffusion_pytorch_model.fp16-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="is listed but missing"):
    TensorStore(tmp_path)


def test_scalar_tensor_keeps_its_shape(tmp_path):
  save_safetensors(tmp_path / "s.safetensors", {"s": np.float32(2.5), "v": np.ones((2, 3), np.float32)[:, ::2]})
  store = TensorStore(tmp_path / "s.safetensors")
  assert store["s"].shape == () and float(store["s"]) == 2.5
  np.testing.assert_array_equal(store["v"], np.ones((2, 2), np.float32))
