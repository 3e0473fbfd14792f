"""Configuration of the PTQ command (`launch/ptq.py`): composable parts.

`--config=configs/ptq.py:<parts>` where `<parts>` is a comma-separated list applied in order:
a model (`flux-tiny`, `pixart-tiny`, `flux-dev`, `flux-schnell`, `pixart-sigma`) and any of the
quantization parts in `configs/svdquant/` (`int4`, `nvfp4`, `fast`, `gptq`, `w8a8`) or
`configs/baselines/` (`rtn-int4`, `rtn-nvfp4`, `rtn-w8a8`, `w4a16`, `nf4`). Example::

    python launch/ptq.py --config=configs/ptq.py:flux-schnell,int4,gptq \
        --config.model_path=/data/FLUX.1-schnell --config.quant.rank=16

Every field can be overridden with `--config.<field>=...`; unknown fields are an error.
"""

import importlib.util
import os

import ml_collections

_HERE = os.path.dirname(os.path.abspath(__file__))
_FOLDERS = ("models", "svdquant", "baselines")


def _part(name: str):
  file = name.replace("-", "_") + ".py"
  for folder in _FOLDERS:
    path = os.path.join(_HERE, folder, file)
    if os.path.isfile(path):
      spec = importlib.util.spec_from_file_location(f"svdquant_config_{folder}_{file[:-3]}", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module
  known = sorted(f[:-3].replace("_", "-") for folder in _FOLDERS
                 for f in os.listdir(os.path.join(_HERE, folder)) if f.endswith(".py"))
  raise ValueError(f"unknown config part {name!r}; known parts: {known}")


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "flux-tiny"           # preset name (see svdquant_jax.pipelines.loading)
  c.model_path = ""               # diffusers folder with real weights (required for real-size presets)
  c.seed = 12345                  # image seeds: per prompt, derived from this and the prompt text
  c.output_root = "runs"          # everything goes under <output_root>/<model>/...
  c.output_dirname = ""           # "reference": only make the reference images (the seed's step 1)
  c.save_model = True             # save the quantized model (orbax) under the run folder
  c.resume = True                 # resume an interrupted quantization at the last finished block

  c.pipeline = ml_collections.ConfigDict()
  c.pipeline.num_steps = -1       # -1: the model's default
  c.pipeline.guidance = -1.0      # -1: the model's default
  c.pipeline.height = -1
  c.pipeline.width = -1
  c.pipeline.batch_size = 4

  c.eval = ml_collections.ConfigDict()
  c.eval.prompts_path = ""        # "": the built-in prompt list
  c.eval.num_prompts = 8
  c.eval.baselines = ("rtn-int4", "nf4", "rtn-w8a8")   # also quantized and compared in the table
  c.eval.block_errors = True      # also report the per-block output error on the calibration samples

  c.calib = ml_collections.ConfigDict()
  c.calib.prompts_path = ""       # "": the built-in prompt list
  c.calib.num_prompts = 128
  c.calib.num_samples = 128       # (prompt, step, branch) samples drawn from the collection
  c.calib.seed = 0
  c.calib.path = ""               # "": <output_root>/<model>/calib
  c.calib.batch_size = 16         # samples per device batch in the calibration passes
  c.calib.replay = "fp"           # block inputs: "fp" (full precision, as deepcompressor) or "quantized"
  c.calib.max_tokens = 0          # cap on calibration tokens per linear group (0: all; bounds memory at 1024^2)

  c.quant = ml_collections.ConfigDict()
  c.quant.name = "svdq-int4"
  c.quant.format = "int4"         # int4 | nvfp4 | w8a8 | w4a16 | nf4
  c.quant.rank = 32               # low-rank branch rank (0: no branch)
  c.quant.shift_activations = True    # fc2 inputs: +0.171875, unsigned INT4
  c.quant.skips = ()              # layers kept 16-bit: group names, block-relative or full paths
  c.quant.smooth = ml_collections.ConfigDict()
  c.quant.smooth.enabled = True
  c.quant.smooth.num_grids = 20   # 39 (alpha, beta) pairs; fast: 10 -> 19
  c.quant.smooth.candidates_per_batch = 8
  c.quant.lowrank = ml_collections.ConfigDict()
  c.quant.lowrank.num_iters = 100
  c.quant.lowrank.early_stop = True
  c.quant.gptq = ml_collections.ConfigDict()
  c.quant.gptq.enabled = False
  c.quant.gptq.damp = 0.01
  c.quant.gptq.block_size = 128
  c.quant.gptq.num_inv_tries = 250
  c.quant.weight_only_adaln = True    # adaLN linears W4A16 INT4 g64 (FLUX)
  return c


def compose(parts: str) -> ml_collections.ConfigDict:
  """Builds the base config and applies each named part's `update(config)` in order."""
  c = base()
  for name in [p.strip() for p in parts.split(",") if p.strip()]:
    _part(name).update(c)
  return c


def get_config(parts: str = "flux-tiny") -> ml_collections.ConfigDict:
  return compose(parts)
