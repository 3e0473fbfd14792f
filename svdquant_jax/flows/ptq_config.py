"""The PTQ flow's configuration: a base ``ml_collections.ConfigDict`` and named parts that edit it.

A config is composed from a comma-separated list of parts applied in order
(``configs/ptq.py:<parts>`` on the command line, :func:`compose` in Python): one model part
and any number of method parts. ``"+"`` joins parts into one method name in baseline lists
(``eval.baselines=("nvfp4+gptq",)``).

Model parts (deepcompressor's ``model/*.yaml``): ``flux-tiny`` (the built-in default),
``pixart-tiny``, ``flux-dev``, ``flux-schnell``, ``pixart-sigma``.
Method parts (``svdquant/*.yaml`` and the baselines): ``int4``, ``nvfp4``, ``w8a8``, ``fast``,
``gptq``; ``refine`` and ``int4-refined`` (SVDQuant INT4 + learned refinement, not in
deepcompressor); ``rotate`` and ``int4-rotated`` (randomized Hadamard rotation of each group's
input before smoothing, not in deepcompressor; ``int4+rotate+refine`` in baselines);
``rtn-int4``, ``rtn-nvfp4``, ``rtn-w8a8``, ``w4a16``, ``nf4``.
"""

from __future__ import annotations

import copy
from typing import Callable

import ml_collections

Part = Callable[[ml_collections.ConfigDict], None]


def base() -> ml_collections.ConfigDict:
  """Every field of the PTQ flow with its default (SVDQuant INT4 on ``flux-tiny``)."""
  c = ml_collections.ConfigDict()
  c.model = "flux-tiny"           # preset name (see svdquant_jax.pipelines.loading)
  c.model_path = ""               # diffusers folder with real weights (required for real-size presets)
  c.seed = 12345                  # image seeds: per prompt, derived from this and the prompt text
  c.output_root = "runs"          # everything goes under <output_root>/<model>/...
  c.output_dirname = ""           # "reference": only make the reference images (the seed's step 1)
  c.save_model = True             # save the quantized model (orbax) under the run folder
  c.resume = True                 # resume an interrupted quantization at the last finished block
  c.compilation_cache = "auto"    # JAX persistent compilation cache: "auto" ($XDG_CACHE_HOME/svdquant_jax/jax_cache), a folder, or "" (off)

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
  add_metric_fields(c.eval)

  c.calib = ml_collections.ConfigDict()
  c.calib.prompts_path = ""       # "": the built-in prompt list
  c.calib.num_prompts = 128
  c.calib.num_samples = 128       # (prompt, step, branch) samples drawn from the collection
  c.calib.seed = 0
  c.calib.path = ""               # "": <output_root>/<model>/calib
  c.calib.batch_size = 16         # samples per device batch in the calibration passes
  c.calib.replay = "fp"           # block inputs: "fp" (full precision, as deepcompressor) or "quantized"
  c.calib.max_tokens = 0          # cap on calibration tokens per linear group (0: all; bounds memory at 1024^2)
  c.calib.data_parallel = True    # split the samples over all devices (of all processes); num_samples must divide evenly
  c.calib.offload_transformer = "auto"   # float transformer in host memory while quantizing: auto (off on CPU) | true | false

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
  c.quant.lowrank.shared_branch = False  # one branch per group instead of per layer (deepcompressor exclusive=false)
  c.quant.search = ml_collections.ConfigDict()   # cost cuts of the loss evaluations (docs/benchmarks.md)
  c.quant.search.mode = "fast"    # fast: the options below; exact: float32 losses, exhaustive grid (bit for bit as before)
  c.quant.search.loss_dtype = "bfloat16"   # loss evaluations: bfloat16 (bf16 x bf16 -> f32) | float32 (HIGHEST)
  c.quant.search.halving_tokens = 4096     # successive halving of the smoothing grid from this many tokens (0: off)
  c.quant.search.halving_keep = 0.5        # fraction of the smoothing candidates kept per halving round
  c.quant.search.loss_chunk_tokens = 2048  # linear-level losses in chunks of this many tokens (bounds memory; 0: off)
  c.quant.gptq = ml_collections.ConfigDict()
  c.quant.gptq.enabled = False
  c.quant.gptq.damp = 0.01
  c.quant.gptq.block_size = 128
  c.quant.gptq.num_inv_tries = 250
  c.quant.weight_only_adaln = True    # adaLN linears W4A16 INT4 g64 (FLUX)
  c.quant.refine = ml_collections.ConfigDict()   # learned refinement after the search / GPTQ (quant/refine.py)
  c.quant.refine.steps = 0        # Adam steps per layer group (0: off, the exact deepcompressor pipeline)
  c.quant.refine.lr = 3e-3        # peak learning rate of the relative parameters, cosine decay
  c.quant.refine.pieces = ("lowrank", "smooth")   # which pieces move: the branch A, B and/or log λ
  c.quant.refine.tokens = 0       # calibration tokens per step (0: all, full-batch)
  c.quant.refine.seed = 0         # seed of the token draws
  c.quant.rotation = ml_collections.ConfigDict()   # Hadamard rotation of each group's input (quant/rotation.py)
  c.quant.rotation.enabled = False   # rotated inputs are signed: needs shift_activations=False for INT4
  c.quant.rotation.seed = 0          # run seed; each group's sign seed derives from it and the group name
  c.quant.rotation.block = 0         # Hadamard block (0: the largest power of two dividing K)
  c.quant.rotation.min_block = 16    # a K without a power-of-two block >= this is refused (skip the layer)
  return c


