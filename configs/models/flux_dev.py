"""FLUX.1-dev (deepcompressor `model/flux.1-dev.yaml`): bf16, 50 steps, guidance 3.5, 1024^2."""


def update(c):
  c.model = "flux-dev"
  c.eval.num_prompts = 1024
  c.calib.num_prompts = 128
  c.calib.num_samples = 128
  c.calib.batch_size = 16
  c.calib.max_tokens = 131072   # 128 samples x 4608 tokens would need ~25 GB for the fc2 inputs in f32
