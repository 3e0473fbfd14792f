"""Loading and saving text-to-image pipelines (diffusers folder layout) and building the tiny presets.

:func:`load_pipeline` takes a preset name from ``svdquant_jax.pipelines.presets.PIPELINE_PRESETS``
or a diffusers-format folder:

* ``"flux-tiny"`` / ``"pixart-tiny"`` / ``"sana-tiny"``: built in memory (deterministic weights,
  byte-level tokenizers; see :mod:`svdquant_jax.pipelines.presets`);
* ``"flux-dev"`` / ``"flux-schnell"`` / ``"pixart-sigma"`` / ``"sana-1.6b"``: the real models;
  their weights are read from ``path=`` (a local diffusers folder; nothing is downloaded);
* a folder with ``model_index.json`` naming ``FluxPipeline`` (``transformer/``, ``text_encoder/``
  CLIP, ``text_encoder_2/`` T5, ``tokenizer/``, ``tokenizer_2/``, ``vae/``, ``scheduler/``),
  ``PixArtSigmaPipeline`` (``transformer/``, ``text_encoder/`` T5, ``tokenizer/``, ``vae/``,
  ``scheduler/``) or ``SanaPipeline`` (``transformer/``, ``text_encoder/`` Gemma-2,
  ``tokenizer/``, ``vae/`` DC-AE, ``scheduler/``).

Precision (``dtype=None``): the dtypes :func:`save_pipeline` recorded in the folder, else as the
original pipelines and ``docs/design.md``: FLUX transformer and VAE bf16, PixArt transformer fp16
and VAE (SDXL) bf16, T5 bf16, CLIP fp16, SANA transformer, Gemma-2 and DC-AE bf16; the tiny
presets float32. An explicit ``dtype`` applies to every component (compute and parameters),
except that a VAE whose config sets ``force_upcast`` (FLUX's and the SDXL VAE: they overflow in
fp16) and the DC-AE run in bf16 when fp16 is asked.

:func:`save_pipeline` writes a pipeline back as a diffusers folder (safetensors + ``config.json``
per component, tokenizers, scheduler config, ``model_index.json``) that both :func:`load_pipeline`
and diffusers' ``from_pretrained`` read; the whole folder is written under a temporary name and
renamed. The checkpoint tensors are recovered from the params by inverting the loaders' ``Rule``
tables (:func:`unmap_params`), so there is no second, hand-written mapping. The pipeline name,
its generation defaults and each component's dtype are kept in ``model_index.json`` under
``"_svdquant_jax"`` (diffusers ignores keys starting with ``_``), so a saved pipeline loads back
as it was.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.models import checkpoint
from svdquant_jax.pipelines import presets as presets_lib
from svdquant_jax.models import tokenizers as tokenizers_lib
from svdquant_jax.models.checkpoint import Rule
from svdquant_jax.models.clip import (LEGACY_PREFIX, CLIPTextConfig, abstract_clip_params, clip_mapping,
                                      load_clip_text_model)
from svdquant_jax.models.dc_ae import DCAEConfig, abstract_dc_ae_params, dc_ae_mapping, load_dc_ae
from svdquant_jax.models.flux import FluxConfig, abstract_flux_params, as_dtype
from svdquant_jax.models.gemma2 import abstract_gemma2_params, gemma2_mapping, load_gemma2_encoder
from svdquant_jax.models.flux_loader import flux_mapping, load_flux_transformer, read_flux_config
from svdquant_jax.models.pixart import PixArtConfig, abstract_pixart_params
from svdquant_jax.models.pixart_loader import load_pixart_transformer, pixart_mapping
from svdquant_jax.models.sana import SanaConfig, abstract_sana_params
from svdquant_jax.models.sana_loader import load_sana_transformer, read_sana_config, sana_mapping
from svdquant_jax.models.t5 import T5Config, load_t5_encoder, abstract_t5_params, t5_mapping
from svdquant_jax.models.vae import VAEConfig, abstract_vae_params, load_vae, vae_mapping
from svdquant_jax.pipelines import schedulers
from svdquant_jax.pipelines.flux import FluxPipeline
from svdquant_jax.pipelines.pixart import PixArtSigmaPipeline
from svdquant_jax.pipelines.sana import SanaPipeline
from svdquant_jax.utils.files import atomic_directory, atomic_write_text, read_json
from svdquant_jax.utils.safetensors_io import CheckpointError, save_safetensors
from svdquant_jax.utils import trees

Pipeline = FluxPipeline | PixArtSigmaPipeline | SanaPipeline
MODEL_INDEX = "model_index.json"
METADATA_KEY = "_svdquant_jax"
DIFFUSERS_VERSION = "0.32.0"
FLUX_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler")
PIXART_COMPONENTS = ("transformer", "text_encoder", "tokenizer", "vae", "scheduler")   # also SANA's
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_SCHEDULER_CLASSES = {schedulers.FlowMatchConfig: "FlowMatchEulerDiscreteScheduler",
                      schedulers.DPMSolverConfig: "DPMSolverMultistepScheduler"}


# ----------------------------------------------------------------------------- loading
def load_pipeline(name_or_path: str | os.PathLike, *, path: str | os.PathLike | None = None,
                  dtype: Any = None, transformer_weights: bool = True) -> Pipeline:
  """A pipeline from a preset name or a diffusers folder.

  Args:
    name_or_path: a preset name (``flux-dev``, ``flux-schnell``, ``pixart-sigma``, ``flux-tiny``,
      ``pixart-tiny``) or a diffusers pipeline folder.
    path: with a preset name, the folder holding that model's weights (required for the real
      presets; with a tiny preset it loads a saved copy, e.g. from :func:`save_pipeline`).
    dtype: compute and parameter dtype of every component (see the module docstring); ``None``
      keeps each model's own.
    transformer_weights: ``False``: read only the transformer's config from a folder, not its
      weights (``transformer_params`` is ``None``; for a transformer supplied at call time, e.g. a
      Nunchaku checkpoint). Built-in presets always build theirs.

  Raises:
    CheckpointError: a real preset without ``path``, a folder without ``model_index.json``, a
      folder holding another pipeline type, a missing component folder, or bad component files.
    ValueError: an unknown name that is not a folder either.
  """
  name = os.fspath(name_or_path)
  dtype = None if dtype is None else as_dtype(dtype)
  if name in presets_lib.PIPELINE_PRESETS:
    preset = presets_lib.PIPELINE_PRESETS[name]
    if path is None:
      if preset.builtin:
        return build_tiny_pipeline(name, dtype=dtype)
      raise CheckpointError(f"preset {name!r} is the real {preset.source} model: pass path= to a local diffusers "
                            f"folder with its weights (model_index.json, transformer/, vae/, ...); nothing is "
                            "downloaded")
    return load_pipeline_folder(path, dtype=dtype, preset=preset, transformer_weights=transformer_weights)
  if path is not None:
    raise ValueError(f"path= goes with a preset name; {name!r} is not a preset "
                     f"({sorted(presets_lib.PIPELINE_PRESETS)})")
  if os.path.isdir(name):
    return load_pipeline_folder(name, dtype=dtype, transformer_weights=transformer_weights)
  raise ValueError(f"{name!r} is neither a model preset ({sorted(presets_lib.PIPELINE_PRESETS)}) nor a folder")


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
  """``model_index.json`` of a pipeline folder; :class:`CheckpointError` if absent or malformed."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise CheckpointError(f"pipeline folder not found: {folder}")
  path = os.path.join(folder, MODEL_INDEX)
  index = read_json(path, CheckpointError, f"{folder}: no {MODEL_INDEX}; not a diffusers pipeline folder")
  if not isinstance(index, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return index


def load_pipeline_folder(folder: str | os.PathLike, *, dtype: Any = None,
                         preset: presets_lib.PipelinePreset | None = None, transformer_weights: bool = True) -> Pipeline:
  """Loads a diffusers ``FluxPipeline`` / ``PixArtSigmaPipeline`` / ``SanaPipeline`` folder (see
  :func:`load_pipeline`)."""
  folder = os.fspath(folder)
  dtype = None if dtype is None else as_dtype(dtype)
  index = read_model_index(folder)
  cls = index.get("_class_name")
  if cls not in presets_lib.PIPELINE_CLASSES:
    raise CheckpointError(f"{folder} holds a {cls!r} pipeline; expected one of {list(presets_lib.PIPELINE_CLASSES)}")
  if preset is not None and preset.pipeline_class != cls:
    raise CheckpointError(f"{folder} holds a {cls}, but preset {preset.name!r} is a {preset.pipeline_class}")
  needed = FLUX_COMPONENTS if cls == presets_lib.FLUX_PIPELINE else PIXART_COMPONENTS
  missing = [c for c in needed if not os.path.isdir(os.path.join(folder, c))]
  if missing:
    raise CheckpointError(f"{folder}: missing component folder(s) {missing}; a {cls} needs {list(needed)}")
  meta = index.get(METADATA_KEY) or {}
  saved = meta.get("dtypes", {}) if dtype is None else {}
  # dtype=None: the dtypes save_pipeline recorded, else each model's default.
  pick = lambda component: dtype if dtype is not None else saved.get(component)  # noqa: E731
  sub = lambda c: os.path.join(folder, c)  # noqa: E731
  if cls == presets_lib.SANA_PIPELINE:
    return _load_sana_folder(folder, pick, preset, meta, transformer_weights)
  vae_config, vae_params = _load_vae(sub("vae"), pick("vae"))
  scheduler_config = _load_scheduler(sub("scheduler"), cls)
  if cls == presets_lib.FLUX_PIPELINE:
    if transformer_weights:
      transformer_config, transformer_params = load_flux_transformer(sub("transformer"), dtype=pick("transformer"),
                                                                     param_dtype=pick("transformer"))
    else:
      transformer_config, transformer_params = read_flux_config(sub("transformer"), dtype=pick("transformer"),
                                                                param_dtype=pick("transformer")), None
    if preset is not None and preset.guidance_embeds is not None \
        and preset.guidance_embeds != transformer_config.guidance_embeds:
      raise CheckpointError(f"{sub('transformer')}: preset {preset.name!r} needs a transformer "
                            f"{'with' if preset.guidance_embeds else 'without'} a guidance embedding, this one has "
                            f"guidance_embeds={transformer_config.guidance_embeds}")
    clip_config, clip_params = load_clip_text_model(sub("text_encoder"), dtype=pick("text_encoder"))
    t5_config, t5_params = load_t5_encoder(sub("text_encoder_2"), dtype=pick("text_encoder_2"))
    defaults = _defaults(preset, meta, cls, transformer_config.guidance_embeds, 1024)
    return FluxPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                        clip_config=clip_config, clip_params=clip_params, t5_config=t5_config, t5_params=t5_params,
                        vae_config=vae_config, vae_params=vae_params,
                        clip_tokenizer=tokenizers_lib.load_tokenizer(sub("tokenizer")),
                        t5_tokenizer=tokenizers_lib.load_tokenizer(sub("tokenizer_2")),
                        scheduler_config=scheduler_config, defaults=defaults, name=_name(preset, meta, folder))
  transformer_config, transformer_params = load_pixart_transformer(sub("transformer"), dtype=pick("transformer"))
  t5_config, t5_params = load_t5_encoder(sub("text_encoder"), dtype=pick("text_encoder"))
  native = transformer_config.sample_size * vae_config.vae_scale_factor
  defaults = _defaults(preset, meta, cls, None, native)
  return PixArtSigmaPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                             t5_config=t5_config, t5_params=t5_params, vae_config=vae_config, vae_params=vae_params,
                             t5_tokenizer=tokenizers_lib.load_tokenizer(sub("tokenizer")),
                             scheduler_config=scheduler_config, defaults=defaults, name=_name(preset, meta, folder))


