"""SVDQuantDense (linen and nnx), its constructors, and swapping nn.Dense inside a user model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_test_base import relative_error
from svdquant_jax.nn import (QuantSpec, SVDQuantDense, SVDQuantDenseNNX, replace_dense_params, swap_dense)
from svdquant_jax.formats import packing
from svdquant_jax.pallas import reference
from svdquant_jax.formats import quantizers as q
from svdquant_jax.utils.safetensors_io import CheckpointError, TensorStore, save_safetensors
from svdquant_jax.utils import trees

# The default backend is the reference on CPU (identical numbers up to XLA fusion: float32
# rounding) and a Pallas kernel on a GPU (kernel-vs-reference tolerance).
AUTO_BACKEND_RTOL = 1e-5 if jax.default_backend() == "cpu" else 1e-2


def _float_pieces(rng, k, n, r, dtype=jnp.bfloat16):
  """A float Dense (kernel, bias) with outlier input channels, λ from the SmoothQuant rule
  (α = 0.5) and an SVD rank-r split of diag(λ) W: the pieces the PTQ code hands over."""
  w = rng.standard_normal((k, n)) * 0.05
  x_absmax = np.abs(rng.standard_normal(k)) + 0.1
  x_absmax[rng.choice(k, 4, replace=False)] *= 20.0
  lam = np.sqrt(x_absmax) / np.sqrt(np.abs(w).max(1))
  u, s, vt = np.linalg.svd(lam[:, None] * w, full_matrices=False)
  a, bb = u[:, :r] * s[:r], vt[:r]
  b = rng.standard_normal(n) * 0.1
  c = lambda v: jnp.asarray(v, dtype)
  return c(w), c(b), c(lam), c(a), c(bb), x_absmax


def _inputs(rng, m, x_absmax, dtype=jnp.bfloat16):
  return jnp.asarray(rng.standard_normal((m, x_absmax.size)) * x_absmax / 3.0, dtype)


def test_linen_layer_from_float_params_and_numbers():
  rng = np.random.default_rng(0)
  w, b, lam, a, bb, amax = _float_pieces(rng, 128, 96, 16)
  layer, variables = SVDQuantDense.from_float(w, b, lam, a, bb)
  shapes = {k: (v.shape, v.dtype) for k, v in variables["params"].items()}
  assert shapes == {"qweight": ((96, 64), jnp.uint8), "wscales": ((2, 96), jnp.bfloat16),
                    "smooth": ((128,), jnp.bfloat16), "lora_down": ((128, 16), jnp.bfloat16),
                    "lora_up": ((16, 96), jnp.bfloat16), "bias": ((96,), jnp.bfloat16)}
  assert layer.features == 96 and layer.rank == 16 and layer.param_dtype == jnp.bfloat16
  x = _inputs(rng, 3 * 7, amax).reshape(3, 7, 128)
  y = jax.jit(layer.apply)(variables, x)
  assert y.shape == (3, 7, 96) and y.dtype == jnp.bfloat16
  ql = packing.from_float(w, b, lam, a, bb)
  want = jax.jit(reference.svdquant_linear_reference)(x, ql)
  y_ref_backend = jax.jit(layer.clone(backend="reference").apply)(variables, x)
  np.testing.assert_array_equal(np.asarray(y_ref_backend, np.float32), np.asarray(want, np.float32))
  assert relative_error(y, want) <= AUTO_BACKEND_RTOL  # the default backend: the reference on CPU
  # It approximates the float layer better than plain W4A4 RTN (no smoothing, no low rank).
  y_float = x.astype(jnp.float32) @ w.astype(jnp.float32) + b.astype(jnp.float32)
  naive = q.fake_int4_act(x.astype(jnp.float32)) @ q.fake_int4_weight(w.astype(jnp.float32)) + b.astype(jnp.float32)
  err, err_naive = relative_error(y, y_float), relative_error(naive, y_float)
  assert err < 0.5 * err_naive, (err, err_naive)
  # A freshly initialized layer has the same tree (zeros/ones) and runs.
  init = SVDQuantDense(96, rank=16, param_dtype=jnp.bfloat16).init(jax.random.key(0), x)
  trees.validate_tree(init["params"], variables["params"])


def test_nnx_layer_matches_linen_layer():
  rng = np.random.default_rng(1)
  w, b, lam, a, bb, amax = _float_pieces(rng, 192, 64, 32, dtype=jnp.float16)
  ql = packing.from_float(w, b, lam, a, bb, shift=q.GELU_SHIFT)
  layer, variables = SVDQuantDense.from_quantized(ql)
  nnx_layer = SVDQuantDenseNNX.from_quantized(ql)
  x = jnp.abs(_inputs(rng, 9, amax, jnp.float16))
  np.testing.assert_array_equal(np.asarray(nnx_layer(x), np.float32), np.asarray(layer.apply(variables, x), np.float32))
  back = nnx_layer.quantized()
  assert back.shift == q.GELU_SHIFT and back.fmt == "int4"
  fresh = SVDQuantDenseNNX(192, 64, rank=32, shift=q.GELU_SHIFT, param_dtype=jnp.float16)
  assert fresh.qweight[...].shape == (64, 96) and fresh.bias[...].shape == (64,)
  assert fresh(x).shape == (9, 64)


def test_layer_from_saved_params_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(2)
  w, b, lam, a, bb, amax = _float_pieces(rng, 64, 48, 16)
  ql = packing.from_float(w, b, lam, a, bb, fmt="nvfp4")
  layer, variables = SVDQuantDense.from_quantized(ql)
  path = tmp_path / "layer.safetensors"
  save_safetensors(path, variables["params"])
  loaded = dict(TensorStore(path).items())
  layer2, variables2 = SVDQuantDense.from_params(loaded, fmt="nvfp4")
  x = _inputs(rng, 5, amax)
  np.testing.assert_array_equal(np.asarray(layer2.apply(variables2, x), np.float32),
                                np.asarray(layer.apply(variables, x), np.float32))
  with pytest.raises(CheckpointError, match="missing 1 leaf.*wtscale"):
    SVDQuantDense.from_params({k: v for k, v in loaded.items() if k != "wtscale"}, fmt="nvfp4")
  with pytest.raises(CheckpointError, match="lora_up: shape"):
    SVDQuantDense.from_params({**loaded, "lora_up": loaded["lora_up"][:, :-1]}, fmt="nvfp4")
  with pytest.raises(CheckpointError, match="qweight: dtype"):
    SVDQuantDense.from_params({**loaded, "qweight": loaded["qweight"].view(np.int8)}, fmt="nvfp4")


def test_layer_kernel_path_matches_reference_path_on_cpu():
  """The layer on the Triton kernels (interpret mode) gives the reference numbers."""
  rng = np.random.default_rng(3)
  w, b, lam, a, bb, amax = _float_pieces(rng, 192, 80, 32)
  layer, variables = SVDQuantDense.from_float(w, b, lam, a, bb, backend="triton", interpret=True)
  ref_layer = layer.clone(backend="reference", interpret=False)
  x = _inputs(rng, 37, amax)
  y_kernel = layer.apply(variables, x)
  y_ref = ref_layer.apply(variables, x)
  assert relative_error(y_kernel, y_ref) <= 1e-2


# ----------------------------------------------------------------------------- swapping
class FeedForward(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, name="fc1")(x), approximate=True)
    return nn.Dense(x.shape[-1], name="fc2")(h)


class TinyBlock(nn.Module):
  """A user's block: single-head attention with a fused qkv projection, then an MLP."""
  dim: int = 64

  @nn.compact
  def __call__(self, x):
    qkv = nn.Dense(3 * self.dim, name="to_qkv")(nn.LayerNorm(name="norm1")(x))
    qh, kh, vh = jnp.split(qkv, 3, axis=-1)
    attn = jax.nn.softmax(qh @ jnp.swapaxes(kh, -1, -2) / np.sqrt(self.dim), axis=-1) @ vh
    x = x + nn.Dense(self.dim, use_bias=False, name="to_out")(attn)
    return x + FeedForward(2 * self.dim, name="ff")(nn.LayerNorm(name="norm2")(x))


