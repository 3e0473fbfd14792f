"""Mosaic GPU (Hopper) backend of the SVDQuant INT4 GEMM (kernel 2 of ``docs/kernels.md``).

One CTA per ``block_m x block_n`` output tile (grid: M tiles x N tiles), in one of two forms
(``MosaicTile.compute_wgs``):

* 1: one warpgroup issues the TMA loads and computes (``plgpu.emit_pipeline``);
* 2: warp specialized (``plgpu.emit_pipeline_warp_specialized``): a memory warpgroup (40
  registers) issues every TMA load, two compute warpgroups each own ``block_m / 2`` rows of the
  tile (their own accumulators, rescale and epilogue) and consume every pipeline stage, so that
  the per-group rescale of one overlaps the ``wgmma`` of the other on the SM.

The K axis is a TMA pipeline (``max_concurrent_steps`` buffers) over the 64-wide quantization
groups; per group it brings into shared memory

* the activation codes ``int8 [block_m, 64]`` and the K-major weight codes ``int8 [block_n, 64]``
  (swizzled: one 64-byte row per token / channel),
* the group's activation scales ``float32 [1, block_m]`` and weight scales ``float32 [1, block_n]``,

issues one int8 ``wgmma`` into a fresh ``int32`` accumulator (the exact group dot), and rescales
it into the float32 register accumulator: ``acc += f32(psum) · s_x[:, g] · s_w[g, :]``, groups in
order, as :func:`reference.gemm` does. The epilogue multiplies by ``wcscales[n]`` (when present),
adds ``cast(lora_act) · lora_up`` (a 16-bit ``wgmma`` into a float32 accumulator), adds the bias,
rounds once to the activation dtype and stores the tile (SMEM -> TMA).

Inputs are the *unpacked* int8 codes: the wrapper unpacks the 4-bit weight to ``int8 [N, K]``
(K-major, as 8-bit ``wgmma`` wants both operands) and pads M, N to the tile (padding rows and
columns are zero and are sliced off). Activations come from kernel 1 of the reference or of the
Triton backend.

Numerics: the group dots are exact int32; the float32 rescale and group order match the reference,
so power-of-two scales give bit-exact outputs. The low-rank product runs on the 16-bit tensor cores
(float32 accumulation): float32 activations with rank > 0 are refused (it would be TF32).

Relies on the Pallas Mosaic GPU API of jax 0.10.2 (``plgpu.emit_pipeline``,
``plgpu.emit_pipeline_warp_specialized`` with ``compute_context``, ``plgpu.ACC``,
``plgpu.transpose_ref``, ``Layout.WGMMA.reduce``); the CPU tests run it in the GPU interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from svdquant_jax.formats.packing import PACK_BLOCK, QuantizedLinear, check_inputs
from svdquant_jax.pallas import reference, tuning

try:
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  _IMPORT_ERROR: str | None = None
except ImportError as e:  # pragma: no cover - depends on the installed jax
  pl = plgpu = None
  _IMPORT_ERROR = f"Pallas Mosaic GPU is not available in jax {jax.__version__}: {e}"

Array = jax.Array
NAME = "mosaic_gpu"
MAX_RANK = 128
GROUP = PACK_BLOCK  # 64-wide quantization groups = one pipeline step
# Registers per thread of the memory warpgroup in the warp-specialized kernel (it only issues TMA);
# the two compute warpgroups share the rest: (512 - 40) / 2 -> 232 each.
MEMORY_REGISTERS = 40


@dataclasses.dataclass(frozen=True)
class MosaicTile:
  """Tile of the Mosaic GPU GEMM.

  Attributes:
    block_m: rows per CTA, a multiple of 64 (one warpgroup's wgmma is 64 rows high).
    block_n: output channels per CTA, a multiple of 64 (<= 256, the wgmma N limit).
    max_concurrent_steps: TMA buffers in flight along K (>= 2 to overlap loads with compute).
    compute_wgs: 1 (one warpgroup computes and issues the TMA loads) or 2 (warp specialized: a
      memory warpgroup issues every TMA load, two compute warpgroups each own ``block_m / 2`` rows
      of the tile; ``block_m`` must then be a multiple of 128).
    packed_weight: TMA the packed 4-bit ``qweight`` (``uint8 [N, K/2]``) and split the nibbles in
      the kernel (each compute warpgroup into its own int8 SMEM stage), instead of the wrapper's
      int8 ``[N, K]`` copy (2x the weight bytes, made on every call).
    source: where the entry comes from.
  """
  block_m: int = 128
  block_n: int = 128
  max_concurrent_steps: int = 4
  compute_wgs: int = 1
  packed_weight: bool = False
  source: str = "unmeasured starting point"

  @property
  def name(self) -> str:
    wgs = f"w{self.compute_wgs}" if self.compute_wgs != 1 else ""
    packed = "p" if self.packed_weight else ""
    return f"mgpu{self.block_m}x{self.block_n}s{self.max_concurrent_steps}{wgs}{packed}"


# Device key (tuning.device_key) -> tile. None is measured on a GPU yet. 128 x 64: one warpgroup
# holds the float32 accumulator and the group's int32 accumulator in registers (64 + 64 per
# thread); 128 x 128 would need 256 and spill.
MOSAIC_TABLE: dict[str, MosaicTile] = {
    "h100": MosaicTile(128, 64, 4),
    "h200": MosaicTile(128, 64, 4, source="copied from h100 (same SM); unmeasured"),
    "nvidia": MosaicTile(128, 64, 3),
    # GPU interpreter (CPU tests): the smallest legal tile, so small shapes span several tiles.
    "interpret": MosaicTile(64, 64, 2, source="interpret mode (CPU tests)"),
}
# Every tile the tests lower for CUDA (shared memory and wgmma operand forms).
MOSAIC_CANDIDATES: tuple[MosaicTile, ...] = (
    MosaicTile(64, 64, 2), MosaicTile(128, 64, 4), MosaicTile(128, 128, 4), MosaicTile(64, 128, 4),
    MosaicTile(64, 256, 3), MosaicTile(128, 256, 3),
    # Warp specialized: each compute warpgroup owns block_m / 2 rows (64 x 128 per warpgroup is the
    # plan's ping-pong tile: 64 + 64 accumulator registers of the 232 each compute warpgroup gets).
    MosaicTile(128, 64, 4, 2), MosaicTile(128, 128, 4, 2), MosaicTile(256, 64, 4, 2), MosaicTile(128, 128, 3, 2),
    MosaicTile(128, 256, 3, 2),
    # The 4-bit weight unpacked in the kernel.
    MosaicTile(128, 64, 4, packed_weight=True), MosaicTile(64, 128, 4, packed_weight=True),
    MosaicTile(128, 128, 4, 2, packed_weight=True), MosaicTile(128, 64, 4, 2, packed_weight=True),
)


def mosaic_tile(*, interpret: bool = False, device: jax.Device | None = None) -> MosaicTile:
  key = "interpret" if interpret else tuning.device_key(device)
  return MOSAIC_TABLE.get(key, MOSAIC_TABLE["nvidia"])


def padded_rank(rank: int) -> int:
  """0, or the rank rounded up to a multiple of 64: 128-byte rows of 16-bit ``lora_act``, so that both
  operands of the epilogue wgmma share the 128-byte swizzle (wgmma requires equal swizzles)."""
  return 0 if rank == 0 else 64 * math.ceil(rank / 64)


def _round_up(v: int, m: int) -> int:
  return max(1, math.ceil(v / m)) * m


# ----------------------------------------------------------------------------- capability
def interpreter_ready() -> bool:
  """Whether the GPU interpreter can run the kernel here: jax 0.10.2's lacks a CPU rule for
  ``plgpu.layout_cast`` (``tests/mosaic_gpu_shim.py`` adds it, with the transposed wgmma operand)."""
  try:
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import core as gpu_core
    return gpu_core.layout_cast_p in mlir._platform_specific_lowerings.get("cpu", {})  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def check_supported(params: QuantizedLinear, x_dtype: Any, *, interpret: bool = False,
                    device: jax.Device | None = None) -> None:
  """Raises ``NotImplementedError`` (with the reason) if this backend cannot run the call.

  ``interpret=True`` asks for the GPU interpreter (CPU tests): the device is not checked.
  """
  if _IMPORT_ERROR:
    raise NotImplementedError(_IMPORT_ERROR)
  if params.fmt != "int4":
    raise NotImplementedError(f"mosaic_gpu: format {params.fmt!r} is unsupported here (int4 only)")
  if params.group_size != GROUP:
    raise NotImplementedError(f"mosaic_gpu: group size {params.group_size} (the kernel uses {GROUP})")
  if params.rank > MAX_RANK:
    raise NotImplementedError(f"mosaic_gpu: rank {params.rank} > {MAX_RANK}")
  dt = jnp.dtype(x_dtype)
  if dt not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
    raise NotImplementedError(f"mosaic_gpu: activation dtype {dt}")
  if dt == jnp.dtype(jnp.float32) and params.rank:
    raise NotImplementedError("mosaic_gpu: float32 activations with a low-rank branch (the 16-bit "
                              "wgmma of the epilogue would round lora_act to TF32)")
  if interpret:
    if not interpreter_ready():
      raise NotImplementedError("mosaic_gpu: jax's GPU interpreter cannot run this kernel as is (no CPU rule for "
                                "plgpu.layout_cast, no transposed wgmma operand); the tests install a shim")
    return
  device = jax.devices()[0] if device is None else device
  if tuning.device_key(device) not in ("h100", "h200", "nvidia"):
    raise NotImplementedError(f"mosaic_gpu: needs an NVIDIA Hopper GPU, the default device is "
                              f"{tuning.device_key(device)!r}")
  cc = getattr(device, "compute_capability", None)
  if cc is not None and float(cc) < 9.0:
    raise NotImplementedError(f"mosaic_gpu: wgmma needs compute capability >= 9.0, got {cc}")


# ----------------------------------------------------------------------------- kernel
def _smem_transforms(minor: int, dtype: Any) -> tuple:
  """Tiling + swizzle for a shared-memory wgmma operand whose minor dimension is ``minor``."""
  swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _unpack_nibbles(packed_smem, codes_smem) -> None:
  """``uint8 [n, 32]`` split-half bytes of one 64-group -> ``int8 [n, 64]`` signed codes in SMEM.

  Byte ``j`` holds channel ``j`` (low nibble) and ``32 + j`` (high nibble), so the two nibble
  planes are the two 32-byte halves of each row (tile-aligned with the 32-byte swizzle). Mosaic GPU
  has no 8-bit arithmetic: the sign extension is done on int32 (``<< 28 >> 28``, ``<< 24 >> 28``).
  """
  b = plgpu.layout_cast(packed_smem[...], plgpu.Layout.WGMMA_8BIT).astype(jnp.int32)
  half = packed_smem.shape[-1]
  codes_smem.at[:, pl.ds(0, half)][...] = lax.shift_right_arithmetic(lax.shift_left(b, 28), 28).astype(jnp.int8)
  codes_smem.at[:, pl.ds(half, half)][...] = lax.shift_right_arithmetic(lax.shift_left(b, 24), 28).astype(jnp.int8)
  plgpu.commit_smem()  # generic-proxy SMEM writes, read next by the async proxy (wgmma)


def _load_vector(ref, layout) -> Array:
  """A 1-D SMEM vector in the row/column layout of the wgmma accumulator (for broadcasts)."""
  return plgpu.layout_cast(ref[...], layout)


def _gemm_kernel(a_gmem, w_gmem, sa_gmem, sw_gmem, *refs, groups: int, block_m: int, block_n: int,
                 steps: int, rank_pad: int, has_cs: bool, out_dtype: Any, wgs: int, packed: bool):
  """One output tile. Every ref is in GMEM (the GPU interpreter takes no block specs):
  codes/scales go through the K pipeline; lora_act, lora_up, bias, wcscales are copied to SMEM by
  TMA while the pipeline runs, and the output tile leaves through SMEM by a TMA store.

  ``wgs == 1``: one warpgroup runs everything (``plgpu.emit_pipeline``). ``wgs == 2``: warp
  specialized (``plgpu.emit_pipeline_warp_specialized``); warpgroup 2 issues every TMA load (the
  pipeline's and the epilogue's), warpgroups 0 and 1 consume each pipeline stage and own the
  rows ``[wg·block_m/2, (wg+1)·block_m/2)`` of the tile: their own int32 and float32
  accumulators, rescales and epilogue, so the rescale of one overlaps the wgmma of the other.
  ``packed``: ``w_gmem`` is the packed ``uint8 [N, K/2]``; each compute warpgroup splits the
  group's bytes into its own int8 stage before its wgmma (32-byte swizzle for both operands).
  """
  refs = list(refs)
  lact_gmem = refs.pop(0) if rank_pad else None
  lup_gmem = refs.pop(0) if rank_pad else None
  bias_gmem = refs.pop(0)
  cs_gmem = refs.pop(0) if has_cs else None
  (o_gmem,) = refs
  # Named grid axes: the GPU interpreter of jax 0.10.2 returns 0 for every pl.program_id.
  pid_m, pid_n = lax.axis_index("m"), lax.axis_index("n")
  rows = pl.ds(pid_m * block_m, block_m)
  cols = pl.ds(pid_n * block_n, block_n)
  wg_m = block_m // wgs
  # The rows of the tile this compute warpgroup owns (all of them with one warpgroup).
  wg_rows = pl.ds(lax.axis_index("wg") * wg_m, wg_m) if wgs > 1 else slice(None)
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  shape = (wg_m, block_n)

  def group_step(_, a_smem, w_smem, sa_smem, sw_smem, acc, w_stage=None):
    if packed:
      _unpack_nibbles(w_smem, w_stage)
      w_smem = w_stage
    def int_dot(iacc):
      plgpu.wgmma(iacc, a_smem.at[wg_rows], plgpu.transpose_ref(w_smem, (1, 0)))
      return iacc[...]  # waits for the wgmma: the stages may be overwritten after this
    psum = pl.run_scoped(int_dot, plgpu.ACC(shape, jnp.int32))
    sa = _load_vector(sa_smem.at[0, wg_rows], row_layout)
    sw = _load_vector(sw_smem.at[0], col_layout)
    return acc + (psum.astype(jnp.float32) * lax.broadcast_in_dim(sa, shape, [0])
                  * lax.broadcast_in_dim(sw, shape, [1]))

  # wgmma wants equal swizzles on A and B: 32 bytes when B is built from 32-byte nibble planes.
  code_t = _smem_transforms(GROUP // 2 if packed else GROUP, jnp.int8)
  w_block = (block_n, GROUP // 2) if packed else (block_n, GROUP)
  in_specs = [
      plgpu.BlockSpec((block_m, GROUP), lambda g: (0, g), transforms=code_t),
      plgpu.BlockSpec(w_block, lambda g: (0, g), transforms=_smem_transforms(w_block[1], w_gmem.dtype)),
      plgpu.BlockSpec((1, block_m), lambda g: (g, 0)),
      plgpu.BlockSpec((1, block_n), lambda g: (g, 0)),
  ]
  pipe_srcs = (a_gmem.at[rows], w_gmem.at[cols], sa_gmem.at[:, rows], sw_gmem.at[:, cols])
  epi_srcs = [bias_gmem.at[cols]] + ([cs_gmem.at[cols]] if has_cs else [])
  epi_types = [plgpu.SMEM((block_n,), jnp.float32)] * len(epi_srcs)
  if rank_pad:
    epi_srcs += [lact_gmem.at[rows], lup_gmem.at[:, cols]]
    epi_types += [plgpu.SMEM((block_m, rank_pad), out_dtype, transforms=_smem_transforms(rank_pad, out_dtype)),
                  plgpu.SMEM((rank_pad, block_n), out_dtype, transforms=_smem_transforms(rank_pad, out_dtype))]

  def epilogue(acc, o_smem, barriers, epi_smem):
    """``acc`` float32 ``shape``: the K loop's result for this warpgroup's rows -> its output rows."""
    for i in range(len(epi_smem)):
      plgpu.barrier_wait(barriers.at[i])
    bias_smem = epi_smem[0]
    if has_cs:
      acc = acc * lax.broadcast_in_dim(_load_vector(epi_smem[1], col_layout), shape, [1])
    if rank_pad:
      lact_smem, lup_smem = epi_smem[-2:]
      def lora_dot(facc):
        plgpu.wgmma(facc, lact_smem.at[wg_rows], lup_smem)
        return facc[...]
      acc = acc + pl.run_scoped(lora_dot, plgpu.ACC(shape, jnp.float32))
    acc = acc + lax.broadcast_in_dim(_load_vector(bias_smem, col_layout), shape, [1])
    o_smem.at[wg_rows][...] = acc.astype(out_dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem.at[wg_rows], o_gmem.at[rows, cols].at[wg_rows])
    plgpu.wait_smem_to_gmem(0)

  def issue_epilogue_copies(barriers, epi_smem):
    for i, (src, dst) in enumerate(zip(epi_srcs, epi_smem)):  # overlap with the K loop
      plgpu.copy_gmem_to_smem(src, dst, barriers.at[i])

  def acc_init():
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)

  def scope(o_smem, barriers, w_stages, *epi_smem):
    if packed:  # this compute warpgroup's int8 weight stage
      body = lambda *args: group_step(*args, w_stage=w_stages.at[lax.axis_index("wg")] if wgs > 1 else w_stages)
    else:
      body = group_step
    if wgs == 1:
      issue_epilogue_copies(barriers, epi_smem)
      acc = plgpu.emit_pipeline(body, grid=(groups,), max_concurrent_steps=steps, init_carry=acc_init(),
                                in_specs=in_specs)(*pipe_srcs)
      epilogue(acc, o_smem, barriers, epi_smem)
      return
    pl.when(lax.axis_index("wg") == wgs)(lambda: issue_epilogue_copies(barriers, epi_smem))
    plgpu.emit_pipeline_warp_specialized(
        body, grid=(groups,), memory_registers=MEMORY_REGISTERS, in_specs=in_specs, wg_axis="wg",
        num_compute_wgs=wgs, max_concurrent_steps=steps,
        compute_context=lambda run: epilogue(run(acc_init()), o_smem, barriers, epi_smem),
    )(*pipe_srcs)

  stage_shape = ((wgs,) if wgs > 1 else ()) + (block_n, GROUP)
  w_stages = plgpu.SMEM(stage_shape, jnp.int8, transforms=code_t) if packed else None
  pl.run_scoped(scope, plgpu.SMEM((block_m, block_n), out_dtype), plgpu.Barrier(num_barriers=len(epi_srcs)),
                w_stages, *epi_types, **({"collective_axes": "wg"} if wgs > 1 else {}))


def gemm(codes: Array, scales: Array, lora_act: Array | None, params: QuantizedLinear, out_dtype: Any,
         tile: MosaicTile, *, interpret: Any = False) -> Array:
  """Kernel 2 on Mosaic GPU.

  Args:
    codes: ``int8 [M, K]`` activation codes (int4 values, [-8, 7] or [0, 15] when shifted).
    scales: ``[M, K/64]`` activation group scales (any float dtype; used as float32).
    lora_act: ``float32 [M, r]`` (``x · lora_down``) or ``None`` at rank 0.
    params: the int4 layer (``qweight`` packed, ``wscales [K/64, N]``, ``lora_up [r, N]``, bias,
      optional ``wcscales [N]``).
    out_dtype: the activation dtype.
    tile: the CTA tile.
    interpret: ``False`` (compile for the GPU) or an ``InterpretGPUParams`` (GPU interpreter).

  Returns:
    ``[M, N]`` in ``out_dtype``.
  """
  m, k = codes.shape
  n = params.out_features
  if k != params.in_features or scales.shape != (m, k // GROUP):
    raise ValueError(f"mosaic_gpu.gemm: codes {codes.shape} / scales {scales.shape} do not match the layer "
                     f"(K={params.in_features}, group {GROUP})")
  if tile.compute_wgs not in (1, 2) or tile.block_m % (64 * tile.compute_wgs) or tile.block_n % 64 \
      or tile.block_n > 256:
    raise ValueError(f"mosaic_gpu.gemm: illegal tile {tile} (block_m a multiple of 64 x compute_wgs, "
                     f"compute_wgs 1 or 2, block_n a multiple of 64 up to 256)")
  if params.rank and lora_act is None:
    raise ValueError("mosaic_gpu.gemm: a rank > 0 layer needs lora_act")
  groups = k // GROUP
  m_pad, n_pad = _round_up(m, tile.block_m), _round_up(n, tile.block_n)
  out_dtype = jnp.dtype(out_dtype)
  pad_m = lambda v: jnp.pad(v, ((0, m_pad - m), (0, 0)))
  pad_n = lambda v: jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, n_pad - n)])
  if tile.packed_weight:
    w = params.qweight  # uint8 [N, K/2], split-half nibbles (docs/kernels.md)
    if w.shape != (n, k // 2) or w.dtype != jnp.uint8:
      raise ValueError(f"mosaic_gpu.gemm: qweight {w.shape} {w.dtype}, expected uint8 {(n, k // 2)}")
  else:
    w = params.weight_codes().astype(jnp.int8).T  # [N, K], K-major
  inputs = [pad_m(codes.astype(jnp.int8)), jnp.pad(w, ((0, n_pad - n), (0, 0))),
            pad_n(pad_m(scales.astype(jnp.float32)).T), pad_n(params.wscales.astype(jnp.float32))]
  rank_pad = padded_rank(params.rank)
  if rank_pad:
    inputs += [jnp.pad(lora_act.astype(out_dtype), ((0, m_pad - m), (0, rank_pad - params.rank))),
               jnp.pad(params.lora_up.astype(out_dtype), ((0, rank_pad - params.rank), (0, n_pad - n)))]
  bias = params.bias if params.bias is not None else jnp.zeros((n,), jnp.float32)
  inputs.append(pad_n(bias.astype(jnp.float32)))
  has_cs = params.wcscales is not None
  if has_cs:
    inputs.append(pad_n(params.wcscales.astype(jnp.float32)))
  kernel = functools.partial(
      _gemm_kernel, groups=groups, block_m=tile.block_m, block_n=tile.block_n, steps=tile.max_concurrent_steps,
      rank_pad=rank_pad, has_cs=has_cs, out_dtype=out_dtype, wgs=tile.compute_wgs, packed=tile.packed_weight)
  threads = {} if tile.compute_wgs == 1 else {"num_threads": tile.compute_wgs + 1, "thread_name": "wg"}
  out = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
      grid=(m_pad // tile.block_m, n_pad // tile.block_n), grid_names=("m", "n"),
      interpret=interpret or None, **threads)(*inputs)
  return out[:m, :n]


# ----------------------------------------------------------------------------- the op
def svdquant_linear_mosaic_gpu(x: Array, params: QuantizedLinear, *, tile: MosaicTile | None = None,
                               interpret: Any = False) -> Array:
  """The fused SVDQuant linear: kernel 1 of the reference (jnp), kernel 2 on Mosaic GPU.

  ``x [..., K] -> [..., N]`` in ``x.dtype``. ``interpret``: ``False``, ``True`` (the default
  ``InterpretGPUParams``) or an ``InterpretGPUParams``.

  Raises:
    QuantizedLinearError: bad inputs. NotImplementedError: a call this backend cannot take.
  """
  check_inputs(x, params)
  check_supported(params, x.dtype, interpret=bool(interpret))
  if interpret is True:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # private in jax 0.10/0.11
    interpret = InterpretGPUParams()
  lead = x.shape[:-1]
  x2 = x.reshape(-1, params.in_features)
  if x2.shape[0] == 0:
    return jnp.zeros((*lead, params.out_features), x.dtype)
  tile = mosaic_tile(interpret=bool(interpret)) if tile is None else tile
  acts = reference.quantize_activations(x2, params)
  y = gemm(acts.codes, acts.scales, acts.lora_act if params.rank else None, params, x.dtype, tile,
           interpret=interpret)
  return y.reshape(*lead, params.out_features)
