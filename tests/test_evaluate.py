"""The evaluation step (flows/evaluate.py, flows/eval_metrics.py): every metric against the library
function it wraps, the feature cache, notes for what cannot be computed, bad input, the command's
outputs and the benchmark protocol's generation.

Weights are tiny and random where real ones are not needed (the metric functions themselves are
checked against their originals in test_lpips.py, test_fid.py, test_clip_score.py): LPIPS and the
FID Inception are random trees of the real shapes in our safetensors layout; CLIP is a tiny random
transformers ``CLIPModel`` folder (as in test_clip_score.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from svdquant_jax.eval import clip_score as cs
from svdquant_jax.eval import feature_cache, fid, lpips, lpips_convert, metrics, protocol
from svdquant_jax.eval import image_reward as ir
from svdquant_jax.flows import eval_metrics, evaluate
from svdquant_jax.flows.generation import GenerationSettings
from svdquant_jax.pipelines import images as images_lib
from svdquant_jax.pipelines.loading import load_pipeline
from svdquant_jax.utils import sharding, trees
from svdquant_jax.utils.safetensors_io import CheckpointError, save_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, SIZE = 4, 48


# ----------------------------------------------------------------------------- shared fixtures (also test_sharding)
def random_inception_file(path: str) -> str:
  """Random Inception weights of the real shapes (BN variances positive), our layout."""
  rng = np.random.default_rng(0)
  flat = {}
  for name, leaf in trees.flatten(fid.abstract_params()).items():
    if name.endswith("var"):
      v = rng.uniform(0.5, 1.5, leaf.shape)
    elif name.endswith(("mean", "beta")):
      v = rng.normal(0, 0.1, leaf.shape)
    else:
      v = rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    flat[name] = v.astype(np.float32)
  save_safetensors(path, flat)
  return path


def random_lpips_file(path: str, net: str = "alex") -> str:
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_map(
      lambda leaf: np.abs(rng.normal(0, 0.1, leaf.shape)).astype(np.float32), lpips.abstract_params(net))
  lpips_convert.save_lpips_params(params, path, net)
  return path


def tiny_clip_folder(path: str) -> str:
  """A tiny random transformers ``CLIPModel`` with processor and tokenizer, saved to ``path``."""
  import torch
  import torch_refs
  torch_refs.import_torchvision()
  import transformers
  from test_clip_score import tiny_clip_tokenizer
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  from svdquant_jax.models import tokenizers as tok_lib
  tokenizer = tiny_clip_tokenizer()
  eos = tokenizer.convert_tokens_to_ids(tok_lib.CLIP_EOS)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos, pad_token_id=eos,
                       bos_token_id=tokenizer.convert_tokens_to_ids(tok_lib.CLIP_BOS)),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         image_size=32, patch_size=8),
      projection_dim=16)
  torch.manual_seed(0)
  model = transformers.CLIPModel(config).eval()
  torch_refs.perturb_norms_and_biases(model, 1)
  processor = transformers.CLIPProcessor(
      image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
      tokenizer=tokenizer)
  model.save_pretrained(path)
  processor.save_pretrained(path)
  return path


def tiny_image_reward(folder: str) -> tuple[str, str]:
  """A tiny random ImageReward (our safetensors layout) and a BERT tokenizer folder."""
  import transformers
  from svdquant_jax.eval import image_reward as ir
  from svdquant_jax.models import blip
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "photo", "of", "a", "cat", "##s"]
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.txt"), "w") as f:
    f.write("\n".join(vocab) + "\n")
  tokenizer = os.path.join(folder, "bert")
  transformers.BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(tokenizer)
  config = ir.ImageRewardConfig(
      blip.BLIPVisionConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96,
                            image_size=32, patch_size=16),
      blip.BLIPTextConfig(vocab_size=len(vocab) + 2, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=40, encoder_width=48))
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map(lambda leaf: rng.normal(0, 0.2, leaf.shape).astype(np.float32),
                                  ir.abstract_params(config))
  path = os.path.join(folder, "image_reward.safetensors")
  ir.save_image_reward(path, params, config)
  return path, tokenizer


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp("weights")
  reward, reward_tokenizer = tiny_image_reward(str(root / "image_reward"))
  return {"lpips": random_lpips_file(str(root / "lpips_alex.safetensors")),
          "inception": random_inception_file(str(root / "inception.safetensors")),
          "clip": tiny_clip_folder(str(root / "clip")), "image_reward": reward,
          "image_reward_tokenizer": reward_tokenizer}


def synthetic_folders(root, n=N, size=SIZE, seed=0):
  """``ref/`` and ``m1/`` (reference + noise) with ``generation.json`` (prompts) in each; returns arrays."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  ref = np.stack([np.stack([128 + 100 * np.sin((3 + i) * xx + c + yy * (2 + i)) for c in range(3)], -1)
                  for i in range(n)])
  ref = np.clip(ref + rng.normal(0, 10, ref.shape), 0, 255).astype(np.uint8)
  m1 = np.clip(ref + rng.normal(0, 12, ref.shape), 0, 255).astype(np.uint8)
  files = [f"{i:05d}.png" for i in range(n)]
  prompts = [f"the photo of a cat {i}" for i in range(n)]
  for name, images in (("ref", ref), ("m1", m1)):
    images_lib.save_images(os.path.join(root, name), images, files)
    meta = {"images": [{"file": f, "prompt": p} for f, p in zip(files, prompts)]}
    with open(os.path.join(root, name, "generation.json"), "w") as f:
      json.dump(meta, f)
  return ref, m1, prompts


