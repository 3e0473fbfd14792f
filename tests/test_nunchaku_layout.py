"""Nunchaku tensor layouts (svdquant_jax.formats.nunchaku) against deepcompressor's converter, byte for byte.

The oracle is ``deepcompressor-toolkit`` 0.1.0 (installed by ``scripts/setup.sh test``) on CPU torch:
its ``NunchakuWeightPacker`` for the single tensors, its layer converters for whole W4A4 and AWQ
layers, and its LoRA block converter for the LoRA merge. Inputs are chosen so that deepcompressor's
fake-quant round trip is exact (power-of-two scales: ``codes·scale`` is exact in bf16), so both
sides see the same codes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deepcompressor.backend.nunchaku import convert as dc_convert
from deepcompressor.backend.nunchaku import convert_lora as dc_lora
from deepcompressor.backend.nunchaku.utils import NunchakuWeightPacker
from deepcompressor.backend.tinychat import utils as dc_tinychat

from svdquant_jax.formats import nunchaku as nk
from svdquant_jax.formats import nunchaku_layout, packing

pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

BF16, FP16, FP8 = nk.BF16, nk.FP16, nk.FP8
PACKER = NunchakuWeightPacker(bits=4)
E2M1 = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
SHIFT = 0.171875


# ----------------------------------------------------------------------------- torch <-> numpy, bytes
def t2n(t: torch.Tensor) -> np.ndarray:
  t = t.detach().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(BF16)
  if t.dtype == torch.float8_e4m3fn:
    return t.view(torch.uint8).numpy().view(FP8)
  return t.numpy()


def n2t(a: np.ndarray) -> torch.Tensor:
  a = np.ascontiguousarray(a)
  if a.dtype == BF16:
    return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
  return torch.from_numpy(a.copy())


def assert_same(ours: np.ndarray, theirs, what: str = "") -> None:
  theirs = t2n(theirs) if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
  assert ours.dtype == theirs.dtype, f"{what}: dtype {ours.dtype} != {theirs.dtype}"
  assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
  diff = np.flatnonzero(np.ascontiguousarray(ours).view(np.uint8) != np.ascontiguousarray(theirs).view(np.uint8))
  assert diff.size == 0, f"{what}: {diff.size} bytes differ, first at byte {diff[0]}"


def pow2(rng, shape, lo, hi) -> np.ndarray:
  return np.exp2(rng.integers(lo, hi + 1, shape)).astype(np.float32)


def rand16(rng, shape, dtype=BF16, scale=1.0) -> np.ndarray:
  return (rng.standard_normal(shape) * scale).astype(np.float32).astype(dtype)


# ----------------------------------------------------------------------------- single tensors
def test_ceil_to():
  assert [nk.ceil_to(x, 128) for x in (0, 1, 128, 129, 3072)] == [0, 128, 128, 256, 3072]


@pytest.mark.parametrize("n,k", [(128, 128), (200, 192), (8, 300), (256, 512)])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_qweight_matches_packer(fmt, n, k):
  rng = np.random.default_rng(n * k)
  codes = rng.integers(-8, 8, (n, k)) if fmt == "int4" else rng.integers(0, 16, (n, k))
  codes[0, :16] = np.arange(-8, 8) if fmt == "int4" else np.arange(16)  # the full range, -8 included
  ours = nk.pack_qweight(codes)
  assert_same(ours, PACKER.pack_weight(PACKER.pad_weight(torch.from_numpy(codes).int())), "qweight")
  back = nk.unpack_qweight(ours, n, k, signed=fmt == "int4")
  assert back.dtype == np.int8 and np.array_equal(back, codes)


@pytest.mark.parametrize("n,k", [(200, 192), (128, 256), (72, 384)])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_int4_wscales_match_packer(n, k, dtype):
  rng = np.random.default_rng(k)
  s = (rng.random((n, k // 64)) + 0.01).astype(np.float32).astype(dtype)
  ours = nk.pack_wscales(s, dtype)
  assert ours.shape == (nk.ceil_to(k, 128) // 64, nk.ceil_to(n, 128))
  assert_same(ours, PACKER.pack_scale(PACKER.pad_scale(n2t(s).view(n, 1, -1, 1), 64), 64), "wscales")
  assert_same(nk.unpack_wscales(ours, n, k), s, "unpack_wscales")


@pytest.mark.parametrize("n,k", [(200, 208), (128, 256), (72, 48)])
def test_microscales_match_packer(n, k):
  rng = np.random.default_rng(n + k)
  j, j_p = k // 16, nk.ceil_to(k, 128) // 16
  s16 = rng.integers(0, 0x7F, (n, j)).astype(np.uint8).view(FP8).astype(np.float32)  # every finite e4m3 >= 0
  ours = nk.pack_microscales(s16)
  assert ours.dtype == FP8 and ours.shape == (j_p, nk.ceil_to(n, 128))
  # deepcompressor pads the groups to a multiple of 4 only (for K=48: 4 rows, the engine reads
  # K_p/16 = 8); give it the engine's padding up front, then its own padding changes nothing.
  padded = np.ones((n, j_p), np.float32)
  padded[:, :j] = s16
  theirs = PACKER.pack_micro_scale(PACKER.pad_scale(torch.from_numpy(padded).bfloat16().view(n, 1, -1, 1), 16), 16)
  assert_same(ours, theirs, "microscales")
  assert_same(nk.unpack_microscales(ours, n, k), s16, "unpack_microscales")


@pytest.mark.parametrize("n", [5, 128, 200])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_vectors_match_packer(n, dtype):
  v = rand16(np.random.default_rng(n), (n,), dtype)
  ours = nk.pack_vector(v, dtype)
  assert_same(ours, PACKER.pack_scale(PACKER.pad_scale(n2t(v).view(-1, 1), -1), -1), "vector")
  assert_same(nk.unpack_vector(ours, n), v, "unpack_vector")
  n_p = nk.ceil_to(n, 128)  # the fill goes to the padded channels only
  want = np.concatenate([v, np.zeros(n_p - n, dtype)])
  assert_same(nk.unpack_vector(nk.pack_vector(v, dtype, fill=0.0), n_p), want, "fill")


@pytest.mark.parametrize("r", [1, 16, 20, 32])
@pytest.mark.parametrize("n,k", [(200, 192), (128, 300)])
def test_lowrank_matches_packer(n, k, r):
  rng = np.random.default_rng(r)
  dn, up = rand16(rng, (r, k)), rand16(rng, (n, r))
  p_dn, p_up = nk.pack_lora_down(dn, BF16), nk.pack_lora_up(up, BF16)
  r_p = nk.ceil_to(r, 16)
  assert p_dn.shape == (nk.ceil_to(k, 128), r_p) and p_up.shape == (nk.ceil_to(n, 128), r_p)
  assert_same(p_dn, PACKER.pack_lowrank_weight(PACKER.pad_lowrank_weight(n2t(dn), down=True), down=True), "down")
  assert_same(p_up, PACKER.pack_lowrank_weight(PACKER.pad_lowrank_weight(n2t(up), down=False), down=False), "up")
  # our unpackers keep the rank padding (zeros); deepcompressor's also keep the N/K padding
  back_dn, back_up = nk.unpack_lora_down(p_dn, k), nk.unpack_lora_up(p_up, n)
  assert back_dn.shape == (r_p, k) and back_up.shape == (n, r_p)
  assert_same(back_dn[:r], dn)
  assert_same(back_up[:, :r], up)
  assert not back_dn[r:].any() and not back_up[:, r:].any()
  assert_same(back_dn, t2n(PACKER.unpack_lowrank_weight(n2t(p_dn), down=True))[:, :k], "theirs unpack down")
  assert_same(back_up, t2n(PACKER.unpack_lowrank_weight(n2t(p_up), down=False))[:n], "theirs unpack up")


def test_awq_qweight_matches_tinychat():
  u = np.random.default_rng(3).integers(0, 16, (48, 256))
  ours = nk.pack_awq_qweight(u)
  assert ours.dtype == np.int32 and ours.shape == (12, 128)
  assert_same(ours, dc_tinychat.pack_w4(torch.from_numpy(u).int()).view(torch.int32), "awq qweight")
  back = nk.unpack_awq_qweight(ours)
  assert back.dtype == np.uint8 and np.array_equal(back, u)


@pytest.mark.parametrize("S", [6, 3])
def test_interleave_matches_deepcompressor(S):  # noqa: N803
  x = np.arange(S * 8 * 5, dtype=np.float32).reshape(S * 8, 5)
  ours = nk.interleave_rows(x, S)
  assert_same(ours, dc_lora.reorder_adanorm_lora_up(torch.from_numpy(x), S), "interleave")
  assert ours[S * 3 + 1, 0] == x[1 * 8 + 3, 0]  # stored row d·S + c = chunk c, channel d
  assert np.array_equal(nk.deinterleave_rows(ours, S), x)
  assert np.array_equal(nk.interleave_rows(x[:, 0], S), ours[:, 0])  # 1-D works the same


# ----------------------------------------------------------------------------- straight to our packing
@pytest.mark.parametrize("n,k", [(128, 128), (200, 192), (8, 320), (256, 512), (384, 64)])
@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_repack_qweight_equals_our_packing_of_the_codes(fmt, n, k):
  rng = np.random.default_rng(n + k)
  signed = fmt == "int4"
  codes = rng.integers(-8, 8, (n, k)) if signed else rng.integers(0, 16, (n, k))
  codes[0, :16] = np.arange(-8, 8) if signed else np.arange(16)
  stored = nk.pack_qweight(codes)  # deepcompressor's bytes (test_qweight_matches_packer)
  ours = nk.repack_qweight(stored, n, k)
  want = packing.pack_int4(codes.astype(np.int8 if signed else np.uint8), signed=signed)
  assert ours.dtype == np.uint8 and ours.flags.c_contiguous
  assert_same(ours, want, "repacked qweight")
  # code (row 3, column 40) sits in row 3, byte 8 (its 64-block's byte 40 - 32), high nibble
  assert (ours[3, 8] >> 4) == (codes[3, 40] & 0xF)
  dec = nk.decode_w4a4({"qweight": stored, "wscales": np.ones((nk.ceil_to(k, 128) // 64, nk.ceil_to(n, 128)), BF16)
                        if signed else np.ones((nk.ceil_to(k, 128) // 16, nk.ceil_to(n, 128)), FP8),
                        "bias": np.zeros(nk.ceil_to(n, 128), BF16), "smooth": np.ones(nk.ceil_to(k, 128), BF16)},
                       n, k, fmt, repack=True)
  assert "codes" not in dec and np.array_equal(dec["packed"], want)
  buffer = stored.copy()
  in_place = nk.repack_qweight(buffer, n, k, overwrite=True)
  assert_same(in_place, want, "repacked in place")
  if (n, k) == (nk.ceil_to(n, 128), nk.ceil_to(k, 128)):  # no padding to strip: the result is the buffer
    assert np.shares_memory(in_place, buffer)
  stored.flags.writeable = False  # e.g. a file mapping: left alone
  assert np.array_equal(nk.repack_qweight(stored, n, k, overwrite=True), want)
  assert np.array_equal(stored, nk.pack_qweight(codes))


@pytest.mark.parametrize("S,n,k", [(6, 48, 256), (3, 96, 128), (1, 8, 64), (6, 72, 192), (3, 12, 1024)])
def test_repack_awq_qweight_equals_our_packing_of_the_codes(S, n, k):  # noqa: N803
  rng = np.random.default_rng(S * n + k)
  u = rng.integers(0, 16, (n, k))  # diffusers row order
  stored = nk.pack_awq_qweight(nk.interleave_rows(u, S))  # tinychat's bytes (test_awq_qweight_matches_tinychat)
  ours = nk.repack_awq_qweight(stored, S)
  want = packing.pack_int4(u.astype(np.uint8), signed=False)
  assert ours.dtype == np.uint8 and ours.shape == (n, k // 2)
  assert_same(ours, want, "repacked AWQ qweight")
  tensors = nk.awq_tensors(u=u, wscales=np.ones((n, k // 64)), S=S, dtype=BF16)
  dec = nk.decode_awq(tensors, S, repack=True)
  assert "u" not in dec and np.array_equal(dec["packed"], want)
  assert np.array_equal(dec["wscales"], nk.decode_awq(tensors, S)["wscales"])


def test_repack_in_many_slices(monkeypatch):
  """Slices of two 128-row tiles / two runs of rows, the last one partial: the same bytes."""
  rng = np.random.default_rng(11)
  codes = rng.integers(-8, 8, (5 * 128 - 56, 192))  # 5 tiles (K_p = 256: 16 KiB a tile)
  monkeypatch.setattr(nunchaku_layout, "_CHUNK_BYTES", 2 * 16384)
  ours = nk.repack_qweight(nk.pack_qweight(codes), *codes.shape)
  assert_same(ours, packing.pack_int4(codes.astype(np.int8)), "qweight in slices of 2, 2, 1 tiles")
  ours = nk.repack_qweight(nk.pack_qweight(codes), *codes.shape, overwrite=True)
  assert_same(ours, packing.pack_int4(codes.astype(np.int8)), "qweight in place, in slices")
  u = rng.integers(0, 16, (5 * 12, 128))  # S = 6: 5 runs of lcm(4, 6) = 12 rows, 768 bytes each
  monkeypatch.setattr(nunchaku_layout, "_CHUNK_BYTES", 2 * 768)
  ours = nk.repack_awq_qweight(nk.pack_awq_qweight(nk.interleave_rows(u, 6)), 6)
  assert_same(ours, packing.pack_int4(u.astype(np.uint8), signed=False), "AWQ qweight in slices of 2, 2, 1 runs")


# ----------------------------------------------------------------------------- AWQ (adaLN) layer
@pytest.mark.parametrize("S,k", [(6, 1024), (3, 1024), (6, 192)])
def test_awq_layer_matches_adanorm_converter(S, k):  # noqa: N803
  rng = np.random.default_rng(S * k)
  n = 48
  q = rng.integers(-7, 8, (n, k))
  s = (rng.random((n, k // 64)) * 0.1 + 0.01).astype(np.float32).astype(BF16)  # not powers of two: -bf16(7s) rounds
  w = (q.reshape(n, -1, 64) * s.astype(np.float32)[..., None]).reshape(n, k).astype(BF16)
  bias = rand16(rng, (n,))
  bias[[0, 5]] = -0.0  # deepcompressor adds 0 to every chunk, turning -0 into +0
  fn = (dc_convert.convert_to_nunchaku_w4x16_adanorm_zero_state_dict if S == 6
        else dc_convert.convert_to_nunchaku_w4x16_adanorm_single_state_dict)
  theirs = fn(weight=n2t(w), scale=n2t(s).view(n, 1, -1, 1), bias=n2t(bias).clone())
  ours = nk.awq_tensors(u=q + 7, wscales=s, bias=bias, S=S, dtype=BF16)
  assert sorted(ours) == sorted(theirs) == sorted(nk.AWQ_KEYS)
  for key in ("qweight", "bias"):
    assert_same(ours[key], theirs[key], key)
  g = k // 64  # deepcompressor pads the group rows to a multiple of 16 (with 0); the engine reads K/64
  assert t2n(theirs["wscales"]).shape[0] == nk.ceil_to(g, 16)
  for key in ("wscales", "wzeros"):
    assert ours[key].shape == (g, n)
    assert_same(ours[key], t2n(theirs[key])[:g], key)
  assert not (np.float32(-7) * s.astype(np.float32) == ours["wzeros"].T.astype(np.float32)).all()  # rounding seen

  dec = nk.decode_awq(ours, S)
  assert np.array_equal(dec["u"], q + 7) and dec["u"].dtype == np.uint8
  assert_same(dec["wscales"], s)
  assert_same(dec["wzeros"], nk.awq_symmetric_zeros(s, BF16))
  assert_same(dec["bias"], nk.deinterleave_rows(t2n(theirs["bias"]), S), "decoded bias")
  chunks = np.arange(n) // (n // S)
  scale_rows = np.isin(chunks, nk.adaln_scale_chunks(S))
  assert np.array_equal(dec["bias"].astype(np.float32)[~scale_rows], bias.astype(np.float32)[~scale_rows])
  want = (bias.astype(np.float32)[scale_rows] + 1).astype(BF16)
  assert_same(dec["bias"][scale_rows], want, "folded bias")
  theirs_dec = nk.decode_awq({key: t2n(v) for key, v in theirs.items()}, S)  # its zero-padded scale rows are accepted
  assert np.array_equal(theirs_dec["u"], q + 7)
  assert_same(theirs_dec["wzeros"], dec["wzeros"])
  unfolded = nk.decode_awq(ours, S, unfold_bias=True)["bias"]
  b32 = bias.astype(np.float32)  # off by the fold's rounding of 1 + b only (half an ulp)
  assert np.all(np.abs(unfolded - b32) <= 2 ** -8 * np.abs(1 + b32)) and np.any(unfolded != b32)
  deq = nk.dequantize_awq(dec["u"], dec["wscales"], dec["wzeros"])  # u·s + z vs q·s: the zero's rounding only
  s_k = np.repeat(s.astype(np.float32), 64, axis=1)
  assert np.all(np.abs(deq - q * s_k) <= 2 ** -8 * 7 * s_k)
  plain = nk.awq_tensors(u=q + 7, wscales=s, bias=bias, S=S, dtype=BF16, fold_bias=False)["bias"]
  assert np.array_equal(nk.deinterleave_rows(plain, S).astype(np.float32), bias.astype(np.float32))


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_unfold_adaln_bias_is_exact(dtype):
  bits = np.arange(1 << 16, dtype=np.uint16).view(np.int16 if dtype == FP16 else np.uint16)
  vals = bits.view(dtype)
  vals = vals[np.isfinite(vals.astype(np.float32)) & (np.abs(vals.astype(np.float32)) < 2 ** 15)]
  bias = np.concatenate([vals, vals, vals])  # S = 3: chunk 1 is the scale chunk
  folded = nk.fold_adaln_bias(bias, 3, dtype)
  back = nk.unfold_adaln_bias(folded, 3)
  stored = nk.deinterleave_rows(folded, 3).astype(np.float64)
  m = len(vals)
  assert np.array_equal(back[m:2 * m].astype(np.float64), stored[m:2 * m] - 1)  # no second rounding
  assert np.array_equal(back[:m], vals.astype(np.float32) + 0)  # other chunks untouched (+0 for -0)
  b = vals.astype(np.float64)
  ulp_rel = 2.0 ** (-8 if dtype == BF16 else -11)
  assert np.all(np.abs(back[m:2 * m] - b) <= ulp_rel * np.abs(1 + b))  # the fold's one rounding, half an ulp


# ----------------------------------------------------------------------------- W4A4 layer
def _w4a4_case(case: str, dtype=BF16, seed: int = 0):
  """Our per-layer quantities and deepcompressor's fake-quant inputs for the same layer."""
  rng = np.random.default_rng(seed)
  fmt = "int4" if case.startswith("int4") else "nvfp4"
  n, k, r = 216, (192 if fmt == "int4" else 208), 20
  lam = np.exp(rng.standard_normal(k) * 0.5).astype(np.float32)
  a, b = rand16(rng, (r, k), dtype, 0.1), rand16(rng, (n, r), dtype, 0.1)
  bias0 = rand16(rng, (n,), dtype)
  ours = {"smooth": lam, "fmt": fmt}
  theirs = {"smooth": torch.from_numpy(lam), "float_point": fmt == "nvfp4"}
  if fmt == "int4":
    codes = rng.integers(-8, 8, (n, k))
    codes[:, 0] = -8
    s = pow2(rng, (n, k // 64), -8, -2)
    w = (codes.reshape(n, -1, 64) * s[..., None]).reshape(n, k)
    ours.update(codes=codes, wscales=s)
    theirs["scale"] = torch.from_numpy(s).to(n2t(np.zeros(1, dtype)).dtype).view(n, 1, -1, 1)
  else:
    codes = rng.choice(np.r_[0:8, 9:16], (n, k))  # no code 8 (-0; see test_e2m1_negative_zero)
    s16 = pow2(rng, (n, k // 16), -6, 3)
    if case == "nvfp4_qkv":  # three members, each with its per-tensor scale -> per-channel wcscales
      tensor = np.repeat(np.float32([2 ** -2, 2 ** -4, 2 ** -3]), n // 3)
      ours["wcscales"] = tensor
      theirs["scale"] = torch.from_numpy(tensor).view(n, 1, 1, 1)
    else:
      tensor = np.full(n, 2 ** -3, np.float32)
      ours["wtscale"] = 2 ** -3
      theirs["scale"] = torch.tensor([2 ** -3], dtype=torch.float32)
    theirs["scale"] = theirs["scale"].to(n2t(np.zeros(1, dtype)).dtype)
    theirs["subscale"] = torch.from_numpy(s16).to(theirs["scale"].dtype).view(n, 1, -1, 1)
    w = (E2M1[codes].reshape(n, -1, 16) * s16[..., None]).reshape(n, k) * tensor[:, None]
    ours.update(codes=codes, wscales=s16)
  assert np.array_equal(w.astype(dtype).astype(np.float32), w)  # exact in 16 bits: same codes on both sides
  theirs["weight"] = n2t(w.astype(dtype))
  shift = SHIFT if case == "int4_shifted" else 0.0
  if case != "int4_nobranch":
    ours["lora_down"], ours["lora_up"], ours["bias"] = nk.branch_to_engine(a, b, lam, bias0, shift, dtype)
    theirs["lora"] = (n2t(a), n2t(b))
  else:
    ours["bias"] = bias0
  theirs["bias"] = n2t(bias0).clone()
  if shift:
    theirs["shift"] = torch.tensor(shift)
  return ours, theirs, (n, k, r, a, b, bias0, shift)


W4A4_CASES = ["int4", "int4_shifted", "int4_nobranch", "nvfp4", "nvfp4_qkv"]


@pytest.mark.parametrize("case", W4A4_CASES)
def test_w4a4_layer_matches_converter(case):
  ours_in, theirs_in, (n, k, r, a, b, bias0, shift) = _w4a4_case(case)
  theirs = dc_convert.convert_to_nunchaku_w4x4y16_linear_state_dict(**theirs_in)
  fmt = ours_in.pop("fmt")
  ours = nk.w4a4_tensors(fmt=fmt, dtype=BF16, **ours_in)
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    assert_same(ours[key], theirs[key], key)
  if case == "int4_shifted":  # the branch's shift term moved into the bias: it changed
    assert not np.array_equal(ours_in["bias"], bias0)

  dec = nk.decode_w4a4(ours, n, k, fmt)
  assert np.array_equal(dec["codes"], ours_in["codes"])
  assert np.array_equal(dec["wscales"].astype(np.float32), ours_in["wscales"])
  assert_same(dec["smooth"], ours_in["smooth"].astype(BF16))
  assert_same(dec["smooth_orig"], dec["smooth"])
  assert_same(dec["bias"], ours_in["bias"].astype(BF16))
  assert dec["wtscale"] == ours_in.get("wtscale")
  if "wcscales" in ours_in:
    assert np.array_equal(dec["wcscales"].astype(np.float32), ours_in["wcscales"])
  else:
    assert dec["wcscales"] is None
  if case == "int4_nobranch":
    assert dec["lora_down"] is None and dec["lora_up"] is None
  else:
    assert dec["lora_down"].shape == (32, k) and dec["lora_up"].shape == (n, 32)
    assert_same(dec["lora_down"][:r], ours_in["lora_down"])
    assert_same(dec["lora_up"][:, :r], b)
    assert not dec["lora_down"][r:].any() and not dec["lora_up"][:, r:].any()


def test_w4a4_fp16_shifted_matches_converter():
  ours_in, theirs_in, _ = _w4a4_case("int4_shifted", FP16, seed=1)
  theirs = dc_convert.convert_to_nunchaku_w4x4y16_linear_state_dict(**theirs_in)
  ours = nk.w4a4_tensors(fmt=ours_in.pop("fmt"), dtype=FP16, **ours_in)
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    assert_same(ours[key], theirs[key], key)


def test_branch_to_engine_values():
  rng = np.random.default_rng(5)
  a, b = rand16(rng, (4, 64)), rand16(rng, (32, 4))
  lam = np.exp(rng.standard_normal(64)).astype(np.float32)
  bias0 = rand16(rng, (32,))
  down, up, bias = nk.branch_to_engine(a, b, lam, bias0, SHIFT, BF16)
  np.testing.assert_allclose(down.astype(np.float32), a.astype(np.float32) / lam, rtol=2 ** -8)
  want = bias0.astype(np.float64) + b.astype(np.float64) @ (a.astype(np.float64) / lam) @ np.full(64, SHIFT)
  np.testing.assert_allclose(bias.astype(np.float64), want, rtol=2 ** -8, atol=1e-6)
  assert_same(up, b)
  assert_same(nk.branch_to_engine(a, b, lam, bias0, 0.0, BF16)[2], bias0)  # unshifted: the bias is unchanged


def test_float64_rounds_through_float32_like_torch():
  x = np.array([1 + 2 ** -8 + 2 ** -30, 1 + 3 * 2 ** -8 - 2 ** -30, -(1 + 2 ** -8 + 2 ** -40)], np.float64)
  assert not np.array_equal(x.astype(BF16), x.astype(np.float32).astype(BF16))  # the values do double-round
  for dtype, tdtype in ((BF16, torch.bfloat16), (FP16, torch.float16)):
    assert_same(nk.to_dtype(x, dtype), torch.from_numpy(x).to(tdtype))


def test_e2m1_negative_zero():
  rng = np.random.default_rng(8)
  n, k = 128, 128
  codes = rng.integers(0, 16, (n, k))
  codes[3, :10] = 8
  canonical = np.where(codes == 8, 0, codes)
  raw = nk.pack_qweight(codes)  # the layout packer stores what it is given: nibble 8 round-trips
  assert np.array_equal(nk.unpack_qweight(raw, n, k, signed=False), codes)
  assert not np.array_equal(raw, nk.pack_qweight(canonical))
  s16 = pow2(rng, (n, k // 16), -4, 2)
  w = (E2M1[codes].reshape(n, -1, 16) * s16[..., None]).reshape(n, k)  # -0.0 where the code is 8
  ours = nk.w4a4_tensors(codes=codes, wscales=s16, fmt="nvfp4", smooth=np.ones(k), wtscale=1.0, dtype=BF16)
  theirs = dc_convert.convert_to_nunchaku_w4x4y16_linear_state_dict(
      weight=torch.from_numpy(w).bfloat16(), scale=torch.ones(1, dtype=torch.bfloat16), float_point=True,
      subscale=torch.from_numpy(s16).bfloat16().view(n, 1, -1, 1))
  assert_same(ours["qweight"], theirs["qweight"], "qweight with -0")  # both write code 8 as +0
  assert_same(ours["qweight"], nk.pack_qweight(canonical))


# ----------------------------------------------------------------------------- LoRA merge
def test_lora_merge_matches_convert_lora():
  rng = np.random.default_rng(11)
  k, d, r0 = 128, 128, 20
  shapes = {"qkv_proj": 3 * d, "qkv_proj_context": 3 * d, "mlp_fc1": 2 * d, "out_proj": d}
  base = {}
  for name, n in shapes.items():
    base[f"blk.{name}.lora_down"] = nk.pack_lora_down(rand16(rng, (r0, k)), BF16)
    base[f"blk.{name}.lora_up"] = nk.pack_lora_up(rand16(rng, (n, r0)), BF16)
  f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
  a_shared = f32(8, k)
  extra = {  # q, k, v share A (B rows stacked); add_q/add_v differ and add_k is missing (rank-stacked)
      "attn.to_q": (a_shared, f32(d, 8)), "attn.to_k": (a_shared.copy(), f32(d, 8)), "attn.to_v": (a_shared, f32(d, 8)),
      "attn.add_q_proj": (f32(8, k), f32(d, 8)), "attn.add_v_proj": (f32(8, k), f32(d, 8)),
      "ff.net.0.proj": (f32(12, k), f32(2 * d, 12)), "ff.net.2": (f32(12, 2 * d), f32(d, 12)),  # fc2: no base
      "norm1.linear": (f32(5, 64), f32(48, 5)), "norm.linear": (f32(20, 64), f32(24, 20)),  # adaLN, S=6 / S=3
  }
  extra_dict = {f"cand.{m}.lora_{x}.weight": torch.from_numpy(t) for m, (A, B) in extra.items()
                for x, t in (("A", A), ("B", B))}
  local = {"qkv_proj": ["attn.to_q", "attn.to_k", "attn.to_v"],
           "qkv_proj_context": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
           "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
           "norm1.linear": "norm1.linear", "norm.linear": "norm.linear"}
  kinds = {name: "linear" for name in local} | {"norm1.linear": "adanorm_zero", "norm.linear": "adanorm_single"}
  theirs = dc_lora.convert_to_nunchaku_transformer_block_lowrank_dict(
      orig_state_dict={key: n2t(v) for key, v in base.items()}, extra_lora_dict=extra_dict, converted_block_name="blk",
      candidate_block_name="cand", local_name_map=local, convert_map=kinds, default_dtype=torch.bfloat16)

  def merged(name, members, k_in):
    a_e, b_e = nk.fuse_member_loras([extra.get(m) for m in members]) if len(members) > 1 else extra[members[0]]
    if f"blk.{name}.lora_down" in base:
      dn0 = nk.unpack_lora_down(base[f"blk.{name}.lora_down"], k_in)
      up0 = nk.unpack_lora_up(base[f"blk.{name}.lora_up"], b_e.shape[0])
      dn, up = nk.lora_concat(dn0, up0, a_e, b_e)
    else:
      dn, up = nk.lora_concat(None, None, a_e, b_e)
    assert dn.shape[0] % 16 == 0
    return {f"{name}.lora_down": nk.pack_lora_down(dn, BF16), f"{name}.lora_up": nk.pack_lora_up(up, BF16)}

  ours = {}
  ours |= merged("qkv_proj", local["qkv_proj"], k)
  ours |= merged("qkv_proj_context", local["qkv_proj_context"], k)
  ours |= merged("mlp_fc1", ["ff.net.0.proj"], k)
  ours |= merged("mlp_fc2", ["ff.net.2"], 2 * d)
  ours |= {f"norm1.linear.{x}": v for x, v in nk.awq_lora_tensors(*extra["norm1.linear"], 6, BF16).items()}
  ours |= {f"norm.linear.{x}": v for x, v in nk.awq_lora_tensors(*extra["norm.linear"], 3, BF16).items()}
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    assert_same(ours[key], theirs[key], key)
  assert ours["qkv_proj.lora_down"].shape == (k, 48)  # 20 -> 32 base, + 8 shared -> 40 -> 48
  assert ours["qkv_proj_context.lora_down"].shape == (k, 64)  # 32 + 3·8 rank-stacked -> 56 -> 64


def test_fuse_member_loras_forms():
  rng = np.random.default_rng(2)
  a1, a2 = rng.standard_normal((2, 3, 16)).astype(np.float32)
  b1, b2 = rng.standard_normal((2, 4, 3)).astype(np.float32)
  a_e, b_e = nk.fuse_member_loras([(a1, b1), None, (a1.copy(), b2)])
  assert np.array_equal(a_e, a1) and np.array_equal(b_e, np.concatenate([b1, np.zeros_like(b1), b2]))
  a_e, b_e = nk.fuse_member_loras([(a1, b1), None, (a2, b2)], rows=[4, 2, 4])
  assert np.array_equal(a_e, np.concatenate([a1, a1, a2])) and b_e.shape == (10, 9)
  x = rng.standard_normal(16).astype(np.float32)  # block-diagonal: each member sees only its own ranks
  np.testing.assert_allclose(b_e @ (a_e @ x), np.concatenate([b1 @ (a1 @ x), np.zeros(2), b2 @ (a2 @ x)]),
                             rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
I4 = np.zeros((128, 128), np.int64)
BAD = [
    (lambda: nk.pack_qweight(I4.astype(np.float32)), r"codes: expected integer codes, got dtype float32"),
    (lambda: nk.pack_qweight(I4[0]), r"codes: expected shape \[2-D\], got \[128\]"),
    (lambda: nk.pack_qweight(I4 + 16), r"codes must lie in \[-8, 15\], got min 16"),
    (lambda: nk.pack_qweight(np.array([[-1, 9]])), r"mix negative INT4 codes"),
    (lambda: nk.unpack_qweight(np.zeros((128, 32), np.int8), 128, 128, signed=True),
     r"qweight: expected stored shape \[128, 64\], got \[128, 32\]"),
    (lambda: nk.repack_qweight(np.zeros((128, 64), np.int8), 128, 96), r"repack_qweight: K=96 is not a multiple of 64"),
    (lambda: nk.repack_qweight(np.zeros((128, 32), np.int8), 128, 128),
     r"repack_qweight: qweight: expected stored shape \[128, 64\], got \[128, 32\]"),
    (lambda: nk.repack_awq_qweight(np.zeros((12, 32), np.int64), 6), r"expected int32 \[N/4, K/2\] .* got int64"),
    (lambda: nk.repack_awq_qweight(np.zeros((10, 32), np.int32), 6), r"N=40 rows are not divisible by S=6"),
    (lambda: nk.pack_wscales(np.ones((4, 2)), np.float32), r"pack_wscales: dtype: .*bfloat16 or float16, got float32"),
    (lambda: nk.pack_microscales(np.full((4, 4), 500.0)), r"s16 must be finite and within ±448"),
    (lambda: nk.unpack_microscales(np.ones((8, 128), BF16), 128, 128), r"expected dtype float8_e4m3fn, got bfloat16"),
    (lambda: nk.unpack_lora_down(np.zeros((128, 16), BF16), 300), r"expected stored shape \[384, r_p\].*K=300"),
    (lambda: nk.w4a4_tensors(codes=I4 + 8, wscales=np.ones((128, 2)), fmt="int4", smooth=np.ones(128), dtype=BF16),
     r"codes \(int4\): codes must lie in \[-8, 7\], got min 8"),
    (lambda: nk.w4a4_tensors(codes=I4, wscales=np.ones((128, 3)), fmt="int4", smooth=np.ones(128), dtype=BF16),
     r"wscales \(int4\): expected shape \[128x2\], got \[128, 3\]"),
    (lambda: nk.w4a4_tensors(codes=I4[:, :100], wscales=np.ones((128, 1)), fmt="int4", smooth=np.ones(100),
                             dtype=BF16), r"K=100 \(codes \[128, 100\]\) is not a multiple of the int4 group 64"),
    (lambda: nk.w4a4_tensors(codes=I4, wscales=np.ones((128, 2)), fmt="int4", smooth=np.ones(128),
                             lora_down=np.ones((4, 128)), lora_up=np.ones((128, 5)), dtype=BF16),
     r"lora_up: expected shape \[128x4\], got \[128, 5\]"),
    (lambda: nk.w4a4_tensors(codes=I4, wscales=np.ones((128, 2)), fmt="int4", smooth=np.ones(128), wtscale=1.0,
                             dtype=BF16), r"int4 layers have none"),
    (lambda: nk.w4a4_tensors(codes=I4, wscales=np.ones((128, 8)), fmt="fp4", smooth=np.ones(128), dtype=BF16),
     r"fmt must be one of \('int4', 'nvfp4'\), got 'fp4'"),
    (lambda: nk.decode_w4a4({"qweight": 0, "wscales": 0, "bias": 0}, 128, 128, "int4"),
     r"missing required tensors \['smooth'\]"),
    (lambda: nk.decode_w4a4({"qweight": nk.pack_qweight(I4), "wscales": np.ones((2, 128), BF16), "bias": 0,
                             "smooth": 0}, 128, 128, "nvfp4"), r"wscales dtype bfloat16 does not match fmt='nvfp4'"),
    (lambda: nk.awq_tensors(u=np.zeros((48, 96), np.int64), wscales=np.ones((48, 1)), S=6, dtype=BF16),
     r"u must be \[N, K\] with N % 4 == 0 and K % 64 == 0, got \[48, 96\]"),
    (lambda: nk.pack_awq_qweight(np.zeros((6, 64), np.int64)), r"N % 4 == 0 .* got \[6, 64\]"),
    (lambda: nk.awq_tensors(u=np.zeros((40, 64), np.int64), wscales=np.ones((40, 1)), S=6, dtype=BF16),
     r"N=40 rows are not divisible by S=6"),
    (lambda: nk.awq_tensors(u=np.full((48, 64), 16), wscales=np.ones((48, 1)), S=6, dtype=BF16),
     r"u: codes must lie in \[0, 15\], got min 16"),
    (lambda: nk.interleave_rows(np.ones(8), 2), r"S must be 1 .* or the number of adaLN chunks >= 3, got 2"),
    (lambda: nk.decode_awq({"qweight": np.zeros((12, 32), np.int32), "wscales": np.ones((1, 24)),
                            "wzeros": np.ones((1, 48)), "bias": np.ones(48)}, 6),
     r"wscales must be \[K/64=1, N=48\] \(qweight \[12, 32\]\), got \[1, 24\]"),
    (lambda: nk.branch_to_engine(np.ones((4, 64)), np.ones((8, 4)), np.ones(32), None, 0.0, BF16),
     r"smooth: expected shape \[64\], got \[32\]"),
    (lambda: nk.lora_concat(np.ones((16, 64), BF16), np.ones((8, 16), BF16), np.ones((4, 32)), np.ones((8, 4))),
     r"dn0: expected shape \[\?x32\], got \[16, 64\]"),
]


@pytest.mark.parametrize("fn,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_input_errors(fn, message):
  with pytest.raises(nk.NunchakuFormatError, match=message):
    fn()
