"""Per-device tile table for the Pallas kernels (tokamax-style: keyed by device and shape class).

The kernels never hard-code tiles: :func:`triton_config` looks them up here. Every entry says
where it comes from. As of 2026-11-24 **no entry has been measured with these kernels**:

* the H100 large-M GEMM tile is the block shape of the best tile of a Pallas-Triton int8 GEMM
  probe with the same per-(token, group) x per-(group, channel) scale scheme at the FLUX qkv
  shape (128 x 64, 2 groups per step, 4 stages), from the project's H100 measurements
  (``docs/kernels.md`` §4.1), with 8 warps instead of the probe's 4: with 4 warps this
  kernel needs all 255 registers per thread and spills (ptxas, ``docs/kernels.md`` §9); with
  8 it needs ~145 and spills nothing. The 8-warp timing is not measured;
* every other entry is an unmeasured starting point for ``launch/benchmark_kernels.py``,
  which sweeps :data:`TRITON_CANDIDATES` and prints the winners in this table's format.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Shape classes by the number of tokens M: text-stream / small batches vs image streams.
SMALL_M = 512
# Kernel-1 warps for float32 activations (see :func:`for_dtype`).
FLOAT32_QUANTIZE_WARPS = 8


@dataclasses.dataclass(frozen=True)
class QuantizeTile:
  """Kernel 1 (smooth + quantize + low-rank down-projection).

  Attributes:
    block_m: rows (tokens) per program; a power of two >= 16.
    groups_per_program: 64-wide K groups per program (the K axis is split over programs; each
      writes its own float32 partial of ``x · lora_down``). Reduced to a divisor of K/64.
    num_warps, num_stages: Triton launch parameters.
  """
  block_m: int = 32
  groups_per_program: int = 8
  num_warps: int = 4
  num_stages: int = 2


@dataclasses.dataclass(frozen=True)
class GemmTile:
  """Kernel 2 (W4A4 GEMM with group scales + low-rank up-projection + bias).

  Attributes:
    block_m, block_n: output tile; powers of two >= 16.
    groups_per_step: 64-wide K groups per software-pipelined loop step (block_k = 64 x this);
      reduced to a divisor of K/64 (no static tail).
    num_warps, num_stages: Triton launch parameters.
    group_m: M tiles per group of the grouped (L2-friendly) program order; 1 is row-major.
  """
  block_m: int = 128
  block_n: int = 64
  groups_per_step: int = 2
  num_warps: int = 4
  num_stages: int = 4
  group_m: int = 8


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  quantize: QuantizeTile
  gemm: GemmTile
  source: str = "unmeasured starting point"

  @property
  def name(self) -> str:
    qt, gt = self.quantize, self.gemm
    return (f"q{qt.block_m}x{qt.groups_per_program}w{qt.num_warps}s{qt.num_stages}-"
            f"g{gt.block_m}x{gt.block_n}u{gt.groups_per_step}w{gt.num_warps}s{gt.num_stages}m{gt.group_m}")


_MEASURED_QKV = ("docs/kernels.md §4.1: block shape of the best tile of a Pallas-Triton int8 GEMM with the same "
                 "group-scale scheme at FLUX qkv (699 us on an H100, 4 warps); 8 warps so that it fits the registers "
                 "(§9); not yet measured with this kernel")

# (device key, shape class) -> config. Device keys come from :func:`device_key`.
TRITON_TABLE: dict[tuple[str, str], TritonConfig] = {
    ("h100", "large"): TritonConfig(QuantizeTile(32, 8, 4, 2), GemmTile(128, 64, 2, 8, 4), _MEASURED_QKV),
    ("h100", "small"): TritonConfig(QuantizeTile(16, 8, 4, 2), GemmTile(64, 64, 2, 4, 4)),
    ("h200", "large"): TritonConfig(QuantizeTile(32, 8, 4, 2), GemmTile(128, 64, 2, 8, 4),
                                    "copied from h100 (same SM); unmeasured"),
    ("h200", "small"): TritonConfig(QuantizeTile(16, 8, 4, 2), GemmTile(64, 64, 2, 4, 4)),
    ("nvidia", "large"): TritonConfig(QuantizeTile(32, 8, 4, 2), GemmTile(128, 64, 2, 8, 3)),
    ("nvidia", "small"): TritonConfig(QuantizeTile(16, 8, 4, 2), GemmTile(64, 64, 2, 4, 3)),
    # CPU interpret mode (tests): small tiles so that small shapes still span several tiles.
    ("interpret", "large"): TritonConfig(QuantizeTile(16, 2, 4, 2), GemmTile(32, 32, 2, 4, 2),
                                         "interpret mode (CPU tests)"),
    ("interpret", "small"): TritonConfig(QuantizeTile(16, 2, 4, 2), GemmTile(32, 32, 2, 4, 2),
                                         "interpret mode (CPU tests)"),
}

# Sweep list for launch/benchmark_kernels.py (GEMM tiles; kernel 1 is swept separately).
TRITON_GEMM_CANDIDATES: tuple[GemmTile, ...] = (
    GemmTile(128, 64, 2, 8, 4), GemmTile(128, 64, 2, 4, 4), GemmTile(128, 128, 2, 8, 3),
    GemmTile(128, 64, 1, 4, 4),
    GemmTile(64, 128, 2, 4, 4), GemmTile(128, 128, 1, 8, 4), GemmTile(256, 64, 2, 8, 3),
    GemmTile(64, 64, 2, 4, 4), GemmTile(128, 32, 2, 4, 4), GemmTile(128, 64, 2, 8, 4, group_m=1),
)
TRITON_QUANTIZE_CANDIDATES: tuple[QuantizeTile, ...] = (
    QuantizeTile(32, 8, 4, 2), QuantizeTile(16, 8, 4, 2), QuantizeTile(64, 8, 4, 2), QuantizeTile(32, 4, 4, 2),
    QuantizeTile(32, 16, 4, 2), QuantizeTile(64, 48, 8, 2),
)


def device_key(device: jax.Device | None = None) -> str:
  """``"h100"``, ``"h200"``, ``"nvidia"`` (another NVIDIA GPU), or the platform name
  (``"cpu"``, ``"rocm"``, ``"tpu"``, ...)."""
  device = jax.devices()[0] if device is None else device
  kind = str(getattr(device, "device_kind", "")).lower()
  if device.platform != "gpu":
    return device.platform
  if "h100" in kind:
    return "h100"
  if "h200" in kind:
    return "h200"
  if "nvidia" in kind or getattr(device, "compute_capability", None) is not None:
    return "nvidia"
  return "rocm"


def shape_class(m: int, n: int, k: int) -> str:
  del n, k  # The table distinguishes token counts only so far.
  return "small" if m <= SMALL_M else "large"


def for_dtype(config: TritonConfig, dtype: Any) -> TritonConfig:
  """``config`` adjusted for the activation dtype: float32 activations run kernel 1 with
  :data:`FLOAT32_QUANTIZE_WARPS` warps (its IEEE FMA dots need twice the registers of a bf16
  tensor-core dot; at 4 warps ``q32x8`` spills inside its group loop, ``docs/kernels.md`` §9)."""
  if dtype is None or jnp.dtype(dtype) != jnp.float32:
    return config
  qt = config.quantize
  return dataclasses.replace(config, quantize=dataclasses.replace(qt, num_warps=max(qt.num_warps,
                                                                                    FLOAT32_QUANTIZE_WARPS)))


def triton_config(m: int, n: int, k: int, *, interpret: bool = False, device: jax.Device | None = None,
                  dtype: Any = None) -> TritonConfig:
  """The tile configuration for an ``[m, k] x [k, n]`` SVDQuant linear (``dtype``: of the
  activations, see :func:`for_dtype`)."""
  key = "interpret" if interpret else device_key(device)
  if key not in ("h100", "h200", "nvidia", "interpret"):
    key = "nvidia"
  config = TRITON_TABLE[(key, shape_class(m, n, k))]
  return config if interpret else for_dtype(config, dtype)
