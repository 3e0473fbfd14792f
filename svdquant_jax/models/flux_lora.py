"""Off-the-shelf FLUX.1 LoRA files -> low-rank factors per layer of our FLUX model.

Two steps (``docs/lora.md``):

1. :func:`normalize` reads the keys of any supported format into diffusers module names
   (``transformer_blocks.0.attn.to_q``): per module ``A [r, K]``, ``B [N, r]`` (float32, the
   alpha/rank scale applied, ``ΔW = B·A``), bias deltas ``Δb [N]`` and norm weights that replace
   the model's. Formats: diffusers / PEFT (``lora_A`` / ``lora_B``, optional ``<module>.alpha``
   or PEFT metadata, ``transformer.`` prefix), kohya / sd-scripts / ComfyUI (``lora_unet_*``,
   ``diffusion_model.*``, ``lora_down`` / ``lora_up`` / ``alpha``, the original FLUX module
   names with fused ``qkv`` and single-block ``linear1``), ``lora_transformer_*``,
   ``base_model.model.*`` (fal / PEFT) and XLabs (``processor.qkv_lora1.down.weight``).
   Text-encoder keys are dropped with a note, DoRA magnitudes with a warning.
2. :func:`to_model` maps them onto our parameter paths with the diffusers -> Flax table of
   :func:`~svdquant_jax.models.flux_loader.flux_mapping` (the table that loads the weights): q/k/v
   members are fused into ``to_qkv`` / ``add_qkv_proj`` and the single block's ``proj_out`` is
   split by input columns into ``proj_out_attn`` / ``proj_out_mlp``.

Scales: ``lora_A``/``lora_B`` files put ``alpha / r`` into ``A`` (PEFT's scaling; a
``lora_B.bias`` is scaled by it too, as PEFT does); ``lora_down``/``lora_up`` files split it
between ``A`` and ``B`` (sd-scripts: ``A·s_down``, ``B·s_up``, ``s_down·s_up = alpha / r``,
``s_down`` doubled while ``2·s_down < s_up``); a missing alpha means ``alpha = r``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from svdquant_jax.models.flux import FluxConfig, abstract_flux_params
from svdquant_jax.models.flux_loader import flux_mapping
from svdquant_jax.utils import trees
from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile

# (prefix, whether the module name after it has its dots turned into underscores)
_PREFIXES = (("base_model.model.", False), ("model.diffusion_model.", False), ("diffusion_model.", False),
             ("transformer.", False), ("lora_unet_", True), ("lora_transformer_", True), ("lycoris_", True),
             ("", False))
_SUFFIXES = ((".lora_A.weight", "a"), (".lora_B.weight", "b"), (".lora_down.weight", "down"),
             (".lora_up.weight", "up"), (".lora_B.bias", "lora_bias"), (".diff_b", "diff_b"), (".alpha", "alpha"),
             (".down.weight", "a"), (".up.weight", "b"),  # XLabs (``processor.qkv_lora1.down.weight``)
             (".weight", "vector"), (".scale", "vector"))
_TEXT_ENCODER = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                 "text_encoders.", "te1.", "te2.")
_DORA = (".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")
_NUNCHAKU = (".mlp_fc", "mlp_context_fc1")
_FOREIGN = (
    (re.compile(r"(^|[._])(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"),
     "a Stable Diffusion / SDXL UNet"),
    (re.compile(r"(^|[._])(attn1|attn2|adaln_single|caption_projection)[._]"), "PixArt (a cross-attention DiT)"),
    (re.compile(r"(^|[._])(joint_blocks|context_block|x_block)[._]"), "Stable Diffusion 3"),
)
_METADATA_KEY = "lora_adapter_metadata"
_LISTED = 8


class LoraError(CheckpointError):
  """A LoRA file cannot be applied to this model (format, family, shape or unmatched keys)."""


@dataclasses.dataclass(frozen=True)
class LoraFactors:
  """One layer's low-rank update ``ΔW = b @ a``: ``a [r, K]``, ``b [N, r]`` float32 (PyTorch
  orientation: the layer computes ``y += (x @ a.T) @ b.T``)."""
  a: np.ndarray
  b: np.ndarray

  @property
  def rank(self) -> int:
    return int(self.a.shape[0])

  def delta(self) -> np.ndarray:
    """``ΔW [N, K]`` in float64."""
    return self.b.astype(np.float64) @ self.a.astype(np.float64)


@dataclasses.dataclass(frozen=True)
class DiffusersLora:
  """A LoRA in diffusers module names (no ``transformer.`` prefix), scales applied.

  Attributes:
    layers: ``{"transformer_blocks.0.attn.to_q": LoraFactors}``.
    bias: ``{module: Δb [N]}`` float32 (added to the module's bias, times the strength).
    norms: ``{"transformer_blocks.0.attn.norm_q": weight [D]}``: replaces the RMSNorm weight.
    unmatched: keys that match no layer of this model.
    notes: what was dropped as expected (text-encoder keys).
    warnings: what was dropped although it changes the result (DoRA magnitudes).
  """
  layers: dict[str, LoraFactors]
  bias: dict[str, np.ndarray]
  norms: dict[str, np.ndarray]
  unmatched: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class FluxLora:
  """A LoRA on our FLUX model's parameter paths.

  Attributes:
    source: the file (or a name) for messages.
    layers: ``{"transformer_blocks_0/attn/to_qkv": LoraFactors}`` for our (possibly fused) Dense.
    bias: ``{Dense path: Δb [N]}``.
    norms: ``{"transformer_blocks_0/attn/norm_q": scale [D]}`` (replaces the RMSNorm ``scale``).
    unmatched, notes, warnings: as in :class:`DiffusersLora`.
  """
  source: str
  layers: dict[str, LoraFactors]
  bias: dict[str, np.ndarray]
  norms: dict[str, np.ndarray]
  unmatched: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()
  warnings: tuple[str, ...] = ()

  def summary(self) -> str:
    ranks = sorted({f.rank for f in self.layers.values()})
    return (f"{self.source}: {len(self.layers)} layers (rank {ranks[0]}-{ranks[-1]})" if ranks else
            f"{self.source}: no layers") + f", {len(self.bias)} bias deltas, {len(self.norms)} norm weights"


def is_nunchaku_format(keys: Any) -> bool:
  """Whether a LoRA's keys are Nunchaku's own layer names (``.mlp_fc``, ``mlp_context_fc1``): a file
  that stores whole low-rank branches of one quantized checkpoint (``svdquant_jax.quant.nunchaku.lora``)."""
  return any(s in k for k in keys for s in _NUNCHAKU)


def _listing(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  more = f", ... ({len(keys) - _LISTED} more)" if len(keys) > _LISTED else ""
  return ", ".join(keys[:_LISTED]) + more


# ----------------------------------------------------------------------------- name tables
@dataclasses.dataclass(frozen=True)
class _Fused:
  """An original-FLUX (BFL / kohya / ComfyUI) module: its diffusers member(s) along output rows."""
  members: tuple[str, ...]
  sizes: tuple[int, ...]
  swap_halves: bool = False   # final_layer.adaLN_modulation.1: BFL (shift, scale) -> diffusers (scale, shift)


@dataclasses.dataclass(frozen=True)
class _Tables:
  kernel_rules: dict[str, Any]       # our Dense path -> Rule (sources: "<module>.weight")
  bias_rules: dict[str, Any]         # our Dense path -> Rule (sources: "<module>.bias")
  norm_targets: dict[str, str]       # diffusers norm module -> our RMSNorm path
  shapes: dict[str, tuple[int, ...]]  # our flat param path -> shape
  linears: frozenset[str]            # diffusers linear modules
  bfl: dict[str, _Fused]             # BFL linear module -> diffusers members
  bfl_norms: dict[str, str]          # BFL norm module -> diffusers norm module
  underscored: dict[str, str]        # any known name with "." -> "_" -> the name


def _bfl_table(config: FluxConfig) -> tuple[dict[str, _Fused], dict[str, str]]:
  """Original FLUX module names -> diffusers modules, sized by ``config`` (not FLUX.1's widths)."""
  dim, mlp = config.inner_dim, config.mlp_dim
  one = lambda module, n: _Fused((module,), (n,))  # noqa: E731
  linears: dict[str, _Fused] = {}
  norms: dict[str, str] = {}
  for i in range(config.num_layers):
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    for stream, q, proj, ff, mod, nq, nk in (
        ("img", "attn.to_{}", "attn.to_out.0", "ff", "norm1", "norm_q", "norm_k"),
        ("txt", "attn.add_{}_proj", "attn.to_add_out", "ff_context", "norm1_context", "norm_added_q",
         "norm_added_k")):
      linears[f"{b}.{stream}_attn.qkv"] = _Fused(tuple(f"{d}.{q.format(p)}" for p in "qkv"), (dim,) * 3)
      linears[f"{b}.{stream}_attn.proj"] = one(f"{d}.{proj}", dim)
      linears[f"{b}.{stream}_mlp.0"] = one(f"{d}.{ff}.net.0.proj", mlp)
      linears[f"{b}.{stream}_mlp.2"] = one(f"{d}.{ff}.net.2", dim)
      linears[f"{b}.{stream}_mod.lin"] = one(f"{d}.{mod}.linear", 6 * dim)
      norms[f"{b}.{stream}_attn.norm.query_norm"] = f"{d}.attn.{nq}"
      norms[f"{b}.{stream}_attn.norm.key_norm"] = f"{d}.attn.{nk}"
    # XLabs LoRAs name the attention layers by their processor: 1 = image stream, 2 = text stream.
    for n, stream in ((1, "img"), (2, "txt")):
      linears[f"{b}.processor.qkv_lora{n}"] = linears[f"{b}.{stream}_attn.qkv"]
      linears[f"{b}.processor.proj_lora{n}"] = linears[f"{b}.{stream}_attn.proj"]
  for i in range(config.num_single_layers):
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    linears[f"{b}.linear1"] = _Fused((f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"),
                                     (dim, dim, dim, mlp))
    linears[f"{b}.linear2"] = one(f"{d}.proj_out", dim)
    linears[f"{b}.modulation.lin"] = one(f"{d}.norm.linear", 3 * dim)
    norms[f"{b}.norm.query_norm"] = f"{d}.attn.norm_q"
    norms[f"{b}.norm.key_norm"] = f"{d}.attn.norm_k"
    linears[f"{b}.processor.qkv_lora"] = _Fused(tuple(f"{d}.attn.to_{p}" for p in "qkv"), (dim,) * 3)
    linears[f"{b}.processor.proj_lora"] = one(f"{d}.proj_out", dim)
  t = "time_text_embed"
  linears.update({
      "img_in": one("x_embedder", dim), "txt_in": one("context_embedder", dim),
      "time_in.in_layer": one(f"{t}.timestep_embedder.linear_1", dim),
      "time_in.out_layer": one(f"{t}.timestep_embedder.linear_2", dim),
      "vector_in.in_layer": one(f"{t}.text_embedder.linear_1", dim),
      "vector_in.out_layer": one(f"{t}.text_embedder.linear_2", dim),
      "final_layer.linear": one("proj_out", config.out_features),
      "final_layer.adaLN_modulation.1": _Fused(("norm_out.linear",), (2 * dim,), swap_halves=True)})
  if config.guidance_embeds:
    linears["guidance_in.in_layer"] = one(f"{t}.guidance_embedder.linear_1", dim)
    linears["guidance_in.out_layer"] = one(f"{t}.guidance_embedder.linear_2", dim)
  return linears, norms


@functools.lru_cache(maxsize=8)
def _tables(config: FluxConfig) -> _Tables:
  kernel_rules, bias_rules, norm_targets = {}, {}, {}
  for rule in flux_mapping(config):
    path, _, leaf = rule.target.rpartition("/")
    if leaf == "kernel":
      kernel_rules[path] = rule
    elif leaf == "bias":
      bias_rules[path] = rule
    elif leaf == "scale":
      (source,) = rule.sources
      norm_targets[source.removesuffix(".weight")] = path
  linears = frozenset(s.removesuffix(".weight") for r in kernel_rules.values() for s in r.sources)
  bfl, bfl_norms = _bfl_table(config)
  underscored: dict[str, str] = {}
  for name in (*linears, *norm_targets, *bfl, *bfl_norms):
    other = underscored.setdefault(name.replace(".", "_"), name)
    assert other == name, (other, name)  # no two known names collide once underscored
  shapes = {k: tuple(v.shape) for k, v in trees.flatten(abstract_flux_params(config)).items()}
  return _Tables(kernel_rules, bias_rules, norm_targets, shapes, linears, bfl, bfl_norms, underscored)


def _resolve(t: _Tables, module: str, underscored: bool) -> str | None:
  known = (t.linears, t.norm_targets, t.bfl, t.bfl_norms)
  if not underscored and any(module in names for names in known):
    return module
  return t.underscored.get(module.replace(".", "_"))


def _parse_key(t: _Tables, key: str) -> tuple[str, str] | None:
  """``key -> (known module name, entry kind)``, or ``None`` if it names no module of this model."""
  for suffix, kind in _SUFFIXES:
    if not key.endswith(suffix):
      continue
    stem = key[:-len(suffix)]
    for prefix, underscored in _PREFIXES:
      if stem.startswith(prefix):
        module = _resolve(t, stem[len(prefix):], underscored)
        if module is not None:
          return module, kind
    return None
  return None


# ----------------------------------------------------------------------------- reading
def read_lora(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """A LoRA ``.safetensors`` file: ``(tensors, metadata)``; floating tensors (bf16, fp16, fp8)
  are upcast to float32."""
  f = SafetensorsFile(path)
  tensors = {}
  for name in f.keys():
    x = f.read(name)
    if x.dtype.kind not in "iub":  # float64/32/16, bfloat16, float8 (ml_dtypes)
      x = x.astype(np.float32)
    tensors[name] = x
  return tensors, dict(f.metadata)


def _peft_metadata(metadata: Mapping[str, str] | None, source: str) -> dict[str, Any]:
  """The PEFT ``LoraConfig`` fields diffusers stores in the file (``lora_adapter_metadata``)."""
  raw = (metadata or {}).get(_METADATA_KEY)
  if not raw:
    return {}
  try:
    fields = json.loads(raw)
  except json.JSONDecodeError as e:
    raise LoraError(f"{source}: malformed {_METADATA_KEY} metadata: {e}") from e
  # diffusers' pipeline-level files prefix the fields with the component ("transformer.r").
  own = {k.removeprefix("transformer."): v for k, v in fields.items() if k.startswith("transformer.")}
  return own or {k: v for k, v in fields.items() if "." not in k}


def _peft_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
  alpha = config.get("lora_alpha", rank)
  for pattern, value in (config.get("alpha_pattern") or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      alpha = value
      break
  return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _kohya_split(scale: float) -> tuple[float, float]:
  """sd-scripts' split of ``alpha / r`` between the down and up factors (kept for bit parity)."""
  down, up = scale, 1.0
  while down * 2 < up:
    down, up = down * 2, up / 2
  return down, up


# ----------------------------------------------------------------------------- normalize
def _check_family(keys: Sequence[str], source: str) -> None:
  for pattern, family in _FOREIGN:
    hits = [k for k in keys if pattern.search(k)]
    if hits:
      raise LoraError(f"{source} is a LoRA for {family}, not for FLUX (e.g. key {hits[0]!r}); none of its "
                      "keys names a FLUX transformer layer")
  raise LoraError(f"{source}: no key names a layer of this FLUX transformer; keys: {_listing(keys)}")


def _split_fused(entry: _Fused, a: np.ndarray, b: np.ndarray | None, bias: np.ndarray | None, key: str,
                 source: str) -> list[tuple[str, np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
  """An original-FLUX module's factors -> its diffusers members (as diffusers converts them).

  ``B`` and the bias are split by output rows; ``A`` is shared, or chunked by rank when ``B`` is
  block diagonal (a LoRA trained on the separate members and fused by a converter).
  """
  total = sum(entry.sizes)
  n_out = b.shape[0] if b is not None else bias.shape[0]
  if n_out != total:
    members = "/".join(entry.members)
    raise LoraError(f"{source}: LoRA key {key!r} has {n_out} output rows, but this model's {members} "
                    f"{'has' if len(entry.members) == 1 else 'have'} {total} ({' + '.join(map(str, entry.sizes))})")
  if entry.swap_halves:
    half = total // 2
    swap = lambda x: None if x is None else np.concatenate([x[half:], x[:half]])  # noqa: E731
    b, bias = swap(b), swap(bias)
  edges = np.cumsum((0,) + entry.sizes)
  rows = [slice(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]
  n = len(entry.members)
  a_parts = [a] * n
  b_parts = [None if b is None else b[r] for r in rows]
  if b is not None and n > 1 and a.shape[0] % n == 0:
    ar = a.shape[0] // n
    blocks = [slice(j * ar, (j + 1) * ar) for j in range(n)]
    if all(not np.any(b[rows[j], blocks[k]]) for j in range(n) for k in range(n) if j != k):
      a_parts = [a[blk] for blk in blocks]
      b_parts = [b[rows[j], blocks[j]] for j in range(n)]
  return [(m, a_parts[j], b_parts[j], None if bias is None else bias[rows[j]])
          for j, m in enumerate(entry.members)]


def normalize(tensors: Mapping[str, np.ndarray], config: FluxConfig, *, metadata: Mapping[str, str] | None = None,
              source: str = "LoRA") -> DiffusersLora:
  """Any supported FLUX LoRA state dict -> diffusers module names with the scales applied.

  Args:
    tensors: the file's tensors (floating ones are used as float32).
    config: the FLUX model the LoRA is for (its block counts and widths).
    metadata: the file's safetensors metadata (diffusers stores PEFT's ``lora_alpha`` there).
    source: a name for messages (the file).

  Raises:
    LoraError: an empty file, a Nunchaku-format LoRA, a LoRA for another model family, a
      ``lora_A`` without its ``lora_B`` (or the reverse), or factors that are not 2-D or whose
      ranks differ (all named).
  """
  if not tensors:
    raise LoraError(f"{source} holds no tensors")
  nunchaku = [k for k in tensors if any(s in k for s in _NUNCHAKU)]
  if nunchaku:
    raise LoraError(
        f"{source} is a Nunchaku-format LoRA (e.g. key {nunchaku[0]!r}): such files store the layers' whole "
        "low-rank branch, the base model's own SVD branch of one particular quantized checkpoint included, so "
        "they apply to that checkpoint only: pass it with the 4-bit checkpoint it was converted from (the generate "
        "command does: --config.nunchaku=... or --config.quantized_model=...), or load the original LoRA (diffusers, "
        "kohya or ComfyUI format), which fits any base.")
  t = _tables(config)
  notes, warnings = [], []
  text = sorted(k for k in tensors if k.startswith(_TEXT_ENCODER))
  if text:
    notes.append(f"dropped {len(text)} text-encoder key(s) (only the transformer is adapted), e.g. {text[0]!r}")
  dora = sorted(k for k in tensors if k.endswith(_DORA))
  if dora:
    warnings.append(f"dropped DoRA magnitude vector(s) {_listing(dora)}: DoRA is not supported; the LoRA is applied "
                 "without them (as diffusers does)")
  groups: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  unmatched = []
  for key in tensors:
    if key in text or key in dora:
      continue
    parsed = _parse_key(t, key)
    is_norm = parsed is not None and (parsed[0] in t.norm_targets or parsed[0] in t.bfl_norms)
    if parsed is None or is_norm != (parsed[1] == "vector"):
      unmatched.append(key)  # also full weights of linear layers and LoRA factors on norms: not supported
      continue
    module, kind = parsed
    if kind in groups.setdefault(module, {}):
      raise LoraError(f"{source}: keys {groups[module][kind][0]!r} and {key!r} both give the {kind} of {module}")
    groups[module][kind] = (key, np.asarray(tensors[key], np.float32))
  if not groups:
    if not unmatched:
      raise LoraError(f"{source}: nothing left for the transformer; " + "; ".join(notes))
    _check_family(unmatched, source)

  peft = _peft_metadata(metadata, source)
  if peft.get("use_dora"):
    raise LoraError(f"{source}: its PEFT metadata says use_dora=true; DoRA LoRAs are not supported")
  layers: dict[str, LoraFactors] = {}
  bias: dict[str, np.ndarray] = {}
  norms: dict[str, np.ndarray] = {}
  for module, entries in groups.items():
    if "vector" in entries:
      key, w = entries.pop("vector")
      norm = t.bfl_norms.get(module, module)
      if w.ndim != 1:
        raise LoraError(f"{source}: norm weight {key!r} has shape {w.shape}, expected a vector")
      norms[norm] = w
    if not entries:
      continue
    a, b, alpha = entries.get("a"), entries.get("b"), entries.get("alpha")
    kohya = "down" in entries or "up" in entries
    if kohya:
      if a is not None or b is not None:
        raise LoraError(f"{source}: {module} has both lora_A/lora_B and lora_down/lora_up keys")
      a, b = entries.get("down"), entries.get("up")
    if (a is None) != (b is None):
      key = (a or b)[0]
      raise LoraError(f"{source}: {key!r} has no matching {'lora_B/lora_up' if b is None else 'lora_A/lora_down'} key")
    delta_b = None
    if a is not None:
      (key_a, a), (key_b, b) = a, b
      if a.ndim != 2 or b.ndim != 2:
        raise LoraError(f"{source}: {key_a!r} {a.shape} / {key_b!r} {b.shape}: only linear (2-D) LoRA factors "
                        "are supported (no convolution LoRA)")
      if a.shape[0] != b.shape[1]:
        raise LoraError(f"{source}: ranks differ: {key_a!r} is {a.shape} ([r, in]) but {key_b!r} is {b.shape} "
                        "([out, r])")
      rank = a.shape[0]
      if alpha is not None:
        scale = float(np.asarray(alpha[1], np.float64).reshape(-1)[0]) / rank
      elif peft and not kohya:
        scale = _peft_scale(peft, module, rank)
      else:
        scale = 1.0
      s_a, s_b = _kohya_split(scale) if kohya else (scale, 1.0)
      a, b = a * s_a, b * s_b
      if "lora_bias" in entries:
        delta_b = entries["lora_bias"][1] * scale  # PEFT: lora_B's bias is scaled like lora_B's output
    elif "lora_bias" in entries or alpha is not None:
      key = (entries.get("lora_bias") or alpha)[0]
      raise LoraError(f"{source}: {key!r} has no lora_A/lora_down and lora_B/lora_up keys beside it")
    if "diff_b" in entries:
      diff = entries["diff_b"][1]
      delta_b = diff if delta_b is None else delta_b + diff
    if delta_b is not None and delta_b.ndim != 1:
      key = (entries.get("diff_b") or entries.get("lora_bias"))[0]
      raise LoraError(f"{source}: bias delta {key!r} has shape {delta_b.shape}, expected a vector")
    key = next(iter(entries.values()))[0]
    parts = (_split_fused(t.bfl[module], a, b, delta_b, key, source) if module in t.bfl
             else [(module, a, b, delta_b)])
    for name, pa, pb, pbias in parts:
      if pa is not None:
        layers[name] = LoraFactors(np.ascontiguousarray(pa, np.float32), np.ascontiguousarray(pb, np.float32))
      if pbias is not None:
        bias[name] = np.asarray(pbias, np.float32)
  return DiffusersLora(layers, bias, norms, tuple(sorted(unmatched)), tuple(notes), tuple(warnings))


# ----------------------------------------------------------------------------- onto our paths
def _probe(rule: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
  """Runs a single-source rule's conversion on index arrays: which source index lands where.

  Broadcast views cost no memory; the rule's own shape check rejects a LoRA of the wrong size.
  """
  try:
    if len(shape) == 1:
      return np.asarray(rule.convert([np.arange(shape[0])]))
    n, k = shape
    rows = rule.convert([np.broadcast_to(np.arange(n)[:, None], (n, k))])
    cols = rule.convert([np.broadcast_to(np.arange(k)[None, :], (n, k))])
    return np.asarray(cols)[:, 0], np.asarray(rows)[0, :]
  except CheckpointError as e:
    raise LoraError(f"{what}: {e}") from e


def _fuse(members: Sequence[str], factors: Mapping[str, LoraFactors], k: int, n: int, target: str,
          source: str) -> LoraFactors:
  """Members stacked along output rows (q; k; v) -> one layer's factors (``docs/lora.md``)."""
  size = n // len(members)
  present = [m for m in members if m in factors]
  for m in present:
    f = factors[m]
    if (f.b.shape[0], f.a.shape[1]) != (size, k):
      raise LoraError(f"{source}: LoRA for {m} is [{f.b.shape[0]}, {f.a.shape[1]}] (lora_B {f.b.shape} · "
                      f"lora_A {f.a.shape}), but the model's layer {target} takes it as a [{size}, {k}] part "
                      f"of its [{n}, {k}] weight")
  first = factors[present[0]].a
  if all(np.array_equal(factors[m].a, first) for m in present):
    # One shared A: B's row blocks, zero for members the LoRA leaves out.
    b = np.concatenate([factors[m].b if m in factors else np.zeros((size, first.shape[0]), np.float32)
                        for m in members])
    return LoraFactors(first, b)
  # Different A per member: rank-stacked A and block-diagonal B.
  a = np.concatenate([factors[m].a for m in present])
  b = np.zeros((n, a.shape[0]), np.float32)
  col = 0
  for m in present:
    i, r = members.index(m), factors[m].rank
    b[i * size:(i + 1) * size, col:col + r] = factors[m].b
    col += r
  return LoraFactors(a, b)


def to_model(lora: DiffusersLora, config: FluxConfig, source: str = "LoRA") -> FluxLora:
  """Diffusers-named factors -> factors of our (fused / split) layers, by the loader's table.

  Raises:
    LoraError: a LoRA whose shapes do not fit the model (naming the module, the layer and both
      shapes).
  """
  t = _tables(config)
  layers, bias, norms = {}, {}, {}
  for path, rule in t.kernel_rules.items():
    members = [s.removesuffix(".weight") for s in rule.sources]
    if not any(m in lora.layers for m in members):
      continue
    k, n = t.shapes[f"{path}/kernel"]
    if len(members) > 1:
      layers[path] = _fuse(members, lora.layers, k, n, path, source)
      continue
    f = lora.layers[members[0]]
    shape = (f.b.shape[0], f.a.shape[1])
    cols, rows = _probe(rule, shape, f"{source}: LoRA for {members[0]} is {list(shape)} (lora_B {f.b.shape} · "
                                     f"lora_A {f.a.shape}) but does not fit the model's layer {path}")
    layers[path] = LoraFactors(np.ascontiguousarray(f.a[:, cols]), np.ascontiguousarray(f.b[rows]))
  for path, rule in t.bias_rules.items():
    members = [s.removesuffix(".bias") for s in rule.sources]
    if not any(m in lora.bias for m in members):
      continue
    (n,) = t.shapes[f"{path}/bias"]
    if len(members) > 1:
      size = n // len(members)
      parts = []
      for m in members:
        d = lora.bias.get(m, np.zeros(size, np.float32))
        if d.shape != (size,):
          raise LoraError(f"{source}: bias delta for {m} has shape {d.shape}, but the model's layer {path} takes "
                          f"it as a ({size},) part of its ({n},) bias")
        parts.append(d)
      bias[path] = np.concatenate(parts)
      continue
    d = lora.bias[members[0]]
    index = _probe(rule, d.shape, f"{source}: bias delta for {members[0]} has shape {d.shape} but does not fit "
                                  f"the model's layer {path}")
    bias[path] = d[index]
  for module, w in lora.norms.items():
    path = t.norm_targets[module]
    want = t.shapes[f"{path}/scale"]
    if w.shape != want:
      raise LoraError(f"{source}: norm weight for {module} has shape {w.shape}, the model's {path} has {want}")
    norms[path] = w
  # Every diffusers module of the model maps to some path; anything left would be a table bug.
  used = {s.removesuffix(".weight") for p in layers for s in t.kernel_rules[p].sources}
  assert set(lora.layers) <= used, sorted(set(lora.layers) - used)
  return FluxLora(source, layers, bias, norms, lora.unmatched, lora.notes, lora.warnings)


def load_flux_lora(lora: str | os.PathLike | Mapping[str, np.ndarray], config: FluxConfig, *,
                   partial: bool = False, metadata: Mapping[str, str] | None = None,
                   source: str | None = None) -> FluxLora:
  """Reads a FLUX LoRA (a ``.safetensors`` path or a state dict) for the model of ``config``.

  Args:
    lora: the file, or its tensors by name.
    config: the FLUX transformer's config (block counts and widths; any size, e.g. flux-tiny).
    partial: allow keys that match no layer of the model (they are listed in a warning);
      by default they are an error.
    metadata: safetensors metadata when ``lora`` is a dict (read from the file otherwise).
    source: a name for messages (default: the path).

  Raises:
    LoraError: see :func:`normalize` and :func:`to_model`; and unmatched keys unless ``partial``.
  """
  if isinstance(lora, Mapping):
    tensors, source = lora, source or "LoRA"
  else:
    source = source or os.fspath(lora)
    tensors, file_metadata = read_lora(lora)
    metadata = file_metadata if metadata is None else metadata
  normalized = normalize(tensors, config, metadata=metadata, source=source)
  if normalized.unmatched:
    message = (f"{source}: {len(normalized.unmatched)} key(s) match no layer of this FLUX transformer: "
               f"{_listing(normalized.unmatched)}")
    if not partial:
      raise LoraError(message + " (set lora_partial=True to apply the rest)")
    logging.warning("%s; ignored (lora_partial)", message)
  for note in normalized.notes:
    logging.info("%s: %s", source, note)
  for warning in normalized.warnings:
    logging.warning("%s: %s", source, warning)
  return to_model(normalized, config, source)
def parse_lora_spec(spec: str) -> list[tuple[str, float]]:
  """``"a.safetensors:0.8,b.safetensors"`` -> ``[("a.safetensors", 0.8), ("b.safetensors", 1.0)]``.

  The strength is what follows the last ``:`` when that is a number (so a path may hold ``:``).
  """
  out = []
  for item in (spec or "").split(","):
    item = item.strip()
    if not item:
      raise ValueError(f"loras={spec!r} holds an empty entry (check the ',' separators)")
    path, _, strength = item.rpartition(":")
    try:
      value = float(strength) if path else None
    except ValueError:
      value = None
    if value is None:
      path, value = item, 1.0
    if not np.isfinite(value):
      raise ValueError(f"loras entry {item!r}: the strength must be a finite number")
    out.append((path, value))
  return out


