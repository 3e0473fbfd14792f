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


# ----------------------------------------------------------------------------- nvfp4 per-channel scales
def test_nvfp4_layer_with_channel_scales():
  """A fused NVFP4 layer (Nunchaku's qkv: one per-tensor scale per member) holds ``wcscales``: the
  layer knows it statically (``channel_scales``), runs ``main · wtscale · wcscales[n]``, and
  round-trips through saved params and ``swap_dense``."""
  rng = np.random.default_rng(5)
  w, b, lam, a, bb, amax = _float_pieces(rng, 128, 96, 16)
  plain = packing.from_float(w, b, lam, a, bb, fmt="nvfp4")
  wc = jnp.asarray(np.repeat([0.5, 2.0, 1.25], 32), jnp.float32)
  ql = plain.replace(wcscales=wc)
  ql.validate()
  layer, variables = SVDQuantDense.from_quantized(ql)
  assert layer.channel_scales and variables["params"]["wcscales"].shape == (96,)
  x = _inputs(rng, 11, amax)
  y = np.asarray(jax.jit(layer.apply)(variables, x), np.float64)
  # reference: the main path scaled per channel, branch and bias unchanged
  acts = reference.quantize_activations(x, ql)
  f64 = lambda v: np.asarray(jnp.asarray(v).astype(jnp.float32), np.float64)
  qa = f64(q.dequantize_nvfp4_act(acts.codes, acts.scales))
  want = (qa @ f64(plain.dequantized_weight()) * f64(wc) + (f64(x) @ f64(ql.lora_down)) @ f64(ql.lora_up)
          + f64(ql.bias))
  assert relative_error(y, want) <= 5e-3
  np.testing.assert_allclose(f64(ql.dequantized_weight()), f64(plain.dequantized_weight()) * f64(wc), rtol=1e-7)
  # saved params -> layer (channel_scales from the presence of wcscales); a layer without them refuses them
  layer2, variables2 = SVDQuantDense.from_params(dict(variables["params"]), fmt="nvfp4")
  assert layer2.channel_scales
  np.testing.assert_array_equal(np.asarray(layer2.apply(variables2, x)), np.asarray(layer.apply(variables, x)))
  with pytest.raises(CheckpointError, match="wcscales"):
    SVDQuantDense(96, rank=16, fmt="nvfp4", param_dtype=jnp.bfloat16).check_params(variables["params"], 128)
  with pytest.raises(packing.QuantizedLinearError, match="nvfp4 only"):
    SVDQuantDense(96, rank=16, fmt="int4", channel_scales=True).init(jax.random.key(0), x)
  with pytest.raises(packing.QuantizedLinearError, match="wcscales"):
    plain.replace(wcscales=wc[:-1]).validate()
  spec = QuantSpec.of(ql)
  assert spec.channel_scales and spec.fmt == "nvfp4"
  nnx_layer = SVDQuantDenseNNX.from_quantized(ql)
  np.testing.assert_array_equal(np.asarray(nnx_layer(x)), np.asarray(layer.apply(variables, x)))


