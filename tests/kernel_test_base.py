"""Shared, parameterized correctness tests for every SVDQuant kernel backend (tokamax-style).

A backend's test class subclasses :class:`KernelTestBase`, names its registry ``BACKEND`` and
implements two hooks that run its kernel 1 and kernel 2 on *poisoned* (NaN / 0x88-filled)
output buffers. The base compares them with the pure-jnp reference:

* kernel 1: codes, scales and the padding rows exactly; ``x · lora_down`` to float32 rounding;
* kernel 2 (fed the reference's kernel-1 outputs): relative Frobenius error <= 1e-2 for
  bf16/fp16 outputs, <= 1e-5 for float32 outputs, also with per-channel weight scales
  (``wcscales``) in the epilogue; with power-of-two scales the group-scaled integer GEMM is
  checked **exactly** against int64 numpy (every nibble value of both operands, with and without
  per-channel scales);
* the public op ``svdquant_linear(..., backend=BACKEND)`` end to end, with leading dims.

Shapes: M not a multiple of the tile, K = 64 x odd, N not a multiple of 128 (nor of the
interpret tile), ranks 0 / 16 / 32, signed and shifted-unsigned activations, bf16 / fp16 (and
one fp32) inputs. Inputs are fresh random draws per case, never zeros.

Where: on CPU the Pallas kernels run in interpret mode. ``SVDQUANT_KERNEL_TESTS=native`` runs
them compiled (no interpret) on the GPU, with the reference still evaluated on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.formats import packing
from svdquant_jax.pallas import reference
from svdquant_jax.pallas.registry import svdquant_linear
from svdquant_jax.formats import quantizers as q

NATIVE = os.environ.get("SVDQUANT_KERNEL_TESTS", "interpret") == "native"
INTERPRET = not NATIVE
LOW_PRECISION_RTOL = 1e-2
F32_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
  m: int
  k: int
  n: int
  rank: int
  unsigned: bool
  dtype: Any

  def __str__(self) -> str:
    return (f"m{self.m}_k{self.k}_n{self.n}_r{self.rank}_{'u' if self.unsigned else 's'}_"
            f"{jnp.dtype(self.dtype).name}")

  @property
  def seed(self) -> int:
    return zlib.crc32(str(self).encode())


# K = 64 x 3 and 64 x 5 (odd numbers of groups); M and N off every tile size.
OP_CASES = (
    Case(50, 192, 80, 0, False, jnp.bfloat16),
    Case(50, 192, 80, 16, True, jnp.float16),
    Case(50, 192, 80, 32, False, jnp.float16),
    Case(33, 320, 48, 32, True, jnp.bfloat16),
    Case(33, 320, 48, 16, False, jnp.bfloat16),
    Case(33, 320, 48, 0, True, jnp.float16),
    Case(50, 192, 80, 32, False, jnp.float32),
)
PUBLIC_OP_CASES = (OP_CASES[2], OP_CASES[3])


@dataclasses.dataclass
class Kernel1Outputs:
  """A backend's kernel-1 results in the reference form, plus what it wrote past row M."""
  codes: np.ndarray        # int8 [M, K]
  scales: np.ndarray       # [M, K/64]
  lora_act: np.ndarray | None  # float32 [M, r]
  padding_codes: np.ndarray   # uint8 [m_pad - M, K/2] (must be 0)
  padding_scales: np.ndarray  # [.., m_pad - M] (must be 0)


def cpu_device() -> jax.Device:
  return jax.devices("cpu")[0]


@contextlib.contextmanager
def on_cpu():
  with jax.default_device(cpu_device()):
    yield


def to_cpu(tree: Any) -> Any:
  return jax.device_put(tree, cpu_device())


def random_layer(rng: np.random.Generator, k: int, n: int, rank: int, *, fmt: str = "int4", shift: float = 0.0,
                 dtype: Any = jnp.bfloat16, bias: bool = True) -> packing.QuantizedLinear:
  """A random SVDQuant layer built through the real constructor (heavy-tailed λ and weights)."""
  w = rng.standard_normal((k, n)) * 0.05 * np.exp(rng.uniform(-1, 1, (k, 1)))
  smooth = np.exp(rng.uniform(-1.0, 1.0, k))
  a = rng.standard_normal((k, rank)) * 0.2 / np.sqrt(k)
  bb = rng.standard_normal((rank, n)) * 0.5
  b = rng.standard_normal(n) * 0.1 if bias else None
  cast = lambda v: None if v is None else jnp.asarray(v, dtype)
  with on_cpu():
    return packing.from_float(cast(w), cast(b), cast(smooth), cast(a), cast(bb), fmt=fmt, shift=shift)


