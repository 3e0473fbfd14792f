"""Device memory of SVDQuant PTQ at real FLUX widths, from XLA's analysis of the compiled programs.

For one double and one single block of a FLUX preset, every linear group's two programs are
lowered with abstract inputs (``jax.ShapeDtypeStruct``: nothing is allocated, so FLUX.1-dev at
128 x 4608 tokens compiles on a laptop) and compiled for this backend, and
``compiled.memory_analysis()`` gives their argument, output and temporary bytes:

  * ``pass``: the block over all samples recording the group's inputs (only the
    ``calib.max_tokens`` chosen tokens, :class:`~svdquant_jax.quant.block_calib.TokenRows`) and the
    eval module's output (``quant/ptq.py``, ``quantize_block``);
  * ``search``: the group's smoothing search, low-rank branch (and GPTQ) with its loss
    (linear-level: the group's own outputs on the chosen tokens; module-level: the eval module
    over all samples), as ``quantize_linear_group`` runs it.

XLA schedules per backend: the CPU figures are what this machine would need, a GPU's differ
(e.g. cuDNN attention has no ``T x T`` scores). The command is ``launch/benchmark_ptq.py --memory``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.flows.ptq_benchmark import random_state
from svdquant_jax.formats.quantizers import GELU_SHIFT
from svdquant_jax.models import flux
from svdquant_jax.quant import block_calib, ptq, svdquant
from svdquant_jax.quant.adapters import adapter_for
from svdquant_jax.quant.settings import PTQSettings
from svdquant_jax.quant.weights import as_traceable_loss
from svdquant_jax.quant.taps import parse_path

GB = 1e9


def _sds(shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


def _nbytes(tree: Any) -> int:
  return sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


def _analysis(lowered: Any) -> dict[str, float]:
  m = lowered.compile().memory_analysis()
  out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes}
  out["total"] = sum(out.values())
  return {k: v / GB for k, v in out.items()}


def memory_report(config_name: str, settings: PTQSettings, *, samples: int, img_tokens: int, txt_tokens: int,
                  dtype: Any = "bfloat16", groups: Sequence[str] = (),
                  log: Any = lambda row: None) -> dict[str, Any]:
  """XLA's memory analysis of every group's pass and search in one double and one single block.

  Args:
    config_name: FLUX preset (``flux-dev``, ``flux-tiny``, ...) whose widths are used.
    settings: the PTQ settings (``max_tokens``, ``batch_size``, ``candidate_batch``, the search).
    samples, img_tokens, txt_tokens: calibration samples and tokens per sample.
    dtype: model dtype.
    groups: only these group names (default: all).
    log: receives each row as it is measured.

  Returns:
    ``{"rows": [{kind, group, program, argument, output, temp, total} (GB)], "params_gb": the whole
    model's params, "state_gb": the calibration state}``.
  """
  preset = flux.FLUX_PRESETS[config_name]
  cfg = preset.replace(num_layers=1, num_single_layers=1, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  adapter = adapter_for("flux", cfg)
  params = flux.abstract_flux_params(cfg)
  state = jax.eval_shape(lambda p: random_state(adapter, p, samples, img_tokens, txt_tokens, cfg.dtype), params)
  fmt = settings.fmt
  rows = []
  for block in adapter.blocks():
    block_params = params[block.name]
    for g_index, group in enumerate(block.policy.groups):
      if groups and group.name not in groups:
        continue
      paths = tuple(parse_path(l) for l in group.layers)
      eval_path = None if group.eval_module is None else parse_path(group.eval_module)
      recorded = paths[:1] if group.shared_input else paths
      shapes = ptq._recorded_shapes(adapter, block.kind, block_params, state, recorded)
      token_rows, xs = {}, {}
      for p, shape in shapes.items():
        tokens = int(np.prod(shape[1:-1]))
        count = min(samples * tokens, settings.max_tokens or samples * tokens)
        if count < samples * tokens:
          token_rows[p] = _sds(block_calib.TokenRows.make(samples, tokens, count, g_index).per_sample.shape, jnp.int32)
        xs[p] = _sds((count, shape[-1]), jnp.float32)
      lowered = block_calib.run_block.lower(adapter, block.kind, block_params, state, record_inputs=recorded,
                                            record_outputs=() if eval_path is None else (eval_path,),
                                            batch_size=settings.batch_size, record_rows=token_rows)
      rows.append({"kind": block.kind, "group": group.name, "program": "pass", **_analysis(lowered)})
      log(rows[-1])
      kernels = [_sds(ptq._dense(block_params, p, block.name)[0].shape, dtype) for p in paths]
      biases = [_sds((k.shape[1],), dtype) for k in kernels]
      shift = GELU_SHIFT if (group.unsigned and settings.shift_activations and fmt.act == "int4") else 0.0
      x_list = [xs[paths[0]]] * len(paths) if group.shared_input else [xs[p] for p in paths]
      if eval_path is None:
        targets = tuple(_sds((x.shape[0], k.shape[1]), jnp.float32) for x, k in zip(x_list, kernels))
        loss = block_calib.LayerOutputsLoss(tuple(x_list), targets, fmt, (shift,) * len(paths),
                                            chunk_tokens=settings.loss_chunk_tokens)
      else:
        reference = jax.eval_shape(functools.partial(
            block_calib.run_block, adapter, block.kind, record_outputs=(eval_path,),
            batch_size=settings.batch_size), block_params, state)[1]["outputs"][eval_path]
        loss = block_calib.ModuleOutputLoss(block_params, state, reference, adapter, block.kind, paths, eval_path,
                                            fmt, (shift,) * len(paths), settings.batch_size)
      x_all = x_list[0] if group.shared_input else _sds((sum(x.shape[0] for x in x_list), x_list[0].shape[1]),
                                                        jnp.float32)
      lowered = svdquant._quantize_group_core.lower(kernels, biases, x_all, as_traceable_loss(loss), None,
                                                    settings=settings, shifts=(shift,) * len(paths))
      rows.append({"kind": block.kind, "group": group.name, "program": "search", **_analysis(lowered)})
      log(rows[-1])
  full = flux.abstract_flux_params(preset.replace(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype)))
  return {"rows": rows, "params_gb": _nbytes(full) / GB, "state_gb": _nbytes(state) / GB}


def format_row(row: dict[str, Any]) -> str:
  return (f"| {row['kind']} | {row['group']} | {row['program']} | {row['argument']:.2f} | {row['output']:.2f} | "
          f"{row['temp']:.2f} | {row['total']:.2f} |")


def format_report(report: dict[str, Any], label: str) -> str:
  """A markdown table of :func:`memory_report` (GB) with the resident terms under it."""
  lines = [f"{label}", "", "| block | group | program | arguments | outputs | temporaries | total |",
           "|---|---|---|---|---|---|---|"]
  lines += [format_row(r) for r in report["rows"]]
  worst = max(report["rows"], key=lambda r: r["total"])
  lines += ["", f"- whole transformer params: {report['params_gb']:.2f} GB; calibration state "
                f"{report['state_gb']:.2f} GB (both included in a program's arguments only as far as it reads them)",
            f"- largest program: {worst['kind']} {worst['group']} {worst['program']} {worst['total']:.2f} GB"]
  return "\n".join(lines)