def config_for(root, weights, **eval_overrides):
  c = evaluate.default_config()
  c.reference = os.path.join(root, "ref")
  c.methods = f"m1={os.path.join(root, 'm1')}"
  c.output_dir = os.path.join(root, "out")
  c.progress = False
  c.eval.lpips_weights = weights["lpips"]
  c.eval.inception_weights = weights["inception"]
  c.eval.clip_model = weights["clip"]
  c.eval.image_reward_weights = weights.get("image_reward", "")
  c.eval.image_reward_tokenizer = weights.get("image_reward_tokenizer", "")
  c.eval.fid_min_images = 0
  c.eval.batch_size = 3           # 4 images: a full batch and a padded one
  c.eval.feature_cache = os.path.join(root, "cache")
  for k, v in eval_overrides.items():
    setattr(c.eval, k, v)
  return c


# ----------------------------------------------------------------------------- tests
def _pixel_statistics(images):
  """A cheap stand-in feature (8 numbers per image) for tests of the feature plumbing."""
  x = np.stack(images).astype(np.float64) / 255
  return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, :8, :8].mean(axis=(1, 2, 3))[:, None],
                         x.max(axis=(1, 2, 3))[:, None]], axis=1).astype(np.float32)


def _fake_inception(monkeypatch, fingerprint="pixels-v1", computed=None, nan_row=None):
  def extractor(context):
    def compute(images):
      if computed is not None:
        computed.append(len(images))
      out = _pixel_statistics(images)
      if nan_row is not None and nan_row < len(out):
        out[nan_row] = np.nan
      return out
    return eval_metrics.FeatureExtractor("inception", fingerprint, 8, compute)
  monkeypatch.setattr(eval_metrics, "inception_extractor", extractor)