def random_activations(rng: np.random.Generator, m: int, k: int, dtype: Any, *, gelu: bool = False) -> jax.Array:
  """Activations with a few outlier channels; GELU outputs (>= -0.17) for shifted layers."""
  x = rng.standard_normal((m, k))
  x[:, rng.choice(k, size=max(1, k // 32), replace=False)] *= 12.0
  if gelu:
    x = np.asarray(jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=True))
  return jnp.asarray(x, dtype)


def relative_error(got: Any, want: Any) -> float:
  got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want).astype(jnp.float32), np.float64)
  assert not np.isnan(got).any(), "output has NaNs (unwritten elements of the poisoned buffer?)"
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def rtol_for(dtype: Any) -> float:
  return F32_RTOL if jnp.dtype(dtype) == jnp.float32 else LOW_PRECISION_RTOL


def case_inputs(case: Case) -> tuple[packing.QuantizedLinear, jax.Array]:
  rng = np.random.default_rng(case.seed)
  shift = q.GELU_SHIFT if case.unsigned else 0.0
  params = random_layer(rng, case.k, case.n, case.rank, shift=shift, dtype=case.dtype)
  x = random_activations(rng, case.m, case.k, case.dtype, gelu=case.unsigned)
  return params, x


class KernelTestBase:
  """Subclass with ``BACKEND = "<registry name>"`` and the two hooks below."""

  BACKEND: str = ""

  # ------------------------------------------------------------------ hooks
  def run_kernel1(self, x: jax.Array, params: packing.QuantizedLinear) -> Kernel1Outputs:
    raise NotImplementedError

  def run_kernel2(self, codes: jax.Array, scales: jax.Array, lora_act: jax.Array | None,
                  params: packing.QuantizedLinear, out_dtype: Any) -> jax.Array:
    """codes ``int8 [M, K]``, scales ``[M, K/64]``, lora_act ``float32 [M, r]`` -> ``[M, N]``."""
    raise NotImplementedError

  # ------------------------------------------------------------------ helpers
  def _device_inputs(self, *tree: Any) -> Any:
    return jax.device_put(tree, jax.devices()[0]) if NATIVE else tree

  @pytest.fixture(autouse=True)
  def _require_device(self):
    if NATIVE and jax.default_backend() != "gpu":
      pytest.skip("SVDQUANT_KERNEL_TESTS=native needs a GPU")

  # ------------------------------------------------------------------ tests
  @pytest.mark.parametrize("case", OP_CASES, ids=str)
  def test_kernel1_matches_reference_exactly(self, case: Case):
    params, x = case_inputs(case)
    with on_cpu():
      want = reference.quantize_activations(to_cpu(x), to_cpu(params))
    got = self.run_kernel1(*self._device_inputs(x, params))
    np.testing.assert_array_equal(got.codes, np.asarray(want.codes))
    np.testing.assert_array_equal(np.asarray(got.scales, np.float32), np.asarray(want.scales, np.float32))
    assert not np.any(got.padding_codes), "kernel 1 must write zero codes into the padding rows"
    assert not np.any(np.asarray(got.padding_scales, np.float32)), "kernel 1 must write zero padding scales"
    if case.rank:
      lora_want = np.asarray(want.lora_act, np.float64)
      err = np.abs(np.asarray(got.lora_act, np.float64) - lora_want).max() / np.abs(lora_want).max()
      assert err < 1e-5, f"x · lora_down: max error {err:.2e} relative to max |lora_act|"
    else:
      assert got.lora_act is None

  @pytest.mark.parametrize("case", OP_CASES, ids=str)
  def test_kernel2_matches_reference(self, case: Case):
    params, x = case_inputs(case)
    with on_cpu():
      acts = reference.quantize_activations(to_cpu(x), to_cpu(params))
      want = reference.gemm(acts, to_cpu(params), case.dtype)
    lora = acts.lora_act if case.rank else None
    got = self.run_kernel2(*self._device_inputs(acts.codes, acts.scales, lora, params), case.dtype)
    assert got.dtype == case.dtype and got.shape == (case.m, case.n)
    err = relative_error(got, want)
    assert err <= rtol_for(case.dtype), f"relative error {err:.3e}"

  @pytest.mark.parametrize("case", (OP_CASES[1], OP_CASES[4]), ids=str)
  def test_kernel2_with_channel_scales_matches_reference(self, case: Case):
    """The per-output-channel weight scales (``wcscales``: nvfp4 layers carry them; the epilogue is
    format-independent, so an int4 layer with them exercises it here) against the reference."""
    params, x = case_inputs(case)
    rng = np.random.default_rng(case.seed + 1)
    params = params.replace(wcscales=jnp.asarray(np.exp(rng.uniform(-1, 1, case.n)), jnp.float32))
    with on_cpu():
      acts = reference.quantize_activations(to_cpu(x), to_cpu(params))
      want = reference.gemm(acts, to_cpu(params), case.dtype)
      plain = reference.gemm(acts, to_cpu(params.replace(wcscales=None)), case.dtype)
    assert relative_error(plain, want) > 0.1  # the scales change the output
    lora = acts.lora_act if case.rank else None
    got = self.run_kernel2(*self._device_inputs(acts.codes, acts.scales, lora, params), case.dtype)
    err = relative_error(got, want)
    assert err <= rtol_for(case.dtype), f"relative error {err:.3e}"

  @pytest.mark.parametrize("channel_scales", [False, True], ids=["", "wcscales"])
  @pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
  def test_kernel2_integer_gemm_is_exact(self, unsigned: bool, channel_scales: bool):
    """Power-of-two scales make every group term and sum exact in float32: the output must
    equal the int64 evaluation bit for bit, for all 16 nibble values of both operands (times
    power-of-two per-channel scales when given)."""
    m, k, n = 40, 192, 48
    rng = np.random.default_rng(11 + unsigned)
    a = rng.integers(0, 16, (m, k)) if unsigned else rng.integers(-8, 8, (m, k))
    w = rng.integers(-8, 8, (k, n))
    assert len(np.unique(a)) == 16 and len(np.unique(w)) == 16
    sa = np.exp2(rng.integers(-2, 3, (m, k // 64))).astype(np.float32)
    sw = np.exp2(rng.integers(-2, 3, (k // 64, n))).astype(np.float32)
    params = packing.QuantizedLinear(
        qweight=packing.pack(jnp.asarray(w, jnp.int8), layout="KN"), wscales=jnp.asarray(sw),
        smooth=jnp.ones((k,), jnp.float32), lora_down=jnp.zeros((k, 0), jnp.float32),
        lora_up=jnp.zeros((0, n), jnp.float32), bias=None, fmt="int4", group_size=64,
        shift=q.GELU_SHIFT if unsigned else 0.0)
    wc = np.exp2(rng.integers(-3, 4, n)).astype(np.float32) if channel_scales else np.ones(n, np.float32)
    if channel_scales:
      params = params.replace(wcscales=jnp.asarray(wc))
    got = self.run_kernel2(*self._device_inputs(jnp.asarray(a, jnp.int8), jnp.asarray(sa), None, params),
                           jnp.float32)
    terms = np.einsum("mgk,gkn->gmn", a.reshape(m, k // 64, 64).astype(np.int64),
                      w.reshape(k // 64, 64, n).astype(np.int64))
    want = np.einsum("gmn,mg,gn->mn", terms.astype(np.float64), sa.astype(np.float64), sw.astype(np.float64))
    want = want * wc.astype(np.float64)[None, :]
    np.testing.assert_array_equal(np.asarray(got, np.float64), want)

  @pytest.mark.parametrize("case", PUBLIC_OP_CASES, ids=str)
  def test_public_op_matches_reference(self, case: Case):
    params, x = case_inputs(case)
    x3 = x.reshape(1, case.m, case.k)
    with on_cpu():
      want = reference.svdquant_linear_reference(to_cpu(x3), to_cpu(params))
    x3d, params_d = self._device_inputs(x3, params)
    got = svdquant_linear(x3d, params_d, backend=self.BACKEND, interpret=INTERPRET)
    assert got.shape == (1, case.m, case.n) and got.dtype == case.dtype
    err = relative_error(got, want)
    assert err <= rtol_for(case.dtype), f"relative error {err:.3e}"
