"""The Mosaic GPU GEMM (``svdquant_jax/pallas/mosaic_gpu.py``), proven on CPU.

Both forms of the kernel (one compute warpgroup; warp specialized with a memory warpgroup and two
compute warpgroups), each with the wrapper's int8 weight and with the 4-bit weight unpacked in the
kernel (``MosaicTile.compute_wgs`` / ``packed_weight``):

* **GPU interpreter** (``InterpretGPUParams(detect_races=True)``, jax 0.10.2 plus the small shim
  in ``tests/mosaic_gpu_shim.py``): the kernel's output against :func:`reference.gemm` fed the
  same kernel-1 outputs, on shapes off every tile (M, N not multiples of 64, K = 64 x odd), ranks
  0 / 16 / 32, signed and shifted-unsigned activations, bf16 / fp16, with per-channel scales;
  the integer part exactly (power-of-two scales, every nibble value: the float32 output must equal
  the int64 evaluation); the whole op with leading dims; no race reported, and a race reported
  when the kernel's barrier waits are removed.
* **Lowering for CUDA** (``lower(lowering_platforms=("cuda",))``, which runs Mosaic GPU's layout
  inference and its shared-memory and wgmma checks) for every tile of the table and candidates,
  and an oversized tile per form that must fail the shared-memory check (so the check is real).

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
  # NPROC sizes XLA:CPU's execution thread pool (default: the core count). The interpreter runs each
  # simulated warpgroup as its own XLA execution whose barrier waits block a pool thread; with 2 cores
  # the two compute warpgroups of the warp-specialized kernel took both threads while waiting for the
  # memory warpgroup, which never ran (measured: a hang, every time, at rank 16).
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([ROOT, HERE]), NPROC="8")
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

# (m, k, n, rank, unsigned, dtype, wcscales, tile): MosaicTile(*tile), (block_m, block_n, steps[, wgs[, packed]])
INTERPRET_CASES = [
    (50, 192, 80, 16, False, "bfloat16", False, (64, 64, 2)),
    (33, 320, 48, 0, True, "float16", False, (64, 64, 2)),
    (70, 192, 136, 32, True, "bfloat16", True, (64, 128, 3)),
    # tile[4] = packed_weight: the kernel splits the 4-bit qweight itself.
    (50, 320, 80, 16, False, "bfloat16", True, (64, 64, 2, 1, True)),
]
# The integer-exactness runs: (unsigned activations, compute warpgroups, weight unpacked in the kernel).
EXACT_RUNS = ((False, 1, False), (True, 1, False), (False, 2, False), (True, 2, False), (False, 1, True),
              (True, 2, True))
# Warp specialized (tile[3] = compute_wgs = 2): M past 64 inside a tile, so both compute
# warpgroups hold real rows (the second one partly padding), and M, N off the tile.
WS_CASES = [
    (100, 192, 80, 16, False, "bfloat16", False, (128, 64, 2, 2)),
    (150, 320, 72, 0, True, "float16", True, (128, 64, 3, 2)),
    (70, 192, 136, 32, True, "bfloat16", True, (128, 128, 2, 2, True)),
]


# ============================================================================= tests
@pytest.mark.slow  # ~65 s on a loaded 2-core machine
@needs_interpreter
def test_interpreter_matches_reference():
  res = _run_worker("interpret", {"cases": INTERPRET_CASES}, timeout=240)
  _check_cases(INTERPRET_CASES, res["cases"])
  assert res["op_rel_err"] <= 2e-3 and res["op_shape"] == [2, 25, 80]


def _check_cases(cases, results):
  for case, r in zip(cases, results, strict=True):
    assert not r["races"], f"{case}: the race detector reported a race"
    # Same int32 group dots, same float32 rescale order as the reference: only the low-rank
    # product (tensor-core vs CPU accumulation order) may differ, by a rounding of the output.
    assert r["rel_err"] <= 2e-3, f"{case}: relative error {r['rel_err']:.3e}"
    if case[3] == 0 and not case[6]:
      assert r["max_abs_err"] == 0.0, f"{case}: rank 0 must be bit-exact, max abs error {r['max_abs_err']}"
    elif case[3] == 0:
      # acc · wcscales + bias: two float32 roundings in the kernel, one where a compiler fuses them
      # into an FMA (measured 2.8e-8 with one warpgroup, 1.9e-7 with two, on the same kind of case:
      # an output rounding to the activation dtype moved by it).
      assert r["rel_err"] <= 1e-5, f"{case}: relative error {r['rel_err']:.3e}"


@pytest.mark.slow  # ~130 s on a loaded 2-core machine
@needs_interpreter
def test_warp_specialized_interpreter_matches_reference():
  """The two-compute-warpgroup kernel (memory warpgroup + 2 x 64-row compute warpgroups)."""
  res = _run_worker("interpret", {"cases": WS_CASES, "op_tile": [128, 64, 2, 2]}, timeout=300)
  _check_cases(WS_CASES, res["cases"])
  assert res["op_rel_err"] <= 2e-3 and res["op_shape"] == [2, 25, 80]


@needs_interpreter
def test_interpreter_integer_gemm_is_exact():
  res = _run_worker("exact", {}, timeout=180)
  for r in res["runs"]:
    assert not r["races"], r
    assert r["mismatches"] == 0, f"{r}: outputs differ from int64 numpy"
  # One compute warpgroup (64 x 64 tiles), two (128 x 64 tiles: rows 64..71 are the second's), each
  # with the wrapper's int8 weight copy and with the 4-bit qweight unpacked in the kernel.
  assert [(r["unsigned"], r["compute_wgs"], r["packed"]) for r in res["runs"]] == list(EXACT_RUNS)


@needs_interpreter
def test_race_detector_sees_a_missing_barrier_wait():
  """Negative control: the same kernel without its epilogue barrier waits must be reported racy,
  so that the race-free results above mean something."""
  res = _run_worker("race_control", {"compute_wgs": 1}, timeout=180)
  assert res["races"], res


@needs_interpreter
def test_race_detector_sees_a_missing_barrier_wait_warp_specialized():
  """The same control for the two-compute-warpgroup kernel, where the memory warpgroup issues the
  epilogue copies and the compute warpgroups wait for them."""
  res = _run_worker("race_control", {"compute_wgs": 2}, timeout=180)
  assert res["races"], res


@needs_interpreter
def test_shim_transpose_is_per_thread():
  """The shim's transposed-B matmul must not leak into a wgmma of another simulated warpgroup
  (thread): with two compute warpgroups, one's low-rank wgmma runs during the other's int8 one."""
  res = _run_worker("shim_threads", {}, timeout=120)
  assert res == {"inside": "a @ b.T", "other_thread": "a @ b", "after": "a @ b"}, res


def test_lowers_for_cuda_every_tile():
  res = _run_worker("lower", {}, timeout=240)
  assert res["failed"] == {}, res["failed"]
  assert len(res["lowered"]) >= 5
  assert any(name.endswith("w2") for name in res["lowered"]), res["lowered"]
  assert any(name.endswith("w2p") for name in res["lowered"]), res["lowered"]
  assert any(name.endswith("s4p") for name in res["lowered"]), res["lowered"]
  # An oversized tile must be refused by the lowering's shared-memory check, for both kernels.
  assert "smem" in res["oversized_error"].lower(), res["oversized_error"]
  assert "smem" in res["oversized_ws_error"].lower(), res["oversized_ws_error"]


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
  codes, scales = jnp.zeros((8, 128), jnp.int8), jnp.ones((8, 2), jnp.float32)
  lora = jnp.zeros((8, 16), jnp.float32)
  for bad in (mg.MosaicTile(64, 64, 2, 2), mg.MosaicTile(128, 64, 2, 3), mg.MosaicTile(64, 320, 2)):
    with pytest.raises(ValueError, match="illegal tile"):  # 2 warpgroups need 128 rows; N <= 256
      mg.gemm(codes, scales, lora, int4, jnp.bfloat16, bad)


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
  op_tile = mg.MosaicTile(*spec["op_tile"]) if "op_tile" in spec else None
  y = mg.svdquant_linear_mosaic_gpu(x, params, tile=op_tile, interpret=params_i)
  want = reference.svdquant_linear_reference(x, params)
  return {"cases": out, "op_rel_err": relative_error(y, want), "op_shape": list(y.shape)}


def _worker_exact(spec: dict) -> dict:
  del spec
  return {"runs": [_exact_run(*run) for run in EXACT_RUNS]}


def _exact_run(unsigned: bool, wgs: int, packed: bool) -> dict:
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
  tile = mg.MosaicTile(64 * wgs, 64, 2, wgs, packed)
  got = mg.gemm(jnp.asarray(a, jnp.int8), jnp.asarray(sa), None, params, jnp.float32, tile, interpret=params_i)
  terms = np.einsum("mgk,gkn->gmn", a.reshape(m, k // 64, 64).astype(np.int64),
                    w.reshape(k // 64, 64, n).astype(np.int64))
  want = np.einsum("gmn,mg,gn->mn", terms.astype(np.float64), sa.astype(np.float64), sw.astype(np.float64))
  want = want * wc.astype(np.float64)[None, :]
  diff = np.abs(np.asarray(got, np.float64) - want)
  return {"unsigned": unsigned, "compute_wgs": wgs, "packed": packed, "mismatches": int((diff != 0).sum()),
          "max_abs_err": float(diff.max()), "races": races()}


def _worker_race_control(spec: dict) -> dict:
  wgs = spec["compute_wgs"]
  import types
  import jax.numpy as jnp
  from kernel_test_base import random_activations, random_layer
  from svdquant_jax.pallas import mosaic_gpu as mg, reference
  params_i, races = _interpreter()
  # The kernel's own plgpu calls only (the pipeline's internal waits stay).
  mg.plgpu = types.SimpleNamespace(**{**vars(mg.plgpu), "barrier_wait": lambda *a, **k: None})
  rng = np.random.default_rng(3)
  params = random_layer(rng, 128, 64, 16, dtype=jnp.bfloat16)
  acts = reference.quantize_activations(random_activations(rng, 64 * wgs, 128, jnp.bfloat16), params)
  mg.gemm(acts.codes, acts.scales, acts.lora_act, params, jnp.bfloat16, mg.MosaicTile(64 * wgs, 64, 2, wgs),
          interpret=params_i)
  return {"races": races()}


def _worker_shim_threads(spec: dict) -> dict:
  del spec
  import threading
  import mosaic_gpu_shim
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  mosaic_gpu_shim.install()
  a, b = np.arange(6.0).reshape(2, 3), np.arange(9.0).reshape(3, 3)
  name = lambda r: "a @ b" if np.array_equal(r, a @ b) else "a @ b.T" if np.array_equal(r, a @ b.T) else str(r)
  entered, checked, out = threading.Event(), threading.Event(), {}

  def inside():  # what the patched wgmma does around the interpreter's callback
    mosaic_gpu_shim._LOCAL.transpose_b = True  # pylint: disable=protected-access
    entered.set()
    checked.wait(30)
    out["inside"] = name(gpu_callbacks.np.matmul(a, b))
    mosaic_gpu_shim._LOCAL.transpose_b = False  # pylint: disable=protected-access

  t = threading.Thread(target=inside)
  t.start()
  entered.wait(30)
  out["other_thread"] = name(gpu_callbacks.np.matmul(a, b))
  checked.set()
  t.join(30)
  out["after"] = name(gpu_callbacks.np.matmul(a, b))
  return out


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
  def oversized(wgs: int) -> str:
    try:  # 6 x 2 x 256x64 code buffers + a 256x256 bf16 output + rank-128 lora tiles > 227 KiB
      lower(mg.MosaicTile(256, 256, 6, wgs), random_layer(np.random.default_rng(1), k, n, 128, dtype=jnp.bfloat16))
    except Exception as e:  # noqa: BLE001
      return f"{type(e).__name__}: {e}"[:500]
    return ""
  return {"lowered": lowered, "failed": failed, "oversized_error": oversized(1), "oversized_ws_error": oversized(2)}


if __name__ == "__main__":
  _mode, _spec = sys.argv[1], json.loads(sys.argv[2])
  _result = {"interpret": _worker_interpret, "exact": _worker_exact, "race_control": _worker_race_control,
             "shim_threads": _worker_shim_threads,
             "lower": _worker_lower}[_mode](_spec)
  print("RESULT " + json.dumps(_result), flush=True)
