"""Data parallelism over the batch axis: the helpers on one device, and on 4 (forced host) CPU devices
the same generated images and metrics as on one device.

The 4-device run needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before jax
initializes, so it runs in a subprocess; inside it, each result is computed twice, on a mesh of
the 4 devices and on a mesh of the first device only, and compared.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from svdquant_jax.utils import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_helpers_on_one_device():
  mesh = sharding.batch_mesh()
  assert mesh.axis_names == ("batch",) and mesh.size == jax.local_device_count()
  assert [sharding.padded_size(n, mesh) for n in (0, 1, 5)] == [mesh.size * max(1, -(-n // mesh.size)) for n in
                                                                (0, 1, 5)]
  x = np.arange(10, dtype=np.float32).reshape(5, 2)
  padded = sharding.pad_rows(x, 7)
  np.testing.assert_array_equal(padded, np.concatenate([x, x[-1:], x[-1:]]))
  sharded = sharding.shard_batch(x, mesh, 8)
  assert sharded.shape == (8, 2) and sharded.sharding.spec == jax.sharding.PartitionSpec("batch")
  np.testing.assert_array_equal(np.asarray(sharded)[:5], x)
  fn = jax.jit(lambda w, a, b: a @ w + b[:, :1])
  w = sharding.replicate(jnp.asarray([[1.0, 2.0], [3.0, -1.0]]), mesh)
  got = sharding.map_batches(fn, [x, 2 * x], mesh, 2, replicated_args=(w,))
  np.testing.assert_array_equal(got, x @ np.asarray([[1.0, 2.0], [3.0, -1.0]]) + 2 * x[:, :1])
  with pytest.raises(ValueError, match="larger than the padded size"):
    sharding.pad_rows(x, 3)
  with pytest.raises(ValueError, match="different lengths"):
    sharding.map_batches(fn, [x, x[:2]], mesh, 2)
  with pytest.raises(ValueError, match="batch_size must be a positive int"):
    sharding.map_batches(fn, [x], mesh, 0)


_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import numpy as np, jax
    from svdquant_jax.eval import protocol
    from svdquant_jax.flows import evaluate
    from svdquant_jax.flows import eval_metrics
    from svdquant_jax.flows.eval_metrics import ImageSet, Inputs
    from svdquant_jax.flows.generation import GenerationSettings
    from svdquant_jax.pipelines.loading import load_pipeline
    from svdquant_jax.utils import sharding

    out, lpips_w, inception_w, clip_w = sys.argv[1:5]
    assert jax.device_count() == 4, jax.devices()
    report = {}
    x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
    mesh4, mesh1 = sharding.batch_mesh(), sharding.single_device_mesh()
    double = jax.jit(lambda a: a * 2 + 1)  # exact in float32 (a * a + 1 may fuse to an FMA)
    report["map_batches"] = float(np.abs(sharding.map_batches(double, [x], mesh4, 3) - (x * 2 + 1)).max())

    pipe = load_pipeline("flux-tiny")
    settings = GenerationSettings(num_steps=2, height=64, width=64, batch_size=4).resolved(pipe)
    prompts = ["a red fox in the snow", "a blue car", "a green tree by a lake", "a cat", "a dog on a sofa",
               "a bowl of fruit"]
    samples = [protocol.Sample(f"s{i}", p) for i, p in enumerate(prompts)]
    for name, mesh in (("dp4", mesh4), ("dp1", mesh1)):
      evaluate.generate_samples(pipe, samples, settings, os.path.join(out, name), mesh=mesh, progress=False)
    files = [s.file for s in samples]
    a = np.stack([protocol.read_rgb(os.path.join(out, "dp4", f)) for f in files]).astype(int)
    b = np.stack([protocol.read_rgb(os.path.join(out, "dp1", f)) for f in files]).astype(int)
    report["images_max_diff"] = int(np.abs(a - b).max())
    report["images_equal_fraction"] = float((a == b).mean())
    # The generate command's path: 3 prompts in a batch of 4 on 4 devices, and on 1.
    from svdquant_jax.flows import generation
    for name, mesh in (("gen4", mesh4), ("gen1", mesh1)):
      generation.generate_images(pipe, prompts[:3], settings, os.path.join(out, name), mesh=mesh, progress=False)
    g = [np.stack([protocol.read_rgb(os.path.join(out, name, generation.image_file(i))) for i in range(3)]).astype(int)
         for name in ("gen4", "gen1")]
    report["generate_max_diff"] = int(np.abs(g[0] - g[1]).max())
    report["generate_equal_fraction"] = float((g[0] == g[1]).mean())

    # Metrics of the dp1 images against a perturbed copy, on 4 devices and on 1.
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(out, "noisy"), exist_ok=True)
    for f, img in zip(files, b):
      noisy = np.clip(img + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
      protocol_png = os.path.join(out, "noisy", f)
      from svdquant_jax.pipelines.images import write_png
      write_png(protocol_png, noisy)
    results = {}
    for dp in (True, False):
      c = evaluate.default_config().eval
      c.lpips_weights, c.inception_weights, c.clip_model = lpips_w, inception_w, clip_w
      c.batch_size, c.feature_cache, c.data_parallel = 4, "", dp
      c.metrics = "psnr,ssim,lpips,clip_score,clip_iqa"  # FID: its features below (a 2048-d FID costs ~8 s)
      ev = evaluate.Evaluator(c, len(files), ["reference", "prompts"], progress=False)
      assert ev.context.mesh.size == (4 if dp else 1) and not ev.notes, ev.notes
      res = ev.evaluate(Inputs(ImageSet(os.path.join(out, "noisy"), files),
                               ImageSet(os.path.join(out, "dp1"), files, "reference"), None, prompts))
      results[dp] = {k: (r.value, None if r.per_image is None else np.asarray(r.per_image).tolist())
                     for k, r in res.items()}
      images = [protocol.read_rgb(os.path.join(out, "noisy", f)) for f in files]
      feats = eval_metrics.inception_extractor(ev.context).compute(images)
      results[dp]["inception"] = (float(np.abs(feats).max()), feats.ravel().tolist())
    report["metrics"] = results
    print("REPORT" + json.dumps(report))
''')


@pytest.mark.slow  # ~35 s on an idle 2-core CPU (60 s loaded): a fresh process, generation and every metric twice
def test_four_devices_give_the_images_and_metrics_of_one(tmp_path):
  from test_evaluate import random_inception_file, random_lpips_file, tiny_clip_folder
  lpips_w = random_lpips_file(str(tmp_path / "lpips_alex.safetensors"))
  inception_w = random_inception_file(str(tmp_path / "inception.safetensors"))
  clip_w = tiny_clip_folder(str(tmp_path / "clip"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path), lpips_w, inception_w, clip_w], env=env,
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads(done.stdout.split("REPORT", 1)[1])
  assert report["map_batches"] == 0.0
  # Generation: the 4-device partition of each batch rounds a few pixels one level differently.
  assert report["images_max_diff"] <= 1 and report["images_equal_fraction"] > 0.999, report
  assert report["generate_max_diff"] <= 1 and report["generate_equal_fraction"] > 0.999, report
  four, one = report["metrics"]["true"], report["metrics"]["false"]
  logging.info("4 vs 1 device: images max |diff| %d, equal %.6f; metrics %s", report["images_max_diff"],
               report["images_equal_fraction"],
               {k: float(np.max(np.abs(np.asarray(four[k][1]) - np.asarray(one[k][1])) / np.max(np.abs(one[k][1]))))
                for k in four})
  assert set(four) == set(one) == {"psnr", "ssim", "lpips", "inception", "clip_score", "clip_iqa"}
  for name in four:
    (v4, per4), (v1, per1) = four[name], one[name]
    assert abs(v4 - v1) <= 1e-5 * max(abs(v1), 1.0), (name, v4, v1)
    if name == "clip_iqa":  # tiny probabilities of a random model: compare their logs
      per4, per1 = np.log(per4), np.log(per1)
    np.testing.assert_allclose(per4, per1, rtol=1e-5, atol=1e-5 * np.abs(per1).max(), err_msg=name)