def _load_sana_folder(folder: str, pick: Any, preset: Any, meta: Mapping[str, Any],
                      transformer_weights: bool) -> SanaPipeline:
  sub = lambda c: os.path.join(folder, c)  # noqa: E731
  vae_dtype = jnp.dtype(jnp.bfloat16) if pick("vae") in (None, jnp.float16) else as_dtype(pick("vae"))
  vae_config, vae_params = load_dc_ae(sub("vae"), dtype=vae_dtype)
  scheduler_config = _load_scheduler(sub("scheduler"), presets_lib.SANA_PIPELINE)
  t_dtype = jnp.dtype(jnp.bfloat16) if pick("transformer") is None else pick("transformer")
  if transformer_weights:
    transformer_config, transformer_params = load_sana_transformer(sub("transformer"), dtype=t_dtype)
  else:
    transformer_config, transformer_params = read_sana_config(sub("transformer"), dtype=t_dtype,
                                                              param_dtype=t_dtype), None
  text_config, text_params = load_gemma2_encoder(sub("text_encoder"), dtype=pick("text_encoder"))
  native = transformer_config.sample_size * transformer_config.patch_size * vae_config.vae_scale_factor
  defaults = _defaults(preset, meta, presets_lib.SANA_PIPELINE, None, native)
  return SanaPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                      text_encoder_config=text_config, text_encoder_params=text_params, vae_config=vae_config,
                      vae_params=vae_params, tokenizer=tokenizers_lib.load_tokenizer(sub("tokenizer")),
                      scheduler_config=scheduler_config, defaults=defaults, name=_name(preset, meta, folder))