def test_every_metric_equals_the_library_function(tmp_path, weights, caplog, monkeypatch):
  """Each registered metric against its library function (the Inception network itself: next test)."""
  ref, m1, prompts = synthetic_folders(str(tmp_path))
  _fake_inception(monkeypatch)  # the Fréchet distance of 2048-d features costs ~8 s per call on CPU
  with caplog.at_level(logging.WARNING):
    result = evaluate.run(config_for(str(tmp_path), weights))
  fp, row = result["rows"]
  assert (fp["method"], row["method"]) == ("full precision", "m1")
  # PSNR / SSIM: per image bit for bit, and the mean exactly as the PTQ flow computed it before.
  np.testing.assert_array_equal(row["per_image"]["psnr"], np.asarray(metrics.psnr(m1, ref)))
  np.testing.assert_array_equal(row["per_image"]["ssim"], np.asarray(metrics.ssim(m1, ref)))
  assert row["psnr"] == float(np.mean(np.asarray(metrics.psnr(m1, ref))))
  assert row["ssim"] == float(np.mean(np.asarray(metrics.ssim(m1, ref))))
  want = np.asarray(lpips.lpips(m1, ref, weights["lpips"]))
  np.testing.assert_allclose(row["per_image"]["lpips"], want, rtol=1e-6)
  assert abs(row["lpips"] - float(np.mean(want))) <= 1e-6 * abs(row["lpips"])
  assert row["fid_ref"] == fid.fid(_pixel_statistics(list(m1)), _pixel_statistics(list(ref)))
  assert "fewer than the Inception feature dimension" in row["value_notes"]["fid_ref"]
  assert f"FID from {N} images" in caplog.text
  want_clip = cs.clip_score(list(m1), prompts, weights["clip"])
  np.testing.assert_allclose(row["per_image"]["clip_score"], want_clip.scores, rtol=1e-5, atol=1e-5)
  assert abs(row["clip_score"] - want_clip.mean) <= 1e-5 * max(1.0, want_clip.mean)
  # The random model's CLIP-IQA probabilities are tiny (logit gaps ~17): compare the log-probabilities.
  scorer = ir.ImageRewardScorer.from_files(weights["image_reward"], weights["image_reward_tokenizer"])
  want_ir = ir.image_reward(list(m1), prompts, scorer)
  np.testing.assert_allclose(row["per_image"]["image_reward"], want_ir.scores, rtol=1e-5)
  assert abs(row["image_reward"] - want_ir.mean) <= 1e-5 * abs(want_ir.mean) and np.std(want_ir.scores) > 1e-3
  want_iqa = cs.clip_iqa(list(m1), weights["clip"])
  np.testing.assert_allclose(np.log(row["per_image"]["clip_iqa"]), np.log(want_iqa), atol=1e-4)
  # The reference row: its own ground-truth metrics, no reference metrics.
  assert "psnr" not in fp and "lpips" not in fp
  np.testing.assert_allclose(np.log(fp["per_image"]["clip_iqa"]), np.log(cs.clip_iqa(list(ref), weights["clip"])),
                             atol=1e-4)
  table = open(tmp_path / "out" / "results.md").read()
  assert ("| method | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ | FID vs ref ↓ | CLIP score ↑ | CLIP-IQA ↑ | "
          "ImageReward ↑ |") in table
  assert (f"| full precision | ∞ | 1.000 | 0 | 0 | {fp['clip_score']:.2f} | {fp['clip_iqa']:.3f} | "
          f"{fp['image_reward']:.3f} |") in table, table
  assert f"| m1 | {row['psnr']:.2f} | {row['ssim']:.3f} | {row['lpips']:.3f} | {row['fid_ref']:.2f} † |" in table
  assert "- FID: not computed: no real images" in table
  sheet = images_lib.read_png(row["comparison"])
  assert sheet.shape[1] == 3 * 144 + 4 * 6 and sheet.shape[0] > N * 144  # 48 px images enlarged 3x (>= 128)
  with open(tmp_path / "out" / "results.json") as f:
    assert json.load(f)["rows"][1]["psnr"] == row["psnr"]


def test_inception_extractor_equals_fid_features(weights):
  """The data-parallel extractor (padded batches; one-by-one resize when sizes differ) against
  ``fid.inception_features``."""
  rng = np.random.default_rng(5)
  square = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(2)]
  wide = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  settings = evaluate.default_config().eval
  settings.inception_weights = weights["inception"]
  context = eval_metrics.Context(settings, sharding.batch_mesh(), 3, 3)
  extractor = eval_metrics.inception_extractor(context)
  params = fid.load_inception_params(weights["inception"])
  want = np.concatenate([fid.inception_features(np.stack(square), params), fid.inception_features(wide[None], params)])
  for got in (np.concatenate([extractor.compute(square), extractor.compute([wide])]),
              extractor.compute(square + [wide])):
    err = float(np.abs(got - want).max() / np.abs(want).max())
    assert err < 1e-5, err
  assert extractor.fingerprint == feature_cache.tree_fingerprint(params, "inception-2015-12-05 clean-resize")


