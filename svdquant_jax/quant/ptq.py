"""Block-by-block SVDQuant post-training quantization of a transformer (as deepcompressor's PTQ loop).

For each block, in order:
  1. record the inputs of the block's linear groups over all calibration samples (one pass);
  2. per linear group (declared by the family's adapter, ``adapters/``): smoothing search ->
     low-rank branch (alternating) -> optional GPTQ, minimizing the output error of the group's
     eval module (``quantize_linear_group``);
  3. weight-only (W4A16) layers: round to nearest;
  4. save the block's result (orbax) and mark it done in ``progress.json``, so that a killed run
     resumes at the next block and ends with the same bits as an uninterrupted run;
  5. the next block's inputs: the block's full-precision outputs (``replay="fp"``, as
     deepcompressor, whose smoothing and branch are exact re-parametrizations before weights are
     quantized) or its outputs with every quantized layer applied (``replay="quantized"``).

Data parallel (``mesh`` of :func:`quantize_transformer`): the calibration state is split over the
devices along the sample axis and the block's params replicated; the block passes and the losses
of every search candidate run per device (``block_calib``), while the recorded layer inputs are
gathered whole onto every device for what is cheap next to those passes (activation maxima,
GPTQ Hessians), which are then the single-device ones. The chosen (α, β), kept iterations and
GPTQ attempts are those of one device; the numbers that follow agree within the tolerances of
tests/test_ptq_data_parallel.py (docs/design.md, "Data-parallel PTQ").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from svdquant_jax.formats.quantizers import GELU_SHIFT, W4A16_INT4, QuantFormat, QuantizedWeight
from svdquant_jax.formats.rotation import HadamardRotation
from svdquant_jax.quant import block_calib
from svdquant_jax.quant.adapters import BlockRef, ModelAdapter, State
from svdquant_jax.quant.calib_cache import CalibrationSet
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.quant.svdquant import SVDQuantWeights, plain_weights, quantize_linear_group
from svdquant_jax.quant.taps import Path, parse_path
from svdquant_jax.utils import sharding
from svdquant_jax.utils.files import atomic_write_text, quiet_info_logs
from svdquant_jax.utils.progress import Progress

Array = jax.Array
PROGRESS_FILE = "progress.json"
# Bumped when the calibrated layers' meaning changes (2: shift before smoothing, the engine's
# activation quantizer): saved progress of an older run is not resumed.
LAYER_SEMANTICS = 2


class ResumeError(ValueError):
  """Saved progress does not match the run being resumed."""


@dataclasses.dataclass(frozen=True)
class QuantizedLayer:
  """One quantized linear: its float SVDQuant pieces and how it is quantized.

  ``weights`` is the float form (smoothing λ, residual, low-rank factors, bias; GPTQ codes in
  ``residual_q``); ``fmt`` the format; ``shift`` the activation shift δ (unsigned fc2 input).
  """
  weights: SVDQuantWeights
  fmt: QuantFormat
  shift: float = 0.0


# ----------------------------------------------------------------------------- state
def initial_state(adapter: ModelAdapter, params: Mapping[str, Any], calib: CalibrationSet,
                  indices: Sequence[int], batch_size: int) -> State:
  """The first block's inputs for the calibration samples ``indices``: ``[S, ...]`` on device.

  Samples stream from disk batch by batch; only the embedded states stay on device.
  """
  embed = jax.jit(adapter.embed)
  parts = []
  for batch in calib.batches(list(indices), batch_size):
    parts.append(embed(params, {k: jnp.asarray(v) for k, v in adapter.call_inputs(batch).items()}))
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


# ----------------------------------------------------------------------------- one block
_shape_cache: dict[Any, dict[Path, tuple[int, ...]]] = {}


def _recorded_shapes(adapter: ModelAdapter, kind: str, params: Any, state: State,
                     paths: tuple[Path, ...]) -> dict[Path, tuple[int, ...]]:
  """Shapes ``[S, ..., K]`` of the inputs :func:`block_calib.run_block` would record (traced once
  per block kind and state shape; nothing runs)."""
  key = (adapter, kind, paths, tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(state.items())))
  if key not in _shape_cache:
    out = jax.eval_shape(lambda p, st: block_calib.run_block(adapter, kind, p, st, record_inputs=paths)[1], params,
                         state)
    _shape_cache[key] = {p: tuple(out["inputs"][p].shape) for p in paths}
  return _shape_cache[key]


def _token_rows(adapter: ModelAdapter, kind: str, params: Any, state: State, paths: tuple[Path, ...],
                max_tokens: int, seed: int) -> dict[Path, block_calib.TokenRows]:
  """The token subsets of the recorded inputs that hold more than ``max_tokens`` rows."""
  if not max_tokens:
    return {}
  out = {}
  for path, shape in _recorded_shapes(adapter, kind, params, state, paths).items():
    samples, tokens = shape[0], int(np.prod(shape[1:-1], dtype=np.int64))
    if samples * tokens > max_tokens:
      out[path] = block_calib.TokenRows.make(samples, tokens, max_tokens, seed)
  return out


def _dense(params: Mapping[str, Any], path: tuple[str, ...], where: str) -> tuple[Array, Array | None]:
  node = params
  for p in path:
    if p not in node:
      raise ValueError(f"{where}: the block has no layer {'/'.join(path)}")
    node = node[p]
  return node["kernel"], node.get("bias")


def quantize_block(adapter: ModelAdapter, block: BlockRef, params: Mapping[str, Any], state: State,
                   settings: PTQSettings, skipped: set[tuple[str, str]], block_index: int,
                   log: Callable[[str], None] = lambda s: None,
                   mesh: jax.sharding.Mesh | None = None) -> dict[str, QuantizedLayer]:
  """Quantizes one block's layers; returns ``{block-relative layer path: QuantizedLayer}``.

  With a ``mesh``, ``state`` is split over it (:func:`~svdquant_jax.utils.sharding.shard_samples`)
  and ``params`` replicated on it.
  """
  policy = block.policy
  fmt = settings.fmt
  grid = settings.smoothing_grid if settings.smooth else None
  result: dict[str, QuantizedLayer] = {}
  for g_index, group in enumerate(policy.groups):
    layers = [l for l in group.layers if (block.name, l) not in skipped]
    if not layers:
      continue
    paths = tuple(parse_path(l) for l in layers)
    eval_path = None if group.eval_module is None else parse_path(group.eval_module)
    # A shared input is recorded once; with calib.max_tokens only the chosen tokens are kept.
    recorded = paths[:1] if group.shared_input else paths
    seed = (settings.token_seed * 1_000_003 + block_index * 1009 + g_index) % (2 ** 31)
    rows = _token_rows(adapter, block.kind, params, state, recorded, settings.max_tokens, seed)
    _, rec = block_calib.run_block(adapter, block.kind, params, state, record_inputs=recorded,
                                   record_outputs=() if eval_path is None else (eval_path,),
                                   batch_size=settings.batch_size, mesh=mesh,
                                   record_rows={p: r.per_sample for p, r in rows.items()})
    inputs = rec["inputs"] if mesh is None else sharding.gather_replicated(rec["inputs"], mesh)
    inputs = {p: rows[p].compact(x) if p in rows else x.reshape(-1, x.shape[-1]) for p, x in inputs.items()}
    del rec["inputs"]
    kernels, biases = zip(*(_dense(params, p, block.name) for p in paths))
    # The shifted unsigned input exists in the INT4 activation path only (as in Nunchaku).
    shift = GELU_SHIFT if (group.unsigned and settings.shift_activations and fmt.act == "int4") else 0.0
    shifts = [shift] * len(paths)
    if group.shared_input:
      xs = [inputs[paths[0]]] * len(paths)
      x_all = xs[0]
    else:
      xs = [inputs[p] for p in paths]
      x_all = jnp.concatenate(xs, axis=0)
    if eval_path is None:
      loss = block_calib.layer_outputs_loss(xs, kernels, biases, fmt, shifts, mesh, settings.loss_chunk_tokens)
    else:
      loss = block_calib.ModuleOutputLoss(params, state, rec["outputs"][eval_path], adapter, block.kind, paths,
                                          eval_path, fmt, tuple(shifts), settings.batch_size, mesh)
    gptq_inputs = None if (group.shared_input or not settings.gptq) else xs
    weights, info = quantize_linear_group(list(kernels), list(biases), x_all, settings, shifts=shifts, loss_fn=loss,
                                          name=f"{block.name}/{group.name}", gptq_inputs=gptq_inputs,
                                          return_info=True)
    if mesh is not None and mesh.is_multi_process:  # whole on every process: saved and logged there
      weights, info = jax.jit(lambda t: t, out_shardings=sharding.replicated(mesh))((weights, info))
    for layer, w in zip(layers, weights):
      result[layer] = QuantizedLayer(w, fmt, shift)
    log(_group_log(block.name, group.name, info, grid))
  if settings.weight_only_adaln:
    for layer in policy.weight_only:
      if (block.name, layer) not in skipped:
        kernel, bias = _dense(params, parse_path(layer), block.name)
        weight_only = dataclasses.replace(W4A16_INT4, scale_dtype=fmt.scale_dtype)
        result[layer] = QuantizedLayer(plain_weights(kernel, bias), weight_only, 0.0)
  return result


def _group_log(block: str, group: str, info: Any, grid: Any) -> str:
  parts = [f"{block}/{group}:"]
  idx = int(info.smooth_index)
  if idx >= 0:
    a, b = grid[idx]
    parts.append(f"smooth (a={a:.2f}, b={b:.2f}) loss {float(info.smooth_losses[idx]):.4g}")
  for i, (losses, best) in enumerate(zip(info.lowrank_losses, info.lowrank_best)):
    if losses.size:
      losses = np.asarray(losses)
      ran = int(np.sum(np.isfinite(losses)))
      parts.append(f"branch[{i}] best iter {int(best) + 1}/{ran} loss {float(losses[int(best)]):.4g}")
  return " ".join(parts)


def replay_block(adapter: ModelAdapter, block: BlockRef, params: Mapping[str, Any], state: State,
                 layers: Mapping[str, QuantizedLayer], settings: PTQSettings,
                 mesh: jax.sharding.Mesh | None = None) -> State:
  """The next block's inputs (full precision, or with this block's quantized layers); with a
  ``mesh`` the state stays split over it."""
  if settings.replay == "fp":
    new_state, _ = block_calib.run_block(adapter, block.kind, params, state, batch_size=settings.batch_size,
                                         mesh=mesh)
    return new_state
  names = sorted(layers)
  spec = tuple((parse_path(n), layers[n].fmt, layers[n].shift) for n in names)
  weights = [layers[n].weights for n in names]
  if mesh is not None and mesh.size > 1:
    weights = sharding.replicate(weights, mesh)
  new_state, _ = block_calib.run_block(adapter, block.kind, params, state, weights, spec=spec,
                                       batch_size=settings.batch_size, mesh=mesh)
  return new_state


# ----------------------------------------------------------------------------- progress on disk
def _layer_tree(layer: QuantizedLayer) -> dict[str, Any]:
  w = layer.weights
  tree = {"smooth": w.smooth, "residual": w.residual, "bias": w.bias}
  if w.rank:  # orbax cannot store zero-size arrays; a rank-0 branch is rebuilt from the shapes
    tree.update(lora_a=w.lora_a, lora_b=w.lora_b)
  if w.residual_q is not None:
    tree["residual_q"] = {"codes": w.residual_q.codes, "scales": w.residual_q.scales,
                          "tensor_scale": w.residual_q.tensor_scale}
  return tree


def _layer_from_tree(tree: Mapping[str, Any], fmt: QuantFormat, shift: float,
                     rotation: Mapping[str, int] | None = None) -> QuantizedLayer:
  rq = tree.get("residual_q")
  residual_q = None if rq is None else QuantizedWeight(rq["codes"], rq["scales"], rq["tensor_scale"])
  k, n = tree["residual"].shape
  lora_a = tree.get("lora_a", jnp.zeros((k, 0), jnp.float32))
  lora_b = tree.get("lora_b", jnp.zeros((0, n), jnp.float32))
  rot = None if rotation is None else HadamardRotation(int(rotation["k"]), int(rotation["block"]),
                                                        int(rotation["seed"]))
  w = SVDQuantWeights(tree["smooth"], tree["residual"], lora_a, lora_b, tree["bias"], residual_q, rot)
  return QuantizedLayer(w, fmt, shift)


def _layer_meta(q: QuantizedLayer) -> dict[str, Any]:
  """A layer's ``layers.json`` entry: format, shift and (when rotated) the rotation (k, block, seed)."""
  meta = {"fmt": _fmt_json(q.fmt), "shift": q.shift}
  if q.weights.rotation is not None:
    meta["rotation"] = dataclasses.asdict(q.weights.rotation)
  return meta


