"""The Mosaic GPU GEMM (``svdquant_jax/pallas/mosaic_gpu.py``), proven on CPU.

* **GPU interpreter** (``InterpretGPUParams(detect_races=True)``, jax 0.10.2 plus the small shim
  in ``tests/mosaic_gpu_shim.py``): the kernel's output against :func:`reference.gemm` fed the
  same kernel-1 outputs, on shapes off every tile (M, N not multiples of 64, K = 64 x odd), ranks
  0 / 16 / 32, signed and shifted-unsigned activations, bf16 / fp16, with per-channel scales;
  the integer part exactly (power-of-two scales, every nibble value: the float32 output must equal
  the int64 evaluation); the whole op with leading dims; no race reported.
* **Lowering for CUDA** (``lower(lowering_platforms=("cuda",))``, which runs Mosaic GPU's layout
  inference and its shared-memory and wgmma checks) for every tile of the table and candidates,
  and an oversized tile that must fail the shared-memory check (so the check is real).

The interpreter can crash or hang on some shapes, so each check runs in a subprocess (this file
run as a script) with a timeout. Capability checks run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _run_worker(mode: str, spec: dict, timeout: float) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]))
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), mode, json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)
  except subprocess.TimeoutExpired:
    pytest.fail(f"{mode} {spec}: no result within {timeout} s (interpreter hang?)")
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode or not lines:
    pytest.fail(f"{mode} {spec}: exit code {proc.returncode}\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _jax_version() -> str:
  import jax
  return jax.__version__


needs_interpreter = pytest.mark.skipif(
    _jax_version() != "0.10.2", reason="the GPU-interpreter shim is checked against jax 0.10.2 only")

# (m, k, n, rank, unsigned, dtype, wcscales, tile (block_m, block_n, steps))
INTERPRET_CASES = [
    (50, 192, 80, 16, False, "bfloat16", False, (64, 64, 2)),
    (33, 320, 48, 0, True, "float16", False, (64, 64, 2)),
    (70, 192, 136, 32, True, "bfloat16", True, (64, 128, 3)),
]


# ============================================================================= tests
@pytest.mark.slow  # ~60 s on a loaded 2-core machine
@needs_interpreter
def test_interpreter_matches_reference():
  res = _run_worker("interpret", {"cases": INTERPRET_CASES}, timeout=240)
  for case, r in zip(INTERPRET_CASES, res["cases"]):
    assert not r["races"], f"{case}: the race detector reported a race"
    # Same int32 group dots, same float32 rescale order as the reference: only the low-rank
    # product (tensor-core vs CPU accumulation order) may differ, by a rounding of the output.
    assert r["rel_err"] <= 2e-3, f"{case}: relative error {r['rel_err']:.3e}"
    if case[3] == 0:
      assert r["max_abs_err"] == 0.0, f"{case}: rank 0 must be bit-exact, max abs error {r['max_abs_err']}"
  assert res["op_rel_err"] <= 2e-3 and res["op_shape"] == [2, 25, 80]


@needs_interpreter
def test_interpreter_integer_gemm_is_exact():
  res = _run_worker("exact", {}, timeout=180)
  for r in res["runs"]:
    assert not r["races"], r
    assert r["mismatches"] == 0, f"{r}: outputs differ from int64 numpy"
  assert [r["unsigned"] for r in res["runs"]] == [False, True]


@needs_interpreter
def test_race_detector_sees_a_missing_barrier_wait():
  """Negative control: the same kernel without its epilogue barrier waits must be reported racy,
  so that the race-free results above mean something."""
  res = _run_worker("race_control", {}, timeout=180)
  assert res["races"], res


def test_lowers_for_cuda_every_tile():
  res = _run_worker("lower", {}, timeout=240)
  assert res["failed"] == {}, res["failed"]
  assert len(res["lowered"]) >= 5
  # An oversized tile must be refused by the lowering's shared-memory check.
  assert "smem" in res["oversized_error"].lower(), res["oversized_error"]


def test_capability_check():
  import jax.numpy as jnp
  from kernel_test_base import random_layer
  from svdquant_jax.pallas import mosaic_gpu as mg
  rng = np.random.default_rng(0)
  int4 = random_layer(rng, 128, 64, 16)
  if mg.interpreter_ready():  # another test in this process installed the shim
    mg.check_supported(int4, jnp.bfloat16, interpret=True)
  else:
    with pytest.raises(NotImplementedError, match="GPU interpreter cannot run"):
      mg.check_supported(int4, jnp.bfloat16, interpret=True)
  with pytest.raises(NotImplementedError, match="needs an NVIDIA Hopper GPU"):
    mg.check_supported(int4, jnp.bfloat16)  # CPU here
  with pytest.raises(NotImplementedError, match="unsupported here"):
    mg.check_supported(random_layer(rng, 128, 64, 16, fmt="nvfp4"), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="float32 activations with a low-rank"):
    mg.check_supported(int4, jnp.float32)
  with pytest.raises(NotImplementedError, match="rank 160"):
    mg.check_supported(random_layer(rng, 192, 64, 160), jnp.bfloat16)


# ============================================================================= subprocess side
def _interpreter():
  import mosaic_gpu_shim
  mosaic_gpu_shim.install()
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  # Many simulated TMA units: copies are dealt to them round robin, and with a single one every wait
  # would order the thread after *all* earlier copies, hiding a missing wait.
  params = InterpretGPUParams(detect_races=True, num_tma_threads_per_device=32)
  return params, lambda: bool(interpret_pallas_call.get_races().races_found)


def _worker_interpret(spec: dict) -> dict:
  import jax.numpy as jnp
  from kernel_test_base import random_activations, random_layer, relative_error
  from svdquant_jax.formats import quantizers as q
  from svdquant_jax.pallas import mosaic_gpu as mg, reference
  params_i, races = _interpreter()
  out = []
  for i, (m, k, n, rank, unsigned, dtype, wcs, tile) in enumerate(spec["cases"]):
    rng = np.random.default_rng(100 + i)
    dtype = jnp.dtype(dtype)
    params = random_layer(rng, k, n, rank, shift=q.GELU_SHIFT if unsigned else 0.0, dtype=dtype)
    if wcs:
      params = params.replace(wcscales=jnp.asarray(np.exp(rng.uniform(-1, 1, n)), jnp.float32))
    x = random_activations(rng, m, k, dtype, gelu=unsigned)
    acts = reference.quantize_activations(x, params)
    want = reference.gemm(acts, params, dtype)
    got = mg.gemm(acts.codes, acts.scales, acts.lora_act if rank else None, params, dtype, mg.MosaicTile(*tile),
                  interpret=params_i)
    assert got.shape == (m, n) and got.dtype == dtype, (got.shape, got.dtype)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    out.append({"rel_err": relative_error(got, want), "max_abs_err": float(diff.max()), "races": races()})
  # The whole op with leading dims (kernel 1 of the reference, kernel 2 in the interpreter).
  rng = np.random.default_rng(7)
  params = random_layer(rng, 192, 80, 32, dtype=jnp.bfloat16)
  x = random_activations(rng, 50, 192, jnp.bfloat16).reshape(2, 25, 192)
  y = mg.svdquant_linear_mosaic_gpu(x, params, interpret=params_i)
  want = reference.svdquant_linear_reference(x, params)
  return {"cases": out, "op_rel_err": relative_error(y, want), "op_shape": list(y.shape)}


def _worker_exact(spec: dict) -> dict:
  del spec
  return {"runs": [_exact_run(unsigned) for unsigned in (False, True)]}


def _exact_run(unsigned: bool) -> dict:
  import jax.numpy as jnp
  from svdquant_jax.formats import packing
  from svdquant_jax.formats import quantizers as q
  from svdquant_jax.pallas import mosaic_gpu as mg
  params_i, races = _interpreter()
  m, k, n = 72, 192, 80
  rng = np.random.default_rng(11 + unsigned)
  a = rng.integers(0, 16, (m, k)) if unsigned else rng.integers(-8, 8, (m, k))
  w = rng.integers(-8, 8, (k, n))
  assert len(np.unique(a)) == 16 and len(np.unique(w)) == 16
  sa = np.exp2(rng.integers(-2, 3, (m, k // 64))).astype(np.float32)
  sw = np.exp2(rng.integers(-2, 3, (k // 64, n))).astype(np.float32)
  wc = np.exp2(rng.integers(-3, 4, n)).astype(np.float32)
  params = packing.QuantizedLinear(
      qweight=packing.pack(jnp.asarray(w, jnp.int8), layout="KN"), wscales=jnp.asarray(sw),
      smooth=jnp.ones((k,), jnp.float32), lora_down=jnp.zeros((k, 0), jnp.float32),
      lora_up=jnp.zeros((0, n), jnp.float32), bias=None, fmt="int4", group_size=64,
      shift=q.GELU_SHIFT if unsigned else 0.0, wcscales=jnp.asarray(wc))
  got = mg.gemm(jnp.asarray(a, jnp.int8), jnp.asarray(sa), None, params, jnp.float32, mg.MosaicTile(64, 64, 2),
                interpret=params_i)
  terms = np.einsum("mgk,gkn->gmn", a.reshape(m, k // 64, 64).astype(np.int64),
                    w.reshape(k // 64, 64, n).astype(np.int64))
  want = np.einsum("gmn,mg,gn->mn", terms.astype(np.float64), sa.astype(np.float64), sw.astype(np.float64))
  want = want * wc.astype(np.float64)[None, :]
  diff = np.abs(np.asarray(got, np.float64) - want)
  return {"unsigned": unsigned, "mismatches": int((diff != 0).sum()), "max_abs_err": float(diff.max()),
          "races": races()}


def _worker_race_control(spec: dict) -> dict:
  del spec
  import types
  import jax.numpy as jnp
  from kernel_test_base import random_activations, random_layer
  from svdquant_jax.pallas import mosaic_gpu as mg, reference
  params_i, races = _interpreter()
  # The kernel's own plgpu calls only (the pipeline's internal waits stay).
  mg.plgpu = types.SimpleNamespace(**{**vars(mg.plgpu), "barrier_wait": lambda *a, **k: None})
  rng = np.random.default_rng(3)
  params = random_layer(rng, 128, 64, 16, dtype=jnp.bfloat16)
  acts = reference.quantize_activations(random_activations(rng, 64, 128, jnp.bfloat16), params)
  mg.gemm(acts.codes, acts.scales, acts.lora_act, params, jnp.bfloat16, mg.MosaicTile(64, 64, 2),
          interpret=params_i)
  return {"races": races()}


def _worker_lower(spec: dict) -> dict:
  del spec
  import jax
  import jax.numpy as jnp
  from kernel_test_base import random_layer
  from svdquant_jax.pallas import mosaic_gpu as mg
  m, k, n, rank = 256, 3072, 512, 32
  params = random_layer(np.random.default_rng(0), k, n, rank, dtype=jnp.bfloat16)
  codes = jax.ShapeDtypeStruct((m, k), jnp.int8)
  scales = jax.ShapeDtypeStruct((m, k // 64), jnp.bfloat16)
  lora = jax.ShapeDtypeStruct((m, rank), jnp.float32)

  def lower(tile: mg.MosaicTile, p=params) -> None:
    f = lambda c, s, l: mg.gemm(c, s, l, p, jnp.bfloat16, tile)
    jax.jit(f).trace(codes, scales, lora).lower(lowering_platforms=("cuda",))

  tiles = {t.name: t for t in (*mg.MOSAIC_TABLE.values(), *mg.MOSAIC_CANDIDATES)}
  lowered, failed = [], {}
  for name, tile in tiles.items():
    try:
      lower(tile)
      lowered.append(name)
    except Exception as e:  # noqa: BLE001 - reported to the test
      failed[name] = f"{type(e).__name__}: {str(e)[:300]}"
  oversized = ""
  try:  # 3 x 2 x 256x64 code buffers + a 256x256 bf16 output + rank-128 lora tiles > 227 KiB
    lower(mg.MosaicTile(256, 256, 6), random_layer(np.random.default_rng(1), k, n, 128, dtype=jnp.bfloat16))
  except Exception as e:  # noqa: BLE001
    oversized = f"{type(e).__name__}: {e}"
  return {"lowered": lowered, "failed": failed, "oversized_error": oversized[:500]}


if __name__ == "__main__":
  _mode, _spec = sys.argv[1], json.loads(sys.argv[2])
  _result = {"interpret": _worker_interpret, "exact": _worker_exact, "race_control": _worker_race_control,
             "lower": _worker_lower}[_mode](_spec)
  print("RESULT " + json.dumps(_result), flush=True)
