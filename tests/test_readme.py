"""The README's promises: its two commands are the ones CI and the scripts use, and its code runs."""

import os
import re

import flax.linen as nn
import numpy as np

from svdquant_jax.eval.metrics import relative_error
from svdquant_jax.formats import quantizers as qz

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
  with open(os.path.join(_REPO, "README.md")) as f:
    return f.read()


def test_the_two_commands_open_the_readme_and_ci_runs_the_test_command():
  first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S).group(1)
  commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
  assert commands == ["bash scripts/setup.sh && .venv/bin/python launch/ptq.py",
                      "bash scripts/setup.sh test && .venv/bin/python -m pytest -q"]
  with open(os.path.join(_REPO, ".ci", "run")) as f:
    assert commands[1] in f.read()


def test_the_model_example_runs_and_beats_rtn():
  code = re.search(r"```python\n(.*?)```", _readme(), re.S).group(1)
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)  # noqa: S102  (our own README)
  y, model, params, x = scope["y"], scope["model"], scope["params"], scope["x_calib"][:8]
  assert y.shape == (8, 256)
  assert set(scope["qparams"]["fc1"]) == {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"}
  want = np.asarray(model.apply({"params": params}, x), np.float64)

  def rtn_dense(name, v):  # RTN W4A4 of the same layer
    d = params[name]
    return qz.fake_int4_act(v) @ qz.fake_int4_weight(d["kernel"]) + d["bias"]
  rtn = rtn_dense("fc2", nn.gelu(rtn_dense("fc1", x), approximate=True))
  err, err_rtn = relative_error(y, want), relative_error(rtn, want)
  assert err < 0.5 * err_rtn, (err, err_rtn)  # the outlier channels ruin RTN W4A4, not SVDQuant