def _name(preset, meta: Mapping[str, Any], folder: str) -> str:
  if preset is not None:
    return preset.name
  return str(meta.get("name") or os.path.basename(os.path.normpath(folder)))


def _defaults(preset, meta: Mapping[str, Any], cls: str, guidance_embeds: bool | None,
              native: int) -> presets_lib.GenerationDefaults:
  if preset is not None:
    return preset.defaults
  if "defaults" in meta:
    try:
      return presets_lib.GenerationDefaults.from_json(meta["defaults"])
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"{MODEL_INDEX}: bad {METADATA_KEY}.defaults: {e}") from e
  return presets_lib.inferred_defaults(cls, guidance_embeds, native, native)


def _load_vae(folder: str, dtype: Any) -> tuple[VAEConfig, Any]:
  raw = checkpoint.read_config(folder, ("AutoencoderKL",))
  vae_dtype = jnp.dtype(jnp.bfloat16) if dtype is None else as_dtype(dtype)
  if vae_dtype == jnp.float16 and raw.get("force_upcast", True):
    vae_dtype = jnp.bfloat16  # the VAE overflows in fp16 (force_upcast); bf16 has the fp32 range
  return load_vae(folder, dtype=vae_dtype, param_dtype=vae_dtype)


def _load_scheduler(folder: str, cls: str) -> Any:
  expected = "FlowMatchEulerDiscreteScheduler" if cls == presets_lib.FLUX_PIPELINE else "DPMSolverMultistepScheduler"
  raw = checkpoint.read_config(folder, (expected,), filename="scheduler_config.json")
  parse = schedulers.FlowMatchConfig if cls == presets_lib.FLUX_PIPELINE else schedulers.DPMSolverConfig
  try:
    return parse.from_diffusers(raw)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{os.path.join(folder, 'scheduler_config.json')}: {e}") from e


