"""Pallas-Triton backend of the fused SVDQuant linear (INT4, group 64).

Kernel 1, :func:`quantize_activations` (grid: M tiles x K chunks). One read of ``x``: each
program takes ``block_m`` tokens and ``groups_per_program`` 64-wide groups; per group it loads
the two 32-channel halves of ``x`` (ref slices: Triton cannot slice values), adds δ and divides
by λ (``x̃ = (x + δ)/λ``, each step rounded to the activation dtype), takes the per-token absmax,
forms the float32 scale ``s = absmax · fl(1/qmax)`` and its reciprocal, writes ``s`` rounded to
the activation dtype and the codes ``rint(x̃ · fl(1/s))`` packed in the split-half nibble order
(one byte per channel pair ``(j, j + 32)``, no reshuffling), and accumulates ``x · lora_down``
(the raw ``x``) on the tensor cores in float32. Each K chunk writes its own float32 partial of
``lora_act``; :func:`reduce_lora_partials` sums them once (float32, chunk order) and rounds
once to the activation dtype. M is padded to the GEMM tile so that kernel 2 reads activations
unmasked.

Kernel 2, :func:`gemm` (a 1-D grid over the M x N tiles in the grouped order of
:func:`grouped_program_ids`). The accumulator starts as ``lora_act · lora_up`` (tensor cores, a
fresh accumulator: taking the live accumulator as the wgmma's C operand in the epilogue made
ptxas serialize every wgmma). Per 64-wide group: load 32 bytes per row of activations and of
the K-major weight, split the nibbles into int8 (sign-extended with ``(b << 4) >> 4`` /
``b >> 4``, or masked for the unsigned activations), two int8 x int8 -> int32 dots of depth 32
(low nibbles with low nibbles, high with high), then ``acc += f32(psum) · s_x[:, g] ·
s_w[g, :]``. ``groups_per_step`` (reduced to a divisor of K/64) groups per software-pipelined
loop step. Epilogue: ``acc · wcscales[n]`` (per-channel weight scales, when the layer has them;
the low-rank product then follows it instead of starting the accumulator), ``+ b_eff``, one
rounding, masked store (M and N edges).

Exactness: the codes and scales match the reference bit for bit, because both perform the
same IEEE float32 operations (:func:`reference.quantize_activations`: ``x + δ`` and the correctly
rounded division by λ, each rounded to the activation dtype, ``absmax · fl(1/qmax)``, the
correctly rounded reciprocal ``1/s`` and the product ``x̃ · (1/s)``, round half to even). On a
GPU the division and the rounding are single PTX instructions, ``div.rn.f32`` (Triton's float32
``/`` is the approximate ``div.full.f32``) and ``cvt.rni.s32.f32`` (Pallas-Triton has no
``round`` lowering). Inline assembly cannot run in interpret mode, which uses the quantizers'
correctly rounded division and ``jnp.round`` instead. The project's H100 measurements
(``docs/kernels.md`` §4.1) and the Triton lowering shaped the rest: K-major int8 operands, ref slicing, block_k >= 32 for integer
dots, signed int8 only (the Triton dot rejects unsigned integers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from svdquant_jax.pallas import reference, tuning
from svdquant_jax.formats.packing import HALF_BLOCK, PACK_BLOCK, QuantizedLinear, check_inputs
from svdquant_jax.formats.quantizers import INT4_MAX, UINT4_MAX, reciprocal

try:  # Pallas-Triton is deprecated from jax 0.11 (still present there); guard its import.
  from jax.experimental import pallas as pl
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as pltriton
  _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the installed jax
  pl = pltriton = None
  _IMPORT_ERROR = f"Pallas-Triton is not available in jax {jax.__version__}: {e}"

Array = jax.Array
NAME = "triton"
MAX_RANK = 128


def _dot(a: Array, b: Array, *, trans_b: bool = False, exact_f32: bool = False) -> Array:
  dot = getattr(pltriton, "dot", None) or pl.dot
  return dot(a, b, trans_b=trans_b, allow_tf32=False if exact_f32 else None)


def _asm(instruction: str, result_dtype: Any, constraints: str, *args: Any) -> Array:
  """One PTX instruction applied elementwise (operands broadcast to a common shape)."""
  args = jnp.broadcast_arrays(*[jnp.asarray(v, jnp.float32) for v in args])
  (out,) = pltriton.elementwise_inline_asm(
      instruction, args=list(args), constraints=constraints, pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, result_dtype)])
  return out


def _div(a: Array, b: Array, on_gpu: bool) -> Array:
  """Correctly rounded float32 division: ``div.rn.f32`` on a GPU; in interpret mode the
  quantizers' corrected division (XLA on CPU divides by a broadcast via the reciprocal)."""
  if on_gpu:
    return _asm("div.rn.f32 $0, $1, $2;", jnp.float32, "=f,f,f", a, b)
  a, b = jnp.broadcast_arrays(a, b)
  return reference.true_divide(a, b)


