"""The evaluation protocol: benchmark layouts, deepcompressor's subset and seeds, reading image files."""

import json
import logging
import os
import random

import numpy as np
import pytest
from PIL import Image

from svdquant_jax.eval import protocol
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines import prompts as prompts_lib


def _deepcompressor_subset(names, num):
  """deepcompressor's ``_generate_examples`` (MJHQ.py / DCI.py), written out."""
  names = list(names)
  if num > 0:
    random.Random(0).shuffle(names)
    names = names[:num]
    names = sorted(names)
  return names


def _deepcompressor_hash(s):
  """deepcompressor's ``utils.common.hash_str_to_int``, written out."""
  h = 0
  for char in s:
    h = (h * 31 + ord(char)) % (10 ** 9 + 7)
  return h


MJHQ_NAMES = [f"{h:040x}" for h in np.random.default_rng(3).integers(0, 2 ** 62, 20)]


def _jpg(path, size=(24, 16), seed=0, mode="RGB"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(data).convert(mode).save(path)


@pytest.fixture
def mjhq(tmp_path):
  meta = {name: {"category": ["animals", "people", "food"][i % 3], "prompt": f"prompt {i}"}
          for i, name in enumerate(MJHQ_NAMES)}
  with open(tmp_path / "meta_data.json", "w") as f:
    json.dump(meta, f)
  for i, (name, m) in enumerate(meta.items()):
    _jpg(str(tmp_path / "imgs" / m["category"] / f"{name}.jpg"), seed=i)
  return tmp_path


def test_subset_and_seeds_are_deepcompressors():
  samples = [protocol.Sample(n, "p") for n in MJHQ_NAMES]
  for num in (1, 5, 19, 20, 25):
    got = [s.name for s in protocol.select_samples(samples, num)]
    assert got == _deepcompressor_subset(MJHQ_NAMES, num)
    assert got == sorted(got) and len(got) == min(num, 20)
  for num in (0, -1):  # no shuffle without a positive size: the file order
    assert [s.name for s in protocol.select_samples(samples, num)] == MJHQ_NAMES
  # Pinned: the first names of Random(0)'s permutation of 10 items are 7, 8, 1, 5 (Python's Mersenne Twister).
  ten = [protocol.Sample(f"n{i}", "p") for i in range(10)]
  assert [s.name for s in protocol.select_samples(ten, 4)] == ["n1", "n5", "n7", "n8"]
  for name in MJHQ_NAMES + ["sa_1", "0000", "x"]:
    assert protocol.image_seed(name) == _deepcompressor_hash(name) == prompts_lib.prompt_hash(name)
    assert protocol.Sample(name, "p").seed == _deepcompressor_hash(name)
    assert protocol.image_file(name) == name + ".png"
  assert protocol.image_seed("abc") == (97 * 31 + 98) * 31 + 99
  # Non-ASCII: code points as deepcompressor (our prompt hash uses UTF-8 bytes and differs).
  assert protocol.image_seed("é") == _deepcompressor_hash("é") == 233 != prompts_lib.prompt_hash("é")
  assert protocol.subset_name("MJHQ", 5000) == "MJHQ-5000"
  for bad in ("", "a/b", ".."):
    with pytest.raises(ValueError, match="name"):
      protocol.image_file(bad)


def test_mjhq_layout(mjhq):
  bench = protocol.load_benchmark(mjhq / "meta_data.json", mjhq / "imgs")
  assert (bench.name, bench.layout, len(bench.samples)) == ("MJHQ", "mjhq", 20)
  assert [s.name for s in bench.samples] == MJHQ_NAMES  # the file's order
  s = bench.samples[4]
  assert (s.prompt, s.category) == ("prompt 4", "people")
  assert s.real_path == os.path.join(str(mjhq / "imgs"), "people", f"{MJHQ_NAMES[4]}.jpg")
  assert os.path.isfile(s.real_path)
  assert [x.name for x in bench.select(6)] == _deepcompressor_subset(MJHQ_NAMES, 6)
  assert protocol.load_benchmark(mjhq / "meta_data.json").samples[0].real_path is None  # prompts only


def test_sdci_and_prompt_list_layouts(tmp_path):
  (tmp_path / "sDCI.yaml").write_text("sa_10: a dog on grass\nsa_2: 'two: cats'\nsa_7: a red car\n")
  bench = protocol.load_benchmark(tmp_path / "sDCI.yaml", tmp_path)
  assert (bench.name, bench.layout) == ("sDCI", "sdci")
  assert [(s.name, s.prompt) for s in bench.samples] == [("sa_10", "a dog on grass"), ("sa_2", "two: cats"),
                                                          ("sa_7", "a red car")]
  assert bench.samples[1].real_path == os.path.join(str(tmp_path), "sa_2.jpg")
  (tmp_path / "mine.txt").write_text("# comment\nfirst prompt\n\nsecond prompt\n")
  listed = protocol.load_benchmark(tmp_path / "mine.txt")
  assert (listed.name, listed.layout) == ("mine", "prompts")
  assert [(s.name, s.prompt) for s in listed.samples] == [("00000", "first prompt"), ("00001", "second prompt")]
  (tmp_path / "named.json").write_text(json.dumps({"b": "x", "a": "y"}))
  assert [s.name for s in protocol.load_benchmark(tmp_path / "named.json").samples] == ["b", "a"]


def test_bad_benchmarks_name_the_file_and_entry(tmp_path, mjhq):
  with pytest.raises(protocol.BenchmarkError, match="not found: .*nope.json"):
    protocol.load_benchmark(tmp_path / "nope.json")
  (tmp_path / "bad.json").write_text(json.dumps({"abc": {"category": "x", "prompt": "p"}, "def": {"prompt": 3}}))
  with pytest.raises(protocol.BenchmarkError, match=r"bad.json: entry 'def'"):
    protocol.load_benchmark(tmp_path / "bad.json")
  (tmp_path / "slash.yaml").write_text("'a/b': p\n")
  with pytest.raises(ValueError, match="a/b"):
    protocol.load_benchmark(tmp_path / "slash.yaml")
  (tmp_path / "empty.json").write_text("{}")
  with pytest.raises(protocol.BenchmarkError, match="empty.json: no entries"):
    protocol.load_benchmark(tmp_path / "empty.json")
  with pytest.raises(protocol.BenchmarkError, match="images folder not found: .*missing"):
    protocol.load_benchmark(mjhq / "meta_data.json", tmp_path / "missing")
  (tmp_path / "p.csv").write_text("x")
  with pytest.raises(protocol.BenchmarkError, match="extension"):
    protocol.load_benchmark(tmp_path / "p.csv")


def test_read_rgb_converts_with_a_warning_that_names_the_file(tmp_path, caplog):
  rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
  images_lib.write_png(tmp_path / "rgb.png", rgb)
  np.testing.assert_array_equal(protocol.read_rgb(tmp_path / "rgb.png"), rgb)
  images_lib.write_png(tmp_path / "gray.png", rgb[:, :, :1])
  rgba = np.concatenate([rgb, np.full((9, 7, 1), 7, np.uint8)], -1)
  images_lib.write_png(tmp_path / "rgba.png", rgba)
  with caplog.at_level(logging.WARNING):
    gray = protocol.read_rgb(tmp_path / "gray.png")
    assert "gray.png is a grayscale image" in caplog.text
    np.testing.assert_array_equal(gray, np.repeat(rgb[:, :, :1], 3, axis=-1))
    np.testing.assert_array_equal(protocol.read_rgb(tmp_path / "rgba.png"), rgb)
    assert "rgba.png is a RGBA image" in caplog.text and "alpha channel is dropped" in caplog.text
  (tmp_path / "broken.png").write_bytes(b"not an image")
  with pytest.raises(ValueError, match="broken.png: not a readable image"):
    protocol.read_rgb(tmp_path / "broken.png")
  with pytest.raises(FileNotFoundError, match="absent.png"):
    protocol.read_rgb(tmp_path / "absent.png")


def test_image_files(tmp_path):
  with pytest.raises(ValueError, match=f"no images .* in {tmp_path}"):
    protocol.image_files(tmp_path)
  with pytest.raises(FileNotFoundError, match="image folder not found"):
    protocol.image_files(tmp_path / "nope")
  for name in ("b.png", "a.jpg", "contact_sheet.png", ".hidden.png", "notes.txt"):
    (tmp_path / name).write_bytes(b"")
  assert protocol.image_files(tmp_path) == ["a.jpg", "b.png"]
