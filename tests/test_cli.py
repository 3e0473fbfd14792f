"""The launch commands fail with one line that names the problem (no traceback unless --debug)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(ROOT / "launch" / script), *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert "Traceback" not in done.stderr, done.stderr
  assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
  return lines[0]


@pytest.mark.parametrize("args, status, expected", [
    (("--config.x=1",), 2, "--config.x=1: the config has no field 'x'"),
    (("--config.quant.rnk=1",), 2, 'no field \'quant.rnk\' (did you mean "rank"?)'),
    (("--config.quant.rank=abc",), 2, "--config.quant.rank=abc"),
    (("--config=configs/ptq.py:fluxx",), 2, "unknown config part(s) ['fluxx']"),
    (("extra",), 2, "unexpected arguments ['extra']"),
    (("--config.model=no-such-model", "--config.eval.baselines=()"), 1, "no-such-model"),
])
def test_ptq_errors_are_one_line(args, status, expected):
  done = _run("ptq.py", *args)
  assert done.returncode == status, done.stderr
  assert expected in _one_error_line(done)


def test_debug_shows_the_traceback():
  done = _run("ptq.py", "--config.x=1", "--debug")
  assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr


def test_generate_missing_quantized_model_is_one_line(tmp_path):
  done = _run("generate.py", f"--config.quantized_model={tmp_path / 'nothing'}", "--config.num_prompts=1",
              f"--config.output_dir={tmp_path / 'out'}", "--config.progress=false")
  assert done.returncode == 1
  assert "nothing" in _one_error_line(done)