def _reciprocal(s: Array, on_gpu: bool) -> Array:
  """Correctly rounded float32 ``1/s`` for ``s >= 0``, 0 where ``s`` is 0 or ``1/s`` overflows
  (``quantizers.reciprocal``; ``div.rn.f32`` on a GPU)."""
  if not on_gpu:
    return reciprocal(s)
  ok = s > 0
  r = _div(jnp.ones_like(s), jnp.where(ok, s, jnp.float32(1)), on_gpu)
  return jnp.where(ok & (r < jnp.float32(np.inf)), r, jnp.float32(0))


def _round_to_int(v: Array, on_gpu: bool) -> Array:
  """Round half to even, as int32 (``cvt.rni.s32.f32``; ``jnp.round`` in interpret mode)."""
  if on_gpu:
    return _asm("cvt.rni.s32.f32 $0, $1;", jnp.int32, "=r,f", v)
  return jnp.round(v).astype(jnp.int32)


def _next_pow2(v: int) -> int:
  return 1 << max(0, (v - 1).bit_length())


def padded_rank(rank: int) -> int:
  """Rank as the kernels see it: 0, or a power of two >= 16 (Triton dot and arange limits)."""
  return 0 if rank == 0 else max(16, _next_pow2(rank))


def lowrank_factors(params: QuantizedLinear, dtype: Any) -> tuple[Array, Array]:
  """``(lora_down [K, rank_pad], lora_up [rank_pad, N])`` in ``dtype``, zero-padded to
  :func:`padded_rank`: what the kernels read. No op is emitted for factors that already have
  that shape and dtype (:func:`prepare_params` pads and casts once, ahead of the calls)."""
  rank, rank_pad = params.rank, padded_rank(params.rank)
  down, up = params.lora_down.astype(dtype), params.lora_up.astype(dtype)
  if rank_pad != rank:
    down = jnp.pad(down, ((0, 0), (0, rank_pad - rank)))
    up = jnp.pad(up, ((0, rank_pad - rank), (0, 0)))
  return down, up


def prepare_params(params: QuantizedLinear, dtype: Any) -> QuantizedLinear:
  """``params`` with the low-rank factors padded to :func:`padded_rank` with zeros and cast to
  the activation ``dtype``, so that calls in ``dtype`` pad and cast nothing (for a caller that
  holds a packed layer across many calls). The result computes the same function (the extra rank
  columns are zeros; outputs bit-identical on this backend); its ``rank`` is the padded one."""
  if params.rank == 0 or params.fmt != "int4":
    return params
  down, up = lowrank_factors(params, dtype)
  return dataclasses.replace(params, lora_down=down, lora_up=up)


def _largest_divisor_at_most(n: int, cap: int) -> int:
  return max(d for d in range(1, min(n, max(cap, 1)) + 1) if n % d == 0)


def _compiler_params(num_warps: int, num_stages: int) -> Any:
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------- capability
def check_supported(params: QuantizedLinear, x_dtype: Any, *, interpret: bool = False,
                    device: jax.Device | None = None) -> None:
  """Raises ``NotImplementedError`` (with the reason) if this backend cannot run the call."""
  if _IMPORT_ERROR:
    raise NotImplementedError(_IMPORT_ERROR)
  if params.fmt != "int4":
    raise NotImplementedError(f"triton: format {params.fmt!r} runs on the reference path (int4 only here)")
  if params.group_size != 64:
    raise NotImplementedError(f"triton: group size {params.group_size} (the kernels use 64)")
  if params.rank > MAX_RANK:
    raise NotImplementedError(f"triton: rank {params.rank} > {MAX_RANK}")
  if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
    raise NotImplementedError(f"triton: activation dtype {x_dtype}")
  if interpret:
    return
  device = jax.devices()[0] if device is None else device
  key = tuning.device_key(device)
  if key not in ("h100", "h200", "nvidia"):
    raise NotImplementedError(f"triton: needs an NVIDIA GPU, the default device is {key!r} "
                              "(interpret=True runs the kernels on CPU)")
  cc = getattr(device, "compute_capability", None)
  if cc is not None and float(cc) < 8.0:
    raise NotImplementedError(f"triton: int8 tensor-core dots need compute capability >= 8.0, got {cc}")