def add_metric_fields(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The evaluation step's fields (shared by the PTQ flow's and the evaluate command's ``eval``).

  Weights: a path, ``""`` (off) or ``"auto"`` (the file of that name under
  ``$XDG_CACHE_HOME/svdquant_jax/weights/`` when it exists; see docs/metrics.md). A metric without
  its weights or inputs is reported as not computed, with the reason, under the results table.
  """
  section.metrics = "all"                 # all, or some of psnr,ssim,lpips,fid_ref,fid,clip_score,clip_iqa,image_reward
  section.lpips_weights = "auto"          # LPIPS (launch/convert_lpips.py); auto: lpips_<net>.safetensors
  section.lpips_net = "alex"              # alex (deepcompressor's) | vgg
  section.inception_weights = "auto"      # FID (launch/convert_inception.py); auto: inception_fid.safetensors
  section.clip_model = "auto"             # transformers CLIPModel folder; auto: clip-vit-large-patch14
  section.clip_tokenizer = ""             # "": the CLIP model folder
  section.image_reward_weights = "auto"   # launch/convert_image_reward.py; auto: image_reward.safetensors
  section.image_reward_tokenizer = "auto" # bert-base-uncased tokenizer folder; auto: bert-base-uncased
  section.fid_min_images = 2048           # FID only from at least this many images (2048: the feature dimension)
  section.batch_size = 16                 # images per metric batch over all devices
  section.data_parallel = True            # shard generation and metrics over all local devices
  section.feature_cache = "auto"          # auto ($XDG_CACHE_HOME/svdquant_jax/features), a folder, or "" (off)
  section.contact_sheet_images = 8        # images on each method's comparison sheet (0: none)
  section.benchmark = ""                  # prompt file: MJHQ-30K meta_data.json, sDCI.yaml, or a prompt list
  section.benchmark_images = ""           # real images: <root>/<category>/<name>.jpg (MJHQ), <root>/<name>.jpg
  section.benchmark_layout = "auto"       # auto | mjhq | sdci | prompts
  return section


# ----------------------------------------------------------------------------- model parts
def _model(name: str, *, eval_prompts: int, calib_prompts: int, samples: int, batch_size: int,
           max_tokens: int = 0) -> Part:
  def update(c: ml_collections.ConfigDict) -> None:
    c.model = name
    c.eval.num_prompts = eval_prompts
    c.calib.num_prompts = calib_prompts
    c.calib.num_samples = samples
    c.calib.batch_size = batch_size
    if max_tokens:
      c.calib.max_tokens = max_tokens
  return update


# Real-size models at 1024^2: 128 samples x 4608 tokens would need ~25 GB for the fc2 inputs in
# float32, so the calibration tokens per group are capped.
_REAL_MAX_TOKENS = 131072
MODEL_PARTS: dict[str, Part] = {
    "flux-tiny": _model("flux-tiny", eval_prompts=8, calib_prompts=16, samples=32, batch_size=8),
    "pixart-tiny": _model("pixart-tiny", eval_prompts=8, calib_prompts=16, samples=32, batch_size=8),
    "sana-tiny": _model("sana-tiny", eval_prompts=8, calib_prompts=16, samples=32, batch_size=8),
    "flux-dev": _model("flux-dev", eval_prompts=1024, calib_prompts=128, samples=128, batch_size=16,
                       max_tokens=_REAL_MAX_TOKENS),
    "flux-schnell": _model("flux-schnell", eval_prompts=1024, calib_prompts=128, samples=128, batch_size=32,
                           max_tokens=_REAL_MAX_TOKENS),
    "pixart-sigma": _model("pixart-sigma", eval_prompts=1024, calib_prompts=128, samples=128, batch_size=32,
                           max_tokens=_REAL_MAX_TOKENS),
    "sana-1.6b": _model("sana-1.6b", eval_prompts=1024, calib_prompts=128, samples=128, batch_size=32,
                        max_tokens=_REAL_MAX_TOKENS),
}


# ----------------------------------------------------------------------------- method parts
def _method(name: str, fmt: str, *, rank: int, smooth: bool, shift: bool) -> Part:
  def update(c: ml_collections.ConfigDict) -> None:
    c.quant.name = name
    c.quant.format = fmt
    c.quant.rank = rank
    c.quant.smooth.enabled = smooth
    c.quant.shift_activations = shift
  return update


def _fast(c: ml_collections.ConfigDict) -> None:
  """deepcompressor ``svdquant/fast.yaml``: 19 smoothing candidates, at most 64 samples."""
  c.quant.smooth.num_grids = 10
  c.calib.num_samples = min(c.calib.num_samples, 64)
  c.quant.name = c.quant.name + "-fast"


def _gptq(c: ml_collections.ConfigDict) -> None:
  """deepcompressor ``svdquant/gptq.yaml``: GPTQ on the residual after the low-rank branch."""
  c.quant.gptq.enabled = True
  c.quant.gptq.damp = 0.01
  c.quant.gptq.block_size = 128
  c.quant.gptq.num_inv_tries = 250
  c.quant.name = c.quant.name + "-gptq"


REFINE_STEPS = 200


def _refine(c: ml_collections.ConfigDict) -> None:
  """Learned refinement of λ and the branch after the search (and GPTQ); see quant/refine.py."""
  c.quant.refine.steps = REFINE_STEPS
  c.quant.name = c.quant.name + "-refined"


def _int4_refined(c: ml_collections.ConfigDict) -> None:
  METHOD_PARTS["int4"](c)
  _refine(c)


def _rotate(c: ml_collections.ConfigDict) -> None:
  """Randomized Hadamard rotation of every W/A group's input before the smoothing search; the
  rotated input is signed, so the unsigned shifted fc2 path is off (quant/rotation.py)."""
  c.quant.rotation.enabled = True
  c.quant.shift_activations = False
  c.quant.name = c.quant.name + "-rotated"


def _int4_rotated(c: ml_collections.ConfigDict) -> None:
  METHOD_PARTS["int4"](c)
  _rotate(c)


METHOD_PARTS: dict[str, Part] = {
    # SVDQuant (deepcompressor svdquant/int4.yaml, nvfp4.yaml): smoothing + rank-32 branch.
    "int4": _method("svdq-int4", "int4", rank=32, smooth=True, shift=True),
    "nvfp4": _method("svdq-nvfp4", "nvfp4", rank=32, smooth=True, shift=False),
    # No W8A8 config ships with deepcompressor; the paper's W8A8 setting uses rank 16.
    "w8a8": _method("svdq-w8a8", "w8a8", rank=16, smooth=True, shift=False),
    "fast": _fast,
    "gptq": _gptq,
    "refine": _refine,
    "int4-refined": _int4_refined,
    "rotate": _rotate,
    "int4-rotated": _int4_rotated,
    # Baselines: round to nearest without smoothing or branch, and weight-only formats.
    "rtn-int4": _method("rtn-int4", "int4", rank=0, smooth=False, shift=True),
    "rtn-nvfp4": _method("rtn-nvfp4", "nvfp4", rank=0, smooth=False, shift=False),
    "rtn-w8a8": _method("rtn-w8a8", "w8a8", rank=0, smooth=False, shift=False),
    "w4a16": _method("w4a16-int4", "w4a16", rank=0, smooth=False, shift=False),
    "nf4": _method("w4a16-nf4", "nf4", rank=0, smooth=False, shift=False),
}
PARTS: dict[str, Part] = {**MODEL_PARTS, **METHOD_PARTS}


def _names(parts: str, sep: str) -> list[str]:
  names = [p.strip() for p in parts.split(sep) if p.strip()]
  unknown = [n for n in names if n not in PARTS]
  if unknown:
    raise ValueError(f"unknown config part(s) {unknown}; known parts: models {sorted(MODEL_PARTS)}, "
                     f"methods {sorted(METHOD_PARTS)}")
  return names


def apply(config: ml_collections.ConfigDict, parts: str, sep: str = ",") -> ml_collections.ConfigDict:
  """Applies the named parts to ``config`` in order (in place); returns it."""
  for name in _names(parts, sep):
    PARTS[name](config)
  return config


def compose(parts: str = "flux-tiny") -> ml_collections.ConfigDict:
  """The base config with the named parts applied (``"flux-schnell,int4,gptq"``)."""
  return apply(base(), parts)


def method_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The configured method followed by each baseline of ``config.eval.baselines``.

  A baseline is a copy of ``config`` whose ``quant`` section is reset to the base and then edited
  by the baseline's parts (``"nvfp4+gptq"``: both, in order).

  Raises:
    ValueError: an unknown part, or two methods with the same name (their runs would share a
      folder).
  """
  out = [config]
  for name in config.eval.baselines:
    c = copy.deepcopy(config)
    with c.unlocked():
      c.quant = base().quant
    out.append(apply(c, name, sep="+"))
  names = [c.quant.name for c in out]
  if len(set(names)) != len(names):
    raise ValueError(f"two methods share a name (their runs would share a folder): {names}")
  return out