def _fmt_json(fmt: QuantFormat) -> dict[str, Any]:
  return dataclasses.asdict(fmt)


class ProgressStore:
  """Per-block results of an interrupted quantization, with what they were computed from.

  Layout: ``progress.json`` (the run's identity and the finished blocks, rewritten atomically
  after each block) and ``blocks/<index>-<name>/`` (orbax checkpoint + ``layers.json``).
  A block counts as done only once ``progress.json`` lists it. With several processes every one
  reads and saves (orbax writes collectively), and process 0 alone deletes and writes the files.
  """

  def __init__(self, folder: str, identity: Mapping[str, Any], resume: bool):
    self.folder = folder
    self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
    self.done: list[str] = []
    self._main = sharding.is_main_process()
    path = os.path.join(folder, PROGRESS_FILE)
    if os.path.exists(path) and resume:
      with open(path) as f:
        saved = json.load(f)
      if saved["identity"] != self.identity:
        diff = sorted(k for k in set(saved["identity"]) | set(self.identity)
                      if saved["identity"].get(k) != self.identity.get(k))
        raise ResumeError(f"{folder} holds progress of a different quantization run ({', '.join(diff)} differ); "
                          "pass --config.resume=false to start over or use another output folder")
      self.done = list(saved["done"])
    elif os.path.exists(folder) and self._main:
      shutil.rmtree(folder)
    if self._main:
      os.makedirs(os.path.join(folder, "blocks"), exist_ok=True)
    _sync_processes("progress folder")
    with quiet_info_logs():
      self._checkpointer = ocp.StandardCheckpointer()

  def _dir(self, index: int, name: str) -> str:
    return os.path.abspath(os.path.join(self.folder, "blocks", f"{index:03d}-{name}"))

  def load(self, index: int, name: str) -> dict[str, QuantizedLayer]:
    folder = self._dir(index, name)
    with open(os.path.join(folder, "layers.json")) as f:
      meta = json.load(f)
    with quiet_info_logs():
      tree = self._checkpointer.restore(os.path.join(folder, "arrays"))
    out = {}
    for layer, m in meta.items():
      node = tree
      for p in parse_path(layer):
        node = node[p]
      out[layer] = _layer_from_tree(node, QuantFormat(**m["fmt"]), m["shift"], m.get("rotation"))
    return out

  def save(self, index: int, name: str, layers: Mapping[str, QuantizedLayer]) -> None:
    folder = self._dir(index, name)
    if self._main:
      if os.path.exists(folder):
        shutil.rmtree(folder)
      os.makedirs(folder)
    _sync_processes(f"progress {name}")
    tree: dict[str, Any] = {}
    for layer, q in layers.items():
      node = tree
      *parents, last = parse_path(layer)
      for p in parents:
        node = node.setdefault(p, {})
      node[last] = _layer_tree(q)
    with quiet_info_logs():
      self._checkpointer.save(os.path.join(folder, "arrays"), tree)
      self._checkpointer.wait_until_finished()
    self.done.append(name)
    if self._main:
      atomic_write_text(os.path.join(folder, "layers.json"), json.dumps(
          {layer: _layer_meta(q) for layer, q in layers.items()}, indent=1))
      atomic_write_text(os.path.join(self.folder, PROGRESS_FILE),
                        json.dumps({"identity": self.identity, "done": self.done}, indent=1))
    _sync_processes(f"progress {name} saved")