# ----------------------------------------------------------------------------- kernel 1
def _split_refs(refs: tuple, n_in: int, n_alias: int) -> tuple[tuple, tuple]:
  """Kernel refs -> (inputs, outputs); aliased output buffers (passed as trailing inputs so
  that callers can pre-fill, e.g. poison, the outputs) are dropped."""
  return refs[:n_in], refs[n_in + n_alias:]


def _quantize_kernel(*refs, n_in: int, n_alias: int, m: int, block_m: int, groups_per_program: int,
                     rank_pad: int, unsigned: bool, shift: float, on_gpu: bool, scale_dtype: Any):
  ins, outs = _split_refs(refs, n_in, n_alias)
  x_ref, smooth_ref = ins[:2]
  lora_down_ref = ins[2] if rank_pad else None
  codes_ref, scales_ref = outs[:2]
  lora_ref = outs[2] if rank_pad else None
  pid_m, pid_k = pl.program_id(0), pl.program_id(1)
  m0 = pid_m * block_m
  row_ok = (m0 + jnp.arange(block_m)) < m
  qmax = UINT4_MAX if unsigned else INT4_MAX
  qmin = 0 if unsigned else -INT4_MAX - 1
  inv_qmax = float(np.float32(1) / np.float32(qmax))  # fl(1/qmax), exactly representable in float32
  exact_f32 = x_ref.dtype == jnp.float32

  def group(i, lora_acc):
    g = pid_k * groups_per_program + i
    k0 = g * PACK_BLOCK
    halves, smoothed = [], []
    for h in range(2):
      cols = pl.ds(k0 + h * HALF_BLOCK, HALF_BLOCK)
      xh = pltriton.load(x_ref.at[pl.ds(m0, block_m), cols], mask=row_ok[:, None], other=0)
      smooth = smooth_ref[cols].astype(jnp.float32)[None, :]
      sh = xh.astype(jnp.float32)
      if shift:
        sh = (sh + jnp.float32(shift)).astype(x_ref.dtype).astype(jnp.float32)
      sh = _div(sh, smooth, on_gpu).astype(x_ref.dtype).astype(jnp.float32)
      halves.append(xh)
      smoothed.append(sh)
    amax = jnp.maximum(jnp.max(jnp.abs(smoothed[0]), axis=1), jnp.max(jnp.abs(smoothed[1]), axis=1))
    amax = jnp.where(row_ok, amax, jnp.float32(0))  # padding rows: scale 0, codes 0 (also when shifted)
    s = amax * jnp.float32(inv_qmax)
    scales_ref[g, pl.ds(m0, block_m)] = s.astype(scale_dtype)
    r = _reciprocal(s, on_gpu)[:, None]
    nibbles = [jnp.clip(_round_to_int(sh * r, on_gpu), qmin, qmax) & 0xF for sh in smoothed]
    codes_ref[pl.ds(m0, block_m), pl.ds(g * HALF_BLOCK, HALF_BLOCK)] = (
        nibbles[0] | (nibbles[1] << 4)).astype(jnp.uint8)
    if rank_pad:
      for h in range(2):
        ld = lora_down_ref[pl.ds(k0 + h * HALF_BLOCK, HALF_BLOCK), :]
        lora_acc = lora_acc + _dot(halves[h], ld, exact_f32=exact_f32)
    return lora_acc

  lora_acc = lax.fori_loop(0, groups_per_program, group, jnp.zeros((block_m, max(rank_pad, 1)), jnp.float32))
  if rank_pad:
    lora_ref[pid_k, pl.ds(m0, block_m), :] = lora_acc