# ----------------------------------------------------------------------------- tiny presets
@functools.lru_cache(maxsize=4)
def _tiny(name: str, seed: int) -> presets_lib.TinyComponents:
  return presets_lib.tiny_components(name, seed)


def _cast_like(params: Any, abstract: Any) -> Any:
  # On the host: a device-side cast would compile one conversion per leaf shape.
  return jax.tree_util.tree_map(lambda p, a: jnp.asarray(np.asarray(p).astype(a.dtype)), params, abstract)


def build_tiny_pipeline(name: str, *, dtype: Any = None, seed: int = presets_lib.TINY_SEED) -> Pipeline:
  """``flux-tiny`` / ``pixart-tiny`` / ``sana-tiny`` in memory (float32 unless ``dtype`` is given)."""
  tiny = _tiny(name, int(seed))
  preset = presets_lib.PIPELINE_PRESETS[name]
  d = None if dtype is None else as_dtype(dtype)
  vae_d = jnp.dtype(jnp.bfloat16) if d == jnp.float16 else d

  def retyped(key: str, abstract_fn, dtype_=d):
    config, params = tiny.components[key]
    if dtype_ is None:
      return config, params
    config = dataclasses.replace(config, dtype=dtype_, param_dtype=dtype_)
    return config, _cast_like(params, abstract_fn(config))

  if tiny.pipeline_class == presets_lib.SANA_PIPELINE:
    transformer_config, transformer_params = retyped("transformer", abstract_sana_params)
    text_config, text_params = retyped("text_encoder", abstract_gemma2_params)
    vae_config, vae_params = retyped("vae", abstract_dc_ae_params, vae_d)
    return SanaPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                        text_encoder_config=text_config, text_encoder_params=text_params, vae_config=vae_config,
                        vae_params=vae_params, tokenizer=tokenizers_lib.byte_level_gemma_tokenizer(),
                        scheduler_config=tiny.scheduler, defaults=preset.defaults, name=name)
  vae_config, vae_params = retyped("vae", abstract_vae_params, vae_d)
  t5_key = "text_encoder_2" if tiny.pipeline_class == presets_lib.FLUX_PIPELINE else "text_encoder"
  t5_config, t5_params = retyped(t5_key, abstract_t5_params)
  t5_tokenizer = tokenizers_lib.byte_level_t5_tokenizer()
  if tiny.pipeline_class == presets_lib.FLUX_PIPELINE:
    transformer_config, transformer_params = retyped("transformer", abstract_flux_params)
    clip_config, clip_params = retyped("text_encoder", abstract_clip_params)
    return FluxPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                        clip_config=clip_config, clip_params=clip_params, t5_config=t5_config, t5_params=t5_params,
                        vae_config=vae_config, vae_params=vae_params,
                        clip_tokenizer=tokenizers_lib.byte_level_clip_tokenizer(), t5_tokenizer=t5_tokenizer,
                        scheduler_config=tiny.scheduler, defaults=preset.defaults, name=name)
  transformer_config, transformer_params = retyped("transformer", abstract_pixart_params)
  return PixArtSigmaPipeline(transformer_config=transformer_config, transformer_params=transformer_params,
                             t5_config=t5_config, t5_params=t5_params, vae_config=vae_config, vae_params=vae_params,
                             t5_tokenizer=t5_tokenizer, scheduler_config=tiny.scheduler, defaults=preset.defaults,
                             name=name)