def test_feature_cache_is_reused_and_follows_file_changes(tmp_path, weights, monkeypatch):
  ref, m1, _ = synthetic_folders(str(tmp_path))
  computed = []
  _fake_inception(monkeypatch, computed=computed)
  config = config_for(str(tmp_path), weights, metrics="fid_ref")
  first = evaluate.run(config)["rows"][1]["fid_ref"]
  assert first == fid.fid(_pixel_statistics(list(m1)), _pixel_statistics(list(ref)))
  assert computed == [3, 3, 1, 1]  # method and reference, two batches each
  files = sorted(os.listdir(tmp_path / "cache"))
  assert len(files) == 1 and files[0] == "inception-pixels-v1" and len(os.listdir(tmp_path / "cache" / files[0])) == 2
  computed.clear()
  assert evaluate.run(config)["rows"][1]["fid_ref"] == first
  assert computed == []  # every feature came from the cache
  changed = m1[2].copy()
  changed[:8] = 0
  images_lib.write_png(tmp_path / "m1" / "00002.png", changed)
  again = evaluate.run(config)["rows"][1]["fid_ref"]
  assert computed == [1] and again != first  # only the changed image
  m1[2] = changed
  assert abs(again - fid.fid(_pixel_statistics(list(m1)), _pixel_statistics(list(ref)))) <= 1e-9 * again
  computed.clear()
  _fake_inception(monkeypatch, fingerprint="other-weights", computed=computed)
  evaluate.run(config)
  assert computed == [3, 3, 1, 1]  # other weights: nothing reused
  store = feature_cache.FeatureCache(str(tmp_path / "cache"), "inception", "pixels-v1")
  feats, hit = store.lookup(str(tmp_path / "m1"), [f"{i:05d}.png" for i in range(N)] + ["absent.png"])
  assert hit.tolist() == [True] * N + [False]
  np.testing.assert_array_equal(feats[:N], _pixel_statistics(list(m1)))
  with open(store.path(str(tmp_path / "m1")), "wb") as f:
    f.write(b"damaged")
  assert store.lookup(str(tmp_path / "m1"), ["00000.png"])[1].tolist() == [False]


def test_what_cannot_be_computed_is_a_note(tmp_path, weights):
  synthetic_folders(str(tmp_path))
  c = config_for(str(tmp_path), weights, lpips_weights="auto", inception_weights="", clip_model="auto",
                 fid_min_images=2048, image_reward_weights="auto")
  result = evaluate.run(c)
  table = open(tmp_path / "out" / "results.md").read()
  auto = os.path.join(os.environ["XDG_CACHE_HOME"], "svdquant_jax", "weights")
  assert "LPIPS" not in table.splitlines()[2] and "lpips" not in result["rows"][1]
  assert (f"- LPIPS: no weights (eval.lpips_weights=auto looked for {auto}/lpips_alex.safetensors; convert them "
          "with launch/convert_lpips.py, see docs/metrics.md)") in table
  assert f"- FID vs ref: not computed: {N} images < eval.fid_min_images=2048" in table
  assert "- FID: not computed: no real images" in table
  assert f"- CLIP score: no weights (eval.clip_model=auto looked for {auto}/clip-vit-large-patch14" in table
  assert (f"- ImageReward: no weights (eval.image_reward_weights=auto looked for {auto}/image_reward.safetensors; "
          "convert ImageReward.pt with launch/convert_image_reward.py, see docs/metrics.md)") in table
  c = config_for(str(tmp_path), weights, lpips_weights=str(tmp_path / "missing.safetensors"))
  with pytest.raises(FileNotFoundError, match="eval.lpips_weights=.*missing.safetensors: no such file"):
    evaluate.run(c)
  with pytest.raises(ValueError, match=r"unknown metric\(s\) \['psnrr'\]"):
    evaluate.run(config_for(str(tmp_path), weights, metrics="psnrr"))


