"""The generate command (launch/generate.py, flows/generation.py) on flux-tiny: files, determinism,
batch independence."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from svdquant_jax.flows import generation as generate
from svdquant_jax.pipelines.loading import load_pipeline
from svdquant_jax.pipelines.prompts import BUILTIN_PROMPTS, prompt_seed
from svdquant_jax.pipelines.images import read_png

PROMPTS = ["A red bicycle leaning against a brick wall.", "Two zebras grazing at sunset."]
SIZE, STEPS = 64, 2


ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run_main(out_dir, *overrides: str) -> dict:
  """Runs the command as a user does (a subprocess of ``launch/generate.py``)."""
  argv = [sys.executable, str(ROOT / "launch" / "generate.py"), f"--config.output_dir={out_dir}",
          f"--config.num_steps={STEPS}", f"--config.height={SIZE}", f"--config.width={SIZE}",
          "--config.progress=false", *overrides]
  done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return _result(out_dir)


def _run(out_dir, **fields) -> dict:
  """``generation.run`` on the command's default config with ``fields`` changed."""
  config = generate.default_config()
  config.update(dict(output_dir=str(out_dir), num_steps=STEPS, height=SIZE, width=SIZE, progress=False, **fields))
  generate.run(config)
  return _result(out_dir)


def _result(out_dir) -> dict:
  with open(os.path.join(out_dir, generate.GENERATION_JSON)) as f:
    return json.load(f)


def _bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run1")
  return out, _run_main(out, "--config.prompts=" + "|".join(PROMPTS), "--config.batch_size=2", "--config.seed=7")


def test_main_writes_images_sheet_and_settings(first_run):
  out, result = first_run
  files = sorted(os.listdir(out))
  assert files == ["00000.png", "00001.png", "contact_sheet.png", "contact_sheet.png.txt", "generation.json"]
  images = np.stack([read_png(out / f) for f in ("00000.png", "00001.png")])
  assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == np.uint8
  # Not degenerate: varied, few saturated pixels, and the two prompts give different images.
  assert images.std() > 20 and np.mean((images == 0) | (images == 255)) < 0.05
  assert not np.array_equal(images[0], images[1])
  assert read_png(out / "contact_sheet.png").shape == (2 * 4 + SIZE, 3 * 4 + 2 * SIZE, 3)
  index = (out / "contact_sheet.png.txt").read_text().splitlines()
  assert index == ["row\tcolumn\tindex\tcaption"] + [f"0\t{i}\t{i}\t{p}" for i, p in enumerate(PROMPTS)]
  assert result["model"] == "flux-tiny" and result["num_images"] == 2
  assert result["settings"] == {"seed": 7, "num_steps": STEPS, "guidance": 3.5, "height": SIZE, "width": SIZE,
                                "max_sequence_length": 128, "batch_size": 2, "contact_sheet_columns": None}
  assert [(r["prompt"], r["seed"], r["file"]) for r in result["images"]] == [
      (p, prompt_seed(p, 7), f"{i:05d}.png") for i, p in enumerate(PROMPTS)]


def test_same_seed_same_bytes_and_batch_independence(first_run, tmp_path):
  out, _ = first_run
  again = tmp_path / "again"
  _run(again, prompts="|".join(PROMPTS), batch_size=2, seed=7)
  for f in ("00000.png", "00001.png", "contact_sheet.png"):
    assert _bytes(out / f) == _bytes(again / f), f
  # PROMPTS[0] as the second image of another batch, with another companion: the same bytes.
  moved = tmp_path / "moved"
  _run(moved, prompts=f"A bowl of oranges.|{PROMPTS[0]}", batch_size=2, seed=7)
  assert _bytes(moved / "00001.png") == _bytes(out / "00000.png")
  assert _bytes(moved / "00000.png") != _bytes(out / "00001.png")
  # Another base seed changes the image.
  other = tmp_path / "other"
  _run(other, prompts="|".join(PROMPTS), batch_size=2, seed=8)
  assert _bytes(other / "00000.png") != _bytes(out / "00000.png")


def test_generate_images_pads_the_last_batch_and_reads_prompt_files(first_run, tmp_path):
  out, _ = first_run
  pipeline = load_pipeline("flux-tiny")
  settings = generate.GenerationSettings(seed=7, num_steps=STEPS, height=SIZE, width=SIZE, batch_size=2)
  prompts = [PROMPTS[1], "A lighthouse.", PROMPTS[0]]   # batches [1, lighthouse], [0 + padding]
  result = generate.generate_images(pipeline, prompts, settings, str(tmp_path / "three"), progress=False)
  assert result["num_images"] == 3
  assert _bytes(tmp_path / "three" / "00002.png") == _bytes(out / "00000.png")
  assert _bytes(tmp_path / "three" / "00000.png") == _bytes(out / "00001.png")
  # Prompt selection: a file, then the built-in list.
  path = tmp_path / "prompts.txt"
  path.write_text("# comment\nfirst prompt\nsecond prompt\nthird prompt\n")
  select = generate.prompts_from_config
  assert select(_Config(prompts="", prompts_path=str(path), num_prompts=2)) == ["first prompt", "second prompt"]
  assert select(_Config(prompts="", prompts_path="", num_prompts=3)) == BUILTIN_PROMPTS[:3]
  assert select(_Config(prompts=" x | y ", prompts_path=str(path), num_prompts=1)) == ["x", "y"]
  with pytest.raises(ValueError, match="empty prompt"):
    select(_Config(prompts="a||b", prompts_path="", num_prompts=0))
  with pytest.raises(ValueError, match="prompts is empty"):
    generate.generate_images(pipeline, [], settings, str(tmp_path / "none"), progress=False)


class _Config:
  def __init__(self, **kw):
    self.__dict__.update(kw)
