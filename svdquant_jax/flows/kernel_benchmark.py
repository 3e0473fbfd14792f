"""Checks and times the fused SVDQuant linear against XLA baselines at FLUX.1 1024² shapes.

The command is ``launch/benchmark_kernels.py``. One run, for every (layer, tokens) shape, so that
the ratios are measured side by side:

* ``xla_bf16``: ``x @ W`` in bf16 (W ``[K, N]``).
* ``xla_w4a16``: int4 weight codes (``jnp.int4``) dequantized with group-64 scales, bf16 dot.
* ``xla_int8_proxy``: the best XLA does unfused: jnp activation quantization (kernel 1 of the
  reference), an int8 x int8 -> int32 dot with K-major weights, a per-token x per-channel
  rescale, the rank-r branch ``(x @ L1) @ L2`` and the bias as separate ops. A *cost* proxy: XLA
  has no efficient group-scaled int8 GEMM, so its numerics are not SVDQuant's.
* ``reference``: the exact SVDQuant op in XLA (``backend="reference"``; scans over groups).
* ours: ``triton`` at ranks 32 and 0 with the tile table's config, and with ``sweep`` every
  candidate of ``tuning.TRITON_*_CANDIDATES``; plus kernel 1 and kernel 2 timed alone.
* ``mosaic_gpu`` (on a GPU only; the GPU interpreter is too slow for timing): the tile table's
  tile and :data:`MOSAIC_FORMS` (two compute warpgroups, in-kernel 4-bit unpack, both), with
  ``sweep`` every ``mosaic_gpu.MOSAIC_CANDIDATES`` tile; each checked against the reference.

Correctness (``check``, default on): kernel-1 codes and scales must equal the reference's bit for
bit and the output must agree within relative error 1e-2 (bf16); failures are reported in the
table and the JSON (:func:`failed` is then true; the command exits with status 1). A sweep
candidate that does not compile, e.g. for lack of shared memory, is reported as skipped.

Timing (``docs/benchmarks.md``, "What it measures"): warm-up calls, then ``rounds`` rounds of ``iters``
back-to-back calls cycling over ``rotate`` input sets (activations and weights, so that nothing
stays in L2 between calls), the device synchronized at the end of each round; the median round
gives the per-call time. :func:`run` measures, :func:`write_results` writes ``results.json`` and
``results.md``, :func:`format_table` is the short summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from svdquant_jax.formats import packing
from svdquant_jax.formats import quantizers as q
from svdquant_jax.pallas import mosaic_gpu, reference, triton, tuning
from svdquant_jax.utils.files import atomic_write_text

# name -> (K, N, block kind, shifted unsigned input)
LAYERS = {
    "qkv": (3072, 9216, "double", False),
    "out": (3072, 3072, "double", False),
    "fc1": (3072, 12288, "double", False),
    "fc2": (12288, 3072, "double", True),
    "single_in": (3072, 21504, "single", False),
    "single_out": (15360, 3072, "single", False),
}
TOKENS = {"double": (4096, 512, 256), "single": (4608, 512, 256)}
SMOKE_LAYERS = {"smoke_a": (192, 80, "double", False), "smoke_b": (128, 96, "double", True)}
SMOKE_TOKENS = (40,)
RTOL = 1e-2
# The settings recorded in ``env["flags"]`` of the results.
_RECORDED = ("layers", "tokens", "ranks", "warmup", "iters", "rounds", "rotate", "sweep", "check", "smoke")


@dataclasses.dataclass(frozen=True)
class KernelBenchmarkSettings:
  """What to run (the command's flags of the same names).

  ``tokens`` empty: every layer's FLUX token counts (:data:`TOKENS`). ``smoke``: the CPU smoke test,
  tiny shapes (:data:`SMOKE_LAYERS`, ``layers`` ignored), Pallas interpret mode, one call each
  (``warmup``, ``iters``, ``rounds`` and ``rotate`` become 1).
  """
  layers: tuple[str, ...] = tuple(LAYERS)
  tokens: tuple[int, ...] = ()
  ranks: tuple[int, ...] = (32, 0)
  warmup: int = 3
  iters: int = 20
  rounds: int = 5
  rotate: int = 4
  sweep: bool = False
  check: bool = True
  baselines: bool = True
  smoke: bool = False


@dataclasses.dataclass
class Result:
  """One implementation at one shape; times in microseconds per call."""
  layer: str
  m: int
  k: int
  n: int
  impl: str
  rank: int | None = None
  config: str | None = None
  median_us: float | None = None
  min_us: float | None = None
  max_us: float | None = None
  tops: float | None = None
  rel_err: float | None = None
  codes_exact: bool | None = None
  sweep: bool = False
  error: str | None = None


def _time(fn: Callable[..., Any], arg_sets: list[tuple], warmup: int, iters: int, rounds: int
          ) -> tuple[float, float, float]:
  """(median, min, max) seconds per call over ``rounds`` rounds of ``iters`` calls."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  per_call = []
  for _ in range(rounds):
    start = time.perf_counter()
    out = None
    for i in range(iters):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - start) / iters)
  return statistics.median(per_call), min(per_call), max(per_call)


