"""PNG I/O (Pillow, checked against an independent zlib decode), to_uint8 (against diffusers), contact
sheets, prompt lists and seeds."""

import io
import json
import os
import random
import struct
import zlib

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from svdquant_jax.pipelines import images as I
from svdquant_jax.pipelines import prompts as P

_PIL_MODE = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def _test_image(h, w, c, seed=0):
  """Noise, gradients and repeated rows, so that PNG encoders pick every filter type."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  planes = [(x * 7 + y * 3) % 256, np.sin(x / 3) * 100 + 128 + y, rng.integers(0, 256, (h, w)), (x * y) % 256]
  image = np.stack(planes[:c], -1).astype(np.uint8)
  image[: h // 4] = rng.integers(0, 256, (h // 4, w, c))
  image[h // 4: h // 4 + 3] = image[h // 4 - 1: h // 4] if h >= 8 else image[h // 4: h // 4 + 3]
  return image


def _chunks(data: bytes) -> list:
  """``(kind, body)`` of every chunk of a PNG (a minimal independent chunk walk)."""
  pos, out = 8, []
  while pos < len(data):
    (length,) = struct.unpack(">I", data[pos:pos + 4])
    out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
    pos += 12 + length
  return out


def _scanlines(data: bytes) -> np.ndarray:
  """The filtered scanlines of an 8-bit non-interlaced PNG: uint8 [H, 1 + W * C] (filter byte first)."""
  chunks = _chunks(data)
  width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
  assert (depth, interlace) == (8, 0)
  bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
  idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
  return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)


def _reference_decode(data: bytes) -> np.ndarray:
  """An independent (slow, pixel-by-pixel) PNG unfilter, so that the round trip is not Pillow vs Pillow."""
  chunks = _chunks(data)
  width, height, _, color_type, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
  bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
  rows = _scanlines(data).astype(np.int64)
  out = np.zeros((height, width * bpp), np.int64)
  for r in range(height):
    kind, line = rows[r, 0], rows[r, 1:]
    for i in range(width * bpp):
      a = out[r, i - bpp] if i >= bpp else 0
      b = out[r - 1, i] if r else 0
      c = out[r - 1, i - bpp] if r and i >= bpp else 0
      p = a + b - c
      paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (b if abs(p - b) <= abs(p - c) else c)
      out[r, i] = (line[i] + (0, a, b, (a + b) // 2, paeth)[kind]) % 256
  return out.reshape(height, width, bpp).astype(np.uint8)


def _with_chunk_patched(data: bytes, kind: bytes, patch) -> bytes:
  """Rewrites one chunk's body with ``patch(body)`` and recomputes its CRC."""
  out = [data[:8]]
  for k, body in _chunks(data):
    if k == kind:
      body = patch(body)
    out.append(struct.pack(">I", len(body)) + k + body + struct.pack(">I", zlib.crc32(k + body)))
  return b"".join(out)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (33, 5, 4), (16, 9, 1), (5, 8, 2), (12, 31, 4)])
def test_png_round_trip_is_bit_exact(tmp_path, shape):
  image = _test_image(*shape)
  path = tmp_path / "x.png"
  I.write_png(path, image)
  data = path.read_bytes()
  assert data.startswith(b"\x89PNG\r\n\x1a\n")
  back = I.read_png(path)
  assert back.dtype == np.uint8 and back.shape == shape
  np.testing.assert_array_equal(back, image)
  np.testing.assert_array_equal(_reference_decode(data), image)  # a decoder that is not Pillow agrees
  for level in (0, 1, 9):
    I.write_png(path, image, compress_level=level)
    np.testing.assert_array_equal(I.read_png(path), image)
  assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary files left