# ----------------------------------------------------------------------------- weight-only (AWQ form)
def _np_awq_dequant(u, s, z, np_dtype):
  """``u · s + z`` exactly (float64), rounded once to the activation dtype: ``[K, N]``."""
  k, n = u.shape
  g = k // s.shape[0]
  w = (u.astype(np.float64).reshape(k // g, g, n) * s.astype(np.float64)[:, None, :]
       + z.astype(np.float64)[:, None, :])
  return w.reshape(k, n).astype(np_dtype)


def test_weight_only_int4_is_the_engine_awq_form():
  """PTQ form (``weight_only_params``): ``u = q + 7``, ``z = -bf16(7 s)``; the layer dequantizes
  ``u·s + z`` rounded once to the activation dtype (numpy), and the swap puts ``qweight``,
  ``wscales``, ``wzeros``, ``bias`` at the Dense's path."""
  import ml_dtypes
  from svdquant_jax.nn import WeightOnlyDense, WeightOnlySpec, weight_only_params
  from svdquant_jax.nn import weight_only as wo
  rng = np.random.default_rng(6)
  kernel = jnp.asarray(rng.standard_normal((128, 48)) * 0.05, jnp.bfloat16)
  bias = jnp.asarray(rng.standard_normal(48), jnp.bfloat16)
  spec = WeightOnlySpec("int4", 64)
  params = weight_only_params(kernel, bias, spec)
  assert set(params) == {"qweight", "wscales", "wzeros", "bias"}
  u = np.asarray(packing.unpack(params["qweight"], layout="KN", signed=False))
  codes, scales = q.quantize_int4_weight(kernel, 64, scale_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(u, np.asarray(codes, np.int64) + 7)
  s = np.asarray(params["wscales"]).astype(np.float32)
  np.testing.assert_array_equal(s, np.asarray(scales, np.float32))
  np.testing.assert_array_equal(np.asarray(params["wzeros"]), (-(np.float32(7) * s)).astype(ml_dtypes.bfloat16))
  for dtype, np_dtype in [(jnp.bfloat16, ml_dtypes.bfloat16), (jnp.float16, np.float16), (jnp.float32, np.float32)]:
    got = np.asarray(wo.dequantize(params, spec, dtype))
    np.testing.assert_array_equal(got, _np_awq_dequant(u, s, np.asarray(params["wzeros"]), np_dtype))
  layer = WeightOnlyDense(48, param_dtype=jnp.bfloat16, spec=spec)
  x = jnp.asarray(rng.standard_normal((5, 128)), jnp.bfloat16)
  y = layer.apply({"params": params}, x)
  want = np.asarray(x, np.float64) @ _np_awq_dequant(u, s, np.asarray(params["wzeros"]), np.float64) + np.asarray(
      bias, np.float64)
  assert y.dtype == jnp.bfloat16 and relative_error(y, want) <= 1e-2
  with swap_dense({"head": spec}):
    tree = trees.flatten(jax.eval_shape(Model().init, jax.random.key(0), jnp.ones((1, 4, 64)))["params"])
  assert {p for p in tree if p.startswith("head/")} == {"head/qweight", "head/wscales", "head/wzeros", "head/bias"}


def test_weight_only_int4_with_imported_zero_points():
  """An imported (Nunchaku) adaLN layer: any unsigned codes in [0, 15] and arbitrary zero points."""
  import ml_dtypes
  from svdquant_jax.nn import WeightOnlyDense, WeightOnlySpec
  rng = np.random.default_rng(7)
  k, n = 128, 40
  u = rng.integers(0, 16, (k, n))
  assert len(np.unique(u)) == 16
  s = (np.exp(rng.uniform(-6, -2, (k // 64, n)))).astype(ml_dtypes.bfloat16)
  z = (rng.standard_normal((k // 64, n)) * 0.05).astype(ml_dtypes.bfloat16)
  params = {"qweight": packing.pack(jnp.asarray(u, jnp.uint8), layout="KN", signed=False),
            "wscales": jnp.asarray(s), "wzeros": jnp.asarray(z), "bias": jnp.zeros((n,), jnp.bfloat16)}
  layer = WeightOnlyDense(n, param_dtype=jnp.bfloat16, spec=WeightOnlySpec("int4", 64))
  layer.check_params(params, k)
  x = jnp.asarray(rng.standard_normal((6, k)), jnp.float32)
  y = np.asarray(layer.apply({"params": params}, x), np.float64)  # float32 activations: float32 weights
  want = np.asarray(x, np.float64) @ _np_awq_dequant(u, s, z, np.float32).astype(np.float64)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(CheckpointError, match="wzeros"):
    layer.check_params({k_: v for k_, v in params.items() if k_ != "wzeros"}, k)
