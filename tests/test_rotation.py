"""The randomized Hadamard rotation (svdquant_jax/formats/rotation.py, re-exported with the PTQ side by
svdquant_jax/quant/rotation.py): orthogonality, exactness of the rotated float layer, determinism, its
effect on W4A4 RTN of an outlier layer, bad widths, the online form and the per-group seeds."""

import ml_dtypes
import numpy as np
import pytest
import scipy.linalg

from svdquant_jax.flows import layer_report as rp
from svdquant_jax.formats import quantizers as qz
from svdquant_jax.quant import rotation
from svdquant_jax.quant.svdquant import plain_weights


def test_walsh_hadamard_is_scipys_normalized_and_q_is_orthogonal():
  for n in (1, 2, 8, 64):
    np.testing.assert_array_equal(rotation.walsh_hadamard(n), scipy.linalg.hadamard(n) / np.sqrt(n))
  rot = rotation.make_rotation(96, seed=3)  # 96 = 3 * 32: three 32-blocks
  assert rot.block == 32
  q = rot.matrix()
  np.testing.assert_allclose(q @ q.T, np.eye(96), atol=1e-12)
  np.testing.assert_allclose(q.T @ q, np.eye(96), atol=1e-12)
  assert np.all(q[:32, 32:] == 0) and np.allclose(np.abs(q[:32, :32]), 1 / np.sqrt(32))
  assert rotation.make_rotation(3072).block == 1024 and rotation.make_rotation(1152).block == 128
  assert rotation.make_rotation(12288).block == 4096 and rotation.make_rotation(4608).block == 512


def test_fast_transform_matches_q_and_rotated_float_layer_is_exact():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 192)).astype(np.float32)
  x[:, [5, 77]] *= 50  # outlier channels
  w = rng.standard_normal((192, 48)).astype(np.float32)
  (w_rot,), x_rot, rot = rotation.rotate_group([w], x, seed=7)
  q = rot.matrix()
  np.testing.assert_allclose(np.asarray(x_rot), x.astype(np.float64) @ q, rtol=0, atol=1e-5 * np.abs(x).max())
  np.testing.assert_allclose(np.asarray(w_rot), q.T @ w.astype(np.float64), rtol=0, atol=1e-5 * np.abs(w).max())
  y = x.astype(np.float64) @ w
  y_rot = np.asarray(x_rot, np.float64) @ np.asarray(w_rot, np.float64)
  assert np.linalg.norm(y_rot - y) / np.linalg.norm(y) < 1e-5
  np.testing.assert_allclose(np.asarray(rotation.unrotate_inputs(x_rot, rot)), x, atol=1e-5 * np.abs(x).max())
  # the rotation spreads the outliers: per-channel absmax max / median drops
  absmax, absmax_rot = np.abs(x).max(0), np.abs(np.asarray(x_rot)).max(0)
  assert absmax.max() / np.median(absmax) > 20 and absmax_rot.max() / np.median(absmax_rot) < 3


def test_deterministic_given_seed():
  a, b, c = (rotation.make_rotation(128, seed=s) for s in (5, 5, 6))
  assert a == b and hash(a) == hash(b)  # a static-argument-friendly value
  np.testing.assert_array_equal(a.signs(), b.signs())
  assert set(np.unique(a.signs())) == {-1.0, 1.0}
  assert np.mean(a.signs() != c.signs()) > 0.3
  x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(rotation.rotate_inputs(x, a)), np.asarray(rotation.rotate_inputs(x, b)))


def test_rotation_lowers_int4_rtn_error_of_an_outlier_layer():
  layer = rp.make_synthetic_layer(seed=0, rows=256, k=256, n=256)
  (w_rot,), x_eval_rot, _ = rotation.rotate_group([layer.kernel], layer.x_eval, seed=0)
  errors = {}
  for name in ("int4", "nvfp4"):
    fmt = rp.W4A4_FORMATS[name]
    errors[name] = (rp.relative_error(layer, rp._forward(layer.x_eval, plain_weights(layer.kernel), fmt, 0.0)),
                    rp.relative_error(layer, rp._forward(x_eval_rot, plain_weights(w_rot), fmt, 0.0)))
  # Measured: INT4 0.192 -> 0.122; NVFP4 0.122 -> 0.131 (its g16 groups already isolate outliers).
  plain, rotated = errors["int4"]
  assert 0.15 < plain < 0.25 and rotated < 0.7 * plain
  assert errors["nvfp4"][1] > 0.9 * errors["nvfp4"][0]  # no free gain for NVFP4 on this layer


