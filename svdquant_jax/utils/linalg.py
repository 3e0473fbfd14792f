"""Dense factorizations that stay safe under ``vmap`` on the XLA CPU backend.

jaxlib's CPU LAPACK kernels split a batched call (``vmap`` of ``cholesky``, ``qr``,
``solve_triangular``, ``svd``) into tasks on XLA's intra-op thread pool and block the calling pool
thread until they finish. When a program holds several independent batched factorizations (the
smoothing search vmaps candidates, and each group has several layers), the thunk executor can
start one on every pool thread; each then waits for tasks that no free thread is left to run and
the computation never finishes (reproduced with jaxlib 0.10.2 on a 2-core machine: two vmapped
QRs in one jit hang within a few calls).

The functions here are the ``jnp`` ones with one change: under ``vmap`` on CPU they run the batch
as a ``lax.map`` loop of unbatched factorizations, which never wait on the pool. On other
platforms (cuSOLVER, batched kernels) the batched primitive is kept. Results are the same
factorizations either way. They are not differentiable (the PTQ searches never differentiate).

When to remove this module: once a jaxlib release no longer runs a batched CPU factorization as
tasks on the intra-op pool that the calling pool thread blocks on (jaxlib 0.10.2 does). To check a
new jaxlib, run the repro of ``docs/design.md``, "XLA CPU and batched factorizations", on a 2-core
machine: a jitted function holding two independent ``jax.vmap(jnp.linalg.qr)`` calls on
``float32 [8, 512, 64]`` inputs, called 30 times with fresh inputs, hangs with 0.10.2 (no return
within 90 s; the same loop through :func:`qr_q` finishes). If the plain ``jnp`` version finishes
and the PTQ tests pass with these functions replaced by their ``jnp`` bodies, delete the module.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import custom_batching
import jax.numpy as jnp

Array = jax.Array


def _sequential_on_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` (arrays in, a pytree of arrays out) with a CPU batching rule that loops over the batch."""
  wrapped = custom_batching.custom_vmap(fn)

  @wrapped.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = tuple(a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                 for a, batched in zip(args, in_batched))
    looped = lambda *xs: jax.lax.map(lambda x: wrapped(*x), xs)  # noqa: E731
    vmapped = lambda *xs: jax.vmap(fn)(*xs)  # noqa: E731
    out = jax.lax.platform_dependent(*args, cpu=looped, default=vmapped)
    return out, jax.tree.map(lambda _: True, out)

  return wrapped


@_sequential_on_cpu
def cholesky(a: Array) -> Array:
  """Lower Cholesky factor of a symmetric positive definite ``[n, n]`` matrix (NaN if not PD)."""
  return jnp.linalg.cholesky(a)


@_sequential_on_cpu
def solve_lower_triangular(lower: Array, b: Array) -> Array:
  """``L⁻¹ b`` for lower triangular ``L [n, n]`` and ``b [n, k]``."""
  return jax.scipy.linalg.solve_triangular(lower, b, lower=True)


@_sequential_on_cpu
def cho_solve_lower(lower: Array, b: Array) -> Array:
  """``A⁻¹ b`` given the lower Cholesky factor of ``A``."""
  return jax.scipy.linalg.cho_solve((lower, True), b)


@_sequential_on_cpu
def qr_q(a: Array) -> Array:
  """The reduced ``Q [m, min(m, n)]`` of the Householder QR of ``a [m, n]``."""
  return jnp.linalg.qr(a)[0]


@_sequential_on_cpu
def svd_reduced(a: Array) -> tuple[Array, Array, Array]:
  """``(U, S, Vᵀ)`` of the reduced SVD of ``a [m, n]``."""
  return jnp.linalg.svd(a, full_matrices=False)