SWAP = {"block/to_qkv": QuantSpec(rank=16), "block/to_out": QuantSpec(rank=0),
        "block/ff/fc2": QuantSpec(rank=16, shift=q.GELU_SHIFT)}


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="head")(TinyBlock(name="block")(x))


def _quantize_model_layers(float_params, rng):
  """One QuantizedLinear per swapped path, from the float kernels (λ = 1 + noise, SVD split)."""
  flat = trees.flatten(float_params)
  layers = {}
  for path, spec in SWAP.items():
    w = np.asarray(flat[f"{path}/kernel"], np.float64)
    lam = np.exp(rng.uniform(-0.5, 0.5, w.shape[0]))
    u, s, vt = np.linalg.svd(lam[:, None] * w, full_matrices=False)
    r = spec.rank
    bias = flat.get(f"{path}/bias")
    layers[path] = packing.from_float(jnp.asarray(w, jnp.float32), bias, jnp.asarray(lam, jnp.float32),
                                      jnp.asarray(u[:, :r] * s[:r], jnp.float32), jnp.asarray(vt[:r], jnp.float32),
                                      shift=spec.shift)
  return layers


def test_swap_dense_keeps_param_paths_and_computes_the_quantized_model():
  rng = np.random.default_rng(4)
  model = Model()
  x = jnp.asarray(rng.standard_normal((2, 6, 64)), jnp.float32)
  float_params = model.init(jax.random.key(0), x)["params"]
  with swap_dense(SWAP) as swapped:
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  assert swapped == set(SWAP)
  f32, u8 = jnp.dtype(jnp.float32), jnp.dtype(jnp.uint8)
  want_tree = {
      "block/norm1/scale": ((64,), f32), "block/norm1/bias": ((64,), f32),
      "block/to_qkv/qweight": ((192, 32), u8), "block/to_qkv/wscales": ((1, 192), f32),
      "block/to_qkv/smooth": ((64,), f32), "block/to_qkv/lora_down": ((64, 16), f32),
      "block/to_qkv/lora_up": ((16, 192), f32), "block/to_qkv/bias": ((192,), f32),
      "block/to_out/qweight": ((64, 32), u8), "block/to_out/wscales": ((1, 64), f32),
      "block/to_out/smooth": ((64,), f32), "block/to_out/lora_down": ((64, 0), f32),
      "block/to_out/lora_up": ((0, 64), f32),
      "block/norm2/scale": ((64,), f32), "block/norm2/bias": ((64,), f32),
      "block/ff/fc1/kernel": ((64, 128), f32), "block/ff/fc1/bias": ((128,), f32),
      "block/ff/fc2/qweight": ((64, 64), u8), "block/ff/fc2/wscales": ((2, 64), f32),
      "block/ff/fc2/smooth": ((128,), f32), "block/ff/fc2/lora_down": ((128, 16), f32),
      "block/ff/fc2/lora_up": ((16, 64), f32), "block/ff/fc2/bias": ((64,), f32),
      "head/kernel": ((64, 8), f32), "head/bias": ((8,), f32),
  }
  got_tree = {p: (tuple(v.shape), jnp.dtype(v.dtype)) for p, v in trees.flatten(abstract).items()}
  assert got_tree == want_tree

  layers = _quantize_model_layers(float_params, rng)
  params = replace_dense_params(float_params, layers)
  trees.validate_tree(params, abstract)
  with swap_dense(SWAP):
    y = jax.jit(model.apply)({"params": params}, x)

  # The same model written out by hand with the reference op at the swapped layers.
  p = params
  ln = lambda v, name: nn.LayerNorm().apply({"params": p["block"][name]}, v)
  ref = jax.jit(reference.svdquant_linear_reference)
  h = ln(x, "norm1")
  qh, kh, vh = jnp.split(ref(h, layers["block/to_qkv"]), 3, axis=-1)
  attn = jax.nn.softmax(qh @ jnp.swapaxes(kh, -1, -2) / np.sqrt(64), axis=-1) @ vh
  h = x + ref(attn, layers["block/to_out"])
  ff = p["block"]["ff"]
  g = nn.gelu(ln(h, "norm2") @ ff["fc1"]["kernel"] + ff["fc1"]["bias"], approximate=True)
  h = h + ref(g, layers["block/ff/fc2"])
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  assert relative_error(y, want) <= AUTO_BACKEND_RTOL


def test_swap_dense_with_a_predicate_and_path_errors():
  model = Model()
  x = jnp.ones((1, 4, 64), jnp.float32)
  pick = lambda path, dense: QuantSpec(rank=0) if dense.features % 64 == 0 else None
  with swap_dense(pick) as swapped:
    tree = trees.flatten(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
  assert swapped == {"block/to_qkv", "block/to_out", "block/ff/fc1", "block/ff/fc2"}
  assert "head/kernel" in tree and "block/ff/fc1/qweight" in tree and "block/ff/fc1/kernel" not in tree
  with pytest.raises(ValueError, match=r"block/to_v"):
    with swap_dense({"block/to_v": QuantSpec()}):
      jax.eval_shape(model.init, jax.random.key(0), x)
  float_params = model.init(jax.random.key(0), x)["params"]
  some = _quantize_model_layers(float_params, np.random.default_rng(0))["block/to_qkv"]
  with pytest.raises(CheckpointError, match="no Dense kernel"):
    replace_dense_params(float_params, {"block/norm1": some})
  with pytest.raises(CheckpointError, match="shape"):
    replace_dense_params(float_params, {"head": some})