def _sync_processes(what: str) -> None:
  """Waits for every process (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(what)


def run_identity(settings: PTQSettings, fingerprint: str, calib_fingerprint: str,
                 indices: Sequence[int]) -> dict[str, Any]:
  """What a resumed run must share with the interrupted one."""
  return {"settings": settings.to_json(), "model": fingerprint, "calibration": calib_fingerprint,
          "samples": hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16],
          "layer_semantics": LAYER_SEMANTICS}


# ----------------------------------------------------------------------------- the whole model
def quantize_transformer(adapter: ModelAdapter, params: Mapping[str, Any], state: State, settings: PTQSettings, *,
                         progress: ProgressStore | None = None, stop_after: int | None = None,
                         log: Callable[[str], None] = print,
                         mesh: jax.sharding.Mesh | None = None,
                         on_block: Callable[[str, dict[str, QuantizedLayer]], None] | None = None,
                         ) -> dict[str, QuantizedLayer]:
  """Quantizes every block; returns ``{"<block>/<layer>": QuantizedLayer}`` (empty with ``on_block``).

  Args:
    adapter: the model family and config.
    params: the full-precision transformer params, on the device or in host memory (numpy, e.g.
      ``jax.device_get``): each block is put on the device once, when it is quantized.
    state: the first block's inputs for all calibration samples (:func:`initial_state`).
    settings: quantization settings.
    progress: where per-block results are saved and resumed from (``None``: nothing saved).
    stop_after: stop (raising ``KeyboardInterrupt``) after this many newly quantized blocks;
      for testing the resume path.
    log: receives one progress line per block and one line per group.
    mesh: data parallel over this mesh (:func:`~svdquant_jax.utils.sharding.batch_mesh`, or
      ``global_batch_mesh`` over several processes): the samples are split over its devices (their
      count must divide evenly); ``None`` or one device: everything on the default device.
    on_block: called with ``(block name, {layer: QuantizedLayer})`` as each block is done (or
      resumed), which are then dropped: the float layers (fp32 ``R``, 4 bytes per weight) of the
      whole model never exist at once. The flow packs each block right away
      (``flows/ptq.py``). Without it they are kept and returned.
  """
  blocks = adapter.blocks()
  skipped = adapter.resolve_skips(settings.skips)
  if mesh is not None and mesh.size == 1:
    mesh = None
  if mesh is not None:
    state = sharding.shard_samples(state, mesh)
    leaf = jax.tree_util.tree_leaves(state)[0]
    log(f"[ptq] data parallel: {leaf.shape[0]} samples over {mesh.size} devices "
        f"({leaf.shape[0] // mesh.size} per device, {jax.process_count()} process(es))")
  result: dict[str, QuantizedLayer] = {}
  bar = Progress(len(blocks), "[ptq] block", style="lines", stream=_LogStream(log))
  fresh = 0
  for index, block in enumerate(blocks):
    # Once per block (params may live in host memory: only this block is then on the device).
    block_params = jax.device_put(params[block.name]) if mesh is None else sharding.replicate(params[block.name], mesh)
    if progress is not None and block.name in progress.done:
      layers = progress.load(index, block.name)
      bar.skip(1)
      log(f"[ptq] {block.name}: resumed from {progress.folder}")
    else:
      if stop_after is not None and fresh >= stop_after:
        raise KeyboardInterrupt(f"stopped before {block.name} (stop_after={stop_after})")
      layers = quantize_block(adapter, block, block_params, state, settings, skipped, index, log, mesh)
      if progress is not None:
        progress.save(index, block.name, layers)
      fresh += 1
      bar.update(note=block.name)
    if index + 1 < len(blocks):
      state = replay_block(adapter, block, block_params, state, layers, settings, mesh)
    if on_block is not None:
      on_block(block.name, layers)
    else:
      result.update({f"{block.name}/{layer}": q for layer, q in layers.items()})
  return result


class _LogStream:
  """Adapts a ``log(str)`` function to the stream interface of :class:`Progress`."""

  def __init__(self, log: Callable[[str], None]):
    self._log = log

  def write(self, text: str) -> None:
    if text.strip():
      self._log(text.rstrip("\n"))

  def flush(self) -> None:
    pass


def block_errors(adapter: ModelAdapter, params: Mapping[str, Any], state: State,
                 layers: Mapping[str, QuantizedLayer] | Callable[[int, str], Mapping[str, QuantizedLayer]],
                 batch_size: int = 8) -> list[tuple[str, float]]:
  """Relative error of every block's output when the quantized layers of all blocks so far are
  applied (fake-quantized), against the full-precision model, on the calibration samples.

  Args:
    layers: ``{"<block>/<layer>": QuantizedLayer}``, or ``fn(block index, block name)`` giving a
      block's ``{layer: QuantizedLayer}`` (e.g. :meth:`ProgressStore.load`: one block at a time).

  Returns:
    ``[(block name, ||h_q - h_fp|| / ||h_fp||)]`` over the concatenated streams of each block.
  """
  fp_settings = PTQSettings(replay="fp", batch_size=batch_size)
  q_settings = PTQSettings(replay="quantized", batch_size=batch_size)
  fp, q = state, state
  out = []
  for index, block in enumerate(adapter.blocks()):
    if callable(layers):
      mine = dict(layers(index, block.name))
    else:
      prefix = block.name + "/"
      mine = {k[len(prefix):]: v for k, v in layers.items() if k.startswith(prefix)}
    block_params = jax.device_put(params[block.name])
    fp = replay_block(adapter, block, block_params, fp, mine, fp_settings)
    q = replay_block(adapter, block, block_params, q, mine, q_settings)
    num = den = 0.0
    for key in adapter.streams:
      a, b = np.asarray(q[key], np.float64), np.asarray(fp[key], np.float64)
      num += float(np.sum((a - b) ** 2))
      den += float(np.sum(b ** 2))
    out.append((block.name, float(np.sqrt(num / max(den, 1e-30)))))
  return out