# ----------------------------------------------------------------------------- inverse mapping
def unmap_params(params: Mapping[str, Any], rules: Sequence[Rule], what: str = "params") -> dict[str, np.ndarray]:
  """Checkpoint tensors from a params tree: the inverse of ``checkpoint.load_params(store, rules, ...)``.

  Each rule's conversion is a rearrangement (identity, transpose, concatenation, slicing). It is
  inverted by probing: the rule is applied to index-coded source arrays of the candidate source
  shapes (the target shape; reversed; the Conv layout; equal splits for concatenations; the sum
  of the slices for a tensor split over several params), which tells for every param element
  which source element it came from. A shape is accepted when every rule of a group returns its
  param's shape and every source element is produced at least once; elements produced more than
  once must agree.

  Returns:
    ``{checkpoint name: numpy array}`` in the params' dtypes.

  Raises:
    CheckpointError: params that the table does not cover (or vice versa), or a rule that cannot
      be inverted.
  """
  flat = trees.flatten(params)
  targets = [r.target for r in rules]
  missing, extra = set(targets) - set(flat), set(flat) - set(targets)
  if missing or extra:
    raise CheckpointError(f"{what}: the mapping table names params that are absent {sorted(missing)[:8]} "
                          f"or misses params {sorted(extra)[:8]}")
  parent = list(range(len(rules)))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i
  owner: dict[str, int] = {}
  for i, rule in enumerate(rules):
    for s in rule.sources:
      if s in owner:
        parent[find(i)] = find(owner[s])
      else:
        owner[s] = i
  groups: dict[int, list[Rule]] = collections.defaultdict(list)
  for i, rule in enumerate(rules):
    groups[find(i)].append(rule)
  out: dict[str, np.ndarray] = {}
  for group in groups.values():
    out.update(_invert_group(group, flat, what))
  return out