def test_bad_widths_and_shapes_give_clear_errors():
  with pytest.raises(qz.QuantizationError, match=r"conv0: K=27 has no power-of-two Hadamard block >= 16"):
    rotation.make_rotation(27, name="conv0")
  with pytest.raises(qz.QuantizationError, match="K=200 has no power-of-two Hadamard block >= 16 .*largest: 8"):
    rotation.make_rotation(200)
  with pytest.raises(qz.QuantizationError, match="block 48 must be a power of two dividing K=96"):
    rotation.make_rotation(96, block=48)
  with pytest.raises(qz.QuantizationError, match="block 64 must be a power of two dividing K=96"):
    rotation.make_rotation(96, block=64)
  with pytest.raises(qz.QuantizationError, match="positive integer"):
    rotation.make_rotation(0)
  with pytest.raises(qz.QuantizationError, match="power of two, got 6"):
    rotation.walsh_hadamard(6)
  rot = rotation.make_rotation(64)
  with pytest.raises(qz.QuantizationError, match=r"x has shape \(2, 32\), but the rotation is for K=64"):
    rotation.rotate_inputs(np.zeros((2, 32), np.float32), rot)
  with pytest.raises(qz.QuantizationError, match=r"kernel must be \[K, N\]"):
    rotation.rotate_kernel(np.zeros((64,), np.float32), rot)
  with pytest.raises(qz.QuantizationError, match=r"qkv: kernel 1 has shape \(32, 8\), expected \[K=64, N\]"):
    rotation.rotate_group([np.zeros((64, 8)), np.zeros((32, 8))], np.zeros((4, 64)), name="qkv")
  with pytest.raises(qz.QuantizationError, match=r"qkv: x has shape \(4, 32\), expected \[..., K=64\]"):
    rotation.rotate_group([np.zeros((64, 8))], np.zeros((4, 32)), name="qkv")


def test_online_flops():
  # FLUX hidden 3072 (blocks of 1024): 10 butterfly stages of 3072 adds per token
  assert rotation.online_flops(3072, 1024) == {"fwht": 30720, "scale": 3072, "dense_block": 6291456,
                                               "dense_full": 18874368}
  assert rotation.online_flops(12288, 4096)["fwht"] == 12288 * 12
  with pytest.raises(qz.QuantizationError, match="block 96"):
    rotation.online_flops(3072, 96)


def test_online_rotation_and_group_seeds():
  from svdquant_jax.formats import rotation as fr
  assert rotation.make_rotation is fr.make_rotation and rotation.HadamardRotation is fr.HadamardRotation
  x = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
  rot = rotation.make_rotation(256, seed=9)
  bf = np.asarray(x, dtype=ml_dtypes.bfloat16)
  got = rotation.rotate_online(bf, rot.block, rot.seed)
  assert got.dtype == bf.dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(np.asarray(rotation.rotate_inputs(bf, rot)).astype(bf.dtype), np.float32))
  assert rotation.rotate_online(bf, 0, 9) is bf
  # The per-group seed is a stable hash (saved runs resume with it): pinned values.
  assert rotation.group_seed(0, "transformer_blocks_0/qkv") == rotation.group_seed(0, "transformer_blocks_0/qkv")
  assert rotation.group_seed(0, "a") == 2059793309
  assert len({rotation.group_seed(s, n) for s in (0, 1) for n in ("a", "b")}) == 4
  r = rotation.RotationSettings(enabled=True, seed=1, block=32).rotation(96, "g")
  assert (r.k, r.block, r.seed) == (96, 32, rotation.group_seed(1, "g"))
  with pytest.raises(ValueError, match="quant.rotation: seed and block must be >= 0"):
    rotation.RotationSettings(block=-1)
