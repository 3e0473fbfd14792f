"""FLUX.1-schnell (deepcompressor `model/flux.1-schnell.yaml`): bf16, 4 steps, no guidance, 1024^2."""


def update(c):
  c.model = "flux-schnell"
  c.eval.num_prompts = 1024
  c.calib.num_prompts = 128
  c.calib.num_samples = 128
  c.calib.batch_size = 32
  c.calib.max_tokens = 131072   # 128 samples x 4608 tokens would need ~25 GB for the fc2 inputs in f32