def _dedupe(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
  return list(dict.fromkeys(tuple(int(d) for d in s) for s in shapes))


def _candidate_shapes(rules: Sequence[Rule], shapes: Sequence[tuple[int, ...]],
                      sources: Sequence[str]) -> list[dict[str, tuple[int, ...]]]:
  if len(rules) == 1:
    (shape,), n = shapes, len(sources)
    if n == 1:
      cands = [shape, shape[::-1]] + ([(shape[3], shape[2], shape[0], shape[1])] if len(shape) == 4 else [])
      if len(shape) == 2:   # a Dense kernel [I, O] made from a 1x1 conv weight [O, I, 1, 1]
        cands.append((shape[1], shape[0], 1, 1))
      return [{sources[0]: c} for c in _dedupe(cands)]
    if len(shape) == 2 and shape[1] % n == 0:
      return [{s: (shape[1] // n, shape[0]) for s in sources}]
    if len(shape) == 1 and shape[0] % n == 0:
      return [{s: (shape[0] // n,) for s in sources}]
    return []
  if len(sources) == 1 and all(len(r.sources) == 1 for r in rules):
    (s,) = sources
    if all(len(t) == 2 for t in shapes):
      return [{s: c} for c in _dedupe([(shapes[0][1], sum(t[0] for t in shapes)),
                                       (sum(t[1] for t in shapes), shapes[0][0])])]
    if all(len(t) == 1 for t in shapes):
      return [{s: (sum(t[0] for t in shapes),)}]
  return []


def _probe(rules: Sequence[Rule], shapes: Sequence[tuple[int, ...]], sources: Sequence[str],
           cand: Mapping[str, tuple[int, ...]]) -> tuple[list[np.ndarray], dict[str, tuple[int, int]]] | None:
  offsets, start = {}, 0
  for s in sources:
    size = math.prod(cand[s])
    offsets[s] = (start, start + size)
    start += size
  code_dtype = np.int32 if start < 2**31 else np.int64
  codes = {s: np.arange(*offsets[s], dtype=code_dtype).reshape(cand[s]) for s in sources}
  results = []
  for rule, shape in zip(rules, shapes):
    try:
      got = np.asarray(rule.convert([codes[s] for s in rule.sources]))
    except (CheckpointError, ValueError, IndexError, TypeError):
      return None
    if tuple(got.shape) != tuple(shape) or got.dtype != code_dtype:
      return None
    results.append(got)
  if not np.all(np.bincount(np.concatenate([r.reshape(-1) for r in results]), minlength=start) >= 1):
    return None
  return results, offsets


def _invert_group(rules: Sequence[Rule], flat: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
  sources = list(dict.fromkeys(s for r in rules for s in r.sources))
  shapes = [tuple(flat[r.target].shape) for r in rules]
  found, shape_of = None, {}
  for cand in _candidate_shapes(rules, shapes, sources):
    found = _probe(rules, shapes, sources, cand)
    if found is not None:
      shape_of = dict(cand)
      break
  if found is None:
    raise CheckpointError(f"{what}: cannot invert the mapping {[r.target for r in rules]} <- {sources}")
  results, offsets = found
  dtypes = {np.asarray(flat[r.target]).dtype for r in rules}
  if len(dtypes) != 1:
    raise CheckpointError(f"{what}: params {[r.target for r in rules]} built from the same tensors have different "
                          f"dtypes {sorted(map(str, dtypes))}")
  total = max(stop for _, stop in offsets.values())
  values = np.zeros(total, dtypes.pop())
  filled = np.zeros(total, bool)
  for rule, codes in zip(rules, results):
    v = np.asarray(flat[rule.target]).reshape(-1)
    c = codes.reshape(-1)
    again = filled[c]
    if again.any() and not np.array_equal(values[c][again].view(np.uint8), v[again].view(np.uint8)):
      raise CheckpointError(f"{what}: {rule.target} disagrees with another param built from {list(rule.sources)}")
    values[c] = v
    filled[c] = True
  return {s: values[offsets[s][0]:offsets[s][1]].reshape(shape_of[s]) for s in sources}


# ----------------------------------------------------------------------------- saving
def flux_transformer_config_json(config: FluxConfig) -> dict[str, Any]:
  return {"_class_name": "FluxTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
          "patch_size": config.patch_size, "in_channels": config.in_channels, "out_channels": config.out_channels,
          "num_layers": config.num_layers, "num_single_layers": config.num_single_layers,
          "attention_head_dim": config.attention_head_dim, "num_attention_heads": config.num_attention_heads,
          "joint_attention_dim": config.joint_attention_dim, "pooled_projection_dim": config.pooled_projection_dim,
          "guidance_embeds": bool(config.guidance_embeds), "axes_dims_rope": list(config.axes_dims_rope)}


def pixart_transformer_config_json(config: PixArtConfig) -> dict[str, Any]:
  return {"_class_name": "PixArtTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
          "num_attention_heads": config.num_attention_heads, "attention_head_dim": config.attention_head_dim,
          "in_channels": config.in_channels, "out_channels": config.out_channels, "num_layers": config.num_layers,
          "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": config.cross_attention_dim,
          "attention_bias": bool(config.attention_bias), "sample_size": config.sample_size,
          "patch_size": config.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
          "upcast_attention": False, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
          "norm_eps": config.norm_eps, "interpolation_scale": config.interpolation_scale,
          "use_additional_conditions": bool(config.use_additional_conditions),
          "caption_channels": config.caption_channels, "attention_type": "default"}


def sana_transformer_config_json(config: SanaConfig) -> dict[str, Any]:
  return {"_class_name": "SanaTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION, **config.to_diffusers()}


def dc_ae_config_json(config: DCAEConfig) -> dict[str, Any]:
  return {"_class_name": "AutoencoderDC", "_diffusers_version": DIFFUSERS_VERSION, **config.to_diffusers()}


def t5_config_json(config: T5Config) -> dict[str, Any]:
  return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": config.vocab_size,
          "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff, "num_layers": config.num_layers,
          "num_heads": config.num_heads, "relative_attention_num_buckets": config.relative_attention_num_buckets,
          "relative_attention_max_distance": config.relative_attention_max_distance,
          "layer_norm_epsilon": config.layer_norm_epsilon, "feed_forward_proj": config.feed_forward_proj,
          "dropout_rate": 0.0, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
          "decoder_start_token_id": 0}


def clip_config_json(config: CLIPTextConfig) -> dict[str, Any]:
  return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": config.vocab_size,
          "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
          "max_position_embeddings": config.max_position_embeddings, "hidden_act": config.hidden_act,
          "layer_norm_eps": config.layer_norm_eps, "eos_token_id": config.eos_token_id,
          "projection_dim": config.hidden_size, "attention_dropout": 0.0, "dropout": 0.0}


def vae_config_json(config: VAEConfig) -> dict[str, Any]:
  out = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
  for key, value in config.to_diffusers().items():
    out[key] = list(value) if isinstance(value, tuple) else value
  return out


def scheduler_config_json(config: Any) -> dict[str, Any]:
  cls = _SCHEDULER_CLASSES.get(type(config))
  if cls is None:
    raise ValueError(f"cannot save a scheduler config of type {type(config).__name__}")
  return {"_class_name": cls, "_diffusers_version": DIFFUSERS_VERSION, **dataclasses.asdict(config)}


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_weights(folder: str, tensors: Mapping[str, np.ndarray], basename: str,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes ``<basename>.safetensors``, or shards ``<basename>-0000i-of-0000n.safetensors`` plus
  ``<basename>.safetensors.index.json`` when the tensors exceed ``max_shard_bytes``."""
  os.makedirs(folder, exist_ok=True)
  names = sorted(tensors)
  shards: list[list[str]] = [[]]
  size = 0
  for name in names:
    nbytes = np.asarray(tensors[name]).nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    file = f"{basename}.safetensors"
    save_safetensors(os.path.join(folder, file), tensors, metadata=meta)
    return [file]
  files, weight_map = [], {}
  for i, shard in enumerate(shards):
    file = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_safetensors(os.path.join(folder, file), {n: tensors[n] for n in shard}, metadata=meta)
    weight_map.update({n: file for n in shard})
    files.append(file)
  total = sum(np.asarray(t).nbytes for t in tensors.values())
  _write_json(os.path.join(folder, f"{basename}.safetensors.index.json"),
              {"metadata": {"total_size": total}, "weight_map": weight_map})
  return files


def _save_component(folder: str, rules: Sequence[Rule], params: Any, config_json: Mapping[str, Any],
                    basename: str, max_shard_bytes: int) -> None:
  tensors = unmap_params(params, rules, what=os.path.basename(folder))
  save_weights(folder, tensors, basename, max_shard_bytes)
  _write_json(os.path.join(folder, "config.json"), config_json)


def save_pipeline(pipeline: Pipeline, folder: str | os.PathLike, *, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
  """Writes ``pipeline`` as a diffusers folder that :func:`load_pipeline` and diffusers read back.

  Params are written in their current dtypes. The folder is built under a temporary name next
  to ``folder`` and renamed when complete.

  Args:
    pipeline: a :class:`FluxPipeline`, :class:`PixArtSigmaPipeline` or :class:`SanaPipeline`.
    folder: destination.
    overwrite: replace an existing non-empty ``folder`` (refused otherwise).
    max_shard_bytes: safetensors shard size per component.

  Returns:
    The folder path.
  """
  folder = os.fspath(folder)
  if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)) and not overwrite:
    raise ValueError(f"{folder} exists and is not empty; pass overwrite=True to replace it")
  p = pipeline
  configs = {"transformer": p.transformer_config, "vae": p.vae_config}
  if isinstance(p, FluxPipeline):
    configs.update(text_encoder=p.clip_config, text_encoder_2=p.t5_config)
  elif isinstance(p, SanaPipeline):
    configs.update(text_encoder=p.text_encoder_config)
  else:
    configs.update(text_encoder=p.t5_config)
  index: dict[str, Any] = {"_class_name": p.pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
                           METADATA_KEY: {"name": p.name, "defaults": p.defaults.to_json(),
                                          "dtypes": {k: jnp.dtype(c.dtype).name for k, c in configs.items()}}}
  with atomic_directory(folder) as tmp:
    sub = lambda c: os.path.join(tmp, c)  # noqa: E731
    if isinstance(p, SanaPipeline):
      _save_component(sub("vae"), dc_ae_mapping(p.vae_config), p.vae_params, dc_ae_config_json(p.vae_config),
                      "diffusion_pytorch_model", max_shard_bytes)
      index["vae"] = ["diffusers", "AutoencoderDC"]
    else:
      _save_component(sub("vae"), vae_mapping(p.vae_config), p.vae_params, vae_config_json(p.vae_config),
                      "diffusion_pytorch_model", max_shard_bytes)
      index["vae"] = ["diffusers", "AutoencoderKL"]
    _write_json(os.path.join(sub("scheduler"), "scheduler_config.json"), scheduler_config_json(p.scheduler_config))
    index["scheduler"] = ["diffusers", _SCHEDULER_CLASSES[type(p.scheduler_config)]]
    if isinstance(p, FluxPipeline):
      _save_component(sub("transformer"), flux_mapping(p.transformer_config), p.transformer_params,
                      flux_transformer_config_json(p.transformer_config), "diffusion_pytorch_model", max_shard_bytes)
      _save_component(sub("text_encoder"), clip_mapping(p.clip_config, LEGACY_PREFIX), p.clip_params,
                      clip_config_json(p.clip_config), "model", max_shard_bytes)
      _save_component(sub("text_encoder_2"), t5_mapping(p.t5_config), p.t5_params, t5_config_json(p.t5_config),
                      "model", max_shard_bytes)
      p.clip_tokenizer.save_pretrained(sub("tokenizer"))
      p.t5_tokenizer.save_pretrained(sub("tokenizer_2"))
      index.update(transformer=["diffusers", "FluxTransformer2DModel"],
                   text_encoder=["transformers", "CLIPTextModel"], text_encoder_2=["transformers", "T5EncoderModel"],
                   tokenizer=["transformers", type(p.clip_tokenizer).__name__],
                   tokenizer_2=["transformers", type(p.t5_tokenizer).__name__])
    elif isinstance(p, PixArtSigmaPipeline):
      _save_component(sub("transformer"), pixart_mapping(p.transformer_config), p.transformer_params,
                      pixart_transformer_config_json(p.transformer_config), "diffusion_pytorch_model", max_shard_bytes)
      _save_component(sub("text_encoder"), t5_mapping(p.t5_config), p.t5_params, t5_config_json(p.t5_config),
                      "model", max_shard_bytes)
      p.t5_tokenizer.save_pretrained(sub("tokenizer"))
      index.update(transformer=["diffusers", "PixArtTransformer2DModel"],
                   text_encoder=["transformers", "T5EncoderModel"],
                   tokenizer=["transformers", type(p.t5_tokenizer).__name__])
    elif isinstance(p, SanaPipeline):
      _save_component(sub("transformer"), sana_mapping(p.transformer_config), p.transformer_params,
                      sana_transformer_config_json(p.transformer_config), "diffusion_pytorch_model", max_shard_bytes)
      _save_component(sub("text_encoder"), gemma2_mapping(p.text_encoder_config), p.text_encoder_params,
                      p.text_encoder_config.to_transformers(), "model", max_shard_bytes)
      p.tokenizer.save_pretrained(sub("tokenizer"))
      index.update(transformer=["diffusers", "SanaTransformer2DModel"], text_encoder=["transformers", "Gemma2Model"],
                   tokenizer=["transformers", type(p.tokenizer).__name__])
    else:
      raise TypeError(f"save_pipeline: expected a FluxPipeline, PixArtSigmaPipeline or SanaPipeline, got "
                      f"{type(pipeline).__name__}")
    _write_json(os.path.join(tmp, MODEL_INDEX), index)
  return folder