def test_bad_input_is_named(tmp_path, weights, caplog):
  ref, m1, _ = synthetic_folders(str(tmp_path))
  c = config_for(str(tmp_path), weights, metrics="psnr,lpips")
  # A method image of another size.
  images_lib.write_png(tmp_path / "m1" / "00003.png", m1[3][:32, :32])
  with pytest.raises(ValueError, match=r"m1/00003.png is 32x32 but .*m1/00000.png .* is 48x48"):
    evaluate.run(c)
  images_lib.write_png(tmp_path / "m1" / "00003.png", m1[3])
  # Every method image of another size than the reference.
  small = tmp_path / "small"
  images_lib.save_images(small, m1[:, :40, :40], [f"{i:05d}.png" for i in range(N)])
  c.methods = f"small={small}"
  with pytest.raises(ValueError, match=r"small/00000.png is 40x40 but the reference image .*ref/00000.png is 48x48"):
    evaluate.run(c)
  # Counts that differ: a missing and an extra image.
  os.remove(small / "00003.png")
  images_lib.write_png(small / "extra.png", m1[0])
  with pytest.raises(ValueError, match=r"small has 4 images, the evaluation expects 4 \(missing 1: 00003.png; not in "
                                       r"the reference set 1: extra.png\)"):
    evaluate.run(c)
  empty = tmp_path / "empty"
  empty.mkdir()
  c.methods = f"e={empty}"
  with pytest.raises(ValueError, match=f"no images .* in {empty}"):
    evaluate.run(c)
  # Grayscale and RGBA images: converted with a warning naming the file.
  images_lib.write_png(tmp_path / "m1" / "00001.png", m1[1][:, :, :1])
  alpha = np.full((SIZE, SIZE, 1), 9, np.uint8)
  images_lib.write_png(tmp_path / "m1" / "00002.png", np.concatenate([m1[2], alpha], -1))
  c.methods = f"m1={tmp_path / 'm1'}"
  with caplog.at_level(logging.WARNING):
    row = evaluate.run(c)["rows"][1]
  assert "m1/00001.png is a grayscale image" in caplog.text and "m1/00002.png is a RGBA image" in caplog.text
  gray = m1.copy()
  gray[1] = m1[1][:, :, :1]
  assert row["psnr"] == float(np.mean(np.asarray(metrics.psnr(gray, ref))))


def test_nan_features_and_clip_without_tokenizer(tmp_path, weights, monkeypatch):
  synthetic_folders(str(tmp_path))
  _fake_inception(monkeypatch, nan_row=1)
  c = config_for(str(tmp_path), weights, metrics="fid_ref", feature_cache="")
  with pytest.raises(ValueError, match=r"inception features are NaN/inf for 1 image\(s\): .*m1/00001.png$"):
    evaluate.run(c)
  no_tok = tmp_path / "clip_no_tokenizer"
  no_tok.mkdir()
  for name in os.listdir(weights["clip"]):
    if "token" not in name and "vocab" not in name and "merges" not in name and "special" not in name:
      os.symlink(os.path.join(weights["clip"], name), no_tok / name)
  c = config_for(str(tmp_path), weights, metrics="clip_iqa", clip_model=str(no_tok))
  with pytest.raises(CheckpointError, match=f"{no_tok}: CLIP tokenizer file tokenizer.json .* not found"):
    evaluate.run(c)