def _layer_sets(rng: np.random.Generator, k: int, n: int, rank: int, shift: float, count: int, dtype: Any
                ) -> list[dict[str, Any]]:
  """``count`` random layers: the float kernel and its SVDQuant form (through the real constructor)."""
  sets = []
  for _ in range(count):
    w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02, dtype)
    lam = jnp.asarray(np.exp(rng.uniform(-1, 1, k)).astype(np.float32), dtype)
    a = jnp.asarray(rng.standard_normal((k, rank), np.float32) * 0.02, dtype)
    b = jnp.asarray(rng.standard_normal((rank, n), np.float32) * 0.02, dtype)
    bias = jnp.asarray(rng.standard_normal(n, np.float32) * 0.1, dtype)
    ql = packing.from_float(w, bias, lam, a, b, shift=shift)
    w_codes, w_scales = q.quantize_int4_weight(w, 64)
    sets.append({"w": w, "bias": bias, "ql": ql, "w4_codes": w_codes.astype(jnp.int4), "w4_scales": w_scales,
                 "w8_nk": ql.weight_codes().T, "w8_scale": jnp.max(ql.wscales.astype(jnp.float32), axis=0)})
  return sets


def _x_sets(rng: np.random.Generator, m: int, k: int, count: int, dtype: Any, gelu: bool) -> list[jax.Array]:
  out = []
  for _ in range(count):
    x = rng.standard_normal((m, k), np.float32)
    x[:, rng.choice(k, max(1, k // 64), replace=False)] *= 10.0
    x = jnp.asarray(x, dtype)
    out.append(jax.nn.gelu(x, approximate=True) if gelu else x)
  return out


@jax.jit
def xla_bf16(x, layer):
  """Baseline: ``x @ W + bias`` in the input dtype."""
  return jnp.dot(x, layer["w"], preferred_element_type=jnp.float32).astype(x.dtype) + layer["bias"]


@jax.jit
def xla_w4a16(x, layer):
  """Baseline: int4 weight codes dequantized with group-64 scales, then a dot in the input dtype."""
  codes, scales = layer["w4_codes"], layer["w4_scales"]
  k, n = codes.shape
  w = (codes.astype(x.dtype).reshape(k // 64, 64, n) * scales[:, None, :]).reshape(k, n)
  return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype) + layer["bias"]


@jax.jit
def xla_int8_proxy(x, layer):
  """Cost proxy of the unfused op: jnp quantization, int8 dot, rescale, low-rank branch, bias."""
  ql = layer["ql"]
  acts = reference.quantize_activations(x, ql)
  s_x = jnp.max(acts.scales.astype(jnp.float32), axis=1, keepdims=True)
  acc = jax.lax.dot_general(acts.codes, layer["w8_nk"], (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
  y = acc.astype(jnp.float32) * s_x * layer["w8_scale"][None, :]
  if ql.rank:
    y = y + jnp.dot(jnp.dot(x, ql.lora_down), ql.lora_up, preferred_element_type=jnp.float32)
  return (y + ql.bias.astype(jnp.float32)).astype(x.dtype)


def _ours(config: tuning.TritonConfig, interpret: bool) -> Callable:
  return jax.jit(lambda x, layer: triton.svdquant_linear_triton(x, layer["ql"], config=config, interpret=interpret))


def _kernel1(config: tuning.TritonConfig, interpret: bool) -> Callable:
  def run_kernel1(x, layer):
    m_pad = triton.padded_rows(x.shape[0], config)
    return triton.quantize_activations(x, layer["ql"], config.quantize, m_pad=m_pad, interpret=interpret)
  return jax.jit(run_kernel1)


def _kernel2(config: tuning.TritonConfig, interpret: bool) -> Callable:
  def run_kernel2(acts, layer):
    codes, scales, parts = acts
    m = codes.shape[0]  # padded rows; the store mask does not matter for timing
    return triton.gemm(codes, scales, parts, layer["ql"], m, jnp.bfloat16, config.gemm, interpret=interpret)
  return jax.jit(run_kernel2)


def _check(x: jax.Array, layer: dict[str, Any], config: tuning.TritonConfig, interpret: bool
           ) -> tuple[float, bool]:
  """(relative error of the output vs the reference, kernel-1 codes and scales bit-exact)."""
  ql = layer["ql"]
  m = x.shape[0]
  y = _ours(config, interpret)(x, layer)
  want = jax.jit(reference.svdquant_linear_reference)(x, ql)
  yf, wf = np.asarray(y.astype(jnp.float32), np.float64), np.asarray(want.astype(jnp.float32), np.float64)
  err = float(np.linalg.norm(yf - wf) / np.linalg.norm(wf)) if np.isfinite(yf).all() else float("inf")
  codes, scales, _ = _kernel1(config, interpret)(x, layer)
  ref = jax.jit(reference.quantize_activations)(x, ql)
  got_codes = packing.unpack_int4(codes[:m], signed=not ql.act_unsigned)
  exact = bool(jnp.all(got_codes == ref.codes)) and bool(jnp.all(scales[:, :m].T == ref.scales))
  return err, exact


def _configs(m: int, n: int, k: int, interpret: bool, sweep: bool) -> list[tuning.TritonConfig]:
  base = tuning.triton_config(m, n, k, interpret=interpret)
  configs = [base]
  if sweep:
    for g in tuning.TRITON_GEMM_CANDIDATES:
      if g != base.gemm:
        configs.append(tuning.TritonConfig(base.quantize, g, "sweep"))
    for qt in tuning.TRITON_QUANTIZE_CANDIDATES:
      if qt != base.quantize:
        configs.append(tuning.TritonConfig(qt, base.gemm, "sweep"))
  return configs


# The Mosaic GPU forms timed beside the table's tile (which one is fastest is the first GPU question).
MOSAIC_FORMS: tuple[mosaic_gpu.MosaicTile, ...] = (
    mosaic_gpu.MosaicTile(128, 128, 4, compute_wgs=2),
    mosaic_gpu.MosaicTile(128, 64, 4, packed_weight=True),
    mosaic_gpu.MosaicTile(128, 128, 4, compute_wgs=2, packed_weight=True),
)


def _mosaic_tiles(sweep: bool) -> list[mosaic_gpu.MosaicTile]:
  tiles = [mosaic_gpu.mosaic_tile()] + list(mosaic_gpu.MOSAIC_CANDIDATES if sweep else MOSAIC_FORMS)
  return [t for i, t in enumerate(tiles) if t.name not in {u.name for u in tiles[:i]}]


def _mosaic(tile: mosaic_gpu.MosaicTile) -> Callable:
  return jax.jit(lambda x, layer: mosaic_gpu.svdquant_linear_mosaic_gpu(x, layer["ql"], tile=tile))


def _output_error(fn: Callable, x: jax.Array, layer: dict[str, Any]) -> float:
  """Relative L2 error of ``fn(x, layer)`` against the reference op."""
  want = np.asarray(reference.svdquant_linear_reference(x, layer["ql"]), np.float32)
  got = np.asarray(fn(x, layer), np.float32)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _safe(record: Result, fn: Callable[[], None]) -> None:
  try:
    fn()
  except Exception as e:  # A failing implementation is reported, the run goes on.
    record.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def benchmark_shape(layer_name: str, k: int, n: int, m: int, shifted: bool, s: KernelBenchmarkSettings
                    ) -> list[Result]:
  """Every implementation at one shape (``s.smoke``: Pallas interpret mode)."""
  interpret = s.smoke
  rng = np.random.default_rng(m * 7 + k + n)
  dtype = jnp.bfloat16
  shift = q.GELU_SHIFT if shifted else 0.0
  reps = dict(warmup=s.warmup, iters=s.iters, rounds=s.rounds)
  ops = 2.0 * m * k * n
  xs = _x_sets(rng, m, k, s.rotate, dtype, gelu=shifted)
  results: list[Result] = []

  def timed(impl: str, fn: Callable, arg_sets: list[tuple], rank: int | None = None, config: str | None = None,
            sweep: bool = False) -> Result:
    r = Result(layer_name, m, k, n, impl, rank, config, sweep=sweep)

    def measure():
      med, lo, hi = _time(fn, arg_sets, **reps)
      r.median_us, r.min_us, r.max_us, r.tops = med * 1e6, lo * 1e6, hi * 1e6, ops / med / 1e12
    _safe(r, measure)
    results.append(r)
    return r

  for rank in s.ranks:
    layers = _layer_sets(rng, k, n, rank, shift, s.rotate, dtype)
    args = [(xs[i], layers[i]) for i in range(s.rotate)]
    if s.baselines and rank == s.ranks[0]:
      timed("xla_bf16", xla_bf16, args)
      timed("xla_w4a16", xla_w4a16, args)
      timed("xla_int8_proxy", xla_int8_proxy, args, rank)
      timed("reference", jax.jit(lambda x, layer: reference.svdquant_linear_reference(x, layer["ql"])), args, rank)
    for cfg in _configs(m, n, k, interpret, s.sweep):
      r = timed("triton", _ours(cfg, interpret), args, rank, cfg.name, sweep=cfg.source == "sweep")
      if s.check and cfg.source != "sweep" and r.error is None:
        def check(r=r, cfg=cfg):
          r.rel_err, r.codes_exact = _check(xs[0], layers[0], cfg, interpret)
          if not (r.codes_exact and r.rel_err <= RTOL):
            r.error = f"check failed: rel_err={r.rel_err:.3e}, codes_exact={r.codes_exact}"
        _safe(r, check)
      if cfg.source != "sweep":
        k1 = _kernel1(cfg, interpret)
        timed("triton_kernel1", k1, args, rank, cfg.name)
        acts = [jax.block_until_ready(k1(*a)) for a in args]
        timed("triton_kernel2", _kernel2(cfg, interpret), [(acts[i], layers[i]) for i in range(s.rotate)],
              rank, cfg.name)
    if interpret:
      continue
    for tile in _mosaic_tiles(s.sweep):
      fn = _mosaic(tile)
      sweep = tile.name != mosaic_gpu.mosaic_tile().name and tile not in MOSAIC_FORMS
      r = timed("mosaic_gpu", fn, args, rank, tile.name, sweep=sweep)
      if s.check and r.error is None:
        def check_mosaic(r=r, fn=fn):
          r.rel_err = _output_error(fn, xs[0], layers[0])
          if not r.rel_err <= RTOL:
            r.error = f"check failed: rel_err={r.rel_err:.3e}"
        _safe(r, check_mosaic)
  return results


def run(s: KernelBenchmarkSettings) -> dict[str, Any]:
  """Checks and times every shape of ``s``; prints a header and one progress line per shape.

  Returns ``{"env": {...}, "results": [Result, ...]}``: ``env`` holds the jax version, device,
  tile-table device key, date and the settings used (``flags``). Without ``s.smoke`` a GPU is
  required (ValueError otherwise).
  """
  if s.smoke:
    s = dataclasses.replace(s, warmup=1, iters=1, rounds=1, rotate=1)
    layers = SMOKE_LAYERS
  else:
    unknown = [name for name in s.layers if name not in LAYERS]
    if unknown:
      raise ValueError(f"unknown layers {unknown}; expected some of {list(LAYERS)}")
    if jax.default_backend() != "gpu":
      raise ValueError("no GPU: run with --smoke for the CPU interpret-mode smoke test")
    layers = {name: LAYERS[name] for name in s.layers}
  device = jax.devices()[0]
  recorded = {f: (list(v) if isinstance(v, tuple) else v) for f, v in dataclasses.asdict(s).items() if f in _RECORDED}
  env = {"jax": jax.__version__, "device": str(getattr(device, "device_kind", device.platform)),
         "device_key": "interpret" if s.smoke else tuning.device_key(device),
         "date": time.strftime("%Y-%m-%d %H:%M:%S"), "flags": recorded}
  print(f"# svdquant kernels benchmark: {env}", flush=True)
  results: list[Result] = []
  for name, (k, n, kind, shifted) in layers.items():
    for m in s.tokens or (SMOKE_TOKENS if s.smoke else TOKENS[kind]):
      print(f"## {name} M={m} K={k} N={n}", flush=True)
      results.extend(benchmark_shape(name, k, n, m, shifted, s))
  return {"env": env, "results": results}


def _fmt_us(v: float | None) -> str:
  return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def format_table(result: dict[str, Any]) -> str:
  """Per shape: the baselines, our best config at each rank, and ours vs each baseline (markdown)."""
  results: Sequence[Result] = result["results"]
  lines = ["| layer | M | K x N | xla bf16 us | w4a16 us | int8 proxy us | ours r32 us | ours r0 us | "
           "mosaic r32 us | bf16/ours r32 | w4a16/ours r32 | proxy/ours r32 | check |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  shapes = []
  for r in results:
    if (r.layer, r.m) not in shapes:
      shapes.append((r.layer, r.m))
  for layer, m in shapes:
    rs = [r for r in results if r.layer == layer and r.m == m]
    base = {r.impl: r.median_us for r in rs if r.rank in (None, 32, 0) and r.impl.startswith("xla")}

    def best(rank: int, impl: str = "triton") -> float | None:
      times = [r.median_us for r in rs if r.impl == impl and r.rank == rank and r.median_us is not None]
      return min(times) if times else None

    o32, o0 = best(32), best(0)
    ratio = lambda b: "-" if b is None or o32 is None else f"{b / o32:.2f}x"
    checks = [r for r in rs if r.impl in ("triton", "mosaic_gpu") and r.rel_err is not None and not r.sweep]
    failures = [r for r in rs if r.error and not r.sweep]
    check = "FAIL" if failures else ("ok " + ", ".join(f"{r.rel_err:.1e}" for r in checks) if checks else "-")
    k, n = rs[0].k, rs[0].n
    lines.append(f"| {layer} | {m} | {k}x{n} | {_fmt_us(base.get('xla_bf16'))} | {_fmt_us(base.get('xla_w4a16'))} | "
                 f"{_fmt_us(base.get('xla_int8_proxy'))} | {_fmt_us(o32)} | {_fmt_us(o0)} | "
                 f"{_fmt_us(best(32, 'mosaic_gpu'))} | "
                 f"{ratio(base.get('xla_bf16'))} | {ratio(base.get('xla_w4a16'))} | "
                 f"{ratio(base.get('xla_int8_proxy'))} | {check} |")
  return "\n".join(lines)


def full_table(result: dict[str, Any]) -> str:
  """Every measurement, one row each (markdown)."""
  lines = ["| layer | M | K | N | impl | rank | config | median us | min us | max us | TOP/s | rel err | "
           "codes exact | sweep | error |", "|" + "---|" * 15]
  for r in result["results"]:
    lines.append(f"| {r.layer} | {r.m} | {r.k} | {r.n} | {r.impl} | {'' if r.rank is None else r.rank} | "
                 f"{r.config or ''} | {_fmt_us(r.median_us)} | {_fmt_us(r.min_us)} | {_fmt_us(r.max_us)} | "
                 f"{'' if r.tops is None else f'{r.tops:.0f}'} | "
                 f"{'' if r.rel_err is None else f'{r.rel_err:.2e}'} | "
                 f"{'' if r.codes_exact is None else r.codes_exact} | {'yes' if r.sweep else ''} | {r.error or ''} |")
  return "\n".join(lines)


def write_results(result: dict[str, Any], out_dir: str) -> None:
  """Writes ``results.json`` (env and every result) and ``results.md`` (summary + full table)."""
  env = result["env"]
  os.makedirs(out_dir, exist_ok=True)
  atomic_write_text(os.path.join(out_dir, "results.json"),
                    json.dumps({"env": env, "results": [dataclasses.asdict(r) for r in result["results"]]}, indent=1))
  atomic_write_text(os.path.join(out_dir, "results.md"),
                    f"# SVDQuant kernels benchmark\n\n`{json.dumps(env)}`\n\n## Summary (median us per call)\n\n"
                    f"{format_table(result)}\n\n## All results\n\n{full_table(result)}\n")


def error_lines(result: dict[str, Any]) -> list[str]:
  """One line per failed implementation or skipped sweep candidate."""
  return [f"{'skipped sweep config' if r.sweep else 'FAILED'} {r.layer} M={r.m} {r.impl} rank={r.rank} "
          f"{r.config}: {r.error}" for r in result["results"] if r.error]


def failed(result: dict[str, Any]) -> bool:
  """Whether a check failed or a table config (not a sweep candidate) failed to run."""
  return any(r.error and not r.sweep for r in result["results"])