def quantize_output_shapes(x: Array, params: QuantizedLinear, tile: tuning.QuantizeTile, m_pad: int
                           ) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of kernel 1's outputs (codes, scales[, lora partials]) for ``x [M, K]``."""
  k = x.shape[1]
  groups = k // PACK_BLOCK
  chunks = groups // _largest_divisor_at_most(groups, tile.groups_per_program)
  rank_pad = padded_rank(params.rank)
  shapes = [jax.ShapeDtypeStruct((m_pad, k // 2), jnp.uint8), jax.ShapeDtypeStruct((groups, m_pad), x.dtype)]
  if rank_pad:
    shapes.append(jax.ShapeDtypeStruct((chunks, m_pad, rank_pad), jnp.float32))
  return tuple(shapes)


def quantize_activations(x: Array, params: QuantizedLinear, tile: tuning.QuantizeTile, *, m_pad: int,
                         interpret: bool = False, outputs: tuple[Array, ...] | None = None
                         ) -> tuple[Array, Array, Array | None]:
  """Kernel 1: ``x [M, K]`` -> packed codes ``uint8 [m_pad, K/2]``, scales ``[K/64, m_pad]``
  (activation dtype; rows >= M hold zeros) and the ``x · lora_down`` partials
  ``float32 [chunks, m_pad, rank_pad]`` (``None`` at rank 0).

  ``outputs``: optional buffers (shapes from :func:`quantize_output_shapes`) that the kernel
  writes into (aliased); tests pass NaN / 0x88-filled ones to catch unwritten elements.
  """
  m, k = x.shape
  groups = k // PACK_BLOCK
  if m_pad % tile.block_m or m_pad < m:
    raise ValueError(f"m_pad={m_pad} must be >= M={m} and a multiple of block_m={tile.block_m}")
  gpp = _largest_divisor_at_most(groups, tile.groups_per_program)
  rank_pad = padded_rank(params.rank)
  out_shape = quantize_output_shapes(x, params, tile, m_pad)
  inputs = [x, params.smooth]
  if rank_pad:
    inputs.append(lowrank_factors(params, x.dtype)[0])
  n_in = len(inputs)
  aliases = {}
  if outputs is not None:
    if tuple((o.shape, o.dtype) for o in outputs) != tuple((o.shape, o.dtype) for o in out_shape):
      raise ValueError(f"quantize_activations: outputs must match {out_shape}")
    aliases = {n_in + i: i for i in range(len(outputs))}
    inputs += list(outputs)
  kernel = functools.partial(
      _quantize_kernel, n_in=n_in, n_alias=len(aliases), m=m, block_m=tile.block_m, groups_per_program=gpp,
      rank_pad=rank_pad, unsigned=params.act_unsigned, shift=float(params.shift), on_gpu=not interpret,
      scale_dtype=x.dtype)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(m_pad // tile.block_m, groups // gpp),
      input_output_aliases=aliases, compiler_params=_compiler_params(tile.num_warps, tile.num_stages),
      interpret=interpret, name="svdquant_quantize")(*inputs)
  return outs[0], outs[1], (outs[2] if rank_pad else None)


def reduce_lora_partials(parts: Array, dtype: Any) -> Array:
  """Kernel 1's ``float32 [chunks, m_pad, rank_pad]`` partials of ``x · lora_down`` ->
  ``lora_act [m_pad, rank_pad]`` in ``dtype``: summed once, in chunk order, in float32, then
  rounded once (the order and rounding the GEMM epilogue used when it summed them per N tile).
  One small XLA fusion: it reads ``chunks · m_pad · rank_pad · 4`` bytes once, instead of every
  GEMM program reading its rows of all the partials."""
  if parts.ndim != 3 or parts.dtype != jnp.float32:
    raise ValueError(f"reduce_lora_partials: expected float32 [chunks, m_pad, rank_pad], got {parts.dtype} "
                     f"{parts.shape}")
  total = parts[0]
  for c in range(1, parts.shape[0]):
    total = total + parts[c]
  return total.astype(dtype)


# ----------------------------------------------------------------------------- kernel 2
def _split_nibbles(packed: Array, signed: bool) -> tuple[Array, Array]:
  """``uint8 [r, 32]`` -> (low, high) nibbles as ``int8 [r, 32]``."""
  if signed:
    b = packed.astype(jnp.int8)
    return (b << 4) >> 4, b >> 4
  return (packed & 0xF).astype(jnp.int8), (packed >> 4).astype(jnp.int8)


def grouped_program_ids(pid: Array, grid_m: int, grid_n: int, group_m: int) -> tuple[Array, Array]:
  """L2-friendly launch order: linear program id -> ``(pid_m, pid_n)``. Consecutive programs
  walk ``group_m`` M tiles down one N column, then the next column, so that the programs in
  flight share ``group_m`` activation row blocks and a few weight column blocks (instead of one
  activation block and every weight block, as in row-major order). The last group may be shorter."""
  per_group = group_m * grid_n
  first_m = (pid // per_group) * group_m
  size = jnp.minimum(grid_m - first_m, group_m)
  within = pid % per_group
  return first_m + within % size, within // size


def _gemm_kernel(*refs, n_in: int, n_alias: int, m: int, n: int, groups: int, block_m: int, block_n: int,
                 groups_per_step: int, grid_m: int, grid_n: int, group_m: int, unsigned: bool, rank_pad: int,
                 has_channel_scales: bool, has_bias: bool, out_dtype: Any):
  ins, (o_ref,) = _split_refs(refs, n_in, n_alias)
  a_ref, sa_ref, w_ref, sw_ref = ins[:4]
  lora_ref, lora_up_ref = ins[4:6] if rank_pad else (None, None)
  cs_ref = ins[4 + 2 * bool(rank_pad)] if has_channel_scales else None
  bias_ref = ins[-1] if has_bias else None
  pid_m, pid_n = grouped_program_ids(pl.program_id(0), grid_m, grid_n, group_m)
  m0, n0 = pid_m * block_m, pid_n * block_n
  row_ok = (m0 + jnp.arange(block_m)) < m
  col_ok = (n0 + jnp.arange(block_n)) < n

  def lowrank():  # lora_act · lora_up (float32 accumulation, a fresh accumulator)
    lora_act = lora_ref[pl.ds(m0, block_m), :]
    lora_up = pltriton.load(lora_up_ref.at[:, pl.ds(n0, block_n)], mask=col_ok[None, :], other=0)
    return _dot(lora_act, lora_up, exact_f32=out_dtype == jnp.float32)

  def add_group(g, acc):
    kb = pl.ds(g * HALF_BLOCK, HALF_BLOCK)
    a_lo, a_hi = _split_nibbles(a_ref[pl.ds(m0, block_m), kb], signed=not unsigned)
    w_lo, w_hi = _split_nibbles(pltriton.load(w_ref.at[pl.ds(n0, block_n), kb], mask=col_ok[:, None], other=0),
                                signed=True)
    psum = _dot(a_lo, w_lo, trans_b=True) + _dot(a_hi, w_hi, trans_b=True)
    sa = sa_ref[g, pl.ds(m0, block_m)].astype(jnp.float32)
    sw = pltriton.load(sw_ref.at[g, pl.ds(n0, block_n)], mask=col_ok, other=0).astype(jnp.float32)
    return acc + psum.astype(jnp.float32) * sa[:, None] * sw[None, :]

  def step(s, acc):
    for i in range(groups_per_step):
      acc = add_group(s * groups_per_step + i, acc)
    return acc

  # Without per-channel scales the low-rank product starts the accumulator: its wgmma writes a
  # fresh accumulator before the K loop, instead of reading the live one in the epilogue (which
  # made ptxas serialize every wgmma of the kernel, C7514). With them it must follow the scaling.
  lora_first = rank_pad and not has_channel_scales
  acc = lowrank() if lora_first else jnp.zeros((block_m, block_n), jnp.float32)
  acc = lax.fori_loop(0, groups // groups_per_step, step, acc)
  if has_channel_scales:
    acc = acc * pltriton.load(cs_ref.at[pl.ds(n0, block_n)], mask=col_ok, other=0)[None, :]
  if rank_pad and not lora_first:
    acc = acc + lowrank()
  if has_bias:
    bias = pltriton.load(bias_ref.at[pl.ds(n0, block_n)], mask=col_ok, other=0)
    acc = acc + bias.astype(jnp.float32)[None, :]
  pltriton.store(o_ref.at[pl.ds(m0, block_m), pl.ds(n0, block_n)], acc.astype(out_dtype),
                 mask=row_ok[:, None] & col_ok[None, :])


def gemm(codes: Array, scales: Array, lora: Array | None, params: QuantizedLinear, m: int, out_dtype: Any,
         tile: tuning.GemmTile, *, interpret: bool = False, out: Array | None = None) -> Array:
  """Kernel 2: packed activations (from :func:`quantize_activations`) x packed weight.

  Args:
    codes: ``uint8 [m_pad, K/2]`` (``m_pad`` a multiple of ``tile.block_m``).
    scales: ``[K/64, m_pad]`` activation scales.
    lora: ``lora_act [m_pad, rank_pad]`` in ``out_dtype`` (:func:`reduce_lora_partials`), or
      kernel 1's ``float32 [chunks, m_pad, rank_pad]`` partials (reduced here), or ``None``
      (rank 0).
    m: the true number of rows (rows >= m are not written).
    out: optional ``[m, N]`` buffer the result is written into (aliased; tests poison it).

  Returns:
    ``[m, N]`` in ``out_dtype``.

  The K loop takes ``groups_per_step`` reduced to a divisor of K/64 (no static tail group,
  which spilled inside the loop); programs run in the grouped order of
  :func:`grouped_program_ids` (``tile.group_m`` M tiles per group).
  """
  m_pad, kb = codes.shape
  n = params.out_features
  groups = (2 * kb) // PACK_BLOCK
  out_dtype = jnp.dtype(out_dtype)
  if m_pad % tile.block_m:
    raise ValueError(f"gemm: {m_pad} activation rows are not a multiple of block_m={tile.block_m}")
  inputs = [codes, scales, params.qweight, params.wscales]
  rank_pad = padded_rank(params.rank)
  if rank_pad:
    if lora is None:
      raise ValueError("gemm: a rank > 0 layer needs lora_act (or kernel 1's partials)")
    if lora.ndim == 3:
      lora = reduce_lora_partials(lora, out_dtype)
    if lora.shape != (m_pad, rank_pad) or lora.dtype != out_dtype:
      raise ValueError(f"gemm: lora_act must be {out_dtype} [{m_pad}, {rank_pad}] (m_pad, padded rank of "
                       f"{params.rank}), got {lora.dtype} {lora.shape}")
    inputs += [lora, lowrank_factors(params, out_dtype)[1]]
  if params.wcscales is not None:
    inputs.append(params.wcscales.astype(jnp.float32))
  if params.bias is not None:
    inputs.append(params.bias)
  n_in = len(inputs)
  out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
  aliases = {}
  if out is not None:
    if (out.shape, out.dtype) != (out_shape.shape, out_shape.dtype):
      raise ValueError(f"gemm: out must be {out_shape}, got {out.dtype} {out.shape}")
    aliases = {n_in: 0}
    inputs.append(out)
  grid_m, grid_n = m_pad // tile.block_m, pl.cdiv(n, tile.block_n)
  kernel = functools.partial(
      _gemm_kernel, n_in=n_in, n_alias=len(aliases), m=m, n=n, groups=groups, block_m=tile.block_m,
      block_n=tile.block_n, groups_per_step=_largest_divisor_at_most(groups, tile.groups_per_step),
      grid_m=grid_m, grid_n=grid_n, group_m=max(1, tile.group_m), unsigned=params.act_unsigned,
      rank_pad=rank_pad, has_channel_scales=params.wcscales is not None, has_bias=params.bias is not None,
      out_dtype=out_dtype)
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid_m * grid_n,),
      input_output_aliases=aliases, compiler_params=_compiler_params(tile.num_warps, tile.num_stages),
      interpret=interpret, name="svdquant_gemm")(*inputs)


# ----------------------------------------------------------------------------- the op
def padded_rows(m: int, config: tuning.TritonConfig) -> int:
  align = max(config.quantize.block_m, config.gemm.block_m)
  return max(1, math.ceil(m / align)) * align


def svdquant_linear_triton(x: Array, params: QuantizedLinear, *, config: tuning.TritonConfig | None = None,
                           interpret: bool = False) -> Array:
  """The fused SVDQuant linear with the Pallas-Triton kernels: ``x [..., K] -> [..., N]``.

  Args:
    x: activations (bf16, fp16 or fp32).
    params: an int4 :class:`QuantizedLinear`.
    config: tiles; default from :func:`tuning.triton_config`.
    interpret: run the kernels in Pallas interpret mode (CPU).

  Raises:
    QuantizedLinearError: bad inputs. NotImplementedError: a call this backend cannot take.
  """
  check_inputs(x, params)
  check_supported(params, x.dtype, interpret=interpret)
  lead = x.shape[:-1]
  k, n = params.in_features, params.out_features
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  if m == 0:
    return jnp.zeros((*lead, n), x.dtype)
  config = tuning.triton_config(m, n, k, interpret=interpret, dtype=x.dtype) if config is None else config
  m_pad = padded_rows(m, config)
  codes, scales, lora_parts = quantize_activations(x2, params, config.quantize, m_pad=m_pad, interpret=interpret)
  lora_act = None if lora_parts is None else reduce_lora_partials(lora_parts, x.dtype)
  y = gemm(codes, scales, lora_act, params, m, x.dtype, config.gemm, interpret=interpret)
  return y.reshape(*lead, n)