def test_run_dir_and_the_command(tmp_path, weights):
  """A PTQ-like run folder: every method, its comparison sheet and the block-error plot."""
  root = tmp_path / "run"
  ref, m1, _ = synthetic_folders(str(tmp_path))
  root.mkdir()
  os.rename(tmp_path / "ref", root / "reference")
  for name, images in (("svdq", m1), ("rtn", np.clip(m1.astype(int) + 30, 0, 255).astype(np.uint8))):
    images_lib.save_images(root / name / "samples", images, [f"{i:05d}.png" for i in range(N)])
  rows = [{"method": "svdq", "block_errors": [["b0", 0.1], ["b1", 0.2]]},
          {"method": "rtn", "block_errors": [["b0", 0.3], ["b1", 0.5]]}]
  (root / "results.json").write_text(json.dumps({"rows": rows}))
  cmd = [sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), f"--config.run_dir={root}",
         "--config.eval.metrics=psnr,ssim,lpips", f"--config.eval.lpips_weights={weights['lpips']}",
         "--config.eval.contact_sheet_images=2", "--config.progress=false"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-2000:]
  out = root / "evaluation"
  result = json.loads((out / "results.json").read_text())
  assert [r["method"] for r in result["rows"]] == ["full precision", "svdq", "rtn"]
  assert result["rows"][1]["psnr"] > result["rows"][2]["psnr"]
  assert result["files"] == [f"{i:05d}.png" for i in range(N)] and not result["notes"]
  assert (out / "svdq.comparison.png").is_file() and (out / "block_errors.png").is_file()
  assert "| svdq |" in done.stdout
  bad = subprocess.run(cmd[:2] + [f"--config.run_dir={tmp_path / 'nope'}"], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
  assert bad.returncode == 1 and bad.stderr.strip().startswith("error: FileNotFoundError: run_dir=") and \
      "no reference/ folder" in bad.stderr


def test_benchmark_generation_follows_the_protocol(tmp_path, monkeypatch):
  """Images named and seeded by the sample name, independent of the other samples; reused on rerun;
  evaluated against the benchmark's real images (FID) with the benchmark's prompts."""
  meta = {f"{h:08x}": {"category": "c", "prompt": f"a red fox, number {i}"}
          for i, h in enumerate([11, 22, 33, 44, 55])}
  (tmp_path / "meta_data.json").write_text(json.dumps(meta))
  pipe = load_pipeline("flux-tiny")
  settings = GenerationSettings(num_steps=1, height=32, width=32, batch_size=2).resolved(pipe)
  bench = protocol.load_benchmark(tmp_path / "meta_data.json")
  samples = bench.select(3)
  assert [s.name for s in samples] == sorted(s.name for s in samples)
  mesh = sharding.single_device_mesh()
  out = evaluate.generate_samples(pipe, samples, settings, str(tmp_path / "all"), mesh=mesh, progress=False)
  assert [r["seed"] for r in out["images"]] == [protocol.image_seed(s.name) for s in samples]
  alone = evaluate.generate_samples(pipe, samples[1:2], settings, str(tmp_path / "one"), mesh=mesh, progress=False)
  assert alone["images"][0]["file"] == samples[1].name + ".png"
  np.testing.assert_array_equal(images_lib.read_png(tmp_path / "one" / samples[1].file),
                                images_lib.read_png(tmp_path / "all" / samples[1].file))
  noise = pipe.prepare_latents([samples[0].seed, samples[1].seed], 32, 32)[0]
  want = pipe([samples[0].prompt, samples[1].prompt], height=32, width=32, num_steps=1, latents=noise, progress=False)
  np.testing.assert_array_equal(images_lib.read_png(tmp_path / "all" / samples[0].file), np.asarray(want)[0])
  monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("a finished image was generated again"))
  evaluate.generate_samples(pipe, samples, settings, str(tmp_path / "all"), mesh=mesh, progress=False)
  # The evaluation reads the protocol's subset, prompts and real images.
  for s in bench.samples:
    images_lib.write_png(tmp_path / "imgs" / "c" / f"{s.name}.png", np.full((40, 30, 3), 100, np.uint8))
    os.rename(tmp_path / "imgs" / "c" / f"{s.name}.png", tmp_path / "imgs" / "c" / f"{s.name}.jpg")
  c = evaluate.default_config()
  c.eval.benchmark, c.eval.benchmark_images, c.eval.num_prompts = str(tmp_path / "meta_data.json"), str(
      tmp_path / "imgs"), 3
  images = evaluate.benchmark_images(c.eval, 3)
  assert images.files == [s.file for s in samples] and images.prompts == [s.prompt for s in samples]
  assert images.benchmark == "MJHQ-3" and images.real.files == [f"c/{s.name}.jpg" for s in samples]
  assert [(s.name, s.prompt) for s in images.samples] == [(s.name, s.prompt) for s in samples]
  # The PTQ flow's prompts with a benchmark: the protocol's subset; calibration from the built-in list.
  from svdquant_jax.flows import ptq, ptq_config
  pc = ptq_config.compose("flux-tiny")
  pc.eval.benchmark, pc.eval.benchmark_images, pc.eval.num_prompts = c.eval.benchmark, c.eval.benchmark_images, 3
  eval_prompts, calib_prompts = ptq.prompt_sets(pc)
  assert eval_prompts == [s.prompt for s in samples] and len(calib_prompts) == pc.calib.num_prompts
  pc.eval.prompts_path = str(tmp_path / "p.txt")
  with pytest.raises(ValueError, match="eval.prompts_path or eval.benchmark, not both"):
    ptq.prompt_sets(pc)
  os.remove(tmp_path / "imgs" / "c" / f"{samples[2].name}.jpg")
  with pytest.raises(FileNotFoundError, match=f"1 real image.* of MJHQ missing, e.g. .*{samples[2].name}.jpg"):
    evaluate.benchmark_images(c.eval, 3)