def test_png_round_trip_of_random_images(tmp_path):
  rng = np.random.default_rng(1)
  for k in range(20):
    h, w, c = int(rng.integers(1, 70)), int(rng.integers(1, 70)), int(rng.choice([1, 2, 3, 4]))
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    I.write_png(tmp_path / f"{k}.png", image)
    np.testing.assert_array_equal(I.read_png(tmp_path / f"{k}.png"), image, err_msg=f"{image.shape}")
  # [H, W] is gray; jax arrays are accepted.
  gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
  I.write_png(tmp_path / "g.png", jnp.asarray(gray))
  np.testing.assert_array_equal(I.read_png(tmp_path / "g.png", channels=1)[:, :, 0], gray)
  np.testing.assert_array_equal(I.decode_png((tmp_path / "g.png").read_bytes())[:, :, 0], gray)


def test_reads_pil_written_pngs_with_every_filter(tmp_path):
  seen_filters = set()
  for channels, mode in _PIL_MODE.items():
    image = _test_image(37, 29, channels, seed=channels)
    pil_image = Image.fromarray(image[:, :, 0] if channels == 1 else image, mode)
    for options in [{}, {"optimize": True}, {"compress_level": 0}, {"compress_level": 1},
                    {"compress_level": 9}]:
      path = tmp_path / f"{mode}-{len(options) and list(options.values())[0]}.png"
      pil_image.save(path, format="PNG", **options)
      seen_filters |= set(_scanlines(path.read_bytes())[:, 0].tolist())
      np.testing.assert_array_equal(I.read_png(path), image, err_msg=f"{mode} {options}")
  assert seen_filters == {0, 1, 2, 3, 4}  # the PIL files exercised all five filters


def test_reads_interlaced_pngs(tmp_path):
  # A 1 x 1 image has the same bytes interlaced or not; only the header's interlace flag differs.
  pixel = np.array([[[10, 20, 30]]], np.uint8)
  I.write_png(tmp_path / "p.png", pixel)
  interlaced = _with_chunk_patched((tmp_path / "p.png").read_bytes(), b"IHDR", lambda b: b[:12] + b"\x01")
  (tmp_path / "i.png").write_bytes(interlaced)
  with Image.open(tmp_path / "i.png") as pil:
    assert pil.info.get("interlace") == 1
  np.testing.assert_array_equal(I.read_png(tmp_path / "i.png"), pixel)


