"""The fused SVDQuant linear: packing, format constructors, reference vs float64, registry,
bad input, and the Pallas-Triton kernels (through the shared base in ``kernel_test_base``)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kernel_test_base import (INTERPRET, Kernel1Outputs, KernelTestBase, random_activations, random_layer,
                              relative_error)
from svdquant_jax.formats import packing
from svdquant_jax.pallas import reference, registry, triton as tr, tuning
from svdquant_jax.pallas import svdquant_linear
from svdquant_jax.formats import quantizers as q
from test_quantizers import np_int4_act


# ============================================================================= Triton kernels
class TestTritonKernels(KernelTestBase):
  BACKEND = "triton"

  def _config(self, m: int, n: int, k: int) -> tuning.TritonConfig:
    return tuning.triton_config(m, n, k, interpret=INTERPRET)

  def run_kernel1(self, x, params):
    m, k = x.shape
    cfg = self._config(m, params.out_features, k)
    m_pad = tr.padded_rows(m, cfg)
    poison = tuple(jnp.full(s.shape, 0x88 if s.dtype == jnp.uint8 else jnp.nan, s.dtype)
                   for s in tr.quantize_output_shapes(x, params, cfg.quantize, m_pad))
    codes, scales, parts = tr.quantize_activations(x, params, cfg.quantize, m_pad=m_pad, interpret=INTERPRET,
                                                   outputs=poison)
    codes, scales = jax.device_get((codes, scales))
    lora = None
    if parts is not None:
      parts = np.asarray(jax.device_get(parts), np.float64)
      assert not np.isnan(parts).any(), "unwritten lora_act partials"
      lora = parts.sum(0)[:m, :params.rank]
      assert not np.any(parts[:, :, params.rank:]), "padded rank columns must be zero"
    return Kernel1Outputs(
        codes=np.asarray(packing.unpack_int4(jnp.asarray(codes[:m]), signed=not params.act_unsigned)),
        scales=np.asarray(scales[:, :m]).T, lora_act=lora, padding_codes=np.asarray(codes[m:]),
        padding_scales=np.asarray(scales[:, m:]))

  def run_kernel2(self, codes, scales, lora_act, params, out_dtype):
    m, k = codes.shape
    cfg = self._config(m, params.out_features, k)
    m_pad = tr.padded_rows(m, cfg)
    packed = jnp.pad(packing.pack_int4(codes, signed=not params.act_unsigned), ((0, m_pad - m), (0, 0)))
    scales_t = jnp.pad(scales.T, ((0, 0), (0, m_pad - m)))
    parts = None
    if params.rank:
      rp = tr.padded_rank(params.rank)
      parts = jnp.pad(lora_act, ((0, m_pad - m), (0, rp - params.rank)))[None]
    out = jnp.full((m, params.out_features), jnp.nan, out_dtype)
    return tr.gemm(packed, scales_t, parts, params, m, out_dtype, cfg.gemm, interpret=INTERPRET, out=out)


def _lower_for_gpu(fn, *args):
  """Lowers ``fn`` to a cuda module on this machine (Pallas-Triton lowers to Triton IR in Python).

  Under an abstract H100 mesh: jax 0.11 needs an (abstract) GPU device to lower for CUDA without one.
  """
  h100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
  with jax.sharding.use_abstract_mesh(h100):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("key", sorted({k for k in tuning.TRITON_TABLE if k[0] != "interpret"}), ids=str)
def test_triton_kernels_lower_for_gpu_with_every_table_config(key):
  """Every primitive used has a Pallas-Triton lowering (no value slicing etc.), for each tile
  config of the table, signed/unsigned, rank 0/32, bf16/fp16/fp32, with and without per-channel
  scales in the epilogue (compiled on the GPU only)."""
  cfg = tuning.TRITON_TABLE[key]
  rng = np.random.default_rng(5)
  variants = [(32, 0.0, jnp.bfloat16, True), (0, q.GELU_SHIFT, jnp.float16, False), (32, q.GELU_SHIFT, jnp.float32, True)]
  for rank, shift, dtype, bias in variants:
    params = random_layer(rng, 448, 200, rank, shift=shift, dtype=dtype, bias=bias)
    if rank == 0:
      params = params.replace(wcscales=jnp.ones((200,), jnp.float32))
    x = random_activations(rng, 300, 448, dtype)

    def op(x, params):
      m_pad = tr.padded_rows(x.shape[0], cfg)
      codes, scales, parts = tr.quantize_activations(x, params, cfg.quantize, m_pad=m_pad, interpret=False)
      return tr.gemm(codes, scales, parts, params, x.shape[0], x.dtype, cfg.gemm, interpret=False)

    text = _lower_for_gpu(op, x, params)
    assert text.count("__gpu$xla.gpu.triton") + text.count("triton_kernel_call") == 2


@pytest.mark.parametrize("tile", tuning.TRITON_GEMM_CANDIDATES, ids=str)
def test_triton_gemm_lowers_for_gpu_with_every_sweep_candidate(tile):
  rng = np.random.default_rng(6)
  params = random_layer(rng, 320, 200, 32)
  x = random_activations(rng, 300, 320, jnp.bfloat16)
  cfg = tuning.TritonConfig(tuning.QuantizeTile(), tile)

  def op(x, params):
    m_pad = tr.padded_rows(x.shape[0], cfg)
    codes, scales, parts = tr.quantize_activations(x, params, cfg.quantize, m_pad=m_pad, interpret=False)
    return tr.gemm(codes, scales, parts, params, x.shape[0], x.dtype, cfg.gemm, interpret=False)

  assert "triton" in _lower_for_gpu(op, x, params)


def test_grouped_program_order_covers_the_grid_once_in_m_groups():
  """Every (pid_m, pid_n) exactly once; consecutive programs walk ``group_m`` M tiles down one N
  column (the last group shorter when group_m does not divide the M tiles)."""
  for grid_m, grid_n, group_m in [(7, 5, 3), (32, 72, 8), (3, 4, 8), (5, 2, 1)]:
    pid = jnp.arange(grid_m * grid_n)
    pm, pn = (np.asarray(v) for v in tr.grouped_program_ids(pid, grid_m, grid_n, group_m))
    assert sorted(zip(pm.tolist(), pn.tolist())) == [(i, j) for i in range(grid_m) for j in range(grid_n)]
    g = min(group_m, grid_m)
    np.testing.assert_array_equal(pm[:2 * g], np.tile(np.arange(g), 2))
    np.testing.assert_array_equal(pn[:2 * g], np.repeat([0, 1], g))
  pm, pn = (np.asarray(v) for v in tr.grouped_program_ids(jnp.arange(35), 7, 5, 3))
  np.testing.assert_array_equal(pm[30:], [6] * 5)  # last group: one M tile, every N tile in order
  np.testing.assert_array_equal(pn[30:], np.arange(5))


def test_lora_partials_are_reduced_once_in_chunk_order():
  rng = np.random.default_rng(3)
  parts = jnp.asarray(rng.standard_normal((5, 48, 32)) * 10, jnp.float32)
  got = tr.reduce_lora_partials(parts, jnp.bfloat16)
  want = np.asarray(parts[0])
  for c in range(1, 5):
    want = (want + np.asarray(parts[c])).astype(np.float32)
  assert got.dtype == jnp.bfloat16 and got.shape == (48, 32)
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                want.astype(ml_dtypes.bfloat16).astype(np.float32))
  with pytest.raises(ValueError, match=r"float32 \[chunks, m_pad, rank_pad\]"):
    tr.reduce_lora_partials(parts[0], jnp.bfloat16)


def test_gemm_takes_reduced_lora_act_or_partials_with_identical_output():
  """Kernel 2 reads ``lora_act [m_pad, rank_pad]`` (activation dtype); kernel 1's partials are
  reduced to it first. Both routes give the same bits; a wrong shape or dtype is named."""
  rng = np.random.default_rng(8)
  m, k, n = 40, 320, 72  # K/64 = 5 groups: the step of 2 becomes 1
  params = random_layer(rng, k, n, 24, dtype=jnp.bfloat16)
  x = random_activations(rng, m, k, jnp.bfloat16)
  cfg = tuning.triton_config(m, n, k, interpret=True)
  m_pad = tr.padded_rows(m, cfg)
  codes, scales, parts = tr.quantize_activations(x, params, cfg.quantize, m_pad=m_pad, interpret=True)
  lora_act = tr.reduce_lora_partials(parts, jnp.bfloat16)
  y2 = tr.gemm(codes, scales, lora_act, params, m, jnp.bfloat16, cfg.gemm, interpret=True)
  y3 = tr.gemm(codes, scales, parts, params, m, jnp.bfloat16, cfg.gemm, interpret=True)
  np.testing.assert_array_equal(np.asarray(y2, np.float32), np.asarray(y3, np.float32))
  assert relative_error(y2, reference.svdquant_linear_reference(x, params)) < 1e-3
  with pytest.raises(ValueError, match=rf"lora_act must be bfloat16 \[{m_pad}, 32\].*got float32"):
    tr.gemm(codes, scales, lora_act.astype(jnp.float32), params, m, jnp.bfloat16, cfg.gemm, interpret=True)


def test_prepared_lowrank_factors_cost_no_op_per_call_and_change_no_bit():
  """``prepare_params`` pads/casts the factors once; calls then emit no pad or convert for them
  (nor do rank-32 factors already in the activation dtype), and the output is bit-identical."""
  rng = np.random.default_rng(9)
  params = random_layer(rng, 128, 48, 24, dtype=jnp.float32)
  prepared = tr.prepare_params(params, jnp.bfloat16)
  assert prepared.rank == 32 and prepared.lora_down.dtype == jnp.bfloat16
  assert not np.asarray(prepared.lora_down[:, 24:], np.float32).any() and not np.asarray(prepared.lora_up[24:]).any()

  def prims(p):
    jaxpr = jax.make_jaxpr(lambda q: tr.lowrank_factors(q, jnp.bfloat16))(p)
    return [e.primitive.name for e in jaxpr.jaxpr.eqns]

  assert prims(params) and not prims(prepared)
  assert not prims(random_layer(rng, 128, 48, 32, dtype=jnp.bfloat16))
  x = random_activations(rng, 20, 128, jnp.bfloat16)
  y = tr.svdquant_linear_triton(x, params, interpret=True)
  np.testing.assert_array_equal(np.asarray(tr.svdquant_linear_triton(x, prepared, interpret=True), np.float32),
                                np.asarray(y, np.float32))


def test_float32_activations_get_a_kernel1_tile_that_fits_the_registers():
  base = tuning.TRITON_TABLE[("h100", "large")]
  f32 = tuning.for_dtype(base, jnp.float32)
  assert f32.quantize.num_warps == tuning.FLOAT32_QUANTIZE_WARPS > base.quantize.num_warps
  assert f32.gemm == base.gemm and tuning.for_dtype(base, jnp.bfloat16) is base


# ============================================================================= packing
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("layout", ["KN", "NK"])
def test_pack_unpack_exhaustive_over_all_nibbles(signed, layout):
  values = np.arange(-8, 8) if signed else np.arange(16)
  # Every ordered pair of nibble values meets in one byte (low, high) at every byte column of
  # both 32-byte halves of two pack blocks: rows x = all 256 (low, high) combinations.
  lo, hi = np.meshgrid(values, values, indexing="ij")
  pairs = np.stack([lo.ravel(), hi.ravel()], axis=1)  # [256, 2]
  k = 128
  codes_nk = np.zeros((256, k), np.int64)
  for b in range(k // 64):
    for j in range(32):
      shift = (j + 7 * b) % 256  # different pairs at different columns
      codes_nk[:, 64 * b + j] = np.roll(pairs[:, 0], shift)
      codes_nk[:, 64 * b + 32 + j] = np.roll(pairs[:, 1], shift)
  dtype = jnp.int8 if signed else jnp.uint8
  codes = jnp.asarray(codes_nk if layout == "NK" else codes_nk.T, dtype)
  packed = packing.pack(codes, layout=layout, signed=signed)
  assert packed.shape == (256, k // 2) and packed.dtype == jnp.uint8
  # Each byte: low nibble = channel 64b + j, high nibble = channel 64b + 32 + j (two's complement).
  p = np.asarray(packed)
  for b in range(k // 64):
    for j in range(32):
      byte = p[:, 32 * b + j].astype(np.int64)
      np.testing.assert_array_equal(byte & 0xF, codes_nk[:, 64 * b + j] & 0xF)
      np.testing.assert_array_equal(byte >> 4, codes_nk[:, 64 * b + 32 + j] & 0xF)
  assert len(np.unique(p)) == 256
  back = packing.unpack(packed, layout=layout, signed=signed)
  assert back.dtype == dtype
  np.testing.assert_array_equal(np.asarray(back), np.asarray(codes))


def test_pack_worked_example_from_docs():
  """The example in docs/kernels.md: channel j of a row holds code (j % 16) - 8."""
  codes = (np.arange(64) % 16 - 8).astype(np.int8)[None, :]   # one output row, K = 64
  packed = np.asarray(packing.pack(jnp.asarray(codes), layout="NK"))
  # byte 0: low = channel 0 (-8 -> 0x8), high = channel 32 (32 % 16 - 8 = -8 -> 0x8) -> 0x88
  # byte 5: low = channel 5 (-3 -> 0xD), high = channel 37 (-3 -> 0xD) -> 0xDD
  # byte 9: low = channel 9 (1), high = channel 41 (1) -> 0x11
  assert packed[0, 0] == 0x88 and packed[0, 5] == 0xDD and packed[0, 9] == 0x11
  codes2 = np.zeros((1, 64), np.int8)
  codes2[0, 3], codes2[0, 35] = 7, -7   # byte 3 = 0x97
  assert np.asarray(packing.pack(jnp.asarray(codes2), layout="NK"))[0, 3] == 0x97


def test_pack_rejects_bad_codes():
  with pytest.raises(packing.QuantizedLinearError, match="K=96"):
    packing.pack_int4(jnp.zeros((2, 96), jnp.int8))
  with pytest.raises(packing.QuantizedLinearError, match="range"):
    packing.pack_int4(jnp.full((1, 64), 8, jnp.int8))
  with pytest.raises(packing.QuantizedLinearError, match="range"):
    packing.pack_int4(jnp.full((1, 64), -1, jnp.int8), signed=False)
  with pytest.raises(packing.QuantizedLinearError, match="integers"):
    packing.pack_int4(jnp.zeros((1, 64), jnp.float32))
  with pytest.raises(packing.QuantizedLinearError, match="layout"):
    packing.pack(jnp.zeros((64, 4), jnp.int8), layout="MN")


# ============================================================================= constructors
@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "int8"])
def test_from_float_matches_the_quantizers_and_folds_the_formula(fmt):
  rng = np.random.default_rng(3)
  k, n, r = 128, 40, 8
  shift = q.GELU_SHIFT if fmt == "int4" else 0.0
  w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32)
  b = jnp.asarray(rng.standard_normal(n), jnp.float32)
  lam = jnp.asarray(np.exp(rng.uniform(-1, 1, k)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.float32)
  bb = jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.float32)
  residual64 = np.asarray(lam, np.float64)[:, None] * np.asarray(w, np.float64) - np.asarray(a, np.float64) @ np.asarray(bb, np.float64)
  residual = jnp.asarray(residual64, jnp.float32)
  # from_components holds exactly the quantizers' codes and scales of the given residual.
  p = packing.from_components(lam, a, bb, b, residual=residual, fmt=fmt, shift=shift)
  if fmt == "int4":
    codes, scales = q.quantize_int4_weight(residual, 64, scale_dtype=jnp.float32)
    deq = q.dequantize_int4_weight(codes, scales)
    step = np.repeat(np.asarray(scales), 64, axis=0)
  elif fmt == "nvfp4":
    wq = q.quantize_nvfp4_weight(residual)
    codes, scales, deq = wq.codes, wq.scales, q.dequantize_nvfp4_weight(wq)
    step = 2.0 * np.repeat(np.asarray(wq.tensor_scale * scales.astype(jnp.float32)), 16, axis=0)  # E2M1 gap <= 2
  else:
    codes, scales = q.quantize_int8_weight(residual)
    deq = codes.astype(jnp.float32) * scales
    step = np.broadcast_to(np.asarray(scales), (k, n))
  # from_float forms R = diag(λ) W - A B itself (float32): Qw(R) is within half a step of R.
  pf = packing.from_float(w, b, lam, a, bb, fmt=fmt, shift=shift)
  assert np.all(np.abs(np.asarray(pf.dequantized_weight(), np.float64) - residual64) <= 0.5 * step * (1 + 1e-5) + 1e-6)
  np.testing.assert_array_equal(np.asarray(p.weight_codes()), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(p.wscales, np.float32), np.asarray(scales, np.float32).reshape(p.wscales.shape))
  np.testing.assert_array_equal(np.asarray(p.dequantized_weight()), np.asarray(deq))
  np.testing.assert_allclose(np.asarray(p.lora_down), np.asarray(a) / np.asarray(lam)[:, None], rtol=1e-6)
  # host-side float64 deployment constants, rounded once: A/λ and b - Σ_k (δ/λ_k) Qw(R)[k, :]
  np.testing.assert_array_equal(np.asarray(p.lora_down),
                                (np.asarray(a, np.float64) / np.asarray(lam, np.float64)[:, None]).astype(np.float32))
  b_eff = np.asarray(b, np.float64)
  if shift:  # int4: Qw(R) exactly, codes times the scales in float64
    deq64 = np.asarray(codes, np.float64) * np.repeat(np.asarray(scales, np.float64), 64, axis=0)
    b_eff = b_eff - (shift / np.asarray(lam, np.float64)) @ deq64
  np.testing.assert_array_equal(np.asarray(p.bias), b_eff.astype(np.float32))
  assert p.group_size == {"int4": 64, "nvfp4": 16, "int8": k}[fmt] and p.rank == r and p.act_unsigned == (shift > 0)


def test_quantized_linear_is_a_pytree_with_static_format():
  p = random_layer(np.random.default_rng(0), 64, 32, 16, shift=q.GELU_SHIFT)
  leaves, tree = jax.tree_util.tree_flatten(p)
  assert len(leaves) == 6  # qweight, wscales, smooth, lora_down, lora_up, bias (wtscale is None)
  back = jax.tree_util.tree_unflatten(tree, leaves)
  assert back.fmt == "int4" and back.shift == q.GELU_SHIFT and back.group_size == 64


def test_from_components_errors():
  k, n = 64, 16
  z = lambda *s: jnp.zeros(s, jnp.float32)
  with pytest.raises(packing.QuantizedLinearError, match="unknown format"):
    packing.from_components(z(k) + 1, z(k, 2), z(2, n), residual=z(k, n), fmt="int3")
  with pytest.raises(packing.QuantizedLinearError, match="exactly one"):
    packing.from_components(z(k) + 1, z(k, 2), z(2, n))
  with pytest.raises(packing.QuantizedLinearError, match="int4 only"):
    packing.from_components(z(k) + 1, z(k, 2), z(2, n), residual=z(k, n), fmt="int8", shift=q.GELU_SHIFT)
  with pytest.raises(packing.QuantizedLinearError, match="not a multiple of 64"):
    packing.from_components(z(96) + 1, z(96, 2), z(2, n), residual=z(96, n), fmt="int4", group_size=32)


# ============================================================================= reference
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
def test_reference_activation_quantization_is_ieee_float32(unsigned):
  """Reference kernel 1 (jitted, as the op runs) against numpy float32 (spec §3.1): ``x + δ``
  rounded to bf16, the IEEE quotient by λ rounded to bf16, ``s = absmax · fl(1/qmax)``, codes
  ``rint(x̃ · fl(1/s))`` (half to even), scales rounded to bf16. The first rows are built on
  power-of-two λ with group absmax 14 (s = 2): exact .5 ties."""
  rng = np.random.default_rng(8 + unsigned)
  m, k = 256, 256
  shift = q.GELU_SHIFT if unsigned else 0.0
  params = random_layer(rng, k, 16, 8, shift=shift)
  params = params.replace(smooth=jnp.asarray(np.exp2(rng.integers(-2, 3, k)), jnp.bfloat16))
  x = np.asarray(random_activations(rng, m, k, jnp.bfloat16, gelu=unsigned), np.float32)
  if not unsigned:
    ints = rng.integers(-13, 14, (8, k)).astype(np.float32)
    ints[:, ::64] = 14.0
    x[:8] = ints * np.asarray(params.smooth, np.float32)
  x = jnp.asarray(x, jnp.bfloat16)
  acts = jax.jit(reference.quantize_activations)(x, params)
  bf16 = lambda v: v.astype(ml_dtypes.bfloat16).astype(np.float32)
  xs = np.asarray(x, np.float32)
  if unsigned:
    xs = bf16(xs + np.float32(shift))
  xs = bf16(xs / np.asarray(params.smooth, np.float32))
  codes, scales, v = np_int4_act(xs, 64, unsigned, ml_dtypes.bfloat16)
  if not unsigned:
    assert np.sum(np.abs(v - np.trunc(v)) == 0.5) > 100, "the data should contain exact ties"
  np.testing.assert_array_equal(np.asarray(acts.scales, np.float32), scales.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(acts.codes), codes)
  np.testing.assert_allclose(np.asarray(acts.lora_act),
                             np.asarray(x, np.float64) @ np.asarray(params.lora_down, np.float64), rtol=1e-5, atol=1e-6)


def _float64_formula(x, params, acts):
  """``Qa(x̂)·Qw(R) + (x·lora_down)·lora_up + b_eff`` in float64 from the dequantized codes."""
  if params.fmt == "int4":
    qa = q.dequantize_act(acts.codes, acts.scales)
  elif params.fmt == "nvfp4":
    qa = q.dequantize_nvfp4_act(acts.codes, acts.scales)
  else:
    qa = acts.codes.astype(jnp.float32) * acts.scales.astype(jnp.float32)
  f64 = lambda v: np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64)
  y = f64(qa) @ f64(params.dequantized_weight())
  if params.rank:
    y += (f64(x) @ f64(params.lora_down)) @ f64(params.lora_up)
  if params.bias is not None:
    y += f64(params.bias)
  return y


@pytest.mark.parametrize("fmt,shift,dtype,rtol", [
    ("int4", 0.0, jnp.bfloat16, 5e-3), ("int4", q.GELU_SHIFT, jnp.float16, 1e-3), ("int4", 0.0, jnp.float32, 1e-6),
    ("nvfp4", 0.0, jnp.bfloat16, 5e-3), ("int8", 0.0, jnp.float32, 1e-6)])
def test_reference_matches_float64_formula(fmt, shift, dtype, rtol):
  """The reference op against a float64 numpy evaluation of the canonical formula with the
  dequantized codes; the only differences are float32 accumulation, rounding ``lora_act`` to the
  activation dtype before its up-projection, and the output rounding (bf16 2^-9, fp16 2^-12)."""
  rng = np.random.default_rng(21)
  params = random_layer(rng, 192, 72, 16, fmt=fmt, shift=shift, dtype=dtype)
  x = random_activations(rng, 40, 192, dtype, gelu=shift > 0)
  acts = jax.jit(reference.quantize_activations)(x, params)
  want = _float64_formula(x, params, acts)
  got = jax.jit(reference.svdquant_linear_reference)(x, params)
  assert got.dtype == dtype
  err = relative_error(got, want)
  assert err <= rtol, f"relative error {err:.3e}"


def test_reference_is_exact_on_int4_group_sums():
  p = random_layer(np.random.default_rng(4), 128, 24, 0)
  x = random_activations(np.random.default_rng(5), 10, 128, jnp.bfloat16)
  acts = jax.jit(reference.quantize_activations)(x, p)
  sums = jax.jit(reference.group_sums, static_argnums=2)(acts.codes, p.weight_codes(), 64)
  want = np.einsum("mgk,gkn->gmn", np.asarray(acts.codes, np.int64).reshape(10, 2, 64),
                   np.asarray(p.weight_codes(), np.int64).reshape(2, 64, 24))
  assert sums.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(sums), want)


# ============================================================================= registry, bad input
@pytest.fixture
def fresh_warnings():
  registry._WARNED.clear()
  yield
  registry._WARNED.clear()


def _warnings(caplog):
  return [r for r in caplog.records if "falling back to the reference" in r.getMessage()]


def test_registry_falls_back_to_reference_once_per_reason(caplog, fresh_warnings):
  p = random_layer(np.random.default_rng(1), 64, 32, 16)
  x = random_activations(np.random.default_rng(2), 4, 64, jnp.bfloat16)
  want = jax.jit(reference.svdquant_linear_reference)(x, p)
  on_cpu_only = jax.default_backend() == "cpu"
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      y = svdquant_linear(x, p)
      if on_cpu_only:  # the reference ran
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
      else:  # a GPU kernel ran
        assert relative_error(y, want) <= 1e-2
    if on_cpu_only:
      assert len(_warnings(caplog)) == 1 and "triton" in _warnings(caplog)[0].getMessage()
      # A different reason (format) is logged once more.
      pn = random_layer(np.random.default_rng(1), 64, 32, 16, fmt="nvfp4")
      svdquant_linear(x, pn)
      svdquant_linear(x, pn)
      assert len(_warnings(caplog)) == 2 and "nvfp4" in _warnings(caplog)[1].getMessage()


def test_registry_explicit_backend_raises_with_reason():
  p = random_layer(np.random.default_rng(1), 64, 32, 16, fmt="int8")
  x = random_activations(np.random.default_rng(2), 4, 64, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="int8"):
    svdquant_linear(x, p, backend="triton", interpret=True)
  if jax.default_backend() == "cpu":
    p4 = random_layer(np.random.default_rng(1), 64, 32, 16)
    with pytest.raises(NotImplementedError, match="NVIDIA GPU"):
      svdquant_linear(x, p4, backend="triton")
  with pytest.raises(ValueError, match="unknown backend"):
    svdquant_linear(x, p, backend="cuda")
  names = [b.name for b in registry.registered_backends()]
  assert names.index("triton") < names.index("reference")


def test_bad_inputs_are_rejected_before_launch():
  p = random_layer(np.random.default_rng(1), 128, 32, 16)
  x = random_activations(np.random.default_rng(2), 4, 128, jnp.bfloat16)
  with pytest.raises(packing.QuantizedLinearError, match="K=128"):
    svdquant_linear(x[:, :64], p)
  with pytest.raises(packing.QuantizedLinearError, match="dtype int32"):
    svdquant_linear(x.astype(jnp.int32), p)
  with pytest.raises(packing.QuantizedLinearError, match="unknown format"):
    svdquant_linear(x, p.replace(fmt="int3"))
  with pytest.raises(packing.QuantizedLinearError, match="qweight"):
    svdquant_linear(x, p.replace(qweight=p.qweight[:, :-1]))
  with pytest.raises(packing.QuantizedLinearError, match="wscales"):
    svdquant_linear(x, p.replace(wscales=p.wscales.astype(jnp.int32)))
  with pytest.raises(packing.QuantizedLinearError, match="lora_up"):
    svdquant_linear(x, p.replace(lora_up=p.lora_up[:, :-1]))
  with pytest.raises(packing.QuantizedLinearError, match="QuantizedLinear"):
    svdquant_linear(x, {"qweight": p.qweight})
  # K not divisible by 64: a hand-made int4 layer with K = 96 (group 32).
  bad = packing.QuantizedLinear(qweight=jnp.zeros((8, 48), jnp.uint8), wscales=jnp.ones((3, 8), jnp.float32),
                                smooth=jnp.ones(96), lora_down=jnp.zeros((96, 0)), lora_up=jnp.zeros((0, 8)),
                                fmt="int4", group_size=32)
  with pytest.raises(packing.QuantizedLinearError, match="K=96 is not a multiple of 64"):
    svdquant_linear(jnp.ones((2, 96), jnp.bfloat16), bad)
  with pytest.raises(packing.QuantizedLinearError, match="K=96"):
    tr.svdquant_linear_triton(jnp.ones((2, 96), jnp.bfloat16), bad, interpret=True)