def test_registry_and_prompt_image_metric(tmp_path):
  """A prompt-scoring metric plugs in with one registry line (as ImageReward will)."""
  ref, m1, prompts = synthetic_folders(str(tmp_path))
  path = tmp_path / "scorer.bin"
  path.write_bytes(b"w")
  loaded = []

  def load(p):
    loaded.append(p)
    return 2.0

  def score(model, images, batch_prompts):
    return model * images.mean(axis=(1, 2, 3)) + np.asarray([len(p) for p in batch_prompts])
  metric = eval_metrics.prompt_image_metric("toy", "Toy ↑", "toy_weights", load, score)
  monkey = dict(eval_metrics.REGISTRY)
  try:
    eval_metrics.register(metric)
    with pytest.raises(ValueError, match="already registered"):
      eval_metrics.register(metric)
    c = config_for(str(tmp_path), {"lpips": "", "inception": "", "clip": ""}, metrics="psnr,toy")
    c.eval.toy_weights = str(path)
    result = evaluate.run(c)
  finally:
    eval_metrics.REGISTRY.clear()
    eval_metrics.REGISTRY.update(monkey)
  want = 2.0 * m1.reshape(N, -1).mean(axis=1) + np.asarray([len(p) for p in prompts])
  np.testing.assert_allclose(result["rows"][1]["per_image"]["toy"], want, rtol=1e-6)
  assert loaded == [str(path)] and "| Toy ↑ |" in open(tmp_path / "out" / "results.md").read()
  assert feature_cache.resolve("") is None and feature_cache.resolve("auto").endswith("svdquant_jax/features")


def test_ptq_results_table_gains_metric_columns_and_notes():
  from svdquant_jax.flows import ptq
  row = {"method": "svdq-int4", "format": "int4", "rank": 32, "psnr": 20.126, "ssim": 0.81234, "lpips": 0.2567,
         "fid_ref": 31.5, "value_notes": {"fid_ref": "from 8 images"}, "final_block_error": 0.12345,
         "weight_mb": 0.5, "quant_seconds": 3.04}
  old_style = {k: v for k, v in row.items() if k not in ("lpips", "fid_ref", "value_notes")}
  res = {"model": "flux-tiny", "fp_weight_mb": 1.0, "rows": [row], "reference_row": {"clip_iqa": 0.25},
         "notes": ["LPIPS: no weights"]}
  assert ptq.results_table([res]).splitlines() == [
      "| model | method | format | rank | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ | FID vs ref ↓ | CLIP-IQA ↑ | "
      "last-block rel. err ↓ | weights (MB) | quantize (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
      "| flux-tiny | full precision | - | - | ∞ | 1.000 | 0 | 0 | 0.250 | 0 | 1.00 | - |",
      "| flux-tiny | svdq-int4 | int4 | 32 | 20.13 | 0.812 | 0.257 | 31.50 † | - | 0.1235 | 0.50 | 3.0 |",
      "",
      "† FID vs ref: from 8 images",
      "- LPIPS: no weights"]
  # A results.json of an earlier run (PSNR and SSIM only): the table it always had.
  assert ptq.results_table([{"model": "m", "fp_weight_mb": 1.0, "rows": [old_style]}]).splitlines() == [
      "| model | method | format | rank | PSNR (dB) ↑ | SSIM ↑ | last-block rel. err ↓ | weights (MB) | "
      "quantize (s) |",
      "|---|---|---|---|---|---|---|---|---|",
      "| m | full precision | - | - | ∞ | 1.000 | 0 | 1.00 | - |",
      "| m | svdq-int4 | int4 | 32 | 20.13 | 0.812 | 0.1235 | 0.50 | 3.0 |"]