def test_write_png_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "x.png"
  old = _test_image(8, 9, 3, seed=1)
  I.write_png(path, old)
  before = path.read_bytes()

  def failing_save(self, fp, *args, **kwargs):
    fp.write(b"\x89PNG\r\n\x1a\n partial")  # some bytes reach the temporary file, then the encoder dies
    raise OSError("disk full")

  monkeypatch.setattr(Image.Image, "save", failing_save)
  with pytest.raises(OSError, match="disk full"):
    I.write_png(path, _test_image(8, 9, 3, seed=2))
  with pytest.raises(OSError, match="disk full"):
    I.write_png(tmp_path / "new.png", old)
  monkeypatch.undo()
  assert path.read_bytes() == before  # the previous file is untouched
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]  # no partial new.png, no temporary file
  np.testing.assert_array_equal(I.read_png(path), old)
  # Bad arrays are refused before anything is opened.
  with pytest.raises(I.PNGError, match="uint8"):
    I.write_png(tmp_path / "f.png", np.zeros((2, 2, 3), np.float32))
  with pytest.raises(I.PNGError, match="C in"):
    I.write_png(tmp_path / "f.png", np.zeros((2, 2, 5), np.uint8))
  with pytest.raises(I.PNGError, match="non-empty"):
    I.write_png(tmp_path / "f.png", np.zeros((0, 2, 3), np.uint8))
  with pytest.raises(I.PNGError, match="compress_level"):
    I.write_png(tmp_path / "f.png", old, compress_level=10)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_png_errors_name_the_file(tmp_path):
  good_path = tmp_path / "good.png"
  I.write_png(good_path, _test_image(9, 10, 3))
  good = good_path.read_bytes()

  def read(name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return I.read_png(path), str(path)

  def raises(name, data, match):
    path = str(tmp_path / name)
    with pytest.raises(I.PNGError, match=match) as info:
      read(name, data)
    assert path in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)

  for cut in (20, 40, 60, len(good) // 2, len(good) - 12, len(good) - 1):  # every kind of partial file
    raises(f"cut{cut}.png", good[:cut], "truncated")
  corrupt = bytearray(good)
  corrupt[45] ^= 0xFF  # inside the IDAT body: the CRC no longer matches
  raises("crc.png", bytes(corrupt), "corrupt")
  raises("empty.png", b"", "empty file")
  raises("gif.png", b"GIF89a" + good[6:], "not a PNG")
  raises("text.png", b"hello, world\n" * 10, "not a PNG")
  jpeg = io.BytesIO()
  Image.fromarray(_test_image(8, 8, 3)).save(jpeg, format="JPEG")
  raises("photo.png", jpeg.getvalue(), "not a PNG")
  bad_filter = _with_chunk_patched(good, b"IDAT", lambda b: zlib.compress(b"\x07" + zlib.decompress(b)[1:]))
  raises("bad_filter.png", bad_filter, "corrupt")  # filter type 7 does not exist
  # Valid PNGs that would need a conversion are refused, not converted.
  buffer = io.BytesIO()
  Image.fromarray(_test_image(8, 8, 3)).convert("P").save(buffer, format="PNG")
  raises("palette.png", buffer.getvalue(), "palette")
  buffer = io.BytesIO()
  Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buffer, format="PNG")
  raises("gray16.png", buffer.getvalue(), "16-bit")
  # 16-bit RGB, which Pillow would silently narrow to 8 bits: the header says depth 16, and each of
  # the 9 rows holds a filter byte and 10 pixels * 3 samples * 2 bytes.
  rgb16 = _with_chunk_patched(good, b"IHDR", lambda b: b[:8] + b"\x10" + b[9:])
  rgb16 = _with_chunk_patched(rgb16, b"IDAT", lambda b: zlib.compress((b"\x00" + bytes(range(60))) * 9))
  raises("rgb16.png", rgb16, "16-bit")
  buffer = io.BytesIO()
  Image.fromarray(_test_image(8, 8, 1)[:, :, 0] > 128).save(buffer, format="PNG")  # 1-bit
  raises("bilevel.png", buffer.getvalue(), "sub-byte")
  # The channel count can be required.
  assert read("rgb.png", good)[0].shape == (9, 10, 3)
  assert I.read_png(tmp_path / "rgb.png", channels=3).shape == (9, 10, 3)
  with pytest.raises(I.PNGError, match="expected 4 channel") as info:
    I.read_png(tmp_path / "rgb.png", channels=4)
  assert str(tmp_path / "rgb.png") in str(info.value)
  with pytest.raises(I.PNGError, match="not found") as info:
    I.read_png(tmp_path / "missing.png")
  assert str(tmp_path / "missing.png") in str(info.value)
  with pytest.raises(I.PNGError, match="cannot read"):
    I.read_png(tmp_path)  # a folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_uint8_matches_diffusers(dtype):
  g = torch.Generator().manual_seed(0)
  x = torch.rand(2, 3, 8, 16, generator=g) * 2.4 - 1.2  # includes values outside [-1, 1]
  # Values whose x * 255 lands exactly on .5 in float32 (ties round to even).
  x[0, 0, 0, :4] = torch.tensor([2 * 0.5 / 255 - 1, 2 * 1.5 / 255 - 1, -1.0, 1.0])
  x = x.to(dtype)
  processor = VaeImageProcessor()
  reference = processor.postprocess(x, output_type="np")
  reference = (reference * 255).round().astype(np.uint8)
  nhwc = x.float().permute(0, 2, 3, 1).numpy()
  ours_dtype = {torch.float32: np.float32, torch.bfloat16: ml_dtypes.bfloat16,
                torch.float16: np.float16}[dtype]
  ours = I.to_uint8(nhwc.astype(ours_dtype))
  assert ours.dtype == np.uint8 and ours.shape == (2, 8, 16, 3)
  np.testing.assert_array_equal(ours, reference)
  pil = processor.postprocess(x, output_type="pil")
  np.testing.assert_array_equal(ours[1], np.asarray(pil[1]))
  np.testing.assert_array_equal(I.to_uint8(jnp.asarray(nhwc.astype(ours_dtype))), reference)
  with pytest.raises(ValueError, match="float"):
    I.to_uint8(reference)


