"""A Nunchaku FLUX.1 checkpoint -> our quantized FLUX (params tree + layer specs).

Reads the single-file format (safetensors with the JSON metadata ``config``,
``quantization_config``, ``comfy_config``, ``model_class``) and the legacy folder
(``transformer_blocks.safetensors`` + ``unquantized_layers.safetensors`` + ``config.json``).
Every tensor is decoded (``svdquant_jax.formats.nunchaku``) into the layers our FLUX runs with
the engine's semantics: W4A4 layers as ``SVDQuantDense`` (δ = 0.171875 on INT4 fc2 inputs, the
branch on the raw input, NVFP4 per-tensor or per-channel scales), adaLN layers as AWQ
``WeightOnlyDense`` (de-interleaved, the folded ``+1`` taken back out, exactly), the rest 16-bit.

Streaming: tensors are read one at a time with ``pread`` (no mapping of the file), converted and
placed on the device, so the host holds about one copy of the model (``docs/benchmarks.md``). The
4-bit weights go straight from Nunchaku's layouts to ours with whole-word bit operations
(``repack_qweight`` / ``repack_awq_qweight``), and host arrays are handed to ``jax.device_put``
(no copy on the CPU backend when the buffer allows it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats import nunchaku as layout
from svdquant_jax.formats.nunchaku_layout import aligned_empty
from svdquant_jax.formats.quantizers import GELU_SHIFT
from svdquant_jax.models.flux import FluxConfig
from svdquant_jax.nn import QuantSpec, WeightOnlySpec
from svdquant_jax.quant.nunchaku import flux_layout
from svdquant_jax.quant.nunchaku.export import LEGACY_BLOCKS_FILE, LEGACY_REST_FILE
from svdquant_jax.quant.nunchaku.flux_layout import Layer
from svdquant_jax.utils import trees
from svdquant_jax.utils.progress import Progress
from svdquant_jax.utils.safetensors_io import CheckpointError, SafetensorsFile


class NunchakuFormatError(CheckpointError):
  """Not a (supported) Nunchaku FLUX checkpoint, or a tensor that does not fit (named)."""


@dataclasses.dataclass
class NunchakuModel:
  """A loaded checkpoint.

  Attributes:
    config: the transformer config (from the file's diffusers config).
    params: our quantized params tree.
    specs: ``{path: QuantSpec | WeightOnlySpec}`` (run with :func:`~svdquant_jax.nn.swap_dense`).
    fmt: ``"int4"`` or ``"nvfp4"``.
    rank: the low-rank branch rank (padding ranks removed).
    metadata: the file's metadata (JSON values decoded).
    fused_smoothing: ``out_proj`` layers stored with smoothing folded into the previous layer
      (``smooth`` all ones, ``smooth_orig`` not): exact to run, but a LoRA on them is not.
  """
  config: FluxConfig
  params: dict[str, Any]
  specs: dict[str, Any]
  fmt: str
  rank: int
  metadata: dict[str, Any]
  fused_smoothing: tuple[str, ...] = ()


class _Source:
  """The tensors of a single file or a legacy folder, read one at a time (copies, not mappings)."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      files = [os.path.join(path, f) for f in (LEGACY_BLOCKS_FILE, LEGACY_REST_FILE)]
      missing = [f for f in files if not os.path.isfile(f)]
      if missing:
        raise NunchakuFormatError(f"{path}: a legacy Nunchaku folder needs {LEGACY_BLOCKS_FILE} and "
                                  f"{LEGACY_REST_FILE}; missing {[os.path.basename(f) for f in missing]}")
      self.files = [SafetensorsFile(f) for f in files]
      config_path = os.path.join(path, "config.json")
      if not os.path.isfile(config_path):
        raise NunchakuFormatError(f"{path}: the legacy folder has no config.json (the transformer's diffusers config)")
      with open(config_path) as f:
        self.metadata = {"config": f.read()}
    else:
      self.files = [SafetensorsFile(path)]
      self.metadata = dict(self.files[0].metadata)
    self.where = {k: f for f in self.files for k in f.keys()}
    self.used: set[str] = set()

  def __contains__(self, key: str) -> bool:
    return key in self.where

  def read(self, key: str) -> np.ndarray:
    if key not in self.where:
      raise NunchakuFormatError(f"{self.path}: tensor {key!r} is missing (truncated or not a FLUX.1 checkpoint)")
    self.used.add(key)
    return self.where[key].read(key)

  def shape(self, key: str) -> tuple[int, ...]:
    return self.where[key].shape(key)


def _json_meta(source: _Source) -> dict[str, Any]:
  out = {}
  for key, value in source.metadata.items():
    try:
      out[key] = json.loads(value)
    except (TypeError, json.JSONDecodeError):
      out[key] = value
  return out


def _check_kind(source: _Source, meta: Mapping[str, Any]) -> None:
  keys = list(source.where)
  model_class = meta.get("model_class")
  if isinstance(model_class, str) and "flux" not in model_class.lower():
    raise NunchakuFormatError(f"{source.path} is a {model_class} checkpoint; only Nunchaku FLUX.1 files "
                              "(NunchakuFluxTransformer2dModel) can be loaded into our FLUX")
  if any(".proj_down" in k or ".smooth_factor" in k for k in keys):
    raise NunchakuFormatError(f"{source.path} uses Nunchaku's v2 key style (proj_down/smooth_factor, e.g. "
                              "Qwen-Image or Z-Image); only the FLUX.1 single-file and legacy formats are supported")
  if "config" not in meta:
    raise NunchakuFormatError(f"{source.path}: no 'config' metadata (the transformer's diffusers config); not a "
                              "current Nunchaku single file. A legacy folder needs config.json beside its files")
  cfg = meta["config"]
  if not isinstance(cfg, dict) or cfg.get("_class_name", "FluxTransformer2DModel") != "FluxTransformer2DModel":
    name = cfg.get("_class_name") if isinstance(cfg, dict) else cfg
    raise NunchakuFormatError(f"{source.path}: the checkpoint is for {name!r}; only FluxTransformer2DModel is "
                              "supported")
  qkeys = [k for k in keys if k.endswith(".qweight")]
  if not qkeys:
    raise NunchakuFormatError(f"{source.path}: no quantized tensors (*.qweight); not a Nunchaku 4-bit checkpoint")
  w4a4 = [k for k in qkeys if not k.endswith(".linear.qweight")]  # adaLN (AWQ) layers are *.norm*.linear
  no_smooth = [k for k in w4a4 if k[:-len("qweight")] + "smooth" not in source]
  if no_smooth:
    raise NunchakuFormatError(
        f"{source.path}: W4A4 layers without smoothing factors (e.g. {no_smooth[0][:-8]}): this is the obsolete "
        "pre-2025 Nunchaku layout, which is not supported; use a current svdq-int4_r32 / svdq-fp4_r32 file")


def _precision(source: _Source, meta: Mapping[str, Any]) -> str:
  q = meta.get("quantization_config")
  if isinstance(q, dict) and isinstance(q.get("weight"), dict):
    dt = q["weight"].get("dtype")
    if dt == "int4":
      return "int4"
    if dt in ("fp4_e2m1_all", "fp4"):
      return "nvfp4"
    raise NunchakuFormatError(f"{source.path}: quantization_config weight dtype {dt!r} is not int4 / fp4_e2m1_all")
  # As nunchaku's merge tool: NVFP4 iff any tensor is fp8.
  fp8 = any(f.dtype(k) == np.dtype(jnp.float8_e4m3fn) for f in source.files for k in f.keys())
  return "nvfp4" if fp8 else "int4"


def _put(x: Any, dtype: Any = None) -> jax.Array:
  """A host array (C-contiguous, cast to ``dtype``) as a device array; on CPU usually without a copy."""
  return jax.device_put(np.ascontiguousarray(x, dtype=dtype))


@contextlib.contextmanager
def _normal_pages() -> Iterator[None]:
  """numpy asks for transparent huge pages on large arrays; for a load's stream of large short-lived
  buffers on a machine short of free memory the kernel's huge-page faults (compaction, zeroing)
  cost 4x the system time and twice the wall time (``docs/benchmarks.md``), so a load uses normal
  pages. Process-wide while it runs (it only changes how fast memory is faulted in)."""
  core = getattr(np, "_core", None) or getattr(np, "core", None)
  setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
  if setter is None:
    yield
    return
  previous = setter(False)
  try:
    yield
  finally:
    setter(previous)


def _transposed(x: np.ndarray, dtype: Any, tile: int = 256) -> np.ndarray:
  """``x.T`` of a 2-D array as a C-contiguous ``dtype`` array, copied tile by tile (a plain strided
  transpose of a large 16-bit matrix misses the cache on every element)."""
  rows, cols = x.shape
  out = aligned_empty((cols, rows), dtype)
  for r in range(0, rows, tile):
    for c in range(0, cols, tile):
      out[c:c + tile, r:r + tile] = x[r:r + tile, c:c + tile].T
  return out


def _strip_rank_padding(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Drops trailing ranks that are zero in both factors (the file's padding to a multiple of 16)."""
  r = down.shape[0]
  while r and not np.any(down[r - 1]) and not np.any(up[:, r - 1]):
    r -= 1
  return down[:r], up[:, :r]


def _w4a4(source: _Source, name: str, layer: Layer, fmt: str, n: int, k: int, dtype: Any,
          fused: list[str]) -> tuple[QuantSpec, dict[str, Any], int]:
  keys = ("qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up", "wtscale", "wcscales")
  tensors = {key: source.read(f"{name}.{key}") for key in keys if f"{name}.{key}" in source}
  for key in ("qweight", "wscales", "bias", "smooth"):
    if key not in tensors:
      raise NunchakuFormatError(f"{source.path}: {name}.{key} is missing (required for a W4A4 layer)")
  try:
    d = layout.decode_w4a4(tensors, n, k, fmt, repack=True, overwrite=True)  # our own read buffers
  except (ValueError, TypeError) as e:
    raise NunchakuFormatError(f"{source.path}: {name}: {e}") from e
  if "smooth_orig" in tensors:
    orig = layout.unpack_vector(tensors["smooth_orig"], k)
    if np.all(np.asarray(d["smooth"], np.float32) == 1) and np.any(np.asarray(orig, np.float32) != 1):
      fused.append(name)
  signed = fmt == "int4"
  params: dict[str, Any] = {"qweight": _put(d["packed"])}  # split-half uint8 [N, K/2], our packing
  if signed:
    params["wscales"] = _put(np.asarray(d["wscales"]).T, dtype)
  else:
    params["wscales"] = _put(np.asarray(d["wscales"], np.float32).T, jnp.float8_e4m3fn)
    t = 1.0 if d.get("wtscale") is None else float(np.asarray(d["wtscale"], np.float32).reshape(-1)[0])
    wc = None if d.get("wcscales") is None else np.asarray(d["wcscales"], np.float32)
    if wc is not None and np.all(wc == wc[0]):  # one scale for all rows (our fused layers): per-tensor
      t, wc = t * float(wc[0]), None
    params["wtscale"] = _put([t], np.float32)
    if wc is not None:
      params["wcscales"] = _put(wc)
  down = np.zeros((0, k), np.float32) if d.get("lora_down") is None else np.asarray(d["lora_down"])
  up = np.zeros((n, 0), np.float32) if d.get("lora_up") is None else np.asarray(d["lora_up"])
  down, up = _strip_rank_padding(down, up)
  params["smooth"] = _put(d["smooth"], dtype)
  params["lora_down"] = _put(down.T, dtype)
  params["lora_up"] = _put(up.T, dtype)
  params["bias"] = _put(d["bias"], dtype)
  shift = GELU_SHIFT if (signed and layer.shifted) else 0.0
  spec = QuantSpec(rank=down.shape[0], fmt=fmt, shift=shift, **_channel_scales_kw("wcscales" in params))
  return spec, params, down.shape[0]


def _channel_scales_kw(present: bool) -> dict[str, Any]:
  """The QuantSpec flag for a per-channel NVFP4 scale (only passed when the layer has one)."""
  return {"channel_scales": True} if present else {}


def _awq(source: _Source, name: str, layer: Layer, n: int, k: int, dtype: Any) -> tuple[WeightOnlySpec, dict]:
  tensors = {key: source.read(f"{name}.{key}") for key in ("qweight", "wscales", "wzeros", "bias")}
  extra = [key for key in ("lora_down", "lora_up") if f"{name}.{key}" in source]
  if extra:
    raise NunchakuFormatError(f"{source.path}: {name} carries a LoRA ({extra}); load the base checkpoint and apply "
                              "the LoRA with --config.loras instead")
  try:
    d = layout.decode_awq(tensors, layer.chunks, repack=True)
  except (ValueError, TypeError) as e:
    raise NunchakuFormatError(f"{source.path}: {name}: {e}") from e
  packed = d["packed"]  # split-half uint8 [N, K/2], our packing
  if packed.shape != (n, k // 2):
    raise NunchakuFormatError(f"{source.path}: {name}.qweight decodes to {(packed.shape[0], 2 * packed.shape[1])}, "
                              f"the model needs {(n, k)}")
  bias = layout.unfold_adaln_bias(tensors["bias"], layer.chunks)
  params = {"qweight": _put(packed),
            "wscales": _put(np.asarray(d["wscales"]).T, dtype),
            "wzeros": _put(np.asarray(d["wzeros"]).T, dtype),
            "bias": _put(bias, dtype)}
  return WeightOnlySpec("int4", 64), params


@dataclasses.dataclass
class _Block:
  """One block's share of the loaded model."""
  specs: dict[str, Any] = dataclasses.field(default_factory=dict)
  flat: dict[str, Any] = dataclasses.field(default_factory=dict)
  fused: list[str] = dataclasses.field(default_factory=list)
  ranks: list[int] = dataclasses.field(default_factory=list)


def _in_order(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
  """``fn(item)`` for each item, in order, computed by ``workers`` threads with at most
  ``workers + 1`` results pending (bounded memory; the first error stops the submission)."""
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="nunchaku-load") as pool:
    rest = iter(items)
    pending = collections.deque(pool.submit(fn, item) for item in itertools.islice(rest, workers + 1))
    try:
      while pending:
        result = pending.popleft().result()
        item = next(rest, _DONE)
        if item is not _DONE:
          pending.append(pool.submit(fn, item))
        yield result
    finally:
      for future in pending:
        future.cancel()


_DONE = object()


def load_flux(path: str | os.PathLike, *, dtype: Any = None, param_dtype: Any = None,
              progress: bool = True, threads: int = 2) -> NunchakuModel:
  """Loads a Nunchaku FLUX.1 checkpoint (single file or legacy folder) into our FLUX.

  Args:
    path: ``svdq-int4_r32-flux.1-dev.safetensors``-style file, or a legacy folder.
    dtype: compute dtype of the model (default: the config default, bfloat16).
    param_dtype: dtype of the 16-bit parameters (default bfloat16, as the file).
    progress: show a progress display over blocks.
    threads: blocks decoded at once (numpy's word operations and copies and ``pread`` release the
      GIL); 1 decodes on the calling thread.

  Raises:
    NunchakuFormatError: obsolete / v2 / non-FLUX files, missing, misshaped or unexpected
      tensors (each named).
  """
  with _normal_pages():
    return _load_flux(os.fspath(path), dtype, param_dtype, progress, threads)


def _load_flux(path: str, dtype: Any, param_dtype: Any, progress: bool, threads: int) -> NunchakuModel:
  source = _Source(path)
  meta = _json_meta(source)
  _check_kind(source, meta)
  overrides = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None}
  try:
    config = FluxConfig.from_diffusers(meta["config"], **overrides)
  except ValueError as e:
    raise NunchakuFormatError(f"{path}: its transformer config is not a FLUX.1 config we can build: {e}") from e
  fmt = _precision(source, meta)
  pd = np.dtype(config.param_dtype)
  flat: dict[str, Any] = {}
  specs: dict[str, Any] = {}
  fused: list[str] = []
  ranks = [0]
  abstract = trees.flatten(flux_layout.expected_params(config, {}))  # the float model's shapes

  def load_block(block) -> _Block:
    theirs, ours, layers, norms = block
    out = _Block()
    for layer in layers:
      our_path, name = f"{ours}/{layer.path}", f"{theirs}.{layer.name}"
      k, n = abstract[f"{our_path}/kernel"].shape
      if layer.kind == "awq":
        spec, sub = _awq(source, name, layer, n, k, pd)
      else:
        spec, sub, r = _w4a4(source, name, layer, fmt, n, k, pd, out.fused)
        out.ranks.append(r)
      out.specs[our_path] = spec
      out.flat.update({f"{our_path}/{key}": value for key, value in sub.items()})
    for norm, our_norm in norms:
      out.flat[f"{ours}/{our_norm}/scale"] = _put(source.read(f"{theirs}.{norm}.weight"), pd)
    return out

  bar = Progress(config.num_layers + config.num_single_layers, "load nunchaku", enabled=progress)
  with bar:
    for block in _in_order(load_block, flux_layout.blocks(config), threads):
      specs.update(block.specs)
      flat.update(block.flat)
      fused += block.fused
      ranks += block.ranks
      bar.update(1)
  # Nunchaku's single-block proj_out bias sits on mlp_fc2; our proj_out_mlp has a bias only when
  # it is shifted (INT4), so otherwise the two biases (summed by the block) are merged.
  for j in range(config.num_single_layers):
    mlp, attn = f"single_transformer_blocks_{j}/proj_out_mlp", f"single_transformer_blocks_{j}/proj_out_attn"
    if not specs[mlp].shift:
      b = np.asarray(flat.pop(f"{mlp}/bias"), np.float32) + np.asarray(flat[f"{attn}/bias"], np.float32)
      flat[f"{attn}/bias"] = _put(b, pd)
  for theirs, ours in flux_layout.unquantized_layers(config):
    flat[f"{ours}/kernel"] = _put(_transposed(source.read(f"{theirs}.weight"), pd))
    if f"{ours}/bias" in abstract:
      flat[f"{ours}/bias"] = _put(source.read(f"{theirs}.bias"), pd)
  unused = sorted(k for k in source.where if k not in source.used and not k.endswith(".smooth_orig"))
  if unused:
    raise NunchakuFormatError(f"{path}: {len(unused)} tensors match no layer of a FLUX.1 model with this config "
                              f"(e.g. {unused[:5]}); the file is for another model or a newer format")
  params = trees.unflatten(flat)
  try:
    trees.validate_tree(params, flux_layout.expected_params(config, specs), what=f"the model loaded from {path}")
  except CheckpointError as e:
    raise NunchakuFormatError(str(e)) from e
  return NunchakuModel(config=config, params=params, specs=specs, fmt=fmt, rank=max(ranks), metadata=meta,
                       fused_smoothing=tuple(fused))


__all__ = ["NunchakuFormatError", "NunchakuModel", "load_flux"]
