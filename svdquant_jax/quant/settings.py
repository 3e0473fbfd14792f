"""One frozen settings object for a quantization run: :class:`PTQSettings`.

It is built once (from the ``quant`` and ``calib`` sections of a PTQ config, or by hand for one
layer group) and passed down unchanged: the block driver reads the run-level fields, and
:func:`~svdquant_jax.quant.svdquant.quantize_linear_group` hands the whole object to its jitted
core as one static argument (it is hashable and compares by value, so equal settings share one
compilation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from svdquant_jax.formats.quantizers import FORMATS, QuantFormat, QuantizationError
from svdquant_jax.quant.refine import RefineSettings
from svdquant_jax.quant.rotation import RotationSettings
from svdquant_jax.quant.smooth import LOSS_DTYPES, alpha_beta_grid

REPLAY_MODES = ("fp", "quantized")


@dataclasses.dataclass(frozen=True)
class PTQSettings:
  """What to quantize and how.

  Attributes:
    fmt: the quantization format, with its scale storage dtype set to the model's parameter
      dtype (so the searches see exactly the scales the deployed layer stores).
    rank: low-rank branch rank r (0: no branch).
    smooth: search the smoothing vector λ; False: λ = 1.
    num_grids: size of deepcompressor's (α, β) grid, ``2 (num_grids - 1) + 1`` pairs.
    grid: an explicit (α, β) grid instead (``None``: the one of ``num_grids``).
    lowrank_iters: alternating low-rank iterations (1: one-shot SVD).
    early_stop: stop at the first iteration whose loss exceeds the best.
    shared_branch: layers of one group share one low-rank branch (deepcompressor's
      ``exclusive: false``) instead of one branch each.
    gptq, gptq_damp, gptq_block_size, gptq_max_inv_tries, hessian_block_rows: GPTQ on the
      residual and its settings (0.01, 128, 250, 512 as deepcompressor).
    svd_iters, oversample: the randomized SVD's subspace iterations and oversampling
      (``None``: the defaults of :func:`~svdquant_jax.quant.lowrank.svd_lowrank`).
    candidate_batch: smoothing candidates evaluated together (memory vs. parallelism).
    shift_activations: shift the GELU-output inputs (fc2) by +0.171875 and quantize them
      unsigned (INT4 only).
    weight_only_adaln: quantize the adaLN modulation linears W4A16 (FLUX).
    skips: layers kept in 16-bit (group names, block-relative or full paths).
    batch_size: calibration samples per device batch in the block passes.
    replay: the next block's inputs: ``"fp"`` (full-precision outputs, as deepcompressor) or
      ``"quantized"`` (outputs with this block's quantized layers).
    max_tokens: cap on the calibration tokens per linear group (0: all), chosen by a seeded
      permutation (``token_seed``).
    refine: learned refinement of the pieces after the search and GPTQ
      (:class:`~svdquant_jax.quant.refine.RefineSettings`; off by default).
    loss_dtype: operand dtype of the loss evaluations of the smoothing grid and the alternating
      iterations: ``"float32"`` (``Precision.HIGHEST``, today's) or ``"bfloat16"`` (bf16 x bf16 ->
      float32 accumulation; :func:`~svdquant_jax.quant.smooth.loss_forward`). Losses that do not
      support it (no ``loss_dtype`` field) stay float32.
    halving_tokens: successive halving of the smoothing grid from this many tokens (0: off, the
      exhaustive grid; :func:`~svdquant_jax.quant.smooth.halving_schedule`), token subsets seeded
      by ``token_seed``.
    halving_keep: fraction of the smoothing candidates kept per halving round, in (0, 1).
    loss_chunk_tokens: linear-level losses run over the tokens in chunks of this many (0: all at
      once), so that a batch of candidates holds ``candidate_batch x chunk x (K + N)`` floats
      instead of ``candidate_batch x T x (K + N)`` (docs/design.md, "PTQ memory").
    rotation: randomized Hadamard rotation of every W/A group's input before the smoothing search
      (:class:`~svdquant_jax.quant.rotation.RotationSettings`; off by default). A rotated input is
      signed, so INT4 rotation needs ``shift_activations=False`` (no unsigned fc2 path).

  The dataclass defaults are the exact search (float32 losses, exhaustive grid): :meth:`exact`
  gives these for any settings. The PTQ config's defaults (``quant.search``) may differ.
  """
  fmt: QuantFormat = FORMATS["int4"]
  rank: int = 32
  smooth: bool = True
  num_grids: int = 20
  grid: tuple[tuple[float, float], ...] | None = None
  lowrank_iters: int = 100
  early_stop: bool = True
  shared_branch: bool = False
  gptq: bool = False
  gptq_damp: float = 0.01
  gptq_block_size: int = 128
  gptq_max_inv_tries: int = 250
  hessian_block_rows: int = 512
  svd_iters: int | None = None
  oversample: int | None = None
  candidate_batch: int = 8
  shift_activations: bool = True
  weight_only_adaln: bool = True
  skips: tuple[str, ...] = ()
  batch_size: int = 8
  replay: str = "fp"
  max_tokens: int = 0
  token_seed: int = 0
  refine: RefineSettings = RefineSettings()
  loss_dtype: str = "float32"
  halving_tokens: int = 0
  halving_keep: float = 0.5
  rotation: RotationSettings = RotationSettings()
  loss_chunk_tokens: int = 0

  def __post_init__(self):
    if not isinstance(self.fmt, QuantFormat):
      raise QuantizationError(f"PTQSettings.fmt must be a QuantFormat, got {self.fmt!r}")
    if self.replay not in REPLAY_MODES:
      raise ValueError(f"calib.replay must be one of {REPLAY_MODES}, got {self.replay!r}")
    if self.rank < 0:
      raise ValueError(f"quant.rank must be >= 0, got {self.rank}")
    if self.rank and self.lowrank_iters < 1:
      raise ValueError(f"quant.lowrank.num_iters must be >= 1 (1 = one-shot SVD), got {self.lowrank_iters}")
    if self.batch_size <= 0 or self.candidate_batch <= 0:
      raise ValueError("calib.batch_size and quant.smooth.candidates_per_batch must be positive")
    if self.max_tokens < 0:
      raise ValueError(f"calib.max_tokens must be >= 0, got {self.max_tokens}")
    if self.loss_dtype not in LOSS_DTYPES:
      raise ValueError(f"quant.search.loss_dtype must be one of {LOSS_DTYPES}, got {self.loss_dtype!r}")
    if self.halving_tokens < 0:
      raise ValueError(f"quant.search.halving_tokens must be >= 0 (0: exhaustive grid), got {self.halving_tokens}")
    if self.loss_chunk_tokens < 0:
      raise ValueError(f"quant.search.loss_chunk_tokens must be >= 0 (0: no chunks), got {self.loss_chunk_tokens}")
    if not 0.0 < self.halving_keep < 1.0:
      raise ValueError(f"quant.search.halving_keep must be in (0, 1), got {self.halving_keep}")
    if self.grid is not None:
      object.__setattr__(self, "grid", tuple((float(a), float(b)) for a, b in self.grid))
    object.__setattr__(self, "skips", tuple(self.skips))
    if self.refine.enabled and self.shared_branch:
      raise ValueError("quant.refine is not supported with quant.lowrank.shared_branch")
    if self.rotation.enabled and self.shift_activations and self.fmt.act == "int4":
      raise ValueError("quant.rotation makes every group input signed, so the unsigned shifted INT4 fc2 path "
                       "cannot be used: set quant.shift_activations=False (the 'rotate' config part does)")

  @property
  def smoothing_grid(self) -> tuple[tuple[float, float], ...]:
    """The (α, β) pairs the smoothing search tries."""
    return self.grid if self.grid is not None else alpha_beta_grid(self.num_grids)

  def replace(self, **changes: Any) -> PTQSettings:
    return dataclasses.replace(self, **changes)

  @property
  def exact_search(self) -> bool:
    """Whether the searches are today's: float32 losses and the exhaustive smoothing grid."""
    return self.loss_dtype == "float32" and not self.halving_tokens and not self.loss_chunk_tokens

  def exact(self) -> PTQSettings:
    """These settings with the exact search (float32 losses, exhaustive grid): the choices and
    codes of the search before the cost cuts, bit for bit."""
    return self.replace(loss_dtype="float32", halving_tokens=0, halving_keep=0.5, loss_chunk_tokens=0)

  @classmethod
  def from_config(cls, config: Any, param_dtype: Any = None) -> PTQSettings:
    """From a PTQ config's ``quant`` and ``calib`` sections (``svdquant_jax.flows.ptq_config``).

    Args:
      config: the ConfigDict.
      param_dtype: the model's parameter dtype: the storage dtype of the quantization scales
        (``None``: each quantizer's default).
    """
    q, c = config.quant, config.calib
    if q.format not in FORMATS:
      raise ValueError(f"quant.format={q.format!r} is not a known format; expected one of {sorted(FORMATS)}")
    fmt = FORMATS[q.format]
    if param_dtype is not None:
      fmt = dataclasses.replace(fmt, scale_dtype=jnp.dtype(param_dtype).name)
    return cls(fmt=fmt, rank=q.rank, smooth=q.smooth.enabled, num_grids=q.smooth.num_grids,
               lowrank_iters=q.lowrank.num_iters, early_stop=q.lowrank.early_stop,
               shared_branch=q.lowrank.get("shared_branch", False), gptq=q.gptq.enabled, gptq_damp=q.gptq.damp,
               gptq_block_size=q.gptq.block_size, gptq_max_inv_tries=q.gptq.num_inv_tries,
               candidate_batch=q.smooth.candidates_per_batch, shift_activations=q.shift_activations,
               weight_only_adaln=q.weight_only_adaln, skips=tuple(q.skips), batch_size=c.batch_size,
               replay=c.replay, max_tokens=c.max_tokens, token_seed=c.seed, refine=_refine_settings(q),
               rotation=_rotation_settings(q), **_search_settings(q))

  def to_json(self) -> dict[str, Any]:
    """The settings as JSON-able values (a run's identity). Rotation off is left out, so the
    identity of an unrotated run is what it was before rotation existed."""
    out = dataclasses.asdict(self)
    if not self.rotation.enabled:
      del out["rotation"]
    if not self.loss_chunk_tokens:  # as above: unchanged identity without chunks
      del out["loss_chunk_tokens"]
    return out


SEARCH_MODES = ("fast", "exact")


def _search_settings(q: Any) -> dict[str, Any]:
  """The ``quant.search`` section (absent in older configs: exact); mode ``"exact"`` ignores the rest."""
  s = q.get("search", None)
  if s is None:
    return {}
  if s.mode not in SEARCH_MODES:
    raise ValueError(f"quant.search.mode must be one of {SEARCH_MODES}, got {s.mode!r}")
  if s.mode == "exact":
    return {}
  return {"loss_dtype": s.loss_dtype, "halving_tokens": s.halving_tokens, "halving_keep": s.halving_keep,
          "loss_chunk_tokens": s.get("loss_chunk_tokens", 0)}


def _refine_settings(q: Any) -> RefineSettings:
  """The ``quant.refine`` section (absent in older configs: off)."""
  r = q.get("refine", None)
  if r is None:
    return RefineSettings()
  return RefineSettings(steps=r.steps, lr=r.lr, pieces=tuple(r.pieces), tokens=r.tokens, seed=r.seed)


def _rotation_settings(q: Any) -> RotationSettings:
  """The ``quant.rotation`` section (absent in older configs: off)."""
  r = q.get("rotation", None)
  if r is None:
    return RotationSettings()
  return RotationSettings(enabled=r.enabled, seed=r.seed, block=r.block, min_block=r.min_block)