def test_contact_sheet_geometry():
  h, w, pad = 4, 6, 2
  images = np.stack([np.full((h, w, 3), 10 + 40 * k, np.uint8) for k in range(5)])
  images[:, 0, 0] = 7  # mark each image's top-left pixel
  sheet = I.contact_sheet(images, columns=3, pad=pad, background=255)
  assert sheet.shape == (2 * h + 3 * pad, 3 * w + 4 * pad, 3)
  for k in range(5):
    r, c = divmod(k, 3)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    np.testing.assert_array_equal(sheet[top:top + h, left:left + w], images[k])
  covered = np.zeros(sheet.shape[:2], bool)
  for k in range(5):
    r, c = divmod(k, 3)
    covered[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = True
  assert np.all(sheet[~covered] == 255)  # gutters and the empty sixth cell
  assert I.contact_sheet(images).shape == (2 * h + 3 * 4, 3 * w + 4 * 4, 3)  # 3 columns, pad 4
  assert I.contact_sheet(images[:2], columns=5, pad=0).shape == (h, 2 * w, 3)
  assert I.contact_sheet(images[:1], pad=0).shape == (h, w, 3)
  with pytest.raises(ValueError, match="columns"):
    I.contact_sheet(images, columns=0)
  with pytest.raises(ValueError, match="uint8"):
    I.contact_sheet(images.astype(np.float32))


def test_save_contact_sheet_and_images(tmp_path):
  images = np.stack([_test_image(5, 7, 3, seed=k) for k in range(3)])
  captions = ["a red bicycle", "two\tzebras\nat sunset", "a cat"]
  sheet_path, index_path = I.save_contact_sheet(tmp_path / "sheet.png", images, captions, columns=2, pad=1)
  assert index_path == str(tmp_path / "sheet.png") + ".txt"
  np.testing.assert_array_equal(I.read_png(sheet_path), I.contact_sheet(images, columns=2, pad=1))
  with open(index_path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines == ["row\tcolumn\tindex\tcaption", "0\t0\t0\ta red bicycle",
                   "0\t1\t1\ttwo zebras at sunset", "1\t0\t2\ta cat"]

  paths = I.save_images(tmp_path / "out", images, ["p0", "p1.png", "p 2"])
  assert [os.path.basename(p) for p in paths] == ["p0.png", "p1.png", "p 2.png"]
  for path, image in zip(paths, images):
    np.testing.assert_array_equal(I.read_png(path), image)
  with pytest.raises(ValueError, match="distinct"):
    I.save_images(tmp_path / "out", images, ["a", "a.png", "b"])
  with pytest.raises(ValueError, match="path separators"):
    I.save_images(tmp_path / "out", images, ["a", "../b", "c"])
  with pytest.raises(ValueError, match="2 names for 3 images"):
    I.save_images(tmp_path / "out", images, ["a", "b"])
  with pytest.raises(ValueError, match="2 captions for 3 images"):
    I.save_contact_sheet(tmp_path / "s.png", images, ["a", "b"])


def test_load_prompts_formats_and_errors(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("# calibration prompts\n\n  a dog on a couch  \nA bowl of soup\n   \n#skip\nred car\n")
  assert P.load_prompts(txt) == ["a dog on a couch", "A bowl of soup", "red car"]
  as_list = tmp_path / "l.json"
  as_list.write_text(json.dumps(["one", "two"]))
  assert P.load_prompts(as_list) == ["one", "two"]
  as_object = tmp_path / "o.json"
  as_object.write_text(json.dumps({"10": "ten", "02": "two", "1": "one"}))
  assert P.load_prompts(as_object) == ["two", "one", "ten"]  # ordered by key (string order)
  as_yaml = tmp_path / "qdiff.yaml"
  as_yaml.write_text("'0001': second prompt\n'0000': first prompt\n")
  assert P.load_prompts(as_yaml) == ["first prompt", "second prompt"]

  only_comments = tmp_path / "empty.txt"
  only_comments.write_text("# nothing\n\n")
  with pytest.raises(P.PromptError, match="no prompts"):
    P.load_prompts(only_comments)
  empty_list = tmp_path / "empty.json"
  empty_list.write_text("[]")
  with pytest.raises(P.PromptError, match="no prompts"):
    P.load_prompts(empty_list)
  with pytest.raises(P.PromptError, match="not found"):
    P.load_prompts(tmp_path / "missing.txt")
  with pytest.raises(P.PromptError, match="extension '.csv'"):
    P.load_prompts(tmp_path / "p.csv")
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps(["ok", 3]))
  with pytest.raises(P.PromptError, match="prompt 1"):
    P.load_prompts(bad)
  bad.write_text('"just a string"')
  with pytest.raises(P.PromptError, match="list of strings"):
    P.load_prompts(bad)
  bad.write_text("[1, 2")
  with pytest.raises(P.PromptError, match="invalid JSON"):
    P.load_prompts(bad)


def test_builtin_prompts():
  assert len(P.BUILTIN_PROMPTS) == 64
  assert len(set(P.BUILTIN_PROMPTS)) == 64
  assert all(isinstance(p, str) and p.strip() == p and 10 < len(p) < 120 for p in P.BUILTIN_PROMPTS)


def test_select_prompts_is_deepcompressor_shuffle():
  prompts = [f"prompt {i}" for i in range(40)]
  reference = list(prompts)
  random.Random(0).shuffle(reference)  # deepcompressor: shuffle, then the first n
  assert P.select_prompts(prompts, 12, seed=0) == reference[:12]
  assert P.select_prompts(prompts, 12, seed=0) == P.select_prompts(prompts, 12, seed=0)
  assert P.select_prompts(prompts, 12, seed=1) != reference[:12]
  ordered = P.select_prompts(prompts, 12, seed=0, keep_order=True)
  assert ordered == sorted(reference[:12], key=prompts.index)
  assert sorted(P.select_prompts(prompts, 40, seed=5)) == sorted(prompts)
  with pytest.raises(ValueError, match="n must be"):
    P.select_prompts(prompts, 41)
  with pytest.raises(ValueError, match="n must be"):
    P.select_prompts(prompts, 0)


def test_prompt_seed():
  # By hand: "ab" = bytes 97, 98 -> (97 * 31 + 98) = 3105.
  assert P.prompt_hash("ab") == 3105
  assert P.prompt_seed("ab") == 3105
  assert P.prompt_seed("ab", base_seed=1) == (3105 + 1_000_000_007) % 2**31 == 1_000_003_112
  # "é" is UTF-8 0xC3 0xA9: 195 * 31 + 169 = 6214.
  assert P.prompt_hash("é") == 6214
  # A long prompt wraps the modulus: compare with the closed-form polynomial sum(b_i 31^(n-1-i)).
  text = P.BUILTIN_PROMPTS[7] * 3
  data = text.encode("utf-8")
  closed_form = sum(b * pow(31, len(data) - 1 - i, 1_000_000_007) for i, b in enumerate(data)) % 1_000_000_007
  assert P.prompt_hash(text) == closed_form
  # ASCII: the same as deepcompressor's code-point hash.
  h = 0
  for ch in text:
    h = (h * 31 + ord(ch)) % 1_000_000_007
  assert P.prompt_seed(text) == h
  seeds = [P.prompt_seed(p, 12345) for p in P.BUILTIN_PROMPTS]
  assert seeds == [P.prompt_seed(p, 12345) for p in P.BUILTIN_PROMPTS]  # stable across calls
  assert seeds[::-1] == [P.prompt_seed(p, 12345) for p in P.BUILTIN_PROMPTS[::-1]]  # order-free
  assert len(set(seeds)) == 64 and all(0 <= s < 2**31 for s in seeds)
  assert P.prompt_seed("ab", 2) != P.prompt_seed("ab", 1)
